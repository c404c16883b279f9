"""Incremental detokenization and stop strings.

Text is released only in whole characters: a token that ends inside a UTF-8
sequence (decoded as U+FFFD) is held until the next token completes it. With
stop strings, the last ``max_stop_len - 1`` characters are held back too, so a
stop string split across tokens never reaches the client.
"""

from __future__ import annotations

try:  # tokenizers >= 0.21: incremental decoding in Rust, about 6x cheaper per token
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None

CONTEXT_TOKENS = 5  # prompt tokens decoded alongside, so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        # Fast tokenizers stream in Rust; others re-decode a short window of ids per token.
        self.backend = getattr(tokenizer, "_tokenizer", None)
        self.stream = None
        if DecodeStream is not None and self.backend is not None:
            self.stream = DecodeStream(ids=list(prompt_ids[-CONTEXT_TOKENS:]), skip_special_tokens=True)
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far (stop string cut off once found)
        self.emitted = 0  # characters of text already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        """Appends a token; returns True when a stop string has been reached."""
        delta = self._next_text(token_id)
        if not delta:
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        hits = [at for s in self.stop if (at := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def _next_text(self, token_id: int) -> str | None:
        if self.stream is not None:
            return self.stream.step(self.backend, token_id)
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def take(self, final: bool) -> str:
        """Text not yet released; all of it when ``final``."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
