// CPU l2norm, mix and orthogonality kernels: independent rows (or classes), each a few vector passes.
#include <vector>

#include "common/checks.h"
#include "common/ortho.h"
#include "common/rows.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace pk::cpu {
namespace {

template <class A> PK_CPU_CLONES void l2norm_fwd_rows(const A* x, std::int64_t D, std::int64_t begin,
                                                      std::int64_t end, A eps, A* y, A* inv_norm) {
  for (std::int64_t r = begin; r < end; ++r) {
    const A* xr = x + r * D;
    A* yr = y + r * D;
    const A norm = l2_clamped_norm(dot(xr, xr, D), eps);
#pragma omp simd
    for (std::int64_t d = 0; d < D; ++d) yr[d] = xr[d] / norm;
    inv_norm[r] = A(1) / norm;
  }
}

template <class A> PK_CPU_CLONES void l2norm_bwd_rows(const A* dy, const A* y, const A* inv_norm, std::int64_t D,
                                                      A eps, std::int64_t begin, std::int64_t end, A* dx) {
  for (std::int64_t r = begin; r < end; ++r) {
    const A *dyr = dy + r * D, *yr = y + r * D;
    A* dxr = dx + r * D;
    const A dot_dy = dot(dyr, yr, D);
    const A inv = inv_norm[r];
    const bool clamped = l2_was_clamped(inv, eps);
#pragma omp simd
    for (std::int64_t d = 0; d < D; ++d) dxr[d] = l2_grad(dyr[d], yr[d], inv, dot_dy, clamped);
  }
}

template <class A> PK_CPU_CLONES void mix_rows(const A* a, const A* b, const A* lam, std::int64_t D,
                                               std::int64_t begin, std::int64_t end, A* out) {
  for (std::int64_t r = begin; r < end; ++r) {
    const A *ar = a + r * D, *br = b + r * D;
    A* o = out + r * D;
    const A l = lam[r];
    A sumsq = 0;
#pragma omp simd reduction(+ : sumsq)
    for (std::int64_t d = 0; d < D; ++d) {
      o[d] = mix_value(l, ar[d], br[d]);
      sumsq += o[d] * o[d];
    }
    const A norm = l2_clamped_norm(sumsq, A(kMixEps));
#pragma omp simd
    for (std::int64_t d = 0; d < D; ++d) o[d] /= norm;
  }
}

// partial[c] = sum_{i<j} pair_term(g_cij) for classes [begin, end).
template <class A> PK_CPU_CLONES void ortho_fwd_classes(const A* yn, std::int64_t K, std::int64_t D, int mode,
                                                        std::int64_t begin, std::int64_t end, A* partial) {
  for (std::int64_t c = begin; c < end; ++c) {
    const A* yc = yn + c * K * D;
    A sum = 0;
    for (std::int64_t i = 0; i < K; ++i)
      for (std::int64_t j = i + 1; j < K; ++j) sum += ortho_pair_term(mode, dot(yc + i * D, yc + j * D, D));
    partial[c] = sum;
  }
}

// coef holds K * K scratch values for the class's pair gradients.
template <class A> PK_CPU_CLONES void ortho_bwd_classes(const A* yn, std::int64_t K, std::int64_t D, int mode,
                                                        A grad_norm, std::int64_t begin, std::int64_t end, A* coef,
                                                        A* dyn) {
  for (std::int64_t c = begin; c < end; ++c) {
    const A* yc = yn + c * K * D;
    for (std::int64_t i = 0; i < K; ++i)
      for (std::int64_t j = i + 1; j < K; ++j)
        coef[i * K + j] = coef[j * K + i] = grad_norm * ortho_pair_grad(mode, dot(yc + i * D, yc + j * D, D));
    for (std::int64_t i = 0; i < K; ++i) {
      A* out = dyn + (c * K + i) * D;
#pragma omp simd
      for (std::int64_t d = 0; d < D; ++d) out[d] = A(0);
      for (std::int64_t j = 0; j < K; ++j) {
        if (j == i) continue;
        const A cij = coef[i * K + j];
        const A* yj = yc + j * D;
#pragma omp simd
        for (std::int64_t d = 0; d < D; ++d) out[d] += cij * yj[d];
      }
    }
  }
}

void check_rows(const char* fn, std::int64_t R, std::int64_t D) {
  require_at_least(fn, "rows", R, 0);
  require_at_least(fn, "D", D, 1);
}

}  // namespace

void l2norm_fwd(const void* x, std::int64_t R, std::int64_t D, double eps, void* out_y, void* out_inv_norm,
                int dtype) {
  const char* fn = "l2norm_fwd_cpu";
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    check_rows(fn, R, D);
    if (!(eps > 0)) invalid(fn, "eps must be > 0, got " + std::to_string(eps));
    if (R == 0) return;
    require_ptr(fn, "x", x);
    require_ptr(fn, "out_y", out_y);
    require_ptr(fn, "out_inv_norm", out_inv_norm);
    parallel_ranges(R, R * D, [&](std::int64_t begin, std::int64_t end) {
      l2norm_fwd_rows<A>(static_cast<const A*>(x), D, begin, end, A(eps), static_cast<A*>(out_y),
                         static_cast<A*>(out_inv_norm));
    });
  });
}

void l2norm_bwd(const void* dy, const void* y, const void* inv_norm, std::int64_t R, std::int64_t D, double eps,
                void* out_dx, int dtype) {
  const char* fn = "l2norm_bwd_cpu";
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    check_rows(fn, R, D);
    if (!(eps > 0)) invalid(fn, "eps must be > 0, got " + std::to_string(eps));
    if (R == 0) return;
    require_ptr(fn, "dy", dy);
    require_ptr(fn, "y", y);
    require_ptr(fn, "inv_norm", inv_norm);
    require_ptr(fn, "out_dx", out_dx);
    parallel_ranges(R, R * D, [&](std::int64_t begin, std::int64_t end) {
      l2norm_bwd_rows<A>(static_cast<const A*>(dy), static_cast<const A*>(y), static_cast<const A*>(inv_norm), D,
                         A(eps), begin, end, static_cast<A*>(out_dx));
    });
  });
}

void mix(const void* a, const void* b, const void* lam, std::int64_t B, std::int64_t D, void* out, int dtype) {
  const char* fn = "mix_cpu";
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    check_rows(fn, B, D);
    if (B == 0) return;
    require_ptr(fn, "a", a);
    require_ptr(fn, "b", b);
    require_ptr(fn, "lam", lam);
    require_ptr(fn, "out", out);
    parallel_ranges(B, B * D, [&](std::int64_t begin, std::int64_t end) {
      mix_rows<A>(static_cast<const A*>(a), static_cast<const A*>(b), static_cast<const A*>(lam), D, begin, end,
                  static_cast<A*>(out));
    });
  });
}

void ortho_fwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, void* out_loss,
               int dtype) {
  const char* fn = "ortho_fwd_cpu";
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    require_at_least(fn, "C", C, 1);
    require_at_least(fn, "K", K, 1);
    require_at_least(fn, "D", D, 1);
    require_mode(fn, mode);
    require_ptr(fn, "yn", yn);
    require_ptr(fn, "out_loss", out_loss);
    // Per-class partials summed in class order: the result does not depend on the thread count.
    std::vector<A> partial(C);
    parallel_ranges(C, C * K * K * D / 2, [&](std::int64_t begin, std::int64_t end) {
      ortho_fwd_classes<A>(static_cast<const A*>(yn), K, D, mode, begin, end, partial.data());
    });
    A total = 0;
    for (const A p : partial) total += p;
    *static_cast<A*>(out_loss) = ortho_norm<A>(mode, C, K) * total;
  });
}

void ortho_bwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, double grad, void* out_dyn,
               int dtype) {
  const char* fn = "ortho_bwd_cpu";
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    require_at_least(fn, "C", C, 1);
    require_at_least(fn, "K", K, 1);
    require_at_least(fn, "D", D, 1);
    require_mode(fn, mode);
    require_ptr(fn, "yn", yn);
    require_ptr(fn, "out_dyn", out_dyn);
    const A grad_norm = A(grad) * ortho_norm<A>(mode, C, K);
    parallel_ranges(C, C * K * K * D, [&](std::int64_t begin, std::int64_t end) {
      std::vector<A> coef(K * K);
      ortho_bwd_classes<A>(static_cast<const A*>(yn), K, D, mode, grad_norm, begin, end, coef.data(),
                           static_cast<A*>(out_dyn));
    });
  });
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace pk::cpu
