"""Lenient command-line parsing for the ODM test double.

ODM's ``run.py`` uses argparse with a fixed option table. The test double must accept whatever a
caller passes to real ODM (including options added in later ODM releases), so it knows the ODM
option *names* only to decide whether a flag takes a value; it never rejects an option. See the
package docstring for the exact rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: ODM stage names in execution order (also the values accepted by ``--end-with``).
STAGES: tuple[str, ...] = (
    "dataset",
    "split",
    "merge",
    "opensfm",
    "openmvs",
    "odm_filterpoints",
    "odm_meshing",
    "mvs_texturing",
    "odm_georeferencing",
    "odm_dem",
    "odm_orthophoto",
    "odm_report",
    "odm_postprocess",
)

#: ODM options that are booleans (``store_true``): they never consume the following token.
BOOLEAN_OPTIONS: frozenset[str] = frozenset(
    {
        "3d-tiles", "auto-boundary", "bg-removal", "build-overviews", "cog", "debug",
        "dem-euclidean-map", "dsm", "dtm", "fast-orthophoto", "force-gps", "gltf", "ignore-gsd",
        "no-gpu", "optimize-disk-space", "orthophoto-cutline", "orthophoto-kmz",
        "orthophoto-no-tiled", "orthophoto-png", "pc-classify", "pc-copc", "pc-csv", "pc-ept",
        "pc-las", "pc-rectify", "pc-skip-geometric", "pc-tile", "rerun-all", "rolling-shutter",
        "skip-3dmodel", "skip-band-alignment", "skip-orthophoto", "skip-report", "sky-removal",
        "sm-no-align", "texturing-keep-unseen-faces", "texturing-single-material",
        "texturing-skip-global-seam-leveling", "texturing-skip-local-seam-leveling", "tiles",
        "use-3dmesh", "use-exif", "use-fixed-camera-params", "use-hybrid-bundle-adjustment",
        "verbose",
    }
)  # fmt: skip

#: Default values of the ODM options that take a value, as ODM prints them in its option dump.
VALUED_DEFAULTS: dict[str, str] = {
    "align": "None", "auto-boundary-distance": "0", "boundary": "None", "camera-lens": "auto",
    "cameras": "None", "crop": "3", "dem-decimation": "1", "dem-gapfill-steps": "3",
    "dem-resolution": "5", "end-with": "odm_postprocess", "feature-quality": "high", "gcp": "None",
    "geo": "None", "gps-accuracy": "10", "matcher-neighbors": "0", "matcher-type": "flann",
    "max-concurrency": "4", "merge": "all", "mesh-octree-depth": "11", "mesh-size": "200000",
    "min-num-features": "10000", "orthophoto-compression": "DEFLATE", "orthophoto-resolution": "5",
    "pc-filter": "2.5", "pc-quality": "medium", "pc-sample": "0", "primary-band": "auto",
    "project-path": "None", "radiometric-calibration": "none", "rerun-from": "None",
    "rolling-shutter-readout": "0", "sfm-algorithm": "incremental", "sm-cluster": "None",
    "smrf-scalar": "1.25", "smrf-slope": "0.15", "smrf-threshold": "0.5", "smrf-window": "18",
    "split": "999999", "split-image-groups": "None", "split-overlap": "150", "video-limit": "500",
    "video-resolution": "4000",
}  # fmt: skip

_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "y"})

USAGE = (
    "usage: odm-test-engine [ODM options...] --project-path <dir> [<project name>]\n"
    "TEST DOUBLE of OpenDroneMap: imitates ODM's console output and output layout,\n"
    "processes nothing. See `python -m pydoc odm_test_engine` for the options and the\n"
    "environment variables it understands.\n"
)


class UsageError(Exception):
    """Raised for command lines that even the lenient parser cannot make sense of (exit code 2)."""


@dataclass(frozen=True)
class Invocation:
    """A parsed command line.

    ``options`` maps canonical option names (hyphenated, without ``--``) to ``True`` for bare flags
    or to the raw string value.
    """

    project_path: str
    project_name: str
    options: dict[str, str | bool] = field(default_factory=dict)
    show_help: bool = False
    show_version: bool = False

    def flag(self, name: str) -> bool:
        """Whether boolean option ``name`` is on (bare flag, or ``true``/``1``/``yes``...)."""
        value = self.options.get(name, False)
        if isinstance(value, bool):
            return value
        return value.strip().lower() in _TRUE_WORDS

    def value(self, name: str) -> str | None:
        """The string value of option ``name`` or ``None`` when absent or given as a bare flag."""
        value = self.options.get(name)
        return value if isinstance(value, str) else None

    @property
    def end_with(self) -> str:
        return self.value("end-with") or STAGES[-1]

    def option_dump(self) -> list[tuple[str, str]]:
        """``(name, value)`` pairs like ODM's startup option dump (underscored names, sorted)."""
        merged: dict[str, str] = dict.fromkeys(BOOLEAN_OPTIONS, "False")
        merged.update(VALUED_DEFAULTS)
        for name, value in self.options.items():
            if name in BOOLEAN_OPTIONS:
                merged[name] = str(self.flag(name))
            else:
                merged[name] = str(value)
        merged["project-path"] = self.project_path
        merged["name"] = self.project_name
        return sorted((name.replace("-", "_"), value) for name, value in merged.items())


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _looks_like_flag(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not _is_number(token)


def parse(argv: Sequence[str]) -> Invocation:
    """Parse ``argv`` (without the program name) leniently.

    Raises :class:`UsageError` when even the lenient rules cannot make sense of it.
    """
    tokens = list(argv)
    options: dict[str, str | bool] = {}
    positionals: list[str] = []
    show_help = False
    show_version = False
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            positionals.extend(tokens[i + 1 :])
            break
        if token in ("-h", "--help"):
            show_help = True
        elif token == "--version":
            show_version = True
        elif token.startswith("--") and len(token) > 2:
            raw_name, has_value, inline = token[2:].partition("=")
            name = _canonical(raw_name)
            if has_value:
                options[name] = inline
            elif name in BOOLEAN_OPTIONS:
                options[name] = True
            elif (
                i + 1 < len(tokens)
                and not _looks_like_flag(tokens[i + 1])
                and _may_take(name, len(tokens), i + 1, positionals)
            ):
                options[name] = tokens[i + 1]
                i += 1
            else:
                options[name] = True
        elif _looks_like_flag(token):
            options[_canonical(token.lstrip("-"))] = True
        else:
            positionals.append(token)
        i += 1

    if show_help or show_version:
        return Invocation("", "", options, show_help=show_help, show_version=show_version)
    if len(positionals) > 1:
        raise UsageError(f"unrecognized arguments: {' '.join(positionals[1:])}")
    project_path = options.get("project-path")
    if not isinstance(project_path, str) or not project_path:
        raise UsageError("the following arguments are required: --project-path")
    end_with = options.get("end-with")
    if end_with is not None and end_with not in STAGES:
        raise UsageError(
            f"argument --end-with: invalid choice: {end_with!r} "
            f"(choose from {', '.join(repr(s) for s in STAGES)})"
        )
    project_name = positionals[0] if positionals else "code"
    if "/" in project_name or project_name in (".", ".."):
        raise UsageError(f"invalid project name: {project_name!r}")
    return Invocation(project_path, project_name, options)


def _may_take(name: str, count: int, j: int, positionals: list[str]) -> bool:
    """Whether option ``name`` may consume token ``j`` (of ``count``) as its value.

    Known valued options always do. An unknown option does too, except that the very last token of
    the command line stays the project name when no positional argument has been seen (``...
    --unknown-flag <project-name>``).
    """
    return name in VALUED_DEFAULTS or j != count - 1 or bool(positionals)
