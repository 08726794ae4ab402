"""Structured logging for Steward processes.

Machines read JSON lines (one object per record, with any ``extra=`` fields and the current
trace and span ids, so a log line can be found from its trace); people at a terminal read text.
Every record passes ``RedactingFilter`` on its way to the handler: log lines must never carry
raw identifiers, and this catches the ones a careless format string lets through.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

from opentelemetry import trace

from services.common.redaction import REDACTED, names_identifier, redact_text

if TYPE_CHECKING:
    from services.common.config import Settings

_HANDLER_NAME: Final = "steward"

_RECORD_ATTRIBUTES: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class RedactingFilter(logging.Filter):
    """Replaces email- and phone-shaped text in a record before any handler formats it.

    The message is formatted with its arguments first and the result redacted, so identifiers
    hidden in an argument's ``repr`` are caught too. String ``extra`` fields are redacted the
    same way and fields named for an identifier are blanked; numeric extras are left alone, so
    counts and sequence numbers belong there rather than in the message text. Exception
    tracebacks are rendered and redacted here as well.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        for key, value in _extra_fields(record).items():
            if names_identifier(key):
                setattr(record, key, REDACTED)
            elif isinstance(value, str):
                setattr(record, key, redact_text(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, then extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = trace.format_trace_id(span_context.trace_id)
            entry["span_id"] = trace.format_span_id(span_context.span_id)
        for key, value in _extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Readable lines with extra fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{key}={value!r}" for key, value in _extra_fields(record).items())
        if not extras:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} {extras}{newline}{rest}"


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (default stderr) at ``settings.log_level``.

    ``log_format`` "auto" picks JSON unless the stream is a terminal. Calling it again replaces
    the handler it installed before instead of adding another, so records are never doubled.
    Returns the installed handler.
    """
    target = sys.stderr if stream is None else stream
    interactive = target.isatty()
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not interactive)
    handler: logging.Handler
    if use_json:
        handler = logging.StreamHandler(target)
        handler.setFormatter(JsonFormatter())
    elif interactive:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=target), rich_tracebacks=False)
        handler.setFormatter(TextFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(target)
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-8s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }
