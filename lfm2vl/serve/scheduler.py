"""The scheduler: one thread owns the model and its BatchGenerator (continuous batching).

HTTP handlers never touch the model. They submit prepared requests and read events from a per-request asyncio
queue. The thread loops: take new requests and cancellations from its inbox, then run one `BatchGenerator.step()`
(which prefills a chunk of waiting requests into free rows and runs one batched decode step over the running rows),
then hand each event to its request's queue on the event loop. Requests therefore join and leave the batch between
decode steps; a cancelled request (client gone) frees its row at the next step. After half a second with nothing
to do, the thread returns the heap memory that the finished requests freed (their images, pixel tensors and
activations) to the OS, so the server's resident memory falls back near its idle level after a large request.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from lfm2vl.generate.options import MAX_BATCH, PREFILL_CHUNK

if TYPE_CHECKING:  # annotations only: the caller brings the engine, whose modules load with the model
    from lfm2vl.engine import Engine
    from lfm2vl.generate.batch import BatchGenerator
    from lfm2vl.generate.request import Event, Request

log = logging.getLogger("lfm2vl.serve")


class SchedulerError(RuntimeError):
    """The generator failed or the server is shutting down; the request cannot complete."""


class RequestFailed(ValueError):
    """The request itself failed while generating (its constraint reached a dead end: no token could finish the
    answer); the message says why."""


@dataclass
class Ticket:
    """One submitted request as the HTTP side sees it: events arrive on `events` (Event; SchedulerError when the
    server fails it; ValueError when the generator refuses it, RequestFailed when it fails while generating)."""

    request: Request | None  # None once the generator holds it
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event | Exception] = field(default_factory=asyncio.Queue)
    rid: int | None = None
    done: bool = False
    cancelled: bool = False


def _default_generator(engine: Engine, **kw) -> BatchGenerator:
    from lfm2vl.generate.batch import BatchGenerator

    return BatchGenerator(engine, **kw)


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH, max_seq_len: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, make_generator: Callable[..., BatchGenerator] | None = None):
        make = make_generator or _default_generator
        self.engine = engine
        self._make = lambda: make(engine, max_batch=max_batch, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)
        self.gen = self._make()
        self.max_batch = max_batch
        self._inbox: queue.Queue = queue.Queue()
        self._tickets: dict[int, Ticket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lfm2vl-scheduler", daemon=True)
        self.steps = 0
        self._worked = False  # memory was used since the heap was last trimmed

    # ---- called from the event loop -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    def submit(self, request: Request) -> Ticket:
        if self._stop.is_set():
            raise SchedulerError("the server is shutting down")
        ticket = Ticket(request=request, loop=asyncio.get_running_loop())
        self._inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        if not ticket.done and not ticket.cancelled:
            ticket.cancelled = True
            self._inbox.put(("cancel", ticket))

    def touch(self) -> None:
        """An HTTP request ended (answered, refused or failed): trim the heap at the next idle moment."""
        self._inbox.put(("touch", None))

    def stats(self) -> dict:
        return {"active_requests": len(self._tickets), "queued": self._inbox.qsize(), "max_batch": self.max_batch,
                "steps": self.steps}

    # ---- the scheduler thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                idle = not self.gen.has_work()
                got = self._drain(block=idle)
                if self._stop.is_set():
                    break
                if idle and not got and self._worked:
                    self.engine.release_memory()
                    self._worked = False
                if self.gen.has_work():
                    self._worked = True
                    events = self.gen.step()
                    self.steps += 1
                    for ev in events:
                        self._dispatch(ev)
            except Exception as e:  # a model failure must not kill the thread: fail the batch, start afresh
                log.exception("generation step failed; failing %d active request(s)", len(self._tickets))
                self._fail_all(SchedulerError(f"generation failed: {type(e).__name__}"))
                try:
                    self.gen = self._make()
                except Exception:
                    log.exception("could not rebuild the batch generator")
                    self._stop.set()
        self._fail_all(SchedulerError("the server is shutting down"))
        while True:  # requests that arrived after the stop
            try:
                kind, ticket = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._send(ticket, SchedulerError("the server is shutting down"))

    def _drain(self, block: bool) -> bool:
        """Take what the inbox holds (waiting up to half a second for a first item when `block`); True if any."""
        got = False
        while True:
            try:
                kind, ticket = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return got
            block, got = False, True
            if kind == "touch":
                self._worked = True
            elif kind == "add" and not ticket.cancelled:
                request, ticket.request = ticket.request, None  # the generator holds it only while it runs
                try:
                    ticket.rid = self.gen.add(request)
                except Exception as e:
                    log.warning("request rejected by the batch generator: %s", e)
                    ticket.done = True
                    self._send(ticket, e if isinstance(e, ValueError) else SchedulerError(str(e)))
                    continue
                self._tickets[ticket.rid] = ticket
            elif kind == "cancel" and ticket.rid in self._tickets:
                del self._tickets[ticket.rid]
                self.gen.cancel(ticket.rid)

    def _dispatch(self, ev: Event) -> None:
        ticket = self._tickets.get(ev.rid)
        if ticket is None:
            return  # cancelled between steps
        if ev.finish_reason is not None:
            ticket.done = True
            del self._tickets[ev.rid]
            if ev.finish_reason == "error":  # the request's constraint reached a dead end: its own input's fault
                self._send(ticket, RequestFailed(ev.result.error))
                return
        self._send(ticket, ev)

    def _fail_all(self, err: Exception) -> None:
        for rid, ticket in list(self._tickets.items()):
            ticket.done = True
            self._send(ticket, err)
            try:
                self.gen.cancel(rid)
            except Exception:
                pass  # the generator is being replaced anyway
        self._tickets.clear()

    @staticmethod
    def _send(ticket: Ticket, item: Event | Exception) -> None:
        try:
            ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more
