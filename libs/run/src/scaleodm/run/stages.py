"""The fetch and upload steps of an Argo run, as a CLI for the workflow's containers.

``python -m scaleodm.run.stages fetch --spec <json> --workspace /workspace`` and
``python -m scaleodm.run.stages upload --spec <json> --workspace /workspace`` run in our own
image, before and after the ODM container of the same pod (the Workflow is built by
``scaleodm.scheduler.workflows``); they share the ``/workspace`` emptyDir with it. ``--spec`` is
the attempt's ``RunSpec`` as JSON, one argv item (never through a shell). S3 settings come from
the environment (``SchedulerSettings``: ``SCALEODM_S3__*``; the keys from a Secret, the rest as
plain values).

Both steps are the local runner's steps (``runner.py``), built from the same modules:

- **fetch**: ``fetching.fetch_inputs`` into ``<workspace>/<task_id>/images``; no image → a clear
  message and exit 1. The project tree is left group-writable with setgid directories
  (``share_with_group``; the step runs with umask 002): ODM, root without capabilities in the
  next container, writes there as a member of the pod's ``fsGroup`` (the scheduler's
  ``workflows.py``). The ODM command line is fixed when the Workflow is created, before the
  inputs are seen, so control files cannot become ``--gcp``/``--geo`` flags as in a local run:
  they are classified by ``fetching.control_file_args`` and moved to the names ODM looks for at
  the project root by default (``gcp_list.txt``, ``geo.txt``, ``image_groups.txt``).
- **upload**: ``task_output.txt`` from a console capture when one exists (the ODM container's
  console is its pod log, which the watcher follows), then ``packaging.collect``,
  ``packaging.build_zip`` and ``packaging.upload_outputs`` to ``spec.output_prefix``.

Exit codes: 0 done; 1 the step failed (last stderr line = the reason, which Kubernetes keeps as
the termination message: the containers use ``FallbackToLogsOnError``; never a path or an
exception's text, an unexpected failure reads ``INTERNAL_ERROR``); 2 bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from scaleodm.common import netguard
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.logging import bind_task, configure_logging, get_logger
from scaleodm.common.settings import SchedulerSettings
from scaleodm.common.store.s3 import S3, parse_s3_url
from scaleodm.run import fetching, packaging

__all__ = [
    "CONSOLE_FILE",
    "INTERNAL_ERROR",
    "NO_IMAGES",
    "ODM_DEFAULT_NAMES",
    "StageError",
    "fetch_images",
    "main",
    "place_control_files",
    "run_fetch",
    "run_upload",
    "share_with_group",
]

log = get_logger("scaleodm.stages")

NO_IMAGES: Final = (
    "No images found in the task's inputs (expected .jpg, .jpeg, .tif, .tiff, .png or .dng "
    "files, or zips holding them)"
)
# The flag a local run would pass for a control file → the file ODM reads without that flag:
# gcp_list.txt and geo.txt are searched under the project (opendm/types.py ODM_Tree),
# image_groups.txt is <project>/image_groups.txt (stages/splitmerge.py, run_opensfm.py).
ODM_DEFAULT_NAMES: Final[dict[str, str]] = {
    "--gcp": "gcp_list.txt",
    "--geo": "geo.txt",
    "--split-image-groups": "image_groups.txt",
}
CONSOLE_FILE: Final = "console.log"
# The errorMessage of any unexpected failure; what happened is in the service log only.
INTERNAL_ERROR: Final = "Processing failed because of an internal error"
ARCHIVE_FILE: Final = "all.zip"
# New files rw-rw-r--, directories rwxrwxr-x: the group (the pod's fsGroup) may write.
GROUP_UMASK: Final = 0o002
GROUP_DIR_BITS: Final = stat.S_ISGID | stat.S_IRWXG
GROUP_FILE_BITS: Final = stat.S_IRGRP | stat.S_IWGRP


class StageError(Exception):
    """The step cannot complete; the message is the reason shown to the user."""


async def fetch_images(
    sources: list[str], images: Path, s3: S3, settings: SchedulerSettings, *, task_id: str
) -> int:
    """``fetching.fetch_inputs`` with the scheduler's bounds; ``InputError`` when no image came.

    Shared by the local runner and the fetch step, so both apply the same limits
    (``fetching.Limits``), the same ``s3://`` rule for ``task_id`` and refuse an empty input
    the same way.
    """
    count = await fetching.fetch_inputs(
        sources, images, s3, task_id=task_id, limits=fetching.Limits.from_settings(settings),
        timeout_s=settings.fetch_timeout_s,
        outbound=netguard.OutboundPolicy(settings.outbound_allow),
    )
    if count == 0:
        raise fetching.InputError(NO_IMAGES)
    return count


def place_control_files(images: Path, project: Path) -> dict[str, Path]:
    """Move control files out of ``images/`` to ODM's default paths; returns flag → new path.

    Classification is ``fetching.control_file_args`` (the local run's): ``geo.txt``,
    ``image_groups.txt``, and the first other ``.txt`` as the GCP file. Other ``.txt`` files stay
    in ``<project>/gcp/`` where that function puts them; ODM searches the project top-down, so the
    root copy wins.
    """
    args = fetching.control_file_args(images, project)
    placed: dict[str, Path] = {}
    for flag, source in zip(args[::2], args[1::2], strict=True):
        target = project / ODM_DEFAULT_NAMES[flag]
        Path(source).replace(target)
        placed[flag] = target
    return placed


def share_with_group(root: Path) -> None:
    """Make the tree at ``root`` writable by its group: directories ``g+rwxs``, files ``g+rw``.

    The fetch step runs as uid 10001; ODM runs as root *without capabilities*, so it has no
    owner rights here and reaches the tree through its supplementary group, the pod's
    ``fsGroup`` (10001, also our gid). The umask alone is not enough: a file created with an
    explicit mode (``0600`` temporary files) keeps it. Setgid directories pass gid 10001 on to
    what ODM creates below them. Symlinks are skipped (chmod would follow them).
    """
    for directory, _dirs, files in os.walk(root):
        here = Path(directory)
        here.chmod(stat.S_IMODE(here.lstat().st_mode) | GROUP_DIR_BITS)
        for name in files:
            path = here / name
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                path.chmod(stat.S_IMODE(mode) | GROUP_FILE_BITS)


async def run_fetch(spec: RunSpec, workspace: Path, settings: SchedulerSettings) -> int:
    """The fetch step; returns the number of images in ``<workspace>/<task_id>/images``."""
    project = workspace / spec.task_id
    # A re-run in the same workspace starts clean: leftovers would be renamed, not replaced.
    shutil.rmtree(project, ignore_errors=True)
    images = project / "images"
    async with S3.open(settings.s3) as s3:
        count = await fetch_images(spec.sources, images, s3, settings, task_id=spec.task_id)
    placed = place_control_files(images, project)
    share_with_group(project)
    log.info("inputs fetched", images=count, control_files=sorted(p.name for p in placed.values()))
    return count


async def run_upload(
    spec: RunSpec, workspace: Path, settings: SchedulerSettings, *, console: Path | None = None
) -> int:
    """The upload step; returns the number of output files uploaded (besides ``all.zip``)."""
    project = workspace / spec.task_id
    if not project.is_dir():
        log.error("no project directory", project=str(project))
        raise StageError("Nothing to upload: the run left no project directory")
    if console is not None and console.is_file():
        packaging.write_task_output(console, project)
    await packaging.post_process(project, spec)
    files = packaging.collect(project, spec.outputs)
    archive = workspace / ARCHIVE_FILE  # outside the project: never collected into itself
    packaging.build_zip(project, files, archive)
    prefix = parse_s3_url(spec.output_prefix)
    async with S3.open(settings.s3) as s3:
        await packaging.upload_outputs(s3, prefix, project, files, archive)
    log.info("outputs uploaded", files=len(files), prefix=str(prefix))
    return len(files)


def _run_spec(text: str) -> RunSpec:
    try:
        return RunSpec.model_validate_json(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"not a RunSpec: {exc}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scaleodm.run.stages",
        description="Fetch inputs before / upload outputs after the ODM container of a run.",
    )
    steps = parser.add_subparsers(dest="step", required=True)
    for name, help_ in (
        ("fetch", "download the inputs into <workspace>/<task_id>/images"),
        ("upload", "package <workspace>/<task_id> and upload it to the output prefix"),
    ):
        step = steps.add_parser(name, help=help_)
        step.add_argument(
            "--spec", type=_run_spec, required=True, help="the attempt's RunSpec as JSON"
        )
        step.add_argument(
            "--workspace", type=Path, default=Path("/workspace"), help="the shared volume"
        )
        if name == "upload":
            step.add_argument(
                "--console",
                type=Path,
                default=None,
                help=f"console capture for task_output.txt (default <workspace>/{CONSOLE_FILE}; "
                "skipped when absent)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    spec: RunSpec = args.spec
    workspace: Path = args.workspace
    settings = SchedulerSettings()
    configure_logging("stages", settings.log_level, settings.log_json)
    # A one-step process: whatever it creates is group-writable (see share_with_group).
    os.umask(GROUP_UMASK)
    with bind_task(spec.task_id, attempt=spec.attempt, step=args.step):
        try:
            if args.step == "fetch":
                asyncio.run(run_fetch(spec, workspace, settings))
            else:
                console = args.console or workspace / CONSOLE_FILE
                asyncio.run(run_upload(spec, workspace, settings, console=console))
        except (fetching.InputError, StageError, packaging.UploadError) as exc:
            log.error("step failed", error=str(exc))
            # Last line of the log: Kubernetes' termination message (FallbackToLogsOnError).
            sys.stderr.write(f"{exc}\n")
            return 1
        except Exception:
            # Never a traceback as the last line: it would become the task's errorMessage.
            log.exception("step failed")
            sys.stderr.write(f"{INTERNAL_ERROR}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
