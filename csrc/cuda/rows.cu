// Row kernels: l2norm forward/backward and mix (one warp per row); the orthogonality penalty and its gradient,
// over all classes at once, on the tile product of cuda/product.cuh (tensor cores for fp16/bf16/TF32).
#include <type_traits>

#include "common/ortho.h"
#include "common/rows.h"
#include "cuda/launch.cuh"
#include "cuda/product.cuh"

namespace pk::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;
constexpr int kRowsPerBlock = kRowThreads / kWarp;
constexpr int kSumThreads = 1024;

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

// ---- orthogonality. Class c's Gram matrix G = Y_c Y_c^T (Y_c = yn[c], [K, D]) is cut into tiles x tiles tiles of
// 64 x 64 (tiles = ceil(K / 64): one for K <= 64, the usual case), each one tile product.

std::int64_t gram_tiles(std::int64_t K) { return (K + kTileRows - 1) / kTileRows; }

// Block (c, p), p < tiles (tiles + 1) / 2: the p-th tile (ti, tj) with ti <= tj (row by row) of class c's Gram
// matrix. partial[block] = sum of pair_term(g_ij) over the tile's i < j < K, added in a fixed order (the element
// mapping of cuda/product.cuh, then lanes, then warps).
template <class Product>
__global__ void __launch_bounds__(kThreads) ortho_gram_kernel(const typename Product::Input* __restrict__ yn,
                                                              std::int64_t K, std::int64_t D, std::int64_t tiles,
                                                              int mode, typename Product::A* __restrict__ partial) {
  using A = typename Product::A;
  __shared__ __align__(32) unsigned char smem[Product::kSmemBytes];
  __shared__ A warp_total[kThreads / kWarp];
  const std::int64_t pairs = tiles * (tiles + 1) / 2;
  const std::int64_t c = blockIdx.x / pairs;
  std::int64_t p = blockIdx.x % pairs, ti = 0;
  while (p >= tiles - ti) {  // row ti holds the tiles - ti tiles (ti, ti .. tiles - 1)
    p -= tiles - ti;
    ++ti;
  }
  const std::int64_t tj = ti + p;
  const auto* yc = yn + c * K * D;
  Product::run(yc, yc, K, K, D, ti * kTileRows, tj * kTileCols, smem);
  const A* gram = reinterpret_cast<const A*>(smem);
  const int col = threadIdx.x % kTileCols;
  const std::int64_t j = tj * kTileCols + col;
  A total = 0;
#pragma unroll 4
  for (int k = 0; k < kRowSteps; ++k) {
    const int r = threadIdx.x / kTileCols + kRowStep * k;
    if (ti * kTileRows + r < j && j < K) total += ortho_pair_term(mode, gram[r * kLdc + col]);
  }
  total = group_sum<kWarp>(total);
  if (threadIdx.x % kWarp == 0) warp_total[threadIdx.x / kWarp] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    A sum = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) sum += warp_total[w];
    partial[blockIdx.x] = sum;
  }
}

template <class T> __device__ __forceinline__ T from_float(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Tensor-core gradient. Block (c, ti) owns rows ti * 64 .. ti * 64 + 63 of dyn[c] = grad_norm * W Y_c, where
// W_ij = pair_grad(g_ij) for i != j < K and 0 on the diagonal and beyond K. For each column tile tj it recomputes
// the Gram tile (ti, tj) as the forward does (ti > tj: the mirror of a forward tile), writes W's tile in the input
// type (its entries -1, 0, 1, 2 or NaN are exact in fp16, bf16 and TF32), then runs W_tile @ Y_c[tj rows] 64
// features at a time and adds it into dyn (tj > 0 adds to what tj - 1 wrote; the same thread owns an element
// throughout, so no race).
// W [64][kLw] is A row-major (m = i, k = j); the Y stage ys [64][kLw], ys[k][n] = Y_c[tj 64 + k][d0 + n], is B
// row-major. kLw = 64 + 16 / sizeof(T): rows of 144 B (fp16/bf16) or 272 B (fp32); fragment offsets are then
// 16-row steps of 2304 B / 4352 B (W), k steps of 32 B (W) or 2304 B / 2176 B (ys) and column offsets of
// 32 B multiples: all 32-byte aligned, as WMMA requires.
template <class Product>
__global__ void __launch_bounds__(kThreads) ortho_bwd_tc_kernel(const typename Product::Input* __restrict__ yn,
                                                                std::int64_t K, std::int64_t D, std::int64_t tiles,
                                                                int mode, float grad_norm, float* __restrict__ dyn) {
  using T = typename Product::Input;
  using Operand = typename MmaShape<T>::Operand;
  constexpr int kK = Product::kK;
  constexpr int kLw = kTileCols + 16 / int(sizeof(T));
  static_assert(kTileCols * kLw * int(sizeof(T)) <= Product::kSmemBytes &&
                    kTileRows * kLdc * int(sizeof(float)) <= Product::kSmemBytes,
                "the Y stage and the output tile reuse the product's memory");
  __shared__ __align__(32) unsigned char smem[Product::kSmemBytes];  // Gram tile, then Y stage / output tile
  __shared__ __align__(32) T w[kTileRows * kLw];
  const std::int64_t c = blockIdx.x / tiles, ti = blockIdx.x % tiles;
  const T* yc = yn + c * K * D;
  float* out = dyn + c * K * D;
  const int warp = threadIdx.x / kWarp;
  const int wm = warp / 2, wn = warp % 2;  // the warp's 16 x 32 block of the output tile, as in TensorProduct
  T* ys = reinterpret_cast<T*>(smem);
  float* tile = reinterpret_cast<float*>(smem);
  for (std::int64_t tj = 0; tj < tiles; ++tj) {
    Product::run(yc, yc, K, K, D, ti * kTileRows, tj * kTileCols, smem);  // begins with a barrier: w is free
    for (int e = threadIdx.x; e < kTileRows * kTileCols; e += kThreads) {
      const int r = e / kTileCols, col = e % kTileCols;
      const std::int64_t i = ti * kTileRows + r, j = tj * kTileCols + col;
      w[r * kLw + col] = from_float<T>(i != j && i < K && j < K ? ortho_pair_grad(mode, tile[r * kLdc + col]) : 0.0f);
    }
    for (std::int64_t d0 = 0; d0 < D; d0 += kTileCols) {
      __syncthreads();  // w is written and the Gram tile (or the last output tile) read: smem is free
      for (int e = threadIdx.x; e < kTileCols * kTileCols; e += kThreads) {
        const int k = e / kTileCols, n = e % kTileCols;
        const std::int64_t j = tj * kTileCols + k, d = d0 + n;
        ys[k * kLw + n] = j < K && d < D ? yc[j * D + d] : zero_value<T>();
      }
      __syncthreads();
      wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2];
      wmma::fill_fragment(acc[0], 0.0f);
      wmma::fill_fragment(acc[1], 0.0f);
#pragma unroll
      for (int kk = 0; kk < kTileCols; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, Operand, wmma::row_major> a;
        wmma::load_matrix_sync(a, w + 16 * wm * kLw + kk, kLw);
        if constexpr (std::is_same_v<T, float>) round_to_tf32(a);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, kK, Operand, wmma::row_major> b;
          wmma::load_matrix_sync(b, ys + kk * kLw + 32 * wn + 16 * f, kLw);
          if constexpr (std::is_same_v<T, float>) round_to_tf32(b);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
      __syncthreads();  // every warp is done with ys: the output tile takes its place
#pragma unroll
      for (int f = 0; f < 2; ++f)
        wmma::store_matrix_sync(tile + 16 * wm * kLdc + 32 * wn + 16 * f, acc[f], kLdc, wmma::mem_row_major);
      __syncthreads();
      const int col = threadIdx.x % kTileCols;
      const std::int64_t d = d0 + col;
#pragma unroll 4
      for (int k = 0; k < kRowSteps; ++k) {
        const int r = threadIdx.x / kTileCols + kRowStep * k;
        const std::int64_t i = ti * kTileRows + r;
        if (i < K && d < D) {
          const std::int64_t o = i * D + d;
          const float v = grad_norm * tile[r * kLdc + col];
          out[o] = tj == 0 ? v : out[o] + v;
        }
      }
    }
  }
}

// One block: thread t adds partial[t], partial[t + 1024], ... in order, then a fixed tree; out = norm * total.
template <class A>
__global__ void __launch_bounds__(kSumThreads) ortho_sum_kernel(const A* __restrict__ partial, std::int64_t n,
                                                                A norm, A* __restrict__ out) {
  __shared__ A sums[kSumThreads];
  A sum = 0;
  for (std::int64_t k = threadIdx.x; k < n; k += kSumThreads) sum += partial[k];
  sums[threadIdx.x] = sum;
  __syncthreads();
#pragma unroll
  for (int stride = kSumThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = norm * sums[0];
}

// Exact gradient (fp32 without TF32, fp64): warp per prompt row (c, i),
// dyn_ci = grad * norm * sum_{j != i} pair_grad(g_cij) yn_cj.
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
  dispatch_product(fn, dtype, [&](auto product) {
    using P = decltype(product);
    using A = typename P::A;
    DeviceGuard guard(fn, yn);
    const cudaStream_t s = as_stream(stream);
    const std::int64_t tiles = gram_tiles(K), blocks = C * (tiles * (tiles + 1) / 2);
    if (blocks > 0x7fffffff) invalid(fn, "too many Gram tiles for one launch");
    Scratch partial(fn, std::size_t(blocks) * sizeof(A), s);
    ortho_gram_kernel<P><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
        static_cast<const typename P::Input*>(yn), K, D, tiles, mode, partial.as<A>());
    check_launch(fn);
    ortho_sum_kernel<A><<<1, kSumThreads, 0, s>>>(partial.as<A>(), blocks, ortho_norm<A>(mode, C, K),
                                                  static_cast<A*>(out_loss));
    check_launch(fn);
  });
}

void ortho_bwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, double grad, void* out_dyn,
               int dtype, Stream stream) {
  const char* fn = "ortho_bwd_cuda";
  check_prompts(fn, C, K, D, mode, yn);
  require_ptr(fn, "out_dyn", out_dyn);
  dispatch_product(fn, dtype, [&](auto product) {
    using P = decltype(product);
    using T = typename P::Input;
    using A = typename P::A;
    DeviceGuard guard(fn, yn);
    const cudaStream_t s = as_stream(stream);
    const A grad_norm = A(grad) * ortho_norm<A>(mode, C, K);
    if constexpr (std::is_same_v<P, TensorProduct<T>>) {
      const std::int64_t tiles = gram_tiles(K), blocks = C * tiles;
      if (blocks > 0x7fffffff) invalid(fn, "too many prompt row tiles for one launch");
      ortho_bwd_tc_kernel<P><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          static_cast<const T*>(yn), K, D, tiles, mode, grad_norm, static_cast<float*>(out_dyn));
    } else {
      ortho_bwd_kernel<T, A><<<blocks_for(C * K, kRowsPerBlock), kRowThreads, 0, s>>>(
          static_cast<const T*>(yn), C, K, D, mode, grad_norm, static_cast<A*>(out_dyn));
    }
    check_launch(fn);
  });
}

}  // namespace pk::cuda
