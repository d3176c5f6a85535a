"""Stop strings for streaming output: the stop text is not emitted, and a possible partial match is held back.

`feed(piece)` returns the text that is safe to show now and whether a stop string was completed. Text that could
be the start of a stop string stays buffered until the next piece decides it. Since everything emitted was
proven not to start a stop string, matches are searched only in the buffer.
"""
from __future__ import annotations

from ..processor.messages import check_text


def check_stops(stops) -> list[str]:
    """The `stop` option (None, a string or a list or tuple of strings) -> the list of stop strings; each must be a
    non-empty string of valid Unicode. A ValueError naming the value otherwise."""
    if stops is None:
        return []
    listed = [stops] if isinstance(stops, str) else stops
    if not isinstance(listed, (list, tuple)):
        raise ValueError(f"stop={stops!r:.80} is invalid; expected a string or a list of strings")
    for k, s in enumerate(listed):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings; got {s!r:.80}")
        check_text(s, "stop" if isinstance(stops, str) else f"stop[{k}]")
    return list(listed)


class StopMatcher:
    def __init__(self, stops: str | list[str] | tuple[str, ...] | None):
        self.stops = check_stops(stops)
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a text piece; return (text to emit, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return out, True
        hold = self._partial_len(self.buffer)
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return out, False

    def flush(self) -> str:
        """Generation ended without a stop: release the held-back text."""
        out, self.buffer = self.buffer, ""
        return "" if self.stopped else out

    def _partial_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = min(len(text), max(len(s) for s in self.stops) - 1)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
