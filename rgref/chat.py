"""A multi-turn chat that keeps the model state between turns.

Each turn feeds only its new tokens: the recurrent state and the attention
window in the cache already summarise the conversation so far, so a turn costs
the same however long the conversation has become. The tokens fed over all
turns (`fed_tokens`) are the chat format of the conversation with each reply
kept as the ids that were sampled, so a turn gives the same reply as running
all of those tokens from scratch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rgref.model import Cache, Model
from rgref.sampling import Generation, SamplingParams, continue_generation, make_rngs
from rgref.tokenizer import MODEL, USER, Tokenizer


class ChatSession:
    """A conversation with one model; `send` one user message at a time."""

    def __init__(self, model: Model, tokenizer: Tokenizer,
                 sampling: SamplingParams = SamplingParams(), seed: int | None = None):
        tokenizer._require_chat()
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.rngs = make_rngs(1, seed)
        self.cache: Cache | None = None
        self.turns: list[tuple[str, str]] = []
        self.fed_tokens: list[int] = []   # every token fed so far, in order
        # Tokens decided but not fed yet: BOS before the first turn, then the
        # end of the model's last turn.
        self._pending = [tokenizer.bos_id]

    def send(self, text: str, max_new_tokens: int,
             on_token: Callable[[int], None] | None = None) -> Generation:
        """Add a user turn, generate the model's reply, and return it.

        on_token(id) is called for each reply token as it is sampled.
        """
        tok = self.tokenizer
        new = self._pending + tok.encode_turn(USER, text) + tok.encode_model_start()
        logits, self.cache = self.model.forward(np.asarray([new]), cache=self.cache,
                                                logits="last")
        self.fed_tokens += new

        def on_step(ids: np.ndarray, active: np.ndarray) -> None:
            if on_token is not None and active[0] and int(ids[0]) not in stop_ids:
                on_token(int(ids[0]))

        stop_ids = (tok.end_of_turn_id, tok.eos_id)
        reply = continue_generation(self.model, self.cache, logits[:, -1], max_new_tokens,
                                    sampling=self.sampling, stop_ids=stop_ids, rngs=self.rngs,
                                    pad_id=tok.pad_id, on_step=on_step)
        self.cache = reply.cache
        ids = reply.tokens[0]
        # A reply that hit max_new_tokens ends with a sampled token not fed yet; a
        # reply that stopped was fed whole and its stop token is dropped. Either
        # way the turn is closed with <end_of_turn> and a newline, fed next time.
        if reply.stop_reasons[0] == "length":
            self.fed_tokens += ids[:-1]
            self._pending = ids[-1:] + [tok.end_of_turn_id] + tok.encode("\n")
        else:
            self.fed_tokens += ids
            self._pending = [tok.end_of_turn_id] + tok.encode("\n")
        self.turns += [(USER, text), (MODEL, tok.decode(ids))]
        return reply
