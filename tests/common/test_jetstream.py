"""The JetStream transport: the relay publishes each envelope once and in order, a consumer
reading a durable pull consumer applies each exactly once, across restarts and a SIGKILL, and
its progress still reaches the producer's acknowledgements."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from steward.events.v1 import events_pb2

from services.common.config import ConfigError, Settings
from services.common.consumer import Consumer, ConsumerTables, GrpcEnvelopeSource, consumer_tables
from services.common.db import make_engine
from services.common.eventlog import ProducerLog, registration
from services.common.jetstream import (
    FETCH_SECONDS,
    SEQ_HEADER,
    JetStreamConnection,
    JetStreamEnvelopeSource,
    JetStreamTransport,
    JetStreamUnavailable,
    Relay,
    delete_streams,
    stream_name,
    subject,
)
from services.common.outbox import Outbox, outbox_tables
from services.common.server import build_server

CHILD = Path(__file__).with_name("consumer_child.py")


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# Naming and settings ----------------------------------------------------------------------------


def test_streams_are_per_producer_and_subjects_per_envelope_type() -> None:
    assert stream_name("steward", "consent") == "STEWARD_CONSENT"
    assert subject("steward", "identity", "persons_merged") == "steward.identity.persons_merged"
    with pytest.raises(ValueError, match="cannot be part of a NATS subject"):
        stream_name("steward.prod", "consent")


def test_the_prefix_comes_from_the_environment_and_must_be_one_subject_token() -> None:
    settings = Settings.from_env(
        {"STEWARD_TRANSPORT": "jetstream", "STEWARD_JETSTREAM_PREFIX": "staging-2"}
    )
    assert (settings.transport, settings.jetstream_prefix) == ("jetstream", "staging-2")
    assert Settings.from_env({}).jetstream_prefix == "steward"
    with pytest.raises(ConfigError, match="STEWARD_JETSTREAM_PREFIX"):
        Settings.from_env({"STEWARD_JETSTREAM_PREFIX": "a.>"})


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_while_nats_is_away_calls_fail_soon_and_relays_and_consumers_still_stop(
    engine: Engine, tmp_path: Path
) -> None:
    connection = JetStreamConnection(f"nats://127.0.0.1:{unused_port()}")
    metadata = MetaData()
    outbox = Outbox("consent", outbox_tables(metadata))
    cursors = consumer_tables(metadata)
    metadata.create_all(engine)
    source = JetStreamEnvelopeSource(connection, "consent", "tagging", prefix="away")
    try:
        with pytest.raises(JetStreamUnavailable, match="NoServersError"):
            list(source.envelopes(1, stop_at_end=True))
        relay = Relay(connection, ProducerLog(outbox, engine), prefix="away")
        consumer = Consumer(
            "tagging", "consent", source, engine, lambda _c, _e: None, tables=cursors
        )
        relay.start()
        consumer.start()
        time.sleep(0.5)
        relay.stop()
        consumer.stop()
        assert not relay.running and not consumer.running
        assert relay.published_seq == 0 and consumer.cursor() == 0
    finally:
        connection.close()


# The producer and NATS -------------------------------------------------------------------------


@pytest.fixture
def prefix(nats_url: str) -> Iterator[str]:
    """A prefix of this test's own; its streams (and their consumers) are deleted afterwards."""
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    delete_streams(nats_url, name, ("consent",))


@pytest.fixture
def connection(nats_url: str) -> Iterator[JetStreamConnection]:
    connection = JetStreamConnection(nats_url, name="test")
    yield connection
    connection.close()


class Producer:
    """Consent's outbox on the `engine` fixture, its EventLogService served for the Acks."""

    def __init__(self, engine: Engine) -> None:
        metadata = MetaData()
        self.outbox = Outbox("consent", outbox_tables(metadata))
        metadata.create_all(engine)
        self.engine = engine
        self.log = ProducerLog(self.outbox, engine)
        built = build_server(
            [registration({"consent": self.log})],
            host="127.0.0.1",
            port=0,
            max_message_bytes=4 * 1024 * 1024,
        )
        built.server.start()
        self.port, self.server = built.port, built.server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait(5)

    def append(self, count: int) -> list[events_pb2.Envelope]:
        """``count`` envelopes of two types, alternating."""
        bodies = [
            events_pb2.PersonForgotten(person_id=f"person-{n}")
            if n % 2 == 0
            else events_pb2.ConsentChanged(person_id=f"person-{n}", purpose="profiling")
            for n in range(count)
        ]
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
    yield producer
    producer.close()


@dataclass(frozen=True)
class Stored:
    subject: str
    headers: dict[str, str]
    envelope: events_pb2.Envelope


def stored(connection: JetStreamConnection, stream: str) -> list[Stored]:
    """Every message of ``stream``, in stream order."""

    async def read(jetstream: JetStreamContext) -> list[Stored]:
        info = await jetstream.stream_info(stream)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                message = await jetstream.get_msg(stream, seq=seq)
            except nats.js.errors.NotFoundError:
                continue  # deleted
            found.append(
                Stored(
                    message.subject or "",
                    dict(message.headers or {}),
                    events_pb2.Envelope.FromString(message.data or b""),
                )
            )
        return found

    return connection.call(read, timeout=30)


# The relay ---------------------------------------------------------------------------------------


def test_the_relay_publishes_every_envelope_once_in_order_with_a_subject_per_type(
    producer: Producer, connection: JetStreamConnection, prefix: str
) -> None:
    written = producer.append(7)
    relay = Relay(connection, producer.log, prefix=prefix, page_size=3)

    assert relay.run_once() == 7
    assert relay.run_once() == 0

    messages = stored(connection, f"{prefix.upper()}_CONSENT")
    assert [m.envelope for m in messages] == written
    assert [m.subject for m in messages] == [
        f"{prefix}.consent.{'person_forgotten' if n % 2 == 0 else 'consent_changed'}"
        for n in range(7)
    ]
    assert [m.headers["Nats-Msg-Id"] for m in messages] == [e.id for e in written]
    assert [m.headers[SEQ_HEADER] for m in messages] == [str(n) for n in range(1, 8)]
    assert relay.published_seq == 7


def test_a_restarted_relay_resumes_where_the_stream_ends_and_repeats_leave_no_duplicates(
    producer: Producer, connection: JetStreamConnection, prefix: str
) -> None:
    written = producer.append(10)
    assert Relay(connection, producer.log, prefix=prefix).run_once() == 10
    written += producer.append(5)

    restarted = Relay(connection, producer.log, prefix=prefix)
    assert restarted.run_once() == 5  # resumed from the stream's last Steward-Seq, not from 1

    # A relay that crashed after publishing but before learning of the acks publishes again.
    stream = f"{prefix.upper()}_CONSENT"

    async def publish_again(jetstream: JetStreamContext) -> list[PubAck]:
        return [
            await jetstream.publish(
                subject(prefix, "consent", envelope.WhichOneof("body") or ""),
                envelope.SerializeToString(),
                headers={"Nats-Msg-Id": envelope.id, SEQ_HEADER: str(envelope.seq)},
            )
            for envelope in written[8:]
        ]

    acks = connection.call(publish_again)
    assert all(ack.duplicate for ack in acks)
    assert [m.envelope.seq for m in stored(connection, stream)] == list(range(1, 16))


def test_a_following_relay_publishes_what_is_committed_and_stops_promptly(
    producer: Producer, connection: JetStreamConnection, prefix: str
) -> None:
    relay = Relay(connection, producer.log, prefix=prefix)
    relay.start()
    try:
        producer.append(4)
        wait_until(lambda: relay.published_seq == 4)
        producer.append(3)
        wait_until(lambda: relay.published_seq == 7)
    finally:
        relay.stop()
    assert not relay.running
    assert len(stored(connection, f"{prefix.upper()}_CONSENT")) == 7


def test_the_transport_relays_its_logs_and_reports_each_relays_lag(
    producer: Producer, nats_url: str, prefix: str
) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    transport = JetStreamTransport(nats_url, prefix, meter=meter)
    producer.append(5)
    transport.start_relays({"consent": producer.log})
    try:
        wait_until(lambda: transport.relays[0].published_seq == 5)
        data = reader.get_metrics_data()
    finally:
        transport.close()

    assert data is not None
    points = [
        (dict(point.attributes or {}), point.value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "steward.eventlog.relay_lag"
        for point in metric.data.data_points  # type: ignore[union-attr]
    ]
    assert points == [({"steward.producer": "consent"}, 0)]
    assert transport.relays == []


def redact(producer: Producer, *person_ids: str) -> int:
    with producer.outbox.begin(producer.engine) as connection:
        return producer.outbox.redact(connection, person_ids)


def test_what_the_outbox_redacts_after_an_erasure_is_deleted_from_the_stream(
    producer: Producer, connection: JetStreamConnection, prefix: str
) -> None:
    producer.append(6)  # person-0 … person-5, one envelope each
    relay = Relay(connection, producer.log, prefix=prefix)
    relay.run_once()
    assert redact(producer, "person-1", "person-4") == 2

    assert relay.mirror_redactions() == 2
    assert relay.mirror_redactions() == 0  # done once
    left = stored(connection, f"{prefix.upper()}_CONSENT")
    assert [m.envelope.seq for m in left] == [1, 3, 4, 6]
    assert not any(b"person-1" in m.envelope.SerializeToString() for m in left)
    # A restarted relay finds them gone and carries on after the last envelope.
    producer.append(1)
    restarted = Relay(connection, producer.log, prefix=prefix)
    assert restarted.run_once() == 1
    assert restarted.mirror_redactions() == 0


# The consumer ------------------------------------------------------------------------------------


@dataclass
class ConsumerStore:
    engine: Engine
    tables: ConsumerTables
    applied: Table

    def apply(self, connection: Connection, envelope: events_pb2.Envelope) -> None:
        connection.execute(insert(self.applied).values(envelope_id=envelope.id, seq=envelope.seq))

    def applied_seqs(self) -> list[int]:
        with self.engine.connect() as connection:
            query = select(self.applied.c.seq).order_by(self.applied.c.seq)
            return list(connection.execute(query).scalars())


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
    metadata.create_all(engine)
    yield ConsumerStore(engine, tables, applied)
    engine.dispose()


def jetstream_consumer(
    store: ConsumerStore,
    connection: JetStreamConnection,
    producer: Producer,
    prefix: str,
    **options: object,
) -> Consumer:
    source = JetStreamEnvelopeSource(
        connection,
        "consent",
        "tagging",
        prefix=prefix,
        producer_log=GrpcEnvelopeSource(producer.channel, "consent", "tagging", timeout=5),
    )
    return Consumer(
        "tagging",
        "consent",
        source,
        store.engine,
        store.apply,
        tables=store.tables,
        **options,  # type: ignore[arg-type]
    )


def test_a_consumer_applies_each_envelope_once_resumes_from_its_cursor_and_acks_the_producer(
    producer: Producer, connection: JetStreamConnection, prefix: str, store: ConsumerStore
) -> None:
    relay = Relay(connection, producer.log, prefix=prefix)
    producer.append(30)
    relay.run_once()
    assert jetstream_consumer(store, connection, producer, prefix, batch_size=8).run_once() == 30
    producer.append(12)
    relay.run_once()

    restarted = jetstream_consumer(store, connection, producer, prefix, batch_size=8)
    assert restarted.cursor() == 30
    assert restarted.run_once() == 12
    assert restarted.run_once() == 0

    assert store.applied_seqs() == list(range(1, 43))
    assert producer.acknowledged("tagging") == 42


def test_a_consumer_whose_messages_were_delivered_but_never_acked_resumes_at_its_cursor(
    producer: Producer, connection: JetStreamConnection, prefix: str, store: ConsumerStore
) -> None:
    """As after a crash: JetStream has handed out messages the cursor never reached; they are
    delivered again at once, not after ack_wait, and nothing later is applied first."""
    relay = Relay(connection, producer.log, prefix=prefix)
    producer.append(20)
    relay.run_once()
    crashed = JetStreamEnvelopeSource(connection, "consent", "tagging", prefix=prefix)
    stream = crashed.envelopes(1)
    assert [next(stream).seq for _ in range(12)] == list(range(1, 13))
    stream.cancel()  # gone without acknowledging anything

    consumer = jetstream_consumer(store, connection, producer, prefix, batch_size=5)
    assert consumer.run_once(max_envelopes=5) == 5
    producer.append(5)
    relay.run_once()
    assert jetstream_consumer(store, connection, producer, prefix).run_once() == 20
    assert store.applied_seqs() == list(range(1, 26))


def test_a_consumer_reads_what_the_stream_no_longer_holds_from_the_producer(
    producer: Producer, connection: JetStreamConnection, prefix: str, store: ConsumerStore
) -> None:
    """Envelopes deleted from the stream after a redaction come from the producer's outbox,
    redacted, so a consumer behind them still applies every seq once."""
    producer.append(8)
    relay = Relay(connection, producer.log, prefix=prefix)
    relay.run_once()
    redact(producer, "person-2", "person-3")
    relay.mirror_redactions()

    consumer = jetstream_consumer(store, connection, producer, prefix, batch_size=3)
    assert consumer.run_once() == 8
    assert store.applied_seqs() == list(range(1, 9))
    with producer.engine.connect() as connection_:
        redacted = producer.outbox.read(connection_, 3, 2)
    assert [e.WhichOneof("body") for e in redacted] == ["redacted", "redacted"]


def test_a_consumer_behind_the_streams_retention_reads_the_rest_from_the_producer(
    producer: Producer, connection: JetStreamConnection, prefix: str, store: ConsumerStore
) -> None:
    producer.append(10)
    Relay(connection, producer.log, prefix=prefix).run_once()

    async def age_out(jetstream: JetStreamContext) -> int:
        await jetstream.purge_stream(f"{prefix.upper()}_CONSENT", keep=4)  # as max_age would
        return (await jetstream.stream_info(f"{prefix.upper()}_CONSENT")).state.first_seq

    assert connection.call(age_out) == 7
    assert jetstream_consumer(store, connection, producer, prefix).run_once() == 10
    assert store.applied_seqs() == list(range(1, 11))


def test_a_following_consumer_stops_promptly_while_waiting_for_messages(
    producer: Producer, connection: JetStreamConnection, prefix: str, store: ConsumerStore
) -> None:
    relay = Relay(connection, producer.log, prefix=prefix)
    relay.start()
    consumer = jetstream_consumer(store, connection, producer, prefix)
    consumer.start()
    try:
        producer.append(6)
        wait_until(lambda: consumer.cursor() == 6)
        wait_until(lambda: producer.acknowledged("tagging") == 6)
    finally:
        consumer.stop(timeout=5)
        relay.stop()
    assert not consumer.running
    assert store.applied_seqs() == list(range(1, 7))


def test_an_idle_following_consumer_keeps_its_session_and_stays_quiet(
    producer: Producer,
    connection: JetStreamConnection,
    prefix: str,
    store: ConsumerStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = Relay(connection, producer.log, prefix=prefix)
    producer.append(2)
    relay.run_once()
    consumer = jetstream_consumer(store, connection, producer, prefix)
    with caplog.at_level(logging.INFO, logger="services.common"):
        consumer.start()
        try:
            wait_until(lambda: consumer.cursor() == 2)
            time.sleep(3 * FETCH_SECONDS)  # pull requests expire with nothing new to deliver
            producer.append(1)
            relay.run_once()
            wait_until(lambda: consumer.cursor() == 3)
        finally:
            consumer.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert store.applied_seqs() == [1, 2, 3]


def test_a_consumer_killed_mid_stream_applies_every_envelope_exactly_once(
    producer: Producer,
    connection: JetStreamConnection,
    prefix: str,
    nats_url: str,
    db_url: str,
    tmp_path: Path,
) -> None:
    # The consumer's database on the backend under test: its own file on SQLite (the producer
    # writes to the other), the test's schema on PostgreSQL (no table names in common).
    sqlite = db_url.startswith("sqlite")
    consumer_db_url = f"sqlite:///{tmp_path / 'crash-consumer.db'}" if sqlite else db_url
    reader = make_engine(consumer_db_url)
    relay = Relay(connection, producer.log, prefix=prefix)
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
        except (OperationalError, ProgrammingError):  # the child has not created its tables yet
            return 0

    def spawn(log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                f"127.0.0.1:{producer.port}",
                consumer_db_url,
                "5",
                nats_url,
                prefix,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )

    relay.start()
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
        wait_until(lambda: applied() == total, timeout=60)
        wait_until(lambda: producer.acknowledged("crash-test") == total)
    finally:
        stop_writing.set()
        writer.join()
        child.terminate()
        child.wait(5)
        relay.stop()

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
    assert ended == total
    assert applied_ids == written_ids
