// Row kernels: l2norm forward/backward and mix (one warp per row), orthogonality forward (one block, fixed
// summation order, so the scalar is deterministic) and backward (one warp per prompt row).
#include "common/ortho.h"
#include "common/rows.h"
#include "cuda/launch.cuh"

namespace pk::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;
constexpr int kRowsPerBlock = kRowThreads / kWarp;
constexpr int kOrthoThreads = 1024;

__device__ __forceinline__ std::int64_t warp_row() {
  return std::int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
}

template <class T, class A> __device__ A warp_dot(const T* x, const T* y, std::int64_t D) {
  A s = 0;
  for (std::int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) s += to_acc(x[d]) * to_acc(y[d]);
  return group_sum<kWarp>(s);
}

template <class T, class A>
__global__ void __launch_bounds__(kRowThreads) l2norm_fwd_kernel(const T* __restrict__ x, std::int64_t R,
                                                                 std::int64_t D, A eps, A* __restrict__ y,
                                                                 A* __restrict__ inv_norm) {
  const std::int64_t r = warp_row();
  if (r >= R) return;  // whole warps leave together
  const T* xr = x + r * D;
  const A norm = l2_clamped_norm(warp_dot<T, A>(xr, xr, D), eps);
  for (std::int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) y[r * D + d] = to_acc(xr[d]) / norm;
  if (threadIdx.x % kWarp == 0) inv_norm[r] = A(1) / norm;
}

template <class T, class A>
__global__ void __launch_bounds__(kRowThreads) l2norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                                                 const A* __restrict__ inv_norm, std::int64_t R,
                                                                 std::int64_t D, A eps, A* __restrict__ dx) {
  const std::int64_t r = warp_row();
  if (r >= R) return;
  const T *dyr = dy + r * D, *yr = y + r * D;
  const A dot = warp_dot<T, A>(dyr, yr, D);
  const A inv = inv_norm[r];
  const bool clamped = l2_was_clamped(inv, eps);
  for (std::int64_t d = threadIdx.x % kWarp; d < D; d += kWarp)
    dx[r * D + d] = l2_grad(to_acc(dyr[d]), to_acc(yr[d]), inv, dot, clamped);
}

template <class T, class A>
__global__ void __launch_bounds__(kRowThreads) mix_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                          const A* __restrict__ lam, std::int64_t B, std::int64_t D,
                                                          A* __restrict__ out) {
  const std::int64_t r = warp_row();
  if (r >= B) return;
  const A l = lam[r];
  A* o = out + r * D;
  A sumsq = 0;
  for (std::int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) {
    const A v = mix_value(l, to_acc(a[r * D + d]), to_acc(b[r * D + d]));
    o[d] = v;
    sumsq += v * v;
  }
  const A norm = l2_clamped_norm(group_sum<kWarp>(sumsq), A(kMixEps));
  for (std::int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) o[d] /= norm;  // each lane rescales its own writes
}

// One block: warp w takes classes w, w + 32, ...; warp totals are added in warp order.
template <class T, class A>
__global__ void __launch_bounds__(kOrthoThreads) ortho_fwd_kernel(const T* __restrict__ yn, std::int64_t C,
                                                                  std::int64_t K, std::int64_t D, int mode,
                                                                  A* __restrict__ out) {
  __shared__ A warp_total[kOrthoThreads / kWarp];
  const int warp = threadIdx.x / kWarp;
  A total = 0;
  for (std::int64_t c = warp; c < C; c += kOrthoThreads / kWarp) {
    const T* yc = yn + c * K * D;
    for (std::int64_t i = 0; i < K; ++i)
      for (std::int64_t j = i + 1; j < K; ++j) total += ortho_pair_term(mode, warp_dot<T, A>(yc + i * D, yc + j * D, D));
  }
  if (threadIdx.x % kWarp == 0) warp_total[warp] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    A sum = 0;
    for (int w = 0; w < kOrthoThreads / kWarp; ++w) sum += warp_total[w];
    *out = ortho_norm<A>(mode, C, K) * sum;
  }
}

// Warp per prompt row (c, i): dyn_ci = grad * norm * sum_{j != i} pair_grad(g_cij) yn_cj.
template <class T, class A>
__global__ void __launch_bounds__(kRowThreads) ortho_bwd_kernel(const T* __restrict__ yn, std::int64_t C,
                                                                std::int64_t K, std::int64_t D, int mode, A grad_norm,
                                                                A* __restrict__ dyn) {
  const std::int64_t r = warp_row();
  if (r >= C * K) return;
  const std::int64_t c = r / K, i = r % K;
  const T* yc = yn + c * K * D;
  A* out = dyn + r * D;
  for (std::int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) out[d] = A(0);
  for (std::int64_t j = 0; j < K; ++j) {
    if (j == i) continue;
    const A coef = grad_norm * ortho_pair_grad(mode, warp_dot<T, A>(yc + i * D, yc + j * D, D));
    for (std::int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) out[d] += coef * to_acc(yc[j * D + d]);
  }
}

void check_rows(const char* fn, std::int64_t R, std::int64_t D) {
  require_at_least(fn, "rows", R, 0);
  require_at_least(fn, "D", D, 1);
  if (R / kRowsPerBlock >= 0x7fffffff) invalid(fn, "too many rows for one launch");
}

void check_prompts(const char* fn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, const void* yn) {
  require_at_least(fn, "C", C, 1);
  require_at_least(fn, "K", K, 1);
  require_at_least(fn, "D", D, 1);
  require_mode(fn, mode);
  require_ptr(fn, "yn", yn);
  if (C * K / kRowsPerBlock >= 0x7fffffff) invalid(fn, "too many prompt rows for one launch");
}

}  // namespace

void l2norm_fwd(const void* x, std::int64_t R, std::int64_t D, double eps, void* out_y, void* out_inv_norm,
                int dtype, Stream stream) {
  const char* fn = "l2norm_fwd_cuda";
  check_rows(fn, R, D);
  if (!(eps > 0)) invalid(fn, "eps must be > 0, got " + std::to_string(eps));
  if (R == 0) return;
  require_ptr(fn, "x", x);
  require_ptr(fn, "out_y", out_y);
  require_ptr(fn, "out_inv_norm", out_inv_norm);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, x);
    l2norm_fwd_kernel<T, A><<<blocks_for(R, kRowsPerBlock), kRowThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), R, D, A(eps), static_cast<A*>(out_y), static_cast<A*>(out_inv_norm));
    check_launch(fn);
  });
}

void l2norm_bwd(const void* dy, const void* y, const void* inv_norm, std::int64_t R, std::int64_t D, double eps,
                void* out_dx, int dtype, Stream stream) {
  const char* fn = "l2norm_bwd_cuda";
  check_rows(fn, R, D);
  if (!(eps > 0)) invalid(fn, "eps must be > 0, got " + std::to_string(eps));
  if (R == 0) return;
  require_ptr(fn, "dy", dy);
  require_ptr(fn, "y", y);
  require_ptr(fn, "inv_norm", inv_norm);
  require_ptr(fn, "out_dx", out_dx);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, dy);
    l2norm_bwd_kernel<T, A><<<blocks_for(R, kRowsPerBlock), kRowThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<const A*>(inv_norm), R, D, A(eps),
        static_cast<A*>(out_dx));
    check_launch(fn);
  });
}

void mix(const void* a, const void* b, const void* lam, std::int64_t B, std::int64_t D, void* out, int dtype,
         Stream stream) {
  const char* fn = "mix_cuda";
  check_rows(fn, B, D);
  if (B == 0) return;
  require_ptr(fn, "a", a);
  require_ptr(fn, "b", b);
  require_ptr(fn, "lam", lam);
  require_ptr(fn, "out", out);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, a);
    mix_kernel<T, A><<<blocks_for(B, kRowsPerBlock), kRowThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const A*>(lam), B, D, static_cast<A*>(out));
    check_launch(fn);
  });
}

void ortho_fwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, void* out_loss, int dtype,
               Stream stream) {
  const char* fn = "ortho_fwd_cuda";
  check_prompts(fn, C, K, D, mode, yn);
  require_ptr(fn, "out_loss", out_loss);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, yn);
    ortho_fwd_kernel<T, A><<<1, kOrthoThreads, 0, as_stream(stream)>>>(static_cast<const T*>(yn), C, K, D, mode,
                                                                       static_cast<A*>(out_loss));
    check_launch(fn);
  });
}

void ortho_bwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, double grad, void* out_dyn,
               int dtype, Stream stream) {
  const char* fn = "ortho_bwd_cuda";
  check_prompts(fn, C, K, D, mode, yn);
  require_ptr(fn, "out_dyn", out_dyn);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, yn);
    const A grad_norm = A(grad) * ortho_norm<A>(mode, C, K);
    ortho_bwd_kernel<T, A><<<blocks_for(C * K, kRowsPerBlock), kRowThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(yn), C, K, D, mode, grad_norm, static_cast<A*>(out_dyn));
    check_launch(fn);
  });
}

}  // namespace pk::cuda
