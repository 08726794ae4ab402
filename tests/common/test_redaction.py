import pytest

from services.common.redaction import (
    contains_identifier,
    is_identifier,
    names_identifier,
    redact_text,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+44 7700 900123", "[redacted]"),
        ("ring (020) 7946 0958 today", "ring [redacted] today"),
        ("mail Bob.Smith+x@sub.example.co.uk!", "mail [redacted]!"),
        ("tel:+447700900123", "tel:[redacted]"),
        ("2024-01-01 12:00:00", "2024-01-01 12:00:00"),
        ("peer ipv4:192.168.100.200:50051", "peer ipv4:192.168.100.200:50051"),
        (
            "person 123e4567-e89b-12d3-a456-426614174000",
            "person 123e4567-e89b-12d3-a456-426614174000",
        ),
        ("trace 4bf92f3577b34da6a3ce929d0e0e4736", "trace 4bf92f3577b34da6a3ce929d0e0e4736"),
        ("grpcio@1.85 took 0.1234567 s", "grpcio@1.85 took 0.1234567 s"),
        ("batch of 500", "batch of 500"),
    ],
)
def test_redaction_recognises_identifier_shapes(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert contains_identifier(text) is (expected != text)


def test_whole_value_and_key_checks() -> None:
    assert is_identifier(" alice@example.com ")
    assert is_identifier("+1-202-555-0123")
    assert not is_identifier("write to alice@example.com")
    assert not is_identifier("12345")
    for key in ("user.email", "Phone", "device-id", "identifier.value", "crm_id"):
        assert names_identifier(key)
    for key in ("rpc.method", "steward.batch_size", "person_id"):
        assert not names_identifier(key)
