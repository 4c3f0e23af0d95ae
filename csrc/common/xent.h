// Cross-entropy against three kinds of target on z = scale * cos, and its gradient:
//   loss_b = a_b * lse_b(z) - sum_n w_bn z_bn,  a_b = sum_n w_bn,
//   dcos_bn = grad_b * scale * (a_b * exp(z_bn - lse_b) - w_bn).
// The forward never forms a_b * lse_b - sum_n w_bn z_bn directly (two large, nearly equal terms when |z| is
// large): with shift = lse_shift(max z), loss_b = a_b * log(sum) - sum_n w_bn (z_bn - shift), the log-softmax
// form. The weighted sum is kept relative to the running shift and rescaled with it ("online rescale").
// A fourth kind, the multi-label soft margin (kXentMultilabel), is a sum of independent per-column terms; its
// helpers close the file.
#pragma once

#include <limits>

#include "defs.h"
#include "online_lse.h"

namespace pk {

// w_bn. `label` is used by kXentIndex, `inv_n` (= 1 / N) by kXentUniform, `dense` (targets[b, n]) by kXentDense.
template <int KIND, class A> PK_HD A xent_weight(std::int64_t n, std::int64_t label, A inv_n, A dense) {
  return KIND == kXentIndex ? (n == label ? A(1) : A(0)) : KIND == kXentUniform ? inv_n : dense;
}

// a_b: exactly 1 for one-hot and uniform targets (sum_n 1/N is 1, whatever its rounded sum); the summed row of a
// dense target.
template <int KIND, class A> PK_HD A xent_mass(A weight_sum) { return KIND == kXentDense ? weight_sum : A(1); }

template <class A> struct XentState {
  LseState<A> lse;
  A weighted;  // sum_n w_n (z_n - lse_shift(lse.max))
  A weight;    // sum_n w_n
};

template <class A> PK_HD XentState<A> xent_empty() { return {lse_empty<A>(), A(0), A(0)}; }

// `weighted` taken at shift lse_shift(from), moved to shift `to`.
template <class A> PK_HD A xent_reshift(A weighted, A weight, A from, A to) {
  return weighted + weight * (lse_shift(from) - to);
}

// Adds column value z with weight w.
template <class A> PK_HD void xent_push(XentState<A>& st, A z, A w) {
  const A old_max = st.lse.max;
  lse_push(st.lse, z);
  const A shift = lse_shift(st.lse.max);
  st.weighted = xent_reshift(st.weighted, st.weight, old_max, shift) + w * (z - shift);
  st.weight += w;
}

template <class A> PK_HD XentState<A> xent_merge(XentState<A> a, XentState<A> b) {
  XentState<A> out;
  out.lse = lse_merge(a.lse, b.lse);
  const A shift = lse_shift(out.lse.max);
  out.weighted = xent_reshift(a.weighted, a.weight, a.lse.max, shift) +
                 xent_reshift(b.weighted, b.weight, b.lse.max, shift);
  out.weight = a.weight + b.weight;
  return out;
}

// loss_b from a row's final state and its mass a_b.
template <class A> PK_HD A xent_loss(A mass, XentState<A> st) { return mass * log_acc(st.lse.sum) - st.weighted; }

// Row b's outputs from its final (merged) state: lse_b, and loss_b, NaN where the row's label was out of range.
template <int KIND, class A> PK_HD void xent_finish(XentState<A> st, bool bad_label, A* out_loss, A* out_lse) {
  *out_lse = lse_value(st.lse);
  *out_loss = bad_label ? quiet_nan<A>() : xent_loss(xent_mass<KIND>(st.weight), st);
}

// d loss_b / d cos_bn, with grad_scale = grad_b * scale and prob = exp(z_bn - lse_b).
template <class A> PK_HD A xent_dcos(A grad_scale, A mass, A prob, A w) { return grad_scale * (mass * prob - w); }

// ---- kXentMultilabel: the N columns form N / group groups of `group` consecutive columns, y_bn = 1 iff
// n / group == labels[b], and
//   loss_b = (1/N) sum_n [softplus(z_bn) - y_bn z_bn],  dcos_bn = grad_b * scale * (sigmoid(z_bn) - y_bn) / N.
// Each term is softplus(s z) with s = 1 - 2 y (softplus(z) - z = softplus(-z)), so no two large terms cancel,
// and its derivative is s * sigmoid(s z). No row statistic is kept: the backward recomputes each term from z.

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float log1p_small(float e) { return log1pf(e); }
__device__ __forceinline__ double log1p_small(double e) { return log1p(e); }
__device__ __forceinline__ float exp_neg_abs(float x) { return expf(-fabsf(x)); }
__device__ __forceinline__ double exp_neg_abs(double x) { return exp(-fabs(x)); }
#else
// The host versions keep every intermediate a normal number: x86 takes a slow microcode path for subnormal
// operands and results (a 10x slower kernel on rows with |z| ~ 90), and a vector loop runs every lane's math.
// Clamps and flushes are arithmetic (a product, an offset), not selects: GCC moves a select that follows math on
// a clamped value back into that math, which then runs on the unclamped lanes.

// Just above ln of twice the smallest normal number: e^x below e^log_min is flushed to 0, an absolute error below
// e^log_min (4e-38 in float), so that e / (2 + e) stays normal too.
template <class A> struct NormalRange;
template <> struct NormalRange<float> { static constexpr float log_min = -86.0f; };
template <> struct NormalRange<double> { static constexpr double log_min = -707.0; };

// e^-|x|, 0 where it would be subnormal. NaN stays NaN (NaN * 1).
template <class A> inline A exp_neg_abs(A x) {
  constexpr A lo = NormalRange<A>::log_min;
  const A a = x < A(0) ? x : -x;
  return exp_acc(a < lo ? lo : a) * (a < lo ? A(0) : A(1));
}

// log(1 + e) for e in [0, 1], the only arguments softplus passes: 2 atanh(s) with s = e / (2 + e) <= 1/3, an odd
// series in s^2 <= 1/9 (Horner form) that GCC vectorises, which std::log1p is not. Error a few ulp; NaN stays NaN.
// n: terms until (1/9)^k / (2k + 1) is below the dtype's half ulp; offset: see log1p_small.
template <class A> struct Log1pTerms;
template <> struct Log1pTerms<float> { static constexpr int n = 8; static constexpr float offset = 0x1p-50f; };
template <> struct Log1pTerms<double> { static constexpr int n = 17; static constexpr double offset = 0x1p-400; };

template <class A, int N> struct InvOdd {
  A v[N];
  constexpr InvOdd() : v() {
    for (int k = 0; k < N; ++k) v[k] = A(1) / A(2 * k + 1);
  }
};

template <class A> inline A log1p_small(A e) {
  constexpr int n = Log1pTerms<A>::n;
  constexpr InvOdd<A, n> inv_odd{};
  const A s = e / (A(2) + e);
  // (s + offset)^2 for s^2 keeps the series' argument normal and moves it by < 2^-50 of itself
  const A s_off = s + Log1pTerms<A>::offset;
  const A s2 = s_off * s_off;
  A p = inv_odd.v[n - 1];
  for (int k = n - 2; k >= 0; --k) p = p * s2 + inv_odd.v[k];
  return A(2) * s * p;
}
#endif

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow for large x, no cancellation for small.
template <class A> PK_HD A softplus(A x) { return (x > A(0) ? x : A(0)) + log1p_small(exp_neg_abs(x)); }

// sigmoid(x) = 1 / (1 + e^-x), from e^-|x| so that neither sign overflows.
template <class A> PK_HD A sigmoid(A x) {
  const A e = exp_neg_abs(x);
  return (x < A(0) ? e : A(1)) / (A(1) + e);
}

// The columns [begin, end) where y_bn = 1: row b's group, label * group onwards.
struct GroupCols {
  std::int64_t begin, end;
};

PK_HD GroupCols multilabel_cols(std::int64_t label, std::int64_t group) {
  return {label * group, (label + 1) * group};
}

// s = 1 - 2 y_bn.
template <class A> PK_HD A multilabel_sign(std::int64_t n, GroupCols cols) {
  return n >= cols.begin && n < cols.end ? A(-1) : A(1);
}

// softplus(z) - y z, the row sum of which divided by N is loss_b.
template <class A> PK_HD A multilabel_term(A z, A sign) { return softplus(sign * z); }

// loss_b from the row sum of multilabel_term over its N columns; NaN where the row's label was out of range.
template <class A> PK_HD A multilabel_loss(A term_sum, std::int64_t N, bool bad_label) {
  return bad_label ? quiet_nan<A>() : term_sum / A(N);
}

// d loss_b / d cos_bn with grad_scale = grad_b * scale / N.
template <class A> PK_HD A multilabel_dcos(A grad_scale, A z, A sign) { return grad_scale * sign * sigmoid(sign * z); }

}  // namespace pk
