/* rgref C kernels: the RG-LRU scan and linear layers, each in three variants.
 *
 * Notation: B batch, T time, E RG-LRU width (channels). A linear layer computes
 * y[N, M] = x[N, K] @ W[M, K]^T (+ bias[M]) for N tokens, K input and M output
 * features. Every array is row-major and contiguous. Activations are float32.
 * bfloat16 weights are passed as their uint16 bits, the top half of a float32.
 *
 * Variants of each kernel:
 *   (no suffix)  the fast kernel: AVX2+FMA code when the CPU supports it (checked at
 *                run time), otherwise the portable code. Runs on OpenMP threads.
 *   _portable    the fast kernel's structure in plain C without intrinsics, also on
 *                OpenMP threads: what CPUs without AVX2 run.
 *   _naive       plain loops on one thread, written to be read next to the formula.
 * Threads split the work by channel or by output feature, never inside one sum, so
 * each fast kernel returns bitwise identical results at any thread count.
 *
 * rgref/_build_kernels.py passes this header to cffi as its cdef, so it uses plain C
 * declarations only: the builder drops lines that start with '#'.
 */
#ifndef RGREF_KERNELS_H
#define RGREF_KERNELS_H

#include <stdint.h>

/* Threads. */

/* Set the number of threads the fast kernels use. 0 restores the OpenMP default
   (OMP_NUM_THREADS, else one per core). Without OpenMP the kernels use 1 thread. */
void rgref_set_num_threads(int num_threads);
/* Return the number of threads the next fast kernel call uses. */
int rgref_get_num_threads(void);
/* Return 1 when the library was compiled with OpenMP, else 0. */
int rgref_has_openmp(void);
/* Return 1 when the fast kernels run their AVX2+FMA code on this CPU, else 0. */
int rgref_uses_avx2(void);

/* RG-LRU scan.
 *
 * x, gate_x_pre, gate_a_pre, y: [B, T, E]; a_param: [E]; segment_pos: [B, T];
 * h: [B, E], the incoming state, overwritten with the state after the last step.
 * gate_x_pre and gate_a_pre are the gate projections before the sigmoid.
 * segment_pos == 0 marks a document start, where the state resets.
 * Returns 0, or -1 when a scratch buffer of E floats cannot be allocated (y and h are
 * then unchanged). */
int rgref_rg_lru_scan(const float *x, const float *gate_x_pre, const float *gate_a_pre,
                      const float *a_param, const int32_t *segment_pos, float *h, float *y,
                      int64_t batch, int64_t time, int64_t width);
int rgref_rg_lru_scan_portable(const float *x, const float *gate_x_pre,
                               const float *gate_a_pre, const float *a_param,
                               const int32_t *segment_pos, float *h, float *y,
                               int64_t batch, int64_t time, int64_t width);
int rgref_rg_lru_scan_naive(const float *x, const float *gate_x_pre,
                            const float *gate_a_pre, const float *a_param,
                            const int32_t *segment_pos, float *h, float *y, int64_t batch,
                            int64_t time, int64_t width);

/* Linear layer: y[N, M] = x[N, K] @ w[M, K]^T + bias[M].
 *
 * bias may be NULL. w is float32 (_f32) or bfloat16 bits (_bf16). y must not
 * overlap x, w or bias. */
void rgref_linear_f32(const float *x, const float *w, const float *bias, float *y,
                      int64_t n, int64_t k, int64_t m);
void rgref_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                       int64_t n, int64_t k, int64_t m);
void rgref_linear_f32_portable(const float *x, const float *w, const float *bias,
                               float *y, int64_t n, int64_t k, int64_t m);
void rgref_linear_bf16_portable(const float *x, const uint16_t *w, const float *bias,
                                float *y, int64_t n, int64_t k, int64_t m);
void rgref_linear_f32_naive(const float *x, const float *w, const float *bias, float *y,
                            int64_t n, int64_t k, int64_t m);
void rgref_linear_bf16_naive(const float *x, const uint16_t *w, const float *bias,
                             float *y, int64_t n, int64_t k, int64_t m);

#endif /* RGREF_KERNELS_H */
