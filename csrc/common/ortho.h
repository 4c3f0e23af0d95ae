// Orthogonality penalties over each class's K unit prompt embeddings yn[c, k, :], with g_cij = <yn_ci, yn_cj>:
//   mode 0 "abs_sum":  L = sum_c sum_{i<j} |g_cij|                     (LSN Eq. 7)
//   mode 1 "mean_cos": L = 1 / (C K (K-1)) * sum_c sum_{i!=j} g_cij     (NegPrompt Eq. 6; 0 when K == 1)
// Both are written as L = norm * sum_c sum_{i<j} pair_term(g_cij), so dL/dyn_ci = norm * sum_{j!=i} pair_grad(g_cij) yn_cj.
#pragma once

#include "defs.h"

namespace pk {

template <class A> PK_HD A ortho_norm(int mode, std::int64_t C, std::int64_t K) {
  if (mode == kOrthoAbsSum) return A(1);
  return K > 1 ? A(1) / (A(C) * A(K) * A(K - 1)) : A(0);
}

// Contribution of one unordered pair (i < j).
template <class A> PK_HD A ortho_pair_term(int mode, A g) {
  return mode == kOrthoAbsSum ? (g < A(0) ? -g : g) : A(2) * g;
}

// d pair_term / d g: sign(g) (with sign(0) = 0 and NaN kept) or 2.
template <class A> PK_HD A ortho_pair_grad(int mode, A g) {
  if (mode != kOrthoAbsSum) return A(2);
  return g > A(0) ? A(1) : g < A(0) ? A(-1) : g * A(0);
}

}  // namespace pk
