"""A sweep asked to stop, by Ctrl-C or SIGTERM (``kill``, ``scancel``, a SLURM time limit), stops
its running trials and starts no new one, so that rerunning it continues where it stopped (see
:func:`fwlab.sweep.run_optuna`: the stopped trials are recorded as interrupted, not failed, and
run again). Without this, Ctrl-C printed a traceback and left the running trial failed, and a
rerun never ran its parameters again.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether the sweep has been asked to stop (:attr:`signal`), and the trial processes to
    pass the request on to."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    @contextmanager
    def on_signals(self) -> Iterator[StopRequest]:
        """SIGINT and SIGTERM request the stop while the block runs, then the previous handlers
        come back. Python lets only the main thread set handlers; elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {number: signal.getsignal(number) for number in SIGNALS}
        for number in SIGNALS:
            signal.signal(number, self._request)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _request(self, number: int, frame: FrameType | None) -> None:
        self.signal = number
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        print(
            f"fwlab sweep: {signal.Signals(number).name}: stopping the running trials (they run "
            "again when the sweep is rerun); Ctrl-C again to quit at once",
            file=sys.stderr,
            flush=True,
        )
        with self._lock:  # a Ctrl-C reached them already; a kill of this process did not
            for process in self._processes:
                process.terminate()

    def call(self, command: list[str], **popen: Any) -> int:
        """``subprocess.call(command, **popen)``, terminated (SIGTERM) when the stop is
        requested."""
        process = subprocess.Popen(command, **popen)
        with self._lock:
            self._processes.add(process)
            if self.signal is not None:  # requested while it started
                process.terminate()
        try:
            return process.wait()
        finally:
            with self._lock:
                self._processes.discard(process)
