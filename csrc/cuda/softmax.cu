// Cosine logits and the softmax-like reductions over them, fused, with the product on tensor cores.
//
// Decomposition. The [B, N] product is cut into tiles of kTileRows x kTileCols. Block (x, y) owns row tile x
// (rows 64 x .. 64 x + 63) and column chunk y: columns [y W, min(N, (y + 1) W)), where the host picks W, a
// multiple of kTileCols, so that row tiles x chunks is about two blocks per SM (B = 256 gives 4 row tiles and,
// on a 132-SM H100/H200, N cut into up to 66 chunks). The block walks its chunk one column tile at a time: a
// Product computes the tile into shared memory, an epilogue consumes it there. Nothing of size [B, N] reaches
// global memory except the outputs that are [B, N] (cosine's logits, xent_bwd's dcos).
// The reductions (segment_stats, xent_fwd) write per-(row, chunk) partial states to stream-ordered scratch when
// there is more than one chunk, and a second kernel merges them in chunk order with csrc/common's merge rules
// (deterministic); with one chunk the first kernel writes the outputs itself.
//
// Products: fp16/bf16 inputs run WMMA m16n16k16 (HMMA, fp32 accumulation); fp32 runs WMMA m16n16k8 on TF32 when
// torch allows TF32 for float32 matmuls, else exact fp32 FFMA; fp64 exact DFMA (cuda/product.cuh). An element's
// value depends only on its row, its column and D, never on the chunking: row and column tiles start at multiples
// of 64, so the element sits at the same place of its tile, and the k loop is fixed. The forward and the backward
// thus see bit-identical cos and, with mul_rn, identical z = scale * cos.
#include <algorithm>
#include <type_traits>

#include "common/online_lse.h"
#include "common/xent.h"
#include "cuda/launch.cuh"
#include "cuda/product.cuh"

namespace pk::cuda {
namespace {

// Row-reduction epilogues: the 4 consecutive lanes 4 r .. 4 r + 3 share tile row r (0..63); lane q takes the
// columns q + 4 j, j < 16. A warp reads rows r..r+7 at banks (68 r + q + 4 j) % 32 = (4 r + q + 4 j) % 32: 32
// distinct banks, no conflict.
constexpr int kRowLanes = 4;
constexpr int kLaneCols = kTileCols / kRowLanes;
constexpr std::int64_t kMaxGridY = 65535;
static_assert(kThreads == kTileRows * kRowLanes, "one tile row per group of kRowLanes lanes");

struct NoShared {};

// Block (x, y): row tile x, column chunk y of chunk_cols columns. The epilogue sees
//   begin(shared, row0, chunk_begin, chunk_end); tile(shared, tile, row0, col0, tile_end) per column tile, with
//   tile[r * kLdc + c] = cos[row0 + r, col0 + c] for col0 + c < tile_end; finish(row0);
// every thread runs every call (the row-reduction epilogues shuffle within a row's lanes).
template <class Product, class Epilogue>
__global__ void __launch_bounds__(kThreads)
    product_kernel(const typename Product::Input* __restrict__ img, const typename Product::Input* __restrict__ txt,
                   std::int64_t B, std::int64_t N, std::int64_t D, std::int64_t chunk_cols, Epilogue epi) {
  using A = typename Product::A;
  __shared__ __align__(32) unsigned char smem[Product::kSmemBytes];
  __shared__ typename Epilogue::Shared shared;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * kTileRows;
  const std::int64_t chunk_begin = std::int64_t(blockIdx.y) * chunk_cols;
  const std::int64_t chunk_end = chunk_begin + chunk_cols < N ? chunk_begin + chunk_cols : N;
  epi.begin(shared, row0, chunk_begin, chunk_end);
  __syncthreads();  // `shared` is filled
  for (std::int64_t col0 = chunk_begin; col0 < chunk_end; col0 += kTileCols) {
    Product::run(img, txt, B, chunk_end, D, row0, col0, smem);
    const std::int64_t tile_end = col0 + kTileCols < chunk_end ? col0 + kTileCols : chunk_end;
    epi.tile(shared, reinterpret_cast<const A*>(smem), row0, col0, tile_end);
  }
  epi.finish(row0);
}

__device__ __forceinline__ int row_of_lane() { return threadIdx.x / kRowLanes; }
__device__ __forceinline__ int lane_in_row() { return threadIdx.x % kRowLanes; }

// Merges the states of a row's kRowLanes lanes (xor butterfly: every lane ends with the same state).
template <class A> __device__ SegmentState<A> row_merge(SegmentState<A> st) {
#pragma unroll
  for (int offset = kRowLanes / 2; offset > 0; offset >>= 1) {
    const SegmentState<A> other{{__shfl_xor_sync(kFullMask, st.lse.max, offset),
                                 __shfl_xor_sync(kFullMask, st.lse.sum, offset)},
                                __shfl_xor_sync(kFullMask, st.min, offset)};
    st = segment_merge(st, other);
  }
  return st;
}

template <class A> __device__ XentState<A> row_merge(XentState<A> st) {
#pragma unroll
  for (int offset = kRowLanes / 2; offset > 0; offset >>= 1) {
    XentState<A> other;
    other.lse = {__shfl_xor_sync(kFullMask, st.lse.max, offset), __shfl_xor_sync(kFullMask, st.lse.sum, offset)};
    other.weighted = __shfl_xor_sync(kFullMask, st.weighted, offset);
    other.weight = __shfl_xor_sync(kFullMask, st.weight, offset);
    st = xent_merge(st, other);
  }
  return st;
}

// ---------------------------------------------------------------- element-wise epilogues ([B, N] outputs)

template <class A> struct CosineEpilogue {
  using Shared = NoShared;
  A* out;
  std::int64_t B, N;
  A scale;

  __device__ void begin(NoShared&, std::int64_t, std::int64_t, std::int64_t) {}
  __device__ void tile(NoShared&, const A* tile, std::int64_t row0, std::int64_t col0, std::int64_t tile_end) {
    const int c = threadIdx.x % kTileCols;
    const std::int64_t col = col0 + c;
#pragma unroll 4
    for (int k = 0; k < kRowSteps; ++k) {
      const int r = threadIdx.x / kTileCols + kRowStep * k;
      const std::int64_t row = row0 + r;
      if (row < B && col < tile_end) out[row * N + col] = scale * tile[r * kLdc + c];
    }
  }
  __device__ void finish(std::int64_t) {}
};

template <class A> struct XentBwdShared {
  A lse[kTileRows], grad_scale[kTileRows], mass[kTileRows];
  std::int64_t label[kTileRows];
};

// mass: the rows' target sums (kXentDense; computed by row_sum_kernel beforehand), else unused.
template <class A, int KIND> struct XentBwdEpilogue {
  using Shared = XentBwdShared<A>;
  std::int64_t B, N;
  A scale;
  const std::int64_t* labels;
  const A *targets, *mass, *lse, *grad_loss;
  A* out_dcos;

  __device__ void begin(Shared& sh, std::int64_t row0, std::int64_t, std::int64_t) {
    if (threadIdx.x >= kTileRows) return;
    const std::int64_t row = row0 + threadIdx.x;
    const bool ok = row < B;
    const std::int64_t label = KIND == kXentIndex && ok ? labels[row] : -1;
    sh.label[threadIdx.x] = label;
    sh.lse[threadIdx.x] = ok ? lse[row] : A(0);
    sh.mass[threadIdx.x] = KIND == kXentDense && ok ? xent_mass<KIND>(mass[row]) : A(1);
    const bool bad_label = KIND == kXentIndex && (label < 0 || label >= N);
    sh.grad_scale[threadIdx.x] = !ok ? A(0) : bad_label ? quiet_nan<A>() : grad_loss[row] * scale;
  }
  __device__ void tile(Shared& sh, const A* tile, std::int64_t row0, std::int64_t col0, std::int64_t tile_end) {
    const A inv_n = A(1) / A(N);
    const int c = threadIdx.x % kTileCols;
    const std::int64_t col = col0 + c;
#pragma unroll 4
    for (int k = 0; k < kRowSteps; ++k) {
      const int r = threadIdx.x / kTileCols + kRowStep * k;
      const std::int64_t row = row0 + r;
      if (row < B && col < tile_end) {
        const std::int64_t o = row * N + col;
        const A dense = KIND == kXentDense ? targets[o] : A(0);
        const A w = xent_weight<KIND>(col, sh.label[r], inv_n, dense);
        const A prob = exp_acc(mul_rn(scale, tile[r * kLdc + c]) - sh.lse[r]);
        out_dcos[o] = xent_dcos(sh.grad_scale[r], sh.mass[r], prob, w);
      }
    }
  }
  __device__ void finish(std::int64_t) {}
};

template <class A> struct MultilabelBwdShared {
  A grad_scale[kTileRows];
  GroupCols cols[kTileRows];
};

template <class A> struct MultilabelBwdEpilogue {
  using Shared = MultilabelBwdShared<A>;
  std::int64_t B, N, group;
  A scale;
  const std::int64_t* labels;
  const A* grad_loss;
  A* out_dcos;

  __device__ void begin(Shared& sh, std::int64_t row0, std::int64_t, std::int64_t) {
    if (threadIdx.x >= kTileRows) return;
    const std::int64_t row = row0 + threadIdx.x;
    const bool ok = row < B;
    const std::int64_t label = ok ? labels[row] : -1;
    const bool bad_label = label < 0 || label >= N / group;
    sh.cols[threadIdx.x] = multilabel_cols(label, group);
    sh.grad_scale[threadIdx.x] = !ok ? A(0) : bad_label ? quiet_nan<A>() : grad_loss[row] * scale / A(N);
  }
  __device__ void tile(Shared& sh, const A* tile, std::int64_t row0, std::int64_t col0, std::int64_t tile_end) {
    const int c = threadIdx.x % kTileCols;
    const std::int64_t col = col0 + c;
#pragma unroll 4
    for (int k = 0; k < kRowSteps; ++k) {
      const int r = threadIdx.x / kTileCols + kRowStep * k;
      const std::int64_t row = row0 + r;
      if (row < B && col < tile_end)
        out_dcos[row * N + col] = multilabel_dcos(sh.grad_scale[r], mul_rn(scale, tile[r * kLdc + c]),
                                                  multilabel_sign<A>(col, sh.cols[r]));
    }
  }
  __device__ void finish(std::int64_t) {}
};

// ---------------------------------------------------------------- row-reduction epilogues
// With chunks > 1, `part` holds planes of [chunks][B] values: plane p, chunk j, row b at (p chunks + j) B + b,
// so the merge kernels read them coalesced.

// segment_stats. A chunk cuts the segments into pieces; the block walks the segments of its chunk in order (the
// walk depends only on offsets, so it is uniform over the block and the row merges' shuffles line up). A piece
// that is a whole segment gives the outputs directly. A segment that crosses chunk boundaries leaves its piece in
// chunk j as the chunk's first piece (planes 0-2: max, sum, min) when the segment began before the chunk, else as
// its last piece (planes 3-5); segment_merge_kernel completes it. Offsets may repeat: an empty segment at column
// x belongs to the chunk with chunk_begin <= x < chunk_end (x = N: the last chunk) and gets the empty state's
// outputs (-inf, +inf, -inf).
template <class A> struct SegmentEpilogue {
  using Shared = NoShared;
  std::int64_t B, N, S;
  const std::int64_t* offsets;
  const A* scales;
  A *out_max, *out_min, *out_lse;
  A* part;  // 6 planes, or null with one chunk
  unsigned chunks;
  // per thread
  std::int64_t chunk_begin, chunk_end, seg;
  A scale;
  SegmentState<A> st;

  __device__ void begin(NoShared&, std::int64_t, std::int64_t begin_col, std::int64_t end_col) {
    chunk_begin = begin_col;
    chunk_end = end_col;
    // first = the first s with offsets[s] >= chunk_begin (a lower bound in [0, S]; offsets[S] = N > chunk_begin).
    // The walk starts there when a segment (empty or not) starts at chunk_begin, else at first - 1, the segment
    // holding chunk_begin (first >= 1 then, as offsets[0] = 0 <= chunk_begin).
    std::int64_t first = 0, last = S;
    while (first < last) {
      const std::int64_t mid = first + (last - first) / 2;
      if (offsets[mid] >= chunk_begin) last = mid; else first = mid + 1;
    }
    seg = offsets[first] > chunk_begin ? first - 1 : first;
    scale = scales[seg];
    st = segment_empty<A>();
  }

  __device__ void flush(std::int64_t row0, std::int64_t lo, std::int64_t hi) {
    const SegmentState<A> row_st = row_merge(st);
    const std::int64_t row = row0 + row_of_lane();
    if (lane_in_row() != 0 || row >= B) return;
    if (lo < chunk_begin || hi > chunk_end) {
      const std::int64_t plane = std::int64_t(chunks) * B;
      A* at = part + ((lo < chunk_begin ? 0 : 3) * std::int64_t(chunks) + blockIdx.y) * B + row;
      at[0] = row_st.lse.max;
      at[plane] = row_st.lse.sum;
      at[2 * plane] = row_st.min;
    } else {
      const std::int64_t o = row * S + seg;
      segment_finish(row_st.lse, row_st.min, out_max + o, out_min + o, out_lse + o);
    }
  }

  __device__ void tile(NoShared&, const A* tile, std::int64_t row0, std::int64_t col0, std::int64_t tile_end) {
    const int r = row_of_lane(), q = lane_in_row();
    const bool row_ok = row0 + r < B;
    while (seg < S) {
      const std::int64_t lo = offsets[seg], hi = offsets[seg + 1];
      if (lo >= tile_end) break;
#pragma unroll
      for (int j = 0; j < kLaneCols; ++j) {
        const int c = q + kRowLanes * j;
        const std::int64_t col = col0 + c;
        if (row_ok && col >= lo && col < hi && col < tile_end) segment_push(st, mul_rn(scale, tile[r * kLdc + c]));
      }
      if (hi > tile_end) break;  // continues in the next tile, or past the chunk (then finish flushes it)
      flush(row0, lo, hi);
      ++seg;
      if (seg < S) scale = scales[seg];
      st = segment_empty<A>();
    }
  }

  __device__ void finish(std::int64_t row0) {
    if (seg < S && offsets[seg] < chunk_end) return flush(row0, offsets[seg], offsets[seg + 1]);  // continues
    if (chunk_end != N) return;
    for (; seg < S; ++seg) {  // the segments left after the last column are the empty ones at N
      st = segment_empty<A>();
      flush(row0, N, N);
    }
  }
};

// xent_fwd, kinds 0-2: the row's online state; with chunks > 1 its 4 numbers (planes max, sum, weighted,
// weight) go to `part` for xent_merge_kernel.
template <class A, int KIND> struct XentFwdEpilogue {
  using Shared = NoShared;
  std::int64_t B, N;
  A scale;
  const std::int64_t* labels;
  const A* targets;
  A *out_loss, *out_lse;
  A* part;  // 4 planes, or null with one chunk
  unsigned chunks;
  // per thread
  std::int64_t label;
  XentState<A> st;

  __device__ void begin(NoShared&, std::int64_t row0, std::int64_t, std::int64_t) {
    const std::int64_t row = row0 + row_of_lane();
    label = KIND == kXentIndex && row < B ? labels[row] : -1;
    st = xent_empty<A>();
  }
  __device__ void tile(NoShared&, const A* tile, std::int64_t row0, std::int64_t col0, std::int64_t tile_end) {
    const A inv_n = A(1) / A(N);
    const int r = row_of_lane(), q = lane_in_row();
    const std::int64_t row = row0 + r;
#pragma unroll
    for (int j = 0; j < kLaneCols; ++j) {
      const int c = q + kRowLanes * j;
      const std::int64_t col = col0 + c;
      if (row < B && col < tile_end) {
        const A dense = KIND == kXentDense ? targets[row * N + col] : A(0);
        xent_push(st, mul_rn(scale, tile[r * kLdc + c]), xent_weight<KIND>(col, label, inv_n, dense));
      }
    }
  }
  __device__ void finish(std::int64_t row0) {
    const XentState<A> row_st = row_merge(st);
    const std::int64_t row = row0 + row_of_lane();
    if (lane_in_row() != 0 || row >= B) return;
    if (part != nullptr) {
      const std::int64_t plane = std::int64_t(chunks) * B;
      A* at = part + std::int64_t(blockIdx.y) * B + row;
      at[0] = row_st.lse.max;
      at[plane] = row_st.lse.sum;
      at[2 * plane] = row_st.weighted;
      at[3 * plane] = row_st.weight;
    } else {
      xent_finish<KIND>(row_st, KIND == kXentIndex && (label < 0 || label >= N), out_loss + row, out_lse + row);
    }
  }
};

// kXentMultilabel: a sum of independent column terms; with chunks > 1 each chunk's sum goes to `part` (1 plane).
template <class A> struct MultilabelFwdEpilogue {
  using Shared = NoShared;
  std::int64_t B, N, group;
  A scale;
  const std::int64_t* labels;
  A *out_loss, *out_lse;
  A* part;
  // per thread
  std::int64_t label;
  GroupCols cols;
  A sum;

  __device__ void begin(NoShared&, std::int64_t row0, std::int64_t, std::int64_t) {
    const std::int64_t row = row0 + row_of_lane();
    label = row < B ? labels[row] : -1;
    cols = multilabel_cols(label, group);
    sum = A(0);
  }
  __device__ void tile(NoShared&, const A* tile, std::int64_t row0, std::int64_t col0, std::int64_t tile_end) {
    const int r = row_of_lane(), q = lane_in_row();
    const bool row_ok = row0 + r < B;
#pragma unroll
    for (int j = 0; j < kLaneCols; ++j) {
      const int c = q + kRowLanes * j;
      const std::int64_t col = col0 + c;
      if (row_ok && col < tile_end)
        sum += multilabel_term(mul_rn(scale, tile[r * kLdc + c]), multilabel_sign<A>(col, cols));
    }
  }
  __device__ void finish(std::int64_t row0) {
    const A row_sum = group_sum<kRowLanes>(sum);
    const std::int64_t row = row0 + row_of_lane();
    if (lane_in_row() != 0 || row >= B) return;
    if (part != nullptr) {
      part[std::int64_t(blockIdx.y) * B + row] = row_sum;
    } else {
      out_lse[row] = A(0);  // the multilabel backward needs no row statistic
      out_loss[row] = multilabel_loss(row_sum, N, label < 0 || label >= N / group);
    }
  }
};

// ---------------------------------------------------------------- merges of the chunks' partial states

// Thread per row: the chunks' states merged in chunk order.
template <class A, int KIND>
__global__ void __launch_bounds__(kThreads) xent_merge_kernel(std::int64_t B, std::int64_t N, unsigned chunks,
                                                              const std::int64_t* __restrict__ labels,
                                                              const A* __restrict__ part, A* __restrict__ out_loss,
                                                              A* __restrict__ out_lse) {
  const std::int64_t b = std::int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  const std::int64_t plane = std::int64_t(chunks) * B;
  XentState<A> st = xent_empty<A>();
  for (unsigned j = 0; j < chunks; ++j) {
    const A* at = part + std::int64_t(j) * B + b;
    st = xent_merge(st, XentState<A>{{at[0], at[plane]}, at[2 * plane], at[3 * plane]});
  }
  const std::int64_t label = KIND == kXentIndex ? labels[b] : -1;
  xent_finish<KIND>(st, KIND == kXentIndex && (label < 0 || label >= N), out_loss + b, out_lse + b);
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    multilabel_merge_kernel(std::int64_t B, std::int64_t N, std::int64_t group, unsigned chunks,
                            const std::int64_t* __restrict__ labels, const A* __restrict__ part,
                            A* __restrict__ out_loss, A* __restrict__ out_lse) {
  const std::int64_t b = std::int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  A sum = A(0);
  for (unsigned j = 0; j < chunks; ++j) sum += part[std::int64_t(j) * B + b];
  const std::int64_t label = labels[b];
  out_lse[b] = A(0);
  out_loss[b] = multilabel_loss(sum, N, label < 0 || label >= N / group);
}

// Thread per (row b, chunk boundary k = 1 .. chunks - 1 at column x = k chunk_cols). The segment s holding x
// crosses the boundary when it starts before x; the thread of its first crossed boundary (s starts in chunk
// k - 1, i.e. x - chunk_cols <= offsets[s] < x) merges its last piece in chunk k - 1 with the first pieces of
// the chunks k, k + 1, ... that it reaches (j chunk_cols < offsets[s + 1]) and writes its outputs.
template <class A>
__global__ void __launch_bounds__(kThreads)
    segment_merge_kernel(std::int64_t B, std::int64_t S, const std::int64_t* __restrict__ offsets, unsigned chunks,
                         std::int64_t chunk_cols, const A* __restrict__ part, A* __restrict__ out_max,
                         A* __restrict__ out_min, A* __restrict__ out_lse) {
  const std::int64_t i = std::int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B * (chunks - 1)) return;
  const std::int64_t b = i % B;
  const unsigned boundary = unsigned(i / B) + 1;
  const std::int64_t x = std::int64_t(boundary) * chunk_cols;  // < N: the last chunk is not empty
  // The largest s with offsets[s] <= x: offsets[lo] <= x < offsets[hi] throughout. Its successor starts after
  // x, so s is the (non-empty) segment holding column x, never an empty one at x.
  std::int64_t lo = 0, hi = S;
  while (hi - lo > 1) {
    const std::int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= x) lo = mid; else hi = mid;
  }
  const std::int64_t s = lo, start = offsets[s], end = offsets[s + 1];
  if (start == x || start < x - chunk_cols) return;
  const std::int64_t plane = std::int64_t(chunks) * B;
  const auto piece = [&](int first_plane, unsigned j) {
    const A* at = part + (first_plane * std::int64_t(chunks) + j) * B + b;
    return SegmentState<A>{{at[0], at[plane]}, at[2 * plane]};
  };
  SegmentState<A> st = piece(3, boundary - 1);
  for (unsigned j = boundary; j < chunks && std::int64_t(j) * chunk_cols < end; ++j)
    st = segment_merge(st, piece(0, j));
  const std::int64_t o = b * S + s;
  segment_finish(st.lse, st.min, out_max + o, out_min + o, out_lse + o);
}

// Warp per row (grid-stride, so any B fits the grid): sum_n targets[b, n], kXentDense's a_b for the backward.
constexpr int kSumRowsPerBlock = kThreads / kWarpSize;
constexpr unsigned kMaxSumBlocks = 1u << 20;

template <class A>
__global__ void __launch_bounds__(kThreads) row_sum_kernel(const A* __restrict__ x, std::int64_t B, std::int64_t N,
                                                           A* __restrict__ out) {
  for (std::int64_t b = std::int64_t(blockIdx.x) * kSumRowsPerBlock + threadIdx.x / kWarpSize; b < B;
       b += std::int64_t(gridDim.x) * kSumRowsPerBlock) {  // b is uniform over a warp: whole warps loop together
    A sum = A(0);
    for (std::int64_t n = threadIdx.x % kWarpSize; n < N; n += kWarpSize) sum += x[b * N + n];
    sum = group_sum<kWarpSize>(sum);
    if (threadIdx.x % kWarpSize == 0) out[b] = sum;
  }
}

// ---------------------------------------------------------------- host side

// The grid: row tiles on x (up to 2^31 - 1), column chunks on y. chunks is at most the column tiles, about
// 2 SMs / row tiles (so at least ~2 blocks an SM) and 65535; W = chunk_cols, a multiple of kTileCols, is
// recomputed from it so that no chunk is empty: (chunks - 1) W <= (col_tiles - 1) kTileCols < N.
struct Plan {
  unsigned row_tiles, chunks;
  std::int64_t chunk_cols;
};

Plan plan_for(const char* fn, std::int64_t B, std::int64_t N) {
  const std::int64_t row_tiles = (B + kTileRows - 1) / kTileRows;
  const std::int64_t col_tiles = (N + kTileCols - 1) / kTileCols;
  const std::int64_t wanted = (2 * std::int64_t(sm_count(fn)) + row_tiles - 1) / row_tiles;
  std::int64_t chunks = std::min({col_tiles, std::max<std::int64_t>(wanted, 1), kMaxGridY});
  const std::int64_t tiles_per_chunk = (col_tiles + chunks - 1) / chunks;
  chunks = (col_tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  return {static_cast<unsigned>(row_tiles), static_cast<unsigned>(chunks), tiles_per_chunk * kTileCols};
}

template <class Product, class Epilogue>
void launch_product(const char* fn, const void* img, const void* txt, std::int64_t B, std::int64_t N,
                    std::int64_t D, const Plan& plan, const Epilogue& epi, cudaStream_t stream) {
  using T = typename Product::Input;
  product_kernel<Product, Epilogue><<<dim3(plan.row_tiles, plan.chunks), kThreads, 0, stream>>>(
      static_cast<const T*>(img), static_cast<const T*>(txt), B, N, D, plan.chunk_cols, epi);
  check_launch(fn);
}

void check_features(const char* fn, const void* img, const void* txt, std::int64_t B, std::int64_t N,
                    std::int64_t D) {
  require_at_least(fn, "B", B, 0);
  require_at_least(fn, "N", N, 1);
  require_at_least(fn, "D", D, 1);
  if (B > 0) {
    require_ptr(fn, "img", img);
    require_ptr(fn, "txt", txt);
  }
  if ((B + kTileRows - 1) / kTileRows > 0x7fffffff) invalid(fn, "B is too large for one launch");
}

template <class F> void dispatch_kind(const char* fn, int kind, const F& f) {
  require_kind(fn, kind);
  if (kind == kXentIndex) return f(std::integral_constant<int, kXentIndex>{});
  if (kind == kXentUniform) return f(std::integral_constant<int, kXentUniform>{});
  return f(std::integral_constant<int, kXentDense>{});
}

void check_xent(const char* fn, int kind, std::int64_t B, std::int64_t N, const std::int64_t* labels,
                const void* targets, std::int64_t group) {
  require_kind(fn, kind);
  require_at_least(fn, "group", group, 1);
  if (kind == kXentMultilabel && N % group != 0)
    invalid(fn, "N = " + std::to_string(N) + " is not a multiple of group = " + std::to_string(group));
  if (B > 0 && (kind == kXentIndex || kind == kXentMultilabel)) require_ptr(fn, "labels", labels);
  if (B > 0 && kind == kXentDense) require_ptr(fn, "targets", targets);
}

// Scratch for `planes` planes of [chunks][B] partial values; none with one chunk.
template <class A> std::size_t partial_bytes(const Plan& plan, std::int64_t B, int planes) {
  return plan.chunks > 1 ? std::size_t(planes) * plan.chunks * std::size_t(B) * sizeof(A) : 0;
}

}  // namespace

void cosine(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale, void* out,
            int dtype, Stream stream) {
  const char* fn = "cosine_cuda";
  check_features(fn, img, txt, B, N, D);
  if (B == 0) return;
  require_ptr(fn, "out", out);
  dispatch_product(fn, dtype, [&](auto product) {
    using P = decltype(product);
    using A = typename P::A;
    DeviceGuard guard(fn, img);
    const Plan plan = plan_for(fn, B, N);
    launch_product<P>(fn, img, txt, B, N, D, plan, CosineEpilogue<A>{static_cast<A*>(out), B, N, A(scale)},
                      as_stream(stream));
  });
}

void segment_stats(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D,
                   const std::int64_t* seg_offsets, const void* seg_scales, std::int64_t S, void* out_max,
                   void* out_min, void* out_lse, int dtype, Stream stream) {
  const char* fn = "segment_stats_cuda";
  check_features(fn, img, txt, B, N, D);
  require_at_least(fn, "S", S, 1);
  if (B == 0) return;
  require_ptr(fn, "seg_offsets", seg_offsets);
  require_ptr(fn, "seg_scales", seg_scales);
  require_ptr(fn, "out_max", out_max);
  require_ptr(fn, "out_min", out_min);
  require_ptr(fn, "out_lse", out_lse);
  dispatch_product(fn, dtype, [&](auto product) {
    using P = decltype(product);
    using A = typename P::A;
    DeviceGuard guard(fn, img);
    const cudaStream_t s = as_stream(stream);
    const Plan plan = plan_for(fn, B, N);
    Scratch part(fn, partial_bytes<A>(plan, B, 6), s);
    SegmentEpilogue<A> epi{};
    epi.B = B;
    epi.N = N;
    epi.S = S;
    epi.offsets = seg_offsets;
    epi.scales = static_cast<const A*>(seg_scales);
    epi.out_max = static_cast<A*>(out_max);
    epi.out_min = static_cast<A*>(out_min);
    epi.out_lse = static_cast<A*>(out_lse);
    epi.part = part.as<A>();
    epi.chunks = plan.chunks;
    launch_product<P>(fn, img, txt, B, N, D, plan, epi, s);
    if (plan.chunks > 1) {
      segment_merge_kernel<A><<<blocks_for(B * (plan.chunks - 1), kThreads), kThreads, 0, s>>>(
          B, S, seg_offsets, plan.chunks, plan.chunk_cols, part.as<A>(), epi.out_max, epi.out_min, epi.out_lse);
      check_launch(fn);
    }
  });
}

void xent_fwd(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale,
              int kind, const std::int64_t* labels, const void* targets, void* out_loss, void* out_lse, int dtype,
              Stream stream, std::int64_t group) {
  const char* fn = "xent_fwd_cuda";
  check_features(fn, img, txt, B, N, D);
  check_xent(fn, kind, B, N, labels, targets, group);
  if (B == 0) return;
  require_ptr(fn, "out_loss", out_loss);
  require_ptr(fn, "out_lse", out_lse);
  dispatch_product(fn, dtype, [&](auto product) {
    using P = decltype(product);
    using A = typename P::A;
    DeviceGuard guard(fn, img);
    const cudaStream_t s = as_stream(stream);
    const Plan plan = plan_for(fn, B, N);
    A* loss = static_cast<A*>(out_loss);
    A* lse = static_cast<A*>(out_lse);
    if (kind == kXentMultilabel) {
      Scratch part(fn, partial_bytes<A>(plan, B, 1), s);
      MultilabelFwdEpilogue<A> epi{};
      epi.B = B;
      epi.N = N;
      epi.group = group;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.out_loss = loss;
      epi.out_lse = lse;
      epi.part = part.as<A>();
      launch_product<P>(fn, img, txt, B, N, D, plan, epi, s);
      if (plan.chunks > 1) {
        multilabel_merge_kernel<A><<<blocks_for(B, kThreads), kThreads, 0, s>>>(B, N, group, plan.chunks, labels,
                                                                                part.as<A>(), loss, lse);
        check_launch(fn);
      }
      return;
    }
    dispatch_kind(fn, kind, [&](auto kind_tag) {
      constexpr int KIND = decltype(kind_tag)::value;
      Scratch part(fn, partial_bytes<A>(plan, B, 4), s);
      XentFwdEpilogue<A, KIND> epi{};
      epi.B = B;
      epi.N = N;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.targets = static_cast<const A*>(targets);
      epi.out_loss = loss;
      epi.out_lse = lse;
      epi.part = part.as<A>();
      epi.chunks = plan.chunks;
      launch_product<P>(fn, img, txt, B, N, D, plan, epi, s);
      if (plan.chunks > 1) {
        xent_merge_kernel<A, KIND><<<blocks_for(B, kThreads), kThreads, 0, s>>>(B, N, plan.chunks, labels,
                                                                               part.as<A>(), loss, lse);
        check_launch(fn);
      }
    });
  });
}

void xent_bwd(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale,
              int kind, const std::int64_t* labels, const void* targets, const void* lse, const void* grad_loss,
              void* out_dcos, int dtype, Stream stream, std::int64_t group) {
  const char* fn = "xent_bwd_cuda";
  check_features(fn, img, txt, B, N, D);
  check_xent(fn, kind, B, N, labels, targets, group);
  if (B == 0) return;
  require_ptr(fn, "lse", lse);
  require_ptr(fn, "grad_loss", grad_loss);
  require_ptr(fn, "out_dcos", out_dcos);
  dispatch_product(fn, dtype, [&](auto product) {
    using P = decltype(product);
    using A = typename P::A;
    DeviceGuard guard(fn, img);
    const cudaStream_t s = as_stream(stream);
    const Plan plan = plan_for(fn, B, N);
    if (kind == kXentMultilabel) {
      MultilabelBwdEpilogue<A> epi{};
      epi.B = B;
      epi.N = N;
      epi.group = group;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.grad_loss = static_cast<const A*>(grad_loss);
      epi.out_dcos = static_cast<A*>(out_dcos);
      return launch_product<P>(fn, img, txt, B, N, D, plan, epi, s);
    }
    dispatch_kind(fn, kind, [&](auto kind_tag) {
      constexpr int KIND = decltype(kind_tag)::value;
      Scratch mass(fn, KIND == kXentDense ? std::size_t(B) * sizeof(A) : 0, s);
      if (KIND == kXentDense) {
        const auto blocks = static_cast<unsigned>(
            std::min<std::int64_t>((B + kSumRowsPerBlock - 1) / kSumRowsPerBlock, kMaxSumBlocks));
        row_sum_kernel<A><<<blocks, kThreads, 0, s>>>(static_cast<const A*>(targets), B, N, mass.as<A>());
        check_launch(fn);
      }
      XentBwdEpilogue<A, KIND> epi{};
      epi.B = B;
      epi.N = N;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.targets = static_cast<const A*>(targets);
      epi.mass = mass.as<A>();
      epi.lse = static_cast<const A*>(lse);
      epi.grad_loss = static_cast<const A*>(grad_loss);
      epi.out_dcos = static_cast<A*>(out_dcos);
      launch_product<P>(fn, img, txt, B, N, D, plan, epi, s);
    });
  });
}

}  // namespace pk::cuda
