// What every CUDA entry point shares: dtype dispatch, element loads into the accumulation type, warp
// reductions, the device guard, launch error checks and stream-ordered scratch memory.
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "promptkit's CUDA kernels use bf16 and TF32 tensor-core instructions: build for sm_80 or newer"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

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

// Streaming multiprocessors of the current device: how many blocks a launch needs to fill it.
inline int sm_count(const char* fn) {
  int device = 0, sms = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) cuda_failure(fn, "cannot query the device", error);
  return sms;
}

// Temporary device memory for one call's kernels, allocated and freed in stream order (no host synchronisation)
// from a pool of this module's own per device, which keeps what it has between calls instead of handing it back
// to the driver at every synchronisation. Construct it after the DeviceGuard, on the launch stream.
class Scratch {
 public:
  Scratch(const char* fn, std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    const cudaError_t error = cudaMallocFromPoolAsync(&ptr_, bytes, pool(fn), stream);
    if (error != cudaSuccess) cuda_failure(fn, "cannot allocate scratch memory", error);
  }
  ~Scratch() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <class X> X* as(std::size_t offset_elements = 0) const {
    return static_cast<X*>(ptr_) + offset_elements;
  }

 private:
  static cudaMemPool_t pool(const char* fn) {
    static std::mutex mutex;  // the bindings release the GIL
    static std::vector<cudaMemPool_t> pools;
    int device = 0;
    cudaError_t error = cudaGetDevice(&device);
    if (error != cudaSuccess) cuda_failure(fn, "cudaGetDevice failed", error);
    const std::lock_guard<std::mutex> lock(mutex);
    if (pools.size() <= static_cast<std::size_t>(device)) pools.resize(device + 1, nullptr);
    if (pools[device] == nullptr) {
      cudaMemPoolProps props{};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = device;
      cudaMemPool_t created = nullptr;
      error = cudaMemPoolCreate(&created, &props);
      if (error != cudaSuccess) cuda_failure(fn, "cannot create the scratch memory pool", error);
      std::uint64_t keep = UINT64_MAX;
      cudaMemPoolSetAttribute(created, cudaMemPoolAttrReleaseThreshold, &keep);
      pools[device] = created;
    }
    return pools[device];
  }

  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace pk::cuda
