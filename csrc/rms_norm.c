/* RMS normalization of each row (see rgref_kernels.h):
 *
 *   y[i, d] = x[i, d] / sqrt(mean_d(x[i, d]^2) + eps) * (1 + scale[d])
 *
 * evaluated in float32 in that order: the sum of squares, its division by the width,
 * the addition of eps, the square root, then for each element the division by it and
 * the product with (1 + scale[d]). rgref.layers.rms_norm in float32 computes the same
 * formula, but NumPy sums the squares in another order, so the two agree to a few
 * units in the last place, not bitwise.
 *
 * Summation order: the squares are added in LANES lane sums, lane l taking the columns
 * d = l (mod LANES) whose block of LANES is whole, in increasing d. The lane sums are
 * then added as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), then the last width
 * mod LANES squares one by one. The AVX2 and portable kernels both follow that order
 * and neither fuses a multiply with an add, so they give the same bits. The naive
 * kernel adds the squares one by one in increasing d.
 *
 * Rows are independent, so any split across threads gives the same bits.
 */
#include "kernels_common.h"

/* Elements (rows x width) below which the kernel runs on one thread: decoding one
   token normalizes one row of a few thousand floats, a few microseconds of work. */
#define RMS_NORM_MIN_PARALLEL_ELEMENTS (1 << 16)

typedef void (*rms_norm_rows_fn)(const float *, const float *, float, float *, int64_t,
                                 int64_t, int64_t);

/* The root mean square of a row, given the sum of its squares. */
static inline float root_mean_square(float sum_of_squares, int64_t width, float eps) {
    return sqrtf(sum_of_squares / (float)width + eps);
}

/* Add LANES lane sums in the pairwise order above. */
static inline float sum_lane_sums(const float lanes[LANES]) {
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
           ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

static void rms_norm_rows_portable(const float *x, const float *scale, float eps, float *y,
                                   int64_t width, int64_t row_begin, int64_t row_end) {
    int64_t lanes_end = width - width % LANES;
    for (int64_t i = row_begin; i < row_end; i++) {
        const float *row = x + i * width;
        float lanes[LANES] = {0.0f};
        for (int64_t d = 0; d < lanes_end; d += LANES) {
            for (int l = 0; l < LANES; l++) {
                float square = row[d + l] * row[d + l];
                lanes[l] += square;
            }
        }
        float sum = sum_lane_sums(lanes);
        for (int64_t d = lanes_end; d < width; d++) {
            float square = row[d] * row[d];
            sum += square;
        }
        float rms = root_mean_square(sum, width, eps);
        for (int64_t d = 0; d < width; d++) {
            float one_plus_scale = 1.0f + scale[d];
            y[i * width + d] = row[d] / rms * one_plus_scale;
        }
    }
}

#if RGREF_HAVE_AVX2_CODE

static RGREF_AVX2 void rms_norm_rows_avx2(const float *x, const float *scale, float eps,
                                          float *y, int64_t width, int64_t row_begin,
                                          int64_t row_end) {
    int64_t lanes_end = width - width % LANES;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t i = row_begin; i < row_end; i++) {
        const float *row = x + i * width;
        __m256 lane_sums = _mm256_setzero_ps();
        for (int64_t d = 0; d < lanes_end; d += LANES) {
            __m256 values = _mm256_loadu_ps(row + d);
            lane_sums = _mm256_add_ps(lane_sums, _mm256_mul_ps(values, values));
        }
        float sum = avx2_sum_lanes(lane_sums);
        for (int64_t d = lanes_end; d < width; d++) {
            float square = row[d] * row[d];
            sum += square;
        }
        float rms = root_mean_square(sum, width, eps);
        __m256 rms_vector = _mm256_set1_ps(rms);
        int64_t d = 0;
        for (; d < lanes_end; d += LANES) {
            __m256 one_plus_scale = _mm256_add_ps(one, _mm256_loadu_ps(scale + d));
            __m256 normalized = _mm256_div_ps(_mm256_loadu_ps(row + d), rms_vector);
            _mm256_storeu_ps(y + i * width + d, _mm256_mul_ps(normalized, one_plus_scale));
        }
        for (; d < width; d++) {
            float one_plus_scale = 1.0f + scale[d];
            y[i * width + d] = row[d] / rms * one_plus_scale;
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

static void rms_norm_parallel(rms_norm_rows_fn rows_fn, const float *x, const float *scale,
                              float eps, float *y, int64_t rows, int64_t width) {
    if (rows == 0 || width == 0) {
        return;
    }
    int num_threads = rgref_get_num_threads();
    if (rows * width < RMS_NORM_MIN_PARALLEL_ELEMENTS || rows < 2) {
        num_threads = 1;
    }
    if (num_threads > rows) {
        num_threads = (int)rows;
    }
    (void)num_threads; /* unused without OpenMP */
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
    {
        int part = omp_get_thread_num();
        int parts = omp_get_num_threads();
        rows_fn(x, scale, eps, y, width, split_point(rows, parts, part, 1),
                split_point(rows, parts, part + 1, 1));
    }
#else
    rows_fn(x, scale, eps, y, width, 0, rows);
#endif
}

void rgref_rms_norm(const float *x, const float *scale, float eps, float *y, int64_t rows,
                    int64_t width) {
    rms_norm_rows_fn rows_fn = rms_norm_rows_portable;
#if RGREF_HAVE_AVX2_CODE
    if (rgref_uses_avx2()) {
        rows_fn = rms_norm_rows_avx2;
    }
#endif
    rms_norm_parallel(rows_fn, x, scale, eps, y, rows, width);
}

void rgref_rms_norm_portable(const float *x, const float *scale, float eps, float *y,
                             int64_t rows, int64_t width) {
    rms_norm_parallel(rms_norm_rows_portable, x, scale, eps, y, rows, width);
}

void rgref_rms_norm_naive(const float *x, const float *scale, float eps, float *y,
                          int64_t rows, int64_t width) {
    for (int64_t i = 0; i < rows; i++) {
        float sum = 0.0f;
        for (int64_t d = 0; d < width; d++) {
            sum += x[i * width + d] * x[i * width + d];
        }
        float rms = sqrtf(sum / (float)width + eps);
        for (int64_t d = 0; d < width; d++) {
            y[i * width + d] = x[i * width + d] / rms * (1.0f + scale[d]);
        }
    }
}
