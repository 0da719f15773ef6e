"""Advantage estimators, KL penalties, importance weights and the value loss against definitions written out
separately here (explicit sums and loops, float64), and the mapping between packed batches and trajectories
checked on the token ids themselves."""
import random

import pytest
import torch

from mem1_fast import advantages as A
from mem1_fast.consolidation import EXACT_MODES, pack
from mem1_fast.critic import Critic, ValueHead, value_loss
from mem1_fast.scoring import loss_rows
from mem1_fast.tasks.synthetic import SyntheticTask
from mem1_fast.tiny import tiny_model_and_tokenizer
from mem1_fast.train import expert_as_trajectory
from mem1_fast.trajectory import Kind


def gae_by_definition(r, v, gamma, lam):
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_n = 0: a double sum."""
    n = len(r)
    vv = list(v) + [0.0]
    delta = [r[t] + gamma * vv[t + 1] - vv[t] for t in range(n)]
    adv = [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]
    return adv, [a + vv[t] for t, a in enumerate(adv)]


@pytest.mark.parametrize("seed", range(4))
def test_gae_equals_the_double_sum(seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 40, (7,), generator=g)]
    gamma, lam = [0.9, 1.0, 0.99, 0.5][seed], [0.95, 1.0, 0.0, 0.7][seed]
    rewards = [torch.randn(n, generator=g, dtype=torch.float64) for n in lens]
    values = [torch.randn(n, generator=g, dtype=torch.float64) for n in lens]
    adv, ret = A.gae(rewards, values, gamma, lam)
    for r, v, a, rt in zip(rewards, values, adv, ret):
        want_a, want_r = gae_by_definition(r.tolist(), v.tolist(), gamma, lam)
        torch.testing.assert_close(a, torch.tensor(want_a, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rt, torch.tensor(want_r, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_gae_special_cases():
    """gamma = lam = 1 and a terminal reward R: A_t = R - V_t; lam = 0: A_t is the one-step TD error."""
    v = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    r = A.token_rewards([2.0], [4])[0]
    assert r.tolist() == [0.0, 0.0, 0.0, 2.0]
    adv, ret = A.gae([r], [v], 1.0, 1.0)
    torch.testing.assert_close(adv[0], 2.0 - v)
    torch.testing.assert_close(ret[0], torch.full((4,), 2.0, dtype=torch.float64))
    adv, _ = A.gae([r], [v], 0.9, 0.0)
    torch.testing.assert_close(adv[0], r + 0.9 * torch.cat([v[1:], torch.zeros(1, dtype=torch.float64)]) - v)


def test_token_rewards_with_a_kl_penalty():
    kl = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5])]
    r = A.token_rewards([1.0, -1.0], [3, 1], kl, 0.5)
    torch.testing.assert_close(r[0], torch.tensor([-0.05, -0.1, 1.0 - 0.15], dtype=torch.float64))
    torch.testing.assert_close(r[1], torch.tensor([-1.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="no generated token"):
        A.token_rewards([1.0], [0])


def test_grpo_and_rloo_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    got = A.grpo(rewards, 4, eps=0.0)
    for g in range(2):
        x = rewards[4 * g:4 * g + 4].double()
        mu = sum(x) / 4
        sd = (sum((xi - mu) ** 2 for xi in x) / 4) ** 0.5
        torch.testing.assert_close(got[4 * g:4 * g + 4].double(), (x - mu) / sd, rtol=1e-6, atol=1e-6)
    got = A.rloo(rewards, 4)
    for i in range(8):
        g0 = 4 * (i // 4)
        others = [float(rewards[j]) for j in range(g0, g0 + 4) if j != i]
        assert float(got[i]) == pytest.approx(float(rewards[i]) - sum(others) / 3)
    assert float(A.rloo(torch.ones(4), 4).abs().max()) == 0.0
    with pytest.raises(ValueError, match="groups of 4"):
        A.grpo(torch.ones(6), 4)


def test_kl_estimators_and_whitening():
    logp, ref = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(A.kl_penalty(logp, ref, "k1"), logp - ref)
    k3 = A.kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(k3, torch.exp(ref - logp) - (ref - logp) - 1)
    assert (k3 >= 0).all()
    xs = [torch.randn(n, dtype=torch.float64) * 3 + 1 for n in (5, 17, 2)]
    flat = torch.cat(A.whiten(xs))
    assert abs(float(flat.mean())) < 1e-12 and abs(float(flat.std(unbiased=False)) - 1) < 1e-6
    kept = torch.cat(A.whiten(xs, shift_mean=False))
    torch.testing.assert_close(kept * torch.cat(xs).std(unbiased=False), torch.cat(xs), rtol=1e-6, atol=1e-6)


def test_truncated_importance_weights():
    a = [torch.tensor([0.0, -0.1, -2.0]), torch.tensor([-0.5, -0.5])]
    b = [torch.tensor([-1.0, -0.1, -1.0]), torch.tensor([-0.7, -0.4])]
    tok = A.tis_weights(a, b, "token", 2.0)
    torch.testing.assert_close(tok[0], torch.tensor([2.0, 1.0, float(torch.exp(torch.tensor(-1.0)))],
                                                    dtype=torch.float64))
    seq = A.tis_weights(a, b, "sequence", 2.0)
    assert seq[0].tolist() == [1.0, 1.0, 1.0]  # exp(1 + 0 - 1)
    assert seq[1].tolist() == pytest.approx([float(torch.exp(torch.tensor(0.1)))] * 2)
    stats = A.mismatch_stats(torch.cat(a), torch.cat(b))
    assert stats["mismatch/logprob_abs_max"] == pytest.approx(1.0)
    assert stats["mismatch/logprob_abs_mean"] == pytest.approx((1 + 0 + 1 + 0.2 + 0.1) / 5)


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 1.0, -1.0])
    loss, frac = value_loss(v, old, ret, 0.2)
    # clipped values: [0.3, 0.7, 0.7]; per token max((v - R)^2, (vc - R)^2) = [1, 0.09, 9.0] -> 1.0, 0.09, 9.0
    want = 0.5 * (max(1.0, 0.49) + max(0.0, 0.09) + max(9.0, 2.89))
    assert float(loss) == pytest.approx(want) and float(frac) == pytest.approx(1 / 3)
    loss, _ = value_loss(v, old, ret, 0.0, torch.tensor([1.0, 2.0, 0.5]), normalizer=2.0)
    assert float(loss) == pytest.approx(0.5 * (1.0 + 0.0 + 0.5 * 9.0) / 2.0)


def expert_trajs(n, seed=0):
    model, tok = tiny_model_and_tokenizer(seed=0)
    task, rng = SyntheticTask(seed=seed, n_range=(1, 2)), random.Random(seed)
    return model, [expert_as_trajectory(type(task), task.sample(rng), tok) for _ in range(n)]


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_packed_tokens_map_onto_trajectories_in_sampling_order(mode):
    """per_token puts a trajectory's k-th generated value at the packed position of its k-th generated token:
    checked on the token ids (the packed target equals the trajectory's k-th generated id), over several packed
    batches; gather_per_trajectory inverts it."""
    _, trajs = expert_trajs(6)
    gen_ids = [[i for j in range(t.num_turns) for i in t.generation(j)] for t in trajs]
    lengths = [t.num_generated() for t in trajs]
    assert [len(g) for g in gen_ids] == lengths
    budget = max(pack([t], mode)[0].num_tokens for t in trajs) + 5
    batches = pack(trajs, mode, budget)
    assert len(batches) > 1
    ids_as_values = [torch.tensor(g, dtype=torch.float64) for g in gen_ids]
    for b in batches:
        torch.testing.assert_close(A.per_token(ids_as_values, b), b.input_ids[b.loss_positions()].float())
    codes = [torch.arange(n, dtype=torch.float64) + 1000 * i for i, n in enumerate(lengths)]
    back = A.gather_per_trajectory(batches, [A.per_token(codes, b) for b in batches], lengths)
    assert all(torch.equal(x, c) for x, c in zip(back, codes))
    with pytest.raises(ValueError, match="cover"):
        A.gather_per_trajectory(batches[:1], [A.per_token(codes, batches[0])], lengths)


def test_critic_values_come_from_the_rows_that_predict_each_token():
    """A critic copied from the policy computes the policy's own packed rows (whose exactness test_exactness shows
    through the log-probs), so its values are head(rows); after its weights move, they are not."""
    model, trajs = expert_trajs(3)
    b = pack(trajs, "retain")[0]
    critic = Critic.from_policy(model)
    assert float(critic(b).detach().abs().max()) == 0.0  # zero-initialized head
    torch.manual_seed(1)
    torch.nn.init.normal_(critic.head.proj.weight)
    rows, _ = loss_rows(model, b)
    want = rows.double() @ critic.head.proj.weight.double()[0] + critic.head.proj.bias.double()
    torch.testing.assert_close(critic(b).double(), want, rtol=1e-5, atol=1e-5)
    shared = ValueHead(model.config.hidden_size)
    shared.load_state_dict(critic.head.state_dict())
    torch.testing.assert_close(shared(rows), critic(b), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        next(critic.decoder.parameters()).add_(0.5)
    assert (critic(b).double() - want).abs().max() > 1e-3


def test_critic_values_equal_an_unpacked_forward_of_each_turn():
    """recompute: turn j of a trajectory was sampled in the plain sequence [q | t_{j-1} r_{j-1} i_{j-1} | t_j r_j]
    at positions 0.. . The critic's packed values (several trajectories in one row, interval visibility) equal
    the value head on that sequence run alone through the decoder's ordinary causal attention (SDPA)."""
    from test_pack import groups_of_rollouts

    from mem1_fast.trajectory import GENERATED
    model, _ = expert_trajs(1)
    critic = Critic.from_policy(model)
    torch.manual_seed(2)
    torch.nn.init.normal_(critic.head.proj.weight, std=0.5)
    trajs = groups_of_rollouts(n_groups=2, G=3, seed=7)
    lengths = [t.num_generated() for t in trajs]
    batches = pack(trajs, "recompute", max(pack([t], "recompute")[0].num_tokens for t in trajs) * 2)
    with torch.no_grad():
        packed = A.gather_per_trajectory(batches, [critic(b) for b in batches], lengths)
        for t, got in zip(trajs, packed):
            want, prev = [], []
            for j in range(t.num_turns):
                gen = [i for s in t.segments if s.turn == j and s.kind in GENERATED for i in s.token_ids]
                ctx = list(t.prompt.token_ids) + prev
                ids = torch.tensor(ctx + gen)
                h = critic.decoder(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).last_hidden_state[0]
                want.append(critic.head(h[len(ctx) - 1:len(ids) - 1]))
                prev = [i for s in t.segments if s.turn == j and s.kind != Kind.PROMPT for i in s.token_ids]
            torch.testing.assert_close(got.float(), torch.cat(want), rtol=1e-5, atol=1e-5)
