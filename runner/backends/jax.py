"""The runner on Keras's JAX backend, without TensorFlow: NumPy batches, XLA flags set before
JAX starts, `keras.distribution.DataParallel` over several devices, and the devices' own
memory statistics.

The training order is the runner's own (NumPy's generator seeded by the seed and the epoch),
not tf.data's, so a JAX run's history is its own: reproducible on JAX, not equal to the same
config's on TensorFlow."""

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from itertools import islice
from types import ModuleType
from typing import Any

import numpy as np

from runner.backends.base import Backend, cpu_split_refused, keras_module
from runner.backends.devices import Devices, Gpu, Plan, cpu_cores, gpu_memory_mib
from runner.backends.skipped_imports import UNUSED, skipping
from runner.data import Split, check_batch_fits
from runner.errors import UserError

_DEVICE_COUNT = "--xla_force_host_platform_device_count"
_DETERMINISTIC = "--xla_gpu_deterministic_ops"
# The XLA_FLAGS the user set, which `load` adds the device settings to.
_GIVEN_FLAGS = os.environ.get("XLA_FLAGS", "")
# The XLA_FLAGS JAX started with in this process, once it has: fixed from then on.
_started_with: str | None = None


class JaxBackend(Backend):
    name = "jax"
    packages = ("jax", "jaxlib")

    def load(self, device: Any = None) -> None:
        """Set what JAX reads once, when it starts, from `device`: the CPU split into
        `cpu_devices` devices, and on GPUs deterministic XLA kernels and memory taken as
        needed (so that sweep jobs can share a GPU), as TensorFlow's memory growth does. Then
        import Keras, without what it would import for features a run never uses (`UNUSED`),
        and without letting it import TensorFlow."""
        if device is not None:
            os.environ["XLA_FLAGS"] = flags_for(device)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # "Unable to initialize backend 'tpu'" at INFO, on every machine without one.
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        with skipping(UNUSED["keras"]):
            # Imports Keras; `module_utils` (private) holds its TensorFlow check, below.
            from keras.src.utils import module_utils

        if "tensorflow" not in sys.modules:
            # Keras asks whether TensorFlow is installed (`tf.available`) by importing it, to
            # seed it and to recognise its types when saving or sharding data: seconds and
            # TensorFlow's whole runtime for nothing, as no TensorFlow object exists unless
            # user code made one. A private attribute: tests/test_jax.py fails if a Keras
            # release stops honouring it.
            module_utils.tensorflow._available = False

    def physical_devices(self) -> list[str]:
        return [f"{device.platform.upper()}:{device.id}" for device in _jax().devices()]

    def detect(self, cpu_devices: int = 1) -> Devices:
        """The devices JAX sees. The CPU's split (`load`) takes effect only where JAX had not
        started yet in this process."""
        global _started_with
        cpus = _jax().devices("cpu")  # starts JAX, with the XLA_FLAGS of `load`
        _started_with = os.environ.get("XLA_FLAGS", "")
        if cpu_devices > 1 and len(cpus) != cpu_devices:
            raise cpu_split_refused(
                cpu_devices,
                f"JAX already set up {len(cpus)} CPU device(s) in this process (a reused sweep "
                f"worker, or XLA_FLAGS with {_DEVICE_COUNT})",
            )
        gpus = tuple(
            Gpu(device.device_kind, _capability(device), gpu_memory_mib(index))
            for index, device in enumerate(_gpus())
        )
        return Devices(gpus, cpu_cores(), len(cpus))

    def _distribute(self, plan: Plan) -> None:
        """A data-parallel run sets `keras.distribution.DataParallel` over every device for
        the process: Keras lays the weights out by it when building, and shards each batch by
        it in `fit`, `evaluate` and `predict`."""
        keras = keras_module()
        parallel = plan.strategy != "single"
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices) if parallel else None
        )

    def _determinism(self, deterministic: bool) -> None:
        """Nothing: determinism is XLA's (`load`): JAX's CPU kernels are deterministic, and
        its GPU ones are made so by flag."""

    def build_scope(self, plan: Plan) -> contextlib.AbstractContextManager:
        """Nothing: `start_clean` set the distribution for the whole run."""
        return contextlib.nullcontext()

    def training_dataset(
        self, split: Split, batch_size: int, seed: int, start_step: int = 0
    ) -> Any:
        """Endless batches in a seeded order, reshuffled every epoch; `start_step` skips the
        batches a resumed run has already trained on."""
        for indices in _batch_indices(len(split.y), batch_size, seed, start_step):
            yield split.x[indices], split.y[indices]

    def in_batches(self, split: Split, batch_size: int, labels: bool = True) -> Any:
        """A `PyDataset`, which `fit` can go through again at each validation, unlike a
        generator."""

        class InBatches(keras_module().utils.PyDataset):
            def __len__(self) -> int:
                return -(-len(split.y) // batch_size)

            def __getitem__(self, index: int) -> tuple:
                rows = slice(index * batch_size, (index + 1) * batch_size)
                return (split.x[rows], split.y[rows]) if labels else (split.x[rows],)

        return InBatches()

    def every_nth_batch(
        self, *, n: int, batch_size: int, seed: int, every: int, start_step: int
    ) -> Iterator[np.ndarray]:
        base = start_step // every * every
        return islice(_batch_indices(n, batch_size, seed, base), every - 1, None, every)

    def has_gpu(self) -> bool:
        return bool(_gpus())

    def reset_gpu_peak(self) -> None:
        """JAX keeps one peak per process and cannot reset it: `gpu_peak_mb` is the
        process's."""

    def gpu_peak_mb(self) -> float:
        """The most memory JAX has held on the first GPU since the process started."""
        stats = _gpus()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20


def xla_flags(given: str, device: Any) -> str:
    """XLA_FLAGS `given`, plus the CPU split into `device.cpu_devices` devices and, with
    `device.deterministic`, XLA's deterministic GPU kernels; a flag already given wins."""
    flags = given.split()
    if device.cpu_devices > 1 and _value(given, _DEVICE_COUNT) is None:
        flags.append(f"{_DEVICE_COUNT}={device.cpu_devices}")
    if device.deterministic and _value(given, _DETERMINISTIC) is None:
        flags.append(f"{_DETERMINISTIC}=true")
    return " ".join(flags)


def flags_for(device: Any) -> str:
    """The XLA_FLAGS `device` needs. In a process whose JAX started already (a reused sweep
    worker, Hydra's in-process launcher), which keeps its flags, one asking for another number
    of CPU devices, or on a GPU for other determinism, is refused rather than silently run
    with the first."""
    wanted = xla_flags(_GIVEN_FLAGS, device)
    if _started_with is None:
        return wanted
    names = [_DEVICE_COUNT, *([_DETERMINISTIC] if _gpus() else [])]
    if any(_value(wanted, name) != _value(_started_with, name) for name in names):
        raise UserError(
            f"device.cpu_devices={device.cpu_devices} device.deterministic="
            f"{str(device.deterministic).lower()} need XLA_FLAGS={wanted!r}, but JAX started "
            f"in this process with {_started_with!r} and cannot change: give each setting a "
            f"process of its own (hydra/launcher=submitit_local, or one command each)"
        )
    return _started_with


def _value(flags: str, name: str) -> str | None:
    """The value `flags` give flag `name`, the last one winning, as XLA reads them."""
    values = [flag.partition("=")[2] for flag in flags.split() if flag.split("=")[0] == name]
    return values[-1] if values else None


@functools.cache
def _jax() -> ModuleType:
    """JAX, imported once a process, after `JaxBackend.load` set the XLA_FLAGS it starts with
    (Keras imports it there); a backend taken from `runner.backends.of` finds it loaded by
    whatever its process runs on (a test, a benchmark)."""
    import jax

    return jax


def _gpus() -> list[Any]:
    try:
        return _jax().devices("gpu")
    except RuntimeError:  # no GPU backend: a CPU-only jaxlib, or no driver
        return []


def _capability(device: Any) -> tuple[int, int] | None:
    text = getattr(device, "compute_capability", None)
    if not text:
        return None
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def _batch_indices(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[np.ndarray]:
    """The example indices of each training batch from `start_step` on. The batches cut one
    endless stream of epochs, each a permutation of the `n` examples drawn from (seed, epoch),
    so a batch may span two epochs, as tf.data's `shuffle().repeat().batch()` does; a resumed
    run finds its place by arithmetic, not by replaying the stream."""
    check_batch_fits(n, batch_size)
    epoch, offset = divmod(start_step * batch_size, n)
    pending = _permutation(n, seed, epoch)[offset:]
    while True:
        while len(pending) < batch_size:
            epoch += 1
            pending = np.concatenate([pending, _permutation(n, seed, epoch)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
