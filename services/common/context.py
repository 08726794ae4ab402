"""What a service needs from its process, and what it hands back to be run.

``steward serve`` builds one :class:`ServiceContext` and passes it to each service's ``build``
function, which returns the service's :class:`ServiceParts`: its servicers, the event logs it
produces, and what has to start once the server listens (consumers) and stop before it closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.channels import open_channel
from services.common.config import Settings
from services.common.consumer import GrpcEnvelopeSource, SourceFactory
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
    hosted: tuple[str, ...] = ()
    """The services this process hosts."""
    envelope_sources: SourceFactory = GrpcEnvelopeSource
    """How this process's consumers read the logs: the producers' Subscribe streams, or
    JetStream when ``STEWARD_TRANSPORT=jetstream`` (pass it to ``start_log_consumers``)."""

    def deployed(self, service: str) -> bool:
        """Whether ``service`` runs anywhere this process knows of: here, or at a configured
        address. A service that is neither is not part of this deployment (a test starting
        consent and identity alone, say), so nobody waits for it."""
        return service in self.hosted or self.settings.configured_target(service) is not None


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


class PeerChannels:
    """Channels from this process to the services it calls or whose logs it reads.

    ``to("consent")`` is a channel to where the settings say consent runs, or to this process's
    own (internal) address when it runs here; one channel per address, all closed by ``close``.
    Channels to other processes carry this process's credentials (its certificate under mutual
    TLS, its ``STEWARD_TOKEN``); the channel to its own internal socket needs none, that server
    being reachable only by this OS user (see ``services.runtime``).
    """

    def __init__(self, settings: Settings, own_target: str) -> None:
        self._settings = settings
        self._own_target = own_target
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def to(self, service: str) -> grpc.Channel:
        target = self._settings.target_of(service, self._own_target)
        with self._lock:
            channel = self._channels.get(target)
            if channel is None:
                channel = self._channels[target] = (
                    grpc.insecure_channel(target)
                    if target == self._own_target
                    else open_channel(target, self._settings)
                )
            return channel

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
