"""The `steward` command: run the suite, manage keys, and talk to a running suite."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Annotated, Final, TypeVar

import grpc
import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from rich.console import Console
from rich.table import Table
from steward.identity.v1 import identity_pb2, identity_pb2_grpc

from services.common.certs import DEFAULT_HOSTS
from services.common.channels import open_channel
from services.common.config import ConfigError, Settings
from services.common.errors import read_error_details
from services.common.keyring import Keyring, KeyringError, init_keys, rotate_hmac_key
from services.common.logging import configure_logging
from services.common.server import serve as serve_until_stopped
from services.runtime import SERVICES, build_suite, migrate

# Tracebacks never show local variables: they could hold keys or raw identifiers.
GC_THRESHOLDS: Final = (10_000, 50, 100)
"""The cyclic collector's thresholds in a serving process (Python's are 700, 10, 10).

A server's allocations are mostly short-lived (each call's messages and handler objects), so
with the defaults the youngest generation is collected every 700 allocations and whatever a
call has in flight at that moment is promoted until a full collection runs: every couple of
seconds under 2,000 CheckConsent calls/s, each pausing every thread for 15-45 ms over what the
caches hold. Collecting less often lets those objects die young: CheckConsent at 2,000/s went
from p99 15 ms to 4.6 ms and 414 to 370 us of CPU per call (bench/check.py). Cycles are still
collected, later."""

app = typer.Typer(
    help="Steward: consent, identity, tagging and recommendation services.",
    pretty_exceptions_show_locals=False,
)
keys_app = typer.Typer(
    help="Pseudonymisation, signing and key-encryption keys.",
    pretty_exceptions_show_locals=False,
)
identity_app = typer.Typer(
    help="The identity graph: merge rules, persons, history.",
    pretty_exceptions_show_locals=False,
)
certs_app = typer.Typer(
    help="Development certificates for mutual TLS.", pretty_exceptions_show_locals=False
)
callers_app = typer.Typer(
    help="The callers file: who may call, with which scopes and limits.",
    pretty_exceptions_show_locals=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(identity_app, name="identity")
app.add_typer(certs_app, name="certs")
app.add_typer(callers_app, name="callers")

console = Console()
T = TypeVar("T")
errors = Console(stderr=True)
logger = logging.getLogger("steward")

DEFAULT_TARGET = "localhost:50051"
TargetOption = Annotated[str, typer.Option(help="Address of a running suite.")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Bearer token to call with (default: STEWARD_TOKEN). TLS follows STEWARD_TLS_*.",
        show_default=False,
    ),
]
DirOption = Annotated[
    Path | None, typer.Option("--dir", help="Keys directory (default: STEWARD_KEYS_DIR).")
]


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as error:
        errors.print(f"[red]configuration error:[/red] {error}")
        raise typer.Exit(2) from error


@contextmanager
def _channel(target: str, token: str | None = None) -> Iterator[grpc.Channel]:
    """A channel to a running suite with this shell's credentials: the TLS files and token
    of the environment, or the token given on the command line."""
    import dataclasses

    settings = _settings()
    if token is not None:
        settings = dataclasses.replace(settings, token=token)
    try:
        channel = open_channel(target, settings)
    except ConfigError as error:
        errors.print(f"[red]configuration error:[/red] {error}")
        raise typer.Exit(2) from error
    with channel:
        yield channel


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
    import gc

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

    def started() -> None:
        suite.started()
        # What start-up allocated lives as long as the process: keeping it out of the
        # collector's reach makes each full collection, and so the tail latency, shorter.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    try:
        serve_until_stopped(
            suite.server,
            suite.health,
            settings.grace_seconds,
            on_started=started,
            on_stopping=suite.event_log.close if suite.event_log else None,
        )
    finally:
        suite.closed()
    logger.info("stopped")


@app.command("migrate")
def migrate_databases(
    service: Annotated[
        list[str] | None,
        typer.Option(help=f"Service to migrate (repeatable): {', '.join(SERVICES)}. Default: all."),
    ] = None,
) -> None:
    """Bring the services' databases to the newest schema, then exit.

    Run once per deployment before the services start; each service also migrates on start,
    which is then a no-op.
    """
    settings = _settings()
    configure_logging(settings)
    try:
        migrated = migrate(settings, service or SERVICES)
    except ValueError as error:
        errors.print(f"[red]cannot migrate:[/red] {error}")
        raise typer.Exit(2) from error
    console.print(f"migrated {', '.join(migrated)}")


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

    Health and reflection need no token, but a suite serving TLS is reached over TLS
    (STEWARD_TLS_*). Exits non-zero unless every service checked is SERVING.
    """
    with _channel(target) as channel:
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


@contextmanager
def _identity_stub(
    target: str, token: str | None
) -> Iterator[identity_pb2_grpc.IdentityServiceStub]:
    with _channel(target, token) as channel:
        yield identity_pb2_grpc.IdentityServiceStub(channel)


def _call(call: Callable[[], T]) -> T:
    """Run one RPC (or a run of them), turning an RPC error into a readable message and
    exit code 1."""
    try:
        return call()
    except grpc.RpcError as error:
        details = read_error_details(error)
        errors.print(f"[red]{error.code().name}[/red]: {details.message}")
        for field, description in details.field_violations.items():
            errors.print(f"  {field}: {description}")
        for _type, subject, description in details.precondition_failures:
            errors.print(f"  {subject}: {description}")
        raise typer.Exit(1) from error


def _print_json(message: Message) -> None:
    console.print_json(json_format.MessageToJson(message, preserving_proto_field_name=True))


@identity_app.command("put-rules")
def identity_put_rules(
    file: Annotated[Path, typer.Argument(help="YAML or JSON MergeRules document.")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = None,
) -> None:
    """Store a new version of the merge rules from a file (see examples/identity-rules.yaml)."""
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        rules = json_format.ParseDict(document, identity_pb2.MergeRules())
    except (OSError, yaml.YAMLError, json_format.ParseError) as error:
        errors.print(f"[red]cannot read {file}:[/red] {error}")
        raise typer.Exit(2) from error
    with _identity_stub(target, token) as stub:
        answer = _call(lambda: stub.PutRules(identity_pb2.PutRulesRequest(rules=rules), timeout=10))
    _print_json(answer)


@identity_app.command("get-rules")
def identity_get_rules(
    version: Annotated[int, typer.Option(help="Version; 0 for the current one.")] = 0,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = None,
) -> None:
    """Print the current (or a given) version of the merge rules."""
    with _identity_stub(target, token) as stub:
        answer = _call(
            lambda: stub.GetRules(identity_pb2.GetRulesRequest(version=version), timeout=10)
        )
    _print_json(answer)


@identity_app.command("person")
def identity_person(
    person_id: str, target: TargetOption = DEFAULT_TARGET, token: TokenOption = None
) -> None:
    """Print a person: hashed identifiers with their sources, and aliases."""
    with _identity_stub(target, token) as stub:
        answer = _call(
            lambda: stub.GetPerson(identity_pb2.GetPersonRequest(person_id=person_id), timeout=10)
        )
    _print_json(answer)


@identity_app.command("history")
def identity_history(
    person_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = None,
    limit: Annotated[int, typer.Option(help="Entries to show.")] = 50,
) -> None:
    """Print a person's merges, unmerges, refusals and quarantines, newest first."""
    with _identity_stub(target, token) as stub:
        answer = _call(
            lambda: stub.GetHistory(
                identity_pb2.GetHistoryRequest(person_id=person_id, page_size=limit), timeout=10
            )
        )
    _print_json(answer)


@identity_app.command("unmerge")
def identity_unmerge(
    merge_id: str,
    reason: Annotated[str, typer.Option(help="Why the merge was wrong (recorded).")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = None,
) -> None:
    """Undo one merge exactly: the absorbed persons come back with their own identifiers."""
    with _identity_stub(target, token) as stub:
        answer = _call(
            lambda: stub.Unmerge(
                identity_pb2.UnmergeRequest(merge_id=merge_id, reason=reason), timeout=10
            )
        )
    _print_json(answer)


# `steward audit`: the consent ledger, exported and verified offline -----------------------------

audit_app = typer.Typer(
    help="The consent ledger: export it, verify it offline, prove an entry is in it.",
    pretty_exceptions_show_locals=False,
)
app.add_typer(audit_app, name="audit")

PublicKeyOption = Annotated[
    Path,
    typer.Option("--public-key", help="The ledger's public key (PEM, `steward keys public`)."),
]


def _read_public_key(path: Path) -> str:
    """The auditor's copy of the public key; exit 2 when it is not an Ed25519 PEM key."""
    from rich.markup import escape

    from services.common.keyring import key_id_for_public_key

    try:
        pem = path.read_text(encoding="ascii")
        key_id_for_public_key(pem)
    except (OSError, UnicodeDecodeError, KeyringError) as error:
        errors.print(
            f"[red]cannot use the public key {escape(str(path))}:[/red] {escape(str(error))}"
        )
        raise typer.Exit(2) from error
    return pem


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="An export written by `steward audit export`.")],
    public_key: PublicKeyOption,
) -> None:
    """Verify a ledger export offline, trusting nothing but the given public key.

    Exits 0 when every entry and checkpoint verifies (entries after the newest checkpoint are
    only a warning), 1 naming the first entry that cannot be trusted, 2 when the file or the key
    cannot be read.
    """
    from rich.markup import escape

    from services.common.keyring import key_id_for_public_key
    from services.consent.audit import AuditFileError, verify_export

    pem = _read_public_key(public_key)
    try:
        report = verify_export(file, pem)
    except AuditFileError as error:
        errors.print(f"[red]cannot read {escape(str(file))}:[/red] {escape(str(error))}")
        raise typer.Exit(2) from error
    verdict = "[green]verified[/green]" if report.ok else "[red]FAILED[/red]"
    console.print(f"{verdict} {escape(str(file))}", soft_wrap=True)
    console.print(
        f"  entries: {report.entries}; checkpoints verified: {report.checkpoints_verified} of "
        f"{report.checkpoints}; signing key {key_id_for_public_key(pem)}",
        soft_wrap=True,
    )
    if not report.ok:
        first_bad = "-" if report.first_bad_seq is None else str(report.first_bad_seq)
        console.print(f"  first bad seq: {first_bad}", soft_wrap=True)
        for problem in report.problems:
            console.print(f"  [red]problem:[/red] {escape(problem)}", soft_wrap=True)
    for warning in report.warnings:
        console.print(f"  [yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("check-proof")
def audit_check_proof(
    file: Annotated[Path, typer.Argument(help="A proof written by `steward audit prove`.")],
    public_key: PublicKeyOption,
) -> None:
    """Check offline that an entry is in the ledger as signed by the given public key.

    Exits 0 when it is, 1 when the proof fails, 2 when the file or the key cannot be read.
    """
    from rich.markup import escape

    from services.consent.audit import AuditFileError, check_inclusion_proof, read_proof

    pem = _read_public_key(public_key)
    try:
        proof = read_proof(file)
    except AuditFileError as error:
        errors.print(f"[red]cannot read {escape(str(file))}:[/red] {escape(str(error))}")
        raise typer.Exit(2) from error
    included, explanation = check_inclusion_proof(
        proof.entry, proof.leaf_index, proof.tree_size, proof.audit_path, proof.checkpoint, pem
    )
    verdict = "[green]included:[/green]" if included else "[red]NOT PROVEN:[/red]"
    console.print(f"{verdict} {escape(explanation)}", soft_wrap=True)
    if not included:
        raise typer.Exit(1)


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option("--out", help="File to write (JSON Lines).")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds the whole export may take.")] = 600.0,
) -> None:
    """Download the whole ledger and its signed checkpoints for `steward audit verify`."""
    from google.protobuf import empty_pb2
    from rich.markup import escape
    from steward.consent.v1 import audit_pb2, audit_pb2_grpc

    from services.consent.audit import AuditFileError, write_export_stream

    counts: list[int] = []
    with _channel(target, token) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)

        def download() -> Message:
            responses = stub.ExportLedger(audit_pb2.ExportLedgerRequest(), timeout=timeout)
            counts.extend(write_export_stream(out, responses))
            return empty_pb2.Empty()

        try:
            _call(download)
        except (AuditFileError, OSError) as error:
            errors.print(f"[red]export failed:[/red] {escape(str(error))}")
            raise typer.Exit(1) from error
    entries, checkpoints = counts
    console.print(
        f"wrote {entries} entries and {checkpoints} checkpoints to {escape(str(out))}",
        soft_wrap=True,
    )


@audit_app.command("prove")
def audit_prove(
    seq: Annotated[int, typer.Argument(help="The entry's seq.")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="File to write (default: standard output).")
    ] = None,
    tree_size: Annotated[
        int, typer.Option(help="Tree size to prove against; 0 for the newest checkpoint's.")
    ] = 0,
) -> None:
    """Fetch an inclusion proof of one entry against a signed checkpoint, for `check-proof`."""
    from rich.markup import escape
    from steward.consent.v1 import audit_pb2, audit_pb2_grpc

    from services.consent.audit import proof_from_response, write_proof
    from services.consent.ledger import CheckpointNoteError

    request = audit_pb2.GetInclusionProofRequest(seq=seq, tree_size=tree_size)
    with _channel(target, token) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        answer = _call(lambda: stub.GetInclusionProof(request, timeout=10))
    assert isinstance(answer, audit_pb2.GetInclusionProofResponse)
    try:
        proof = proof_from_response(answer)
    except CheckpointNoteError as error:
        errors.print(f"[red]the suite sent a malformed checkpoint:[/red] {escape(str(error))}")
        raise typer.Exit(1) from error
    if proof.checkpoint is None:
        errors.print(
            f"[red]no checkpoint was signed at tree size {proof.tree_size}[/red]; "
            "ask for --tree-size 0 (the newest checkpoint)"
        )
        raise typer.Exit(1)
    if out is None:
        write_proof(sys.stdout, proof)
        return
    write_proof(out, proof)
    console.print(
        f"wrote the proof of seq {seq} in the ledger of {proof.tree_size} entries to "
        f"{escape(str(out))}",
        soft_wrap=True,
    )


maintenance_app = typer.Typer(
    help="Housekeeping that also runs inside the services.", pretty_exceptions_show_locals=False
)
app.add_typer(maintenance_app, name="maintenance")


@maintenance_app.command("sweep")
def maintenance_sweep() -> None:
    """Delete collected events past their purposes' retention (consent's database)."""
    from datetime import UTC, datetime

    from services.common.db import make_engine
    from services.common.migrations import upgrade
    from services.consent.store import CollectionStore, ConsentStore

    settings = _settings()
    engine = make_engine(settings.db_url("consent"))
    try:
        upgrade(engine, "consent")
        store = ConsentStore(engine)
        try:
            with store.writing() as connection:
                removed = CollectionStore(store).sweep(connection, datetime.now(UTC))
        finally:
            store.close()
    finally:
        engine.dispose()
    total = sum(removed.values())
    if not total:
        console.print("nothing past its retention")
        return
    console.print(f"removed {total} event{'s' if total != 1 else ''} past their retention")


# `steward eval`: offline evaluation of the recommenders -----------------------------------------

EVAL_FORMATS = ("movielens", "online-retail", "csv")
EVAL_SPLITS = ("random", "temporal")


@app.command("eval")
def evaluate_recommenders(
    interactions: Annotated[
        Path,
        typer.Option(
            "--interactions",
            help="Interaction file: MovieLens u.data, the UCI Online Retail CSV, or a CSV with "
            "person_id,item_id[,event_type,weight,timestamp,title,category,tags].",
        ),
    ],
    data_format: Annotated[
        str, typer.Option("--format", help=f"File format: {' | '.join(EVAL_FORMATS)}.")
    ] = "csv",
    split: Annotated[
        str,
        typer.Option(help="random (per person 80/20, seeded) | temporal (a global time cut-off)."),
    ] = "random",
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="List length.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 42,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Model to evaluate (repeatable). Default: all."),
    ] = None,
    half_life_days: Annotated[
        float | None, typer.Option(help="Half-life of interaction weights; default: no decay.")
    ] = None,
) -> None:
    """Train every recommender on a training part and print ranking metrics at k."""
    from rich.markup import escape
    from rich.progress import Progress

    from services.recommend.evaluation import (
        DataError,
        load_dataset,
        report_table,
        run_evaluation,
    )
    from services.recommend.interactions import InteractionSettings
    from services.recommend.models import MODEL_NAMES, build_model

    names = model or list(MODEL_NAMES)
    problems = []
    if data_format not in EVAL_FORMATS:
        problems.append(f"--format must be one of {', '.join(EVAL_FORMATS)}")
    if split not in EVAL_SPLITS:
        problems.append(f"--split must be one of {', '.join(EVAL_SPLITS)}")
    if set(names) - set(MODEL_NAMES):
        problems.append(f"--model must be among {', '.join(MODEL_NAMES)}")
    if half_life_days is not None and half_life_days <= 0:
        problems.append("--half-life-days must be positive")
    for problem in problems:
        errors.print(f"[red]{escape(problem)}[/red]")
    if problems:
        raise typer.Exit(2)
    try:
        dataset = load_dataset(interactions, data_format)
    except DataError as error:
        errors.print(f"[red]cannot read {escape(str(interactions))}:[/red] {escape(str(error))}")
        raise typer.Exit(2) from error
    with Progress(console=console, transient=True) as progress:
        report = run_evaluation(
            dataset,
            split=split,
            k=k,
            seed=seed,
            settings=InteractionSettings(half_life_days=half_life_days),
            candidates=[build_model(name) for name in names],
            progress=progress,
        )
    console.print(report_table(report))
    if report.citation:
        console.print(report.citation, soft_wrap=True)


# `steward certs` and `steward callers`: mutual TLS and who may call ------------------------------


@certs_app.command("init")
def certs_init(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Where to write them (default: $STEWARD_DATA_DIR/certs)."),
    ] = None,
    service: Annotated[
        list[str] | None,
        typer.Option(help="Service to make a certificate for (repeatable). Default: all four."),
    ] = None,
    caller: Annotated[
        list[str] | None,
        typer.Option(help="Caller to make a client certificate for (repeatable)."),
    ] = None,
    hosts: Annotated[
        str,
        typer.Option(
            help="Comma-separated DNS names and IPs the services are reached at (each service's "
            "own name is always added)."
        ),
    ] = ",".join(DEFAULT_HOSTS),
    force: Annotated[bool, typer.Option(help="Replace certificates that exist.")] = False,
    dev: Annotated[
        bool | None,
        typer.Option(
            "--dev/--production",
            help="Mark them as development certificates, which production refuses (default "
            "unless STEWARD_ENV=production).",
        ),
    ] = None,
) -> None:
    """Create a CA and certificates for the services and callers (mutual TLS).

    The CA's private key is written beside them: move it somewhere safe in production.
    """
    from rich.markup import escape

    from services.common.certs import CertificateError, init_certificates

    settings = _settings()
    target = directory or settings.data_dir / "certs"
    try:
        made = init_certificates(
            target,
            services=service or list(SERVICES),
            callers=caller or [],
            hosts=[host for host in hosts.split(",") if host.strip()],
            force=force,
            development=settings.env != "production" if dev is None else dev,
        )
    except CertificateError as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(1) from error
    kind = "development CA" if made.development else "CA"
    console.print(f"{kind}: {escape(str(made.ca.certificate))}", soft_wrap=True)
    for issued in (*made.services, *made.callers):
        console.print(
            f"  {issued.name}: {escape(str(issued.certificate))}, "
            f"{escape(str(issued.private_key))}",
            soft_wrap=True,
        )
    console.print(
        "serve with STEWARD_TLS_CERT, STEWARD_TLS_KEY (a service's) and STEWARD_TLS_CA "
        f"({escape(str(made.ca.certificate))})",
        soft_wrap=True,
    )


@callers_app.command("add")
def callers_add(
    name: Annotated[str, typer.Argument(help="The caller's name, recorded as the actor.")],
    scope: Annotated[
        list[str] | None,
        typer.Option(help="Scope to grant (repeatable); `steward callers scopes` lists them."),
    ] = None,
    all_scopes: Annotated[
        bool, typer.Option(help="Grant every scope there is now (written out one by one).")
    ] = False,
    certificate_subject: Annotated[
        str | None, typer.Option(help="CN of the caller's client certificate.")
    ] = None,
    token: Annotated[
        bool, typer.Option("--token/--no-token", help="Make a bearer token (printed once).")
    ] = True,
    rate: Annotated[
        float | None, typer.Option(help="Calls per second allowed on average (default: no limit).")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(help="Calls allowed at once (default: one second's worth).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="The callers file (default: STEWARD_CALLERS_FILE)."),
    ] = None,
) -> None:
    """Add a caller to the callers file and print its new token, once.

    The file keeps only the token's SHA-256; a lost token is replaced by adding the caller
    again under another name (or editing the file). Running servers read the file at start.
    """
    from rich.markup import escape

    from services.common.callers import (
        Caller,
        Callers,
        CallersFileError,
        RateLimitSpec,
        hash_token,
        new_token,
        parse_scopes,
    )
    from services.common.scopes import known_scopes

    path = file or _settings().callers_file
    if path is None:
        errors.print("[red]name the callers file with --file or STEWARD_CALLERS_FILE[/red]")
        raise typer.Exit(2)
    if not token and certificate_subject is None:
        errors.print("[red]a caller needs a token, a --certificate-subject, or both[/red]")
        raise typer.Exit(2)
    if burst is not None and rate is None:
        errors.print("[red]--burst needs --rate[/red]")
        raise typer.Exit(2)
    scopes = sorted(known_scopes()) if all_scopes else list(scope or [])
    fresh_token = new_token() if token else None
    try:
        existing = Callers.load(path, known_scopes()) if path.exists() else Callers([])
        limit = None
        if rate is not None:
            if not rate > 0 or (burst is not None and burst < 1):
                raise CallersFileError("--rate must be positive and --burst at least 1")
            limit = RateLimitSpec(rate, burst or max(1, math.ceil(rate)))
        callers = existing.adding(
            Caller(
                name=name,
                scopes=parse_scopes(scopes, known_scopes(), f"caller {name!r}"),
                token_sha256=None if fresh_token is None else hash_token(fresh_token),
                certificate_subject=certificate_subject,
                rate_limit=limit,
            )
        )
        callers.save(path)
    except CallersFileError as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(1) from error
    errors.print(f"added {escape(name)} to {escape(str(path))}: {', '.join(scopes)}")
    if fresh_token is not None:
        errors.print("its token (shown only now; the file keeps its SHA-256):")
        sys.stdout.write(fresh_token + "\n")


@callers_app.command("scopes")
def callers_scopes() -> None:
    """List every scope and the RPCs that require it, as the protos declare them."""
    from services.common.scopes import rpc_methods

    table = Table("scope", "methods")
    by_scope: dict[str, list[str]] = {}
    for method in rpc_methods().values():
        by_scope.setdefault(method.scope or "(none)", []).append(method.path.lstrip("/"))
    for scope_name in sorted(by_scope):
        table.add_row(scope_name, "\n".join(sorted(by_scope[scope_name])))
    console.print(table)


# `steward demo`: a shop played against a running suite -------------------------------------------

DEMO_CUSTOMERS = 200


@app.command()
def demo(
    target: TargetOption = DEFAULT_TARGET,
    customers: Annotated[
        int,
        typer.Option(min=4, max=700, help="UCI customers to play as shoppers (700 bought)."),
    ] = DEMO_CUSTOMERS,
    seed: Annotated[int, typer.Option(help="Seed of the shoppers, consents and browsing.")] = 7,
    token: TokenOption = None,
) -> None:
    """Play the UCI Online Retail slice as a shop against a running suite, then print what each
    service knows: consents, events across channels, merges, GPC, a withdrawal, an erasure,
    recommendations, and the ledger export verified offline."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.demo.play import DemoError, play
    from services.demo.shop import ShopDataError
    from services.demo.summary import summary_tables

    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with _channel(target, token) as channel, Progress(*columns, console=console) as progress:
            summary = _call(
                lambda: play(channel, customers=customers, seed=seed, progress=progress)
            )
    except (DemoError, ShopDataError) as error:
        errors.print(f"[red]demo stopped:[/red] {escape(str(error))}")
        raise typer.Exit(1) from error
    console.print(summary_tables(summary))
    if not summary.ledger_verified:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the `steward` console script."""
    app()
