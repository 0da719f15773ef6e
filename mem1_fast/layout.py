"""Training layouts of the consolidation modes (DESIGN §3) and packing into padding-free batches.

A mode fixes, for each token of a trajectory, where it sits in the training row, its position id, whether its
log-prob is trained on, and its visibility. Every token's visibility here has the same shape: an optional
"question" interval [0, |q|) plus a causal window [w, p] — so a mode is just the rule that picks w per segment.

- recompute: row [q | B_0 | B_1 | ...], B_j = [copy of t_{j-1} r_{j-1} i_{j-1} | t_j r_j]; B_j sees q and itself;
  positions restart at |q| in every B_j. Exact for a rollout that re-encodes the kept context each turn.
- retain: row [q t_0 r_0 i_0 t_1 ...]; g_j sees q and everything from t_{j-1}; i_j sees q and everything from
  t_j; positions = index. Exact for a rollout that keeps the KV of the last turn and evicts older turns.
- paper: the MEM1 repository's make_attention_mask (t_j, r_j see q, r_{j-1}, i_{j-1}, t_j, r_j; i_j sees only
  i_j; positions = index). Matches no rollout; kept for comparison only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from .trajectory import GENERATED, Kind, Trajectory
from .visibility import Visibility

Mode = Literal["recompute", "retain", "paper"]
MODES: tuple[str, ...] = ("recompute", "retain", "paper")
EXACT_MODES: tuple[str, ...] = ("recompute", "retain")


@dataclass
class Layout:
    """One trajectory laid out for training (numpy, trajectory-local coordinates)."""

    input_ids: np.ndarray  # int64 [L]
    position_ids: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]: token's log-prob is trained on (generated tokens, never copies)
    logprobs: np.ndarray  # float32 [L]: sampled log-prob on loss tokens, 0 elsewhere
    kind: np.ndarray  # int8 [L]
    turn: np.ndarray  # int32 [L]
    window: np.ndarray  # int64 [L]: start of the causal window
    sees_question: np.ndarray  # bool [L]: whether [0, |q|) is visible too
    q_len: int


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown consolidation mode {mode!r}; expected one of {MODES}")


def layout(traj: Trajectory, mode: Mode) -> Layout:
    check_mode(mode)
    rows = []  # (token_ids, positions, loss, logprobs, kind, turn, window, sees_q)
    q = traj.prompt
    Q = len(q)
    cursor = 0

    def emit(ids, kind, turn, window, sees_q, pos_start, loss=False, lps=None):
        nonlocal cursor
        n = len(ids)
        if n == 0:
            return
        rows.append((np.asarray(ids, np.int64), np.arange(pos_start, pos_start + n, dtype=np.int64),
                     np.full(n, loss), np.zeros(n, np.float32) if lps is None else np.asarray(lps, np.float32),
                     np.full(n, int(kind), np.int8), np.full(n, turn, np.int32), np.full(n, window, np.int64),
                     np.full(n, sees_q)))
        cursor += n

    emit(q.token_ids, Kind.PROMPT, 0, 0, False, 0)
    segs = traj.segments[1:]
    if mode == "recompute":
        prev: list = []  # segments of the previous turn, copied as context
        for j in range(traj.num_turns):
            start, pos = cursor, Q
            for s in prev:  # c_j: the kept context, re-encoded: no loss on the copy
                emit(s.token_ids, s.kind, j - 1, start, True, pos)
                pos += len(s)
            cur = [s for s in segs if s.turn == j]
            for s in cur:
                if s.kind in GENERATED:
                    emit(s.token_ids, s.kind, j, start, True, pos, loss=True, lps=_lps(s))
                    pos += len(s)
            prev = cur
    else:
        seg_start: dict[tuple[int, int], int] = {}
        turn_start: dict[int, int] = {}
        pos = Q
        for s in segs:
            seg_start[(s.turn, int(s.kind))] = cursor
            turn_start.setdefault(s.turn, cursor)
            if mode == "retain":
                # g_j sees from t_{j-1} on (turn j-1's start); i_j sees from t_j on
                w = turn_start[s.turn] if s.kind == Kind.OBS else turn_start.get(s.turn - 1, turn_start[s.turn])
                sees_q = True
            else:  # paper
                if s.kind == Kind.OBS:
                    w, sees_q = cursor, False
                else:
                    # from r_{j-1} on (r_{j-1}, i_{j-1} are contiguous and directly precede t_j)
                    w = _paper_window(seg_start, turn_start, s.turn)
                    sees_q = True
            emit(s.token_ids, s.kind, s.turn, w, sees_q, pos, loss=s.kind in GENERATED,
                 lps=_lps(s) if s.kind in GENERATED else None)
            pos += len(s)
    cat = [np.concatenate(c) for c in zip(*rows)]
    return Layout(*cat, q_len=Q)


def _lps(seg):
    return seg.logprobs if seg.logprobs is not None else [0.0] * len(seg)


def _paper_window(seg_start, turn_start, j):
    if j == 0:
        return turn_start[0]
    for kind in (Kind.ACTION, Kind.OBS):  # first non-empty of r_{j-1}, i_{j-1}
        if (j - 1, int(kind)) in seg_start:
            return seg_start[(j - 1, int(kind))]
    return turn_start[j]


def intervals(lay: Layout, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[L, 2] canonical intervals in packed coordinates (the trajectory starts at `offset`)."""
    L = len(lay.input_ids)
    p = np.arange(L, dtype=np.int64)
    w = lay.window
    merged = ~lay.sees_question | (w <= lay.q_len)  # window alone, or window touching/overlapping q
    lo = np.zeros((L, 2), np.int64)
    hi = np.zeros((L, 2), np.int64)
    lo[:, 0] = np.where(merged, np.where(lay.sees_question, 0, w), 0) + offset
    hi[:, 0] = np.where(merged, p + 1, lay.q_len) + offset
    lo[:, 1] = np.where(merged, 0, w + offset)
    hi[:, 1] = np.where(merged, 0, p + 1 + offset)
    return lo, hi


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


def pack(trajs: Sequence[Trajectory], mode: Mode, max_tokens: int | None = None) -> list[PackedBatch]:
    """Pack trajectories into batches of at most `max_tokens` tokens (first fit, input order kept per batch).

    A trajectory longer than the budget is an error, never truncated.
    """
    check_mode(mode)
    if len(trajs) == 0:
        raise ValueError("pack: no trajectories given")
    lays = [layout(t, mode) for t in trajs]
    lens = [len(l.input_ids) for l in lays]
    if max_tokens is None:
        groups = [list(range(len(trajs)))]
    else:
        groups, fill = [], []
        for i, n in enumerate(lens):
            if n > max_tokens:
                raise ValueError(f"token budget {max_tokens} is smaller than trajectory {i} ({n} tokens in "
                                 f"'{mode}' layout); raise max_tokens")
            for g, used in enumerate(fill):
                if used + n <= max_tokens:
                    groups[g].append(i)
                    fill[g] += n
                    break
            else:
                groups.append([i])
                fill.append(n)
    return [_pack_group([lays[i] for i in g], g, mode) for g in groups]


def _pack_group(lays: list[Layout], ids: list[int], mode: str) -> PackedBatch:
    offsets = np.cumsum([0] + [len(l.input_ids) for l in lays])
    los, his = zip(*(intervals(l, int(o)) for l, o in zip(lays, offsets[:-1])))
    t = lambda xs, dt: torch.from_numpy(np.concatenate(xs)).to(dt)  # noqa: E731
    vis = Visibility(t(los, torch.int32), t(his, torch.int32), torch.from_numpy(offsets).to(torch.int32))
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
