"""`hf`: a batched generation engine on the trainer's own transformers model, with a KV cache whose eviction
follows the consolidation mode's KV plan.

The engine for CPUs and tests. Per episode it keeps only the KV the mode's plan says the next turn may see
(docs/design.md §3); for the two exact modes that is:

- recompute: the question's KV stays (a prefix cache); each turn re-encodes [t_{j-1} r_{j-1} i_{j-1}] after it at
  positions |q|.., generates g_j, then drops everything after the question.
- retain: the KV of g_{j-1} stays exactly as computed when it was generated; at consolidation the KV of turn j-2 is
  evicted and i_{j-1} is prefilled after g_{j-1}; positions grow monotonically (the stitched index).

So the context of every sampled token is what the trainer's layout reproduces, and the log-prob recorded for it
(log softmax(logits / temperature), untruncated) is what the trainer must recompute (exactness invariant).

Episodes are batched per step: their KV is stored compactly per episode and assembled into one padded cache with a
boolean liveness mask; dead slots (padding, evicted turns) are masked, never attended.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache

from ..consolidation import EXACT_MODES, get
from .base import (Generation, KVStats, check_prompts, check_sampling, full_state_dict, kv_bytes_per_token, register,
                   split_stops)

QUESTION = -1  # KV tag of the question's slots: never evicted


@dataclass
class _Episode:
    prompt: list[int]
    keys: list[torch.Tensor] | None = None  # per layer [Hkv, S, D], live slots only
    values: list[torch.Tensor] | None = None
    tags: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # turn of each slot
    next_pos: int = 0
    turn: int = 0
    last_gen: list[int] = field(default_factory=list)
    stats: KVStats = field(default_factory=KVStats)

    @property
    def kv_len(self) -> int:
        return int(self.tags.numel())


class HFEngine:
    """Batched sampling with per-episode KV caches (see the module docstring). It runs the trainer's model object
    itself, so its log-probs are the trainer's (`exact_logprobs`) and weight sync costs nothing."""

    exact_logprobs = True

    def __init__(self, model, tokenizer, mode: str, max_new_tokens: int = 64, temperature: float = 1.0,
                 greedy: bool = False, stop_strings: Sequence[str] = ("</search>", "</answer>"), seed: int = 0):
        self.plan = get(mode).kv_plan  # what is kept, re-encoded and fed: the mode's, not this engine's
        if self.plan is None:
            raise ValueError(f"the engine serves the exact modes {EXACT_MODES}; {mode!r} matches no rollout")
        check_sampling(greedy, temperature)
        self.model, self.tok, self.mode = model, tokenizer, mode
        self.max_new_tokens, self.temperature, self.greedy = max_new_tokens, temperature, greedy
        stop_ids, self.stop_strings = split_stops(tokenizer, stop_strings)
        self.stop_ids = set(stop_ids)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.gen = torch.Generator().manual_seed(seed)
        self.token_bytes = kv_bytes_per_token(model)  # KV of one token, all layers (the accounting's unit)
        self.episodes: list[_Episode] = []

    # --- public API ---------------------------------------------------------------------------------------------
    def start(self, prompts: Sequence[Sequence[int]], greedy: bool | None = None, seed: int | None = None) -> None:
        """Begin a batch of episodes, one per prompt; `greedy` / `seed` override the engine's for this batch."""
        check_prompts(prompts)
        if greedy is not None:
            self.greedy = greedy
        if seed is not None:
            self.gen.manual_seed(seed)
        self.episodes = [_Episode(prompt=list(p)) for p in prompts]

    @torch.no_grad()
    def step(self, idx: Sequence[int], observations: Sequence[Sequence[int]] | None = None) -> list[Generation]:
        """Generate the next turn for episodes `idx`. `observations[k]` is the environment's reply to episode
        idx[k]'s previous turn (None on turn 0)."""
        eps = [self.episodes[i] for i in idx]
        new_ids, new_pos, new_tags = [], [], []
        for k, ep in enumerate(eps):
            if ep.turn == 0:
                ids, pos0, tag, reenc = ep.prompt, 0, QUESTION, 0
            else:
                obs = list(observations[k]) if observations is not None else []
                if not obs:
                    raise ValueError(f"episode {idx[k]}: turn {ep.turn} needs the observation of turn {ep.turn - 1}")
                plan = self.plan
                self._evict(ep, lambda t, j=ep.turn: plan.evicts(t, j))
                ids = ep.last_gen + obs if plan.reencode_last_turn else obs
                pos0 = len(ep.prompt) if plan.restart_positions else ep.next_pos
                tag, reenc = ep.turn - 1, len(ids) - len(obs)
            ep.stats.begin_turn(len(ids), reenc)
            new_ids.append(ids)
            new_pos.append(list(range(pos0, pos0 + len(ids))))
            new_tags.append([tag] * len(ids))
        return self._generate(eps, new_ids, new_pos, new_tags)

    def kv_stats(self, i: int) -> KVStats:
        return self.episodes[i].stats

    def pool_stats(self) -> dict:
        return {}  # per-episode compact tensors: no pool

    def sync_weights(self, model) -> None:
        if model is not self.model:  # another copy of the weights (a sharded trainer's): take them
            self.model.load_state_dict(full_state_dict(model))

    def sleep(self) -> None:  # the cache lives only inside step(); nothing is held between turns but compact KV
        pass

    def wake(self) -> None:
        pass

    # --- internals ----------------------------------------------------------------------------------------------
    def _evict(self, ep: _Episode, drop_fn) -> None:
        if ep.keys is None:
            return
        keep = ~drop_fn(ep.tags)
        ep.keys = [k[:, keep] for k in ep.keys]
        ep.values = [v[:, keep] for v in ep.values]
        ep.tags = ep.tags[keep]

    def _generate(self, eps, new_ids, new_pos, new_tags) -> list[Generation]:
        model = self.model
        B = len(eps)
        dev = next(model.parameters()).device
        S0 = max(ep.kv_len for ep in eps)
        L = max(len(x) for x in new_ids)
        # old slots left-padded to S0, new tokens left-padded to L: the last column is every row's last real token
        live = torch.zeros(B, S0 + L, dtype=torch.bool)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        pos = torch.zeros(B, L, dtype=torch.long)
        for b, ep in enumerate(eps):
            live[b, S0 - ep.kv_len:S0] = True
            n = len(new_ids[b])
            ids[b, L - n:] = torch.tensor(new_ids[b])
            pos[b, L - n:] = torch.tensor(new_pos[b])
            live[b, S0 + L - n:] = True
        cache = self._assemble(eps, S0, dev)
        # query i of the new chunk sees live old slots and new slots up to itself; a pad query sees itself
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = live[:, None, :].repeat(1, L, 1)
        mask[:, :, S0:] &= causal
        eye = torch.eye(L, dtype=torch.bool)
        pad_q = ~live[:, S0:]
        mask[:, :, S0:] |= pad_q[:, :, None] & eye
        logits = self._forward(ids, pos, mask, cache, dev)
        out_ids = [[] for _ in range(B)]
        out_lps = [[] for _ in range(B)]
        finish = [None] * B
        fed_count = [0] * B
        next_pos = [p[-1] + 1 for p in new_pos]
        feed_last = self.plan.feed_last_token  # a kept turn needs its last token's KV, computed in context
        for _ in range(self.max_new_tokens):
            tok, lp = self._sample(logits)
            running = [b for b in range(B) if finish[b] is None]
            for b in running:
                t = int(tok[b])
                out_ids[b].append(t)
                out_lps[b].append(float(lp[b]))
                finish[b] = self._finished(out_ids[b])
            if len(out_ids[running[0]]) >= self.max_new_tokens:
                for b in running:
                    finish[b] = finish[b] or "length"
            fed = [b for b in running if finish[b] is None or feed_last]
            if not fed:
                break
            step_live = torch.zeros(B, 1, dtype=torch.bool)
            step_ids = torch.full((B, 1), self.pad_id, dtype=torch.long)
            step_pos = torch.zeros(B, 1, dtype=torch.long)
            for b in fed:
                step_live[b, 0] = True
                step_ids[b, 0] = out_ids[b][-1]
                step_pos[b, 0] = next_pos[b]
                next_pos[b] += 1
                fed_count[b] += 1
            live = torch.cat([live, step_live], 1)
            mask = live[:, None, :].clone()
            mask[:, 0, -1] = True  # rows not fed see a dead slot of their own: no empty attention row
            logits = self._forward(step_ids, step_pos, mask, cache, dev)
            if all(f is not None for f in finish):
                break
        self._store(eps, cache, live, new_tags, fed_count)
        gens = []
        for b, ep in enumerate(eps):
            ep.last_gen = out_ids[b]
            ep.next_pos = next_pos[b]
            ep.turn += 1
            gens.append(Generation(out_ids[b], out_lps[b], finish[b]))
        return gens

    def _finished(self, ids) -> str | None:
        t = ids[-1]
        if t in self.stop_ids:
            return "stop"
        if t == self.eos_id:
            return "eos"
        if self.stop_strings:
            tail = self.tok.decode(ids[-16:])
            if any(s in tail for s in self.stop_strings):
                return "stop"
        return None

    def _sample(self, logits: torch.Tensor):
        logits = logits.float()
        if self.greedy:
            tok = logits.argmax(-1)
            return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
        logp = torch.log_softmax(logits / self.temperature, -1)
        tok = torch.multinomial(logp.exp().cpu(), 1, generator=self.gen)[:, 0].to(logits.device)
        return tok, logp.gather(1, tok[:, None])[:, 0]

    def _forward(self, ids, pos, mask, cache, dev):
        out = self.model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask[:, None].to(dev),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _assemble(self, eps, S0, dev) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        if S0 == 0:
            return cache
        n_layers = len(next(ep.keys for ep in eps if ep.keys is not None))
        for layer in range(n_layers):
            ks, vs = [], []
            for ep in eps:
                k, v = ep.keys[layer], ep.values[layer]
                padn = S0 - k.shape[1]
                ks.append(torch.nn.functional.pad(k, (0, 0, padn, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, padn, 0)))
            cache.update(torch.stack(ks).to(dev), torch.stack(vs).to(dev), layer)
        return cache

    def _store(self, eps, cache, live, new_tags, fed_count) -> None:
        """Copy each episode's live slots back into its compact storage, tagged with their turn."""
        for b, ep in enumerate(eps):
            sel = live[b].nonzero().squeeze(1)
            tags = new_tags[b] + [ep.turn] * fed_count[b]
            ep.tags = torch.cat([ep.tags, torch.tensor(tags, dtype=torch.long)])
            ep.keys = [layer.keys[b][:, sel].cpu() for layer in cache.layers]
            ep.values = [layer.values[b][:, sel].cpu() for layer in cache.layers]
            if ep.keys[0].shape[1] != ep.tags.numel():
                raise RuntimeError(f"engine bookkeeping: {ep.keys[0].shape[1]} live slots, {ep.tags.numel()} tags")
            n = ep.tags.numel()
            ep.stats.end_turn(n, n * self.token_bytes)


register("hf", HFEngine, serves=lambda plan: True)  # its cache follows any KV plan
