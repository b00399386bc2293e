// The CUDA headers, launch macros and small device math shared by the ATen-free kernel headers (permute.cuh,
// expert_gemm.cuh, sb_*.cuh). Compiles with nvcc and, with MOLM_CUDA_EMU, against the CPU emulator
// (tests/cuda_emu/cuda_emu.h), so the same kernel source runs in tests without a GPU.
#pragma once

#ifdef MOLM_CUDA_EMU
#include "cuda_emu.h"  // test support: the emulator builds put tests/cuda_emu on the include path
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

// Kernel launches and dynamic shared memory, the same source for nvcc and the emulator.
#ifdef MOLM_CUDA_EMU
#define MOLM_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  molm_emu::launch(grid, block, smem, kernel, __VA_ARGS__)
#define MOLM_CUDA_SMEM(name) unsigned char* name = molm_emu::dynamic_smem()
#else
#define MOLM_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define MOLM_CUDA_SMEM(name)                                   \
  extern __shared__ __align__(128) unsigned char name##_raw[]; \
  unsigned char* name = name##_raw
#endif

namespace molm::cuda {

#ifdef MOLM_CUDA_EMU
using stream_t = void*;
#else
using stream_t = cudaStream_t;
#endif

// Accumulation type of an element type as the kernels see it (__nv_bfloat16, __half, float, double).
template <typename T>
using dev_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest grid.x and grid.y / grid.z extents.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace molm::cuda

namespace molm::cuda::dev {

// VEC elements moved as one (16-byte when VEC * sizeof(T) == 16) load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Element <-> accumulator conversions (round to nearest even into the 16-bit types).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(x);
  else if constexpr (std::is_same_v<T, __half>)
    return __half2float(x);
  else
    return static_cast<acc_t>(x);
}
template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16(x);
  else if constexpr (std::is_same_v<T, __half>)
    return __float2half(x);
  else
    return static_cast<T>(x);
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// GPT-2's tanh GELU ("gelu_new"), in fp32 (fp64 for double), as ATen's gelu(approximate="tanh").
__device__ __forceinline__ float gelu_new(float x) {
  const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  const float inner = kBeta * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}
__device__ __forceinline__ double gelu_new(double x) {
  const double kBeta = 0.7978845608028654;
  const double inner = kBeta * (x + 0.044715 * x * x * x);
  return 0.5 * x * (1.0 + tanh(inner));
}

// acc + a * b rounded twice (no FMA contraction), the way an eager `out += g * y` in torch rounds.
__device__ __forceinline__ float mul_add_rn(float acc, float a, float b) { return __fadd_rn(acc, __fmul_rn(a, b)); }
__device__ __forceinline__ double mul_add_rn(double acc, double a, double b) { return __dadd_rn(acc, __dmul_rn(a, b)); }

// Inclusive sum over lanes <= lane.
template <typename T>
__device__ __forceinline__ T warp_prefix_sum(T x, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace molm::cuda::dev
