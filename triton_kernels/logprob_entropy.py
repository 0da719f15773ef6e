"""Triton backend of `logprob_entropy` (docs/design.md §5): per-row log-prob of a target and entropy of
softmax(hidden @ weight.T / temperature), and their gradients, without ever holding the [N, V] logits.

Called by `mem1_fast.ops.logprob_entropy` through

    available(device) -> bool
    forward(hidden, weight, targets, temperature) -> (logp fp32 [N], entropy fp32 [N], stats fp32 [3, N])
    backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight)
        -> (d_hidden | None, d_weight | None)        # in the input dtypes; g_logp / g_ent may be None

and by `triton_kernels/ppo_loss.py` (the fused PPO loss reuses both passes).

Math (z = h W^T / tau, over vocabulary tiles; every statistic is kept relative to the running row max m, so that
+-1e4-scale logits neither overflow nor cancel):
    s  = sum exp(z - m),     sd = sum exp(z - m) (z - m)        (online: a new max m' rescales by a = exp(m - m'):
                                                                 sd <- a (sd + s (m - m')) + tile,  s <- a s + tile)
    logs = log s >= 0,  mean_d = sd / s <= 0   ->   lse = m + logs,  E_p[z] = m + mean_d
    logp = (z_t - m) - logs <= 0,   entropy = logs - mean_d >= 0      (both signs hold exactly, not just in exact math)
    dz  = p (g_ent ((m - z) + mean_d) - g_logp) + g_logp onehot(t),   p = exp((z - m) - logs)
    d_hidden = dz W / tau,   d_weight = dz^T h / tau
The saved statistics are (m, logs, mean_d) rather than (lse, E_p[z]): (m - z) is then formed from two values of the
logits' own magnitude, which keeps p and E_p[z] - z accurate for huge logits.

Kernels
* `_fwd_kernel`, grid (row blocks, vocabulary splits): one program walks its split's vocabulary tiles; each tile of
  logits [BLOCK_N, BLOCK_V] is a K-loop over the hidden size in BLOCK_H steps (tl.dot, fp32 accumulation); the
  epilogue updates (m, s, sd) online and gathers the target logit from the same tile. Splitting the vocabulary keeps
  the GPU full when N is small (a few row blocks); the partial statistics [4, splits, N] are merged by
  `_combine_kernel` in a fixed order (deterministic). 1 matmul-equivalent, nothing of size [N, V] is written.
* Backward, 3 matmul-equivalents, deterministic, no atomics: `_dz_kernel` (grid: row tiles x vocabulary tiles of a
  chunk) recomputes the logit tile (K-loop over H) and writes dz for the chunk, then two tiled GEMMs (`_gemm_kernel`,
  fp32 accumulation, each program owns its output tile and runs the whole K-loop): d_hidden[rows] (+)= dz W[cols] / tau
  (per row block, iterating vocabulary tiles) and d_weight[cols] (+)= dz^T h[rows] / tau (per vocabulary block,
  iterating row tiles).
  Why dz goes through a bounded buffer: a d_hidden kernel that recomputes the logits itself needs an accumulator
  [BLOCK_N, H] alive across the whole vocabulary loop -- 64 x 4096 fp32 is 1 MiB, far beyond registers (and SMEM)
  for H up to 8192 -- so it would either re-read / re-write its fp32 slice of d_hidden in global memory on every
  vocabulary tile (8 H / BLOCK_V bytes per logit: 256 B at H = 4096, BLOCK_V = 128, i.e. about as long on an H100
  as the matmuls themselves, the slices being too many to stay in L2), or split H and recompute the logits
  H / BLOCK_H times (and d_weight the same, symmetrically). Staging dz costs 3 x elt bytes per logit (written
  once, read by each GEMM), so both GEMMs run at tensor-core speed from a single recomputation.
  The chunk is a slab of rows or of vocabulary columns, at most `chunk_bytes()` of dz (1 GiB by default on GPU;
  MEM1_FAST_LOGPROB_TRITON_CHUNK_MB overrides) -- never [N, V] when [N, V] exceeds the budget. The gradient whose
  reduction axis is split is accumulated across chunks (fp32, in the output itself when it is fp32, else in a fp32
  scratch); the axis is chosen so that the accumulated gradient is the smaller one (vocabulary slabs when N < V:
  d_hidden [N, H] is accumulated, d_weight [V, H] is written once per column slab).
  Matmul count: forward 1, backward 3 (recompute 1 + d_hidden 1 + d_weight 1): 4 in all, as the reference; a
  gradient that is not needed is not computed (a frozen head: 1 + 2).

Precision: fp16 / bf16 / fp32 inputs (hidden and weight may differ: the dot then runs in fp32), fp32 accumulation
and fp32 statistics. fp32 inputs use IEEE fp32 dots on GPU (not tf32), so the backend computes the reference's
function to ~1e-6; fp16 / bf16 dots run on tensor cores, and dz is rounded to the input dtype for the two gradient
GEMMs (as any bf16 LM head backward does). Under the interpreter (TRITON_INTERPRET=1, CPU tensors) bf16 is computed in
fp32 after the load (the interpreter's bf16 arithmetic is broken) and large tiles shrunk to the problem are used
(interpreted ops cost the same whatever their size). Memory: the dz chunk (<= the budget, rows padded to 16
elements) plus, when a gradient summed over several chunks is not fp32, a fp32 scratch of its size.
Pointers are formed as an int64 scalar base per tile plus int32 offsets inside it (which keeps the contiguous axis
visible to the compiler: vectorized, cp.async-pipelined loads); row strides must be below 2^23 elements.

Launch configurations: `CONFIGS` (no autotuning: results must not depend on timing). `python tools/triton_report.py
logprob_entropy` compiles them for sm_80 / sm_90a without a GPU and prints registers / spills / shared memory
(tests/test_logprob_entropy_triton.py runs it).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, available  # noqa: F401 (available: the backend interface)
from ._common import MAX as _MAX
from ._common import SUM as _SUM





# -----------------------------------------------------------------------------------------------------------------
# Launch configurations
# -----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """A logits-tile kernel (forward, dz): BLOCK_N rows x BLOCK_V vocabulary, K-loop over H in BLOCK_H steps."""
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Gemm:
    """A gradient GEMM C[M, Nc] (+)= alpha A[M, K] B[K, Nc]: BM x BN output tile, K-loop in BK steps."""
    BM: int
    BN: int
    BK: int
    GROUP_M: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Config:
    fwd: Tile
    dz: Tile
    dh: Gemm  # d_hidden = dz @ W:    M = rows, Nc = H, K = vocabulary
    dw: Gemm  # d_weight = dz^T @ h:  M = vocabulary, Nc = H, K = rows


# (dtype class, H class) -> Config. H class: "small" for H <= 1024, "large" above (up to 8192 and beyond: H only
# sets the trip count of the K-loops, not the register footprint). Picked without a GPU to time them (none was
# available): tensor-core shapes of the Triton matmul tutorial / FlashAttention family -- 128 x 128 fp32
# accumulators, 8 warps, BLOCK_H / BK = 64 (one pipeline stage = 32 KiB of SMEM), 3 stages -- 64-row logits tiles
# for small H (more programs for the same rows), and IEEE fp32 (FMA, no tensor cores) with 64 x 64 tiles;
# num_warps / num_stages chosen from ptxas' figures so that nothing spills on sm_80 or sm_90a (the forward's
# online-softmax epilogue is the tightest: 128 x 128 x 8 warps sits at 255 registers, 0 spill; 64 x 128 needs 8
# warps, at 4 it spills). tests/test_logprob_entropy_triton.py compiles them and prints the table.
CONFIGS: dict[tuple[str, str], Config] = {
    ("half", "large"): Config(fwd=Tile(128, 128, 64, 8, 3), dz=Tile(128, 128, 64, 8, 3),
                              dh=Gemm(128, 128, 64, 8, 8, 3), dw=Gemm(128, 128, 64, 8, 8, 3)),
    ("half", "small"): Config(fwd=Tile(64, 128, 64, 8, 3), dz=Tile(64, 128, 64, 8, 3),
                              dh=Gemm(128, 64, 64, 8, 8, 3), dw=Gemm(128, 64, 64, 8, 8, 3)),
    ("fp32", "large"): Config(fwd=Tile(64, 64, 32, 4, 2), dz=Tile(64, 64, 32, 4, 2),
                              dh=Gemm(64, 64, 32, 8, 4, 2), dw=Gemm(64, 64, 32, 8, 4, 2)),
    ("fp32", "small"): Config(fwd=Tile(64, 64, 32, 4, 2), dz=Tile(64, 64, 32, 4, 2),
                              dh=Gemm(64, 64, 32, 8, 4, 2), dw=Gemm(64, 64, 32, 8, 4, 2)),
}
# Under the interpreter: few, large tiles (each interpreted op has a fixed cost whatever its size, so the op count
# dominates), shrunk to the problem by config_for (INTERPRETER_FIT); tests/test_logprob_entropy_triton.py forces
# small tiles to exercise the ragged / multi-tile / multi-split / multi-chunk paths.
INTERPRETER_CONFIG = Config(fwd=Tile(256, 2048, 64, 4, 1), dz=Tile(256, 2048, 64, 4, 1),
                            dh=Gemm(256, 64, 2048, 4, 4, 1), dw=Gemm(2048, 64, 256, 4, 4, 1))
INTERPRETER_FIT = True  # shrink the interpreter's tiles to small problems (tests that set tiles turn it off)
INTERPRETER_SPLITS = 2  # vocabulary splits of the forward under the interpreter (exercises the merge)
INTERPRETER_CHUNK_BYTES = 8 << 20  # dz chunk under the interpreter (one chunk at the shared tests' shapes)
CHUNK_BYTES = int(float(os.environ.get("MEM1_FAST_LOGPROB_TRITON_CHUNK_MB", "1024")) * (1 << 20))
CHUNK_AXIS = None  # None: automatic ("vocab" when N < V, else "row"); tests force "row" / "vocab"
SPLIT_TARGET_PROGRAMS = 4  # forward: aim at this many programs per SM when choosing the vocabulary splits

STATS_ROWS, FP64_OUT = 3, False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _h_class(H: int) -> str:
    return "small" if H <= 1024 else "large"


def config_for(H: int, dtype: torch.dtype, N: int | None = None, V: int | None = None) -> Config:
    """The launch configuration for hidden size H and compute dtype `dtype`. Under the interpreter: the fixed
    INTERPRETER_CONFIG, its tiles shrunk to the problem (N rows, V columns, H) when INTERPRETER_FIT is set -- every
    interpreted op costs the same whatever the tile, so few large tiles are fastest, but padding is work too."""
    if not INTERPRETED:
        return CONFIGS[(_dtype_class(dtype), _h_class(H))]
    cfg = INTERPRETER_CONFIG
    if not INTERPRETER_FIT or N is None:
        return cfg
    fit = lambda b, n: min(b, max(16, triton.next_power_of_2(n)))
    tile = lambda t: Tile(fit(t.BLOCK_N, N), fit(t.BLOCK_V, V), fit(t.BLOCK_H, H), t.num_warps, t.num_stages)
    return Config(fwd=tile(cfg.fwd), dz=tile(cfg.dz),
                  dh=Gemm(fit(cfg.dh.BM, N), fit(cfg.dh.BN, H), fit(cfg.dh.BK, V), *astuple(cfg.dh)[3:]),
                  dw=Gemm(fit(cfg.dw.BM, V), fit(cfg.dw.BN, H), fit(cfg.dw.BK, N), *astuple(cfg.dw)[3:]))


# -----------------------------------------------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(X, W, TGT, PART, N, V, H, stride_x, stride_w, inv_tau, tiles_per_split, n_vtiles,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
                CD: tl.constexpr, PREC: tl.constexpr):
    """Partial statistics of rows [pid_n * BLOCK_N, +BLOCK_N) over the vocabulary tiles of split pid_s:
    PART[k, pid_s, row] for k = 0: m (max), 1: s (sum exp(z - m)), 2: sd (sum exp(z - m)(z - m)), 3: z_target
    (-inf when the target is not in this split). EVEN_H: H % BLOCK_H == 0."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int32)[:, None]  # V < 2^31: int32 compares
    rmask = row_ok[:, None]
    hvec = tl.arange(0, BLOCK_H)
    cvec = tl.arange(0, BLOCK_V)
    # pointers: an int64 scalar base per tile plus int32 offsets inside the tile (the host checks they fit), so the
    # compiler sees the contiguous axis and vectorizes / pipelines the loads
    x_ptrs = X + (pid_n * BLOCK_N).to(tl.int64) * stride_x + (tl.arange(0, BLOCK_N) * stride_x)[:, None] + hvec[None, :]
    w_offs = (cvec * stride_w)[None, :] + hvec[:, None]  # [BLOCK_H, BLOCK_V]: a W^T tile
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.full([BLOCK_N], 0.0, tl.float32)
    sd = tl.full([BLOCK_N], 0.0, tl.float32)
    zt = tl.full([BLOCK_N], float("-inf"), tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_vtiles)
    for vt in range(t0, t1):
        cols = vt * BLOCK_V + cvec
        cmask = (cols < V)[None, :]
        w_ptrs = W + tl.cast(vt * BLOCK_V, tl.int64) * stride_w + w_offs
        acc = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
        for h0 in range(0, H, BLOCK_H):
            if EVEN_H:  # masks constant along the hidden axis: vectorized, pipelined loads
                x = tl.load(x_ptrs + h0, mask=rmask, other=0.0)
                w = tl.load(w_ptrs + h0, mask=cmask, other=0.0)
            else:
                h_ok = hvec < H - h0
                x = tl.load(x_ptrs + h0, mask=rmask & h_ok[None, :], other=0.0)
                w = tl.load(w_ptrs + h0, mask=h_ok[:, None] & cmask, other=0.0)
            acc = tl.dot(x.to(CD), w.to(CD), acc, input_precision=PREC)
        # padding columns: a finite -3e38 rather than -inf, so that exp(d) = 0 and e * d = 0 there, not 0 * inf
        z = tl.where(cmask, acc * inv_tau, -3.0e38)
        zt = tl.maximum(zt, tl.reduce(tl.where(cols[None, :] == tgt, z, float("-inf")), 1, _MAX))
        m_new = tl.maximum(m, tl.reduce(z, 1, _MAX))  # a logit: every tile holds a valid column
        shift = tl.where(s > 0.0, m - m_new, 0.0)  # first tile: m = -inf, s = 0 (0 * -inf would be NaN)
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]  # <= 0
        e = tl.exp(d)
        sd = alpha * (sd + s * shift) + tl.reduce(e * d, 1, _SUM)
        s = alpha * s + tl.reduce(e, 1, _SUM)
        m = m_new
    base = pid_s * N + rows
    plane = n_splits * N
    tl.store(PART + base, m, mask=row_ok)
    tl.store(PART + plane + base, s, mask=row_ok)
    tl.store(PART + 2 * plane + base, sd, mask=row_ok)
    tl.store(PART + 3 * plane + base, zt, mask=row_ok)


@triton.jit
def _combine_kernel(PART, LOGP, ENT, STATS, N, n_splits, BLOCK: tl.constexpr):
    """Merge the splits' partial statistics in split order: logp, entropy and STATS [3, N] = (m, logs, mean_d)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    plane = n_splits * N
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    zt = tl.full([BLOCK], float("-inf"), tl.float32)
    for k in range(n_splits):
        m = tl.maximum(m, tl.load(PART + k * N + rows, mask=ok, other=0.0))
        zt = tl.maximum(zt, tl.load(PART + 3 * plane + k * N + rows, mask=ok, other=0.0))
    s = tl.full([BLOCK], 0.0, tl.float32)
    sd = tl.full([BLOCK], 0.0, tl.float32)
    for k in range(n_splits):
        mk = tl.load(PART + k * N + rows, mask=ok, other=0.0)
        sk = tl.load(PART + plane + k * N + rows, mask=ok, other=1.0)
        sdk = tl.load(PART + 2 * plane + k * N + rows, mask=ok, other=0.0)
        a = tl.exp(mk - m)
        s += a * sk
        sd += a * (sdk + sk * (mk - m))
    logs = tl.log(s)  # s >= 1: the max term is exp(0)
    mean_d = sd / s  # <= 0
    tl.store(LOGP + rows, (zt - m) - logs, mask=ok)
    tl.store(ENT + rows, logs - mean_d, mask=ok)
    tl.store(STATS + rows, m, mask=ok)
    tl.store(STATS + N + rows, logs, mask=ok)
    tl.store(STATS + 2 * N + rows, mean_d, mask=ok)


@triton.jit
def _dz_kernel(X, W, TGT, STATS, GL, GE, DZ, N, V, H, r0, c0, n_rows, n_cols, stride_x, stride_w, stride_dz, inv_tau,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
               GROUP: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr):
    """dz (not yet divided by tau) of the chunk rows [r0, r0 + n_rows) x columns [c0, c0 + n_cols), into DZ (row stride
    stride_dz), recomputing the logits tile by tile. 1D grid in GROUP-row-tile swizzled order (L2 reuse)."""
    pid = tl.program_id(0)
    n_rt = (n_rows + BLOCK_N - 1) // BLOCK_N
    n_ct = (n_cols + BLOCK_V - 1) // BLOCK_V
    per_group = GROUP * n_ct
    first = (pid // per_group) * GROUP
    gsize = tl.minimum(n_rt - first, GROUP)
    pid_r = first + (pid % per_group) % gsize
    pid_c = (pid % per_group) // gsize
    lr = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    lc = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = lr < n_rows
    rows = r0 + lr
    cols = c0 + lc
    rmask = row_ok[:, None]
    cmask = (lc < n_cols)[None, :]
    hvec = tl.arange(0, BLOCK_H)
    rloc = tl.arange(0, BLOCK_N)
    cloc = tl.arange(0, BLOCK_V)
    x_ptrs = X + (r0 + pid_r * BLOCK_N).to(tl.int64) * stride_x + (rloc * stride_x)[:, None] + hvec[None, :]
    w_ptrs = W + (c0 + pid_c * BLOCK_V).to(tl.int64) * stride_w + (cloc * stride_w)[None, :] + hvec[:, None]
    acc = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
    for h0 in range(0, H, BLOCK_H):
        if EVEN_H:  # masks constant along the hidden axis: vectorized, pipelined loads
            x = tl.load(x_ptrs + h0, mask=rmask, other=0.0)
            w = tl.load(w_ptrs + h0, mask=cmask, other=0.0)
        else:
            h_ok = hvec < H - h0
            x = tl.load(x_ptrs + h0, mask=rmask & h_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + h0, mask=h_ok[:, None] & cmask, other=0.0)
        acc = tl.dot(x.to(CD), w.to(CD), acc, input_precision=PREC)
    z = acc * inv_tau
    m = tl.load(STATS + rows, mask=row_ok, other=0.0)[:, None]
    logs = tl.load(STATS + N + rows, mask=row_ok, other=0.0)[:, None]
    mean_d = tl.load(STATS + 2 * N + rows, mask=row_ok, other=0.0)[:, None]
    gl = tl.load(GL + rows, mask=row_ok, other=0.0)[:, None]
    ge = tl.load(GE + rows, mask=row_ok, other=0.0)[:, None]
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int32)[:, None]
    md = m - z  # >= 0 (up to the recomputation's rounding)
    p = tl.exp(-md - logs)
    dz = p * (ge * (md + mean_d) - gl)
    dz = tl.where(cols[None, :] == tgt, dz + gl, dz)
    dz_ptrs = DZ + (pid_r * BLOCK_N).to(tl.int64) * stride_dz + (rloc * stride_dz)[:, None] + lc[None, :]
    tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=rmask & cmask)


@triton.jit
def _gemm_kernel(A, B, C, CIN, M, NC, K, s_am, s_ak, s_bk, s_cm, s_cin, alpha,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, CD: tl.constexpr,
                 PREC: tl.constexpr, ACCUM: tl.constexpr):
    """C[M, NC] = alpha * A[M, K] @ B[K, NC] (+ CIN when ACCUM; CIN may be C itself), fp32 accumulation. A has any
    strides (dz or dz^T); B's, C's and CIN's columns are contiguous. Each program owns one output tile and runs the
    whole K-loop in order: deterministic, no atomics."""
    pid = tl.program_id(0)
    n_m = (M + BM - 1) // BM
    n_n = (NC + BN - 1) // BN
    per_group = GROUP_M * n_n
    first = (pid // per_group) * GROUP_M
    gsize = tl.minimum(n_m - first, GROUP_M)
    pid_m = first + (pid % per_group) % gsize
    pid_n = (pid % per_group) // gsize
    ml = tl.arange(0, BM)
    rm = pid_m * BM + ml
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask = (rm < M)[:, None]
    nmask = (rn < NC)[None, :]
    # int64 scalar bases, int32 offsets inside the tiles (contiguity stays visible to the compiler)
    m0 = (pid_m * BM).to(tl.int64)
    a_ptrs = A + m0 * s_am + (ml * s_am)[:, None] + (rk * s_ak)[None, :]
    b_ptrs = B + (rk * s_bk)[:, None] + rn[None, :]
    acc = tl.full([BM, BN], 0.0, tl.float32)
    # whole BK steps with masks constant along k (vectorized, pipelined loads), then one masked tail step
    k_full = K - K % BK
    for k0 in range(0, k_full, BK):
        a = tl.load(a_ptrs + tl.cast(k0, tl.int64) * s_ak, mask=mmask, other=0.0)
        b = tl.load(b_ptrs + tl.cast(k0, tl.int64) * s_bk, mask=nmask, other=0.0)
        acc = tl.dot(a.to(CD), b.to(CD), acc, input_precision=PREC)
    if k_full < K:
        k_ok = rk < K - k_full
        a = tl.load(a_ptrs + tl.cast(k_full, tl.int64) * s_ak, mask=mmask & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + tl.cast(k_full, tl.int64) * s_bk, mask=k_ok[:, None] & nmask, other=0.0)
        acc = tl.dot(a.to(CD), b.to(CD), acc, input_precision=PREC)
    acc = acc * alpha
    mask = mmask & nmask
    if ACCUM:
        acc += tl.load(CIN + m0 * s_cin + (ml * s_cin)[:, None] + rn[None, :], mask=mask, other=0.0)
    tl.store(C + m0 * s_cm + (ml * s_cm)[:, None] + rn[None, :], acc.to(C.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------------------------------------------
# The backend interface
# -----------------------------------------------------------------------------------------------------------------

def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the dot products read: the inputs' when they agree (fp32 when they differ); bf16 is computed in
    fp32 under the interpreter."""
    dt = hidden.dtype if hidden.dtype == weight.dtype else torch.float32
    if dt == torch.bfloat16 and INTERPRETED:
        return torch.float32
    return dt


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _prec(cd: torch.dtype) -> str:
    return "ieee" if cd == torch.float32 else "tf32"  # only fp32 x fp32 dots read it: IEEE, not tf32


def _check(hidden: torch.Tensor, weight: torch.Tensor):
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.dtype not in DTYPES:
            raise TypeError(f"triton logprob_entropy: {name} dtype {x.dtype} not supported (fp16, bf16, fp32); "
                            "use backend='reference' for float64")


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    if x.stride(0) >= 1 << 23:  # tile offsets are int32: up to 256 rows x stride
        raise ValueError(f"triton logprob_entropy: row stride {x.stride(0)} too large (< 2^23 elements)")
    return x


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _splits(n_row_blocks: int, n_vtiles: int, device: torch.device) -> tuple[int, int]:
    """(number of vocabulary splits, tiles per split) of the forward; no split is empty."""
    if INTERPRETED:
        want = INTERPRETER_SPLITS
    else:
        want = triton.cdiv(SPLIT_TARGET_PROGRAMS * _num_sms(device), n_row_blocks)
    want = max(1, min(want, n_vtiles))
    tps = triton.cdiv(n_vtiles, want)
    return triton.cdiv(n_vtiles, tps), tps


def _on_device(dev: torch.device):
    """Launch on the tensors' GPU, whatever the current device is."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def forward(hidden, weight, targets, temperature):
    with _on_device(hidden.device):
        return _forward(hidden, weight, targets, temperature)


def backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight):
    with _on_device(hidden.device):
        return _backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight)


def _forward(hidden, weight, targets, temperature):
    _check(hidden, weight)
    hidden, weight = _rowmajor(hidden), _rowmajor(weight)
    targets = targets.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.empty(3, N, dtype=torch.float32, device=dev)
    if N == 0:
        return logp, ent, stats
    cd = _compute_dtype(hidden, weight)
    t = config_for(H, cd, N, V).fwd
    n_rb, n_vt = triton.cdiv(N, t.BLOCK_N), triton.cdiv(V, t.BLOCK_V)
    n_splits, tps = _splits(n_rb, n_vt, dev)
    part = torch.empty(4, n_splits, N, dtype=torch.float32, device=dev)
    _fwd_kernel[(n_rb, n_splits)](hidden, weight, targets, part, N, V, H, hidden.stride(0), weight.stride(0),
                                  1.0 / float(temperature), tps, n_vt, t.BLOCK_N, t.BLOCK_V, t.BLOCK_H,
                                  H % t.BLOCK_H == 0, _TL[cd], _prec(cd), num_warps=t.num_warps,
                                  num_stages=t.num_stages)
    blk = 256
    _combine_kernel[(triton.cdiv(N, blk),)](part, logp, ent, stats, N, n_splits, blk, num_warps=4)
    return logp, ent, stats


def chunk_bytes() -> int:
    return INTERPRETER_CHUNK_BYTES if INTERPRETED else CHUNK_BYTES


def plan_chunks(N: int, V: int, elt: int, cfg: Config, budget: int | None = None, axis: str | None = None):
    """The dz chunks of the backward: (axis, [(r0, R, c0, C), ...]). One chunk when dz [N, V] fits the budget;
    else slabs of rows ("row") or vocabulary columns ("vocab"), whole tiles, each within the budget."""
    budget = chunk_bytes() if budget is None else budget
    axis = axis or CHUNK_AXIS
    if axis is None and N * V * elt <= budget:
        return "row", [(0, N, 0, V)]
    axis = axis or ("vocab" if N < V else "row")
    if axis == "row":
        step = max(cfg.dz.BLOCK_N, cfg.dh.BM)
        R = max(step, budget // max(1, V * elt) // step * step)
        return axis, [(r0, min(R, N - r0), 0, V) for r0 in range(0, N, R)]
    step = max(cfg.dz.BLOCK_V, cfg.dw.BM)
    C = max(step, budget // max(1, N * elt) // step * step)
    return axis, [(0, N, c0, min(C, V - c0)) for c0 in range(0, V, C)]


def _gemm(a, a_strides, b, c, cin, M, NC, K, alpha, g: Gemm, cd):
    grid = (triton.cdiv(M, g.BM) * triton.cdiv(NC, g.BN),)
    assert b.stride(1) == 1 and c.stride(1) == 1 and (cin is None or cin.stride(1) == 1)
    _gemm_kernel[grid](a, b, c, c if cin is None else cin, M, NC, K, a_strides[0], a_strides[1], b.stride(0),
                       c.stride(0), c.stride(0) if cin is None else cin.stride(0), alpha,
                       g.BM, g.BN, g.BK, g.GROUP_M, _TL[cd], _prec(cd), cin is not None,
                       num_warps=g.num_warps, num_stages=g.num_stages)


class _Accumulator:
    """A gradient [L, H] written chunk by chunk: either each chunk writes its own rows once (`split=True`: the
    chunks partition L), or every chunk adds into all rows (`split=False`: the chunks partition the reduction axis)
    -- then the sum runs in fp32, in the output itself when it is fp32, else in a fp32 scratch that the last chunk
    reads and writes out in the output dtype."""

    def __init__(self, out: torch.Tensor, n_chunks: int, split: bool):
        self.out, self.n, self.split = out, n_chunks, split
        self.acc = out if (split or n_chunks == 1 or out.dtype == torch.float32) else \
            torch.empty(out.shape, dtype=torch.float32, device=out.device)

    def target(self, i: int, lo: int, n: int):
        """(c, cin) views of rows [lo, lo + n) for chunk i: where to write, and what to add (None: nothing)."""
        if self.split:
            return self.out[lo:lo + n], None
        c = (self.out if i == self.n - 1 else self.acc)[lo:lo + n]
        return c, (None if i == 0 else self.acc[lo:lo + n])


def _backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight):
    _check(hidden, weight)
    if not (need_hidden or need_weight):
        return None, None
    hidden, weight = _rowmajor(hidden), _rowmajor(weight)
    targets = targets.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    if N == 0 or (g_logp is None and g_ent is None):
        return (None if d_hidden is None else d_hidden.zero_()), (None if d_weight is None else d_weight.zero_())
    zeros = torch.zeros(N, dtype=torch.float32, device=dev)
    gl = zeros if g_logp is None else g_logp.to(torch.float32).contiguous()
    ge = zeros if g_ent is None else g_ent.to(torch.float32).contiguous()
    cd = _compute_dtype(hidden, weight)
    cfg = config_for(H, cd, N, V)
    t = cfg.dz
    inv_tau = 1.0 / float(temperature)
    axis, chunks = plan_chunks(N, V, torch.finfo(cd).bits // 8, cfg)
    R_max = max(c[1] for c in chunks)
    ld = triton.cdiv(max(c[3] for c in chunks), 16) * 16  # dz rows padded to 16 elements: aligned, vector loads
    dz = torch.empty(R_max * ld, dtype=cd, device=dev)
    acc_h = _Accumulator(d_hidden, len(chunks), split=axis == "row") if need_hidden else None
    acc_w = _Accumulator(d_weight, len(chunks), split=axis == "vocab") if need_weight else None
    for i, (r0, R, c0, C) in enumerate(chunks):
        buf = dz[:R * ld].view(R, ld)[:, :C]
        grid = (triton.cdiv(R, t.BLOCK_N) * triton.cdiv(C, t.BLOCK_V),)
        _dz_kernel[grid](hidden, weight, targets, stats, gl, ge, buf, N, V, H, r0, c0, R, C, hidden.stride(0),
                         weight.stride(0), buf.stride(0), inv_tau, t.BLOCK_N, t.BLOCK_V, t.BLOCK_H,
                         H % t.BLOCK_H == 0, 8, _TL[cd], _prec(cd), num_warps=t.num_warps, num_stages=t.num_stages)
        if need_hidden:  # d_hidden[rows] (+)= dz @ W[cols] / tau
            c, cin = acc_h.target(i, r0, R)
            w = weight[c0:c0 + C]
            _gemm(buf, (buf.stride(0), 1), w, c, cin, R, H, C, inv_tau, cfg.dh, cd)
        if need_weight:  # d_weight[cols] (+)= dz^T @ h[rows] / tau
            c, cin = acc_w.target(i, c0, C)
            x = hidden[r0:r0 + R]
            _gemm(buf, (1, buf.stride(0)), x, c, cin, C, H, R, inv_tau, cfg.dw, cd)
    return d_hidden, d_weight
