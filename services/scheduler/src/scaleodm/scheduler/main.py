"""Scheduler process entry point."""

from __future__ import annotations

from scaleodm.common import runtime, tracing
from scaleodm.common.logging import configure_logging
from scaleodm.common.settings import get_scheduler_settings
from scaleodm.scheduler.app import create_app


def main() -> None:
    settings = get_scheduler_settings()
    configure_logging("scheduler", settings.log_level, settings.log_json)
    tracing.configure("scheduler", settings.traces_file)
    runtime.serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
