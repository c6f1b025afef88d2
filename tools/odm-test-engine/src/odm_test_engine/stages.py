"""Stage table and per-stage scripts of the ODM test double.

Each ODM stage is described as a *plan*: a list of steps (a log line, a raw sub-process line, an
OpenSfM-style timestamped line, a stage-internal progress checkpoint, or a file to write). The
engine plays the plan back, pacing the visible lines so that the stage takes its share of the
configured run time. The lines are invented to look like ODM 3.x output (same markers and level
tags, plausible sub-process chatter); none of it reflects real processing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from . import artifacts
from .artifacts import Scene
from .cli import STAGES, Invocation

#: Cumulative ODM progress (percent) at the end of each stage; ``None`` for the split/merge
#: no-ops, which keep the previous value (scaleodm.md §11).
STAGE_END_PROGRESS: dict[str, float | None] = {
    "dataset": 5.0,
    "split": None,
    "merge": None,
    "opensfm": 25.0,
    "openmvs": 50.0,
    "odm_filterpoints": 52.0,
    "odm_meshing": 60.0,
    "mvs_texturing": 70.0,
    "odm_georeferencing": 80.0,
    "odm_dem": 90.0,
    "odm_orthophoto": 98.0,
    "odm_report": 99.0,
    "odm_postprocess": 100.0,
}

#: Share of the run time of each stage: its progress increment in the full (non fast-orthophoto)
#: chain.
STAGE_TIME_WEIGHT: dict[str, float] = {
    "dataset": 5.0,
    "split": 0.0,
    "merge": 0.0,
    "opensfm": 20.0,
    "openmvs": 25.0,
    "odm_filterpoints": 2.0,
    "odm_meshing": 8.0,
    "mvs_texturing": 10.0,
    "odm_georeferencing": 10.0,
    "odm_dem": 10.0,
    "odm_orthophoto": 8.0,
    "odm_report": 1.0,
    "odm_postprocess": 1.0,
}

assert set(STAGE_END_PROGRESS) == set(STAGES) == set(STAGE_TIME_WEIGHT)


@dataclass(frozen=True)
class Log:
    """An ODM logger line (``[INFO]    ...``)."""

    level: str
    message: str


@dataclass(frozen=True)
class Raw:
    """A line printed verbatim, as ODM relays sub-process output."""

    text: str


@dataclass(frozen=True)
class Sfm:
    """An OpenSfM logging line; the engine prefixes the time (``2025-01-01 10:00:00,123 INFO:``)."""

    level: str
    message: str


@dataclass(frozen=True)
class Checkpoint:
    """Stage-internal progress (0-100 within the stage), sent as a PGUP datagram."""

    percent: float


@dataclass(frozen=True)
class Write:
    """A file to write, relative to the project directory."""

    path: str
    data: bytes


Step = Log | Raw | Sfm | Checkpoint | Write


@dataclass(frozen=True)
class Context:
    """Everything a stage script needs."""

    invocation: Invocation
    project_dir: Path
    scene: Scene
    started: datetime

    @property
    def names(self) -> list[str]:
        return [image.filename for image in self.scene.images]

    def rng(self, stage: str) -> random.Random:
        """A deterministic random source per project and stage (stable output across runs)."""
        return random.Random(f"{self.invocation.project_name}/{stage}")

    def path(self, relative: str) -> str:
        return str(self.project_dir / relative)

    @property
    def submodel_run(self) -> bool:
        """Whether this run is a split-merge submodel, detected as ODM's ``is_submodel`` does.

        Either the project lives in a ``submodel_*`` directory (ODM's local children) or a seed
        touch file sits in ``opensfm/features/`` (remote children, whose NodeODM project is named
        by a uuid).
        """
        return (
            self.project_dir.name.startswith("submodel_")
            or (self.project_dir / "opensfm" / "features" / "empty").is_file()
        )


_LAZ = "odm_georeferencing/odm_georeferenced_model.laz"


def executed_stages(invocation: Invocation) -> list[str]:
    """The stages ODM would run for these options, in order (``openmvs`` dropped by
       ``--fast-orthophoto``).

    As in ODM, the chain stops after ``--end-with`` only if that stage is part of the chain.
    """
    chain = [s for s in STAGES if not (s == "openmvs" and invocation.flag("fast-orthophoto"))]
    end_with = invocation.end_with
    if end_with in chain:
        chain = chain[: chain.index(end_with) + 1]
    return chain


def split_size(invocation: Invocation) -> int | None:
    """The ``--split`` submodel size, or ``None`` when absent or not a positive number."""
    raw = invocation.value("split")
    try:
        size = int(float(raw)) if raw is not None else 0
    except ValueError:
        return None
    return size if size > 0 else None


def wants_split(invocation: Invocation, scene: Scene) -> bool:
    """ODM's "large dataset" rule: more images than ``--split`` and at least one geotagged image.

    (ODM also splits by an ``image_groups.txt``; the test double does not.)
    """
    size = split_size(invocation)
    return (
        size is not None
        and len(scene.images) > size
        and any(image.has_gps for image in scene.images)
    )


def plan(stage: str, ctx: Context) -> list[Step]:
    return _PLANS[stage](ctx)


def _running(program: str, *arguments: str) -> Log:
    quoted = " ".join(f'"{a}"' if "/" in a else a for a in arguments)
    return Log("INFO", f'running "{program}" {quoted}'.rstrip())


def _dataset(ctx: Context) -> list[Step]:
    count = len(ctx.scene.images)
    steps: list[Step] = [
        Log("INFO", f"Loading dataset from: {ctx.path('images')}"),
        Log("INFO", f"Loading {count} images"),
        Write("images.json", artifacts.images_json(ctx.scene)),
        Log("INFO", f"Wrote images database: {ctx.path('images.json')}"),
        Log("INFO", f"Found {count} usable images"),
        Log("INFO", f"Parsing SRS header: WGS84 UTM {ctx.scene.utm_zone}"),
    ]
    if not any(image.has_gps for image in ctx.scene.images):
        steps.append(
            Log(
                "WARNING",
                "No GPS information in the images (test double: using synthetic positions)",
            )
        )
    return steps


def _split(ctx: Context) -> list[Step]:
    """The split stage of a run that is *not* split (the engine plays remote split-merge itself)."""
    normal = Log("INFO", "Normal dataset, will process all at once.")
    size = split_size(ctx.invocation)
    if size is None or len(ctx.scene.images) <= size:
        return [normal]
    if not any(image.has_gps for image in ctx.scene.images):
        return [
            Log(
                "WARNING",
                "Could not perform split-merge as GPS information in photos or "
                "image_groups.txt is missing.",
            ),
            normal,
        ]
    return [
        Log(
            "WARNING",
            "Local split-merge (--split without --sm-cluster) is not imitated by the test "
            "double (odm-test-engine)",
        ),
        normal,
    ]


def _merge(_ctx: Context) -> list[Step]:
    return [Log("INFO", "Normal dataset, nothing to merge.")]


def _opensfm(ctx: Context) -> list[Step]:
    rng = ctx.rng("opensfm")
    names = ctx.names
    count = len(names)
    opensfm_dir = ctx.path("opensfm")
    max_dim = max(max(i.width, i.height) for i in ctx.scene.images)
    steps: list[Step] = [
        Log("INFO", f"Maximum photo dimensions: {max_dim}px"),
        Log("INFO", f"Photo dimensions for feature extraction: {max_dim // 2}px"),
        _running("opensfm", "extract_metadata", opensfm_dir),
    ]
    steps += [Sfm("INFO", f"Extracting EXIF for {name}") for name in names]
    steps += [Checkpoint(10.0), _running("opensfm", "detect_features", opensfm_dir)]
    feature_type = str(ctx.invocation.value("feature-type") or "sift").upper()
    for name in names:
        steps.append(Sfm("INFO", f"Extracting ROOT_{feature_type} features for image {name}"))
        steps.append(
            Sfm("DEBUG", f"Found {rng.randint(8000, 16000)} points in {rng.uniform(0.8, 4.0):.2f}s")
        )
    steps += [Checkpoint(40.0), _running("opensfm", "match_features", opensfm_dir)]
    neighbours = min(count - 1, 8)
    for index, name in enumerate(names):
        steps.append(Raw(f"Matching {name}  -  {index + 1} / {count}"))
        for offset in range(1, neighbours + 1):
            other = names[(index + offset) % count]
            steps.append(
                Raw(f"{name} - {other} has {rng.randint(0, 40) // offset} candidate matches")
            )
    steps += [Checkpoint(60.0), _running("opensfm", "create_tracks", opensfm_dir)]
    track_count = len(ctx.scene.ground_points()) * 1000 + rng.randint(0, 999)
    steps += [
        Sfm("INFO", f"Good tracks: {track_count}"),
        _running("opensfm", "reconstruct", opensfm_dir),
    ]
    steps.append(Sfm("INFO", "Starting incremental reconstruction"))
    steps += [Sfm("INFO", f"Adding {name} to the reconstruction") for name in names]
    steps += [
        Sfm("INFO", f"Reconstruction 0: {count} images, {track_count} points"),
        Write("opensfm/reconstruction.json", artifacts.reconstruction_json(ctx.scene)),
        Write("opensfm/reconstruction.ply", artifacts.point_cloud_ply(ctx.scene)),
        Write("cameras.json", artifacts.cameras_json(ctx.scene)),
        Checkpoint(90.0),
        _running(
            "opensfm",
            "export_geocoords",
            opensfm_dir,
            "--reconstruction",
            "--proj",
            "+proj=longlat",
        ),
        Log("INFO", f"Wrote camera models: {ctx.path('cameras.json')}"),
    ]
    return steps


def _openmvs(ctx: Context) -> list[Step]:
    rng = ctx.rng("openmvs")
    mvs_dir = ctx.path("opensfm/undistorted/openmvs")
    steps: list[Step] = [
        _running("opensfm", "export_openmvs", ctx.path("opensfm")),
        Log("INFO", "Running dense reconstruction. This might take a while."),
        Log("INFO", "Estimating depthmaps"),
        _running("DensifyPointCloud", f"{mvs_dir}/scene.mvs", "--resolution-level", "2"),
    ]
    total_points = 0
    for index, name in enumerate(ctx.names):
        points = rng.randint(150_000, 400_000)
        total_points += points
        steps.append(
            Raw(
                f"Depth-map for image {index} ({name}) estimated: {points} points "
                f"({rng.uniform(1, 6):.2f}s)"
            )
        )
    steps += [
        Checkpoint(60.0),
        Log("INFO", "Fusing depthmaps"),
        Raw(
            f"Depth-maps fused and filtered: {len(ctx.names)} depth-maps, "
            f"{total_points // 3} points"
        ),
        Write(
            "opensfm/undistorted/openmvs/scene_dense_dense_filtered.ply",
            artifacts.point_cloud_ply(ctx.scene),
        ),
        Log("INFO", "Finished dense point cloud fusion"),
    ]
    return steps


def _filterpoints(ctx: Context) -> list[Step]:
    if ctx.invocation.flag("fast-orthophoto"):
        source = ctx.path("opensfm/reconstruction.ply")
    else:
        source = ctx.path("opensfm/undistorted/openmvs/scene_dense_dense_filtered.ply")
    std = ctx.invocation.value("pc-filter") or "2.5"
    return [
        Log("INFO", f"Filtering {source} (statistical, meanK 16, standard deviation {std})"),
        Raw(f"Filtered {len(ctx.scene.ground_points())} points"),
        Write("odm_filterpoints/point_cloud.ply", artifacts.point_cloud_ply(ctx.scene)),
        Log("INFO", f"Wrote {ctx.path('odm_filterpoints/point_cloud.ply')}"),
    ]


def _meshing(ctx: Context) -> list[Step]:
    depth = ctx.invocation.value("mesh-octree-depth") or "11"
    size = ctx.invocation.value("mesh-size") or "200000"
    mesh_25d: list[Step] = [
        Log("INFO", f"Writing ODM 2.5D Mesh file in: {ctx.path('odm_meshing/odm_25dmesh.ply')}"),
        Write("odm_meshing/odm_25dmesh.ply", artifacts.mesh_ply(ctx.scene)),
        Log("INFO", "Completed mesh generation"),
    ]
    if ctx.invocation.flag("skip-3dmodel"):
        return mesh_25d
    return [
        Log("INFO", f"Writing ODM Mesh file in: {ctx.path('odm_meshing/odm_mesh.ply')}"),
        _running(
            "PoissonRecon", "--in", ctx.path("odm_filterpoints/point_cloud.ply"), "--depth", depth
        ),
        Raw(f"Decimating mesh to {size} faces"),
        Write("odm_meshing/odm_mesh.ply", artifacts.mesh_ply(ctx.scene)),
        *mesh_25d,
    ]


def _textured_dir(ctx: Context) -> str:
    """ODM textures only the 2.5D mesh, in ``odm_texturing_25d/``, with ``--skip-3dmodel``."""
    return "odm_texturing_25d" if ctx.invocation.flag("skip-3dmodel") else "odm_texturing"


def _texturing(ctx: Context) -> list[Step]:
    folder = _textured_dir(ctx)
    obj = f"{folder}/odm_textured_model_geo.obj"
    mesh = "odm_25dmesh.ply" if folder == "odm_texturing_25d" else "odm_mesh.ply"
    return [
        Log("INFO", f"Writing MVS Textured file in: {ctx.path(obj)}"),
        _running(
            "texrecon",
            ctx.path("opensfm/undistorted/reconstruction.nvm"),
            ctx.path(f"odm_meshing/{mesh}"),
        ),
        Raw("Building adjacency graph... done."),
        Raw("Generating texture patches... done."),
        Raw("Building texture atlases... done."),
        Write(obj, artifacts.textured_obj(ctx.scene, "odm_textured_model_geo.mtl")),
        Write(f"{folder}/odm_textured_model_geo.mtl", artifacts.textured_mtl()),
        Write(f"{folder}/{artifacts.TEXTURE_NAME}", artifacts.png()),
        Log("INFO", "Generating glTF Binary"),
        Write(f"{folder}/odm_textured_model_geo.glb", artifacts.glb(ctx.scene)),
    ]


def _georeferencing(ctx: Context) -> list[Step]:
    laz = _LAZ
    steps: list[Step] = [
        Log("INFO", "Georeferencing point cloud"),
        _running(
            "pdal",
            "translate",
            "-i",
            ctx.path("odm_filterpoints/point_cloud.ply"),
            "-o",
            ctx.path(laz),
        ),
        Write(laz, artifacts.las(ctx.scene, ctx.started)),
        Log("INFO", f"Created {ctx.path(laz)}"),
    ]
    if ctx.invocation.flag("pc-ept"):
        steps.append(Log("INFO", "Creating Entwine Point Tile output"))
        for name, data in artifacts.ept_files(ctx.scene, ctx.started).items():
            steps.append(Write(f"entwine_pointcloud/{name}", data))
    return steps


def _dem(ctx: Context) -> list[Step]:
    want_dsm = ctx.invocation.flag("dsm")
    want_dtm = ctx.invocation.flag("dtm")
    if not (want_dsm or want_dtm):
        return [Log("WARNING", "DEM will not be generated")]
    resolution = ctx.invocation.value("dem-resolution") or "5"
    steps: list[Step] = [
        Log("INFO", f"Create DSM: {want_dsm}"),
        Log("INFO", f"Create DTM: {want_dtm}"),
        Log(
            "INFO",
            f"DEM input file {ctx.path(_LAZ)} found: True",
        ),
    ]
    euclidean = ctx.invocation.flag("dem-euclidean-map")
    # as ODM: a DTM with euclidean maps needs the DSM too (split-merge merges DTMs with its map)
    products = [
        ("dsm", want_dsm or (want_dtm and euclidean)),
        ("dtm", want_dtm),
    ]
    for product, wanted in products:
        if wanted:
            steps += [
                Log("INFO", f"Generating {product} at {resolution} cm/px"),
                Checkpoint(50.0),
                Write(
                    f"odm_dem/{product}.tif",
                    artifacts.dem_tiff(ctx.scene, surface=product == "dsm"),
                ),
                Log("INFO", f"Wrote {ctx.path(f'odm_dem/{product}.tif')}"),
            ]
            if euclidean:
                # ODM: io.related_file_path(<dem>, postfix=".euclideand")
                emap = f"odm_dem/{product}.euclideand.tif"
                steps += [
                    Log("INFO", f"Computing euclidean distance: {ctx.path(emap)}"),
                    Write(emap, artifacts.dem_tiff(ctx.scene, surface=False)),
                ]
    return steps


def _orthophoto(ctx: Context) -> list[Step]:
    if ctx.invocation.flag("skip-orthophoto"):
        return [Log("WARNING", "--skip-orthophoto is set, no orthophoto will be generated")]
    resolution = ctx.invocation.value("orthophoto-resolution") or "5"
    tif = "odm_orthophoto/odm_orthophoto.tif"
    return [
        Log("INFO", f"Creating GeoTIFF at {resolution} cm/px"),
        _running(
            "odm_orthophoto",
            "-inputFiles",
            ctx.path(f"{_textured_dir(ctx)}/odm_textured_model_geo.obj"),
            "-output",
            ctx.path(tif),
        ),
        Raw("Rendering the ortho photo... done."),
        Write(tif, artifacts.orthophoto_tiff(ctx.scene)),
        Log("INFO", f"Created {ctx.path(tif)}"),
        *_cutline(ctx),
        Write("odm_orthophoto/odm_orthophoto.png", artifacts.png(16, 16)),
        Log("INFO", f"Created {ctx.path('odm_orthophoto/odm_orthophoto.png')}"),
        *_feathered(ctx),
    ]


def _cutline(ctx: Context) -> list[Step]:
    """``--orthophoto-cutline``: the cutline, and in a submodel the cut orthophoto (ODM order)."""
    if not ctx.invocation.flag("orthophoto-cutline"):
        return []
    cutline = "odm_orthophoto/cutline.gpkg"
    steps: list[Step] = [
        Log("INFO", "Computing cutline"),
        Write(cutline, artifacts.geopackage(ctx.scene)),
        Log("INFO", f"Wrote {ctx.path(cutline)}"),
    ]
    if not ctx.submodel_run:
        return [*steps, Log("INFO", "Not a submodel run, skipping mask raster generation")]
    cut = "odm_orthophoto/odm_orthophoto_cut.tif"
    return [
        *steps,
        Log("INFO", f"Computing mask raster: {ctx.path(cut)}"),
        Write(cut, artifacts.orthophoto_tiff(ctx.scene)),
    ]


def _feathered(ctx: Context) -> list[Step]:
    if not (ctx.invocation.flag("orthophoto-cutline") and ctx.submodel_run):
        return []
    feathered = "odm_orthophoto/odm_orthophoto_feathered.tif"
    return [
        Log("INFO", f"Computing feather raster: {ctx.path(feathered)}"),
        Write(feathered, artifacts.orthophoto_tiff(ctx.scene)),
    ]


def _report(ctx: Context) -> list[Step]:
    shots = "odm_report/shots.geojson"
    steps: list[Step] = [
        Log("INFO", "Exporting shots.geojson"),
        Write(shots, artifacts.shots_geojson(ctx.scene)),
        Log("INFO", f"Wrote {ctx.path(shots)}"),
    ]
    if ctx.invocation.flag("skip-report"):
        steps.append(Log("WARNING", "--skip-report is set, no report will be generated"))
        return steps
    report_lines = [
        "ODM test engine report - TEST DOUBLE, no processing was done",
        f"Project: {ctx.invocation.project_name}",
        f"Images: {len(ctx.scene.images)}",
        f"Generated: {ctx.started.isoformat(timespec='seconds')}",
    ]
    steps += [
        Log("INFO", "Generating report"),
        Write("odm_report/report.pdf", artifacts.pdf(report_lines)),
        Log("INFO", f"Wrote report on {ctx.path('odm_report/report.pdf')}"),
    ]
    return steps


def _postprocess(ctx: Context) -> list[Step]:
    steps: list[Step] = [Log("INFO", "Post Processing")]
    if ctx.invocation.flag("3d-tiles"):
        steps += [
            Log("INFO", "Generating 3D tiles"),
            Write("3d_tiles/model/tileset.json", artifacts.tileset(ctx.scene)),
            Write("3d_tiles/pointcloud/tileset.json", artifacts.tileset(ctx.scene)),
            Log("INFO", f"Wrote {ctx.path('3d_tiles')}"),
        ]
    return steps


_PLANS: dict[str, Callable[[Context], list[Step]]] = {
    "dataset": _dataset,
    "split": _split,
    "merge": _merge,
    "opensfm": _opensfm,
    "openmvs": _openmvs,
    "odm_filterpoints": _filterpoints,
    "odm_meshing": _meshing,
    "mvs_texturing": _texturing,
    "odm_georeferencing": _georeferencing,
    "odm_dem": _dem,
    "odm_orthophoto": _orthophoto,
    "odm_report": _report,
    "odm_postprocess": _postprocess,
}
