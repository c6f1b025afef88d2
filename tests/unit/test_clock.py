"""``scaleodm.common.clock``: the one wall clock (system or manual) and the one backoff schedule.

Covered: ``now``/``now_ms`` follow the installed clock and fall back to the system's after
``use``; ``ManualClock`` moves only when advanced; ``backoff_s`` — the exponential schedule, its
cap, attempts below 1, no overflow for huge attempts, jitter bounds and its validation.

Left out: the callers' use of the schedule (``test_command_handler.py``, ``test_notifier.py``).
"""

from __future__ import annotations

import datetime as dt
import random

import pytest

from scaleodm.common import clock

START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def test_manual_clock_moves_only_when_told() -> None:
    manual = clock.ManualClock(START)
    with clock.use(manual):
        assert clock.now() == START
        assert clock.now_ms() == int(START.timestamp() * 1000)
        manual.advance(1.5)
        assert clock.now() == START + dt.timedelta(seconds=1.5)
        assert clock.now_ms() == int(START.timestamp() * 1000) + 1500
    system = clock.now()
    assert system.tzinfo is not None
    assert abs((system - dt.datetime.now(dt.UTC)).total_seconds()) < 5


def test_manual_clock_needs_a_timezone() -> None:
    with pytest.raises(ValueError):
        clock.ManualClock(dt.datetime(2026, 1, 1))  # naive: no timezone


@pytest.mark.parametrize(
    ("attempt", "base_s", "max_s", "delay_s"),
    [
        pytest.param(1, 1.0, 60.0, 1.0, id="first"),
        pytest.param(2, 1.0, 60.0, 2.0, id="second"),
        pytest.param(6, 1.0, 60.0, 32.0, id="sixth"),
        pytest.param(7, 1.0, 60.0, 60.0, id="capped"),
        pytest.param(0, 1.0, 60.0, 1.0, id="zero-is-first"),
        pytest.param(-3, 1.0, 60.0, 1.0, id="negative-is-first"),
        pytest.param(10**9, 1.0, 300.0, 300.0, id="huge-no-overflow"),
        pytest.param(3, 0.25, 300.0, 1.0, id="fractional-base"),
    ],
)
def test_backoff_schedule(attempt: int, base_s: float, max_s: float, delay_s: float) -> None:
    assert clock.backoff_s(attempt, base_s=base_s, max_s=max_s) == delay_s


@pytest.mark.parametrize("jitter", [0.25, 0.5, 1.0])
def test_backoff_jitter_stays_within_its_share_of_the_step(jitter: float) -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        step = clock.backoff_s(attempt, base_s=1, max_s=60)
        delays = [
            clock.backoff_s(attempt, base_s=1, max_s=60, jitter=jitter, rng=rng) for _ in range(50)
        ]
        assert all(step * (1 - jitter) <= d <= step for d in delays)
        assert len(set(delays)) > 1


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_backoff_jitter_outside_0_1_refused(jitter: float) -> None:
    with pytest.raises(ValueError):
        clock.backoff_s(1, base_s=1, max_s=2, jitter=jitter)
