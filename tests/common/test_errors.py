"""Errors as a client sees them, over a real channel to a server made by build_server."""

from __future__ import annotations

import logging
import socket
import sqlite3
from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc
import pytest
import sqlalchemy
import sqlalchemy.exc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common import errors
from services.common.errors import (
    Conflict,
    ErrorDetails,
    FailedPrecondition,
    FieldViolations,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ResourceInfo,
    Unauthenticated,
    read_error_details,
)
from services.common.server import ServiceRegistration, build_server

Scenario = Callable[[grpc.ServicerContext], NoReturn]


def _validate_person(context: grpc.ServicerContext) -> NoReturn:
    violations = FieldViolations()
    violations.check(False, "person.email", "not an email address")
    violations.check(True, "person.phone", "never reported")
    violations.add("person.email", "longer than 254 characters")
    violations.raise_if_any("person is invalid")
    raise AssertionError("unreachable")


def _leak_secret(context: grpc.ServicerContext) -> NoReturn:
    raise ValueError("hmac key k1=deadbeef")


SCENARIOS: dict[str, Scenario] = {
    "abort_invalid": lambda c: errors.abort_invalid(
        c, {"purpose": "unknown purpose", "identifiers[0].value": "empty"}
    ),
    "abort_not_found": lambda c: errors.abort_not_found(c, "person", "p-42", "no such person"),
    "abort_failed_precondition": lambda c: errors.abort_failed_precondition(
        c, [("CONSENT", "purpose/marketing", "not granted")], "consent missing"
    ),
    "abort_permission_denied": lambda c: errors.abort_permission_denied(c, "needs consent:write"),
    "abort_unauthenticated": lambda c: errors.abort_unauthenticated(c, "no token"),
    "abort_resource_exhausted": lambda c: errors.abort_resource_exhausted(c, "slow down", 1.5),
    "abort_resource_exhausted_no_retry": lambda c: errors.abort_resource_exhausted(c, "full"),
    "abort_with_error_info": lambda c: errors.abort(
        c,
        grpc.StatusCode.UNAVAILABLE,
        "log is catching up",
        error_details_pb2.ErrorInfo(reason="CATCHING_UP", domain="steward"),
    ),
    "raise_invalid": lambda c: _raise(InvalidArgument([("limit", "at most 500")], "bad limit")),
    "raise_not_found": lambda c: _raise(NotFound("purpose", "marketing")),
    "raise_failed_precondition": lambda c: _raise(
        FailedPrecondition([("LEDGER", "checkpoint/7", "not signed yet")])
    ),
    "raise_permission_denied": lambda c: _raise(PermissionDenied("needs audit:read")),
    "raise_unauthenticated": lambda c: _raise(Unauthenticated("token expired")),
    "raise_resource_exhausted": lambda c: _raise(ResourceExhausted("rate limited", 0.25)),
    "raise_conflict": lambda c: _raise(Conflict("cursor moved")),
    "field_violations": _validate_person,
    "unexpected": _leak_secret,
}


def _raise(exc: Exception) -> NoReturn:
    raise exc


class ErrorsServicer:
    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        SCENARIOS[request.decode()](context)

    def fail_after_one(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        raise NotFound("event", request.decode())

    def fail_reading(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        for request in requests:
            if request == b"bad":
                raise InvalidArgument({"events[1]": "malformed"})
        return b"ok"

    def fail_echoing(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        for request in requests:
            if request == b"bad":
                raise Conflict("sequence gap")
            yield request


def add_errors_servicer(servicer: ErrorsServicer, server: grpc.Server) -> None:
    handlers = {
        "Fail": grpc.unary_unary_rpc_method_handler(servicer.fail),
        "FailAfterOne": grpc.unary_stream_rpc_method_handler(servicer.fail_after_one),
        "FailReading": grpc.stream_unary_rpc_method_handler(servicer.fail_reading),
        "FailEchoing": grpc.stream_stream_rpc_method_handler(servicer.fail_echoing),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Errors", handlers),)
    )


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    registration = ServiceRegistration("test.Errors", add_errors_servicer, ErrorsServicer())
    server, port, _health = build_server(
        [registration], host="127.0.0.1", port=0, max_message_bytes=1 << 20
    )
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)


def call_failing(channel: grpc.Channel, scenario: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        channel.unary_unary("/test.Errors/Fail")(scenario.encode(), timeout=5)
    return failure.value


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (
            "abort_invalid",
            ErrorDetails(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid request",
                field_violations={
                    "purpose": "unknown purpose",
                    "identifiers[0].value": "empty",
                },
            ),
        ),
        (
            "abort_not_found",
            ErrorDetails(
                grpc.StatusCode.NOT_FOUND,
                "no such person",
                resource_info=ResourceInfo("person", "p-42"),
            ),
        ),
        (
            "abort_failed_precondition",
            ErrorDetails(
                grpc.StatusCode.FAILED_PRECONDITION,
                "consent missing",
                precondition_failures=[("CONSENT", "purpose/marketing", "not granted")],
            ),
        ),
        (
            "abort_permission_denied",
            ErrorDetails(grpc.StatusCode.PERMISSION_DENIED, "needs consent:write"),
        ),
        ("abort_unauthenticated", ErrorDetails(grpc.StatusCode.UNAUTHENTICATED, "no token")),
        (
            "abort_resource_exhausted",
            ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_delay=1.5),
        ),
        (
            "abort_resource_exhausted_no_retry",
            ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
        ),
        (
            "raise_invalid",
            ErrorDetails(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad limit",
                field_violations={"limit": "at most 500"},
            ),
        ),
        (
            "raise_not_found",
            ErrorDetails(
                grpc.StatusCode.NOT_FOUND,
                "purpose 'marketing' not found",
                resource_info=ResourceInfo("purpose", "marketing"),
            ),
        ),
        (
            "raise_failed_precondition",
            ErrorDetails(
                grpc.StatusCode.FAILED_PRECONDITION,
                "precondition failed",
                precondition_failures=[("LEDGER", "checkpoint/7", "not signed yet")],
            ),
        ),
        (
            "raise_permission_denied",
            ErrorDetails(grpc.StatusCode.PERMISSION_DENIED, "needs audit:read"),
        ),
        ("raise_unauthenticated", ErrorDetails(grpc.StatusCode.UNAUTHENTICATED, "token expired")),
        (
            "raise_resource_exhausted",
            ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited", retry_delay=0.25),
        ),
        ("raise_conflict", ErrorDetails(grpc.StatusCode.ABORTED, "cursor moved")),
        (
            "field_violations",
            ErrorDetails(
                grpc.StatusCode.INVALID_ARGUMENT,
                "person is invalid",
                field_violations={
                    "person.email": "not an email address; longer than 254 characters"
                },
            ),
        ),
    ],
)
def test_client_reads_back_the_status_and_details(
    channel: grpc.Channel, scenario: str, expected: ErrorDetails
) -> None:
    assert read_error_details(call_failing(channel, scenario)) == expected


def test_any_detail_travels_in_the_rich_status(channel: grpc.Channel) -> None:
    failure = call_failing(channel, "abort_with_error_info")

    status = rpc_status.from_call(failure)  # type: ignore[arg-type]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("CATCHING_UP", "steward")
    assert read_error_details(failure) == ErrorDetails(
        grpc.StatusCode.UNAVAILABLE, "log is catching up"
    )


def test_unexpected_exception_is_internal_without_leaking_details(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="services.common.errors"):
        failure = call_failing(channel, "unexpected")

    assert read_error_details(failure) == ErrorDetails(grpc.StatusCode.INTERNAL, "internal error")
    assert "deadbeef" not in repr(failure.trailing_metadata())
    assert "deadbeef" not in str(failure.debug_error_string())  # type: ignore[attr-defined]
    logged = [record for record in caplog.records if record.exc_info]
    assert logged, "the real cause must reach the server log"
    assert "/test.Errors/Fail" in logged[0].getMessage()


def _unreachable_postgres(context: grpc.ServicerContext) -> NoReturn:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = sqlalchemy.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/steward")
    with engine.connect():
        raise AssertionError("nothing listens there")


def _sqlite_statement(statement: str) -> Callable[[grpc.ServicerContext], NoReturn]:
    def run(context: grpc.ServicerContext) -> NoReturn:
        engine = sqlalchemy.create_engine("sqlite://")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(statement))
        raise AssertionError(f"{statement} ran")

    return run


def _sqlite_locked(context: grpc.ServicerContext) -> NoReturn:
    raise sqlalchemy.exc.OperationalError(
        "INSERT INTO t VALUES (?)", ("x",), sqlite3.OperationalError("database is locked")
    )


SCENARIOS.update(
    {
        "postgres_unreachable": _unreachable_postgres,
        "sqlite_locked": _sqlite_locked,
        "sqlite_missing_table": _sqlite_statement("SELECT * FROM no_such_table"),
    }
)


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        ("postgres_unreachable", grpc.StatusCode.UNAVAILABLE),
        ("sqlite_locked", grpc.StatusCode.UNAVAILABLE),
        # A schema that lacks a table is a bug to fix, not a condition to retry through.
        ("sqlite_missing_table", grpc.StatusCode.INTERNAL),
    ],
)
def test_a_database_that_cannot_serve_now_is_unavailable_not_internal(
    channel: grpc.Channel, scenario: str, code: grpc.StatusCode
) -> None:
    failure = call_failing(channel, scenario)
    assert failure.code() == code
    assert "127.0.0.1" not in (failure.details() or "")


def test_streaming_handlers_map_domain_errors_too(channel: grpc.Channel) -> None:
    responses = channel.unary_stream("/test.Errors/FailAfterOne")(b"e-9", timeout=5)
    assert next(responses) == b"first"
    with pytest.raises(grpc.RpcError) as server_streaming:
        next(responses)
    with pytest.raises(grpc.RpcError) as client_streaming:
        channel.stream_unary("/test.Errors/FailReading")(iter([b"ok", b"bad"]), timeout=5)
    echoed: list[bytes] = []
    with pytest.raises(grpc.RpcError) as bidirectional:
        for response in channel.stream_stream("/test.Errors/FailEchoing")(
            iter([b"a", b"bad"]), timeout=5
        ):
            echoed.append(response)

    assert read_error_details(server_streaming.value).resource_info == ResourceInfo("event", "e-9")
    assert read_error_details(client_streaming.value).field_violations == {"events[1]": "malformed"}
    assert bidirectional.value.code() == grpc.StatusCode.ABORTED
    assert echoed == [b"a"]


def test_error_without_details_reads_as_code_and_message(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        channel.unary_unary("/test.Errors/NoSuchMethod")(b"", timeout=5)

    details = read_error_details(failure.value)

    assert details.code == grpc.StatusCode.UNIMPLEMENTED
    assert details.field_violations == {}
    assert details.resource_info is None
    assert details.retry_delay is None


def test_field_violations_collects_in_order_and_stays_quiet_when_clean() -> None:
    violations = FieldViolations()
    violations.raise_if_any()

    assert violations.check(True, "a", "fine")
    assert not violations.check(False, "b", "missing")
    violations.add("c", "too long")

    assert len(violations) == 2
    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    assert raised.value.violations == (("b", "missing"), ("c", "too long"))


def test_domain_errors_carry_a_readable_message() -> None:
    cases: list[tuple[Exception, str]] = [
        (NotFound("person", "p-1"), "person 'p-1' not found"),
        (InvalidArgument({"x": "bad"}), "invalid request"),
        (ResourceExhausted("slow down"), "slow down"),
    ]
    for exc, message in cases:
        assert str(exc) == message
