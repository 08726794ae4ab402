"""`steward serve` killed mid-load and starved of its database: what callers saw accepted is
stored exactly once and reaches every consumer exactly once; nothing refused is stored; calls
that cannot be served say UNAVAILABLE; the suite recovers by itself.

Each test drives a steady Collect load from a thread: batches of events for persons who granted
every purpose, with a few events of a person who granted nothing (refused: NO_CONSENT). A batch
that fails is sent again, same event ids, as a careful client does, so every event ends with a
final answer: accepted, DUPLICATE (an earlier, unanswered attempt stored it) or refused.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.db import make_engine

CHANNEL_OPTIONS = [
    # Find a restarted server quickly instead of backing off for up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
CONSENTED = [f"faults-{number}@example.org" for number in range(12)]
REFUSED = "granted-nothing@example.org"


def identifiers(email: str) -> list[common_pb2.Identifier]:
    return [common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=email)]


def grant_everything(target: str) -> set[str]:
    """Every purpose granted to each CONSENTED person; returns their person ids."""
    with grpc.insecure_channel(target) as channel:
        consent = consent_pb2_grpc.ConsentServiceStub(channel)
        purposes = consent.ListPurposes(consent_pb2.ListPurposesRequest(), timeout=10).purposes
        decisions = [
            consent_pb2.DecisionInput(
                purpose=purpose.id,
                decision=common_pb2.DECISION_GRANTED,
                policy_version=purpose.policy_version,
            )
            for purpose in purposes
        ]
        persons = set()
        for email in CONSENTED:
            answer = consent.RecordConsent(
                consent_pb2.RecordConsentRequest(
                    subject=common_pb2.PersonRef(identifiers=identifiers(email)),
                    decisions=decisions,
                    source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
                    locale="en-GB",
                ),
                timeout=30,
            )
            persons.add(answer.person_id)
        return persons


@dataclass
class CollectLoad:
    """Sends ``batches`` Collect calls of ``batch_size`` events, retrying each until answered."""

    target: str
    batches: int
    batch_size: int = 60
    outcomes: dict[str, str] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    answered_at: list[float] = field(default_factory=list)
    answered: int = 0
    retry_for: float = 120.0
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def events(self, batch: int) -> list[common_pb2.BehaviourEvent]:
        moment = Timestamp()
        moment.FromDatetime(datetime.now(UTC))
        events = []
        for number in range(self.batch_size):
            email = REFUSED if number % 10 == 9 else CONSENTED[(batch + number) % len(CONSENTED)]
            events.append(
                common_pb2.BehaviourEvent(
                    event_id=f"b{batch}-e{number}",
                    identifiers=identifiers(email),
                    type=common_pb2.EVENT_TYPE_PURCHASE
                    if number % 3
                    else common_pb2.EVENT_TYPE_VIEW,
                    item_id=f"sku-{number % 17}",
                    category=("garden", "kitchen", "outdoor")[number % 3],
                    value=float(number % 7) * 10.0,
                    quantity=1,
                    channel="web",
                    occurred_at=moment,
                )
            )
        return events

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="collect-load")
        self._thread.start()

    def join(self, timeout: float = 300) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not finish"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
                consent = consent_pb2_grpc.ConsentServiceStub(channel)
                for batch in range(self.batches):
                    self._send(consent, batch)
        except BaseException as error:
            self.error = error

    def _send(self, consent: consent_pb2_grpc.ConsentServiceStub, batch: int) -> None:
        request = consent_pb2.CollectRequest(events=self.events(batch))
        give_up = time.monotonic() + self.retry_for
        while True:
            try:
                response = consent.Collect(request, timeout=10)
                break
            except grpc.RpcError as error:
                self.failures[error.code().name] += 1
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.1)
        for event, result in zip(request.events, response.results, strict=True):
            # A retry answers DUPLICATE only for what an earlier attempt stored.
            self.outcomes[event.event_id] = (
                "accepted" if result.accepted else consent_pb2.DropReason.Name(result.drop_reason)
            )
        self.answered_at.append(time.monotonic())
        self.answered += 1

    def stored_by_client_view(self) -> set[str]:
        return {
            event_id
            for event_id, outcome in self.outcomes.items()
            if outcome in ("accepted", "DROP_REASON_DUPLICATE")
        }

    def refused(self) -> set[str]:
        return set(self.outcomes) - self.stored_by_client_view()


def event_ids(url: str, table: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(f"SELECT event_id FROM {table}")).scalars())
    finally:
        engine.dispose()


def behaviour_envelopes(target: str) -> Counter[str]:
    """How many times each event id is on consent's log."""
    with grpc.insecure_channel(target) as channel:
        stub = events_pb2_grpc.EventLogServiceStub(channel)
        request = events_pb2.SubscribeRequest(
            producer="consent", consumer="faults-audit", stop_at_end=True
        )
        return Counter(
            response.envelope.behaviour_recorded.event_id
            for response in stub.Subscribe(request, timeout=60)
            if response.envelope.WhichOneof("body") == "behaviour_recorded"
        )


def profile_event_counts(target: str, persons: set[str]) -> int:
    with grpc.insecure_channel(target) as channel:
        tagging = tagging_pb2_grpc.TaggingServiceStub(channel)
        return sum(
            tagging.GetProfile(
                tagging_pb2.GetProfileRequest(person_id=person), timeout=10
            ).profile.events_7d
            for person in persons
        )


@dataclass
class Urls:
    consent: str
    tagging: str
    recommend: str


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The environment `steward serve` gets: SQLite files under its data directory, or one
    fresh PostgreSQL schema for all four services."""
    if request.param == "sqlite":
        yield {}
    else:
        yield {"STEWARD_DATABASE_URL": request.getfixturevalue("postgres_schema_url")}


def urls_of(environ: dict[str, str], data_dir: object) -> Urls:
    shared = environ.get("STEWARD_DATABASE_URL")
    if shared:
        return Urls(shared, shared, shared)
    return Urls(
        *(f"sqlite:///{data_dir}/{service}.db" for service in ("consent", "tagging", "recommend"))
    )


def test_sigkill_mid_collect_loses_and_duplicates_nothing(
    serve_process: Callable[..., Any], backend: dict[str, str]
) -> None:
    suite = serve_process(**backend)
    first_start = suite.start()
    persons = grant_everything(suite.target)
    load = CollectLoad(suite.target, batches=40)
    load.start()
    assert _wait(lambda: load.answered >= 8 or load.error is not None, 120)
    suite.kill()
    killed_at, answered_at_kill = time.monotonic(), load.answered
    restart = suite.start()
    load.join()
    outage = time.monotonic() - killed_at
    urls = urls_of(backend, suite.data_dir)
    assert answered_at_kill < load.batches, "the kill came after the load had finished"

    stored, refused = check_exactly_once(load, urls, suite.target, persons)
    duplicates = Counter(load.outcomes.values())["DROP_REASON_DUPLICATE"]
    print(
        f"\nfaults/sigkill [{'postgres' if backend else 'sqlite'}]: first start "
        f"{first_start:.1f} s, restart to healthy {restart:.1f} s, client outage {outage:.1f} s, "
        f"{len(stored)} stored ({duplicates} answered DUPLICATE on retry), "
        f"{len(refused)} refused, failed calls {dict(load.failures)}"
    )


def test_postgres_stopped_under_load_answers_unavailable_and_recovers_by_itself(
    serve_process: Callable[..., Any], throwaway_postgres: Any
) -> None:
    suite = serve_process(STEWARD_DATABASE_URL=throwaway_postgres.url)
    started = suite.start()
    persons = grant_everything(suite.target)
    load = CollectLoad(suite.target, batches=40, retry_for=180)
    load.start()
    assert _wait(lambda: load.answered >= 8 or load.error is not None, 120)
    throwaway_postgres.stop()
    stopped_at = time.monotonic()
    time.sleep(4)
    throwaway_postgres.start()
    restarted_at = time.monotonic()
    load.join()

    assert suite.process.poll() is None, "the process rode out the outage"
    assert load.failures, "calls failed while the database was down"
    assert set(load.failures) == {"UNAVAILABLE"}, load.failures
    urls = urls_of({"STEWARD_DATABASE_URL": throwaway_postgres.url}, suite.data_dir)
    stored, refused = check_exactly_once(load, urls, suite.target, persons)
    recovered = next(moment for moment in load.answered_at if moment > restarted_at)
    print(
        f"\nfaults/postgres-stop: started in {started:.1f} s; database down "
        f"{restarted_at - stopped_at:.1f} s, first Collect answered "
        f"{recovered - restarted_at:.2f} s after it was back; {len(stored)} stored, "
        f"{len(refused)} refused, failed calls {dict(load.failures)}"
    )


def test_nats_killed_and_restarted_under_load_loses_and_duplicates_nothing(
    serve_process: Callable[..., Any], private_nats: Any
) -> None:
    suite = serve_process(STEWARD_TRANSPORT="jetstream", STEWARD_NATS_URL=private_nats.url)
    suite.start()
    persons = grant_everything(suite.target)
    load = CollectLoad(suite.target, batches=40)
    load.start()
    assert _wait(lambda: load.answered >= 8 or load.error is not None, 120)
    private_nats.kill()
    killed_at = time.monotonic()
    time.sleep(3)
    private_nats.start()
    restarted_at = time.monotonic()
    load.join()

    # Collect writes the outbox in its own transaction: NATS being away costs it nothing.
    assert not load.failures, load.failures
    assert load.answered_at[-1] > killed_at, "the load went on through the outage"
    # The envelopes did travel through this server: consent's stream is in its store.
    assert any(private_nats.store.rglob("STEWARD_CONSENT")), "no consent stream on this NATS"
    stored, refused = check_exactly_once(load, urls_of({}, suite.data_dir), suite.target, persons)
    print(
        f"\nfaults/nats-kill: NATS down {restarted_at - killed_at:.1f} s; {len(stored)} stored, "
        f"{len(refused)} refused, no call failed"
    )


def check_exactly_once(
    load: CollectLoad, urls: Urls, target: str, persons: set[str]
) -> tuple[set[str], set[str]]:
    """What the client saw accepted is stored once, on consent's log once, and in tagging's and
    recommend's tables once (each consumer's profile counts it once); nothing refused is."""
    stored = load.stored_by_client_view()
    refused = load.refused()
    assert len(load.outcomes) == load.batches * load.batch_size
    assert refused and stored, load.outcomes
    assert all(load.outcomes[event] == "DROP_REASON_NO_CONSENT" for event in refused)

    consent_events = event_ids(urls.consent, "consent_events")
    assert Counter(consent_events) == Counter(stored), "stored: exactly what was accepted, once"

    def caught_up() -> bool:
        return all(
            sorted(event_ids(url, table)) == sorted(stored)
            for url, table in (
                (urls.tagging, "tagging_events"),
                (urls.recommend, "recommend_interactions"),
            )
        )

    began = time.monotonic()
    assert _wait(caught_up, 120), "tagging and recommend hold every accepted event"
    print(f"\nconsumers caught up {time.monotonic() - began:.1f} s after the load ended")
    assert behaviour_envelopes(target) == Counter(stored)
    assert profile_event_counts(target, persons) == len(stored)
    return stored, refused


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()
