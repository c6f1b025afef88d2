"""Console and progress output of the ODM test double.

Log lines follow ODM's logger format: the level tag ``[LEVEL]`` is left-justified to 9 characters
and followed by one space, and the whole line is wrapped in an ANSI colour code unless the
environment variable ``no_ansiesc`` is set to a non-empty value. Every line is flushed immediately
so that consumers can stream the log.

Progress is also sent as ODM does: UDP datagrams ``PGUP/<pid>/<project-name>/<float percent>`` to
``127.0.0.1``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from datetime import datetime

_COLOURS = {
    "INFO": "\x1b[39m",
    "WARNING": "\x1b[93m",
    "ERROR": "\x1b[91m",
    "DEBUG": "\x1b[92m",
}
_RESET = "\x1b[0m"
# split-merge logs from worker threads: one line at a time, never two interleaved
_WRITE_LOCK = threading.Lock()


def write_line(text: str) -> None:
    """Write one line to stdout and flush it (the only place where the program writes to stdout)."""
    with _WRITE_LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def write_error(text: str) -> None:
    """Write one diagnostic line to stderr (usage/configuration errors, split-merge tracebacks)."""
    with _WRITE_LOCK:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def odm_timestamp(moment: datetime | None = None) -> str:
    """A timestamp formatted like ODM's ``system.now()`` (e.g. ``Sat Nov 22 05:35:01 UTC 2025``)."""
    local = (moment or datetime.now()).astimezone()
    return local.strftime("%a %b %d %H:%M:%S %Z %Y")


def opensfm_timestamp(moment: datetime | None = None) -> str:
    """A timestamp formatted like Python's ``logging`` default, as OpenSfM prints it."""
    local = moment or datetime.now()
    return local.strftime("%Y-%m-%d %H:%M:%S,") + f"{local.microsecond // 1000:03d}"


class Console:
    """Formats ODM-style log lines; colour codes are on unless ``ansi`` is false."""

    def __init__(self, ansi: bool) -> None:
        self.ansi = ansi

    def format(self, level: str, message: str) -> str:
        line = f"{('[' + level + ']').ljust(9)} {message}"
        if self.ansi:
            return f"{_COLOURS.get(level, _COLOURS['INFO'])}{line}{_RESET}"
        return line

    def log(self, level: str, message: str) -> None:
        write_line(self.format(level, message))

    def raw(self, text: str) -> None:
        write_line(text)


class ProgressSender:
    """Best-effort sender of ODM's ``PGUP`` UDP progress datagrams; network errors are ignored."""

    def __init__(self, project_name: str, port: int, host: str = "127.0.0.1") -> None:
        self._project_name = project_name
        self._address = (host, port)
        self._pid = os.getpid()
        self._sock: socket.socket | None
        try:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            self._sock = None

    def send(self, percent: float) -> None:
        if self._sock is None:
            return
        payload = f"PGUP/{self._pid}/{self._project_name}/{float(percent)}".encode()
        try:
            self._sock.sendto(payload, self._address)
        except OSError:
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
