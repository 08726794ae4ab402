from __future__ import annotations

import logging
import threading
import time

import pytest

from services.common.tasks import PeriodicTask


def test_a_task_first_runs_one_interval_after_start() -> None:
    runs: list[float] = []
    task = PeriodicTask("test", 0.3, lambda: runs.append(time.monotonic()))
    started = time.monotonic()
    task.start()
    time.sleep(0.1)
    assert runs == []
    time.sleep(0.5)
    task.stop()
    assert runs and runs[0] - started >= 0.3


def test_run_at_start_runs_at_once_in_the_background_then_periodically() -> None:
    release = threading.Event()
    runs: list[float] = []

    def slow() -> None:
        runs.append(time.monotonic())
        release.wait(5)

    task = PeriodicTask("test", 0.2, slow, run_at_start=True)
    started = time.monotonic()
    task.start()
    assert time.monotonic() - started < 0.1  # start does not wait for the first run
    deadline = time.monotonic() + 5
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs and runs[0] - started < 0.2
    release.set()
    while len(runs) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    task.stop()
    assert len(runs) >= 3


def test_a_failing_run_is_logged_and_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("not now")

    task = PeriodicTask("flaky", 0.05, flaky, run_at_start=True)
    with caplog.at_level(logging.ERROR, logger="services.common.tasks"):
        task.start()
        deadline = time.monotonic() + 5
        while len(attempts) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        task.stop()
    assert len(attempts) >= 2
    assert "flaky failed" in caplog.text
