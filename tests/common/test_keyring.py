import base64
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.config import Settings
from services.common.keyring import (
    DEV_MARKER,
    KEYRING_FILE,
    DecryptionError,
    Keyring,
    KeyringError,
    decrypt_field,
    encrypt_field,
    init_keys,
    key_id_for_public_key,
    load_keyring,
    rotate_hmac_key,
    verify_signature,
)

KEYRING = Keyring.generate()


def _all_key_material(keyring: Keyring) -> list[str]:
    document = json.loads(keyring.to_json())
    encoded = [entry["key"] for entry in document["hmac_keys"]]
    encoded += [document["kek"]["key"], document["signing_key"]["private_key"]]
    raw = [base64.b64decode(value) for value in encoded]
    return encoded + [value.hex() for value in raw] + [repr(value) for value in raw]


def test_init_creates_private_directory_and_file(tmp_path: Path) -> None:
    directory = tmp_path / "keys"

    keyring = init_keys(directory, development=False)

    assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((directory / KEYRING_FILE).stat().st_mode) == 0o600
    assert not (directory / DEV_MARKER).exists()
    assert keyring.current_hmac_kid == "h1"
    assert not keyring.development


def test_init_never_overwrites_existing_keys(tmp_path: Path) -> None:
    first = init_keys(tmp_path, development=False)
    content = (tmp_path / KEYRING_FILE).read_bytes()

    second = init_keys(tmp_path, development=True)

    assert (tmp_path / KEYRING_FILE).read_bytes() == content
    assert second.pseudonymise(b"x") == first.pseudonymise(b"x")
    assert not (tmp_path / DEV_MARKER).exists(), "existing keys must not be marked development"


def test_development_init_writes_the_marker(tmp_path: Path) -> None:
    keyring = init_keys(tmp_path, development=True)

    assert (tmp_path / DEV_MARKER).exists()
    assert keyring.development
    assert Keyring.load(tmp_path).development


def test_load_round_trips_every_key(tmp_path: Path) -> None:
    created = init_keys(tmp_path, development=False)
    loaded = Keyring.load(tmp_path)

    assert loaded.pseudonymise(b"alice") == created.pseudonymise(b"alice")
    assert loaded.signing_key_id == created.signing_key_id
    _, wrapped = created.new_data_key()
    assert loaded.unwrap_data_key(wrapped) == created.unwrap_data_key(wrapped)


def test_missing_keyring_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="steward keys init"):
        Keyring.load(tmp_path)
    with pytest.raises(KeyringError, match="STEWARD_KEYRING_JSON is not set"):
        Keyring.from_env({})


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"format": "something-else"}',
        '{"format": "steward-keyring/1", "hmac_keys": []}',
        KEYRING.to_json().replace('"ed25519"', '"rsa"'),
        json.dumps({**json.loads(KEYRING.to_json()), "kek": {"kid": "k1", "key": "c2hvcnQ="}}),
        json.dumps({**json.loads(KEYRING.to_json()), "hmac_keys": []}),
    ],
)
def test_malformed_keyrings_are_refused(text: str) -> None:
    with pytest.raises(KeyringError):
        Keyring.from_json(text)


def test_malformed_keyring_error_does_not_echo_the_secret() -> None:
    document = json.loads(KEYRING.to_json())
    secret = document["kek"]["key"]
    del document["signing_key"]

    with pytest.raises(KeyringError) as raised:
        Keyring.from_json(json.dumps(document))

    assert secret not in str(raised.value)


def test_environment_keyring_wins_over_directory(tmp_path: Path) -> None:
    on_disk = init_keys(tmp_path / "keys", development=False)
    settings = Settings.from_env(
        {"STEWARD_DATA_DIR": str(tmp_path), "STEWARD_KEYRING_JSON": KEYRING.to_json()}
    )

    loaded = load_keyring(settings)

    assert loaded.pseudonymise(b"m") == KEYRING.pseudonymise(b"m")
    assert loaded.pseudonymise(b"m") != on_disk.pseudonymise(b"m")
    assert Keyring.from_env({"STEWARD_KEYRING_JSON": KEYRING.to_json()}).signing_key_id == (
        KEYRING.signing_key_id
    )


def test_load_keyring_falls_back_to_keys_dir(tmp_path: Path) -> None:
    on_disk = init_keys(tmp_path / "keys", development=False)
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path)})

    assert load_keyring(settings).pseudonymise(b"m") == on_disk.pseudonymise(b"m")


def test_development_keys_passed_by_environment_are_refused_in_production(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "STEWARD_ENV": "production",
            "STEWARD_DATA_DIR": str(tmp_path),
            "STEWARD_CALLERS_FILE": str(tmp_path / "callers.yaml"),
            "STEWARD_KEYRING_JSON": Keyring.generate(development=True).to_json(),
        }
    )

    with pytest.raises(KeyringError, match="development keys"):
        load_keyring(settings)


def test_pseudonyms_are_keyed_and_stable() -> None:
    other = Keyring.generate()

    digest = KEYRING.pseudonymise(b"alice@example.com")

    kid, hexdigest = digest.split(":")
    assert kid == "h1" and len(hexdigest) == 64
    assert digest == KEYRING.pseudonymise(b"alice@example.com")
    assert digest != KEYRING.pseudonymise(b"bob@example.com")
    assert digest != other.pseudonymise(b"alice@example.com")


def test_old_digests_still_resolve_after_rotation(tmp_path: Path) -> None:
    before = init_keys(tmp_path, development=False)
    old_digest = before.pseudonymise(b"alice")

    assert rotate_hmac_key(tmp_path) == "h2"
    assert rotate_hmac_key(tmp_path) == "h3"
    after = Keyring.load(tmp_path)

    assert after.hmac_kids == ("h1", "h2", "h3")
    assert after.current_hmac_kid == "h3"
    assert after.pseudonymise(b"alice").startswith("h3:")
    candidates = after.candidate_digests(b"alice")
    assert [candidate.split(":")[0] for candidate in candidates] == ["h3", "h2", "h1"]
    assert candidates[0] == after.pseudonymise(b"alice")
    assert old_digest in candidates
    assert after.signing_key_id == before.signing_key_id


def test_rotation_without_a_keyring_fails(tmp_path: Path) -> None:
    with pytest.raises(KeyringError):
        rotate_hmac_key(tmp_path)


def test_signatures_verify_with_only_the_public_key() -> None:
    signature = KEYRING.sign(b"checkpoint 42")
    public_key = KEYRING.public_key_pem()

    assert public_key.startswith("-----BEGIN PUBLIC KEY-----")
    assert verify_signature(public_key, b"checkpoint 42", signature)
    assert not verify_signature(public_key, b"checkpoint 43", signature)
    assert not verify_signature(Keyring.generate().public_key_pem(), b"checkpoint 42", signature)
    assert key_id_for_public_key(public_key) == KEYRING.signing_key_id
    assert len(KEYRING.signing_key_id) == 16


def test_verifying_with_a_malformed_key_is_an_error() -> None:
    with pytest.raises(KeyringError, match="not a PEM public key"):
        verify_signature("garbage", b"data", b"sig")


def test_a_pem_key_of_an_algorithm_cryptography_lacks_is_a_keyring_error() -> None:
    # Found by fuzz/ledger_export.py: one changed digit in an export header's key turned the
    # Ed25519 OID 1.3.101.112 into 1.3.117.112, and UnsupportedAlgorithm escaped verification.
    der = base64.b64decode("".join(KEYRING.public_key_pem().splitlines()[1:-1]))
    assert b"\x06\x03\x2b\x65\x70" in der
    unknown = der.replace(b"\x06\x03\x2b\x65\x70", b"\x06\x03\x2b\x75\x70")
    pem = "\n".join(
        [
            "-----BEGIN PUBLIC KEY-----",
            base64.b64encode(unknown).decode(),
            "-----END PUBLIC KEY-----",
        ]
    )
    with pytest.raises(KeyringError, match="not an Ed25519 key"):
        key_id_for_public_key(pem)
    with pytest.raises(KeyringError, match="not an Ed25519 key"):
        verify_signature(pem, b"data", b"sig")


def test_data_keys_wrap_and_unwrap() -> None:
    data_key, wrapped = KEYRING.new_data_key()

    assert len(data_key) == 32
    assert wrapped.startswith(b"k1:")
    assert data_key not in wrapped
    assert KEYRING.unwrap_data_key(wrapped) == data_key


@pytest.mark.parametrize(
    "damage",
    [
        lambda wrapped: wrapped[:-1] + bytes([wrapped[-1] ^ 1]),
        lambda wrapped: b"k9" + wrapped[2:],
        lambda wrapped: wrapped.replace(b":", b"", 1),
        lambda wrapped: wrapped[:10],
    ],
)
def test_damaged_wrapped_keys_are_refused(damage: Callable[[bytes], bytes]) -> None:
    _, wrapped = KEYRING.new_data_key()

    with pytest.raises(DecryptionError):
        KEYRING.unwrap_data_key(damage(wrapped))


def test_another_keyring_cannot_unwrap() -> None:
    _, wrapped = KEYRING.new_data_key()

    with pytest.raises(DecryptionError):
        Keyring.generate().unwrap_data_key(wrapped)


@given(plaintext=st.binary(max_size=256), associated_data=st.binary(max_size=64))
def test_fields_round_trip(plaintext: bytes, associated_data: bytes) -> None:
    data_key, _ = KEYRING.new_data_key()

    ciphertext = encrypt_field(data_key, plaintext, associated_data)

    assert decrypt_field(data_key, ciphertext, associated_data) == plaintext


def test_fields_are_bound_to_key_and_context() -> None:
    data_key, _ = KEYRING.new_data_key()
    other_key, _ = KEYRING.new_data_key()
    ciphertext = encrypt_field(data_key, b"Alice Smith", b"profile.name:p1")

    assert encrypt_field(data_key, b"Alice Smith", b"profile.name:p1") != ciphertext
    with pytest.raises(DecryptionError):
        decrypt_field(data_key, ciphertext, b"profile.name:p2")
    with pytest.raises(DecryptionError):
        decrypt_field(other_key, ciphertext, b"profile.name:p1")
    with pytest.raises(DecryptionError):
        decrypt_field(data_key, ciphertext[:-1], b"profile.name:p1")


def test_repr_and_str_never_show_key_material() -> None:
    rotated = KEYRING.with_new_hmac_key()

    for text in (repr(rotated), str(rotated), f"{rotated}"):
        assert "h1" in text and "h2" in text and rotated.signing_key_id in text
        for secret in _all_key_material(rotated):
            assert secret not in text
