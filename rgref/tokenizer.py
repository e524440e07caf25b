"""The Gemma SentencePiece tokenizer and the instruction-tuned chat format.

Special ids are looked up by piece name, never hard-coded: Gemma's
tokenizer has `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, and the turn markers
`<start_of_turn>` / `<end_of_turn>` as single pieces.

Chat format (one turn; earlier model turns are closed the same way):

    <start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
USER = "user"
MODEL = "model"


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable or lacks a required piece."""


class Tokenizer:
    """A SentencePiece model with the ids of Gemma's special pieces."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece  # Imported here so `import rgref` stays light.

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path} not found; RecurrentGemma checkpoints "
                                 "ship it as tokenizer.model (pass --tokenizer PATH)")
        self.path = path
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a valid SentencePiece model: {e}") from None
        self.pad_id = self._require("<pad>")
        self.eos_id = self._require("<eos>")
        self.bos_id = self._require("<bos>")
        self.start_of_turn_id = self._optional(START_OF_TURN)
        self.end_of_turn_id = self._optional(END_OF_TURN)

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    @property
    def has_chat_pieces(self) -> bool:
        return self.start_of_turn_id is not None and self.end_of_turn_id is not None

    def _optional(self, piece: str) -> int | None:
        piece_id = self.processor.PieceToId(piece)
        return piece_id if self.processor.IdToPiece(piece_id) == piece else None

    def _require(self, piece: str) -> int:
        piece_id = self._optional(piece)
        if piece_id is None:
            raise TokenizerError(f"tokenizer {self.path} has no {piece} piece; is it a Gemma "
                                 "tokenizer?")
        return piece_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.processor.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; ids past the tokenizer's pieces decode as `<unk>`.

        A model's embedding may have more rows than its tokenizer has pieces,
        so sampling can produce such ids.
        """
        size = self.vocab_size
        unk = self.processor.unk_id()
        return self.processor.DecodeIds([int(i) if 0 <= int(i) < size else unk for i in ids])

    def piece(self, token_id: int) -> str:
        return self.processor.IdToPiece(int(token_id))

    # ------------------------------------------------------------------ chat

    def _require_chat(self) -> None:
        if not self.has_chat_pieces:
            raise TokenizerError(f"tokenizer {self.path} has no {START_OF_TURN}/{END_OF_TURN} "
                                 "pieces, so it cannot format a chat; run without --chat")

    def encode_turn(self, role: str, text: str) -> list[int]:
        """Tokens of one closed turn: `<start_of_turn>{role}\\n{text}<end_of_turn>\\n`."""
        self._require_chat()
        return self.encode(f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n")

    def encode_model_start(self) -> list[int]:
        """Tokens that open the model's turn: `<start_of_turn>model\\n`."""
        self._require_chat()
        return self.encode(f"{START_OF_TURN}{MODEL}\n")

    def encode_chat(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """Tokens of a conversation ending with the opened model turn, BOS first.

        turns: (role, text) pairs, role "user" or "model", in order; the last
        one is normally the user's.
        """
        ids = [self.bos_id]
        for role, text in turns:
            if role not in (USER, MODEL):
                raise ValueError(f"chat role must be {USER!r} or {MODEL!r}, got {role!r}")
            ids += self.encode_turn(role, text)
        return ids + self.encode_model_start()


def format_chat(turns: Sequence[tuple[str, str]]) -> str:
    """Return the chat prompt text for (role, text) turns, ending with the opened model turn."""
    parts = [f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n" for role, text in turns]
    return "".join(parts) + f"{START_OF_TURN}{MODEL}\n"
