"""The paged KV pool's bookkeeping under random interleavings of start / fork / append / evict / finish.

A fake storage (block -> slot values) is written exactly where `append` says, copied where it says, and read back
through every live table: each table must see its own tokens and nobody else's writes."""
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mem1_fast.rollout.kv_pool import BlockPool, PoolExhausted, SequenceKV

OPS = st.lists(st.tuples(st.sampled_from(["start", "fork", "append", "evict", "finish"]),
                         st.integers(0, 7), st.integers(1, 9)), max_size=60)


class Harness:
    def __init__(self, num_blocks, block_size):
        self.pool = BlockPool(num_blocks, block_size)
        self.storage = {}  # (block, offset) -> value
        self.live = []  # [(table, {position: value}, next position, turn)]
        self.values = itertools.count()

    def write(self, entry, n):
        table, model, pos, turn = entry
        positions = list(range(pos, pos + n))
        where, copies = table.append(positions, turn)
        for src, dst in copies:
            assert self.pool.refcount[dst] == 1
            for off in range(self.pool.block_size):
                if (src, off) in self.storage:
                    self.storage[dst, off] = self.storage[src, off]
        for p, (b, off) in zip(positions, where):
            assert self.pool.refcount[b] == 1, "a write into a block another sequence holds"
            self.storage[b, off] = model[p] = next(self.values)
        return table, model, pos + n, turn + 1

    def check(self):
        counts = [0] * self.pool.num_blocks
        for table, model, _, _ in self.live:
            assert len(set(table.blocks)) == len(table.blocks)
            for b in table.blocks:
                counts[b] += 1
            bs = self.pool.block_size
            seen = {p: self.storage[table.blocks[s // bs], s % bs] for s, p in enumerate(table.position) if p >= 0}
            assert seen == model  # its own tokens, every one of them, nothing evicted
            assert table.live_tokens == len(model)
            live = [s for s, p in enumerate(table.position) if p >= 0]  # the runs, as slots, against the positions
            assert [s for a, e in table.runs for s in range(a, e)] == live
            assert all(e0 < a1 for (_, e0), (a1, _) in zip(table.runs, table.runs[1:]))  # maximal: gaps between
        assert counts == self.pool.refcount
        assert self.pool.num_free == counts.count(0)


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 5))
def test_random_interleavings_keep_the_pool_consistent(ops, block_size):
    h = Harness(64, block_size)
    for op, pick, n in ops:
        try:
            if op == "start" or not h.live:
                h.live.append(h.write((SequenceKV(h.pool), {}, 0, -1), n))  # a question of n tokens
            elif op == "fork":
                table, model, pos, turn = h.live[pick % len(h.live)]
                h.live.append((table.fork(), dict(model), pos, turn))
            elif op == "append":
                k = pick % len(h.live)
                h.live[k] = h.write(h.live[k], n)
            elif op == "evict":  # retain's plan: drop every generated turn before the last one
                table, model, pos, turn = h.live[pick % len(h.live)]
                keep_from = turn - 1
                dropped = {p for p, t in zip(table.position, table.turn) if p >= 0 and 0 <= t < keep_from}
                assert table.evict(lambda t: 0 <= t < keep_from) == len(dropped)
                for p in dropped:
                    del model[p]
            else:
                h.live.pop(pick % len(h.live))[0].free()
        except PoolExhausted:
            pass  # a full pool refuses; what was held stays consistent
        h.check()
    for table, *_ in h.live:
        table.free()
    assert h.pool.num_free == h.pool.num_blocks and not any(h.pool.refcount)


def test_eviction_frees_whole_blocks_and_keeps_memory_flat():
    pool = BlockPool(32, 4)
    seq = SequenceKV(pool)
    seq.append(list(range(6)), turn=-1)  # the question: 6 tokens, 2 blocks
    pos, held = 6, []
    for turn in range(16):
        seq.evict(lambda t: 0 <= t < turn - 1)  # retain: keep the last turn
        seq.append(list(range(pos, pos + 9)), turn)
        pos += 9
        held.append(len(seq.blocks))
    assert max(held[2:]) <= 2 + 6 and held[15] == held[3]  # question + at most two turns' blocks: flat
    assert pool.num_free == 32 - len(seq.blocks)
    seq.free()
    assert pool.num_free == 32


def test_copy_on_write_of_a_shared_partial_block():
    pool = BlockPool(8, 4)
    a = SequenceKV(pool)
    a.append([0, 1, 2, 3, 4, 5], -1)  # 1 full block + 2 slots of the second
    b = a.fork()
    assert [pool.refcount[x] for x in a.blocks] == [2, 2]
    where, copies = b.append([6], 0)
    assert copies == [(a.blocks[1], b.blocks[1])] and where == [(b.blocks[1], 2)]
    assert b.blocks[0] == a.blocks[0] and pool.refcount[a.blocks[0]] == 2 and pool.refcount[a.blocks[1]] == 1
    where, copies = a.append([6], 0)  # a now owns its block alone: no copy
    assert copies == [] and where == [(a.blocks[1], 2)]


def test_errors():
    pool = BlockPool(1, 2)
    seq = SequenceKV(pool)
    seq.append([0, 1], -1)
    with pytest.raises(PoolExhausted, match="all 1 KV blocks"):
        seq.append([2], 0)
    with pytest.raises(ValueError, match="block 0 released"):
        seq.free(), pool.release(0)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)
