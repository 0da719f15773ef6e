"""`retain` (KV retention, zero re-encoding; served by an engine that keeps the last turn's KV as computed).

Rollout: the KV of [t_{j-1} r_{j-1}] is kept exactly as it was computed when generated, turn j-2's is evicted at
consolidation, and i_{j-1} is encoded seeing [q, t_{j-1}, r_{j-1}]; positions grow monotonically. Training row: the
stitched [q t_0 r_0 i_0 t_1 ...], no copies, positions = index; g_j sees q and everything from t_{j-1} on, i_j sees
q and everything from t_j on.
"""
from ..trajectory import GENERATED, Kind, Trajectory
from .base import CAUSAL, ConsolidationMode, KVPlan, Layout, LayoutBuilder, logprobs_of, register


class Retain(ConsolidationMode):
    name = "retain"
    description = "keep the last turn's KV as computed, evict older turns, encode only the new observation"
    kv_plan = KVPlan(kept_turns=1, reencode_last_turn=False, restart_positions=False, feed_last_token=True)

    def layout(self, traj: Trajectory) -> Layout:
        b, Q = LayoutBuilder.starting_with_question(traj)
        turn_start: dict[int, int] = {}
        pos = Q
        for s in traj.segments[1:]:
            turn_start.setdefault(s.turn, b.cursor)
            # g_j sees from t_{j-1} on (turn j-1's start); i_j sees from t_j on
            w = turn_start[s.turn] if s.kind == Kind.OBS else turn_start.get(s.turn - 1, turn_start[s.turn])
            gen = s.kind in GENERATED
            b.emit(s.token_ids, s.kind, s.turn, pos, [(0, Q), (w, CAUSAL)], loss=gen,
                   lps=logprobs_of(s) if gen else None)
            pos += len(s)
        return b.build()


register(Retain())
