// Kernel body of state_attention (csrc/cpu/state_attention.cpp), included once per ISA inside namespace
// mem1_fast::sa::<isa> with VF (float vector ops of csrc/include/mem1_fast/simd.h plus the micro-kernel shape
// MR x NV; VD too for the generic one) defined. No torch, no lambdas, no std containers here: only plain code on
// raw pointers. No include guard: it is meant to be included several times.


template <class V>
struct Kern {
  using T = typename V::T;
  using reg = typename V::reg;
  static constexpr int W = V::W;
  using MkFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, bool);

  // C[MR, NV*W] (+)= sum_k A[r*ars + k*acs] * B[k*ldb + c]: accumulators in registers, A broadcast, B rows loaded.
  template <int MR, int NV>
  static void mk(int64_t K, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb, T* C, int64_t ldc,
                 bool accumulate) {
    reg c[MR][NV];
    if (accumulate) {
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NV; ++j) c[r][j] = V::load(C + r * ldc + j * W);
    } else {
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NV; ++j) c[r][j] = V::zero();
    }
    const T* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = A + r * ars;
    for (int64_t k = 0; k < K; ++k) {
      reg b[NV];
      for (int j = 0; j < NV; ++j) b[j] = V::load(B + j * W);
      for (int r = 0; r < MR; ++r) {
        const reg x = V::set1(*a[r]);
        for (int j = 0; j < NV; ++j) c[r][j] = V::fmadd(x, b[j], c[r][j]);
        a[r] += acs;
      }
      B += ldb;
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) V::store(C + r * ldc + j * W, c[r][j]);
  }

  template <int MR>
  static MkFn pick_nv(int nv) {
    switch (nv) {
      case 1: return &mk<MR, 1>;
      case 2: return (V::NV >= 2) ? &mk<MR, (V::NV >= 2 ? 2 : 1)> : nullptr;
      case 3: return (V::NV >= 3) ? &mk<MR, (V::NV >= 3 ? 3 : 1)> : nullptr;
      default: return &mk<MR, V::NV>;
    }
  }
  static MkFn pick(int mr, int nv) {
    switch (mr) {
      case 1: return pick_nv<1>(nv);
      case 2: return pick_nv<(V::MR >= 2 ? 2 : 1)>(nv);
      case 3: return pick_nv<(V::MR >= 3 ? 3 : 1)>(nv);
      case 4: return pick_nv<(V::MR >= 4 ? 4 : 1)>(nv);
      case 5: return pick_nv<(V::MR >= 5 ? 5 : 1)>(nv);
      default: return pick_nv<V::MR>(nv);
    }
  }

  // C[M, N] (+)= A[M, K] B[K, N] (A at strides (ars, acs), B rows contiguous at stride ldb, C at stride ldc).
  static void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb,
                   T* C, int64_t ldc, bool accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
      if (!accumulate)
        for (int64_t r = 0; r < M; ++r)
          for (int64_t j = 0; j < N; ++j) C[r * ldc + j] = T(0);
      return;
    }
    const int64_t nvec = N / W;
    for (int64_t j0 = 0; j0 < nvec; j0 += V::NV) {
      const int nv = static_cast<int>(std::min<int64_t>(V::NV, nvec - j0));
      for (int64_t m0 = 0; m0 < M; m0 += V::MR) {
        const int mr = static_cast<int>(std::min<int64_t>(V::MR, M - m0));
        pick(mr, nv)(K, A + m0 * ars, ars, acs, B + j0 * W, ldb, C + m0 * ldc + j0 * W, ldc, accumulate);
      }
    }
    if (W > 1 && nvec * W < N) {  // column tail, one lane at a time
      const int64_t n0 = nvec * W;
      Kern<ScalarV<T>>::gemm(M, N - n0, K, A, ars, acs, B + n0, ldb, C + n0, ldc, accumulate);
    }
  }

  // Tiles of block b: partial and full lists merged in ascending order.
  struct Tiles {
    const int32_t *pidx, *fidx;
    int32_t a, ae, c, ce;
    Tiles(const int32_t* pptr, const int32_t* pidx_, const int32_t* fptr, const int32_t* fidx_, int64_t b)
        : pidx(pidx_), fidx(fidx_), a(pptr[b]), ae(pptr[b + 1]), c(fptr[b]), ce(fptr[b + 1]) {}
    bool next(int64_t* blk, bool* partial) {
      if (a < ae && (c >= ce || pidx[a] < fidx[c])) {
        *blk = pidx[a++];
        *partial = true;
        return true;
      }
      if (c < ce) {
        *blk = fidx[c++];
        *partial = false;
        return true;
      }
      return false;
    }
  };

  static MEM1_INLINE T neg_inf() { return -std::numeric_limits<T>::infinity(); }

  // Ask for rows [0, n) (stride rs elements, D each) to be brought into L2 while the current tile computes.
  static MEM1_INLINE void prefetch_rows(const T* X, int64_t rs, int64_t n, int64_t D) {
    constexpr int64_t line = 64 / sizeof(T);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; d += line) __builtin_prefetch(X + j * rs + d, 0, 2);
  }

  // Pack X[i, :] (rows i < m at stride rs) transposed into Xt[d * ld + i]; lanes m .. ld are zero.
  static void pack_t(const T* X, int64_t rs, int64_t m, int64_t D, T* Xt, int64_t ld) {
    for (int64_t d = 0; d < D; ++d) {
      T* dst = Xt + d * ld;
      for (int64_t i = m; i < ld; ++i) dst[i] = T(0);
    }
    for (int64_t i = 0; i < m; ++i) {
      const T* src = X + i * rs;
      for (int64_t d = 0; d < D; ++d) Xt[d * ld + i] = src[d];
    }
  }

  // Per-lane intervals of query rows r0 .. r0+m (lanes m .. BMp: empty), as lot[k * BMp + i], hit[...].
  static void pack_intervals(const Args<T>& a, int64_t r0, int64_t m, int32_t* lot, int32_t* hit) {
    for (int64_t k = 0; k < a.K; ++k) {
      for (int64_t i = 0; i < a.BMp; ++i) {
        const bool in = i < m;
        lot[k * a.BMp + i] = in ? a.lo[(r0 + i) * a.K + k] : 0;
        hit[k * a.BMp + i] = in ? a.hi[(r0 + i) * a.K + k] : 0;
      }
    }
  }

  // Scores are computed unscaled (q . k, the same sums in every pass, so the passes agree bit for bit) and scaled
  // to base 2 here, right after the GEMM; masked entries become -inf after scaling, whatever the sign of the scale.
  // ST[j * BMp + i]: key c0 + j (rows j < n), query lane i.
  static void scale_mask_keys_by_lanes(const Args<T>& a, T* ST, int64_t n, int64_t c0, const int32_t* lot,
                                       const int32_t* hit, bool partial) {
    const int64_t BMp = a.BMp;
    const reg sc = V::set1(a.scale2);
    const reg ninf = V::set1(neg_inf());
    for (int64_t j = 0; j < n; ++j) {
      T* row = ST + j * BMp;
      if (!partial) {
        for (int64_t i = 0; i < BMp; i += W) V::store(row + i, V::mul(V::load(row + i), sc));
        continue;
      }
      const typename V::ireg c = V::iset1(static_cast<int32_t>(c0 + j));
      for (int64_t i = 0; i < BMp; i += W) {
        typename V::mask vis = V::mnone();
        for (int64_t k = 0; k < a.K; ++k) {
          vis = V::mor(vis, V::in_range(c, V::iload(lot + k * BMp + i), V::iload(hit + k * BMp + i)));
        }
        V::store(row + i, V::select(vis, V::mul(V::load(row + i), sc), ninf));
      }
    }
  }

  // S[i * BNp + j]: query r0 + i (rows i < m), key lane j = c0 + j (lanes past the last key, c0 + j >= T, are never
  // visible since hi <= T).
  static void scale_mask_lanes_by_queries(const Args<T>& a, T* S, int64_t m, int64_t r0, int64_t c0, bool masked) {
    const int64_t BNp = a.BNp;
    const reg sc = V::set1(a.scale2);
    const reg ninf = V::set1(neg_inf());
    for (int64_t i = 0; i < m; ++i) {
      T* row = S + i * BNp;
      if (!masked) {
        for (int64_t j = 0; j < BNp; j += W) V::store(row + j, V::mul(V::load(row + j), sc));
        continue;
      }
      const int32_t* lo = a.lo + (r0 + i) * a.K;
      const int32_t* hi = a.hi + (r0 + i) * a.K;
      for (int64_t j = 0; j < BNp; j += W) {
        const typename V::ireg c = V::iadd(V::iset1(static_cast<int32_t>(c0 + j)), V::iota());
        typename V::mask vis = V::mnone();
        for (int64_t k = 0; k < a.K; ++k) vis = V::mor(vis, V::in_range(c, V::iset1(lo[k]), V::iset1(hi[k])));
        V::store(row + j, V::select(vis, V::mul(V::load(row + j), sc), ninf));
      }
    }
  }

  // lse in base 2 for P = 2^(S2 - lse2); rows with no visible key (lse = -inf) get +inf so that P = 0.
  static MEM1_INLINE T lse2_of(float lse) {
    return lse == -std::numeric_limits<float>::infinity() ? std::numeric_limits<T>::infinity()
                                                           : static_cast<T>(lse) * static_cast<T>(kLog2e);
  }

  // ---------------------------------------------------------------------------------------------------------------
  static void fwd_task(const Args<T>& a, int64_t task, T* ws, int32_t* iws) {
    const int64_t qb = task / a.Hq, h = task % a.Hq, hk = h / a.G;
    const int64_t D = a.D, BMp = a.BMp, BNp = a.BNp;
    const int64_t r0 = qb * a.BM, m = std::min(a.BM, a.ntok - r0);
    const int64_t krs = a.Hkv * D;  // token stride of K / V
    T* Qt = ws;                     // [D, BMp]
    T* ST = Qt + D * BMp;           // [BNp, BMp] scores, then probabilities
    T* Ot = ST + BNp * BMp;         // [D, BMp] output accumulator, transposed
    T* mx = Ot + D * BMp;           // [BMp] running max (base 2)
    T* l = mx + BMp;                // [BMp] running sum
    T* alpha = l + BMp;             // [BMp]
    int32_t* lot = iws;
    int32_t* hit = iws + a.K * BMp;

    pack_t(a.q + (r0 * a.Hq + h) * D, a.Hq * D, m, D, Qt, BMp);
    pack_intervals(a, r0, m, lot, hit);
    for (int64_t i = 0; i < BMp; ++i) {
      mx[i] = neg_inf();
      l[i] = T(0);
    }
    for (int64_t i = 0; i < D * BMp; ++i) Ot[i] = T(0);

    Tiles tiles(a.pptr, a.pidx, a.fptr, a.fidx, qb);
    int64_t kb, kb_next;
    bool partial, partial_next;
    bool more = tiles.next(&kb_next, &partial_next);
    while (more) {
      kb = kb_next;
      partial = partial_next;
      more = tiles.next(&kb_next, &partial_next);
      const int64_t c0 = kb * a.BN, n = std::min(a.BN, a.ntok - c0);
      const T* Kb = a.k + (c0 * a.Hkv + hk) * D;
      const T* Vb = a.v + (c0 * a.Hkv + hk) * D;
      const int64_t c1 = more ? kb_next * a.BN : 0, n1 = more ? std::min(a.BN, a.ntok - c1) : 0;
      prefetch_rows(a.k + (c1 * a.Hkv + hk) * D, krs, n1, D);  // next tile's K and V into L2
      gemm(n, BMp, D, Kb, krs, 1, Qt, BMp, ST, BMp, false);     // S^T = K . Q^T  [n, BMp]
      prefetch_rows(a.v + (c1 * a.Hkv + hk) * D, krs, n1, D);
      scale_mask_keys_by_lanes(a, ST, n, c0, lot, hit, partial);
      bool rescale = false;
      for (int64_t i = 0; i < BMp; i += W) {
        reg tm = V::set1(neg_inf());
        for (int64_t j = 0; j < n; ++j) tm = V::max(V::load(ST + j * BMp + i), tm);
        const reg mo = V::load(mx + i);
        const reg mn = V::max(tm, mo);
        const reg base = V::select(V::is_neg_inf(mn), V::zero(), mn);
        const reg al = V::exp2(V::sub(mo, base));
        reg sum = V::zero();
        for (int64_t j = 0; j < n; ++j) {
          const reg p = V::exp2(V::sub(V::load(ST + j * BMp + i), base));
          V::store(ST + j * BMp + i, p);
          sum = V::add(sum, p);
        }
        V::store(mx + i, mn);
        V::store(l + i, V::fmadd(V::load(l + i), al, sum));
        V::store(alpha + i, al);
        rescale = rescale || V::any_nonzero(V::sub(al, V::set1(T(1))));
      }
      if (rescale) {  // Ot[d, i] *= alpha[i]
        for (int64_t d = 0; d < D; ++d) {
          T* row = Ot + d * BMp;
          for (int64_t i = 0; i < BMp; i += W) V::store(row + i, V::mul(V::load(row + i), V::load(alpha + i)));
        }
      }
      gemm(D, BMp, n, Vb, 1, krs, ST, BMp, Ot, BMp, true);  // O^T += V^T . P^T
    }
    for (int64_t i = 0; i < m; ++i) {
      T* dst = a.out + ((r0 + i) * a.Hq + h) * D;
      const T li = l[i];
      if (li > T(0)) {
        const T inv = T(1) / li;
        for (int64_t d = 0; d < D; ++d) dst[d] = Ot[d * BMp + i] * inv;
        a.lse[h * a.ntok + r0 + i] = static_cast<float>((mx[i] + std::log2(li)) * static_cast<T>(kLn2));
      } else if (!(li == T(0))) {  // NaN (from NaN in q): propagate
        for (int64_t d = 0; d < D; ++d) dst[d] = std::numeric_limits<T>::quiet_NaN();
        a.lse[h * a.ntok + r0 + i] = std::numeric_limits<float>::quiet_NaN();
      }  // else no visible key: out stays 0, lse stays -inf
    }
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Two-pass backward, pass 1: dQ for one (query block, head).
  static void dq_task(const Args<T>& a, int64_t task, T* ws, int32_t* iws) {
    const int64_t qb = task / a.Hq, h = task % a.Hq, hk = h / a.G;
    const int64_t D = a.D, BMp = a.BMp, BNp = a.BNp;
    const int64_t r0 = qb * a.BM, m = std::min(a.BM, a.ntok - r0);
    const int64_t krs = a.Hkv * D;
    T* Qt = ws;                // [D, BMp]
    T* dOt = Qt + D * BMp;     // [D, BMp]
    T* PT = dOt + D * BMp;     // [BNp, BMp]
    T* dPT = PT + BNp * BMp;   // [BNp, BMp], then dS^T
    T* dQt = dPT + BNp * BMp;  // [D, BMp] dQ accumulator, transposed
    T* l2 = dQt + D * BMp;     // [BMp] lse in base 2 (+inf: no visible key / padding lane)
    T* dl = l2 + BMp;          // [BMp] Delta
    int32_t* lot = iws;
    int32_t* hit = iws + a.K * BMp;

    pack_t(a.q + (r0 * a.Hq + h) * D, a.Hq * D, m, D, Qt, BMp);
    pack_t(a.dout + (r0 * a.Hq + h) * D, a.Hq * D, m, D, dOt, BMp);
    pack_intervals(a, r0, m, lot, hit);
    for (int64_t i = 0; i < BMp; ++i) {
      l2[i] = i < m ? lse2_of(a.lse_in[h * a.ntok + r0 + i]) : std::numeric_limits<T>::infinity();
      dl[i] = i < m ? a.delta[h * a.ntok + r0 + i] : T(0);
    }
    for (int64_t i = 0; i < D * BMp; ++i) dQt[i] = T(0);

    Tiles tiles(a.pptr, a.pidx, a.fptr, a.fidx, qb);
    int64_t kb, kb_next;
    bool partial, partial_next;
    bool more = tiles.next(&kb_next, &partial_next);
    while (more) {
      kb = kb_next;
      partial = partial_next;
      more = tiles.next(&kb_next, &partial_next);
      const int64_t c0 = kb * a.BN, n = std::min(a.BN, a.ntok - c0);
      const T* Kb = a.k + (c0 * a.Hkv + hk) * D;
      const T* Vb = a.v + (c0 * a.Hkv + hk) * D;
      const int64_t c1 = more ? kb_next * a.BN : 0, n1 = more ? std::min(a.BN, a.ntok - c1) : 0;
      prefetch_rows(a.k + (c1 * a.Hkv + hk) * D, krs, n1, D);
      gemm(n, BMp, D, Kb, krs, 1, Qt, BMp, PT, BMp, false);   // S^T
      prefetch_rows(a.v + (c1 * a.Hkv + hk) * D, krs, n1, D);
      gemm(n, BMp, D, Vb, krs, 1, dOt, BMp, dPT, BMp, false);  // dP^T = V . dO^T
      scale_mask_keys_by_lanes(a, PT, n, c0, lot, hit, partial);
      for (int64_t i = 0; i < BMp; i += W) {
        const reg lv = V::load(l2 + i);
        const reg dv = V::load(dl + i);
        for (int64_t j = 0; j < n; ++j) {
          const reg p = V::exp2(V::sub(V::load(PT + j * BMp + i), lv));
          V::store(dPT + j * BMp + i, V::mul(p, V::sub(V::load(dPT + j * BMp + i), dv)));
        }
      }
      gemm(D, BMp, n, Kb, 1, krs, dPT, BMp, dQt, BMp, true);  // dQ^T += K^T . dS^T
    }
    for (int64_t i = 0; i < m; ++i) {
      T* dst = a.dq + ((r0 + i) * a.Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = dQt[d * BMp + i] * a.scale;
    }
  }

  // dK / dV of key block kb (kv head hk) over every listed (query head of the group, query block), accumulated in
  // dKt / dVt; with dqa != nullptr (fused schedule) also dQ += dS . K into dqa (rows of a.Hq * a.Dq, zero on entry).
  static void dkdv_block(const Args<T>& a, int64_t kb, int64_t hk, T* ws, T* dqa) {
    const int64_t D = a.D, BMp = a.BMp, BNp = a.BNp, Dq = a.Dq;
    const int64_t c0 = kb * a.BN, n = std::min(a.BN, a.ntok - c0);
    const int64_t qrs = a.Hq * D, krs = a.Hkv * D;
    T* Kt = ws;                // [D, BNp]
    T* Vt = Kt + D * BNp;      // [D, BNp]
    T* P = Vt + D * BNp;       // [BMp, BNp]
    T* dP = P + BMp * BNp;     // [BMp, BNp], then dS
    T* dKt = dP + BMp * BNp;   // [D, BNp] accumulators, transposed
    T* dVt = dKt + D * BNp;    // [D, BNp]
    T* Kn = dVt + D * BNp;     // [BNp, Dq] the K tile, rows contiguous, zero padded (fused schedule only)

    const T* Kb = a.k + (c0 * a.Hkv + hk) * D;
    pack_t(Kb, krs, n, D, Kt, BNp);
    pack_t(a.v + (c0 * a.Hkv + hk) * D, krs, n, D, Vt, BNp);
    if (dqa != nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t d = 0; d < D; ++d) Kn[j * Dq + d] = Kb[j * krs + d];
        for (int64_t d = D; d < Dq; ++d) Kn[j * Dq + d] = T(0);
      }
    }
    for (int64_t i = 0; i < D * BNp; ++i) {
      dKt[i] = T(0);
      dVt[i] = T(0);
    }
    const bool clipped = n < BNp;
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t h = hk * a.G + g;
      Tiles tiles(a.tpptr, a.tpidx, a.tfptr, a.tfidx, kb);
      int64_t qb, qb_next;
      bool partial, partial_next;
      bool more = tiles.next(&qb_next, &partial_next);
      while (more) {
        qb = qb_next;
        partial = partial_next;
        more = tiles.next(&qb_next, &partial_next);
        const int64_t r0 = qb * a.BM, m = std::min(a.BM, a.ntok - r0);
        const T* Qb = a.q + (r0 * a.Hq + h) * D;
        const T* dOb = a.dout + (r0 * a.Hq + h) * D;
        const int64_t r1 = more ? qb_next * a.BM : 0, m1 = more ? std::min(a.BM, a.ntok - r1) : 0;
        prefetch_rows(a.q + (r1 * a.Hq + h) * D, qrs, m1, D);
        gemm(m, BNp, D, Qb, qrs, 1, Kt, BNp, P, BNp, false);    // S = Q . K^T   [m, BNp]
        prefetch_rows(a.dout + (r1 * a.Hq + h) * D, qrs, m1, D);
        gemm(m, BNp, D, dOb, qrs, 1, Vt, BNp, dP, BNp, false);  // dP = dO . V^T
        scale_mask_lanes_by_queries(a, P, m, r0, c0, partial || clipped);
        for (int64_t i = 0; i < m; ++i) {
          const reg lv = V::set1(lse2_of(a.lse_in[h * a.ntok + r0 + i]));
          const reg dv = V::set1(a.delta[h * a.ntok + r0 + i]);
          T* prow = P + i * BNp;
          T* drow = dP + i * BNp;
          for (int64_t j = 0; j < BNp; j += W) {
            const reg p = V::exp2(V::sub(V::load(prow + j), lv));
            V::store(prow + j, p);
            V::store(drow + j, V::mul(p, V::sub(V::load(drow + j), dv)));
          }
        }
        gemm(D, BNp, m, dOb, 1, qrs, P, BNp, dVt, BNp, true);  // dV^T += dO^T . P
        gemm(D, BNp, m, Qb, 1, qrs, dP, BNp, dKt, BNp, true);  // dK^T += Q^T . dS
        if (dqa != nullptr) {  // dQ += dS . K: the same products, in the same order, as dq_task's dQ^T += K^T dS^T
          gemm(m, Dq, n, dP, BNp, 1, Kn, Dq, dqa + (r0 * a.Hq + h) * Dq, a.Hq * Dq, true);
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      T* dk = a.dk + ((c0 + j) * a.Hkv + hk) * D;
      T* dv = a.dv + ((c0 + j) * a.Hkv + hk) * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = dKt[d * BNp + j] * a.scale;
        dv[d] = dVt[d * BNp + j];
      }
    }
  }

  // Two-pass backward, pass 2: dK, dV for one (key block, kv head).
  static void dkdv_task(const Args<T>& a, int64_t task, T* ws, int32_t*) {
    dkdv_block(a, task / a.Hkv, task % a.Hkv, ws, nullptr);
  }

  // Fused backward, one task per kv head: key blocks in ascending order as in dkdv_task, plus dQ accumulated in
  // a.dqa in the order dq_task uses (key blocks ascending), so both schedules give bit-identical gradients.
  static void fused_task(const Args<T>& a, int64_t hk, T* ws, int32_t*) {
    for (int64_t kb = 0; kb < a.nK; ++kb) {
      if (a.tpptr[kb] == a.tpptr[kb + 1] && a.tfptr[kb] == a.tfptr[kb + 1]) continue;
      dkdv_block(a, kb, hk, ws, a.dqa);
    }
    for (int64_t p = 0; p < a.ntok; ++p) {
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t h = hk * a.G + g;
        const T* src = a.dqa + (p * a.Hq + h) * a.Dq;
        T* dst = a.dq + (p * a.Hq + h) * a.D;
        for (int64_t d = 0; d < a.D; ++d) dst[d] = src[d] * a.scale;  // in place when dqa == dq (Dq == D)
      }
    }
  }

  // Delta[h, p] = sum_d dO[p, h, d] * O[p, h, d] for p in [p0, p1).
  static void row_dots(const T* g, const T* o, int64_t p0, int64_t p1, int64_t H, int64_t D, int64_t ntok,
                       T* delta) {
    const int64_t Dv = D / W * W;
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t h = 0; h < H; ++h) {
        const T* x = g + (p * H + h) * D;
        const T* y = o + (p * H + h) * D;
        reg acc = V::zero();
        for (int64_t d = 0; d < Dv; d += W) acc = V::fmadd(V::load(x + d), V::load(y + d), acc);
        T s = V::hsum(acc);
        for (int64_t d = Dv; d < D; ++d) s += x[d] * y[d];
        delta[h * ntok + p] = s;
      }
    }
  }

  // bad[r] = 1 when row r (token * Hkv + head) of k or v holds a non-finite value (x * 0 != 0).
  static void scan_rows(const T* k, const T* v, int64_t r0, int64_t r1, int64_t D, uint8_t* bad) {
    const int64_t Dv = D / W * W;
    const reg z = V::zero();
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = k + r * D;
      const T* y = v + r * D;
      reg acc = V::zero();
      for (int64_t d = 0; d < Dv; d += W) {
        acc = V::add(acc, V::add(V::mul(V::load(x + d), z), V::mul(V::load(y + d), z)));
      }
      bool b = V::any_nonzero(acc);
      for (int64_t d = Dv; d < D; ++d) b = b || !(x[d] * T(0) == T(0)) || !(y[d] * T(0) == T(0));
      bad[r] = b ? 1 : 0;
    }
  }
};

template <class V>
IsaFns<typename V::T> make_fns(const char* name) {
  IsaFns<typename V::T> f;
  f.fwd_task = &Kern<V>::fwd_task;
  f.dq_task = &Kern<V>::dq_task;
  f.dkdv_task = &Kern<V>::dkdv_task;
  f.fused_task = &Kern<V>::fused_task;
  f.row_dots = &Kern<V>::row_dots;
  f.scan_rows = &Kern<V>::scan_rows;
  f.name = name;
  return f;
}

inline IsaFns<float> fns_f32() {
#if defined(MEM1_SA_WITH_DOUBLE)
  return make_fns<VF>("generic");
#else
  return make_fns<VF>(VF::W == 16 ? "avx512" : "avx2");
#endif
}
#if defined(MEM1_SA_WITH_DOUBLE)
inline IsaFns<double> fns_f64() { return make_fns<VD>("generic"); }
#endif
