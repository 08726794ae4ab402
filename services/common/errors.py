"""Rich gRPC errors (google.rpc.Status with details), on both sides of the wire.

Domain modules raise :class:`StewardError` subclasses and never touch gRPC. Servers built by
``services.common.server.build_server`` install :class:`ErrorInterceptor`, which turns those into
the matching status with details, a database that cannot be reached into UNAVAILABLE, and any
other exception into a bare INTERNAL (logged, not sent).
Servicer code that must answer with a status directly calls the ``abort_*`` helpers. Clients read
the details back with :func:`read_error_details`.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias, cast

import grpc
import sqlalchemy.exc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from services.common.interceptors import BehaviourInterceptor, StreamBehaviour, UnaryBehaviour

logger = logging.getLogger(__name__)

FieldViolationsLike: TypeAlias = Mapping[str, str] | Sequence[tuple[str, str]]
"""Field path (e.g. ``identifiers[2].value``) to what is wrong with it."""

PreconditionViolation: TypeAlias = tuple[str, str, str]
"""``(type, subject, description)``, e.g. ``("CONSENT", "purpose/marketing", "not granted")``."""

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


# Domain-side exceptions -------------------------------------------------------------------------


class StewardError(Exception):
    """Base of the errors domain code raises; each maps onto one gRPC status code."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(StewardError):
    def __init__(self, violations: FieldViolationsLike, message: str = "invalid request") -> None:
        super().__init__(message)
        self.violations = _violation_pairs(violations)


class NotFound(StewardError):
    def __init__(self, resource_type: str, name: str, message: str | None = None) -> None:
        super().__init__(message or f"{resource_type} {name!r} not found")
        self.resource_type = resource_type
        self.name = name


class FailedPrecondition(StewardError):
    def __init__(
        self, violations: Sequence[PreconditionViolation], message: str = "precondition failed"
    ) -> None:
        super().__init__(message)
        self.violations = tuple(violations)


class PermissionDenied(StewardError):
    pass


class Unauthenticated(StewardError):
    pass


class ResourceExhausted(StewardError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(StewardError):
    """A concurrent change got there first; the caller may retry (ABORTED)."""


class Unavailable(StewardError):
    """A service this call depends on cannot be reached now; the caller may retry."""


class FieldViolations:
    """Collects validation failures so a caller sees all of them at once, not the first only.

    >>> violations = FieldViolations()
    >>> violations.check(len(name) <= 64, "name", "at most 64 characters")
    >>> violations.raise_if_any()
    """

    def __init__(self) -> None:
        self._violations: list[tuple[str, str]] = []

    def add(self, field_path: str, description: str) -> None:
        self._violations.append((field_path, description))

    def check(self, condition: bool, field_path: str, description: str) -> bool:
        """Record a violation unless ``condition`` holds; returns ``condition``."""
        if not condition:
            self.add(field_path, description)
        return condition

    def __bool__(self) -> bool:
        return bool(self._violations)

    def __len__(self) -> int:
        return len(self._violations)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._violations)

    def raise_if_any(self, message: str = "invalid request") -> None:
        if self._violations:
            raise InvalidArgument(self._violations, message)


# Server side -----------------------------------------------------------------------------------


def abort(
    context: grpc.ServicerContext, code: grpc.StatusCode, message: str, *details: Message
) -> NoReturn:
    """End the call with ``code`` and ``message``, packing ``details`` into google.rpc.Status."""
    packed = []
    for detail in details:
        container = any_pb2.Any()
        container.Pack(detail)
        packed.append(container)
    status = status_pb2.Status(code=_rpc_code(code), message=message, details=packed)
    context.abort_with_status(rpc_status.to_status(status))


def abort_invalid(
    context: grpc.ServicerContext,
    violations: FieldViolationsLike,
    message: str = "invalid request",
) -> NoReturn:
    abort(context, grpc.StatusCode.INVALID_ARGUMENT, message, _bad_request(violations))


def abort_not_found(
    context: grpc.ServicerContext,
    resource_type: str,
    resource_name: str,
    message: str | None = None,
) -> NoReturn:
    info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=resource_name)
    text = message or f"{resource_type} {resource_name!r} not found"
    abort(context, grpc.StatusCode.NOT_FOUND, text, info)


def abort_failed_precondition(
    context: grpc.ServicerContext,
    violations: Sequence[PreconditionViolation],
    message: str = "precondition failed",
) -> NoReturn:
    abort(context, grpc.StatusCode.FAILED_PRECONDITION, message, _precondition_failure(violations))


def abort_permission_denied(context: grpc.ServicerContext, message: str) -> NoReturn:
    abort(context, grpc.StatusCode.PERMISSION_DENIED, message)


def abort_unauthenticated(context: grpc.ServicerContext, message: str) -> NoReturn:
    abort(context, grpc.StatusCode.UNAUTHENTICATED, message)


def abort_resource_exhausted(
    context: grpc.ServicerContext, message: str, retry_after: float | None = None
) -> NoReturn:
    details = () if retry_after is None else (_retry_info(retry_after),)
    abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, *details)


def abort_for(context: grpc.ServicerContext, exc: StewardError) -> NoReturn:
    """End the call with the status that the domain error stands for."""
    match exc:
        case InvalidArgument():
            abort_invalid(context, exc.violations, exc.message)
        case NotFound():
            abort_not_found(context, exc.resource_type, exc.name, exc.message)
        case FailedPrecondition():
            abort_failed_precondition(context, exc.violations, exc.message)
        case PermissionDenied():
            abort_permission_denied(context, exc.message)
        case Unauthenticated():
            abort_unauthenticated(context, exc.message)
        case ResourceExhausted():
            abort_resource_exhausted(context, exc.message, exc.retry_after)
        case Conflict():
            abort(context, grpc.StatusCode.ABORTED, exc.message)
        case Unavailable():
            abort(context, grpc.StatusCode.UNAVAILABLE, exc.message)
        case _:
            abort(context, grpc.StatusCode.UNKNOWN, exc.message)


class ErrorInterceptor(BehaviourInterceptor):
    """Maps exceptions escaping a handler onto statuses: a StewardError to its code, a database
    that cannot serve now to UNAVAILABLE, anything else to INTERNAL (logged, its message not
    sent)."""

    def wrap_unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        def mapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(request, context)
            except Exception as exc:
                _abort_for_exception(context, exc, method)

        return mapped

    def wrap_stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        def mapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behaviour(request, context)
            except Exception as exc:
                _abort_for_exception(context, exc, method)

        return mapped


class Undecodable:
    """What :class:`RequestDecoding` hands the handler in place of a request it cannot parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RequestDecoding(BehaviourInterceptor):
    """Requests whose bytes are not a valid message (a string field holding bytes that are not
    UTF-8, a truncated field) are refused with INVALID_ARGUMENT.

    gRPC answers a request its deserializer cannot parse with INTERNAL, which tells the caller
    the fault is ours. Here the deserializer never raises: it hands the handler an
    :class:`Undecodable`, and the handler's wrapper refuses it before any work is done.
    """

    def wrap_deserializer(
        self, deserializer: Callable[[bytes], Any] | None, method: str
    ) -> Callable[[bytes], Any] | None:
        if deserializer is None:
            return None
        parse = deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # DecodeError, and whatever a parser raises on junk
                return Undecodable(type(exc).__name__)

        return tolerant

    def wrap_unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                _refuse_undecodable(request, method)
            return behaviour(request, context)

        return checked

    def wrap_stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        def checked(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if isinstance(request, Undecodable):
                _refuse_undecodable(request, method)
            yield from behaviour(request, context)

        return checked


def _refuse_undecodable(request: Undecodable, method: str) -> NoReturn:
    raise InvalidArgument(
        {
            "(request)": "is not a valid encoding of the request message (e.g. a string field "
            "that is not UTF-8)"
        },
        f"the request to {method} could not be decoded ({request.reason})",
    )


def _abort_for_exception(context: grpc.ServicerContext, exc: Exception, method: str) -> NoReturn:
    if isinstance(exc, StewardError):
        abort_for(context, exc)
    # context.abort() raises a bare Exception after recording the status: let it through, as
    # well as anything raised once the call is already over (client gone, deadline passed).
    if _already_aborted(context) or not context.is_active():
        raise exc
    if database_unavailable(exc):
        # The class only: a driver's message can quote the statement's parameters.
        logger.warning("the database is unavailable in %s (%s)", method, type(exc).__name__)
        abort(context, grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry later")
    logger.exception("unexpected error in %s", method)
    abort(context, grpc.StatusCode.INTERNAL, "internal error")


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot serve now (down, restarting, unreachable, its
    connections cut, the pool exhausted, SQLite locked), so the caller may retry: UNAVAILABLE,
    not INTERNAL. A transaction that failed this way was rolled back: nothing is half-written.
    """
    if isinstance(exc, sqlalchemy.exc.DisconnectionError | sqlalchemy.exc.TimeoutError):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc.orig, sqlite3.OperationalError):
            return "locked" in str(exc.orig)  # not "no such table": that one is a bug
        return isinstance(exc, sqlalchemy.exc.OperationalError)
    # psycopg raised outside SQLAlchemy (raw connections); only loaded when PostgreSQL is used.
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.OperationalError)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    code = getattr(context, "code", None)
    return callable(code) and code() not in (None, grpc.StatusCode.OK)


# Client side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceInfo:
    resource_type: str
    resource_name: str
    description: str = ""


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call carried besides its code and message."""

    code: grpc.StatusCode
    message: str
    field_violations: dict[str, str] = field(default_factory=dict)
    precondition_failures: list[PreconditionViolation] = field(default_factory=list)
    resource_info: ResourceInfo | None = None
    retry_delay: float | None = None


def read_error_details(rpc_error: grpc.RpcError) -> ErrorDetails:
    """Parse the google.rpc.Status details of a failed call (empty details when it had none).

    Several violations of the same field are joined with "; ".
    """
    code = rpc_error.code()
    message = rpc_error.details() or ""
    status = _status_from_trailers(rpc_error)
    if status is None:
        return ErrorDetails(code=code, message=message)
    violations: dict[str, str] = {}
    failures: list[PreconditionViolation] = []
    resource_info: ResourceInfo | None = None
    retry_delay: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                previous = violations.get(violation.field)
                violations[violation.field] = (
                    violation.description
                    if previous is None
                    else f"{previous}; {violation.description}"
                )
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            failures.extend((v.type, v.subject, v.description) for v in failure.violations)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            resource_info = ResourceInfo(info.resource_type, info.resource_name, info.description)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    return ErrorDetails(
        code=code,
        message=message,
        field_violations=violations,
        precondition_failures=failures,
        resource_info=resource_info,
        retry_delay=retry_delay,
    )


def _status_from_trailers(rpc_error: grpc.RpcError) -> status_pb2.Status | None:
    # grpc-stubs types the items as objects; at runtime they are (key, value) pairs.
    trailers = cast(Sequence[tuple[str, str | bytes]], rpc_error.trailing_metadata() or ())
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


# Building details ---------------------------------------------------------------------------


def _violation_pairs(violations: FieldViolationsLike) -> tuple[tuple[str, str], ...]:
    if isinstance(violations, Mapping):
        return tuple(violations.items())
    return tuple(violations)


def _bad_request(violations: FieldViolationsLike) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=path, description=description)
            for path, description in _violation_pairs(violations)
        ]
    )


def _precondition_failure(
    violations: Sequence[PreconditionViolation],
) -> error_details_pb2.PreconditionFailure:
    return error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=kind, subject=subject, description=description
            )
            for kind, subject, description in violations
        ]
    )


def _retry_info(retry_after: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(max(retry_after, 0.0) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _rpc_code(code: grpc.StatusCode) -> int:
    """google.rpc.Code number of a grpc.StatusCode (they share numbering)."""
    number, _name = cast(tuple[int, str], code.value)
    return number
