"""Resolving identifier sets to persons, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2
from steward.identity.v1 import identity_pb2

from services.common.errors import FailedPrecondition, NotFound
from services.identity.graph import ItemInput
from services.identity.rules import MergeRules, TypeLimit
from services.identity.service import IdentityService
from tests.identity.conftest import Clock, ItemMaker, make_item

L = identity_pb2
T = common_pb2


def person_of(identity: IdentityService, make: ItemMaker, *spec: tuple[str, str]) -> str:
    digests = [i.candidates for i in make(*spec).identifiers]
    return identity.lookup(digests)[0][0]


def test_new_identifiers_create_one_random_person(
    identity: IdentityService, item: ItemMaker
) -> None:
    [result] = identity.resolve([item(("EMAIL", "Ann@Example.com"), ("PHONE", "+44 7911 123456"))])
    assert result.created and result.person_id.startswith("p_")
    assert [o.status for o in result.identifiers] == [L.LINK_STATUS_LINKED] * 2
    again = identity.resolve([item(("EMAIL", " ann@example.com "))])[0]
    assert again.person_id == result.person_id and not again.created
    assert again.identifiers[0].status == L.LINK_STATUS_ALREADY_KNOWN


def test_identifiers_on_two_persons_merge_into_the_oldest(
    identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    older = identity.resolve([item(("CRM_ID", "C-1"))])[0].person_id
    clock.advance()
    younger = identity.resolve([item(("EMAIL", "bo@example.com"))])[0].person_id
    clock.advance()
    [merged] = identity.resolve([item(("EMAIL", "bo@example.com"), ("CRM_ID", "C-1"))])
    assert merged.person_id == older
    assert merged.merged_person_ids == [younger] and merged.merge_id
    # The absorbed person keeps resolving, to the survivor.
    assert person_of(identity, item, ("EMAIL", "bo@example.com")) == older
    view = identity.person(younger)
    assert view.person_id == older and view.alias_person_ids == [younger]


def test_new_strong_identifier_with_known_cookie_is_a_reversible_merge(
    identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    anonymous = identity.resolve([item(("COOKIE_ID", "ck-1"))])[0].person_id
    clock.advance()
    [login] = identity.resolve([item(("COOKIE_ID", "ck-1"), ("EMAIL", "cy@example.com"))])
    assert login.person_id == anonymous and login.merge_id
    merge, restored = identity.unmerge(login.merge_id, "operator", "wrong login")
    assert merge.merge_id == login.merge_id
    assert person_of(identity, item, ("EMAIL", "cy@example.com")) == restored[0] != anonymous
    assert person_of(identity, item, ("COOKIE_ID", "ck-1")) == anonymous


def test_unmerge_restores_identifiers_gained_in_the_absorbed_persons_name(
    identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    alice = identity.resolve([item(("EMAIL", "alice@example.com"))])[0].person_id
    clock.advance()
    bob = identity.resolve([item(("EMAIL", "bob@example.com"))])[0].person_id
    clock.advance()
    merge = identity.merge([alice, bob], "operator", "same household?")
    # Later, a device arrives with Bob's email only: it came in Bob's name.
    identity.resolve([item(("EMAIL", "bob@example.com"), ("DEVICE_ID", "bob-phone"))])
    # And one with Alice's email only.
    identity.resolve([item(("EMAIL", "alice@example.com"), ("DEVICE_ID", "alice-phone"))])
    assert person_of(identity, item, ("DEVICE_ID", "bob-phone")) == alice
    identity.unmerge(merge.merge_id, "operator", "not the same person")
    assert person_of(identity, item, ("DEVICE_ID", "bob-phone")) == bob
    assert person_of(identity, item, ("DEVICE_ID", "alice-phone")) == alice
    with pytest.raises(FailedPrecondition):
        identity.unmerge(merge.merge_id, "operator", "twice")


def test_later_merges_stay_valid_after_an_earlier_unmerge(
    identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    first = identity.resolve([item(("EMAIL", "a1@example.com"))])[0].person_id
    clock.advance()
    second = identity.resolve([item(("EMAIL", "a2@example.com"))])[0].person_id
    clock.advance()
    third = identity.resolve([item(("EMAIL", "a3@example.com"))])[0].person_id
    early = identity.merge([first, second], "op", "one")
    identity.merge([first, third], "op", "two")
    identity.unmerge(early.merge_id, "op", "undo one")
    assert person_of(identity, item, ("EMAIL", "a2@example.com")) == second
    assert person_of(identity, item, ("EMAIL", "a3@example.com")) == first


def test_limit_refuses_the_lower_priority_identifier_and_keeps_the_allowed_merge(
    identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    p1 = identity.resolve([item(("CRM_ID", "C-1"), ("EMAIL", "x@example.com"))])[0].person_id
    clock.advance()
    p2 = identity.resolve([item(("CRM_ID", "C-2"), ("PHONE", "+447911000001"))])[0].person_id
    clock.advance()
    p3 = identity.resolve([item(("COOKIE_ID", "c-3"))])[0].person_id
    # C-1's person may not absorb C-2's (one CRM id per person); the cookie person may join.
    [result] = identity.resolve(
        [item(("CRM_ID", "C-1"), ("PHONE", "+447911000001"), ("COOKIE_ID", "c-3"))]
    )
    statuses = [o.status for o in result.identifiers]
    assert result.person_id == p1
    assert statuses == [
        L.LINK_STATUS_ALREADY_KNOWN,
        L.LINK_STATUS_REJECTED_LIMIT,
        L.LINK_STATUS_ALREADY_KNOWN,
    ]
    assert "CRM_ID" in result.identifiers[1].detail
    assert result.merged_person_ids == [p3]
    assert person_of(identity, item, ("PHONE", "+447911000001")) == p2
    kinds = [entry.kind for entry in identity.history(p1, 50, None)]
    assert L.HISTORY_KIND_REFUSAL in kinds and L.HISTORY_KIND_MERGE in kinds


def test_limit_per_source(identity: IdentityService, item: ItemMaker) -> None:
    identity.put_rules(
        MergeRules(limits=(TypeLimit(T.IDENTIFIER_TYPE_DEVICE_ID, 1, source="pos"),)), "admin"
    )
    [first] = identity.resolve(
        [item(("EMAIL", "d@example.com"), ("DEVICE_ID", "till-1"), source="pos")]
    )
    [second] = identity.resolve(
        [item(("EMAIL", "d@example.com"), ("DEVICE_ID", "till-2"), source="pos")]
    )
    assert second.identifiers[1].status == L.LINK_STATUS_REJECTED_LIMIT
    [web] = identity.resolve(
        [item(("EMAIL", "d@example.com"), ("DEVICE_ID", "laptop"), source="web")]
    )
    assert web.identifiers[1].status == L.LINK_STATUS_LINKED
    assert web.person_id == first.person_id


def test_blocklisted_values_never_link(identity: IdentityService, item: ItemMaker) -> None:
    identity.put_rules(
        MergeRules(blocked_values=frozenset({"shop-shared"}), blocked_patterns=(r"guest-\d+",)),
        "admin",
    )
    [result] = identity.resolve(
        [
            item(
                ("EMAIL", "test@test.com"),
                ("DEVICE_ID", "00000000"),
                ("COOKIE_ID", "guest-17"),
                ("CRM_ID", "shop-shared"),
            )
        ]
    )
    assert [o.status for o in result.identifiers] == [L.LINK_STATUS_BLOCKED] * 4
    assert result.person_id == ""


def test_hub_identifier_is_quarantined_and_its_merges_undone(
    identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    identity.put_rules(MergeRules(limits=(), hub_threshold=5), "admin")
    persons = []
    for n in range(8):
        clock.advance()
        [result] = identity.resolve(
            [item(("DEVICE_ID", "family-tablet"), ("EMAIL", f"member{n}@example.com"))]
        )
        persons.append(result.person_id)
    owners = {person_of(identity, item, ("EMAIL", f"member{n}@example.com")) for n in range(8)}
    assert len(owners) == 8, "every family member is a person of their own again"
    last = identity.resolve([item(("DEVICE_ID", "family-tablet"))])[0]
    assert last.identifiers[0].status == L.LINK_STATUS_QUARANTINED and last.person_id == ""
    history = identity.history(persons[0], 100, None)
    assert any(entry.kind == L.HISTORY_KIND_QUARANTINE for entry in history)
    assert any(
        entry.kind == L.HISTORY_KIND_UNMERGE and entry.actor == "quarantine" for entry in history
    )


def test_key_rotation_relinks_old_digests(identity: IdentityService, item: ItemMaker) -> None:
    before = identity.resolve([item(("EMAIL", "rot@example.com"))])[0]
    old_digest = before.identifiers[0].hashed_value
    rotated = IdentityService(identity.store, identity.keyring.with_new_hmac_key(), identity.clock)
    [result] = rotated.resolve([make_item(rotated, ("EMAIL", "rot@example.com"))])
    assert result.person_id == before.person_id and not result.created
    assert result.identifiers[0].hashed_value.startswith("h2:")
    [linked] = rotated.person(before.person_id).identifiers
    assert linked.hashed_value == result.identifiers[0].hashed_value != old_digest
    assert old_digest.startswith("h1:")


def test_forget_deletes_every_identifier_of_the_person_and_aliases(
    engine: Engine, identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    a = identity.resolve([item(("EMAIL", "f1@example.com"), ("COOKIE_ID", "fc"))])[0].person_id
    clock.advance()
    b = identity.resolve([item(("EMAIL", "f2@example.com"))])[0].person_id
    identity.merge([a, b], "op", "same")
    result = identity.forget(b, "erasure")
    assert (
        result.person_id == a and result.alias_person_ids == [b] and result.identifiers_deleted == 3
    )
    assert person_of(identity, item, ("EMAIL", "f1@example.com")) == ""
    with pytest.raises(NotFound):
        identity.person(a)
    with engine.connect() as connection:
        for table in ("persons", "identifiers", "identifier_sources", "history", "merges"):
            assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0, table


@pytest.mark.parametrize("workers", [4])
def test_concurrent_resolves_lose_no_merge_and_never_duplicate(
    identity: IdentityService, workers: int
) -> None:
    def chain(n: int) -> ItemInput:
        return make_item(identity, ("COOKIE_ID", f"link-{n}"), ("COOKIE_ID", f"link-{n + 1}"))

    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for n in range(20):
                # Every worker links the same chain of shared identifiers, in its own order.
                identity.resolve([chain((n + offset) % 20)])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k * 5,)) for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    people = {identity.lookup([chain(n).identifiers[0].candidates])[0][0] for n in range(21)}
    assert len(people) == 1, "one chain of shared identifiers is one person"
    [person] = people
    assert len(identity.person(person).identifiers) == 21, "no identifier was linked twice"


def test_identifiers_linked_earlier_in_the_same_batch_are_not_mistaken_for_hubs(
    identity: IdentityService, item: ItemMaker
) -> None:
    pairs = [(("CUSTOM", f"a{n}", "ssn"), ("CUSTOM", f"b{n}", "name_dob")) for n in range(6)]
    batch = (
        [item(a) for a, _ in pairs] + [item(b) for _, b in pairs] + [item(a, b) for a, b in pairs]
    )
    results = identity.resolve(batch)
    assert not [o for r in results for o in r.identifiers if o.status == L.LINK_STATUS_QUARANTINED]
    for a, b in pairs:
        assert person_of(identity, item, a) == person_of(identity, item, b)


def test_undoing_a_hub_merge_takes_along_what_joined_through_the_absorbed_person(
    identity: IdentityService, item: ItemMaker, clock: Clock
) -> None:
    identity.put_rules(MergeRules(limits=(), hub_threshold=5), "admin")
    alice = ("CUSTOM", "alice", "ssn")
    bob = ("CUSTOM", "bob", "ssn")
    bobs_other_record = ("CUSTOM", "bob-w", "name_dob")
    tablet = ("DEVICE_ID", "shared-tablet")
    for spec in [(alice, tablet), (bob, tablet), (bobs_other_record,), (bob, bobs_other_record)]:
        clock.advance()
        identity.resolve([item(*spec)])
    assert person_of(identity, item, bobs_other_record) == person_of(identity, item, alice)
    for n in range(6):
        clock.advance()
        identity.resolve([item(("CUSTOM", f"stranger{n}", "ssn"), tablet)])
    assert person_of(identity, item, bobs_other_record) == person_of(identity, item, bob)
    assert person_of(identity, item, bob) != person_of(identity, item, alice)
