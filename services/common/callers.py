"""Who is calling: the name recorded as the actor of what a call changes, and the callers file
that says who may call at all.

``caller_of(context)`` is the one way a servicer learns who calls. With authentication on (a
callers file is configured), it is the caller the authorisation interceptor admitted, set for
the duration of the call by :func:`acting_as`; whatever the call's metadata claims is ignored.
Without it (the embedded default, and the in-process internal server), callers name themselves
in the ``x-steward-caller`` metadata entry, trusted as everything is in that mode.

The callers file (``STEWARD_CALLERS_FILE``, YAML) lists every caller::

    callers:
      - name: shop-backend
        scopes: [events:write, consent:write, consent:read]
        token_sha256: 9f86d081884c7d65...   # hex SHA-256 of the bearer token
        rate_limit: {per_second: 200, burst: 400}
      - name: tagging
        scopes: [events:read]
        certificate_subject: tagging           # the CN of its client certificate

A caller authenticates with a bearer token (``authorization: Bearer <token>``), with a client
certificate whose subject CN is its ``certificate_subject``, or either. Scopes are listed one by
one: there is no wildcard, because a wildcard would silently grant whatever scope a later
version adds (a new erasure RPC, say) to callers nobody reviewed for it.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import yaml

from services.common.config import ConfigError

CALLER_METADATA_KEY: Final = "x-steward-caller"
ANONYMOUS: Final = "anonymous"
TOKEN_BYTES: Final = 32
_NAME: Final = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_SCOPE: Final = re.compile(r"[a-z]+(?:-[a-z]+)*:[a-z]+(?:-[a-z]+)*")

_authenticated: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "steward_authenticated_caller", default=None
)


def caller_of(context: grpc.ServicerContext) -> str:
    """The caller's name, or ``anonymous``; never anything but a short plain name."""
    authenticated = _authenticated.get()
    if authenticated is not None:
        return authenticated
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_METADATA_KEY and isinstance(value, str) and _NAME.fullmatch(value):
            return value
    return ANONYMOUS


@contextmanager
def acting_as(name: str) -> Iterator[None]:
    """Run the enclosed part of a call as the authenticated caller ``name``.

    A context variable rather than call metadata, because metadata is what the caller sent and
    cannot be overwritten; it is reset afterwards because the worker thread serves other calls.
    """
    token = _authenticated.set(name)
    try:
        yield
    finally:
        _authenticated.reset(token)


# The callers file --------------------------------------------------------------------------------


class CallersFileError(ConfigError):
    """The callers file cannot be read or describes callers the suite must not start with."""


def new_token() -> str:
    """A fresh bearer token: 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The hex SHA-256 of a bearer token, as the callers file stores it.

    A plain hash, without salt or a slow key derivation, is enough: tokens are 32 random bytes,
    so there is no dictionary to try and 2**256 candidates to brute-force, unlike passwords.
    Looking a presented token's hash up in a dict leaks nothing useful through timing either:
    an attacker choosing tokens does not choose their hashes.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """A caller's token bucket: ``per_second`` calls on average, up to ``burst`` at once."""

    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Caller:
    """One entry of the callers file."""

    name: str
    scopes: frozenset[str]
    token_sha256: str | None = None
    certificate_subject: str | None = None
    rate_limit: RateLimitSpec | None = None

    def to_document(self) -> dict[str, Any]:
        """The entry as the callers file writes it."""
        document: dict[str, Any] = {"name": self.name, "scopes": sorted(self.scopes)}
        if self.token_sha256 is not None:
            document["token_sha256"] = self.token_sha256
        if self.certificate_subject is not None:
            document["certificate_subject"] = self.certificate_subject
        if self.rate_limit is not None:
            document["rate_limit"] = {
                "per_second": self.rate_limit.per_second,
                "burst": self.rate_limit.burst,
            }
        return document


class Callers:
    """Every caller of a callers file, found by token hash or certificate subject."""

    def __init__(self, callers: Sequence[Caller]) -> None:
        self._callers = tuple(callers)
        self._by_token: dict[str, Caller] = {}
        self._by_subject: dict[str, Caller] = {}
        names: set[str] = set()
        for caller in self._callers:
            if caller.name in names:
                raise CallersFileError(f"caller {caller.name!r} is listed twice")
            names.add(caller.name)
            if caller.token_sha256 is not None:
                if caller.token_sha256 in self._by_token:
                    raise CallersFileError(f"caller {caller.name!r} shares another's token")
                self._by_token[caller.token_sha256] = caller
            if caller.certificate_subject is not None:
                if caller.certificate_subject in self._by_subject:
                    raise CallersFileError(
                        f"caller {caller.name!r} shares another's certificate subject"
                    )
                self._by_subject[caller.certificate_subject] = caller

    def __iter__(self) -> Iterator[Caller]:
        return iter(self._callers)

    def __len__(self) -> int:
        return len(self._callers)

    def by_token(self, token: str) -> Caller | None:
        return self._by_token.get(hash_token(token))

    def by_certificate_subject(self, subject: str) -> Caller | None:
        return self._by_subject.get(subject)

    def adding(self, caller: Caller) -> Callers:
        """These callers and ``caller``; refused when it repeats a name, token or subject."""
        return Callers([*self._callers, caller])

    @classmethod
    def load(cls, path: Path, known_scopes: frozenset[str]) -> Callers:
        """Read and check a callers file; a missing file is an error (configured, not there)."""
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise CallersFileError(f"cannot read the callers file {path}: {error}") from error
        return cls.from_document(document, known_scopes, source=str(path))

    @classmethod
    def from_document(cls, document: object, known_scopes: frozenset[str], source: str) -> Callers:
        entries = document.get("callers") if isinstance(document, Mapping) else None
        if document is None:
            entries = []
        if not isinstance(entries, list):
            raise CallersFileError(f"{source}: expected a mapping with a `callers:` list")
        return cls(
            [_caller(entry, index, known_scopes, source) for index, entry in enumerate(entries)]
        )

    def save(self, path: Path) -> None:
        """Write the file atomically (mode 0600); it holds token hashes, never tokens."""
        text = yaml.safe_dump(
            {"callers": [caller.to_document() for caller in self._callers]}, sort_keys=False
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(text)
            os.chmod(temporary, 0o600)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _caller(entry: object, index: int, known_scopes: frozenset[str], source: str) -> Caller:
    where = f"{source}: callers[{index}]"
    if not isinstance(entry, Mapping):
        raise CallersFileError(f"{where} must be a mapping")
    unknown_keys = sorted(
        set(entry) - {"name", "scopes", "token_sha256", "certificate_subject", "rate_limit"}
    )
    if unknown_keys:
        raise CallersFileError(f"{where}: unknown keys {', '.join(map(str, unknown_keys))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CallersFileError(f"{where}: `name` must be 1-128 of A-Z a-z 0-9 _ . : @ / -")
    where = f"{source}: caller {name!r}"
    if entry.get("token_sha256") is None and entry.get("certificate_subject") is None:
        raise CallersFileError(f"{where}: give `token_sha256`, `certificate_subject` or both")
    return Caller(
        name=name,
        scopes=parse_scopes(entry.get("scopes"), known_scopes, where),
        token_sha256=_token_hash(entry.get("token_sha256"), where),
        certificate_subject=_subject(entry.get("certificate_subject"), where),
        rate_limit=_rate_limit(entry.get("rate_limit"), where),
    )


def parse_scopes(raw: object, known_scopes: frozenset[str], where: str) -> frozenset[str]:
    """A caller's scopes, each one some RPC requires; ``*`` and typos are refused."""
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
        raise CallersFileError(f"{where}: `scopes` must be a non-empty list of scopes")
    if "*" in raw:
        raise CallersFileError(
            f"{where}: `*` is not a scope; list the scopes (it would grant scopes added later)"
        )
    malformed = sorted(scope for scope in raw if not _SCOPE.fullmatch(scope))
    if malformed:
        raise CallersFileError(f"{where}: malformed scopes {', '.join(malformed)} (area:verb)")
    unknown = sorted(set(raw) - known_scopes)
    if unknown:
        raise CallersFileError(
            f"{where}: no RPC requires {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known_scopes))}"
        )
    return frozenset(raw)


def _token_hash(raw: object, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not _SHA256_HEX.fullmatch(raw.lower()):
        raise CallersFileError(f"{where}: `token_sha256` must be 64 hex digits (never the token)")
    return raw.lower()


def _subject(raw: object, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise CallersFileError(f"{where}: `certificate_subject` must be the certificate's CN")
    return raw


def _rate_limit(raw: object, where: str) -> RateLimitSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"per_second", "burst"}:
        raise CallersFileError(f"{where}: `rate_limit` takes `per_second` and `burst`")
    per_second = raw.get("per_second")
    if isinstance(per_second, bool) or not isinstance(per_second, int | float):
        raise CallersFileError(f"{where}: `rate_limit.per_second` must be a number")
    if not (per_second > 0 and math.isfinite(per_second)):
        raise CallersFileError(f"{where}: `rate_limit.per_second` must be positive")
    burst = raw.get("burst", max(1, math.ceil(per_second)))
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise CallersFileError(f"{where}: `rate_limit.burst` must be a positive integer")
    return RateLimitSpec(float(per_second), burst)
