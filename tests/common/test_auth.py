"""The authorisation and rate-limit interceptors on a bare server, with a clock the test moves.

The handlers stand in for real methods under their wire paths, so the scopes are the protos'
own; each answers with ``caller_of(context)``, the name a servicer records as the actor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import access_interceptors
from services.common.callers import Caller, Callers, RateLimitSpec, caller_of, hash_token
from services.common.errors import read_error_details
from services.common.server import ServiceRegistration, build_server

LIST_PURPOSES = "/steward.consent.v1.ConsentService/ListPurposes"
EXPORT_LEDGER = "/steward.consent.v1.AuditService/ExportLedger"
UNDECLARED = "/test.Echo/Say"
SHOP_TOKEN = "shop-token-for-tests"
AUDITOR_TOKEN = "auditor-token-for-tests"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer_with_caller(request: bytes, context: grpc.ServicerContext) -> bytes:
    return caller_of(context).encode()


def stream_callers(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield caller_of(context).encode()
    yield caller_of(context).encode()


def add_handlers(servicer: object, server: grpc.Server) -> None:
    unary = grpc.unary_unary_rpc_method_handler(answer_with_caller)
    stream = grpc.unary_stream_rpc_method_handler(stream_callers)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "steward.consent.v1.ConsentService", {"ListPurposes": unary}
            ),
            grpc.method_handlers_generic_handler(
                "steward.consent.v1.AuditService", {"ExportLedger": stream}
            ),
            grpc.method_handlers_generic_handler("test.Echo", {"Say": unary}),
        )
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def channel(clock: FakeClock) -> Iterator[grpc.Channel]:
    callers = Callers(
        [
            Caller(
                "shop",
                frozenset({"consent:read"}),
                token_sha256=hash_token(SHOP_TOKEN),
                rate_limit=RateLimitSpec(per_second=0.5, burst=2),
            ),
            Caller("auditor", frozenset({"audit:read"}), token_sha256=hash_token(AUDITOR_TOKEN)),
        ]
    )
    server, port, _health = build_server(
        [ServiceRegistration("test.Stand-ins", add_handlers, object())],
        host="127.0.0.1",
        port=0,
        max_message_bytes=1 << 20,
        interceptors=access_interceptors(callers, clock=clock),
    )
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)


def unary(channel: grpc.Channel, path: str, *metadata: tuple[str, str]) -> Any:
    return channel.unary_unary(path)(b"", metadata=metadata, timeout=5)


def failure(channel: grpc.Channel, path: str, *metadata: tuple[str, str]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        unary(channel, path, *metadata)
    return raised.value


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def test_an_admitted_call_runs_as_the_authenticated_caller(channel: grpc.Channel) -> None:
    forged = ("x-steward-caller", "mallory")

    assert unary(channel, LIST_PURPOSES, bearer(SHOP_TOKEN), forged) == b"shop"
    streamed = channel.unary_stream(EXPORT_LEDGER)(
        b"", metadata=(bearer(AUDITOR_TOKEN),), timeout=5
    )
    assert list(streamed) == [b"auditor", b"auditor"]


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (bearer("not-a-token"),),
        (bearer(""),),
        (("authorization", f"Basic {SHOP_TOKEN}"),),
    ],
    ids=["none", "unknown", "empty", "other-scheme"],
)
def test_calls_without_a_known_credential_are_unauthenticated(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    error = failure(channel, LIST_PURPOSES, *metadata)

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert SHOP_TOKEN not in (error.details() or "")


def test_a_caller_without_the_methods_scope_is_denied(channel: grpc.Channel) -> None:
    error = failure(channel, LIST_PURPOSES, bearer(AUDITOR_TOKEN))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "consent:read" in (error.details() or "")


def test_a_method_that_declares_no_scope_is_closed_to_everyone(channel: grpc.Channel) -> None:
    error = failure(channel, UNDECLARED, bearer(SHOP_TOKEN))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "declares no scope" in (error.details() or "")


def test_health_needs_no_credentials(channel: grpc.Channel) -> None:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_over_its_rate_a_caller_is_told_exactly_when_to_retry(
    channel: grpc.Channel, clock: FakeClock
) -> None:
    assert unary(channel, LIST_PURPOSES, bearer(SHOP_TOKEN)) == b"shop"
    assert unary(channel, LIST_PURPOSES, bearer(SHOP_TOKEN)) == b"shop"

    details = read_error_details(failure(channel, LIST_PURPOSES, bearer(SHOP_TOKEN)))
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.retry_delay == pytest.approx(2.0)

    clock.now += 1.5
    assert read_error_details(
        failure(channel, LIST_PURPOSES, bearer(SHOP_TOKEN))
    ).retry_delay == pytest.approx(0.5)
    clock.now += 0.5
    assert unary(channel, LIST_PURPOSES, bearer(SHOP_TOKEN)) == b"shop"
    # A refused call took no token: the next comes back on the steady rate, not later.
    assert failure(channel, LIST_PURPOSES, bearer(SHOP_TOKEN)).code() == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    clock.now += 2.0
    assert unary(channel, LIST_PURPOSES, bearer(SHOP_TOKEN)) == b"shop"


def test_a_caller_without_a_rate_limit_is_never_limited(channel: grpc.Channel) -> None:
    for _ in range(20):
        streamed = channel.unary_stream(EXPORT_LEDGER)(
            b"", metadata=(bearer(AUDITOR_TOKEN),), timeout=5
        )
        assert list(streamed) == [b"auditor", b"auditor"]
