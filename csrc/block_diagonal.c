/* Block-diagonal linear layer, the RG-LRU gate projections (see rgref_kernels.h).
 *
 * y[i, h * P + c] = sum_r x[i, h * P + r] * w[h, r, c] + bias[h * P + c]
 * for N rows i, H heads h and the block width P = E / H. Each weight block is stored
 * [in, out] (the layout of both official checkpoints), so the columns c of one row r
 * of a block are contiguous.
 *
 * Summation order: every output adds its P products one at a time in increasing r,
 * starting from zero, then adds the bias. The AVX2 path fuses each multiply and add
 * (FMA); the portable and naive paths round them separately. A tile computes 16
 * columns of up to 6 rows of x, one column per lane, so no tile shape, row count or
 * thread count changes that order. The fast kernels therefore give the same bits on
 * any number of threads, and for a row alone or with others.
 *
 * Threads take (head, 16-column chunk) items ITEMS_PER_TAKE at a time (OpenMP dynamic
 * schedule), so a thread reads whole cache lines of a weight row. When decoding, an
 * AVX2 item is ROW_TILE_CHUNKS chunks, which one tile computes together.
 * With bfloat16 weights and several rows of x, each item first widens its chunk of the
 * weight block (P rows by 16 columns, 16 KiB at P = 256) into a float32 buffer, which
 * then serves every tile of x rows. Widening is exact, so the buffer does not change
 * any result.
 */
#include "kernels_common.h"

/* Columns per work item: two AVX2 vectors. */
#define CHUNK_COLUMNS 16

/* Consecutive items a thread takes at once: 4 chunks of 16 bfloat16 weights are two
   64-byte cache lines of a weight row, and 4 groups of ROW_TILE_CHUNKS chunks are a
   whole weight block at P = 256, which the thread then reads alone. */
#define ITEMS_PER_TAKE 4

/* Rows of x per tile: 6 rows by 16 columns use 12 of the 16 ymm registers. */
#define TILE_ROWS 6

/* Rows of x from which a bfloat16 weight chunk is widened into a buffer first. With
   fewer rows, widening costs more than reading the bfloat16 weights in the tiles. */
#define WIDEN_MIN_ROWS 4

/* Chunks that a one-row AVX2 tile computes at once when x has fewer than
   WIDEN_MIN_ROWS rows (decoding). Each sum is a chain of dependent FMAs, one per weight
   row, so one chunk keeps only 2 chains in flight. 4 chunks keep 8, and each weight row
   step reads 2 whole cache lines. On a 2-core Intel Xeon VM this cut a 10 x 256 x 256
   bfloat16 call at N = 1 from 120-130 to 87-107 us with the weights read from memory,
   and from 77 to 45 us with the weights in the cache (2 threads, best of 10 passes, a
   few runs each). */
#define ROW_TILE_CHUNKS 4

/* ------------------------------------------------------------------------------------
 * Naive
 */

static void block_diagonal_naive(const float *x, const void *w, int w_is_bf16,
                                 const float *bias, float *y, int64_t n, int64_t heads,
                                 int64_t width) {
    int64_t features = heads * width;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t h = 0; h < heads; h++) {
            for (int64_t c = 0; c < width; c++) {
                float sum = 0.0f;
                for (int64_t r = 0; r < width; r++) {
                    sum += x[i * features + h * width + r] *
                           weight_at(w, (h * width + r) * width + c, w_is_bf16);
                }
                if (bias != NULL) {
                    sum += bias[h * width + c];
                }
                y[i * features + h * width + c] = sum;
            }
        }
    }
}

void rgref_block_diagonal_linear_f32_naive(const float *x, const float *w, const float *bias,
                                           float *y, int64_t n, int64_t heads,
                                           int64_t width) {
    block_diagonal_naive(x, w, 0, bias, y, n, heads, width);
}

void rgref_block_diagonal_linear_bf16_naive(const float *x, const uint16_t *w,
                                            const float *bias, float *y, int64_t n,
                                            int64_t heads, int64_t width) {
    block_diagonal_naive(x, w, 1, bias, y, n, heads, width);
}

/* ------------------------------------------------------------------------------------
 * Tiles: rows [0, rows) of x against `columns` (at most CHUNK_COLUMNS) columns of one
 * weight block. x points at the block's first input of row 0 (row stride `features`),
 * w at column 0 of the chunk in row 0 of the block (row stride w_stride), y and bias
 * at the chunk's first output.
 */

static void portable_chunk(const float *x, const void *w, int w_is_bf16, int64_t w_stride,
                           const float *bias, float *y, int64_t rows, int64_t columns,
                           int64_t width, int64_t features) {
    for (int64_t i0 = 0; i0 < rows; i0 += TILE_ROWS) {
        int64_t tile_rows = min_i64(TILE_ROWS, rows - i0);
        float acc[TILE_ROWS][CHUNK_COLUMNS] = {{0.0f}};
        for (int64_t r = 0; r < width; r++) {
            float w_row[CHUNK_COLUMNS];
            for (int64_t c = 0; c < columns; c++) {
                w_row[c] = weight_at(w, r * w_stride + c, w_is_bf16);
            }
            for (int64_t i = 0; i < tile_rows; i++) {
                float x_value = x[(i0 + i) * features + r];
                for (int64_t c = 0; c < columns; c++) {
                    acc[i][c] += x_value * w_row[c];
                }
            }
        }
        for (int64_t i = 0; i < tile_rows; i++) {
            for (int64_t c = 0; c < columns; c++) {
                float sum = acc[i][c];
                if (bias != NULL) {
                    sum += bias[c];
                }
                y[(i0 + i) * features + c] = sum;
            }
        }
    }
}

#if RGREF_HAVE_AVX2_CODE

/* Load the 16 weights at `index` of a float32 or bfloat16 array as two vectors, in the
   order that avx2_tile below describes. */
RGREF_AVX2_INLINE void avx2_load_weight_row(const void *w, int w_is_bf16, int64_t index,
                                            __m256 *low, __m256 *high) {
    if (w_is_bf16) {
        __m256i packed = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + index));
        __m256i zero = _mm256_setzero_si256();
        *low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));
        *high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
    } else {
        *low = _mm256_loadu_ps((const float *)w + index);
        *high = _mm256_loadu_ps((const float *)w + index + LANES);
    }
}

/* Put the two sums of a chunk back in column order, add the bias and store them. */
RGREF_AVX2_INLINE void avx2_store_chunk(__m256 low, __m256 high, int w_is_bf16,
                                        const float *bias, float *y) {
    if (w_is_bf16) {
        __m256 first = _mm256_permute2f128_ps(low, high, 0x20);
        high = _mm256_permute2f128_ps(low, high, 0x31);
        low = first;
    }
    if (bias != NULL) {
        low = _mm256_add_ps(low, _mm256_loadu_ps(bias));
        high = _mm256_add_ps(high, _mm256_loadu_ps(bias + LANES));
    }
    _mm256_storeu_ps(y, low);
    _mm256_storeu_ps(y + LANES, high);
}

/* tile_rows rows of x by 16 columns. With float32 weights, acc[i][0] contains
   columns 0-7 and acc[i][1] columns 8-15. bfloat16 weights are widened the cheap way, by
   interleaving each 16-weight load with zeros, which gives columns 0-3 and 8-11 in
   acc[i][0] and 4-7 and 12-15 in acc[i][1]; the store puts them back in order. Each
   lane still adds its own column's products in increasing r. */
RGREF_AVX2_INLINE void avx2_tile(int tile_rows, const float *x, const void *w,
                                 int w_is_bf16, int64_t w_stride, const float *bias, float *y,
                                 int64_t width, int64_t features) {
    __m256 acc[TILE_ROWS][2];
    for (int i = 0; i < tile_rows; i++) {
        acc[i][0] = _mm256_setzero_ps();
        acc[i][1] = _mm256_setzero_ps();
    }
    for (int64_t r = 0; r < width; r++) {
        __m256 w_low;
        __m256 w_high;
        avx2_load_weight_row(w, w_is_bf16, r * w_stride, &w_low, &w_high);
        for (int i = 0; i < tile_rows; i++) {
            __m256 x_value = _mm256_broadcast_ss(x + i * features + r);
            acc[i][0] = _mm256_fmadd_ps(x_value, w_low, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(x_value, w_high, acc[i][1]);
        }
    }
    for (int i = 0; i < tile_rows; i++) {
        avx2_store_chunk(acc[i][0], acc[i][1], w_is_bf16, bias, y + i * features);
    }
}

/* One row of x by ROW_TILE_CHUNKS chunks (64 columns): the same sums as avx2_tile, with
   more of them in flight. */
RGREF_AVX2_INLINE void avx2_row_tile(const float *x, const void *w, int w_is_bf16,
                                     int64_t w_stride, const float *bias, float *y,
                                     int64_t width) {
    __m256 acc[ROW_TILE_CHUNKS][2];
    for (int g = 0; g < ROW_TILE_CHUNKS; g++) {
        acc[g][0] = _mm256_setzero_ps();
        acc[g][1] = _mm256_setzero_ps();
    }
    for (int64_t r = 0; r < width; r++) {
        __m256 x_value = _mm256_broadcast_ss(x + r);
        for (int g = 0; g < ROW_TILE_CHUNKS; g++) {
            __m256 w_low;
            __m256 w_high;
            avx2_load_weight_row(w, w_is_bf16, r * w_stride + g * CHUNK_COLUMNS, &w_low,
                                 &w_high);
            acc[g][0] = _mm256_fmadd_ps(x_value, w_low, acc[g][0]);
            acc[g][1] = _mm256_fmadd_ps(x_value, w_high, acc[g][1]);
        }
    }
    for (int g = 0; g < ROW_TILE_CHUNKS; g++) {
        avx2_store_chunk(acc[g][0], acc[g][1], w_is_bf16,
                         bias != NULL ? bias + g * CHUNK_COLUMNS : NULL, y + g * CHUNK_COLUMNS);
    }
}

RGREF_AVX2_INLINE void avx2_chunk(const float *x, const void *w, int w_is_bf16,
                                  int64_t w_stride, const float *bias, float *y, int64_t rows,
                                  int64_t width, int64_t features) {
    int64_t i = 0;
    for (; i + TILE_ROWS <= rows; i += TILE_ROWS) {
        avx2_tile(TILE_ROWS, x + i * features, w, w_is_bf16, w_stride, bias,
                  y + i * features, width, features);
    }
    for (; i < rows; i++) {
        avx2_tile(1, x + i * features, w, w_is_bf16, w_stride, bias, y + i * features, width,
                  features);
    }
}

static RGREF_AVX2 void avx2_chunk_f32(const float *x, const void *w, int64_t w_stride,
                                      const float *bias, float *y, int64_t rows,
                                      int64_t width, int64_t features) {
    avx2_chunk(x, w, 0, w_stride, bias, y, rows, width, features);
}

static RGREF_AVX2 void avx2_chunk_bf16(const float *x, const void *w, int64_t w_stride,
                                       const float *bias, float *y, int64_t rows,
                                       int64_t width, int64_t features) {
    avx2_chunk(x, w, 1, w_stride, bias, y, rows, width, features);
}

/* ROW_TILE_CHUNKS chunks of every row of x, one row at a time. */
static RGREF_AVX2 void avx2_row_tiles(const float *x, const void *w, int w_is_bf16,
                                      int64_t w_stride, const float *bias, float *y,
                                      int64_t rows, int64_t width, int64_t features) {
    for (int64_t i = 0; i < rows; i++) {
        if (w_is_bf16) {
            avx2_row_tile(x + i * features, w, 1, w_stride, bias, y + i * features, width);
        } else {
            avx2_row_tile(x + i * features, w, 0, w_stride, bias, y + i * features, width);
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------
 * Dispatch
 */

static void block_diagonal_parallel(int use_avx2, const float *x, const void *w,
                                    int w_is_bf16, const float *bias, float *y, int64_t n,
                                    int64_t heads, int64_t width) {
    if (n == 0 || heads == 0 || width == 0) {
        return;
    }
    int64_t features = heads * width;
    /* The AVX2 tiles need whole 16-column chunks. */
#if RGREF_HAVE_AVX2_CODE
    use_avx2 = use_avx2 && width % CHUNK_COLUMNS == 0;
#else
    (void)use_avx2;
#endif
    /* With few rows of x, an AVX2 item is a group of ROW_TILE_CHUNKS chunks where the
       width allows, for the one-row tiles. */
    int row_tiles = use_avx2 && n < WIDEN_MIN_ROWS &&
                    width % (ROW_TILE_CHUNKS * CHUNK_COLUMNS) == 0;
    int64_t item_columns = row_tiles ? ROW_TILE_CHUNKS * CHUNK_COLUMNS : CHUNK_COLUMNS;
    int64_t items_per_head = (width + item_columns - 1) / item_columns;
    int64_t num_items = heads * items_per_head;
    int num_threads = rgref_get_num_threads();
    if (n * heads * width * width < MIN_PARALLEL_MULTIPLY_ADDS) {
        num_threads = 1;
    }
    (void)num_threads; /* unused without OpenMP */

#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
    {
        /* A thread whose buffer allocation fails reads the bfloat16 weights directly,
           which gives the same result. */
        float *widened = w_is_bf16 && n >= WIDEN_MIN_ROWS
                             ? malloc(sizeof(float) * (size_t)width * CHUNK_COLUMNS)
                             : NULL;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, ITEMS_PER_TAKE)
#endif
        for (int64_t item = 0; item < num_items; item++) {
            int64_t h = item / items_per_head;
            int64_t c = item % items_per_head * item_columns;
            int64_t columns = min_i64(item_columns, width - c);
            const float *x_block = x + h * width;
            const float *bias_chunk = bias != NULL ? bias + h * width + c : NULL;
            float *y_chunk = y + h * width + c;

            /* The chunk: `width` rows of `columns` weights, row stride w_stride. */
            int64_t w_offset = h * width * width + c;
            const void *w_chunk = w_is_bf16 ? (const void *)((const uint16_t *)w + w_offset)
                                            : (const void *)((const float *)w + w_offset);
            int chunk_is_bf16 = w_is_bf16;
            int64_t w_stride = width;
            if (widened != NULL) {
                for (int64_t r = 0; r < width; r++) {
                    for (int64_t column = 0; column < columns; column++) {
                        widened[r * CHUNK_COLUMNS + column] =
                            weight_at(w_chunk, r * width + column, 1);
                    }
                }
                w_chunk = widened;
                chunk_is_bf16 = 0;
                w_stride = CHUNK_COLUMNS;
            }
#if RGREF_HAVE_AVX2_CODE
            if (row_tiles) {
                avx2_row_tiles(x_block, w_chunk, chunk_is_bf16, w_stride, bias_chunk, y_chunk,
                               n, width, features);
                continue;
            }
            if (use_avx2) {
                if (chunk_is_bf16) {
                    avx2_chunk_bf16(x_block, w_chunk, w_stride, bias_chunk, y_chunk, n, width,
                                    features);
                } else {
                    avx2_chunk_f32(x_block, w_chunk, w_stride, bias_chunk, y_chunk, n, width,
                                   features);
                }
                continue;
            }
#endif
            portable_chunk(x_block, w_chunk, chunk_is_bf16, w_stride, bias_chunk, y_chunk, n,
                           columns, width, features);
        }
        free(widened);
    }
}

void rgref_block_diagonal_linear_f32(const float *x, const float *w, const float *bias,
                                     float *y, int64_t n, int64_t heads, int64_t width) {
    block_diagonal_parallel(rgref_uses_avx2(), x, w, 0, bias, y, n, heads, width);
}

void rgref_block_diagonal_linear_bf16(const float *x, const uint16_t *w, const float *bias,
                                      float *y, int64_t n, int64_t heads, int64_t width) {
    block_diagonal_parallel(rgref_uses_avx2(), x, w, 1, bias, y, n, heads, width);
}

void rgref_block_diagonal_linear_f32_portable(const float *x, const float *w,
                                              const float *bias, float *y, int64_t n,
                                              int64_t heads, int64_t width) {
    block_diagonal_parallel(0, x, w, 0, bias, y, n, heads, width);
}

void rgref_block_diagonal_linear_bf16_portable(const float *x, const uint16_t *w,
                                               const float *bias, float *y, int64_t n,
                                               int64_t heads, int64_t width) {
    block_diagonal_parallel(0, x, w, 1, bias, y, n, heads, width);
}
