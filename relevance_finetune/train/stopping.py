"""Why a run stops early: a stop signal (SIGINT, SIGTERM) or a non-finite loss.

A signal does not interrupt a step: :class:`StopSignals` records it and the loop stops at the
next optimiser step, writes a resumable checkpoint and raises :class:`TrainingInterrupted`. A
non-finite loss or gradient raises :class:`NonFiniteLossError` before the optimiser takes it.
"""
from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

__all__ = ["NonFiniteLossError", "STOP_SIGNALS", "StopSignals", "TrainingInterrupted", "ignore_stop_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# torchrun forwards the terminal's Ctrl-C to processes that got it already: a repeat within
# this many seconds is the same request, a later one stops at once.
_REPEAT_SECONDS = 2.0


class NonFiniteLossError(RuntimeError):
    """A loss or gradient of the run is NaN or infinite; the optimiser did not take it."""


class TrainingInterrupted(Exception):
    """A stop signal ended the run at a step boundary, after a resumable checkpoint was written.

    ``exit_code`` is the shell's status for the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Record SIGINT and SIGTERM instead of dying, while the block runs.

    ``received`` is the first signal's number, or None. A repeat more than a few seconds
    after the first restores the previous handlers and re-raises the signal: stop now.
    Not ``enabled``, or outside the main thread, the handlers are left alone.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > _REPEAT_SECONDS:
            self._restore()
            signal.raise_signal(signum)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGTERM (the terminal sends
    Ctrl-C to them too) and end with the main process, which stops at a step boundary."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
