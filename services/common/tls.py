"""Mutual TLS credentials from the PEM files the settings name.

When ``STEWARD_TLS_CERT``, ``STEWARD_TLS_KEY`` and ``STEWARD_TLS_CA`` are set, every server a
process runs for other processes requires a client certificate signed by that CA, and every
channel it opens to another process presents its own certificate and checks the server's
against the same CA. One certificate per process does both jobs: it is who the process is,
whichever end of a call it is on. The files are read when a server or channel is built, never at
import time, and a file that cannot be read stops the process with its path in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.config import ConfigError, Settings


class TlsFilesError(ConfigError):
    """A configured certificate, key or CA file cannot be read."""


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes of a process's certificate, its key and the CA it trusts."""

    certificate: bytes
    private_key: bytes
    ca: bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsMaterial | None:
        """The configured material, or None when TLS is off."""
        if settings.tls_cert is None or settings.tls_key is None or settings.tls_ca is None:
            return None
        return cls(
            _read("STEWARD_TLS_CERT", settings.tls_cert, b"CERTIFICATE"),
            _read("STEWARD_TLS_KEY", settings.tls_key, b"PRIVATE KEY"),
            _read("STEWARD_TLS_CA", settings.tls_ca, b"CERTIFICATE"),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this certificate and admit only clients with one the CA signed."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate)],
            root_certificates=self.ca,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Present this certificate and trust only servers the CA signed."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.private_key,
            certificate_chain=self.certificate,
        )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The public server's credentials; None (plaintext) when TLS is not configured."""
    material = TlsMaterial.from_settings(settings)
    return None if material is None else material.server_credentials()


def _read(variable: str, path: Path, kind: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TlsFilesError(f"{variable}: cannot read {path}: {error.strerror}") from error
    if b"-----BEGIN " not in data or kind not in data:
        raise TlsFilesError(f"{variable}: {path} holds no PEM {kind.decode()}")
    return data
