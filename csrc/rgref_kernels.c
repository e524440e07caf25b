/* rgref C kernels: the RG-LRU scan and linear layers (see rgref_kernels.h for the
 * contract of each function and the notation B, T, E, N, K, M).
 *
 * The NumPy forward pass is the specification. Each kernel here has three forms. The
 * naive one follows the NumPy formula line by line on one thread. The portable one
 * adds cache blocking and OpenMP threads in plain C. The AVX2+FMA one is the portable
 * one written with intrinsics, and the fast entry points choose it at run time when
 * the CPU supports it.
 *
 * Floating point: the build uses -O3 with IEEE semantics (no -ffast-math) and
 * -ffp-contract=off, so the compiler never fuses a multiply and an add on its own.
 * Fused multiply-adds appear only where the code asks for them (_mm256_fmadd_ps).
 */
#include "rgref_kernels.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* The AVX2 code needs GCC or Clang on x86-64, because it uses per-function target
   attributes and __builtin_cpu_supports. Other platforms compile the portable code
   only, and -DRGREF_NO_AVX2 does the same on x86-64 to check that build. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(RGREF_NO_AVX2)
#define RGREF_HAVE_AVX2_CODE 1
#include <immintrin.h>
#define RGREF_AVX2 __attribute__((target("avx2,fma")))
#define RGREF_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#else
#define RGREF_HAVE_AVX2_CODE 0
#endif

/* Floats in one AVX2 register. The portable code uses the same width where the order
   of a sum depends on it. */
#define LANES 8

/* ------------------------------------------------------------------------------------
 * Threads
 */

/* 0 means the OpenMP default, which honours OMP_NUM_THREADS. */
static int requested_threads = 0;

void rgref_set_num_threads(int num_threads) {
    requested_threads = num_threads > 0 ? num_threads : 0;
}

int rgref_get_num_threads(void) {
#ifdef _OPENMP
    return requested_threads > 0 ? requested_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

int rgref_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int rgref_uses_avx2(void) {
#if RGREF_HAVE_AVX2_CODE
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------
 * RG-LRU scan
 *
 * Per channel e and step t, with the state h kept in float32:
 *   gate_x = sigmoid(gate_x_pre), gate_a = sigmoid(gate_a_pre)
 *   log_a = -8 * gate_a * softplus(a_param[e]);  a = exp(log_a)
 *   multiplier = sqrt(1 - exp(2 * log_a)), the sqrt(1 - a^2) that keeps the variance
 *   of h bounded; at a document start (segment_pos == 0) a = 0 and multiplier = 1,
 *   so the state restarts from the unscaled input. segment_pos == -1 (left padding)
 *   is an ordinary step.
 *   h = a * h + x * gate_x * multiplier;  y = h
 * The kernels evaluate this formula in the written order, with no fused multiply-add.
 * A float32 NumPy version that forms sigmoid, softplus or exp differently agrees to a
 * few ulp per step, not bitwise.
 *
 * Parallel form: each thread scans a contiguous range of channels of one batch row
 * over all T steps, keeping the state in h. Each step then reads a long contiguous run
 * of every input row, which the hardware prefetcher follows. With 64-channel ranges,
 * T = 2048, E = 2560 and one thread, the scan ran 1.9 times slower (one measurement
 * on a 2-core AMD EPYC). Channels are independent and the per-channel arithmetic does
 * not depend on the range, so any split gives the same bits.
 */

/* The constant c in log a = -c * gate_a * softplus(a_param), fixed at 8 in Griffin. */
#define RG_LRU_C 8.0f

/* Range lengths are a multiple of 16 floats (one 64-byte cache line), so threads do
   not write to the same cache line of y or h when the rows are aligned to one. */
#define RG_LRU_RANGE_MULTIPLE 16

static inline float sigmoid(float z) {
    return 1.0f / (1.0f + expf(-z));
}

static inline float softplus(float z) {
    /* log(1 + e^z) = z + log(1 + e^-z), and e^-20 < 2^-28 is below float32 resolution
       next to z > 20. For z < -20, log(1 + u) rounds to u because u < 2^-28. */
    if (z > 20.0f) {
        return z;
    }
    if (z < -20.0f) {
        return expf(z);
    }
    return log1pf(expf(z));
}

int rgref_rg_lru_scan_naive(const float *x, const float *gate_x_pre,
                            const float *gate_a_pre, const float *a_param,
                            const int32_t *segment_pos, float *h, float *y, int64_t batch,
                            int64_t time, int64_t width) {
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < time; t++) {
            int document_start = segment_pos[b * time + t] == 0;
            for (int64_t e = 0; e < width; e++) {
                int64_t i = (b * time + t) * width + e;
                float gate_x = sigmoid(gate_x_pre[i]);
                float gate_a = sigmoid(gate_a_pre[i]);
                float log_a = -RG_LRU_C * gate_a * softplus(a_param[e]);
                float a = expf(log_a);
                float multiplier = sqrtf(1.0f - expf(2.0f * log_a));
                if (document_start) {
                    a = 0.0f;
                    multiplier = 1.0f;
                }
                float normalized = x[i] * gate_x * multiplier;
                h[b * width + e] = a * h[b * width + e] + normalized;
                y[i] = h[b * width + e];
            }
        }
    }
    return 0;
}

/* Scan channels [e_begin, e_end) of batch row b over all T steps. softplus_a contains
   softplus(a_param) for every channel. */
static void rg_lru_scan_range_portable(const float *x, const float *gate_x_pre,
                                       const float *gate_a_pre, const float *softplus_a,
                                       const int32_t *segment_pos, float *h, float *y,
                                       int64_t time, int64_t width, int64_t b,
                                       int64_t e_begin, int64_t e_end) {
    float *state = h + b * width;
    for (int64_t t = 0; t < time; t++) {
        int document_start = segment_pos[b * time + t] == 0;
        int64_t row = (b * time + t) * width;
        for (int64_t e = e_begin; e < e_end; e++) {
            float gate_x = sigmoid(gate_x_pre[row + e]);
            float gate_a = sigmoid(gate_a_pre[row + e]);
            float log_a = -RG_LRU_C * gate_a * softplus_a[e];
            float a = expf(log_a);
            float multiplier = sqrtf(1.0f - expf(2.0f * log_a));
            if (document_start) {
                a = 0.0f;
                multiplier = 1.0f;
            }
            float normalized = x[row + e] * gate_x * multiplier;
            state[e] = a * state[e] + normalized;
            y[row + e] = state[e];
        }
    }
}

#if RGREF_HAVE_AVX2_CODE

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

RGREF_AVX2_INLINE __m256 avx2_sigmoid(__m256 z) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 minus_z = _mm256_xor_ps(z, _mm256_set1_ps(-0.0f));
    return _mm256_div_ps(one, _mm256_add_ps(one, avx2_exp(minus_z)));
}

/* rg_lru_scan_range_portable with 8 channels per vector. The last vector of a range
   loads and stores only the channels that exist. Only exp differs from the portable
   code (avx2_exp instead of libm), and every other step is the same IEEE operation. */
static RGREF_AVX2 void rg_lru_scan_range_avx2(const float *x, const float *gate_x_pre,
                                              const float *gate_a_pre,
                                              const float *softplus_a,
                                              const int32_t *segment_pos, float *h,
                                              float *y, int64_t time, int64_t width,
                                              int64_t b, int64_t e_begin, int64_t e_end) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 minus_c = _mm256_set1_ps(-RG_LRU_C);
    const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    float *state = h + b * width;

    for (int64_t t = 0; t < time; t++) {
        int document_start = segment_pos[b * time + t] == 0;
        int64_t row = (b * time + t) * width;
        for (int64_t e = e_begin; e < e_end; e += LANES) {
            /* All lanes are on while 8 channels remain. */
            __m256i mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32((int)(e_end - e < LANES ? e_end - e : LANES)), lane_index);
            __m256 x_t = _mm256_maskload_ps(x + row + e, mask);
            __m256 gate_x = avx2_sigmoid(_mm256_maskload_ps(gate_x_pre + row + e, mask));
            __m256 gate_a = avx2_sigmoid(_mm256_maskload_ps(gate_a_pre + row + e, mask));
            __m256 log_a = _mm256_mul_ps(_mm256_mul_ps(minus_c, gate_a),
                                         _mm256_maskload_ps(softplus_a + e, mask));
            __m256 a = avx2_exp(log_a);
            __m256 a_squared = avx2_exp(_mm256_add_ps(log_a, log_a));
            __m256 multiplier = _mm256_sqrt_ps(_mm256_sub_ps(one, a_squared));
            if (document_start) {
                a = _mm256_setzero_ps();
                multiplier = one;
            }
            __m256 normalized = _mm256_mul_ps(_mm256_mul_ps(x_t, gate_x), multiplier);
            __m256 h_t = _mm256_add_ps(_mm256_mul_ps(a, _mm256_maskload_ps(state + e, mask)),
                                       normalized);
            _mm256_maskstore_ps(state + e, mask, h_t);
            _mm256_maskstore_ps(y + row + e, mask, h_t);
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

typedef void (*rg_lru_range_fn)(const float *, const float *, const float *, const float *,
                                const int32_t *, float *, float *, int64_t, int64_t,
                                int64_t, int64_t, int64_t);

/* Return 0, or -1 when the softplus(a_param) buffer cannot be allocated. */
static int rg_lru_scan_parallel(rg_lru_range_fn scan_range, const float *x,
                                const float *gate_x_pre, const float *gate_a_pre,
                                const float *a_param, const int32_t *segment_pos, float *h,
                                float *y, int64_t batch, int64_t time, int64_t width) {
    if (batch == 0 || width == 0) {
        return 0;
    }
    float *softplus_a = malloc((size_t)width * sizeof(float));
    if (softplus_a == NULL) {
        return -1;
    }
    for (int64_t e = 0; e < width; e++) {
        softplus_a[e] = softplus(a_param[e]);
    }

    /* About one range per thread: split each batch row into enough ranges that
       batch * ranges_per_row covers the threads. */
    int num_threads = rgref_get_num_threads();
    int64_t parts_per_row = (num_threads + batch - 1) / batch;
    int64_t range = (width + parts_per_row - 1) / parts_per_row;
    range = (range + RG_LRU_RANGE_MULTIPLE - 1) / RG_LRU_RANGE_MULTIPLE * RG_LRU_RANGE_MULTIPLE;
    int64_t ranges_per_row = (width + range - 1) / range;
    int64_t num_ranges = batch * ranges_per_row;

#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
    for (int64_t item = 0; item < num_ranges; item++) {
        int64_t b = item / ranges_per_row;
        int64_t e_begin = (item % ranges_per_row) * range;
        int64_t e_end = e_begin + range < width ? e_begin + range : width;
        scan_range(x, gate_x_pre, gate_a_pre, softplus_a, segment_pos, h, y, time, width, b,
                   e_begin, e_end);
    }
    free(softplus_a);
    return 0;
}

int rgref_rg_lru_scan_portable(const float *x, const float *gate_x_pre,
                               const float *gate_a_pre, const float *a_param,
                               const int32_t *segment_pos, float *h, float *y,
                               int64_t batch, int64_t time, int64_t width) {
    return rg_lru_scan_parallel(rg_lru_scan_range_portable, x, gate_x_pre, gate_a_pre,
                                a_param, segment_pos, h, y, batch, time, width);
}

int rgref_rg_lru_scan(const float *x, const float *gate_x_pre, const float *gate_a_pre,
                      const float *a_param, const int32_t *segment_pos, float *h, float *y,
                      int64_t batch, int64_t time, int64_t width) {
    rg_lru_range_fn scan_range = rg_lru_scan_range_portable;
#if RGREF_HAVE_AVX2_CODE
    if (rgref_uses_avx2()) {
        scan_range = rg_lru_scan_range_avx2;
    }
#endif
    return rg_lru_scan_parallel(scan_range, x, gate_x_pre, gate_a_pre, a_param, segment_pos,
                                h, y, batch, time, width);
}

/* ------------------------------------------------------------------------------------
 * Linear layer: y[N, M] = x[N, K] @ W[M, K]^T + bias[M]
 *
 * Summation order. Every fast path computes each output as the same dot product:
 * eight lane sums, lane l adding x[k] * w[k] for k = l, l + 8, ... in increasing k,
 * then the lanes added pairwise as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)),
 * then the last K mod 8 products one by one, then the bias. The tile shape, the
 * number of rows N and the thread count never change that order. So a row of y is
 * bitwise the same on any number of threads, and whether it is computed alone
 * (decoding) or with other tokens (prefill). The AVX2 path fuses each lane's multiply
 * and add (FMA) but the portable path rounds them separately, so the two paths
 * differ in the last bits.
 *
 * Blocking. Threads take blocks of consecutive rows of W (output features). A block
 * is about WEIGHT_BLOCK_BYTES of weights, so it stays in L2 cache while every row of
 * x passes over it: W is read from memory once per call, and x once per block.
 * Within a block, a tile of several x rows and W rows shares each load of x and W.
 * With bfloat16 weights and several rows of x, each thread first widens the block
 * into a float32 buffer, so the widening is paid once per block instead of once per
 * tile. Widening is exact, so the buffer does not change any result.
 */

/* Half or less of the L2 cache of x86-64 and ARM cores of the last decade (256 KiB to
   2 MiB per core), leaving room for the rows of x. */
#define WEIGHT_BLOCK_BYTES (128 * 1024)

/* The weight block is a multiple of 12 rows, so both the 3-row and the 4-row W tiles
   divide it. */
#define WEIGHT_BLOCK_ROW_MULTIPLE 12

/* Rows of x from which a bfloat16 weight block is widened into a buffer first. */
#define WIDEN_MIN_ROWS 4

static int64_t weight_block_rows(int64_t k, int64_t bytes_per_weight) {
    int64_t row_bytes = k * bytes_per_weight > 0 ? k * bytes_per_weight : 1;
    int64_t rows = WEIGHT_BLOCK_BYTES / row_bytes;
    rows -= rows % WEIGHT_BLOCK_ROW_MULTIPLE;
    return rows > WEIGHT_BLOCK_ROW_MULTIPLE ? rows : WEIGHT_BLOCK_ROW_MULTIPLE;
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

static inline float weight_at(const void *w, int64_t index, int w_is_bf16) {
    if (w_is_bf16) {
        return bf16_to_f32(((const uint16_t *)w)[index]);
    }
    return ((const float *)w)[index];
}

/* Return the address of row `row` of a [M, K] weight matrix. */
static inline const void *weight_row(const void *w, int64_t row, int64_t k, int w_is_bf16) {
    if (w_is_bf16) {
        return (const uint16_t *)w + row * k;
    }
    return (const float *)w + row * k;
}

/* Add the lanes in the shared pairwise order, then the tail and the bias. */
static inline float finish_dot(const float lanes[LANES], const float *x_row,
                               const void *w_row, int w_is_bf16, int64_t k_main,
                               int64_t k, const float *bias) {
    float sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
                ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    for (int64_t p = k_main; p < k; p++) {
        sum += x_row[p] * weight_at(w_row, p, w_is_bf16);
    }
    if (bias != NULL) {
        sum += *bias;
    }
    return sum;
}

/* --- naive ------------------------------------------------------------------------ */

static void linear_naive(const float *x, const void *w, int w_is_bf16, const float *bias,
                         float *y, int64_t n, int64_t k, int64_t m) {
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < m; j++) {
            float sum = 0.0f;
            for (int64_t p = 0; p < k; p++) {
                sum += x[i * k + p] * weight_at(w, j * k + p, w_is_bf16);
            }
            if (bias != NULL) {
                sum += bias[j];
            }
            y[i * m + j] = sum;
        }
    }
}

void rgref_linear_f32_naive(const float *x, const float *w, const float *bias, float *y,
                            int64_t n, int64_t k, int64_t m) {
    linear_naive(x, w, 0, bias, y, n, k, m);
}

void rgref_linear_bf16_naive(const float *x, const uint16_t *w, const float *bias,
                             float *y, int64_t n, int64_t k, int64_t m) {
    linear_naive(x, w, 1, bias, y, n, k, m);
}

/* --- portable --------------------------------------------------------------------- */

/* A tile computes y for rows_x rows of x (starting at x) and rows_w rows of W
 * (starting at w_block), writing y[i * m + j]. The block functions call it with
 * constant tile sizes, so the compiler unrolls the tile loops and keeps the
 * accumulators in registers. */

#define PORTABLE_TILE_N 2
#define PORTABLE_TILE_M 4

static inline void portable_tile(int rows_x, int rows_w, const float *x,
                                 const void *w_block, int w_is_bf16, const float *bias,
                                 float *y, int64_t k, int64_t m) {
    float acc[PORTABLE_TILE_N][PORTABLE_TILE_M][LANES] = {{{0.0f}}};
    int64_t k_main = k - k % LANES;

    for (int64_t p = 0; p < k_main; p += LANES) {
        float w_lanes[PORTABLE_TILE_M][LANES];
        for (int j = 0; j < rows_w; j++) {
            for (int l = 0; l < LANES; l++) {
                w_lanes[j][l] = weight_at(w_block, j * k + p + l, w_is_bf16);
            }
        }
        for (int i = 0; i < rows_x; i++) {
            const float *x_lanes = x + i * k + p;
            for (int j = 0; j < rows_w; j++) {
                for (int l = 0; l < LANES; l++) {
                    acc[i][j][l] += x_lanes[l] * w_lanes[j][l];
                }
            }
        }
    }

    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            y[i * m + j] = finish_dot(acc[i][j], x + i * k,
                                      weight_row(w_block, j, k, w_is_bf16), w_is_bf16,
                                      k_main, k, bias != NULL ? bias + j : NULL);
        }
    }
}

/* Compute columns [j_begin, j_end) of y. w_block points at row j_begin of W. */
static inline void linear_block_portable(const float *x, const void *w_block,
                                         int w_is_bf16, const float *bias, float *y,
                                         int64_t n, int64_t k, int64_t m, int64_t j_begin,
                                         int64_t j_end) {
    int64_t i = 0;
    for (; i + PORTABLE_TILE_N <= n; i += PORTABLE_TILE_N) {
        for (int64_t j = j_begin; j < j_end;) {
            const void *w_tile = weight_row(w_block, j - j_begin, k, w_is_bf16);
            const float *bias_tile = bias != NULL ? bias + j : NULL;
            if (j + PORTABLE_TILE_M <= j_end) {
                portable_tile(PORTABLE_TILE_N, PORTABLE_TILE_M, x + i * k, w_tile,
                              w_is_bf16, bias_tile, y + i * m + j, k, m);
                j += PORTABLE_TILE_M;
            } else {
                portable_tile(PORTABLE_TILE_N, 1, x + i * k, w_tile, w_is_bf16, bias_tile,
                              y + i * m + j, k, m);
                j += 1;
            }
        }
    }
    for (; i < n; i++) {
        for (int64_t j = j_begin; j < j_end;) {
            const void *w_tile = weight_row(w_block, j - j_begin, k, w_is_bf16);
            const float *bias_tile = bias != NULL ? bias + j : NULL;
            if (j + PORTABLE_TILE_M <= j_end) {
                portable_tile(1, PORTABLE_TILE_M, x + i * k, w_tile, w_is_bf16, bias_tile,
                              y + i * m + j, k, m);
                j += PORTABLE_TILE_M;
            } else {
                portable_tile(1, 1, x + i * k, w_tile, w_is_bf16, bias_tile, y + i * m + j,
                              k, m);
                j += 1;
            }
        }
    }
}

/* One copy per weight type, so that the weight loads compile without a branch. */
static void linear_block_portable_f32(const float *x, const void *w_block,
                                      const float *bias, float *y, int64_t n, int64_t k,
                                      int64_t m, int64_t j_begin, int64_t j_end) {
    linear_block_portable(x, w_block, 0, bias, y, n, k, m, j_begin, j_end);
}

static void linear_block_portable_bf16(const float *x, const void *w_block,
                                       const float *bias, float *y, int64_t n, int64_t k,
                                       int64_t m, int64_t j_begin, int64_t j_end) {
    linear_block_portable(x, w_block, 1, bias, y, n, k, m, j_begin, j_end);
}

/* --- AVX2 + FMA ------------------------------------------------------------------- */

#if RGREF_HAVE_AVX2_CODE

/* 4 x 3 tiles use 12 of the 16 ymm registers for accumulators. One x row streams
   against 4 W rows when fewer than 4 x rows are left (always when decoding one
   token), which keeps 4 independent FMA chains in flight. */
#define AVX2_TILE_N 4
#define AVX2_TILE_M 3
#define AVX2_ROW_TILE_M 4

RGREF_AVX2_INLINE __m256 avx2_load_weights(const void *w, int64_t index, int w_is_bf16) {
    if (w_is_bf16) {
        __m128i bits = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + index));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    }
    return _mm256_loadu_ps((const float *)w + index);
}

RGREF_AVX2_INLINE void avx2_tile(int rows_x, int rows_w, const float *x,
                                 const void *w_block, int w_is_bf16, const float *bias,
                                 float *y, int64_t k, int64_t m) {
    __m256 acc[AVX2_TILE_N][AVX2_ROW_TILE_M];
    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            acc[i][j] = _mm256_setzero_ps();
        }
    }
    int64_t k_main = k - k % LANES;

    for (int64_t p = 0; p < k_main; p += LANES) {
        __m256 w_lanes[AVX2_ROW_TILE_M];
        for (int j = 0; j < rows_w; j++) {
            w_lanes[j] = avx2_load_weights(w_block, j * k + p, w_is_bf16);
        }
        for (int i = 0; i < rows_x; i++) {
            __m256 x_lanes = _mm256_loadu_ps(x + i * k + p);
            for (int j = 0; j < rows_w; j++) {
                acc[i][j] = _mm256_fmadd_ps(x_lanes, w_lanes[j], acc[i][j]);
            }
        }
    }

    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            float lanes[LANES];
            _mm256_storeu_ps(lanes, acc[i][j]);
            y[i * m + j] = finish_dot(lanes, x + i * k, weight_row(w_block, j, k, w_is_bf16),
                                      w_is_bf16, k_main, k, bias != NULL ? bias + j : NULL);
        }
    }
}

RGREF_AVX2_INLINE void linear_block_avx2(const float *x, const void *w_block,
                                         int w_is_bf16, const float *bias, float *y,
                                         int64_t n, int64_t k, int64_t m, int64_t j_begin,
                                         int64_t j_end) {
    int64_t i = 0;
    for (; i + AVX2_TILE_N <= n; i += AVX2_TILE_N) {
        for (int64_t j = j_begin; j < j_end;) {
            const void *w_tile = weight_row(w_block, j - j_begin, k, w_is_bf16);
            const float *bias_tile = bias != NULL ? bias + j : NULL;
            if (j + AVX2_TILE_M <= j_end) {
                avx2_tile(AVX2_TILE_N, AVX2_TILE_M, x + i * k, w_tile, w_is_bf16, bias_tile,
                          y + i * m + j, k, m);
                j += AVX2_TILE_M;
            } else {
                avx2_tile(AVX2_TILE_N, 1, x + i * k, w_tile, w_is_bf16, bias_tile,
                          y + i * m + j, k, m);
                j += 1;
            }
        }
    }
    for (; i < n; i++) {
        for (int64_t j = j_begin; j < j_end;) {
            const void *w_tile = weight_row(w_block, j - j_begin, k, w_is_bf16);
            const float *bias_tile = bias != NULL ? bias + j : NULL;
            if (j + AVX2_ROW_TILE_M <= j_end) {
                avx2_tile(1, AVX2_ROW_TILE_M, x + i * k, w_tile, w_is_bf16, bias_tile,
                          y + i * m + j, k, m);
                j += AVX2_ROW_TILE_M;
            } else {
                avx2_tile(1, 1, x + i * k, w_tile, w_is_bf16, bias_tile, y + i * m + j, k,
                          m);
                j += 1;
            }
        }
    }
}

static RGREF_AVX2 void linear_block_avx2_f32(const float *x, const void *w_block,
                                             const float *bias, float *y, int64_t n,
                                             int64_t k, int64_t m, int64_t j_begin,
                                             int64_t j_end) {
    linear_block_avx2(x, w_block, 0, bias, y, n, k, m, j_begin, j_end);
}

static RGREF_AVX2 void linear_block_avx2_bf16(const float *x, const void *w_block,
                                              const float *bias, float *y, int64_t n,
                                              int64_t k, int64_t m, int64_t j_begin,
                                              int64_t j_end) {
    linear_block_avx2(x, w_block, 1, bias, y, n, k, m, j_begin, j_end);
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* --- dispatch --------------------------------------------------------------------- */

typedef void (*linear_block_fn)(const float *, const void *, const float *, float *,
                                int64_t, int64_t, int64_t, int64_t, int64_t);

static void linear_parallel(int use_avx2, const float *x, const void *w, int w_is_bf16,
                            const float *bias, float *y, int64_t n, int64_t k, int64_t m) {
    int widen = w_is_bf16 && n >= WIDEN_MIN_ROWS && k > 0;
    /* The block size counts the bytes the tiles read: 4 per weight once widened. */
    int64_t block_rows = weight_block_rows(k, w_is_bf16 && !widen ? 2 : 4);
    int64_t num_blocks = (m + block_rows - 1) / block_rows;
    linear_block_fn block_f32 = linear_block_portable_f32;
    linear_block_fn block_bf16 = linear_block_portable_bf16;
#if RGREF_HAVE_AVX2_CODE
    if (use_avx2) {
        block_f32 = linear_block_avx2_f32;
        block_bf16 = linear_block_avx2_bf16;
    }
#else
    (void)use_avx2;
#endif
    int num_threads = rgref_get_num_threads();
    (void)num_threads;

#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
    {
        /* A thread whose buffer allocation fails reads the bfloat16 weights directly,
           which gives the same result. */
        float *widened = widen ? malloc((size_t)(block_rows * k) * sizeof(float)) : NULL;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t block = 0; block < num_blocks; block++) {
            int64_t j_begin = block * block_rows;
            int64_t j_end = j_begin + block_rows < m ? j_begin + block_rows : m;
            const void *w_block = weight_row(w, j_begin, k, w_is_bf16);
            if (widened != NULL) {
                const uint16_t *bits = w_block;
                for (int64_t index = 0; index < (j_end - j_begin) * k; index++) {
                    widened[index] = bf16_to_f32(bits[index]);
                }
                block_f32(x, widened, bias, y, n, k, m, j_begin, j_end);
            } else if (w_is_bf16) {
                block_bf16(x, w_block, bias, y, n, k, m, j_begin, j_end);
            } else {
                block_f32(x, w_block, bias, y, n, k, m, j_begin, j_end);
            }
        }
        free(widened);
    }
}

void rgref_linear_f32(const float *x, const float *w, const float *bias, float *y,
                      int64_t n, int64_t k, int64_t m) {
    linear_parallel(rgref_uses_avx2(), x, w, 0, bias, y, n, k, m);
}

void rgref_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                       int64_t n, int64_t k, int64_t m) {
    linear_parallel(rgref_uses_avx2(), x, w, 1, bias, y, n, k, m);
}

void rgref_linear_f32_portable(const float *x, const float *w, const float *bias,
                               float *y, int64_t n, int64_t k, int64_t m) {
    linear_parallel(0, x, w, 0, bias, y, n, k, m);
}

void rgref_linear_bf16_portable(const float *x, const uint16_t *w, const float *bias,
                                float *y, int64_t n, int64_t k, int64_t m) {
    linear_parallel(0, x, w, 1, bias, y, n, k, m);
}
