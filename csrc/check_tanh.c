/* Check the tanh of the elementwise kernels (csrc/elementwise.c) against tanh in double
 * precision, and print the largest error in units in the last place of the AVX2 and the
 * portable form. It tries every non-negative float32 below 10: tanh is odd, and above
 * 9.01 every form returns 1. The AVX2 form needs an x86-64 CPU with AVX2 and FMA. It
 * takes about two minutes on one core:
 *
 *   cc -O2 -ffp-contract=off -Icsrc csrc/check_tanh.c -o /tmp/check_tanh -lm
 *   /tmp/check_tanh
 *
 * It includes the kernel sources to reach the static functions. It is not part of the
 * extension or the test suite; run it after changing the tanh and update the errors
 * stated in tests/test_kernels.py.
 */
#include "kernels_common.h"
#include "threads.c"
#include "elementwise.c"

#include <float.h>
#include <stdio.h>
#include <string.h>

/* 0x41200000 is 10.0f. */
#define LAST_BITS 0x41200000u

static double ulp_error(float actual, double expected) {
    if (expected == 0.0) {
        return actual == 0.0f ? 0.0 : INFINITY;
    }
    int exponent;
    frexp(expected, &exponent);
    if (exponent - 24 < -149) {
        exponent = -149 + 24; /* subnormal results: the spacing of subnormals */
    }
    return fabs((double)actual - expected) / ldexp(1.0, exponent - 24);
}

#if RGREF_HAVE_AVX2_CODE
static RGREF_AVX2 void check_avx2_tanh(const float *inputs, float *outputs) {
    _mm256_storeu_ps(outputs, avx2_tanh(_mm256_loadu_ps(inputs)));
}
#endif

static void report(const char *name, double worst, float worst_input) {
    printf("%s: max error %.3f ulp at v = %.9g\n", name, worst, worst_input);
}

int main(void) {
    double worst = 0.0;
    float worst_input = 0.0f;
    for (uint32_t bits = 0; bits <= LAST_BITS; bits++) {
        float v;
        memcpy(&v, &bits, sizeof v);
        double error = ulp_error(portable_tanh(v), tanh((double)v));
        if (error > worst) {
            worst = error;
            worst_input = v;
        }
    }
    report("portable tanh", worst, worst_input);

#if RGREF_HAVE_AVX2_CODE
    if (!rgref_uses_avx2()) {
        fprintf(stderr, "this CPU has no AVX2+FMA: the AVX2 form is not checked\n");
        return 1;
    }
    worst = 0.0;
    for (uint64_t start = 0; start <= LAST_BITS; start += LANES) {
        float inputs[LANES];
        float outputs[LANES];
        for (int l = 0; l < LANES; l++) {
            uint32_t bits = (uint32_t)(start + l <= LAST_BITS ? start + l : LAST_BITS);
            memcpy(&inputs[l], &bits, sizeof bits);
        }
        check_avx2_tanh(inputs, outputs);
        for (int l = 0; l < LANES; l++) {
            double error = ulp_error(outputs[l], tanh((double)inputs[l]));
            if (error > worst) {
                worst = error;
                worst_input = inputs[l];
            }
        }
    }
    report("AVX2 tanh", worst, worst_input);
#endif
    return 0;
}
