"""Collect throughput over gRPC: consented, pseudonymised, resolved and durably stored events.

Target (collection issue, DESIGN.md "Targets"): Collect in batches of 500 with consent checks,
pseudonymisation, identity resolution and durable commits at >= 30,000 events/s on SQLite and
>= 10,000 events/s on PostgreSQL, with a warm population of 100,000 persons, client and server on
this 2-core machine. The same run measures the ceiling of the bare pipeline (HMAC + AES-GCM +
sqlite3 executemany, no gRPC, no consent) and prints the ratio to it. Figures only.

The consent and identity services run in one process of their own
(``steward serve --service consent --service identity``) with ``STEWARD_DATA_DIR`` in a temporary
directory: SQLite files there, or, with ``--backend postgres``, a fresh PostgreSQL database
created for the run and dropped afterwards (consent and identity share it through
``STEWARD_DATABASE_URL``; the key store stays a SQLite file in the data directory, apart from the
data it protects, as the tests set it up).

Warm-up, timed and printed:

1. identity Resolve, batches of 500: every warm person's identifiers (email + cookie; a third
   also a device id, a fifth also a phone) become a person;
2. RecordConsent by person id, one call per person carrying all four decisions (analytics
   granted by 70%, personalisation 50%, profiling 30%, marketing 20%, the rest denied), from
   ``--clients`` x 4 threads at once;
3. one Collect pass over each warm identifier set the mix uses (web, app, store), which also
   fills consent's person cache as a running service's would be.

Then ``--clients`` threads send the shop's mix for ``--seconds`` (requests are built beforehand,
so the client stays light): ~90% events of warm persons (most by identifier sets seen before, 3%
from a new browser with a known email, 10% of them by person id), ~10% anonymous new visitors
(a new cookie, no consent: dropped NO_CONSENT), ~5% SEARCH events with query text (stored
encrypted when personalisation is granted), views, dwells, cart additions and purchases, every
event id unique.

Run from the repository root::

    .venv/bin/python bench/ingest.py --backend sqlite
    .venv/bin/python bench/ingest.py --backend postgres \\
        --postgres-url postgresql://postgres@127.0.0.1:5432/postgres

Warming 100,000 persons through RecordConsent takes minutes (one call a person, each appending
to the ledger and creating the person's data key). ``--state DIR`` keeps the warm population
(data files, keyring, and the PostgreSQL database, which is then not dropped) so that later
runs, with other code say, only prime the cache and measure.

``--profile out.svg`` (or ``out.txt`` for py-spy's raw collapsed stacks) records the server with
py-spy while measuring, when py-spy is installed in the environment (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import random
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Final

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from harness import (
    Server,
    Spec,
    analyze,
    cookie,
    create_database,
    device,
    email,
    percentile,
    phone,
    postgres_database,
    py_spy,
    run_threads,
    steward_server,
)
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2
from steward.identity.v1 import identity_pb2

from services.common.sqlite_writer import WRITER_CACHE_KIB

TARGETS: Final = {"sqlite": 30_000.0, "postgres": 10_000.0}
COLLECT: Final = "/steward.consent.v1.ConsentService/Collect"
RECORD_CONSENT: Final = "/steward.consent.v1.ConsentService/RecordConsent"
RESOLVE: Final = "/steward.identity.v1.IdentityService/Resolve"
METADATA: Final = (("x-steward-caller", "bench-ingest"),)
POLICY_VERSION: Final = "2026-01"
GRANT_SHARES: Final = (
    ("analytics", 0.70),
    ("personalisation", 0.50),
    ("profiling", 0.30),
    ("marketing", 0.20),
)
CATEGORIES: Final = ("garden", "kitchen", "outdoor", "books", "toys", "lighting", "tools", "pets")
QUERIES: Final = (
    "garden gnome",
    "cast iron skillet",
    "led strip lights",
    "tent for 4 people",
    "dog bed large",
    "cordless drill",
    "kids puzzle 500 pieces",
    "herb planter",
)
RETENTIONS: Final = (30, 395, 730)
"""Days events are kept for, in the bare pipeline (a few purpose sets, as in Collect)."""
SQLITE_TIME: Final = "%Y-%m-%d %H:%M:%S.%f"
"""How SQLAlchemy stores a DATETIME on SQLite."""
T = common_pb2
C = consent_pb2
L = identity_pb2


# The shop's people ---------------------------------------------------------------------------
#
# Warm person k: email + cookie; k % 3 == 0 also uses the app (a device id); k % 5 == 0 also
# gave a phone number at the till. Values derive from k, so the mix names known identifiers
# without asking the server.


def warm_identifiers(k: int) -> list[Spec]:
    tag = str(k)
    specs = [email(tag), cookie(tag)]
    if k % 3 == 0:
        specs.append(device(tag))
    if k % 5 == 0:
        specs.append(phone(k))
    return specs


def usual_sets(k: int) -> list[tuple[str, list[Spec]]]:
    """(channel, identifiers) the person's events usually carry."""
    tag = str(k)
    sets = [("web", [email(tag), cookie(tag)])]
    if k % 3 == 0:
        sets.append(("app", [cookie(tag), device(tag)]))
    if k % 5 == 0:
        sets.append(("store", [phone(k)]))
    return sets


def grants_of(k: int, seed: int) -> dict[str, bool]:
    rng = random.Random(seed * 1_000_003 + k)
    return {purpose: rng.random() < share for purpose, share in GRANT_SHARES}


# Requests ------------------------------------------------------------------------------------


class ShopMix:
    """Events of the measured mix; event ids and new visitors are unique to this run."""

    def __init__(self, persons: list[str], seed: int, run: str, *, ordered_ids: bool) -> None:
        self.persons = persons
        self.rng = random.Random(seed)
        self.ids = random.Random(f"{run}-{seed}")  # unique across runs on a kept --state
        self.ordered_ids = ordered_ids
        self.id_base = (time.time_ns() // 1_000_000) << 80 | self.ids.getrandbits(40) << 40
        self.prefix = f"{run}-{seed}"
        self.count = 0
        self.recent_visitors: deque[str] = deque(maxlen=50)

    def _event_id(self) -> str:
        """A random UUID (version 4), or with ``ordered_ids`` one that sorts by creation."""
        self.count += 1
        if self.ordered_ids:
            return str(uuid.UUID(int=self.id_base | self.count))
        return str(uuid.UUID(int=self.ids.getrandbits(128), version=4))

    def _subject(self, event: common_pb2.BehaviourEvent) -> None:
        rng = self.rng
        draw = rng.random()
        if draw < 0.10:
            # An anonymous visitor: a new cookie, or one seen a few events ago in the session.
            if self.recent_visitors and rng.random() < 0.4:
                tag = rng.choice(self.recent_visitors)
            else:
                tag = f"{self.prefix}-v{self.count}"
                self.recent_visitors.append(tag)
            kind, value = cookie(tag)
            event.identifiers.add(type=kind, value=value)  # type: ignore[arg-type]
            event.channel = "web"
            return
        k = rng.randrange(len(self.persons))
        if draw < 0.19:
            event.person_id = self.persons[k]
            event.channel = "call_centre"
            return
        if draw < 0.217:
            channel, specs = "web", [email(str(k)), cookie(f"{self.prefix}-b{self.count}")]
        else:
            channel, specs = rng.choice(usual_sets(k))
        for kind, value in specs:
            event.identifiers.add(type=kind, value=value)  # type: ignore[arg-type]
        event.channel = channel

    def request(self, size: int, now: datetime | None = None) -> bytes:
        rng = self.rng
        now = now or datetime.now(UTC)
        request = C.CollectRequest()
        for _ in range(size):
            event = request.events.add(event_id=self._event_id())
            self._subject(event)
            event.occurred_at.FromDatetime(now - timedelta(seconds=rng.uniform(0, 120)))
            draw = rng.random()
            event.item_id = f"sku-{rng.randrange(20_000)}"
            event.category = rng.choice(CATEGORIES)
            if draw < 0.05:
                event.type = T.EVENT_TYPE_SEARCH
                event.query = rng.choice(QUERIES)
                event.ClearField("item_id")
            elif draw < 0.62:
                event.type = T.EVENT_TYPE_VIEW
            elif draw < 0.82:
                event.type = T.EVENT_TYPE_DWELL
                event.dwell_ms = rng.randrange(500, 120_000)
            elif draw < 0.94:
                event.type = T.EVENT_TYPE_ADD_TO_CART
                event.quantity = rng.randrange(1, 4)
            else:
                event.type = T.EVENT_TYPE_PURCHASE
                event.quantity = rng.randrange(1, 4)
                event.value = round(rng.uniform(3, 250), 2)
                event.currency = "GBP"
            if rng.random() < 0.1:
                event.attributes["utm_source"] = "newsletter"
        return request.SerializeToString()


def collect_request(items: Sequence[tuple[str, list[Spec]]], prefix: str, now: datetime) -> bytes:
    """One VIEW per identifier set (the cache-priming pass)."""
    request = C.CollectRequest()
    for position, (channel, specs) in enumerate(items):
        event = request.events.add(
            event_id=f"{prefix}-{position}",
            type=T.EVENT_TYPE_VIEW,
            item_id=f"sku-{position % 20_000}",
            category=CATEGORIES[position % len(CATEGORIES)],
            channel=channel,
        )
        event.occurred_at.FromDatetime(now)
        for kind, value in specs:
            event.identifiers.add(type=kind, value=value)  # type: ignore[arg-type]
    return request.SerializeToString()


# The server process --------------------------------------------------------------------------


@contextmanager
def suite_server(data_dir: Path, env_extra: dict[str, str]) -> Iterator[Server]:
    """Consent and identity in one process of their own."""
    with steward_server(["consent", "identity"], data_dir, env_extra) as server:
        yield server


# Warming -------------------------------------------------------------------------------------


def resolve_persons(target: str, persons: int, batch: int, clients: int) -> list[str]:
    """Identity Resolve of every warm person's identifiers; returns their person ids."""
    found = [""] * persons
    starts = iter(range(0, persons, batch))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def send(_index: int) -> None:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(RESOLVE, None, L.ResolveResponse.FromString)
            while not errors:
                with lock:
                    start = next(starts, None)
                if start is None:
                    return
                request = L.ResolveRequest(source="web")
                for k in range(start, min(start + batch, persons)):
                    item = request.items.add()
                    for kind, value in warm_identifiers(k):
                        item.identifiers.add(type=kind, value=value)  # type: ignore[arg-type]
                try:
                    answer = call(request.SerializeToString(), timeout=600, metadata=METADATA)
                except grpc.RpcError as error:
                    errors.append(error)
                    return
                for offset, result in enumerate(answer.results):
                    found[start + offset] = result.person_id

    run_threads(send, clients)
    if errors:
        raise SystemExit(f"warming (Resolve) failed: {errors[0]}")
    if not all(found):
        raise SystemExit("warming (Resolve) left persons without an id")
    return found


def record_consents(target: str, persons: list[str], seed: int, threads: int) -> int:
    """RecordConsent per person, all four decisions in one call; returns how many were granted."""
    now = datetime.now(UTC)
    queue = iter(range(len(persons)))
    lock = threading.Lock()
    errors: list[BaseException] = []
    granted = [0] * threads
    channels = [grpc.insecure_channel(target) for _ in range(max(1, threads // 4))]

    def send(index: int) -> None:
        call = channels[index % len(channels)].unary_unary(
            RECORD_CONSENT, None, C.RecordConsentResponse.FromString
        )
        rng = random.Random(seed + index)
        while not errors:
            with lock:
                k = next(queue, None)
            if k is None:
                return
            request = C.RecordConsentRequest(
                subject=T.PersonRef(person_id=persons[k]),
                source=C.CONSENT_SOURCE_WEB_BANNER,
                locale="en-GB",
            )
            request.occurred_at.FromDatetime(now - timedelta(seconds=rng.uniform(3600, 90 * 86400)))
            for purpose, grant in grants_of(k, seed).items():
                request.decisions.add(
                    purpose=purpose,
                    decision=T.DECISION_GRANTED if grant else T.DECISION_DENIED,
                    policy_version=POLICY_VERSION,
                )
                granted[index] += grant
            try:
                call(request.SerializeToString(), timeout=120, metadata=METADATA)
            except grpc.RpcError as error:
                errors.append(error)

    try:
        run_threads(send, threads)
    finally:
        for channel in channels:
            channel.close()
    if errors:
        raise SystemExit(f"warming (RecordConsent) failed: {errors[0]}")
    return sum(granted)


@dataclass
class Tally:
    """What Collect answered."""

    seconds: float = 0.0
    offered: int = 0
    accepted: int = 0
    drops: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    built_late: int = 0
    client_cpu: float = 0.0
    """CPU seconds of this (client) process while sending."""

    def add(self, response: consent_pb2.CollectResponse, latency: float) -> None:
        self.latencies.append(latency)
        self.offered += len(response.results)
        self.accepted += response.accepted
        if response.dropped:
            self.drops.update(r.drop_reason for r in response.results if not r.accepted)

    def merge(self, other: Tally) -> None:
        self.offered += other.offered
        self.accepted += other.accepted
        self.drops += other.drops
        self.latencies += other.latencies
        self.built_late += other.built_late


def prime_cache(target: str, persons: int, batch: int, clients: int, run: str) -> Tally:
    """Collect one event per usual identifier set of every warm person."""
    items = [item for k in range(persons) for item in usual_sets(k)]
    now = datetime.now(UTC)
    requests = [
        collect_request(items[start : start + batch], f"{run}-prime-{start}", now)
        for start in range(0, len(items), batch)
    ]
    return send_requests(target, [requests[i::clients] for i in range(clients)], None)


def send_requests(
    target: str,
    pools: list[list[bytes]],
    refill: Sequence[Callable[[], bytes]] | None,
    *,
    seconds: float = 0.0,
) -> Tally:
    """Send each pool from its own thread and channel; with ``refill``, until ``seconds``."""
    clients = len(pools)
    total = Tally()
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [float("inf")]
    errors: list[BaseException] = []

    def send(index: int) -> None:
        pool, tally = pools[index], Tally()
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(COLLECT, None, C.CollectResponse.FromString)
            grpc.channel_ready_future(channel).result(timeout=10)
            barrier.wait()
            position = 0
            while time.monotonic() < stop_at[0] and not errors:
                if position < len(pool):
                    request = pool[position]
                    pool[position] = b""
                    position += 1
                elif refill is not None:
                    request = refill[index]()
                    tally.built_late += 1
                else:
                    break
                began = time.perf_counter()
                try:
                    response = call(request, timeout=120, metadata=METADATA)
                except grpc.RpcError as error:
                    errors.append(error)
                    break
                tally.add(response, time.perf_counter() - began)
        with lock:
            total.merge(tally)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began, cpu_began = time.monotonic(), time.process_time()
    if refill is not None:
        stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    total.seconds = time.monotonic() - began
    total.client_cpu = time.process_time() - cpu_began
    if errors:
        raise SystemExit(f"Collect failed: {errors[0]}")
    return total


def measure(
    target: str,
    persons: list[str],
    *,
    batch: int,
    clients: int,
    seconds: float,
    expected_rate: float,
    run: str,
    ordered_ids: bool,
) -> Tally:
    per_client = max(4, int(expected_rate * 1.3 * seconds / batch / clients) + 2)
    mixes = [ShopMix(persons, seed, run, ordered_ids=ordered_ids) for seed in range(1, clients + 1)]
    now = datetime.now(UTC) + timedelta(seconds=60)  # occurred_at stays in the past while sent
    pools = [[mix.request(batch, now) for _ in range(per_client)] for mix in mixes]
    refill = [partial(mix.request, batch) for mix in mixes]
    return send_requests(target, pools, refill, seconds=seconds)


# The bare pipeline ---------------------------------------------------------------------------


def bare_pipeline(
    directory: Path, events: int, batch: int, seed: int, *, ordered_ids: bool = False
) -> float:
    """Events/s of HMAC + AES-GCM + sqlite3 executemany alone: the ceiling of the real thing.

    It does, with nothing around it, the work Collect cannot avoid for the measured mix, and
    no more, so that it bounds Collect from above:

    - HMAC-SHA256 of each identifier an event carries, as many as the mix sends (a tenth of
      the events a cookie alone, a tenth a person id and so none, the rest two), under a key
      whose padded blocks are hashed once, as the keyring does;
    - AES-256-GCM, under a per-person key with a fresh nonce, of the search text of SEARCH
      events (5% of the mix): Collect encrypts nothing else;
    - one row per event in a table of consent_events' columns and keys (the event id as the
      primary key, indexes on the person and on the retention time), written with executemany
      and one commit per batch, in WAL mode with synchronous=NORMAL and the page cache of
      Collect's SQLite writer. The event ids are those of the mix: random (version 4) UUIDs,
      or time-ordered ones with ``--ordered-ids``.

    Until this revision it AES-encrypted a field of every event, hashed through ``hmac.digest``
    (which looks the digest up by name on each call) and wrote a seven-column table through
    SQLite's default 2 MiB page cache. Encrypting every event is work Collect never does, so it
    did not state the ceiling; but it was not what held the figure down either: AES-GCM costs
    about 2 us an event and the insert 20-30 (random ids put every row's primary-key and person
    index entries on pages of their own, and those pages are written again at every commit).
    Measured side by side (CPU per event, load average 6.7): the old pipeline 35 us, this one
    44 us with random ids (likely because its rows are as wide as Collect's; not isolated) and
    32 us with time-ordered ones.
    Still left out: gRPC, protobuf, consent, identity, the outbox row Collect commits beside
    each event, and the rows already in Collect's table (this one starts empty).
    """
    rng = random.Random(seed)
    hmac_key = hmac.new(os.urandom(32), digestmod="sha256")
    data_keys = [AESGCM(AESGCM.generate_key(bit_length=256)) for _ in range(1024)]
    persons = [f"p_{rng.getrandbits(128):032x}" for _ in range(100_000)]
    moment = datetime.now(UTC)
    id_base = time.time_ns() // 1_000_000 << 80 | rng.getrandbits(40) << 40
    raw: list[tuple[str, int, list[str], bytes]] = []
    for n in range(events):
        k = rng.randrange(len(persons))
        draw = rng.random()
        if draw < 0.10:
            ids = [f"COOKIE_ID::ck-v{n}"]
        elif draw < 0.20:
            ids = []
        else:
            ids = [f"EMAIL::shopper.{k}@shop.example", f"COOKIE_ID::ck-{k}"]
        query = QUERIES[n % len(QUERIES)].encode() if rng.random() < 0.05 else b""
        if ordered_ids:
            event_id = str(uuid.UUID(int=id_base | n))
        else:
            event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        occurred = moment - timedelta(seconds=rng.uniform(0, 120))
        retain = occurred + timedelta(days=RETENTIONS[k % len(RETENTIONS)])
        raw.append((event_id, k, ids, query, occurred, retain))
    connection = sqlite3.connect(directory / "bare.db", isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
    connection.execute(
        "CREATE TABLE events (event_id VARCHAR(128) NOT NULL PRIMARY KEY,"
        " person_id VARCHAR(40) NOT NULL, type INTEGER NOT NULL, item_id VARCHAR(128) NOT NULL,"
        " category VARCHAR(256) NOT NULL, value FLOAT NOT NULL, dwell_ms BIGINT NOT NULL,"
        " quantity INTEGER NOT NULL, currency VARCHAR(3) NOT NULL, channel VARCHAR(32) NOT NULL,"
        " occurred_at DATETIME NOT NULL, received_at DATETIME NOT NULL,"
        " retain_until DATETIME NOT NULL, purposes JSON NOT NULL, attributes JSON NOT NULL,"
        " query_ciphertext BLOB)"
    )
    connection.execute("CREATE INDEX ix_person ON events (person_id)")
    connection.execute("CREATE INDEX ix_retain ON events (retain_until)")
    insert = f"INSERT INTO events VALUES ({', '.join('?' * 16)})"
    started = time.perf_counter()
    for start in range(0, events, batch):
        received = datetime.now(UTC).strftime(SQLITE_TIME)
        rows = []
        for event_id, k, ids, query, occurred, retain in raw[start : start + batch]:
            digests = []
            for identifier in ids:
                hashed = hmac_key.copy()
                hashed.update(identifier.encode())
                digests.append(hashed.hexdigest())
            sealed = None
            if query:
                nonce = os.urandom(12)
                sealed = nonce + data_keys[k % len(data_keys)].encrypt(
                    nonce, query, event_id.encode()
                )
            rows.append(
                (
                    event_id,
                    persons[k],
                    1,
                    "sku-1",
                    "garden",
                    0.0,
                    0,
                    0,
                    "",
                    "web",
                    occurred.strftime(SQLITE_TIME),
                    received,
                    retain.strftime(SQLITE_TIME),
                    '["analytics"]',
                    "{}",
                    sealed,
                )
            )
        connection.execute("BEGIN")
        connection.executemany(insert, rows)
        connection.execute("COMMIT")
    elapsed = time.perf_counter() - started
    connection.close()
    return events / elapsed


# Reporting -----------------------------------------------------------------------------------


def reason_name(reason: int) -> str:
    return C.DropReason.Name(reason).removeprefix("DROP_REASON_")  # type: ignore[arg-type]


@dataclass
class Warmed:
    """The warm population, and how long making it took (0 when reused from ``--state``)."""

    persons: list[str]
    grants: int
    resolve_seconds: float = 0.0
    consent_seconds: float = 0.0


def warm(server: Server, args: argparse.Namespace, state: Path | None) -> Warmed:
    """Persons through Resolve, then their consents; reused from ``state`` when it holds them."""
    saved = state / "warm.json" if state else None
    if saved is not None and saved.exists():
        known = json.loads(saved.read_text())
        return Warmed(known["persons"], known["grants"])
    began = time.monotonic()
    persons = resolve_persons(server.target, args.persons, args.batch, args.clients)
    resolved = time.monotonic()
    grants = record_consents(server.target, persons, args.seed, 4 * args.clients)
    warmed = Warmed(persons, grants, resolved - began, time.monotonic() - resolved)
    if saved is not None:
        saved.write_text(json.dumps({"persons": persons, "grants": grants}))
    return warmed


@contextmanager
def storage(args: argparse.Namespace) -> Iterator[tuple[Path, dict[str, str], str]]:
    """(data directory, server environment, PostgreSQL URL or "") for this run.

    Fresh and temporary, or kept in ``--state`` (with the keyring the digests depend on, and
    the PostgreSQL database, which is then not dropped) so later runs skip the warm-up.
    """
    from services.common.keyring import Keyring

    with ExitStack() as stack:
        if args.state is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="steward-")))
        else:
            data_dir = args.state.resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
        settings_file = data_dir / "bench.json"
        if settings_file.exists():
            saved: dict[str, str] = json.loads(settings_file.read_text())
            if saved["backend"] != args.backend:
                raise SystemExit(f"{data_dir} holds a {saved['backend']} population")
        else:
            saved = {"backend": args.backend}
            saved["keyring"] = Keyring.generate(development=True).to_json()
            if args.backend == "postgres":
                saved["db_url"] = (
                    create_database(args.postgres_url, "steward_ingest")
                    if args.state
                    else stack.enter_context(postgres_database(args.postgres_url, "steward_ingest"))
                )
            if args.state:
                settings_file.write_text(json.dumps(saved))
        env = {
            "STEWARD_KEYRING_JSON": saved["keyring"],
            "STEWARD_KEYSTORE_DB_URL": f"sqlite:///{data_dir / 'keystore.db'}",
        }
        db_url = saved.get("db_url", "")
        if db_url:
            env["STEWARD_DATABASE_URL"] = db_url
        yield data_dir, env, db_url


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "STEWARD_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="an account that may create databases; the run's database is created and dropped",
    )
    parser.add_argument("--persons", type=int, default=100_000, help="warm population")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measurement")
    parser.add_argument("--batch", type=int, default=500, help="events per Collect call")
    parser.add_argument("--clients", type=int, default=2, help="Collect calls in flight at once")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bare-events", type=int, default=200_000)
    parser.add_argument("--profile", help="py-spy output of the server while measuring")
    parser.add_argument(
        "--ordered-ids",
        action="store_true",
        help="time-ordered event ids instead of random UUIDs (the primary key index then "
        "grows at one end)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        help="keep the warm population here (and its PostgreSQL database) for later runs, "
        "which then skip the warm-up; delete the directory (and drop the database it names in "
        "bench.json) when done",
    )
    args = parser.parse_args()

    target_rate = TARGETS[args.backend]
    run = uuid.uuid4().hex[:8]
    with storage(args) as (data_dir, env, db_url), ExitStack() as stack:
        with tempfile.TemporaryDirectory(prefix="steward-bare-") as bare_dir:
            bare_rate = bare_pipeline(
                Path(bare_dir),
                args.bare_events,
                args.batch,
                args.seed,
                ordered_ids=args.ordered_ids,
            )
        server = stack.enter_context(suite_server(data_dir, env))
        warm_started = time.monotonic()
        warmed = warm(server, args, args.state)
        if db_url:
            analyze(db_url)
        primed = prime_cache(server.target, len(warmed.persons), args.batch, args.clients, run)
        warm_seconds = time.monotonic() - warm_started
        rss_warm = server.status("VmRSS")

        cpu_before = server.cpu_seconds()
        load_before = os.getloadavg()[0]
        with py_spy(server.process.pid, args.profile):
            result = measure(
                server.target,
                warmed.persons,
                batch=args.batch,
                clients=args.clients,
                seconds=args.seconds,
                # Requests are built beforehand for twice the cache-primed rate (the target
                # at most); if they run out, more are built while measuring (and reported).
                expected_rate=min(target_rate, max(2_000.0, 2 * primed.offered / primed.seconds)),
                run=run,
                ordered_ids=args.ordered_ids,
            )
        server_cpu = server.cpu_seconds() - cpu_before
        load_after = os.getloadavg()[0]
        rss_after, rss_peak = server.status("VmRSS"), server.status("VmHWM")

    offered = result.offered / result.seconds
    accepted = result.accepted / result.seconds
    latencies = [seconds * 1000 for seconds in result.latencies]
    keystore = "a SQLite file beside it" if args.backend == "postgres" else "SQLite"
    store = "a PostgreSQL database of its own" if args.backend == "postgres" else "SQLite files"
    print(
        f"Collect on {args.backend}, batches of {args.batch}, {args.clients} clients, "
        f"{os.cpu_count()} cores shared by client and server"
    )
    print(f"  storage:     consent and identity on {store}, key store on {keystore}")
    if warmed.resolve_seconds:
        how = (
            f"Resolve {warmed.resolve_seconds:.1f} s, RecordConsent (one call a person, four "
            f"decisions, {warmed.grants:,} grants) {warmed.consent_seconds:.1f} s "
            f"({len(warmed.persons) / warmed.consent_seconds:,.0f} calls/s)"
        )
    else:
        how = f"population reused from {args.state} (its warm-up not timed here)"
    print(
        f"  warm-up:     {warm_seconds:.1f} s for {len(warmed.persons):,} persons: {how}, "
        f"cache-priming Collect {primed.seconds:.1f} s "
        f"({primed.offered / primed.seconds:,.0f} events/s, {primed.accepted:,} accepted)"
    )
    ids = "time-ordered" if args.ordered_ids else "random (UUIDv4)"
    print(
        f"  measured:    {result.offered:,} events offered, {result.accepted:,} accepted "
        f"in {result.seconds:.1f} s, event ids {ids}"
    )
    drops = ", ".join(
        f"{reason_name(reason)} {count:,} ({count / result.offered:.1%})"
        for reason, count in result.drops.most_common()
    )
    print(f"  dropped:     {drops or 'none'}")
    print(
        f"  throughput:  {offered:,.0f} events/s offered, {accepted:,.0f} events/s accepted  "
        f"({offered / target_rate:.2f} x the target of {target_rate:,.0f}/s)"
    )
    print(
        f"  batch:       p50 {percentile(latencies, 0.5):.1f} ms, "
        f"p99 {percentile(latencies, 0.99):.1f} ms, "
        f"mean {statistics.fmean(latencies) if latencies else 0:.1f} ms"
    )
    print(
        f"  bare:        HMAC + AES-GCM of search text + sqlite3 executemany into consent_events' "
        f"schema {bare_rate:,.0f} events/s; "
        f"Collect reaches {offered / bare_rate:.1%} of it"
    )
    print(
        f"  server RSS:  {rss_warm / 1024:,.0f} MiB after warming, "
        f"{rss_after / 1024:,.0f} MiB after measuring, peak {rss_peak / 1024:,.0f} MiB"
    )
    per_event = server_cpu / result.offered * 1e6
    print(
        f"  server CPU:  {server_cpu / result.seconds:.0%} of one core while measuring, "
        f"{per_event:.0f} us per event offered (one core at that cost: "
        f"{1e6 / per_event:,.0f} events/s); client {result.client_cpu / result.seconds:.0%}"
    )
    print(
        f"  machine:     load average {load_before:.1f} before measuring, {load_after:.1f} after "
        f"(other processes share the {os.cpu_count()} cores)"
    )
    if result.built_late:
        print(f"  note: {result.built_late} batches were built during the measurement")


if __name__ == "__main__":
    main()
