"""The scheduler: turns task commands into runs (local processes or, later, Argo Workflows)."""
