// Online (streaming) max / sum-exp: the state every softmax-like kernel keeps per row or per segment.
// CPU kernels fold whole chunks into it with lse_merge; CUDA threads push single values with lse_push and
// merge their partial states across lanes with lse_merge.
#pragma once

#include "defs.h"

namespace pk {

// sum = sum_i exp(z_i - lse_shift(max)). The shift is max itself when finite and 0 when max is +-inf, so no
// inf - inf ever occurs: an all -inf row gives lse -inf, a +inf entry gives lse +inf, a NaN entry turns sum
// into NaN (max may skip NaNs; sum never does), which is how NaN reaches every output.
template <class A> struct LseState {
  A max;
  A sum;
};

template <class A> PK_HD A lse_shift(A max) { return is_finite(max) ? max : A(0); }

template <class A> PK_HD LseState<A> lse_empty() { return {-infinity<A>(), A(0)}; }

// Rescales a partial sum taken at shift lse_shift(from) to shift `to`. An empty (0) sum stays 0 even when the
// factor overflows; a NaN sum stays NaN.
template <class A> PK_HD A lse_rescale(A sum, A from, A to) {
  return sum > A(0) ? sum * exp_acc(lse_shift(from) - to) : sum;
}

// Combines two partial states (associative up to rounding).
template <class A> PK_HD LseState<A> lse_merge(LseState<A> a, LseState<A> b) {
  const A max = b.max > a.max ? b.max : a.max;
  const A shift = lse_shift(max);
  return {max, lse_rescale(a.sum, a.max, shift) + lse_rescale(b.sum, b.max, shift)};
}

// Adds one value z: one exp, two only when z is a new maximum.
template <class A> PK_HD void lse_push(LseState<A>& st, A z) {
  if (z > st.max) {
    const A shift = lse_shift(z);
    st.sum = lse_rescale(st.sum, st.max, shift) + exp_acc(z - shift);
    st.max = z;
  } else {
    st.sum += exp_acc(z - lse_shift(st.max));
  }
}

// log(sum_i exp(z_i)).
template <class A> PK_HD A lse_value(LseState<A> st) { return lse_shift(st.max) + log_acc(st.sum); }

// Max, min and logsumexp of one segment. max/min skip NaNs while scanning, so a NaN sum (some z was NaN)
// overrides them here: every output of a segment holding a NaN is NaN.
template <class A> PK_HD void segment_finish(LseState<A> st, A min, A* out_max, A* out_min, A* out_lse) {
  const bool has_nan = !(st.sum == st.sum);
  *out_max = has_nan ? st.sum : st.max;
  *out_min = has_nan ? st.sum : min;
  *out_lse = lse_value(st);
}

// A segment's running state when its columns arrive in pieces (GPU column chunks): the online max / sum-exp and
// the min. min skips NaNs as max does; segment_finish turns a NaN sum into NaN outputs.
template <class A> struct SegmentState {
  LseState<A> lse;
  A min;
};

template <class A> PK_HD SegmentState<A> segment_empty() { return {lse_empty<A>(), infinity<A>()}; }

template <class A> PK_HD void segment_push(SegmentState<A>& st, A z) {
  lse_push(st.lse, z);
  st.min = z < st.min ? z : st.min;
}

template <class A> PK_HD SegmentState<A> segment_merge(SegmentState<A> a, SegmentState<A> b) {
  return {lse_merge(a.lse, b.lse), b.min < a.min ? b.min : a.min};
}

}  // namespace pk
