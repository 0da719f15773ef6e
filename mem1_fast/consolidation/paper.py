"""`paper`: the visibility of the MEM1 repository's `make_attention_mask`, rule for rule, for comparison only.

t_j sees q, r_{j-1}, i_{j-1}, t_j (causal); r_j sees q, r_{j-1}, i_{j-1}, t_j, r_j (causal); i_j sees only i_j
(causal); positions = the stitched index. It matches no rollout (a think cannot see the previous think, observations
see only themselves), so training with it is not exact: no engine serves it (kv_plan None).
"""
from ..trajectory import GENERATED, Kind, Trajectory
from .base import CAUSAL, ConsolidationMode, Layout, LayoutBuilder, logprobs_of, register


class Paper(ConsolidationMode):
    name = "paper"
    description = "MEM1's make_attention_mask, reproduced for comparison; matches no rollout"
    kv_plan = None

    def layout(self, traj: Trajectory) -> Layout:
        b, Q = LayoutBuilder.starting_with_question(traj)
        seg_start: dict[tuple[int, int], int] = {}
        turn_start: dict[int, int] = {}
        pos = Q
        for s in traj.segments[1:]:
            seg_start[(s.turn, int(s.kind))] = b.cursor
            turn_start.setdefault(s.turn, b.cursor)
            if s.kind == Kind.OBS:
                vis = [(b.cursor, CAUSAL)]
            else:  # from r_{j-1} on (r_{j-1}, i_{j-1} are contiguous and directly precede t_j)
                vis = [(0, Q), (_window(seg_start, turn_start, s.turn), CAUSAL)]
            gen = s.kind in GENERATED
            b.emit(s.token_ids, s.kind, s.turn, pos, vis, loss=gen, lps=logprobs_of(s) if gen else None)
            pos += len(s)
        return b.build()


def _window(seg_start, turn_start, j):
    if j == 0:
        return turn_start[0]
    for kind in (Kind.ACTION, Kind.OBS):  # first non-empty of r_{j-1}, i_{j-1}
        if (j - 1, int(kind)) in seg_start:
            return seg_start[(j - 1, int(kind))]
    return turn_start[j]


register(Paper())
