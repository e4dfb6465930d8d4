"""Stopping training cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, schedulers, containers).

While a :class:`StopRequest` is active, the first signal only records itself: the training loop
finishes its step, writes a checkpoint and raises :class:`~imgtune.errors.Interrupted`. A second
signal stops at once (KeyboardInterrupt). Handlers are installed only in the main thread (Python
allows no other) and the previous ones are put back on exit.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step and writing a checkpoint (send it again to stop "
                    "at once, without one)", signal.Signals(signum).name)
