"""Moments as every service stores and sends them: aware datetimes in UTC, protobuf Timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SECONDS: Final = range(-62_135_596_800, 253_402_300_800)
"""The seconds of 0001-01-01 to 9999-12-31: the moments a Timestamp (and a datetime) can be."""
INVALID_MOMENT: Final = "a moment between the years 1 and 9999 (nanos 0 to 999,999,999)"
"""The field violation of a Timestamp :func:`moment_of` refuses."""
_DURATION_SECONDS: Final = 315_576_000_000
"""The largest Duration protobuf defines (10,000 years), either way."""
INVALID_DURATION: Final = "a duration of at most 10,000 years (nanos of the same sign, under 1 s)"
"""The field violation of a Duration :func:`duration_of` refuses."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back naive; everything stored is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def timestamp(moment: datetime | None) -> Timestamp | None:
    """The protobuf Timestamp of a moment (naive ones taken as UTC), or None for None."""
    if moment is None:
        return None
    value = Timestamp()
    value.FromDatetime(utc(moment))
    return value


def moment_of(stamp: Timestamp) -> datetime | None:
    """The moment a Timestamp from a request names, in UTC; None when it names none (seconds
    outside the years 1 to 9999, or nanos outside a second), for the caller to refuse as
    ``INVALID_MOMENT``. Arithmetic rather than ``ToDatetime``: half its cost, and no ValueError
    to turn into INTERNAL."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if seconds not in _SECONDS or not 0 <= nanos < 1_000_000_000:
        return None
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def duration_of(duration: Duration) -> timedelta | None:
    """The timedelta a Duration from a request names; None when it is outside protobuf's own
    range or its nanos disagree with its seconds, for the caller to refuse as
    ``INVALID_DURATION``."""
    seconds, nanos = duration.seconds, duration.nanos
    if abs(seconds) > _DURATION_SECONDS or abs(nanos) >= 1_000_000_000:
        return None
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        return None
    return timedelta(seconds=seconds, microseconds=nanos // 1000)
