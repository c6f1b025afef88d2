"""odm-test-engine — a TEST DOUBLE of OpenDroneMap (ODM).

This program does **no photogrammetry at all**. It imitates the observable behaviour of ODM 3.x's
``run.py`` (the console markers, the UDP progress datagrams, the exit codes and the output directory
layout) so that ScaleODM's services, workflows and tests can be exercised without the multi-gigabyte
ODM image. It plays the same role as NodeODM's ``--test`` mode. Every file it writes is a small,
syntactically valid *placeholder* — the orthophoto and the DEMs are real georeferenced
GeoTIFFs (WGS84, 128 x 128) of a synthetic landscape, so that rasters can be read, tiled and
mapped; never deploy it as a substitute for ODM in production.

Command line (mimics ODM's ``run.py``)::

    odm-test-engine [ODM options...] --project-path <dir> <project-name>
    python -m odm_test_engine [ODM options...] --project-path <dir> <project-name>

Any ODM option is accepted. Parsing is lenient: ``--name=value`` is an option with a value; a known
ODM boolean option never takes a value; any other ``--name`` followed by a token that does not look
like a flag takes that token as its value, otherwise it is a boolean. The last token is the project
name (default ``code``, as in ODM) unless it is the value of a known valued option such as
``--project-path``. Options that change behaviour:

``--fast-orthophoto``
    the ``openmvs`` stage is not run.
``--end-with <stage>``
    stop after ``<stage>`` (``[INFO]    No more stages to run``); an unknown stage name is a usage
    error (exit 2).
``--dsm`` / ``--dtm``
    write ``odm_dem/dsm.tif`` / ``odm_dem/dtm.tif`` (ODM writes DEMs only when asked).
``--skip-orthophoto`` / ``--skip-report``
    no orthophoto / no report outputs.
``--pc-ept`` / ``--3d-tiles``
    write ``entwine_pointcloud/`` / ``3d_tiles/``.
``--skip-3dmodel``
    no ``odm_meshing/odm_mesh.ply``; the textured model goes to ``odm_texturing_25d/``.
``--orthophoto-cutline``
    also write ``odm_orthophoto/cutline.gpkg`` (a real, tiny GeoPackage); in a *submodel run* (the
    project directory is named ``submodel_*``, or ``opensfm/features/empty`` exists, as ODM
    detects it) also ``odm_orthophoto/odm_orthophoto_cut.tif`` and ``..._feathered.tif``.
``--dem-euclidean-map``
    also write ``odm_dem/<dsm|dtm>.euclideand.tif`` next to each DEM (and, as ODM, the DSM when
    only ``--dtm`` is asked).
``--split <N> --sm-cluster <URL>``
    split-merge with a remote node, see below. ``--split`` alone (ODM's local split-merge) is not
    imitated: a warning, then a normal run.

Split-merge (``--split N --sm-cluster URL``, more than ``N`` images, at least one with EXIF GPS —
without GPS ODM refuses to split, and so does the double): the stages are ``dataset``, ``split``,
``merge``, ``odm_postprocess``, as in ODM. ``split`` cuts the images (sorted by name) into
``ceil(count / N)`` submodels under ``submodels/submodel_NNNN/`` (images linked, placeholder seed
files in ``opensfm/``), then runs ODM's toolchain phase of ``LocalRemoteExecutor``: the local
worker processes one submodel at a time in-process (its share of the split time, then the child's
placeholder outputs); while it is busy, the remote worker sends the next submodel to the node with
PyODM (``Node.from_url``, so ``?token=`` is honoured) exactly as ODM would — images + ``seed.zip``,
the parent's options rewritten like ODM's ``get_submodel_args_dict``, ``skip_post_processing`` and
ODM's toolchain ``outputs`` —, waits for it, downloads ``all.zip`` into the submodel directory and
removes the remote task. A queued task ("task limit reached") is removed and re-queued; other
errors are retried up to 5 times after ``retries x ODM_TEST_ENGINE_RETRY_S``; a failed remote task
fails the run (exit 1, a Python traceback on stderr as ODM's). ``merge`` checks that every
submodel has its outputs (exit 1 with an ``[ERROR]`` line if not) and writes the merged orthophoto,
DEMs, point cloud, ``shots.geojson`` and ``cameras.json``. Only the toolchain phase is imitated:
ODM's first phase (OpenSfM reconstruction of each submodel, on the node too) and the alignment are
skipped. See :mod:`odm_test_engine.splitmerge`.

Test-double controls (environment variables):

``ODM_TEST_ENGINE_SECONDS``
    total run time in seconds (float >= 0, default ``3``), spread over the executed stages in
    proportion to their ODM progress weights (scaleodm.md §11). ``0`` runs without any pause.
``ODM_TEST_ENGINE_FAIL``
    integer exit code 1-255 (e.g. ``1``, ``137``): the run fails half-way through the failure stage,
    printing ODM's ``===== Dumping Info for Geeks ...`` block and an ``[ERROR]`` explanation, then
    exits with that code. Unset, empty or ``0`` means no failure.

    Per run, an input image named ``odm-test-engine-fail-<code>.<ext>`` (e.g.
    ``odm-test-engine-fail-137.jpg``) does the same for that run only, so one task of many fails.
``ODM_TEST_ENGINE_FAIL_STAGE``
    stage at which to fail (default ``opensfm``). If that stage is not executed
    (``--fast-orthophoto`` with ``openmvs``, or a stage after ``--end-with``) the run succeeds.
``ODM_TEST_ENGINE_RETRY_S``
    split-merge: the backoff unit before a remote submodel is retried (float >= 0, default
    ``10``, ODM's ``retry_timeout``).
``ODM_TEST_ENGINE_POLL_S``
    split-merge: how often a remote task's status is polled (float > 0, default ``3``, PyODM's
    ``wait_for_completion`` interval, which ODM keeps).
``ODM_TEST_ENGINE_SECONDS_PER_IMAGE``
    seconds added to a run per input image (float >= 0, default ``0``): ODM's time grows with the
    dataset, and a benchmark of split-merge needs runs that do too. A split run's images are
    counted in its submodels (a local one takes its share of ``ODM_TEST_ENGINE_SECONDS`` plus its
    images' time; a remote one is a run of its own).
``ODM_TEST_ENGINE_PROGRESS_PORT``
    UDP port for the ``PGUP/<pid>/<project-name>/<percent>`` progress datagrams (default ``6367``,
    ODM's port; always sent to ``127.0.0.1``, best effort).
``no_ansiesc``
    when set to a non-empty value, log lines are printed without ANSI colour codes (as in ODM).

Input and outputs: images are read from ``<project-path>/<project-name>/images/`` (jpg, jpeg, tif,
tiff, png; case-insensitive). Placeholder outputs are written under
``<project-path>/<project-name>/`` in ODM's layout as the stages finish: ``images.json`` (dataset);
``cameras.json``, ``opensfm/reconstruction.json`` (opensfm); ``odm_filterpoints/point_cloud.ply``;
``odm_meshing/odm_mesh.ply``; ``odm_texturing/odm_textured_model_geo.obj`` (+ ``.mtl``, texture,
``.glb``); ``odm_georeferencing/odm_georeferenced_model.laz`` (+ ``entwine_pointcloud/`` with
``--pc-ept``); ``odm_dem/dsm.tif``/``dtm.tif`` (only with ``--dsm``/``--dtm``);
``odm_orthophoto/odm_orthophoto.tif`` and ``.png``; ``odm_report/shots.geojson`` and ``report.pdf``;
``3d_tiles/`` (with ``--3d-tiles``); and finally ``log.json``. The layout is simplified: unlike ODM,
the 3D model outputs are written even with ``--fast-orthophoto``.

Invalid test-double settings are reported on stderr and the program exits with 2 before printing
anything else.

Exit codes: 0 success; 1 no images (``[ERROR]   Not enough supported images in ...``); the
``ODM_TEST_ENGINE_FAIL`` code on injected failure (a local split-merge submodel holding the marker
image fails the run the same way); 1 for split-merge failures; 2 usage/configuration error; 143 on
SIGTERM and 130 on SIGINT (the program stops at once and writes no further output files; no
``log.json`` is written in that case — during split-merge it first removes the remote tasks it
still knows, for at most 10 s, as ODM's cleanup callback does; ODM itself then exits with 1, the
double keeps 143/130); 141 when stdout is closed by its reader (as if killed by SIGPIPE).
"""

__version__ = "0.1.0"

#: The ODM release whose console output is imitated.
ODM_VERSION = "3.6.0"

__all__ = ["ODM_VERSION", "__version__"]
