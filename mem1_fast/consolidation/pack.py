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

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def loss_positions(self) -> torch.Tensor:
        """Packed indices of the trained tokens. Each is predicted by the row just before it."""
        return self.loss_mask.nonzero().squeeze(1)

    def to(self, device) -> "PackedBatch":
        f = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        f["visibility"] = self.visibility.to(device)
        return PackedBatch(**f)


def pack(trajs: Sequence[Trajectory], mode: "str | ConsolidationMode",
         max_tokens: int | None = None) -> list[PackedBatch]:
    """Pack trajectories into batches of at most `max_tokens` tokens (first fit, input order kept per batch).

    A trajectory longer than the budget is an error, never truncated.
    """
    mode = get(mode)
    if len(trajs) == 0:
        raise ValueError("pack: no trajectories given")
    lays = [mode.layout(t) for t in trajs]
    lens = [len(l.input_ids) for l in lays]
    if max_tokens is None:
        groups = [list(range(len(trajs)))]
    else:
        groups, fill = [], []
        for i, n in enumerate(lens):
            if n > max_tokens:
                raise ValueError(f"token budget {max_tokens} is smaller than trajectory {i} ({n} tokens in "
                                 f"'{mode.name}' layout); raise max_tokens")
            for g, used in enumerate(fill):
                if used + n <= max_tokens:
                    groups[g].append(i)
                    fill[g] += n
                    break
            else:
                groups.append([i])
                fill.append(n)
    return [_pack_group([lays[i] for i in g], g, mode.name) for g in groups]


def _pack_group(lays: list[Layout], ids: list[int], mode: str) -> PackedBatch:
    offsets = np.cumsum([0] + [len(l.input_ids) for l in lays])
    K = max(l.lo.shape[1] for l in lays)
    lo = np.concatenate([pad_intervals(l.lo, K) + o for l, o in zip(lays, offsets[:-1])])
    hi = np.concatenate([pad_intervals(l.hi, K) + o for l, o in zip(lays, offsets[:-1])])
    lo, hi = canonical(torch.from_numpy(lo), torch.from_numpy(hi))
    t = lambda xs, dt: torch.from_numpy(np.concatenate(xs)).to(dt)  # noqa: E731
    vis = Visibility(lo.to(torch.int32), hi.to(torch.int32), torch.from_numpy(offsets).to(torch.int32))
    return PackedBatch(
        input_ids=t([l.input_ids for l in lays], torch.long),
        position_ids=t([l.position_ids for l in lays], torch.long),
        loss_mask=t([l.loss_mask for l in lays], torch.bool),
        old_logprobs=t([l.logprobs for l in lays], torch.float32),
        traj_ids=t([np.full(len(l.input_ids), i, np.int64) for l, i in zip(lays, ids)], torch.long),
        kind=t([l.kind for l in lays], torch.int8),
        turn=t([l.turn for l in lays], torch.int32),
        cu_seqlens=vis.cu_seqlens,
        visibility=vis,
        mode=mode,
    )
