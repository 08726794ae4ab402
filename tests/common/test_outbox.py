from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import MetaData, func, select
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2
from steward.events.v1 import events_pb2

from services.common.outbox import Outbox, OutboxTables, outbox_tables


@pytest.fixture
def tables(engine: Engine) -> Iterator[OutboxTables]:
    metadata = MetaData()
    tables = outbox_tables(metadata)
    metadata.create_all(engine)
    yield tables


@pytest.fixture
def outbox(tables: OutboxTables) -> Outbox:
    return Outbox("consent", tables)


def behaviour(number: int) -> events_pb2.BehaviourRecorded:
    return events_pb2.BehaviourRecorded(
        person_id=f"person-{number}",
        event_id=f"event-{number}",
        type=common_pb2.EVENT_TYPE_UNSPECIFIED,
        purposes=["analytics"],
    )


def read_all(outbox: Outbox, engine: Engine) -> list[events_pb2.Envelope]:
    with engine.connect() as connection:
        return outbox.read(connection, 1, 1_000_000)


def test_appends_get_gap_free_seqs_from_one_and_read_back_from_any_seq(
    outbox: Outbox, engine: Engine
) -> None:
    with outbox.begin(engine) as connection:
        first = outbox.append(connection, [behaviour(n) for n in range(3)])
    with outbox.begin(engine) as connection:
        second = outbox.append(
            connection,
            [
                events_pb2.ConsentChanged(person_id="person-1", purpose="profiling"),
                events_pb2.SubjectErased(person_id="person-2", erasure_id="erasure-1"),
            ],
        )

    assert [envelope.seq for envelope in first + second] == [1, 2, 3, 4, 5]
    assert [envelope.WhichOneof("body") for envelope in second] == [
        "consent_changed",
        "subject_erased",
    ]
    with engine.connect() as connection:
        assert outbox.read(connection, 3, 2) == (first + second)[2:4]
        assert outbox.read(connection, 6, 10) == []
        assert outbox.last_seq(connection) == 5
        kinds = connection.execute(
            select(outbox.tables.outbox.c.kind).order_by(outbox.tables.outbox.c.seq)
        ).scalars()
        assert list(kinds)[-2:] == ["consent_changed", "subject_erased"]


def test_envelope_round_trips_with_body_time_and_trace_context(
    outbox: Outbox, engine: Engine
) -> None:
    tracer = TracerProvider().get_tracer("test")
    occurred_at = datetime(2026, 3, 1, 12, 30, 15, 250_000, tzinfo=UTC)
    with tracer.start_as_current_span("Collect") as span, outbox.begin(engine) as connection:
        (written,) = outbox.append(connection, [behaviour(7)], occurred_at=occurred_at)

    (stored,) = read_all(outbox, engine)
    assert stored == written
    assert stored.producer == "consent"
    assert stored.behaviour_recorded == behaviour(7)
    assert stored.occurred_at.ToDatetime(tzinfo=UTC) == occurred_at
    trace_id = format(span.get_span_context().trace_id, "032x")
    span_id = format(span.get_span_context().span_id, "016x")
    assert stored.trace_context["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    assert len(stored.id) == 36 and stored.id.count("-") == 4


def test_envelope_without_a_current_span_has_no_trace_context(
    outbox: Outbox, engine: Engine
) -> None:
    with outbox.begin(engine) as connection:
        (envelope,) = outbox.append(connection, [behaviour(1)])

    assert dict(envelope.trace_context) == {}
    assert envelope.occurred_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)


def test_a_message_that_is_no_envelope_body_is_refused(outbox: Outbox, engine: Engine) -> None:
    with pytest.raises(TypeError, match="not an Envelope body"), outbox.begin(engine) as connection:
        outbox.append(connection, [events_pb2.AckRequest(seq=1)])

    assert outbox_last_seq(outbox, engine) == 0


def test_rolled_back_append_leaves_no_gap(outbox: Outbox, engine: Engine) -> None:
    with outbox.begin(engine) as connection:
        outbox.append(connection, [behaviour(1)])
    with pytest.raises(RuntimeError), outbox.begin(engine) as connection:
        outbox.append(connection, [behaviour(2), behaviour(3)])
        raise RuntimeError("the domain change failed")
    with outbox.begin(engine) as connection:
        outbox.append(connection, [behaviour(4)])

    stored = read_all(outbox, engine)
    assert [(e.seq, e.behaviour_recorded.event_id) for e in stored] == [
        (1, "event-1"),
        (2, "event-4"),
    ]


def outbox_last_seq(outbox: Outbox, engine: Engine) -> int:
    with engine.connect() as connection:
        return outbox.last_seq(connection)


def test_concurrent_writers_get_gap_free_seqs_in_commit_order(
    outbox: Outbox, engine: Engine
) -> None:
    """A follower reading "from seq N" while writers race must see every envelope, in order."""
    writers, transactions = 6, 12
    errors: list[BaseException] = []
    done = threading.Event()
    followed: list[int] = []

    def write(writer: int) -> None:
        randomness = random.Random(writer)
        try:
            for transaction in range(transactions):
                with outbox.begin(engine) as connection:
                    count = randomness.randint(1, 4)
                    outbox.append(connection, [behaviour(writer * 1000 + transaction)] * count)
                    time.sleep(randomness.random() / 500)  # hold the seqs before committing
        except BaseException as exc:
            errors.append(exc)

    def follow() -> None:
        next_seq = 1
        while True:
            finished = done.is_set()
            with engine.connect() as connection:
                page = outbox.read(connection, next_seq, 50)
            followed.extend(envelope.seq for envelope in page)
            if page:
                next_seq = page[-1].seq + 1
            elif finished:
                return

    follower = threading.Thread(target=follow)
    follower.start()
    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    follower.join()

    assert errors == []
    stored = read_all(outbox, engine)
    total = len(stored)
    assert [envelope.seq for envelope in stored] == list(range(1, total + 1))
    assert followed == list(range(1, total + 1))
    assert len({envelope.id for envelope in stored}) == total
    assert outbox_last_seq(outbox, engine) == total
    with engine.connect() as connection:
        rows = connection.execute(select(func.count()).select_from(outbox.tables.outbox))
        assert rows.scalar_one() == total


def test_acknowledgements_never_go_backwards(outbox: Outbox, engine: Engine) -> None:
    with outbox.begin(engine) as connection:
        assert outbox.record_ack(connection, "tagging", 5) == 5
    with engine.connect() as connection:
        first = outbox.acknowledgements(connection)["tagging"]

    with outbox.begin(engine) as connection:
        assert outbox.record_ack(connection, "tagging", 3) == 5
        assert outbox.record_ack(connection, "tagging", 5) == 5
        assert outbox.record_ack(connection, "recommend", 2) == 2
    with engine.connect() as connection:
        acknowledgements = outbox.acknowledgements(connection)
    assert acknowledgements["tagging"] == first  # the time it first reached 5, too
    assert acknowledgements["recommend"].seq == 2
    assert set(acknowledgements) == {"tagging", "recommend"}
    assert first.seq == 5 and first.at.tzinfo is not None

    with outbox.begin(engine) as connection:
        assert outbox.record_ack(connection, "tagging", 9) == 9
    with engine.connect() as connection:
        later = outbox.acknowledgements(connection)["tagging"]
    assert later.seq == 9 and later.at >= first.at

    with pytest.raises(ValueError), outbox.begin(engine) as connection:
        outbox.record_ack(connection, "tagging", -1)


def test_notify_wakes_a_waiting_follower_and_wait_gives_up_without_one(
    tables: OutboxTables,
) -> None:
    outbox = Outbox("identity", tables)
    seen = outbox.notifications
    assert outbox.wait(seen, timeout=0.01) == seen

    woken = threading.Event()

    def follower() -> None:
        outbox.wait(seen, timeout=30)
        woken.set()

    thread = threading.Thread(target=follower)
    thread.start()
    outbox.notify()
    assert woken.wait(timeout=5)
    thread.join()
    # A notify that came before the wait is not lost: the counter has moved on.
    assert outbox.wait(seen, timeout=30) == seen + 1


def test_tables_can_be_prefixed_for_a_shared_database() -> None:
    metadata = MetaData()
    tables = outbox_tables(metadata, prefix="identity_")

    assert (tables.outbox.name, tables.head.name, tables.acks.name) == (
        "identity_outbox",
        "identity_outbox_head",
        "identity_consumer_acks",
    )
