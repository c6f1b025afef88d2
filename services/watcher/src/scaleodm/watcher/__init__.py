"""The watcher: follows runs, turns them into task events, and relays the outbox."""
