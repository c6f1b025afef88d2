"""The watcher: follows runs, turns them into task events, and projects events into MongoDB."""
