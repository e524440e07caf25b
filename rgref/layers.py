"""Every RecurrentGemma layer as a plain function of NumPy arrays.

This module is the specification: it computes exactly what Google DeepMind's
`recurrentgemma` package computes (version 1.0.1), in the order the data flows
through the model. Each function takes arrays and plain numbers and returns
arrays; it works in the dtype of its activation input (float32 or float64),
so callers widen weights first (`rgref.dtypes.to_compute_dtype`).

Notation, used in shapes, einsum subscripts and tests:

    B batch        T time (tokens in this call)   D width
    E lru width    H heads                        K head dim (D / H)
    S attention window                            V vocabulary
    M MLP width    W Conv1D temporal width        N query heads in einsum (= H)

Weights use the Hugging Face layout: a linear weight is `[out, in]`.

A `record` argument, when given a dict, receives named intermediate
activations; `Model.forward(..., return_intermediates=True)` collects them.
"""

from __future__ import annotations

import math

import numpy as np

from rgref.dtypes import round_to_bfloat16

# The constant c in the RG-LRU decay a_t = sigma(Lambda)^(c * r_t), as the Griffin
# paper (arXiv 2402.19427) defines it; 8 in the paper and in the released models.
RG_LRU_C = 8.0
# The masked-logit value the official implementation uses (a large negative
# float32, not -inf, so a row with every key masked still gives finite numbers).
MASKED_LOGIT = -2.3819763e38
# Queries per slice of the banded local attention; bounds the score matrix to
# (QUERY_BLOCK, S + QUERY_BLOCK) per head whatever the sequence length.
QUERY_BLOCK = 256


def _record(record: dict | None, name: str, value: np.ndarray) -> None:
    if record is not None:
        record[name] = value


# =============================================================================
# Primitives
# =============================================================================

def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Normalise the last axis to unit root mean square, then multiply by (1 + scale).

    x: (..., D); scale: (D,). The stored scale is an offset from 1, so a
    freshly initialised (zero) scale is the identity. Returns (..., D) in the
    dtype of x when scale has that dtype too (NumPy promotes otherwise).
    """
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + eps) * (1 + scale)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (JAX's default, PyTorch `approximate="tanh"`).

    Elementwise: returns an array of the shape and dtype of x.
    """
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), elementwise: returns an array of the shape and dtype of x."""
    # exp of a negative argument only, so neither branch overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), computed without overflow; elementwise, in the dtype of x."""
    return np.logaddexp(0, x)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x (..., in) @ weight (out, in)^T + bias (out,) -> (..., out).

    The result has the dtype of x when weight and bias have it too (NumPy
    promotes otherwise).
    """
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def block_diagonal_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Linear map with H independent square blocks on the diagonal.

    x: (B, T, E); weight: (H, E/H, E/H), applied as `x_h @ weight[h]` (an
    `[in, out]` block, as stored by both official and Hugging Face); bias: (H, E/H).
    Returns (B, T, E) in the dtype of x.
    """
    H, block_width, _ = weight.shape
    x_blocks = x.reshape(*x.shape[:-1], H, block_width)                 # (B, T, H, E/H)
    y = np.einsum("...hi,hij->...hj", x_blocks, weight) + bias          # (B, T, H, E/H)
    return y.reshape(x.shape)


def soft_cap(logits: np.ndarray, cap: float | None,
             out: np.ndarray | None = None) -> np.ndarray:
    """cap * tanh(logits / cap): a smooth clamp to (-cap, cap); identity when cap is None.

    Elementwise: returns an array of the shape and dtype of logits, written into
    `out` when given (`out` may be `logits` itself).
    """
    if not cap:
        if out is not None and out is not logits:
            out[...] = logits
            return out
        return logits
    if out is None:
        return cap * np.tanh(logits / cap)
    # The same three roundings as above, without temporaries.
    np.divide(logits, cap, out=out)
    np.tanh(out, out=out)
    return np.multiply(out, cap, out=out)


# =============================================================================
# Embedding
# =============================================================================

def embedding_scale(width: int) -> float:
    """Return sqrt(width) rounded to bfloat16, the factor both official models apply.

    The official implementations cast sqrt(width) to bfloat16 "to match
    training", so sqrt(2560) = 50.596... becomes 50.5. Using the exact root
    shifts every activation of the 2B model by 0.2%. Returns a Python float.
    """
    return float(round_to_bfloat16(np.float32(math.sqrt(width))))


def embed(tokens: np.ndarray, table: np.ndarray, scale_by_sqrt_dim: bool) -> np.ndarray:
    """Look up token embeddings: tokens (B, T) int, table (V, D) -> (B, T, D).

    The result has the table's dtype; the scale is applied in that dtype.
    """
    x = table[tokens]
    if scale_by_sqrt_dim:
        x = x * x.dtype.type(embedding_scale(table.shape[1]))
    return x


def unembed(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Output logits with the tied embedding table: (B, T, D) @ (V, D)^T -> (B, T, V).

    The table must have the dtype of x, which the logits keep.
    """
    return x @ table.T


# =============================================================================
# MLP block (GeGLU)
# =============================================================================

def mlp_block(x: np.ndarray, gate_weight, gate_bias, up_weight, up_bias, down_weight,
              down_bias, record: dict | None = None, linear=linear) -> np.ndarray:
    """gelu_tanh(gate(x)) * up(x), projected back: (B, T, D) -> (B, T, D).

    gate/up weights: (M, D) with biases (M,); down: (D, M) with bias (D,).
    Returns (B, T, D) in the dtype of x; `record` receives "mlp.hidden" (B, T, M).
    `linear` computes each projection; the model passes one that widens
    bfloat16 weights or runs the compiled kernel.
    """
    gate = gelu_tanh(linear(x, gate_weight, gate_bias))                 # (B, T, M)
    up = linear(x, up_weight, up_bias)                                  # (B, T, M)
    _record(record, "mlp.hidden", gate * up)
    return linear(gate * up, down_weight, down_bias)                    # (B, T, D)


# =============================================================================
# Conv1D
# =============================================================================

def conv1d(x: np.ndarray, segment_pos: np.ndarray, weight: np.ndarray, bias: np.ndarray,
           x_history: np.ndarray | None = None,
           pos_history: np.ndarray | None = None) -> np.ndarray:
    """Causal depthwise convolution over time that never looks across a document start.

    x: (B, T, E); segment_pos: (B, T), 0 at each document start.
    weight: (E, 1, W) as stored by Hugging Face (official: (W, E) with
    `official[k, e] == weight[e, 0, k]`); tap W-1 multiplies the current token,
    tap W-1-s the token s steps back. bias: (E,).
    x_history, pos_history: the W-1 inputs before x and their segment_pos
    (B, W-1, E), (B, W-1), oldest first, given together; both None means zeros
    before the sequence.

    The input s steps back is dropped when any of the s later tokens (up to and
    including the current one) starts a document.
    Returns (B, T, E) in the dtype of x.
    """
    if (x_history is None) != (pos_history is None):
        present, absent = (("x_history", "pos_history") if pos_history is None
                           else ("pos_history", "x_history"))
        raise ValueError(f"conv1d got {present} without {absent}: pass the W-1 inputs before "
                         "x and their segment_pos together, or neither")
    B, T, E = x.shape
    W = weight.shape[-1]
    taps = weight.reshape(E, W)                                         # (E, W)
    if x_history is None:
        x_history = np.zeros((B, W - 1, E), x.dtype)
        pos_history = np.ones((B, W - 1), segment_pos.dtype)  # zeros need no mask
    x_all = np.concatenate([x_history.astype(x.dtype), x], axis=1)     # (B, W-1+T, E)
    starts_all = np.concatenate([pos_history, segment_pos], axis=1) == 0  # (B, W-1+T)

    y = np.broadcast_to(bias, (B, T, E)).astype(x.dtype)
    same_document = np.ones((B, T), dtype=bool)
    for shift in range(W):
        if shift > 0:
            # Token t - shift + 1 starting a document cuts off t - shift and earlier.
            same_document &= ~starts_all[:, W - shift:W - shift + T]
        window = x_all[:, W - 1 - shift:W - 1 - shift + T]             # (B, T, E)
        y += np.where(same_document[..., None], window, 0) * taps[:, W - 1 - shift]
    return y


# =============================================================================
# RG-LRU (Real-Gated Linear Recurrent Unit)
# =============================================================================

def linear_scan(x: np.ndarray, a: np.ndarray, h0: np.ndarray | None,
                state_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """h_t = a_t * h_{t-1} + x_t over time; returns all h_t (B, T, E) and the last (B, E).

    x, a: (B, T, E); h0: (B, E), or None for a zero state. The state is
    accumulated in `state_dtype` (float32, as the official implementation does
    even for bfloat16 activations; float64 in float64 mode). The outputs come
    back in the dtype of x, the last state in `state_dtype`.
    """
    B, T, E = x.shape
    h = np.zeros((B, E), state_dtype) if h0 is None else h0.astype(state_dtype)
    y = np.empty_like(x)
    for t in range(T):
        h = a[:, t].astype(state_dtype) * h + x[:, t].astype(state_dtype)
        y[:, t] = h
    return y, h


def rg_lru(x: np.ndarray, segment_pos: np.ndarray, a_param: np.ndarray,
           input_gate_weight, input_gate_bias, recurrent_gate_weight, recurrent_gate_bias,
           h0: np.ndarray | None = None, record: dict | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Real-Gated Linear Recurrent Unit: (B, T, E) -> outputs (B, T, E), last state (B, E).

    Paper symbols (Griffin, arXiv 2402.19427) and stored names:

    | paper       | here          | official (`rg_lru.`) | Hugging Face (`rg_lru.`) |
    |-------------|---------------|----------------------|--------------------------|
    | i_t         | gate_x        | input_gate.{w,b}     | input_gate_{weight,bias} |
    | r_t         | gate_a        | a_gate.{w,b}         | recurrent_gate_{weight,bias} |
    | -Lambda     | a_param       | a_param              | recurrent_param          |
    | a = sigma(Lambda)^(c r_t) | a | a                  | recurrent_gate           |

    The paper writes a = sigma(Lambda)^(c r_t); the implementations store
    a_param with a = exp(-c * r_t * softplus(a_param)), which is the same
    with Lambda = -a_param: log sigma(-z) = -softplus(z).

    segment_pos == 0 marks a document start: there the state resets (a = 0)
    and the input is not scaled by sqrt(1 - a^2), so the first state of a
    document is the gated input itself.

    Shapes: x (B, T, E), segment_pos (B, T), a_param (E,), gate weights
    (H, E/H, E/H) and biases (H, E/H) as in `block_diagonal_linear`. h0 (B, E)
    is the state after the previous chunk, or None for a zero state. The
    outputs are in the dtype of x; the last state is float32 (float64 when x
    is float64). `record` receives "rg_lru.gate_x", "rg_lru.gate_a", "rg_lru.a"
    (before the reset) and "rg_lru.output", each (B, T, E).
    """
    gate_x = sigmoid(block_diagonal_linear(x, input_gate_weight, input_gate_bias))
    gate_a = sigmoid(block_diagonal_linear(x, recurrent_gate_weight, recurrent_gate_bias))
    _record(record, "rg_lru.gate_x", gate_x)
    _record(record, "rg_lru.gate_a", gate_a)

    # Decay per step, in (0, 1): computed in log space for accuracy near 1.
    log_a = -RG_LRU_C * gate_a * softplus(a_param)                      # (B, T, E)
    a = np.exp(log_a)
    _record(record, "rg_lru.a", a)

    # sqrt(1 - a^2) keeps the state's scale bounded; skipped at a document start.
    reset = (segment_pos == 0)[..., None]                               # (B, T, 1)
    multiplier = np.where(reset, 1, np.sqrt(1 - np.exp(2 * log_a)))
    normalized_x = x * gate_x * multiplier.astype(x.dtype)

    a = np.where(reset, 0, a).astype(x.dtype)
    state_dtype = np.float64 if x.dtype == np.float64 else np.float32
    y, h_last = linear_scan(normalized_x, a, h0, state_dtype)
    _record(record, "rg_lru.output", y)
    return y.astype(x.dtype), h_last


# =============================================================================
# Local multi-query attention
# =============================================================================

def apply_rope(x: np.ndarray, positions: np.ndarray,
               max_wavelength: float = 10_000.0) -> np.ndarray:
    """Rotary position embedding on the first half of each head; the second half passes.

    x: (B, T, N, K) with K a multiple of 4; positions: (B, T). Within the
    rotated part of width R = K/2, dimension i pairs with i + R/2 (split halves,
    not interleaved) and turns by the angle positions * max_wavelength^(-2i/R):
    (a, b) becomes (a cos - b sin, b cos + a sin). Returns (B, T, N, K) in the
    dtype of x.
    """
    rotated, passed = np.split(x, 2, axis=-1)                           # (B, T, N, K/2) each
    R = rotated.shape[-1]
    inverse_frequency = 1.0 / max_wavelength ** (2 * np.arange(R // 2) / R)  # (R/2,)
    angle = positions[:, :, None, None] * inverse_frequency             # (B, T, 1, R/2)
    sin = np.sin(angle).astype(x.dtype)
    cos = np.cos(angle).astype(x.dtype)
    first, second = np.split(rotated, 2, axis=-1)                       # (B, T, N, R/2) each
    return np.concatenate(
        [first * cos - second * sin, second * cos + first * sin, passed], axis=-1)


def local_attention(queries: np.ndarray, keys: np.ndarray, values: np.ndarray,
                    key_valid: np.ndarray, query_doc: np.ndarray, key_doc: np.ndarray,
                    window: int) -> np.ndarray:
    """Banded causal multi-query attention over keys that end with the queries' own.

    queries: (B, T, N, K), already rotated; scores are scaled by K^-0.5 here.
    keys, values: (B, S + T, K) with S = window, in time order; the last T
    belong to the T queries, the first S are the S tokens before them (from a
    cache). At the start of a sequence those S rows are still required: fill
    them with anything and mark them invalid in `key_valid` (B, S + T).
    query_doc (B, T), key_doc (B, S + T): document ids, integers that are equal
    exactly for tokens of one document; attention never crosses them.
    `Model.forward` numbers a row's documents by counting segment_pos == 0 from
    the row's start, so left padding gets its own id.

    Query t is at key index S + t and sees key indices t ... S + t: itself and
    the `window` tokens before it, so window + 1 keys (the official window).
    Softmax is in float32 (float64 in float64 mode). Returns (B, T, N, K) in the
    dtype of the queries.
    """
    B, T, N, K = queries.shape
    S = window
    softmax_dtype = np.float64 if queries.dtype == np.float64 else np.float32
    out = np.empty_like(queries)
    for start in range(0, T, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, T)
        q = queries[:, start:stop]                                      # (B, Q, N, K)
        k = keys[:, start:S + stop]                                     # (B, L, K), L = S + Q
        v = values[:, start:S + stop]

        # Query start+j sits at key index S+start+j; within this slice that is S+j,
        # and its window is slice indices j ... S+j.
        query_index = np.arange(stop - start)[:, None] + S              # (Q, 1)
        key_index = np.arange(S + stop - start)[None, :]                # (1, L)
        in_window = (key_index <= query_index) & (key_index >= query_index - S)
        mask = (in_window[None]
                & key_valid[:, None, start:S + stop]
                & (query_doc[:, start:stop, None] == key_doc[:, None, start:S + stop]))

        logits = np.einsum("bqnk,blk->bnql", q, k) * q.dtype.type(K**-0.5)  # (B, N, Q, L)
        logits = np.where(mask[:, None], logits, MASKED_LOGIT).astype(softmax_dtype)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[:, start:stop] = np.einsum("bnql,blk->bqnk", probs.astype(q.dtype), v)
    return out
