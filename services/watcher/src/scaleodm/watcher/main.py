"""Watcher process entry point."""

from __future__ import annotations

from scaleodm.common import runtime, tracing
from scaleodm.common.logging import configure_logging
from scaleodm.common.settings import get_watcher_settings
from scaleodm.watcher.app import create_app


def main() -> None:
    settings = get_watcher_settings()
    configure_logging("watcher", settings.log_level, settings.log_json)
    tracing.configure("watcher", settings.traces_file)
    runtime.serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
