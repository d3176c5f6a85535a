"""Stream: the text pieces of one request on a BatchGenerator, as an iterator (Engine.stream, Chat.stream)."""
from __future__ import annotations

from typing import Callable, Iterator

from .batch import BatchGenerator
from .request import Event, Request, Result


class Stream:
    """Iterates the text pieces of one request on a BatchGenerator; cancels it if abandoned early (closed, or an
    exception such as Ctrl-C's KeyboardInterrupt). on_done(result) runs when it finishes; on_stop(text so far)
    when it is cancelled after it started. A request that fails (its constraint reaches a dead end) raises
    ValueError once its text was yielded."""

    def __init__(self, gen: BatchGenerator, req: Request, on_done: Callable[[Result], None] | None = None,
                 on_stop: Callable[[str], None] | None = None):
        self.gen, self.req, self.on_done, self.on_stop = gen, req, on_done, on_stop
        self.result: Result | None = None
        self.events: list[Event] = []

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return "".join(ev.text for ev in self.events)

    def __iter__(self) -> Iterator[str]:
        with self.gen.lock:  # no run() of another thread finishes the request before its events are kept
            rid = self.gen.add(self.req)
            events = self.gen.follow(rid)
        try:
            for ev in events:
                self.events.append(ev)
                if ev.result is not None:
                    self.result = ev.result
                if ev.text:
                    yield ev.text
        finally:
            if self.result is None:
                self.gen.cancel(rid)
                if self.on_stop is not None:
                    self.on_stop(self.text)
        if self.result is not None:
            self.result.checked()  # a failed request (a constraint's dead end) raises; on_done does not run
        if self.on_done is not None:
            self.on_done(self.result)
