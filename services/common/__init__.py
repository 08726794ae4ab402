"""Shared building blocks used by every Steward service."""
