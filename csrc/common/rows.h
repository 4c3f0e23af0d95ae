// Per-row vector math: L2 normalisation (forward and backward) and normalised mixup.
#pragma once

#include "defs.h"

namespace pk {

// max(sqrt(sumsq), eps); a NaN norm stays NaN (the comparison is false for NaN). Rows are divided by it (not
// multiplied by its inverse), which rounds once, as torch.nn.functional.normalize does.
template <class A> PK_HD A l2_clamped_norm(A sumsq, A eps) {
  const A norm = sqrt_acc(sumsq);
  return norm < eps ? eps : norm;
}

// Whether a row's forward clamped its norm at eps, judged from its inv_norm: a clamped row has inv_norm = 1 / eps,
// the very value computed here (the forward's A(1) / l2_clamped_norm), an unclamped one 1 / |x| < 1 / eps. As
// torch.nn.functional.normalize's clamp_min, a norm of exactly eps counts as clamped (its gradient is dy / eps);
// only norms within rounding of eps, where 1 / |x| rounds to 1 / eps, differ from torch. A NaN row is unclamped.
template <class A> PK_HD bool l2_was_clamped(A inv_norm, A eps) { return inv_norm >= A(1) / eps; }

// dx_d from dy_d, y_d, the row's inv_norm and dot = <dy, y>.
template <class A> PK_HD A l2_grad(A dy, A y, A inv_norm, A dot, bool clamped) {
  return clamped ? dy * inv_norm : inv_norm * (dy - y * dot);
}

// The un-normalised mix lam * a + (1 - lam) * b.
template <class A> PK_HD A mix_value(A lam, A a, A b) { return lam * a + (A(1) - lam) * b; }

}  // namespace pk
