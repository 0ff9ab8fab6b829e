"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

from __future__ import annotations

import os

import tokenizers


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with kvjax's conventions.

    ``encode`` applies the tokenizer's own post-processor (so a Llama tokenizer adds its
    BOS token); ``decode`` drops special tokens.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def from_directory(cls, directory: str) -> "Tokenizer | None":
        """The tokenizer of a checkpoint directory, or None when it has no tokenizer.json."""
        path = os.path.join(directory, "tokenizer.json")
        return cls(tokenizers.Tokenizer.from_file(path)) if os.path.isfile(path) else None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)
