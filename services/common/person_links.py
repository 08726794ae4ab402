"""Which persons identity has merged, as a consumer of identity's log keeps it.

Identity publishes PersonsMerged, PersonUnmerged and PersonForgotten on its event log. A service
that keeps data per person applies them, in its consumer's transaction, to a ``person_links``
table of its own (:func:`person_links_table`): one row per absorbed person, naming the person it
was merged into (its parent, by which merge) and the person its group resolves to now (its
root). Undoing merge M removes the link M made: everyone whose chain of parents runs through the
restored person follows it back, and merges made into the survivor later stay. So a service can
answer, at any time, who belongs to a person's group (consent decides with every member's
decisions) and whose data an unmerge hands back (tagging's events, recommend's interactions,
wherever later merges moved them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    Column,
    CompoundSelect,
    Index,
    MetaData,
    String,
    Table,
    and_,
    delete,
    func,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from steward.events.v1 import events_pb2

_MAX_CHAIN: Final = 10_000
"""A chain of parents longer than this is a cycle: identity never publishes one."""


def person_links_table(metadata: MetaData, *, prefix: str) -> Table:
    """Add ``<prefix>person_links`` to a service's ``metadata`` (and so to its migrations)."""
    name = f"{prefix}person_links"
    return Table(
        name,
        metadata,
        Column("person_id", String(40), primary_key=True),
        Column("parent_id", String(40), nullable=False),
        Column("root_id", String(40), nullable=False),
        Column("merge_id", String(40), nullable=False),
        Index(f"ix_{name}_root_id", "root_id"),
    )


@dataclass(frozen=True, slots=True)
class Change:
    """What one of identity's envelopes changed."""

    changed: frozenset[str]
    """Persons whose group changed."""
    handed_back: tuple[str, ...] = ()
    """After an unmerge: the restored person and everyone who resolves to it again, whose data
    goes back to it."""


class PersonLinks:
    """The queries on one service's ``person_links`` table."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._group = text(
            "SELECT r.root, l.person_id FROM"
            f" (SELECT coalesce((SELECT root_id FROM {table.name} WHERE person_id = :person),"
            " :person) AS root) r"
            f" LEFT OUTER JOIN {table.name} l ON l.root_id = r.root"
        )

    # Reading ---------------------------------------------------------------------------------

    def group(self, connection: Connection, person: str) -> list[str]:
        """Every person merged with ``person`` (itself included), the group's root first."""
        rows = connection.execute(self._group, {"person": person}).all()
        return [rows[0][0], *sorted(member for _, member in rows if member is not None)]

    def group_members(self, person: ColumnElement[Any]) -> CompoundSelect[tuple[str]]:
        """A subquery of every member of ``person``'s group (a bound parameter or column), for
        ``column.in_(...)``: one statement reads a whole group's rows."""
        links = self.table
        root = select(
            func.coalesce(
                select(links.c.root_id).where(links.c.person_id == person).scalar_subquery(),
                person,
            )
        ).scalar_subquery()
        return union_all(
            select(root.label("person_id")),
            select(links.c.person_id).where(links.c.root_id == root),
        )

    def groups(self, connection: Connection, persons: Iterable[str]) -> dict[str, list[str]]:
        """``group`` of each of ``persons`` merged with anyone; the others are left out."""
        links = self.table
        wanted = sorted(set(persons))
        if not wanted:
            return {}
        roots: dict[str, str] = dict(
            connection.execute(
                select(links.c.person_id, links.c.root_id).where(links.c.person_id.in_(wanted))
            ).all()
        )
        root_of_each = {person: roots.get(person, person) for person in wanted}
        members: dict[str, list[str]] = {}
        for member, root in connection.execute(
            select(links.c.person_id, links.c.root_id).where(
                links.c.root_id.in_(sorted(set(root_of_each.values())))
            )
        ):
            members.setdefault(root, []).append(member)
        return {
            person: [root, *sorted(members[root])]
            for person, root in root_of_each.items()
            if root in members
        }

    def root_of(self, connection: Connection, person: str) -> str:
        links = self.table
        root = connection.execute(
            select(links.c.root_id).where(links.c.person_id == person)
        ).scalar_one_or_none()
        return root or person

    def members_of(self, connection: Connection, root: str) -> list[str]:
        """Every person of the group whose root is ``root``, the root first."""
        links = self.table
        rows = connection.execute(
            select(links.c.person_id).where(links.c.root_id == root).order_by(links.c.person_id)
        ).scalars()
        return [root, *rows]

    # Maintenance -----------------------------------------------------------------------------

    def apply(self, connection: Connection, envelope: events_pb2.Envelope) -> Change:
        """Apply one of identity's envelopes (others change nothing)."""
        body = envelope.WhichOneof("body")
        if body == "persons_merged":
            merged = envelope.persons_merged
            return self.merge(
                connection,
                merged.merge_id,
                merged.surviving_person_id,
                list(merged.absorbed_person_ids),
            )
        if body == "person_unmerged":
            split = envelope.person_unmerged
            return self.unmerge(connection, split.merge_id, split.restored_person_id)
        if body == "person_forgotten":
            forgotten = envelope.person_forgotten
            return self.forget(connection, [forgotten.person_id, *forgotten.alias_person_ids])
        return Change(frozenset())

    def merge(
        self, connection: Connection, merge_id: str, survivor: str, absorbed: Sequence[str]
    ) -> Change:
        links = self.table
        root = self.root_of(connection, survivor)
        changed = {root}
        for person in absorbed:
            old_root = self.root_of(connection, person)
            if person in (survivor, root) or old_root == root:
                continue  # already one group: nothing to fold
            changed.update(self.members_of(connection, old_root))
            # The absorbed person's own group follows it to the new root...
            connection.execute(
                update(links).where(links.c.root_id == old_root).values(root_id=root)
            )
            # ...and it hangs from the survivor by this merge (an alias leaves its old parent).
            connection.execute(delete(links).where(links.c.person_id == person))
            connection.execute(
                links.insert().values(
                    person_id=person, parent_id=survivor, root_id=root, merge_id=merge_id
                )
            )
        return Change(frozenset(changed))

    def unmerge(self, connection: Connection, merge_id: str, restored: str) -> Change:
        links = self.table
        link = connection.execute(
            select(links.c.person_id).where(
                links.c.person_id == restored, links.c.merge_id == merge_id
            )
        ).scalar_one_or_none()
        if link is None:
            return Change(frozenset())  # never seen here, or undone already
        old_root = self.root_of(connection, restored)
        connection.execute(delete(links).where(links.c.person_id == restored))
        parents: dict[str, str] = dict(
            connection.execute(
                select(links.c.person_id, links.c.parent_id).where(links.c.root_id == old_root)
            ).all()
        )
        back = [restored]
        for person in parents:
            root = _walk(person, parents)
            if root != old_root:
                back.append(person)
                connection.execute(
                    update(links).where(links.c.person_id == person).values(root_id=root)
                )
        return Change(frozenset({old_root, restored, *parents}), tuple(back))

    def forget(self, connection: Connection, persons: Iterable[str]) -> Change:
        links = self.table
        doomed = set(persons)
        if not doomed:
            return Change(frozenset())
        roots = {self.root_of(connection, person) for person in doomed}
        changed = doomed | {m for root in roots for m in self.members_of(connection, root)}
        connection.execute(
            delete(links).where(or_(links.c.person_id.in_(doomed), links.c.root_id.in_(doomed)))
        )
        return Change(frozenset(changed))


def handed_back(
    change: Change,
    split: events_pb2.PersonUnmerged,
    origin: ColumnElement[str],
    holder: ColumnElement[str],
) -> ColumnElement[bool]:
    """The rows an unmerge gives back to the restored person, for a table whose ``origin``
    column names the person a row was collected for and ``holder`` the person holding it now:
    those of the restored person and of the persons merged into it before, wherever later merges
    moved them; for a merge older than the links table, the restored person's own rows that the
    survivor holds."""
    if change.handed_back:
        return origin.in_(change.handed_back)
    return and_(origin == split.restored_person_id, holder == split.surviving_person_id)


def _walk(person: str, parents: dict[str, str]) -> str:
    for _ in range(_MAX_CHAIN):
        parent = parents.get(person)
        if parent is None:
            return person
        person = parent
    raise ValueError("person_links holds a cycle")
