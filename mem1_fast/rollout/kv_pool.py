"""The paged engine's KV memory: a pool of fixed-size blocks with reference counts, and one block table per sequence.

This is bookkeeping only (ids, counts, positions); the engine owns the K/V storage, one tensor per layer indexed by
block id, and copies a block when `SequenceKV.append` says so. What it guarantees (tests/test_kv_pool.py checks it
under random interleavings):
- a block is referenced by exactly the live tables that hold it, and is free exactly when none does;
- a slot is written only through a table that owns its block alone: appending into a shared partial block first
  takes a private copy (copy-on-write), so a group's samples share the question's blocks and never each other's
  writes;
- eviction returns every block whose slots are all evicted to the pool at once; the evicted slots of a block that
  still holds live ones stay masked (their position is -1) until the block goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class PoolExhausted(RuntimeError):
    """No free block left: the batch needs more KV blocks than the pool holds."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids go first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise PoolExhausted(f"all {self.num_blocks} KV blocks of {self.block_size} tokens are in use")
        b = self._free.pop()
        self.refcount[b] = 1
        return b

    def share(self, b: int) -> None:
        if self.refcount[b] < 1:
            raise ValueError(f"block {b} is free: there is nothing to share")
        self.refcount[b] += 1

    def release(self, b: int) -> None:
        if self.refcount[b] < 1:
            raise ValueError(f"block {b} released more often than it was taken")
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            self._free.append(b)


@dataclass
class SequenceKV:
    """One sequence's block table. Slot s of the sequence lives in block `blocks[s // block_size]` at offset
    `s % block_size`; `position[s]` is the RoPE position its key was written with (-1: evicted) and `turn[s]` the
    turn that wrote it (-1: the question)."""

    pool: BlockPool
    blocks: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)
    # the live slots as maximal [start, end) runs, kept up to date by append and evict: what the attention reads
    runs: list[list[int]] = field(default_factory=list)
    live_tokens: int = 0

    @property
    def num_slots(self) -> int:
        return len(self.position)

    def append(self, positions: list[int], turn: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Reserve slots for new tokens at `positions`. Returns (where each token goes: (block, offset)), and the
        copies the engine must make first: (source block, private block) when the partial last block was shared."""
        copies, where, bs = [], [], self.pool.block_size
        s, n = self.num_slots, len(positions)
        need = -(-(s + n) // bs) - -(-s // bs) + int(n > 0 and s % bs > 0 and self.pool.refcount[self.blocks[-1]] > 1)
        if need > self.pool.num_free:  # refuse before touching anything: a failed append changes nothing
            raise PoolExhausted(f"all {self.pool.num_blocks} KV blocks of {bs} tokens are in use ({need} more "
                                f"needed, {self.pool.num_free} free)")
        for p in positions:
            s = self.num_slots
            if s % bs == 0:
                self.blocks.append(self.pool.alloc())
            elif self.pool.refcount[self.blocks[-1]] > 1:  # shared: take a private copy before writing
                src = self.blocks[-1]
                self.blocks[-1] = self.pool.alloc()
                self.pool.release(src)
                copies.append((src, self.blocks[-1]))
            self.position.append(p)
            self.turn.append(turn)
            where.append((self.blocks[-1], s % bs))
        if n:
            if self.runs and self.runs[-1][1] == s - n + 1:
                self.runs[-1][1] = s + 1
            else:
                self.runs.append([s - n + 1, s + 1])
            self.live_tokens += n
        return where, copies

    def fork(self) -> SequenceKV:
        """A new table over the same blocks (a group's samples after the shared question prefill)."""
        for b in self.blocks:
            self.pool.share(b)
        return SequenceKV(self.pool, list(self.blocks), list(self.position), list(self.turn),
                          [list(r) for r in self.runs], self.live_tokens)

    def evict(self, drop) -> int:
        """Evict the slots whose turn satisfies `drop(turn)`; frees whole blocks. Returns the tokens evicted.
        Freed blocks leave the table, so later slots keep their block and offset: slot indices are renumbered by
        whole blocks only."""
        bs, n = self.pool.block_size, 0
        for s, t in enumerate(self.turn):
            if self.position[s] >= 0 and drop(t):
                self.position[s] = -1
                n += 1
        keep = []
        for k, b in enumerate(self.blocks):
            lo, hi = k * bs, min((k + 1) * bs, self.num_slots)
            # the last block stays while it has room: new tokens are written after its last slot
            last_open = k == len(self.blocks) - 1 and hi - lo < bs
            if not last_open and all(p < 0 for p in self.position[lo:hi]):
                self.pool.release(b)
            else:
                keep.append(k)
        if len(keep) < len(self.blocks):
            self.blocks = [self.blocks[k] for k in keep]
            self.position = [p for k in keep for p in self.position[k * bs:(k + 1) * bs]]
            self.turn = [t for k in keep for t in self.turn[k * bs:(k + 1) * bs]]
        if n:
            self.live_tokens -= n
            self.runs, start = [], None
            for s, p in enumerate(self.position + [-1]):
                if p >= 0 and start is None:
                    start = s
                elif p < 0 and start is not None:
                    self.runs.append([start, s])
                    start = None
        return n

    def free(self) -> None:
        """Give every block back (the sequence is done)."""
        for b in self.blocks:
            self.pool.release(b)
        self.blocks, self.position, self.turn, self.runs, self.live_tokens = [], [], [], [], 0
