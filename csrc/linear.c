/* Linear layer: y[N, M] = x[N, K] @ W[M, K]^T + bias[M] (see rgref_kernels.h).
 *
 * Summation order. Every fast path computes each output as the same dot product. The
 * columns are cut into chunks of CHUNK = 16 (2 * LANES), and each of the eight lane
 * sums takes two columns of every chunk: lane l adds x[k] * w[k] for k = c + first[l]
 * and then k = c + second[l], chunk by chunk in increasing c, where
 *
 *     first  = {0, 1, 2, 3,  8,  9, 10, 11}
 *     second = {4, 5, 6, 7, 12, 13, 14, 15}.
 *
 * The lanes are then added pairwise as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)),
 * then the last K mod 16 products one by one in increasing k, then the bias. The tile
 * shape, the blocking, the number of rows N and the thread count never change that
 * order. So a row of y is bitwise the same on any number of threads, and whether it is
 * computed alone (decoding) or with other tokens (prefill). The AVX2 path fuses each
 * lane's multiply and add (FMA) but the portable path rounds them separately, so the
 * two paths differ in the last bits.
 *
 * Why that lane order: it is the one in which AVX2 widens bfloat16 weights cheapest.
 * One 32-byte load contains a chunk of 16 bfloat16 weights, and interleaving it with zeros
 * (vpunpcklwd, vpunpckhwd, which work within each 16-byte half) gives the floats of
 * columns `first` and `second` directly: two instructions per 16 weights, where
 * zero-extending and shifting 8 at a time takes four. Decoding reads every weight
 * once, and with that saving one core widens bfloat16 weights faster than it reads
 * them from memory. On one core of a 2-core AMD EPYC (Zen 1) VM, a 256 x 2560 GEMV from
 * the L3 cache ran at 22.6 GB/s of weights this way and at 12.5 GB/s with the
 * zero-extension (a standalone test, best of 500 runs).
 *
 * Two loop structures share that order:
 *
 *   Matrix-vector (N < GEMM_MIN_ROWS, always when decoding one token). The time goes
 *   into reading W from memory once. Threads take chunks of contiguous rows of W and
 *   walk them in tiles of 4 or 8 rows, reading bfloat16 or float32 weights in place,
 *   so every x row meets each weight while it is in a register.
 *
 *   Matrix-matrix (N >= GEMM_MIN_ROWS, prompts). The time goes into multiply-adds.
 *   x is first copied with the columns of each chunk reordered as `first` then
 *   `second`. Threads take blocks of GEMM_BLOCK_ROWS rows of W and cut them into
 *   GEMM_BLOCK_DEPTH columns. A block is widened (bfloat16) or copied (float32) into a
 *   float32 buffer in the same column order (192 KiB, so it stays in the L2 cache).
 *   Then every tile of x rows passes over it LANES columns at a time. So each lane adds
 *   a chunk's `first` column and then its `second` one. A tile keeps 4 x rows by 3 W
 *   rows of lane sums (12 registers) and updates them with 7 loads per 12 FMAs. The lane
 *   sums of all N rows against the block wait in a buffer between depth blocks. Storing
 *   and reloading a float is exact, so the blocking does not change any result. On
 *   CPUs with AVX-512, a 16-float register contains the lane sums of two W rows, and a tile
 *   of 4 x rows by 12 W rows runs the same FMAs on half as many instructions (see
 *   "Matrix-matrix structure, AVX-512" below).
 *
 * Why not BLAS for prompts: on one core of a 2-core AMD EPYC VM (AVX2, FMA peak 37.6
 * GFLOP/s per core there), this code ran bfloat16 weights at 29-31 GFLOP/s for
 * N = 64..512 and the model's shapes, where NumPy's OpenBLAS ran float32 weights at
 * 29-35 GFLOP/s for N = 512 and 20 GFLOP/s for N = 64 (CPU time, one run each). Widening
 * the weights for BLAS would also cost a float32 copy of each matrix and give a prompt
 * token other bits than the same token decoded alone.
 */
#include "kernels_common.h"

/* Columns per chunk. Each lane sum takes two of them, in the order below. */
#define CHUNK (2 * LANES)
static const int chunk_first[LANES] = {0, 1, 2, 3, 8, 9, 10, 11};
static const int chunk_second[LANES] = {4, 5, 6, 7, 12, 13, 14, 15};

/* Rows of x from which the matrix-matrix structure is used. */
#define GEMM_MIN_ROWS 4

/* Rows of W per matrix-vector tile: independent FMA chains, each reading its own
   stream of weights. With one x row, 8 streams read about 15 GB/s where 4 streams read
   13 GB/s (bfloat16 7680 x 2560 weights from memory, 2 threads on a 2-core AMD EPYC VM,
   a few runs). With 2 or 3 x rows, 4 W rows keep the 8 or 12 sums in registers. */
#define DOT_TILE_ROWS_ONE_X 8
#define DOT_TILE_ROWS 4

/* Bytes ahead in each bfloat16 weight row that a matrix-vector tile prefetches, once
   per 64-byte line. On a 2-core Intel Xeon VM, the prefetch variant of tools/gemv_probe.c
   raised a 7680 x 2560 GEMV from 27.3 to 29.4 GB/s at 256 bytes (2 threads, mean of 3
   runs of best of 10 passes). This loop then cut `linear` in a 2B decoding step from
   194-199 to 185-189 ms. An earlier test on a 2-core AMD EPYC (Zen 4) VM found no change
   at 256 bytes, and up to 19% less at 1024 and 2048 bytes. */
#define DOT_PREFETCH_BYTES 256

/* Rows of x and of W per matrix-matrix tile. */
#define GEMM_TILE_X_ROWS 4
#define GEMM_TILE_W_ROWS 3

/* The AVX-512 matrix-matrix tile: rows of x, and pairs of W rows, whose lane sums share
   a 16-float register. 4 x 6 registers of sums take 10 loads per 24 FMAs. */
#define GEMM512_TILE_X_ROWS 4
#define GEMM512_TILE_PAIRS 6

/* The W block of the matrix-matrix structure: GEMM_BLOCK_ROWS rows (a multiple of
   GEMM_TILE_W_ROWS and of 2 * GEMM512_TILE_PAIRS) by GEMM_BLOCK_DEPTH columns (a multiple
   of CHUNK). 96 x 512 floats are 192 KiB, which stays in a 512 KiB or larger L2 cache.
   An AVX2 tile reloads and stores its 12 lane sums once per 64 steps of 12 FMAs. */
#define GEMM_BLOCK_ROWS 96
#define GEMM_BLOCK_DEPTH 512

/* Threads take chunks of rows of W one at a time as they finish the previous one
   (OpenMP dynamic schedule): GEMM_BLOCK_ROWS rows for the matrix-matrix structure, and
   DOT_CHUNK_ROWS rows (640 KB of bfloat16 at K = 2560) for the matrix-vector one. A
   thread that shares its core with another process then takes fewer chunks, where an
   even split would make the other thread wait for it. Which thread computes a row
   does not change its bits. */
#define DOT_CHUNK_ROWS 128

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

/* Copy the CHUNK values of a chunk in lane order: columns chunk_first, then
   chunk_second. */
static inline void reorder_chunk(const void *source, int64_t index, int source_is_bf16,
                                 float *destination) {
    for (int l = 0; l < LANES; l++) {
        destination[l] = weight_at(source, index + chunk_first[l], source_is_bf16);
        destination[LANES + l] = weight_at(source, index + chunk_second[l], source_is_bf16);
    }
}

/* ------------------------------------------------------------------------------------
 * Naive
 */

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

/* ------------------------------------------------------------------------------------
 * Tiles
 *
 * dot_tile: rows_x rows of x (at most GEMM_MIN_ROWS - 1) against rows_w rows of W (at
 * most DOT_TILE_ROWS_ONE_X), over all K columns, writing finished outputs
 * y[i * m + j].
 *
 * gemm_tile: rows_x rows of x (at most GEMM_TILE_X_ROWS, row stride x_stride) against
 * rows_w rows of a float32 W block (row stride w_stride), over `depth` columns, both
 * with the columns of each chunk in lane order. It adds to the lane sums in
 * partial[(i * partial_stride + j) * LANES + lane], starting from zero when `first` is
 * set.
 *
 * The callers pass constant tile sizes, so the compiler unrolls the tile loops and
 * keeps the sums in registers.
 */

static inline void portable_dot_tile(int rows_x, int rows_w, const float *x,
                                     const void *w, int w_is_bf16, const float *bias,
                                     float *y, int64_t k, int64_t m) {
    float acc[GEMM_MIN_ROWS - 1][DOT_TILE_ROWS_ONE_X][LANES] = {{{0.0f}}};
    int64_t k_main = k - k % CHUNK;

    for (int64_t p = 0; p < k_main; p += CHUNK) {
        float w_chunk[DOT_TILE_ROWS_ONE_X][CHUNK];
        for (int j = 0; j < rows_w; j++) {
            reorder_chunk(w, j * k + p, w_is_bf16, w_chunk[j]);
        }
        for (int i = 0; i < rows_x; i++) {
            float x_chunk[CHUNK];
            reorder_chunk(x, i * k + p, 0, x_chunk);
            for (int j = 0; j < rows_w; j++) {
                for (int l = 0; l < LANES; l++) {
                    acc[i][j][l] += x_chunk[l] * w_chunk[j][l];
                    acc[i][j][l] += x_chunk[LANES + l] * w_chunk[j][LANES + l];
                }
            }
        }
    }

    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            y[i * m + j] = finish_dot(acc[i][j], x + i * k, weight_row(w, j, k, w_is_bf16),
                                      w_is_bf16, k_main, k, bias != NULL ? bias + j : NULL);
        }
    }
}

static inline void portable_gemm_tile(int rows_x, int rows_w, const float *x,
                                      int64_t x_stride, const float *w, int64_t w_stride,
                                      int64_t depth, float *partial, int64_t partial_stride,
                                      int first) {
    float acc[GEMM_TILE_X_ROWS][GEMM_TILE_W_ROWS][LANES];
    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            for (int l = 0; l < LANES; l++) {
                acc[i][j][l] = first ? 0.0f : partial[(i * partial_stride + j) * LANES + l];
            }
        }
    }

    for (int64_t p = 0; p < depth; p += LANES) {
        for (int i = 0; i < rows_x; i++) {
            for (int j = 0; j < rows_w; j++) {
                for (int l = 0; l < LANES; l++) {
                    acc[i][j][l] += x[i * x_stride + p + l] * w[j * w_stride + p + l];
                }
            }
        }
    }

    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            for (int l = 0; l < LANES; l++) {
                partial[(i * partial_stride + j) * LANES + l] = acc[i][j][l];
            }
        }
    }
}

#if RGREF_HAVE_AVX2_CODE

/* Load the chunk at index `index` of a float32 array as two vectors of lane order:
   columns chunk_first and chunk_second. */
RGREF_AVX2_INLINE void avx2_load_chunk_f32(const float *values, __m256 *first,
                                           __m256 *second) {
    *first = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(values)),
                                  _mm_loadu_ps(values + 8), 1);
    *second = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(values + 4)),
                                   _mm_loadu_ps(values + 12), 1);
}

/* The same for 16 bfloat16 weights, widened: interleaving with zeros puts each weight
   in the top half of a float, and each 16-byte half of the load gives 4 lanes. */
RGREF_AVX2_INLINE void avx2_load_chunk_bf16(const uint16_t *bits, __m256 *first,
                                            __m256 *second) {
    __m256i packed = _mm256_loadu_si256((const __m256i *)bits);
    __m256i zero = _mm256_setzero_si256();
    *first = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));
    *second = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
}

RGREF_AVX2_INLINE void avx2_load_weight_chunk(const void *w, int64_t index, int w_is_bf16,
                                              __m256 *first, __m256 *second) {
    if (w_is_bf16) {
        avx2_load_chunk_bf16((const uint16_t *)w + index, first, second);
    } else {
        avx2_load_chunk_f32((const float *)w + index, first, second);
    }
}

RGREF_AVX2_INLINE void avx2_dot_tile(int rows_x, int rows_w, const float *x, const void *w,
                                     int w_is_bf16, const float *bias, float *y, int64_t k,
                                     int64_t m) {
    __m256 acc[GEMM_MIN_ROWS - 1][DOT_TILE_ROWS_ONE_X];
    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            acc[i][j] = _mm256_setzero_ps();
        }
    }
    int64_t k_main = k - k % CHUNK;

    for (int64_t p = 0; p < k_main; p += CHUNK) {
        __m256 x_first[GEMM_MIN_ROWS - 1];
        __m256 x_second[GEMM_MIN_ROWS - 1];
        for (int i = 0; i < rows_x; i++) {
            avx2_load_chunk_f32(x + i * k + p, &x_first[i], &x_second[i]);
        }
        for (int j = 0; j < rows_w; j++) {
            __m256 w_first;
            __m256 w_second;
            if (w_is_bf16 && p % (2 * CHUNK) == 0) {
                _mm_prefetch((const char *)((const uint16_t *)w + j * k + p) +
                                 DOT_PREFETCH_BYTES, _MM_HINT_T0);
            }
            avx2_load_weight_chunk(w, j * k + p, w_is_bf16, &w_first, &w_second);
            for (int i = 0; i < rows_x; i++) {
                acc[i][j] = _mm256_fmadd_ps(x_first[i], w_first, acc[i][j]);
                acc[i][j] = _mm256_fmadd_ps(x_second[i], w_second, acc[i][j]);
            }
        }
    }

    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            float lanes[LANES];
            _mm256_storeu_ps(lanes, acc[i][j]);
            y[i * m + j] = finish_dot(lanes, x + i * k, weight_row(w, j, k, w_is_bf16),
                                      w_is_bf16, k_main, k, bias != NULL ? bias + j : NULL);
        }
    }
}

RGREF_AVX2_INLINE void avx2_gemm_tile(int rows_x, int rows_w, const float *x,
                                      int64_t x_stride, const float *w, int64_t w_stride,
                                      int64_t depth, float *partial, int64_t partial_stride,
                                      int first) {
    __m256 acc[GEMM_TILE_X_ROWS][GEMM_TILE_W_ROWS];
    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            acc[i][j] = first ? _mm256_setzero_ps()
                              : _mm256_loadu_ps(partial + (i * partial_stride + j) * LANES);
        }
    }

    for (int64_t p = 0; p < depth; p += LANES) {
        __m256 w_lanes[GEMM_TILE_W_ROWS];
        for (int j = 0; j < rows_w; j++) {
            w_lanes[j] = _mm256_loadu_ps(w + j * w_stride + p);
        }
        for (int i = 0; i < rows_x; i++) {
            __m256 x_lanes = _mm256_loadu_ps(x + i * x_stride + p);
            for (int j = 0; j < rows_w; j++) {
                acc[i][j] = _mm256_fmadd_ps(x_lanes, w_lanes[j], acc[i][j]);
            }
        }
    }

    for (int i = 0; i < rows_x; i++) {
        for (int j = 0; j < rows_w; j++) {
            _mm256_storeu_ps(partial + (i * partial_stride + j) * LANES, acc[i][j]);
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------
 * Matrix-vector structure: outputs [j_begin, j_end) of all N < GEMM_MIN_ROWS rows.
 *
 * The inline functions take the tile sizes and the weight type as arguments. The
 * static functions below them call them with constants, one copy per combination,
 * so each copy compiles without branches on them.
 */

static inline void portable_dot_rows(int rows_x, const float *x, const void *w,
                                     int w_is_bf16, const float *bias, float *y, int64_t k,
                                     int64_t m, int64_t j_begin, int64_t j_end) {
    int tile_rows = rows_x == 1 ? DOT_TILE_ROWS_ONE_X : DOT_TILE_ROWS;
    int64_t j = j_begin;
    for (; j + tile_rows <= j_end; j += tile_rows) {
        portable_dot_tile(rows_x, tile_rows, x, weight_row(w, j, k, w_is_bf16),
                          w_is_bf16, bias != NULL ? bias + j : NULL, y + j, k, m);
    }
    for (; j < j_end; j++) {
        portable_dot_tile(rows_x, 1, x, weight_row(w, j, k, w_is_bf16), w_is_bf16,
                          bias != NULL ? bias + j : NULL, y + j, k, m);
    }
}

static void dot_rows_portable(const float *x, const void *w, int w_is_bf16,
                              const float *bias, float *y, int64_t n, int64_t k, int64_t m,
                              int64_t j_begin, int64_t j_end) {
    if (w_is_bf16) {
        if (n == 1) {
            portable_dot_rows(1, x, w, 1, bias, y, k, m, j_begin, j_end);
        } else if (n == 2) {
            portable_dot_rows(2, x, w, 1, bias, y, k, m, j_begin, j_end);
        } else {
            portable_dot_rows(3, x, w, 1, bias, y, k, m, j_begin, j_end);
        }
    } else {
        if (n == 1) {
            portable_dot_rows(1, x, w, 0, bias, y, k, m, j_begin, j_end);
        } else if (n == 2) {
            portable_dot_rows(2, x, w, 0, bias, y, k, m, j_begin, j_end);
        } else {
            portable_dot_rows(3, x, w, 0, bias, y, k, m, j_begin, j_end);
        }
    }
}

#if RGREF_HAVE_AVX2_CODE

RGREF_AVX2_INLINE void avx2_dot_rows(int rows_x, const float *x, const void *w,
                                     int w_is_bf16, const float *bias, float *y, int64_t k,
                                     int64_t m, int64_t j_begin, int64_t j_end) {
    int tile_rows = rows_x == 1 ? DOT_TILE_ROWS_ONE_X : DOT_TILE_ROWS;
    int64_t j = j_begin;
    for (; j + tile_rows <= j_end; j += tile_rows) {
        avx2_dot_tile(rows_x, tile_rows, x, weight_row(w, j, k, w_is_bf16), w_is_bf16,
                      bias != NULL ? bias + j : NULL, y + j, k, m);
    }
    for (; j < j_end; j++) {
        avx2_dot_tile(rows_x, 1, x, weight_row(w, j, k, w_is_bf16), w_is_bf16,
                      bias != NULL ? bias + j : NULL, y + j, k, m);
    }
}

static RGREF_AVX2 void dot_rows_avx2(const float *x, const void *w, int w_is_bf16,
                                     const float *bias, float *y, int64_t n, int64_t k,
                                     int64_t m, int64_t j_begin, int64_t j_end) {
    if (w_is_bf16) {
        if (n == 1) {
            avx2_dot_rows(1, x, w, 1, bias, y, k, m, j_begin, j_end);
        } else if (n == 2) {
            avx2_dot_rows(2, x, w, 1, bias, y, k, m, j_begin, j_end);
        } else {
            avx2_dot_rows(3, x, w, 1, bias, y, k, m, j_begin, j_end);
        }
    } else {
        if (n == 1) {
            avx2_dot_rows(1, x, w, 0, bias, y, k, m, j_begin, j_end);
        } else if (n == 2) {
            avx2_dot_rows(2, x, w, 0, bias, y, k, m, j_begin, j_end);
        } else {
            avx2_dot_rows(3, x, w, 0, bias, y, k, m, j_begin, j_end);
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------
 * Matrix-matrix structure
 *
 * gemm_block runs every tile of x rows [0, n) against one float32 W block of `rows`
 * rows (row stride w_stride) and `depth` columns, updating the lane sums in `partial`
 * ([n][GEMM_BLOCK_ROWS][LANES] floats). x is the copy in lane order.
 */

static void gemm_block_portable(const float *x, int64_t n, int64_t k, const float *w,
                                int64_t w_stride, int64_t rows, int64_t depth,
                                float *partial, int first) {
    const int64_t stride = GEMM_BLOCK_ROWS;
    int64_t i = 0;
    for (; i + GEMM_TILE_X_ROWS <= n; i += GEMM_TILE_X_ROWS) {
        int64_t j = 0;
        for (; j + GEMM_TILE_W_ROWS <= rows; j += GEMM_TILE_W_ROWS) {
            portable_gemm_tile(GEMM_TILE_X_ROWS, GEMM_TILE_W_ROWS, x + i * k, k,
                               w + j * w_stride, w_stride, depth,
                               partial + (i * stride + j) * LANES, stride, first);
        }
        for (; j < rows; j++) {
            portable_gemm_tile(GEMM_TILE_X_ROWS, 1, x + i * k, k, w + j * w_stride, w_stride,
                               depth, partial + (i * stride + j) * LANES, stride, first);
        }
    }
    for (; i < n; i++) {
        int64_t j = 0;
        for (; j + GEMM_TILE_W_ROWS <= rows; j += GEMM_TILE_W_ROWS) {
            portable_gemm_tile(1, GEMM_TILE_W_ROWS, x + i * k, k, w + j * w_stride, w_stride,
                               depth, partial + (i * stride + j) * LANES, stride, first);
        }
        for (; j < rows; j++) {
            portable_gemm_tile(1, 1, x + i * k, k, w + j * w_stride, w_stride, depth,
                               partial + (i * stride + j) * LANES, stride, first);
        }
    }
}

/* Copy the rows x depth block of weights that starts at element `start` of W (row
   stride k), widened to float32, into `block` with the columns of each chunk in lane
   order. */
static void reorder_block_portable(const void *w, int w_is_bf16, int64_t start, int64_t k,
                                   int64_t rows, int64_t depth, float *block) {
    for (int64_t j = 0; j < rows; j++) {
        for (int64_t p = 0; p < depth; p += CHUNK) {
            reorder_chunk(w, start + j * k + p, w_is_bf16, block + j * depth + p);
        }
    }
}

#if RGREF_HAVE_AVX2_CODE

static RGREF_AVX2 void gemm_block_avx2(const float *x, int64_t n, int64_t k, const float *w,
                                       int64_t w_stride, int64_t rows, int64_t depth,
                                       float *partial, int first) {
    const int64_t stride = GEMM_BLOCK_ROWS;
    int64_t i = 0;
    for (; i + GEMM_TILE_X_ROWS <= n; i += GEMM_TILE_X_ROWS) {
        int64_t j = 0;
        for (; j + GEMM_TILE_W_ROWS <= rows; j += GEMM_TILE_W_ROWS) {
            avx2_gemm_tile(GEMM_TILE_X_ROWS, GEMM_TILE_W_ROWS, x + i * k, k, w + j * w_stride,
                           w_stride, depth, partial + (i * stride + j) * LANES, stride, first);
        }
        for (; j < rows; j++) {
            avx2_gemm_tile(GEMM_TILE_X_ROWS, 1, x + i * k, k, w + j * w_stride, w_stride,
                           depth, partial + (i * stride + j) * LANES, stride, first);
        }
    }
    for (; i < n; i++) {
        int64_t j = 0;
        for (; j + GEMM_TILE_W_ROWS <= rows; j += GEMM_TILE_W_ROWS) {
            avx2_gemm_tile(1, GEMM_TILE_W_ROWS, x + i * k, k, w + j * w_stride, w_stride,
                           depth, partial + (i * stride + j) * LANES, stride, first);
        }
        for (; j < rows; j++) {
            avx2_gemm_tile(1, 1, x + i * k, k, w + j * w_stride, w_stride, depth,
                           partial + (i * stride + j) * LANES, stride, first);
        }
    }
}

static RGREF_AVX2 void reorder_block_avx2(const void *w, int w_is_bf16, int64_t start,
                                          int64_t k, int64_t rows, int64_t depth,
                                          float *block) {
    for (int64_t j = 0; j < rows; j++) {
        for (int64_t p = 0; p < depth; p += CHUNK) {
            __m256 first;
            __m256 second;
            avx2_load_weight_chunk(w, start + j * k + p, w_is_bf16, &first, &second);
            _mm256_storeu_ps(block + j * depth + p, first);
            _mm256_storeu_ps(block + j * depth + p + LANES, second);
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------
 * Matrix-matrix structure, AVX-512
 *
 * A 16-float register contains the lane sums of one x row against two W rows: lanes 0-7
 * for the first and 8-15 for the second. So the block keeps W rows in pairs, with the
 * 8 columns of each step of the first row followed by the same 8 of the second. Pair q
 * starts at block + q * 2 * depth. Column p of its rows (in lane order, a multiple of
 * LANES) is at offsets 2 * p and 2 * p + LANES. Each x row's 8 columns are
 * loaded into both halves. So every lane sum meets the same products in the same order
 * as in the AVX2 tile, and the results are bitwise the same. The partial sums of rows j
 * and j + 1 are adjacent in `partial`, so the register stores and loads them whole.
 * A block with an odd number of rows gets a zero row to complete its last pair, whose
 * sums go into the unused slot after the block's rows.
 */

#if RGREF_HAVE_AVX2_CODE

RGREF_AVX512_INLINE void avx512_gemm_tile(int rows_x, int pairs, const float *x,
                                          int64_t x_stride, const float *w,
                                          int64_t pair_stride, int64_t depth,
                                          float *partial, int64_t partial_stride,
                                          int first) {
    __m512 acc[GEMM512_TILE_X_ROWS][GEMM512_TILE_PAIRS];
    for (int i = 0; i < rows_x; i++) {
        for (int q = 0; q < pairs; q++) {
            acc[i][q] = first ? _mm512_setzero_ps()
                              : _mm512_loadu_ps(partial + (i * partial_stride + 2 * q) * LANES);
        }
    }

    for (int64_t p = 0; p < depth; p += LANES) {
        __m512 w_lanes[GEMM512_TILE_PAIRS];
        for (int q = 0; q < pairs; q++) {
            w_lanes[q] = _mm512_loadu_ps(w + q * pair_stride + 2 * p);
        }
        for (int i = 0; i < rows_x; i++) {
            __m512 x_lanes = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + i * x_stride + p));
            for (int q = 0; q < pairs; q++) {
                acc[i][q] = _mm512_fmadd_ps(x_lanes, w_lanes[q], acc[i][q]);
            }
        }
    }

    for (int i = 0; i < rows_x; i++) {
        for (int q = 0; q < pairs; q++) {
            _mm512_storeu_ps(partial + (i * partial_stride + 2 * q) * LANES, acc[i][q]);
        }
    }
}

/* Every x row against `pairs` W pairs. The W tile stays in the L1 cache while the tiles
   of x pass over it. */
RGREF_AVX512_INLINE void avx512_gemm_pairs(int pairs, const float *x, int64_t n, int64_t k,
                                           const float *w, int64_t pair_stride,
                                           int64_t depth, float *partial, int first) {
    const int64_t stride = GEMM_BLOCK_ROWS;
    int64_t i = 0;
    for (; i + GEMM512_TILE_X_ROWS <= n; i += GEMM512_TILE_X_ROWS) {
        avx512_gemm_tile(GEMM512_TILE_X_ROWS, pairs, x + i * k, k, w, pair_stride, depth,
                         partial + i * stride * LANES, stride, first);
    }
    for (; i < n; i++) {
        avx512_gemm_tile(1, pairs, x + i * k, k, w, pair_stride, depth,
                         partial + i * stride * LANES, stride, first);
    }
}

static RGREF_AVX512 void gemm_block_avx512(const float *x, int64_t n, int64_t k,
                                           const float *w, int64_t w_stride, int64_t rows,
                                           int64_t depth, float *partial, int first) {
    const int64_t pair_stride = 2 * w_stride;
    int64_t pairs = (rows + 1) / 2;
    for (int64_t q = 0; q < pairs; q += GEMM512_TILE_PAIRS) {
        const float *tile_w = w + q * pair_stride;
        float *tile_partial = partial + 2 * q * LANES;
        switch (min_i64(GEMM512_TILE_PAIRS, pairs - q)) {
        case 6:
            avx512_gemm_pairs(6, x, n, k, tile_w, pair_stride, depth, tile_partial, first);
            break;
        case 5:
            avx512_gemm_pairs(5, x, n, k, tile_w, pair_stride, depth, tile_partial, first);
            break;
        case 4:
            avx512_gemm_pairs(4, x, n, k, tile_w, pair_stride, depth, tile_partial, first);
            break;
        case 3:
            avx512_gemm_pairs(3, x, n, k, tile_w, pair_stride, depth, tile_partial, first);
            break;
        case 2:
            avx512_gemm_pairs(2, x, n, k, tile_w, pair_stride, depth, tile_partial, first);
            break;
        default:
            avx512_gemm_pairs(1, x, n, k, tile_w, pair_stride, depth, tile_partial, first);
            break;
        }
    }
}

/* The AVX2 reorder, written in pairs of rows (see above). */
static RGREF_AVX512 void reorder_block_avx512(const void *w, int w_is_bf16, int64_t start,
                                              int64_t k, int64_t rows, int64_t depth,
                                              float *block) {
    for (int64_t j = 0; j < rows; j += 2) {
        float *pair = block + j * depth;
        for (int64_t p = 0; p < depth; p += CHUNK) {
            __m256 first_a;
            __m256 second_a;
            __m256 first_b = _mm256_setzero_ps();
            __m256 second_b = _mm256_setzero_ps();
            avx2_load_weight_chunk(w, start + j * k + p, w_is_bf16, &first_a, &second_a);
            if (j + 1 < rows) {
                avx2_load_weight_chunk(w, start + (j + 1) * k + p, w_is_bf16, &first_b,
                                       &second_b);
            }
            _mm256_storeu_ps(pair + 2 * p, first_a);
            _mm256_storeu_ps(pair + 2 * p + LANES, first_b);
            _mm256_storeu_ps(pair + 2 * p + 2 * LANES, second_a);
            _mm256_storeu_ps(pair + 2 * p + 3 * LANES, second_b);
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

typedef void (*gemm_block_fn)(const float *, int64_t, int64_t, const float *, int64_t,
                              int64_t, int64_t, float *, int);
typedef void (*reorder_block_fn)(const void *, int, int64_t, int64_t, int64_t, int64_t,
                                 float *);

/* Compute outputs [j_begin, j_end) of every row of x, for N >= GEMM_MIN_ROWS.
   x_reordered is x with the columns of each chunk in lane order, `block` has room for
   GEMM_BLOCK_ROWS x GEMM_BLOCK_DEPTH floats and `partial` n x GEMM_BLOCK_ROWS x LANES. */
static void gemm_rows(gemm_block_fn gemm_block, reorder_block_fn reorder_block,
                      const float *x, const float *x_reordered, const void *w, int w_is_bf16,
                      const float *bias, float *y, int64_t n, int64_t k, int64_t m,
                      int64_t j_begin, int64_t j_end, float *block, float *partial) {
    int64_t k_main = k - k % CHUNK;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += GEMM_BLOCK_ROWS) {
        int64_t rows = min_i64(GEMM_BLOCK_ROWS, j_end - j0);

        for (int64_t p0 = 0; p0 < k_main; p0 += GEMM_BLOCK_DEPTH) {
            int64_t depth = min_i64(GEMM_BLOCK_DEPTH, k_main - p0);
            reorder_block(w, w_is_bf16, j0 * k + p0, k, rows, depth, block);
            gemm_block(x_reordered + p0, n, k, block, depth, rows, depth, partial, p0 == 0);
        }

        for (int64_t i = 0; i < n; i++) {
            for (int64_t j = 0; j < rows; j++) {
                float *lanes = partial + (i * GEMM_BLOCK_ROWS + j) * LANES;
                if (k_main == 0) {
                    for (int l = 0; l < LANES; l++) {
                        lanes[l] = 0.0f;
                    }
                }
                y[i * m + j0 + j] = finish_dot(lanes, x + i * k,
                                               weight_row(w, j0 + j, k, w_is_bf16), w_is_bf16,
                                               k_main, k, bias != NULL ? bias + j0 + j : NULL);
            }
        }
    }
}

/* Copy x [n, k] with the columns of each whole chunk in lane order (the last k mod
   CHUNK columns, which no tile reads, are left out). */
static float *reorder_x(const float *x, int64_t n, int64_t k) {
    float *reordered = malloc(sizeof(float) * (size_t)(n * k));
    if (reordered == NULL) {
        return NULL;
    }
    int64_t k_main = k - k % CHUNK;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t p = 0; p < k_main; p += CHUNK) {
            reorder_chunk(x, i * k + p, 0, reordered + i * k + p);
        }
    }
    return reordered;
}

/* ------------------------------------------------------------------------------------
 * Dispatch
 */

typedef void (*dot_rows_fn)(const float *, const void *, int, const float *, float *,
                            int64_t, int64_t, int64_t, int64_t, int64_t);

static void linear_parallel(int simd, const float *x, const void *w, int w_is_bf16,
                            const float *bias, float *y, int64_t n, int64_t k, int64_t m) {
    if (n == 0 || m == 0) {
        return;
    }
    dot_rows_fn dot_rows = dot_rows_portable;
    gemm_block_fn gemm_block = gemm_block_portable;
    reorder_block_fn reorder_block = reorder_block_portable;
#if RGREF_HAVE_AVX2_CODE
    if (simd >= RGREF_SIMD_AVX2) {
        dot_rows = dot_rows_avx2;
        gemm_block = gemm_block_avx2;
        reorder_block = reorder_block_avx2;
    }
    if (simd >= RGREF_SIMD_AVX512) {
        gemm_block = gemm_block_avx512;
        reorder_block = reorder_block_avx512;
    }
#else
    (void)simd;
#endif
    /* Without memory for the copy of x, the matrix-vector structure runs instead, and it
       gives the same bits. */
    float *x_reordered = n >= GEMM_MIN_ROWS ? reorder_x(x, n, k) : NULL;
    int64_t chunk_rows = x_reordered != NULL ? GEMM_BLOCK_ROWS : DOT_CHUNK_ROWS;
    int64_t num_chunks = (m + chunk_rows - 1) / chunk_rows;
    int num_threads = rgref_get_num_threads();
    if (n * k * m < MIN_PARALLEL_MULTIPLY_ADDS) {
        num_threads = 1;
    }
    (void)num_threads; /* unused without OpenMP */

#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
    {
        float *block = NULL;
        float *partial = NULL;
        if (x_reordered != NULL) {
            block = malloc(sizeof(float) * GEMM_BLOCK_ROWS * GEMM_BLOCK_DEPTH);
            partial = malloc(sizeof(float) * (size_t)n * GEMM_BLOCK_ROWS * LANES);
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t chunk = 0; chunk < num_chunks; chunk++) {
            int64_t j_begin = chunk * chunk_rows;
            int64_t j_end = min_i64(j_begin + chunk_rows, m);
            if (block != NULL && partial != NULL) {
                gemm_rows(gemm_block, reorder_block, x, x_reordered, w, w_is_bf16, bias, y,
                          n, k, m, j_begin, j_end, block, partial);
                continue;
            }
            /* Few rows of x, or no memory for the buffers: the matrix-vector structure gives the
               same bits, GEMM_MIN_ROWS - 1 rows of x at a time. */
            for (int64_t i = 0; i < n; i += GEMM_MIN_ROWS - 1) {
                dot_rows(x + i * k, w, w_is_bf16, bias, y + i * m,
                         min_i64(GEMM_MIN_ROWS - 1, n - i), k, m, j_begin, j_end);
            }
        }
        free(block);
        free(partial);
    }
    free(x_reordered);
}

void rgref_linear_f32(const float *x, const float *w, const float *bias, float *y,
                      int64_t n, int64_t k, int64_t m) {
    linear_parallel(rgref_simd_level(), x, w, 0, bias, y, n, k, m);
}

void rgref_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                       int64_t n, int64_t k, int64_t m) {
    linear_parallel(rgref_simd_level(), x, w, 1, bias, y, n, k, m);
}

void rgref_linear_f32_portable(const float *x, const float *w, const float *bias,
                               float *y, int64_t n, int64_t k, int64_t m) {
    linear_parallel(RGREF_SIMD_PORTABLE, x, w, 0, bias, y, n, k, m);
}

void rgref_linear_bf16_portable(const float *x, const uint16_t *w, const float *bias,
                                float *y, int64_t n, int64_t k, int64_t m) {
    linear_parallel(RGREF_SIMD_PORTABLE, x, w, 1, bias, y, n, k, m);
}
