"""Composition root: builds a process of one or all Steward services from settings.

``steward serve`` and the in-process test harness both start the suite through ``start_suite``,
so there is one way the services are put together.

A process serves its services twice: on the public address, for other processes, and on an
internal server with its own worker threads, on a Unix socket in a private directory, for the
calls its services make to each other (consent to identity, the consumers' Subscribe streams).
Were those calls served by the public server's workers, enough concurrent external calls that
each wait on identity would hold every worker, and the identity calls they wait for would queue
behind them for ever.

Only the public server authenticates (``services.common.auth``) and serves TLS. The internal
server has neither: its socket lies in a directory only this OS user may enter (mode 0700),
and whoever runs as that user can read the keyring, the TLS key and the callers file anyway,
so a credential there would protect nothing and cost every in-process call its check.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import grpc
from grpc_health.v1 import health
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from services.common import eventlog
from services.common.auth import access_interceptors, load_callers
from services.common.callers import Callers
from services.common.config import Settings
from services.common.consumer import GrpcEnvelopeSource
from services.common.context import ServiceContext, ServiceParts
from services.common.interceptors import ConcurrencyLimit
from services.common.jetstream import JetStreamTransport
from services.common.keyring import Keyring, KeyringError, init_keys, load_keyring
from services.common.server import BuiltServer, ServiceRegistration, build_server, shutdown
from services.common.telemetry import Telemetry, server_interceptor, setup_telemetry
from services.common.tls import server_credentials

logger = logging.getLogger(__name__)

SERVICES: Final = ("consent", "identity", "tagging", "recommend")
"""Every service, in start order."""


def _server_module(service: str) -> ModuleType:
    # Imported by name so a single-service process loads only its own service.
    import importlib

    return importlib.import_module(f"services.{service}.server")


def ensure_keyring(settings: Settings) -> Keyring:
    """Load the keyring; outside production, create development keys on first start."""
    try:
        return load_keyring(settings)
    except KeyringError:
        if settings.env == "production" or settings.keyring_json:
            raise
        logger.info("no keys under %s: creating development keys", settings.keys_dir)
        return init_keys(settings.keys_dir, development=True)


@dataclass(slots=True)
class RunningSuite:
    """A server hosting some services, with what is needed to start and stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    telemetry: Telemetry
    services: tuple[str, ...]
    grace_seconds: float
    event_log: eventlog.EventLogServicer | None = None
    parts: list[ServiceParts] = field(default_factory=list)
    internal: BuiltServer | None = None
    """The same services for calls from inside this process, on their own worker threads."""
    internal_target: str = ""
    socket_dir: str | None = None
    jetstream: JetStreamTransport | None = None
    """With ``STEWARD_TRANSPORT=jetstream``: relays this process's logs, carries its consumers."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start serving, then whatever the services run beside the server (consumers)."""
        self.server.start()
        self.started()

    def started(self) -> None:
        """Start the internal server, then run the services' start hooks with its address; for
        callers that started the public server themselves."""
        if self.internal is not None:
            self.internal.server.start()
        if self.jetstream is not None and self.event_log is not None:
            # Before the consumers, so a producer's stream exists by the time they look for it.
            self.jetstream.start_relays(self.event_log.logs)
        for parts in self.parts:
            for hook in parts.on_start:
                hook(self.internal_target or self.target)

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop gracefully (in-flight calls finish), then the services' own parts and telemetry."""
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        if self.event_log is not None:
            self.event_log.close()
        shutdown(self.server, self.health, grace).wait()
        self.closed()

    def closed(self) -> None:
        """Run the services' stop hooks, newest first; for callers that stopped the server."""
        if self.jetstream is not None:
            self.jetstream.stop_relays()  # before the hooks dispose of the producers' engines
        for parts in reversed(self.parts):
            for hook in reversed(parts.on_stop):
                hook()
        self.parts = []
        if self.jetstream is not None:
            # The consumers are stopped, their last acknowledgements sent.
            self.jetstream.close()
            self.jetstream = None
        if self.internal is not None:
            # Its callers (consumers, clients) are stopped by now: nothing is left in flight.
            shutdown(self.internal.server, self.internal.health, 0).wait()
            self.internal = None
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
        self.telemetry.shutdown()


def select_services(services: Sequence[str]) -> tuple[str, ...]:
    """``services`` in start order; an empty selection means all. Unknown names are refused."""
    unknown = sorted(set(services) - set(SERVICES))
    if unknown:
        raise ValueError(f"unknown services: {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    return tuple(service for service in SERVICES if service in services) or SERVICES


def migrate(settings: Settings, services: Sequence[str] = SERVICES) -> tuple[str, ...]:
    """Apply the migrations of ``services`` (all by default) and return their names.

    The services also migrate when they start, so this is for a deployment that wants its
    schema changed once, before any replica starts (compose's ``migrate`` job), rather than by
    whichever replica comes first while the others wait on the migration lock.
    """
    chosen = select_services(services)
    for service in chosen:
        _server_module(service).migrate(settings)
    return chosen


def call_interceptors(
    settings: Settings, telemetry: Telemetry, callers: Callers | None = None
) -> list[grpc.ServerInterceptor[Any, Any]]:
    """What wraps every call of a suite's server, outermost first: the span covers the checks
    of ``callers`` (authentication, scopes, rate limits; none when None) and the wait for a turn
    under the concurrency limit, and a refused call never takes a turn. Each server gets its own
    turns, so a call waiting on another service in this process never waits for its own
    caller's turn."""
    return [
        server_interceptor(telemetry),
        *access_interceptors(callers),
        ConcurrencyLimit(settings.max_concurrent_calls),
    ]


def build_suite(
    settings: Settings,
    services: Sequence[str] = SERVICES,
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> RunningSuite:
    """Build (not start) a server for ``services`` bound to ``settings.host:settings.port``."""
    chosen = select_services(services)
    callers = load_callers(settings)
    credentials = server_credentials(settings)
    if callers is None:
        logger.warning(
            "no callers file (STEWARD_CALLERS_FILE): every call is served unauthenticated"
        )
    name = "steward" if len(chosen) == len(SERVICES) else f"steward-{'-'.join(chosen)}"
    telemetry = setup_telemetry(
        settings, name, span_exporter=span_exporter, metric_reader=metric_reader
    )
    jetstream = None
    if settings.transport == "jetstream":
        jetstream = JetStreamTransport(
            settings.nats_url,
            settings.jetstream_prefix,
            name=name,
            meter=telemetry.meter("steward.eventlog"),
        )
    context = ServiceContext(
        settings,
        ensure_keyring(settings),
        telemetry,
        chosen,
        envelope_sources=GrpcEnvelopeSource if jetstream is None else jetstream.source,
    )
    parts = [_server_module(service).build(context) for service in chosen]
    registrations: list[ServiceRegistration[Any]] = [r for p in parts for r in p.registrations]
    logs = {producer: log for p in parts for producer, log in p.logs.items()}
    event_log = None
    if logs:
        registration = eventlog.registration(logs)
        event_log = registration.servicer
        registrations.append(registration)
    built = build_server(
        registrations,
        host=settings.host,
        port=settings.port,
        max_message_bytes=settings.max_message_bytes,
        interceptors=call_interceptors(settings, telemetry, callers),
        max_workers=settings.max_workers,
        credentials=credentials,
    )
    # A private directory (mode 0700): only this user can reach the internal socket.
    socket_dir = tempfile.mkdtemp(prefix="steward-")
    internal_target = f"unix:{socket_dir}/internal.sock"
    internal = build_server(
        registrations,
        host=settings.host,
        port=0,
        max_message_bytes=settings.max_message_bytes,
        interceptors=call_interceptors(settings, telemetry),
        address=internal_target,
    )
    return RunningSuite(
        built.server,
        built.port,
        built.health,
        telemetry,
        chosen,
        settings.grace_seconds,
        event_log,
        parts,
        internal=internal,
        internal_target=internal_target,
        socket_dir=socket_dir,
        jetstream=jetstream,
    )


def start_suite(
    settings: Settings,
    services: Sequence[str] = SERVICES,
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> RunningSuite:
    """Build and start a server for ``services``; stop it with ``RunningSuite.stop``."""
    suite = build_suite(
        settings, services, span_exporter=span_exporter, metric_reader=metric_reader
    )
    suite.start()
    return suite
