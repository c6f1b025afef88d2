"""Every benchmark on one set of servers, one table, ``bench/results/bench.json``.

The modules run in order — the pipe baselines first, then what goes through those pipes — each
on the same nats-server, nx-27017 and moto (its own database and bucket prefixes), and every
figure is printed beside its ratio to the baseline of its pipe. Each module's knobs are options
here too (prefixed by module: ``--info-*``, ``--upload-*``, ...); ``--quick`` swaps in every
module's small sizes (a smoke run; options given explicitly still win).

    uv run task bench                        # = python -m bench.run
    uv run task bench -- --quick --only baselines,info_poll
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
import traceback
from types import ModuleType
from typing import Any

from bench.common import Figure, bench_env, parse_args, report, write_json

MODULES = ("baselines", "info_poll", "upload", "pipeline", "scheduler_creates", "task_to_done",
           "admission", "split", "observability", "tiles")


def _load(name: str) -> ModuleType | None:
    """``bench.<name>``, or None while that module does not exist."""
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return None
        raise


def _parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", default="",
                        help=f"comma-separated modules to run, in this order: {','.join(MODULES)}"
                        " (baselines gives the ratios; default all)")
    parser.add_argument("--quick", action="store_true",
                        help="every module's small sizes: a smoke run")
    for module in modules.values():
        add = getattr(module, "add_arguments", None)
        if add is not None:
            add(parser)  # a clash between two modules' options fails here, loudly
    return parser


def main(argv: list[str] | None = None) -> int:
    modules = {name: mod for name in MODULES if (mod := _load(name)) is not None}
    missing = [name for name in MODULES if name not in modules]
    quick: dict[str, Any] = {}
    for module in modules.values():
        quick.update(getattr(module, "QUICK", {}))
    parser = _parser(modules)
    args = parse_args(parser, quick, argv)

    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or list(MODULES)
    unknown = [n for n in wanted if n not in MODULES]
    if unknown:
        parser.error(f"--only: unknown {unknown}; known: {','.join(MODULES)}")
    for name in wanted:
        if name in missing:
            sys.stderr.write(f"bench.{name}: no such module yet (bench/{name}.py), skipped\n")
    selected = [n for n in MODULES if n in wanted and n in modules]

    figures: list[Figure] = []
    failed: dict[str, str] = {}
    timings: dict[str, float] = {}
    with bench_env() as env:
        for name in selected:
            sys.stderr.write(f"== {name} ...\n")
            sys.stderr.flush()
            started = time.perf_counter()
            try:
                figures += asyncio.run(modules[name].measure(env, args))
            except Exception as exc:  # the other modules still run and report
                traceback.print_exc()
                failed[name] = repr(exc)
            timings[name] = round(time.perf_counter() - started, 1)
            sys.stderr.write(f"== {name}: {timings[name]} s\n")

    sys.stdout.write(report(figures))
    extra = {"args": vars(args), "modules": selected, "seconds": timings,
             "skipped": [n for n in wanted if n in missing], "failed": failed}
    path = write_json("bench", figures, extra)
    sys.stdout.write(f"\nwritten: {path}\n")
    for name, error in failed.items():
        sys.stdout.write(f"FAILED: {name}: {error}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
