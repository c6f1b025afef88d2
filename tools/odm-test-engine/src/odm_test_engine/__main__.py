"""Entry point of the ODM test double (``python -m odm_test_engine``, ``odm-test-engine``).

This is a TEST DOUBLE of OpenDroneMap's ``run.py`` — see the :mod:`odm_test_engine` package
docstring for the command line, the ``ODM_TEST_ENGINE_*`` environment variables and the exit codes.
It never processes images.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import ODM_VERSION
from .cli import USAGE, UsageError, parse
from .console import write_error, write_line
from .engine import ConfigError, Engine, EngineConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Run the test double with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        invocation = parse(arguments)
    except UsageError as error:
        write_error(USAGE.rstrip())
        write_error(f"odm-test-engine: error: {error}")
        return 2
    if invocation.show_help:
        write_line(USAGE.rstrip())
        return 0
    if invocation.show_version:
        write_line(ODM_VERSION)
        return 0
    try:
        config = EngineConfig.from_env(os.environ)
    except ConfigError as error:
        write_error(f"odm-test-engine: error: {error}")
        return 2
    return Engine(invocation, config).run()


if __name__ == "__main__":
    sys.exit(main())
