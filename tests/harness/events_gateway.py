"""The gateway entry point, with the event-stream routes included if ``main.py`` does not yet.

``python -m tests.harness.events_gateway`` runs like ``python -m scaleodm.gateway.main`` (same
settings from ``SCALEODM_*``); tests start extra gateways with it (another heartbeat interval, a
token). Once ``scaleodm.gateway.main`` includes ``routes.events`` this adds nothing.
"""

from __future__ import annotations

import uvicorn

from scaleodm.common.logging import configure_logging
from scaleodm.common.settings import get_gateway_settings
from scaleodm.gateway.main import create_app
from scaleodm.gateway.routes import events


def main() -> None:
    settings = get_gateway_settings()
    configure_logging("gateway", settings.log_level, settings.log_json)
    app = create_app(settings)
    paths = {getattr(route, "path", None) for route in app.routes}
    if "/events" not in paths:
        app.include_router(events.router)
    uvicorn.run(app, host=settings.gateway_host, port=settings.gateway_port, log_config=None,
                timeout_graceful_shutdown=20)


if __name__ == "__main__":
    main()
