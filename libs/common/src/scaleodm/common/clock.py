"""One clock and one backoff: where every timestamp and every retry delay comes from.

- **Wall-clock time** (event times, ``*_at`` fields, ``*_ms`` epoch milliseconds, webhook
  schedules, ages of records) comes from :func:`now` / :func:`now_ms`, which ask the current
  :class:`Clock`: the system's (UTC, timezone-aware) unless a test installs a
  :class:`ManualClock` with :func:`use` and moves it instead of sleeping.
- **Timeouts and elapsed durations** inside one process (latency of an HTTP attempt, "paused
  until", cache expiry) use ``time.monotonic()`` directly. That is a different clock on purpose:
  it never jumps with NTP or a moved wall clock, and its values mean nothing outside the process,
  so it is never stored or compared with the times above.
- **Retry delays** come from :func:`backoff_s`, the one schedule (its formula is in its docstring):
  the scheduler's command redeliveries, the notifier's event redeliveries and webhook retries.

Stdlib only, no I/O beyond reading the system clock: every layer may import it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
from collections.abc import Iterator
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "backoff_s", "from_ms", "month_of", "now",
           "now_ms", "to_ms", "use"]

MAX_EXPONENT = 64  # 2**64 times any base is past every sensible cap; no float overflow


class Clock(Protocol):
    """A source of the current wall-clock time."""

    def now(self) -> dt.datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class SystemClock:
    """The system's wall clock, in UTC."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._at = start if start is not None else dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        if self._at.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start")

    def now(self) -> dt.datetime:
        return self._at

    def advance(self, seconds: float) -> dt.datetime:
        """Move forward by ``seconds``; the new time."""
        self._at += dt.timedelta(seconds=seconds)
        return self._at


_current: Clock = SystemClock()


def now() -> dt.datetime:
    """The current wall-clock time (UTC, timezone-aware)."""
    return _current.now()


def to_ms(at: dt.datetime) -> int:
    """``at`` as Unix epoch milliseconds (NodeODM's ``dateCreated`` unit)."""
    return int(at.timestamp() * 1000)


def from_ms(ms: int) -> dt.datetime:
    """Unix epoch milliseconds as a UTC datetime (the inverse of :func:`to_ms`)."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def now_ms() -> int:
    """The current wall-clock time as Unix epoch milliseconds."""
    return to_ms(now())


def month_of(at: dt.datetime) -> str:
    """The calendar month ``at`` falls in, in UTC, ``YYYY-MM``: the period of the monthly image
    quota (``tenants.quota_month``) and of the usage records (``store/usage.py``)."""
    return at.astimezone(dt.UTC).strftime("%Y-%m")


@contextlib.contextmanager
def use(clock: Clock) -> Iterator[Clock]:
    """Make ``clock`` the current clock inside the block (tests); the previous one after it."""
    global _current
    previous, _current = _current, clock
    try:
        yield clock
    finally:
        _current = previous


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """The delay before trying again after failed attempt number ``attempt`` (1-based).

    The schedule is exponential, capped::

        step(n) = min(base_s * 2 ** (n - 1), max_s)      (n < 1 counts as 1)

    so base, 2·base, 4·base, ... max_s (base 1 s, max 60 s: 1, 2, 4, 8, 16, 32, 60, 60 ...).
    With ``jitter`` ``j`` in [0, 1] the delay is drawn uniformly from ``[(1 - j)·step, step]``:
    0 (the default) is the plain schedule; 0.5 is "equal jitter" — half the step fixed, half
    random, so clients failing together do not retry in lockstep.
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], not {jitter}")
    exponent = min(max(attempt, 1) - 1, MAX_EXPONENT)
    step = min(base_s * 2.0**exponent, max_s)
    if jitter == 0.0:
        return step
    fixed = step * (1.0 - jitter)
    uniform = rng.uniform if rng is not None else random.uniform
    return fixed + uniform(0.0, step - fixed)
