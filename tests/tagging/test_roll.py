"""The daily roll: RFM quintiles are computed as the service starts (in the background), then
periodically (``PeriodicTask(run_at_start=True)``, tested in tests/common/test_tasks.py), and
every profile is recomputed with them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select
from steward.common.v1 import common_pb2

from services.common.config import Settings
from services.common.db import make_engine
from services.common.migrations import upgrade
from services.common.outbox import Outbox
from services.common.times import utc
from services.runtime import start_suite
from services.tagging.service import TaggingService
from services.tagging.store import (
    OUTBOX_TABLES,
    PRODUCER,
    consents_table,
    events_table,
    population_table,
)

NOW = datetime.now(UTC)


def eventually(check: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    assert check()


def test_rfm_quintiles_are_refreshed_as_the_service_starts(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dataclasses.replace(
        Settings.from_env(
            {"STEWARD_DATA_DIR": str(tmp_path / "data"), "STEWARD_DATABASE_URL": db_url}
        ),
        port=0,
    )
    engine = make_engine(settings.db_url("tagging"))
    upgrade(engine, "tagging")
    buyers = [f"p-buyer-{n:02d}" for n in range(10)]
    with engine.begin() as connection:
        connection.execute(
            insert(events_table),
            [
                {
                    "event_id": f"{person}-{order}",
                    "person_id": person,
                    "origin_person_id": person,
                    "type": int(common_pb2.EVENT_TYPE_PURCHASE),
                    "value": 20.0 * (n + 1),
                    "occurred_at": NOW - timedelta(days=n + 1, hours=order),
                }
                for n, person in enumerate(buyers)
                for order in range(n // 4 + 1)
            ],
        )
        connection.execute(
            insert(consents_table),
            [
                {"person_id": p, "purpose": "profiling", "allowed": True, "ledger_seq": 0}
                for p in buyers
            ],
        )
    service = TaggingService(engine, Outbox(PRODUCER, OUTBOX_TABLES))
    with service.outbox.begin(engine) as connection:
        service.reevaluate(connection, buyers)
    # Before any refresh every buyer scores 3.
    assert {service.profile_of(p)["rfm_monetary"] for p in buyers} == {3}

    def refreshed_at() -> datetime | None:
        with engine.connect() as connection:
            row = connection.execute(
                select(population_table.c.computed_at).where(population_table.c.name == "rfm")
            ).first()
        return None if row is None else utc(row[0])

    # A day's interval: only the run at start can refresh within the test.
    monkeypatch.setattr("services.tagging.server.RFM_INTERVAL_SECONDS", 24 * 3600.0)
    started = datetime.now(UTC)
    suite = start_suite(settings, ["consent", "identity", "tagging"])
    try:
        eventually(lambda: refreshed_at() is not None)
        assert (refreshed_at() or NOW) >= started
        # The profiles were recomputed with the population's quintiles.
        eventually(lambda: service.profile_of(buyers[-1])["rfm_monetary"] == 5)
        assert service.profile_of(buyers[0])["rfm_monetary"] == 1
        assert {service.profile_of(p)["rfm_recency"] for p in buyers} == {1, 2, 3, 4, 5}
    finally:
        suite.stop(0)
        engine.dispose()
