"""state_attention: attention over an interval visibility spec (docs/design.md §4-§5), packed varlen layout.

    out = state_attention(q, k, v, visibility, scale=None)            # [T, Hq, D]
    out, lse = state_attention(q, k, v, visibility, return_lse=True)  # lse: float32 [Hq, T], natural log,
                                                                  # not differentiable

q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (GQA, K/V never repeated in memory by kernels).
A row with no visible key outputs 0 with lse = -inf and zero gradients, never NaN.

Backends (one file each, same function): "reference" (plain PyTorch below, chunked over query rows, autograd),
"cpp" (ops/_cpp_state_attention.py over csrc/cpu/state_attention.cpp, CPU tensors), "triton"
(triton_kernels/state_attention.py, CUDA tensors, or CPU under TRITON_INTERPRET=1), "cuda"
(ops/_cuda_state_attention.py over csrc/cuda/state_attention.cu, CUDA builds). Each implements `Backend` below
(and may list the input dtypes it takes in DTYPES), and reads the visibility only through `vis.block_map(BM, BN)` /
`vis.transposed_block_map(BM, BN)` (built once per batch, shared by every layer) and `vis.lo`/`vis.hi`
(per-element masking of partial tiles). The backend is the `backend=` keyword, else `MEM1_FAST_ATTN_BACKEND`, else
the first available for the device and dtype (ops/_dispatch.py), resolved when the registered op runs.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from ..visibility import Visibility
from ._dispatch import Backends, check_local, contiguous

REFERENCE_CHUNK = 128  # query rows per step of the reference: bounds its memory to chunk x span per head


def state_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visibility: Visibility,
                    scale: float | None = None, return_lse: bool = False, backend: str | None = None,
                    deterministic: bool = False):
    check_local("state_attention", q=q, k=k, v=v)
    _check_inputs(q, k, v, visibility)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _backends.asked(backend)
    if backend == "reference":  # plain PyTorch, differentiated by autograd
        out, lse = state_attention_reference(q, k, v, visibility, scale)
    else:
        out, lse = torch.ops.mem1_fast.state_attention(q, k, v, visibility.lo, visibility.hi, scale, backend,
                                                       deterministic)
    return (out, lse) if return_lse else out


# --- the registered op: one schema, a fake kernel, autograd ---------------------------------------------------------
# One implementation for every device: it runs the backend asked for, or ("") the default for the tensors' device and
# dtype (C++ on CPU, Triton on CUDA, the reference elsewhere), resolved when the op runs, not when it is traced.
# Outputs are contiguous, as the fake kernels say.
# The visibility crosses the op boundary as its two tensors; the block maps are cached on them (visibility.py).
@torch.library.custom_op("mem1_fast::state_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float,
        backend: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _backends.module(backend or _backends.default(q))
    BM, BN = impl.tile_sizes(q)
    return contiguous(*impl.forward(q, k, v, Visibility(lo, hi), scale, BM, BN))


@_op.register_fake
def _(q, k, v, lo, hi, scale, backend, deterministic):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mem1_fast::state_attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float, backend: str,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _backends.module(backend or _backends.default(q))
    BM, BN = impl.tile_sizes(q)
    return contiguous(*impl.backward(dout.contiguous(), q, k, v, out, lse, Visibility(lo, hi), scale, BM, BN,
                                     deterministic))


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, lo, hi, scale, backend, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lo, hi, scale, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lo, hi)
    ctx.scale, ctx.backend, ctx.deterministic = scale, backend, deterministic
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, lo, hi = ctx.saved_tensors
    dq, dk, dv = torch.ops.mem1_fast.state_attention_backward(dout, q, k, v, out, lse, lo, hi, ctx.scale,
                                                              ctx.backend, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, vis):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"state_attention: q, k, v must be [T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"state_attention: k and v must be [T={T}, Hkv, D={D}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"state_attention: query heads {Hq} must be a multiple of key/value heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                              torch.float64):
        raise ValueError(f"state_attention: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if vis.lo.shape[0] != T:
        raise ValueError(f"state_attention: visibility covers {vis.lo.shape[0]} tokens but q has {T}")
    if vis.lo.device != q.device:
        raise ValueError(f"state_attention: visibility is on {vis.lo.device} but q is on {q.device}")


def state_attention_reference(q, k, v, vis: Visibility, scale: float, chunk: int = REFERENCE_CHUNK):
    """Chunks of query rows against the key span their intervals cover; an interval mask of chunk x span, never
    T x T. Computes in fp32 (fp64 for fp64 inputs)."""
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lo, hi = vis.lo.long(), vis.hi.long()
    outs, lses = [], []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        l, h = lo[s:e], hi[s:e]
        ne = h > l
        if not bool(ne.any()):
            outs.append(q.new_zeros(e - s, Hq, D))
            lses.append(torch.full((Hq, e - s), -math.inf, device=q.device))
            continue
        k0, k1 = int(l[ne].min()), int(h[ne].max())
        cols = torch.arange(k0, k1, device=q.device)
        mask = ((cols >= l[:, :, None]) & (cols < h[:, :, None])).any(1)  # [c, n]
        ks = k[k0:k1].to(acc).repeat_interleave(g, dim=1)  # [n, Hq, D]
        vs = v[k0:k1].to(acc).repeat_interleave(g, dim=1)
        # A non-finite K/V value must reach only the rows that see it: 0 * NaN in the matmuls would spread it
        # to every row of the chunk. Zero it, then mark exactly the rows whose visible keys hold one.
        bad = ~(torch.isfinite(ks).all(-1) & torch.isfinite(vs).all(-1))  # [n, Hq]
        poisoned = None
        if bool(bad.any()):
            ks = torch.where(torch.isfinite(ks), ks, 0.0)
            vs = torch.where(torch.isfinite(vs), vs, 0.0)
            poisoned = (mask[None] & bad.T[:, None, :]).any(-1)  # [Hq, c]
        scores = torch.einsum("chd,nhd->hcn", q[s:e].to(acc), ks) * scale
        scores = scores.masked_fill(~mask, -math.inf)
        m = scores.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(scores - m).masked_fill(~mask, 0.0)
        denom = p.sum(-1, keepdim=True)
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        out = torch.einsum("hcn,nhd->chd", p / safe, vs)
        if poisoned is not None:
            out = torch.where(poisoned.T[:, :, None], torch.full_like(out, torch.nan), out)
        outs.append(out.to(q.dtype))
        lses.append((m + torch.log(denom)).squeeze(-1).float().detach())
    return torch.cat(outs, 0), torch.cat(lses, 1)


@runtime_checkable
class Backend(Protocol):
    """A state_attention backend module (tests/test_backends.py checks every registered one against it)."""

    def available(self, device: str) -> bool: ...
    def tile_sizes(self, q: torch.Tensor) -> tuple[int, int]: ...
    def forward(self, q, k, v, vis, scale, BM, BN) -> tuple[torch.Tensor, torch.Tensor]: ...
    def backward(self, dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class _Reference:
    """The plain PyTorch above as a backend: the front differentiates it with autograd; inside the registered op
    (when no kernel takes the input) torch.func does, since autograd does not record below an op."""

    available = staticmethod(lambda device: True)
    tile_sizes = staticmethod(lambda q: (0, 0))  # no tiles

    @staticmethod
    def forward(q, k, v, vis, scale, BM, BN):
        return state_attention_reference(q, k, v, vis, scale)

    @staticmethod
    def backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic):
        _, vjp = torch.func.vjp(lambda q, k, v: state_attention_reference(q, k, v, vis, scale)[0], q, k, v)
        return vjp(dout)


_backends = Backends("state_attention", {"reference": _Reference, "cpp": "._cpp_state_attention",
                                         "triton": "mem1_fast.triton_kernels.state_attention",
                                         "cuda": "._cuda_state_attention"},
                     env="MEM1_FAST_ATTN_BACKEND", prefer={"cuda": ("triton", "cuda"), "cpu": ("cpp",)})
BACKENDS = _backends.names
available_backends = _backends.available
default_backend = _backends.default
backend_module = _backends.module
