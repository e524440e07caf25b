/* Local multi-query attention over a chunk of T tokens and the key/value cache (see
 * rgref_kernels.h for the contract).
 *
 * Tokens are numbered by stream index: the chunk's token t is stream index
 * num_cached + t, and the cache keeps stream index s in ring slot s % S when
 * num_cached - S <= s < num_cached and s >= 0. Query t attends to stream indices
 * num_cached + t - S ... num_cached + t (itself and the S tokens before it, so S + 1
 * keys) that exist and belong to its document. For each query head:
 *   logit_s = (q . k_s) * K^-0.5
 *   p_s = exp(logit_s - max logit) / sum of exp(logit - max logit)
 *   out = sum of p_s * v_s, over the visible keys in increasing s.
 * Masked keys are left out of the sums, which is exact: the NumPy code gives them
 * a logit of -2.4e38, whose exp is 0 in float32.
 *
 * Threads take (batch row, token, head) queries one at a time (OpenMP dynamic
 * schedule). Each query is computed by one thread in a fixed order, so the fast
 * kernels give the same bits on any number of threads, and a query gets the same bits
 * whether its keys come from the cache or from the same chunk.
 */
#include "kernels_common.h"

/* Gather the addresses of the keys and values query t can see, and return how many.
   key_rows and value_rows have room for window + 1 pointers. */
static int64_t visible_keys(const float *keys, const float *values, const int64_t *docs,
                            const float *cache_keys, const float *cache_values,
                            const int64_t *cache_docs, int64_t num_cached, int64_t b,
                            int64_t t, int64_t time, int64_t head_dim, int64_t window,
                            const float **key_rows, const float **value_rows) {
    int64_t query_doc = docs[b * time + t];
    int64_t first = num_cached + t - window;
    if (first < 0) {
        first = 0;
    }
    int64_t count = 0;
    for (int64_t s = first; s <= num_cached + t; s++) {
        int64_t doc;
        const float *key;
        const float *value;
        if (s >= num_cached) {
            int64_t row = b * time + (s - num_cached);
            doc = docs[row];
            key = keys + row * head_dim;
            value = values + row * head_dim;
        } else {
            int64_t row = b * window + s % window;
            doc = cache_docs[row];
            key = cache_keys + row * head_dim;
            value = cache_values + row * head_dim;
        }
        if (doc == query_doc) {
            key_rows[count] = key;
            value_rows[count] = value;
            count++;
        }
    }
    return count;
}

/* ------------------------------------------------------------------------------------
 * Naive: one query at a time, the formula above in plain loops.
 */

int rgref_local_attention_naive(const float *queries, const float *keys, const float *values,
                                const int64_t *docs, const float *cache_keys,
                                const float *cache_values, const int64_t *cache_docs,
                                int64_t num_cached, float *out, int64_t batch, int64_t time,
                                int64_t heads, int64_t head_dim, int64_t window) {
    const float **key_rows = malloc(sizeof(float *) * (size_t)(window + 1));
    const float **value_rows = malloc(sizeof(float *) * (size_t)(window + 1));
    float *probs = malloc(sizeof(float) * (size_t)(window + 1));
    int status = 0;
    if (key_rows == NULL || value_rows == NULL || probs == NULL) {
        status = -1;
        goto done;
    }
    float scale = (float)(1.0 / sqrt((double)head_dim));
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t t = 0; t < time; t++) {
            int64_t count = visible_keys(keys, values, docs, cache_keys, cache_values,
                                         cache_docs, num_cached, b, t, time, head_dim,
                                         window, key_rows, value_rows);
            for (int64_t h = 0; h < heads; h++) {
                const float *q = queries + ((b * time + t) * heads + h) * head_dim;
                float *o = out + ((b * time + t) * heads + h) * head_dim;
                float max_logit = -INFINITY;
                for (int64_t s = 0; s < count; s++) {
                    float dot = 0.0f;
                    for (int64_t d = 0; d < head_dim; d++) {
                        dot += q[d] * key_rows[s][d];
                    }
                    probs[s] = dot * scale;
                    if (probs[s] > max_logit) {
                        max_logit = probs[s];
                    }
                }
                float sum = 0.0f;
                for (int64_t s = 0; s < count; s++) {
                    probs[s] = expf(probs[s] - max_logit);
                    sum += probs[s];
                }
                for (int64_t d = 0; d < head_dim; d++) {
                    o[d] = 0.0f;
                }
                for (int64_t s = 0; s < count; s++) {
                    float p = probs[s] / sum;
                    for (int64_t d = 0; d < head_dim; d++) {
                        o[d] += p * value_rows[s][d];
                    }
                }
            }
        }
    }
done:
    free(key_rows);
    free(value_rows);
    free(probs);
    return status;
}

/* ------------------------------------------------------------------------------------
 * One query head against its visible keys: the portable and AVX2 forms. Both take the
 * dot products in 8 lanes (d = l, l + 8, ... in lane l, then the lanes added pairwise
 * as in linear.c, then the head_dim mod 8 tail), subtract the max, exponentiate,
 * divide by the sum (added in increasing s), and accumulate p_s * v_s in increasing s.
 * probs has room for `count` floats.
 */

static void portable_query(const float *q, const float *const *key_rows,
                           const float *const *value_rows, int64_t count, int64_t head_dim,
                           float scale, float *probs, float *o) {
    int64_t d_main = head_dim - head_dim % LANES;
    float max_logit = -INFINITY;
    for (int64_t s = 0; s < count; s++) {
        float lanes[LANES] = {0.0f};
        for (int64_t d = 0; d < d_main; d += LANES) {
            for (int l = 0; l < LANES; l++) {
                lanes[l] += q[d + l] * key_rows[s][d + l];
            }
        }
        float dot = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
                    ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
        for (int64_t d = d_main; d < head_dim; d++) {
            dot += q[d] * key_rows[s][d];
        }
        probs[s] = dot * scale;
        max_logit = probs[s] > max_logit ? probs[s] : max_logit;
    }

    float sum = 0.0f;
    for (int64_t s = 0; s < count; s++) {
        probs[s] = expf(probs[s] - max_logit);
        sum += probs[s];
    }

    for (int64_t d = 0; d < head_dim; d++) {
        o[d] = 0.0f;
    }
    for (int64_t s = 0; s < count; s++) {
        float p = probs[s] / sum;
        for (int64_t d = 0; d < head_dim; d++) {
            o[d] += p * value_rows[s][d];
        }
    }
}

#if RGREF_HAVE_AVX2_CODE

static RGREF_AVX2 void avx2_query(const float *q, const float *const *key_rows,
                                  const float *const *value_rows, int64_t count,
                                  int64_t head_dim, float scale, float *probs, float *o) {
    int64_t d_main = head_dim - head_dim % LANES;
    float max_logit = -INFINITY;
    for (int64_t s = 0; s < count; s++) {
        __m256 lanes = _mm256_setzero_ps();
        for (int64_t d = 0; d < d_main; d += LANES) {
            lanes = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key_rows[s] + d),
                                    lanes);
        }
        float dot = avx2_sum_lanes(lanes);
        for (int64_t d = d_main; d < head_dim; d++) {
            dot += q[d] * key_rows[s][d];
        }
        probs[s] = dot * scale;
        max_logit = probs[s] > max_logit ? probs[s] : max_logit;
    }

    /* exp in vectors of 8, then the count mod 8 tail with libm. */
    __m256 max_vector = _mm256_set1_ps(max_logit);
    int64_t s_main = count - count % LANES;
    for (int64_t s = 0; s < s_main; s += LANES) {
        _mm256_storeu_ps(probs + s,
                         avx2_exp(_mm256_sub_ps(_mm256_loadu_ps(probs + s), max_vector)));
    }
    for (int64_t s = s_main; s < count; s++) {
        probs[s] = expf(probs[s] - max_logit);
    }
    float sum = 0.0f;
    for (int64_t s = 0; s < count; s++) {
        sum += probs[s];
    }

    for (int64_t d = 0; d < d_main; d += LANES) {
        _mm256_storeu_ps(o + d, _mm256_setzero_ps());
    }
    for (int64_t d = d_main; d < head_dim; d++) {
        o[d] = 0.0f;
    }
    for (int64_t s = 0; s < count; s++) {
        float p = probs[s] / sum;
        __m256 p_vector = _mm256_set1_ps(p);
        for (int64_t d = 0; d < d_main; d += LANES) {
            _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p_vector, _mm256_loadu_ps(value_rows[s] + d),
                                                    _mm256_loadu_ps(o + d)));
        }
        for (int64_t d = d_main; d < head_dim; d++) {
            o[d] += p * value_rows[s][d];
        }
    }
}

#endif /* RGREF_HAVE_AVX2_CODE */

/* ------------------------------------------------------------------------------------
 * Dispatch
 */

typedef void (*query_fn)(const float *, const float *const *, const float *const *,
                         int64_t, int64_t, float, float *, float *);

static int local_attention_parallel(int use_avx2, const float *queries, const float *keys,
                                    const float *values, const int64_t *docs,
                                    const float *cache_keys, const float *cache_values,
                                    const int64_t *cache_docs, int64_t num_cached,
                                    float *out, int64_t batch, int64_t time, int64_t heads,
                                    int64_t head_dim, int64_t window) {
    query_fn query = portable_query;
#if RGREF_HAVE_AVX2_CODE
    if (use_avx2) {
        query = avx2_query;
    }
#else
    (void)use_avx2;
#endif
    float scale = (float)(1.0 / sqrt((double)head_dim));
    int64_t num_items = batch * time * heads;
    int num_threads = rgref_get_num_threads();
    /* Each query reads at most window + 1 keys and values. */
    if (num_items * (window + 1) * head_dim * 2 < MIN_PARALLEL_MULTIPLY_ADDS) {
        num_threads = 1;
    }
    (void)num_threads; /* unused without OpenMP */
    int failed = 0;

#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
#endif
    {
        const float **key_rows = malloc(sizeof(float *) * (size_t)(window + 1));
        const float **value_rows = malloc(sizeof(float *) * (size_t)(window + 1));
        float *probs = malloc(sizeof(float) * (size_t)(window + 1));
        int ready = key_rows != NULL && value_rows != NULL && probs != NULL;
        if (!ready) {
            failed = 1;
        }
        int64_t count = 0;
        int64_t gathered_for = -1; /* the (b, t) whose keys are in key_rows */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < num_items; item++) {
            if (!ready) {
                continue;
            }
            int64_t b = item / (time * heads);
            int64_t t = item / heads % time;
            if (gathered_for != item / heads) {
                count = visible_keys(keys, values, docs, cache_keys, cache_values, cache_docs,
                                     num_cached, b, t, time, head_dim, window, key_rows,
                                     value_rows);
                gathered_for = item / heads;
            }
            query(queries + item * head_dim, key_rows, value_rows, count, head_dim, scale,
                  probs, out + item * head_dim);
        }
        free(key_rows);
        free(value_rows);
        free(probs);
    }
    return failed ? -1 : 0;
}

int rgref_local_attention(const float *queries, const float *keys, const float *values,
                          const int64_t *docs, const float *cache_keys,
                          const float *cache_values, const int64_t *cache_docs,
                          int64_t num_cached, float *out, int64_t batch, int64_t time,
                          int64_t heads, int64_t head_dim, int64_t window) {
    return local_attention_parallel(rgref_uses_avx2(), queries, keys, values, docs,
                                    cache_keys, cache_values, cache_docs, num_cached, out,
                                    batch, time, heads, head_dim, window);
}

int rgref_local_attention_portable(const float *queries, const float *keys,
                                   const float *values, const int64_t *docs,
                                   const float *cache_keys, const float *cache_values,
                                   const int64_t *cache_docs, int64_t num_cached, float *out,
                                   int64_t batch, int64_t time, int64_t heads,
                                   int64_t head_dim, int64_t window) {
    return local_attention_parallel(0, queries, keys, values, docs, cache_keys, cache_values,
                                    cache_docs, num_cached, out, batch, time, heads, head_dim,
                                    window);
}
