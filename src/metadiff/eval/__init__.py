"""Evaluation helpers shared by stages (zero-shot scoring, confidence intervals)."""
