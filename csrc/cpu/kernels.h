// CPU (OpenMP) kernels behind promptkit._C's *_cpu functions. All arrays are contiguous row-major; inputs are
// float32 or float64 (`dtype` 0 or 1) and every output and every acc-type input (seg_scales, targets, lse,
// grad_loss, inv_norm, lam) has the same type. Bad arguments throw std::invalid_argument.
#pragma once

#include <cstdint>

namespace pk::cpu {

// cos [B, N]; seg_offsets int64 [S + 1] = 0 <= ... <= N; seg_scales [S]. Writes max, min and logsumexp of
// z = seg_scales[s] * cos over each segment's columns into out_max, out_min, out_lse [B, S] (-inf, +inf, -inf
// for an empty segment).
void segment_stats(const void* cos, std::int64_t B, std::int64_t N, const std::int64_t* seg_offsets,
                   const void* seg_scales, std::int64_t S, void* out_max, void* out_min, void* out_lse, int dtype);

// Rows [count, D] of a float matrix whose rows are `stride` floats apart (columns contiguous).
struct RowSource {
  const float* data;
  std::int64_t count;
  std::int64_t stride;
};

// Whether this CPU runs cosine_segment_stats (AVX2 and FMA).
bool product_usable();

// The vector loops this CPU runs: "avx512" (AVX-512F), "avx2" (AVX2 and FMA, no AVX-512F) or "portable".
const char* vector_isa();

// Segment statistics as segment_stats, of cos = unit(image) unit(text)^T computed by the CPU's own product
// (cpu/product.h), so the [B, N] cosines never reach memory: image [B, D] float32 rows, the text the rows of the
// `sources` RowSources stacked in order (N in all), every row normalised with l2norm's clamp at eps. Needs
// product_usable().
void cosine_segment_stats(const float* image, std::int64_t B, std::int64_t D, const RowSource* text,
                          std::int64_t sources, double eps, const std::int64_t* seg_offsets, const float* seg_scales,
                          std::int64_t S, float* out_max, float* out_min, float* out_lse);

// cos [B, N]; kind 0: labels int64 [B]; kind 1: uniform; kind 2: targets [B, N]; kind 3 (multilabel soft
// margin): labels int64 [B] in [0, N / group), y_bn = 1 iff n / group == labels[b]. Writes out_loss, out_lse [B]
// (out_lse is 0 for kind 3, whose backward needs no row statistic).
void xent_fwd(const void* cos, std::int64_t B, std::int64_t N, double scale, int kind, const std::int64_t* labels,
              const void* targets, void* out_loss, void* out_lse, int dtype, std::int64_t group);

// As xent_fwd plus lse [B] (from the forward) and grad_loss [B]; writes out_dcos [B, N].
void xent_bwd(const void* cos, std::int64_t B, std::int64_t N, double scale, int kind, const std::int64_t* labels,
              const void* targets, const void* lse, const void* grad_loss, void* out_dcos, int dtype,
              std::int64_t group);

// x [R, D] -> out_y [R, D] = x / max(|x|, eps), out_inv_norm [R].
void l2norm_fwd(const void* x, std::int64_t R, std::int64_t D, double eps, void* out_y, void* out_inv_norm,
                int dtype);

// dy, y [R, D], inv_norm [R] and the forward's eps -> out_dx [R, D].
void l2norm_bwd(const void* dy, const void* y, const void* inv_norm, std::int64_t R, std::int64_t D, double eps,
                void* out_dx, int dtype);

// a, b [B, D], lam [B] -> out [B, D] = normalize(lam * a + (1 - lam) * b).
void mix(const void* a, const void* b, const void* lam, std::int64_t B, std::int64_t D, void* out, int dtype);

// yn [C, K, D] unit rows -> out_loss (one scalar).
void ortho_fwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, void* out_loss, int dtype);

// yn [C, K, D], upstream scalar grad -> out_dyn [C, K, D].
void ortho_bwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, double grad, void* out_dyn,
               int dtype);

// OpenMP threads the kernels use (1 without OpenMP).
int max_threads();

}  // namespace pk::cpu
