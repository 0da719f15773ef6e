"""The engine's KV cache: what it keeps per mode, and that cached greedy decoding equals a cache-free forward."""
import random

import pytest
import torch

from mem1_fast.rollout import HFEngine
from mem1_fast.rollout.paged import PagedEngine
from mem1_fast.tiny import tiny_model, tiny_qwen2, word_tokenizer

WORDS = [f"w{i}" for i in range(40)] + ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def model_tok():
    tok = word_tokenizer(WORDS)
    return tiny_qwen2(len(tok), init_std=0.1, seed=3).eval(), tok


def naive_greedy(model, ids, pos, n, stop_ids):
    """No cache: re-run the whole context for every token."""
    ids, pos, out = list(ids), list(pos), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos])).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if t in stop_ids:
            break
        ids.append(t)
        pos.append(pos[-1] + 1)
    return out


@pytest.mark.parametrize("engine", [HFEngine, PagedEngine])
@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_cached_greedy_equals_cache_free_context(model_tok, mode, engine):
    model, tok = model_tok
    rng = random.Random(0)
    eng = engine(model, tok, mode, max_new_tokens=8, greedy=True)
    prompts = [[rng.randrange(3, 40) for _ in range(rng.randrange(2, 9))] for _ in range(4)]
    eng.start(prompts)
    gens = eng.step(range(4))
    history = [[(p, list(range(len(p)))), (g.token_ids, None)] for p, g in zip(prompts, gens)]
    for turn in range(1, 4):
        obs = [[rng.randrange(3, 40) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
        gens = eng.step(range(4), obs)
        for i in range(4):
            q = prompts[i]
            prev = history[i][-1][0]
            if mode == "recompute":  # [q | g_{j-1} i_{j-1}] re-encoded at positions |q|..
                ctx = q + prev + obs[i]
                pos = list(range(len(ctx)))
            else:  # retain is not expressible as one causal sequence; checked by test_exactness
                continue
            want = naive_greedy(model, ctx, pos, 8, eng.stop_ids | {tok.eos_token_id})
            assert gens[i].token_ids == want, (turn, i)
            history[i].append((gens[i].token_ids, None))
    if mode == "retain":
        assert all(len(g.token_ids) > 0 for g in gens)


def test_turn0_equals_plain_generation(model_tok):
    model, tok = model_tok
    eng = HFEngine(model, tok, "retain", max_new_tokens=6, greedy=True)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    eng.start(prompts)
    gens = eng.step([0, 1])
    for p, g in zip(prompts, gens):
        assert g.token_ids == naive_greedy(model, p, list(range(len(p))), 6, eng.stop_ids | {tok.eos_token_id})


@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_kv_kept_matches_consolidation(model_tok, mode):
    """recompute keeps q (+ the turn being generated); retain keeps q, g_{j-1}, i_{j-1}, g_j — never older turns."""
    model, tok = model_tok
    eng = HFEngine(model, tok, mode, max_new_tokens=5, temperature=1.0, seed=1)
    q = [5, 6, 7, 8]
    eng.start([q])
    g_prev = eng.step([0])[0].token_ids
    for turn in range(1, 6):
        obs = [9] * (turn + 1)
        g = eng.step([0], [obs])[0].token_ids
        ep = eng.episodes[0]
        if mode == "recompute":  # the last sampled token is never fed: its KV would be dropped anyway
            assert ep.kv_len == len(q) + len(g_prev) + len(obs) + len(g) - 1
            assert (ep.tags == -1).sum() == len(q)
        else:
            assert ep.kv_len == len(q) + len(g_prev) + len(obs) + len(g)
            assert set(ep.tags.tolist()) <= {-1, turn - 1, turn}
        g_prev = g


def test_bad_use_is_named(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="matches no rollout"):
        HFEngine(model, tok, "paper")
    eng = HFEngine(model, tok, "retain")
    with pytest.raises(ValueError, match="empty prompt"):
        eng.start([[1, 2], []])
    eng.start([[5, 6]])
    eng.step([0])
    with pytest.raises(ValueError, match="needs the observation"):
        eng.step([0], [[]])


@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_engine_uses_the_current_cache_api(model_tok, mode):
    """No deprecation or future warning from our calls into transformers under the pinned stack (the suite also
    turns those attributed to our frames into errors, tests/conftest.py); a deprecated argument would break
    rollouts on a later release."""
    import warnings
    model, tok = model_tok
    eng = HFEngine(model, tok, mode, max_new_tokens=4, temperature=0.7, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng.start([[3, 4, 5], [6, 7]])
        eng.step([0, 1])
        eng.step([0, 1], [[8, 9], [10]])
    bad = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not bad, [f"{w.category.__name__}: {w.message}" for w in bad]


@pytest.mark.parametrize("engine", [HFEngine, PagedEngine])
@pytest.mark.parametrize("mode", ["recompute", "retain", "full"])
def test_kv_accounting_follows_the_mode_plan(model_tok, mode, engine):
    """recompute re-encodes the last generation every turn; retain and full encode only the new observation; full
    never evicts."""
    model, tok = model_tok
    rng = random.Random(4)
    eng = engine(model, tok, mode, max_new_tokens=6, temperature=1.0, seed=2)
    prompts = [[rng.randrange(3, 40) for _ in range(5)], [rng.randrange(3, 40) for _ in range(3)]]
    eng.start(prompts)
    gens = [eng.step([0, 1])]
    obs_all = []
    for _ in range(3):
        obs = [[rng.randrange(3, 40) for _ in range(rng.randrange(1, 5))] for _ in range(2)]
        obs_all.append(obs)
        gens.append(eng.step([0, 1], obs))
    for i in range(2):
        st = eng.kv_stats(i)
        gen_lens = [len(g[i].token_ids) for g in gens]
        obs_lens = [len(o[i]) for o in obs_all]
        reencoded = sum(gen_lens[:-1]) if mode == "recompute" else 0
        assert st.reencoded_tokens == reencoded
        assert st.prefilled_tokens == len(prompts[i]) + sum(obs_lens) + reencoded
        if mode == "full":  # the whole history, every sampled token's KV included
            assert st.peak_kv_tokens == len(prompts[i]) + sum(gen_lens) + sum(obs_lens)
            continue
        # what the next turn may see, at most: q + the last turn (+ its observation), never the whole history
        longest_turn = max(g + o for g, o in zip(gen_lens[1:], obs_lens))
        assert len(prompts[i]) < st.peak_kv_tokens <= len(prompts[i]) + max(gen_lens) + longest_turn


def test_sync_weights_takes_another_copy_of_the_weights(model_tok):
    import copy
    model, tok = model_tok
    eng = HFEngine(copy.deepcopy(model), tok, "recompute", max_new_tokens=5, greedy=True)
    updated = copy.deepcopy(model)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eng.sync_weights(updated)
    eng.start([[3, 4, 5]])
    g = eng.step([0])[0]
    expected = naive_greedy(updated, [3, 4, 5], [0, 1, 2], 5, set())
    assert g.token_ids == expected[:len(g.token_ids)]
    assert all(torch.equal(a, b) for a, b in zip(eng.model.state_dict().values(), updated.state_dict().values()))


def test_every_registered_engine_implements_the_contract():
    """Each (engine, mode) pair that can run: a two-turn rollout through the contract, with the accounting."""
    from mem1_fast import rollout
    from test_exactness import SETUP
    tok = word_tokenizer(WORDS)
    for name, mode in rollout.pairs():
        arch, kw, _ = SETUP.get(name, ("llama", {}, 0))
        model = tiny_model(len(tok), arch=arch, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        eng = rollout.create(name, model, tok, mode, max_new_tokens=3, **kw)
        assert isinstance(eng.exact_logprobs, bool) and eng.mode == mode
        eng.start([[3, 4, 5], [6, 7]], greedy=False, seed=1)
        gens = eng.step([0, 1])
        assert all(1 <= len(g.token_ids) == len(g.logprobs) <= 3 and g.finish in ("stop", "eos", "length")
                   for g in gens)
        eng.step([1], [[8, 9]])
        st = eng.kv_stats(1)
        assert st.prefilled_tokens >= 2 + 2 and st.peak_kv_tokens >= 2
        eng.sleep()
        eng.wake()
        eng.sync_weights(model)
