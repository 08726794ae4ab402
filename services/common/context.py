"""What a service needs from its process, and what it hands back to be run.

``steward serve`` builds one :class:`ServiceContext` and passes it to each service's ``build``
function, which returns the service's :class:`ServiceParts`: its servicers, the event logs it
produces, and what has to start once the server listens (consumers) and stop before it closes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.config import Settings
from services.common.eventlog import ProducerLog
from services.common.keyring import Keyring
from services.common.server import ServiceRegistration
from services.common.telemetry import Telemetry


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """The process-wide dependencies handed to each service's ``build`` function."""

    settings: Settings
    keyring: Keyring
    telemetry: Telemetry


@dataclass(slots=True)
class ServiceParts:
    """What one service contributes to a running process."""

    registrations: list[ServiceRegistration[Any]]
    logs: dict[str, ProducerLog] = field(default_factory=dict)
    """Event logs this service produces, served by the process's EventLogService."""
    on_start: list[Callable[[str], None]] = field(default_factory=list)
    """Called with the process's own address once it serves (e.g. to start consumers)."""
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    """Called in reverse order after the server has stopped."""
