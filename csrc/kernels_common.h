/* Definitions shared by the kernel sources (not part of the cffi interface).
 *
 * The AVX2 code needs GCC or Clang on x86-64, because it uses per-function target
 * attributes and __builtin_cpu_supports. Other platforms compile the portable code
 * only, and -DRGREF_NO_AVX2 does the same on x86-64 to check that build.
 *
 * Floating point: the build uses -O3 with IEEE semantics (no -ffast-math) and
 * -ffp-contract=off, so the compiler never fuses a multiply and an add on its own.
 * Fused multiply-adds appear only where the code calls an FMA intrinsic
 * (_mm256_fmadd_ps, _mm256_fnmadd_ps or _mm512_fmadd_ps).
 */
#ifndef RGREF_KERNELS_COMMON_H
#define RGREF_KERNELS_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "rgref_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(RGREF_NO_AVX2)
#define RGREF_HAVE_AVX2_CODE 1
#include <immintrin.h>
#define RGREF_AVX2 __attribute__((target("avx2,fma")))
#define RGREF_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
/* The matrix-matrix tiles also have AVX-512 code (foundation and DQ instructions), which
   runs the same FMAs in the same order on registers twice as wide. */
#define RGREF_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))
#define RGREF_AVX512_INLINE \
    static inline __attribute__((always_inline, target("avx512f,avx512dq,avx2,fma")))
#else
#define RGREF_HAVE_AVX2_CODE 0
#endif

/* Multiply-adds below which a matrix kernel runs on one thread. At this size a second
   thread saves little on an idle 2-core machine: a bfloat16 GEMV of 1024 x 128 weights
   took 10.7 us on one thread and 9.1 us on two. It costs far more when other processes
   keep the cores busy. */
#define MIN_PARALLEL_MULTIPLY_ADDS (1 << 17)

/* Floats in one AVX2 register. The portable code uses the same width where the order
   of a sum depends on it. */
#define LANES 8

/* The instruction sets a fast kernel can run, from rgref_simd_level(). */
#define RGREF_SIMD_PORTABLE 0
#define RGREF_SIMD_AVX2 1
#define RGREF_SIMD_AVX512 2

/* Return the widest of those that this build has code for, the CPU runs and
   rgref_set_avx512 allows. */
int rgref_simd_level(void);

static inline int64_t min_i64(int64_t a, int64_t b) {
    return a < b ? a : b;
}

/* Split [0, total) into `parts` contiguous ranges whose boundaries are multiples of
   `multiple` (except the end), and return the start of range `part`. Ranges differ in
   length by at most `multiple`. */
static inline int64_t split_point(int64_t total, int64_t parts, int64_t part,
                                  int64_t multiple) {
    int64_t units = (total + multiple - 1) / multiple;
    return min_i64(total, units * part / parts * multiple);
}

/* bfloat16 bits are the top 16 bits of a float32, so widening is exact. */
static inline float bf16_to_f32(uint16_t bits) {
    union {
        uint32_t u;
        float f;
    } value;
    value.u = (uint32_t)bits << 16;
    return value.f;
}

/* Element `index` of a weight array of float32 or of bfloat16 bits. */
static inline float weight_at(const void *w, int64_t index, int w_is_bf16) {
    if (w_is_bf16) {
        return bf16_to_f32(((const uint16_t *)w)[index]);
    }
    return ((const float *)w)[index];
}

#if RGREF_HAVE_AVX2_CODE

/* Widen 8 bfloat16 values (their uint16 bits) to float32. */
RGREF_AVX2_INLINE __m256 avx2_load_bf16(const uint16_t *bits) {
    __m128i packed = _mm_loadu_si128((const __m128i *)bits);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16));
}

/* Load 8 weights from index `index` of a float32 or bfloat16 weight array. */
RGREF_AVX2_INLINE __m256 avx2_load_weights(const void *w, int64_t index, int w_is_bf16) {
    if (w_is_bf16) {
        return avx2_load_bf16((const uint16_t *)w + index);
    }
    return _mm256_loadu_ps((const float *)w + index);
}

/* exp(x) for 8 floats. exp(x) = 2^n * exp(r) with n = round(x / ln 2), and
 * r = x - n * ln 2 computed with ln 2 split in two parts (Cody-Waite), so |r| <= 0.35.
 * exp(r) is the polynomial of the Cephes expf (Stephen L. Moshier). Above
 * log(FLT_MAX) the result is +inf, and below log(FLT_MIN) = -87.34 it is 0 where
 * libm returns a subnormal (below 1.2e-38). NaN stays NaN. Against exp in double
 * precision, the error is at most 1.01 units in the last place over every float in
 * [-87.33, 88.72] (csrc/check_avx2_exp.c checks them all). */
RGREF_AVX2_INLINE __m256 avx2_exp(__m256 x) {
    const __m256 max_input = _mm256_set1_ps(88.72283935546875f); /* float below log(FLT_MAX) */
    const __m256 min_input = _mm256_set1_ps(-87.33654475f);     /* log(FLT_MIN) */
    const __m256 one = _mm256_set1_ps(1.0f);

    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);

    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), one); /* exp(r) */

    /* 2^n from its exponent bits. n reaches 128 just below log(FLT_MAX), which has no
       exponent field, so that case scales by 2^127 and doubles p. */
    __m256 too_big = _mm256_cmp_ps(n, _mm256_set1_ps(127.0f), _CMP_GT_OQ);
    p = _mm256_blendv_ps(p, _mm256_add_ps(p, p), too_big);
    n = _mm256_min_ps(n, _mm256_set1_ps(127.0f));
    __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));

    result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY),
                              _mm256_cmp_ps(x, max_input, _CMP_GT_OQ));
    result = _mm256_blendv_ps(result, _mm256_setzero_ps(),
                              _mm256_cmp_ps(x, min_input, _CMP_LT_OQ));
    return result;
}

/* Add the 8 lanes of v in the order ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)),
   the order finish_dot in linear.c uses. */
RGREF_AVX2_INLINE float avx2_sum_lanes(__m256 v) {
    __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

#endif /* RGREF_HAVE_AVX2_CODE */

#endif /* RGREF_KERNELS_COMMON_H */
