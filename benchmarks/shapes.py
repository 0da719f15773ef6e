"""MEM1-shaped packed batches: question 512 tokens, turns of 512-1024 tokens (state + action + observation)."""
import random

from mem1_fast.layout import pack
from mem1_fast.trajectory import Trajectory


def mem1_trajectory(turns: int, seed: int = 0, q_len: int = 512) -> Trajectory:
    rng = random.Random(seed)
    tr = [("PROMPT", 0, [5] * q_len)]
    for j in range(turns):
        n = rng.randint(512, 1024)  # one turn: state + action + observation
        state, action = n // 4, 32
        obs = n - state - action
        tr += [("STATE", j, [6] * state), ("ACTION", j, [7] * action)]
        if j < turns - 1:
            tr.append(("OBS", j, [8] * obs))
    return Trajectory.from_triples(tr)


def mem1_batch(turns: int, mode: str = "retain", n_traj: int = 1, seed: int = 0):
    return pack([mem1_trajectory(turns, seed + i) for i in range(n_traj)], mode)[0]
