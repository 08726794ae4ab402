"""CheckConsent's cache of recent persons: never an answer a committed change made stale.

Through the services, every answer below is asked once before the change, so it comes from the
cache when the change lands; merges and unmerges (the consumer's path) are covered by
tests/consent/test_person_links.py, whose checks are cached the same way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc

from services.consent.check_cache import CheckInputs, ConsentCheckCache, by_purpose
from services.consent.decisions import DecisionRecord
from services.runtime import RunningSuite

C = consent_pb2
T = common_pb2
NOW = datetime.now(UTC).replace(microsecond=0)


def decision(seq: int, person: str, purpose: str) -> DecisionRecord:
    return DecisionRecord(
        seq, person, purpose, T.DECISION_GRANTED, NOW, None, C.CONSENT_SOURCE_APP, "1"
    )


def inputs(*decisions: DecisionRecord) -> CheckInputs:
    return CheckInputs(by_purpose(decisions))


def test_inputs_group_decisions_by_purpose_in_ledger_order() -> None:
    held = inputs(
        decision(1, "p_a", "ads"), decision(2, "p_b", "analytics"), decision(3, "p_a", "ads")
    )
    assert [d.seq for d in held.decisions["ads"]] == [1, 3]
    assert [d.seq for d in held.decisions["analytics"]] == [2]
    assert held.erased is None and held.with_erased(True).erased is True


def test_a_read_that_spans_a_change_is_not_kept() -> None:
    cache = ConsentCheckCache()
    before = cache.generation
    cache.changed(["p_someone_else"])  # committed while the read was under way
    assert not cache.offer("p_a", inputs(), before)
    assert cache.get("p_a") is None
    assert cache.offer("p_a", inputs(), cache.generation)
    assert cache.get("p_a") == inputs()


def test_a_change_drops_the_persons_it_names_or_everyone() -> None:
    cache = ConsentCheckCache()
    for person in ("p_a", "p_b", "p_c"):
        cache.offer(person, inputs(), cache.generation)
    cache.changed(["p_b", "p_unknown"])
    assert cache.get("p_a") is not None and cache.get("p_b") is None
    cache.changed([])
    assert len(cache) == 2
    cache.changed()
    assert len(cache) == 0


def test_the_least_recently_asked_person_goes_first() -> None:
    cache = ConsentCheckCache(capacity=2)
    cache.offer("p_a", inputs(), cache.generation)
    cache.offer("p_b", inputs(), cache.generation)
    assert cache.get("p_a") is not None
    cache.offer("p_c", inputs(), cache.generation)
    assert cache.get("p_b") is None and cache.get("p_a") is not None
    with pytest.raises(ValueError):
        ConsentCheckCache(capacity=0)


def test_concurrent_readers_never_keep_what_a_writer_changed() -> None:
    """Readers read a shared 'database' (a version number) the way CheckConsent does; a writer
    bumps it and reports the change after each commit, before its call returns. Whatever a
    reader finds is never older than the last write whose call had returned when it looked."""
    cache = ConsentCheckCache()
    committed = [0]
    returned = [0]
    stale: list[tuple[int, int]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            floor = returned[0]
            generation = cache.generation
            held = cache.get("p_a")
            if held is None:
                version = committed[0]
                cache.offer("p_a", inputs(decision(version, "p_a", "ads")), generation)
            else:
                version = held.decisions["ads"][0].seq
            if version < floor:
                stale.append((version, floor))

    def writer() -> None:
        for _ in range(2_000):
            committed[0] += 1
            cache.changed(["p_a"])
            returned[0] = committed[0]

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    writer()
    stop.set()
    for thread in readers:
        thread.join()
    assert stale == []


# Through the services ------------------------------------------------------------------------


@pytest.fixture
def consent(start_services: Callable[..., RunningSuite]) -> consent_pb2_grpc.ConsentServiceStub:
    import grpc

    suite = start_services("consent", "identity")
    channel = grpc.insecure_channel(suite.target)
    return consent_pb2_grpc.ConsentServiceStub(channel)


def record(consent: consent_pb2_grpc.ConsentServiceStub, person: str, kind: int, ago: int) -> None:
    policy = next(
        p.policy_version
        for p in consent.ListPurposes(C.ListPurposesRequest(), timeout=10).purposes
        if p.id == "analytics"
    )
    stamp = T.BehaviourEvent().occurred_at  # a Timestamp message
    stamp.FromDatetime(NOW - timedelta(minutes=ago))
    consent.RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(person_id=person),
            decisions=[
                C.DecisionInput(purpose="analytics", decision=kind, policy_version=policy)  # type: ignore[arg-type]
            ],
            source=C.CONSENT_SOURCE_APP,
            locale="en-GB",
            occurred_at=stamp,
        ),
        timeout=10,
    )


def check(consent: consent_pb2_grpc.ConsentServiceStub, person: str) -> C.CheckConsentResponse:
    return consent.CheckConsent(
        C.CheckConsentRequest(subject=T.PersonRef(person_id=person), purpose="analytics"),
        timeout=10,
    )


def test_each_decision_shows_in_the_very_next_check(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    person, other = "p_" + "a" * 32, "p_" + "b" * 32
    assert check(consent, person).reason == C.CONSENT_REASON_NOT_GRANTED
    record(consent, other, T.DECISION_GRANTED, ago=9)
    assert check(consent, other).allowed
    record(consent, person, T.DECISION_GRANTED, ago=8)
    assert check(consent, person).allowed and check(consent, other).allowed
    record(consent, person, T.DECISION_WITHDRAWN, ago=7)
    assert check(consent, person).reason == C.CONSENT_REASON_WITHDRAWN
    assert check(consent, other).allowed  # another person's answer was kept and is still right
    record(consent, person, T.DECISION_DENIED, ago=6)
    assert check(consent, person).reason == C.CONSENT_REASON_DENIED


def test_an_erasure_shows_in_the_very_next_check(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    person = "p_" + "c" * 32
    record(consent, person, T.DECISION_GRANTED, ago=5)
    assert check(consent, person).allowed
    consent.EraseSubject(
        C.EraseSubjectRequest(subject=T.PersonRef(person_id=person), reason="ticket 7"),
        timeout=10,
    )
    assert check(consent, person).reason == C.CONSENT_REASON_ERASED
