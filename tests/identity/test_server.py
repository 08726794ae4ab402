"""The identity service over a real gRPC channel: validation, errors, events and privacy."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import inspect, text
from steward.common.v1 import common_pb2
from steward.events.v1 import events_pb2, events_pb2_grpc
from steward.identity.v1 import identity_pb2, identity_pb2_grpc

from services.common.config import Settings
from services.common.db import make_engine
from services.common.errors import read_error_details
from services.runtime import RunningSuite, start_suite

T = common_pb2
L = identity_pb2

RAW_VALUES = ["Ann.Lee@Example.com", "+44 7911 123456", "DEVICE-ABC-123", "crm-0042"]


@pytest.fixture
def suite(tmp_path: Path, db_url: str) -> Iterator[RunningSuite]:
    settings = Settings.from_env(
        {"STEWARD_DATA_DIR": str(tmp_path / "data"), "STEWARD_IDENTITY_DB_URL": db_url}
    )
    running = start_suite(dataclasses.replace(settings, port=0), ["identity"])
    yield running
    running.stop(0)


@pytest.fixture
def stub(suite: RunningSuite) -> Iterator[identity_pb2_grpc.IdentityServiceStub]:
    with grpc.insecure_channel(suite.target) as channel:
        yield identity_pb2_grpc.IdentityServiceStub(channel)


def identifier(type_: str, value: str, namespace: str = "") -> common_pb2.Identifier:
    return T.Identifier(
        type=T.IdentifierType.Value(f"IDENTIFIER_TYPE_{type_}"), value=value, namespace=namespace
    )


def resolve(
    stub: identity_pb2_grpc.IdentityServiceStub,
    *identifiers: common_pb2.Identifier,
    source: str = "web",
) -> identity_pb2.ResolveResult:
    request = L.ResolveRequest(items=[L.ResolveItem(identifiers=identifiers)], source=source)
    [result] = stub.Resolve(request, timeout=10).results
    return result


def test_resolve_returns_a_person_and_an_outcome_per_identifier(
    stub: identity_pb2_grpc.IdentityServiceStub,
) -> None:
    result = resolve(
        stub,
        identifier("EMAIL", "ann@example.com"),
        identifier("PHONE", "not a number"),
        identifier("EMAIL", "test@test.com"),
    )
    assert result.person_id and result.created
    assert [o.status for o in result.identifiers] == [
        L.LINK_STATUS_LINKED,
        L.LINK_STATUS_INVALID,
        L.LINK_STATUS_BLOCKED,
    ]
    assert result.identifiers[0].hashed_value.startswith("h1:")
    assert result.identifiers[1].hashed_value == ""


def test_malformed_requests_get_field_violations(
    stub: identity_pb2_grpc.IdentityServiceStub,
) -> None:
    cases = {
        "items": L.ResolveRequest(),
        "items[0].identifiers": L.ResolveRequest(items=[L.ResolveItem()]),
        "items[0].identifiers[0].type": L.ResolveRequest(
            items=[L.ResolveItem(identifiers=[T.Identifier(value="x")])]
        ),
        "items[0].identifiers[0].namespace": L.ResolveRequest(
            items=[L.ResolveItem(identifiers=[identifier("CUSTOM", "123")])]
        ),
        "items[0].identifiers[0].value": L.ResolveRequest(
            items=[
                L.ResolveItem(
                    identifiers=[
                        T.Identifier(
                            type=T.IDENTIFIER_TYPE_EMAIL, value="h1:zz", pseudonymised=True
                        )
                    ]
                )
            ]
        ),
    }
    too_many = [identifier("COOKIE_ID", f"c{n}") for n in range(33)]
    cases["items[1].identifiers"] = L.ResolveRequest(
        items=[L.ResolveItem(identifiers=too_many[:1]), L.ResolveItem(identifiers=too_many)]
    )
    for field, request in cases.items():
        with pytest.raises(grpc.RpcError) as raised:
            stub.Resolve(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in read_error_details(raised.value).field_violations, field
    with pytest.raises(grpc.RpcError) as raised:
        stub.Lookup(L.LookupRequest(identifiers=[T.Identifier(value="x")]), timeout=10)
    assert "identifiers[0].type" in read_error_details(raised.value).field_violations


def test_batch_above_the_limit_is_refused(stub: identity_pb2_grpc.IdentityServiceStub) -> None:
    items = [L.ResolveItem(identifiers=[identifier("COOKIE_ID", f"c{n}")]) for n in range(1001)]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Resolve(L.ResolveRequest(items=items), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_person_and_merge_are_not_found(
    stub: identity_pb2_grpc.IdentityServiceStub,
) -> None:
    for call, request in [
        (stub.GetPerson, L.GetPersonRequest(person_id="p_missing")),
        (stub.Forget, L.ForgetRequest(person_id="p_missing")),
        (stub.GetHistory, L.GetHistoryRequest(person_id="p_missing")),
        (stub.Unmerge, L.UnmergeRequest(merge_id="m_missing", reason="test")),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_merge_unmerge_and_forget_are_published_in_order_and_redacted_once_applied(
    tmp_path: Path, db_url: str
) -> None:
    # Tagging runs elsewhere: identity waits for its acknowledgement before redacting.
    settings = Settings.from_env(
        {
            "STEWARD_DATA_DIR": str(tmp_path / "data"),
            "STEWARD_IDENTITY_DB_URL": db_url,
            "STEWARD_TAGGING_TARGET": "tagging.invalid:50051",
        }
    )
    suite = start_suite(dataclasses.replace(settings, port=0), ["identity"])
    try:
        with grpc.insecure_channel(suite.target) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            log = events_pb2_grpc.EventLogServiceStub(channel)
            a = resolve(stub, identifier("EMAIL", "a@example.com")).person_id
            b = resolve(stub, identifier("EMAIL", "b@example.com")).person_id
            merge = stub.Merge(
                L.MergeRequest(person_ids=[a, b], reason="same person"), timeout=10
            ).merge
            assert merge.surviving_person_id == a and list(merge.absorbed_person_ids) == [b]
            stub.Unmerge(
                L.UnmergeRequest(merge_id=merge.merge_id, reason="not the same"), timeout=10
            )
            stub.Forget(L.ForgetRequest(person_id=b, reason="erasure"), timeout=10)

            def read() -> list[events_pb2.Envelope]:
                request = events_pb2.SubscribeRequest(
                    producer="identity", consumer="test", stop_at_end=True
                )
                return [r.envelope for r in log.Subscribe(request, timeout=10)]

            envelopes = read()
            kinds = [e.WhichOneof("body") for e in envelopes]
            assert kinds == ["persons_merged", "person_unmerged", "person_forgotten"]
            assert [e.seq for e in envelopes] == [1, 2, 3]
            assert envelopes[0].persons_merged.merge_id == merge.merge_id
            assert envelopes[1].person_unmerged.restored_person_id == b
            assert envelopes[2].person_forgotten.person_id == b

            # Once tagging has applied the forget, nothing on the log names b any more.
            log.Ack(
                events_pb2.AckRequest(producer="identity", consumer="tagging", seq=3), timeout=10
            )
            redacted = read()
            assert [e.WhichOneof("body") for e in redacted] == ["redacted"] * 3
            assert [(e.seq, e.id) for e in redacted] == [(e.seq, e.id) for e in envelopes]
            assert all(b.encode() not in e.SerializeToString() for e in redacted)
    finally:
        suite.stop(0)


def test_history_pages_newest_first(stub: identity_pb2_grpc.IdentityServiceStub) -> None:
    survivor = resolve(stub, identifier("CRM_ID", "C-1")).person_id
    for n in range(5):
        other = resolve(stub, identifier("COOKIE_ID", f"h{n}")).person_id
        stub.Merge(L.MergeRequest(person_ids=[survivor, other], reason=f"merge {n}"), timeout=10)
    first = stub.GetHistory(L.GetHistoryRequest(person_id=survivor, page_size=3), timeout=10)
    assert len(first.entries) == 3 and first.next_page_token
    second = stub.GetHistory(
        L.GetHistoryRequest(person_id=survivor, page_size=3, page_token=first.next_page_token),
        timeout=10,
    )
    reasons = [e.reason for e in [*first.entries, *second.entries]]
    assert reasons == [f"merge {n}" for n in reversed(range(5))]
    assert not second.next_page_token
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetHistory(L.GetHistoryRequest(person_id=survivor, page_token="garbage"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rules_are_versioned_and_validated(stub: identity_pb2_grpc.IdentityServiceStub) -> None:
    assert stub.GetRules(L.GetRulesRequest(), timeout=10).rules.version == 0
    rules = L.MergeRules(
        priority=[T.IDENTIFIER_TYPE_CRM_ID, T.IDENTIFIER_TYPE_EMAIL],
        limits=[L.TypeLimit(type=T.IDENTIFIER_TYPE_EMAIL, max_per_person=2)],
        blocked_values=["Shop@Example.com"],
        hub_threshold=3,
    )
    stored = stub.PutRules(L.PutRulesRequest(rules=rules), timeout=10).rules
    assert stored.version == 1 and list(stored.blocked_values) == ["shop@example.com"]
    assert stub.GetRules(L.GetRulesRequest(), timeout=10).rules.hub_threshold == 3
    assert stub.GetRules(L.GetRulesRequest(version=1), timeout=10).rules.version == 1
    assert resolve(stub, identifier("EMAIL", "shop@example.com")).identifiers[0].status == (
        L.LINK_STATUS_BLOCKED
    )
    bad = L.MergeRules(blocked_patterns=["(unclosed"], limits=[L.TypeLimit(max_per_person=0)])
    with pytest.raises(grpc.RpcError) as raised:
        stub.PutRules(L.PutRulesRequest(rules=bad), timeout=10)
    violations = read_error_details(raised.value).field_violations
    assert {
        "rules.blocked_patterns[0]",
        "rules.limits[0].type",
        "rules.limits[0].max_per_person",
    } <= set(violations)
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetRules(L.GetRulesRequest(version=7), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_no_raw_identifier_is_stored_anywhere(
    suite: RunningSuite, stub: identity_pb2_grpc.IdentityServiceStub, db_url: str
) -> None:
    result = resolve(
        stub,
        identifier("EMAIL", RAW_VALUES[0]),
        identifier("PHONE", RAW_VALUES[1]),
        identifier("DEVICE_ID", RAW_VALUES[2]),
        identifier("CRM_ID", RAW_VALUES[3]),
    )
    other = resolve(stub, identifier("EMAIL", "other@example.com")).person_id
    stub.Merge(L.MergeRequest(person_ids=[result.person_id, other], reason="scan"), timeout=10)
    needles = set()
    for raw in RAW_VALUES:
        needles |= {
            raw,
            raw.lower(),
            raw.replace(" ", ""),
            "447911123456",
            "ann.lee",
            "device-abc-123",
        }
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            for table in inspect(connection).get_table_names():
                for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                    cells = " ".join(
                        value.hex() if isinstance(value, bytes) else str(value) for value in row
                    )
                    blob = cells + " ".join(
                        value.decode("latin-1") for value in row if isinstance(value, bytes)
                    )
                    for needle in needles:
                        assert needle.lower() not in blob.lower(), f"{needle!r} found in {table}"
    finally:
        engine.dispose()


def test_merge_breaking_a_limit_is_refused_with_the_rule(
    stub: identity_pb2_grpc.IdentityServiceStub,
) -> None:
    a = resolve(stub, identifier("CRM_ID", "C-10")).person_id
    b = resolve(stub, identifier("CRM_ID", "C-11")).person_id
    with pytest.raises(grpc.RpcError) as raised:
        stub.Merge(L.MergeRequest(person_ids=[a, b], reason="operator"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CRM_ID" in (raised.value.details() or "")
    assert read_error_details(raised.value).precondition_failures
