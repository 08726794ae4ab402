"""Authentication, authorisation and rate limits of the calls a suite's public server answers.

:class:`Authorization` admits a call when its caller is in the callers file (by bearer token
or by the CN of its verified client certificate), holds the scope the method declares in the
protos, and has a token left in its rate-limit bucket. It runs after the telemetry interceptor,
so refused calls show in traces with their status, and before the concurrency limit, so a
refused call never waits for a turn. gRPC's own services (health, reflection) pass through:
load balancers and ``steward health`` probe them without credentials. Rate limits are checked
by the same interceptor rather than one of their own because each interceptor costs a call
about 11 us of CPU in gRPC's machinery alone, more than the checks themselves (bench/auth.py).

Answers follow gRPC's meaning of the codes: UNAUTHENTICATED when the caller cannot be told
(no credential, an unknown token or certificate), PERMISSION_DENIED when it can but lacks the
scope, RESOURCE_EXHAUSTED with a google.rpc.RetryInfo when it is over its rate. No answer and
no log line carries the token presented.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

import grpc

from services.common.callers import Caller, Callers, acting_as
from services.common.config import Settings
from services.common.errors import (
    abort_permission_denied,
    abort_resource_exhausted,
    abort_unauthenticated,
)
from services.common.interceptors import BehaviourInterceptor, StreamBehaviour, UnaryBehaviour
from services.common.rate_limit import CallerRateLimits, Clock
from services.common.scopes import known_scopes, required_scope

AUTHORIZATION_METADATA_KEY: Final = "authorization"


class Authorization(BehaviourInterceptor):
    """Admits a call only for a known caller holding the method's scope and within its rate,
    then runs it as them. Streaming calls take one token from the bucket, when they start."""

    def __init__(self, callers: Callers, rate_limits: CallerRateLimits | None = None) -> None:
        super().__init__()
        self._callers = callers
        self._rate_limits = rate_limits

    def wrap_unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        scope = required_scope(method)

        def authorised(request: Any, context: grpc.ServicerContext) -> Any:
            caller = self._admit(context, method, scope)
            with acting_as(caller.name):
                return behaviour(request, context)

        return authorised

    def wrap_stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        scope = required_scope(method)

        def authorised(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = self._admit(context, method, scope)
            with acting_as(caller.name):
                responses = behaviour(request, context)
            # Set around each step, never across a yield: a stream closed early is finalised
            # wherever it is collected, and the worker thread serves other calls in between.
            try:
                while True:
                    with acting_as(caller.name):
                        try:
                            response = next(responses)
                        except StopIteration:
                            return
                    yield response
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()  # as `yield from` would: the handler's own clean-up runs now

        return authorised

    def _admit(self, context: grpc.ServicerContext, method: str, scope: str | None) -> Caller:
        caller = self._authenticate(context)
        if scope is None:
            # Fails closed: a method whose proto names no scope is open to nobody.
            abort_permission_denied(context, f"{method} declares no scope; nobody may call it")
        if scope not in caller.scopes:
            abort_permission_denied(
                context, f"caller {caller.name!r} lacks the scope {scope!r} that {method} needs"
            )
        if self._rate_limits is not None:
            wait = self._rate_limits.take(caller.name)
            if wait > 0:
                abort_resource_exhausted(
                    context, f"caller {caller.name!r} is over its rate limit", retry_after=wait
                )
        return caller

    def _authenticate(self, context: grpc.ServicerContext) -> Caller:
        """The caller by bearer token if one is sent (it wins over the certificate, being the
        more specific credential), else by certificate."""
        authorization = _authorization(context)
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            known = scheme.lower() == "bearer" and bool(token)
            caller = self._callers.by_token(token) if known else None
            if caller is None:
                abort_unauthenticated(context, "the bearer token is not a known caller's")
            return caller
        subject = _certificate_subject(context)
        if subject is not None:
            caller = self._callers.by_certificate_subject(subject)
            if caller is None:
                abort_unauthenticated(
                    context, f"the certificate subject {subject!r} is not a known caller"
                )
            return caller
        abort_unauthenticated(
            context, "credentials required: `authorization: Bearer <token>` or a client certificate"
        )


def load_callers(settings: Settings) -> Callers | None:
    """The callers file's callers, or None when none is configured (authentication off)."""
    if settings.callers_file is None:
        return None
    return Callers.load(settings.callers_file, known_scopes())


def access_interceptors(
    callers: Callers | None, *, clock: Clock | None = None
) -> Sequence[grpc.ServerInterceptor[Any, Any]]:
    """The authorisation interceptor of ``callers`` (with their rate limits, on ``clock``);
    nothing when ``callers`` is None, authentication being off."""
    if callers is None:
        return ()
    limits = {caller.name: caller.rate_limit for caller in callers if caller.rate_limit}
    rate_limits = CallerRateLimits(limits) if clock is None else CallerRateLimits(limits, clock)
    return [Authorization(callers, rate_limits if rate_limits else None)]


def _authorization(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_METADATA_KEY and isinstance(value, str):
            return value
    return None


def _certificate_subject(context: grpc.ServicerContext) -> str | None:
    """The CN of the client certificate, verified against the CA by the TLS handshake (the
    server requires one whenever it serves TLS)."""
    names = context.auth_context().get("x509_common_name")
    if not names:
        return None
    subject = names[0]
    return subject.decode("utf-8", "replace") if isinstance(subject, bytes) else str(subject)
