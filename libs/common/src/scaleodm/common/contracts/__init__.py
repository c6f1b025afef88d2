"""Typed messages and the bus layout: commands, events, subjects and streams (pydantic only)."""
