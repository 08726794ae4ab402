"""Consent: purposes, decisions, signals, consented collection, the ledger, erasure, access."""
