"""Run sources: where the watcher learns about runs (local run directories; Argo later)."""
