"""Process settings, read from the environment once and passed down explicitly.

Nothing here runs at import time: a service calls ``Settings.from_env()`` in its entry point and
hands the result to whatever needs it, so tests build settings from a plain dict and never leak
state between each other. Every setting has a default that is safe on a developer's machine;
``STEWARD_ENV=production`` additionally refuses to run without authentication or on development
keys and certificates (see ``Settings.validate_for_production``). An empty variable counts as
unset, because orchestrators often pass ``NAME=`` for "not configured".
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast, get_args

from services.common.certs import (
    DEV_CERTS_MARKER,
    DEVELOPMENT_ORGANISATION,
    is_development_certificate,
)
from services.common.keyring import DEV_MARKER

Environment = Literal["development", "production"]
LogFormat = Literal["auto", "json", "text"]
Transport = Literal["embedded", "jetstream"]

SERVICE_DATABASES: Final = ("consent", "identity", "tagging", "recommend", "keystore")
"""Every database a Steward process may open; ``keystore`` is consent's separate key store."""

_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_RETIRED_VARIABLES: Final = {
    "STEWARD_ADMIN_TOKEN": "callers and their tokens live in STEWARD_CALLERS_FILE "
    "(`steward callers add NAME --scope ...`)",
}
"""Variables that once meant something: refused rather than silently ignored, because whoever
sets one believes it protects something."""

_TLS_VARIABLES: Final = ("STEWARD_TLS_CERT", "STEWARD_TLS_KEY", "STEWARD_TLS_CA")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """The environment describes a configuration the process must not start with."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a Steward process needs to know about its surroundings.

    Paths and database URLs derived from ``data_dir`` have no default here: build settings with
    ``from_env`` (or ``dataclasses.replace`` on an existing instance) so they stay consistent.
    """

    env: Environment = "development"
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path("data")
    keys_dir: Path
    consent_db_url: str
    identity_db_url: str
    tagging_db_url: str
    recommend_db_url: str
    keystore_db_url: str
    max_message_bytes: int = 4 * 1024 * 1024
    max_batch: int = 1000
    max_workers: int = 32
    """Threads serving calls from other processes (each long-lived Subscribe stream holds one)."""
    max_concurrent_calls: int = 4
    """Unary calls whose handlers run at once; the others wait. Python runs one thread at a time,
    and more runnable threads than that cost CPU handing the interpreter lock around."""
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: LogFormat = "auto"
    otlp_endpoint: str | None = None
    transport: Transport = "embedded"
    nats_url: str = "nats://127.0.0.1:4222"
    jetstream_prefix: str = "steward"
    """Names the JetStream streams (``<PREFIX>_<PRODUCER>``) and subjects (``<prefix>.…``), so
    deployments or tests sharing one NATS server keep their logs apart."""
    phone_default_region: str = "GB"
    callers_file: Path | None = None
    """YAML list of callers, their scopes and credentials; set, it turns authentication on."""
    tls_cert: Path | None = None
    """PEM certificate this process serves with and presents to its peers (mutual TLS)."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_ca: Path | None = None
    """PEM CA that every peer's and caller's certificate must chain to."""
    token: str | None = field(default=None, repr=False)
    """Bearer token this process presents when it calls other processes (``STEWARD_TOKEN``)."""
    checkpoint_every: int = 1000
    """Sign a ledger checkpoint once this many entries have gathered since the last one."""
    checkpoint_seconds: float = 60.0
    """…or once this many seconds have passed with new entries."""
    identity_target: str | None = None
    """Address of the identity service; unset means this process (all-in-one mode)."""
    consent_target: str | None = None
    """Address of the consent service (whose event log tagging and recommend read); unset
    means this process."""
    tagging_target: str | None = None
    """Address of the tagging service (asked for a person's tags in a data-subject export);
    unset means this process, if it hosts tagging, else no tagging is deployed."""
    recommend_target: str | None = None
    """Address of the recommend service, as ``tagging_target``."""
    keyring_json: str | None = field(default=None, repr=False)
    """Keyring contents from ``STEWARD_KEYRING_JSON``; when set it wins over ``keys_dir``."""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, asked: set[str] | None = None
    ) -> Settings:
        """Read settings from ``environ`` (default: the process environment).

        Raises ConfigError naming the offending variable, and runs the production checks when
        ``STEWARD_ENV=production``. ``asked``, if given, collects the name of every variable
        looked up (see ``environment_variables``).
        """
        source = os.environ if environ is None else environ
        values = _Variables(source, set() if asked is None else asked)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}

        def read(name: str, variable: str, parse: Callable[[str, str], _T]) -> _T:
            raw = values.get(variable)
            return cast(_T, defaults[name]) if raw is None else parse(variable, raw)

        data_dir = read("data_dir", "STEWARD_DATA_DIR", _parse_path)
        shared_db_url = values.get("STEWARD_DATABASE_URL")

        def db_url(service: str) -> str:
            specific = values.get(f"STEWARD_{service.upper()}_DB_URL")
            return specific or shared_db_url or f"sqlite:///{data_dir.as_posix()}/{service}.db"

        retired = sorted(name for name in _RETIRED_VARIABLES if source.get(name))
        if retired:
            raise ConfigError(
                "; ".join(
                    f"{name} is no longer read: {_RETIRED_VARIABLES[name]}" for name in retired
                )
            )
        callers_file = values.get("STEWARD_CALLERS_FILE")
        tls = {variable: values.get(variable) for variable in _TLS_VARIABLES}
        if any(tls.values()) and not all(tls.values()):
            missing = ", ".join(variable for variable, path in tls.items() if not path)
            raise ConfigError(
                "STEWARD_TLS_CERT, STEWARD_TLS_KEY and STEWARD_TLS_CA go together; "
                f"missing: {missing}"
            )
        settings = cls(
            env=read("env", "STEWARD_ENV", _choice(Environment)),
            host=read("host", "STEWARD_HOST", _parse_text),
            port=read("port", "STEWARD_PORT", _parse_port),
            data_dir=data_dir,
            keys_dir=Path(values.get("STEWARD_KEYS_DIR") or data_dir / "keys"),
            consent_db_url=db_url("consent"),
            identity_db_url=db_url("identity"),
            tagging_db_url=db_url("tagging"),
            recommend_db_url=db_url("recommend"),
            keystore_db_url=db_url("keystore"),
            max_message_bytes=read("max_message_bytes", "STEWARD_MAX_MESSAGE_BYTES", _positive),
            max_batch=read("max_batch", "STEWARD_MAX_BATCH", _positive),
            max_workers=read("max_workers", "STEWARD_MAX_WORKERS", _positive),
            max_concurrent_calls=read(
                "max_concurrent_calls", "STEWARD_MAX_CONCURRENT_CALLS", _positive
            ),
            grace_seconds=read("grace_seconds", "STEWARD_GRACE_SECONDS", _non_negative_float),
            log_level=read("log_level", "STEWARD_LOG_LEVEL", _parse_log_level),
            log_format=read("log_format", "STEWARD_LOG_FORMAT", _choice(LogFormat)),
            otlp_endpoint=values.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            transport=read("transport", "STEWARD_TRANSPORT", _choice(Transport)),
            nats_url=read("nats_url", "STEWARD_NATS_URL", _parse_text),
            jetstream_prefix=read(
                "jetstream_prefix", "STEWARD_JETSTREAM_PREFIX", _parse_subject_token
            ),
            phone_default_region=read(
                "phone_default_region", "STEWARD_PHONE_REGION", _parse_region
            ),
            callers_file=None if callers_file is None else Path(callers_file),
            tls_cert=_optional_path(tls["STEWARD_TLS_CERT"]),
            tls_key=_optional_path(tls["STEWARD_TLS_KEY"]),
            tls_ca=_optional_path(tls["STEWARD_TLS_CA"]),
            token=values.get("STEWARD_TOKEN"),
            identity_target=values.get("STEWARD_IDENTITY_TARGET"),
            consent_target=values.get("STEWARD_CONSENT_TARGET"),
            tagging_target=values.get("STEWARD_TAGGING_TARGET"),
            recommend_target=values.get("STEWARD_RECOMMEND_TARGET"),
            checkpoint_every=read("checkpoint_every", "STEWARD_CHECKPOINT_EVERY", _positive),
            checkpoint_seconds=read(
                "checkpoint_seconds", "STEWARD_CHECKPOINT_SECONDS", _non_negative_float
            ),
            keyring_json=values.get("STEWARD_KEYRING_JSON"),
        )
        if settings.env == "production":
            settings.validate_for_production()
        return settings

    def target_of(self, service: str, own_target: str) -> str:
        """Where this process reaches ``service``: its configured address, else ``own_target``,
        this process's own."""
        return self.configured_target(service) or own_target

    def configured_target(self, service: str) -> str | None:
        """The address configured for ``service`` (``STEWARD_<SERVICE>_TARGET``), if any."""
        configured = {
            "consent": self.consent_target,
            "identity": self.identity_target,
            "tagging": self.tagging_target,
            "recommend": self.recommend_target,
        }
        return configured.get(service)

    def db_url(self, service: str) -> str:
        """The database URL of ``service`` (one of ``SERVICE_DATABASES``)."""
        if service not in SERVICE_DATABASES:
            known = ", ".join(SERVICE_DATABASES)
            raise ConfigError(f"unknown service database {service!r}; known: {known}")
        return cast(str, getattr(self, f"{service}_db_url"))

    @property
    def tls_enabled(self) -> bool:
        """Whether servers require client certificates and peer channels present this one's."""
        return self.tls_cert is not None

    def validate_for_production(self) -> None:
        """Refuse running open to everyone, and development keys and certificates.

        A production process without a callers file would answer anyone who can reach it, and
        one on keys or certificates made for development (whose CA key lies beside them) would
        look healthy while being open to anyone who has read the README: neither may start.
        """
        problems = []
        if self.callers_file is None:
            problems.append(
                "STEWARD_CALLERS_FILE is not set, so every call would be unauthenticated; "
                "list the callers (`steward callers add`)"
            )
        if self.tls_cert is not None and _development_certificate(self.tls_cert):
            problems.append(
                f"STEWARD_TLS_CERT ({self.tls_cert}) is a development certificate (issued by "
                f"{DEVELOPMENT_ORGANISATION!r} or beside {DEV_CERTS_MARKER}); use "
                "`steward certs init --production` or your own CA"
            )
        if (self.keys_dir / DEV_MARKER).exists():
            problems.append(
                f"STEWARD_KEYS_DIR ({self.keys_dir}) holds development keys "
                f"(found {DEV_MARKER}); run `steward keys init` for production keys"
            )
        if problems:
            raise ConfigError("refusing to start in production: " + "; ".join(problems))


def environment_variables() -> frozenset[str]:
    """The name of every variable ``Settings.from_env`` reads.

    Deployment files (compose.yaml) are checked against it, so a misspelt or retired variable
    there fails a test instead of being silently ignored by the running service.
    """
    asked: set[str] = set()
    Settings.from_env({}, asked=asked)
    return frozenset(asked)


class _Variables:
    """The non-empty variables of an environment, noting each name looked up."""

    __slots__ = ("_asked", "_values")

    def __init__(self, source: Mapping[str, str], asked: set[str]) -> None:
        self._values = {name: value for name, value in source.items() if value != ""}
        self._asked = asked

    def get(self, name: str, default: str | None = None) -> str | None:
        self._asked.add(name)
        return self._values.get(name, default)


def _development_certificate(path: Path) -> bool:
    """Whether ``path`` holds a development certificate. One that cannot be read is left to
    the server's start, which names the file it cannot use."""
    if (path.parent / DEV_CERTS_MARKER).exists():
        return True
    try:
        return is_development_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False


def _parse_text(variable: str, raw: str) -> str:
    return raw


def _parse_path(variable: str, raw: str) -> Path:
    return Path(raw)


def _optional_path(raw: str | None) -> Path | None:
    return None if raw is None else Path(raw)


def _parse_int(variable: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{variable} must be an integer, got {raw!r}") from None


def _parse_port(variable: str, raw: str) -> int:
    port = _parse_int(variable, raw)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{variable} must be a port between 0 and 65535, got {port}")
    return port


def _positive(variable: str, raw: str) -> int:
    value = _parse_int(variable, raw)
    if value <= 0:
        raise ConfigError(f"{variable} must be a positive integer, got {value}")
    return value


def _non_negative_float(variable: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{variable} must be a number of seconds, got {raw!r}") from None
    if not value >= 0:  # also rejects NaN
        raise ConfigError(f"{variable} must not be negative, got {raw!r}")
    return value


def _parse_log_level(variable: str, raw: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"{variable} must be one of {', '.join(_LOG_LEVELS)}, got {raw!r}")
    return level


def _parse_subject_token(variable: str, raw: str) -> str:
    # A dot or wildcard would change what every subject built from it matches.
    if not re.fullmatch(r"[A-Za-z0-9_-]+", raw):
        raise ConfigError(
            f"{variable} may hold only letters, digits, '_' and '-' (one NATS subject token), "
            f"got {raw!r}"
        )
    return raw


def _parse_region(variable: str, raw: str) -> str:
    region = raw.upper()
    if len(region) != 2 or not region.isalpha():
        raise ConfigError(f"{variable} must be a two-letter region code such as GB, got {raw!r}")
    return region


def _choice(options: object) -> Callable[[str, str], Any]:
    """A parser accepting only the members of the ``Literal`` type ``options``."""
    allowed: tuple[str, ...] = get_args(options)

    def parse(variable: str, raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            raise ConfigError(f"{variable} must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse
