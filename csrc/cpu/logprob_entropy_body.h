// Row kernels of logprob_entropy (csrc/cpu/logprob_entropy.cpp), included once per ISA inside namespace
// mem1_fast::lpe::<isa> with VF (float lanes, csrc/include/mem1_fast/simd.h). The scalar tails use the generic
// kernels. No include guard: it is meant to be included several times.


static float row_max(const float* z, int64_t n) {
  constexpr int W = VF::W;
  typename VF::reg m0 = VF::set1(-std::numeric_limits<float>::infinity()), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    m0 = VF::max(m0, VF::load(z + i));
    m1 = VF::max(m1, VF::load(z + i + W));
    m2 = VF::max(m2, VF::load(z + i + 2 * W));
    m3 = VF::max(m3, VF::load(z + i + 3 * W));
  }
  for (; i + W <= n; i += W) m0 = VF::max(m0, VF::load(z + i));
  float m = VF::hmax(VF::max(VF::max(m0, m1), VF::max(m2, m3)));
  for (; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

static void row_sum_exp(const float* z, int64_t n, float m, double* s_out, double* sd_out) {
  constexpr int W = VF::W;
  const typename VF::reg L = VF::set1(kLog2ef), vm = VF::set1(m);
  double s = 0, sd = 0;
  const int64_t nv = n / (2 * W) * (2 * W);
  for (int64_t b = 0; b < nv; b += kSumBlock) {
    const int64_t e = std::min(nv, b + kSumBlock);
    typename VF::reg s0 = VF::zero(), s1 = s0, d0 = s0, d1 = s0;
    for (int64_t i = b; i < e; i += 2 * W) {
      const typename VF::reg x0 = VF::sub(VF::load(z + i), vm);
      const typename VF::reg x1 = VF::sub(VF::load(z + i + W), vm);
      const typename VF::reg e0 = VF::exp2(VF::mul(x0, L));
      const typename VF::reg e1 = VF::exp2(VF::mul(x1, L));
      s0 = VF::add(s0, e0);
      s1 = VF::add(s1, e1);
      d0 = VF::fmadd(e0, x0, d0);
      d1 = VF::fmadd(e1, x1, d1);
    }
    s += VF::hsum(VF::add(s0, s1));
    sd += VF::hsum(VF::add(d0, d1));
  }
  double ts = 0, tsd = 0;
  generic::row_sum_exp<float>(z + nv, n - nv, m, &ts, &tsd);
  *s_out = s + ts;
  *sd_out = sd + tsd;
}

static void row_grad(float* z, int64_t n, float lse, float ez, float gl, float ge) {
  constexpr int W = VF::W;
  const typename VF::reg L = VF::set1(kLog2ef), vl = VF::set1(lse), vez = VF::set1(ez), vgl = VF::set1(gl),
                         vge = VF::set1(ge);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const typename VF::reg x = VF::load(z + i);
    const typename VF::reg p = VF::exp2(VF::mul(VF::sub(x, vl), L));
    VF::store(z + i, VF::mul(p, VF::fmsub(vge, VF::sub(vez, x), vgl)));  // p * (ge (ez - z) - gl)
  }
  generic::row_grad<float>(z + i, n - i, lse, ez, gl, ge);
}

static RowFns<float> fns() { return {&row_max, &row_sum_exp, &row_grad, MEM1_LPE_ISA_NAME}; }
