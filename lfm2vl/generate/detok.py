"""Incremental detokenizer for streaming: yields text pieces that never split a UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix yields U+FFFD.
We decode a short window of recent tokens and emit only the new suffix once it no longer ends in U+FFFD (the
prefix/read-offset scheme used by vLLM and transformers' TextStreamer). The window keeps the previously emitted
tokens as context, so tokenizers that strip a leading space when decoding a lone token still stream correctly.
The concatenation of all pieces plus `flush()` equals decoding all tokens at once.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class StreamDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        """tokenizer: anything with decode(ids, skip_special_tokens=...) -> str (tokenizers.Tokenizer or ours)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the decode window (context already emitted)
        self.read_offset = 0  # tokens before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (may be "")."""
        self.tokens.append(int(token_id))
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            piece = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return piece
        return ""

    def flush(self) -> str:
        """The text not yet emitted (an incomplete trailing character comes out as U+FFFD)."""
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new_text[len(prefix_text):]
