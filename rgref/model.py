"""The RecurrentGemma model: residual blocks, the decoding cache and `Model.forward`.

The math of each layer lives in `rgref.layers`; this module wires the layers
together in the order the official `recurrentgemma` Griffin model does:

    x = embed(tokens)                                   # scaled by bf16(sqrt(D))
    for each residual block:
        h = x + temporal_block(rms_norm(x))             # recurrent or local attention
        x = h + mlp_block(rms_norm(h))
    logits = soft_cap(rms_norm(x) @ embedding^T)

Notation (B, T, D, E, H, K, S, V, W) as in `rgref.layers`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable, Mapping

import numpy as np

from rgref import layers
from rgref.config import ATTENTION, RECURRENT, Config
from rgref.dtypes import is_bfloat16, to_compute_dtype
from rgref.names import EMBEDDING, FINAL_NORM, block_prefix, expected_shapes

COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# "numpy" runs rgref.layers as written. "c" runs the linear layers, the RG-LRU gates
# and scan, the Conv1D, local attention and GELU in the compiled kernels
# (rgref.kernels), float32 only. "auto" picks "c" when the kernels are built and the
# compute dtype is float32.
BACKENDS = ("auto", "c", "numpy")
# Rows of a bfloat16 embedding table widened at a time for the output logits,
# so a 256000 x 2560 table never exists as float32 (2.6 GB) all at once.
UNEMBED_ROWS = 16_384


# =============================================================================
# Cache
# =============================================================================

@dataclasses.dataclass
class RecurrentState:
    """Decoding state of a recurrent block."""

    rg_lru_state: np.ndarray   # (B, E) h after the last token, float32 (float64 mode: float64)
    conv1d_state: np.ndarray   # (B, W-1, E) the last W-1 Conv1D inputs, oldest first


@dataclasses.dataclass
class AttentionState:
    """Keys and values of the last S tokens of an attention block, in a ring buffer.

    The token with stream index i (counting every token fed to this cache,
    padding included) lives in slot i % S, so once more than S tokens have been
    seen each new token overwrites the one S steps older: the oldest key a
    query may still attend to is exactly S steps back.
    """

    keys: np.ndarray           # (B, S, K) rotated keys
    values: np.ndarray         # (B, S, K)
    docs: np.ndarray           # (B, S) document id of each slot's token


@dataclasses.dataclass
class Cache:
    """Everything `Model.forward` needs to continue a batch of sequences.

    `forward` updates the cache it is given in place and returns it; call
    `copy()` first to branch a conversation.
    """

    num_tokens: int                # tokens seen per row so far, padding included
    last_segment_pos: np.ndarray   # (B,) segment_pos of the last token (-1 before any)
    num_documents: np.ndarray      # (B,) documents started so far (tokens with segment_pos 0)
    recent_segment_pos: np.ndarray  # (B, W-1) segment_pos of the last W-1 tokens
    blocks: list                   # one RecurrentState or AttentionState per block
    # (B,) rows whose tokens were followed by padding (-1): they take no more tokens.
    # None means no such row.
    ended: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return self.last_segment_pos.shape[0]

    def copy(self) -> "Cache":
        """Return an independent copy (arrays included)."""
        return copy.deepcopy(self)


# =============================================================================
# Model
# =============================================================================

class Model:
    """A RecurrentGemma model: a config plus its parameters under Hugging Face names.

    Parameters may be float32, float64, float16 or bfloat16 (uint16 bits; see
    `rgref.dtypes`) and may be memory-mapped. The NumPy backend widens them to
    the compute dtype (float32 by default, or float64) one weight at a time as
    used; the C backend reads float32 and bfloat16 weights in place.

    backend: "auto" (default), "c" or "numpy", see `BACKENDS`; `forward` can
      override it per call. num_threads: OpenMP threads for the C kernels
      (None: OMP_NUM_THREADS, else one per core); results do not depend on it.
    """

    def __init__(self, config: Config, params: Mapping[str, np.ndarray],
                 dtype=np.float32, backend: str = "auto", num_threads: int | None = None):
        dtype = np.dtype(dtype)
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be float32 or float64, got {dtype}")
        _check_backend(backend)
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.config = config
        self.dtype = dtype
        self.backend = backend
        self.num_threads = num_threads
        # Layout conversions (official names to Hugging Face) leave transposed views;
        # the kernels read rows in place, so those few tensors are copied once here.
        self.params = {name: value if value.flags.c_contiguous else np.ascontiguousarray(value)
                       for name, value in params.items()}
        _check_params(config, self.params)
        # The vectors (norm scales, biases, the RG-LRU parameter) and the Conv1D taps are
        # small and read at every step, so they are widened to the compute dtype once.
        self._widened = {name: to_compute_dtype(value, dtype)
                         for name, value in self.params.items()
                         if value.ndim == 1 or name.endswith("conv_1d.weight")}
        # softplus(a_param) of each RG-LRU layer for the C kernel, computed on first use.
        self._softplus_a: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        c = self.config
        stored = sorted({"bfloat16" if is_bfloat16(value) else str(value.dtype)
                         for value in self.params.values()})
        return (f"Model(width={c.width}, blocks={c.num_blocks}, vocab={c.vocab_size}, "
                f"weights={'/'.join(stored)}, compute={self.dtype})")

    def _kernel_softplus_a(self, prefix: str) -> np.ndarray:
        """Return softplus(a_param) of the RG-LRU in block `prefix`, for the C scan."""
        if prefix not in self._softplus_a:
            from rgref import kernels
            a_param = self._weight(prefix + "rg_lru.recurrent_param")
            self._softplus_a[prefix] = kernels.softplus(
                np.ascontiguousarray(a_param, np.float32))
        return self._softplus_a[prefix]

    def _weight(self, name: str) -> np.ndarray:
        if name in self._widened:
            return self._widened[name]
        return to_compute_dtype(self.params[name], self.dtype)

    # -------------------------------------------------------------- backends

    def resolve_backend(self, backend: str | None = None) -> str:
        """Return "c" or "numpy": the backend a forward call with `backend` runs on."""
        requested = self.backend if backend is None else backend
        _check_backend(requested)
        if requested == "numpy":
            return "numpy"
        if self.dtype != np.float32:
            if requested == "c":
                raise ValueError(f"the C backend computes in float32 but this model's compute "
                                 f"dtype is {self.dtype}; use backend='numpy'")
            return "numpy"
        from rgref import kernels
        if kernels.available():
            return "c"
        if requested == "c":
            raise RuntimeError(f"backend 'c' requested but {kernels.unavailable_reason()}")
        warnings.warn(f"rgref is using its NumPy backend, which is much slower, because "
                      f"{kernels.unavailable_reason()}", RuntimeWarning, stacklevel=3)
        return "numpy"

    def _linear_function(self, backend: str) -> Callable:
        """Return linear(x, weight, bias=None) over raw (possibly bfloat16) parameters."""
        if backend == "numpy":
            def linear(x, weight, bias=None):
                return layers.linear(x, to_compute_dtype(weight, self.dtype),
                                     None if bias is None else to_compute_dtype(bias, self.dtype))
            return linear

        from rgref import kernels

        def linear(x, weight, bias=None):
            # The kernel reads float32 and bfloat16 weights in place; float16 is widened.
            if weight.dtype not in (np.float32, np.uint16):
                weight = to_compute_dtype(weight, np.float32)
            return kernels.linear(np.ascontiguousarray(x, np.float32), weight,
                                  None if bias is None else to_compute_dtype(bias, np.float32))
        return linear

    # ---------------------------------------------------------------- cache

    def init_cache(self, batch_size: int) -> Cache:
        """Return an empty cache for `batch_size` sequences."""
        c = self.config
        state_dtype = self.dtype
        blocks: list = []
        for kind in c.block_types:
            if kind == RECURRENT:
                blocks.append(RecurrentState(
                    rg_lru_state=np.zeros((batch_size, c.lru_width), state_dtype),
                    conv1d_state=np.zeros((batch_size, c.conv1d_width - 1, c.lru_width),
                                          self.dtype)))
            else:
                shape = (batch_size, c.attention_window, c.head_dim)
                blocks.append(AttentionState(
                    keys=np.zeros(shape, self.dtype), values=np.zeros(shape, self.dtype),
                    docs=np.zeros((batch_size, c.attention_window), np.int64)))
        return Cache(
            num_tokens=0,
            last_segment_pos=np.full((batch_size,), -1, np.int64),
            num_documents=np.zeros((batch_size,), np.int64),
            # Before the sequence the Conv1D sees zeros, which need no document mask.
            recent_segment_pos=np.ones((batch_size, c.conv1d_width - 1), np.int64),
            blocks=blocks,
            ended=np.zeros((batch_size,), bool))

    # -------------------------------------------------------------- forward

    def forward(self, tokens, segment_pos=None, cache: Cache | None = None, *,
                return_intermediates: bool = False, backend: str | None = None,
                logits: str = "all"):
        """Run the model over a chunk of tokens for a batch of sequences.

        Args:
          tokens: integer array (B, T) of token ids.
          segment_pos: integer array (B, T): each token's position within its
            document, 0 at a document start, -1 for left padding. Defaults to
            0, 1, ... for a new cache, or continuing each row's last position.
          cache: None to start new sequences, or the cache a previous call
            returned, to continue them with a chunk of any length T >= 1.
          return_intermediates: also return a dict of named activations
            (see `INTERMEDIATE_NAMES`).
          backend: "auto", "c" or "numpy" for this call; None uses the model's.
          logits: "all" for the logits of every position, or "last" for those
            of the last position only, which is all that sampling the next
            token needs. At 2B sizes "last" saves 1 GB per 1000 prompt tokens
            and a quarter of the prompt's compute.

        Returns:
          (logits, cache), or (logits, cache, intermediates): logits (B, T, V),
          or (B, 1, V) for logits="last", in the compute dtype; the cache,
          updated in place when one was given.
        """
        if logits not in LOGITS_CHOICES:
            raise ValueError(f"logits must be one of {LOGITS_CHOICES}, got {logits!r}")
        tokens, segment_pos, ended = self._check_inputs(tokens, segment_pos, cache)
        if cache is None:
            cache = self.init_cache(tokens.shape[0])
        record: dict | None = {} if return_intermediates else None
        c = self.config
        backend = self.resolve_backend(backend)
        if backend == "c" and self.num_threads is not None:
            from rgref import kernels
            kernels.set_num_threads(self.num_threads)
        linear = self._linear_function(backend)

        # Document ids count document starts along each row, continuing the cache's
        # count, so attention never mixes packed documents or padding and text.
        docs = cache.num_documents[:, None] + np.cumsum(segment_pos == 0, axis=1)  # (B, T)

        # Widen only the rows in use: the table may be a bfloat16 memory map.
        ids, index = np.unique(tokens, return_inverse=True)
        rows = to_compute_dtype(self.params[EMBEDDING][ids], self.dtype)
        x = layers.embed(index.reshape(tokens.shape), rows,
                         c.embeddings_scale_by_sqrt_dim)                # (B, T, D)
        _put(record, "embeddings", x)

        for i, kind in enumerate(c.block_types):
            block_record = None if record is None else {}
            x = self._residual_block(i, kind, x, segment_pos, docs, cache, linear, backend,
                                     block_record)
            if record is not None:
                record.update({f"blocks.{i}.{k}": v for k, v in block_record.items()})

        if logits == "last":
            x = x[:, -1:]                                               # (B, 1, D)
        x = self._rms_norm(x, FINAL_NORM, backend)
        _put(record, "final_norm", x)
        output = self._unembed(x, linear, backend)                      # (B, T, V)
        _put(record, "logits_before_soft_cap", output)
        # NOTE: the C path keeps NumPy's soft cap because tests compare the logits
        # bitwise with layers.soft_cap of the recorded uncapped logits. It took 3% of a
        # 128-token prompt at 2B sizes on one thread; rgref.kernels.soft_cap is faster
        # but agrees with it only to 3 ulp of tanh.
        if record is None:
            # In place: at 2B sizes a 512-token prompt has 0.5 GB of logits.
            output = layers.soft_cap(output, c.logits_soft_cap, out=output)
        else:
            output = layers.soft_cap(output, c.logits_soft_cap)

        self._advance_cache(cache, segment_pos, docs, ended)
        if return_intermediates:
            return output, cache, record
        return output, cache

    __call__ = forward

    # ------------------------------------------------------- residual block

    def _rms_norm(self, x: np.ndarray, scale_name: str, backend: str) -> np.ndarray:
        """`layers.rms_norm` with the scale `scale_name`, on the C kernel for backend "c"."""
        eps = self.config.rms_norm_eps
        if backend == "c":
            from rgref import kernels
            return kernels.rms_norm(np.ascontiguousarray(x, np.float32),
                                    self._weight(scale_name), eps)
        return layers.rms_norm(x, self._weight(scale_name), eps)

    def _residual_block(self, i: int, kind: str, x, segment_pos, docs, cache: Cache,
                        linear: Callable, backend: str, record: dict | None) -> np.ndarray:
        """h = x + temporal(rms_norm(x)); out = h + mlp(rms_norm(h))."""
        p = block_prefix(i)
        _put(record, "input", x)

        normed = self._rms_norm(x, p + "temporal_pre_norm.weight", backend)
        _put(record, "temporal_pre_norm", normed)
        if kind == RECURRENT:
            temporal = self._recurrent_block(p + "temporal_block.", normed, segment_pos,
                                             cache, cache.blocks[i], linear, backend, record)
        else:
            temporal = self._attention_block(p + "temporal_block.", normed, segment_pos,
                                             docs, cache, cache.blocks[i], linear, backend,
                                             record)
        _put(record, "temporal_block", temporal)
        h = x + temporal
        _put(record, "residual", h)

        normed = self._rms_norm(h, p + "channel_pre_norm.weight", backend)
        _put(record, "channel_pre_norm", normed)
        m = {name: self._weight(p + "mlp_block." + name) if name.endswith("bias")
             else self.params[p + "mlp_block." + name] for name in (
            "gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias",
            "down_proj.weight", "down_proj.bias")}
        mlp_block = _mlp_block_kernel if backend == "c" else layers.mlp_block
        mlp = mlp_block(
            normed, m["gate_proj.weight"], m["gate_proj.bias"], m["up_proj.weight"],
            m["up_proj.bias"], m["down_proj.weight"], m["down_proj.bias"], record,
            linear=linear)
        _put(record, "mlp_block", mlp)
        out = h + mlp
        _put(record, "output", out)
        return out

    def _recurrent_block(self, p: str, x, segment_pos, cache: Cache, state: RecurrentState,
                         linear: Callable, backend: str, record: dict | None) -> np.ndarray:
        """linear_out(rg_lru(conv1d(linear_x(x))) * gelu(linear_y(x))): (B, T, D) -> same."""
        w = self.params
        y = linear(x, w[p + "linear_y.weight"], self._weight(p + "linear_y.bias"))
        if backend == "c":
            from rgref import kernels
            y = kernels.gelu_tanh(y)
        else:
            y = layers.gelu_tanh(y)
        _put(record, "linear_y", y)                                     # (B, T, E)
        x = linear(x, w[p + "linear_x.weight"], self._weight(p + "linear_x.bias"))  # (B, T, E)
        _put(record, "linear_x", x)

        conv_input = x
        conv_weight = self._weight(p + "conv_1d.weight")               # (E, 1, W)
        if backend == "c":
            from rgref import kernels
            # Bitwise the same as layers.conv1d; the kernel takes the taps as (W, E).
            x = kernels.conv1d(np.ascontiguousarray(x, np.float32), segment_pos,
                               np.ascontiguousarray(conv_weight[:, 0, :].T),
                               self._weight(p + "conv_1d.bias"), state.conv1d_state,
                               cache.recent_segment_pos)
        else:
            x = layers.conv1d(x, segment_pos, conv_weight, self._weight(p + "conv_1d.bias"),
                              state.conv1d_state, cache.recent_segment_pos)
        _put(record, "conv1d", x)

        lru_names = ("recurrent_param", "input_gate_weight", "input_gate_bias",
                     "recurrent_gate_weight", "recurrent_gate_bias")
        if backend == "c":
            # The gate kernels read float32 and bfloat16 weights in place.
            lru = [self._weight(p + "rg_lru." + name) if name.endswith(("bias", "param"))
                   else _kernel_weight(w[p + "rg_lru." + name]) for name in lru_names]
            x = _rg_lru_kernel(x, segment_pos, *lru, self._kernel_softplus_a(p), state,
                               record)
        else:
            lru = [self._weight(p + "rg_lru." + name) for name in lru_names]
            x, state.rg_lru_state = layers.rg_lru(x, segment_pos, *lru,
                                                  h0=state.rg_lru_state, record=record)
        state.conv1d_state = _last_steps(state.conv1d_state, conv_input)

        return linear(x * y, w[p + "linear_out.weight"], self._weight(p + "linear_out.bias"))

    def _attention_block(self, p: str, x, segment_pos, docs, cache: Cache,
                         state: AttentionState, linear: Callable, backend: str,
                         record: dict | None) -> np.ndarray:
        """Local multi-query attention with RoPE: (B, T, D) -> (B, T, D)."""
        c = self.config
        B, T, _ = x.shape
        S, H, K = c.attention_window, c.num_heads, c.head_dim

        w = self.params
        queries = linear(x, w[p + "q_proj.weight"]).reshape(B, T, H, K)
        keys = linear(x, w[p + "k_proj.weight"]).reshape(B, T, 1, K)
        values = linear(x, w[p + "v_proj.weight"])                      # (B, T, K)
        queries = layers.apply_rope(queries, segment_pos, c.rope_max_wavelength)
        keys = layers.apply_rope(keys, segment_pos, c.rope_max_wavelength)[:, :, 0]  # (B, T, K)
        _put(record, "queries", queries)
        _put(record, "keys", keys)
        _put(record, "values", values)

        n = cache.num_tokens
        if backend == "c":
            # The kernel reads the ring buffer in place, without the copies below.
            from rgref import kernels
            encoded = kernels.local_attention(
                np.ascontiguousarray(queries), np.ascontiguousarray(keys),
                np.ascontiguousarray(values), np.ascontiguousarray(docs, np.int64),
                state.keys, state.values, state.docs, n)                # (B, T, H, K)
        else:
            # The S tokens before this chunk, oldest first: stream index n - S + j
            # is in ring slot (n + j) % S, and does not exist when negative.
            order = (n + np.arange(S)) % S
            key_valid = np.concatenate([np.broadcast_to(n - S + np.arange(S) >= 0, (B, S)),
                                        np.ones((B, T), bool)], axis=1)    # (B, S + T)
            all_keys = np.concatenate([state.keys[:, order], keys], axis=1)  # (B, S + T, K)
            all_values = np.concatenate([state.values[:, order], values], axis=1)
            all_docs = np.concatenate([state.docs[:, order], docs], axis=1)
            encoded = layers.local_attention(queries, all_keys, all_values, key_valid, docs,
                                             all_docs, S)                   # (B, T, H, K)
        _put(record, "attention", encoded.reshape(B, T, H * K))

        # Store the last min(T, S) tokens in their ring slots.
        kept = min(T, S)
        slots = (n + T - kept + np.arange(kept)) % S
        state.keys[:, slots] = keys[:, T - kept:]
        state.values[:, slots] = values[:, T - kept:]
        state.docs[:, slots] = docs[:, T - kept:]

        return linear(encoded.reshape(B, T, H * K), w[p + "o_proj.weight"],
                      self._weight(p + "o_proj.bias"))

    # ---------------------------------------------------------------- output

    def _unembed(self, x: np.ndarray, linear: Callable, backend: str) -> np.ndarray:
        table = self.params[EMBEDDING]
        if backend == "c":
            return linear(x, table)          # the tied table is the (V, D) output weight
        if table.dtype == self.dtype:
            return layers.unembed(x, table)
        logits = np.empty(x.shape[:-1] + (table.shape[0],), self.dtype)
        for start in range(0, table.shape[0], UNEMBED_ROWS):
            rows = to_compute_dtype(table[start:start + UNEMBED_ROWS], self.dtype)
            logits[..., start:start + rows.shape[0]] = layers.unembed(x, rows)
        return logits

    # ------------------------------------------------------------ bookkeeping

    def _advance_cache(self, cache: Cache, segment_pos: np.ndarray, docs: np.ndarray,
                       ended: np.ndarray) -> None:
        cache.ended = ended[:, -1].copy()
        cache.num_tokens += segment_pos.shape[1]
        cache.last_segment_pos = segment_pos[:, -1].astype(np.int64)
        cache.num_documents = docs[:, -1].astype(np.int64)
        cache.recent_segment_pos = _last_steps(cache.recent_segment_pos,
                                               segment_pos.astype(np.int64))

    def _check_inputs(self, tokens, segment_pos, cache: Cache | None):
        """Return tokens and segment_pos as int64 (B, T) and their `_ended_rows`, or raise."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an integer array of shape [batch, time], got "
                             f"{tokens.dtype} array of shape {tokens.shape}")
        B, T = tokens.shape
        if B == 0 or T == 0:
            raise ValueError(f"tokens has shape {tokens.shape}: need at least one sequence "
                             "and one token")
        V = self.config.vocab_size
        outside = (tokens < 0) | (tokens >= V)
        if outside.any():
            where = tuple(int(i) for i in np.argwhere(outside)[0])
            raise ValueError(f"token id {int(tokens[where])} at index {list(where)} is outside "
                             f"the vocabulary [0, {V})")
        if cache is not None:
            if not isinstance(cache, Cache):
                raise TypeError(f"cache must be a Cache from init_cache() or an earlier "
                                f"forward call, got {type(cache).__name__}")
            if cache.batch_size != B:
                raise ValueError(f"tokens have batch size {B} but the cache was built for "
                                 f"{cache.batch_size}")
            self._check_cache(cache)

        if segment_pos is None:
            start = np.zeros((B,), np.int64) if cache is None else cache.last_segment_pos + 1
            segment_pos = np.maximum(start, 0)[:, None] + np.arange(T)
        segment_pos = np.asarray(segment_pos)
        if segment_pos.shape != tokens.shape or not np.issubdtype(segment_pos.dtype,
                                                                  np.integer):
            raise ValueError(f"segment_pos must be an integer array shaped like tokens "
                             f"{tokens.shape}, got {segment_pos.dtype} array of shape "
                             f"{segment_pos.shape}")
        if (segment_pos < -1).any():
            where = tuple(int(i) for i in np.argwhere(segment_pos < -1)[0])
            raise ValueError(f"segment_pos {int(segment_pos[where])} at index {list(where)} is "
                             "invalid: positions are >= 0, or -1 for padding")
        # Padding goes before a row's tokens or after them (right padding for scoring).
        # No token may follow padding that followed tokens, in this call or a later one,
        # because the padding would be in its context.
        ended = _ended_rows(segment_pos, cache)
        resumed = (segment_pos >= 0) & ended
        if resumed.any():
            where = [int(i) for i in np.argwhere(resumed)[0]]
            raise ValueError(
                f"segment_pos {int(segment_pos[tuple(where)])} at index {where} comes after "
                f"padding (-1) that follows tokens of row {where[0]}, in this call or an "
                "earlier one: padding may only come before a row's tokens or end the row; "
                "to continue the row, feed it again without the padding")
        return tokens.astype(np.int64), segment_pos.astype(np.int64), ended


    def _check_cache(self, cache: Cache) -> None:
        """Raise ValueError unless `cache` has the shapes and dtypes of this model's caches."""
        c = self.config
        B, W, S, K, E = (cache.batch_size, c.conv1d_width - 1, c.attention_window, c.head_dim,
                         c.lru_width)
        expected = [("last_segment_pos", cache.last_segment_pos, (B,), np.int64),
                    ("num_documents", cache.num_documents, (B,), np.int64),
                    ("recent_segment_pos", cache.recent_segment_pos, (B, W), np.int64)]
        if cache.ended is not None:
            expected.append(("ended", cache.ended, (B,), bool))
        if len(cache.blocks) != c.num_blocks:
            raise ValueError(f"the cache has {len(cache.blocks)} blocks but this model has "
                             f"{c.num_blocks}; build the cache with this model's init_cache() "
                             "or forward()")
        for i, (kind, state) in enumerate(zip(c.block_types, cache.blocks)):
            if kind == RECURRENT and isinstance(state, RecurrentState):
                expected += [(f"blocks[{i}].rg_lru_state", state.rg_lru_state, (B, E),
                              self.dtype),
                             (f"blocks[{i}].conv1d_state", state.conv1d_state, (B, W, E),
                              self.dtype)]
            elif kind == ATTENTION and isinstance(state, AttentionState):
                expected += [(f"blocks[{i}].keys", state.keys, (B, S, K), self.dtype),
                             (f"blocks[{i}].values", state.values, (B, S, K), self.dtype),
                             (f"blocks[{i}].docs", state.docs, (B, S), np.int64)]
            else:
                raise ValueError(f"cache block {i} is of type {type(state).__name__} but "
                                 f"block {i} of this model is {kind}; build the cache with "
                                 "this model's init_cache() or forward()")
        for name, value, shape, dtype in expected:
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(f"cache {name} is a {value.dtype} array of shape "
                                 f"{value.shape}, but this model needs {np.dtype(dtype)} "
                                 f"{shape}: the cache comes from a model with another "
                                 "config or compute dtype; build it with this model's "
                                 "init_cache() or forward()")
            # The block states are written in place, and the kernels read them as
            # contiguous buffers.
            if name.startswith("blocks[") and not (value.flags.writeable
                                                   and value.flags.c_contiguous):
                problem = "read-only" if not value.flags.writeable else "not C-contiguous"
                raise ValueError(f"cache {name} is {problem} (a broadcast or a strided "
                                 "view?), but forward updates it in place; give the cache "
                                 "a copy of it made with np.array()")


# Values of forward's `logits` argument.
LOGITS_CHOICES = ("all", "last")

# Names `forward(..., return_intermediates=True)` returns, per block i as
# "blocks.{i}.<name>" and once for the whole model.
INTERMEDIATE_NAMES = {
    "model": ("embeddings", "final_norm", "logits_before_soft_cap"),
    "block": ("input", "temporal_pre_norm", "temporal_block", "residual",
              "channel_pre_norm", "mlp.hidden", "mlp_block", "output"),
    RECURRENT: ("linear_y", "linear_x", "conv1d", "rg_lru.gate_x", "rg_lru.gate_a",
                "rg_lru.a", "rg_lru.output"),
    ATTENTION: ("queries", "keys", "values", "attention"),
}


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _rg_lru_kernel(x, segment_pos, a_param, input_gate_weight, input_gate_bias,
                   recurrent_gate_weight, recurrent_gate_bias, softplus_a: np.ndarray,
                   state: RecurrentState, record: dict | None) -> np.ndarray:
    """`layers.rg_lru` on the C kernels: the gate projections, then the gates, decay and
    scan fused in one kernel. Weights may be float32 or bfloat16 bits."""
    from rgref import kernels

    x = np.ascontiguousarray(x, np.float32)
    gate_x_pre = kernels.block_diagonal_linear(x, input_gate_weight, input_gate_bias)
    gate_a_pre = kernels.block_diagonal_linear(x, recurrent_gate_weight, recurrent_gate_bias)
    a_param = to_compute_dtype(a_param, np.float32)
    if record is not None:
        gate_a = layers.sigmoid(gate_a_pre)
        record["rg_lru.gate_x"] = layers.sigmoid(gate_x_pre)
        record["rg_lru.gate_a"] = gate_a
        record["rg_lru.a"] = np.exp(-layers.RG_LRU_C * gate_a * layers.softplus(a_param))
    # The kernel updates the state in place; the cache owns this array.
    y = kernels.rg_lru_scan(x, gate_x_pre, gate_a_pre, np.ascontiguousarray(a_param),
                            segment_pos.astype(np.int32), state.rg_lru_state,
                            softplus_a=softplus_a)
    _put(record, "rg_lru.output", y)
    return y


def _mlp_block_kernel(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias,
                      record: dict | None, linear: Callable) -> np.ndarray:
    """`layers.mlp_block` with gelu(gate) * up in one C kernel pass: (B, T, D) -> same."""
    from rgref import kernels

    gate = linear(x, gate_weight, gate_bias)                            # (B, T, M)
    up = linear(x, up_weight, up_bias)                                  # (B, T, M)
    hidden = kernels.gelu_tanh(gate, up)
    _put(record, "mlp.hidden", hidden)
    return linear(hidden, down_weight, down_bias)                       # (B, T, D)


def _kernel_weight(weight: np.ndarray) -> np.ndarray:
    """Return `weight` unchanged if float32 or bfloat16 bits, which the kernels read, else
    as float32."""
    if weight.dtype in (np.float32, np.uint16):
        return weight
    return to_compute_dtype(weight, np.float32)


def _ended_rows(segment_pos: np.ndarray, cache: Cache | None) -> np.ndarray:
    """Return (B, T): whether padding after the row's tokens came at or before each step."""
    started = np.logical_or.accumulate(segment_pos >= 0, axis=1)
    ended = np.zeros(segment_pos.shape[0], bool)
    if cache is not None:
        started |= (cache.last_segment_pos >= 0)[:, None]
        if cache.ended is not None:
            ended = cache.ended
    trailing_padding = (segment_pos == -1) & started
    return np.logical_or.accumulate(trailing_padding, axis=1) | ended[:, None]


def _put(record: dict | None, name: str, value: np.ndarray) -> None:
    if record is not None:
        record[name] = value


def _last_steps(history: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The last `history.shape[1]` steps of history followed by new, along axis 1."""
    keep = history.shape[1]
    return np.concatenate([history, new.astype(history.dtype)], axis=1)[:, -keep:].copy()


def _check_params(config: Config, params: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError naming each missing, unexpected or misshapen tensor."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in params]
    unexpected = [n for n in params if n not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}"
                        + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for name, shape in expected.items():
        if name in params and tuple(params[name].shape) != shape:
            problems.append(f"tensor {name} has shape {tuple(params[name].shape)}, "
                            f"expected {shape}")
    for name, value in params.items():
        if name in expected and not (is_bfloat16(value) or value.dtype in (
                np.float16, np.float32, np.float64)):
            problems.append(f"tensor {name} has dtype {value.dtype}, expected a float type")
    if problems:
        raise ValueError("parameters do not match the config: " + "; ".join(problems))
