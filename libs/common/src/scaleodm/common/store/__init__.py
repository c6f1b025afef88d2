"""Persistence: the MongoDB task store and event log, and S3 access."""
