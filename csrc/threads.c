/* Thread count and CPU feature queries for the kernels. */
#include "kernels_common.h"

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


/* Whether rgref_set_avx512 allows the AVX-512 code. */
static int avx512_allowed = 1;

void rgref_set_avx512(int allowed) {
    avx512_allowed = allowed != 0;
}

int rgref_uses_avx512(void) {
#if RGREF_HAVE_AVX2_CODE
    __builtin_cpu_init();
    return avx512_allowed && rgref_uses_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

int rgref_simd_level(void) {
    if (rgref_uses_avx512()) {
        return RGREF_SIMD_AVX512;
    }
    return rgref_uses_avx2() ? RGREF_SIMD_AVX2 : RGREF_SIMD_PORTABLE;
}
