"""The central claim: training scores every generated token under exactly the context it was sampled in.

Rollouts come from the engine (KV cache consolidated per mode) with a tiny random fp32 model; the trainer's
log-probs (packed layout -> HF model with the mem1_fast attention -> logprob_entropy) must equal the sampled
log-probs within 1e-5 in the matching exact mode, and must not under any other layout (the check can fail).
"""
import random

import pytest
import torch

from mem1_fast import rollout
from mem1_fast.consolidation import EXACT_MODES, MODES, pack
from mem1_fast.rollout import AgentConfig, run_episodes
from mem1_fast.tasks.synthetic import SyntheticTask
from mem1_fast.tiny import tiny_model, tiny_model_and_tokenizer, tiny_qwen2, word_tokenizer
from mem1_fast.scoring import score_batch
from mem1_fast.trajectory import Trajectory, split_generation, think_splitter

WORDS = [f"w{i}" for i in range(60)] + ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>"]


# every (engine, mode) pair that can run here (vllm only where it is installed); per engine: the random model's
# architecture, engine options for a small test footprint, and the bound its log-probs must meet (the HF engine
# runs the trainer's own model: 1e-5; vLLM's fp32 CPU kernels compute the same function: 1e-4)
PAIRS = rollout.pairs()
SETUP = {"hf": ("qwen2", {}, 1e-5), "vllm": ("llama", {"kv_cache_memory_bytes": 64 << 20, "block_size": 32}, 1e-4)}


def setup(engine, tok, seed):
    arch, kw, tol = SETUP.get(engine, ("llama", {}, 1e-4))
    model = tiny_model(len(tok), arch=arch, init_std=0.05, seed=seed, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id).eval()
    return model, kw, tol


def engine_rollouts(model, tok, mode, temperature, seed, n=6, turns=4, engine="hf", **engine_kw):
    """Multi-turn rollouts with random observations: every mode's eviction path is exercised."""
    rng = random.Random(seed)
    eng = rollout.create(engine, model, tok, mode, max_new_tokens=10, temperature=temperature, seed=seed,
                         **engine_kw)
    # groups of 2 samples per question, as RL rolls out: engines that share a group's question (the paged engine
    # forks its blocks, copy-on-write for the partial last one; vLLM's prefix cache) are checked sharing it
    qs = [[rng.randrange(3, 60) for _ in range(rng.randrange(2, 10))] for _ in range(n // 2)]
    prompts = [q for q in qs for _ in range(2)] + [[rng.randrange(3, 60) for _ in range(5)]] * (n % 2)
    eng.start(prompts)
    split = think_splitter(tok)
    trips = [[("PROMPT", 0, p)] for p in prompts]
    lps = [[None] for _ in prompts]
    active, obs = list(range(n)), None
    for j in range(turns):
        gens = eng.step(active, obs)
        for i, g in zip(active, gens):
            s, a = split_generation(g.token_ids, split)
            trips[i] += [("STATE", j, s), ("ACTION", j, a)]
            lps[i] += [g.logprobs[:len(s)], g.logprobs[len(s):]]
        nxt, obs = [], []
        for i in active:
            if j < turns - 1 and rng.random() < 0.85:
                o = [rng.randrange(3, 60) for _ in range(rng.randrange(1, 7))]
                trips[i].append(("OBS", j, o))
                lps[i].append(None)
                nxt.append(i)
                obs.append(o)
        active = nxt
        if not active:
            break
    return [Trajectory.from_triples(t, l) for t, l in zip(trips, lps)]


def max_error(model, trajs, layout_mode, temperature, max_tokens=400):
    errs = []
    with torch.no_grad():
        for b in pack(trajs, layout_mode, max_tokens=max_tokens):
            logp, _ = score_batch(model, b, temperature)
            errs.append((logp - b.old_logprobs[b.loss_positions()]).abs().max().item())
    return max(errs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("engine,mode", PAIRS)
def test_trainer_logprobs_equal_sampled(engine, mode, temperature):
    tok = word_tokenizer(WORDS)
    model, kw, tol = setup(engine, tok, seed=1)
    trajs = engine_rollouts(model, tok, mode, temperature, seed=3, engine=engine, **kw)
    assert max(t.num_turns for t in trajs) >= 3 and sum(t.num_generated() for t in trajs) > 100
    errs = {m: max_error(model, trajs, m, temperature) for m in MODES}
    assert errs[mode] <= tol, errs
    for other in MODES:  # negative controls: any other layout scores different contexts
        if other != mode:
            assert errs[other] > 1e-2, errs


@pytest.mark.parametrize("engine,mode", PAIRS)
def test_paper_visibility_is_not_exact(engine, mode):
    tok = word_tokenizer(WORDS)
    model, kw, _ = setup(engine, tok, seed=2)
    trajs = engine_rollouts(model, tok, mode, 1.0, seed=5, engine=engine, **kw)
    assert max_error(model, trajs, "paper", 1.0) > 1e-2


def test_paper_has_no_kv_plan_and_no_engine_serves_it():
    assert "paper" in MODES and "paper" not in EXACT_MODES
    assert all(m in EXACT_MODES for _, m in PAIRS) and ("hf", "retain") in PAIRS and ("hf", "recompute") in PAIRS
    tok = word_tokenizer(WORDS)
    with pytest.raises(ValueError, match="matches no rollout"):
        rollout.create("hf", tiny_qwen2(len(tok)), tok, "paper")


@pytest.fixture(scope="module")
def shopper(tmp_path_factory):
    """A tiny model warm-started briefly on the shopping expert: enough for well-formed multi-turn episodes
    (search, clicks, purchases) whose pages the engines must then carry exactly."""
    from mem1_fast import train
    out = tmp_path_factory.mktemp("shopper")
    model, tok = train.main(train.Args(task="webshop", output_dir=str(out), sft_steps=80, sft_batch=8, sft_lr=5e-3,
                                       steps=0, eval_every=0, tensorboard=False, n_max=2))
    return model.eval(), tok


@pytest.mark.parametrize("engine,mode", PAIRS)
def test_webshop_rollouts_are_exact(engine, mode, shopper):
    """The agent loop on the shopping task: every page (results, item pages, the next instruction after a
    purchase) scored under the context the engine sampled in, for every exact (mode x engine) pair."""
    from mem1_fast.tasks.webshop import ShopTask
    model, tok = shopper
    rng = random.Random(0)
    base = [ShopTask(seed=1, n_range=(1, 2)).sample(rng) for _ in range(4)]
    episodes = [ep for ep in base for _ in range(2)]  # groups of 2 share their episode (and question)
    _, kw, tol = SETUP.get(engine, ("llama", {}, 1e-4))
    eng = rollout.create(engine, model, tok, mode, max_new_tokens=16, temperature=1.0, seed=11, **kw)
    trajs = run_episodes(eng, tok, episodes, AgentConfig())
    assert max(t.num_turns for t in trajs) >= 3 and sum(t.info.searches for t in trajs) >= 4  # pages were read
    errs = {m: max_error(model, trajs, m, 1.0, max_tokens=4096) for m in EXACT_MODES}  # full-layout pages are long
    assert errs[mode] <= tol, errs
    for other in EXACT_MODES:  # negative controls
        if other != mode:
            assert errs[other] > 1e-2, errs


@pytest.mark.parametrize("engine,mode", PAIRS)
def test_agent_loop_rollouts_are_exact(engine, mode):
    """The real agent loop on the synthetic task (observations from BM25, hints, stops)."""
    model, tok = tiny_model_and_tokenizer(seed=4)
    model.eval()
    task = SyntheticTask(seed=1, n_range=(1, 2))
    rng = random.Random(0)
    episodes = [task.sample(rng) for _ in range(8)]
    _, kw, tol = SETUP.get(engine, ("llama", {}, 1e-4))
    eng = rollout.create(engine, model, tok, mode, max_new_tokens=12, temperature=1.0, seed=7, **kw)
    trajs = run_episodes(eng, tok, episodes, AgentConfig())
    assert max_error(model, trajs, mode, 1.0) <= tol
