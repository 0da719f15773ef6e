"""Packing trajectories, each laid out by its consolidation mode, into padding-free rows for one forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..trajectory import Trajectory
from ..visibility import Visibility, canonical
from .base import ConsolidationMode, Layout, get, pad_intervals


@dataclass
class PackedBatch:
    """Many trajectories end to end in one row (no padding), ready for one forward pass."""

    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # bool [T]
    old_logprobs: torch.Tensor  # float32 [T] (sampled log-probs on loss tokens)
    traj_ids: torch.Tensor  # int64 [T]: index of the trajectory in the list given to `pack`
    kind: torch.Tensor  # int8 [T]
    turn: torch.Tensor  # int32 [T]
    cu_seqlens: torch.Tensor  # int32 [B+1]
    visibility: Visibility
    mode: str
    predictor: torch.Tensor | None = None  # int64 [T]: the row whose hidden state predicts each token (None: the one
    # just before it; a shared question's last row predicts the first generated token of every sample)
    saved_tokens: int = 0  # question tokens not packed again: shared by trajectories of one group (share_question)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def loss_positions(self) -> torch.Tensor:
        """Packed indices of the trained tokens."""
        return self.loss_mask.nonzero().squeeze(1)

    def predictor_positions(self) -> torch.Tensor:
        """For each trained token (`loss_positions()` order), the packed index of the row that predicts it: the row
        before it, except after a shared question (`pack(share_question=True)`)."""
        pos = self.loss_positions()
        return pos - 1 if self.predictor is None else self.predictor[pos]

    def to(self, device) -> "PackedBatch":
        f = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}  # predictor too
        f["visibility"] = self.visibility.to(device)
        return PackedBatch(**f)


def pack(trajs: Sequence[Trajectory], mode: "str | ConsolidationMode", max_tokens: int | None = None,
         share_question: bool = False) -> list[PackedBatch]:
    """Pack trajectories into batches of at most `max_tokens` tokens (first fit, input order kept per batch).

    share_question: consecutive trajectories that begin with the same question (the samples of a group) are packed
    with one copy of it, which all their tokens see in place of their own (`_share_question`); the loss and its
    gradients are those of packing them apart (up to float summation order), on fewer tokens.
    A trajectory longer than the budget is an error, never truncated.
    """
    mode = get(mode)
    if len(trajs) == 0:
        raise ValueError("pack: no trajectories given")
    lays = [mode.layout(t) for t in trajs]
    units = _share_units(trajs, lays, max_tokens) if share_question else [[i] for i in range(len(trajs))]
    sizes = [len(lays[u[0]].input_ids) + sum(len(lays[i].input_ids) - len(trajs[i].prompt) for i in u[1:])
             for u in units]
    if max_tokens is None:
        groups = [list(range(len(units)))]
    else:
        groups, fill = [], []
        for ui, n in enumerate(sizes):
            if n > max_tokens:
                raise ValueError(f"token budget {max_tokens} is smaller than trajectory {units[ui][0]} ({n} tokens "
                                 f"in '{mode.name}' layout); raise max_tokens")
            for g, used in enumerate(fill):
                if used + n <= max_tokens:
                    groups[g].append(ui)
                    fill[g] += n
                    break
            else:
                groups.append([ui])
                fill.append(n)
    out = []
    for g in groups:
        unit_lays, owners, preds = [], [], []
        for ui in g:
            u, Q = units[ui], len(trajs[units[ui][0]].prompt)
            lay, pred = _share_question([lays[i] for i in u], Q) if len(u) > 1 else (
                lays[u[0]], np.arange(len(lays[u[0]].input_ids)) - 1)
            unit_lays.append(lay)
            preds.append(pred)
            # the shared question counts as the first trajectory's; each later one owns its rows after it
            owners.append(np.concatenate([np.full(len(lays[i].input_ids) - (Q if k else 0), i, np.int64)
                                          for k, i in enumerate(u)]))
        shared = any(len(units[ui]) > 1 for ui in g)
        b = _pack_group(unit_lays, owners, mode.name, trim=shared)
        if shared:
            offsets = np.cumsum([0] + [len(l.input_ids) for l in unit_lays[:-1]])
            b.predictor = torch.from_numpy(np.concatenate([p + o for p, o in zip(preds, offsets)]))
        b.saved_tokens = sum((len(units[ui]) - 1) * len(trajs[units[ui][0]].prompt) for ui in g)
        out.append(b)
    return out


def _same_question(a: Layout, b: Layout, Q: int) -> bool:
    """Whether two layouts begin with the same Q question rows (ids, positions, kinds, intervals)."""
    if len(a.input_ids) < Q or len(b.input_ids) < Q:
        return False
    K = max(a.lo.shape[1], b.lo.shape[1])
    return all(np.array_equal(x[:Q], y[:Q]) for x, y in (
        (a.input_ids, b.input_ids), (a.position_ids, b.position_ids), (a.kind, b.kind), (a.loss_mask, b.loss_mask),
        (pad_intervals(a.lo, K), pad_intervals(b.lo, K)), (pad_intervals(a.hi, K), pad_intervals(b.hi, K))))


def _share_units(trajs, lays, max_tokens) -> list[list[int]]:
    """Runs of consecutive trajectories with the same question, each run cut to fit the token budget."""
    units: list[list[int]] = []
    size = 0
    for i, lay in enumerate(lays):
        Q = len(trajs[i].prompt)
        if units and _same_question(lays[units[-1][0]], lay, Q) and Q == len(trajs[units[-1][0]].prompt) and (
                max_tokens is None or size + len(lay.input_ids) - Q <= max_tokens):
            units[-1].append(i)
            size += len(lay.input_ids) - Q
        else:
            units.append([i])
            size = len(lay.input_ids)
    return units


def _share_question(lays: list[Layout], Q: int) -> tuple[Layout, np.ndarray]:
    """One layout for trajectories that begin with the same Q question rows: the first trajectory whole, then the
    others without their question. Each interval of a later trajectory is split at Q: its part inside the question
    now points at the first copy, its part after the question moves with the trajectory's new offset; so does the
    row that predicts each token (for the first generated token of a later trajectory, the question's last row).
    Returns the layout and that predictor row of every row (unit-local)."""
    los, his, base = [lays[0].lo], [lays[0].hi], len(lays[0].input_ids)
    preds = [np.arange(base) - 1]
    for lay in lays[1:]:
        lo, hi = lay.lo[Q:], lay.hi[Q:]
        prev = np.arange(Q, len(lay.input_ids)) - 1  # each row's predictor in its own layout, remapped like keys
        preds.append(np.where(prev < Q, prev, prev - Q + base))
        live = hi > lo
        q_part = live & (lo < Q)
        rest = live & (hi > Q)
        los.append(np.concatenate([np.where(q_part, lo, 0), np.where(rest, np.maximum(lo, Q) - Q + base, 0)], 1))
        his.append(np.concatenate([np.where(q_part, np.minimum(hi, Q), 0), np.where(rest, hi - Q + base, 0)], 1))
        base += len(lay.input_ids) - Q
    K = max(x.shape[1] for x in los)
    cat = lambda name: np.concatenate([getattr(lays[0], name)] + [getattr(l, name)[Q:] for l in lays[1:]])  # noqa: E731
    return Layout(cat("input_ids"), cat("position_ids"), cat("loss_mask"), cat("logprobs"), cat("kind"), cat("turn"),
                  lo=np.concatenate([pad_intervals(x, K) for x in los]),
                  hi=np.concatenate([pad_intervals(x, K) for x in his])), np.concatenate(preds)


def _pack_group(lays: list[Layout], owners: list[np.ndarray], mode: str, trim: bool = False) -> PackedBatch:
    """The layouts end to end in one row; `owners[u]` is the trajectory index of each row of `lays[u]` (a unit is
    one trajectory, or a group sharing its question)."""
    offsets = np.cumsum([0] + [len(l.input_ids) for l in lays])
    K = max(l.lo.shape[1] for l in lays)
    lo = np.concatenate([pad_intervals(l.lo, K) + o for l, o in zip(lays, offsets[:-1])])
    hi = np.concatenate([pad_intervals(l.hi, K) + o for l, o in zip(lays, offsets[:-1])])
    lo, hi = canonical(torch.from_numpy(lo), torch.from_numpy(hi))
    if trim:  # intervals split at the shared question leave empty slots behind: keep only the widest row's
        k = max(int((hi > lo).sum(1).max()), 1)
        lo, hi = lo[:, :k].contiguous(), hi[:, :k].contiguous()
    t = lambda xs, dt: torch.from_numpy(np.concatenate(xs)).to(dt)  # noqa: E731
    vis = Visibility(lo.to(torch.int32), hi.to(torch.int32), torch.from_numpy(offsets).to(torch.int32))
    return PackedBatch(
        input_ids=t([l.input_ids for l in lays], torch.long),
        position_ids=t([l.position_ids for l in lays], torch.long),
        loss_mask=t([l.loss_mask for l in lays], torch.bool),
        old_logprobs=t([l.logprobs for l in lays], torch.float32),
        traj_ids=t(owners, torch.long),
        kind=t([l.kind for l in lays], torch.int8),
        turn=t([l.turn for l in lays], torch.int32),
        cu_seqlens=vis.cu_seqlens,
        visibility=vis,
        mode=mode,
    )

