// mem1_fast CUDA extension (mem1_fast._C_cuda): the torch binding of the raw launchers of state_attention.cu and
// logprob_entropy.cu.
//
// Built only on CUDA builds of torch (setup.py); it is never compiled against the CPU torch. Ops, called as
// torch.ops.mem1_fast.<name> once `mem1_fast._C_cuda` is imported (mem1_fast/ops/_cuda_state_attention.py does that):
//
//   state_attention_cuda_fwd(q, k, v, lo, hi, partial_ptr, partial_idx, full_ptr, full_idx, scale, BM, BN)
//       -> (out [T, Hq, D] in q's dtype, lse float32 [Hq, T])
//   state_attention_cuda_bwd(dout, q, k, v, out, lse, lo, hi, <block map>, <transposed block map>, scale, BM, BN)
//       -> (dq, dk, dv) in the input dtype
//   logprob_entropy_cuda_fwd(hidden [N, H], weight [V, H], targets int64 [N], temperature)
//       -> (logp float32 [N], entropy float32 [N], stats float32 [3, N] = (m, logs, mean_d))
//       (hidden and weight share a dtype: fp16, bf16 or fp32; the Triton backward consumes `stats`)
//
// q [T, Hq, D], k / v [T, Hkv, D] (fp16 or bf16, D in {64, 128}, Hq % Hkv == 0), lo / hi int32 [T, K], the block
// map of Visibility.block_map(BM, BN) and its transpose (BlockMap.transpose()), all on one CUDA device. Inputs
// whose head dim is not contiguous, whose token / head strides are not multiples of 8 or whose data is not 16-byte
// aligned are copied first. Kernels run on the current stream of that device: c10::cuda::getCurrentCUDAStream(),
// the function at::cuda::getCurrentCUDAStream() names (the c10 header keeps the cuBLAS / cuSPARSE headers of
// ATen/cuda/CUDAContext.h out of this file). The schemas are declared here, as a fragment of the mem1_fast
// library, so csrc/bindings.cpp (the CPU extension) needs no change.
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "logprob_entropy.cuh"
#include "state_attention.cuh"

namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mem1_fast ", what, " failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (arguments rejected by the launcher, see state_attention.cuh)" : "");
}

// The kernels move 16-byte chunks: head dim contiguous, token / head strides multiples of 8 elements, data 16-byte
// aligned. Anything else is copied into a fresh contiguous tensor (which satisfies all three for D % 8 == 0).
at::Tensor tile_ready(const at::Tensor& t) {
  const bool ok = t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "state_attention_cuda: q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "state_attention_cuda: q, k, v must be [T, H, D]");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "state_attention_cuda: fp16 or bf16 inputs only, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "state_attention_cuda: q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "state_attention_cuda: k and v must be [T, Hkv, D] matching q [T, Hq, D]");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "state_attention_cuda: head dim must be 64 or 128, got ",
              q.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "state_attention_cuda: query heads must be a multiple of key/value heads");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "state_attention_cuda: q, k, v on one device");
}

const int32_t* int32_ptr(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.device() == q.device(), "state_attention_cuda: ",
              name, " must be a contiguous int32 tensor on ", q.device());
  return t.data_ptr<int32_t>();
}

template <class P>
void set_view(const at::Tensor& t, P& ptr, int64_t& stride_t, int64_t& stride_h) {
  ptr = static_cast<P>(t.data_ptr());
  stride_t = t.stride(0);
  stride_h = t.stride(1);
}

void fill_common(Mem1StateAttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& partial_ptr,
                 const at::Tensor& partial_idx, const at::Tensor& full_ptr, const at::Tensor& full_idx, double scale,
                 int64_t BM, int64_t BN) {
  set_view(q, p.q, p.q_stride_t, p.q_stride_h);
  set_view(k, p.k, p.k_stride_t, p.k_stride_h);
  set_view(v, p.v, p.v_stride_t, p.v_stride_h);
  p.T = q.size(0);
  p.Hq = q.size(1);
  p.Hkv = k.size(1);
  p.D = q.size(2);
  TORCH_CHECK(lo.dim() == 2 && lo.sizes() == hi.sizes() && lo.size(0) == p.T,
              "state_attention_cuda: lo / hi must be [T, K]");
  p.lo = int32_ptr(lo, q, "lo");
  p.hi = int32_ptr(hi, q, "hi");
  p.K = lo.size(1);
  const int64_t nQ = (p.T + BM - 1) / BM;
  TORCH_CHECK(partial_ptr.numel() == nQ + 1 && full_ptr.numel() == nQ + 1,
              "state_attention_cuda: block map built for other tile sizes than (", BM, ", ", BN, ")");
  p.partial_ptr = int32_ptr(partial_ptr, q, "partial_ptr");
  p.partial_idx = int32_ptr(partial_idx, q, "partial_idx");
  p.full_ptr = int32_ptr(full_ptr, q, "full_ptr");
  p.full_idx = int32_ptr(full_idx, q, "full_idx");
  p.BM = BM;
  p.BN = BN;
  p.scale = scale;
}

std::tuple<at::Tensor, at::Tensor> state_attention_cuda_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                            const at::Tensor& v_, const at::Tensor& lo,
                                                            const at::Tensor& hi, const at::Tensor& partial_ptr,
                                                            const at::Tensor& partial_idx, const at::Tensor& full_ptr,
                                                            const at::Tensor& full_idx, double scale, int64_t BM,
                                                            int64_t BN) {
  check_heads(q_, k_, v_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = tile_ready(q_), k = tile_ready(k_), v = tile_ready(v_);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  Mem1StateAttnParams p{};
  fill_common(p, q, k, v, lo, hi, partial_ptr, partial_idx, full_ptr, full_idx, scale, BM, BN);
  set_view(out, p.out, p.out_stride_t, p.out_stride_h);
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  check_launch(q.scalar_type() == at::kHalf ? mem1_state_attention_fwd_f16(&p, stream)
                                            : mem1_state_attention_fwd_bf16(&p, stream),
               "state_attention_cuda_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> state_attention_cuda_bwd(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& lo, const at::Tensor& hi,
    const at::Tensor& partial_ptr, const at::Tensor& partial_idx, const at::Tensor& full_ptr,
    const at::Tensor& full_idx, const at::Tensor& t_partial_ptr, const at::Tensor& t_partial_idx,
    const at::Tensor& t_full_ptr, const at::Tensor& t_full_idx, double scale, int64_t BM, int64_t BN) {
  check_heads(q_, k_, v_);
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes() && dout_.scalar_type() == q_.scalar_type() &&
                  out_.scalar_type() == q_.scalar_type() && dout_.device() == q_.device() &&
                  out_.device() == q_.device(),
              "state_attention_cuda_bwd: dout and out must match q");
  TORCH_CHECK(lse_.scalar_type() == at::kFloat && lse_.dim() == 2 && lse_.size(0) == q_.size(1) &&
                  lse_.size(1) == q_.size(0) && lse_.device() == q_.device(),
              "state_attention_cuda_bwd: lse must be float32 [Hq, T]");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = tile_ready(q_), k = tile_ready(k_), v = tile_ready(v_);
  const at::Tensor dout = tile_ready(dout_), out = tile_ready(out_), lse = lse_.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor workspace = at::empty({2, q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  Mem1StateAttnParams p{};
  fill_common(p, q, k, v, lo, hi, partial_ptr, partial_idx, full_ptr, full_idx, scale, BM, BN);
  const int64_t nK = (p.T + BN - 1) / BN;
  TORCH_CHECK(t_partial_ptr.numel() == nK + 1 && t_full_ptr.numel() == nK + 1,
              "state_attention_cuda_bwd: the transposed block map must be a CSR over the ", nK, " key blocks");
  p.t_partial_ptr = int32_ptr(t_partial_ptr, q, "t_partial_ptr");
  p.t_partial_idx = int32_ptr(t_partial_idx, q, "t_partial_idx");
  p.t_full_ptr = int32_ptr(t_full_ptr, q, "t_full_ptr");
  p.t_full_idx = int32_ptr(t_full_idx, q, "t_full_idx");
  set_view(out, p.out, p.out_stride_t, p.out_stride_h);
  p.lse = lse.data_ptr<float>();  // read only by the backward
  set_view(dout, p.dout, p.dout_stride_t, p.dout_stride_h);
  set_view(dq, p.dq, p.dq_stride_t, p.dq_stride_h);
  set_view(dk, p.dk, p.dk_stride_t, p.dk_stride_h);
  set_view(dv, p.dv, p.dv_stride_t, p.dv_stride_h);
  p.workspace = workspace.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  check_launch(q.scalar_type() == at::kHalf ? mem1_state_attention_bwd_f16(&p, stream)
                                            : mem1_state_attention_bwd_bf16(&p, stream),
               "state_attention_cuda_bwd");
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_entropy_cuda_fwd(const at::Tensor& hidden_,
                                                                     const at::Tensor& weight_,
                                                                     const at::Tensor& targets_, double temperature) {
  TORCH_CHECK(hidden_.is_cuda() && weight_.device() == hidden_.device() && targets_.device() == hidden_.device(),
              "logprob_entropy_cuda_fwd: hidden, weight and targets must be on one CUDA device");
  TORCH_CHECK(hidden_.dim() == 2 && weight_.dim() == 2 && hidden_.size(1) == weight_.size(1),
              "logprob_entropy_cuda_fwd: hidden must be [N, H] and weight [V, H]");
  const auto dt = hidden_.scalar_type();
  TORCH_CHECK(weight_.scalar_type() == dt && (dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat),
              "logprob_entropy_cuda_fwd: hidden and weight must share a dtype among fp16, bf16, fp32");
  TORCH_CHECK(targets_.dim() == 1 && targets_.size(0) == hidden_.size(0) && targets_.scalar_type() == at::kLong,
              "logprob_entropy_cuda_fwd: targets must be int64 [N]");
  TORCH_CHECK(temperature > 0, "logprob_entropy_cuda_fwd: temperature must be > 0");
  TORCH_CHECK(weight_.size(0) > 0, "logprob_entropy_cuda_fwd: empty vocabulary");
  const c10::cuda::CUDAGuard guard(hidden_.device());
  const at::Tensor hidden = hidden_.stride(1) == 1 ? hidden_ : hidden_.contiguous();
  const at::Tensor weight = weight_.stride(1) == 1 ? weight_ : weight_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, f32), entropy = at::empty({N}, f32), stats = at::empty({3, N}, f32);
  if (N == 0) return {logp, entropy, stats};
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, hidden.get_device()),
               "cudaDeviceGetAttribute");
  const int64_t splits = mem1_logprob_entropy_fwd_splits(N, V, sms);
  at::Tensor workspace = at::empty({4, splits, N}, f32);
  Mem1LogprobEntropyFwdParams p{};
  p.hidden = hidden.data_ptr();
  p.stride_hidden = hidden.stride(0);
  p.weight = weight.data_ptr();
  p.stride_weight = weight.stride(0);
  p.targets = targets.data_ptr<int64_t>();
  p.N = N;
  p.V = V;
  p.H = H;
  p.inv_temperature = 1.0 / temperature;
  p.logp = logp.data_ptr<float>();
  p.entropy = entropy.data_ptr<float>();
  p.stats = stats.data_ptr<float>();
  p.workspace = workspace.data_ptr<float>();
  p.splits = splits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dt == at::kHalf       ? mem1_logprob_entropy_fwd_f16(&p, stream)
               : dt == at::kBFloat16 ? mem1_logprob_entropy_fwd_bf16(&p, stream)
                                     : mem1_logprob_entropy_fwd_f32(&p, stream),
               "logprob_entropy_cuda_fwd");
  return {logp, entropy, stats};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mem1_fast, m) {
  m.def("state_attention_cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor lo, Tensor hi, Tensor partial_ptr, "
        "Tensor partial_idx, Tensor full_ptr, Tensor full_idx, float scale, int BM, int BN) -> (Tensor, Tensor)");
  m.def("state_attention_cuda_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor lo, "
        "Tensor hi, Tensor partial_ptr, Tensor partial_idx, Tensor full_ptr, Tensor full_idx, Tensor t_partial_ptr, "
        "Tensor t_partial_idx, Tensor t_full_ptr, Tensor t_full_idx, float scale, int BM, int BN) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("logprob_entropy_cuda_fwd(Tensor hidden, Tensor weight, Tensor targets, float temperature) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mem1_fast, CUDA, m) {
  m.impl("state_attention_cuda_fwd", &state_attention_cuda_fwd);
  m.impl("state_attention_cuda_bwd", &state_attention_cuda_bwd);
  m.impl("logprob_entropy_cuda_fwd", &logprob_entropy_cuda_fwd);
}

// The Python module is empty: importing it runs the registrations above (same pattern as csrc/bindings.cpp).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cuda
#endif
#define MEM1_CUDA_STR_(x) #x
#define MEM1_CUDA_STR(x) MEM1_CUDA_STR_(x)
#define MEM1_CUDA_CAT_(a, b) a##b
#define MEM1_CUDA_CAT(a, b) MEM1_CUDA_CAT_(a, b)

extern "C" {
PyMODINIT_FUNC MEM1_CUDA_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      MEM1_CUDA_STR(TORCH_EXTENSION_NAME), /* m_name */
      "mem1_fast CUDA ops (registered under torch.ops.mem1_fast)", /* m_doc */
      -1, /* m_size */
      nullptr, /* m_methods */
  };
  return PyModule_Create(&module_def);
}
}
