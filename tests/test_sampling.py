"""Sampling modes and generation through the cache, on a random model."""

import numpy as np
import pytest

from rgref.config import Config
from rgref.random_model import random_model
from rgref.sampling import SamplingParams, generate, make_rngs, pad_prompts, sample

CONFIG = Config(vocab_size=40, width=16, mlp_width=32, num_heads=2, lru_width=16,
                block_types=("recurrent", "recurrent", "attention"), attention_window=6)
MODEL = random_model(CONFIG, seed=5)
PROMPTS = [[2, 7, 9, 11, 3, 5, 8], [2, 30], [2, 12, 13, 14, 15]]


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(4, 40))
    np.testing.assert_array_equal(sample(logits, SamplingParams(), make_rngs(4, 0)),
                                  logits.argmax(-1))


def test_top_k_one_is_greedy():
    logits = np.random.default_rng(1).normal(size=(3, 40))
    ids = sample(logits, SamplingParams(temperature=1.5, top_k=1), make_rngs(3, 0))
    np.testing.assert_array_equal(ids, logits.argmax(-1))


def test_top_k_restricts_choices():
    logits = np.random.default_rng(2).normal(size=(1, 40))
    top3 = set(np.argsort(-logits[0])[:3])
    rngs = make_rngs(1, 0)
    drawn = {int(sample(logits, SamplingParams(temperature=5.0, top_k=3), rngs)[0])
             for _ in range(300)}
    assert drawn <= top3
    assert len(drawn) == 3


def test_top_p_restricts_choices():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two.
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rngs = make_rngs(1, 0)
    drawn = [int(sample(logits, SamplingParams(temperature=1.0, top_p=0.75), rngs)[0])
             for _ in range(2000)]
    assert set(drawn) == {0, 1}
    # Renormalised: 0.5 / 0.8 = 0.625 of the draws pick token 0.
    assert abs(drawn.count(0) / len(drawn) - 0.625) < 0.05


def test_temperature_sampling_matches_softmax():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    rngs = make_rngs(1, 3)
    drawn = [int(sample(logits, SamplingParams(temperature=1.0), rngs)[0]) for _ in range(4000)]
    frequencies = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(frequencies, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("params, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_invalid_sampling_params(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_seed_makes_sampling_reproducible():
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    first = generate(MODEL, PROMPTS[:1], 12, sampling=params, seed=42).tokens
    second = generate(MODEL, PROMPTS[:1], 12, sampling=params, seed=42).tokens
    other = generate(MODEL, PROMPTS[:1], 12, sampling=params, seed=43).tokens
    assert first == second
    assert first != other


def test_generation_equals_rerunning_the_prompt():
    """Each step's token is the greedy pick of a full forward over all tokens so far."""
    result = generate(MODEL, PROMPTS[:1], 15)
    tokens = list(PROMPTS[0])
    for token in result.tokens[0]:
        logits, _ = MODEL.forward(np.asarray([tokens]))
        assert int(logits[0, -1].argmax()) == token
        tokens.append(token)


@pytest.mark.parametrize("params", [SamplingParams(),
                                    SamplingParams(temperature=0.9, top_k=10, top_p=0.9)])
def test_batch_equals_prompts_alone(params):
    batch = generate(MODEL, PROMPTS, 10, sampling=params, seed=7)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(MODEL, [prompt], 10, sampling=params, seed=7)
        assert batch.tokens[row] == alone.tokens[0], f"prompt {row}"


def test_stops_at_stop_token():
    free = generate(MODEL, PROMPTS[:1], 10).tokens[0]
    stop = free[4]
    first_stop = free.index(stop)
    result = generate(MODEL, PROMPTS[:1], 10, stop_ids=[stop])
    assert result.tokens[0] == free[:first_stop]
    assert result.stop_reasons == ["stop"]
    assert generate(MODEL, PROMPTS[:1], 10).stop_reasons == ["length"]


def test_batch_rows_stop_independently():
    free = generate(MODEL, PROMPTS, 8).tokens
    stop = free[1][2]
    result = generate(MODEL, PROMPTS, 8, stop_ids=[stop])
    for row in range(len(PROMPTS)):
        expected = free[row][:free[row].index(stop)] if stop in free[row] else free[row]
        assert result.tokens[row] == expected


def test_max_new_tokens():
    assert len(generate(MODEL, PROMPTS[:1], 3).tokens[0]) == 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(MODEL, PROMPTS[:1], 0)


def test_pad_prompts():
    tokens, segment_pos = pad_prompts([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(segment_pos, [[0, 1, 2], [-1, -1, 0]])
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1], []], pad_id=0)


def test_prompt_runs_once():
    """Decoding feeds one token per call after a single prefill call."""
    calls = []
    original = MODEL.forward

    def counting_forward(tokens, *args, **kwargs):
        calls.append(np.asarray(tokens).shape)
        return original(tokens, *args, **kwargs)

    MODEL.forward = counting_forward
    try:
        generate(MODEL, PROMPTS, 5)
    finally:
        del MODEL.forward
    assert calls[0] == (3, 7)
    assert calls[1:] == [(3, 1)] * 4
