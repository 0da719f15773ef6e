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
from .base import Generation, register
from .hf import HFEngine, _Episode
from .kv_pool import BlockPool, SequenceKV

NAME = "mem1_fast_paged"


@dataclass
class _Batch:
    """What the attention of one packed forward needs, for every layer: where each new token's K/V goes, and which
    slots each row sees."""
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    blocks: torch.Tensor  # int64 [T]: block of each new token
    offsets: torch.Tensor  # int64 [T]
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
    b.k_cache[layer][b.blocks, b.offsets] = k.to(b.k_cache[layer].dtype)
    b.v_cache[layer][b.blocks, b.offsets] = v.to(b.v_cache[layer].dtype)
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
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    def start(self, prompts, greedy=None, seed=None) -> None:
        self.release()
        super().start(prompts, greedy, seed)
        self.episodes = [_PagedEpisode(prompt=ep.prompt) for ep in self.episodes]
        if not self.k_cache:
            cfg = self.model.config
            p = next(self.model.parameters())
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            shape = (self.pool.num_blocks, self.pool.block_size, cfg.num_key_value_heads, hd)
            self.k_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_hidden_layers)]
            self.v_cache = [torch.zeros_like(k) for k in self.k_cache]

    def release(self) -> None:
        """Give every block of the current batch back to the pool."""
        for ep in self.episodes:
            if ep.kv is not None:
                ep.kv.free()
                ep.kv = None

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
                eps[b].stats.prefilled_tokens -= len(new_ids[b])  # it encoded nothing: the question is shared
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
        for b, ep in enumerate(eps):
            ep.last_gen, ep.next_pos = out_ids[b], next_pos[b]
            ep.turn += 1
            gens.append(Generation(out_ids[b], out_lps[b], finish[b]))
        return gens

    def _forward(self, eps: list[_PagedEpisode], ids: list[list[int]], pos: list[list[int]], turns: list[int]):
        """One packed forward of new tokens (any number per sequence): their slots are reserved in the tables,
        their K/V written there by the attention, and each row attends to its sequence's live slots up to its own.
        Returns the logits of each sequence's last new token."""
        dev = self.k_cache[0].device
        blocks, offsets, seq, runs_per_row = [], [], [], []
        tables = [ep.kv for ep in eps]
        for s, (ep, t, x, p, turn) in enumerate(zip(eps, tables, ids, pos, turns)):
            where, copies = t.append(p, turn)
            for a, c in copies:  # copy-on-write of a shared partial block
                for kc, vc in zip(self.k_cache, self.v_cache):
                    kc[c], vc[c] = kc[a], vc[a]
            blocks += [w[0] for w in where]
            offsets += [w[1] for w in where]
            seq += [s] * len(x)
            live = _live_runs(t.position)
            first = t.num_slots - len(x)
            for i in range(len(x)):  # row i sees the live runs up to its own slot
                end = first + i + 1
                runs_per_row.append([(a, min(e, end)) for a, e in live if a < end])
            ep.stats.peak_kv_tokens = max(ep.stats.peak_kv_tokens, t.live_tokens)
        K = max(1, max(len(r) for r in runs_per_row))
        lo = torch.zeros(len(seq), K, dtype=torch.int32)
        hi = torch.zeros(len(seq), K, dtype=torch.int32)
        for r, runs in enumerate(runs_per_row):
            for k, (a, e) in enumerate(runs):
                lo[r, k], hi[r, k] = a, e
        width = max(len(t.blocks) for t in tables)
        table = torch.full((len(tables), width), -1, dtype=torch.int32)
        for s, t in enumerate(tables):
            table[s, :len(t.blocks)] = torch.tensor(t.blocks, dtype=torch.int32)
        batch = _Batch(self.k_cache, self.v_cache, torch.tensor(blocks, device=dev),
                       torch.tensor(offsets, device=dev), table.to(dev), torch.tensor(seq, dtype=torch.int32,
                                                                                       device=dev),
                       lo.to(dev), hi.to(dev))
        flat_ids = torch.tensor([i for x in ids for i in x], device=dev)[None]
        flat_pos = torch.tensor([i for p in pos for i in p], device=dev)[None]
        last = torch.tensor([len(x) for x in ids]).cumsum(0) - 1
        with _attention(self.model, batch):
            out = self.model(input_ids=flat_ids, position_ids=flat_pos, use_cache=False)
        return list(out.logits[0, last.to(dev)])


def _live_runs(position: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of live slots (position >= 0) as [start, end) slot intervals."""
    runs, start = [], None
    for s, p in enumerate(position + [-1]):
        if p >= 0 and start is None:
            start = s
        elif p < 0 and start is not None:
            runs.append((start, s))
            start = None
    return runs


register("paged", PagedEngine, serves=lambda plan: True)  # follows any KV plan
