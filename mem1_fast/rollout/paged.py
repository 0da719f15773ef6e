"""`paged`: the engine over a paged KV cache (rollout/kv_pool.py), serving any exact mode from its KV plan.

What differs from `hf` (whose turn logic, sampling and stops it reuses) is where the KV lives: in fixed-size blocks
of one pool, per layer one K and one V tensor [num_blocks, block_size, Hkv, D], each episode holding a block table.
- Keys are written once, with RoPE at the position the mode's plan gives, and never copied to or from a padded
  cache: the model runs the `mem1_fast_paged` attention, which writes the new tokens' K/V into their slots and
  attends through the tables (`ops.paged_attention`) over each row's live slots.
- Consolidation is `SequenceKV.evict` with the plan's rule: whole blocks go back to the pool; in `retain` only the
  observation is prefilled, in `recompute` the question's blocks stay and the last turn is encoded again.
- A group's samples (identical prompts of one batch) share the question: it is prefilled once and the others fork
  its table (copy-on-write for the partial last block).
- Every live episode decodes in one packed forward per token (no padding); an episode joins or leaves a step by
  being in `idx` or not; all blocks go back to the pool when the next batch starts (`release`).
- Each sequence keeps its live slots as runs (`SequenceKV.runs`, updated on append and evict); a row's intervals
  are its sequence's runs, the last one cut at the row's own slot, built with a few tensor ops per forward.
- Accounting: `kv_stats(i).turns` has, per turn, the tokens prefilled (and of those re-encoded) and the tokens,
  blocks and bytes the episode holds when the turn ends; `pool_stats()` the pool's peak occupancy.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..ops.paged_attention import paged_attention
from .base import Generation, head_dim, register
from .hf import HFEngine, _Episode
from .kv_pool import BlockPool, SequenceKV

NAME = "mem1_fast_paged"


@dataclass
class _Batch:
    """What the attention of one packed forward needs, for every layer: where each new token's K/V goes, and which
    slots each row sees."""
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    where: torch.Tensor  # int64 [T]: flat slot (block * block_size + offset) of each new token
    block_table: torch.Tensor  # int32 [B, max_blocks]
    seq: torch.Tensor  # int32 [T]
    lo: torch.Tensor  # int32 [T, K]
    hi: torch.Tensor


_ACTIVE: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("mem1_fast_paged_batch", default=None)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b = _ACTIVE.get()
    if b is None:
        raise RuntimeError("the mem1_fast_paged attention runs only inside PagedEngine's forward")
    layer = module.layer_idx
    k = key[0].transpose(0, 1)  # [1, Hkv, T, D] -> [T, Hkv, D], RoPE applied
    v = value[0].transpose(0, 1)
    kc, vc = b.k_cache[layer], b.v_cache[layer]
    kc.view(-1, *kc.shape[2:])[b.where] = k.to(kc.dtype)
    vc.view(-1, *vc.shape[2:])[b.where] = v.to(vc.dtype)
    q = query[0].transpose(0, 1)
    out = paged_attention(q, b.k_cache[layer], b.v_cache[layer], b.block_table, b.seq, b.lo, b.hi, scale=scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, paged_attention_forward)
AttentionMaskInterface.register(NAME, lambda *a, **kw: None)  # the tables are the mask


@contextlib.contextmanager
def _attention(model, batch: _Batch):
    """Run `model` with the paged attention for one forward; the trainer's own setting comes back after."""
    cfg, old = model.config, model.config._attn_implementation
    token = _ACTIVE.set(batch)
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = old
        _ACTIVE.reset(token)


@dataclass
class _PagedEpisode(_Episode):
    kv: SequenceKV | None = None


class PagedEngine(HFEngine):
    """Batched sampling over a paged KV cache (see the module docstring). `num_blocks` x `block_size` tokens of KV
    per layer are allocated at the first batch; a batch that needs more stops with PoolExhausted."""

    def __init__(self, model, tokenizer, mode: str, max_new_tokens: int = 64, temperature: float = 1.0,
                 greedy: bool = False, stop_strings: Sequence[str] = ("</search>", "</answer>"), seed: int = 0,
                 block_size: int = 16, num_blocks: int = 2048):
        super().__init__(model, tokenizer, mode, max_new_tokens, temperature, greedy, stop_strings, seed)
        self.pool = BlockPool(num_blocks, block_size)
        self.block_bytes = block_size * self.token_bytes  # one block of every layer's K and V
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.peak_blocks_used = 0

    def start(self, prompts, greedy=None, seed=None) -> None:
        self.release()
        super().start(prompts, greedy, seed)
        self.peak_blocks_used = 0
        self.episodes = [_PagedEpisode(prompt=ep.prompt) for ep in self.episodes]
        if not self.k_cache:
            cfg = self.model.config
            p = next(self.model.parameters())
            shape = (self.pool.num_blocks, self.pool.block_size, cfg.num_key_value_heads, head_dim(cfg))
            self.k_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_hidden_layers)]
            self.v_cache = [torch.zeros_like(k) for k in self.k_cache]

    def release(self) -> None:
        """Give every block of the current batch back to the pool."""
        for ep in self.episodes:
            if ep.kv is not None:
                ep.kv.free()
                ep.kv = None

    def pool_stats(self) -> dict:
        """The pool over the current batch: its size, blocks in use now and at the peak (all layers' K and V)."""
        used = self.pool.num_blocks - self.pool.num_free
        return {"kv_pool_blocks": self.pool.num_blocks, "kv_pool_blocks_used": used,
                "kv_pool_peak_blocks_used": self.peak_blocks_used,
                "kv_pool_peak_occupancy": self.peak_blocks_used / self.pool.num_blocks,
                "kv_pool_peak_bytes": self.peak_blocks_used * self.block_bytes}

    def blocks_held(self, i: int) -> int:
        ep = self.episodes[i]
        return 0 if ep.kv is None else len(ep.kv.blocks)

    # --- the two places where the KV lives: eviction and the forward passes ---------------------------------------
    def _evict(self, ep: _PagedEpisode, drop_fn) -> None:
        if ep.kv is not None:
            ep.kv.evict(lambda t: bool(drop_fn(t)))

    @torch.no_grad()
    def _generate(self, eps, new_ids, new_pos, new_tags) -> list[Generation]:
        B = len(eps)
        # a group's samples: the same prompt at turn 0 is prefilled once, the others fork its table
        first, src = {}, [None] * B
        for b, ep in enumerate(eps):
            if ep.kv is None and new_tags[b] and new_tags[b][0] == -1:
                key = tuple(new_ids[b])
                if key in first:
                    src[b] = first[key]
                else:
                    first[key] = b
        work = [b for b in range(B) if src[b] is None]
        for b in work:
            if eps[b].kv is None:
                eps[b].kv = SequenceKV(self.pool)
        logits = dict(zip(work, self._forward([eps[b] for b in work], [new_ids[b] for b in work],
                                              [new_pos[b] for b in work], [new_tags[b][0] for b in work])))
        for b in range(B):
            if src[b] is not None:
                eps[b].kv = eps[src[b]].kv.fork()
                logits[b] = logits[src[b]]
                st = eps[b].stats  # it encoded nothing: the question is shared
                st.prefilled_tokens -= len(new_ids[b])
                st.turns[-1].prefilled -= len(new_ids[b])
        out_ids, out_lps, finish = [[] for _ in range(B)], [[] for _ in range(B)], [None] * B
        next_pos = [p[-1] + 1 for p in new_pos]
        feed_last = self.plan.feed_last_token
        for _ in range(self.max_new_tokens):
            running = [b for b in range(B) if finish[b] is None]
            tok, lp = self._sample(torch.stack([logits[b] for b in running]))
            for k, b in enumerate(running):
                out_ids[b].append(int(tok[k]))
                out_lps[b].append(float(lp[k]))
                finish[b] = self._finished(out_ids[b])
                if finish[b] is None and len(out_ids[b]) >= self.max_new_tokens:
                    finish[b] = "length"
            fed = [b for b in running if finish[b] is None or feed_last]
            if fed:
                rows = self._forward([eps[b] for b in fed], [[out_ids[b][-1]] for b in fed],
                                     [[next_pos[b]] for b in fed], [eps[b].turn for b in fed])
                for b, row in zip(fed, rows):
                    logits[b] = row
                    next_pos[b] += 1
            if all(f is not None for f in finish):
                break
        gens = []
        self.peak_blocks_used = max(self.peak_blocks_used, self.pool.num_blocks - self.pool.num_free)
        for b, ep in enumerate(eps):
            ep.last_gen, ep.next_pos = out_ids[b], next_pos[b]
            ep.turn += 1
            ep.stats.end_turn(ep.kv.live_tokens, len(ep.kv.blocks) * self.block_bytes, len(ep.kv.blocks))
            gens.append(Generation(out_ids[b], out_lps[b], finish[b]))
        return gens

    def _forward(self, eps: list[_PagedEpisode], ids: list[list[int]], pos: list[list[int]], turns: list[int]):
        """One packed forward of new tokens (any number per sequence): their slots are reserved in the tables,
        their K/V written there by the attention, and each row attends to its sequence's live slots up to its own.
        Returns the logits of each sequence's last new token."""
        dev, bs = self.k_cache[0].device, self.pool.block_size
        where, seq, row_end = [], [], []
        for s, (ep, x, p, turn) in enumerate(zip(eps, ids, pos, turns)):
            t = ep.kv
            slots, copies = t.append(p, turn)
            for a, c in copies:  # copy-on-write of a shared partial block
                for kc, vc in zip(self.k_cache, self.v_cache):
                    kc[c], vc[c] = kc[a], vc[a]
            where += [blk * bs + off for blk, off in slots]
            seq += [s] * len(x)
            row_end += range(t.num_slots - len(x) + 1, t.num_slots + 1)  # row i sees live slots up to its own
        # each row sees its sequence's live runs, the last one (holding the new tokens) cut at the row's own slot
        tables = [ep.kv for ep in eps]
        K = max(len(t.runs) for t in tables)
        width = max(len(t.blocks) for t in tables)
        runs = torch.tensor([[x for r in t.runs for x in r] + [0, 0] * (K - len(t.runs)) for t in tables],
                            dtype=torch.int32).view(len(tables), K, 2)
        table = torch.tensor([t.blocks + [-1] * (width - len(t.blocks)) for t in tables], dtype=torch.int32)
        seq_t = torch.tensor(seq, dtype=torch.int32)
        last = torch.tensor([len(t.runs) - 1 for t in tables])[seq_t.long()]
        lo = runs[seq_t.long(), :, 0]
        hi = runs[seq_t.long(), :, 1]
        hi[torch.arange(len(seq)), last] = torch.tensor(row_end, dtype=torch.int32)
        batch = _Batch(self.k_cache, self.v_cache, torch.tensor(where, device=dev), table.to(dev), seq_t.to(dev),
                       lo.to(dev), hi.to(dev))
        flat_ids = torch.tensor([i for x in ids for i in x], device=dev)[None]
        flat_pos = torch.tensor([i for p in pos for i in p], device=dev)[None]
        keep = (torch.tensor([len(x) for x in ids]).cumsum(0) - 1).to(dev)
        with _attention(self.model, batch):
            out = self.model(input_ids=flat_ids, position_ids=flat_pos, use_cache=False, logits_to_keep=keep)
        return list(out.logits[0])


register("paged", PagedEngine, serves=lambda plan: True)  # follows any KV plan
