"""Which persons identity has merged, as consent keeps it, so decisions follow the person.

Identity publishes PersonsMerged, PersonUnmerged and PersonForgotten on its event log; consent's
consumer applies them here, in the consumer's transaction, to ``consent_person_links``: one row
per absorbed person naming the person it was merged into (its parent) and the person its group
resolves to now (its root). A person's consent is then decided by the decisions of every member
of its group, the newest first, as one person's would be (``decisions.effective_state``): a
shopper who granted on the web and later logged in at the till, where identity joined the two,
keeps their grant. Undoing merge M removes the link M made; everyone whose chain of parents
runs through the restored person follows it back, and later merges into the survivor stay.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import Connection
from steward.events.v1 import events_pb2

from services.consent.store import links_table, members_of

_MAX_CHAIN: Final = 10_000
"""A chain of parents longer than this is a cycle: identity never publishes one."""


def apply_identity_envelope(connection: Connection, envelope: events_pb2.Envelope) -> set[str]:
    """Apply one of identity's envelopes; returns the persons whose group changed."""
    body = envelope.WhichOneof("body")
    if body == "persons_merged":
        merged = envelope.persons_merged
        return merge(
            connection,
            merged.merge_id,
            merged.surviving_person_id,
            list(merged.absorbed_person_ids),
        )
    if body == "person_unmerged":
        split = envelope.person_unmerged
        return unmerge(connection, split.merge_id, split.restored_person_id)
    if body == "person_forgotten":
        forgotten = envelope.person_forgotten
        return forget(connection, [forgotten.person_id, *forgotten.alias_person_ids])
    return set()


# Maintenance -----------------------------------------------------------------------------------


def root_of(connection: Connection, person: str) -> str:
    root = connection.execute(
        select(links_table.c.root_id).where(links_table.c.person_id == person)
    ).scalar_one_or_none()
    return root or person


def merge(
    connection: Connection, merge_id: str, survivor: str, absorbed: Sequence[str]
) -> set[str]:
    root = root_of(connection, survivor)
    changed = {root}
    for person in absorbed:
        if person in (survivor, root) or root_of(connection, person) == root:
            continue  # already one group: nothing to fold
        old_root = root_of(connection, person)
        changed.update(members_of(connection, old_root))
        # The absorbed person's own group follows it to the new root...
        connection.execute(
            update(links_table).where(links_table.c.root_id == old_root).values(root_id=root)
        )
        # ...and it hangs from the survivor by this merge (replacing no link: it was a root,
        # or identity merged an alias, which then leaves its old parent).
        connection.execute(delete(links_table).where(links_table.c.person_id == person))
        connection.execute(
            links_table.insert().values(
                person_id=person, parent_id=survivor, root_id=root, merge_id=merge_id
            )
        )
    return changed


def unmerge(connection: Connection, merge_id: str, restored: str) -> set[str]:
    link = connection.execute(
        select(links_table.c.person_id).where(
            links_table.c.person_id == restored, links_table.c.merge_id == merge_id
        )
    ).scalar_one_or_none()
    if link is None:
        return set()  # the merge never reached consent's links, or was undone already
    old_root = root_of(connection, restored)
    connection.execute(delete(links_table).where(links_table.c.person_id == restored))
    parents: dict[str, str] = dict(
        connection.execute(
            select(links_table.c.person_id, links_table.c.parent_id).where(
                links_table.c.root_id == old_root
            )
        ).all()
    )
    changed = {old_root, restored, *parents}
    for person in parents:
        root = _walk(person, parents)
        if root != old_root:
            connection.execute(
                update(links_table).where(links_table.c.person_id == person).values(root_id=root)
            )
    return changed


def forget(connection: Connection, persons: Iterable[str]) -> set[str]:
    doomed = set(persons)
    if not doomed:
        return set()
    roots = {root_of(connection, person) for person in doomed}
    changed = doomed | {member for root in roots for member in members_of(connection, root)}
    connection.execute(
        delete(links_table).where(
            or_(links_table.c.person_id.in_(doomed), links_table.c.root_id.in_(doomed))
        )
    )
    return changed


def _walk(person: str, parents: dict[str, str]) -> str:
    for _ in range(_MAX_CHAIN):
        parent = parents.get(person)
        if parent is None:
            return person
        person = parent
    raise ValueError("consent_person_links holds a cycle")
