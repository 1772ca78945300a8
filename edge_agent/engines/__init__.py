"""Inference engines: the `InferenceEngine` interface (base.py) and its registry (registry.py)."""
