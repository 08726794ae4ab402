"""Tagging: dynamic, explainable tags from behaviour, held in check by guardrails."""
