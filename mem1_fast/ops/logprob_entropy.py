"""logprob_entropy: per-row log-prob of a target and entropy of softmax(hidden @ weight.T / temperature),
straight from hidden states, never holding the [N, V] logits (docs/design.md §5).

    logp, entropy = logprob_entropy(hidden, weight, targets, temperature=1.0)   # both float32 [N]

hidden: [N, H] (only the rows that are trained on: gather before the LM head); weight: [V, H]; targets: int64 [N].
Differentiable in hidden and weight through both outputs. With z = hidden @ weight.T / temperature, p = softmax(z):
    logp = z[target] - lse(z),   entropy = lse(z) - sum(p * z)
    d/dz: g_logp * (onehot - p) + g_ent * p * (sum(p * z) - z)
The backward recomputes logit chunks instead of saving them.

Backends (one file each, same function): "reference" (plain PyTorch below, chunked over rows and vocabulary),
"cpp" (csrc/cpu/logprob_entropy.cpp via ops/_cpp_logprob_entropy.py), "triton" (triton_kernels/logprob_entropy.py),
"cuda" (csrc/cuda/logprob_entropy.cu via ops/_cuda_logprob_entropy.py). A backend module implements
    available(device) -> bool
    forward(hidden, weight, targets, temperature) -> (logp fp32 [N], entropy fp32 [N], stats [STATS_ROWS, N])
    backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight)
        -> (d_hidden | None, d_weight | None)          # g_logp / g_ent may be None (output unused)
    STATS_ROWS: int;  FP64_OUT: bool (outputs and stats are float64 when an input is)
`backend=None` picks the best available for the device; `MEM1_FAST_LOGPROB_BACKEND` overrides it.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ._dispatch import Backends, check_local

ROW_CHUNK = 1024
VOCAB_CHUNK = 8192


def logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(hidden, weight, targets, temperature)
    logp, ent, _ = torch.ops.mem1_fast.logprob_entropy(hidden, weight, targets.long(), float(temperature),
                                                       _backends.asked(backend))
    return logp, ent


# --- the registered op: one schema, a fake kernel, autograd ---------------------------------------------------------
# One implementation for every device: it runs the backend asked for, or ("") the default for the tensors' device and
# dtype, resolved when the op runs (the fake kernel asks the registry only for the statistics' shape).
# `stats` is what the backend's backward reads: float32 [STATS_ROWS, N] (float64 for float64 inputs on the
# reference and C++ backends), its rows the backend's own business.
def _impl(hidden, backend):
    return _backends.module(backend or _backends.default(hidden))


@torch.library.custom_op("mem1_fast::logprob_entropy", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_ids(targets, weight.shape[0])
    return _impl(hidden, backend).forward(hidden, weight, targets, temperature)


@_op.register_fake
def _(hidden, weight, targets, temperature, backend):
    impl = _impl(hidden, backend)
    out = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) and impl.FP64_OUT else torch.float32
    N = hidden.shape[0]
    return hidden.new_empty(N, dtype=out), hidden.new_empty(N, dtype=out), hidden.new_empty((impl.STATS_ROWS, N),
                                                                                            dtype=out)


@torch.library.custom_op("mem1_fast::logprob_entropy_backward", mutates_args=())
def _backward_op(g_logp: torch.Tensor | None, g_ent: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor,
                 targets: torch.Tensor, stats: torch.Tensor, temperature: float, backend: str, need_hidden: bool,
                 need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dh, dw = _impl(hidden, backend).backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden,
                                             need_weight)
    # an op returns tensors, never None: an empty tensor stands for a gradient not asked for
    return (hidden.new_empty(0) if dh is None else dh.contiguous()), (weight.new_empty(0) if dw is None else
                                                                      dw.contiguous())


@_backward_op.register_fake
def _(g_logp, g_ent, hidden, weight, targets, stats, temperature, backend, need_hidden, need_weight):
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, output[2])
    ctx.temperature, ctx.backend = temperature, backend
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (the backends skip it), not zeros


def _autograd_backward(ctx, g_logp, g_ent, _g_stats):
    hidden, weight, targets, stats = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = torch.ops.mem1_fast.logprob_entropy_backward(g_logp, g_ent, hidden, weight, targets, stats,
                                                          ctx.temperature, ctx.backend, need_h, need_w)
    return (dh if need_h else None), (dw if need_w else None), None, None, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_inputs(hidden, weight, targets, temperature):
    check_local("logprob_entropy", hidden=hidden, weight=weight, targets=targets)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"logprob_entropy: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"logprob_entropy: targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"logprob_entropy: targets must be integer ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"logprob_entropy: temperature must be > 0, got {temperature}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError("logprob_entropy: hidden, weight and targets must be on one device")


def _check_ids(targets, V):
    """Value check, run by the op itself (inside compiled code a data-dependent check would break the graph)."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"logprob_entropy: target ids must lie in [0, {V}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def _acc_dtype(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _row_stats(h, weight, temperature, vchunk=VOCAB_CHUNK):
    """Online (max, sum exp, sum p*z) over vocabulary chunks for a block of rows."""
    acc = _acc_dtype(h)
    n = h.shape[0]
    m = torch.full((n,), -torch.inf, dtype=acc, device=h.device)
    s = torch.zeros(n, dtype=acc, device=h.device)
    sz = torch.zeros(n, dtype=acc, device=h.device)  # sum exp(z - m) * z
    for v0 in range(0, weight.shape[0], vchunk):
        z = (h @ weight[v0:v0 + vchunk].to(acc).T) / temperature
        m_new = torch.maximum(m, z.amax(1))
        alpha = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        s = s * alpha + e.sum(1)
        sz = sz * alpha + (e * z).sum(1)
        m = m_new
    return m, s, sz


# --- the reference backend --------------------------------------------------------------------------------------
def reference_forward(hidden, weight, targets, temperature):
    acc = _acc_dtype(hidden, weight)
    N = hidden.shape[0]
    logp, ent, lse, ez = (torch.empty(N, dtype=acc, device=hidden.device) for _ in range(4))
    for r0 in range(0, N, ROW_CHUNK):
        r = slice(r0, r0 + ROW_CHUNK)
        h = hidden[r].to(acc)
        m, s, sz = _row_stats(h, weight, temperature)
        lse[r] = m + torch.log(s)
        ez[r] = sz / s  # E_p[z]
        logp[r] = (h * weight[targets[r]].to(acc)).sum(1) / temperature - lse[r]
        ent[r] = lse[r] - ez[r]
    return logp, ent, torch.stack((lse, ez))


def reference_backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight):
    lse, ez = stats
    tau = temperature
    acc = _acc_dtype(hidden, weight)
    N = hidden.shape[0]
    zeros = lambda: torch.zeros(N, dtype=acc, device=hidden.device)  # noqa: E731
    g_logp = zeros() if g_logp is None else g_logp.to(acc)
    g_ent = zeros() if g_ent is None else g_ent.to(acc)
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    for r0 in range(0, N, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, N)
        h = hidden[r0:r1].to(acc)
        gl, ge = g_logp[r0:r1, None], g_ent[r0:r1, None]
        l, e_z = lse[r0:r1, None], ez[r0:r1, None]
        t = targets[r0:r1]
        for v0 in range(0, weight.shape[0], VOCAB_CHUNK):
            w = weight[v0:v0 + VOCAB_CHUNK].to(acc)
            z = (h @ w.T) / tau  # logits are recomputed, never saved
            p = torch.exp(z - l)
            dz = -gl * p + ge * p * (e_z - z)
            rows = ((t >= v0) & (t < v0 + w.shape[0])).nonzero().squeeze(1)
            dz[rows, t[rows] - v0] += gl[rows, 0]
            dz = dz / tau
            if need_hidden:
                d_hidden[r0:r1] += dz @ w
            if need_weight:
                d_weight[v0:v0 + w.shape[0]] += dz.T @ h
    return (None if d_hidden is None else d_hidden.to(hidden.dtype),
            None if d_weight is None else d_weight.to(weight.dtype))


@runtime_checkable
class Backend(Protocol):
    """A logprob_entropy backend module (tests/test_backends.py checks every registered one against it)."""

    STATS_ROWS: int  # rows of the statistics tensor its forward saves for its backward
    FP64_OUT: bool  # outputs and statistics are float64 when an input is (else always float32)

    def available(self, device: str) -> bool: ...
    def forward(self, hidden, weight, targets, temperature) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def backward(self, g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


class _Reference:
    STATS_ROWS, FP64_OUT = 2, True
    available = staticmethod(lambda device: True)
    forward = staticmethod(reference_forward)
    backward = staticmethod(reference_backward)


_backends = Backends("logprob_entropy", {"reference": _Reference, "cpp": "._cpp_logprob_entropy",
                                         "triton": "mem1_fast.triton_kernels.logprob_entropy",
                                         "cuda": "._cuda_logprob_entropy"},
                     env="MEM1_FAST_LOGPROB_BACKEND", prefer={"cuda": ("triton", "cuda"), "cpu": ("cpp",)})
BACKENDS = _backends.names
available_backends = _backends.available
default_backend = _backends.default
backend_module = _backends.module
