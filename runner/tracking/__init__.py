"""Tracking: the MLflow store, a run's lifecycle and record, logged models, the registry and
serving, and the masking of secrets in whatever is written or shown."""
