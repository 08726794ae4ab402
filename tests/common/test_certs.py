"""`steward certs init`: a development CA whose certificates verify for the names they serve."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from services.cli import app
from services.common.certs import (
    DEV_CERTS_MARKER,
    CertificateError,
    init_certificates,
    is_development_certificate,
)

runner = CliRunner()


def read(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_service_certificates_chain_to_the_ca_for_every_name_they_are_reached_at(
    tmp_path: Path,
) -> None:
    pki = init_certificates(tmp_path / "certs", services=["consent", "identity"], callers=["alice"])
    ca = read(pki.ca.certificate)
    store = Store([ca])
    consent = read(pki.services[0].certificate)

    for name in ("consent", "localhost"):
        verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
        assert verifier.verify(consent, [])[-1] == ca
    by_ip = (
        PolicyBuilder()
        .store(store)
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    by_ip.verify(consent, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("identity")).verify(
            consent, []
        )
    # Services present the same certificate when they call their peers.
    client = PolicyBuilder().store(store).build_client_verifier().verify(consent, [])
    assert client.chain[-1] == ca
    alice = read(pki.callers[0].certificate)
    PolicyBuilder().store(store).build_client_verifier().verify(alice, [])
    assert alice.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"


def test_usages_say_what_each_certificate_may_do(tmp_path: Path) -> None:
    pki = init_certificates(tmp_path, services=["tagging"], callers=["alice"])
    ca, tagging, alice = (
        read(pki.ca.certificate),
        read(pki.services[0].certificate),
        read(pki.callers[0].certificate),
    )

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for leaf in (tagging, alice):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and not usage.key_cert_sign
    assert set(tagging.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert list(alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    names = tagging.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["tagging", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert tagging.not_valid_after_utc > datetime.datetime.now(datetime.UTC)


def test_private_keys_are_private_and_the_material_is_marked_as_development(
    tmp_path: Path,
) -> None:
    pki = init_certificates(tmp_path / "certs", services=["consent"], callers=["alice"])

    for issued in (pki.ca, *pki.services, *pki.callers):
        assert issued.private_key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "certs").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "certs" / DEV_CERTS_MARKER).exists()
    assert is_development_certificate(pki.services[0].certificate.read_bytes())
    assert [path.name for path in (pki.ca.certificate, pki.ca.private_key)] == [
        "ca.pem",
        "ca-key.pem",
    ]
    assert pki.services[0].private_key.name == "consent-key.pem"


def test_production_certificates_carry_no_development_mark(tmp_path: Path) -> None:
    init_certificates(tmp_path, services=["consent"], callers=["alice"])

    pki = init_certificates(tmp_path, services=["consent"], force=True, development=False)

    assert not (tmp_path / DEV_CERTS_MARKER).exists()
    assert not is_development_certificate(pki.services[0].certificate.read_bytes())
    assert not is_development_certificate(pki.ca.certificate.read_bytes())
    store = Store([read(pki.ca.certificate)])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("consent"))
    verifier.verify(read(pki.services[0].certificate), [])


def test_existing_certificates_are_kept_unless_forced(tmp_path: Path) -> None:
    first = init_certificates(tmp_path, services=["consent"])
    before = first.ca.certificate.read_bytes()

    with pytest.raises(CertificateError, match="refusing to overwrite"):
        init_certificates(tmp_path, services=["consent"])
    assert first.ca.certificate.read_bytes() == before

    init_certificates(tmp_path, services=["consent"], force=True)
    assert first.ca.certificate.read_bytes() != before


def test_names_that_are_not_plain_file_names_or_hosts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot name a certificate"):
        init_certificates(tmp_path, services=["../etc"])
    with pytest.raises(CertificateError, match="cannot name a certificate"):
        init_certificates(tmp_path, services=["consent"], callers=["consent-key"])
    with pytest.raises(CertificateError, match="named twice"):
        init_certificates(tmp_path, services=["consent"], callers=["consent"])
    with pytest.raises(CertificateError, match="neither an IP address nor a DNS name"):
        init_certificates(tmp_path, services=["consent"], hosts=["bad host"])
    assert list(tmp_path.iterdir()) == []


def test_certs_init_command_writes_the_hosts_given(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "certs",
            "init",
            "--dir",
            str(tmp_path),
            "--service",
            "identity",
            "--caller",
            "ops",
            "--hosts",
            "identity.internal,10.0.0.7",
        ],
    )

    assert result.exit_code == 0, result.output
    names = read(tmp_path / "identity.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == ["identity", "identity.internal"]
    assert names.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    again = runner.invoke(app, ["certs", "init", "--dir", str(tmp_path), "--service", "identity"])
    assert again.exit_code == 1 and "--force" in again.output
