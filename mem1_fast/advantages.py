"""Advantage estimators (`--advantage {gae,grpo,rloo}`), KL penalties in the reward, whitening and truncated
importance sampling: the per-token numbers the PPO loss is weighted by.

Everything here works on trajectories, not packed rows: one 1-D tensor per trajectory holding a value for each of
its generated tokens in the order they were sampled, across all its turns (observation and prompt tokens are not
steps of the policy). `token_order` maps a packed batch's trained tokens onto that order.

- `grpo`: the trajectory's reward normalized within its group (mean 0, std 1; GRPO), the same for all its tokens.
- `rloo`: the reward minus the mean reward of the other samples of its group (REINFORCE leave-one-out).
- `gae`: generalized advantage estimation with a critic's values V(s_t) at every generated token; the reward sits on
  the last generated token (plus per-token KL penalties when the KL is in the reward), gamma and lambda discount
  along the trajectory's tokens, the value after the last token is 0. Also returns the value targets.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

ESTIMATORS: dict[str, Callable] = {}
CRITIC = {"gae"}  # the estimators that need a value model


def register(name: str):
    def deco(fn):
        ESTIMATORS[name] = fn
        return fn
    return deco


def names() -> tuple[str, ...]:
    return tuple(ESTIMATORS)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens: k1 = logp - ref (unbiased, any sign),
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0, lower variance; Schulman's estimators)."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k3)")


def token_rewards(rewards: Sequence[float], lengths: Sequence[int], kl: Sequence[torch.Tensor] | None = None,
                  kl_coef: float = 0.0) -> list[torch.Tensor]:
    """Per-token rewards: the trajectory's reward on its last generated token, minus kl_coef * KL on every token."""
    out = []
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        if n < 1:
            raise ValueError(f"trajectory {i} has no generated token")
        t = torch.zeros(n, dtype=torch.float64)
        t[-1] = float(r)
        if kl is not None and kl_coef:
            t = t - kl_coef * kl[i].double()
        out.append(t)
    return out


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or x.numel() % group_size:
        raise ValueError(f"{x.numel()} trajectories do not form groups of {group_size} (>= 2)")
    return x.view(-1, group_size)


@register("grpo")
def grpo(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, **_) -> torch.Tensor:
    """[N] trajectory rewards -> [N] advantages, (r - group mean) / (group std + eps); std over the group (biased).
    In the rewards' dtype."""
    g = _groups(rewards, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


@register("rloo")
def rloo(rewards: torch.Tensor, group_size: int, **_) -> torch.Tensor:
    """[N] trajectory rewards -> [N] advantages, r_i - mean of the other G-1 rewards of the group."""
    g = _groups(rewards, group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).view(-1)


@register("gae")
def gae(rewards: Sequence[torch.Tensor], values: Sequence[torch.Tensor], gamma: float = 1.0, lam: float = 1.0,
        **_) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-trajectory token rewards and values -> (advantages, returns), each a list of [n_i] float64.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0), A_t = sum_k (gamma lam)^k delta_{t+k},
    returns_t = A_t + V_t (the critic's targets). Trajectories are padded into one [N, L] scan, right to left."""
    if len(rewards) != len(values):
        raise ValueError(f"{len(rewards)} reward sequences but {len(values)} value sequences")
    lens = [len(r) for r in rewards]
    for i, (r, v) in enumerate(zip(rewards, values)):
        if len(r) != len(v):
            raise ValueError(f"trajectory {i}: {len(r)} rewards but {len(v)} values")
    N, L = len(lens), max(lens)
    R = torch.zeros(N, L + 1, dtype=torch.float64)
    V = torch.zeros(N, L + 1, dtype=torch.float64)  # column n_i (and beyond) stays 0: the value after the end
    for i, (r, v) in enumerate(zip(rewards, values)):
        R[i, :lens[i]] = r.double()
        V[i, :lens[i]] = v.detach().double()
    A = torch.zeros(N, L + 1, dtype=torch.float64)
    for t in range(L - 1, -1, -1):
        delta = R[:, t] + gamma * V[:, t + 1] - V[:, t]
        A[:, t] = delta + gamma * lam * A[:, t + 1]
    adv = [A[i, :n].clone() for i, n in enumerate(lens)]
    return adv, [a + V[i, :len(a)] for i, a in enumerate(adv)]


def whiten(xs: Sequence[torch.Tensor], shift_mean: bool = True, eps: float = 1e-8,
           total=lambda x: x) -> list[torch.Tensor]:
    """Normalize per-token values over all trained tokens of the step (mean 0 unless shift_mean=False, std 1);
    `total` sums a statistic over ranks (distributed.Dist.sum) so that every rank uses the global mean and std."""
    flat = torch.cat([x.double() for x in xs])
    n, s1 = total(float(flat.numel())), total(float(flat.sum()))
    mean = s1 / n
    var = total(float(((flat - mean) ** 2).sum())) / n
    std = var ** 0.5
    return [((x.double() - mean) if shift_mean else x.double()) / (std + eps) for x in xs]


def tis_weights(trainer_logp: Sequence[torch.Tensor], rollout_logp: Sequence[torch.Tensor], level: str,
                cap: float) -> list[torch.Tensor]:
    """Truncated importance weights of the trainer's old policy over the engine's sampling distribution:
    min(pi_trainer / pi_rollout, cap) per token ("token") or per trajectory, with the product of its tokens' ratios
    ("sequence"). They multiply the policy-gradient term, correcting for an engine whose numerics differ."""
    out = []
    for a, b in zip(trainer_logp, rollout_logp):
        d = a.double() - b.double()
        if level == "token":
            out.append(torch.exp(d).clamp(max=cap))
        elif level == "sequence":
            out.append(torch.exp(d.sum()).clamp(max=cap).expand(len(d)).clone())
        else:
            raise ValueError(f"unknown importance-sampling level {level!r} (token, sequence)")
    return out


def token_order(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """For the trained tokens of a packed batch (in `batch.loss_positions()` order): their trajectory index, and
    their index among that trajectory's generated tokens in sampling order. A layout lists a trajectory's turns in
    order and each turn's tokens in order, so packed order is sampling order (checked)."""
    pos = batch.loss_positions()
    traj, turn = batch.traj_ids[pos].cpu(), batch.turn[pos].cpu()
    n = len(traj)
    if n == 0:
        return traj, traj.clone()
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = traj[1:] != traj[:-1]
    starts = new.nonzero().squeeze(1)
    if len(torch.unique(traj[starts])) != len(starts):
        raise ValueError("a trajectory's trained tokens are not contiguous in this packed batch")
    if bool((~new[1:] & (turn[1:] < turn[:-1])).any()):
        raise ValueError("a trajectory's trained tokens are not in turn order in this packed batch")
    return traj, torch.arange(n) - starts[torch.cumsum(new.long(), 0) - 1]


def per_token(xs: Sequence[torch.Tensor], batch) -> torch.Tensor:
    """Per-trajectory sequences -> the [n_loss] tensor aligned with `batch.loss_positions()` (float32)."""
    traj, k = token_order(batch)
    if len(traj) == 0:
        return torch.zeros(0)
    lens = torch.tensor([len(x) for x in xs])
    flat = torch.cat([x.double() for x in xs]).float()
    offsets = torch.cumsum(lens, 0) - lens
    if bool((k >= lens[traj]).any()):
        raise ValueError("a packed batch has more trained tokens for a trajectory than its sequence holds")
    return flat[offsets[traj] + k]


def gather_per_trajectory(batches, xs: Sequence[torch.Tensor], lengths: Sequence[int], what: str = "values"):
    """The inverse of `per_token`: per-batch tensors aligned with each batch's `loss_positions()` -> one [n_i]
    float64 tensor per trajectory in sampling order. Every generated token must be covered exactly once."""
    out = [torch.full((n,), float("nan"), dtype=torch.float64) for n in lengths]
    seen = [0] * len(lengths)
    for b, x in zip(batches, xs):
        traj, k = token_order(b)
        x = x.detach().double().cpu()
        for i in torch.unique(traj).tolist():
            sel = traj == i
            out[i][k[sel]] = x[sel]
            seen[i] += int(sel.sum())
    bad = [i for i, (n, s) in enumerate(zip(lengths, seen)) if n != s]
    if bad:
        raise ValueError(f"{what}: trajectory {bad[0]} has {lengths[bad[0]]} generated tokens, the packed batches "
                         f"cover {seen[bad[0]]}")
    return out


def mismatch_stats(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor) -> dict:
    """How far the engine's log-probs are from the trainer's for the same tokens: |delta| mean and max, and
    percentiles of the ratio pi_trainer / pi_engine."""
    d = (trainer_logp.double() - rollout_logp.double()).cpu()
    if d.numel() == 0:
        return {}
    q = torch.quantile(d.exp(), torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
    return {"mismatch/logprob_abs_mean": float(d.abs().mean()), "mismatch/logprob_abs_max": float(d.abs().max()),
            "mismatch/ratio_p01": float(q[0]), "mismatch/ratio_p50": float(q[1]), "mismatch/ratio_p99": float(q[2])}
