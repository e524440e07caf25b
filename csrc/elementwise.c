/* Elementwise kernels: GELU (tanh approximation), optionally times a second input,
 * and the logit soft cap (see rgref_kernels.h).
 *
 *   gelu_tanh(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
 *   soft_cap(z)  = cap * tanh(z / cap)
 *
 * The fast and portable kernels share one tanh: for |v| < 0.25 the Taylor series
 * v - v^3/3 + 2v^5/15 - 17v^7/315 + 62v^9/2835, whose first omitted term is below
 * 2^-26 of |v| there; elsewhere (1 - e) / (1 + e) with e = exp(-2|v|) and the sign of
 * v, where 1 - e >= 0.39 cancels no leading bits. The naive kernels call libm tanhf.
 * csrc/check_tanh.c measures the error of both forms over every float.
 *
 * y may be x itself (the kernels then work in place), but must not overlap it
 * otherwise, nor `up`.
 *
 * Each element is computed on its own, so any split across threads gives the same
 * bits.
 */
#include "kernels_common.h"

/* sqrt(2 / pi) and the cubic coefficient of the GELU tanh approximation. */
#define GELU_SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f

/* Below this |v| the tanh Taylor series is used. */
#define TANH_SERIES_LIMIT 0.25f

/* Taylor coefficients of tanh: v + v^3 (c3 + v^2 (c5 + v^2 (c7 + v^2 c9))). */
#define TANH_C3 (-1.0f / 3.0f)
#define TANH_C5 (2.0f / 15.0f)
#define TANH_C7 (-17.0f / 315.0f)
#define TANH_C9 (62.0f / 2835.0f)

/* Threads take chunks of ELEMENTWISE_CHUNK elements (a multiple of 8, so every chunk
   but the last is whole vectors) one at a time, and there are no more threads than
   chunks: below that the work is tens of microseconds. */
#define ELEMENTWISE_CHUNK 16384

/* ------------------------------------------------------------------------------------
 * tanh
 */

static inline float portable_tanh(float v) {
    float magnitude = fabsf(v);
    if (magnitude < TANH_SERIES_LIMIT) {
        float v2 = v * v;
        float series = TANH_C7 + v2 * TANH_C9;
        series = TANH_C5 + v2 * series;
        series = TANH_C3 + v2 * series;
        return v + v * (v2 * series);
    }
    float e = expf(-2.0f * magnitude);
    return copysignf((1.0f - e) / (1.0f + e), v);
}

#if RGREF_HAVE_AVX2_CODE

/* portable_tanh for 8 floats, with avx2_exp for expf and fused multiply-adds in the
   series. NaN stays NaN. */
RGREF_AVX2_INLINE __m256 avx2_tanh(__m256 v) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 magnitude = _mm256_andnot_ps(sign_bit, v);

    __m256 v2 = _mm256_mul_ps(v, v);
    __m256 series = _mm256_fmadd_ps(v2, _mm256_set1_ps(TANH_C9), _mm256_set1_ps(TANH_C7));
    series = _mm256_fmadd_ps(v2, series, _mm256_set1_ps(TANH_C5));
    series = _mm256_fmadd_ps(v2, series, _mm256_set1_ps(TANH_C3));
    __m256 small = _mm256_fmadd_ps(v, _mm256_mul_ps(v2, series), v);

    __m256 e = avx2_exp(_mm256_mul_ps(_mm256_set1_ps(-2.0f), magnitude));
    __m256 large = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    large = _mm256_or_ps(large, _mm256_and_ps(sign_bit, v));

    __m256 use_series = _mm256_cmp_ps(magnitude, _mm256_set1_ps(TANH_SERIES_LIMIT),
                                      _CMP_LT_OQ);
    return _mm256_blendv_ps(large, small, use_series);
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------
 * Scalar forms: the naive kernels with libm tanhf, the portable ones with
 * portable_tanh. Each operation is in the order of the formula at the top.
 */

static inline float gelu_with(float x, float (*tanh_fn)(float)) {
    float inner = GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * (x * x * x));
    return 0.5f * x * (1.0f + tanh_fn(inner));
}

static float libm_tanh(float v) {
    return tanhf(v);
}

/* ------------------------------------------------------------------------------------
 * Ranges: y[i] for i in [begin, end). `up` is NULL for plain GELU.
 */

static void gelu_range_portable(const float *x, const float *up, float *y, int64_t begin,
                                int64_t end) {
    for (int64_t i = begin; i < end; i++) {
        float value = gelu_with(x[i], portable_tanh);
        y[i] = up != NULL ? value * up[i] : value;
    }
}

static void soft_cap_range_portable(const float *x, float cap, float *y, int64_t begin,
                                    int64_t end) {
    for (int64_t i = begin; i < end; i++) {
        y[i] = cap * portable_tanh(x[i] / cap);
    }
}

#if RGREF_HAVE_AVX2_CODE

/* GELU of 8 floats, the operations of gelu_with in the same order, without fusing. */
RGREF_AVX2_INLINE __m256 avx2_gelu(__m256 x) {
    __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 inner = _mm256_mul_ps(
        _mm256_set1_ps(GELU_SQRT_2_OVER_PI),
        _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(GELU_CUBIC), cube)));
    __m256 half_x = _mm256_mul_ps(_mm256_set1_ps(0.5f), x);
    return _mm256_mul_ps(half_x, _mm256_add_ps(_mm256_set1_ps(1.0f), avx2_tanh(inner)));
}

static RGREF_AVX2 void gelu_range_avx2(const float *x, const float *up, float *y,
                                       int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + LANES <= end; i += LANES) {
        __m256 value = avx2_gelu(_mm256_loadu_ps(x + i));
        if (up != NULL) {
            value = _mm256_mul_ps(value, _mm256_loadu_ps(up + i));
        }
        _mm256_storeu_ps(y + i, value);
    }
    /* The last end - i < 8 elements go through a zero-padded vector. */
    if (i < end) {
        float x_lanes[LANES] = {0.0f};
        float up_lanes[LANES] = {0.0f};
        float y_lanes[LANES];
        for (int64_t l = 0; l < end - i; l++) {
            x_lanes[l] = x[i + l];
            up_lanes[l] = up != NULL ? up[i + l] : 0.0f;
        }
        __m256 value = avx2_gelu(_mm256_loadu_ps(x_lanes));
        if (up != NULL) {
            value = _mm256_mul_ps(value, _mm256_loadu_ps(up_lanes));
        }
        _mm256_storeu_ps(y_lanes, value);
        for (int64_t l = 0; l < end - i; l++) {
            y[i + l] = y_lanes[l];
        }
    }
}

RGREF_AVX2_INLINE __m256 avx2_soft_cap(__m256 x, __m256 cap) {
    return _mm256_mul_ps(cap, avx2_tanh(_mm256_div_ps(x, cap)));
}

static RGREF_AVX2 void soft_cap_range_avx2(const float *x, float cap, float *y,
                                           int64_t begin, int64_t end) {
    __m256 cap_vector = _mm256_set1_ps(cap);
    int64_t i = begin;
    for (; i + LANES <= end; i += LANES) {
        _mm256_storeu_ps(y + i, avx2_soft_cap(_mm256_loadu_ps(x + i), cap_vector));
    }
    if (i < end) {
        float lanes[LANES] = {0.0f};
        for (int64_t l = 0; l < end - i; l++) {
            lanes[l] = x[i + l];
        }
        _mm256_storeu_ps(lanes, avx2_soft_cap(_mm256_loadu_ps(lanes), cap_vector));
        for (int64_t l = 0; l < end - i; l++) {
            y[i + l] = lanes[l];
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------
 * Dispatch
 */

/* Return how many threads to use for n elements: at most one per chunk. */
static int elementwise_threads(int64_t n) {
    int64_t threads = rgref_get_num_threads();
    int64_t useful = n / ELEMENTWISE_CHUNK;
    if (useful < threads) {
        threads = useful > 1 ? useful : 1;
    }
    return (int)threads;
}

typedef void (*gelu_range_fn)(const float *, const float *, float *, int64_t, int64_t);
typedef void (*soft_cap_range_fn)(const float *, float, float *, int64_t, int64_t);

static void gelu_parallel(gelu_range_fn range, const float *x, const float *up, float *y,
                          int64_t n) {
    int64_t num_chunks = (n + ELEMENTWISE_CHUNK - 1) / ELEMENTWISE_CHUNK;
    int num_threads = elementwise_threads(n);
    (void)num_threads; /* unused without OpenMP */
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
#endif
    for (int64_t chunk = 0; chunk < num_chunks; chunk++) {
        range(x, up, y, chunk * ELEMENTWISE_CHUNK, min_i64(n, (chunk + 1) * ELEMENTWISE_CHUNK));
    }
}

static void soft_cap_parallel(soft_cap_range_fn range, const float *x, float cap, float *y,
                              int64_t n) {
    int64_t num_chunks = (n + ELEMENTWISE_CHUNK - 1) / ELEMENTWISE_CHUNK;
    int num_threads = elementwise_threads(n);
    (void)num_threads; /* unused without OpenMP */
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
#endif
    for (int64_t chunk = 0; chunk < num_chunks; chunk++) {
        range(x, cap, y, chunk * ELEMENTWISE_CHUNK, min_i64(n, (chunk + 1) * ELEMENTWISE_CHUNK));
    }
}

void rgref_gelu_tanh(const float *x, const float *up, float *y, int64_t n) {
    gelu_range_fn range = gelu_range_portable;
#if RGREF_HAVE_AVX2_CODE
    if (rgref_uses_avx2()) {
        range = gelu_range_avx2;
    }
#endif
    gelu_parallel(range, x, up, y, n);
}

void rgref_gelu_tanh_portable(const float *x, const float *up, float *y, int64_t n) {
    gelu_parallel(gelu_range_portable, x, up, y, n);
}

void rgref_gelu_tanh_naive(const float *x, const float *up, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float value = gelu_with(x[i], libm_tanh);
        y[i] = up != NULL ? value * up[i] : value;
    }
}

void rgref_soft_cap(const float *x, float cap, float *y, int64_t n) {
    soft_cap_range_fn range = soft_cap_range_portable;
#if RGREF_HAVE_AVX2_CODE
    if (rgref_uses_avx2()) {
        range = soft_cap_range_avx2;
    }
#endif
    soft_cap_parallel(range, x, cap, y, n);
}

void rgref_soft_cap_portable(const float *x, float cap, float *y, int64_t n) {
    soft_cap_parallel(soft_cap_range_portable, x, cap, y, n);
}

void rgref_soft_cap_naive(const float *x, float cap, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = cap * tanhf(x[i] / cap);
    }
}
