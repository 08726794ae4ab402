"""The `steward` command: run the suite, manage keys, and talk to a running suite."""

from __future__ import annotations

import logging
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from rich.console import Console
from rich.table import Table

from services.common.config import ConfigError, Settings
from services.common.keyring import Keyring, KeyringError, init_keys, rotate_hmac_key
from services.common.logging import configure_logging
from services.common.server import serve as serve_until_stopped
from services.runtime import SERVICES, build_suite

# Tracebacks never show local variables: they could hold keys or raw identifiers.
app = typer.Typer(
    help="Steward: consent, identity, tagging and recommendation services.",
    pretty_exceptions_show_locals=False,
)
keys_app = typer.Typer(
    help="Pseudonymisation, signing and key-encryption keys.",
    pretty_exceptions_show_locals=False,
)
app.add_typer(keys_app, name="keys")

console = Console()
errors = Console(stderr=True)
logger = logging.getLogger("steward")

DEFAULT_TARGET = "localhost:50051"
TargetOption = Annotated[str, typer.Option(help="Address of a running suite.")]
DirOption = Annotated[
    Path | None, typer.Option("--dir", help="Keys directory (default: STEWARD_KEYS_DIR).")
]


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as error:
        errors.print(f"[red]configuration error:[/red] {error}")
        raise typer.Exit(2) from error


@app.command()
def serve(
    service: Annotated[
        list[str] | None,
        typer.Option(help=f"Service to run (repeatable): {', '.join(SERVICES)}. Default: all."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 50051).")] = None,
) -> None:
    """Run the services (all four in one process by default) until SIGTERM or Ctrl-C."""
    import dataclasses

    settings = _settings()
    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]
    configure_logging(settings)
    try:
        suite = build_suite(settings, service or SERVICES)
    except (ValueError, KeyringError, RuntimeError) as error:
        errors.print(f"[red]cannot start:[/red] {error}")
        raise typer.Exit(2) from error
    logger.info(
        "serving %s on %s:%d",
        ", ".join(suite.services),
        settings.host,
        suite.port,
        extra={"services": list(suite.services), "port": suite.port},
    )
    try:
        serve_until_stopped(
            suite.server,
            suite.health,
            settings.grace_seconds,
            on_started=suite.started,
            on_stopping=suite.event_log.close if suite.event_log else None,
        )
    finally:
        suite.closed()
    logger.info("stopped")


@app.command()
def version() -> None:
    """Print the installed version."""
    console.print(f"steward {metadata.version('steward')}")


@app.command()
def health(
    target: TargetOption = DEFAULT_TARGET,
    service: Annotated[
        list[str] | None,
        typer.Option(help="Service to check (repeatable). Default: every reflected service."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 3.0,
) -> None:
    """Check a running suite: list its services by reflection and their grpc.health status.

    Exits non-zero unless every service checked is SERVING.
    """
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as error:
            errors.print(f"[red]{target} is not reachable[/red]")
            raise typer.Exit(1) from error
        names = service or [
            name
            for name in ProtoReflectionDescriptorDatabase(channel).get_services()
            if name.startswith("steward.")
        ]
        stub = health_pb2_grpc.HealthStub(channel)
        table = Table("service", "status")
        all_serving = True
        for name in ["", *names]:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as error:
                status = error.code().name
            all_serving &= status == "SERVING"
            table.add_row(name or "(overall)", status)
    console.print(table)
    if not all_serving:
        raise typer.Exit(1)


@keys_app.command("init")
def keys_init(
    directory: DirOption = None,
    dev: Annotated[
        bool | None,
        typer.Option(
            "--dev/--production",
            help="Mark the keys as development keys (default unless STEWARD_ENV=production).",
        ),
    ] = None,
) -> None:
    """Create the keyring if it does not exist yet (existing keys are never overwritten)."""
    settings = _settings()
    target = directory or settings.keys_dir
    development = settings.env != "production" if dev is None else dev
    existed = (target / "keyring.json").exists()
    keyring = init_keys(target, development=development)
    verb = "kept existing" if existed else "created"
    kind = "development" if keyring.development else "production"
    console.print(
        f"{verb} {kind} keys in {target}: hmac {keyring.current_hmac_kid}, "
        f"signing key {keyring.signing_key_id}, kek {keyring.kek_kid}"
    )


@keys_app.command("rotate")
def keys_rotate(directory: DirOption = None) -> None:
    """Add a new pseudonymisation key; new digests use it, old digests still resolve."""
    target = directory or _settings().keys_dir
    try:
        kid = rotate_hmac_key(target)
    except KeyringError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from error
    console.print(f"new current hmac key: {kid}")


@keys_app.command("public")
def keys_public(directory: DirOption = None) -> None:
    """Print the ledger's Ed25519 public key (PEM) for auditors."""
    target = directory or _settings().keys_dir
    try:
        keyring = Keyring.load(target)
    except KeyringError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from error
    sys.stdout.write(keyring.public_key_pem())


def main() -> None:
    """Entry point of the `steward` console script."""
    app()
