// The CPU kernels' parallel decomposition and vector loops: rows are split into blocks of consecutive rows that
// the OpenMP threads claim in turn, and each block runs a function compiled for several x86 ISAs (picked once at
// load time).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/checks.h"
#include "common/defs.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// AVX-512, AVX2+FMA and baseline copies of the row loops; the dynamic loader picks the best the CPU runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define PK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PK_CPU_CLONES
#endif

namespace pk::cpu {

// Below this many elements a kernel runs on the calling thread: waking the team costs more than it saves.
constexpr std::int64_t kParallelMinWork = 1 << 15;

// Columns folded into the online state at a time: small enough to stay in L1 between the max and exp passes.
constexpr std::int64_t kChunk = 1024;

// Row blocks per thread that parallel_ranges aims for: a thread that the OS deschedules (on a machine shared with
// other jobs) holds up only its current block, while the others take the rest.
constexpr std::int64_t kBlocksPerThread = 8;

// Calls body(begin, end) on disjoint ranges covering [0, n), in increasing order within each thread; work =
// elements touched in all. The ranges are blocks of consecutive rows that the threads claim one at a time, so the
// split follows the CPU time each thread actually gets; which thread runs a block never changes a result.
template <class Body> void parallel_ranges(std::int64_t n, std::int64_t work, const Body& body) {
#ifdef _OPENMP
  if (n > 1 && work >= kParallelMinWork && omp_get_max_threads() > 1) {
    const std::int64_t per_block = std::max<std::int64_t>(1, kParallelMinWork * n / work);  // rows
    std::int64_t next = 0;
#pragma omp parallel
    {
      const std::int64_t blocks = std::min(std::int64_t(omp_get_num_threads()) * kBlocksPerThread,
                                           (n + per_block - 1) / per_block);
      for (;;) {
        std::int64_t block;
#pragma omp atomic capture
        block = next++;
        if (block >= blocks) break;
        body(n * block / blocks, n * (block + 1) / blocks);
      }
    }
    return;
  }
#endif
  if (n > 0) body(0, n);
}

// Calls f(A{}) with A = float or double for dtype 0 or 1.
template <class F> void dispatch_dtype(const char* fn, int dtype, const F& f) {
  if (dtype == kFloat32) return f(float{});
  if (dtype == kFloat64) return f(double{});
  invalid(fn, std::string("dtype code ") + std::to_string(dtype) + " (" + dtype_name(dtype) +
                  ") is not supported on CPU; use 0 (float32) or 1 (float64)");
}

// Calls f(std::integral_constant<int, kind>{}) for a checked xent kind.
template <class F> void dispatch_kind(const char* fn, int kind, const F& f) {
  require_kind(fn, kind);
  if (kind == 0) return f(std::integral_constant<int, 0>{});
  if (kind == 1) return f(std::integral_constant<int, 1>{});
  return f(std::integral_constant<int, 2>{});
}

// max and min of scale * x[0, n).
template <class A> inline void scaled_max_min(const A* x, std::int64_t n, A scale, A& max, A& min) {
  A mx = -infinity<A>(), mn = infinity<A>();
#pragma omp simd reduction(max : mx) reduction(min : mn)
  for (std::int64_t i = 0; i < n; ++i) {
    const A z = mul_rn(scale, x[i]);
    mx = z > mx ? z : mx;
    mn = z < mn ? z : mn;
  }
  max = mx;
  min = mn;
}

template <class A> inline A scaled_max(const A* x, std::int64_t n, A scale) {
  A mx = -infinity<A>();
#pragma omp simd reduction(max : mx)
  for (std::int64_t i = 0; i < n; ++i) {
    const A z = mul_rn(scale, x[i]);
    mx = z > mx ? z : mx;
  }
  return mx;
}

template <class A> inline A dot(const A* x, const A* y, std::int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (std::int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

}  // namespace pk::cpu
