// CPU segment_stats, xent_fwd and xent_bwd: one pass over each row of the precomputed cosine matrix, folded
// into the online max / sum-exp state chunk by chunk (a chunk's max pass and exp pass both hit L1). The chunk and
// row loops have portable versions here and AVX-512 and AVX2 ones for float (cpu/avx512.h, cpu/avx2.h), chosen
// once per call. The multilabel kind has no softmax: one vector pass of independent per-column terms.
// cosine_segment_stats fuses segment_stats into the CPU's own product (cpu/product.h).
#include <algorithm>
#include <string>
#include <type_traits>

#include "common/checks.h"
#include "common/online_lse.h"
#include "common/xent.h"
#include "cpu/avx2.h"
#include "cpu/avx512.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/product.h"

namespace pk::cpu {
namespace {

// max and min of z = scale * x[0, len) and sum_i exp(z_i - lse_shift(max)): the portable loops.
template <class A> PK_CPU_CLONES void chunk_stats(const A* x, std::int64_t len, A scale, A& max, A& min, A& sum) {
  scaled_max_min(x, len, scale, max, min);
  const A shift = lse_shift(max);
  A total = 0;
#pragma omp simd reduction(+ : total)
  for (std::int64_t i = 0; i < len; ++i) total += exp_acc(mul_rn(scale, x[i]) - shift);
  sum = total;
}

template <class A> using ChunkStats = void (*)(const A*, std::int64_t, A, A&, A&, A&);

// The portable chunk loop, or the AVX-512 or AVX2 one for float on a CPU that has it.
template <class A> ChunkStats<A> chunk_stats_for_cpu() {
  if constexpr (std::is_same_v<A, float>) {
#if PK_HAVE_AVX512
    if (avx512_usable()) return chunk_stats_512;
#endif
#if PK_HAVE_AVX2
    if (avx2_usable()) return chunk_stats_256;
#endif
  }
  return chunk_stats<A>;
}

// Folds x[0, len), columns of one segment scaled by `scale`, into the segment's running state, chunk by chunk.
template <class A> void fold_segment(const A* x, std::int64_t len, A scale, ChunkStats<A> chunk, LseState<A>& st,
                                     A& seg_min) {
  for (std::int64_t c0 = 0; c0 < len; c0 += kChunk) {
    A max, min, sum;
    chunk(x + c0, std::min(kChunk, len - c0), scale, max, min, sum);
    st = lse_merge(st, LseState<A>{max, sum});
    seg_min = min < seg_min ? min : seg_min;
  }
}

template <class A> void segment_rows(const A* cos, std::int64_t N, std::int64_t begin, std::int64_t end,
                                     const std::int64_t* offsets, const A* scales, std::int64_t S, A* out_max,
                                     A* out_min, A* out_lse, ChunkStats<A> chunk) {
  for (std::int64_t b = begin; b < end; ++b) {
    const A* row = cos + b * N;
    for (std::int64_t s = 0; s < S; ++s) {
      LseState<A> st = lse_empty<A>();
      A seg_min = infinity<A>();
      fold_segment(row + offsets[s], offsets[s + 1] - offsets[s], scales[s], chunk, st, seg_min);
      segment_finish(st, seg_min, out_max + b * S + s, out_min + b * S + s, out_lse + b * S + s);
    }
  }
}

// One chunk [c0, c0 + len) of a cross-entropy row (target: the row's dense targets): the portable loops.
template <class A, int KIND> PK_CPU_CLONES XentState<A> xent_chunk(const A* row, const A* target, std::int64_t c0,
                                                                   std::int64_t len, std::int64_t label, A inv_n,
                                                                   A scale) {
  const A max = scaled_max(row + c0, len, scale);
  const A shift = lse_shift(max);
  A sum = 0, weighted = 0, weight = 0;
#pragma omp simd reduction(+ : sum, weighted, weight)
  for (std::int64_t i = 0; i < len; ++i) {
    const std::int64_t n = c0 + i;
    const A z = mul_rn(scale, row[n]);
    const A w = xent_weight<KIND>(n, label, inv_n, KIND == kXentDense ? target[n] : A(0));
    sum += exp_acc(z - shift);
    weighted += w * (z - shift);
    weight += w;
  }
  return {{max, sum}, weighted, weight};
}

// out[n] = d loss / d cos[n] for one row of N columns: the portable loop.
template <class A, int KIND> PK_CPU_CLONES void xent_bwd_row(const A* row, const A* target, std::int64_t N,
                                                             std::int64_t label, A inv_n, A scale, A grad_scale,
                                                             A mass, A row_lse, A* out) {
#pragma omp simd
  for (std::int64_t n = 0; n < N; ++n) {
    const A w = xent_weight<KIND>(n, label, inv_n, KIND == kXentDense ? target[n] : A(0));
    out[n] = xent_dcos(grad_scale, mass, exp_acc(mul_rn(scale, row[n]) - row_lse), w);
  }
}

template <class A> using XentChunk = XentState<A> (*)(const A*, const A*, std::int64_t, std::int64_t, std::int64_t,
                                                      A, A);
template <class A> using XentBwdRow = void (*)(const A*, const A*, std::int64_t, std::int64_t, A, A, A, A, A, A*);

// The portable loops, or the AVX-512 or AVX2 ones for float on a CPU that has them.
template <class A, int KIND> XentChunk<A> xent_chunk_for_cpu() {
  if constexpr (std::is_same_v<A, float>) {
#if PK_HAVE_AVX512
    if (avx512_usable()) return xent_chunk_512<KIND>;
#endif
#if PK_HAVE_AVX2
    if (avx2_usable()) return xent_chunk_256<KIND>;
#endif
  }
  return xent_chunk<A, KIND>;
}

template <class A, int KIND> XentBwdRow<A> xent_bwd_row_for_cpu() {
  if constexpr (std::is_same_v<A, float>) {
#if PK_HAVE_AVX512
    if (avx512_usable()) return xent_bwd_row_512<KIND>;
#endif
#if PK_HAVE_AVX2
    if (avx2_usable()) return xent_bwd_row_256<KIND>;
#endif
  }
  return xent_bwd_row<A, KIND>;
}

template <class A, int KIND> void xent_fwd_rows(const A* cos, std::int64_t N, std::int64_t begin, std::int64_t end,
                                                A scale, const std::int64_t* labels, const A* targets, A* out_loss,
                                                A* out_lse) {
  const XentChunk<A> chunk = xent_chunk_for_cpu<A, KIND>();
  const A inv_n = A(1) / A(N);
  for (std::int64_t b = begin; b < end; ++b) {
    const A* row = cos + b * N;
    const A* target = KIND == kXentDense ? targets + b * N : nullptr;
    const std::int64_t label = KIND == kXentIndex ? labels[b] : -1;
    XentState<A> st = xent_empty<A>();
    for (std::int64_t c0 = 0; c0 < N; c0 += kChunk)
      st = xent_merge(st, chunk(row, target, c0, std::min(kChunk, N - c0), label, inv_n, scale));
    out_lse[b] = lse_value(st.lse);
    out_loss[b] = xent_loss(xent_mass<KIND>(st.weight), st);
  }
}

template <class A, int KIND> void xent_bwd_rows(const A* cos, std::int64_t N, std::int64_t begin, std::int64_t end,
                                                A scale, const std::int64_t* labels, const A* targets, const A* lse,
                                                const A* grad_loss, A* out_dcos) {
  const XentBwdRow<A> bwd_row = xent_bwd_row_for_cpu<A, KIND>();
  const A inv_n = A(1) / A(N);
  for (std::int64_t b = begin; b < end; ++b) {
    const A* target = KIND == kXentDense ? targets + b * N : nullptr;
    A weight = 0;
    if (KIND == kXentDense) {
#pragma omp simd reduction(+ : weight)
      for (std::int64_t n = 0; n < N; ++n) weight += target[n];
    }
    bwd_row(cos + b * N, target, N, KIND == kXentIndex ? labels[b] : -1, inv_n, scale, grad_loss[b] * scale,
            xent_mass<KIND>(weight), lse[b], out_dcos + b * N);
  }
}

template <class A> PK_CPU_CLONES void multilabel_fwd_rows(const A* cos, std::int64_t N, std::int64_t begin,
                                                           std::int64_t end, A scale, const std::int64_t* labels,
                                                           std::int64_t group, A* out_loss, A* out_lse) {
  for (std::int64_t b = begin; b < end; ++b) {
    const A* row = cos + b * N;
    const GroupCols cols = multilabel_cols(labels[b], group);
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t n = 0; n < N; ++n) sum += multilabel_term(mul_rn(scale, row[n]), multilabel_sign<A>(n, cols));
    out_loss[b] = sum / A(N);
    out_lse[b] = A(0);  // the multilabel backward needs no row statistic
  }
}

template <class A> PK_CPU_CLONES void multilabel_bwd_rows(const A* cos, std::int64_t N, std::int64_t begin,
                                                           std::int64_t end, A scale, const std::int64_t* labels,
                                                           std::int64_t group, const A* grad_loss, A* out_dcos) {
  for (std::int64_t b = begin; b < end; ++b) {
    const A* row = cos + b * N;
    const GroupCols cols = multilabel_cols(labels[b], group);
    const A grad_scale = grad_loss[b] * scale / A(N);
    A* out = out_dcos + b * N;
#pragma omp simd
    for (std::int64_t n = 0; n < N; ++n)
      out[n] = multilabel_dcos(grad_scale, mul_rn(scale, row[n]), multilabel_sign<A>(n, cols));
  }
}

void check_xent(const char* fn, const void* cos, std::int64_t B, std::int64_t N, int kind,
                const std::int64_t* labels, const void* targets, std::int64_t group) {
  require_at_least(fn, "B", B, 0);
  require_at_least(fn, "N", N, 1);
  require_kind(fn, kind);
  require_at_least(fn, "group", group, 1);
  if (kind == kXentMultilabel && N % group != 0)
    invalid(fn, "N = " + std::to_string(N) + " is not a multiple of group = " + std::to_string(group));
  if (B > 0) require_ptr(fn, "cos", cos);
  if ((kind == kXentIndex || kind == kXentMultilabel) && B > 0) {
    // index labels name a column, multilabel labels a group of columns
    const std::int64_t classes = kind == kXentIndex ? N : N / group;
    const std::string bound = kind == kXentIndex ? "N = " : "N / group = ";
    require_ptr(fn, "labels", labels);
    for (std::int64_t b = 0; b < B; ++b)
      if (labels[b] < 0 || labels[b] >= classes)
        invalid(fn, "labels[" + std::to_string(b) + "] = " + std::to_string(labels[b]) + " is outside [0, " + bound +
                        std::to_string(classes) + ")");
  }
  if (kind == kXentDense && B > 0) require_ptr(fn, "targets", targets);
}

void check_segments(const char* fn, std::int64_t B, std::int64_t N, const std::int64_t* seg_offsets,
                    const void* seg_scales, std::int64_t S) {
  require_at_least(fn, "B", B, 0);
  require_at_least(fn, "N", N, 1);
  require_at_least(fn, "S", S, 1);
  require_ptr(fn, "seg_offsets", seg_offsets);
  require_ptr(fn, "seg_scales", seg_scales);
  if (seg_offsets[0] != 0 || seg_offsets[S] != N)
    invalid(fn, "seg_offsets must start at 0 and end at N = " + std::to_string(N) + ", got " +
                    std::to_string(seg_offsets[0]) + " ... " + std::to_string(seg_offsets[S]));
  for (std::int64_t s = 0; s < S; ++s)
    if (seg_offsets[s + 1] < seg_offsets[s])
      invalid(fn, "seg_offsets must not decrease, got seg_offsets[" + std::to_string(s) + "] = " +
                      std::to_string(seg_offsets[s]) + " and seg_offsets[" + std::to_string(s + 1) + "] = " +
                      std::to_string(seg_offsets[s + 1]));
}

#if PK_HAVE_AVX2
// The segment statistics of each strip of unit_product's cosines, folded into per-(row, segment) states that live
// in the outputs until a row's last strip: out_max holds the running max, out_min the min, out_lse the sum-exp.
struct SegmentEpilogue {
  const std::int64_t* offsets;
  const float* scales;
  std::int64_t S;
  float *out_max, *out_min, *out_lse;
  ChunkStats<float> chunk = chunk_stats_for_cpu<float>();

  void block(std::int64_t r0, std::int64_t rows, std::int64_t n0, std::int64_t cols, const float* strip,
             std::int64_t ldc) const {
    // the segments that meet columns [n0, n0 + cols): from the first that ends past n0 (NegLabel has 101)
    const std::int64_t first = std::upper_bound(offsets + 1, offsets + S + 1, n0) - (offsets + 1);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t at = (r0 + r) * S;
      if (n0 == 0)
        for (std::int64_t s = 0; s < S; ++s) {
          out_max[at + s] = -infinity<float>();
          out_min[at + s] = infinity<float>();
          out_lse[at + s] = 0.0f;
        }
      for (std::int64_t s = first; s < S && offsets[s] < n0 + cols; ++s) {
        const std::int64_t lo = std::max(offsets[s], n0), hi = std::min(offsets[s + 1], n0 + cols);
        LseState<float> st{out_max[at + s], out_lse[at + s]};
        float seg_min = out_min[at + s];
        fold_segment(strip + r * ldc + (lo - n0), hi - lo, scales[s], chunk, st, seg_min);
        out_max[at + s] = st.max;
        out_lse[at + s] = st.sum;
        out_min[at + s] = seg_min;
      }
    }
  }

  void done(std::int64_t r0, std::int64_t rows) const {
    for (std::int64_t i = r0 * S; i < (r0 + rows) * S; ++i)
      segment_finish(LseState<float>{out_max[i], out_lse[i]}, out_min[i], out_max + i, out_min + i, out_lse + i);
  }
};
#endif

}  // namespace

void segment_stats(const void* cos, std::int64_t B, std::int64_t N, const std::int64_t* seg_offsets,
                   const void* seg_scales, std::int64_t S, void* out_max, void* out_min, void* out_lse, int dtype) {
  const char* fn = "segment_stats_cpu";
  check_segments(fn, B, N, seg_offsets, seg_scales, S);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    if (B == 0) return;
    require_ptr(fn, "cos", cos);
    require_ptr(fn, "out_max", out_max);
    require_ptr(fn, "out_min", out_min);
    require_ptr(fn, "out_lse", out_lse);
    const ChunkStats<A> chunk = chunk_stats_for_cpu<A>();
    parallel_ranges(B, B * N, [&](std::int64_t begin, std::int64_t end) {
      segment_rows<A>(static_cast<const A*>(cos), N, begin, end, seg_offsets, static_cast<const A*>(seg_scales), S,
                      static_cast<A*>(out_max), static_cast<A*>(out_min), static_cast<A*>(out_lse), chunk);
    });
  });
}

void xent_fwd(const void* cos, std::int64_t B, std::int64_t N, double scale, int kind, const std::int64_t* labels,
              const void* targets, void* out_loss, void* out_lse, int dtype, std::int64_t group) {
  const char* fn = "xent_fwd_cpu";
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    check_xent(fn, cos, B, N, kind, labels, targets, group);
    if (B > 0) {
      require_ptr(fn, "out_loss", out_loss);
      require_ptr(fn, "out_lse", out_lse);
    }
    if (kind == kXentMultilabel) {
      parallel_ranges(B, B * N, [&](std::int64_t begin, std::int64_t end) {
        multilabel_fwd_rows<A>(static_cast<const A*>(cos), N, begin, end, A(scale), labels, group,
                               static_cast<A*>(out_loss), static_cast<A*>(out_lse));
      });
      return;
    }
    dispatch_kind(fn, kind, [&](auto kind_tag) {
      parallel_ranges(B, B * N, [&](std::int64_t begin, std::int64_t end) {
        xent_fwd_rows<A, decltype(kind_tag)::value>(static_cast<const A*>(cos), N, begin, end, A(scale), labels,
                                                    static_cast<const A*>(targets), static_cast<A*>(out_loss),
                                                    static_cast<A*>(out_lse));
      });
    });
  });
}

void xent_bwd(const void* cos, std::int64_t B, std::int64_t N, double scale, int kind, const std::int64_t* labels,
              const void* targets, const void* lse, const void* grad_loss, void* out_dcos, int dtype,
              std::int64_t group) {
  const char* fn = "xent_bwd_cpu";
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using A = decltype(tag);
    check_xent(fn, cos, B, N, kind, labels, targets, group);
    if (B > 0) {
      require_ptr(fn, "lse", lse);
      require_ptr(fn, "grad_loss", grad_loss);
      require_ptr(fn, "out_dcos", out_dcos);
    }
    if (kind == kXentMultilabel) {
      parallel_ranges(B, B * N, [&](std::int64_t begin, std::int64_t end) {
        multilabel_bwd_rows<A>(static_cast<const A*>(cos), N, begin, end, A(scale), labels, group,
                               static_cast<const A*>(grad_loss), static_cast<A*>(out_dcos));
      });
      return;
    }
    dispatch_kind(fn, kind, [&](auto kind_tag) {
      parallel_ranges(B, B * N, [&](std::int64_t begin, std::int64_t end) {
        xent_bwd_rows<A, decltype(kind_tag)::value>(static_cast<const A*>(cos), N, begin, end, A(scale), labels,
                                                    static_cast<const A*>(targets), static_cast<const A*>(lse),
                                                    static_cast<const A*>(grad_loss), static_cast<A*>(out_dcos));
      });
    });
  });
}

bool product_usable() { return avx2_usable(); }

const char* vector_isa() { return avx512_usable() ? "avx512" : avx2_usable() ? "avx2" : "portable"; }

void cosine_segment_stats(const float* image, std::int64_t B, std::int64_t D, const RowSource* text,
                          std::int64_t sources, double eps, const std::int64_t* seg_offsets, const float* seg_scales,
                          std::int64_t S, float* out_max, float* out_min, float* out_lse) {
  const char* fn = "cosine_segment_stats_cpu";
  require_at_least(fn, "D", D, 1);
  std::int64_t N = 0;
  for (std::int64_t s = 0; s < sources; ++s) {
    require_at_least(fn, "text rows", text[s].count, 0);
    require_at_least(fn, "text row stride", text[s].stride, D);
    if (text[s].count > 0) require_ptr(fn, "text", text[s].data);
    N += text[s].count;
  }
  check_segments(fn, B, N, seg_offsets, seg_scales, S);
  if (!product_usable()) invalid(fn, "this CPU has no AVX2 and FMA (see product_usable_cpu)");
  if (B == 0) return;
  require_ptr(fn, "image", image);
  require_ptr(fn, "out_max", out_max);
  require_ptr(fn, "out_min", out_min);
  require_ptr(fn, "out_lse", out_lse);
#if PK_HAVE_AVX2
  const SegmentEpilogue epilogue{seg_offsets, seg_scales, S, out_max, out_min, out_lse};
  unit_product(image, B, D, text, N, float(eps), epilogue);
#endif
}

}  // namespace pk::cpu
