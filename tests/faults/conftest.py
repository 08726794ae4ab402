"""Process-level fault tests: the suite runs as `steward serve` in a child process, which the
tests kill, restart, and starve of its database, as production will."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

STEWARD = Path(sys.executable).with_name("steward")


def steward_command(*arguments: str) -> list[str]:
    """The installed `steward` entry point, or the same function through this interpreter."""
    if STEWARD.exists():
        return [str(STEWARD), *arguments]
    return [sys.executable, "-c", "from services.cli import main; main()", *arguments]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float = 60.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


@dataclass
class ServeProcess:
    """`steward serve` in a child process, on a fixed port so a restart is found again."""

    data_dir: Path
    environ: Mapping[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, *arguments: str) -> list[str]:
        return steward_command(*arguments)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "STEWARD_DATA_DIR": str(self.data_dir),
            "STEWARD_HOST": "127.0.0.1",
            "STEWARD_PORT": str(self.port),
            **self.environ,
        }

    def start(self) -> float:
        """Start the process and wait until it serves; returns the seconds that took."""
        assert self.process is None or self.process.poll() is not None
        self.starts += 1
        log = (self.data_dir.parent / f"serve-{self.starts}.log").open("wb")
        began = time.monotonic()
        self.process = subprocess.Popen(
            steward_command("serve"), env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        # Polled cheaply in-process; then `steward health`, as an operator would, must agree.
        serving = wait_until(self.serving, timeout=90, interval=0.1)
        assert serving, f"not serving after 90 s; log: {self.log_tail()}"
        took = time.monotonic() - began
        answer = subprocess.run(
            steward_command("health", "--target", self.target, "--timeout", "5"),
            env=self.env(),
            capture_output=True,
            check=False,
        )
        assert answer.returncode == 0, answer.stdout.decode() + answer.stderr.decode()
        return took

    def serving(self) -> bool:
        """Whether grpc.health.v1 says the whole process serves."""
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"steward serve exited with {self.process.returncode}: {self.log_tail()}")
        with grpc.insecure_channel(self.target) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        logs = sorted(self.data_dir.parent.glob("serve-*.log"))
        if not logs:
            return "(no log)"
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``serve_process(STEWARD_DATABASE_URL=...)``: a not yet started `steward serve` child with
    its own data directory; stopped after the test."""
    made: list[ServeProcess] = []

    def make(**environ: str) -> ServeProcess:
        data_dir = tmp_path / f"suite-{len(made)}" / "data"
        data_dir.mkdir(parents=True)
        made.append(ServeProcess(data_dir, environ))
        return made[-1]

    yield make
    for process in made:
        process.stop()


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster of the test's own, which it may stop and start at will."""

    bin_dir: Path
    directory: Path
    port: int
    as_user: tuple[str, ...]
    """``runuser -u postgres --`` when the tests run as root, whom initdb refuses."""

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, program: str, *arguments: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin_dir / program), *arguments],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        log = str(self.directory / "postgres.log")
        self.run(
            "pg_ctl", "-D", str(self.directory / "data"), "-w", "-o", options, "-l", log, "start"
        )

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.directory / "data"), "-w", "-m", "fast", "stop")


def _postgres_bin_dir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A fresh cluster on a free port (trust authentication), removed after the test. Never the
    machine's shared server: this one gets stopped."""
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("initdb is not installed (apt-get install postgresql): no cluster to stop")
    as_user: tuple[str, ...] = ()
    directory = Path(tempfile.mkdtemp(prefix="steward-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        runuser = shutil.which("runuser")
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if runuser is None or owner is None:
            shutil.rmtree(directory)
            pytest.skip("running as root without a postgres user and runuser to run initdb as")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        as_user = (runuser, "-u", "postgres", "--")
    cluster = ThrowawayPostgres(bin_dir, directory, free_port(), as_user)
    try:
        cluster.run("initdb", "-D", str(directory / "data"), "-U", "postgres", "-A", "trust", "-N")
        cluster.start()
        yield cluster
    finally:
        # Never started, or already stopped by the test.
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class PrivateNats:
    """A nats-server with JetStream of the test's own (never the shared one: this one is
    killed), storing its streams in a directory that outlives each restart."""

    binary: str
    port: int
    store: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        arguments = ["-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        log = (self.store.parent / "nats.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, *arguments], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        assert wait_until(self._listening, timeout=30), "nats-server did not start"

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).exists():
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    store = tmp_path / "jetstream"
    store.mkdir()
    server = PrivateNats(binary, free_port(), store)
    server.start()
    try:
        yield server
    finally:
        server.stop()
