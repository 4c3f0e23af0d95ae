// The CPU's own fp32 product of unit rows, cos = normalize(X) @ normalize(T)^T, for the ops whose every use of
// the [B, N] cosines is one pass over each row (the scores): an epilogue reads each 6-row strip of the product
// while it is still in L1, so the [B, N] matrix never reaches memory. Both operands are normalised while they are
// packed (times the inverse of l2norm_fwd's clamped norm), which replaces the op layer's normalisation and
// concatenation passes.
//
// AVX2 + FMA. The register tile is BLIS's Haswell one: 6 broadcast image rows x 16 text columns in two vectors
// (12 accumulators of the 16 registers). The image is packed into 6-row tiles and the text, one window of columns
// at a time, into 16-column panels, both depth-major. As in BLIS, one panel's depth block stays in L1 while a
// block of image tiles streams past it from L2.
// Why a product of our own: MKL's sgemm runs at 64 % of the FMA peak of an AVX2-only AMD core (59 of 93 GFLOP/s,
// Zen 3; benchmarks/README.md), and the fused epilogue saves the [B, N] round trip through memory besides.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "common/rows.h"
#include "cpu/avx2.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace pk::cpu {

#if PK_HAVE_AVX2

constexpr std::int64_t kTileRows = 6;             // image rows broadcast per register tile
constexpr std::int64_t kTileCols = 16;            // text columns per register tile (two 8-float vectors)
constexpr std::int64_t kDepth = 256;              // depth block: a text panel's (16 x 256 floats, 16 KB) stays in L1
constexpr std::int64_t kBlockTiles = 8;           // image tiles per work item: 48 rows (96 KB at D = 512) in L2
constexpr std::int64_t kWindowBytes = 128 << 10;  // a window's packed text: half the L2 of the smallest AVX2 cores

// A 64-byte aligned float buffer that keeps its storage between calls.
class Scratch {
 public:
  float* get(std::int64_t count) {
    if (count > capacity_) {
      const std::size_t bytes = (static_cast<std::size_t>(count) * sizeof(float) + 63) / 64 * 64;
      data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      if (!data_) throw std::bad_alloc();
      capacity_ = count;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> data_;
  std::int64_t capacity_ = 0;
};

// The calling thread's scratch buffer `slot`, kept for its next call: a call neither allocates nor page-faults
// fresh memory in (the packed image of B = 4096 rows is 8 MB).
inline float* scratch(int slot, std::int64_t count) {
  thread_local Scratch buffers[3];
  return buffers[slot].get(count);
}

// 1 / max(|x|, eps) of a row of D floats: l2norm_fwd's clamped norm (a NaN row gives NaN).
PK_AVX2 inline float inverse_norm(const float* x, std::int64_t D, float eps) {
  __m256 sumsq = _mm256_setzero_ps();
  std::int64_t k = 0;
  for (; k + 8 <= D; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    sumsq = _mm256_fmadd_ps(v, v, sumsq);
  }
  if (k < D) {
    const __m256 v = _mm256_maskload_ps(x + k, lanes_below(D - k));
    sumsq = _mm256_fmadd_ps(v, v, sumsq);
  }
  return 1.0f / l2_clamped_norm(reduce_add_256(sumsq), eps);
}

// Transposes the 8 x 8 floats in r[0..8) in place (r[i] lane j <-> r[j] lane i).
PK_AVX2 inline void transpose_8x8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {  // pairs of rows, interleaved by 32 bits
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then by 64 bits: each 128-bit half holds one column of 4 rows
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {  // then the halves of rows 0-3 and 4-7
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// Rows [first, first + W) of the sources stacked in order (`total` rows in all, first < total), normalised and
// laid out depth-major: out[k * W + i] = row_{first + i}[k] / |row_{first + i}|, 0 for rows past `total` (unless
// row `first` holds NaN or inf: padding is only ever read into outputs that no epilogue sees). Each row is read
// along its contiguous depth, eight rows at a time through a register transpose.
template <int W> PK_AVX2 void pack_unit_rows(const RowSource* sources, std::int64_t total, std::int64_t first,
                                             std::int64_t D, float eps, float* out) {
  constexpr int kGroup = (W + 7) / 8 * 8;
  const float* rows[kGroup];
  alignas(32) float inv[kGroup] = {};
  std::int64_t base = 0;  // sources[s] holds the stacked rows [base, base + count)
  for (int i = 0, s = 0; i < kGroup; ++i) {
    const std::int64_t n = first + i;
    if (i >= W || n >= total) {  // padding: read row `first`, weighted 0
      rows[i] = rows[0];
      continue;
    }
    while (n >= base + sources[s].count) base += sources[s++].count;
    rows[i] = sources[s].data + (n - base) * sources[s].stride;
    inv[i] = inverse_norm(rows[i], D, eps);
  }
  for (int c0 = 0; c0 < W; c0 += 8) {
    const bool whole = W - c0 >= 8;
    const __m256i lanes = lanes_below(W - c0);
    const __m256 scale = _mm256_load_ps(inv + c0);
    for (std::int64_t k0 = 0; k0 < D; k0 += 8) {
      const std::int64_t depth = std::min<std::int64_t>(8, D - k0);
      const __m256i cols = lanes_below(depth);
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = depth == 8 ? _mm256_loadu_ps(rows[c0 + i] + k0) : _mm256_maskload_ps(rows[c0 + i] + k0, cols);
      transpose_8x8(r);
      for (std::int64_t j = 0; j < depth; ++j) {
        float* to = out + (k0 + j) * W + c0;
        if (whole)
          _mm256_storeu_ps(to, _mm256_mul_ps(r[j], scale));
        else
          _mm256_maskstore_ps(to, lanes, _mm256_mul_ps(r[j], scale));
      }
    }
  }
}

// c[i * ldc + n] (+)= sum_k a[k * 6 + i] * b[k * 16 + n] over `depth` steps: one 6 x 16 register tile. b is
// 32-byte aligned.
template <bool ACCUMULATE> PK_AVX2 inline void tile_product(std::int64_t depth, const float* a, const float* b,
                                                            float* c, std::int64_t ldc) {
  __m256 acc[kTileRows][2];
#pragma GCC unroll 6
  for (int i = 0; i < kTileRows; ++i) {
    acc[i][0] = ACCUMULATE ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    acc[i][1] = ACCUMULATE ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (std::int64_t k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kTileCols), b1 = _mm256_load_ps(b + k * kTileCols + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kTileRows; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + k * kTileRows + i);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < kTileRows; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc[i][0]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
  }
}

// strips[t][i * ldc + n] = sum_k tile_t(i, k) * panels(k, n) for `count` consecutive packed image tiles (strip t at
// strips + t * 6 * ldc) and the first `cols` columns (a multiple of 16) of the packed text panels. BLIS's loop
// order: a depth block of one panel (16 KB) stays in L1 while the tiles' depth blocks stream past it from L2.
PK_AVX2 inline void block_product(const float* tiles, std::int64_t count, const float* panels, std::int64_t D,
                                  std::int64_t cols, float* strips, std::int64_t ldc) {
  for (std::int64_t k0 = 0; k0 < D; k0 += kDepth) {
    const std::int64_t depth = std::min(kDepth, D - k0);
    for (std::int64_t n = 0; n < cols; n += kTileCols) {
      const float* b = panels + n * D + k0 * kTileCols;
      for (std::int64_t t = 0; t < count; ++t) {
        const float* a = tiles + t * kTileRows * D + k0 * kTileRows;
        float* c = strips + t * kTileRows * ldc + n;
        if (k0 == 0)
          tile_product<false>(depth, a, b, c, ldc);
        else
          tile_product<true>(depth, a, b, c, ldc);
      }
    }
  }
}

// Columns per window: packed text of at most kWindowBytes (at least one panel), no wider than N needs.
inline std::int64_t window_columns(std::int64_t N, std::int64_t D) {
  const std::int64_t fit = std::max<std::int64_t>(1, kWindowBytes / (D * std::int64_t(sizeof(float))) / kTileCols);
  return std::min(fit, (N + kTileCols - 1) / kTileCols) * kTileCols;
}

// Calls epilogue.block(r0, rows, n0, cols, strip, ldc) for every strip of cos = unit(image) unit(text)^T: rows
// [r0, r0 + rows) (one 6-row tile), columns [n0, n0 + cols) (one window), row-major with leading dimension ldc;
// the strips of one tile arrive in column order, then epilogue.done(r0, rows). Strips of different tiles run on
// different threads at once. image [B, D] has contiguous rows; the text is the rows of the sources stacked in
// order (N in all); every row is normalised with l2norm's clamp at eps.
//
// The image is packed first; then the windows go in order: the threads pack a window's text panels into one
// buffer (so it stays in the cores' L2 instead of going to memory and back) and then claim its blocks of
// kBlockTiles tiles one at a time. A thread that the OS deschedules holds up one block, not a share of the rows.
template <class Epilogue>
void unit_product(const float* image, std::int64_t B, std::int64_t D, const RowSource* text, std::int64_t N,
                  float eps, const Epilogue& epilogue) {
  const std::int64_t tiles = (B + kTileRows - 1) / kTileRows, blocks = (tiles + kBlockTiles - 1) / kBlockTiles;
  const std::int64_t ldc = window_columns(N, D);
  float* packed_image = scratch(0, tiles * kTileRows * D);
  float* packed_text = scratch(1, ldc * D);
  const RowSource image_rows{image, B, D};
#pragma omp parallel if (B * N * D >= kParallelMinWork * 64)
  {
    float* strips = scratch(2, kBlockTiles * kTileRows * ldc);
#pragma omp for schedule(static)
    for (std::int64_t t = 0; t < tiles; ++t)
      pack_unit_rows<kTileRows>(&image_rows, B, t * kTileRows, D, eps, packed_image + t * kTileRows * D);
    for (std::int64_t n0 = 0; n0 < N; n0 += ldc) {
      const std::int64_t cols = std::min(ldc, N - n0), panels = (cols + kTileCols - 1) / kTileCols;
#pragma omp for schedule(static)
      for (std::int64_t j = 0; j < panels; ++j)
        pack_unit_rows<kTileCols>(text, N, n0 + j * kTileCols, D, eps, packed_text + j * kTileCols * D);
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t blk = 0; blk < blocks; ++blk) {
        const std::int64_t t0 = blk * kBlockTiles, count = std::min(kBlockTiles, tiles - t0);
        block_product(packed_image + t0 * kTileRows * D, count, packed_text, D, panels * kTileCols, strips, ldc);
        for (std::int64_t t = 0; t < count; ++t) {
          const std::int64_t r0 = (t0 + t) * kTileRows, rows = std::min(kTileRows, B - r0);
          epilogue.block(r0, rows, n0, cols, static_cast<const float*>(strips + t * kTileRows * ldc), ldc);
          if (n0 + ldc >= N) epilogue.done(r0, rows);
        }
      }
    }
  }
}

#endif

}  // namespace pk::cpu
