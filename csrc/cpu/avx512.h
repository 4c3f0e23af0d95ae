// AVX-512 versions of the CPU kernels' hottest float loops, the passes over a row of scaled cosines that take one
// exp per column (segment statistics, the cross-entropy forward and backward), picked at run time when the CPU has
// AVX-512F; the portable loops in softmax.cpp serve every other CPU and fp64. Tails are masked, not peeled.
// The exp is exp_acc's algorithm (Cody-Waite reduction, the degree-7 Taylor polynomial) on fused multiply-adds,
// with the 2^n scaling done by one vscalefps: about a third of the instructions of the portable loop.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#define PK_HAVE_AVX512 1
// GCC 12's intrinsics seed unused lanes with a self-initialised _mm512_undefined_ps(): -Wuninitialized noise.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define PK_AVX512 __attribute__((target("avx512f")))
#else
#define PK_HAVE_AVX512 0
#endif

#include "common/defs.h"
#include "common/online_lse.h"
#include "common/xent.h"

namespace pk::cpu {

// Whether this CPU runs the AVX-512 loops (checked once).
inline bool avx512_usable() {
#if PK_HAVE_AVX512
  static const bool usable = __builtin_cpu_supports("avx512f");
  return usable;
#else
  return false;
#endif
}

#if PK_HAVE_AVX512

// exp(x) for 16 lanes; NaN stays NaN, +inf (and anything above ~88.7) gives +inf. Results below the smallest
// normal float (x < -87.3) are flushed to 0: they only ever join a sum that holds a 1 (the row maximum's term),
// where they weigh less than 1e-30 ulp, and a subnormal result would take the CPU's slow microcode path.
PK_AVX512 inline __m512 exp_flush_512(__m512 x) {
  using C = ExpConsts<float>;
  constexpr InvFactorials<float, C::degree> inv_fact{};
  // min/max return their second operand when either is NaN, so a NaN x survives both clamps
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-88.0f), _mm512_min_ps(_mm512_set1_ps(C::hi), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(C::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::ln2_hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::ln2_lo), r);
  __m512 p = _mm512_set1_ps(inv_fact.v[C::degree]);
  for (int k = C::degree - 1; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(inv_fact.v[k]));
  // lanes with x >= log(FLT_MIN), or NaN (unordered compares true), keep p * 2^n; the rest are 0
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// max and min of z = scale * x[0, len) (NaNs skipped), and sum_i exp(z_i - lse_shift(max)) (NaN if any z is).
PK_AVX512 inline void chunk_stats_512(const float* x, std::int64_t len, float scale, float& max, float& min,
                                      float& sum) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-infinity<float>()), mn = _mm512_set1_ps(infinity<float>());
  std::int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 z = _mm512_mul_ps(s, _mm512_loadu_ps(x + i));
    mx = _mm512_max_ps(z, mx);  // z > mx ? z : mx: a NaN z leaves mx
    mn = _mm512_min_ps(z, mn);
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - i)) - 1u);
  if (tail) {
    const __m512 z = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(tail, x + i));
    mx = _mm512_mask_max_ps(mx, tail, z, mx);
    mn = _mm512_mask_min_ps(mn, tail, z, mn);
  }
  max = _mm512_reduce_max_ps(mx);
  min = _mm512_reduce_min_ps(mn);
  const __m512 shift = _mm512_set1_ps(lse_shift(max));
  // two accumulators: the adds of consecutive vectors do not wait on each other
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  i = 0;
  for (; i + 32 <= len; i += 32) {
    acc0 = _mm512_add_ps(acc0, exp_flush_512(_mm512_sub_ps(_mm512_mul_ps(s, _mm512_loadu_ps(x + i)), shift)));
    acc1 = _mm512_add_ps(acc1, exp_flush_512(_mm512_sub_ps(_mm512_mul_ps(s, _mm512_loadu_ps(x + i + 16)), shift)));
  }
  for (; i + 16 <= len; i += 16)
    acc0 = _mm512_add_ps(acc0, exp_flush_512(_mm512_sub_ps(_mm512_mul_ps(s, _mm512_loadu_ps(x + i)), shift)));
  if (tail) {
    const __m512 z = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(tail, x + i));
    acc1 = _mm512_mask_add_ps(acc1, tail, acc1, exp_flush_512(_mm512_sub_ps(z, shift)));
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// The lanes [0, n) of a vector, n < 16.
PK_AVX512 inline __mmask16 first_lanes(std::int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// xent_weight for the 16 columns c0 .. c0 + 15 of a row (target: that row's dense targets); 0 outside `lanes`.
template <int KIND> PK_AVX512 inline __m512 xent_weight_512(std::int64_t c0, __mmask16 lanes, std::int64_t label,
                                                            float inv_n, const float* target) {
  if constexpr (KIND == kXentIndex) {
    const std::int64_t k = label - c0;
    const __mmask16 hit = k >= 0 && k < 16 ? static_cast<__mmask16>(1u << k) : 0;
    return _mm512_maskz_mov_ps(hit & lanes, _mm512_set1_ps(1.0f));
  } else if constexpr (KIND == kXentUniform) {
    return _mm512_maskz_mov_ps(lanes, _mm512_set1_ps(inv_n));
  } else {
    return _mm512_maskz_loadu_ps(lanes, target + c0);
  }
}

// One chunk [c0, c0 + len) of a cross-entropy row: its XentState (the max, the sum-exp and the weighted sums, as
// the portable loop keeps them).
template <int KIND> PK_AVX512 inline XentState<float> xent_chunk_512(const float* row, const float* target,
                                                                     std::int64_t c0, std::int64_t len,
                                                                     std::int64_t label, float inv_n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  const float* x = row + c0;
  const __mmask16 tail = first_lanes(len % 16);
  const std::int64_t full = len - len % 16;
  __m512 mx = _mm512_set1_ps(-infinity<float>());
  for (std::int64_t i = 0; i < full; i += 16) mx = _mm512_max_ps(_mm512_mul_ps(s, _mm512_loadu_ps(x + i)), mx);
  if (tail) mx = _mm512_mask_max_ps(mx, tail, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(tail, x + full)), mx);
  const float max = _mm512_reduce_max_ps(mx);
  const __m512 shift = _mm512_set1_ps(lse_shift(max));
  __m512 sum = _mm512_setzero_ps(), weighted = _mm512_setzero_ps(), weight = _mm512_setzero_ps();
  for (std::int64_t i = 0; i < len; i += 16) {
    const __mmask16 lanes = i < full ? static_cast<__mmask16>(0xffff) : tail;
    const __m512 d = _mm512_sub_ps(_mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes, x + i)), shift);
    const __m512 w = xent_weight_512<KIND>(c0 + i, lanes, label, inv_n, target);
    sum = _mm512_mask_add_ps(sum, lanes, sum, exp_flush_512(d));
    weighted = _mm512_add_ps(weighted, _mm512_mul_ps(w, d));
    weight = _mm512_add_ps(weight, w);
  }
  return {{max, _mm512_reduce_add_ps(sum)}, _mm512_reduce_add_ps(weighted), _mm512_reduce_add_ps(weight)};
}

// out[n] = xent_dcos(grad_scale, mass, exp(scale * row[n] - row_lse), w_n) for a whole row of N columns.
template <int KIND> PK_AVX512 inline void xent_bwd_row_512(const float* row, const float* target, std::int64_t N,
                                                           std::int64_t label, float inv_n, float scale,
                                                           float grad_scale, float mass, float row_lse, float* out) {
  const __m512 s = _mm512_set1_ps(scale), lse = _mm512_set1_ps(row_lse);
  const __m512 gs = _mm512_set1_ps(grad_scale), a = _mm512_set1_ps(mass);
  const __mmask16 tail = first_lanes(N % 16);
  const std::int64_t full = N - N % 16;
  for (std::int64_t i = 0; i < N; i += 16) {
    const __mmask16 lanes = i < full ? static_cast<__mmask16>(0xffff) : tail;
    const __m512 prob = exp_flush_512(_mm512_sub_ps(_mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes, row + i)), lse));
    const __m512 w = xent_weight_512<KIND>(i, lanes, label, inv_n, target);
    _mm512_mask_storeu_ps(out + i, lanes, _mm512_mul_ps(gs, _mm512_sub_ps(_mm512_mul_ps(a, prob), w)));
  }
}

#endif

}  // namespace pk::cpu
