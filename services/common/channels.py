"""The one way a Steward process or the ``steward`` command opens a channel to a running suite.

:func:`open_channel` honours the settings: over mutual TLS when ``STEWARD_TLS_*`` are set
(presenting this process's certificate), and with ``authorization: Bearer <token>`` on every
call when a token is configured (``STEWARD_TOKEN``). The token travels as call metadata from an
interceptor rather than as gRPC call credentials, because those are refused on plaintext
channels and a token is the embedded alternative to TLS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common.auth import AUTHORIZATION_METADATA_KEY
from services.common.call_metadata import AddedMetadata
from services.common.config import Settings
from services.common.tls import TlsMaterial

ChannelOptions = Sequence[tuple[str, Any]]


def open_channel(target: str, settings: Settings, options: ChannelOptions = ()) -> grpc.Channel:
    """A channel to ``target`` carrying this process's credentials, if it has any."""
    material = TlsMaterial.from_settings(settings)
    channel = (
        grpc.insecure_channel(target, options=options)
        if material is None
        else grpc.secure_channel(target, material.channel_credentials(), options=options)
    )
    if settings.token:
        channel = grpc.intercept_channel(channel, BearerToken(settings.token))
    return channel


class BearerToken(AddedMetadata):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION_METADATA_KEY, f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"

    def entries(self) -> tuple[tuple[str, str]]:
        return (self._entry,)
