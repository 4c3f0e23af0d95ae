// Host-side argument checks shared by the CPU and CUDA entry points. Each failure is one std::invalid_argument
// (a ValueError in Python) naming the kernel and the offending argument.
//
// User-facing validation (dtypes, shapes, devices, finiteness, label ranges, with one-line messages naming the
// user's argument) happens once, in the ops layer (promptkit/ops/_checks.py). These checks stay because the
// kernels are also reachable without it, through promptkit._C and the custom ops torch.ops.promptkit.*: each
// guards an invariant without which a kernel would read or write out of bounds or dispatch on a code it does not
// know (a null array, a negative size, an unknown xent kind, ortho mode or dtype code).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "defs.h"
#include "ortho.h"
#include "xent.h"

namespace pk {

[[noreturn]] inline void invalid(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string(fn) + ": " + what);
}

inline void require_at_least(const char* fn, const char* name, std::int64_t value, std::int64_t min) {
  if (value < min) invalid(fn, std::string(name) + " must be >= " + std::to_string(min) + ", got " + std::to_string(value));
}

inline void require_ptr(const char* fn, const char* name, const void* ptr) {
  if (ptr == nullptr) invalid(fn, std::string(name) + " is a null pointer (0)");
}

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline void require_kind(const char* fn, int kind) {
  if (kind < kXentIndex || kind > kXentMultilabel)
    invalid(fn, "kind must be 0 (index), 1 (uniform), 2 (dense) or 3 (multilabel), got " + std::to_string(kind));
}

inline void require_mode(const char* fn, int mode) {
  if (mode != kOrthoAbsSum && mode != kOrthoMeanCos)
    invalid(fn, "mode must be 0 (abs_sum) or 1 (mean_cos), got " + std::to_string(mode));
}

}  // namespace pk
