// Host-side argument checks shared by the CPU and CUDA entry points. Each failure is one std::invalid_argument
// (a ValueError in Python) naming the kernel and the offending argument.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "defs.h"

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
  if (kind < 0 || kind > 3)
    invalid(fn, "kind must be 0 (index), 1 (uniform), 2 (dense) or 3 (multilabel), got " + std::to_string(kind));
}

inline void require_mode(const char* fn, int mode) {
  if (mode != 0 && mode != 1) invalid(fn, "mode must be 0 (abs_sum) or 1 (mean_cos), got " + std::to_string(mode));
}

}  // namespace pk
