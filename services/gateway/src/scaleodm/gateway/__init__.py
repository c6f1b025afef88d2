"""The NodeODM-compatible HTTP gateway: stores tasks, publishes commands, reads task state."""
