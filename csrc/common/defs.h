// Definitions shared by the CPU (C++) and CUDA translation units: the host/device marker, the accumulation
// type, the dtype codes Python passes, and the few scalar primitives (exp, log, finiteness) the row math uses.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#else
#define PK_HD inline
#endif

namespace pk {

// The kernel constants are defined once, in promptkit/abi.py, and mirrored here, all of them;
// promptkit._C.abi() (bindings.cpp) exports this mirror and tests/ops/test_abi.py fails when it differs.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
// The xent kinds (xent.h): the loss targets by index, uniform, dense, and the multi-label soft margin.
enum XentKind : int { kXentIndex = 0, kXentUniform = 1, kXentDense = 2, kXentMultilabel = 3 };
// The ortho modes (ortho.h): sum of |cos| over pairs, mean cos.
enum OrthoMode : int { kOrthoAbsSum = 0, kOrthoMeanCos = 1 };
// The norm floor of mix's re-normalisation (torch.nn.functional.normalize's default eps).
constexpr double kMixEps = 1e-12;

// Accumulation ("acc") type: fp64 for fp64 inputs, fp32 for everything else (fp32, fp16, bf16).
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

template <class A> PK_HD A infinity() { return A(INFINITY); }
template <class A> PK_HD A quiet_nan() { return A(NAN); }

// scale * x rounded once and never fused into a later add: the forward and the backward must compute the very
// same z = scale * cos, or exp(z - lse) drifts from 1 where the softmax is exactly one-hot. (Host code is built
// with -ffp-contract=off; nvcc fuses by default, so the device path uses the explicit round-to-nearest multiply.)
template <class A> PK_HD A mul_rn(A scale, A x) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == sizeof(double)) {
    return __dmul_rn(scale, x);
  } else {
    return __fmul_rn(scale, x);
  }
#else
  return scale * x;
#endif
}

// True for finite x; false for +-inf and NaN (x - x is NaN exactly then). No <cmath> call, so it vectorises.
template <class A> PK_HD bool is_finite(A x) { return x - x == A(0); }

#if !defined(__CUDA_ARCH__)
// Host exp: a branch-free Cody-Waite + Taylor evaluation that GCC can vectorise (glibc only offers vector
// expf under -ffast-math, which would break NaN propagation). Error ~1 ulp; exact at +-inf, NaN and 0.
template <class A> struct ExpConsts;
template <> struct ExpConsts<float> {
  using Bits = std::int32_t;
  static constexpr float lo = -104.0f, hi = 89.0f;   // exp underflows to 0 below lo and overflows above hi
  static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693145751953125f;  // 16 bits, so n * ln2_hi is exact
  static constexpr float ln2_lo = 1.4286068203094173e-06f;
  static constexpr int bias = 127, mantissa_bits = 23, degree = 7;
};
template <> struct ExpConsts<double> {
  using Bits = std::int64_t;
  static constexpr double lo = -746.0, hi = 710.0;
  static constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 0.6931471805592082;  // 40 bits
  static constexpr double ln2_lo = 7.371002565167799e-13;  // ln2 - ln2_hi, from 60-digit ln2
  static constexpr int bias = 1023, mantissa_bits = 52, degree = 13;
};

template <class A, int N> struct InvFactorials {
  A v[N + 1];
  constexpr InvFactorials() : v() {
    A factorial = 1;
    v[0] = 1;
    for (int k = 1; k <= N; ++k) {
      factorial *= A(k);
      v[k] = A(1) / factorial;
    }
  }
};

template <class A> inline typename ExpConsts<A>::Bits bits_of(A x) {
  typename ExpConsts<A>::Bits b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
template <class A> inline A from_bits(typename ExpConsts<A>::Bits b) {
  A x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

template <class A> inline A exp_acc(A x) {
  using C = ExpConsts<A>;
  using Bits = typename C::Bits;
  A xc = x > C::lo ? x : C::lo;  // also maps NaN to lo, so the integer part below is always defined
  xc = xc < C::hi ? xc : C::hi;
  // x = n ln2 + r with n integer, |r| <= ln2 / 2; n is read from the low mantissa bits of t.
  const A t = xc * C::log2e + C::round_magic;
  const A n = t - C::round_magic;
  const Bits ni = bits_of(t) - bits_of(C::round_magic);
  const A r = (xc - n * C::ln2_hi) - n * C::ln2_lo;
  // exp(r) = sum_k r^k / k!, Horner form (one fma a step once unrolled).
  constexpr InvFactorials<A, C::degree> inv_fact{};
  A p = inv_fact.v[C::degree];
  for (int k = C::degree - 1; k >= 0; --k) p = p * r + inv_fact.v[k];
  // 2^n as two factors so that n just outside the normal exponent range still scales correctly.
  const Bits half = ni / 2;
  const A s1 = from_bits<A>((half + C::bias) << C::mantissa_bits);
  const A s2 = from_bits<A>((ni - half + C::bias) << C::mantissa_bits);
  A y = p * s1 * s2;
  y = x < C::lo ? A(0) : y;
  y = x > C::hi ? infinity<A>() : y;
  return x == x ? y : x;
}
template <class A> inline A log_acc(A x) { return std::log(x); }
template <class A> inline A sqrt_acc(A x) { return std::sqrt(x); }
#else
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }
#endif

}  // namespace pk
