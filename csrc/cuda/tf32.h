// torch's TF32 switch for float32 matmuls, as the CUDA products read it. Plain C++ (no CUDA), so that a CPU test
// (tests/ops/test_gpu_compile.py) can compile it on its own and check it against torch's settings.
#pragma once

#include <dlfcn.h>

namespace pk::cuda {

// Whether torch lets float32 matmuls on CUDA use TF32, read from the libtorch this process has loaded (the module
// does not link libtorch, so that one build serves every torch). torch >= 2.9 keeps the switch as
// float32Precision(CUDA, MATMUL) == TF32, which set_float32_matmul_precision, backends.cuda.matmul.allow_tf32 and
// the newer fp32_precision settings all write; older torch only has float32MatmulPrecision() != HIGHEST. The
// enum values are those of ATen/Context.h. No libtorch, neither symbol, or torch refusing to answer: exact fp32.
inline bool torch_allows_tf32() {
  using GlobalContext = const void* (*)();
  // const member functions: `this` is the first argument; enums pass and return as int
  using Precision = int (*)(const void*, int, int);
  using LegacyPrecision = int (*)(const void*);
  constexpr int kCudaBackend = 1, kMatmulOp = 3, kTf32 = 2, kHighest = 0;
  struct Torch {
    GlobalContext context = nullptr;
    Precision precision = nullptr;
    LegacyPrecision legacy = nullptr;
  };
  static const Torch torch = [] {
    Torch found;
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD)) {
      found.context = reinterpret_cast<GlobalContext>(dlsym(lib, "_ZN2at13globalContextEv"));
      found.precision = reinterpret_cast<Precision>(
          dlsym(lib, "_ZNK2at7Context16float32PrecisionENS_14Float32BackendENS_9Float32OpE"));
      found.legacy = reinterpret_cast<LegacyPrecision>(dlsym(lib, "_ZNK2at7Context22float32MatmulPrecisionEv"));
    }
    return found;
  }();
  if (torch.context == nullptr) return false;
  try {
    if (torch.precision != nullptr) return torch.precision(torch.context(), kCudaBackend, kMatmulOp) == kTf32;
    return torch.legacy != nullptr && torch.legacy(torch.context()) != kHighest;
  } catch (...) {
    return false;
  }
}

}  // namespace pk::cuda
