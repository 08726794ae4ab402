"""Moments as every service stores and sends them: aware datetimes in UTC, protobuf Timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


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
