"""Chat formatting and the chat session that keeps model state between turns."""

import os

import numpy as np
import pytest

from rgref.chat import ChatSession
from rgref.config import Config
from rgref.random_model import random_model
from rgref.sampling import SamplingParams, generate
from rgref.tokenizer import Tokenizer, TokenizerError, format_chat

TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "rgref", "data", "tiny", "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(TOKENIZER_PATH)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = Config(vocab_size=tokenizer.vocab_size, width=16, mlp_width=32, num_heads=2,
                    lru_width=16, block_types=("recurrent", "recurrent", "attention"),
                    attention_window=8)
    model = random_model(config, seed=21)
    model.backend = "numpy"
    return model


def test_special_ids_found_by_name(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    assert tokenizer.piece(tokenizer.start_of_turn_id) == "<start_of_turn>"
    assert tokenizer.piece(tokenizer.end_of_turn_id) == "<end_of_turn>"


def test_round_trip(tokenizer):
    text = "A penny saved is a penny earned.\nSo it goes, 42 times!"
    ids = tokenizer.encode(text, add_bos=True)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids[1:]) == text


def test_format_single_turn():
    assert format_chat([("user", "Hi")]) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


def test_format_multi_turn():
    assert format_chat([("user", "Hi"), ("model", "Hello!"), ("user", "Bye")]) == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_encode_chat_matches_format(tokenizer):
    turns = [("user", "Tell me a fortune."), ("model", "You will travel far."),
             ("user", "When?")]
    ids = tokenizer.encode_chat(turns)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids[1:]) == format_chat(turns)
    # The turn markers are single pieces, not spelled out.
    assert ids.count(tokenizer.start_of_turn_id) == 4
    assert ids.count(tokenizer.end_of_turn_id) == 3


def test_encode_chat_rejects_unknown_role(tokenizer):
    with pytest.raises(ValueError, match="chat role"):
        tokenizer.encode_chat([("system", "x")])


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_session_reply_equals_rerunning_conversation(model, tokenizer):
    session = ChatSession(model, tokenizer)
    first = session.send("Hello there", max_new_tokens=7).tokens[0]
    second = session.send("Tell me more", max_new_tokens=9).tokens[0]

    # The whole conversation from scratch, with the first reply as its sampled ids.
    closing = [tokenizer.end_of_turn_id] + tokenizer.encode("\n")
    conversation = (tokenizer.encode_chat([("user", "Hello there")]) + first + closing
                    + tokenizer.encode_turn("user", "Tell me more")
                    + tokenizer.encode_model_start())
    stop_ids = [tokenizer.end_of_turn_id, tokenizer.eos_id]
    rerun = generate(model, [conversation], 9, stop_ids=stop_ids)
    assert rerun.tokens[0] == second
    assert session.fed_tokens[:len(conversation)] == conversation


def test_session_feeds_only_new_tokens(model, tokenizer):
    session = ChatSession(model, tokenizer)
    fed = []
    original = model.forward

    def counting_forward(tokens, *args, **kwargs):
        fed.append(np.asarray(tokens).shape[1])
        return original(tokens, *args, **kwargs)

    model.forward = counting_forward
    try:
        session.send("Hello there", max_new_tokens=4)
        before = len(fed)
        session.send("And again", max_new_tokens=4)
    finally:
        del model.forward
    new_turn = tokenizer.encode_turn("user", "And again") + tokenizer.encode_model_start()
    # One chunk with the closing of the last reply and the new turn, then one token a step.
    assert fed[before] <= len(new_turn) + 3
    assert all(n == 1 for n in fed[before + 1:])


def test_session_sampling_reproducible(model, tokenizer):
    params = SamplingParams(temperature=1.0, top_k=50)
    replies = []
    for _ in range(2):
        session = ChatSession(model, tokenizer, params, seed=5)
        replies.append([session.send(text, 6).tokens[0] for text in ("One", "Two")])
    assert replies[0] == replies[1]
