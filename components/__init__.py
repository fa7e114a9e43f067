"""Kubeflow Pipelines components of the FOD training pipeline, each also a plain function.

Imports only ``fod_core`` (never ``pipelines``); heavy imports stay inside functions so
that importing a component module has no side effects and costs nothing.
"""
