"""Benchmarks: figures for speed and memory, printed and written as JSON (never asserted)."""
