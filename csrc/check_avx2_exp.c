/* Check avx2_exp (kernels_common.h) against exp in double precision on every float32 in
 * [log(FLT_MIN), log(FLT_MAX)] and print the largest error in units in the last place.
 * Needs an x86-64 CPU with AVX2 and FMA, and takes about a minute on one core:
 *
 *   cc -O2 -ffp-contract=off -Icsrc csrc/check_avx2_exp.c -o /tmp/check_avx2_exp -lm
 *   /tmp/check_avx2_exp
 *
 * It includes the kernel sources to reach the static function. It is not part of the
 * extension or the test suite; run it after changing avx2_exp and update the error
 * stated there.
 */
#include "kernels_common.h"
#include "threads.c"

#include <float.h>
#include <stdio.h>
#include <string.h>

#if RGREF_HAVE_AVX2_CODE

/* Scan the floats whose bit patterns are first..last (with the sign bit `sign`). */
static RGREF_AVX2 double max_ulp_error(uint32_t first, uint32_t last, uint32_t sign,
                                       float *worst_input) {
    double worst = 0.0;
    float inputs[LANES];
    float outputs[LANES];
    for (uint64_t start = first; start <= last; start += LANES) {
        for (int l = 0; l < LANES; l++) {
            uint32_t bits = (uint32_t)(start + l < last ? start + l : last) | sign;
            memcpy(&inputs[l], &bits, sizeof bits);
        }
        _mm256_storeu_ps(outputs, avx2_exp(_mm256_loadu_ps(inputs)));
        for (int l = 0; l < LANES; l++) {
            double expected = exp((double)inputs[l]);
            if (expected < FLT_MIN || expected > FLT_MAX) {
                continue; /* subnormal or overflowing results are not compared */
            }
            int exponent;
            frexp(expected, &exponent);
            double ulp = ldexp(1.0, exponent - 24); /* float32 spacing next to `expected` */
            double error = fabs((double)outputs[l] - expected) / ulp;
            if (error > worst) {
                worst = error;
                *worst_input = inputs[l];
            }
        }
    }
    return worst;
}

int main(void) {
    if (!rgref_uses_avx2()) {
        fprintf(stderr, "this CPU has no AVX2+FMA: nothing to check\n");
        return 1;
    }
    float worst_input = 0.0f;
    /* 0x42B17217 is the largest float below log(FLT_MAX) = 88.72;
       0x42AEAC4F is the float nearest log(FLT_MIN) = -87.34 in magnitude. */
    double positive = max_ulp_error(0, 0x42B17217u, 0, &worst_input);
    printf("x in [0, 88.72]: max error %.3f ulp at x = %.9g\n", positive, worst_input);
    double negative = max_ulp_error(0, 0x42AEAC4Fu, 0x80000000u, &worst_input);
    printf("x in [-87.34, 0]: max error %.3f ulp at x = %.9g\n", negative, worst_input);
    return 0;
}

#else

int main(void) {
    fprintf(stderr, "built without the AVX2 code (not x86-64 GCC or Clang)\n");
    return 1;
}

#endif
