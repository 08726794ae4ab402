"""The one way a Steward gRPC server is built and run.

``build_server`` returns a bound but unstarted server with health, reflection and error mapping;
tests start it themselves on port 0, ``serve`` starts it and runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, NamedTuple, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import ErrorInterceptor, RequestDecoding

logger = logging.getLogger(__name__)

ServicerT = TypeVar("ServicerT")

KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
MIN_CLIENT_PING_INTERVAL_MS = 10_000
MAX_CONCURRENT_STREAMS = 256

# time_remaining() of a call without a deadline is about 2**63 nanoseconds.
_NO_DEADLINE_SECONDS = 1e9


@dataclass(frozen=True)
class ServiceRegistration(Generic[ServicerT]):
    """One service to put on a server.

    ``name`` is the full proto service name (``steward.consent.v1.ConsentService``); it is what
    health and reflection report. ``add_to_server`` is the generated ``add_XServicer_to_server``
    (or any function of the same shape that adds handlers for ``servicer``).
    """

    name: str
    add_to_server: Callable[[ServicerT, grpc.Server], None]
    servicer: ServicerT


class BuiltServer(NamedTuple):
    server: grpc.Server
    port: int
    health: health.HealthServicer


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        # Without this a second server on the same port binds silently and steals half the calls.
        ("grpc.so_reuseport", 0),
    ]


def build_server(
    registrations: Sequence[ServiceRegistration[Any]],
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    max_workers: int = 32,
    credentials: grpc.ServerCredentials | None = None,
    address: str | None = None,
) -> BuiltServer:
    """A bound, unstarted server with every registration, health, reflection and error mapping.

    ``interceptors`` run outermost first; :class:`ErrorInterceptor` is always added innermost so
    the others see the final status, and inside it :class:`RequestDecoding`, so a request that
    cannot be parsed is refused as INVALID_ARGUMENT rather than gRPC's INTERNAL. Port 0 lets
    the OS pick; the bound port is returned.
    ``address`` (e.g. ``unix:/path``) replaces ``host`` and ``port``.
    """
    names = [registration.name for registration in registrations]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"services registered twice: {', '.join(duplicates)}")

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-server"),
        interceptors=[*interceptors, ErrorInterceptor(), RequestDecoding()],
        options=server_options(max_message_bytes),
    )
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)

    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="grpc-health"
        ),
    )
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )

    address = address or _address(host, port)
    if credentials is None:
        bound_port = server.add_insecure_port(address)
    else:
        bound_port = server.add_secure_port(address, credentials)
    if bound_port == 0:
        raise RuntimeError(f"could not bind {address}")
    return BuiltServer(server, bound_port, health_servicer)


def shutdown(
    server: grpc.Server, health_servicer: health.HealthServicer, grace_seconds: float
) -> threading.Event:
    """Report NOT_SERVING, refuse new calls and let in-flight ones finish within the grace period.

    Returns the event set once the server has stopped.
    """
    health_servicer.enter_graceful_shutdown()
    return server.stop(grace_seconds)


def serve(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    grace_seconds: float,
    *,
    on_started: Callable[[], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> None:
    """Start the server and block until it has stopped.

    On the main thread, SIGTERM and SIGINT start a graceful :func:`shutdown` (after
    ``on_stopping``, e.g. ending long-lived streams); a second signal cancels the calls still
    running. Elsewhere no handlers are installed and the caller stops the server with
    :func:`shutdown`. ``on_started`` runs once the server accepts calls.
    """
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        handler = _signal_handler(server, health_servicer, grace_seconds, on_stopping)
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            previous[stop_signal] = signal.signal(stop_signal, handler)
    server.start()
    if on_started is not None:
        on_started()
    try:
        server.wait_for_termination()
    finally:
        for stop_signal, old_handler in previous.items():
            signal.signal(stop_signal, old_handler)


def _signal_handler(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    grace_seconds: float,
    on_stopping: Callable[[], None] | None,
) -> Callable[[int, FrameType | None], None]:
    stopping = False

    def handle(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        name = signal.Signals(signum).name
        if stopping:
            logger.warning("%s again: cancelling the calls still running", name)
            server.stop(None)
            return
        stopping = True
        logger.info("%s: shutting down, %.1f s grace for calls in flight", name, grace_seconds)
        if on_stopping is not None:
            on_stopping()
        shutdown(server, health_servicer, grace_seconds)

    return handle


def deadline_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the incoming call's deadline, or None if it has none.

    Pass it as the ``timeout`` of outgoing calls so they give up when the caller has.
    """
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining) or remaining > _NO_DEADLINE_SECONDS:
        return None
    return max(remaining, 0.0)


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
