"""Every RPC of every service, fed random and malformed requests built from its descriptor.

Each call must end with a status a caller can act on (never UNKNOWN or INTERNAL), and a call
that is refused must leave every table of every service's database exactly as it was. The
requests mix plain random values with the junk real callers send: empty and huge strings,
unknown enum numbers, NaN and infinities, timestamps far outside any calendar, identifiers of
every type with nonsense values, unknown purposes, TCF strings mutated character by character,
rule sets cut short, repeated fields past their limits, and string fields carrying bytes that
are not UTF-8 (spliced into the encoded request, since protobuf would not encode them).

``STEWARD_FUZZ_EXAMPLES`` sets the examples per RPC (default 12: a quick pass in ``make test``;
``bench``-length runs use hundreds).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import MetaData, select
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2
from steward.events.v1 import events_pb2
from steward.identity.v1 import identity_pb2
from steward.recommend.v1 import recommend_pb2
from steward.tagging.v1 import tagging_pb2

from services.common.config import SERVICE_DATABASES
from services.common.db import make_engine
from services.testing import StewardSuite, steward_suite

EXAMPLES = int(os.environ.get("STEWARD_FUZZ_EXAMPLES", "12"))
SERVICES = [
    consent_pb2.DESCRIPTOR.services_by_name["ConsentService"],
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
    identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
    tagging_pb2.DESCRIPTOR.services_by_name["TaggingService"],
    recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"],
    events_pb2.DESCRIPTOR.services_by_name["EventLogService"],
]
METHODS = [method for service in SERVICES for method in service.methods]
ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
"""What a call may end with: an answer, or a refusal the caller can act on."""
STREAM_SECONDS = 1.5
"""A following Subscribe never ends by itself: a stream still open then is cut (the deadline)."""

RULES = """
tag_budget: 3
k_floor: 10
tags:
  - id: buyer
    category: value
    description: Bought in the last 30 days
    condition: p.spend_30d > 0.0
    ttl: 30d
"""
TCF = "CQNnEPwQNrkMMEsAHBENBYEgAP_gAAAAAAYgF5wAgABALzAAAAA.cDAAAAAAAA"
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture(scope="module")
def suite() -> Iterator[StewardSuite]:
    # No checkpoints on a timer: the only writes are the calls' own.
    with steward_suite(environ={"STEWARD_CHECKPOINT_SECONDS": "86400"}) as running:
        _seed(running)
        yield running


def _seed(suite: StewardSuite) -> None:
    """A person with consent and a purchase, a rule set and a catalogue: calls reach past the
    "not found" answers into the code that does the work."""
    suite.tagging.PutRuleSet(tagging_pb2.PutRuleSetRequest(yaml=RULES), timeout=10)
    suite.recommend.PutItems(
        recommend_pb2.PutItemsRequest(
            items=[
                recommend_pb2.Item(item_id=f"sku-{n}", title="Tent", category="outdoor")
                for n in range(3)
            ]
        ),
        timeout=10,
    )
    subject = common_pb2.PersonRef(
        identifiers=[
            common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value="seed@example.org")
        ]
    )
    person = suite.consent.RecordConsent(
        consent_pb2.RecordConsentRequest(
            subject=subject,
            decisions=[
                consent_pb2.DecisionInput(
                    purpose=p, decision=common_pb2.DECISION_GRANTED, policy_version="2026-01"
                )
                for p in ("analytics", "profiling", "personalisation")
            ],
            source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
        ),
        timeout=10,
    ).person_id
    KNOWN["person_id"] = person


KNOWN: dict[str, str] = {}


# Strategies ----------------------------------------------------------------------------------


def _junk_text(small: bool = False) -> st.SearchStrategy[str]:
    """Junk strings; ``small`` leaves out the huge ones (for elements repeated a thousand times,
    which would otherwise build requests of hundreds of megabytes)."""
    junk = [
        st.text(max_size=24),
        st.just(""),
        st.sampled_from(["\x00", "💥" * 3, "é" * 70, " padded ", "../../etc/passwd", "%s%n"]),
    ]
    if not small:
        junk.append(st.integers(min_value=1025, max_value=70_000).map(lambda n: "x" * n))
    return st.one_of(*junk)


def _mutated(text: str) -> st.SearchStrategy[str]:
    """``text`` with a few characters replaced, cut short, or doubled."""

    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        chars = list(text)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(chars) - 1))
            chars[position] = draw(st.sampled_from(BASE64URL + ".!~"))
        mutated = "".join(chars)
        return draw(st.sampled_from([mutated, mutated[: len(mutated) // 2], mutated * 2]))

    return mutate()


def _string(field: FieldDescriptor, small: bool = False) -> st.SearchStrategy[str]:
    name = field.name
    domain: list[st.SearchStrategy[str]] = []
    if "person_id" in name:
        domain.append(st.sampled_from([KNOWN.get("person_id", "p_x"), "p_missing", "-", "P" * 65]))
    if "purpose" in name:
        domain.append(st.sampled_from(["analytics", "profiling", "marketing", "nope", "ANALYTICS"]))
    if name == "tcf_string":
        domain.append(_mutated(TCF))
    if name == "yaml":
        domain.append(st.sampled_from([RULES, RULES[: len(RULES) // 2], RULES.replace(":", "")]))
        domain.append(_mutated(RULES))
    if name in ("value", "hashed_value"):
        domain.append(
            st.sampled_from(
                ["a@b", "@", "+44", "+999999999999999999", "not an email", "k1:zz", "07700 900123"]
            )
        )
    if name in ("policy_version",):
        domain.append(st.sampled_from(["2026-01", "1999-01", ""]))
    if name.endswith("page_token"):
        domain.append(st.sampled_from(["", "eyJ4Ijo", "!!!", "MTAw"]))
    return st.one_of(*domain, _junk_text(small)) if domain else _junk_text(small)


TIMESTAMP_SECONDS = [
    -62135596801,  # before year 1
    -62135596800,
    -1,
    0,
    1_790_000_000,
    253402300799,  # the last second of year 9999
    253402300800,
    2**62,
]


def _scalar(field: FieldDescriptor, small: bool = False) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _string(field, small)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=48)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(
            st.floats(
                allow_nan=True,
                allow_infinity=True,
                width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64,
            ),
            st.sampled_from([0.0, -1.0, 1e308, float("nan"), float("inf")]),
        )
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]),
            st.integers(min_value=-3, max_value=60),
        )
    if kind in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        return st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 1, 10_001]))
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    return st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1, 2**53]))


def _message(
    descriptor: Descriptor, depth: int = 0, small: bool = False
) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(
            lambda seconds, nanos: cls(seconds=seconds, nanos=nanos),
            st.one_of(st.sampled_from(TIMESTAMP_SECONDS), st.integers(-(2**40), 2**40)),
            st.one_of(st.just(0), st.integers(-1, 1_000_000_000)),
        )
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        strategy = _field(field, depth, small)
        if strategy is not None:
            optional[field.name] = strategy

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if _is_map(field):
                target = getattr(message, name)
                for key, item in value.items():
                    if field.message_type.fields_by_name["value"].message_type is not None:
                        target[key].CopyFrom(item)
                    else:
                        target[key] = item
            elif field.is_repeated:
                if field.message_type is not None:
                    getattr(message, name).extend(value)
                else:
                    getattr(message, name).extend(value)
            elif field.message_type is not None:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field(field: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any] | None:
    if _is_map(field):
        key = _scalar(field.message_type.fields_by_name["key"], small)
        value_field = field.message_type.fields_by_name["value"]
        if value_field.message_type is not None:
            if depth >= 2:
                return None
            value = _message(value_field.message_type, depth + 1, small)
        else:
            value = _scalar(value_field, small)
        return st.dictionaries(key, value, max_size=3)
    if field.message_type is not None:
        if depth >= 3:
            return None
        element = _message(field.message_type, depth + 1, small)
        many = _message(field.message_type, depth + 1, small=True)
    else:
        element = _scalar(field, small)
        many = _scalar(field, small=True)
    if not field.is_repeated:
        return element
    if small:  # inside an element repeated a thousand times: no thousands within thousands
        return st.lists(element, max_size=3)
    # Past the limits too: one small element repeated past the largest batch any RPC takes.
    return st.one_of(
        st.lists(element, max_size=3),
        st.tuples(many, st.sampled_from([65, 1001, 2000])).map(lambda pair: [pair[0]] * pair[1]),
    )


def _requests(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Encoded requests: random messages, some with a string field's bytes made invalid UTF-8."""
    strings = [
        f
        for f in method.input_type.fields
        if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated
    ]

    @st.composite
    def encoded(draw: st.DrawFn) -> bytes:
        data = draw(_message(method.input_type)).SerializeToString()
        if strings and draw(st.integers(0, 9)) == 0:
            field = draw(st.sampled_from(strings))
            junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"ok\xed\xa0\x80"]))
            data += _tag(field.number) + _varint(len(junk)) + junk
        return data

    return encoded()


def _tag(number: int) -> bytes:
    return _varint((number << 3) | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# The stored data -----------------------------------------------------------------------------


class StoredData:
    """Hashes every row of every table of every service's database (engines and table lists
    kept for the module's suite), and remembers whether the suite may still be writing."""

    def __init__(self, suite: StewardSuite) -> None:
        self._engines = [make_engine(suite.settings.db_url(d)) for d in SERVICE_DATABASES]
        self._tables = []
        for engine in self._engines:
            metadata = MetaData()
            metadata.reflect(engine)
            self._tables.append(metadata.sorted_tables)
        self.settled: str | None = None

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for engine, tables in zip(self._engines, self._tables, strict=True):
            with engine.connect() as connection:
                for table in tables:
                    rows = sorted(repr(tuple(row)) for row in connection.execute(select(table)))
                    hasher.update(f"{engine.url.database}.{table.name}:{len(rows)}".encode())
                    for row in rows:
                        hasher.update(row.encode())
        return hasher.hexdigest()

    def settle(self, *, quiet: float = 0.35, limit: float = 10.0) -> str:
        """The digest once the suite has stopped writing (consumers catching up with a call
        that changed something); cheap when nothing has changed since the last settle.

        ``quiet`` outlasts a consumer's wait for more envelopes (0.2 s) before it acknowledges
        what it applied: the acknowledgement writes too (an erasure or withdrawal completes)."""
        if self.settled is not None:
            return self.settled
        deadline = time.monotonic() + limit
        previous = self.digest()
        while True:
            time.sleep(quiet)
            current = self.digest()
            if current == previous or time.monotonic() > deadline:
                self.settled = current
                return current
            previous = current

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()


@pytest.fixture(scope="module")
def stored(suite: StewardSuite) -> Iterator[StoredData]:
    data = StoredData(suite)
    yield data
    data.close()


# The test ------------------------------------------------------------------------------------


def _call(
    suite: StewardSuite, method: MethodDescriptor, data: bytes
) -> tuple[grpc.StatusCode, str]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response = message_factory.GetMessageClass(method.output_type)
    try:
        if method.server_streaming:
            stream = suite.channel.unary_stream(
                path, request_serializer=lambda b: b, response_deserializer=response.FromString
            )(data, timeout=STREAM_SECONDS)
            for _ in zip(range(200), stream, strict=False):
                pass
        else:
            suite.channel.unary_unary(
                path, request_serializer=lambda b: b, response_deserializer=response.FromString
            )(data, timeout=10)
    except grpc.RpcError as error:
        call = error if isinstance(error, grpc.Call) else None
        assert call is not None
        return call.code(), call.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_every_rpc_answers_bad_input_with_a_clear_status_and_keeps_the_data(
    suite: StewardSuite, stored: StoredData, method: MethodDescriptor
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(data=_requests(method))
    def check(data: bytes) -> None:
        before = stored.settle()
        code, details = _call(suite, method, data)
        streaming_cut = method.server_streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert code in ANSWERS or streaming_cut, f"{code.name}: {details}"
        if code == grpc.StatusCode.OK or streaming_cut:
            stored.settled = None  # it may have changed something, now or in the background
        else:
            assert stored.digest() == before, f"a refused call ({code.name}) changed data"

    check()


def test_every_rpc_is_fuzzed() -> None:
    """A new RPC is picked up from the descriptors, not from a list kept by hand."""
    names = {f"{m.containing_service.name}.{m.name}" for m in METHODS}
    assert "ConsentService.Collect" in names and "EventLogService.Subscribe" in names
    proto = descriptor_pb2.FileDescriptorProto()
    consent_pb2.DESCRIPTOR.CopyToProto(proto)
    assert {f"ConsentService.{m.name}" for m in proto.service[0].method} <= names
