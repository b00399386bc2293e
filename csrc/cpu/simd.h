// Vector loads and reductions shared by the CPU kernels' AVX2 and AVX-512 bodies. Each function carries its own
// target attribute, so the extension is still built for the baseline ISA; callers pick a body at run time (vec.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOLM_X86 1
#include <immintrin.h>

#define MOLM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOLM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define MOLM_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

namespace molm::cpu::simd {

// ---------------------------------------------------------------- AVX2: 8 fp32 lanes
MOLM_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
MOLM_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MOLM_TARGET_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
MOLM_TARGET_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MOLM_TARGET_AVX2 inline __m256 load8(const int8_t* p) {  // int8 widened to fp32 (exact)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ---------------------------------------------------------------- AVX-512: 16 fp32 lanes
MOLM_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MOLM_TARGET_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
MOLM_TARGET_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MOLM_TARGET_AVX512 inline __m512 load16(const int8_t* p) {  // int8 widened to fp32 (exact)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

}  // namespace molm::cpu::simd
#endif
