import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import Settings
from services.common.logging import RedactingFilter, configure_logging
from services.common.telemetry import setup_telemetry


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _settings(**environ: str) -> Settings:
    return Settings.from_env(environ)


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_non_terminal_gets_json_lines_with_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging(_settings(), stream=stream)

    logging.getLogger("steward.consent").info(
        "stored %d events", 12, extra={"batch": 500, "purpose": "analytics"}
    )

    (entry,) = _json_lines(stream)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "steward.consent"
    assert entry["message"] == "stored 12 events"
    assert (entry["batch"], entry["purpose"]) == (500, "analytics")
    assert str(entry["timestamp"]).endswith("+00:00")


def test_terminal_gets_readable_text() -> None:
    stream = _Terminal()
    configure_logging(_settings(), stream=stream)

    logging.getLogger("steward.tagging").warning("rule disabled", extra={"rule": "vip"})

    output = stream.getvalue()
    assert "WARNING" in output
    assert "rule disabled" in output
    assert "vip" in output
    assert not output.lstrip().startswith("{")


def test_explicit_format_overrides_the_terminal_check() -> None:
    terminal = _Terminal()
    configure_logging(_settings(STEWARD_LOG_FORMAT="json"), stream=terminal)
    logging.getLogger("a").warning("to a terminal")
    assert _json_lines(terminal)[0]["message"] == "to a terminal"

    pipe = io.StringIO()
    configure_logging(_settings(STEWARD_LOG_FORMAT="text"), stream=pipe)
    logging.getLogger("a").warning("to a pipe", extra={"n": 1})
    assert pipe.getvalue().rstrip().endswith("a: to a pipe n=1")


def test_reconfiguring_replaces_the_handler_and_sets_the_level() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(_settings(), stream=first)
    configure_logging(_settings(STEWARD_LOG_LEVEL="WARNING"), stream=second)

    logging.getLogger("steward").info("hidden")
    logging.getLogger("steward").warning("shown")

    assert first.getvalue() == ""
    assert [entry["message"] for entry in _json_lines(second)] == ["shown"]


def test_identifiers_are_redacted_from_messages_args_extras_and_tracebacks() -> None:
    stream = io.StringIO()
    configure_logging(_settings(), stream=stream)
    log = logging.getLogger("steward.identity")

    log.info("resolving %s", "alice@example.com")
    log.info("call %s about %r", "+44 7700 900123", {"owner": "bob@example.org"})
    log.info("lookup", extra={"email": "carol@example.net", "note": "re dave@example.com"})
    try:
        raise LookupError("no person for erin@example.com")
    except LookupError:
        log.exception("resolve failed")

    output = stream.getvalue()
    for raw in ("alice@", "bob@", "carol@", "dave@", "erin@", "7700 900123"):
        assert raw not in output
    first, second, third, fourth = _json_lines(stream)
    assert first["message"] == "resolving [redacted]"
    assert second["message"] == "call [redacted] about {'owner': '[redacted]'}"
    assert (third["email"], third["note"]) == ("[redacted]", "re [redacted]")
    assert "LookupError: no person for [redacted]" in str(fourth["exception"])


def test_numbers_in_extra_fields_are_not_mistaken_for_phones() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "applied", None, None)
    record.__dict__["seq"] = 12345678

    RedactingFilter().filter(record)

    assert record.__dict__["seq"] == 12345678


def test_json_lines_carry_the_current_trace() -> None:
    stream = io.StringIO()
    configure_logging(_settings(), stream=stream)
    telemetry = setup_telemetry(_settings(), "consent", span_exporter=InMemorySpanExporter())

    with telemetry.tracer("test").start_as_current_span("Collect") as span:
        logging.getLogger("steward").info("inside")
    telemetry.shutdown()

    (entry,) = _json_lines(stream)
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
