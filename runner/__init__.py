"""Keras 3 experiment runner driven by Hydra configs, tracked in MLflow."""
