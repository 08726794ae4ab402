"""CheckConsent latency under an open-loop load, and RecordConsent throughput onto the ledger.

Target (consent issue, DESIGN.md): CheckConsent at 2,000 calls/s offered, p50 <= 1.5 ms and
p99 <= 5 ms, on the 2-core machine with client and server on it.

The consent and identity services run together in their own process (``steward serve --service
consent --service identity``) on a temporary data directory: SQLite files there, or a fresh
PostgreSQL database that this script creates and drops. The run has five parts:

1. Warm-up: ``--persons`` persons get consents through RecordConsent, nine in ten by person id
   (``p_<32 hex>``, as identity issues them; consent accepts any well-formed id) and one in ten
   by an email and a cookie, so identity resolves them. A quarter get a second, later decision.
2. Each warm person's first CheckConsent by person id, at the first ``--rate``, in random
   order (``--no-first-checks`` skips it). Consent keeps the decisions of persons checked
   recently in memory (services/consent/check_cache.py), as a shop's traffic asks about the same
   customers again and again; a first check reads the database, so this part is printed apart
   and the parts after it measure the steady state.
3. CheckConsent by person id (the fast path: no identity call) at ``--rate`` calls/s for
   ``--seconds``, open-loop: each call has a scheduled send time and is started then, on one of
   ``--senders`` connections, whatever the answers so far, so queueing shows in the figures
   (``harness.open_loop``: one asyncio loop, the cheapest Python client here). Latency is
   printed from the scheduled time (what a caller on a fixed schedule sees) and from the actual
   send (the server and transport alone); the gap between the two is the client falling behind.
   3% of the questions name a person with no decisions. After each rate, the same calls go
   at the same rate to the floor server (``bench/floor_server.py``): Steward's server kit with
   its interceptors and collector settings, answering every call with one stored CheckConsent
   answer and doing nothing else. Its figures are what gRPC, Python and this machine cost
   before consent does any work, measured in the same run. ``--floor-work 0 100`` adds a part
   where the floor spends 100 µs of CPU per call (a handler's budget); with no value, no floor.
4. The same by identifiers (consent asks identity's Lookup first); 5% are unknown identifiers.
5. RecordConsent, closed-loop from ``--record-clients`` threads for ``--record-seconds`` each,
   with 1 and with 4 decisions per call: calls/s, decisions/s (each decision is one ledger
   append, confirmed by the ledger's size before and after) and p50/p99 latency.

Printed: the machine and its load average, the figures and their ratio to the target, the
server's resident set (VmRSS from /proc/<pid>/status; VmHWM is the peak) at start and end, the
CPU used by server and client in each part with the server's CPU per answered call (steadier than
latency when other work shares the machine), and on PostgreSQL the database sessions opened in
each part (pooled connections are reused, so a growing count means connections opened per call).
An overloaded server refuses streams, which the client sees as UNAVAILABLE; calls answered late
count in the latencies, failed ones only in the error counts. The client pauses its own cyclic
garbage collector while keeping the schedule (``harness.client_gc_paused``). Figures only:
nothing about time is asserted. Several ``--rate`` values run the by-person part once at each
(to find the rate the target holds to); ``--identifiers-rate`` sets the by-identifiers rate
apart (0 skips that part); ``--record-batches`` with no value skips RecordConsent. Run from the
repository root::

    .venv/bin/python bench/check.py --backend sqlite
    .venv/bin/python bench/check.py --backend postgres \\
        --postgres-url postgresql://postgres@127.0.0.1:5432/postgres

``STEWARD_BENCH_PY_SPY=out.svg`` (or ``.txt`` for raw folded stacks) records the server with
py-spy during each CheckConsent part, one file per part and rate (``out-by-person-id-2000.svg``);
``STEWARD_BENCH_PY_SPY_ARGS`` adds py-spy options (``--gil`` samples only the thread holding the
GIL, which is where a saturated Python server spends its time).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from harness import (
    OWN_CONNECTION,
    OpenLoopResult,
    Server,
    floor_server,
    percentile,
    postgres_database,
    py_spy_from_env,
    server_version,
    steward_server,
)
from harness import open_loop as harness_open_loop
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2

T = common_pb2
C = consent_pb2

TARGET_RATE: Final = 2_000.0
TARGET_P50_MS: Final = 1.5
TARGET_P99_MS: Final = 5.0
CONSENT: Final = "steward.consent.v1.ConsentService"
CHECK_METHOD: Final = f"/{CONSENT}/CheckConsent"
RECORD_METHOD: Final = f"/{CONSENT}/RecordConsent"
LIST_PURPOSES_METHOD: Final = f"/{CONSENT}/ListPurposes"
CHECKPOINT_METHOD: Final = "/steward.consent.v1.AuditService/GetCheckpoint"
METADATA: Final = (("x-steward-caller", "bench-check"),)

CALL_DEADLINE_SECONDS: Final = 10.0
BY_IDENTIFIERS_EVERY: Final = 10
UNKNOWN_PERSON_SHARE: Final = 0.03
UNKNOWN_IDENTIFIERS_SHARE: Final = 0.05
DECISIONS: Final = (
    (0.6, T.DECISION_GRANTED),
    (0.25, T.DECISION_DENIED),
    (0.15, T.DECISION_WITHDRAWN),
)


def new_person_id() -> str:
    return f"p_{uuid.uuid4().hex}"


# The server process -------------------------------------------------------------------------


@contextmanager
def consent_server(data_dir: Path, database_url: str | None) -> Iterator[Server]:
    """``steward serve --service consent --service identity`` on a free port, until SERVING."""
    env = {"STEWARD_DATABASE_URL": database_url} if database_url else {}
    with steward_server(["consent", "identity"], data_dir, env, health_service=CONSENT) as server:
        yield server


def sessions_opened(admin_url: str, database_url: str) -> Callable[[], int]:
    """Sessions ever opened on the run's database: pooled connections are reused, so a growing
    count means connections opened and closed per call."""
    from sqlalchemy.engine import make_url

    name = make_url(database_url).database
    admin = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)

    def count() -> int:
        import psycopg

        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute("SELECT pg_stat_clear_snapshot()")
            row = connection.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = %s", (name,)
            ).fetchone()
        return int(row[0]) if row else 0

    return count


# The shop's persons -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purpose:
    id: str
    policy_version: str


@dataclass
class Population:
    """The warm persons: every person id, and the identifiers of those recorded by them."""

    person_ids: list[str] = field(default_factory=list)
    by_identifiers: list[list[common_pb2.Identifier]] = field(default_factory=list)


def identifiers_of(tag: str) -> list[common_pb2.Identifier]:
    return [
        T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=f"shopper.{tag}@shop.example"),
        T.Identifier(type=T.IDENTIFIER_TYPE_COOKIE_ID, value=f"ck-{tag}"),
    ]


def random_decision(rng: random.Random) -> int:
    draw = rng.random()
    for share, decision in DECISIONS:
        if draw < share:
            return decision
        draw -= share
    return DECISIONS[-1][1]


def record_request(
    subject: common_pb2.PersonRef,
    purposes: Sequence[Purpose],
    rng: random.Random,
    *,
    source: int = C.CONSENT_SOURCE_WEB_BANNER,
) -> bytes:
    return C.RecordConsentRequest(
        subject=subject,
        decisions=[
            C.DecisionInput(
                purpose=p.id,
                decision=random_decision(rng),  # type: ignore[arg-type]
                policy_version=p.policy_version,
            )
            for p in purposes
        ],
        source=source,  # type: ignore[arg-type]
        locale="en-GB",
    ).SerializeToString()


def warm(target: str, persons: int, purposes: Sequence[Purpose], clients: int) -> Population:
    """Record every warm person's consents (1-4 purposes), then a later decision for a quarter."""
    run_tag = uuid.uuid4().hex[:8]
    rng = random.Random(1)
    subjects: list[common_pb2.PersonRef] = []
    for k in range(persons):
        if k % BY_IDENTIFIERS_EVERY == 0:
            subjects.append(T.PersonRef(identifiers=identifiers_of(f"{run_tag}-{k}")))
        else:
            subjects.append(T.PersonRef(person_id=new_person_id()))
    first = [
        record_request(subject, rng.sample(purposes, rng.randint(1, len(purposes))), rng)
        for subject in subjects
    ]
    person_ids = [""] * persons

    def record(call: grpc.UnaryUnaryMultiCallable, k: int, request: bytes) -> None:
        answer = C.RecordConsentResponse.FromString(
            call(request, timeout=CALL_DEADLINE_SECONDS * 6, metadata=METADATA)
        )
        person_ids[k] = answer.person_id

    run_in_threads(target, RECORD_METHOD, list(enumerate(first)), record, clients)
    second = [
        (k, record_request(T.PersonRef(person_id=person_ids[k]), [rng.choice(purposes)], rng))
        for k in rng.sample(range(persons), persons // 4)
    ]
    run_in_threads(
        target,
        RECORD_METHOD,
        second,
        lambda call, k, request: call(
            request, timeout=CALL_DEADLINE_SECONDS * 6, metadata=METADATA
        ),
        clients,
    )
    return Population(
        person_ids=person_ids,
        by_identifiers=[
            list(subjects[k].identifiers) for k in range(0, persons, BY_IDENTIFIERS_EVERY)
        ],
    )


def run_in_threads(
    target: str,
    method: str,
    work: list[tuple[int, bytes]],
    handle: Callable[[grpc.UnaryUnaryMultiCallable, int, bytes], Any],
    clients: int,
) -> None:
    """Call ``handle`` on every item of ``work`` from ``clients`` threads, each on its channel."""
    items = iter(work)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
            call = channel.unary_unary(method)
            while not errors:
                with lock:
                    item = next(items, None)
                if item is None:
                    return
                try:
                    handle(call, *item)
                except grpc.RpcError as error:
                    errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{method} failed: {errors[0]}")


# Open-loop CheckConsent ---------------------------------------------------------------------


def open_loop(
    target: str, requests: Sequence[bytes], rate: float, seconds: float, senders: int
) -> OpenLoopResult:
    """CheckConsent at ``rate`` calls/s on a fixed schedule (see ``harness.open_loop``)."""
    return harness_open_loop(
        target,
        CHECK_METHOD,
        requests,
        rate,
        seconds,
        senders,
        deadline=CALL_DEADLINE_SECONDS,
        metadata=METADATA,
    )


def reasons(result: OpenLoopResult) -> Counter[str]:
    """How many answers gave each reason."""
    parse = C.CheckConsentResponse.FromString
    return Counter(
        C.ConsentReason.Name(parse(response).reason)
        for response in result.responses
        if response is not None
    )


def check_requests_by_person(
    population: Population, purposes: Sequence[Purpose], count: int, seed: int
) -> list[bytes]:
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        person = (
            new_person_id()
            if rng.random() < UNKNOWN_PERSON_SHARE
            else rng.choice(population.person_ids)
        )
        requests.append(
            C.CheckConsentRequest(
                subject=T.PersonRef(person_id=person), purpose=rng.choice(purposes).id
            ).SerializeToString()
        )
    return requests


def first_check_requests(
    population: Population, purposes: Sequence[Purpose], seed: int
) -> list[bytes]:
    """One CheckConsent by person id for every warm person, in random order."""
    rng = random.Random(seed)
    persons = list(population.person_ids)
    rng.shuffle(persons)
    return [
        C.CheckConsentRequest(
            subject=T.PersonRef(person_id=person), purpose=rng.choice(purposes).id
        ).SerializeToString()
        for person in persons
    ]


def check_requests_by_identifiers(
    population: Population, purposes: Sequence[Purpose], count: int, seed: int
) -> list[bytes]:
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        if rng.random() < UNKNOWN_IDENTIFIERS_SHARE:
            identifiers = identifiers_of(f"unknown-{seed}-{index}")
        else:
            identifiers = rng.choice(population.by_identifiers)
        requests.append(
            C.CheckConsentRequest(
                subject=T.PersonRef(identifiers=identifiers), purpose=rng.choice(purposes).id
            ).SerializeToString()
        )
    return requests


# Closed-loop RecordConsent ------------------------------------------------------------------


@dataclass
class RecordResult:
    seconds: float
    calls: int
    decisions: int
    latencies_ms: list[float]
    ledger_before: int
    ledger_after: int


def ledger_size(target: str) -> int:
    """The ledger's size, from a checkpoint signed now."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            CHECKPOINT_METHOD, response_deserializer=audit_pb2.GetCheckpointResponse.FromString
        )
        answer = call(
            audit_pb2.GetCheckpointRequest(sign_now=True).SerializeToString(),
            timeout=CALL_DEADLINE_SECONDS,
            metadata=METADATA,
        )
        return int(answer.checkpoint.tree_size)


def record_throughput(
    target: str,
    population: Population,
    purposes: Sequence[Purpose],
    batch: int,
    seconds: float,
    clients: int,
) -> RecordResult:
    """RecordConsent for warm persons, ``batch`` decisions per call, as fast as answered."""
    before = ledger_size(target)
    barrier = threading.Barrier(clients + 1)
    stop_at = [float("inf")]
    lock = threading.Lock()
    latencies: list[float] = []
    totals = [0, 0]
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        pool = [
            record_request(
                T.PersonRef(person_id=rng.choice(population.person_ids)),
                rng.sample(purposes, batch)
                if batch <= len(purposes)
                else [rng.choice(purposes) for _ in range(batch)],
                rng,
            )
            for _ in range(2_000)
        ]
        mine: list[float] = []
        calls = decisions = 0
        with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
            call = channel.unary_unary(
                RECORD_METHOD, response_deserializer=C.RecordConsentResponse.FromString
            )
            grpc.channel_ready_future(channel).result(timeout=10)
            barrier.wait()
            while time.perf_counter() < stop_at[0] and not errors:
                began = time.perf_counter()
                try:
                    answer = call(
                        pool[calls % len(pool)], timeout=CALL_DEADLINE_SECONDS, metadata=METADATA
                    )
                except grpc.RpcError as error:
                    errors.append(error)
                    break
                mine.append((time.perf_counter() - began) * 1000)
                calls += 1
                decisions += len(answer.receipts)
        with lock:
            latencies.extend(mine)
            totals[0] += calls
            totals[1] += decisions

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise SystemExit(f"RecordConsent failed: {errors[0]}")
    return RecordResult(elapsed, totals[0], totals[1], latencies, before, ledger_size(target))


# Figures ------------------------------------------------------------------------------------


def list_purposes(target: str) -> list[Purpose]:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            LIST_PURPOSES_METHOD, response_deserializer=C.ListPurposesResponse.FromString
        )
        answer = call(
            C.ListPurposesRequest().SerializeToString(),
            timeout=CALL_DEADLINE_SECONDS,
            metadata=METADATA,
        )
    return [Purpose(p.id, p.policy_version) for p in answer.purposes]


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    memory_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return (
        f"{os.cpu_count()} cores ({model}), {memory_kb / 1024 / 1024:.0f} GiB; "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}; "
        f"load average {load_average()} (other work on the machine skews the figures)"
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def settle(server: Server, timeout: float = 30.0) -> None:
    """Wait until the server is nearly idle, so one part's backlog does not spill into the next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server.cpu_seconds()
        time.sleep(0.5)
        if server.cpu_seconds() - before < 0.1:
            return


class Usage:
    """CPU used by the server and by this (client) process between creation and ``stop``, and
    the database sessions opened meanwhile (PostgreSQL only)."""

    def __init__(self, server: Server, sessions: Callable[[], int] | None = None) -> None:
        self.server = server
        self.sessions = sessions
        self.sessions_opened = sessions() if sessions else 0
        self.server_cpu = server.cpu_seconds()
        self.client_cpu = self._client()
        self.began = time.perf_counter()
        self.wall = 0.0

    @staticmethod
    def _client() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> Usage:
        self.wall = time.perf_counter() - self.began
        self.server_cpu = self.server.cpu_seconds() - self.server_cpu
        self.client_cpu = self._client() - self.client_cpu
        if self.sessions:
            time.sleep(1.0)  # PostgreSQL publishes session counts about once a second
            self.sessions_opened = self.sessions() - self.sessions_opened
        return self

    def line(self, calls: int = 0) -> str:
        """CPU shares; with ``calls``, the server's CPU per call (steadier than latency when
        other work shares the machine)."""
        server = self.server_cpu / self.wall * 100
        client = self.client_cpu / self.wall * 100
        per_call = (
            f"; server CPU {self.server_cpu / calls * 1e6:,.0f} us per answered call"
            if calls
            else ""
        )
        opened = f"; {self.sessions_opened:,} database sessions opened" if self.sessions else ""
        return f"CPU: server {server:.0f}%, client {client:.0f}% of one core{per_call}{opened}"


def print_open_loop(title: str, result: OpenLoopResult, usage: Usage) -> None:
    scheduled, sent = result.from_scheduled_ms(), result.from_sent_ms()
    lag = result.send_lag_ms()
    p50, p99 = percentile(scheduled, 0.5), percentile(scheduled, 0.99)
    print(f"CheckConsent {title} at {result.offered_rate:,.0f}/s")
    print(
        f"  offered {result.offered_rate:,.0f}/s for {len(result.scheduled):,} calls; "
        f"answered {len(scheduled):,} at {result.achieved_rate():,.0f}/s"
        + (f"; errors {dict(result.errors)}" if result.errors else "")
    )
    print(f"  answers:          {dict(reasons(result).most_common())}")
    print(
        f"  from scheduled:   p50 {p50:.2f} ms ({p50 / TARGET_P50_MS:.2f} x target "
        f"{TARGET_P50_MS} ms), p99 {p99:.2f} ms ({p99 / TARGET_P99_MS:.2f} x target "
        f"{TARGET_P99_MS:.0f} ms), p99.9 {percentile(scheduled, 0.999):.2f} ms, "
        f"max {max(scheduled, default=float('nan')):.1f} ms"
    )
    print(
        f"  from actual send: p50 {percentile(sent, 0.5):.2f} ms, "
        f"p99 {percentile(sent, 0.99):.2f} ms, p99.9 {percentile(sent, 0.999):.2f} ms"
    )
    print(
        f"  send lag (actual - scheduled): p50 {percentile(lag, 0.5):.2f} ms, "
        f"p99 {percentile(lag, 0.99):.2f} ms"
    )
    print(f"  {usage.line(len(scheduled))}")


def floor_title(work_us: float) -> str:
    work = f"{work_us:,.0f} us of CPU per call" if work_us else "no work"
    return f"on the floor server (stored answer, {work})"


def print_record(batch: int, clients: int, result: RecordResult, usage: Usage) -> None:
    appended = result.ledger_after - result.ledger_before
    print(f"RecordConsent, {batch} decision{'s' if batch > 1 else ''} per call, {clients} clients")
    print(
        f"  {result.calls / result.seconds:,.0f} calls/s, "
        f"{result.decisions / result.seconds:,.0f} decisions/s "
        f"({result.calls:,} calls in {result.seconds:.1f} s); "
        f"p50 {percentile(result.latencies_ms, 0.5):.2f} ms, "
        f"p99 {percentile(result.latencies_ms, 0.99):.2f} ms"
    )
    print(
        f"  ledger: {result.ledger_before:,} -> {result.ledger_after:,} entries "
        f"(+{appended:,}, {appended / result.seconds:,.0f} appends/s; "
        f"{'equal to' if appended == result.decisions else 'NOT equal to'} the "
        f"{result.decisions:,} receipts)"
    )
    print(f"  {usage.line(result.calls)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "STEWARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="an account that may create databases; the run's database is created and dropped",
    )
    parser.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[TARGET_RATE],
        help="CheckConsent calls/s by person id; several values run that part at each",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="per CheckConsent part")
    parser.add_argument("--persons", type=int, default=10_000)
    parser.add_argument(
        "--identifiers-rate",
        type=float,
        help="CheckConsent calls/s by identifiers (default: the first --rate; 0 skips the part)",
    )
    parser.add_argument(
        "--senders", type=int, default=2, help="connections CheckConsent is sent on"
    )
    parser.add_argument(
        "--first-checks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask each warm person once, at the first --rate, before the timed parts",
    )
    parser.add_argument(
        "--floor-work",
        type=float,
        nargs="*",
        default=[0.0],
        metavar="US",
        help="after each rate by person id, the same load on the floor server (Steward's "
        "server kit answering with a stored answer) spending this much CPU per call, one part "
        "each; none skips it",
    )
    parser.add_argument("--record-seconds", type=float, default=10.0, help="per batch size")
    parser.add_argument("--record-clients", type=int, default=4)
    parser.add_argument(
        "--record-batches",
        type=int,
        nargs="*",
        default=[1, 4],
        help="decisions per RecordConsent call, one part each (none skips them)",
    )
    parser.add_argument("--warm-clients", type=int, default=4)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    with ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="steward-bench-")))
        sessions: Callable[[], int] | None = None
        if args.backend == "sqlite":
            database_url, backend = None, f"SQLite {sqlite3.sqlite_version} (WAL) in {data_dir}"
        else:
            database_url = stack.enter_context(
                postgres_database(args.postgres_url, "steward_bench_check")
            )
            sessions = sessions_opened(args.postgres_url, database_url)
            backend = f"PostgreSQL {server_version(database_url)}, fresh database for the run"
        server = stack.enter_context(consent_server(data_dir, database_url))
        rss_start = server.status("VmRSS")
        print(f"server: consent + identity in one process (pid {server.process.pid}), {backend}")
        print(f"  RSS at start {rss_start / 1024:,.0f} MiB")
        purposes = list_purposes(server.target)

        warm_began = time.perf_counter()
        usage = Usage(server, sessions)
        population = warm(server.target, args.persons, purposes, args.warm_clients)
        warm_seconds = time.perf_counter() - warm_began
        calls = args.persons + args.persons // 4
        print(
            f"warm-up: {args.persons:,} persons ({len(population.by_identifiers):,} by "
            f"identifiers through identity), {calls:,} RecordConsent calls in "
            f"{warm_seconds:.1f} s ({calls / warm_seconds:,.0f} calls/s, "
            f"{args.warm_clients} clients); ledger {ledger_size(server.target):,} entries; "
            f"RSS {server.status('VmRSS') / 1024:,.0f} MiB"
        )
        print(f"  {usage.stop().line(calls)}")

        identifiers_rate = args.rate[0] if args.identifiers_rate is None else args.identifiers_rate
        if args.first_checks:
            # Consent keeps recent persons' decisions in memory: first checks read the database.
            requests = first_check_requests(population, purposes, 11)
            settle(server)
            usage = Usage(server, sessions)
            result = open_loop(
                server.target, requests, args.rate[0], len(requests) / args.rate[0], args.senders
            )
            usage.stop()
            print_open_loop(
                "by person id, each person's first check (nothing cached)", result, usage
            )
        parts = [
            ("by person id (no identity call)", "by-person-id", check_requests_by_person, rate)
            for rate in args.rate
        ]
        parts.append(
            (
                "by identifiers (identity Lookup first)",
                "by-identifiers",
                check_requests_by_identifiers,
                identifiers_rate,
            )
        )
        for title, part, make, rate in parts:
            if rate <= 0:
                continue
            requests = make(population, purposes, min(int(rate * args.seconds), 50_000), 7)
            settle(server)
            with py_spy_from_env(server.process.pid, f"{part}-{rate:.0f}"):
                usage = Usage(server, sessions)
                result = open_loop(server.target, requests, rate, args.seconds, args.senders)
                usage.stop()
            print_open_loop(title, result, usage)
            answer = next((r for r in result.responses if r is not None), None)
            if part != "by-person-id" or answer is None:
                continue
            for work_us in args.floor_work:
                with floor_server(data_dir, CHECK_METHOD, answer, work_us) as floor:
                    settle(floor)
                    usage = Usage(floor)
                    result = open_loop(floor.target, requests, rate, args.seconds, args.senders)
                    usage.stop()
                print_open_loop(floor_title(work_us), result, usage)

        for batch in args.record_batches:
            settle(server)
            usage = Usage(server, sessions)
            recorded = record_throughput(
                server.target,
                population,
                purposes,
                batch,
                args.record_seconds,
                args.record_clients,
            )
            print_record(batch, args.record_clients, recorded, usage.stop())

        print(
            f"server RSS: {rss_start / 1024:,.0f} MiB at start, "
            f"{server.status('VmRSS') / 1024:,.0f} MiB at end, "
            f"peak {server.status('VmHWM') / 1024:,.0f} MiB; load average {load_average()}"
        )


if __name__ == "__main__":
    main()
