/* rgref C kernels: the RG-LRU scan, linear layers, the block-diagonal RG-LRU gate
 * projections, local attention, the Conv1D, GELU and the logit soft cap.
 *
 * Notation: B batch, T time, E RG-LRU width (channels), H heads, K head dimension,
 * S attention window, W Conv1D width. A linear layer computes y[N, M] = x[N, K] @ W[M, K]^T
 * (+ bias[M]) for N tokens, K input and M output features. Every array is row-major
 * and contiguous. Activations are float32. bfloat16 weights are passed as their
 * uint16 bits, the top half of a float32.
 *
 * Variants of each kernel:
 *   (no suffix)  the fast kernel: AVX2+FMA code when the CPU supports it (checked at
 *                run time), otherwise the portable code. Runs on OpenMP threads.
 *   _portable    the fast kernel's structure in plain C without intrinsics, also on
 *                OpenMP threads: what CPUs without AVX2 run.
 *   _naive       plain loops on one thread, written to be read next to the formula.
 * Threads split the work by channel, output feature or query, never inside one sum,
 * so each fast kernel returns bitwise identical results at any thread count.
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
/* Allow (1, the default) or forbid (0) the AVX-512 code of the matrix-matrix tiles, for
   this process. Either way the results are bitwise the same. */
void rgref_set_avx512(int allowed);
/* Return 1 when the fast linear layers run their AVX-512 code for prompts, else 0:
   the build has it, the CPU runs it and rgref_set_avx512 allows it. */
int rgref_uses_avx512(void);

/* RG-LRU scan.
 *
 * x, gate_x_pre, gate_a_pre, y: [B, T, E]; a_param: [E]; segment_pos: [B, T];
 * h: [B, E], the incoming state, overwritten with the state after the last step.
 * gate_x_pre and gate_a_pre are the gate projections before the sigmoid.
 * segment_pos == 0 marks a document start, where the state resets.
 * softplus_a: [E], softplus(a_param) as rgref_softplus computes it, or NULL to compute
 * it here. Decoding passes it because E softplus evaluations cost more than a one-step
 * scan.
 * Returns 0, or -1 when a scratch buffer of E floats cannot be allocated (y and h are
 * then unchanged). */
int rgref_rg_lru_scan(const float *x, const float *gate_x_pre, const float *gate_a_pre,
                      const float *a_param, const float *softplus_a,
                      const int32_t *segment_pos, float *h, float *y, int64_t batch,
                      int64_t time, int64_t width);
int rgref_rg_lru_scan_portable(const float *x, const float *gate_x_pre,
                               const float *gate_a_pre, const float *a_param,
                               const float *softplus_a, const int32_t *segment_pos, float *h,
                               float *y, int64_t batch, int64_t time, int64_t width);
int rgref_rg_lru_scan_naive(const float *x, const float *gate_x_pre,
                            const float *gate_a_pre, const float *a_param,
                            const float *softplus_a, const int32_t *segment_pos, float *h,
                            float *y, int64_t batch,
                            int64_t time, int64_t width);

/* y[i] = softplus(x[i]) = log(1 + exp(x[i])) for n floats, as the RG-LRU scan uses it. */
void rgref_softplus(const float *x, float *y, int64_t n);

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

/* Block-diagonal linear layer (the RG-LRU gate projections):
 * y[n, h * P + c] = sum over r of x[n, h * P + r] * w[h, r, c], plus bias[h * P + c],
 * for H = `heads` blocks of width P = `width` = E/H. x, y: [N, E]; w: [H, P, P]
 * stored [in, out], float32 (_f32) or bfloat16 bits (_bf16); bias: [E] or NULL.
 * y must not overlap x, w or bias. */
void rgref_block_diagonal_linear_f32(const float *x, const float *w, const float *bias,
                                     float *y, int64_t n, int64_t heads, int64_t width);
void rgref_block_diagonal_linear_bf16(const float *x, const uint16_t *w, const float *bias,
                                      float *y, int64_t n, int64_t heads, int64_t width);
void rgref_block_diagonal_linear_f32_portable(const float *x, const float *w,
                                              const float *bias, float *y, int64_t n,
                                              int64_t heads, int64_t width);
void rgref_block_diagonal_linear_bf16_portable(const float *x, const uint16_t *w,
                                               const float *bias, float *y, int64_t n,
                                               int64_t heads, int64_t width);
void rgref_block_diagonal_linear_f32_naive(const float *x, const float *w, const float *bias,
                                           float *y, int64_t n, int64_t heads,
                                           int64_t width);
void rgref_block_diagonal_linear_bf16_naive(const float *x, const uint16_t *w,
                                            const float *bias, float *y, int64_t n,
                                            int64_t heads, int64_t width);

/* Local multi-query attention of a chunk of T tokens over itself and a ring-buffer
 * cache of the S tokens before it.
 *
 * queries: [B, T, H, K], rotated, not yet scaled by K^-0.5; out: the same shape.
 * keys, values: [B, T, K] of the chunk's tokens (keys rotated); docs: [B, T] document
 * ids. cache_keys, cache_values: [B, S, K] and cache_docs: [B, S], where the token
 * with stream index s (counting every token before the chunk from 0) is in slot s % S.
 * num_cached: the number of tokens before the chunk, so the chunk's token t has
 * stream index num_cached + t. Query t attends to the tokens of stream index
 * num_cached + t - S ... num_cached + t that exist and have its document id.
 * Returns 0, or -1 when a scratch buffer of S + 1 pointers cannot be allocated (out
 * is then incomplete). */
int rgref_local_attention(const float *queries, const float *keys, const float *values,
                          const int64_t *docs, const float *cache_keys,
                          const float *cache_values, const int64_t *cache_docs,
                          int64_t num_cached, float *out, int64_t batch, int64_t time,
                          int64_t heads, int64_t head_dim, int64_t window);
int rgref_local_attention_portable(const float *queries, const float *keys,
                                   const float *values, const int64_t *docs,
                                   const float *cache_keys, const float *cache_values,
                                   const int64_t *cache_docs, int64_t num_cached, float *out,
                                   int64_t batch, int64_t time, int64_t heads,
                                   int64_t head_dim, int64_t window);
int rgref_local_attention_naive(const float *queries, const float *keys, const float *values,
                                const int64_t *docs, const float *cache_keys,
                                const float *cache_values, const int64_t *cache_docs,
                                int64_t num_cached, float *out, int64_t batch, int64_t time,
                                int64_t heads, int64_t head_dim, int64_t window);

/* Causal depthwise Conv1D over time that never looks across a document start.
 * x, y: [B, T, E]. segment_pos: [B, T], 0 at a document start. taps: [W, E], the
 * official layout, where row W-1 multiplies the current token. bias: [E].
 * x_history: [B, W-1, E] and pos_history: [B, W-1] are the W-1 inputs before x and
 * their segment_pos, oldest first. Returns 0, or -1 when W < 1. The Conv1D has no
 * AVX2 code, so it has a fast and a naive variant only. */
int rgref_conv1d(const float *x, const int64_t *segment_pos, const float *taps,
                 const float *bias, const float *x_history, const int64_t *pos_history,
                 float *y, int64_t batch, int64_t time, int64_t channels, int64_t width);
int rgref_conv1d_naive(const float *x, const int64_t *segment_pos, const float *taps,
                       const float *bias, const float *x_history,
                       const int64_t *pos_history, float *y, int64_t batch, int64_t time,
                       int64_t channels, int64_t width);

/* Elementwise, over n floats. y may be x itself; otherwise no array may overlap another.
 * gelu_tanh: y = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), times
 * up[i] when `up` is not NULL (the GeGLU product). soft_cap: y = cap * tanh(x / cap). */
void rgref_gelu_tanh(const float *x, const float *up, float *y, int64_t n);
void rgref_gelu_tanh_portable(const float *x, const float *up, float *y, int64_t n);
void rgref_gelu_tanh_naive(const float *x, const float *up, float *y, int64_t n);
void rgref_soft_cap(const float *x, float cap, float *y, int64_t n);
void rgref_soft_cap_portable(const float *x, float cap, float *y, int64_t n);
void rgref_soft_cap_naive(const float *x, float cap, float *y, int64_t n);

/* RMS normalization of each row of x [rows, width]:
 * y = x / sqrt(mean(x^2) + eps) * (1 + scale), scale: [width]. y must not overlap x. */
void rgref_rms_norm(const float *x, const float *scale, float eps, float *y, int64_t rows,
                    int64_t width);
void rgref_rms_norm_portable(const float *x, const float *scale, float eps, float *y,
                             int64_t rows, int64_t width);
void rgref_rms_norm_naive(const float *x, const float *scale, float eps, float *y,
                          int64_t rows, int64_t width);

#endif /* RGREF_KERNELS_H */
