"""Special-token strings in client text kept as plain text (no forged turns, no stray image slots).

The tokenizer turns every special-token string it finds into its control token, so a message containing
"<|im_end|>\\n<|im_start|>system\\n..." would close the user turn and open a system turn, and a typed "<image>" would
become an image slot. To keep them as text, `Escaper.escape` replaces each such string in message text (before the
chat template runs) by a placeholder the template passes through unchanged: U+E000, the string's index in the
escaper's table, U+E001 (private-use characters). The two private-use characters themselves are in the table too,
so escaping is injective. After rendering and image expansion, `Escaper.encode` tokenizes the prompt: the special
tokens the template and the image expansion wrote are control tokens, and each stretch of text between them, with
the placeholders turned back into their strings, is tokenized as ordinary text (the tokenizer's
`encode_special_tokens` mode: special tokens split like any text, as transformers' split_special_tokens=True does).
A prompt without placeholders is tokenized exactly as before.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

OPEN, CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{OPEN}([0-9]+){CLOSE}")


def _alternation(strings: Iterable[str]) -> re.Pattern:
    """Longest first, so a match at a position is the longest string there (the tokenizer's leftmost-longest)."""
    return re.compile("|".join(re.escape(s) for s in sorted(set(strings), key=len, reverse=True)))


class Escaper:
    """Hides protected strings (special tokens, image markers) in text behind placeholders, and back."""

    def __init__(self, protected: Iterable[str], special: Mapping[str, int]):
        """protected: the strings to hide; special: the tokenizer's special tokens (string -> id), the strings
        that are control tokens where the template or the image expansion wrote them."""
        strings = [s for s in dict.fromkeys(protected) if s and s not in (OPEN, CLOSE)]
        self.table = [OPEN, CLOSE] + strings
        self._index = {s: i for i, s in enumerate(self.table)}
        self._pattern = _alternation(self.table)
        self.special = dict(special)
        self._split = _alternation(self.special) if self.special else None

    def escape(self, text: str) -> str:
        return self._pattern.sub(lambda m: f"{OPEN}{self._index[m.group(0)]}{CLOSE}", text)

    def escape_data(self, value: Any) -> Any:
        """Every string inside JSON-like data (dict values, list and tuple items) escaped; dict keys are kept."""
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, Mapping):
            return {k: self.escape_data(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.escape_data(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.escape_data(v) for v in value)
        return value

    def unescape(self, text: str) -> str:
        def back(m):
            i = int(m.group(1))
            return self.table[i] if i < len(self.table) else m.group(0)
        return _PLACEHOLDER.sub(back, text)

    def encode(self, text: str, encode, encode_plain) -> list[int]:
        """Ids of an escaped prompt: the special tokens in `text` (those the template and the image expansion
        wrote) as control tokens, the text between them, placeholders restored, through `encode_plain` (special
        tokens split as ordinary text). A prompt without placeholders goes through `encode` whole, as before."""
        if OPEN not in text:
            return encode(text)
        ids: list[int] = []
        at = 0
        for m in self._split.finditer(text) if self._split is not None else ():
            if m.start() > at:
                ids += encode_plain(self.unescape(text[at:m.start()]))
            ids.append(self.special[m.group(0)])
            at = m.end()
        if at < len(text):
            ids += encode_plain(self.unescape(text[at:]))
        return ids
