"""`full` (the full-context baseline MEM1 is compared against: nothing is ever consolidated away).

Rollout: every turn's KV stays as computed; each observation is encoded after everything before it; positions are
the index. Training row: the plain causal [q t_0 r_0 i_0 t_1 ...], no copies; every token sees every earlier one.
Its peak KV grows with the number of turns, which is what the MEM1 modes avoid.
"""
from ..trajectory import GENERATED, Trajectory
from .base import CAUSAL, ConsolidationMode, KVPlan, Layout, LayoutBuilder, logprobs_of, register

FOREVER = 1 << 30  # more turns than any episode has: no turn is ever evicted


class Full(ConsolidationMode):
    name = "full"
    description = "keep the whole history (the full-context baseline; KV grows with every turn)"
    kv_plan = KVPlan(kept_turns=FOREVER, reencode_last_turn=False, restart_positions=False, feed_last_token=True)

    def layout(self, traj: Trajectory) -> Layout:
        b, Q = LayoutBuilder.starting_with_question(traj)
        pos = Q
        for s in traj.segments[1:]:
            gen = s.kind in GENERATED
            b.emit(s.token_ids, s.kind, s.turn, pos, [(0, CAUSAL)], loss=gen, lps=logprobs_of(s) if gen else None)
            pos += len(s)
        return b.build()


register(Full())
