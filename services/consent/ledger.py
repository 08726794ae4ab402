"""The consent ledger's hashing, Merkle tree and checkpoints: everything an auditor re-derives.

The ledger is append-only and tamper-evident in the manner of Certificate Transparency:

- every entry is encoded canonically (:func:`canonical_bytes`, RFC 8785-style JSON) so an auditor
  in any language can re-create the exact bytes the hashes cover;
- ``leaf_hash = SHA-256(0x00 ‖ canonical)`` and the entries form an RFC 6962 Merkle tree whose
  root is signed with Ed25519 in periodic checkpoints;
- ``chain_hash = SHA-256(previous chain_hash ‖ leaf_hash)`` links each entry to the one before,
  so a single altered, removed, inserted or reordered entry is pinpointed without a proof.

This module is pure: no gRPC servers, no SQL. docs/ledger.md specifies every format defined here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf import timestamp_pb2
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2

from services.common.keyring import Keyring, key_id_for_public_key, verify_signature

FORMAT_VERSION: Final = 1
"""The ``"v"`` field of every canonical entry."""

HASH_BYTES: Final = 32
GENESIS: Final = bytes(HASH_BYTES)
"""The chain hash before the first entry."""

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""RFC 6962 Merkle tree hash of the empty tree."""

CHECKPOINT_ORIGIN: Final = "steward consent ledger v1"
"""First line of every checkpoint note; names what the signature is about."""

MAX_SEQ: Final = 2**53 - 1
"""Largest seq: every JSON implementation represents integers up to here exactly."""

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
_TIMESTAMP: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{6})Z"
)
_KEY_ID: Final = re.compile(r"[\x21-\x7e]+")
_CANONICAL_FIELDS: Final = frozenset(
    {
        "actor",
        "decision",
        "details",
        "expires_at",
        "kind",
        "notice_sha256",
        "occurred_at",
        "policy_version",
        "purpose",
        "recorded_at",
        "seq",
        "source",
        "subject",
        "v",
    }
)


class CanonicalError(ValueError):
    """Bytes that are not the canonical encoding of a ledger entry."""


class CheckpointNoteError(ValueError):
    """Bytes that are not a checkpoint note."""


# Entries ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerRecord:
    """The facts of one ledger entry: exactly what its canonical bytes, and so its hashes, cover.

    Timestamps must be timezone-aware; they are kept in UTC at microsecond precision, which is
    what the canonical encoding can represent. ``details`` is copied, so later changes to the
    mapping passed in cannot change a record. ``seq`` 0 marks a record not yet appended (the
    store assigns the seq); only appended records have canonical bytes.
    """

    seq: int
    recorded_at: datetime
    kind: audit_pb2.EntryKind.ValueType
    subject: str = ""
    purpose: str = ""
    decision: common_pb2.Decision.ValueType = common_pb2.DECISION_UNSPECIFIED
    source: consent_pb2.ConsentSource.ValueType = consent_pb2.CONSENT_SOURCE_UNSPECIFIED
    policy_version: str = ""
    notice_sha256: str = ""
    expires_at: datetime | None = None
    actor: str = ""
    occurred_at: datetime | None = None
    details: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.seq) is not int or not 0 <= self.seq <= MAX_SEQ:
            raise ValueError(f"seq must be an integer from 0 to 2**53-1, got {self.seq!r}")
        object.__setattr__(self, "recorded_at", _utc("recorded_at", self.recorded_at))
        for name in ("expires_at", "occurred_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _utc(name, value))
        _enum_name(audit_pb2.EntryKind, self.kind, "kind")
        _enum_name(common_pb2.Decision, self.decision, "decision")
        _enum_name(consent_pb2.ConsentSource, self.source, "source")
        for name in ("subject", "purpose", "policy_version", "notice_sha256", "actor"):
            _check_text(name, getattr(self, name))
        if not isinstance(self.details, Mapping):
            raise ValueError("details must be a mapping of strings to strings")
        details = dict(self.details)
        for key, value in details.items():
            _check_text("details key", key)
            _check_text(f"details[{key!r}]", value)
        object.__setattr__(self, "details", details)


@dataclass(frozen=True)
class SealedEntry:
    """A record with the bytes and hashes that fix it in the ledger."""

    record: LedgerRecord
    canonical: bytes
    leaf_hash: bytes
    chain_hash: bytes


def canonical_bytes(record: LedgerRecord) -> bytes:
    """The canonical encoding of ``record``, the bytes its leaf hash is computed over.

    A JSON object serialised as RFC 8785 (JCS) does it: UTF-8, members sorted by their names'
    UTF-16 code units, no insignificant whitespace, strings escaped minimally, no floats. Enums
    are their proto names, timestamps ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC, absent timestamps
    ``null``, and ``"v": 1`` names this format. docs/ledger.md lists the members.
    """
    if record.seq < 1:
        raise ValueError("a record has canonical bytes only once appended (seq >= 1)")
    document: dict[str, Any] = {
        "actor": record.actor,
        "decision": _enum_name(common_pb2.Decision, record.decision, "decision"),
        "details": {key: record.details[key] for key in sorted(record.details, key=_utf16_order)},
        "expires_at": _optional_timestamp(record.expires_at),
        "kind": _enum_name(audit_pb2.EntryKind, record.kind, "kind"),
        "notice_sha256": record.notice_sha256,
        "occurred_at": _optional_timestamp(record.occurred_at),
        "policy_version": record.policy_version,
        "purpose": record.purpose,
        "recorded_at": format_timestamp(record.recorded_at),
        "seq": record.seq,
        "source": _enum_name(consent_pb2.ConsentSource, record.source, "source"),
        "subject": record.subject,
        "v": FORMAT_VERSION,
    }
    ordered = {key: document[key] for key in sorted(document, key=_utf16_order)}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def record_from_canonical(data: bytes) -> LedgerRecord:
    """Parse canonical bytes back into a record, refusing anything that is not canonical.

    Strict on purpose: two different byte strings must never decode to the same record, or an
    entry could be re-encoded (and its hashes changed) while claiming to say the same thing.
    """
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as error:
        raise CanonicalError(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        document = json.loads(
            text,
            object_pairs_hook=_unique_members,
            parse_float=_refuse_number,
            parse_constant=_refuse_number,
        )
    except CanonicalError:
        raise
    except ValueError as error:
        raise CanonicalError(f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise CanonicalError("not a JSON object")
    missing = sorted(_CANONICAL_FIELDS - document.keys())
    unknown = sorted(document.keys() - _CANONICAL_FIELDS)
    if missing or unknown:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unknown {', '.join(unknown)}"] if unknown else []
        raise CanonicalError("; ".join(parts))
    if type(document["v"]) is not int or document["v"] != FORMAT_VERSION:
        raise CanonicalError(f"unsupported format version v={document['v']!r}")
    if type(document["seq"]) is int and document["seq"] < 1:
        raise CanonicalError(f"seq must be at least 1, got {document['seq']}")
    try:
        details = document["details"]
        if not isinstance(details, dict):
            raise ValueError("details must be an object")
        record = LedgerRecord(
            seq=_integer(document["seq"], "seq"),
            recorded_at=parse_timestamp(_string(document["recorded_at"], "recorded_at")),
            kind=audit_pb2.EntryKind.Value(_string(document["kind"], "kind")),
            subject=_string(document["subject"], "subject"),
            purpose=_string(document["purpose"], "purpose"),
            decision=common_pb2.Decision.Value(_string(document["decision"], "decision")),
            source=consent_pb2.ConsentSource.Value(_string(document["source"], "source")),
            policy_version=_string(document["policy_version"], "policy_version"),
            notice_sha256=_string(document["notice_sha256"], "notice_sha256"),
            expires_at=_parse_optional_timestamp(document["expires_at"], "expires_at"),
            actor=_string(document["actor"], "actor"),
            occurred_at=_parse_optional_timestamp(document["occurred_at"], "occurred_at"),
            details={
                _string(key, "details key"): _string(value, f"details[{key!r}]")
                for key, value in details.items()
            },
        )
    except (ValueError, TypeError) as error:
        raise CanonicalError(str(error)) from None
    if canonical_bytes(record) != data:
        raise CanonicalError("not in canonical form (member order, whitespace or escaping differ)")
    return record


def leaf_hash(canonical: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 ‖ canonical bytes)."""
    return hashlib.sha256(_LEAF_PREFIX + canonical).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    """SHA-256(previous chain hash ‖ leaf hash); the first entry's previous is :data:`GENESIS`."""
    return hashlib.sha256(previous + leaf).digest()


def seal_entry(record: LedgerRecord, previous_chain_hash: bytes) -> SealedEntry:
    """Encode ``record`` and hash it onto the chain that ends in ``previous_chain_hash``."""
    canonical = canonical_bytes(record)
    leaf = leaf_hash(canonical)
    return SealedEntry(record, canonical, leaf, chain_hash(previous_chain_hash, leaf))


# Merkle tree (RFC 6962 §2.1, verification as RFC 9162 §2.1.3.2 and §2.1.4.2) -------------------


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash (MTH) over leaf hashes; the empty tree is SHA-256 of nothing."""
    return _subtree_root(leaves, 0, len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int, tree_size: int) -> list[bytes]:
    """RFC 6962 audit path (PATH) of leaf ``index`` in the tree of the first ``tree_size`` leaves.

    Sibling hashes from the leaf upwards. Built level by level: a level's last node without a
    sibling moves up unchanged, which is exactly RFC 6962's split at the largest power of two.
    """
    if not 0 <= tree_size <= len(leaves):
        raise ValueError(f"tree size {tree_size} outside 0..{len(leaves)}")
    if not 0 <= index < tree_size:
        raise ValueError(f"leaf index {index} outside 0..{tree_size - 1}")
    path: list[bytes] = []
    level = list(leaves[:tree_size])
    position = index
    while len(level) > 1:
        sibling = position ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        level = _parent_level(level)
        position //= 2
    return path


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree with ``root``.

    RFC 9162 §2.1.3.2. RFC 6962 roots do not commit to the tree size: a proof can verify for
    another size whose tree has the same shape along the path, which is why checkpoints sign the
    size together with the root.
    """
    if not 0 <= index < tree_size or not _all_hashes([leaf, root, *proof]):
        return False
    first, last = index, tree_size - 1
    computed = leaf
    for sibling in proof:
        if last == 0:
            return False
        if first & 1 or first == last:
            computed = node_hash(sibling, computed)
            if not first & 1:
                while not first & 1 and first != 0:
                    first >>= 1
                    last >>= 1
        else:
            computed = node_hash(computed, sibling)
        first >>= 1
        last >>= 1
    return last == 0 and hmac.compare_digest(computed, root)


def consistency_proof(leaves: Sequence[bytes], first_size: int, second_size: int) -> list[bytes]:
    """RFC 6962 consistency proof (PROOF/SUBPROOF) that the first tree is a prefix of the second.

    Empty when ``first_size`` is 0 or equals ``second_size``: there is nothing to prove. The
    recursion of SUBPROOF is unrolled; the hashes it appends on the way back are collected on the
    way down and reversed.
    """
    if not 0 <= first_size <= second_size <= len(leaves):
        raise ValueError(
            f"need 0 <= first size <= second size <= {len(leaves)}, "
            f"got {first_size} and {second_size}"
        )
    if first_size in (0, second_size):
        return []
    remaining, start, end = first_size, 0, second_size
    whole_first_tree = True
    collected: list[bytes] = []
    while True:
        size = end - start
        if remaining == size:
            if not whole_first_tree:
                collected.append(_subtree_root(leaves, start, end))
            break
        split = _largest_power_of_two_below(size)
        if remaining <= split:
            collected.append(_subtree_root(leaves, start + split, end))
            end = start + split
        else:
            collected.append(_subtree_root(leaves, start, start + split))
            start += split
            remaining -= split
            whole_first_tree = False
    collected.reverse()
    return collected


def verify_consistency(
    first_size: int,
    second_size: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Whether ``proof`` shows the tree with ``first_root`` is a prefix of ``second_root``'s.

    RFC 9162 §2.1.4.2, plus the trivial cases: equal sizes need equal roots and an empty proof;
    the empty tree is a prefix of every tree.
    """
    if not 0 <= first_size <= second_size or not _all_hashes([first_root, second_root, *proof]):
        return False
    if first_size == 0:
        return not proof and hmac.compare_digest(first_root, EMPTY_ROOT)
    if first_size == second_size:
        return not proof and hmac.compare_digest(first_root, second_root)
    if not proof:
        return False
    path = list(proof)
    if first_size & (first_size - 1) == 0:
        path.insert(0, first_root)
    first, last = first_size - 1, second_size - 1
    while first & 1:
        first >>= 1
        last >>= 1
    first_computed = second_computed = path[0]
    for sibling in path[1:]:
        if last == 0:
            return False
        if first & 1 or first == last:
            first_computed = node_hash(sibling, first_computed)
            second_computed = node_hash(sibling, second_computed)
            if not first & 1:
                while not first & 1 and first != 0:
                    first >>= 1
                    last >>= 1
        else:
            second_computed = node_hash(second_computed, sibling)
        first >>= 1
        last >>= 1
    return (
        last == 0
        and hmac.compare_digest(first_computed, first_root)
        and hmac.compare_digest(second_computed, second_root)
    )


class MerkleFrontier:
    """The RFC 6962 root of a growing tree without re-reading its leaves.

    Holds the roots of the perfect subtrees that the binary decomposition of the size splits the
    tree into, largest (leftmost) first: one per set bit, so appending and ``root()`` are
    O(log n). ``subtree_roots`` and :meth:`restore` let a store persist the state.
    """

    __slots__ = ("_roots", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._roots: list[bytes] = []

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MerkleFrontier:
        frontier = cls()
        for leaf in leaves:
            frontier.append(leaf)
        return frontier

    @classmethod
    def restore(cls, size: int, subtree_roots: Sequence[bytes]) -> MerkleFrontier:
        """A frontier from a saved ``size`` and ``subtree_roots``."""
        if size < 0 or len(subtree_roots) != size.bit_count():
            raise ValueError(f"a tree of size {size} has {max(size, 0).bit_count()} subtree roots")
        if not _all_hashes(subtree_roots):
            raise ValueError("subtree roots must be 32-byte hashes")
        frontier = cls()
        frontier._size = size
        frontier._roots = list(subtree_roots)
        return frontier

    @property
    def size(self) -> int:
        return self._size

    @property
    def subtree_roots(self) -> tuple[bytes, ...]:
        return tuple(self._roots)

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash; merges as many subtrees as the new size has trailing zeros."""
        if len(leaf) != HASH_BYTES:
            raise ValueError("a leaf hash is 32 bytes")
        self._roots.append(leaf)
        self._size += 1
        size = self._size
        while not size & 1:
            right = self._roots.pop()
            self._roots[-1] = node_hash(self._roots[-1], right)
            size >>= 1

    def root(self) -> bytes:
        """MTH of all leaves appended so far."""
        if not self._roots:
            return EMPTY_ROOT
        computed = self._roots[-1]
        for subtree in reversed(self._roots[:-1]):
            computed = node_hash(subtree, computed)
        return computed

    def copy(self) -> MerkleFrontier:
        return MerkleFrontier.restore(self._size, self._roots)


# Checkpoints ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedCheckpoint:
    """A signed statement of the ledger at ``tree_size`` entries.

    ``signed_bytes`` is the note of :func:`checkpoint_note`; ``chain_hash`` is the chain hash of
    entry ``tree_size`` (:data:`GENESIS` for size 0), which travels only inside the note on the
    wire.
    """

    tree_size: int
    root: bytes
    timestamp: datetime
    key_id: str
    signed_bytes: bytes
    signature: bytes
    chain_hash: bytes


@dataclass(frozen=True)
class CheckpointNote:
    """The fields of a checkpoint note, as parsed by :func:`parse_checkpoint_note`."""

    tree_size: int
    root: bytes
    chain_hash: bytes
    timestamp: datetime
    key_id: str


def checkpoint_note(
    tree_size: int, root: bytes, timestamp: datetime, key_id: str, last_chain_hash: bytes
) -> bytes:
    """The exact bytes a checkpoint signs: six lines of ASCII, each ending in a newline.

    ``steward consent ledger v1``, the tree size in decimal, the root and the chain hash of entry
    ``tree_size`` in standard base64, the timestamp as in canonical entries, the key id.
    """
    if type(tree_size) is not int or not 0 <= tree_size <= MAX_SEQ:
        raise ValueError(f"tree size must be an integer from 0 to 2**53-1, got {tree_size!r}")
    if not _all_hashes([root, last_chain_hash]):
        raise ValueError("root and chain hash must be 32-byte hashes")
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"key id must be printable ASCII without spaces, got {key_id!r}")
    lines = [
        CHECKPOINT_ORIGIN,
        str(tree_size),
        base64.b64encode(root).decode("ascii"),
        base64.b64encode(last_chain_hash).decode("ascii"),
        format_timestamp(timestamp),
        key_id,
    ]
    return "".join(f"{line}\n" for line in lines).encode("ascii")


def parse_checkpoint_note(data: bytes) -> CheckpointNote:
    """The fields of a note made by :func:`checkpoint_note`; anything else is refused."""
    try:
        lines = bytes(data).decode("ascii").split("\n")
        if len(lines) != 7 or lines[-1] != "" or lines[0] != CHECKPOINT_ORIGIN:
            raise ValueError(f"not a {CHECKPOINT_ORIGIN!r} note of six lines")
        if not lines[1].isdigit():
            raise ValueError("tree size is not a decimal number")
        note = CheckpointNote(
            tree_size=int(lines[1]),
            root=base64.b64decode(lines[2], validate=True),
            chain_hash=base64.b64decode(lines[3], validate=True),
            timestamp=parse_timestamp(lines[4]),
            key_id=lines[5],
        )
        rebuilt = checkpoint_note(
            note.tree_size, note.root, note.timestamp, note.key_id, note.chain_hash
        )
    except (UnicodeDecodeError, binascii.Error, ValueError) as error:
        raise CheckpointNoteError(f"not a checkpoint note: {error}") from None
    if rebuilt != data:
        raise CheckpointNoteError("not a checkpoint note in canonical form")
    return note


def sign_checkpoint(
    signer: Keyring | Callable[[bytes], bytes],
    tree_size: int,
    root: bytes,
    timestamp: datetime,
    chain_hash: bytes,
    *,
    key_id: str | None = None,
) -> SignedCheckpoint:
    """Sign the note for the tree of ``tree_size`` entries with an Ed25519 key.

    ``signer`` is a keyring, or its ``sign`` method together with ``key_id`` for code that holds
    only the method. ``chain_hash`` is that of entry ``tree_size`` (:data:`GENESIS` for 0).
    """
    sign: Callable[[bytes], bytes]
    if isinstance(signer, Keyring):
        key_id, sign = signer.signing_key_id, signer.sign
    elif key_id is None:
        raise ValueError("key_id is needed when signing with a bare function")
    else:
        sign = signer
    note = checkpoint_note(tree_size, root, timestamp, key_id, chain_hash)
    return SignedCheckpoint(
        tree_size=tree_size,
        root=root,
        timestamp=_utc("timestamp", timestamp),
        key_id=key_id,
        signed_bytes=note,
        signature=sign(note),
        chain_hash=chain_hash,
    )


def checkpoint_problem(public_key_pem: str, checkpoint: SignedCheckpoint) -> str | None:
    """Why ``checkpoint`` does not verify with that public key, or None when it does.

    It must name the key's id, its signature must verify, and its fields must be exactly the
    ones in the signed note, so nothing unsigned can be passed off as signed. A malformed key
    raises KeyringError: that is a setup mistake, not a forgery.
    """
    expected_key_id = key_id_for_public_key(public_key_pem)
    if checkpoint.key_id != expected_key_id:
        return f"names signing key {checkpoint.key_id!r}, not the given key {expected_key_id!r}"
    if not verify_signature(public_key_pem, checkpoint.signed_bytes, checkpoint.signature):
        return f"its signature does not verify with the given key {expected_key_id!r}"
    try:
        note = checkpoint_note(
            checkpoint.tree_size,
            checkpoint.root,
            checkpoint.timestamp,
            checkpoint.key_id,
            checkpoint.chain_hash,
        )
    except ValueError as error:
        return f"its fields are malformed ({error})"
    if note != checkpoint.signed_bytes:
        return "its fields differ from the note that was signed"
    return None


def verify_checkpoint(public_key_pem: str, checkpoint: SignedCheckpoint) -> bool:
    """Whether ``checkpoint`` is signed by that key and says what its fields say."""
    return checkpoint_problem(public_key_pem, checkpoint) is None


# Timestamps -------------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with exactly six fractional digits: ``2025-03-01T09:30:00.000000Z``."""
    moment = _utc("timestamp", moment)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}Z"
    )


def parse_timestamp(text: str) -> datetime:
    """The inverse of :func:`format_timestamp`; any other spelling is refused."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"timestamp {text!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    year, month, day, hour, minute, second, micro = (int(part) for part in match.groups())
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


# Wire messages ----------------------------------------------------------------------------------


def to_entry_message(
    record: LedgerRecord, canonical: bytes, leaf: bytes, chain: bytes
) -> audit_pb2.LedgerEntry:
    """The ``LedgerEntry`` for a stored entry."""
    message = audit_pb2.LedgerEntry(
        seq=record.seq,
        recorded_at=_timestamp_message(record.recorded_at),
        kind=record.kind,
        subject=record.subject,
        purpose=record.purpose,
        decision=record.decision,
        source=record.source,
        policy_version=record.policy_version,
        notice_sha256=record.notice_sha256,
        actor=record.actor,
        details=record.details,
        canonical_bytes=canonical,
        leaf_hash=leaf,
        chain_hash=chain,
    )
    if record.expires_at is not None:
        message.expires_at.CopyFrom(_timestamp_message(record.expires_at))
    if record.occurred_at is not None:
        message.occurred_at.CopyFrom(_timestamp_message(record.occurred_at))
    return message


def entry_from_message(message: audit_pb2.LedgerEntry) -> SealedEntry:
    """The entry a ``LedgerEntry`` carries, decoded from its canonical bytes.

    The message's other fields must say the same as the canonical bytes (CanonicalError if not);
    the hashes are taken as given, since checking them is the auditor's job.
    """
    record = record_from_canonical(message.canonical_bytes)
    expected = to_entry_message(
        record, message.canonical_bytes, message.leaf_hash, message.chain_hash
    )
    if expected != message:
        raise CanonicalError(f"entry seq {message.seq}: its fields differ from its canonical bytes")
    return SealedEntry(record, message.canonical_bytes, message.leaf_hash, message.chain_hash)


def to_checkpoint_message(checkpoint: SignedCheckpoint) -> audit_pb2.Checkpoint:
    """The ``Checkpoint`` message; the chain hash travels inside ``signed_bytes``."""
    return audit_pb2.Checkpoint(
        tree_size=checkpoint.tree_size,
        root_hash=checkpoint.root,
        timestamp=_timestamp_message(checkpoint.timestamp),
        key_id=checkpoint.key_id,
        signed_bytes=checkpoint.signed_bytes,
        signature=checkpoint.signature,
    )


def checkpoint_from_message(message: audit_pb2.Checkpoint) -> SignedCheckpoint:
    """A checkpoint read back from the wire; CheckpointNoteError if its note is not one.

    Only the chain hash is taken from the note; the other fields come from the message, so
    :func:`verify_checkpoint` still catches a message whose fields differ from what was signed.
    """
    note = parse_checkpoint_note(message.signed_bytes)
    return SignedCheckpoint(
        tree_size=message.tree_size,
        root=message.root_hash,
        timestamp=message.timestamp.ToDatetime(tzinfo=UTC),
        key_id=message.key_id,
        signed_bytes=message.signed_bytes,
        signature=message.signature,
        chain_hash=note.chain_hash,
    )


# Helpers ----------------------------------------------------------------------------------------


def _subtree_root(leaves: Sequence[bytes], start: int, end: int) -> bytes:
    if start == end:
        return EMPTY_ROOT
    level = list(leaves[start:end])
    while len(level) > 1:
        level = _parent_level(level)
    return level[0]


def _parent_level(level: list[bytes]) -> list[bytes]:
    parents = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        parents.append(level[-1])
    return parents


def _largest_power_of_two_below(size: int) -> int:
    return 1 << ((size - 1).bit_length() - 1)


def _all_hashes(values: Iterable[bytes]) -> bool:
    return all(isinstance(value, bytes) and len(value) == HASH_BYTES for value in values)


def _utf16_order(key: str) -> bytes:
    # RFC 8785 sorts member names by UTF-16 code units; big-endian bytes compare the same way.
    return key.encode("utf-16-be", "surrogatepass")


def _utc(name: str, moment: datetime) -> datetime:
    if not isinstance(moment, datetime):
        raise ValueError(f"{name} must be a datetime")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return moment.astimezone(UTC)


def _optional_timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else format_timestamp(moment)


def _parse_optional_timestamp(value: object, name: str) -> datetime | None:
    return None if value is None else parse_timestamp(_string(value, name))


def _enum_name(enum: Any, value: int, name: str) -> str:
    try:
        enum_name: str = enum.Name(value)
    except (ValueError, TypeError):
        raise ValueError(f"{name} {value!r} is not a known {enum.DESCRIPTOR.name}") from None
    return enum_name


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode (lone surrogate)") from None


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _integer(value: object, name: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer")
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        names = [name for name, _ in pairs]
        duplicate = next(name for name in names if names.count(name) > 1)
        raise CanonicalError(f"member {duplicate!r} appears twice")
    return document


def _refuse_number(text: str) -> Any:
    raise CanonicalError(f"number {text} is not an integer")


def _timestamp_message(moment: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message
