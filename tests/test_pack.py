"""Shared-question packing: the samples of a group packed with one copy of their question. Checked on the thing
itself: every trained token sees exactly the same tokens (mapped back to their trajectory) as when the
trajectories are packed apart, and the trained log-probs and their gradients are equal; the question's tokens are
saved, and budgets still hold."""
import random

import pytest
import torch

from mem1_fast import advantages
from mem1_fast.consolidation import MODES, pack
from mem1_fast.scoring import score_batch
from mem1_fast.tiny import tiny_model, word_tokenizer
from mem1_fast.trajectory import Kind, Trajectory

WORDS = [f"w{i}" for i in range(60)] + ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>"]


def groups_of_rollouts(n_groups=3, G=4, seed=0, turns=(1, 4)):
    """Random multi-turn trajectories; the G samples of a group share their prompt and nothing else."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_groups):
        q = [rng.randrange(3, 60) for _ in range(rng.randint(3, 12))]
        for _ in range(G):
            trips, nt = [("PROMPT", 0, q)], rng.randint(*turns)
            for j in range(nt):
                trips += [("STATE", j, [rng.randrange(3, 60) for _ in range(rng.randint(1, 6))]),
                          ("ACTION", j, [rng.randrange(3, 60) for _ in range(rng.randint(1, 4))])]
                if j < nt - 1:
                    trips.append(("OBS", j, [rng.randrange(3, 60) for _ in range(rng.randint(1, 5))]))
            out.append(Trajectory.from_triples(trips, reward=rng.random()))
    return out


def sight(batches):
    """For every trained token, keyed (trajectory, k-th generated token): the set of tokens it sees, each named by
    (owning trajectory, -1 for a question token, its token id, its position id)."""
    out = {}
    for b in batches:
        dense = b.visibility.dense()
        traj, k = advantages.token_order(b)
        q_row = b.kind == int(Kind.PROMPT)
        for n, p in enumerate(b.loss_positions().tolist()):
            seen = dense[p].nonzero().squeeze(1).tolist()
            out[(int(traj[n]), int(k[n]))] = sorted(
                (-1 if bool(q_row[s]) else int(b.traj_ids[s]), int(b.input_ids[s]), int(b.position_ids[s]))
                for s in seen)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_every_trained_token_sees_what_it_sees_when_packed_apart(mode):
    trajs = groups_of_rollouts()
    apart, shared = pack(trajs, mode), pack(trajs, mode, share_question=True)
    assert sight(shared) == sight(apart)
    q_tokens = sum(len(trajs[g * 4].prompt) for g in range(3))
    assert shared[0].saved_tokens == 3 * q_tokens
    assert apart[0].num_tokens - shared[0].num_tokens == 3 * q_tokens
    shared[0].visibility.validate()


@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_log_probs_and_gradients_equal_packing_apart(mode):
    tok = word_tokenizer(WORDS)
    model = tiny_model(len(tok), arch="llama", init_std=0.05, seed=1, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    trajs = groups_of_rollouts(seed=2)
    lengths = [t.num_generated() for t in trajs]
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        batches = pack(trajs, mode, share_question=share)
        lps = [score_batch(model, b, 0.7)[0] for b in batches]
        sum(((lp * torch.linspace(0.5, 1.5, len(lp))).sum() for lp in lps)).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((advantages.gather_per_trajectory(batches, lps, lengths), grads))
    (lp_a, g_a), (lp_s, g_s) = results
    for a, s in zip(lp_a, lp_s):
        torch.testing.assert_close(s, a, rtol=0, atol=2e-5)
    assert ((g_s - g_a).abs().max() / g_a.abs().max()).item() < 1e-5
    # negative control: the same trajectories with another question for one group are not equal
    other = groups_of_rollouts(seed=2)
    q0 = list(other[0].prompt.token_ids)
    other[0] = Trajectory.from_triples([("PROMPT", 0, [q0[0] % 50 + 4] + q0[1:])]
                                       + [(s.kind.name, s.turn, s.token_ids) for s in other[0].segments[1:]])
    b = pack(other, mode, share_question=True)
    lp_o = advantages.gather_per_trajectory(b, [score_batch(model, x, 0.7)[0] for x in b], lengths)
    assert (lp_o[0] - lp_a[0]).abs().max() > 1e-3
    # group 0: sample 0 now stands alone and samples 1-3 share their question; groups 1 and 2 share theirs
    assert b[0].saved_tokens == 2 * len(other[1].prompt) + 3 * len(other[4].prompt) + 3 * len(other[8].prompt)


def test_budget_splits_a_group_and_every_trajectory_stays_whole():
    trajs = groups_of_rollouts(n_groups=2, G=6, seed=3)
    budget = max(pack([t], "recompute")[0].num_tokens for t in trajs) * 2
    batches = pack(trajs, "recompute", max_tokens=budget, share_question=True)
    assert all(b.num_tokens <= budget for b in batches) and len(batches) > 2
    assert sight(batches) == sight(pack(trajs, "recompute"))
    with pytest.raises(ValueError, match="token budget"):
        pack(trajs, "recompute", max_tokens=5, share_question=True)
