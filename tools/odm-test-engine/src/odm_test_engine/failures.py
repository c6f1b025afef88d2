"""Failure injection of the ODM test double: the marker image and the injected failure.

Shared by the engine (the run's own stages) and the split-merge executor (local submodels).
"""

from __future__ import annotations

import re
from pathlib import Path

FAIL_MARKER = re.compile(r"^odm-test-engine-fail-(\d{1,3})\.", re.IGNORECASE)


def failure_marker(paths: list[Path]) -> int | None:
    """Per-run failure trigger: an input image named ``odm-test-engine-fail-<code>.<ext>``.

    Lets one task of many fail (the environment variable fails every run of a process).
    """
    for path in paths:
        match = FAIL_MARKER.match(path.name)
        if match and 0 < int(match.group(1)) <= 255:
            return int(match.group(1))
    return None


class InjectedFailure(Exception):
    """The sub-process failure injected by ``ODM_TEST_ENGINE_FAIL`` (ODM: SubprocessException)."""

    def __init__(self, code: int, stage: str) -> None:
        super().__init__(f"Child returned {code}")
        self.code = code
        self.stage = stage
