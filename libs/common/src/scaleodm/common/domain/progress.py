"""Progress from ODM's console: stage markers -> a monotonic percentage (scaleodm.md §11).

ODM prints ``[INFO]    Running <stage> stage`` and ``[INFO]    Finished <stage> stage``; each stage
has a cumulative end percentage. We report engine progress x 0.9 (NodeODM's scale) and keep the
rest for packaging and upload; 100 is reported only at the terminal state (by the projection).
"""

from __future__ import annotations

import re

# (stage, cumulative end %) in ODM's order. split/merge are no-ops outside split-merge runs and
# contribute nothing, so they are absent: their markers never move progress.
STAGE_END_PERCENT: dict[str, float] = {
    "dataset": 5,
    "opensfm": 25,
    "openmvs": 50,
    "odm_filterpoints": 52,
    "odm_meshing": 60,
    "mvs_texturing": 70,
    "odm_georeferencing": 80,
    "odm_dem": 90,
    "odm_orthophoto": 98,
    "odm_report": 99,
    "odm_postprocess": 100,
}
ENGINE_SCALE = 0.9
PACKAGING_PROGRESS = 93.0
UPLOADING_PROGRESS = 97.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_MARKER = re.compile(r"^\[INFO\]\s+(Running|Finished) ([a-z_]+) stage\b")


def clean_line(raw: str) -> str:
    """A console chunk line as NodeODM stores it: ANSI codes removed, trimmed (§4.5)."""
    return _ANSI.sub("", raw).strip()


def stage_progress(line: str) -> float | None:
    """Progress (0-90) implied by one cleaned console line, or None if it is not a marker."""
    match = _MARKER.match(line)
    if not match or match.group(1) != "Finished":
        return None
    end = STAGE_END_PERCENT.get(match.group(2))
    return None if end is None else round(end * ENGINE_SCALE, 2)


class ProgressTracker:
    """Feeds console lines, yields only increases (progress never moves backwards)."""

    def __init__(self, current: float = 0.0) -> None:
        self.current = current

    def feed(self, line: str) -> float | None:
        value = stage_progress(line)
        if value is None or value <= self.current:
            return None
        self.current = value
        return value
