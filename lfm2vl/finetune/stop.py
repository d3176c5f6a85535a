"""Stopping a run: Ctrl-C (SIGINT) or SIGTERM asks for a stop after the current step (`StopFlag`); a second Ctrl-C,
or one before training starts, stops at once (`Stopped`, which says how many steps were completed)."""
from __future__ import annotations

import signal
import threading

from .report import Report


class Stopped(KeyboardInterrupt):
    """A run stopped at once (Ctrl-C before training, or twice); `steps`: the steps completed (0: none)."""

    def __init__(self, steps: int):
        super().__init__(steps)
        self.steps = steps


class StopFlag:
    """SIGINT / SIGTERM set `requested`; a second SIGINT raises KeyboardInterrupt (stop at once)."""

    def __init__(self, report: Report):
        self.requested = False
        self.report = report
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.report.message("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")
        self.requested = True
