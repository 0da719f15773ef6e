"""`recompute` (the default; what MEM1's rollout does; vLLM serves it natively).

Rollout: turn j's prompt is [q | t_{j-1} r_{j-1} i_{j-1}], encoded after the question's cached KV at positions
|q|..; when turn j is done, everything after q is released. Training row [q | B_0 | B_1 | ...] with
B_j = [copy of t_{j-1} r_{j-1} i_{j-1} | t_j r_j]; B_j sees q and itself; positions restart at |q| in every B_j;
loss on t_j r_j only (never on the copy).
"""
from ..trajectory import GENERATED, Trajectory
from .base import CAUSAL, ConsolidationMode, KVPlan, Layout, LayoutBuilder, logprobs_of, register


class Recompute(ConsolidationMode):
    name = "recompute"
    description = "re-encode the last turn after the question's cached KV every turn (MEM1's rollout)"
    kv_plan = KVPlan(kept_turns=0, reencode_last_turn=True, restart_positions=True, feed_last_token=False)

    def layout(self, traj: Trajectory) -> Layout:
        b, Q = LayoutBuilder.starting_with_question(traj)
        segs, prev = traj.segments[1:], []
        for j in range(traj.num_turns):
            start, pos = b.cursor, Q
            vis = [(0, Q), (start, CAUSAL)]
            for s in prev:  # the kept context, re-encoded: no loss on the copy
                b.emit(s.token_ids, s.kind, j - 1, pos, vis)
                pos += len(s)
            cur = [s for s in segs if s.turn == j]
            for s in cur:
                if s.kind in GENERATED:
                    b.emit(s.token_ids, s.kind, j, pos, vis, loss=True, lps=logprobs_of(s))
                    pos += len(s)
            prev = cur
        return b.build()


register(Recompute())
