// promptkit._C: the pybind11 face of the CPU and CUDA kernels. Arrays arrive as raw addresses (Python ints from
// tensor.data_ptr(), 0 for an unused one), so the module needs no libtorch; the Python side (promptkit/ops)
// checks shapes, dtypes and devices and allocates the outputs. Kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common/defs.h"
#include "common/ortho.h"
#include "common/rows.h"
#include "common/xent.h"
#include "cpu/kernels.h"
#if PROMPTKIT_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace py = pybind11;

namespace {

using Addr = std::uintptr_t;

const void* in(Addr a) { return reinterpret_cast<const void*>(a); }
void* out(Addr a) { return reinterpret_cast<void*>(a); }
const std::int64_t* idx(Addr a) { return reinterpret_cast<const std::int64_t*>(a); }

py::dict build_info() {
  py::dict info;
  info["version"] = PROMPTKIT_VERSION;
  info["openmp"] = bool(PROMPTKIT_WITH_OPENMP);
  info["openmp_threads"] = pk::cpu::max_threads();
  info["cuda"] = bool(PROMPTKIT_WITH_CUDA);
  info["cuda_version"] = PROMPTKIT_CUDA_VERSION;
  info["cuda_archs"] = PROMPTKIT_CUDA_ARCHS;
  info["compiler"] = PROMPTKIT_COMPILER;
  info["why_no_cuda"] = PROMPTKIT_WHY_NO_CUDA;
  return info;
}

// The C++ side of the kernel constants, compared with promptkit/abi.py by tests/ops/test_abi.py.
py::dict abi_constants() {
  py::dict codes;
  codes["float32"] = int(pk::kFloat32);
  codes["float64"] = int(pk::kFloat64);
  codes["float16"] = int(pk::kFloat16);
  codes["bfloat16"] = int(pk::kBFloat16);
  py::dict constants;
  constants["XENT_INDEX"] = int(pk::kXentIndex);
  constants["XENT_UNIFORM"] = int(pk::kXentUniform);
  constants["XENT_DENSE"] = int(pk::kXentDense);
  constants["XENT_MULTILABEL"] = int(pk::kXentMultilabel);
  constants["ORTHO_ABS_SUM"] = int(pk::kOrthoAbsSum);
  constants["ORTHO_MEAN_COS"] = int(pk::kOrthoMeanCos);
  constants["MIX_EPS"] = pk::kMixEps;
  constants["DTYPE_CODES"] = codes;
  return constants;
}

void def_cpu(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "segment_stats_cpu",
      [](Addr cos, std::int64_t B, std::int64_t N, Addr seg_offsets, Addr seg_scales, std::int64_t S, Addr out_max,
         Addr out_min, Addr out_lse, int dtype) {
        pk::cpu::segment_stats(in(cos), B, N, idx(seg_offsets), in(seg_scales), S, out(out_max), out(out_min),
                               out(out_lse), dtype);
      },
      py::arg("cos"), py::arg("B"), py::arg("N"), py::arg("seg_offsets"), py::arg("seg_scales"), py::arg("S"),
      py::arg("out_max"), py::arg("out_min"), py::arg("out_lse"), py::arg("dtype"), nogil,
      "Per-segment max, min and logsumexp of z = seg_scales[s] * cos.\n\n"
      "cos [B, N]; seg_offsets int64 [S + 1] non-decreasing from 0 to N; seg_scales [S];\n"
      "out_max, out_min, out_lse [B, S]; an empty segment gives (-inf, +inf, -inf). dtype 0 (float32) or 1\n"
      "(float64) for all float arrays.");
  m.def(
      "cosine_segment_stats_cpu",
      [](Addr image, std::int64_t B, std::int64_t D, const std::vector<std::tuple<Addr, std::int64_t, std::int64_t>>& text,
         double eps, Addr seg_offsets, Addr seg_scales, std::int64_t S, Addr out_max, Addr out_min, Addr out_lse) {
        std::vector<pk::cpu::RowSource> rows;
        for (const auto& [data, count, stride] : text)
          rows.push_back({static_cast<const float*>(in(data)), count, stride});
        pk::cpu::cosine_segment_stats(static_cast<const float*>(in(image)), B, D, rows.data(),
                                      static_cast<std::int64_t>(rows.size()), eps, idx(seg_offsets),
                                      static_cast<const float*>(in(seg_scales)), S, static_cast<float*>(out(out_max)),
                                      static_cast<float*>(out(out_min)), static_cast<float*>(out(out_lse)));
      },
      py::arg("image"), py::arg("B"), py::arg("D"), py::arg("text"), py::arg("eps"), py::arg("seg_offsets"),
      py::arg("seg_scales"), py::arg("S"), py::arg("out_max"), py::arg("out_min"), py::arg("out_lse"), nogil,
      "segment_stats_cpu of cos = unit(image) @ unit(text)^T by the CPU's own blocked product (the [B, N] cosines\n"
      "never reach memory). float32 only. image [B, D] raw rows; text a list of (address, rows, row stride) sources\n"
      "[rows, D] stacked in order into N rows; both normalised as l2norm_fwd_cpu with eps. Needs\n"
      "product_usable_cpu().");
  m.def("product_usable_cpu", &pk::cpu::product_usable,
        "Whether this CPU runs cosine_segment_stats_cpu (AVX2 and FMA).");
  m.def("vector_isa_cpu", &pk::cpu::vector_isa,
        "The vector loops this CPU runs: 'avx512' (AVX-512F), 'avx2' (AVX2 and FMA, no AVX-512F) or 'portable'.");
  m.def(
      "xent_fwd_cpu",
      [](Addr cos, std::int64_t B, std::int64_t N, double scale, int kind, Addr labels, Addr targets, Addr out_loss,
         Addr out_lse, int dtype, std::int64_t group) {
        pk::cpu::xent_fwd(in(cos), B, N, scale, kind, idx(labels), in(targets), out(out_loss), out(out_lse), dtype,
                          group);
      },
      py::arg("cos"), py::arg("B"), py::arg("N"), py::arg("scale"), py::arg("kind"), py::arg("labels"),
      py::arg("targets"), py::arg("out_loss"), py::arg("out_lse"), py::arg("dtype"), py::arg("group") = 1, nogil,
      "Cross-entropy rows loss_b = a_b * lse_b - sum_n w_bn z_bn with z = scale * cos [B, N].\n\n"
      "kind 0: labels int64 [B] in [0, N); kind 1: w = 1/N; kind 2: targets [B, N] (cos's dtype), a_b = sum_n w_bn.\n"
      "kind 3 (multilabel soft margin): loss_b = (1/N) sum_n softplus(z_bn) - y_bn z_bn with y_bn = 1 iff\n"
      "n / group == labels[b], labels int64 [B] in [0, N / group), N a multiple of group; out_lse is 0.\n"
      "Unused pointers are 0. out_loss, out_lse [B].");
  m.def(
      "xent_bwd_cpu",
      [](Addr cos, std::int64_t B, std::int64_t N, double scale, int kind, Addr labels, Addr targets, Addr lse,
         Addr grad_loss, Addr out_dcos, int dtype, std::int64_t group) {
        pk::cpu::xent_bwd(in(cos), B, N, scale, kind, idx(labels), in(targets), in(lse), in(grad_loss),
                          out(out_dcos), dtype, group);
      },
      py::arg("cos"), py::arg("B"), py::arg("N"), py::arg("scale"), py::arg("kind"), py::arg("labels"),
      py::arg("targets"), py::arg("lse"), py::arg("grad_loss"), py::arg("out_dcos"), py::arg("dtype"),
      py::arg("group") = 1, nogil,
      "dcos_bn = grad_loss_b * scale * (a_b * exp(z_bn - lse_b) - w_bn) (kind 3: grad_loss_b * scale *\n"
      "(sigmoid(z_bn) - y_bn) / N, lse unused); arguments as xent_fwd_cpu plus lse [B] (from the forward),\n"
      "grad_loss [B]; out_dcos [B, N].");
  m.def(
      "l2norm_fwd_cpu",
      [](Addr x, std::int64_t R, std::int64_t D, double eps, Addr out_y, Addr out_inv_norm, int dtype) {
        pk::cpu::l2norm_fwd(in(x), R, D, eps, out(out_y), out(out_inv_norm), dtype);
      },
      py::arg("x"), py::arg("R"), py::arg("D"), py::arg("eps"), py::arg("out_y"), py::arg("out_inv_norm"),
      py::arg("dtype"), nogil, "x [R, D] -> out_y [R, D] = x / max(|x|, eps), out_inv_norm [R] = 1 / max(|x|, eps).");
  m.def(
      "l2norm_bwd_cpu",
      [](Addr dy, Addr y, Addr inv_norm, std::int64_t R, std::int64_t D, double eps, Addr out_dx, int dtype) {
        pk::cpu::l2norm_bwd(in(dy), in(y), in(inv_norm), R, D, eps, out(out_dx), dtype);
      },
      py::arg("dy"), py::arg("y"), py::arg("inv_norm"), py::arg("R"), py::arg("D"), py::arg("eps"),
      py::arg("out_dx"), py::arg("dtype"), nogil,
      "dx = inv_norm * (dy - y <dy, y>) per row; dx = inv_norm * dy where the forward (with this eps) clamped\n"
      "the norm, |x| <= eps (recognised by inv_norm = 1 / eps). dy, y, out_dx [R, D]; inv_norm [R].");
  m.def(
      "mix_cpu",
      [](Addr a, Addr b, Addr lam, std::int64_t B, std::int64_t D, Addr out_, int dtype) {
        pk::cpu::mix(in(a), in(b), in(lam), B, D, out(out_), dtype);
      },
      py::arg("a"), py::arg("b"), py::arg("lam"), py::arg("B"), py::arg("D"), py::arg("out"), py::arg("dtype"), nogil,
      "out [B, D] = normalize(lam * a + (1 - lam) * b) per row (norm floored at 1e-12); a, b [B, D], lam [B].");
  m.def(
      "ortho_fwd_cpu",
      [](Addr yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, Addr out_loss, int dtype) {
        pk::cpu::ortho_fwd(in(yn), C, K, D, mode, out(out_loss), dtype);
      },
      py::arg("yn"), py::arg("C"), py::arg("K"), py::arg("D"), py::arg("mode"), py::arg("out_loss"), py::arg("dtype"),
      nogil,
      "Orthogonality penalty of unit rows yn [C, K, D] into the scalar out_loss: mode 0 sum_c sum_{i<j} |g_cij|,\n"
      "mode 1 mean over c and i != j of g_cij (0 when K == 1).");
  m.def(
      "ortho_bwd_cpu",
      [](Addr yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, double grad, Addr out_dyn, int dtype) {
        pk::cpu::ortho_bwd(in(yn), C, K, D, mode, grad, out(out_dyn), dtype);
      },
      py::arg("yn"), py::arg("C"), py::arg("K"), py::arg("D"), py::arg("mode"), py::arg("grad"), py::arg("out_dyn"),
      py::arg("dtype"), nogil, "Gradient of ortho_fwd_cpu times the scalar grad, into out_dyn [C, K, D].");
}

#if PROMPTKIT_WITH_CUDA
void def_cuda(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  const char* dtypes = "dtype 0 float32, 1 float64, 2 float16, 3 bfloat16 (img/txt/a/b/yn/dy/y); every other float "
                       "array is in the accumulation type (float64 for float64, else float32). All pointers are CUDA "
                       "device pointers; stream is a cudaStream_t as int.";
  m.def(
      "cosine_cuda",
      [](Addr img, Addr txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale, Addr out_, int dtype,
         Addr stream) { pk::cuda::cosine(in(img), in(txt), B, N, D, scale, out(out_), dtype, stream); },
      py::arg("img"), py::arg("txt"), py::arg("B"), py::arg("N"), py::arg("D"), py::arg("scale"), py::arg("out"),
      py::arg("dtype"), py::arg("stream"), nogil,
      (std::string("out [B, N] = scale * img [B, D] @ txt [N, D]^T (rows already unit). ") + dtypes).c_str());
  m.def(
      "segment_stats_cuda",
      [](Addr img, Addr txt, std::int64_t B, std::int64_t N, std::int64_t D, Addr seg_offsets, Addr seg_scales,
         std::int64_t S, Addr out_max, Addr out_min, Addr out_lse, int dtype, Addr stream) {
        pk::cuda::segment_stats(in(img), in(txt), B, N, D, idx(seg_offsets), in(seg_scales), S, out(out_max),
                                out(out_min), out(out_lse), dtype, stream);
      },
      py::arg("img"), py::arg("txt"), py::arg("B"), py::arg("N"), py::arg("D"), py::arg("seg_offsets"),
      py::arg("seg_scales"), py::arg("S"), py::arg("out_max"), py::arg("out_min"), py::arg("out_lse"),
      py::arg("dtype"), py::arg("stream"), nogil,
      (std::string("segment_stats_cpu on cos = img @ txt^T computed in tiles (never stored). seg_offsets is not "
                   "checked on the device: pass 0 = o_0 <= ... <= o_S = N. ") + dtypes).c_str());
  m.def(
      "xent_fwd_cuda",
      [](Addr img, Addr txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale, int kind, Addr labels,
         Addr targets, Addr out_loss, Addr out_lse, int dtype, Addr stream, std::int64_t group) {
        pk::cuda::xent_fwd(in(img), in(txt), B, N, D, scale, kind, idx(labels), in(targets), out(out_loss),
                           out(out_lse), dtype, stream, group);
      },
      py::arg("img"), py::arg("txt"), py::arg("B"), py::arg("N"), py::arg("D"), py::arg("scale"), py::arg("kind"),
      py::arg("labels"), py::arg("targets"), py::arg("out_loss"), py::arg("out_lse"), py::arg("dtype"),
      py::arg("stream"), py::arg("group") = 1, nogil,
      (std::string("xent_fwd_cpu on cos = img @ txt^T computed in tiles (never stored); targets in the "
                   "accumulation type; a label outside [0, N) (kind 3: [0, N / group)) gives a NaN loss row. ") +
       dtypes).c_str());
  m.def(
      "xent_bwd_cuda",
      [](Addr img, Addr txt, std::int64_t B, std::int64_t N, std::int64_t D, double scale, int kind, Addr labels,
         Addr targets, Addr lse, Addr grad_loss, Addr out_dcos, int dtype, Addr stream, std::int64_t group) {
        pk::cuda::xent_bwd(in(img), in(txt), B, N, D, scale, kind, idx(labels), in(targets), in(lse), in(grad_loss),
                           out(out_dcos), dtype, stream, group);
      },
      py::arg("img"), py::arg("txt"), py::arg("B"), py::arg("N"), py::arg("D"), py::arg("scale"), py::arg("kind"),
      py::arg("labels"), py::arg("targets"), py::arg("lse"), py::arg("grad_loss"), py::arg("out_dcos"),
      py::arg("dtype"), py::arg("stream"), py::arg("group") = 1, nogil,
      (std::string("xent_bwd_cpu on cos = img @ txt^T computed in tiles; writes out_dcos [B, N]; a label outside "
                   "[0, N) gives a NaN row. ") + dtypes).c_str());
  m.def(
      "l2norm_fwd_cuda",
      [](Addr x, std::int64_t R, std::int64_t D, double eps, Addr out_y, Addr out_inv_norm, int dtype, Addr stream) {
        pk::cuda::l2norm_fwd(in(x), R, D, eps, out(out_y), out(out_inv_norm), dtype, stream);
      },
      py::arg("x"), py::arg("R"), py::arg("D"), py::arg("eps"), py::arg("out_y"), py::arg("out_inv_norm"),
      py::arg("dtype"), py::arg("stream"), nogil, (std::string("As l2norm_fwd_cpu. ") + dtypes).c_str());
  m.def(
      "l2norm_bwd_cuda",
      [](Addr dy, Addr y, Addr inv_norm, std::int64_t R, std::int64_t D, double eps, Addr out_dx, int dtype,
         Addr stream) {
        pk::cuda::l2norm_bwd(in(dy), in(y), in(inv_norm), R, D, eps, out(out_dx), dtype, stream);
      },
      py::arg("dy"), py::arg("y"), py::arg("inv_norm"), py::arg("R"), py::arg("D"), py::arg("eps"),
      py::arg("out_dx"), py::arg("dtype"), py::arg("stream"), nogil,
      (std::string("As l2norm_bwd_cpu. ") + dtypes).c_str());
  m.def(
      "mix_cuda",
      [](Addr a, Addr b, Addr lam, std::int64_t B, std::int64_t D, Addr out_, int dtype, Addr stream) {
        pk::cuda::mix(in(a), in(b), in(lam), B, D, out(out_), dtype, stream);
      },
      py::arg("a"), py::arg("b"), py::arg("lam"), py::arg("B"), py::arg("D"), py::arg("out"), py::arg("dtype"),
      py::arg("stream"), nogil, (std::string("As mix_cpu. ") + dtypes).c_str());
  m.def(
      "ortho_fwd_cuda",
      [](Addr yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, Addr out_loss, int dtype, Addr stream) {
        pk::cuda::ortho_fwd(in(yn), C, K, D, mode, out(out_loss), dtype, stream);
      },
      py::arg("yn"), py::arg("C"), py::arg("K"), py::arg("D"), py::arg("mode"), py::arg("out_loss"), py::arg("dtype"),
      py::arg("stream"), nogil, (std::string("As ortho_fwd_cpu (deterministic). ") + dtypes).c_str());
  m.def(
      "ortho_bwd_cuda",
      [](Addr yn, std::int64_t C, std::int64_t K, std::int64_t D, int mode, double grad, Addr out_dyn, int dtype,
         Addr stream) { pk::cuda::ortho_bwd(in(yn), C, K, D, mode, grad, out(out_dyn), dtype, stream); },
      py::arg("yn"), py::arg("C"), py::arg("K"), py::arg("D"), py::arg("mode"), py::arg("grad"), py::arg("out_dyn"),
      py::arg("dtype"), py::arg("stream"), nogil, (std::string("As ortho_bwd_cpu. ") + dtypes).c_str());
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "promptkit's compiled kernels (C++/OpenMP on CPU, CUDA when built with it); see build_info().";
  m.def("build_info", &build_info,
        "What this build contains: version, openmp, openmp_threads, cuda, cuda_version, cuda_archs, compiler, "
        "why_no_cuda.");
  m.def("abi", &abi_constants,
        "The kernel constants as the C++ headers define them (their source: promptkit/abi.py).");
  def_cpu(m);
#if PROMPTKIT_WITH_CUDA
  def_cuda(m);
#endif
}
