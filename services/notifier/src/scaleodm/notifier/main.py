"""Notifier process entry point."""

from __future__ import annotations

from scaleodm.common import runtime, tracing
from scaleodm.common.logging import configure_logging
from scaleodm.common.settings import get_notifier_settings
from scaleodm.notifier.app import create_app


def main() -> None:
    settings = get_notifier_settings()
    configure_logging("notifier", settings.log_level, settings.log_json)
    tracing.configure("notifier", settings.traces_file)
    runtime.serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
