"""Resolve throughput of the identity service over gRPC, with a warm graph.

Target (identity issue, DESIGN.md): Resolve in batches of 500 at >= 20,000 identifier sets/s on
SQLite and >= 8,000/s on PostgreSQL, with 1,000,000 identifiers in the graph, on the 2-core
machine with client and server on it.

The identity service runs in its own process (``steward serve --service identity``) on a fresh
SQLite file in a temporary directory, or on a fresh PostgreSQL database that this script creates
and drops. The graph is first warmed to ``--identifiers`` identifiers, through Resolve itself by
default (``--warm direct`` inserts the rows with the store's tables instead, and says so), as if
seen over the last 90 days; on PostgreSQL it is then ANALYZEd, as autovacuum would (it is off on
this machine, and the planner picks sequential scans without statistics). Then ``--clients``
threads send a shop's mix of identifier sets for ``--seconds``, requests built beforehand:

- 70% have at least one known identifier: a returning web shopper (email + cookie), a login on a
  new browser (known email + new cookie), an app user (cookie + device), an app on a new device,
  a customer at the till (phone + loyalty card), a till customer giving an email that belongs to
  another person (a merge), an anonymous cookie logging in with a new email (a merge);
- 30% are all new: email + cookie, cookie + device, phone + loyalty card.

About 7% of the items merge (a new device with a known cookie is one too: a device outranks a
cookie). Printed: identifier sets/s and its ratio to the target, p50/p99 batch latency, the
server's resident set (VmRSS; VmHWM is the peak), the server's CPU use and CPU time per 1,000
sets (steadier than throughput when other work shares the machine), and the warm-up time.
Then ``--driver-batches`` more batches go through the servicer inside this script, one at a
time and without gRPC, with every call into the database driver (execute, fetch, commit) timed:
the database's own share of Resolve, and the rate a single writer could not exceed even if
Python cost nothing around the statements. Figures only.

Run from the repository root::

    .venv/bin/python bench/resolve.py --backend sqlite
    .venv/bin/python bench/resolve.py --backend postgres \\
        --postgres-url postgresql://postgres@127.0.0.1:5432/postgres

``STEWARD_BENCH_PY_SPY=out.svg`` (or ``out.txt`` for collapsed stacks) records the server with
py-spy into ``out-measure.svg`` while measuring, if py-spy is installed in the environment
(``pip install py-spy``); ``STEWARD_BENCH_PY_SPY_ARGS`` adds py-spy options.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import grpc
from harness import (
    Server,
    Spec,
    analyze,
    cookie,
    device,
    email,
    loyalty,
    percentile,
    phone,
    postgres_database,
    py_spy_from_env,
    run_threads,
    steward_server,
)
from steward.common.v1 import common_pb2
from steward.identity.v1 import identity_pb2

TARGETS: Final = {"sqlite": 20_000.0, "postgres": 8_000.0}
RESOLVE_METHOD: Final = "/steward.identity.v1.IdentityService/Resolve"
T = common_pb2
L = identity_pb2


# The shop's identifiers ---------------------------------------------------------------------
#
# Warm person k has a shape k % 3: 0 a web shopper (email + cookie, every other one a device
# too), 1 an app user (cookie + device), 2 a till customer (phone + loyalty card). Values derive
# from k, so the mix can name known identifiers without asking the server.

SHAPE_SOURCES: Final = ("web", "app", "pos")


def warm_person(k: int) -> tuple[str, list[Spec]]:
    """(source, identifiers) of warm person ``k``."""
    shape = k % 3
    tag = str(k)
    if shape == 0:
        specs = [email(tag), cookie(tag)]
        if k % 2 == 0:
            specs.append(device(tag))
    elif shape == 1:
        specs = [cookie(tag), device(tag)]
    else:
        specs = [phone(k), loyalty(tag)]
    return SHAPE_SOURCES[shape], specs


def warm_persons_for(identifiers: int) -> int:
    """How many warm persons hold at least ``identifiers`` identifiers."""
    # Per 6 persons: 3 + 2 (shape 0), 2 + 2 (shape 1), 2 + 2 (shape 2) = 13 identifiers.
    persons = identifiers * 6 // 13
    while sum(len(warm_person(k)[1]) for k in range(persons)) < identifiers:
        persons += 1
    return persons


class ShopMix:
    """Random items of the measured mix; new identifiers are unique to this run."""

    def __init__(self, persons: int, seed: int) -> None:
        self.persons = persons
        self.rng = random.Random(seed)
        self.fresh = 0
        self.phones = 50_000_000 + seed % 1_000_000 * 40
        self.kinds: list[tuple[float, str, Callable[[], tuple[str, list[Spec]]]]] = []
        cumulative = 0.0
        for weight, name, make in (
            (0.25, "returning web shopper", self._returning_web),
            (0.15, "login on a new browser", self._new_browser),
            (0.10, "app user", self._app_user),
            (0.03, "app on a new device (a merge: a device outranks a cookie)", self._new_device),
            (0.13, "till customer", self._till_customer),
            (0.02, "till customer gives another's email (merge)", self._cross_channel),
            (0.02, "anonymous cookie logs in, new email (merge)", self._anonymous_login),
            (0.12, "new: email + cookie", self._new_web),
            (0.10, "new: cookie + device", self._new_app),
            (0.08, "new: phone + loyalty card", self._new_till),
        ):
            cumulative += weight
            self.kinds.append((cumulative, name, make))

    def _known(self, shape: int) -> int:
        return 3 * self.rng.randrange((self.persons - shape + 2) // 3) + shape

    def _tag(self) -> str:
        self.fresh += 1
        return f"n{self.fresh}-{self.rng.getrandbits(40):x}"

    def _phone(self) -> int:
        self.phones += 1
        return self.phones

    def _returning_web(self) -> tuple[str, list[Spec]]:
        tag = str(self._known(0))
        return "web", [email(tag), cookie(tag)]

    def _new_browser(self) -> tuple[str, list[Spec]]:
        return "web", [email(str(self._known(0))), cookie(self._tag())]

    def _app_user(self) -> tuple[str, list[Spec]]:
        tag = str(self._known(1))
        return "app", [cookie(tag), device(tag)]

    def _new_device(self) -> tuple[str, list[Spec]]:
        return "app", [cookie(str(self._known(1))), device(self._tag())]

    def _till_customer(self) -> tuple[str, list[Spec]]:
        k = self._known(2)
        return "pos", [phone(k), loyalty(str(k))]

    def _cross_channel(self) -> tuple[str, list[Spec]]:
        k = self._known(2)
        return "pos", [phone(k), loyalty(str(k)), email(str(self._known(0)))]

    def _anonymous_login(self) -> tuple[str, list[Spec]]:
        return "app", [cookie(str(self._known(1))), email(self._tag())]

    def _new_web(self) -> tuple[str, list[Spec]]:
        tag = self._tag()
        return "web", [email(tag), cookie(tag)]

    def _new_app(self) -> tuple[str, list[Spec]]:
        tag = self._tag()
        return "app", [cookie(tag), device(tag)]

    def _new_till(self) -> tuple[str, list[Spec]]:
        return "pos", [phone(self._phone()), loyalty(self._tag())]

    def item(self) -> tuple[str, list[Spec]]:
        draw = self.rng.random()
        for cumulative, _, make in self.kinds:
            if draw < cumulative:
                return make()
        return self.kinds[-1][2]()


def resolve_request(
    items: list[tuple[str, list[Spec]]], seen_at: list[datetime] | None = None
) -> bytes:
    request = identity_pb2.ResolveRequest()
    for position, (source, specs) in enumerate(items):
        item = request.items.add(source=source)
        for type_, value in specs:
            item.identifiers.add(type=type_, value=value)  # type: ignore[arg-type]
        if seen_at is not None:
            item.seen_at.FromDatetime(seen_at[position])
    return request.SerializeToString()


def warm_seen_at(k: int, now: datetime) -> datetime:
    """When warm person ``k`` was last seen: spread over the 90 days before the run."""
    return now - timedelta(seconds=(k * 7919) % (90 * 86400))


# The server process -------------------------------------------------------------------------


@contextmanager
def identity_server(data_dir: Path, db_url: str) -> Iterator[Server]:
    """``steward serve --service identity`` on a free port, on ``db_url``."""
    env = {"STEWARD_IDENTITY_DB_URL": db_url, "STEWARD_MAX_BATCH": "1000"}
    with steward_server(
        ["identity"], data_dir, env, health_service="steward.identity.v1.IdentityService"
    ) as server:
        yield server


# Warming ------------------------------------------------------------------------------------


def warm_through_resolve(target: str, persons: int, batch: int, clients: int) -> None:
    """Resolve every warm person's identifiers, ``clients`` batches in flight."""
    starts = iter(range(0, persons, batch))
    now = datetime.now(UTC)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def send() -> None:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(RESOLVE_METHOD, None, None)
            while not errors:
                with lock:
                    start = next(starts, None)
                if start is None:
                    return
                people = range(start, min(start + batch, persons))
                request = resolve_request(
                    [warm_person(k) for k in people], [warm_seen_at(k, now) for k in people]
                )
                try:
                    call(request, timeout=600)
                except grpc.RpcError as error:
                    errors.append(error)

    run_threads(lambda _index: send(), clients)
    if errors:
        raise SystemExit(f"warming failed: {errors[0]}")


def warm_directly(db_url: str, keyring_json: str, persons: int) -> None:
    """Insert the warm persons' rows with the store's tables, skipping Resolve."""
    from sqlalchemy import insert

    from services.common.db import make_engine
    from services.common.identifiers import hash_message, normalise
    from services.common.keyring import Keyring
    from services.common.migrations import upgrade
    from services.identity import store
    from services.identity.graph import new_person_id

    keyring = Keyring.from_json(keyring_json)
    engine = make_engine(db_url)
    upgrade(engine, "identity")
    now = datetime.now(UTC)
    next_id = next_key = 1
    try:
        for start in range(0, persons, 10_000):
            person_rows, identifier_rows, source_rows = [], [], []
            for k in range(start, min(start + 10_000, persons)):
                source, specs = warm_person(k)
                person, key = new_person_id(), next_key
                next_key += 1
                seen_at = warm_seen_at(k, now)
                person_rows.append(
                    {"key": key, "person_id": person, "root_key": key, "alias_of": None}
                    | {"merged_by": None, "created_at": seen_at}
                )
                for type_, value in specs:
                    digest = keyring.pseudonymise(hash_message(type_, "", normalise(type_, value)))  # type: ignore[arg-type]
                    identifier_rows.append(
                        {
                            "id": next_id,
                            "digest": digest,
                            "type": type_,
                            "namespace": "",
                            "person_key": key,
                            "quarantined": False,
                            "first_seen": seen_at,
                            "last_seen": seen_at,
                        }
                    )
                    source_rows.append({"identifier_id": next_id, "source": source})
                    next_id += 1
            with engine.begin() as connection:
                connection.execute(insert(store.persons), person_rows)
                connection.execute(insert(store.identifiers), identifier_rows)
                connection.execute(insert(store.sources_table), source_rows)
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                for table, column in (("identifiers", "id"), ("persons", "key")):
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                        f"(SELECT max({column}) FROM {table}))"
                    )
    finally:
        engine.dispose()


# Measuring ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    seconds: float = 0.0
    items: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    created: int = 0
    merged: int = 0
    generated_late: int = 0


def measure(
    target: str, persons: int, batch: int, clients: int, seconds: float, expected_rate: float
) -> Measurement:
    """Send the mix for ``seconds``; requests are built beforehand so the client stays light."""
    per_client = max(4, int(expected_rate * 1.5 * seconds / batch / clients) + 2)
    mixes = [ShopMix(persons, seed) for seed in range(1, clients + 1)]
    pools = [
        [resolve_request([mix.item() for _ in range(batch)]) for _ in range(per_client)]
        for mix in mixes
    ]
    result = Measurement()
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]
    errors: list[BaseException] = []

    def send(index: int) -> None:
        mix, pool = mixes[index], pools[index]
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        created = merged = late = items = 0
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                RESOLVE_METHOD, None, identity_pb2.ResolveResponse.FromString
            )
            grpc.channel_ready_future(channel).result(timeout=10)
            barrier.wait()
            while time.monotonic() < stop_at[0] and not errors:
                if pool:
                    request = pool.pop()
                else:
                    request = resolve_request([mix.item() for _ in range(batch)])
                    late += 1
                began = time.perf_counter()
                try:
                    response = call(request, timeout=120)
                except grpc.RpcError as error:
                    errors.append(error)
                    break
                latencies.append(time.perf_counter() - began)
                items += len(response.results)
                for outcome in response.results:
                    created += outcome.created
                    merged += bool(outcome.merge_id)
                    for identifier in outcome.identifiers:
                        statuses[L.LinkStatus.Name(identifier.status)] += 1
        with lock:
            result.latencies += latencies
            result.statuses += statuses
            result.items += items
            result.created += created
            result.merged += merged
            result.generated_late += late

    threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + seconds + 3600  # until everyone is ready
    barrier.wait()
    began = time.monotonic()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - began
    if errors:
        raise SystemExit(f"Resolve failed: {errors[0]}")
    return result


@dataclass
class DriverTime:
    """Resolve in this process, and the part of it spent inside the database driver."""

    sets: int = 0
    batches: int = 0
    seconds: float = 0.0
    driver_seconds: float = 0.0
    statements: int = 0


class _TimedCursor:
    """A DBAPI cursor whose calls into the driver add their time to a :class:`DriverTime`."""

    def __init__(self, cursor: Any, timing: DriverTime) -> None:
        self._cursor = cursor
        self._timing = timing

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._cursor, name)
        if name not in _DRIVER_CALLS:
            return attribute
        timing = self._timing

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                timing.driver_seconds += time.perf_counter() - began
                timing.statements += name in ("execute", "executemany")

        return timed

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


_DRIVER_CALLS: Final = frozenset(
    {"execute", "executemany", "fetchone", "fetchmany", "fetchall", "copy"}
)


@contextmanager
def driver_timed(timing: DriverTime) -> Iterator[None]:
    """Every cursor SQLAlchemy's pool hands out in this process, and every commit, timed.

    Both SQLAlchemy's own statements and the store's statements on the DBAPI cursor come
    from the pooled connection's ``cursor()``, so this sees all of them. COPY's rows are fed
    inside ``copy`` (PostgreSQL), so they count too.
    """
    from sqlalchemy.pool.base import _ConnectionFairy

    original_cursor = _ConnectionFairy.cursor

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _TimedCursor(original_cursor(self, *args, **kwargs), timing)

    def commit(self: Any) -> None:
        began = time.perf_counter()
        try:
            self.dbapi_connection.commit()
        finally:
            timing.driver_seconds += time.perf_counter() - began

    _ConnectionFairy.cursor = cursor  # type: ignore[method-assign]
    _ConnectionFairy.commit = commit  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _ConnectionFairy.cursor = original_cursor  # type: ignore[method-assign]
        del _ConnectionFairy.commit  # type: ignore[attr-defined]


def resolve_in_process(
    db_url: str, keyring_json: str, persons: int, batch: int, batches: int
) -> DriverTime:
    """``batches`` Resolve batches of the shop's mix through the servicer in this process (no
    gRPC, one at a time), with the time spent inside the database driver measured apart: what
    Resolve's statements cost the database whatever Python does around them."""
    from services.common.db import make_engine
    from services.common.keyring import Keyring
    from services.identity.server import IdentityServicer
    from services.identity.service import IdentityService
    from services.identity.store import IdentityStore

    mix = ShopMix(persons, seed=99)
    requests = [
        identity_pb2.ResolveRequest.FromString(resolve_request([mix.item() for _ in range(batch)]))
        for _ in range(batches + 2)
    ]
    engine = make_engine(db_url)
    store = IdentityStore(engine)
    servicer = IdentityServicer(
        IdentityService(store, Keyring.from_json(keyring_json)),
        max_batch=max(batch, 1000),
        phone_region="GB",
    )
    timing = DriverTime()
    try:
        for request in requests[:2]:  # the caches of a process that has served a while
            servicer.Resolve(request, None)  # type: ignore[arg-type]
        with driver_timed(timing):
            began = time.perf_counter()
            for request in requests[2:]:
                timing.sets += len(servicer.Resolve(request, None).results)  # type: ignore[arg-type]
                timing.batches += 1
            timing.seconds = time.perf_counter() - began
    finally:
        store.close()
        engine.dispose()
    return timing


def count_rows(db_url: str) -> dict[str, int]:
    from sqlalchemy import text

    from services.common.db import make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            return {
                table: int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
                for table in ("identifiers", "persons", "merges")
            }
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "STEWARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="an account that may create databases; the run's database is created and dropped",
    )
    parser.add_argument("--identifiers", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--clients", type=int, default=2, help="batches in flight at once")
    parser.add_argument(
        "--warm",
        choices=("resolve", "direct"),
        default="resolve",
        help="warm through Resolve, or insert the warm rows directly with the store's tables",
    )
    parser.add_argument(
        "--driver-batches",
        type=int,
        default=40,
        help="batches resolved in this process afterwards, the driver's time measured apart "
        "(0 skips it)",
    )
    args = parser.parse_args()

    from services.common.keyring import Keyring

    target_rate = TARGETS[args.backend]
    persons = warm_persons_for(args.identifiers)
    keyring_json = Keyring.generate(development=True).to_json()
    with ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="steward-bench-")))
        if args.backend == "sqlite":
            db_url = f"sqlite:///{data_dir / 'identity.db'}"
        else:
            db_url = stack.enter_context(postgres_database(args.postgres_url))
        os.environ["STEWARD_KEYRING_JSON"] = keyring_json

        warm_started = time.monotonic()
        if args.warm == "direct":
            warm_directly(db_url, keyring_json, persons)
        server = stack.enter_context(identity_server(data_dir, db_url))
        if args.warm == "resolve":
            warm_through_resolve(server.target, persons, args.batch, args.clients)
        if args.backend == "postgres":
            analyze(db_url)
        warm_seconds = time.monotonic() - warm_started
        warm_rows = count_rows(db_url)
        rss_warm = server.status("VmRSS")

        cpu_before = server.cpu_seconds()
        with py_spy_from_env(server.process.pid, "measure"):
            result = measure(
                server.target, persons, args.batch, args.clients, args.seconds, target_rate
            )
        server_cpu = server.cpu_seconds() - cpu_before
        rss_after, rss_peak = server.status("VmRSS"), server.status("VmHWM")
        final_rows = count_rows(db_url)
        driver = None
        if args.driver_batches > 0:
            driver = resolve_in_process(
                db_url, keyring_json, persons, args.batch, args.driver_batches
            )

    rate = result.items / result.seconds
    latencies_ms = [seconds * 1000 for seconds in result.latencies]
    identifiers = sum(result.statuses.values())
    how = "through Resolve" if args.warm == "resolve" else "rows inserted directly (not Resolve)"
    print(f"Resolve on {args.backend}, batches of {args.batch}, {args.clients} clients")
    print(
        f"  warm graph:  {warm_rows['identifiers']:,} identifiers, {warm_rows['persons']:,} "
        f"persons, warmed {how} in {warm_seconds:.1f} s "
        f"({persons / warm_seconds:,.0f} sets/s)"
    )
    print(
        f"  measured:    {result.items:,} sets ({identifiers:,} identifiers) in "
        f"{result.seconds:.1f} s; {result.created:,} persons created, {result.merged:,} merges"
    )
    print(f"  outcomes:    {dict(result.statuses.most_common())}")
    print(
        f"  throughput:  {rate:,.0f} identifier sets/s  "
        f"({rate / target_rate:.2f} x the target of {target_rate:,.0f}/s)"
    )
    print(
        f"  batch p50 {percentile(latencies_ms, 0.5):.1f} ms, "
        f"p99 {percentile(latencies_ms, 0.99):.1f} ms, "
        f"mean {statistics.fmean(latencies_ms):.1f} ms"
    )
    print(
        f"  server RSS:  {rss_warm / 1024:,.0f} MiB after warming, "
        f"{rss_after / 1024:,.0f} MiB after measuring, peak {rss_peak / 1024:,.0f} MiB"
    )
    print(
        f"  server CPU:  {server_cpu / result.seconds * 100:.0f}% of one core while measuring, "
        f"{server_cpu / result.items * 1e6:,.0f} ms per 1,000 sets; "
        f"graph now {final_rows['identifiers']:,} identifiers, {final_rows['merges']:,} merges"
    )
    if driver is not None and driver.sets:
        in_database = driver.driver_seconds / driver.batches * 1000
        print(
            f"  in process:  {driver.batches} batches through the servicer, one at a time, no "
            f"gRPC: {driver.sets / driver.seconds:,.0f} sets/s; inside the database driver "
            f"(execute, fetch, commit) {in_database:.1f} ms per batch of {args.batch} "
            f"({driver.driver_seconds / driver.seconds:.0%} of the time, "
            f"{driver.statements / driver.batches:,.0f} statements per batch): with nothing "
            f"else to do, one writer would reach {driver.sets / driver.driver_seconds:,.0f} sets/s"
        )
    if result.generated_late:
        print(f"  note: {result.generated_late} batches were built during the measurement")


if __name__ == "__main__":
    main()
