"""The varlen plan the GPU benchmark hands FlashAttention / xformers must express exactly the MEM1 visibility."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from shapes import mem1_batch, varlen_plan  # noqa: E402

from mem1_fast.visibility import Visibility  # noqa: E402


def plan_dense(vis):
    """[T, T] visibility implied by the plan with bottom-right-aligned causal masking per sequence."""
    _, k_index, cu_q, cu_k = varlen_plan(vis)
    dense = torch.zeros(vis.T, vis.T, dtype=torch.bool)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        nq, nk = q1 - q0, k1 - k0
        for r in range(nq):
            keys = k_index[k0:k0 + nk - nq + r + 1]  # bottom-right causal: row r sees keys up to nk - nq + r
            dense[q0 + r, keys] = True
    return dense


@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_varlen_plan_matches_visibility(mode):
    vis = mem1_batch(3, mode, n_traj=2).visibility
    assert torch.equal(plan_dense(vis), vis.dense())


def test_varlen_plan_rejects_other_shapes():
    # row 2 sees only key 0: its last interval does not end at itself (a negative control for the check)
    lo = torch.tensor([[0], [0], [0]], dtype=torch.int32)
    hi = torch.tensor([[1], [2], [1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="row 2"):
        varlen_plan(Visibility(lo, hi))
