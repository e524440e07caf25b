"""Token sampling and generation with the decoding cache.

The prompt runs through the model once; then each new token is fed alone
through the cache, never re-running the prompt. Prompts of different lengths
share a batch with left padding (pad token, segment_pos -1), as the official
sampler does; padding never affects the real tokens' logits.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from rgref.model import Cache, Model


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    temperature: 0 picks the most likely token (greedy); otherwise logits are
      divided by it before sampling. top_k: keep only the k most likely tokens
      (None or 0 keeps all). top_p: keep the smallest set of most likely tokens
      whose probabilities sum to at least top_p (1.0 keeps all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: np.ndarray, params: SamplingParams,
           rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Pick one token per row: logits (B, V) -> ids (B,), row i drawing from rngs[i]."""
    if params.greedy:
        return np.argmax(logits, axis=-1)
    ids = np.empty(logits.shape[0], dtype=np.int64)
    for row, rng in zip(range(logits.shape[0]), rngs):
        scaled = logits[row].astype(np.float64) / params.temperature
        order = np.argsort(-scaled, kind="stable")                      # most likely first
        if params.top_k:
            order = order[:params.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if params.top_p < 1:
            # Keep tokens until the ones before them already reach top_p.
            keep = np.cumsum(probs) - probs < params.top_p
            order, probs = order[keep], probs[keep] / probs[keep].sum()
        ids[row] = order[rng.choice(len(order), p=probs)]
    return ids


@dataclasses.dataclass
class Generation:
    """The tokens generated for each prompt and how long it took."""

    tokens: list[list[int]]         # new tokens per prompt, the stop token excluded
    stop_reasons: list[str]         # "stop" (a stop token) or "length" (max_new_tokens)
    prompt_tokens: int = 0          # real prompt tokens processed, padding excluded
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache: Cache | None = None      # the cache after the last fed token
    last_tokens: np.ndarray | None = None  # (B,) last sampled token, not yet fed


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to one length: tokens (B, T) and segment_pos (B, T), -1 at padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, dtype=np.int64)
    segment_pos = np.full((len(prompts), length), -1, dtype=np.int64)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        segment_pos[row, length - len(prompt):] = np.arange(len(prompt))
    return tokens, segment_pos


def make_rngs(batch_size: int, seed: int | None) -> list[np.random.Generator]:
    """One generator per row, all from the same seed, so a prompt samples the same
    tokens whether it runs alone or in any row of a batch."""
    return [np.random.default_rng(seed) for _ in range(batch_size)]


def generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
             seed: int | None = None, pad_id: int = 0,
             on_step: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt.

    on_step(ids, active) is called after each sampling step with the ids
    sampled for every row (B,) and which rows were still generating.
    """
    tokens, segment_pos = pad_prompts(prompts, pad_id)
    start = time.perf_counter()
    logits, cache = model.forward(tokens, segment_pos=segment_pos, logits="last")
    prefill_seconds = time.perf_counter() - start
    result = continue_generation(model, cache, logits[:, -1], max_new_tokens,
                                 sampling=sampling, stop_ids=stop_ids,
                                 rngs=make_rngs(len(prompts), seed), pad_id=pad_id,
                                 on_step=on_step)
    result.prompt_tokens = sum(len(p) for p in prompts)
    result.prefill_seconds = prefill_seconds
    return result


def continue_generation(model: Model, cache: Cache, logits: np.ndarray, max_new_tokens: int,
                        *, sampling: SamplingParams, stop_ids: Sequence[int],
                        rngs: Sequence[np.random.Generator], pad_id: int = 0,
                        on_step: Callable[[np.ndarray, np.ndarray], None] | None = None
                        ) -> Generation:
    """Sample from `logits` (B, V), the model's output for the last fed tokens, onward.

    Each sampled token is fed through the cache before the next is sampled,
    except the last one, which `Generation.last_tokens` returns unfed.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = logits.shape[0]
    stop = np.asarray(list(stop_ids), dtype=np.int64)
    active = np.ones(batch, dtype=bool)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    start = time.perf_counter()
    for step in range(max_new_tokens):
        ids = sample(logits, sampling, rngs)
        ids = np.where(active, ids, pad_id)
        stopped = active & np.isin(ids, stop)
        for row in np.flatnonzero(active & ~stopped):
            new_tokens[row].append(int(ids[row]))
        for row in np.flatnonzero(stopped):
            reasons[row] = "stop"
        if on_step is not None:
            on_step(ids, active.copy())
        active &= ~stopped
        if not active.any() or step == max_new_tokens - 1:
            break
        # Every row advances one position, finished rows on padding that nobody reads.
        logits, cache = model.forward(ids[:, None], cache=cache)
        logits = logits[:, -1]
    return Generation(tokens=new_tokens, stop_reasons=reasons,
                      decode_seconds=time.perf_counter() - start, cache=cache,
                      last_tokens=ids)
