"""The event log every producer (consent, identity, tagging) serves to its consumers.

One servicer serves each hosted producer's log by its producer name; the all-in-one
``steward serve`` hosts all three behind one EventLogService. The log itself is the producer's
outbox table (:mod:`services.common.outbox`), read in pages with short transactions so a slow
subscriber never holds a database connection while gRPC waits for it to take messages.

A following subscriber occupies one server thread for as long as it follows. It wakes when a
writer in this process calls ``Outbox.notify`` and otherwise re-reads every ``poll_interval``
(writers in other processes), and ends when the client goes away, the call's deadline passes, or
:meth:`EventLogServicer.close` is called on shutdown (UNAVAILABLE, so the consumer reconnects).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import grpc
from sqlalchemy.engine import Engine
from steward.events.v1 import events_pb2, events_pb2_grpc

from services.common.db import for_writes
from services.common.errors import (
    FieldViolations,
    abort,
    abort_failed_precondition,
    abort_invalid,
    abort_not_found,
)
from services.common.outbox import Outbox
from services.common.server import ServiceRegistration

SHUTTING_DOWN: Final = "the event log is shutting down"
"""Why a Subscribe stream ends when its process stops: a planned end, not a fault."""

logger = logging.getLogger(__name__)

SERVICE_NAME = "steward.events.v1.EventLogService"

PAGE_SIZE = 500
"""Envelopes read per query: one Collect batch, and few enough to hold in memory per stream."""

POLL_INTERVAL_SECONDS = 0.2
"""How long a follower waits for a notification before re-reading the log anyway."""

AckCallback = Callable[[str, str, int], None]
"""``(producer, consumer, acknowledged_seq)``, called after an acknowledgement is committed."""


@dataclass(frozen=True, slots=True)
class ProducerLog:
    """A hosted producer's log: its outbox and the engine of the producer's own database.

    ``outbox`` must be the same instance the producer appends with, or followers are only woken
    by polling.
    """

    outbox: Outbox
    engine: Engine
    on_ack: AckCallback | None = None
    """Told of every acknowledgement once it is committed (consent follows its withdrawals and
    erasures to every consumer this way)."""


class EventLogServicer(events_pb2_grpc.EventLogServiceServicer):
    """steward.events.v1.EventLogService for the producers hosted by this process."""

    def __init__(
        self,
        logs: Mapping[str, ProducerLog],
        *,
        page_size: int = PAGE_SIZE,
        poll_interval: float = POLL_INTERVAL_SECONDS,
    ) -> None:
        for producer, log in logs.items():
            if log.outbox.producer != producer:
                raise ValueError(
                    f"log {producer!r} is served by the outbox of {log.outbox.producer!r}"
                )
        if page_size < 1 or poll_interval <= 0:
            raise ValueError("page_size and poll_interval must be positive")
        self.logs = dict(logs)
        self._page_size = page_size
        self._poll_interval = poll_interval
        self._closing = threading.Event()

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(self.logs)

    def close(self) -> None:
        """End every following stream (UNAVAILABLE) and refuse new ones; call it on shutdown.

        Without it a graceful ``server.stop(grace)`` waits the whole grace period for followers,
        which by design never finish on their own.
        """
        self._closing.set()
        for log in self.logs.values():
            log.outbox.notify()

    def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[events_pb2.SubscribeResponse]:
        violations = FieldViolations()
        violations.check(bool(request.producer), "producer", "must not be empty")
        violations.check(bool(request.consumer), "consumer", "must not be empty")
        violations.check(request.from_seq >= 0, "from_seq", "must not be negative")
        if violations:
            abort_invalid(context, list(violations))
        log = self._log(request.producer, context)
        if self._closing.is_set():
            abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

        outbox, engine = log.outbox, log.engine
        next_seq = max(request.from_seq, 1)
        while True:
            seen = outbox.notifications
            with engine.connect() as connection:
                page = outbox.read(connection, next_seq, self._page_size)
            for envelope in page:
                yield events_pb2.SubscribeResponse(envelope=envelope)
            if page:
                next_seq = page[-1].seq + 1
            if len(page) == self._page_size:
                continue
            if request.stop_at_end:
                return
            outbox.wait(seen, self._poll_interval)
            if self._closing.is_set():
                abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            if not context.is_active():
                return

    def Ack(
        self, request: events_pb2.AckRequest, context: grpc.ServicerContext
    ) -> events_pb2.AckResponse:
        violations = FieldViolations()
        violations.check(bool(request.producer), "producer", "must not be empty")
        violations.check(bool(request.consumer), "consumer", "must not be empty")
        violations.check(request.seq >= 0, "seq", "must not be negative")
        if violations:
            abort_invalid(context, list(violations))
        log = self._log(request.producer, context)

        with for_writes(log.engine).begin() as connection:
            last_seq = log.outbox.last_seq(connection)
            if request.seq > last_seq:
                acknowledged = None
            else:
                acknowledged = log.outbox.record_ack(connection, request.consumer, request.seq)
        if acknowledged is None:
            abort_failed_precondition(
                context,
                [("SEQ", f"events/{request.producer}", f"the log ends at seq {last_seq}")],
                f"seq {request.seq} is beyond the end of the {request.producer} log",
            )
        if log.on_ack is not None:
            try:
                log.on_ack(request.producer, request.consumer, acknowledged)
            except Exception:
                # The acknowledgement is committed; the caller must not retry because of us.
                logger.exception(
                    "ack callback failed",
                    extra={"producer": request.producer, "consumer": request.consumer},
                )
        return events_pb2.AckResponse(acknowledged_seq=acknowledged)

    def _log(self, producer: str, context: grpc.ServicerContext) -> ProducerLog:
        log = self.logs.get(producer)
        if log is None:
            abort_not_found(context, "producer", producer, f"no event log for {producer!r} here")
        return log


def registration(logs: Mapping[str, ProducerLog]) -> ServiceRegistration[EventLogServicer]:
    """The event-log servicer for ``logs`` (producer name to log), ready for ``build_server``."""
    return ServiceRegistration(
        SERVICE_NAME,
        events_pb2_grpc.add_EventLogServiceServicer_to_server,
        EventLogServicer(logs),
    )
