"""Rollout throughput: the paged and vLLM engines against the HF engine, same episodes, same batch, `retain` and
`recompute` (vLLM serves only `recompute`).

64 episodes (16 questions x 4 samples, as one RL step of the default) driven for 4 turns of up to 24 sampled tokens;
between turns each episode gets an observation of 20 tokens. Random-weight models do not emit the stop tags, so
the turns are driven here rather than by the agent loop: every variant generates the same number of tokens.
Two models: the CPU default's tiny Llama (0.44M parameters, its word-level vocabulary, prompts from the synthetic
task) and a larger Qwen2 (hidden 512, 8 layers, 8 heads / 4 KV heads, vocabulary 32,000). fp32, CPU. Each variant
runs in its own process (vLLM takes over torch's threads in its process), OMP_NUM_THREADS=2. Reported: generated
tokens/s, turns/s (episode-turns), wall time of the whole rollout after one warm-up rollout; vLLM's engine start is
reported apart (not in the rate). KV accounting per engine, from its `kv_stats` / `pool_stats`: the KV bytes one
sequence holds at the end of turns 1 and 4 (mean), the tokens prefilled per episode after turn 0 split into new
(observations) and re-encoded, and the paged pool's peak occupancy.

`ceiling` is no engine: it is the rate of an ideal `recompute` engine on the same model and the same math library,
timed from bare forward passes of the model (no KV cache read, no attention context, no sampling, no bookkeeping):
one [64, 1] forward per decode step, plus the tokens the mode must prefill (each question once per group, then each
turn's [t_{j-1} r_{j-1} i_{j-1}] in `recompute`, i_{j-1} alone in `retain`) at the rate of a bare [64, 44] prefill.
No engine that runs the transformers model can beat it on this machine; its ratio to the HF engine bounds what any
such engine can gain over it here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import best_of, record

HERE = Path(__file__).resolve().parent
EPISODES, TURNS, NEW_TOKENS, OBS = 64, 4, 24, 20


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def build(config: str):
    import random

    from mem1_fast.tasks.synthetic import SyntheticTask
    from mem1_fast.tiny import default_agent, tiny_model, word_tokenizer
    if config == "default":
        model, tok = default_agent(0)
        task, rng = SyntheticTask(seed=0), random.Random(0)
        eps = [task.sample(rng) for _ in range(EPISODES // 4)]
        prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in eps for _ in range(4)]
    else:
        tok = word_tokenizer([f"w{i}" for i in range(32_000 - 3)])
        model = tiny_model(len(tok), arch="qwen2", hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        rng = random.Random(0)
        qs = [[rng.randrange(3, len(tok)) for _ in range(rng.randint(40, 80))] for _ in range(EPISODES // 4)]
        prompts = [q for q in qs for _ in range(4)]
    rng = random.Random(1)
    obs = [[[rng.randrange(3, len(tok)) for _ in range(OBS)] for _ in range(EPISODES)] for _ in range(TURNS - 1)]
    return model.eval(), tok, prompts, obs


def ceiling(model, prompts, mode: str) -> dict:
    """The ideal engine's rollout time from bare forward passes (see the module docstring)."""
    import torch
    ids = torch.randint(3, model.config.vocab_size, (EPISODES, 44))
    with torch.no_grad():
        decode_s = best_of(lambda: model(input_ids=ids[:, :1], use_cache=False, logits_to_keep=1), warmup=1)
        prefill_s = best_of(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), n=3, warmup=1) / ids.numel()
    per_turn = OBS if mode == "retain" else NEW_TOKENS + OBS
    must_prefill = sum(len(q) for q in {tuple(p) for p in prompts}) + (TURNS - 1) * EPISODES * per_turn
    wall = TURNS * NEW_TOKENS * decode_s + must_prefill * prefill_s
    tokens = TURNS * NEW_TOKENS * EPISODES
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "turns_per_s": EPISODES * TURNS / wall,
            "engine_start_s": 0.0, "decode_step_ms": decode_s * 1e3, "prefill_tokens": must_prefill}


def worker(engine: str, config: str, mode: str) -> dict:
    import time

    import torch

    from mem1_fast import rollout
    torch.manual_seed(0)
    model, tok, prompts, obs = build(config)
    if engine == "ceiling":
        return ceiling(model.eval(), prompts, mode)
    kw = {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": engine == "vllm"} if engine.startswith("vllm") else {}
    t0 = time.perf_counter()
    eng = rollout.create(engine.split("-")[0], model, tok, mode, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0,
                         stop_strings=(), **kw)
    start_s = time.perf_counter() - t0

    def run():
        eng.start(prompts, greedy=False, seed=1)
        n = sum(len(g.token_ids) for g in eng.step(range(EPISODES)))
        for turn_obs in obs:
            n += sum(len(g.token_ids) for g in eng.step(range(EPISODES), turn_obs))
        return n

    with torch.no_grad():
        run()  # warm-up
        t = time.perf_counter()
        tokens = run()
        wall = time.perf_counter() - t
    st = [eng.kv_stats(i) for i in range(EPISODES)]
    later = [t for s in st for t in s.turns[1:]]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "turns_per_s": EPISODES * TURNS / wall,
            "engine_start_s": start_s,
            "kv_bytes_turn1": sum(s.turns[0].kv_bytes for s in st) / EPISODES,
            "kv_bytes_turn4": sum(s.turns[-1].kv_bytes for s in st) / EPISODES,
            "prefill_new_per_episode": sum(t.prefilled - t.reencoded for t in later) / EPISODES,
            "prefill_reencoded_per_episode": sum(t.reencoded for t in later) / EPISODES,
            **{k: v for k, v in eng.pool_stats().items() if k in ("kv_pool_peak_occupancy", "kv_pool_peak_bytes")}}


def _run(engine, config, mode):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(HERE / "benchmark_rollout.py"), engine, config, mode],
                         capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1][:200])
    return json.loads(out.stdout.strip().splitlines()[-1])


ACCOUNTING = {"kv_bytes_turn1": "kv_B_t1", "kv_bytes_turn4": "kv_B_t4", "prefill_new_per_episode": "prefill_new",
              "prefill_reencoded_per_episode": "prefill_reenc", "kv_pool_peak_occupancy": "pool_peak"}


@pytest.mark.parametrize("mode", ["retain", "recompute"])
@pytest.mark.parametrize("config", ["default", "qwen2-512x8-v32k"])
def test_rollout_throughput(benchmark, config, mode):
    # vllm: eager (the CPU default); vllm-compiled: inductor (what enforce_eager=False gives); `recompute` only
    vllm = ["vllm", "vllm-compiled"] if _importable("vllm") and mode == "recompute" else []
    engines = ["hf", "paged"] + vllm + ["ceiling"]
    group = f"rollout {mode} {config}: {EPISODES} episodes x {TURNS} turns x <= {NEW_TOKENS} tokens, fp32 CPU"
    results = {}
    for engine in engines:
        try:
            results[engine] = r = _run(engine, config, mode)
        except RuntimeError as e:
            record(group, engine, float("nan"), note=str(e)[:60])
            continue
        acct = {short: round(r[k], 2) for k, short in ACCOUNTING.items() if k in r}
        record(group, engine, r["wall_s"], baseline=engine == "hf", tokens_per_s=round(r["tokens_per_s"]),
               turns_per_s=round(r["turns_per_s"], 1), tokens=r["tokens"], engine_start_s=round(r["engine_start_s"], 1),
               **acct)
    benchmark.extra_info.update(results)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "recompute")))
