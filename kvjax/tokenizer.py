"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library),
chat templates from ``tokenizer_config.json``, and incremental detokenization."""

from __future__ import annotations

import json
import os
from typing import Sequence

import tokenizers


class ChatTemplateError(ValueError):
    """A chat template that is missing or fails to render."""


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with kvjax's conventions.

    ``encode`` applies the tokenizer's own post-processor (so a Llama tokenizer adds its
    BOS token) unless ``add_special_tokens=False``; ``decode`` drops special tokens
    unless ``skip_special_tokens=False``.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict | None = None):
        self._tokenizer = tokenizer
        self._config = config or {}

    @classmethod
    def from_directory(cls, directory: str) -> "Tokenizer | None":
        """The tokenizer of a checkpoint directory, or None when it has no tokenizer.json."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        return cls(tokenizers.Tokenizer.from_file(path), config)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        template = self._config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        return template

    def _special(self, name: str) -> str:
        token = self._config.get(name)
        return token.get("content", "") if isinstance(token, dict) else (token or "")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Renders ``[{"role": ..., "content": ...}, ...]`` with the checkpoint's Jinja template
        (as transformers' ``apply_chat_template(..., tokenize=False)`` does)."""
        check_messages(messages)
        template = self.chat_template
        if not template:
            raise ChatTemplateError("this tokenizer has no chat_template in tokenizer_config.json; "
                                    "chat needs a chat model (or pass plain prompts)")
        import jinja2.sandbox  # only needed for chat

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed to render: {e}") from e


CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Sequence[dict]) -> None:
    """Raises ``ChatTemplateError`` unless ``messages`` is a list of ``{"role", "content"}``
    dicts with a known role and text content (what every chat template expects)."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise ChatTemplateError('messages must be a list of {"role": ..., "content": ...} dicts')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f'message {i} must be a dict with "role" and "content", '
                                    f"got {message!r}")
        if message["role"] not in CHAT_ROLES:
            raise ChatTemplateError(f"message {i} has unknown role {message['role']!r}; "
                                    f"roles are {', '.join(CHAT_ROLES)}")
        if not isinstance(message["content"], str):
            raise ChatTemplateError(f"message {i} content must be text (a str), got "
                                    f"{type(message['content']).__name__}")


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    Byte-level tokens can end in the middle of a multi-byte UTF-8 character; the decoded
    text then ends in U+FFFD and is held back until the next token completes it. Only a
    short window of recent tokens is re-decoded, so the cost per token is constant.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # tokens[prefix:read] decode to text already emitted
        self._read = 0

    def add(self, tokens: Sequence[int]) -> str:
        """Appends tokens and returns the new text they complete (maybe '')."""
        self._tokens.extend(tokens)
        return self._take(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD)."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        emitted = self._tokenizer.decode(self._tokens[self._prefix:self._read])
        text = self._tokenizer.decode(self._tokens[self._prefix:])
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return text[len(emitted):]
