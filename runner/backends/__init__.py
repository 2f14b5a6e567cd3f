"""The Keras backend a run computes with, `backend=tensorflow` (the default) or `backend=jax`,
and what the runner does through it: load it, find its devices, seed it, feed it batches,
distribute over devices, read its GPU memory.

Keras reads KERAS_BACKEND once, when it is first imported, so `select` runs before anything
imports Keras; the `Backend` it returns is handed down to whatever computes with it. Each
backend module (`runner.backends.tensorflow`, `runner.backends.jax`) imports only its own
framework, so a JAX run never loads TensorFlow.
"""

import importlib.util
import os
import sys
from typing import Any

from runner.backends.base import Backend
from runner.backends.jax import JaxBackend
from runner.backends.tensorflow import TensorFlowBackend
from runner.errors import UserError

NAMES = ("tensorflow", "jax")
# What installs a backend that is missing.
INSTALL = {"tensorflow": "uv sync", "jax": "uv sync (or: uv pip install jax)"}


def select(name: str, device: Any = None) -> Backend:
    """Load backend `name` for Keras, with the `device` settings that must be known before the
    backend starts (JAX's XLA flags); returns it. A process whose Keras already runs on
    another backend (a reused sweep worker) cannot switch: refused in one line."""
    if name not in NAMES:
        raise UserError(f"backend={name} is not one of {', '.join(NAMES)}")
    if importlib.util.find_spec(name) is None:
        raise UserError(
            f"backend={name}: {name} is not installed here; install it: {INSTALL[name]}"
        )
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != name:
        raise UserError(
            f"backend={name}: Keras already runs on {keras.backend.backend()} in this process, "
            f"and cannot switch; run each backend in its own command (or sweep backends with "
            f"hydra/launcher=submitit_local, a process a job)"
        )
    os.environ["KERAS_BACKEND"] = name
    backend = of(name)
    backend.load(device)
    return backend


def of(name: str) -> Backend:
    """Backend `name`, without loading it: `select` loads it once a process; code the
    selected backend is not handed to (a benchmark, a test of the batch order) takes it so."""
    return JaxBackend() if name == "jax" else TensorFlowBackend()
