"""Pruning algorithms (pure functions over a model graph and calibration tokens)."""
