"""Storage outages as one small vocabulary: is this failure "MongoDB or S3 is away, retry later"?

Callers outside the store may import neither pymongo nor botocore (import-linter contracts), yet
the gateway must tell a storage outage (answered ``Storage unavailable, please retry later``, as
NodeODM answers what it cannot do right now) from a bug (``Internal error (ref ...)``). So:

- the S3 facade raises ``StorageUnavailable`` itself: its requests have deadlines and it turns
  connection failures, timeouts and 5xx answers into it (``store/s3.py``);
- pymongo's errors are recognised here: connection failures (``AutoReconnect`` and its kin,
  ``NetworkTimeout``, ``ServerSelectionTimeoutError``) and any error pymongo marks as a timeout
  (``timeoutMS`` expired: ``ExecutionTimeout``, ``WTimeoutError``, ...).

``is_unavailable`` is the one classifier; an exception group counts when all its members do.
``OUTAGE_TYPES`` names the classes it can say yes to, for frameworks that pick error handlers by
class (the gateway's).
"""

from __future__ import annotations

from pymongo.errors import ConnectionFailure, PyMongoError


class StorageUnavailable(Exception):
    """MongoDB or S3 did not answer in time, or could not be reached; retrying later may work."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means a storage dependency is away (not a bug, not bad input)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_unavailable(e) for e in exc.exceptions)
    if isinstance(exc, StorageUnavailable | ConnectionFailure):
        return True
    return isinstance(exc, PyMongoError) and exc.timeout


# Every exception is_unavailable can say yes to (groups aside) is an instance of one of these.
OUTAGE_TYPES: tuple[type[Exception], ...] = (StorageUnavailable, PyMongoError)
