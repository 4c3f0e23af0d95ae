// Cosine logits and the softmax-like reductions over them, fused: each block owns a tile of kRowsPerBlock image
// rows, walks the text rows (columns) in tiles of kColsPerTile, computes each cosine tile in shared memory
// (K-slices of kKSlice features) and hands it to an epilogue. The softmax epilogues keep an online max/sum-exp
// per (row, thread) across column tiles and merge the 16 threads of a row at the end, so no [B, N] matrix is
// read or written in the forward.
#include "common/online_lse.h"
#include "common/xent.h"
#include <type_traits>

#include "cuda/launch.cuh"

namespace pk::cuda {
namespace {

constexpr int kThreads = 256;           // 16 x 16 threads
constexpr int kGroup = 16;              // threads sharing a row: one half-warp
constexpr int kRowTile = 2, kColTile = 4;  // outputs per thread
constexpr int kRowsPerBlock = kGroup * kRowTile;  // 32
constexpr int kColsPerTile = kGroup * kColTile;   // 64
constexpr int kKSlice = 32;

// The rows and columns of one thread's outputs in the current tile; rows/cols beyond the problem are masked.
struct Coords {
  std::int64_t row[kRowTile];
  std::int64_t col[kColTile];
  bool row_ok[kRowTile];
  bool col_ok[kColTile];
};

// One thread's slice of the tiled product: acc[i][j] = <img[row_i], txt[col_j]> for the column tile at col0.
template <class T, class A>
__device__ void cosine_tile(const T* __restrict__ img, const T* __restrict__ txt, std::int64_t B,
                            std::int64_t col_end, std::int64_t D, std::int64_t row0, std::int64_t col0,
                            A (&as)[kKSlice][kRowsPerBlock + 1], A (&bs)[kKSlice][kColsPerTile + 1],
                            A (&acc)[kRowTile][kColTile]) {
  const int tx = threadIdx.x % kGroup, ty = threadIdx.x / kGroup;
#pragma unroll
  for (int i = 0; i < kRowTile; ++i)
#pragma unroll
    for (int j = 0; j < kColTile; ++j) acc[i][j] = A(0);
  for (std::int64_t k0 = 0; k0 < D; k0 += kKSlice) {
    // Consecutive threads read consecutive features of one row: coalesced loads, conflict-free stores (+1 pad).
    for (int e = threadIdx.x; e < kRowsPerBlock * kKSlice; e += kThreads) {
      const int m = e / kKSlice, k = e % kKSlice;
      const std::int64_t row = row0 + m, feature = k0 + k;
      as[k][m] = row < B && feature < D ? to_acc(img[row * D + feature]) : A(0);
    }
    for (int e = threadIdx.x; e < kColsPerTile * kKSlice; e += kThreads) {
      const int n = e / kKSlice, k = e % kKSlice;
      const std::int64_t col = col0 + n, feature = k0 + k;
      bs[k][n] = col < col_end && feature < D ? to_acc(txt[col * D + feature]) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kKSlice; ++k) {
      A a[kRowTile], b[kColTile];
#pragma unroll
      for (int i = 0; i < kRowTile; ++i) a[i] = as[k][ty + kGroup * i];
#pragma unroll
      for (int j = 0; j < kColTile; ++j) b[j] = bs[k][tx + kGroup * j];
#pragma unroll
      for (int i = 0; i < kRowTile; ++i)
#pragma unroll
        for (int j = 0; j < kColTile; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

// Drives an epilogue over the column range it names: epi.begin(), epi.tile(acc, coords) per column tile,
// epi.finish(tx, rows). Every thread runs every step (the epilogues shuffle across the row group).
template <class T, class Epilogue>
__global__ void __launch_bounds__(kThreads) tiled_kernel(const T* __restrict__ img, const T* __restrict__ txt,
                                                         std::int64_t B, std::int64_t D, Epilogue epi) {
  using A = acc_t<T>;
  __shared__ A as[kKSlice][kRowsPerBlock + 1];
  __shared__ A bs[kKSlice][kColsPerTile + 1];
  const int tx = threadIdx.x % kGroup, ty = threadIdx.x / kGroup;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * kRowsPerBlock;
  Coords at;
#pragma unroll
  for (int i = 0; i < kRowTile; ++i) {
    at.row[i] = row0 + ty + kGroup * i;
    at.row_ok[i] = at.row[i] < B;
  }
  std::int64_t col_begin, col_end;
  epi.begin(blockIdx.y, at, col_begin, col_end);
  for (std::int64_t col0 = col_begin; col0 < col_end; col0 += kColsPerTile) {
    A acc[kRowTile][kColTile];
    cosine_tile<T, A>(img, txt, B, col_end, D, row0, col0, as, bs, acc);
#pragma unroll
    for (int j = 0; j < kColTile; ++j) {
      at.col[j] = col0 + tx + kGroup * j;
      at.col_ok[j] = at.col[j] < col_end;
    }
    epi.tile(acc, at);
  }
  epi.finish(tx, at);
}

template <class A> struct CosineEpilogue {
  A* out;
  std::int64_t N;
  A scale;

  __device__ void begin(unsigned, const Coords&, std::int64_t& col_begin, std::int64_t& col_end) {
    col_begin = 0;
    col_end = N;
  }
  __device__ void tile(const A (&acc)[kRowTile][kColTile], const Coords& at) {
#pragma unroll
    for (int i = 0; i < kRowTile; ++i)
#pragma unroll
      for (int j = 0; j < kColTile; ++j)
        if (at.row_ok[i] && at.col_ok[j]) out[at.row[i] * N + at.col[j]] = scale * acc[i][j];
  }
  __device__ void finish(int, const Coords&) {}
};

// Merges the online states of the 16 threads of a row group (xor butterfly: all end with the same state).
template <class A> __device__ LseState<A> group_merge(LseState<A> st) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset >>= 1) {
    const LseState<A> other{__shfl_xor_sync(kFullMask, st.max, offset), __shfl_xor_sync(kFullMask, st.sum, offset)};
    st = lse_merge(st, other);
  }
  return st;
}

template <class A> __device__ A group_min(A v) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset >>= 1) {
    const A other = __shfl_xor_sync(kFullMask, v, offset);
    v = other < v ? other : v;
  }
  return v;
}

// One block per (row tile, segment): grid.y indexes the segment.
template <class A> struct SegmentEpilogue {
  const std::int64_t* offsets;
  const A* scales;
  std::int64_t S;
  A *out_max, *out_min, *out_lse;
  // per-thread state
  std::int64_t segment;
  A scale;
  LseState<A> st[kRowTile];
  A min[kRowTile];

  __device__ void begin(unsigned s, const Coords&, std::int64_t& col_begin, std::int64_t& col_end) {
    segment = s;
    scale = scales[s];
    col_begin = offsets[s];
    col_end = offsets[s + 1];
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      st[i] = lse_empty<A>();
      min[i] = infinity<A>();
    }
  }
  __device__ void tile(const A (&acc)[kRowTile][kColTile], const Coords& at) {
#pragma unroll
    for (int i = 0; i < kRowTile; ++i)
#pragma unroll
      for (int j = 0; j < kColTile; ++j)
        if (at.row_ok[i] && at.col_ok[j]) {
          const A z = mul_rn(scale, acc[i][j]);
          lse_push(st[i], z);
          min[i] = z < min[i] ? z : min[i];
        }
  }
  __device__ void finish(int tx, const Coords& at) {
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      const LseState<A> row_st = group_merge(st[i]);
      const A row_min = group_min(min[i]);
      if (tx == 0 && at.row_ok[i]) {
        const std::int64_t o = at.row[i] * S + segment;
        segment_finish(row_st, row_min, out_max + o, out_min + o, out_lse + o);
      }
    }
  }
};

template <class A> __device__ XentState<A> group_merge(XentState<A> st) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset >>= 1) {
    XentState<A> other;
    other.lse = {__shfl_xor_sync(kFullMask, st.lse.max, offset), __shfl_xor_sync(kFullMask, st.lse.sum, offset)};
    other.weighted = __shfl_xor_sync(kFullMask, st.weighted, offset);
    other.weight = __shfl_xor_sync(kFullMask, st.weight, offset);
    st = xent_merge(st, other);
  }
  return st;
}

template <class A, int KIND> struct XentFwdEpilogue {
  std::int64_t N;
  A scale;
  const std::int64_t* labels;
  const A* targets;
  A *out_loss, *out_lse;
  // per-thread state
  std::int64_t label[kRowTile];
  XentState<A> st[kRowTile];

  __device__ void begin(unsigned, const Coords& at, std::int64_t& col_begin, std::int64_t& col_end) {
    col_begin = 0;
    col_end = N;
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      label[i] = KIND == kXentIndex && at.row_ok[i] ? labels[at.row[i]] : -1;
      st[i] = xent_empty<A>();
    }
  }
  __device__ void tile(const A (&acc)[kRowTile][kColTile], const Coords& at) {
    const A inv_n = A(1) / A(N);
#pragma unroll
    for (int i = 0; i < kRowTile; ++i)
#pragma unroll
      for (int j = 0; j < kColTile; ++j)
        if (at.row_ok[i] && at.col_ok[j]) {
          const A dense = KIND == kXentDense ? targets[at.row[i] * N + at.col[j]] : A(0);
          xent_push(st[i], mul_rn(scale, acc[i][j]), xent_weight<KIND>(at.col[j], label[i], inv_n, dense));
        }
  }
  __device__ void finish(int tx, const Coords& at) {
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      const XentState<A> row_st = group_merge(st[i]);
      if (tx == 0 && at.row_ok[i]) {
        const bool bad_label = KIND == kXentIndex && (label[i] < 0 || label[i] >= N);
        out_lse[at.row[i]] = lse_value(row_st.lse);
        out_loss[at.row[i]] = bad_label ? quiet_nan<A>() : xent_loss(xent_mass<KIND>(row_st.weight), row_st);
      }
    }
  }
};

template <class A, int KIND> struct XentBwdEpilogue {
  std::int64_t N;
  A scale;
  const std::int64_t* labels;
  const A* targets;
  const A *lse, *grad_loss;
  A* out_dcos;
  // per-thread state
  std::int64_t label[kRowTile];
  A row_lse[kRowTile], grad_scale[kRowTile], mass[kRowTile];

  __device__ void begin(unsigned, const Coords& at, std::int64_t& col_begin, std::int64_t& col_end) {
    col_begin = 0;
    col_end = N;
    const int tx = threadIdx.x % kGroup;
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      A weight = 0;
      if (KIND == kXentDense && at.row_ok[i])
        for (std::int64_t n = tx; n < N; n += kGroup) weight += targets[at.row[i] * N + n];
      mass[i] = xent_mass<KIND>(group_sum<kGroup>(weight));
      label[i] = KIND == kXentIndex && at.row_ok[i] ? labels[at.row[i]] : -1;
      row_lse[i] = at.row_ok[i] ? lse[at.row[i]] : A(0);
      grad_scale[i] = at.row_ok[i] ? grad_loss[at.row[i]] * scale : A(0);
      if (KIND == kXentIndex && (label[i] < 0 || label[i] >= N)) grad_scale[i] = quiet_nan<A>();
    }
  }
  __device__ void tile(const A (&acc)[kRowTile][kColTile], const Coords& at) {
    const A inv_n = A(1) / A(N);
#pragma unroll
    for (int i = 0; i < kRowTile; ++i)
#pragma unroll
      for (int j = 0; j < kColTile; ++j)
        if (at.row_ok[i] && at.col_ok[j]) {
          const std::int64_t o = at.row[i] * N + at.col[j];
          const A dense = KIND == kXentDense ? targets[o] : A(0);
          const A w = xent_weight<KIND>(at.col[j], label[i], inv_n, dense);
          out_dcos[o] = xent_dcos(grad_scale[i], mass[i], exp_acc(mul_rn(scale, acc[i][j]) - row_lse[i]), w);
        }
  }
  __device__ void finish(int, const Coords&) {}
};

// kXentMultilabel: a per-thread sum of independent column terms, summed over the row group at the end.
template <class A> struct MultilabelFwdEpilogue {
  std::int64_t N, group;
  A scale;
  const std::int64_t* labels;
  A *out_loss, *out_lse;
  // per-thread state
  std::int64_t label[kRowTile];
  GroupCols cols[kRowTile];
  A sum[kRowTile];

  __device__ void begin(unsigned, const Coords& at, std::int64_t& col_begin, std::int64_t& col_end) {
    col_begin = 0;
    col_end = N;
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      label[i] = at.row_ok[i] ? labels[at.row[i]] : -1;
      cols[i] = multilabel_cols(label[i], group);
      sum[i] = A(0);
    }
  }
  __device__ void tile(const A (&acc)[kRowTile][kColTile], const Coords& at) {
#pragma unroll
    for (int i = 0; i < kRowTile; ++i)
#pragma unroll
      for (int j = 0; j < kColTile; ++j)
        if (at.row_ok[i] && at.col_ok[j])
          sum[i] += multilabel_term(mul_rn(scale, acc[i][j]), multilabel_sign<A>(at.col[j], cols[i]));
  }
  __device__ void finish(int tx, const Coords& at) {
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      const A row_sum = group_sum<kGroup>(sum[i]);
      if (tx == 0 && at.row_ok[i]) {
        const bool bad_label = label[i] < 0 || label[i] >= N / group;
        out_lse[at.row[i]] = A(0);  // the multilabel backward needs no row statistic
        out_loss[at.row[i]] = bad_label ? quiet_nan<A>() : row_sum / A(N);
      }
    }
  }
};

template <class A> struct MultilabelBwdEpilogue {
  std::int64_t N, group;
  A scale;
  const std::int64_t* labels;
  const A* grad_loss;
  A* out_dcos;
  // per-thread state
  GroupCols cols[kRowTile];
  A grad_scale[kRowTile];

  __device__ void begin(unsigned, const Coords& at, std::int64_t& col_begin, std::int64_t& col_end) {
    col_begin = 0;
    col_end = N;
#pragma unroll
    for (int i = 0; i < kRowTile; ++i) {
      const std::int64_t label = at.row_ok[i] ? labels[at.row[i]] : -1;
      cols[i] = multilabel_cols(label, group);
      grad_scale[i] = at.row_ok[i] ? grad_loss[at.row[i]] * scale / A(N) : A(0);
      if (label < 0 || label >= N / group) grad_scale[i] = quiet_nan<A>();
    }
  }
  __device__ void tile(const A (&acc)[kRowTile][kColTile], const Coords& at) {
#pragma unroll
    for (int i = 0; i < kRowTile; ++i)
#pragma unroll
      for (int j = 0; j < kColTile; ++j)
        if (at.row_ok[i] && at.col_ok[j])
          out_dcos[at.row[i] * N + at.col[j]] =
              multilabel_dcos(grad_scale[i], mul_rn(scale, acc[i][j]), multilabel_sign<A>(at.col[j], cols[i]));
  }
  __device__ void finish(int, const Coords&) {}
};

template <class T, class Epilogue>
void launch_tiled(const char* fn, const void* img, const void* txt, std::int64_t B, std::int64_t D, unsigned grid_y,
                  const Epilogue& epi, Stream stream) {
  const dim3 grid(blocks_for(B, kRowsPerBlock), grid_y);
  tiled_kernel<T, Epilogue><<<grid, kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(img),
                                                                      static_cast<const T*>(txt), B, D, epi);
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
  if ((B + kRowsPerBlock - 1) / kRowsPerBlock > 0x7fffffff) invalid(fn, "B is too large for one launch");
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

}  // namespace

void cosine(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale, void* out,
            int dtype, Stream stream) {
  const char* fn = "cosine_cuda";
  check_features(fn, img, txt, B, N, D);
  if (B == 0) return;
  require_ptr(fn, "out", out);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, img);
    launch_tiled<T>(fn, img, txt, B, D, 1, CosineEpilogue<A>{static_cast<A*>(out), N, A(scale)}, stream);
  });
}

void segment_stats(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D,
                   const std::int64_t* seg_offsets, const void* seg_scales, std::int64_t S, void* out_max,
                   void* out_min, void* out_lse, int dtype, Stream stream) {
  const char* fn = "segment_stats_cuda";
  check_features(fn, img, txt, B, N, D);
  require_at_least(fn, "S", S, 1);
  if (S > 65535) invalid(fn, "S must be <= 65535 (one grid row per segment), got " + std::to_string(S));
  if (B == 0) return;
  require_ptr(fn, "seg_offsets", seg_offsets);
  require_ptr(fn, "seg_scales", seg_scales);
  require_ptr(fn, "out_max", out_max);
  require_ptr(fn, "out_min", out_min);
  require_ptr(fn, "out_lse", out_lse);
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, img);
    SegmentEpilogue<A> epi{};
    epi.offsets = seg_offsets;
    epi.scales = static_cast<const A*>(seg_scales);
    epi.S = S;
    epi.out_max = static_cast<A*>(out_max);
    epi.out_min = static_cast<A*>(out_min);
    epi.out_lse = static_cast<A*>(out_lse);
    launch_tiled<T>(fn, img, txt, B, D, static_cast<unsigned>(S), epi, stream);
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
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, img);
    if (kind == kXentMultilabel) {
      MultilabelFwdEpilogue<A> epi{};
      epi.N = N;
      epi.group = group;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.out_loss = static_cast<A*>(out_loss);
      epi.out_lse = static_cast<A*>(out_lse);
      return launch_tiled<T>(fn, img, txt, B, D, 1, epi, stream);
    }
    dispatch_kind(fn, kind, [&](auto kind_tag) {
      XentFwdEpilogue<A, decltype(kind_tag)::value> epi{};
      epi.N = N;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.targets = static_cast<const A*>(targets);
      epi.out_loss = static_cast<A*>(out_loss);
      epi.out_lse = static_cast<A*>(out_lse);
      launch_tiled<T>(fn, img, txt, B, D, 1, epi, stream);
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
  dispatch_dtype(fn, dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    DeviceGuard guard(fn, img);
    if (kind == kXentMultilabel) {
      MultilabelBwdEpilogue<A> epi{};
      epi.N = N;
      epi.group = group;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.grad_loss = static_cast<const A*>(grad_loss);
      epi.out_dcos = static_cast<A*>(out_dcos);
      return launch_tiled<T>(fn, img, txt, B, D, 1, epi, stream);
    }
    dispatch_kind(fn, kind, [&](auto kind_tag) {
      XentBwdEpilogue<A, decltype(kind_tag)::value> epi{};
      epi.N = N;
      epi.scale = A(scale);
      epi.labels = labels;
      epi.targets = static_cast<const A*>(targets);
      epi.lse = static_cast<const A*>(lse);
      epi.grad_loss = static_cast<const A*>(grad_loss);
      epi.out_dcos = static_cast<A*>(out_dcos);
      launch_tiled<T>(fn, img, txt, B, D, 1, epi, stream);
    });
  });
}

}  // namespace pk::cuda
