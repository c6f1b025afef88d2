"""Kubernetes API double for tests: a loopback apiserver, an Argo controller double, fixtures.

See :mod:`tests.k8s.apiserver` (HTTP surface and in-memory storage), :mod:`tests.k8s.controller`
(the Argo Workflows controller played over that storage, running the ODM test double) and
``tests/k8s/conftest.py`` (pytest fixtures).
"""
