# syntax=docker/dockerfile:1.7
#
# One image for the four ScaleODM services; the command picks the service:
#
#   docker build -t scaleodm .                                  # default target: runtime
#   docker run scaleodm scaleodm-gateway                        # or scaleodm-scheduler,
#                                                               #    scaleodm-watcher, scaleodm-notifier
#   docker build --target scheduler-docker -t scaleodm-scheduler-docker .
#
# `scheduler-docker` adds the docker CLI, for a scheduler running ODM as `docker run
# opendronemap/odm` (SCALEODM_ENGINE=docker) through a mounted docker socket. The default image
# has no docker CLI; SCALEODM_ENGINE=test (the ODM test double) works in either.

ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13.9
ARG DOCKER_CLI_VERSION=28

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv
# Official docker image: its CLI is a static binary, so it runs on the Debian base below.
FROM docker:${DOCKER_CLI_VERSION}-cli AS docker-cli

# ---------------------------------------------------------------------------------------------
# builder: resolve the locked dependencies into /app/.venv (non-editable workspace packages)
# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder

COPY --from=uv /uv /uvx /bin/

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=0 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Third-party dependencies first: this layer only changes with the lock or a pyproject.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY libs/run/pyproject.toml libs/run/
COPY services/gateway/pyproject.toml services/gateway/
COPY services/scheduler/pyproject.toml services/scheduler/
COPY services/watcher/pyproject.toml services/watcher/
COPY services/notifier/pyproject.toml services/notifier/
COPY tools/odm-test-engine/pyproject.toml tools/odm-test-engine/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace

# Then the workspace members, installed as regular (non-editable) packages.
COPY libs/ libs/
COPY services/ services/
COPY tools/ tools/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# ---------------------------------------------------------------------------------------------
# runtime-base: the venv, a non-root user, the health check
# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime-base

LABEL org.opencontainers.image.title="ScaleODM" \
      org.opencontainers.image.description="NodeODM-compatible processing API for OpenDroneMap"

ENV PATH="/app/.venv/bin:${PATH}" \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SCALEODM_LOCAL__RUNS_DIR=/var/lib/scaleodm/runs

RUN groupadd --system --gid 10001 scaleodm \
 && useradd --system --uid 10001 --gid scaleodm --create-home --home-dir /home/scaleodm \
        --shell /usr/sbin/nologin scaleodm \
 && install -d -o scaleodm -g scaleodm -m 0755 /var/lib/scaleodm /var/lib/scaleodm/runs

# Venv owned by root: the services can read it, not change it.
COPY --from=builder /app/.venv /app/.venv

# GET /healthz on whichever port this service listens on: the gateway serves it on
# SCALEODM_GATEWAY_PORT, the bus-driven services on SCALEODM_HEALTH_PORT.
COPY <<'EOF' /usr/local/lib/scaleodm/healthcheck.py
import os
import sys
import urllib.request

ports = {os.environ.get("SCALEODM_HEALTH_PORT", "8080"),
         os.environ.get("SCALEODM_GATEWAY_PORT", "3000")}
for port in sorted(ports):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
            if resp.status == 200:
                sys.exit(0)
    except OSError:
        pass
sys.exit(1)
EOF

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/lib/scaleodm/healthcheck.py"]

USER scaleodm:scaleodm
WORKDIR /home/scaleodm
# 3000: gateway (NodeODM API); 8080: /healthz and /readyz of scheduler, watcher, notifier.
EXPOSE 3000 8080

# ---------------------------------------------------------------------------------------------
# scheduler-docker: the scheduler with the docker CLI (SCALEODM_ENGINE=docker, socket mounted)
# ---------------------------------------------------------------------------------------------
FROM runtime-base AS scheduler-docker

COPY --from=docker-cli /usr/local/bin/docker /usr/local/bin/docker
ENV SCALEODM_ENGINE=docker
CMD ["scaleodm-scheduler"]

# ---------------------------------------------------------------------------------------------
# runtime (default, last stage): any of the four services, chosen by the command
# ---------------------------------------------------------------------------------------------
FROM runtime-base AS runtime

CMD ["scaleodm-gateway"]
