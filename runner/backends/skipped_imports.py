"""Packages that a framework imports, while it loads, for features a run never uses: each
costs every command seconds of its start. Skipped by making them import as if not installed,
for the moment the framework loads; both guard the import and go without the feature."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

# scikit-learn (with SciPy), for Keras's scikit-learn estimator wrappers (`keras.wrappers`):
# 2 of a TensorFlow run's 12 CPU seconds here. JAX, which TensorFlow imports for TFLite's
# converter of JAX functions: 2 more.
UNUSED = {"keras": ("sklearn",), "tensorflow": ("sklearn", "jax")}


@contextmanager
def skipping(names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, importing one of `names` fails (ImportError), unless it is loaded
    already. Afterwards the package imports as usual, for user code that wants it; what the
    framework loaded without it stays so in this process (Keras's scikit-learn wrappers)."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in blocked:
            del sys.modules[name]
