from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, select, text
from sqlalchemy.engine import Engine
from sqlmodel.sql.sqltypes import AutoString

from services.common.migrations import (
    current_revision,
    head_revision,
    revision,
    service_metadata,
    upgrade,
    version_table,
    versions_directory,
)


def write_migration(
    versions: Path, rev: str, down: str | None, body: str, downgrade: str = "pass"
) -> None:
    """A hand-written revision script, as a service would commit it."""
    versions.mkdir(parents=True, exist_ok=True)
    script = dedent(
        """\
        import sqlalchemy as sa
        from alembic import op

        revision = {rev!r}
        down_revision = {down!r}
        branch_labels = None
        depends_on = None


        def upgrade() -> None:
            {body}


        def downgrade() -> None:
            {downgrade}
        """
    ).format(rev=rev, down=down, body=body, downgrade=downgrade)
    (versions / f"{rev}.py").write_text(script)


def create_widget_table(versions: Path, table: str) -> None:
    write_migration(
        versions,
        "0001",
        None,
        f"op.create_table({table!r}, sa.Column('id', sa.Integer, primary_key=True), "
        "sa.Column('name', sa.String(50), nullable=False))",
    )


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_upgrade_creates_the_tables_and_records_the_revision_per_service(
    engine: Engine, tmp_path: Path
) -> None:
    versions = tmp_path / "widgets" / "versions"
    create_widget_table(versions, "widgets_widget")
    assert current_revision(engine, "widgets") is None

    upgrade(engine, "widgets", versions_dir=versions)

    assert {"widgets_widget", "alembic_version_widgets"} <= table_names(engine)
    assert "alembic_version" not in table_names(engine)
    assert current_revision(engine, "widgets") == "0001"
    assert head_revision("widgets", versions_dir=versions) == "0001"


def test_upgrade_again_changes_nothing(engine: Engine, tmp_path: Path) -> None:
    versions = tmp_path / "widgets" / "versions"
    create_widget_table(versions, "widgets_widget")
    upgrade(engine, "widgets", versions_dir=versions)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO widgets_widget (id, name) VALUES (1, 'kept')"))

    upgrade(engine, "widgets", versions_dir=versions)

    assert current_revision(engine, "widgets") == "0001"
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM widgets_widget")).scalars().all() == [
            "kept"
        ]


def test_services_sharing_a_database_keep_separate_histories(
    engine: Engine, tmp_path: Path
) -> None:
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    create_widget_table(alpha, "alpha_widget")
    create_widget_table(beta, "beta_widget")
    upgrade(engine, "alpha", versions_dir=alpha)
    upgrade(engine, "beta", versions_dir=beta)

    write_migration(
        alpha,
        "0002",
        "0001",
        "op.add_column('alpha_widget', sa.Column('colour', sa.String(20)))",
    )
    upgrade(engine, "alpha", versions_dir=alpha)

    assert current_revision(engine, "alpha") == "0002"
    assert current_revision(engine, "beta") == "0001"
    with engine.connect() as connection:
        for service, expected in (("alpha", "0002"), ("beta", "0001")):
            rows = connection.execute(
                text(f"SELECT version_num FROM {version_table(service)}")
            ).all()
            assert rows == [(expected,)]
    assert "colour" in {column["name"] for column in inspect(engine).get_columns("alpha_widget")}


def test_failing_migration_leaves_schema_and_revision_untouched(
    engine: Engine, tmp_path: Path
) -> None:
    versions = tmp_path / "widgets"
    create_widget_table(versions, "widgets_widget")
    upgrade(engine, "widgets", versions_dir=versions)
    write_migration(
        versions,
        "0002",
        "0001",
        "op.create_table('widgets_half_done', sa.Column('id', sa.Integer, primary_key=True))\n"
        "    raise RuntimeError('migration bug')",
    )

    with pytest.raises(RuntimeError, match="migration bug"):
        upgrade(engine, "widgets", versions_dir=versions)

    assert "widgets_half_done" not in table_names(engine)
    assert current_revision(engine, "widgets") == "0001"


def test_upgrade_accepts_a_url(db_url: str, engine: Engine, tmp_path: Path) -> None:
    versions = tmp_path / "widgets"
    create_widget_table(versions, "widgets_widget")

    upgrade(db_url, "widgets", versions_dir=versions)

    assert current_revision(engine, "widgets") == "0001"


REPLICA = """
import sys, time
from pathlib import Path
from services.common.migrations import upgrade

url, versions, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
upgrade(url, "widgets", versions_dir=versions)
"""


def test_replicas_upgrading_at_once_apply_each_revision_once(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    versions = tmp_path / "widgets"
    create_widget_table(versions, "widgets_widget")
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, db_url, str(versions), str(flag), str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
            time.sleep(0.005)
        go.touch()
        outcomes = [(replica.wait(timeout=30), replica.communicate()[1]) for replica in replicas]
    finally:
        for replica in replicas:
            replica.kill()

    assert [returncode for returncode, _stderr in outcomes] == [0, 0], outcomes
    with engine.connect() as connection:
        recorded = connection.execute(text("SELECT version_num FROM alembic_version_widgets")).all()
    assert recorded == [("0001",)]


def test_threads_upgrading_at_once_do_not_share_alembic_state(
    engine: Engine, tmp_path: Path
) -> None:
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    create_widget_table(alpha, "alpha_widget")
    create_widget_table(beta, "beta_widget")
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def migrate(service: str, versions: Path) -> None:
        start.wait()
        try:
            upgrade(engine, service, versions_dir=versions)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=migrate, args=args)
        for args in [("alpha", alpha), ("beta", beta)] * 2
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert current_revision(engine, "alpha") == current_revision(engine, "beta") == "0001"
    assert {"alpha_widget", "beta_widget"} <= table_names(engine)


def test_autogenerated_revision_adds_new_tables_and_spares_other_services(
    engine: Engine, tmp_path: Path
) -> None:
    versions = tmp_path / "widgets"
    create_widget_table(versions, "widgets_widget")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE other_service_table (id INTEGER PRIMARY KEY)"))
    metadata = MetaData()
    Table(
        "widgets_widget",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
    )
    gadgets = Table(
        "widgets_gadget",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("label", AutoString(40), nullable=False),
    )

    script = revision(engine, "widgets", "add gadgets", metadata=metadata, versions_dir=versions)
    upgrade(engine, "widgets", versions_dir=versions)

    source = script.read_text()
    upgrade_source = source[source.index("def upgrade") : source.index("def downgrade")]
    assert "op.create_table" in upgrade_source
    assert "widgets_gadget" in upgrade_source
    assert "widgets_widget" not in source
    assert "other_service_table" not in source
    assert "import sqlmodel" in source
    compile(source, str(script), "exec")
    assert {"widgets_gadget", "other_service_table"} <= table_names(engine)
    assert current_revision(engine, "widgets") == head_revision("widgets", versions_dir=versions)
    with engine.begin() as connection:
        connection.execute(gadgets.insert().values(id=1, label="a"))
        assert connection.execute(select(gadgets.c.label)).scalar_one() == "a"


def test_missing_versions_directory_is_an_error_not_a_silent_no_op(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="widgets"):
        upgrade(f"sqlite:///{tmp_path / 'db.sqlite'}", "widgets", versions_dir=tmp_path / "none")


@pytest.mark.parametrize("name", ["", "Consent", "consent-v1", "../etc", "1consent", "consent\n"])
def test_service_names_must_be_snake_case(name: str) -> None:
    with pytest.raises(ValueError, match="lower_snake_case"):
        versions_directory(name)


def test_each_service_keeps_its_revisions_in_its_own_package() -> None:
    directory = versions_directory("consent")

    assert directory.parts[-4:] == ("services", "consent", "migrations", "versions")
    assert version_table("consent") == "alembic_version_consent"


def _table_of(difference: Any) -> str | None:
    """The table an alembic autogenerate difference is about."""
    if isinstance(difference, list):  # column modifications come grouped
        return _table_of(difference[0])
    kind, *rest = difference
    target = rest[0]
    if kind.endswith("_table"):
        return str(target.name)
    if kind.endswith("_index") or kind.endswith("_constraint"):
        return str(target.table.name)
    return str(rest[1])  # ("add_column", schema, table, column), ("modify_type", schema, table…)


@pytest.mark.parametrize("service", ["consent", "identity", "tagging", "recommend"])
def test_the_migrations_build_exactly_the_tables_the_service_declares(
    engine: Engine, service: str
) -> None:
    upgrade(engine, service)
    declared = service_metadata(service)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, declared)
    assert [d for d in differences if _table_of(d) in declared.tables] == []
