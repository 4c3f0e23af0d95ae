// Per-row vector math: L2 normalisation (forward and backward) and normalised mixup.
#pragma once

#include "defs.h"

namespace pk {

// The norm floor of mix's re-normalisation (torch.nn.functional.normalize's default eps).
constexpr double kMixEps = 1e-12;

// max(sqrt(sumsq), eps); a NaN norm stays NaN (the comparison is false for NaN). Rows are divided by it (not
// multiplied by its inverse), which rounds once, as torch.nn.functional.normalize does.
template <class A> PK_HD A l2_clamped_norm(A sumsq, A eps) {
  const A norm = sqrt_acc(sumsq);
  return norm < eps ? eps : norm;
}

// Whether a row's forward clamped its norm at eps, judged from the unit row y alone (the backward gets no eps):
// a clamped row has |y|^2 = (|x| / eps)^2 < 1, an unclamped one |y|^2 = 1 up to rounding (under 2^-7 even for
// bfloat16 rows). Only rows with 0.984 eps <= |x| < eps fall on the wrong side of the cut and get the unclamped
// gradient.
template <class A> PK_HD bool l2_was_clamped(A y_sumsq) { return y_sumsq < A(1) - A(1) / A(32); }

// dx_d from dy_d, y_d, the row's inv_norm and dot = <dy, y>.
template <class A> PK_HD A l2_grad(A dy, A y, A inv_norm, A dot, bool clamped) {
  return clamped ? dy * inv_norm : inv_norm * (dy - y * dot);
}

// The un-normalised mix lam * a + (1 - lam) * b.
template <class A> PK_HD A mix_value(A lam, A a, A b) { return lam * a + (A(1) - lam) * b; }

}  // namespace pk
