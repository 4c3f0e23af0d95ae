// The tile product the fused CUDA kernels share: one 64 x 64 tile of x[rows] @ y[cols]^T (both [*, D], row-major)
// computed into shared memory, on tensor cores where the dtype allows (see dispatch_product), and the pieces its
// callers lay their work out with (block size, tile shape, the tile's row stride).
#pragma once

#include <mma.h>

#include <type_traits>

#include "cuda/launch.cuh"
#include "cuda/tf32.h"

namespace pk::cuda {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarpSize = 32;
constexpr int kTileRows = 64, kTileCols = 64;
constexpr int kSlice = 32;           // features staged in shared memory per step of the k loop
constexpr int kLdc = kTileCols + 4;  // row stride (elements) of the finished tile in shared memory
// Element-wise epilogues: thread t takes column t % 64 of the rows t / 64 + 4 k, k < 16; a warp touches 32
// consecutive columns of one row, so its global stores coalesce.
constexpr int kRowStep = kThreads / kTileCols;
constexpr int kRowSteps = kTileRows / kRowStep;
static_assert(kTileRows == kTileCols, "load_slice stages both operands with one loop");

template <class T> __device__ __forceinline__ T zero_value() { return T(0); }
template <> __device__ __forceinline__ __half zero_value<__half>() { return __float2half(0.0f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() { return __float2bfloat16(0.0f); }

// Stages features [k0, k0 + kSlice) of the 64 rows first .. first + 63 of src [*, D] into shared memory: element
// (m, k) goes to dst[m * ld + k], or dst[k * ld + m] when transposed; rows >= end and features >= D read as 0,
// so partial row tiles, column tiles and the last k slice (D % 32 != 0) add nothing to the product. A warp reads
// 32 consecutive features of one row (coalesced).
template <bool kTransposed, class T>
__device__ __forceinline__ void load_slice(T* __restrict__ dst, int ld, const T* __restrict__ src, std::int64_t first,
                                           std::int64_t end, std::int64_t D, std::int64_t k0) {
#pragma unroll
  for (int e = threadIdx.x; e < kTileRows * kSlice; e += kThreads) {
    const int m = e / kSlice, k = e % kSlice;
    const std::int64_t row = first + m, feature = k0 + k;
    dst[kTransposed ? k * ld + m : m * ld + k] = row < end && feature < D ? src[row * D + feature] : zero_value<T>();
  }
}

template <class T> struct MmaShape {
  static constexpr int k = 16;
  using Operand = T;
};
template <> struct MmaShape<float> {
  static constexpr int k = 8;
  using Operand = wmma::precision::tf32;
};

template <class Fragment> __device__ __forceinline__ void round_to_tf32(Fragment& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

// Tensor cores. Warp w computes the 16 x 32 block at tile rows 16 (w / 2), columns 32 (w % 2): one A fragment
// times two B fragments per k step. cos = img @ txt^T, so B (k x n) = txt^T, which is txt's rows staged as
// [n][k], i.e. B column-major with leading dimension kLd.
// WMMA's rules: fragment pointers 32-byte aligned, ld a multiple of 16 bytes. Rows are kLd = 32 + 16 / sizeof(T)
// elements (80 B for fp16/bf16, 144 B for fp32): a 16-row step is 1280 B or 2304 B, a k step (16 halves or 8
// floats) 32 B, the B stage starts at 64 kLd elements (5120 B or 9216 B); the finished tile (floats, kLdc = 68)
// is stored at 16-row steps of 4352 B and column offsets of 64 B. All multiples of 32.
template <class T> struct TensorProduct {
  using Input = T;
  using A = float;
  static constexpr int kK = MmaShape<T>::k;
  static constexpr int kLd = kSlice + 16 / int(sizeof(T));
  static constexpr int kStageBytes = 2 * kTileRows * kLd * int(sizeof(T));
  static constexpr int kTileBytes = kTileRows * kLdc * int(sizeof(float));
  static constexpr int kSmemBytes = kStageBytes > kTileBytes ? kStageBytes : kTileBytes;

  // The tile [row0, row0 + 64) x [col0, col0 + 64) of img @ txt^T (columns >= col_end as 0) into smem as
  // float [64][kLdc]. The stage and the tile share the memory.
  __device__ static void run(const T* __restrict__ img, const T* __restrict__ txt, std::int64_t B,
                             std::int64_t col_end, std::int64_t D, std::int64_t row0, std::int64_t col0,
                             unsigned char* smem) {
    using Operand = typename MmaShape<T>::Operand;
    T* as = reinterpret_cast<T*>(smem);
    T* bs = as + kTileRows * kLd;
    const int warp = threadIdx.x / kWarpSize;
    const int wm = warp / 2, wn = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    __syncthreads();  // the previous tile's epilogue has finished reading this memory
    for (std::int64_t k0 = 0; k0 < D; k0 += kSlice) {
      load_slice<false>(as, kLd, img, row0, B, D, k0);
      load_slice<false>(bs, kLd, txt, col0, col_end, D, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSlice; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, Operand, wmma::row_major> a;
        wmma::load_matrix_sync(a, as + 16 * wm * kLd + kk, kLd);
        if constexpr (std::is_same_v<T, float>) round_to_tf32(a);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, kK, Operand, wmma::col_major> b;
          wmma::load_matrix_sync(b, bs + (32 * wn + 16 * f) * kLd + kk, kLd);
          if constexpr (std::is_same_v<T, float>) round_to_tf32(b);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
      __syncthreads();  // every warp is done with this stage before the next is loaded (or the tile stored)
    }
    float* tile = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(tile + 16 * wm * kLdc + 32 * wn + 16 * f, acc[f], kLdc, wmma::mem_row_major);
    __syncthreads();
  }
};

// Exact products (fp32 without TF32, fp64): thread (ty, tx) = (t / 16, t % 16) accumulates rows ty + 16 i and
// columns tx + 16 j (i, j < 4) with FMAs. Stages are [k][m] with a +1 pad: the loads store conflict-free and a
// warp's k-loop reads are 2 broadcast rows and 16 consecutive columns.
template <class T> struct ScalarProduct {
  using Input = T;
  using A = T;
  static constexpr int kPer = 4;
  static constexpr int kLd = kTileRows + 1;
  static constexpr int kStageBytes = 2 * kSlice * kLd * int(sizeof(T));
  static constexpr int kTileBytes = kTileRows * kLdc * int(sizeof(T));
  static constexpr int kSmemBytes = kStageBytes > kTileBytes ? kStageBytes : kTileBytes;

  __device__ static void run(const T* __restrict__ img, const T* __restrict__ txt, std::int64_t B,
                             std::int64_t col_end, std::int64_t D, std::int64_t row0, std::int64_t col0,
                             unsigned char* smem) {
    constexpr int kSide = kTileRows / kPer;  // 16
    T* as = reinterpret_cast<T*>(smem);
    T* bs = as + kSlice * kLd;
    const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
    T acc[kPer][kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) acc[i][j] = T(0);
    __syncthreads();  // the previous tile's epilogue has finished reading this memory
    for (std::int64_t k0 = 0; k0 < D; k0 += kSlice) {
      load_slice<true>(as, kLd, img, row0, B, D, k0);
      load_slice<true>(bs, kLd, txt, col0, col_end, D, k0);
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kSlice; ++k) {
        T a[kPer], b[kPer];
#pragma unroll
        for (int i = 0; i < kPer; ++i) a[i] = as[k * kLd + ty + kSide * i];
#pragma unroll
        for (int j = 0; j < kPer; ++j) b[j] = bs[k * kLd + tx + kSide * j];
#pragma unroll
        for (int i = 0; i < kPer; ++i)
#pragma unroll
          for (int j = 0; j < kPer; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
    T* tile = reinterpret_cast<T*>(smem);
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) tile[(ty + kSide * i) * kLdc + tx + kSide * j] = acc[i][j];
    __syncthreads();
  }
};

// Calls f(Product{}) with the product for a dtype code: fp16 and bf16 on tensor cores (HMMA, fp32 accumulation),
// fp32 on tensor cores in TF32 where torch allows it and exactly otherwise, fp64 exactly.
template <class F> void dispatch_product(const char* fn, int dtype, const F& f) {
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      f(ScalarProduct<double>{});
    } else if constexpr (std::is_same_v<T, float>) {
      if (torch_allows_tf32()) f(TensorProduct<float>{}); else f(ScalarProduct<float>{});
    } else {
      f(TensorProduct<T>{});
    }
  });
}

}  // namespace pk::cuda
