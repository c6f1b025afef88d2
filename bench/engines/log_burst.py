"""A benchmark double of the ODM engine: prints numbered, time-stamped console lines, then exits 0.

Not ODM and not for production: it only feeds the event pipeline (runner console file -> watcher
-> MongoDB / JetStream -> gateway) with lines whose origin time is known. The scheduler runs it
as ``SCALEODM_ENGINE=command`` with

    SCALEODM_ENGINE_COMMAND='<python> bench/engines/log_burst.py {options} {project_path}
                             {project_name}'   (one line)

What to print comes from the task's inputs, as the ODM test double's failure trigger does: an
input image named ``log-burst_<mode>_<lines>_<rate>_<lead_ms>.jpg`` (see :func:`trigger_name`):

* ``burst``: ``lines`` lines as fast as possible, each written and flushed on its own;
* ``paced``: ``lines`` lines at ``rate`` lines per second, on a fixed schedule (no drift).

Both wait ``lead_ms`` first (so observers can attach). Every line is
``log-burst <index> <time.time_ns()> <padding>`` (:data:`LINE_LENGTH` characters), ``index`` from
0: the bench checks that each arrives once, in order, and measures latency from the timestamp.
Only the standard library, so it starts fast.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

PREFIX = "log-burst"
LINE_LENGTH = 100  # about an ODM console line
TRIGGER = re.compile(r"^log-burst_(burst|paced)_(\d+)_(\d+)_(\d+)\.jpg$", re.IGNORECASE)
LINE = re.compile(r"^log-burst (\d+) (\d+)\b")


def trigger_name(mode: str, lines: int, rate: int = 0, lead_ms: int = 0) -> str:
    """The input file name that makes a run print ``lines`` lines in ``mode``."""
    return f"log-burst_{mode}_{lines}_{rate}_{lead_ms}.jpg"


def parse_line(line: str) -> tuple[int, int] | None:
    """``(index, written_at_ns)`` of a line this engine printed, None for any other line."""
    match = LINE.match(line)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _settings(images: Path) -> tuple[str, int, int, int]:
    for path in sorted(images.iterdir()) if images.is_dir() else []:
        match = TRIGGER.match(path.name)
        if match:
            mode, lines, rate, lead = match.groups()
            return mode.lower(), int(lines), int(rate), int(lead)
    return "burst", 10, 0, 0


def _line(index: int) -> bytes:
    head = f"{PREFIX} {index:08d} {time.time_ns()} "
    return (head + "x" * max(0, LINE_LENGTH - len(head)) + "\n").encode()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write("usage: log_burst.py [options...] <project_path> <project_name>\n")
        return 2
    project = Path(argv[-2]) / argv[-1]
    mode, lines, rate, lead_ms = _settings(project / "images")
    fd = sys.stdout.fileno()
    if lead_ms:
        time.sleep(lead_ms / 1000)
    start = time.monotonic()
    for index in range(lines):
        if mode == "paced" and rate > 0:
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        os.write(fd, _line(index))  # one write per line: the line is in the file when stamped
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
