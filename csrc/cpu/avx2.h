// AVX2 + FMA versions of the CPU kernels' hottest float loops (the exp passes over a row of scaled cosines) and
// the vector helpers of the fused product (cpu/product.h), picked at run time on CPUs that have AVX2 and FMA but
// not AVX-512F (those run cpu/avx512.h). Tails are masked loads, not peeled loops.
// The exp is exp_flush_512's algorithm (exp_acc's Cody-Waite reduction and degree-7 polynomial on fused
// multiply-adds); AVX2 has no vscalefps, so 2^n is built from its exponent bits in two factors, as exp_acc does.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#define PK_HAVE_AVX2 1
#include <immintrin.h>
#define PK_AVX2 __attribute__((target("avx2,fma")))
#else
#define PK_HAVE_AVX2 0
#endif

#include "common/defs.h"
#include "common/online_lse.h"
#include "common/xent.h"

namespace pk::cpu {

// Whether this CPU runs the AVX2 loops (checked once).
inline bool avx2_usable() {
#if PK_HAVE_AVX2
  static const bool usable = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return usable;
#else
  return false;
#endif
}

#if PK_HAVE_AVX2

// All-ones in the lanes [0, n) of an 8-lane mask (n clamped to [0, 8]), for maskload / maskstore.
PK_AVX2 inline __m256i lanes_below(std::int64_t n) {
  const int k = n < 0 ? 0 : n > 8 ? 8 : static_cast<int>(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

PK_AVX2 inline float reduce_add_256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

PK_AVX2 inline float reduce_max_256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

PK_AVX2 inline float reduce_min_256(__m256 v) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) for 8 lanes; NaN stays NaN, anything above ~88.7 gives +inf. Results below the smallest normal float
// (x < -87.3) are flushed to 0, as exp_flush_512 does: they only ever join a sum that holds the row maximum's 1.
// Those lanes compute exp(0) instead and are zeroed after: a subnormal intermediate takes the CPU's slow microcode
// path (clamping them at -88 made the whole pass 2x slower on Zen 3, measured).
PK_AVX2 inline __m256 exp_flush_256(__m256 x) {
  using C = ExpConsts<float>;
  constexpr InvFactorials<float, C::degree> inv_fact{};
  const __m256 flushed = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);  // x < log(FLT_MIN); not NaN
  // min returns its second operand when either is NaN, so a NaN x survives the clamp
  const __m256 xc = _mm256_andnot_ps(flushed, _mm256_min_ps(_mm256_set1_ps(C::hi), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(C::log2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::ln2_hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::ln2_lo), r);
  __m256 p = _mm256_set1_ps(inv_fact.v[C::degree]);
  for (int k = C::degree - 1; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(inv_fact.v[k]));
  // 2^n = 2^half * 2^(n - half): each factor's exponent stays in range for n in [-126, 129] (a NaN lane's n
  // converts to INT_MIN; its p is NaN, so the product stays NaN)
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(C::bias);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), C::mantissa_bits));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), C::mantissa_bits));
  return _mm256_andnot_ps(flushed, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
}

// x[at, at + 8), 0 in the lanes at or past len.
PK_AVX2 inline __m256 load_or_zero(const float* x, std::int64_t at, std::int64_t len) {
  return at + 8 <= len ? _mm256_loadu_ps(x + at) : _mm256_maskload_ps(x + at, lanes_below(len - at));
}

// scale * x[at, at + 8), with -inf (whose exp is 0) in the lanes at or past len.
PK_AVX2 inline __m256 scaled_or_none(const float* x, std::int64_t at, std::int64_t len, __m256 scale) {
  if (at + 8 <= len) return _mm256_mul_ps(scale, _mm256_loadu_ps(x + at));
  const __m256i lanes = lanes_below(len - at);
  return _mm256_blendv_ps(_mm256_set1_ps(-infinity<float>()), _mm256_mul_ps(scale, _mm256_maskload_ps(x + at, lanes)),
                          _mm256_castsi256_ps(lanes));
}

// max and min of z = scale * x[0, len) (NaNs skipped), and sum_i exp(z_i - lse_shift(max)) (NaN if any z is).
// z is rounded before the shift is taken off, as for the max, so the maximum's own term is exactly 1.
PK_AVX2 inline void chunk_stats_256(const float* x, std::int64_t len, float scale, float& max, float& min,
                                    float& sum) {
  const __m256 s = _mm256_set1_ps(scale);
  const std::int64_t full = len - len % 8;
  const __m256i tail = lanes_below(len - full);
  __m256 mx = _mm256_set1_ps(-infinity<float>()), mn = _mm256_set1_ps(infinity<float>());
  for (std::int64_t i = 0; i < full; i += 8) {
    const __m256 z = _mm256_mul_ps(s, _mm256_loadu_ps(x + i));
    mx = _mm256_max_ps(z, mx);  // z > mx ? z : mx: a NaN z leaves mx
    mn = _mm256_min_ps(z, mn);
  }
  if (full < len) {
    const __m256 z = _mm256_mul_ps(s, _mm256_maskload_ps(x + full, tail));
    const __m256 live = _mm256_castsi256_ps(tail);
    mx = _mm256_blendv_ps(mx, _mm256_max_ps(z, mx), live);
    mn = _mm256_blendv_ps(mn, _mm256_min_ps(z, mn), live);
  }
  max = reduce_max_256(mx);
  min = reduce_min_256(mn);
  const __m256 shift = _mm256_set1_ps(lse_shift(max));
  // two accumulators: the adds of consecutive vectors do not wait on each other
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (std::int64_t i = 0; i < len; i += 16) {
    acc0 = _mm256_add_ps(acc0, exp_flush_256(_mm256_sub_ps(scaled_or_none(x, i, len, s), shift)));
    acc1 = _mm256_add_ps(acc1, exp_flush_256(_mm256_sub_ps(scaled_or_none(x, i + 8, len, s), shift)));
  }
  sum = reduce_add_256(_mm256_add_ps(acc0, acc1));
}

// xent_weight for the 8 columns c0 .. c0 + 7 of a row (target: that row's dense targets); 0 at or past column
// `end`.
template <int KIND> PK_AVX2 inline __m256 xent_weight_256(std::int64_t c0, std::int64_t end, std::int64_t label,
                                                          float inv_n, const float* target) {
  if constexpr (KIND == kXentIndex) {
    const std::int64_t k = label - c0;
    if (k < 0 || k >= 8 || label >= end) return _mm256_setzero_ps();
    const __m256i hit = _mm256_cmpeq_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(static_cast<int>(k)));
    return _mm256_and_ps(_mm256_castsi256_ps(hit), _mm256_set1_ps(1.0f));
  } else if constexpr (KIND == kXentUniform) {
    return _mm256_and_ps(_mm256_castsi256_ps(lanes_below(end - c0)), _mm256_set1_ps(inv_n));
  } else {
    return load_or_zero(target, c0, end);
  }
}

// One chunk [c0, c0 + len) of a cross-entropy row: its XentState (the max, the sum-exp and the weighted sums, as
// the portable loop keeps them).
template <int KIND> PK_AVX2 inline XentState<float> xent_chunk_256(const float* row, const float* target,
                                                                   std::int64_t c0, std::int64_t len,
                                                                   std::int64_t label, float inv_n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const float* x = row + c0;
  __m256 mx = _mm256_set1_ps(-infinity<float>());
  for (std::int64_t i = 0; i < len; i += 8) mx = _mm256_max_ps(scaled_or_none(x, i, len, s), mx);
  const float max = reduce_max_256(mx);
  const __m256 shift = _mm256_set1_ps(lse_shift(max));
  __m256 sum = _mm256_setzero_ps(), weighted = _mm256_setzero_ps(), weight = _mm256_setzero_ps();
  for (std::int64_t i = 0; i < len; i += 8) {
    const __m256 live = _mm256_castsi256_ps(lanes_below(len - i));
    const __m256 d = _mm256_sub_ps(_mm256_mul_ps(s, load_or_zero(x, i, len)), shift);
    const __m256 w = xent_weight_256<KIND>(c0 + i, c0 + len, label, inv_n, target);
    sum = _mm256_add_ps(sum, _mm256_and_ps(exp_flush_256(d), live));
    weighted = _mm256_add_ps(weighted, _mm256_mul_ps(w, d));
    weight = _mm256_add_ps(weight, w);
  }
  return {{max, reduce_add_256(sum)}, reduce_add_256(weighted), reduce_add_256(weight)};
}

// out[n] = xent_dcos(grad_scale, mass, exp(scale * row[n] - row_lse), w_n) for a whole row of N columns.
template <int KIND> PK_AVX2 inline void xent_bwd_row_256(const float* row, const float* target, std::int64_t N,
                                                         std::int64_t label, float inv_n, float scale,
                                                         float grad_scale, float mass, float row_lse, float* out) {
  const __m256 s = _mm256_set1_ps(scale), lse = _mm256_set1_ps(row_lse);
  const __m256 gs = _mm256_set1_ps(grad_scale), a = _mm256_set1_ps(mass);
  for (std::int64_t i = 0; i < N; i += 8) {
    const __m256 prob = exp_flush_256(_mm256_sub_ps(_mm256_mul_ps(s, load_or_zero(row, i, N)), lse));
    const __m256 w = xent_weight_256<KIND>(i, N, label, inv_n, target);
    const __m256 dcos = _mm256_mul_ps(gs, _mm256_sub_ps(_mm256_mul_ps(a, prob), w));
    if (i + 8 <= N)
      _mm256_storeu_ps(out + i, dcos);
    else
      _mm256_maskstore_ps(out + i, lanes_below(N - i), dcos);
  }
}

#endif

}  // namespace pk::cpu
