"""Housekeeping that a service runs beside its server: one thread per task, on a fixed period."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)


class PeriodicTask:
    """Runs ``task`` every ``interval`` seconds on a thread of its own until stopped.

    With ``run_at_start`` the first run is at once (on the task's thread, so start-up does not
    wait for it), the next ``interval`` after it ends. A failing run is logged and tried again at
    the next period; an interval of 0 disables it.
    """

    def __init__(
        self,
        name: str,
        interval: float,
        task: Callable[[], object],
        *,
        run_at_start: bool = False,
    ) -> None:
        self._name = name
        self._interval = interval
        self._task = task
        self._run_at_start = run_at_start
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._run_at_start:
            self._run_once()
        while not self._stopped.wait(self._interval):
            self._run_once()

    def _run_once(self) -> None:
        try:
            self._task()
        except Exception:
            logger.exception("%s failed; trying again in %.0f s", self._name, self._interval)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def start_all(tasks: Sequence[PeriodicTask]) -> None:
    for task in tasks:
        task.start()


def stop_all(tasks: Sequence[PeriodicTask]) -> None:
    for task in tasks:
        task.stop()
