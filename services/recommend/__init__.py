"""Recommend: consent-aware, real-time, diverse and explainable recommendations."""
