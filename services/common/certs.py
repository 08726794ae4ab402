"""A certificate authority and the certificates of a suite, for mutual TLS.

``steward certs init`` writes, into one directory (made with mode 0700 if it is new), the names
compose.yaml mounts:

- ``ca.pem`` / ``ca-key.pem``: a self-signed CA (CA:true, may sign only end-entity
  certificates);
- ``<service>.pem`` / ``<service>-key.pem`` for each service: one certificate it serves with and
  presents when it calls its peers (server and client auth), CN the service's name, the
  service's name and the given hosts as subject alternative names so a client can reach it as
  ``consent:50051`` in compose or ``127.0.0.1:50051`` on a laptop;
- ``<caller>.pem`` / ``<caller>-key.pem`` for each caller: a client certificate, CN the caller's
  name, which is what a callers file's ``certificate_subject`` names (and the alternative name
  ``urn:steward:caller:<name>``).

Private keys are written 0600 and nothing is overwritten unless asked. Like keys
(``services.common.keyring``), certificates are made for development unless asked otherwise:
development material has its CA named :data:`DEVELOPMENT_ORGANISATION` and the marker file
:data:`DEV_CERTS_MARKER` beside it, and production start-up refuses a certificate that has
either (``Settings.validate_for_production``). The issuer's name is what catches a development
certificate mounted on its own, as a container secret, away from its marker.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEV_CERTS_MARKER: Final = ".development-certificates"
"""Written beside development certificates; production refuses to serve with them."""

DEVELOPMENT_ORGANISATION: Final = "Steward development"
"""The organisation of a development CA and what it signs; production refuses such a
certificate wherever it is found."""

CA_NAME: Final = "ca"
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1")
CA_VALID_DAYS: Final = 3650
LEAF_VALID_DAYS: Final = 825
"""The longest validity browsers and most TLS stacks still accept for a leaf certificate."""

_FILE_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PRODUCTION_ORGANISATION: Final = "Steward"


class CertificateError(Exception):
    """The certificates cannot be made as asked (a bad name, or files already there)."""


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    """Where one certificate and its private key were written."""

    name: str
    certificate: Path
    private_key: Path


@dataclass(frozen=True, slots=True)
class IssuedPki:
    """What ``init_certificates`` wrote."""

    ca: IssuedFiles
    services: tuple[IssuedFiles, ...]
    callers: tuple[IssuedFiles, ...]
    development: bool


def init_certificates(
    directory: Path,
    *,
    services: Sequence[str],
    callers: Sequence[str] = (),
    hosts: Sequence[str] = DEFAULT_HOSTS,
    force: bool = False,
    development: bool = True,
    now: datetime.datetime | None = None,
) -> IssuedPki:
    """Make a CA and sign a certificate for every service and caller.

    ``development=False`` is for a small deployment that runs its own CA (compose on one host):
    the CA's key is still written beside the certificates, to be moved somewhere safe.

    Refuses (before writing anything) names that are not plain file names, a name used twice,
    and files that exist already unless ``force``: replacing a CA silently would strand every
    certificate it signed.
    """
    names = [*services, *callers]
    for name in names:
        if not _FILE_NAME.fullmatch(name) or name == CA_NAME or name.endswith("-key"):
            raise CertificateError(
                f"{name!r} cannot name a certificate: use 1-64 of A-Z a-z 0-9 _ . - "
                "(not 'ca', not ending in '-key')"
            )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CertificateError(f"named twice: {', '.join(repeated)}")
    host_names = [_subject_alternative_name(host) for host in hosts]
    targets = [path for name in [CA_NAME, *names] for path in _paths(directory, name)]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not force:
        raise CertificateError(
            f"refusing to overwrite {', '.join(existing)} (use --force to replace them)"
        )

    # A directory made here is private; one given that exists keeps its mode (it may be `.`).
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    organisation = DEVELOPMENT_ORGANISATION if development else _PRODUCTION_ORGANISATION
    ca_certificate = _ca_certificate(ca_key, start, organisation)
    ca_files = _write(directory, CA_NAME, ca_certificate, ca_key)
    issued_services = []
    for service in services:
        sans = _unique([x509.DNSName(service), *host_names])
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _leaf_certificate(
            service,
            key,
            ca_certificate,
            ca_key,
            start,
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            sans,
        )
        issued_services.append(_write(directory, service, certificate, key))
    issued_callers = []
    for caller in callers:
        key = ec.generate_private_key(ec.SECP256R1())
        # RFC 5280 wants a subject alternative name beside the subject; a URN names a caller.
        certificate = _leaf_certificate(
            caller,
            key,
            ca_certificate,
            ca_key,
            start,
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            [x509.UniformResourceIdentifier(f"urn:steward:caller:{caller}")],
        )
        issued_callers.append(_write(directory, caller, certificate, key))
    marker = directory / DEV_CERTS_MARKER
    if development:
        marker.write_text(
            "Made by `steward certs init --dev`: development certificates, refused in "
            "production.\n",
            encoding="utf-8",
        )
    else:
        marker.unlink(missing_ok=True)
    return IssuedPki(ca_files, tuple(issued_services), tuple(issued_callers), development)


def _subject_alternative_name(host: str) -> x509.GeneralName:
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise CertificateError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _unique(names: Sequence[x509.GeneralName]) -> list[x509.GeneralName]:
    unique: list[x509.GeneralName] = []
    for name in names:
        if name not in unique:
            unique.append(name)
    return unique


def is_development_certificate(pem: bytes) -> bool:
    """Whether a PEM certificate was signed by (or is) a development CA of ``certs init``."""
    certificate = x509.load_pem_x509_certificate(pem)
    return any(
        attribute.value == DEVELOPMENT_ORGANISATION
        for name in (certificate.issuer, certificate.subject)
        for attribute in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    )


def _paths(directory: Path, name: str) -> tuple[Path, Path]:
    """Where the certificate and the private key called ``name`` go."""
    return directory / f"{name}.pem", directory / f"{name}-key.pem"


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, start: datetime.datetime, organisation: str
) -> x509.Certificate:
    name = _name(f"{organisation} CA", organisation)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
    usages: list[x509.ObjectIdentifier],
    alternative_names: list[x509.GeneralName],
) -> x509.Certificate:
    public_key = key.public_key()
    ca_key_id = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    organisation = ca_certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, str(organisation.value)))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=LEAF_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id.value),
            critical=False,
        )
    )
    builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write(
    directory: Path,
    name: str,
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> IssuedFiles:
    certificate_path, key_path = _paths(directory, name)
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: never readable by others, not even for a moment.
    key_path.unlink(missing_ok=True)
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_bytes)
    return IssuedFiles(name, certificate_path, key_path)
