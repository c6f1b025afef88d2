"""Executors: where a task attempt runs. ``base`` declares the port, the rest implement it."""
