// Cross-entropy against three kinds of target on z = scale * cos, and its gradient:
//   loss_b = a_b * lse_b(z) - sum_n w_bn z_bn,  a_b = sum_n w_bn,
//   dcos_bn = grad_b * scale * (a_b * exp(z_bn - lse_b) - w_bn).
// The forward never forms a_b * lse_b - sum_n w_bn z_bn directly (two large, nearly equal terms when |z| is
// large): with shift = lse_shift(max z), loss_b = a_b * log(sum) - sum_n w_bn (z_bn - shift), the log-softmax
// form. The weighted sum is kept relative to the running shift and rescaled with it ("online rescale").
#pragma once

#include "defs.h"
#include "online_lse.h"

namespace pk {

enum XentKind : int { kXentIndex = 0, kXentUniform = 1, kXentDense = 2 };

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

// d loss_b / d cos_bn, with grad_scale = grad_b * scale and prob = exp(z_bn - lse_b).
template <class A> PK_HD A xent_dcos(A grad_scale, A mass, A prob, A w) { return grad_scale * (mass * prob - w); }

}  // namespace pk
