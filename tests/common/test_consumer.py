from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from steward.events.v1 import events_pb2

from services.common.consumer import (
    ApplyFailed,
    BatchEndFailed,
    Consumer,
    ConsumerTables,
    EnvelopeGap,
    GrpcEnvelopeSource,
    SourceUnavailable,
    consumer_tables,
)
from services.common.db import make_engine
from services.common.eventlog import ProducerLog, registration
from services.common.outbox import Outbox, outbox_tables
from services.common.server import build_server

CHILD = Path(__file__).with_name("consumer_child.py")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# The producer: an outbox on the `engine` fixture (SQLite or PostgreSQL) served over gRPC ------


class Producer:
    def __init__(self, engine: Engine) -> None:
        metadata = MetaData()
        self.outbox = Outbox("consent", outbox_tables(metadata))
        metadata.create_all(engine)
        self.engine = engine
        self.port = 0
        self.server: grpc.Server | None = None

    def start(self) -> None:
        """Serve the log (again on the same port after a stop)."""
        built = build_server(
            [registration({"consent": ProducerLog(self.outbox, self.engine)})],
            host="127.0.0.1",
            port=self.port,
            max_message_bytes=4 * 1024 * 1024,
        )
        built.server.start()
        self.port, self.server = built.port, built.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait(5)
            self.server = None

    def append(self, count: int) -> list[events_pb2.Envelope]:
        bodies = [events_pb2.PersonForgotten(person_id=f"person-{n}") for n in range(count)]
        with self.outbox.begin(self.engine) as connection:
            return self.outbox.append(connection, bodies)

    def last_seq(self) -> int:
        with self.engine.connect() as connection:
            return self.outbox.last_seq(connection)

    def acknowledged(self, consumer: str) -> int:
        with self.engine.connect() as connection:
            acknowledgement = self.outbox.acknowledgements(connection).get(consumer)
        return 0 if acknowledgement is None else acknowledgement.seq


@pytest.fixture
def producer(engine: Engine) -> Iterator[Producer]:
    producer = Producer(engine)
    producer.start()
    yield producer
    producer.stop()


@pytest.fixture
def channel(producer: Producer) -> Iterator[grpc.Channel]:
    # Reconnect quickly after the producer restarts (gRPC's own default backoff starts at 1 s).
    channel = grpc.insecure_channel(
        f"127.0.0.1:{producer.port}",
        options=[
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 200),
        ],
    )
    yield channel
    channel.close()


# The consumer's own database: a SQLite file recording what was applied ------------------------


@dataclass
class ConsumerStore:
    engine: Engine
    tables: ConsumerTables
    applied: Table
    batch_ends: Table
    failures: dict[int, int] = field(default_factory=dict)
    """seq to how many more times applying it should fail."""
    attempts: dict[int, int] = field(default_factory=dict)
    end_failures: dict[int, int] = field(default_factory=dict)
    """seq to how many more times finishing a batch that holds it should fail."""

    def apply(self, connection: Connection, envelope: events_pb2.Envelope) -> None:
        self.attempts[envelope.seq] = self.attempts.get(envelope.seq, 0) + 1
        connection.execute(insert(self.applied).values(envelope_id=envelope.id, seq=envelope.seq))
        if self.failures.get(envelope.seq, 0) > 0:
            self.failures[envelope.seq] -= 1
            raise RuntimeError("the consumer's store is having a bad day")

    def end_batch(self, connection: Connection, envelopes: Sequence[events_pb2.Envelope]) -> None:
        """Records the batch's seqs, and checks they were applied in this very transaction."""
        seqs = [e.seq for e in envelopes]
        applied_here = select(self.applied.c.seq).where(self.applied.c.seq.in_(seqs))
        assert sorted(connection.execute(applied_here).scalars()) == seqs
        connection.execute(
            insert(self.batch_ends).values(
                first_seq=seqs[0], last_seq=seqs[-1], envelopes=len(seqs)
            )
        )
        for seq in seqs:
            if self.end_failures.get(seq, 0) > 0:
                self.end_failures[seq] -= 1
                raise RuntimeError("the batch's follow-up is having a bad day")

    def applied_seqs(self) -> list[int]:
        with self.engine.connect() as connection:
            query = select(self.applied.c.seq).order_by(self.applied.c.seq)
            return list(connection.execute(query).scalars())

    def batches(self) -> list[tuple[int, int, int]]:
        """(first seq, last seq, envelopes) of each batch whose end was committed."""
        with self.engine.connect() as connection:
            query = select(self.batch_ends).order_by(self.batch_ends.c.first_seq)
            return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConsumerStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'consumer.db'}")
    metadata = MetaData()
    tables = consumer_tables(metadata)
    applied = Table(
        "applied",
        metadata,
        Column("envelope_id", String(36), primary_key=True),  # applying twice would fail
        Column("seq", BigInteger, nullable=False),
    )
    batch_ends = Table(
        "batch_ends",
        metadata,
        Column("first_seq", BigInteger, primary_key=True),  # ending a batch twice would fail
        Column("last_seq", BigInteger, nullable=False),
        Column("envelopes", BigInteger, nullable=False),
    )
    metadata.create_all(engine)
    yield ConsumerStore(engine, tables, applied, batch_ends)
    engine.dispose()


def make_consumer(
    store: ConsumerStore, source: object, name: str = "tagging", **options: object
) -> Consumer:
    return Consumer(
        name,
        "consent",
        source,  # type: ignore[arg-type]
        store.engine,
        store.apply,
        tables=store.tables,
        **options,  # type: ignore[arg-type]
    )


def grpc_consumer(store: ConsumerStore, channel: grpc.Channel, **options: object) -> Consumer:
    return make_consumer(
        store, GrpcEnvelopeSource(channel, "consent", "tagging", timeout=5), **options
    )


# In-process behaviour -------------------------------------------------------------------------


def test_consumer_applies_each_envelope_once_and_resumes_from_its_cursor(
    producer: Producer, channel: grpc.Channel, store: ConsumerStore
) -> None:
    producer.append(30)
    assert grpc_consumer(store, channel, batch_size=8).run_once() == 30
    producer.append(12)

    restarted = grpc_consumer(store, channel, batch_size=8)
    assert restarted.cursor() == 30
    assert restarted.run_once() == 12
    assert restarted.run_once() == 0

    assert store.applied_seqs() == list(range(1, 43))
    assert restarted.cursor() == 42
    assert producer.acknowledged("tagging") == 42


def test_run_once_stops_after_max_envelopes(
    producer: Producer, channel: grpc.Channel, store: ConsumerStore
) -> None:
    producer.append(10)
    consumer = grpc_consumer(store, channel, batch_size=4)

    assert consumer.run_once(max_envelopes=6) == 6
    assert consumer.cursor() == 6
    assert consumer.run_once() == 4


@dataclass
class ListSource:
    """A source replaying fixed deliveries, as a reconnecting transport might."""

    deliveries: list[events_pb2.Envelope]
    acks: list[int] = field(default_factory=list)
    fail_acks: bool = False

    def envelopes(self, from_seq: int, *, stop_at_end: bool = False) -> ListStream:
        return ListStream(iter(self.deliveries))

    def ack(self, seq: int) -> int:
        if self.fail_acks:
            raise SourceUnavailable("the producer is away")
        self.acks.append(seq)
        return seq


@dataclass
class ListStream:
    envelopes: Iterator[events_pb2.Envelope]

    def __iter__(self) -> ListStream:
        return self

    def __next__(self) -> events_pb2.Envelope:
        return next(self.envelopes)

    def cancel(self) -> None:
        pass


def envelope(seq: int) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        id=f"00000000-0000-4000-8000-{seq:012d}",
        seq=seq,
        producer="consent",
        person_forgotten=events_pb2.PersonForgotten(person_id="p"),
    )


def test_envelopes_delivered_again_are_not_applied_again(store: ConsumerStore) -> None:
    deliveries = [envelope(seq) for seq in [1, 2, 3, 2, 3, 4, 5, 1, 5, 6]]
    source = ListSource(deliveries)

    assert make_consumer(store, source, batch_size=3).run_once() == 6

    assert store.applied_seqs() == [1, 2, 3, 4, 5, 6]
    assert source.acks[-1] == 6


def test_a_gap_in_the_stream_is_refused_rather_than_skipped(store: ConsumerStore) -> None:
    consumer = make_consumer(store, ListSource([envelope(1), envelope(2), envelope(4)]))

    with pytest.raises(EnvelopeGap, match="from seq 2 to 4"):
        consumer.run_once()
    assert consumer.cursor() == 2


def test_failed_acks_are_logged_and_consuming_goes_on(
    store: ConsumerStore, caplog: pytest.LogCaptureFixture
) -> None:
    source = ListSource([envelope(seq) for seq in range(1, 5)], fail_acks=True)

    with caplog.at_level(logging.WARNING, logger="services.common.consumer"):
        assert make_consumer(store, source).run_once() == 4

    assert store.applied_seqs() == [1, 2, 3, 4]
    assert "acknowledging seq 4 failed" in caplog.text


def test_a_failing_apply_is_retried_without_advancing_the_cursor(
    producer: Producer,
    channel: grpc.Channel,
    store: ConsumerStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    written = producer.append(8)
    store.failures[5] = 2
    consumer = grpc_consumer(store, channel, batch_size=8, initial_backoff=0.01)

    with pytest.raises(ApplyFailed) as failure:
        consumer.run_once()
    assert failure.value.seq == 5
    assert consumer.cursor() < 5  # the failing batch was rolled back
    assert store.applied_seqs() == list(range(1, consumer.cursor() + 1))

    with caplog.at_level(logging.ERROR, logger="services.common.consumer"):
        consumer.start()
        wait_until(lambda: consumer.cursor() == 8)
        consumer.stop()

    assert store.applied_seqs() == list(range(1, 9))
    assert store.attempts[5] == 3
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert (record.seq, record.envelope_id) == (5, written[4].id)  # type: ignore[attr-defined]
    assert "person-" not in caplog.text  # no payload in the logs


def test_a_background_consumer_follows_and_survives_a_producer_restart(
    producer: Producer, channel: grpc.Channel, store: ConsumerStore
) -> None:
    consumer = grpc_consumer(store, channel, initial_backoff=0.02, max_backoff=0.2)
    consumer.start()
    try:
        producer.append(5)
        wait_until(lambda: consumer.cursor() == 5)

        producer.stop()
        producer.append(5)  # written while the log is not served
        time.sleep(0.1)  # let the consumer notice and back off
        producer.start()
        producer.append(5)

        wait_until(lambda: consumer.cursor() == 15)
    finally:
        consumer.stop()
    assert not consumer.running
    assert store.applied_seqs() == list(range(1, 16))
    wait_until(lambda: producer.acknowledged("tagging") == 15)


def test_stop_ends_an_idle_follower(
    producer: Producer, channel: grpc.Channel, store: ConsumerStore
) -> None:
    consumer = grpc_consumer(store, channel)
    consumer.start()
    producer.append(1)
    wait_until(lambda: consumer.cursor() == 1)  # now following, waiting for more

    consumer.stop(timeout=5)

    assert not consumer.running


def test_apply_joins_the_trace_of_the_call_that_wrote_the_envelope(
    producer: Producer, channel: grpc.Channel, store: ConsumerStore
) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracer_provider.get_tracer("test").start_as_current_span("Collect") as collect:
        producer.append(1)

    grpc_consumer(store, channel, tracer_provider=tracer_provider).run_once()

    (applied,) = [span for span in exporter.get_finished_spans() if span.name.startswith("apply")]
    assert applied.name == "apply consent/person_forgotten"
    assert applied.context is not None and applied.parent is not None
    assert applied.context.trace_id == collect.get_span_context().trace_id
    assert applied.parent.span_id == collect.get_span_context().span_id
    assert applied.attributes is not None and applied.attributes["steward.seq"] == 1


# The batch-end hook ---------------------------------------------------------------------------


def test_end_batch_runs_once_per_batch_with_the_envelopes_it_applied(
    store: ConsumerStore,
) -> None:
    deliveries = [envelope(seq) for seq in [1, 2, 3, 2, 3, 4, 5, 1, 5, 6, 7, 8, 9, 10]]
    consumer = make_consumer(store, ListSource(deliveries), batch_size=3, end_batch=store.end_batch)

    assert consumer.run_once() == 10

    batches = store.batches()
    # Redelivered envelopes are in no batch; every applied one is in exactly one.
    covered = [seq for first, last, _ in batches for seq in range(first, last + 1)]
    assert covered == list(range(1, 11)) == store.applied_seqs()
    assert all(count == last - first + 1 <= 3 for first, last, count in batches)
    assert consumer.cursor() == 10


def test_a_failing_end_batch_keeps_nothing_of_its_batch_and_is_retried_singly(
    producer: Producer,
    channel: grpc.Channel,
    store: ConsumerStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer.append(8)
    store.end_failures[5] = 2
    consumer = grpc_consumer(
        store, channel, batch_size=8, initial_backoff=0.01, end_batch=store.end_batch
    )

    with pytest.raises(BatchEndFailed) as failure:
        consumer.run_once()
    assert isinstance(failure.value, ApplyFailed)
    kept = consumer.cursor()
    assert kept < 5  # the batch holding seq 5 was rolled back, its end with it
    assert store.applied_seqs() == list(range(1, kept + 1))
    assert all(last <= kept for _, last, _ in store.batches())

    with caplog.at_level(logging.ERROR, logger="services.common.consumer"):
        consumer.start()
        wait_until(lambda: consumer.cursor() == 8)
        consumer.stop()

    assert store.applied_seqs() == list(range(1, 9))
    covered = [seq for first, last, _ in store.batches() for seq in range(first, last + 1)]
    assert covered == list(range(1, 9))
    # Retried one envelope per transaction up to the failed batch's last envelope.
    assert (5, 5, 1) in store.batches()
    assert "finishing the batch that ends at seq" in caplog.text


# The crash test -------------------------------------------------------------------------------


def test_a_consumer_killed_mid_stream_applies_every_envelope_exactly_once(
    producer: Producer, tmp_path: Path
) -> None:
    consumer_db = tmp_path / "crash-consumer.db"
    reader = make_engine(f"sqlite:///{consumer_db}")
    stop_writing = threading.Event()
    write_errors: list[BaseException] = []

    def write() -> None:
        try:
            while not stop_writing.is_set():
                producer.append(5)
                time.sleep(0.005)
        except BaseException as exc:
            write_errors.append(exc)

    def applied() -> int:
        try:
            with reader.connect() as connection:
                return int(connection.execute(text("SELECT count(*) FROM applied")).scalar_one())
        except OperationalError:  # the child has not created its tables yet
            return 0

    def spawn(log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                f"127.0.0.1:{producer.port}",
                f"sqlite:///{consumer_db}",
                "5",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )

    writer = threading.Thread(target=write)
    writer.start()
    child = spawn(tmp_path / "child-1.log")
    try:
        wait_until(lambda: applied() >= 30)
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        at_kill = applied()

        child = spawn(tmp_path / "child-2.log")
        wait_until(lambda: applied() >= at_kill + 30)
        stop_writing.set()
        writer.join()
        total = producer.last_seq()
        wait_until(lambda: applied() == total)
    finally:
        stop_writing.set()
        writer.join()
        child.terminate()
        child.wait(5)

    assert write_errors == []
    assert total > at_kill > 0
    with reader.connect() as connection:
        seqs = list(connection.execute(text("SELECT seq FROM applied ORDER BY seq")).scalars())
        counted = connection.execute(text("SELECT applies FROM apply_counter")).scalar_one()
        ended = connection.execute(text("SELECT ended FROM apply_counter")).scalar_one()
        cursor = connection.execute(text("SELECT seq FROM consumer_cursors")).scalar_one()
        applied_ids = set(connection.execute(text("SELECT envelope_id FROM applied")).scalars())
    reader.dispose()
    with producer.engine.connect() as connection:
        written_ids = set(
            connection.execute(select(producer.outbox.tables.outbox.c.envelope_id)).scalars()
        )
    assert seqs == list(range(1, total + 1))
    assert counted == total == cursor
    assert ended == total  # every batch-end effect kept exactly once too
    assert applied_ids == written_ids
