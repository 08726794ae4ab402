"""What every benchmark needs around the service it measures, written once.

A benchmark imports this module (``bench/`` is on ``sys.path`` when a bench runs as
``python bench/<name>.py``) for: a Steward process of its own (``steward serve`` with chosen
services on a free port, waited for until it serves, stopped with SIGTERM), the floor server
that answers like one without doing any work, a process's CPU time and memory from /proc, a
PostgreSQL database made for the run and dropped after it, percentiles, worker threads, and an
optional py-spy recording of the server. Figures only: nothing here asserts anything about time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from steward.common.v1 import common_pb2

Spec = tuple[int, str]
"""An identifier as a bench sends it: (identifier type, raw value)."""


def email(tag: str) -> Spec:
    return common_pb2.IDENTIFIER_TYPE_EMAIL, f"shopper.{tag}@shop.example"


def cookie(tag: str) -> Spec:
    return common_pb2.IDENTIFIER_TYPE_COOKIE_ID, f"ck-{tag}"


def device(tag: str) -> Spec:
    return common_pb2.IDENTIFIER_TYPE_DEVICE_ID, f"dv-{tag}"


def phone(number: int) -> Spec:
    """A valid UK mobile number, unique for each ``number`` below 10^8."""
    return common_pb2.IDENTIFIER_TYPE_PHONE, f"+4474{number:08d}"


def loyalty(tag: str) -> Spec:
    return common_pb2.IDENTIFIER_TYPE_LOYALTY_CARD, f"LC-{tag}"


SERVER_ENV_DROPPED = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "STEWARD_IDENTITY_TARGET",
    "STEWARD_CONSENT_TARGET",
)
"""Settings of the caller's shell that would point the bench's server elsewhere."""


@dataclass
class Server:
    """A ``steward serve`` process started by :func:`steward_server`."""

    process: subprocess.Popen[bytes]
    target: str
    log: Path

    def status(self, name: str) -> int:
        """A /proc/<pid>/status figure in kB (VmRSS; VmHWM is the peak)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def steward_server(
    services: Sequence[str],
    data_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    health_service: str = "",
    start_timeout: float = 120.0,
) -> Iterator[Server]:
    """``steward serve --service ...`` on a free port with ``STEWARD_DATA_DIR=data_dir``.

    ``env`` is added to the caller's environment (less :data:`SERVER_ENV_DROPPED` and its
    database URLs); the server
    logs to ``data_dir/server.log``, shown if it dies. Yields once ``health_service`` serves.
    """
    port = free_port()
    with _server_process(
        _serve_command(services, port),
        port,
        data_dir / "server.log",
        data_dir,
        env,
        health_service,
        start_timeout,
    ) as server:
        yield server


@contextmanager
def floor_server(
    data_dir: Path, method: str, answer: bytes, work_us: float = 0.0
) -> Iterator[Server]:
    """``bench/floor_server.py``: Steward's server kit answering ``method`` with ``answer``
    and doing nothing else (or only ``work_us`` of CPU time per call), on a free port; the
    floor a service's figures are read against."""
    port = free_port()
    answer_file = data_dir / "floor-answer.bin"
    answer_file.write_bytes(answer)
    command = [
        sys.executable,
        str(Path(__file__).with_name("floor_server.py")),
        "--port",
        str(port),
        "--method",
        method,
        "--answer",
        str(answer_file),
        "--work-us",
        str(work_us),
    ]
    with _server_process(command, port, data_dir / "floor.log", data_dir, None, "", 60.0) as server:
        yield server


@dataclass(frozen=True)
class ServerSpec:
    """One ``steward serve`` process of :func:`steward_servers`."""

    services: Sequence[str]
    data_dir: Path
    env: Mapping[str, str] | None = None
    health_service: str = ""
    port: int | None = None


@contextmanager
def steward_servers(
    specs: Sequence[ServerSpec], start_timeout: float = 120.0
) -> Iterator[list[Server]]:
    """Several ``steward serve`` processes (a deployment's services, each in its own) started
    at once and waited for until each serves, as :func:`steward_server` starts one."""
    servers: list[Server] = []
    try:
        for spec in specs:
            port = spec.port or free_port()
            command = _serve_command(spec.services, port)
            servers.append(
                _launch(command, port, spec.data_dir / "server.log", spec.data_dir, spec.env)
            )
        for server, spec in zip(servers, specs, strict=True):
            wait_serving(server, spec.health_service, start_timeout)
        yield servers
    except BaseException:
        for server in servers:
            _show_exit(server)
        raise
    finally:
        _stop(servers)


def _serve_command(services: Sequence[str], port: int) -> list[str]:
    command = [str(Path(sys.executable).with_name("steward")), "serve", "--port", str(port)]
    for service in services:
        command += ["--service", service]
    return command


@contextmanager
def _server_process(
    command: Sequence[str],
    port: int,
    log: Path,
    data_dir: Path,
    env: Mapping[str, str] | None,
    health_service: str,
    start_timeout: float,
) -> Iterator[Server]:
    server = _launch(command, port, log, data_dir, env)
    try:
        wait_serving(server, health_service, start_timeout)
        yield server
    except BaseException:
        _show_exit(server)
        raise
    finally:
        _stop([server])


def _launch(
    command: Sequence[str], port: int, log: Path, data_dir: Path, env: Mapping[str, str] | None
) -> Server:
    server_env = {
        name: value
        for name, value in os.environ.items()
        if name not in SERVER_ENV_DROPPED and not _names_a_database(name)
    }
    server_env |= {"STEWARD_DATA_DIR": str(data_dir), "STEWARD_LOG_LEVEL": "WARNING"}
    server_env |= dict(env or {})
    with log.open("wb") as output:
        process = subprocess.Popen(
            list(command), env=server_env, stdout=output, stderr=subprocess.STDOUT
        )
    return Server(process, f"127.0.0.1:{port}", log)


def _show_exit(server: Server) -> None:
    if server.process.poll() is not None:
        print(f"the server exited with {server.process.returncode}:", file=sys.stderr)
        print(server.log.read_text()[-5000:], file=sys.stderr)


def _stop(servers: Sequence[Server]) -> None:
    """SIGTERM to every server at once, then wait for each (killed after 30 s)."""
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def _names_a_database(variable: str) -> bool:
    """The caller's database settings stay out of the bench's server: it gets its own."""
    return variable == "STEWARD_DATABASE_URL" or (
        variable.startswith("STEWARD_") and variable.endswith("_DB_URL")
    )


def wait_serving(server: Server, service: str = "", timeout: float = 120.0) -> None:
    """Wait until the server's health check says ``service`` (all, by default) is SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{server.log.read_text()[-5000:]}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit(f"the server did not start within {timeout:.0f} s")


# PostgreSQL ----------------------------------------------------------------------------------


def _libpq(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(admin_url: str, prefix: str = "steward_bench") -> str:
    """A fresh database named ``<prefix>_<random>``; returns its SQLAlchemy URL."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = make_url(url).database or ""
    with psycopg.connect(_libpq(admin_url), autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def postgres_database(admin_url: str, prefix: str = "steward_bench") -> Iterator[str]:
    """A fresh database for the run, dropped afterwards; yields its URL."""
    url = create_database(admin_url, prefix)
    try:
        yield url
    finally:
        drop_database(admin_url, url)


def server_version(url: str) -> str:
    import psycopg

    with psycopg.connect(_libpq(url)) as connection:
        return str(connection.info.parameter_status("server_version"))


def analyze(url: str) -> None:
    """Planner statistics after a bulk load, as autovacuum would gather them (it is off here)."""
    import psycopg

    with psycopg.connect(_libpq(url), autocommit=True) as connection:
        connection.execute("ANALYZE")


# Measuring -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def run_threads(work: Callable[[int], None], count: int) -> None:
    """``work(index)`` on ``count`` threads at once; returns when all have finished."""
    threads = [threading.Thread(target=work, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@contextmanager
def py_spy(pid: int, output: str | Path | None, extra: Sequence[str] = ()) -> Iterator[None]:
    """Record process ``pid`` with py-spy into ``output`` (``.txt``: raw collapsed stacks)
    while the block runs; nothing when ``output`` is empty or py-spy is not installed."""
    if not output:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("py-spy is not installed in this environment (pip install py-spy): not profiling")
        yield
        return
    command = [str(spy), "record", "--pid", str(pid), "--output", str(output), "--nonblocking"]
    if str(output).endswith(".txt"):
        command += ["--format", "raw"]
    command += list(extra)
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
        print(f"  (py-spy profile of the server: {output})")


def py_spy_from_env(pid: int, part: str) -> AbstractContextManager[None]:
    """:func:`py_spy` when ``STEWARD_BENCH_PY_SPY`` names an output file, one file per part
    (``out-<part>.svg``); ``STEWARD_BENCH_PY_SPY_ARGS`` adds py-spy options (``--gil``...)."""
    requested = os.environ.get("STEWARD_BENCH_PY_SPY")
    output = None
    if requested:
        path = Path(requested)
        output = path.with_name(f"{path.stem}-{part}{path.suffix}")
    return py_spy(pid, output, os.environ.get("STEWARD_BENCH_PY_SPY_ARGS", "").split())


# Open-loop load ------------------------------------------------------------------------------

OWN_CONNECTION: Final = [("grpc.use_local_subchannel_pool", 1)]
"""Channel options giving each sender its own connection instead of the process-wide one."""


@dataclass
class OpenLoopResult:
    """Each call's scheduled, sent and done times (perf_counter) and its answer or error."""

    offered_rate: float
    scheduled: list[float]
    sent: list[float]
    done: list[float]
    responses: list[bytes | None]
    """The serialized answer of each call; None for a failed one."""
    errors: Counter[str]

    def completed(self) -> list[int]:
        """The calls answered without an error."""
        return [i for i, response in enumerate(self.responses) if response is not None]

    def from_scheduled_ms(self, calls: Iterable[int] | None = None) -> list[float]:
        """Latency from the scheduled send (what a caller on a fixed schedule sees)."""
        chosen = self.completed() if calls is None else calls
        return [
            (self.done[i] - self.scheduled[i]) * 1000
            for i in chosen
            if self.responses[i] is not None
        ]

    def from_sent_ms(self) -> list[float]:
        """Latency from the actual send (the server and transport alone)."""
        return [(self.done[i] - self.sent[i]) * 1000 for i in self.completed()]

    def send_lag_ms(self) -> list[float]:
        return [(s - t) * 1000 for s, t in zip(self.sent, self.scheduled, strict=True) if s]

    def achieved_rate(self) -> float:
        finished = self.completed()
        if not finished:
            return 0.0
        span = max(self.done[i] for i in finished) - self.scheduled[0]
        return len(finished) / span


def open_loop(
    target: str,
    method: str,
    requests: Sequence[bytes],
    rate: float,
    seconds: float,
    senders: int,
    *,
    deadline: float = 10.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> OpenLoopResult:
    """Send ``requests`` (cycled) to ``method`` at ``rate`` calls/s on a fixed schedule, spread
    over ``senders`` connections, whatever the answers so far: so queueing in the server shows
    in the figures instead of slowing the client down.

    The client is one asyncio loop on grpc.aio: every call due is started at once and timed by
    a done callback, with no thread or future per call. On this 2-core machine the client
    shares the cores with the server it measures, and the aio client costs about 220 µs of CPU
    per call where futures from sender threads cost about 380 µs (a do-nothing server at
    2,000 calls/s: p99 2.4 ms with this client, 6.1 ms with the threaded one).
    """

    async def run() -> OpenLoopResult:
        total = int(rate * seconds)
        channels = [
            grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(senders)
        ]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        calls = [channel.unary_unary(method) for channel in channels]
        clock = time.perf_counter
        start = clock() + 0.2
        scheduled = [start + i / rate for i in range(total)]
        sent = [0.0] * total
        done = [0.0] * total
        pending: list[Any] = [None] * total
        outstanding = total
        all_done = asyncio.Event()

        def finished(index: int, _call: Any) -> None:
            nonlocal outstanding
            done[index] = clock()
            outstanding -= 1
            if outstanding == 0:
                all_done.set()

        with client_gc_paused():
            index = 0
            while index < total:
                now = clock()
                if scheduled[index] > now:
                    await asyncio.sleep(scheduled[index] - now)
                    continue
                while index < total and scheduled[index] <= now:
                    sent[index] = now
                    call = calls[index % senders](
                        requests[index % len(requests)],
                        timeout=deadline,
                        metadata=tuple(metadata) or None,
                    )
                    call.add_done_callback(partial(finished, index))
                    pending[index] = call
                    index += 1
            if total:
                await all_done.wait()
        responses: list[bytes | None] = [None] * total
        errors: Counter[str] = Counter()
        for index, call in enumerate(pending):
            try:
                responses[index] = await call
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
        for channel in channels:
            await channel.close()
        return OpenLoopResult(rate, scheduled, sent, done, responses, errors)

    return asyncio.run(run())


@contextmanager
def client_gc_paused() -> Iterator[None]:
    """No cyclic garbage collection in this (client) process while it keeps the schedule.

    With a thousand or more futures a second alive, a full collection stalls the sender threads
    for tens of milliseconds; those stalls would show as server latency (a trivial servicer's
    p99 goes from 4 ms to 60-100 ms). The run's garbage is kept until the end instead.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
