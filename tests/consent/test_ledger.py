"""The ledger's hashes, RFC 6962 tree, canonical encoding and checkpoints."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2

from services.common.keyring import Keyring, KeyringError
from services.consent import ledger
from services.consent.ledger import (
    EMPTY_ROOT,
    GENESIS,
    CanonicalError,
    CheckpointNoteError,
    LedgerRecord,
    MerkleFrontier,
)

KEYRING = Keyring.generate()
OTHER_KEYRING = Keyring.generate()
MOMENT = datetime(2025, 3, 1, 9, 30, 0, 123456, tzinfo=UTC)

# RFC 6962 reference test data (certificate-transparency's merkle_tree_test): leaf inputs and
# the roots of the trees of the first 1..8 of them.
RFC_INPUTS = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
RFC_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
RFC_LEAVES = [ledger.leaf_hash(bytes.fromhex(data)) for data in RFC_INPUTS]
H = {
    "96a2": "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f08": "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47": "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    "bc1a": "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "ca85": "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    "d37e": "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "0ebc": "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
}

LEAVES_70 = [ledger.leaf_hash(f"entry {i}".encode()) for i in range(70)]


# A naive, recursive transcription of RFC 6962 §2.1 to check the real implementation against.


def _split(size: int) -> int:
    split = 1
    while split * 2 < size:
        split *= 2
    return split


def naive_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    split = _split(len(leaves))
    return ledger.node_hash(naive_root(leaves[:split]), naive_root(leaves[split:]))


def naive_path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    split = _split(len(leaves))
    if index < split:
        return [*naive_path(index, leaves[:split]), naive_root(leaves[split:])]
    return [*naive_path(index - split, leaves[split:]), naive_root(leaves[:split])]


def naive_subproof(first: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    if first == len(leaves):
        return [] if whole else [naive_root(leaves)]
    split = _split(len(leaves))
    if first <= split:
        return [*naive_subproof(first, leaves[:split], whole), naive_root(leaves[split:])]
    return [*naive_subproof(first - split, leaves[split:], False), naive_root(leaves[:split])]


def path_shape(index: int, size: int) -> tuple[str, ...]:
    """Which side each sibling of the RFC 6962 audit path is on."""
    if size == 1:
        return ()
    split = _split(size)
    if index < split:
        return (*path_shape(index, split), "right")
    return (*path_shape(index - split, size - split), "left")


def consistency_shape(first: int, size: int, whole: bool = True) -> tuple[str, ...]:
    if first == size:
        return () if whole else ("start",)
    split = _split(size)
    if first <= split:
        return (*consistency_shape(first, split, whole), "right")
    return (*consistency_shape(first - split, size - split, False), "left")


def flip_bit(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def make_record(seq: int = 42, **changes: object) -> LedgerRecord:
    record = LedgerRecord(
        seq=seq,
        recorded_at=MOMENT,
        kind=audit_pb2.ENTRY_KIND_DECISION,
        subject="s_3f7a0c",
        purpose="marketing",
        decision=common_pb2.DECISION_GRANTED,
        source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
        policy_version="2025-01",
        notice_sha256="ab" * 32,
        expires_at=MOMENT + timedelta(days=365),
        actor="shop-frontend",
        occurred_at=MOMENT - timedelta(seconds=2),
        details={"banner": "v3", "channel": "web"},
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


# Hashes -----------------------------------------------------------------------------------------


def test_hashes_use_the_rfc_6962_domain_separation() -> None:
    assert ledger.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert ledger.node_hash(b"l", b"r") == hashlib.sha256(b"\x01lr").digest()
    assert ledger.chain_hash(GENESIS, b"leaf") == hashlib.sha256(bytes(32) + b"leaf").digest()
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_roots_match_the_rfc_6962_reference_vectors() -> None:
    assert ledger.merkle_root([]) == EMPTY_ROOT
    for size, expected in enumerate(RFC_ROOTS, start=1):
        assert ledger.merkle_root(RFC_LEAVES[:size]).hex() == expected
        assert MerkleFrontier.from_leaves(RFC_LEAVES[:size]).root().hex() == expected


@pytest.mark.parametrize(
    ("index", "size", "expected"),
    [
        (0, 1, []),
        (0, 8, ["96a2", "5f08", "6b47"]),
        (5, 8, ["bc1a", "ca85", "d37e"]),
    ],
)
def test_inclusion_proofs_match_the_rfc_6962_reference_vectors(
    index: int, size: int, expected: list[str]
) -> None:
    proof = ledger.inclusion_proof(RFC_LEAVES, index, size)
    assert [sibling.hex() for sibling in proof] == [H[name] for name in expected]
    root = bytes.fromhex(RFC_ROOTS[size - 1])
    assert ledger.verify_inclusion(RFC_LEAVES[index], index, size, proof, root)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (1, 1, []),
        (1, 8, ["96a2", "5f08", "6b47"]),
        (6, 8, ["0ebc", "ca85", "d37e"]),
        (2, 5, ["5f08", "bc1a"]),
    ],
)
def test_consistency_proofs_match_the_rfc_6962_reference_vectors(
    first: int, second: int, expected: list[str]
) -> None:
    proof = ledger.consistency_proof(RFC_LEAVES, first, second)
    assert [node.hex() for node in proof] == [H[name] for name in expected]
    first_root = bytes.fromhex(RFC_ROOTS[first - 1])
    second_root = bytes.fromhex(RFC_ROOTS[second - 1])
    assert ledger.verify_consistency(first, second, first_root, second_root, proof)


# The tree against a naive transcription of the RFC, sizes 1..70 -------------------------------


def test_roots_and_proofs_equal_the_naive_rfc_definitions_up_to_70_leaves() -> None:
    for size in range(71):
        leaves = LEAVES_70[:size]
        root = naive_root(leaves)
        assert ledger.merkle_root(leaves) == root
        for index in range(size):
            proof = ledger.inclusion_proof(LEAVES_70, index, size)
            assert proof == naive_path(index, leaves)
            assert ledger.verify_inclusion(leaves[index], index, size, proof, root)
        for first in range(1, size + 1):
            proof = ledger.consistency_proof(LEAVES_70, first, size)
            assert proof == naive_subproof(first, leaves, True)
            assert ledger.verify_consistency(first, size, naive_root(leaves[:first]), root, proof)


def test_inclusion_verification_rejects_every_flipped_bit_of_proof_and_root() -> None:
    rng = random.Random(6962)
    for size in range(1, 71):
        root = ledger.merkle_root(LEAVES_70[:size])
        for index in range(size):
            leaf = LEAVES_70[index]
            proof = ledger.inclusion_proof(LEAVES_70, index, size)
            for position in range(len(proof)):
                for bit in (0, 255, rng.randrange(256)):
                    altered = list(proof)
                    altered[position] = flip_bit(altered[position], bit)
                    assert not ledger.verify_inclusion(leaf, index, size, altered, root)
            bit = rng.randrange(256)
            assert not ledger.verify_inclusion(leaf, index, size, proof, flip_bit(root, bit))
            assert not ledger.verify_inclusion(flip_bit(leaf, bit), index, size, proof, root)
            assert not ledger.verify_inclusion(leaf, index, size, [*proof, root], root)
            if proof:
                assert not ledger.verify_inclusion(leaf, index, size, proof[:-1], root)


def test_inclusion_verification_accepts_a_flipped_index_or_size_only_for_an_identical_path() -> (
    None
):
    """RFC 6962 roots do not commit to the size, so a size whose tree has exactly the same shape
    along the path verifies too; that is why checkpoints sign the size with the root. Any flip
    that changes the shape must be rejected, and a flipped index always changes it."""
    for size in range(1, 71):
        root = ledger.merkle_root(LEAVES_70[:size])
        for index in range(size):
            proof = ledger.inclusion_proof(LEAVES_70, index, size)
            for bit in range(9):
                for claimed_index, claimed_size in (
                    (index ^ (1 << bit), size),
                    (index, size ^ (1 << bit)),
                ):
                    accepted = ledger.verify_inclusion(
                        LEAVES_70[index], claimed_index, claimed_size, proof, root
                    )
                    same_shape = 0 <= claimed_index < claimed_size and path_shape(
                        claimed_index, claimed_size
                    ) == path_shape(index, size)
                    assert accepted == same_shape, (index, size, claimed_index, claimed_size)
                    assert claimed_index == index or not accepted


def test_consistency_verification_rejects_every_flipped_bit_of_proof_and_roots() -> None:
    rng = random.Random(9162)
    for size in range(1, 71):
        root = ledger.merkle_root(LEAVES_70[:size])
        for first in range(1, size):
            first_root = ledger.merkle_root(LEAVES_70[:first])
            proof = ledger.consistency_proof(LEAVES_70, first, size)
            for position in range(len(proof)):
                altered = list(proof)
                altered[position] = flip_bit(altered[position], rng.randrange(256))
                assert not ledger.verify_consistency(first, size, first_root, root, altered)
            bit = rng.randrange(256)
            assert not ledger.verify_consistency(
                first, size, flip_bit(first_root, bit), root, proof
            )
            assert not ledger.verify_consistency(
                first, size, first_root, flip_bit(root, bit), proof
            )
            assert not ledger.verify_consistency(first, size, first_root, root, proof[:-1])
            assert not ledger.verify_consistency(first, size, first_root, root, [*proof, root])


def test_consistency_verification_accepts_flipped_sizes_only_for_an_identical_proof_shape() -> None:
    for size in range(2, 71):
        root = ledger.merkle_root(LEAVES_70[:size])
        for first in range(1, size):
            first_root = ledger.merkle_root(LEAVES_70[:first])
            proof = ledger.consistency_proof(LEAVES_70, first, size)
            for bit in range(9):
                for claimed_first, claimed_size in (
                    (first ^ (1 << bit), size),
                    (first, size ^ (1 << bit)),
                ):
                    accepted = ledger.verify_consistency(
                        claimed_first, claimed_size, first_root, root, proof
                    )
                    same_shape = 0 < claimed_first < claimed_size and consistency_shape(
                        claimed_first, claimed_size
                    ) == consistency_shape(first, size)
                    assert accepted == same_shape, (first, size, claimed_first, claimed_size)


def test_degenerate_proofs() -> None:
    root = ledger.merkle_root(LEAVES_70[:5])
    assert ledger.consistency_proof(LEAVES_70, 0, 5) == []
    assert ledger.consistency_proof(LEAVES_70, 5, 5) == []
    assert ledger.verify_consistency(0, 5, EMPTY_ROOT, root, [])
    assert not ledger.verify_consistency(0, 5, root, root, [])
    assert ledger.verify_consistency(5, 5, root, root, [])
    assert not ledger.verify_consistency(5, 5, root, EMPTY_ROOT, [])
    assert not ledger.verify_consistency(3, 5, root, root, [])
    assert not ledger.verify_consistency(5, 3, root, root, [root])
    assert not ledger.verify_inclusion(LEAVES_70[0], 0, 0, [], EMPTY_ROOT)
    assert not ledger.verify_inclusion(LEAVES_70[0], -1, 5, [], root)
    assert not ledger.verify_inclusion(b"short", 0, 1, [], b"short")
    with pytest.raises(ValueError, match="leaf index"):
        ledger.inclusion_proof(LEAVES_70, 5, 5)
    with pytest.raises(ValueError, match="tree size"):
        ledger.inclusion_proof(LEAVES_70, 0, 71)
    with pytest.raises(ValueError, match="first size"):
        ledger.consistency_proof(LEAVES_70, 6, 5)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0))
def test_frontier_root_equals_merkle_root(size: int, seed: int) -> None:
    rng = random.Random(seed)
    leaves = [rng.randbytes(32) for _ in range(size)]
    frontier = MerkleFrontier.from_leaves(leaves)
    assert frontier.size == size
    assert len(frontier.subtree_roots) == size.bit_count()
    assert frontier.root() == ledger.merkle_root(leaves)
    restored = MerkleFrontier.restore(frontier.size, frontier.subtree_roots)
    restored.append(b"\x07" * 32)
    assert restored.root() == ledger.merkle_root([*leaves, b"\x07" * 32])
    assert frontier.root() == ledger.merkle_root(leaves), "restore must not share state"


def test_frontier_refuses_inconsistent_state() -> None:
    with pytest.raises(ValueError, match="subtree roots"):
        MerkleFrontier.restore(3, [EMPTY_ROOT])
    with pytest.raises(ValueError, match="32 bytes"):
        MerkleFrontier().append(b"short")


# Canonical encoding -----------------------------------------------------------------------------

EXAMPLE_CANONICAL = (
    b'{"actor":"shop-frontend","decision":"DECISION_GRANTED",'
    b'"details":{"banner":"v3","channel":"web"},"expires_at":"2026-03-01T09:30:00.123456Z",'
    b'"kind":"ENTRY_KIND_DECISION","notice_sha256":"' + b"ab" * 32 + b'",'
    b'"occurred_at":"2025-03-01T09:29:58.123456Z","policy_version":"2025-01",'
    b'"purpose":"marketing","recorded_at":"2025-03-01T09:30:00.123456Z","seq":42,'
    b'"source":"CONSENT_SOURCE_WEB_BANNER","subject":"s_3f7a0c","v":1}'
)


def test_canonical_bytes_of_the_documented_example() -> None:
    canonical = ledger.canonical_bytes(make_record())
    assert canonical == EXAMPLE_CANONICAL
    # docs/ledger.md quotes this leaf hash for the example.
    assert ledger.leaf_hash(canonical).hex() == (
        "f9de1bebf0be007618cf5b177a9b5ea654fc6e3d0f337626159b475422811e6a"
    )
    assert ledger.record_from_canonical(canonical) == make_record()


def test_canonical_bytes_write_absent_timestamps_as_null_and_convert_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    record = make_record(
        expires_at=None, occurred_at=None, recorded_at=datetime(2025, 1, 1, 2, tzinfo=plus_two)
    )
    document = json.loads(ledger.canonical_bytes(record))
    assert document["expires_at"] is None
    assert document["occurred_at"] is None
    assert document["recorded_at"] == "2025-01-01T00:00:00.000000Z"


def test_canonical_bytes_sort_members_by_utf16_code_units_and_escape_minimally() -> None:
    record = make_record(details={"\uffff": "bmp", "\U0001f600": "astral", "é": 'quote " \n \x01'})
    canonical = ledger.canonical_bytes(record)
    text = canonical.decode("utf-8")
    # U+1F600 is the surrogate pair D83D DE00, which sorts before U+FFFF in UTF-16.
    assert text.index("\U0001f600") < text.index("\uffff")
    assert '"é":"quote \\" \\n \\u0001"' in text
    assert ledger.record_from_canonical(canonical) == record


def test_records_are_validated() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_record(recorded_at=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="not a known"):
        make_record(decision=99)
    with pytest.raises(ValueError, match="seq"):
        make_record(seq=-1)
    with pytest.raises(ValueError, match="surrogate"):
        make_record(subject="\ud800")
    with pytest.raises(ValueError, match="appended"):
        ledger.canonical_bytes(make_record(seq=0))


def test_records_copy_their_details() -> None:
    details = {"a": "1"}
    record = make_record(details=details)
    details["a"] = "2"
    assert record.details == {"a": "1"}


_texts = st.text(max_size=12)
_moments = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
_records = st.builds(
    LedgerRecord,
    seq=st.integers(min_value=1, max_value=2**53 - 1),
    recorded_at=_moments,
    kind=st.sampled_from(audit_pb2.EntryKind.values()),
    subject=_texts,
    purpose=_texts,
    decision=st.sampled_from(common_pb2.Decision.values()),
    source=st.sampled_from(consent_pb2.ConsentSource.values()),
    policy_version=_texts,
    notice_sha256=_texts,
    expires_at=st.none() | _moments,
    actor=_texts,
    occurred_at=st.none() | _moments,
    details=st.dictionaries(_texts, _texts, max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(_records)
def test_canonical_round_trip(record: LedgerRecord) -> None:
    canonical = ledger.canonical_bytes(record)
    assert ledger.record_from_canonical(canonical) == record
    # The encoding is plain JSON any parser reads, and has no insignificant whitespace.
    document = json.loads(canonical)
    assert document["seq"] == record.seq
    assert json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() == canonical


def _edit(old: bytes, new: bytes) -> bytes:
    assert old in EXAMPLE_CANONICAL
    return EXAMPLE_CANONICAL.replace(old, new, 1)


@pytest.mark.parametrize(
    ("altered", "reason"),
    [
        (_edit(b'{"actor"', b'{ "actor"'), "canonical form"),
        (EXAMPLE_CANONICAL + b"\n", "canonical form"),
        (b"\xef\xbb\xbf" + EXAMPLE_CANONICAL, "JSON"),
        (_edit(b'"seq":42', b'"seq":42.0'), "not an integer"),
        (_edit(b'"seq":42', b'"seq":4.2e1'), "not an integer"),
        (_edit(b'"seq":42', b'"seq":"42"'), "seq must be an integer"),
        (_edit(b'"seq":42', b'"seq":true'), "seq must be an integer"),
        (_edit(b'"seq":42', b'"seq":0'), "at least 1"),
        (_edit(b'"seq":42', b'"seq":NaN'), "not an integer"),
        (_edit(b'"v":1', b'"v":2'), "format version"),
        (_edit(b'"v":1', b'"v":1,"v":1'), "twice"),
        (_edit(b'"v":1', b'"v":1,"w":1'), "unknown w"),
        (_edit(b'"actor":"shop-frontend",', b""), "missing actor"),
        (_edit(b'"purpose":"marketing"', b'"purpose":"m\\u0061rketing"'), "canonical form"),
        (_edit(b'"purpose":"marketing"', b'"purpose":"\\ud800"'), "surrogate"),
        (_edit(b'"purpose":"marketing"', b'"purpose":"caf\xc3"'), "UTF-8"),
        (_edit(b'"DECISION_GRANTED"', b"1"), "decision must be a string"),
        (_edit(b'"DECISION_GRANTED"', b'"GRANTED"'), "GRANTED"),
        (_edit(b"09:30:00.123456Z", b"09:30:00.123Z"), "timestamp"),
        (_edit(b"09:30:00.123456Z", b"09:30:00.123456+00:00"), "timestamp"),
        (_edit(b'"expires_at":"2026-03-01T09:30:00.123456Z"', b'"expires_at":""'), "timestamp"),
        (_edit(b'"channel":"web"', b'"channel":1'), "must be a string"),
        (
            _edit(b'{"banner":"v3","channel":"web"}', b'{"channel":"web","banner":"v3"}'),
            "canonical form",
        ),
        (b"[1]", "not a JSON object"),
    ],
)
def test_non_canonical_bytes_are_refused(altered: bytes, reason: str) -> None:
    with pytest.raises(CanonicalError, match=reason):
        ledger.record_from_canonical(altered)


def test_seal_entry_chains_entries() -> None:
    first = ledger.seal_entry(make_record(seq=1), GENESIS)
    second = ledger.seal_entry(make_record(seq=2), first.chain_hash)
    assert first.leaf_hash == ledger.leaf_hash(first.canonical)
    assert second.chain_hash == hashlib.sha256(first.chain_hash + second.leaf_hash).digest()


def test_entry_message_round_trip_and_mismatch() -> None:
    sealed = ledger.seal_entry(make_record(seq=7), GENESIS)
    message = ledger.to_entry_message(
        sealed.record, sealed.canonical, sealed.leaf_hash, sealed.chain_hash
    )
    assert message.seq == 7
    assert message.details == {"banner": "v3", "channel": "web"}
    assert message.expires_at.ToDatetime(tzinfo=UTC) == sealed.record.expires_at
    assert ledger.entry_from_message(message) == sealed
    without_expiry = ledger.seal_entry(make_record(seq=7, expires_at=None), GENESIS)
    bare = ledger.to_entry_message(
        without_expiry.record,
        without_expiry.canonical,
        without_expiry.leaf_hash,
        without_expiry.chain_hash,
    )
    assert not bare.HasField("expires_at")
    assert ledger.entry_from_message(bare).record.expires_at is None
    message.purpose = "analytics"
    with pytest.raises(CanonicalError, match="differ"):
        ledger.entry_from_message(message)


# Checkpoints ------------------------------------------------------------------------------------


def _checkpoint(size: int = 5, keyring: Keyring = KEYRING) -> ledger.SignedCheckpoint:
    root = ledger.merkle_root(LEAVES_70[:size])
    return ledger.sign_checkpoint(keyring, size, root, MOMENT, b"\x02" * 32)


def test_checkpoint_note_format() -> None:
    root = bytes(range(32))
    note = ledger.checkpoint_note(5, root, MOMENT, "0123456789abcdef", b"\x02" * 32)
    assert note == (
        b"steward consent ledger v1\n"
        b"5\n" + base64.b64encode(root) + b"\n" + base64.b64encode(b"\x02" * 32) + b"\n"
        b"2025-03-01T09:30:00.123456Z\n"
        b"0123456789abcdef\n"
    )
    parsed = ledger.parse_checkpoint_note(note)
    assert (parsed.tree_size, parsed.root, parsed.chain_hash) == (5, root, b"\x02" * 32)
    assert (parsed.timestamp, parsed.key_id) == (MOMENT, "0123456789abcdef")
    for bad in (note + b"\n", note.replace(b"\n5\n", b"\n05\n"), note.replace(b"v1", b"v2")):
        with pytest.raises(CheckpointNoteError):
            ledger.parse_checkpoint_note(bad)
    with pytest.raises(ValueError, match="key id"):
        ledger.checkpoint_note(5, root, MOMENT, "two words", root)


def test_signed_checkpoint_verifies_with_its_public_key_only() -> None:
    checkpoint = _checkpoint()
    assert checkpoint.key_id == KEYRING.signing_key_id
    assert ledger.verify_checkpoint(KEYRING.public_key_pem(), checkpoint)
    assert not ledger.verify_checkpoint(OTHER_KEYRING.public_key_pem(), checkpoint)
    assert "names signing key" in (
        ledger.checkpoint_problem(OTHER_KEYRING.public_key_pem(), checkpoint) or ""
    )
    with pytest.raises(KeyringError):
        ledger.verify_checkpoint("not a key", checkpoint)


@pytest.mark.parametrize(
    "change",
    [
        {"tree_size": 6},
        {"root": b"\x09" * 32},
        {"timestamp": MOMENT + timedelta(microseconds=1)},
        {"chain_hash": b"\x03" * 32},
        {"signature": b"\x00" * 64},
        {"signature": b""},
        {"signed_bytes": b"steward consent ledger v1\n"},
    ],
)
def test_any_altered_checkpoint_field_fails_verification(change: dict[str, object]) -> None:
    altered = dataclasses.replace(_checkpoint(), **change)  # type: ignore[arg-type]
    assert not ledger.verify_checkpoint(KEYRING.public_key_pem(), altered)


def test_checkpoint_signed_with_a_bare_function_and_message_round_trip() -> None:
    root = ledger.merkle_root(LEAVES_70[:3])
    checkpoint = ledger.sign_checkpoint(
        KEYRING.sign,
        tree_size=3,
        root=root,
        timestamp=MOMENT,
        chain_hash=GENESIS,
        key_id=KEYRING.signing_key_id,
    )
    assert ledger.verify_checkpoint(KEYRING.public_key_pem(), checkpoint)
    message = ledger.to_checkpoint_message(checkpoint)
    assert message.root_hash == root
    assert message.signed_bytes == checkpoint.signed_bytes
    assert ledger.checkpoint_from_message(message) == checkpoint
    message.signed_bytes = b"garbage"
    with pytest.raises(CheckpointNoteError):
        ledger.checkpoint_from_message(message)
    with pytest.raises(ValueError, match="key_id"):
        ledger.sign_checkpoint(KEYRING.sign, 3, root, MOMENT, GENESIS)
