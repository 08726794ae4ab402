"""Consent's view of the identity service: identifiers in, person ids out, over gRPC.

Identifiers are pseudonymised before they leave consent; identity receives only keyed hashes.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from steward.common.v1 import common_pb2
from steward.identity.v1 import identity_pb2, identity_pb2_grpc

from services.common.errors import Unavailable
from services.common.identifiers import PseudonymisedIdentifier

DEFAULT_TIMEOUT = 5.0


def _wire(identifiers: Sequence[PseudonymisedIdentifier]) -> list[common_pb2.Identifier]:
    return [
        common_pb2.Identifier(
            type=i.type, value=i.digest, namespace=i.namespace, pseudonymised=True
        )
        for i in identifiers
        if not i.blocked
    ]


class IdentityClient:
    """Resolves and looks up persons; every call carries a deadline."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)

    def resolve(
        self,
        items: Sequence[Sequence[PseudonymisedIdentifier]],
        source: str,
        timeout: float | None,
    ) -> list[str]:
        """The person of each identifier set, created or merged as identity's rules allow.

        An item whose identifiers were all refused (blocked, quarantined) gets "".
        """
        request = identity_pb2.ResolveRequest(
            items=[identity_pb2.ResolveItem(identifiers=_wire(item)) for item in items],
            source=source,
        )
        if any(not item.identifiers for item in request.items):
            answers = iter(self._call_resolve(request, timeout, skip_empty=True))
            return [next(answers) if item.identifiers else "" for item in request.items]
        return self._call_resolve(request, timeout, skip_empty=False)

    def resolve_many(
        self,
        items: Sequence[Sequence[PseudonymisedIdentifier]],
        sources: Sequence[str],
        timeout: float | None,
    ) -> list[str]:
        """Like ``resolve`` with one source per item (Collect: the event's channel)."""
        wire = [_wire(item) for item in items]
        kept = [i for i, identifiers in enumerate(wire) if identifiers]
        answers = [""] * len(items)
        if not kept:
            return answers
        request = identity_pb2.ResolveRequest(
            items=[identity_pb2.ResolveItem(identifiers=wire[i], source=sources[i]) for i in kept]
        )
        for position, person in zip(
            kept, self._call_resolve(request, timeout, skip_empty=False), strict=True
        ):
            answers[position] = person
        return answers

    def _call_resolve(
        self, request: identity_pb2.ResolveRequest, timeout: float | None, *, skip_empty: bool
    ) -> list[str]:
        if skip_empty:
            kept = [item for item in request.items if item.identifiers]
            if not kept:
                return []
            request = identity_pb2.ResolveRequest(items=kept, source=request.source)
        try:
            response = self._stub.Resolve(request, timeout=timeout or DEFAULT_TIMEOUT)
        except grpc.RpcError as error:
            raise _unavailable(error) from error
        return [result.person_id for result in response.results]

    def lookup(self, identifiers: Sequence[PseudonymisedIdentifier], timeout: float | None) -> str:
        """The live person of the first known identifier, or "" when none is known."""
        wire = _wire(identifiers)
        if not wire:
            return ""
        try:
            response = self._stub.Lookup(
                identity_pb2.LookupRequest(identifiers=wire), timeout=timeout or DEFAULT_TIMEOUT
            )
        except grpc.RpcError as error:
            raise _unavailable(error) from error
        return next((m.person_id for m in response.matches if m.person_id), "")

    def person(self, person_id: str, timeout: float | None) -> identity_pb2.Person | None:
        """The person (an alias answers with its root), or None when identity does not know it."""
        try:
            response = self._stub.GetPerson(
                identity_pb2.GetPersonRequest(person_id=person_id),
                timeout=timeout or DEFAULT_TIMEOUT,
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _unavailable(error) from error
        return response.person

    def forget(self, person_id: str, reason: str, timeout: float | None) -> int:
        """Delete the person's identifiers; returns how many (0 when identity knew nobody)."""
        try:
            response = self._stub.Forget(
                identity_pb2.ForgetRequest(person_id=person_id, reason=reason),
                timeout=timeout or DEFAULT_TIMEOUT,
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise _unavailable(error) from error
        return response.identifiers_deleted


def _unavailable(error: grpc.RpcError) -> Exception:
    code = error.code() if callable(getattr(error, "code", None)) else None
    name = code.name if code is not None else "an error"
    return Unavailable(f"the identity service could not resolve the subject ({name})")
