"""The server bootstrap, exercised over real channels with a small raw-bytes service."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.common.server import (
    ServiceRegistration,
    build_server,
    deadline_remaining,
    serve,
    shutdown,
)

MAX_MESSAGE_BYTES = 64 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EchoServicer:
    def __init__(self) -> None:
        self.slow_call_entered = threading.Event()
        self.release_slow_calls = threading.Event()
        self.echo_calls = 0

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.echo_calls += 1
        return request

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Holds the call until the test releases it or the call ends (deadline, cancel)."""
        call_over = threading.Event()
        context.add_callback(call_over.set)
        self.slow_call_entered.set()
        while not (self.release_slow_calls.wait(0.01) or call_over.is_set()):
            pass
        return request

    def remaining(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return repr(deadline_remaining(context)).encode()


def add_echo_servicer(servicer: EchoServicer, server: grpc.Server) -> None:
    """Shaped like a generated add_XServicer_to_server, for a service without a proto."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(servicer.echo),
        "Slow": grpc.unary_unary_rpc_method_handler(servicer.slow),
        "Remaining": grpc.unary_unary_rpc_method_handler(servicer.remaining),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: EchoServicer
    channel: grpc.Channel

    def call(self, method: str, request: bytes = b"ping", timeout: float = 5) -> Any:
        return self.channel.unary_unary(f"/test.Echo/{method}")(request, timeout=timeout)

    def health_stub(self) -> Any:
        return health_pb2_grpc.HealthStub(self.channel)


def make_server(
    servicer: EchoServicer, interceptors: tuple[grpc.ServerInterceptor[Any, Any], ...] = ()
) -> tuple[grpc.Server, int, health.HealthServicer]:
    return build_server(
        [ServiceRegistration("test.Echo", add_echo_servicer, servicer)],
        host="127.0.0.1",
        port=0,
        max_message_bytes=MAX_MESSAGE_BYTES,
        interceptors=interceptors,
        max_workers=8,
    )


@pytest.fixture
def built() -> Iterator[RunningServer]:
    """A bound, not yet started server and a channel to it."""
    servicer = EchoServicer()
    server, port, health_servicer = make_server(servicer)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(server, port, health_servicer, servicer, channel)
    finally:
        servicer.release_slow_calls.set()
        channel.close()
        server.stop(None).wait(5)


@pytest.fixture
def running(built: RunningServer) -> RunningServer:
    built.server.start()
    return built


def test_registered_service_answers(running: RunningServer) -> None:
    assert running.port > 0
    assert running.call("Echo", b"hello") == b"hello"


def test_shutdown_lets_in_flight_calls_finish_and_refuses_new_ones(
    running: RunningServer,
) -> None:
    in_flight = running.channel.unary_unary("/test.Echo/Slow").future(b"slow", timeout=10)
    assert running.servicer.slow_call_entered.wait(5)

    stopped = shutdown(running.server, running.health, grace_seconds=10)

    with (
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as late_channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        late_channel.unary_unary("/test.Echo/Echo")(b"late", timeout=2)
    # Refused: by the closed listener (UNAVAILABLE) or, when the call got in first, by the
    # stopping server (CANCELLED) — either way the late call never runs.
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert running.servicer.echo_calls == 0
    assert not stopped.is_set()
    running.servicer.release_slow_calls.set()
    assert in_flight.result(timeout=5) == b"slow"
    assert stopped.wait(5)


def test_call_past_its_deadline_gets_deadline_exceeded(running: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as late:
        running.call("Slow", timeout=0.1)

    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_deadline_remaining_carries_the_callers_deadline(running: RunningServer) -> None:
    with_deadline = float(running.call("Remaining", timeout=5))

    assert 0 < with_deadline <= 5.1
    without_deadline = running.channel.unary_unary("/test.Echo/Remaining")(b"")
    assert without_deadline == b"None"


def test_oversized_message_is_refused_with_resource_exhausted(running: RunningServer) -> None:
    assert running.call("Echo", b"x" * (MAX_MESSAGE_BYTES - 64)) == b"x" * (MAX_MESSAGE_BYTES - 64)

    with pytest.raises(grpc.RpcError) as too_big:
        running.call("Echo", b"x" * (MAX_MESSAGE_BYTES + 1))

    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_reports_each_service_and_the_server(running: RunningServer) -> None:
    stub = running.health_stub()

    for name in ("", "test.Echo"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert response.status == SERVING, name
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(health_pb2.HealthCheckRequest(service="test.Unknown"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_turns_not_serving_when_graceful_shutdown_starts(running: RunningServer) -> None:
    watches = {
        name: running.health_stub().Watch(health_pb2.HealthCheckRequest(service=name), timeout=10)
        for name in ("", "test.Echo")
    }
    assert {name: next(watch).status for name, watch in watches.items()} == {
        "": SERVING,
        "test.Echo": SERVING,
    }

    stopped = shutdown(running.server, running.health, grace_seconds=10)

    assert {name: next(watch).status for name, watch in watches.items()} == {
        "": NOT_SERVING,
        "test.Echo": NOT_SERVING,
    }
    for watch in watches.values():
        watch.cancel()
    assert stopped.wait(5)


def test_reflection_lists_every_service(running: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))

    assert {service.name for service in response.list_services_response.service} == {
        "test.Echo",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_reflection_serves_descriptors_for_grpcurl(running: RunningServer) -> None:
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(running.channel))

    service = pool.FindServiceByName("grpc.health.v1.Health")

    assert {method.name for method in service.methods} >= {"Check", "Watch"}


def test_interceptors_see_every_call(built: RunningServer) -> None:
    seen: list[str] = []

    class RecordingInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
        def intercept_service(
            self, continuation: Callable[[Any], Any], handler_call_details: Any
        ) -> Any:
            seen.append(handler_call_details.method)
            return continuation(handler_call_details)

    servicer = EchoServicer()
    server, port, _health = make_server(servicer, interceptors=(RecordingInterceptor(),))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            channel.unary_unary("/test.Echo/Echo")(b"x", timeout=5)
    finally:
        server.stop(None)

    assert seen == ["/test.Echo/Echo"]


def test_a_port_in_use_is_an_error_not_a_shared_port(running: RunningServer) -> None:
    with pytest.raises(RuntimeError):
        build_server(
            [ServiceRegistration("test.Echo", add_echo_servicer, EchoServicer())],
            host="127.0.0.1",
            port=running.port,
            max_message_bytes=MAX_MESSAGE_BYTES,
        )


def test_registering_a_service_twice_is_refused() -> None:
    registration = ServiceRegistration("test.Echo", add_echo_servicer, EchoServicer())

    with pytest.raises(ValueError, match=r"test\.Echo"):
        build_server(
            [registration, registration],
            host="127.0.0.1",
            port=0,
            max_message_bytes=MAX_MESSAGE_BYTES,
        )


def test_serve_off_the_main_thread_leaves_signals_alone(built: RunningServer) -> None:
    handlers_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    serving = threading.Thread(target=serve, args=(built.server, built.health, 5))
    serving.start()
    grpc.channel_ready_future(built.channel).result(timeout=5)
    assert built.call("Echo", b"up") == b"up"

    shutdown(built.server, built.health, grace_seconds=5)
    serving.join(timeout=10)

    assert not serving.is_alive()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers_before


def test_sigterm_drains_in_flight_calls_then_serve_returns(built: RunningServer) -> None:
    """serve() runs on the test's main thread; a helper thread plays the orchestrator."""
    outcome: dict[str, Any] = {}

    def orchestrator() -> None:
        try:
            grpc.channel_ready_future(built.channel).result(timeout=5)
            watch = built.health_stub().Watch(health_pb2.HealthCheckRequest(), timeout=10)
            outcome["before"] = next(watch).status
            in_flight = built.channel.unary_unary("/test.Echo/Slow").future(b"drain", timeout=10)
            assert built.servicer.slow_call_entered.wait(5)
            os.kill(os.getpid(), signal.SIGTERM)
            outcome["after"] = next(watch).status
            watch.cancel()
            built.servicer.release_slow_calls.set()
            outcome["in_flight"] = in_flight.result(timeout=5)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            if built.server.wait_for_termination(timeout=10) is False:
                built.server.stop(None)  # never leave the main thread blocked in serve()

    def unexpected_sigterm(signum: int, frame: object) -> None:
        outcome["sigterm reached the previous handler"] = True

    previous = signal.signal(signal.SIGTERM, unexpected_sigterm)
    helper = threading.Thread(target=orchestrator)
    try:
        helper.start()
        serve(built.server, built.health, grace_seconds=10)
        helper.join(timeout=10)
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert outcome == {"before": SERVING, "after": NOT_SERVING, "in_flight": b"drain"}
    assert restored is unexpected_sigterm


def test_concurrency_limit_runs_at_most_its_limit_of_unary_handlers_at_once() -> None:
    from services.common.interceptors import ConcurrencyLimit

    running = 0
    most = 0
    lock = threading.Lock()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return request

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), interceptors=[ConcurrencyLimit(2)]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Slow/Call", None, None)
            with futures.ThreadPoolExecutor(max_workers=10) as pool:
                answers = list(pool.map(lambda i: call(bytes([i]), timeout=10), range(10)))
    finally:
        server.stop(None)
    assert answers == [bytes([i]) for i in range(10)]
    assert most == 2


def test_a_concurrency_limit_below_one_is_refused() -> None:
    from services.common.interceptors import ConcurrencyLimit

    with pytest.raises(ValueError, match="at least 1"):
        ConcurrencyLimit(0)
