"""MEM1-shaped packed batches: question 512 tokens, turns of 512-1024 tokens (state + action + observation)."""
import random

from mem1_fast.consolidation import pack
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


def varlen_plan(vis):
    """The visibility as FlashAttention-varlen sequences over gathered keys, for the dense-kernel baselines on GPU.

    Every MEM1 row sees some fixed intervals (the question) plus a causal run [s, p] that ends at itself. Consecutive
    rows sharing those intervals and s form one sequence whose keys are the fixed intervals followed by [s, last row]:
    with causal masking aligned bottom-right (FlashAttention >= 2.1 varlen `causal=True`, xformers'
    `BlockDiagonalCausalFromBottomRightMask`) each row then sees exactly its intervals. Returns
    (q_index [T], k_index [Tk], cu_q, cu_k) as int64 / int32 tensors: queries are q[q_index] (a permutation-free
    identity here, rows stay in order), keys are k[k_index]. Raises ValueError for a visibility that is not of this
    form (the kernels need no such structure; only these baselines do)."""
    import torch

    lo, hi = vis.lo.tolist(), vis.hi.tolist()
    segs = []  # (fixed intervals, s, first row, last row)
    for p, (l, h) in enumerate(zip(lo, hi)):
        iv = [(a, b) for a, b in zip(l, h) if b > a]
        if not iv or iv[-1][1] != p + 1:
            raise ValueError(f"row {p}: last interval does not end at the row itself: {iv}")
        key = (tuple(iv[:-1]), iv[-1][0])
        if segs and segs[-1][:2] == key and segs[-1][3] == p - 1:
            segs[-1] = (*key, segs[-1][2], p)
        else:
            segs.append((*key, p, p))
    k_index, cu_q, cu_k = [], [0], [0]
    for fixed, s, first, last in segs:
        if s > first:
            raise ValueError(f"rows {first}..{last}: causal run starts after the first row")
        for a, b in fixed:
            k_index.extend(range(a, b))
        k_index.extend(range(s, last + 1))
        cu_q.append(last + 1)
        cu_k.append(len(k_index))
    return (torch.arange(vis.T), torch.tensor(k_index), torch.tensor(cu_q, dtype=torch.int32),
            torch.tensor(cu_k, dtype=torch.int32))
