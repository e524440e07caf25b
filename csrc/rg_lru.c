/* The RG-LRU scan (see rgref_kernels.h for the contract). */
#include "kernels_common.h"

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

/* Scans of fewer channel steps (B * T * E) than this run on one thread: starting a
   second thread costs more than the tens of microseconds of work, and far more when
   other processes keep the cores busy. Decoding one token of a 2560-channel model is
   2560 steps. */
#define RG_LRU_MIN_PARALLEL_STEPS 32768

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

void rgref_softplus(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = softplus(x[i]);
    }
}

int rgref_rg_lru_scan_naive(const float *x, const float *gate_x_pre,
                            const float *gate_a_pre, const float *a_param,
                            const float *softplus_a, const int32_t *segment_pos, float *h,
                            float *y, int64_t batch, int64_t time, int64_t width) {
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < time; t++) {
            int document_start = segment_pos[b * time + t] == 0;
            for (int64_t e = 0; e < width; e++) {
                int64_t i = (b * time + t) * width + e;
                float gate_x = sigmoid(gate_x_pre[i]);
                float gate_a = sigmoid(gate_a_pre[i]);
                float softplus_e = softplus_a != NULL ? softplus_a[e] : softplus(a_param[e]);
                float log_a = -RG_LRU_C * gate_a * softplus_e;
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

RGREF_AVX2_INLINE __m256 avx2_sigmoid(__m256 z) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 minus_z = _mm256_xor_ps(z, _mm256_set1_ps(-0.0f));
    return _mm256_div_ps(one, _mm256_add_ps(one, avx2_exp(minus_z)));
}

/* One RG-LRU step for 8 channels: return the new state and store nothing. Only exp
   differs from the portable code (avx2_exp instead of libm), and every other step is
   the same IEEE operation in the same order. */
RGREF_AVX2_INLINE __m256 avx2_rg_lru_step(__m256 x_t, __m256 gate_x_pre, __m256 gate_a_pre,
                                          __m256 softplus_a, __m256 state,
                                          int document_start) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 gate_x = avx2_sigmoid(gate_x_pre);
    __m256 gate_a = avx2_sigmoid(gate_a_pre);
    __m256 log_a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(-RG_LRU_C), gate_a), softplus_a);
    __m256 a = avx2_exp(log_a);
    __m256 multiplier;
    if (document_start) {
        a = _mm256_setzero_ps();
        multiplier = one;
    } else {
        multiplier = _mm256_sqrt_ps(_mm256_sub_ps(one, avx2_exp(_mm256_add_ps(log_a, log_a))));
    }
    __m256 normalized = _mm256_mul_ps(_mm256_mul_ps(x_t, gate_x), multiplier);
    return _mm256_add_ps(_mm256_mul_ps(a, state), normalized);
}

/* rg_lru_scan_range_portable with 8 channels per vector. Whole vectors use plain
   loads and stores. Only the last vector of a range, when fewer than 8 channels remain,
   uses masked ones: with masked loads and stores for every vector, the scan ran 1.6
   times slower on a 2-core AMD EPYC VM (T = 2048, E = 2560, one measurement). */
static RGREF_AVX2 void rg_lru_scan_range_avx2(const float *x, const float *gate_x_pre,
                                              const float *gate_a_pre,
                                              const float *softplus_a,
                                              const int32_t *segment_pos, float *h,
                                              float *y, int64_t time, int64_t width,
                                              int64_t b, int64_t e_begin, int64_t e_end) {
    const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    float *state = h + b * width;
    int64_t e_main = e_begin + (e_end - e_begin) / LANES * LANES;
    __m256i tail_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(e_end - e_main)),
                                           lane_index);

    for (int64_t t = 0; t < time; t++) {
        int document_start = segment_pos[b * time + t] == 0;
        int64_t row = (b * time + t) * width;
        for (int64_t e = e_begin; e < e_main; e += LANES) {
            __m256 h_t = avx2_rg_lru_step(
                _mm256_loadu_ps(x + row + e), _mm256_loadu_ps(gate_x_pre + row + e),
                _mm256_loadu_ps(gate_a_pre + row + e), _mm256_loadu_ps(softplus_a + e),
                _mm256_loadu_ps(state + e), document_start);
            _mm256_storeu_ps(state + e, h_t);
            _mm256_storeu_ps(y + row + e, h_t);
        }
        if (e_main < e_end) {
            int64_t e = e_main;
            __m256 h_t = avx2_rg_lru_step(
                _mm256_maskload_ps(x + row + e, tail_mask),
                _mm256_maskload_ps(gate_x_pre + row + e, tail_mask),
                _mm256_maskload_ps(gate_a_pre + row + e, tail_mask),
                _mm256_maskload_ps(softplus_a + e, tail_mask),
                _mm256_maskload_ps(state + e, tail_mask), document_start);
            _mm256_maskstore_ps(state + e, tail_mask, h_t);
            _mm256_maskstore_ps(y + row + e, tail_mask, h_t);
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

typedef void (*rg_lru_range_fn)(const float *, const float *, const float *, const float *,
                                const int32_t *, float *, float *, int64_t, int64_t,
                                int64_t, int64_t, int64_t);

/* Return 0, or -1 when softplus_a is NULL and its buffer cannot be allocated. */
static int rg_lru_scan_parallel(rg_lru_range_fn scan_range, const float *x,
                                const float *gate_x_pre, const float *gate_a_pre,
                                const float *a_param, const float *softplus_a,
                                const int32_t *segment_pos, float *h, float *y,
                                int64_t batch, int64_t time, int64_t width) {
    if (batch == 0 || width == 0) {
        return 0;
    }
    float *computed = NULL;
    if (softplus_a == NULL) {
        computed = malloc((size_t)width * sizeof(float));
        if (computed == NULL) {
            return -1;
        }
        rgref_softplus(a_param, computed, width);
        softplus_a = computed;
    }

    /* About one range per thread: split each batch row into enough ranges that
       batch * ranges_per_row covers the threads. */
    int num_threads = rgref_get_num_threads();
    if (batch * time * width < RG_LRU_MIN_PARALLEL_STEPS) {
        num_threads = 1;
    }
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
    free(computed);
    return 0;
}

int rgref_rg_lru_scan_portable(const float *x, const float *gate_x_pre,
                               const float *gate_a_pre, const float *a_param,
                               const float *softplus_a, const int32_t *segment_pos, float *h,
                               float *y, int64_t batch, int64_t time, int64_t width) {
    return rg_lru_scan_parallel(rg_lru_scan_range_portable, x, gate_x_pre, gate_a_pre,
                                a_param, softplus_a, segment_pos, h, y, batch, time, width);
}

int rgref_rg_lru_scan(const float *x, const float *gate_x_pre, const float *gate_a_pre,
                      const float *a_param, const float *softplus_a,
                      const int32_t *segment_pos, float *h, float *y, int64_t batch,
                      int64_t time, int64_t width) {
    rg_lru_range_fn scan_range = rg_lru_scan_range_portable;
#if RGREF_HAVE_AVX2_CODE
    if (rgref_uses_avx2()) {
        scan_range = rg_lru_scan_range_avx2;
    }
#endif
    return rg_lru_scan_parallel(scan_range, x, gate_x_pre, gate_a_pre, a_param, softplus_a,
                                segment_pos, h, y, batch, time, width);
}

