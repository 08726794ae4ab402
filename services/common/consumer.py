"""The consumer side of the event log: apply each envelope exactly once, resume after a crash.

A consumer (tagging, recommend) keeps its position in the producer's log, a cursor, in its OWN
database and advances it in the same transaction as the effects of the envelopes it applies. A
crash therefore loses nothing and applies nothing twice: after a restart the consumer asks for
everything after its cursor, and whatever is delivered again (seq <= cursor) is skipped.

Envelopes arrive through an :class:`EnvelopeSource`. :class:`GrpcEnvelopeSource` reads the
producer's own ``EventLogService.Subscribe`` stream (the embedded default);
``services.common.jetstream.JetStreamEnvelopeSource`` reads a JetStream durable consumer.
Acknowledgements to the producer only report progress (for the auditor, and so consent can tell a
withdrawal has propagated); they are best effort and are never what makes delivery reliable.

Typical use in a consumer::

    tables = consumer_tables(target_metadata)            # in the service's store.py
    source = GrpcEnvelopeSource(channel, producer="consent", consumer="tagging")
    consumer = Consumer("tagging", "consent", source, engine, apply, tables=tables)
    consumer.start()                                     # follows until consumer.stop()

A consumer whose work per envelope is cheap but whose follow-up is not (tagging re-evaluates a
person's tags after each of their events) passes ``end_batch`` too: ``apply`` records what each
envelope says, and ``end_batch`` does the follow-up once for the whole batch, in the same
transaction, before the cursor moves.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

import grpc
from opentelemetry.trace import SpanKind, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from steward.events.v1 import events_pb2, events_pb2_grpc

from services.common.db import for_writes
from services.common.eventlog import SHUTTING_DOWN

logger = logging.getLogger(__name__)

Envelope = events_pb2.Envelope

Apply = Callable[[Connection, Envelope], None]
"""Applies one envelope's effects with the consumer's connection; must not commit."""

EndBatch = Callable[[Connection, Sequence[Envelope]], None]
"""Finishes a batch: called once per transaction, after ``apply`` has run for each of the
envelopes given (those applied in it, in seq order) and before the cursor moves; must not
commit. Whatever it writes commits, or rolls back, with the batch and the cursor."""

SourceFactory = Callable[[grpc.Channel, str, str], "EnvelopeSource"]
"""``(channel to the producer, producer, consumer)`` to the source a consumer reads: the
transport is chosen where the process is composed, and the channel always carries the Acks."""

AfterCommit = Callable[[Sequence[Envelope]], None]
"""Called with the envelopes a transaction applied, once it has committed; must not raise."""

BATCH_SIZE: Final = 200
"""Most envelopes applied per transaction of the consumer's database."""

LINGER_SECONDS: Final = 0.01
"""How long a batch may wait to fill once its first envelope has arrived."""

ACK_INTERVAL_SECONDS: Final = 1.0
"""Under steady load, acknowledge at most this often; a consumer that catches up acks at once."""

_TRANSIENT_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_TAKE_TIMEOUT_SECONDS: Final = 0.2
_PROPAGATOR: Final = TraceContextTextMapPropagator()


# Tables --------------------------------------------------------------------------------------


LOG_CONSUMERS: Final[Mapping[str, Mapping[str, str]]] = {
    "consent": {"tagging": "tagging", "recommend": "recommend"},
    "identity": {"consent": "consent-persons", "tagging": "tagging", "recommend": "recommend"},
}
"""Per producer, the services that consume its log and the consumer name each reads it under.
A producer waits for the acknowledgements of those deployed before an erasure or a withdrawal
counts as done everywhere (and before it redacts what named an erased person)."""


@dataclass(frozen=True, slots=True)
class ConsumerTables:
    """The consumer-side table, on the consumer service's own metadata (and migrations)."""

    cursors: Table
    """Per (consumer, producer), the seq of the last envelope applied."""


def consumer_tables(metadata: MetaData, *, prefix: str = "") -> ConsumerTables:
    """Add ``consumer_cursors`` to a service's ``metadata``.

    ``prefix`` exists for deployments where several services share one database.
    """
    cursors = Table(
        f"{prefix}consumer_cursors",
        metadata,
        Column("consumer", String(64), nullable=False),
        Column("producer", String(64), nullable=False),
        Column("seq", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("consumer", "producer"),
    )
    return ConsumerTables(cursors)


# Sources -------------------------------------------------------------------------------------


class SourceUnavailable(Exception):
    """The producer cannot be reached just now; try again later."""


class EnvelopeGap(Exception):
    """The source skipped envelopes: delivering the next one would break exactly-once."""


class ApplyFailed(Exception):
    """``apply`` raised for an envelope; the cause is chained. Nothing of its batch was kept."""

    def __init__(self, seq: int, envelope_id: str, message: str = "") -> None:
        super().__init__(message or f"applying envelope seq {seq} ({envelope_id}) failed")
        self.seq = seq
        self.envelope_id = envelope_id


class BatchEndFailed(ApplyFailed):
    """``end_batch`` raised for the batch ending at ``seq``; the cause is chained. Nothing of the
    batch was kept, and its envelopes are retried one per transaction."""

    def __init__(self, seq: int, envelope_id: str) -> None:
        super().__init__(
            seq, envelope_id, f"finishing the batch that ends at seq {seq} ({envelope_id}) failed"
        )


class EnvelopeStream(Protocol):
    """Envelopes in seq order; blocks for the next one. ``cancel`` may be called from any thread
    and ends the iteration (StopIteration) even while it is blocked."""

    def __iter__(self) -> Iterator[Envelope]: ...

    def __next__(self) -> Envelope: ...

    def cancel(self) -> None: ...


class EnvelopeSource(Protocol):
    """Where one consumer reads one producer's log, whatever the transport."""

    def envelopes(self, from_seq: int, *, stop_at_end: bool = False) -> EnvelopeStream:
        """Envelopes from ``from_seq`` on; following new ones unless ``stop_at_end``.

        Raises :class:`SourceUnavailable` (from the iteration) when the producer cannot be
        reached.
        """
        ...

    def ack(self, seq: int) -> int:
        """Report that everything up to ``seq`` is applied; returns the acknowledged seq."""
        ...


class GrpcEnvelopeSource:
    """Reads a producer's log over its ``EventLogService`` (Subscribe and Ack).

    ``timeout`` bounds each Ack. Subscribe streams carry a deadline of ``stream_seconds`` and
    are transparently re-opened from the next seq when it passes, so every call has a deadline
    and a silently dead connection is noticed even without keepalives.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        producer: str,
        consumer: str,
        timeout: float = 10.0,
        *,
        stream_seconds: float = 300.0,
    ) -> None:
        self.producer = producer
        self.consumer = consumer
        self._stub = events_pb2_grpc.EventLogServiceStub(channel)
        self._timeout = timeout
        self._stream_seconds = stream_seconds

    def envelopes(self, from_seq: int, *, stop_at_end: bool = False) -> EnvelopeStream:
        return _GrpcEnvelopeStream(self, from_seq, stop_at_end)

    def ack(self, seq: int) -> int:
        request = events_pb2.AckRequest(producer=self.producer, consumer=self.consumer, seq=seq)
        return self._stub.Ack(request, timeout=self._timeout).acknowledged_seq

    def _subscribe(
        self, from_seq: int, stop_at_end: bool
    ) -> grpc.CallIterator[events_pb2.SubscribeResponse]:
        request = events_pb2.SubscribeRequest(
            producer=self.producer,
            consumer=self.consumer,
            from_seq=from_seq,
            stop_at_end=stop_at_end,
        )
        return self._stub.Subscribe(request, timeout=self._stream_seconds)


class _GrpcEnvelopeStream:
    def __init__(self, source: GrpcEnvelopeSource, from_seq: int, stop_at_end: bool) -> None:
        self._source = source
        self._next_seq = from_seq
        self._stop_at_end = stop_at_end
        self._lock = threading.Lock()
        self._cancelled = False
        self._call: grpc.CallIterator[events_pb2.SubscribeResponse] | None = None
        self._envelopes = self._read()

    def __iter__(self) -> Iterator[Envelope]:
        return self

    def __next__(self) -> Envelope:
        return next(self._envelopes)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._call is not None:
                # An intercepted channel (OpenTelemetry) hands back a plain generator.
                cancel = getattr(self._call, "cancel", None) or getattr(self._call, "close", None)
                if callable(cancel):
                    cancel()

    def _read(self) -> Iterator[Envelope]:
        while True:
            with self._lock:
                if self._cancelled:
                    return
                call = self._call = self._source._subscribe(self._next_seq, self._stop_at_end)
            try:
                for response in call:
                    self._next_seq = response.envelope.seq + 1
                    yield response.envelope
                return
            except grpc.RpcError as error:
                code = error.code()
                if self._cancelled:
                    return
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # our own periodic re-subscription
                if code in _TRANSIENT_CODES:
                    raise SourceUnavailable(
                        f"{self._source.producer} event log: {code.name}: {error.details()}"
                    ) from error
                raise


# Consumer ------------------------------------------------------------------------------------


class Consumer:
    """Applies one producer's envelopes to the consumer's database, each exactly once.

    ``apply`` is called once per envelope, in seq order, with a connection inside a transaction
    that also advances the cursor. Up to ``batch_size`` envelopes share a transaction: a batch
    is what has arrived, plus what arrives within ``linger`` of its first envelope, so a busy
    log is applied in full batches and a quiet one with at most ``linger`` of added delay (on
    this machine batching took a no-op consumer from about 1,300 to 7,000-10,000 envelopes/s,
    the linger about a third of that). If ``apply`` raises, the whole batch is
    rolled back and retried after a backoff, one envelope per transaction up to the failing one,
    so the cursor never passes an envelope that was not applied.

    ``end_batch``, if given, is called once per transaction after the batch's envelopes are
    applied and before the cursor is stored (see :data:`EndBatch`); if it raises, the batch is
    rolled back and retried one envelope per transaction, each with its own ``end_batch``, just
    as when ``apply`` fails.

    ``after_commit``, if given, is called with the envelopes of each committed transaction,
    after the commit: for what lives outside the database (a cache to drop), which must not
    change before what it mirrors has.

    Two instances with the same name never apply an envelope twice either: the cursor row is
    locked for the transaction (PostgreSQL) or the transaction is exclusive (SQLite), and each
    re-reads the cursor before applying.
    """

    def __init__(
        self,
        name: str,
        producer: str,
        source: EnvelopeSource,
        engine: Engine,
        apply: Apply,
        *,
        tables: ConsumerTables,
        end_batch: EndBatch | None = None,
        after_commit: AfterCommit | None = None,
        tracer_provider: TracerProvider | None = None,
        batch_size: int = BATCH_SIZE,
        ack_interval: float = ACK_INTERVAL_SECONDS,
        linger: float = LINGER_SECONDS,
        initial_backoff: float = 0.1,
        max_backoff: float = 10.0,
    ) -> None:
        if not name or not producer:
            raise ValueError("a consumer needs a name and a producer")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.name = name
        self.producer = producer
        self._source = source
        self._engine = engine
        self._writes = for_writes(engine)  # read-modify-write: take SQLite's lock up front
        self._apply = apply
        self._end_batch = end_batch
        self._after_commit = after_commit
        self._cursors = tables.cursors
        self._tracer = None if tracer_provider is None else tracer_provider.get_tracer(__name__)
        self._batch_size = batch_size
        self._ack_interval = ack_interval
        self._linger = linger
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff

        self._cursor_row_exists = False
        self._acked = 0
        self._last_ack_seq = 0
        self._next_ack_at = 0.0
        self._retry_singly_through = 0
        self._progressed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # Running ---------------------------------------------------------------------------------

    def cursor(self) -> int:
        """The seq of the last envelope applied (0 before the first)."""
        cursors = self._cursors
        query = select(cursors.c.seq).where(
            cursors.c.consumer == self.name, cursors.c.producer == self.producer
        )
        with self._engine.connect() as connection:
            return int(connection.execute(query).scalar_one_or_none() or 0)

    def run_once(self, max_envelopes: int | None = None, stop_at_end: bool = True) -> int:
        """Apply what the log holds after the cursor, then return how many were applied.

        For tests and batch jobs: errors (producer unreachable, ``apply`` failing) are raised,
        not retried. Stops after ``max_envelopes`` if given; with ``stop_at_end=False`` it
        follows the log until ``max_envelopes`` have been applied or :meth:`stop` is called.
        """
        if self.running:
            raise RuntimeError(f"consumer {self.name} is already running in the background")
        self._stopping.clear()
        return self._session(stop_at_end=stop_at_end, max_envelopes=max_envelopes)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Follow the log on a background thread until :meth:`stop`, reconnecting as needed."""
        with self._lock:
            if self.running:
                return
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._follow, name=f"consumer-{self.name}-{self.producer}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop following; returns once the current batch is committed (or ``timeout`` passed)."""
        self._stopping.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _follow(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._progressed = False
            try:
                self._session(stop_at_end=False, max_envelopes=None)
                failed = not self._stopping.is_set()  # the producer ended the stream
                if failed:
                    logger.info("event log stream ended; reconnecting", extra=self._log_fields())
            except SourceUnavailable as exc:
                failed = True
                # A producer stopping ends its streams on purpose: a restart, not a fault.
                planned = SHUTTING_DOWN in str(exc)
                logger.log(
                    logging.INFO if planned else logging.WARNING,
                    "event log unavailable: %s",
                    exc,
                    extra=self._log_fields(),
                )
            except ApplyFailed as exc:
                failed = True
                self._retry_singly_through = exc.seq
                logger.error(
                    "%s; will retry",
                    exc,
                    exc_info=exc.__cause__,
                    extra={**self._log_fields(), "seq": exc.seq, "envelope_id": exc.envelope_id},
                )
            except Exception:
                failed = True
                logger.exception("consuming the event log failed", extra=self._log_fields())
            failures = 0 if self._progressed else failures
            if failed:
                failures += 1
                self._stopping.wait(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff, jittered so restarted consumers do not reconnect in step."""
        delay = min(self._max_backoff, self._initial_backoff * 2.0 ** min(failures - 1, 30))
        return delay * random.uniform(0.5, 1.0)

    # Applying --------------------------------------------------------------------------------

    def _session(self, *, stop_at_end: bool, max_envelopes: int | None) -> int:
        """One subscription: from the cursor until the stream ends, ``max_envelopes`` or stop."""
        self._ensure_cursor_row()
        cursor = self.cursor()
        applied = 0
        prefetch = _Prefetcher(
            self._source.envelopes(cursor + 1, stop_at_end=stop_at_end),
            capacity=2 * self._batch_size,
            name=f"consumer-{self.name}-{self.producer}-reader",
        )
        try:
            while not self._stopping.is_set():
                limit = 1 if cursor < self._retry_singly_through else self._batch_size
                if max_envelopes is not None:
                    limit = min(limit, max_envelopes - applied)
                    if limit <= 0:
                        break
                batch = prefetch.take(limit, _TAKE_TIMEOUT_SECONDS, self._linger)
                if batch is None:
                    break
                if not batch:
                    self._ack(cursor, idle=True)
                    continue
                count, cursor = self._apply_batch(batch)
                applied += count
                self._progressed = True
                self._ack(cursor, idle=False)
        finally:
            prefetch.close()
            self._ack(cursor, idle=True)
        return applied

    def _apply_batch(self, batch: list[Envelope]) -> tuple[int, int]:
        """Apply the not yet applied envelopes of ``batch`` in one transaction.

        Returns how many were applied and the new cursor.
        """
        cursors = self._cursors
        row = (cursors.c.consumer == self.name) & (cursors.c.producer == self.producer)
        with self._writes.begin() as connection:
            # FOR UPDATE: a second instance of this consumer waits here, then sees our cursor.
            start = connection.execute(select(cursors.c.seq).where(row).with_for_update())
            cursor = first = int(start.scalar_one())
            gap: EnvelopeGap | None = None
            applied: list[Envelope] = []
            for envelope in batch:
                if envelope.seq <= cursor:
                    continue  # delivered again after a reconnect: applied already
                if envelope.seq != cursor + 1:
                    gap = EnvelopeGap(
                        f"{self.producer} log jumped from seq {cursor} to {envelope.seq}"
                    )
                    break
                try:
                    self._apply_one(connection, envelope)
                except Exception as exc:
                    raise ApplyFailed(envelope.seq, envelope.id) from exc
                applied.append(envelope)
                cursor = envelope.seq
            if applied and self._end_batch is not None:
                try:
                    self._finish_batch(connection, applied)
                except Exception as exc:
                    raise BatchEndFailed(applied[-1].seq, applied[-1].id) from exc
            if cursor != first:
                connection.execute(
                    update(cursors).where(row).values(seq=cursor, updated_at=datetime.now(UTC))
                )
        if applied and self._after_commit is not None:
            self._after_commit(applied)
        if gap is not None:
            raise gap  # after keeping what came before it
        return cursor - first, cursor

    def _apply_one(self, connection: Connection, envelope: Envelope) -> None:
        if self._tracer is None:
            self._apply(connection, envelope)
            return
        kind = envelope.WhichOneof("body") or "unknown"
        with self._tracer.start_as_current_span(
            f"apply {self.producer}/{kind}",
            context=_PROPAGATOR.extract(dict(envelope.trace_context)),
            kind=SpanKind.CONSUMER,
            attributes={
                "steward.producer": self.producer,
                "steward.consumer": self.name,
                "steward.seq": envelope.seq,
            },
        ):
            self._apply(connection, envelope)

    def _finish_batch(self, connection: Connection, applied: list[Envelope]) -> None:
        assert self._end_batch is not None
        if self._tracer is None:
            self._end_batch(connection, applied)
            return
        with self._tracer.start_as_current_span(
            f"end batch {self.producer}",
            kind=SpanKind.CONSUMER,
            attributes={
                "steward.producer": self.producer,
                "steward.consumer": self.name,
                "steward.seq": applied[-1].seq,
                "steward.batch_size": len(applied),
            },
        ):
            self._end_batch(connection, applied)

    def _ensure_cursor_row(self) -> None:
        if self._cursor_row_exists:
            return
        cursors = self._cursors
        with self._writes.begin() as connection:
            dialect = connection.dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            connection.execute(
                insert(cursors)
                .values(
                    consumer=self.name, producer=self.producer, seq=0, updated_at=datetime.now(UTC)
                )
                .on_conflict_do_nothing(index_elements=[cursors.c.consumer, cursors.c.producer])
            )
        self._cursor_row_exists = True

    def _ack(self, cursor: int, *, idle: bool) -> None:
        """Tell the producer how far we are: once the log goes quiet, else every ack_interval.

        Not after every batch: an empty prefetch queue does not mean the end of the log, and
        an Ack per batch (a round trip and a write on the producer) halved throughput.

        A failed ack is retried later, not now: acks only report progress, delivery relies on
        the cursor in our own database.
        """
        if cursor <= self._acked:
            return
        now = time.monotonic()
        if now < self._next_ack_at and not (idle and cursor != self._last_ack_seq):
            return
        self._last_ack_seq = cursor
        try:
            self._acked = self._source.ack(cursor)
            self._next_ack_at = now + self._ack_interval
        except Exception as exc:
            self._next_ack_at = now + 10 * self._ack_interval
            logger.warning("acknowledging seq %d failed: %s", cursor, exc, extra=self._log_fields())

    def _log_fields(self) -> dict[str, str]:
        return {"consumer": self.name, "producer": self.producer}


# Prefetching ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _End:
    error: Exception | None = None


class _Prefetcher:
    """Reads a blocking stream on its own thread, so the applier can take what has arrived.

    That is what makes batching free of added latency: a batch is whatever is already waiting,
    never a wait for more.
    """

    def __init__(self, stream: EnvelopeStream, *, capacity: int, name: str) -> None:
        self._stream = stream
        self._queue: queue.Queue[Envelope | _End] = queue.Queue(maxsize=capacity)
        self._closed = threading.Event()
        self._end: _End | None = None
        self._thread = threading.Thread(target=self._read, name=name, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        end = _End()
        try:
            for envelope in self._stream:
                if not self._put(envelope):
                    return
        except Exception as exc:  # handed over to the applier, which raises it
            end = _End(exc)
        self._put(end)

    def _put(self, item: Envelope | _End) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_TAKE_TIMEOUT_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def take(self, limit: int, timeout: float, linger: float) -> list[Envelope] | None:
        """Up to ``limit`` envelopes, waiting at most ``timeout`` for the first.

        Once one has arrived, waits at most ``linger`` more for the batch to fill, so a steady
        stream is applied in full batches while a lone envelope is held up only briefly.
        ``[]`` when none arrived in time, ``None`` once the stream has ended; a stream that
        failed raises its error here.
        """
        if self._end is not None:
            return self._ended()
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch: list[Envelope] = []
        linger_until = time.monotonic() + linger
        while True:
            if isinstance(item, _End):
                self._end = item
                break
            batch.append(item)
            if len(batch) >= limit:
                break
            try:
                item = self._queue.get(timeout=max(linger_until - time.monotonic(), 0.0))
            except queue.Empty:
                break
        return batch or self._ended()

    def _ended(self) -> list[Envelope] | None:
        assert self._end is not None
        if self._end.error is not None:
            raise self._end.error
        return None

    def close(self) -> None:
        self._closed.set()
        self._stream.cancel()
        self._thread.join(timeout=1.0)


def start_log_consumers(
    name: str,
    feeds: Sequence[tuple[str, Apply]],
    channel_to: Callable[[str], grpc.Channel],
    engine: Engine,
    *,
    tables: ConsumerTables,
    tracer_provider: TracerProvider | None = None,
    end_batch: EndBatch | None = None,
    after_commit: AfterCommit | None = None,
    batch_size: int = BATCH_SIZE,
    sources: SourceFactory = GrpcEnvelopeSource,
) -> list[Consumer]:
    """One started consumer ``name`` per (producer, apply) feed, each reading its producer's
    log through ``sources`` (its Subscribe stream on ``channel_to(producer)`` by default, or
    JetStream: see ``ServiceContext.envelope_sources``); stop them with :meth:`Consumer.stop`."""
    consumers = []
    for producer, apply in feeds:
        consumer = Consumer(
            name,
            producer,
            sources(channel_to(producer), producer, name),
            engine,
            apply,
            tables=tables,
            end_batch=end_batch,
            after_commit=after_commit,
            tracer_provider=tracer_provider,
            batch_size=batch_size,
        )
        consumer.start()
        consumers.append(consumer)
    return consumers
