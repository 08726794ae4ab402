"""Fixtures of the identity tests: a migrated identity database on each backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2

from services.common.identifiers import pseudonymise_identifier
from services.common.keyring import Keyring
from services.common.migrations import upgrade
from services.identity.graph import IdentifierInput, ItemInput
from services.identity.service import IdentityService
from services.identity.store import IdentityStore

T = common_pb2


class Clock:
    """A settable clock, so tests decide what 'now' is."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def identity(engine: Engine, keyring: Keyring, clock: Clock) -> Iterator[IdentityService]:
    upgrade(engine, "identity")
    yield IdentityService(IdentityStore(engine), keyring, clock)


Spec = tuple[str, str] | tuple[str, str, str]
ItemMaker = Callable[..., ItemInput]


def make_item(
    service: IdentityService,
    *identifiers: Spec,
    source: str = "web",
    seen_at: datetime | None = None,
) -> ItemInput:
    """An item of ``(type name, raw value[, namespace])`` identifiers, hashed as Resolve does."""
    inputs = []
    for index, spec in enumerate(identifiers):
        type_name, value = spec[0], spec[1]
        namespace = spec[2] if len(spec) > 2 else ""
        type_ = common_pb2.IdentifierType.Value(f"IDENTIFIER_TYPE_{type_name}")
        hashed = pseudonymise_identifier(
            common_pb2.Identifier(type=type_, value=value, namespace=namespace),
            service.keyring,
            is_blocked=service.rules.is_blocked,
        )
        inputs.append(
            IdentifierInput(
                index,
                hashed.type,
                hashed.namespace,
                hashed.digest,
                hashed.candidates,
                blocked=hashed.blocked,
            )
        )
    return ItemInput(0, tuple(inputs), source, seen_at or datetime.now(UTC))


@pytest.fixture
def item(identity: IdentityService, clock: Clock) -> ItemMaker:
    """``item(("EMAIL", "a@example.com"), ("COOKIE_ID", "c1"), source="web")``."""

    def make(*identifiers: Spec, source: str = "web") -> ItemInput:
        return make_item(identity, *identifiers, source=source, seen_at=clock())

    return make
