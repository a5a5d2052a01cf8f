"""Benchmarks (`make bench`): side-by-side comparisons in one process, written as JSON."""
