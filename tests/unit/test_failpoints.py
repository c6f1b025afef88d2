"""Failpoints: parsing ``SCALEODM_FAILPOINTS`` and the ``action:p`` probability (chaos runs)."""

from __future__ import annotations

import asyncio
import random

import pytest

from scaleodm.common import failpoints


def test_parse_names_actions_and_defaults() -> None:
    assert failpoints.parse(" a=crash , b, c=crash:0.25,") == {
        "a": "crash", "b": "hang", "c": "crash:0.25"}
    assert failpoints.parse("") == {}


async def test_unset_points_and_zero_chance_do_nothing() -> None:
    points = failpoints.Failpoints("x=hang:0")
    await asyncio.wait_for(points.hit("x"), 1)
    await asyncio.wait_for(points.hit("other"), 1)


async def test_a_chance_acts_about_that_often(monkeypatch: pytest.MonkeyPatch) -> None:
    points = failpoints.Failpoints("x=hang:0.3")
    rolls = iter([0.1, 0.5, 0.29, 0.3])
    monkeypatch.setattr(random, "random", lambda: next(rolls))
    acted = []
    for _ in range(4):
        try:
            await asyncio.wait_for(points.hit("x"), 0.05)
            acted.append(False)
        except TimeoutError:
            acted.append(True)
    assert acted == [True, False, True, False]
