"""Persistence: the MongoDB task store and event log, and S3 access."""

from scaleodm.common.store.availability import OUTAGE_TYPES, StorageUnavailable, is_unavailable

__all__ = ["OUTAGE_TYPES", "StorageUnavailable", "is_unavailable"]
