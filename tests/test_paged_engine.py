"""The paged engine's own claims: zero re-encoding in retain, a group's question prefilled once, flat memory over
turns, every block back in the pool after a batch, and the same greedy episodes as the HF engine.
(Its log-probs against the trainer's, with negative controls: tests/test_exactness.py, over every engine.)"""
import random

import pytest
import torch

from mem1_fast.rollout import HFEngine
from mem1_fast.rollout.paged import PagedEngine
from mem1_fast.tiny import tiny_model, word_tokenizer

WORDS = [f"w{i}" for i in range(40)] + ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def model_tok():
    tok = word_tokenizer(WORDS)
    return tiny_model(len(tok), init_std=0.1, seed=3, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id).eval(), tok


def turns(eng, prompts, n_turns, rng, obs_len=(3, 8), greedy=False):
    """Drive the engine turn by turn with random observations; per turn, the blocks each episode holds."""
    eng.start(prompts, greedy=greedy, seed=1)
    gens, held = [eng.step(range(len(prompts)))], []
    for _ in range(n_turns - 1):
        obs = [[rng.randrange(3, 40) for _ in range(rng.randint(*obs_len))] for _ in prompts]
        gens.append(eng.step(range(len(prompts)), obs))
        held.append([eng.blocks_held(i) for i in range(len(prompts))] if hasattr(eng, "blocks_held") else None)
    return gens, held


def test_retain_encodes_only_the_observation_and_memory_stays_flat(model_tok):
    model, tok = model_tok
    rng = random.Random(0)
    eng = PagedEngine(model, tok, "retain", max_new_tokens=12, temperature=1.0, block_size=8, num_blocks=256)
    prompts = [[rng.randrange(3, 40) for _ in range(40)] for _ in range(3)]  # a MEM1-shaped long question
    gens, held = turns(eng, prompts, 16, rng, obs_len=(20, 20))
    for i in range(3):
        st = eng.kv_stats(i)
        assert st.reencoded_tokens == 0 and st.prefilled_tokens == 40 + 20 * 15  # q once, then observations only
        assert [(t.prefilled, t.reencoded) for t in st.turns] == [(40, 0)] + [(20, 0)] * 15  # counted per turn
        # flat memory, in the bytes the episode holds: turn 16 within 1.2x of turn 2
        assert len(st.turns) == 16 and st.turns[15].kv_bytes <= 1.2 * st.turns[1].kv_bytes, [
            t.kv_bytes for t in st.turns]
    pool = eng.pool_stats()
    blocks_now = sum(eng.blocks_held(i) for i in range(3))
    assert pool["kv_pool_blocks_used"] == eng.pool.num_blocks - eng.pool.num_free <= blocks_now
    assert blocks_now <= pool["kv_pool_peak_blocks_used"] <= 3 * (40 // 8 + 2 * (20 + 12) // 8 + 3)
    assert pool["kv_pool_peak_bytes"] == pool["kv_pool_peak_blocks_used"] * eng.block_bytes
    # KV blocks per sequence at turn 16 against turn 2: bounded by q + two turns, not growing with the history
    for i in range(3):
        assert held[-1][i] <= 1.2 * held[1][i] + 1, [h[i] for h in held]
    assert max(h[i] for h in held for i in range(3)) <= (40 + 2 * (20 + 12)) // 8 + 3
    eng.release()
    assert eng.pool.num_free == eng.pool.num_blocks


def test_a_group_prefills_its_question_once(model_tok):
    model, tok = model_tok
    eng = PagedEngine(model, tok, "recompute", max_new_tokens=5, temperature=1.0, block_size=4, num_blocks=64)
    q = [5, 6, 7, 8, 9, 10]  # one full block and a partial one
    eng.start([q, q, q, [11, 12]], greedy=False, seed=3)
    eng.step(range(4))
    tables = [ep.kv.blocks for ep in eng.episodes[:3]]
    assert tables[0][0] == tables[1][0] == tables[2][0]  # the full question block is shared
    assert eng.pool.refcount[tables[0][0]] == 3
    assert len({t[1] for t in tables}) == 3  # the partial one was copied before each sample wrote into it
    st = [eng.kv_stats(i) for i in range(4)]
    assert [s.prefilled_tokens for s in st] == [6, 0, 0, 2]  # the forks encoded nothing


def test_no_block_leaks_across_batches(model_tok):
    model, tok = model_tok
    rng = random.Random(5)
    for mode in ("recompute", "retain"):  # 100 batches in all
        eng = PagedEngine(model, tok, mode, max_new_tokens=3, temperature=1.0, block_size=4, num_blocks=128)
        for _ in range(50):
            n = rng.randint(1, 4)
            prompts = [[rng.randrange(3, 40) for _ in range(rng.randint(1, 9))] for _ in range(n)]
            turns(eng, prompts + prompts[:1], rng.randint(1, 3), rng, obs_len=(1, 5))
        eng.release()
        assert eng.pool.num_free == eng.pool.num_blocks and not any(eng.pool.refcount)


@pytest.mark.parametrize("mode", ["recompute", "retain", "full"])
def test_same_greedy_turns_as_the_hf_engine(model_tok, mode):
    model, tok = model_tok
    prompts = [[random.Random(i).randrange(3, 40) for _ in range(3 + 4 * i)] for i in range(4)]
    out = {}
    for engine in (HFEngine, PagedEngine):
        kw = {"block_size": 4} if engine is PagedEngine else {}
        eng = engine(model, tok, mode, max_new_tokens=10, greedy=True, **kw)
        gens, _ = turns(eng, prompts, 5, random.Random(9), greedy=True)
        out[engine] = (gens, [eng.kv_stats(i) for i in range(4)])
    for turn_a, turn_b in zip(out[HFEngine][0], out[PagedEngine][0]):
        for a, b in zip(turn_a, turn_b):
            assert a.token_ids == b.token_ids and a.finish == b.finish
            assert (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max() < 1e-5
    from mem1_fast.rollout.base import kv_bytes_per_token
    bpt = kv_bytes_per_token(model)
    for a, b in zip(out[HFEngine][1], out[PagedEngine][1]):
        # the same tokens per turn: held, prefilled, re-encoded
        assert (a.peak_kv_tokens, a.prefilled_tokens, a.reencoded_tokens) == (b.peak_kv_tokens, b.prefilled_tokens,
                                                                             b.reencoded_tokens)
        assert [(t.prefilled, t.reencoded, t.kv_tokens) for t in a.turns] == [
            (t.prefilled, t.reencoded, t.kv_tokens) for t in b.turns]
        assert len(a.turns) == 5
        # bytes: the HF engine stores exactly the live tokens, the paged one whole blocks (less than one block of
        # dead slots more per run of live ones)
        assert all(t.kv_bytes == t.kv_tokens * bpt and t.kv_blocks == 0 for t in a.turns)
        for t in b.turns:
            assert t.kv_bytes == t.kv_blocks * 4 * bpt and t.kv_tokens <= t.kv_blocks * 4
        assert b.peak_kv_bytes == max(t.kv_bytes for t in b.turns)


def test_the_trainer_runs_on_it(tmp_path):
    import json

    from mem1_fast import train
    from test_train import small_args
    train.main(small_args(tmp_path, engine="paged", mode="retain"))
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rl = [r for r in recs if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2] and all(r["rollout/reencoded_tokens"] == 0 for r in rl)
    for r in rl:  # the accounting reaches the metrics: every prefilled token was new, the pool was used
        assert r["rollout/prefilled_new_tokens"] == r["rollout/prefilled_tokens"] > 0
        assert r["rollout/peak_kv_bytes"] > 0 and 0 < r["rollout/kv_pool_peak_occupancy"] <= 1


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_on_cuda_same_greedy_turns_as_the_hf_engine(model_tok, mode):
    """On a GPU: the paged engine (its attention through the Triton kernel) gives the HF engine's greedy turns."""
    import copy
    model, tok = model_tok
    model = copy.deepcopy(model).cuda()
    prompts = [[random.Random(i).randrange(3, 40) for _ in range(3 + 4 * i)] for i in range(4)]
    out = {}
    for engine in (HFEngine, PagedEngine):
        eng = engine(model, tok, mode, max_new_tokens=10, greedy=True)
        out[engine] = turns(eng, prompts, 5, random.Random(9), greedy=True)[0]
    for turn_a, turn_b in zip(out[HFEngine], out[PagedEngine]):
        for a, b in zip(turn_a, turn_b):
            assert a.token_ids == b.token_ids
            assert (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max() < 1e-4
