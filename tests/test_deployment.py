"""compose.yaml, the Dockerfile and .dockerignore describe a deployment that can actually run.

No Docker engine is needed: compose.yaml is validated against the Compose Specification's JSON
schema (compose-spec/compose-spec, Apache-2.0, as vendored by the check-jsonschema package under
the name ``vendor.compose-spec``) and then cross-checked against itself, the Dockerfile, the
settings the services read, the services that exist and the README.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from jsonschema import Draft202012Validator

from services.common.config import SERVICE_DATABASES, Settings, environment_variables
from services.runtime import SERVICES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
SECRETS_DIR = "deploy/secrets/"
SECRETS_MOUNT = "/run/secrets/"
STEWARD_IMAGE_USER = "10001"

AWAITED_VARIABLES: frozenset[str] = frozenset()
"""Variables compose.yaml already passes that work in progress (issue #8) adds to
``Settings.from_env``; drop each from here once the settings read it."""


# Reading the files ----------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def steward_services() -> dict[str, dict[str, Any]]:
    """The services run from the image the Dockerfile builds."""
    return {name: spec for name, spec in services().items() if "build" in spec}


def servers() -> dict[str, dict[str, Any]]:
    """The steward services that serve (``steward serve``), as opposed to one-shot jobs."""
    return {
        name: spec for name, spec in steward_services().items() if spec["command"][0] == "serve"
    }


def environment(spec: dict[str, Any]) -> dict[str, str]:
    given = spec.get("environment") or {}
    if isinstance(given, list):
        given = dict(item.split("=", 1) for item in given)
    return {name: str(value) for name, value in given.items()}


def option(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def mounted_secrets(spec: dict[str, Any]) -> dict[str, str]:
    """source -> absolute path inside the container, for the service's secrets."""
    mounts = {}
    for entry in spec.get("secrets", []):
        source, target = (entry, entry) if isinstance(entry, str) else (entry["source"], None)
        if not isinstance(entry, str):
            target = entry.get("target", source)
        assert target is not None
        mounts[source] = target if target.startswith("/") else SECRETS_MOUNT + target
    return mounts


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, with their build stage."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    instructions = []
    stage = -1
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = max(instruction.stage for instruction in instructions)
    return [instruction for instruction in instructions if instruction.stage == last]


def exec_form(arguments: str) -> list[str]:
    assert arguments.startswith("["), f"use the exec form (a JSON array): {arguments}"
    parsed = yaml.safe_load(arguments)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def dockerfile_env() -> dict[str, str]:
    variables = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                variables[name] = value
    return variables


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context, by .dockerignore's rules: each
    pattern matches a path or one of its parent directories, ``!`` re-includes, the last
    matching pattern decides."""
    excluded = False
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.compile(_glob_to_regex(pattern))
        parts = path.split("/")
        prefixes = ("/".join(parts[: i + 1]) for i in range(len(parts)))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def _glob_to_regex(pattern: str) -> str:
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return regex


def files_under(directory: Path) -> Iterator[str]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path.relative_to(ROOT).as_posix()


def readme_deployment_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Deployment\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Deployment' section"
    return match.group(1)


# The compose file against the specification ---------------------------------------------------


def compose_validator() -> Draft202012Validator:
    schema = get_builtin_schema("vendor.compose-spec")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    problems = [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in compose_validator().iter_errors(compose())
    ]
    assert problems == []


def test_the_schema_rejects_a_misspelt_compose_key() -> None:
    misspelt = {"services": {"consent": {"image": "steward:local", "helthcheck": {"test": "x"}}}}

    errors = list(compose_validator().iter_errors(misspelt))

    assert errors
    assert any("helthcheck" in error.message for error in errors)


# What the compose file names exists -----------------------------------------------------------


def test_every_service_has_an_image_or_a_build() -> None:
    for name, spec in services().items():
        assert "image" in spec or "build" in spec, name


def test_the_suite_runs_from_the_one_dockerfile() -> None:
    built = steward_services()
    images = {spec.get("image") for spec in built.values()}
    contexts = {spec["build"]["context"] for spec in built.values()}

    assert len(images) == 1
    assert contexts == {"."}
    assert (ROOT / "Dockerfile").is_file()


def test_depends_on_names_only_defined_services() -> None:
    defined = set(services())
    for name, spec in services().items():
        dependencies = spec.get("depends_on", {})
        named = set(dependencies if isinstance(dependencies, list) else dependencies.keys())
        assert named <= defined, f"{name} depends on undefined {named - defined}"
        assert name not in named


def test_each_service_named_is_served_by_exactly_one_container() -> None:
    served = [option(spec["command"], "--service") for spec in servers().values()]

    assert sorted(served) == sorted(SERVICES)


def test_servers_serve_a_real_service_on_the_port_they_check_and_expose() -> None:
    for name, spec in servers().items():
        command = spec["command"]
        assert option(command, "--service") in SERVICES, name
        port = option(command, "--port")
        assert port in [str(exposed) for exposed in spec["expose"]], name
        published = [str(mapping).rsplit(":", 1)[-1] for mapping in spec.get("ports", [])]
        assert set(published) <= {port}, name
        check = spec["healthcheck"]["test"]
        assert check[:3] == ["CMD", "steward", "health"], name
        assert option(check, "--target") == f"localhost:{port}", name


def test_no_two_services_publish_the_same_host_port() -> None:
    published = [
        str(mapping).rsplit(":", 1)[0]
        for spec in services().values()
        for mapping in spec.get("ports", [])
    ]

    assert len(published) == len(set(published))


def test_migrations_run_once_before_any_server_starts() -> None:
    jobs = {name: spec for name, spec in steward_services().items() if name not in servers()}
    assert [spec["command"] for spec in jobs.values()] == [["migrate"]]
    (job,) = jobs
    assert jobs[job]["healthcheck"] == {"disable": True}
    assert jobs[job]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, spec in servers().items():
        assert spec["depends_on"][job]["condition"] == "service_completed_successfully", name


def test_every_database_has_a_postgresql_url_and_is_created() -> None:
    created = set(
        re.findall(
            r"^CREATE DATABASE (\w+);",
            (ROOT / "deploy/postgres/init-databases.sql").read_text(encoding="utf-8"),
            flags=re.MULTILINE,
        )
    )
    postgres = services()["postgres"]
    mounted_init = [
        volume for volume in postgres["volumes"] if "docker-entrypoint-initdb.d" in volume
    ]
    assert [volume.split(":")[0] for volume in mounted_init] == [
        "./deploy/postgres/init-databases.sql"
    ]
    for name, spec in steward_services().items():
        variables = environment(spec)
        for database in SERVICE_DATABASES:
            # Without one, a service would fall back to SQLite in its read-only container.
            url = urlsplit(variables[f"STEWARD_{database.upper()}_DB_URL"])
            assert url.scheme.startswith("postgresql"), (name, database)
            assert url.hostname == "postgres" and url.password is None, (name, database)
            assert url.path.lstrip("/") in created, (name, database)


def test_service_addresses_point_at_defined_services_and_ports() -> None:
    for name, spec in servers().items():
        variables = environment(spec)
        for variable in ("STEWARD_CONSENT_TARGET", "STEWARD_IDENTITY_TARGET"):
            host, port = variables[variable].rsplit(":", 1)
            assert host == variable.split("_")[1].lower(), (name, variable)
            assert option(services()[host]["command"], "--port") == port, (name, variable)
        endpoint = urlsplit(variables["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname in services(), name
        assert str(endpoint.port) in [str(p) for p in services()[endpoint.hostname]["expose"]]
        nats = urlsplit(variables["STEWARD_NATS_URL"])
        assert nats.hostname in services(), name


def test_nats_runs_jetstream_on_a_volume_and_traces_reach_jaeger() -> None:
    nats = services()["nats"]
    assert "--jetstream" in nats["command"] or "-js" in nats["command"]
    store = option(nats["command"], "--store_dir")
    assert any(volume.endswith(f":{store}") for volume in nats["volumes"])
    collector = yaml.safe_load(
        (ROOT / "deploy/otel-collector/config.yaml").read_text(encoding="utf-8")
    )
    trace_exporters = collector["service"]["pipelines"]["traces"]["exporters"]
    for exporter in trace_exporters:
        host = collector["exporters"][exporter]["endpoint"].split(":")[0]
        assert host in services(), exporter


def test_every_secret_is_defined_used_and_made_by_a_documented_step() -> None:
    defined = compose()["secrets"]
    used = {source for spec in services().values() for source in mounted_secrets(spec)}
    assert used == set(defined)
    deployment = readme_deployment_section()
    for name, secret in defined.items():
        file = secret["file"].removeprefix("./")
        if (ROOT / file).is_file() and not file.startswith(SECRETS_DIR):
            continue
        assert file.startswith(SECRETS_DIR), f"secret {name}: keep generated secrets there"
        assert file in deployment, f"README's Deployment section does not say how {file} is made"
    assert "/deploy/secrets/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_paths_under_run_secrets_are_mounted_in_that_container() -> None:
    for name, spec in services().items():
        mounted = set(mounted_secrets(spec).values())
        directories = {path.rsplit("/", 1)[0] for path in mounted}
        for variable, value in environment(spec).items():
            if value.startswith(SECRETS_MOUNT):
                assert value in mounted | directories, f"{name}: {variable}={value} is not mounted"


def test_steward_variables_in_compose_and_dockerfile_are_read_by_the_settings() -> None:
    read = environment_variables()
    given = set(dockerfile_env())
    for spec in steward_services().values():
        given |= set(environment(spec))
    steward = {name for name in given if name.startswith(("STEWARD_", "OTEL_"))}

    assert steward - read <= AWAITED_VARIABLES, f"not read by Settings: {steward - read}"


def test_each_containers_environment_makes_valid_production_settings() -> None:
    for name, spec in steward_services().items():
        variables = {
            variable: re.sub(r"\$\{[^}]*\}", "set-by-the-operator", value)
            for variable, value in environment(spec).items()
        }

        settings = Settings.from_env(variables)

        assert settings.env == "production", name
        for database in SERVICE_DATABASES:
            url = variables[f"STEWARD_{database.upper()}_DB_URL"]
            assert settings.db_url(database) == url, (name, database)


def test_servers_run_in_production_mode_with_telemetry() -> None:
    for name, spec in servers().items():
        variables = environment(spec)
        assert variables["STEWARD_ENV"] == "production", name
        assert variables["OTEL_EXPORTER_OTLP_ENDPOINT"], name
        assert variables["STEWARD_HOST"] == "0.0.0.0", name


# The Dockerfile and its build context ---------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = [
        instruction.arguments for instruction in dockerfile() if instruction.keyword == "FROM"
    ]

    assert len(stages) >= 2
    assert all(stage.startswith("python:3.11-slim") for stage in stages)


def test_dockerfile_runs_steward_as_a_non_root_user() -> None:
    final = final_stage()
    users = [instruction.arguments for instruction in final if instruction.keyword == "USER"]
    assert users, "the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == STEWARD_IMAGE_USER
    (entrypoint,) = [i.arguments for i in final if i.keyword == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["steward"]
    (command,) = [i.arguments for i in final if i.keyword == "CMD"]
    assert exec_form(command)[0] == "serve"


def test_dockerfile_health_check_asks_steward_health_on_the_exposed_port() -> None:
    final = final_stage()
    (exposed,) = [i.arguments for i in final if i.keyword == "EXPOSE"]
    (check,) = [i.arguments for i in final if i.keyword == "HEALTHCHECK"]
    probe = exec_form(check.split("CMD", 1)[1].strip())

    assert probe[:2] == ["steward", "health"]
    assert option(probe, "--target") == f"localhost:{exposed}"
    assert dockerfile_env()["STEWARD_PORT"] == exposed


def test_build_context_holds_everything_the_package_needs() -> None:
    needed = ["pyproject.toml", "README.md", *files_under(ROOT / "services")]
    copied = [
        source
        for instruction in dockerfile()
        if instruction.keyword == "COPY" and "--from" not in instruction.arguments
        for source in shlex.split(instruction.arguments)[:-1]
    ]

    assert not [path for path in needed if dockerignore_excludes(path)]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source.rstrip("/")), source
    assert any(source.startswith("services") for source in copied)


@pytest.mark.parametrize(
    "path",
    [
        "deploy/secrets/keys/keyring.json",
        "data/keys/keyring.json",
        ".venv/bin/python",
        ".git/config",
        "node_modules/.bin/buf",
        "services/__pycache__/cli.cpython-311.pyc",
    ],
)
def test_build_context_leaves_out_secrets_and_local_state(path: str) -> None:
    assert dockerignore_excludes(path)
