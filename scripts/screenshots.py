"""Regenerate the web console's screenshots in ``docs/screenshots/`` (README).

``uv run python scripts/screenshots.py`` runs the browser tests that visit each page
(``tests/browser/test_console.py``: a real stack, Debian's Chromium) with
``SCALEODM_TEST_ARTIFACTS`` pointing at a temporary folder, then copies the pages' screenshots
here: login, task list (desktop and phone), new task, task page with its console, map. Review the
images before committing them; the tests' other screenshots are not kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "screenshots"
SHOTS = ("login", "tasks", "tasks-phone", "new-task", "task", "map")
TESTS = "upload_through_page or map_shows or wrong_token"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="console-screenshots-") as tmp:
        env = {**os.environ, "SCALEODM_TEST_ARTIFACTS": tmp}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-p", "no:schemathesis",
             "tests/browser/test_console.py", "-k", TESTS],
            cwd=ROOT, env=env, check=False, timeout=600,
        )
        if done.returncode != 0:
            sys.stderr.write("screenshots: the browser tests failed; nothing copied\n")
            return done.returncode
        missing = [name for name in SHOTS if not (Path(tmp) / f"{name}.png").is_file()]
        if missing:
            sys.stderr.write(f"screenshots: not taken: {', '.join(missing)}\n")
            return 1
        TARGET.mkdir(parents=True, exist_ok=True)
        for name in SHOTS:
            shutil.copyfile(Path(tmp) / f"{name}.png", TARGET / f"{name}.png")
    sys.stdout.write(f"screenshots: {len(SHOTS)} written to {TARGET.relative_to(ROOT)}/\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
