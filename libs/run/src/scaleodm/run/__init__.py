"""The code that runs inside a task's run, not in a service: imported by the scheduler that builds
the run and executed by the run itself.

- ``runner``: a local run, as its own process (``python -m scaleodm.run.runner <run dir>``),
  forked by the scheduler's local executor from ``forking``'s pre-imported fork server (or
  spawned, when that server is not there);
- ``stages``: the fetch and upload steps of an Argo run's pod
  (``python -m scaleodm.run.stages fetch|upload ...``), named in the scheduler's Workflow;
- ``fetching``, ``packaging``, ``engines``: the inputs, the outputs and the engine command they
  share.

It may import ``scaleodm.common``, never a service (import-linter contracts in pyproject.toml).
Submodules are not imported here, so ``python -m`` runs each without importing the others.
"""
