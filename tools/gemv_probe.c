/* Standalone probe of the decoding GEMV: variants of the bfloat16 matrix-vector loop of
 * csrc/linear.c, timed on weights read from memory, to try ideas before changing the
 * kernel. It is a tool, not part of the package.
 *
 *     gcc -O2 -fopenmp tools/gemv_probe.c -o /tmp/gemv_probe
 *     OMP_NUM_THREADS=2 /tmp/gemv_probe VARIANT [PASSES [K M]]
 *
 * VARIANT is one of:
 *   avx2      the kernel's loop: tiles of 8 weight rows, one 16-column chunk per step
 *   avx512    the same sums with 2 weight rows per 512-bit register (AVX-512BW)
 *   rows16    tiles of 16 weight rows, using the 32 vector registers of AVX-512VL
 *   prefetch  two chunks per step and a software prefetch PREFETCH_BYTES ahead in each
 *             row (set with -DPREFETCH_BYTES=N; default 512)
 *   f32       the avx2 loop on float32 weights
 *
 * Each pass runs the GEMV once on each of several copies of an M x K weight matrix
 * (default 7680 x 2560). The copies take about 1 GB together, far more than the
 * last-level cache that a few cores share. The best pass gives the rate in GB/s of
 * weights. The bfloat16 variants also check that
 * their outputs equal those of avx2 bit for bit, as the kernel's fixed summation order
 * requires.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 512
#endif

#define CHUNK 16
#define TILE_ROWS 8
#define ROWS_PER_TAKE 128
#define WORKING_SET_BYTES (1024.0 * 1024 * 1024)

enum variant { AVX2, AVX512, ROWS16, PREFETCH, F32 };

/* The kernel's lane order: lane l adds columns first[l] and then second[l] of each
   chunk of 16 columns. x_lanes contains x in that order, 16 floats per chunk. */
static const int chunk_first[8] = {0, 1, 2, 3, 8, 9, 10, 11};
static const int chunk_second[8] = {4, 5, 6, 7, 12, 13, 14, 15};

static float sum_lanes(const float *lanes) {
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
           ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* Add chunk p (16 columns) of `rows` bfloat16 weight rows, row stride k, times x to the
   lane sums acc[0 .. rows-1]. Callers pass a constant `rows`, so the sums stay in
   registers. */
AVX2_INLINE void add_chunk(const float *x_lanes, const uint16_t *w, int64_t k, int64_t p,
                           int rows, __m256 *acc) {
    __m256i zero = _mm256_setzero_si256();
    __m256 x_first = _mm256_loadu_ps(x_lanes + p);
    __m256 x_second = _mm256_loadu_ps(x_lanes + p + 8);
    for (int j = 0; j < rows; j++) {
        __m256i packed = _mm256_loadu_si256((const __m256i *)(w + j * k + p));
        __m256 w_first = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));
        __m256 w_second = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
        acc[j] = _mm256_fmadd_ps(x_first, w_first, acc[j]);
        acc[j] = _mm256_fmadd_ps(x_second, w_second, acc[j]);
    }
}

/* Write the sum of each row's lanes to y. */
AVX2_INLINE void store_sums(const __m256 *acc, int rows, float *y) {
    for (int j = 0; j < rows; j++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, acc[j]);
        y[j] = sum_lanes(lanes);
    }
}

__attribute__((target("avx2,fma"))) static void tile_avx2(const float *x_lanes,
                                                           const uint16_t *w, float *y,
                                                           int64_t k) {
    __m256 acc[TILE_ROWS];
    for (int j = 0; j < TILE_ROWS; j++) {
        acc[j] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < k; p += CHUNK) {
        add_chunk(x_lanes, w, k, p, TILE_ROWS, acc);
    }
    store_sums(acc, TILE_ROWS, y);
}

__attribute__((target("avx2,fma"))) static void tile_prefetch(const float *x_lanes,
                                                               const uint16_t *w, float *y,
                                                               int64_t k) {
    __m256 acc[TILE_ROWS];
    for (int j = 0; j < TILE_ROWS; j++) {
        acc[j] = _mm256_setzero_ps();
    }
    /* Two chunks per step: 64 bytes, one cache line of each row. */
    for (int64_t p = 0; p < k; p += 2 * CHUNK) {
        for (int j = 0; j < TILE_ROWS; j++) {
            _mm_prefetch((const char *)(w + j * k + p) + PREFETCH_BYTES, _MM_HINT_T0);
        }
        add_chunk(x_lanes, w, k, p, TILE_ROWS, acc);
        add_chunk(x_lanes, w, k, p + CHUNK, TILE_ROWS, acc);
    }
    store_sums(acc, TILE_ROWS, y);
}

__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw"))) static void tile_rows16(
    const float *x_lanes, const uint16_t *w, float *y, int64_t k) {
    __m256 acc[2 * TILE_ROWS];
    for (int j = 0; j < 2 * TILE_ROWS; j++) {
        acc[j] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < k; p += CHUNK) {
        add_chunk(x_lanes, w, k, p, 2 * TILE_ROWS, acc);
    }
    store_sums(acc, 2 * TILE_ROWS, y);
}

/* Rows 2i and 2i + 1 share a register: row 2i in the low 256 bits, row 2i + 1 in the
   high ones, so each lane gets the same operations in the same order as in avx2. */
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq"))) static void tile_avx512(
    const float *x_lanes, const uint16_t *w, float *y, int64_t k) {
    __m512 acc[TILE_ROWS / 2];
    __m512i zero = _mm512_setzero_si512();
    for (int j = 0; j < TILE_ROWS / 2; j++) {
        acc[j] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < k; p += CHUNK) {
        __m512 x_first = _mm512_broadcast_f32x8(_mm256_loadu_ps(x_lanes + p));
        __m512 x_second = _mm512_broadcast_f32x8(_mm256_loadu_ps(x_lanes + p + 8));
        for (int j = 0; j < TILE_ROWS / 2; j++) {
            __m256i low = _mm256_loadu_si256((const __m256i *)(w + 2 * j * k + p));
            __m256i high = _mm256_loadu_si256((const __m256i *)(w + (2 * j + 1) * k + p));
            __m512i packed = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
            __m512 w_first = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, packed));
            __m512 w_second = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, packed));
            acc[j] = _mm512_fmadd_ps(x_first, w_first, acc[j]);
            acc[j] = _mm512_fmadd_ps(x_second, w_second, acc[j]);
        }
    }
    for (int j = 0; j < TILE_ROWS / 2; j++) {
        float lanes[16];
        _mm512_storeu_ps(lanes, acc[j]);
        y[2 * j] = sum_lanes(lanes);
        y[2 * j + 1] = sum_lanes(lanes + 8);
    }
}

__attribute__((target("avx2,fma"))) static void tile_f32(const float *x_lanes, const float *w,
                                                          float *y, int64_t k) {
    __m256 acc[TILE_ROWS];
    for (int j = 0; j < TILE_ROWS; j++) {
        acc[j] = _mm256_setzero_ps();
    }
    /* float32 weights in natural column order against x in natural order: the same
       loads and FMAs per weight as the kernel, without its lane shuffle. */
    for (int64_t p = 0; p < k; p += CHUNK) {
        __m256 x_low = _mm256_loadu_ps(x_lanes + p);
        __m256 x_high = _mm256_loadu_ps(x_lanes + p + 8);
        for (int j = 0; j < TILE_ROWS; j++) {
            acc[j] = _mm256_fmadd_ps(x_low, _mm256_loadu_ps(w + j * k + p), acc[j]);
            acc[j] = _mm256_fmadd_ps(x_high, _mm256_loadu_ps(w + j * k + p + 8), acc[j]);
        }
    }
    store_sums(acc, TILE_ROWS, y);
}

static void gemv(enum variant variant, const float *x_lanes, const void *w, float *y,
                 int64_t k, int64_t m) {
    int64_t tile = variant == ROWS16 ? 2 * TILE_ROWS : TILE_ROWS;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t start = 0; start < m; start += ROWS_PER_TAKE) {
        for (int64_t j = start; j < start + ROWS_PER_TAKE; j += tile) {
            const uint16_t *w_bf16 = (const uint16_t *)w + j * k;
            switch (variant) {
            case AVX2: tile_avx2(x_lanes, w_bf16, y + j, k); break;
            case AVX512: tile_avx512(x_lanes, w_bf16, y + j, k); break;
            case ROWS16: tile_rows16(x_lanes, w_bf16, y + j, k); break;
            case PREFETCH: tile_prefetch(x_lanes, w_bf16, y + j, k); break;
            case F32: tile_f32(x_lanes, (const float *)w + j * k, y + j, k); break;
            }
        }
    }
}

int main(int argc, char **argv) {
    static const char *names[] = {"avx2", "avx512", "rows16", "prefetch", "f32"};
    int variant = -1;
    for (int i = 0; argc > 1 && i < 5; i++) {
        if (strcmp(argv[1], names[i]) == 0) {
            variant = i;
        }
    }
    int passes = argc > 2 ? atoi(argv[2]) : 10;
    int64_t k = argc > 4 ? atoll(argv[3]) : 2560;
    int64_t m = argc > 4 ? atoll(argv[4]) : 7680;
    if (variant < 0 || passes < 1 || k <= 0 || k % (2 * CHUNK) || m <= 0 ||
        m % ROWS_PER_TAKE) {
        fprintf(stderr, "usage: %s avx2|avx512|rows16|prefetch|f32 [PASSES [K M]]\n"
                        "K must be a multiple of %d and M of %d\n",
                argv[0], 2 * CHUNK, ROWS_PER_TAKE);
        return 2;
    }
    if (variant != AVX2 && variant != PREFETCH && variant != F32 &&
        !__builtin_cpu_supports("avx512bw")) {
        fprintf(stderr, "%s needs AVX-512BW, which this CPU lacks\n", names[variant]);
        return 1;
    }
    size_t element = variant == F32 ? 4 : 2;
    size_t matrix_bytes = (size_t)k * m * element;
    int copies = (int)(WORKING_SET_BYTES / matrix_bytes) + 1;

    float *x = malloc(sizeof(float) * k);
    float *x_lanes = malloc(sizeof(float) * k);
    float *y = malloc(sizeof(float) * m);
    float *y_check = malloc(sizeof(float) * m);
    void **w = malloc(sizeof(void *) * copies);
    srand(1);
    for (int64_t i = 0; i < k; i++) {
        x[i] = (float)rand() / RAND_MAX - 0.5f;
    }
    for (int64_t c = 0; c < k; c += CHUNK) {
        for (int l = 0; l < 8; l++) {
            x_lanes[c + l] = variant == F32 ? x[c + l] : x[c + chunk_first[l]];
            x_lanes[c + 8 + l] = variant == F32 ? x[c + 8 + l] : x[c + chunk_second[l]];
        }
    }
    for (int i = 0; i < copies; i++) {
        uint16_t *bits = w[i] = aligned_alloc(64, matrix_bytes);
        if (bits == NULL) {
            fprintf(stderr, "failed to allocate weight copy %d of %d (%zu bytes each); the "
                            "probe needs about 1 GB of memory\n", i + 1, copies, matrix_bytes);
            return 1;
        }
        /* bfloat16 bits 0x3f00-0x3fff, the values in [0.5, 2). */
        for (size_t q = 0; q < matrix_bytes / 2; q++) {
            bits[q] = (uint16_t)(0x3f00 | (rand() & 0xff));
        }
    }
    if (variant != F32 && variant != AVX2) {
        gemv(AVX2, x_lanes, w[0], y_check, k, m);
        gemv(variant, x_lanes, w[0], y, k, m);
        if (memcmp(y, y_check, sizeof(float) * m) != 0) {
            fprintf(stderr, "%s: outputs differ from avx2\n", names[variant]);
            return 1;
        }
    }
    double best = 1e30;
    for (int pass = 0; pass < passes; pass++) {
        double start = omp_get_wtime();
        for (int i = 0; i < copies; i++) {
            gemv(variant, x_lanes, w[i], y, k, m);
        }
        double seconds = omp_get_wtime() - start;
        best = seconds < best ? seconds : best;
    }
    printf("%s, K %lld, M %lld, %d threads: %.1f GB/s of weights (best of %d passes over "
           "%d copies)\n", names[variant], (long long)k, (long long)m, omp_get_max_threads(),
           copies * (double)matrix_bytes / best / 1e9, passes, copies);
    return 0;
}
