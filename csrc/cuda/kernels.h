// CUDA kernels behind promptkit._C's *_cuda functions (host entry points; plain C++ so bindings.cpp can include
// this without nvcc). Inputs img/txt/a/b/x/yn/dy/y are in `dtype` (0 float32, 1 float64, 2 float16, 3 bfloat16);
// every output and every other float array (seg_scales, targets, lse, grad_loss, inv_norm, lam) is in the
// accumulation type: float64 for float64, float32 otherwise. All pointers are device pointers; `stream` is a
// cudaStream_t passed as an integer. Work is queued on the stream; nothing synchronises.
#pragma once

#include <cstdint>

namespace pk::cuda {

using Stream = std::uintptr_t;

// out [B, N] = scale * img [B, D] @ txt [N, D]^T.
void cosine(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale, void* out,
            int dtype, Stream stream);

// pk::cpu::segment_stats on cos = img @ txt^T, computed tile by tile and never stored. seg_offsets (int64, S + 1)
// and seg_scales (S) live on the device and are not checked there: the caller passes 0 = o_0 <= ... <= o_S = N
// (an empty segment gives -inf, +inf, -inf).
void segment_stats(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D,
                   const std::int64_t* seg_offsets, const void* seg_scales, std::int64_t S, void* out_max,
                   void* out_min, void* out_lse, int dtype, Stream stream);

// pk::cpu::xent_fwd on cos = img @ txt^T (tiles, never stored). A label outside [0, N) (kind 3: [0, N / group))
// gives a NaN loss.
void xent_fwd(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale,
              int kind, const std::int64_t* labels, const void* targets, void* out_loss, void* out_lse, int dtype,
              Stream stream, std::int64_t group);

// pk::cpu::xent_bwd on cos = img @ txt^T; writes out_dcos [B, N]. A label out of range gives a NaN row.
void xent_bwd(const void* img, const void* txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale,
              int kind, const std::int64_t* labels, const void* targets, const void* lse, const void* grad_loss,
              void* out_dcos, int dtype, Stream stream, std::int64_t group);

void l2norm_fwd(const void* x, std::int64_t R, std::int64_t D, double eps, void* out_y, void* out_inv_norm,
                int dtype, Stream stream);
void l2norm_bwd(const void* dy, const void* y, const void* inv_norm, std::int64_t R, std::int64_t D, double eps,
                void* out_dx, int dtype, Stream stream);
void mix(const void* a, const void* b, const void* lam, std::int64_t B, std::int64_t D, void* out, int dtype,
         Stream stream);
void ortho_fwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, void* out_loss, int dtype,
               Stream stream);
void ortho_bwd(const void* yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, double grad, void* out_dyn,
               int dtype, Stream stream);

}  // namespace pk::cuda
