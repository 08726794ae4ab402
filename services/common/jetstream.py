"""NATS JetStream as the event log's production transport, behind the same interfaces.

With ``STEWARD_TRANSPORT=jetstream`` each producer process runs a :class:`Relay` per hosted log:
it reads the outbox in seq order and publishes every envelope to the stream
``<PREFIX>_<PRODUCER>`` on the subject ``<prefix>.<producer>.<body field>`` (for example
``steward.consent.behaviour_recorded``). Consumers read through :class:`JetStreamEnvelopeSource`, a
durable pull consumer named after the consumer, and still report their progress to the
producer's ``EventLogService.Ack``, so the producer's acknowledgements table (what consent reads
to tell that a withdrawal has reached everyone) fills in whichever transport carries the events.

Why the guarantees of the embedded transport still hold:

- Nothing lost: the outbox stays the source of truth. The relay advances only past envelopes
  JetStream has acknowledged, and after a restart it resumes after the envelope the stream holds
  last (its ``Steward-Seq`` header), so no table of its own is needed.
- Nothing twice in the stream: every message carries ``Nats-Msg-Id`` = envelope id, so a
  re-publish within the duplicate window is dropped; ``Nats-Expected-Last-Msg-Id`` makes
  JetStream refuse a message whose predecessor is missing, so pipelined publishes never store
  out of order.
- Nothing applied twice: the consumer's cursor in its own database decides, as with the
  embedded transport; JetStream's redeliveries are skipped. A session starts the durable
  consumer at the cursor: it is reused when its acknowledged position is exactly there (a clean
  restart) and recreated there otherwise (after a crash, rather than waiting out ``ack_wait``
  for the unacknowledged messages to come back behind newer ones).

Retention is limits-based on file storage: a stream keeps :data:`RETENTION_SECONDS` of
envelopes whether or not they were consumed (consumers do not delete them). What the stream no
longer holds, aged out or deleted, a consumer reads from the producer's outbox over
``Subscribe``; only what neither holds stops it with ``EnvelopeGap``. When an erasure redacts
the outbox, the relay deletes the redacted envelopes from the stream too, so the stream keeps
nothing the outbox no longer does. One running instance per consumer name: two processes
sharing a durable consumer would split its messages between them.

nats-py is asyncio and the services are threaded, so a :class:`JetStreamConnection` runs one
event loop on a daemon thread and everything else submits coroutines to it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from opentelemetry import metrics
from sqlalchemy import select
from steward.events.v1 import events_pb2

from services.common.consumer import GrpcEnvelopeSource, SourceUnavailable
from services.common.eventlog import PAGE_SIZE, ProducerLog
from services.common.outbox import REDACTED

logger = logging.getLogger(__name__)

Envelope = events_pb2.Envelope

SEQ_HEADER: Final = "Steward-Seq"
"""The envelope's seq on every message, so the relay finds where it stopped without parsing."""

RETENTION_SECONDS: Final = 30 * 24 * 3600.0
"""How long a stream keeps envelopes (limits-based retention): how long a consumer may be away."""

DUPLICATE_WINDOW_SECONDS: Final = 120.0
"""How long JetStream remembers message ids: a re-publish within it is dropped."""

ACK_WAIT_SECONDS: Final = 60.0
"""Unacknowledged messages come back after this; the consumer skips those it has applied."""

MAX_ACK_PENDING: Final = 20_000
"""Delivered but unacknowledged messages a consumer may hold; the consumer acks at least once a
second and whenever it catches up, so this only bounds a consumer that cannot ack."""

FETCH_BATCH: Final = 256
"""Messages asked for per pull request."""

FETCH_SECONDS: Final = 1.0
"""How long a pull request lingers for new messages before it is renewed."""

REQUEST_SECONDS: Final = 5.0
"""Bound on every other round trip to NATS (stream and consumer management, publish acks)."""

RECONNECT_ATTEMPTS: Final = 4
"""Attempts, half a second apart, to reach NATS before a call fails (and the connection closes,
to be made again by the next call)."""

POLL_INTERVAL_SECONDS: Final = 0.5
"""How long the relay waits for a notification before re-reading the outbox anyway."""

REDACTION_CHECK_SECONDS: Final = 1.0
"""How often, at most, the relay looks for envelopes redacted in the outbox since its last look."""

FILL_LIMIT: Final = 10_000
"""Most envelopes read from the producer at once to fill a gap in the stream."""

LAG_LOG_SECONDS: Final = 30.0
"""A relay behind its outbox says so at most this often."""

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_T = TypeVar("_T")


class JetStreamUnavailable(SourceUnavailable):
    """NATS or JetStream cannot be reached or refused a request; try again later."""


def stream_name(prefix: str, producer: str) -> str:
    """``<PREFIX>_<PRODUCER>``: one stream per producer."""
    return f"{_checked(prefix)}_{_checked(producer)}".upper()


def subject(prefix: str, producer: str, kind: str) -> str:
    """``<prefix>.<producer>.<kind>``, ``kind`` being the Envelope body's oneof field name."""
    return f"{_checked(prefix)}.{_checked(producer)}.{kind}"


def stream_config(prefix: str, producer: str) -> StreamConfig:
    """The one configuration of a producer's stream, made alike by relays and consumers."""
    return StreamConfig(
        name=stream_name(prefix, producer),
        description=f"Steward event log of {producer}",
        subjects=[f"{_checked(prefix)}.{_checked(producer)}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=RETENTION_SECONDS,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        # Single messages are deleted only to follow an erasure's redaction of the outbox.
        deny_delete=False,
    )


def _checked(name: str) -> str:
    # Dots and wildcards would change what a subject or stream name means.
    if not _NAME.match(name):
        raise ValueError(f"{name!r} cannot be part of a NATS subject or stream name")
    return name


# The connection ------------------------------------------------------------------------------


class JetStreamConnection:
    """One NATS connection on its own event-loop thread, for synchronous callers.

    Connects on first use and reconnects by itself afterwards, so a process starts even while
    NATS is away; calls made meanwhile raise :class:`JetStreamUnavailable`. Thread-safe.
    """

    def __init__(self, url: str, *, name: str = "steward") -> None:
        self.url = url
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"jetstream-{name}", daemon=True
        )
        self._thread.start()
        self._client: NatsClient | None = None
        self._jetstream_context: JetStreamContext | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    def submit(
        self, work: Callable[[JetStreamContext], Awaitable[_T]]
    ) -> concurrent.futures.Future[_T]:
        """Run ``work(jetstream)`` on the loop; the future can be cancelled from any thread."""
        if self._closed:
            raise JetStreamUnavailable("the JetStream connection is closed")
        return asyncio.run_coroutine_threadsafe(self._run(work), self._loop)

    def call(
        self, work: Callable[[JetStreamContext], Awaitable[_T]], timeout: float = REQUEST_SECONDS
    ) -> _T:
        """Run ``work(jetstream)`` and wait for its result; NATS failures become
        :class:`JetStreamUnavailable`."""
        return _result(self.submit(work), timeout, f"NATS at {self.url}")

    async def _run(self, work: Callable[[JetStreamContext], Awaitable[_T]]) -> _T:
        return await work(await self._jetstream())

    async def _jetstream(self) -> JetStreamContext:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is None or self._client.is_closed or self._jetstream_context is None:
                # A few attempts, then the client closes: the next call connects afresh, and a
                # call never waits long on a NATS that is away (the caller backs off and retries).
                self._client = await nats.connect(
                    self.url,
                    name=self._name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=RECONNECT_ATTEMPTS,
                    reconnect_time_wait=0.5,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                # One context for the connection: each subscribes an inbox for async publishes.
                # Relays publish a page at a time and wait for its acks, so up to four relays'
                # pages are in flight before a publish waits for a slot.
                self._jetstream_context = self._client.jetstream(
                    timeout=REQUEST_SECONDS, publish_async_max_pending=4 * PAGE_SIZE
                )
            return self._jetstream_context

    async def _on_error(self, error: Exception) -> None:
        # nats-py's default logs a traceback per failed attempt; one line says as much.
        logger.warning("NATS at %s: %r", self.url, error)

    async def _on_disconnected(self) -> None:
        logger.info("disconnected from NATS at %s", self.url)

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS at %s", self.url)

    def close(self, timeout: float = 2.0) -> None:
        """Close the connection and end the loop thread; later calls raise."""
        if self._closed:
            return
        self._closed = True

        async def shut() -> None:
            if self._client is not None and not self._client.is_closed:
                await self._client.close()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout)
        except Exception as exc:  # shutting down: nothing left to tell
            logger.warning("closing the NATS connection failed: %r", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()


def _result(future: concurrent.futures.Future[_T], timeout: float, what: str) -> _T:
    """The future's result; a NATS failure, or no answer within ``timeout``, raises
    :class:`JetStreamUnavailable` naming ``what``. Cancellation passes through."""
    try:
        return future.result(timeout)
    except TimeoutError as exc:  # concurrent.futures' and asyncio's both are this one
        if not future.done():
            future.cancel()
            raise JetStreamUnavailable(f"{what}: NATS did not answer in time") from None
        raise JetStreamUnavailable(f"{what}: {exc!r}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise JetStreamUnavailable(f"{what}: {exc!r}") from exc


async def ensure_stream(jetstream: JetStreamContext, prefix: str, producer: str) -> StreamInfo:
    """Create the producer's stream, or bring an existing one to :func:`stream_config`."""
    config = stream_config(prefix, producer)
    try:
        return await jetstream.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:  # "stream name already in use with a different configuration"
            raise
        return await jetstream.update_stream(config)


# The relay -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Position:
    """The last envelope the stream holds: its seq and id (id unknown once aged out)."""

    seq: int
    envelope_id: str | None


class Relay:
    """Publishes one producer's outbox to its JetStream stream, in seq order, each envelope once.

    Wakes when the producer calls ``Outbox.notify`` and polls every ``poll_interval`` for
    writers in other processes. Failures (NATS away, a publish refused) are logged and retried
    after a backoff, resuming from what the stream holds.
    """

    def __init__(
        self,
        connection: JetStreamConnection,
        log: ProducerLog,
        *,
        prefix: str,
        page_size: int = PAGE_SIZE,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        max_backoff: float = 5.0,
    ) -> None:
        self.producer = log.outbox.producer
        self.stream = stream_name(prefix, self.producer)
        self._prefix = prefix
        self._connection = connection
        self._log = log
        self._page_size = page_size
        self._poll_interval = poll_interval
        self._max_backoff = max_backoff
        self._position: _Position | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_lag_log = 0.0
        self._erased: set[int] = set()
        self._next_redaction_check = 0.0
        self.lag = 0
        """Envelopes in the outbox not yet in the stream, as of the relay's last look."""

    @property
    def published_seq(self) -> int:
        """The seq of the last envelope the stream is known to hold (0 before the first)."""
        return 0 if self._position is None else self._position.seq

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._follow, name=f"relay-{self.producer}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the page in flight; returns once the thread has ended (or ``timeout``)."""
        self._stopping.set()
        self._log.outbox.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> int:
        """Publish everything the outbox holds beyond the stream; returns how many were sent.

        For tests and tools: errors are raised, not retried.
        """
        total = 0
        while True:
            sent = self._relay_page()
            total += sent
            if sent < self._page_size:
                return total

    def _follow(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                seen = self._log.outbox.notifications
                while self._relay_page() == self._page_size and not self._stopping.is_set():
                    pass
                if time.monotonic() >= self._next_redaction_check:
                    self.mirror_redactions()
                    self._next_redaction_check = time.monotonic() + REDACTION_CHECK_SECONDS
                failures = 0
                self._log.outbox.wait(seen, self._poll_interval)
            except Exception as exc:
                failures += 1
                self._position = None  # resume from what the stream holds
                logger.warning(
                    "relaying the %s log to JetStream failed: %s",
                    self.producer,
                    exc,
                    extra={"producer": self.producer, "stream": self.stream},
                )
                self._stopping.wait(min(self._max_backoff, 0.1 * 2.0 ** min(failures, 10)))

    def _relay_page(self) -> int:
        if self._position is None:
            self._position = self._connection.call(self._resume)
        position = self._position
        with self._log.engine.connect() as connection:
            page = self._log.outbox.read(connection, position.seq + 1, self._page_size)
            last_seq = self._log.outbox.last_seq(connection)
        if page:

            async def publish(jetstream: JetStreamContext) -> None:
                await self._publish(jetstream, page, position.envelope_id)

            self._connection.call(publish, timeout=2 * REQUEST_SECONDS)
            self._position = _Position(page[-1].seq, page[-1].id)
        self._report_lag(last_seq)
        return len(page)

    def mirror_redactions(self) -> int:
        """Delete from the stream the envelopes the outbox has redacted since the last look;
        returns how many were deleted.

        An erasure redacts the outbox once every consumer has applied it; without this the
        stream would keep what named the person until it aged out. JetStream deletes a message
        by overwriting it. A consumer that still needs one of them reads the redacted envelope
        from the producer instead (see :class:`JetStreamEnvelopeSource`).
        """
        outbox = self._log.outbox.tables.outbox
        query = select(outbox.c.seq).where(
            outbox.c.kind == REDACTED, outbox.c.seq <= self.published_seq
        )
        with self._log.engine.connect() as connection:
            redacted = [int(seq) for seq in connection.execute(query).scalars()]
        new = [seq for seq in redacted if seq not in self._erased]
        if not new:
            return 0

        async def delete(jetstream: JetStreamContext) -> int:
            deleted = 0
            for seq in new:
                try:
                    message = await jetstream.get_msg(self.stream, seq=seq)
                except nats.js.errors.NotFoundError:
                    continue  # deleted before (a restart), or aged out
                if (message.headers or {}).get(SEQ_HEADER) != str(seq):
                    logger.warning(
                        "stream %s holds envelope %s at seq %d; left in place",
                        self.stream,
                        (message.headers or {}).get(SEQ_HEADER),
                        seq,
                    )
                    continue
                await jetstream.delete_msg(self.stream, seq)
                deleted += 1
            return deleted

        deleted = self._connection.call(delete, timeout=REQUEST_SECONDS + len(new))
        self._erased.update(new)
        return deleted

    async def _resume(self, jetstream: JetStreamContext) -> _Position:
        info = await ensure_stream(jetstream, self._prefix, self.producer)
        last = info.state.last_seq
        if last == 0:
            return _Position(0, None)
        try:
            message = await jetstream.get_msg(self.stream, seq=last)
        except nats.js.errors.NotFoundError:
            # Everything aged out: the relay keeps stream seq == envelope seq, so `last` is it.
            return _Position(last, None)
        headers = message.headers or {}
        return _Position(int(headers[SEQ_HEADER]), headers.get("Nats-Msg-Id"))

    async def _publish(
        self, jetstream: JetStreamContext, page: list[Envelope], previous_id: str | None
    ) -> None:
        """Publish ``page`` pipelined (at most a page in flight) and wait for every ack."""
        acks: list[asyncio.Future[Any]] = []
        try:
            for envelope in page:
                headers = {"Nats-Msg-Id": envelope.id, SEQ_HEADER: str(envelope.seq)}
                if previous_id is not None:
                    headers["Nats-Expected-Last-Msg-Id"] = previous_id
                kind = envelope.WhichOneof("body") or "unknown"
                acks.append(
                    await jetstream.publish_async(
                        subject(self._prefix, self.producer, kind),
                        envelope.SerializeToString(),
                        stream=self.stream,
                        headers=headers,
                    )
                )
                previous_id = envelope.id
            await asyncio.wait_for(asyncio.gather(*acks), REQUEST_SECONDS)
        finally:
            # An ack never awaited would hold its slot among the pending publishes for good.
            for ack in acks:
                ack.cancel()

    def _report_lag(self, last_seq: int) -> None:
        lag = self.lag = max(last_seq - self.published_seq, 0)
        now = time.monotonic()
        if lag > 0 and now >= self._next_lag_log:
            self._next_lag_log = now + LAG_LOG_SECONDS
            logger.info(
                "relay of %s is %d envelopes behind its outbox",
                self.producer,
                lag,
                extra={"producer": self.producer, "stream": self.stream, "lag": lag},
            )


# The consumer's source -----------------------------------------------------------------------


class JetStreamEnvelopeSource:
    """Reads a producer's stream through the durable pull consumer ``consumer``.

    ``ack`` acknowledges the JetStream messages up to the seq (the consumer acks all below with
    one message) and then reports the seq to the producer's ``EventLogService.Ack`` through
    ``producer_log``, which is what records the acknowledgement the producer keeps.
    """

    def __init__(
        self,
        connection: JetStreamConnection,
        producer: str,
        consumer: str,
        *,
        prefix: str,
        producer_log: GrpcEnvelopeSource | None = None,
        fetch_batch: int = FETCH_BATCH,
        fetch_seconds: float = FETCH_SECONDS,
    ) -> None:
        self.producer = producer
        self.consumer = _checked(consumer)
        self.stream = stream_name(prefix, producer)
        self._prefix = prefix
        self._connection = connection
        self._producer_log = producer_log
        self._fetch_batch = fetch_batch
        self._fetch_seconds = fetch_seconds
        self._lock = threading.Lock()
        self._unacked: dict[int, Msg] = {}

    def envelopes(self, from_seq: int, *, stop_at_end: bool = False) -> _JetStreamEnvelopeStream:
        with self._lock:
            self._unacked.clear()  # the consumer is about to be positioned afresh
        return _JetStreamEnvelopeStream(self, max(from_seq, 1), stop_at_end)

    def ack(self, seq: int) -> int:
        with self._lock:
            done = [s for s in self._unacked if s <= seq]
            newest = self._unacked[max(done)] if done else None
            for s in done:
                del self._unacked[s]
        if newest is not None:
            message = newest

            async def acknowledge(_jetstream: JetStreamContext) -> None:
                await message.ack()

            try:
                self._connection.call(acknowledge)
            except JetStreamUnavailable as exc:
                # Redelivered later and skipped by the cursor: only the producer's record counts.
                logger.warning("acknowledging seq %d to JetStream failed: %s", seq, exc)
        if self._producer_log is None:
            return seq
        return self._producer_log.ack(seq)

    def _delivered(self, seq: int, message: Msg) -> None:
        with self._lock:
            self._unacked[seq] = message

    async def _position(self, jetstream: JetStreamContext, from_seq: int) -> int:
        """Point the durable consumer at ``from_seq``; returns how many messages it has to go.

        Reused when everything before ``from_seq`` is acknowledged and nothing after it is
        out for delivery; otherwise deleted and created again at ``from_seq``.
        """
        info = await ensure_stream(jetstream, self._prefix, self.producer)
        start = await self._stream_seq_of(jetstream, info, from_seq)
        try:
            current: ConsumerInfo | None = await jetstream.consumer_info(self.stream, self.consumer)
        except nats.js.errors.NotFoundError:
            current = None
        if current is not None:
            acked = current.ack_floor.stream_seq if current.ack_floor else 0
            delivered = current.delivered.stream_seq if current.delivered else 0
            if acked == delivered == start - 1:
                return current.num_pending or 0
            await jetstream.delete_consumer(self.stream, self.consumer)
        created = await jetstream.add_consumer(
            self.stream,
            ConsumerConfig(
                durable_name=self.consumer,
                description=f"Steward consumer {self.consumer} of {self.producer}",
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=AckPolicy.ALL,
                ack_wait=ACK_WAIT_SECONDS,
                max_ack_pending=MAX_ACK_PENDING,
            ),
        )
        return created.num_pending or 0

    async def _stream_seq_of(
        self, jetstream: JetStreamContext, info: StreamInfo, envelope_seq: int
    ) -> int:
        """The stream seq of the first message whose envelope seq is ``envelope_seq`` or more
        (or where it was, if deleted).

        The relay keeps the two equal, so the first probe normally answers; otherwise a binary
        search over the stream, whose envelope seqs only grow.
        """
        low, high = info.state.first_seq, info.state.last_seq
        if info.state.messages == 0 or envelope_seq > high:
            return max(high + 1, 1)
        if envelope_seq <= low:
            return low  # older envelopes aged out: the gap is filled from the producer

        async def seq_at(stream_seq: int) -> int | None:
            """The envelope seq of the first message at or after ``stream_seq``."""
            for probe in range(stream_seq, high + 1):
                try:
                    message = await jetstream.get_msg(self.stream, seq=probe)
                except nats.js.errors.NotFoundError:
                    continue  # deleted after a redaction
                return int((message.headers or {})[SEQ_HEADER])
            return None

        found = await seq_at(envelope_seq)
        if found is None or found >= envelope_seq:
            return envelope_seq
        while low < high:
            middle = (low + high) // 2
            at_middle = await seq_at(middle)
            if at_middle is not None and at_middle < envelope_seq:
                low = middle + 1
            else:
                high = middle
        return low

    def _fill(self, first: int, end: int) -> list[Envelope]:
        """Envelopes ``first`` up to (not including) ``end`` read from the producer itself, for
        what the stream no longer holds (deleted after a redaction, or aged out)."""
        if self._producer_log is None:
            return []
        stream = self._producer_log.envelopes(first, stop_at_end=True)
        found: list[Envelope] = []
        try:
            for envelope in stream:
                if envelope.seq >= end or len(found) >= FILL_LIMIT:
                    break
                found.append(envelope)
        finally:
            stream.cancel()
        return found


class _JetStreamEnvelopeStream:
    """One session of a :class:`JetStreamEnvelopeSource`: envelopes from a seq, in seq order."""

    def __init__(self, source: JetStreamEnvelopeSource, from_seq: int, stop_at_end: bool) -> None:
        self._source = source
        self._next_seq = from_seq
        self._stop_at_end = stop_at_end
        self._lock = threading.Lock()
        self._cancelled = False
        self._pending: concurrent.futures.Future[Any] | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None
        self._remaining: int | None = None
        self._buffer: collections.deque[tuple[Envelope, Msg | None]] = collections.deque()
        """Envelopes to hand on, with their message (``None``: read from the producer)."""

    def __iter__(self) -> _JetStreamEnvelopeStream:
        return self

    def __next__(self) -> Envelope:
        while True:
            while self._buffer:
                envelope, message = self._buffer.popleft()
                if envelope.seq < self._next_seq:
                    continue  # redelivered after ack_wait: yielded already
                if envelope.seq > self._next_seq and message is not None:
                    filled = self._source._fill(self._next_seq, envelope.seq)
                    if filled:
                        self._buffer.appendleft((envelope, message))
                        self._buffer.extendleft((e, None) for e in reversed(filled))
                        continue
                if envelope.seq > self._next_seq:
                    # Handed on all the same: the Consumer keeps what came before, raises
                    # EnvelopeGap, and its next session positions the durable consumer afresh.
                    logger.info(
                        "%s stream skipped from seq %d to %d",
                        self._source.producer,
                        self._next_seq,
                        envelope.seq,
                    )
                self._next_seq = envelope.seq + 1
                if message is not None:
                    self._source._delivered(envelope.seq, message)
                return envelope
            if self._stop_at_end and self._remaining == 0:
                self.cancel()
            messages = self._fetch()
            if messages is None:
                raise StopIteration
            for message in messages:
                self._buffer.append((Envelope.FromString(message.data), message))
                self._remaining = message.metadata.num_pending

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            pending, self._pending = self._pending, None
            subscription, self._subscription = self._subscription, None
        if pending is not None:
            pending.cancel()
        if subscription is not None:
            with contextlib.suppress(JetStreamUnavailable):
                self._source._connection.submit(lambda _js: subscription.unsubscribe())

    def _fetch(self) -> list[Msg] | None:
        """The next messages; ``[]`` when none came in time, ``None`` once the stream is over."""
        source = self._source
        with self._lock:
            if self._cancelled:
                return None
            if self._subscription is None:
                self._pending = source._connection.submit(self._subscribe)
            else:
                subscription = self._subscription

                async def fetch(_jetstream: JetStreamContext) -> list[Msg]:
                    try:
                        return await subscription.fetch(
                            source._fetch_batch, timeout=source._fetch_seconds
                        )
                    except TimeoutError:  # nothing new (nats-py raises its own and asyncio's)
                        return []

                self._pending = source._connection.submit(fetch)
            pending = self._pending
        try:
            result = _result(pending, source._fetch_seconds + REQUEST_SECONDS, source.stream)
        except concurrent.futures.CancelledError:
            return None
        with self._lock:
            if self._cancelled:
                return None
        if isinstance(result, list):
            if not result and self._stop_at_end:
                return None
            return result
        return []  # subscribed; fetch next time round

    async def _subscribe(self, jetstream: JetStreamContext) -> None:
        source = self._source
        self._remaining = await source._position(jetstream, self._next_seq)
        subscription = await jetstream.pull_subscribe_bind(
            durable=source.consumer, stream=source.stream
        )
        with self._lock:
            if self._cancelled:
                await subscription.unsubscribe()
                return
            self._subscription = subscription


# The process's transport ---------------------------------------------------------------------


class JetStreamTransport:
    """A process's way onto JetStream: its connection, the relays of the logs it produces and
    the sources of the logs it consumes.

    ``source`` has the signature of ``GrpcEnvelopeSource``, so ``start_log_consumers`` takes
    either; the channel it is given carries the acknowledgements to the producer.
    """

    def __init__(
        self, url: str, prefix: str, *, name: str = "steward", meter: metrics.Meter | None = None
    ) -> None:
        self.prefix = _checked(prefix)
        self.connection = JetStreamConnection(url, name=name)
        self.relays: list[Relay] = []
        if meter is not None:
            meter.create_observable_gauge(
                "steward.eventlog.relay_lag",
                callbacks=[self._observe_lag],
                unit="{envelope}",
                description="Envelopes in a producer's outbox not yet published to JetStream",
            )

    def _observe_lag(self, _options: metrics.CallbackOptions) -> Iterator[metrics.Observation]:
        for relay in self.relays:
            yield metrics.Observation(relay.lag, {"steward.producer": relay.producer})

    def source(
        self, channel: grpc.Channel, producer: str, consumer: str
    ) -> JetStreamEnvelopeSource:
        return JetStreamEnvelopeSource(
            self.connection,
            producer,
            consumer,
            prefix=self.prefix,
            producer_log=GrpcEnvelopeSource(channel, producer, consumer),
        )

    def start_relays(self, logs: Mapping[str, ProducerLog]) -> None:
        for log in logs.values():
            relay = Relay(self.connection, log, prefix=self.prefix)
            relay.start()
            self.relays.append(relay)

    def stop_relays(self) -> None:
        relays, self.relays = self.relays, []
        for relay in relays:
            relay.stop()

    def close(self) -> None:
        """Stop the relays, then the connection; consumers must be stopped already."""
        self.stop_relays()
        self.connection.close()


def delete_streams(url: str, prefix: str, producers: tuple[str, ...]) -> None:
    """Delete the streams (and with them their consumers) of ``producers`` under ``prefix``.

    For tests and for tearing down a deployment; a missing stream is not an error.
    """
    connection = JetStreamConnection(url, name="steward-cleanup")
    try:
        for producer in producers:
            name = stream_name(prefix, producer)

            async def delete(jetstream: JetStreamContext, name: str = name) -> None:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await jetstream.delete_stream(name)

            connection.call(delete)
    finally:
        connection.close()
