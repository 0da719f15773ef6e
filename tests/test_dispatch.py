"""Backend choice shared by the op fronts (mem1_fast/ops/_dispatch.py)."""
import importlib
import types

import pytest
import torch

from mem1_fast.ops._dispatch import Backends


def _fake(avail, dtypes=None):
    m = types.SimpleNamespace(available=lambda device: avail)
    if dtypes is not None:
        m.DTYPES = dtypes
    return m


def test_default_skips_unavailable_and_unsupported_dtypes():
    b = Backends("op", {"reference": _fake(True), "fast": _fake(True, (torch.float16,)), "off": _fake(False)},
                 env="MEM1_FAST_TEST_NO_SUCH_VAR", prefer={"cpu": ("off", "fast")})
    assert b.available("cpu") == ["reference", "fast"]
    assert b.default(torch.zeros(1, dtype=torch.float16)) == "fast"
    assert b.default(torch.zeros(1, dtype=torch.float64)) == "reference"  # e.g. fp64 on CUDA: no kernel takes it


def test_keyword_then_environment_then_default(monkeypatch):
    b = Backends("op", {"reference": _fake(True), "fast": _fake(True)}, env="MEM1_FAST_TEST_BACKEND",
                 prefer={"cpu": ("fast",)})
    x = torch.zeros(1)
    assert b.pick(None, x) == "fast"
    monkeypatch.setenv("MEM1_FAST_TEST_BACKEND", "reference")
    assert b.pick(None, x) == "reference"
    assert b.pick("fast", x) == "fast"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        b.pick("nope", x)


@pytest.mark.parametrize("op", ["state_attention", "logprob_entropy", "ppo_loss"])
def test_fronts_default_to_the_cpp_kernels_on_cpu(op):
    front = importlib.import_module(f"mem1_fast.ops.{op}")
    if "cpp" not in front.available_backends("cpu"):
        pytest.skip("the C++ extension does not load here")
    assert front.default_backend(torch.zeros(1)) == "cpp"
    assert front.default_backend(torch.zeros(1, dtype=torch.float64)) == "cpp"  # the C++ kernels take fp64


def test_built_extension_registers_every_cpu_op():
    """A stale mem1_fast/_C*.so would make the C++ backends 'unavailable' and the oracle tests silently check only
    the reference: fail loudly instead."""
    from mem1_fast import _ext
    if not _ext.available():
        pytest.skip("the C++ extension does not build here")
    for op in ("block_map", "state_attention_fwd", "state_attention_bwd", "logprob_entropy_fwd",
               "logprob_entropy_bwd", "ppo_loss_fused"):
        assert _ext.has_cpu_op(op), f"torch.ops.mem1_fast.{op} missing: rebuild (python setup.py build_ext --inplace)"
