// What every CUDA entry point shares: dtype dispatch, element loads into the accumulation type, warp
// reductions, the device guard and launch error checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "common/defs.h"
#include "cuda/kernels.h"

namespace pk::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Sum over the `width` consecutive lanes that share a value group (width a power of two <= 32); every lane
// of the group gets the total, combined in the same order on every lane.
template <int width, class A> __device__ __forceinline__ A group_sum(A v) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Calls f(T{}) for the element type named by a dtype code.
template <class F> void dispatch_dtype(const char* fn, int dtype, const F& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat64: return f(double{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    default:
      invalid(fn, "dtype code " + std::to_string(dtype) + " is not one of 0 (float32), 1 (float64), 2 (float16), "
                  "3 (bfloat16)");
  }
}

[[noreturn]] inline void cuda_failure(const char* fn, const char* what, cudaError_t error) {
  throw std::runtime_error(std::string(fn) + ": " + what + ": " + cudaGetErrorString(error));
}

// Makes the device that owns `ptr` current for the launch (this module's static CUDA runtime does not follow
// torch's current device) and restores the previous one afterwards. A pointer that is not device memory is a
// ValueError: it is a CPU tensor handed to a CUDA kernel.
class DeviceGuard {
 public:
  DeviceGuard(const char* fn, const void* ptr) {
    cudaPointerAttributes attributes{};
    cudaError_t error = cudaPointerGetAttributes(&attributes, ptr);
    if (error != cudaSuccess) cuda_failure(fn, "cannot query the input pointer", error);
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
      invalid(fn, "the input is not CUDA device memory (a CPU tensor passed to a CUDA kernel?)");
    error = cudaGetDevice(&previous_);
    if (error != cudaSuccess) cuda_failure(fn, "cudaGetDevice failed", error);
    if (attributes.device != previous_) {
      error = cudaSetDevice(attributes.device);
      if (error != cudaSuccess) cuda_failure(fn, "cudaSetDevice failed", error);
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) cuda_failure(kernel, "kernel launch failed", error);
}

inline cudaStream_t as_stream(Stream stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline unsigned blocks_for(std::int64_t items, std::int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

}  // namespace pk::cuda
