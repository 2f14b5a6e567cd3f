"""Sweeps: Hydra multirun jobs and their overrides, the parent run of a sweep, pruning, and
SLURM's requeues."""
