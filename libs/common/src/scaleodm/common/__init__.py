"""Contracts shared by the ScaleODM services: settings, domain rules, messages, store, S3, logs.

Services never import each other; they meet here and on the bus.
"""
