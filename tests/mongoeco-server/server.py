"""The mongoeco wire server as a process, for tests (mongoeco 4.11.0 ships no CLI for it).

Usage:
    python mongoeco_server.py --host 127.0.0.1 --port 0 [--db memory|PATH.sqlite]
                              [--profile auto-installed] [--dialect 7.0]

Prints one line "READY mongodb://HOST:PORT/?directConnection=true" to stdout
(flushed) once the listener is accepting, then serves until SIGTERM/SIGINT, on
which it closes the proxy (and the SQLite engine) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from mongoeco.engines.memory import MemoryEngine
from mongoeco.engines.sqlite import SQLiteEngine
from mongoeco.wire import AsyncMongoEcoProxyServer


async def serve(args: argparse.Namespace) -> None:
    if args.db in ("memory", ":memory:"):
        engine = MemoryEngine()
    else:
        engine = SQLiteEngine(args.db, executor_workers=1)
    proxy = AsyncMongoEcoProxyServer(
        engine=engine,
        host=args.host,
        port=args.port,
        mongodb_dialect=args.dialect,
        pymongo_profile=args.profile,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    try:
        sys.stdout.write(f"READY {proxy.address.uri}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await proxy.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--db", default="memory", help="'memory' or a SQLite file path")
    p.add_argument("--dialect", default="7.0", choices=("7.0", "8.0", "9.0"))
    # 'strict-auto-installed' rejects pymongo 4.20.0; 'auto-installed' -> 4.19.
    p.add_argument("--profile", default="auto-installed")
    asyncio.run(serve(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
