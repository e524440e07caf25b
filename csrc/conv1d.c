/* Causal depthwise Conv1D over time that never looks across a document start (see
 * rgref_kernels.h).
 *
 * For batch row b, step t and channel e, with x_all the W - 1 history inputs followed
 * by the chunk's T inputs, and taps[k][e] the official [W, E] weight layout (row W-1
 * multiplies the current token):
 *   y = bias[e]; then for shift s = 0 .. W-1, in that order:
 *   y = y + (s steps back is in the same document ? x_all[t - s] : 0) * taps[W-1-s][e]
 * The input s steps back is in the same document unless one of the s later tokens,
 * the current one included, starts a document (segment_pos == 0). Each step is one
 * float32 multiply and one add, rounded separately, in the order of the NumPy code
 * (rgref.layers.conv1d), so every variant returns the same bits as NumPy in float32.
 *
 * Threads take contiguous ranges of (batch row, step) outputs; any split gives the
 * same bits. There is no AVX2 code: the compiler vectorises the channel loops.
 */
#include "kernels_common.h"

/* Outputs (steps) per thread below which the kernel uses one thread: a step is a few
   thousand multiply-adds at model widths. */
#define CONV1D_MIN_STEPS_PER_THREAD 64

/* Return how many of the shifts 0 .. width-1 stay in the current document for step t
   of batch row b: 1 + the number of steps back before a document start cuts the
   window off. */
static int64_t shifts_in_document(const int64_t *segment_pos, const int64_t *pos_history,
                                  int64_t b, int64_t t, int64_t time, int64_t width) {
    int64_t shifts = 1;
    /* Shift s needs steps t - s + 1 .. t to be no document start. */
    for (int64_t s = 1; s < width; s++) {
        int64_t later = t - s + 1; /* the earliest step that must not start a document */
        int64_t position = later >= 0 ? segment_pos[b * time + later]
                                      : pos_history[b * (width - 1) + (width - 1 + later)];
        if (position == 0) {
            break;
        }
        shifts++;
    }
    return shifts;
}

/* Return the input `back` steps before step t of batch row b, channel row start. */
static inline const float *input_row(const float *x, const float *x_history, int64_t b,
                                     int64_t t, int64_t back, int64_t time, int64_t width,
                                     int64_t channels) {
    int64_t step = t - back;
    if (step >= 0) {
        return x + (b * time + step) * channels;
    }
    return x_history + (b * (width - 1) + (width - 1 + step)) * channels;
}

/* Compute outputs [item_begin, item_end) of the B * T (batch row, step) outputs. */
static void conv1d_items(const float *x, const int64_t *segment_pos, const float *taps,
                         const float *bias, const float *x_history,
                         const int64_t *pos_history, float *y, int64_t time,
                         int64_t channels, int64_t width, int64_t item_begin,
                         int64_t item_end) {
    for (int64_t item = item_begin; item < item_end; item++) {
        int64_t b = item / time;
        int64_t t = item % time;
        int64_t shifts = shifts_in_document(segment_pos, pos_history, b, t, time, width);
        float *out = y + item * channels;
        for (int64_t e = 0; e < channels; e++) {
            out[e] = bias[e];
        }
        for (int64_t s = 0; s < width; s++) {
            const float *in = input_row(x, x_history, b, t, s, time, width, channels);
            const float *tap = taps + (width - 1 - s) * channels;
            if (s < shifts) {
                for (int64_t e = 0; e < channels; e++) {
                    out[e] = out[e] + in[e] * tap[e];
                }
            } else {
                /* NumPy adds 0 * tap here, which can turn a -0.0 sum into +0.0. */
                for (int64_t e = 0; e < channels; e++) {
                    out[e] = out[e] + 0.0f * tap[e];
                }
            }
        }
    }
}

int rgref_conv1d_naive(const float *x, const int64_t *segment_pos, const float *taps,
                       const float *bias, const float *x_history,
                       const int64_t *pos_history, float *y, int64_t batch, int64_t time,
                       int64_t channels, int64_t width) {
    if (width < 1) {
        return -1;
    }
    conv1d_items(x, segment_pos, taps, bias, x_history, pos_history, y, time, channels,
                 width, 0, batch * time);
    return 0;
}

int rgref_conv1d(const float *x, const int64_t *segment_pos, const float *taps,
                 const float *bias, const float *x_history, const int64_t *pos_history,
                 float *y, int64_t batch, int64_t time, int64_t channels, int64_t width) {
    if (width < 1) {
        return -1;
    }
    int64_t num_items = batch * time;
    int num_threads = rgref_get_num_threads();
    if (num_items < (int64_t)num_threads * CONV1D_MIN_STEPS_PER_THREAD) {
        num_threads = 1;
    }
    (void)num_threads; /* unused without OpenMP */

#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
    {
        int thread = 0;
        int threads = 1;
#ifdef _OPENMP
        thread = omp_get_thread_num();
        threads = omp_get_num_threads();
#endif
        conv1d_items(x, segment_pos, taps, bias, x_history, pos_history, y, time, channels,
                     width, split_point(num_items, threads, thread, 1),
                     split_point(num_items, threads, thread + 1, 1));
    }
    return 0;
}
