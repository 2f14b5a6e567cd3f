"""The runner on Keras's TensorFlow backend: tf.data batches, `tf.distribute` strategies, op
determinism and TensorFlow's own GPU memory statistics."""

import contextlib
import functools
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from runner.backends.base import Backend, cpu_split_refused
from runner.backends.devices import Devices, Gpu, Plan, cpu_cores, gpu_memory_mib
from runner.backends.skipped_imports import UNUSED, skipping
from runner.backends.tensorflow_logs import load_tensorflow
from runner.data import Split, check_batch_fits


class TensorFlowBackend(Backend):
    name = "tensorflow"
    packages = ("tensorflow",)

    def load(self, device: Any = None) -> None:
        """Import TensorFlow without its start-up noise (`runner.backends.tensorflow_logs`), and
        without the packages it and Keras would import for features a run never uses
        (`UNUSED`)."""
        with skipping(UNUSED["tensorflow"]):
            load_tensorflow()  # before anything else imports it
        logging.getLogger("tensorflow").setLevel(logging.WARNING)  # tf.distribute's INFO chatter
        logging.getLogger("tensorflow").addFilter(_not_retracing)

    def physical_devices(self) -> list[str]:
        return [
            device.name.removeprefix("/physical_device:")
            for device in _tf().config.list_physical_devices()
        ]

    def detect(self, cpu_devices: int = 1) -> Devices:
        """The devices TensorFlow sees, with GPU memory growth on (so that sweep jobs can share
        a GPU) and the CPU split into `cpu_devices` logical devices. Call before anything runs
        on them: TensorFlow fixes its devices at first use."""
        tf = _tf()
        physical_gpus = tf.config.list_physical_devices("GPU")
        for gpu in physical_gpus:
            # RuntimeError: already initialized, by an earlier job in this process
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
        _split_cpu(cpu_devices)
        gpus = tuple(_gpu(gpu, index) for index, gpu in enumerate(physical_gpus))
        return Devices(gpus, cpu_cores(), len(tf.config.list_logical_devices("CPU")))

    def _distribute(self, plan: Plan) -> None:
        """Nothing: the model keeps the strategy it is built in (`build_scope`)."""

    def _determinism(self, deterministic: bool) -> None:
        if deterministic:
            _tf().config.experimental.enable_op_determinism()
        else:
            # Private: TensorFlow (2.21) exports only the enable call, yet an earlier run's must
            # be undone. Imported here, not at the top, as it loads TensorFlow.
            from tensorflow.python.framework import config as tf_config

            tf_config.disable_op_determinism()

    @contextlib.contextmanager
    def build_scope(self, plan: Plan) -> Iterator[None]:
        """The scope of the `tf.distribute` strategy the model is built in, which it keeps for
        training. Only the building: a loss computed in a mirrored scope is divided by the
        replicas."""
        tf = _tf()
        if plan.strategy == "single":
            strategy = tf.distribute.get_strategy()  # the default: one device, no replication
        else:
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
        with strategy.scope():
            yield

    def training_dataset(
        self, split: Split, batch_size: int, seed: int, start_step: int = 0
    ) -> Any:
        """Endless batches in a seeded order, reshuffled every epoch, prefetched behind
        training; `start_step` skips the batches a resumed run has already trained on.

        Shuffling indices and gathering whole batches costs one op per batch instead of one
        per example, which keeps the input pipeline off the critical path even for the
        softmax model."""
        tf = _tf()
        x, y = tf.constant(split.x), tf.constant(split.y)
        return (
            batch_indices(len(split.y), batch_size, seed)
            .skip(start_step)
            .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
            .prefetch(tf.data.AUTOTUNE)
        )

    def in_batches(self, split: Split, batch_size: int, labels: bool = True) -> Any:
        """A tf.data dataset. Keras's own pipeline for arrays maps in parallel, which under op
        determinism makes TensorFlow 2.21 print a spurious ERROR line ("NodeDef mentions
        attribute use_unbounded_threadpool")."""
        examples = (split.x, split.y) if labels else split.x
        return _tf().data.Dataset.from_tensor_slices(examples).batch(batch_size)

    def every_nth_batch(
        self, *, n: int, batch_size: int, seed: int, every: int, start_step: int
    ) -> Iterator[np.ndarray]:
        shard = batch_indices(n, batch_size, seed).shard(every, every - 1)
        return shard.skip(start_step // every).as_numpy_iterator()

    def has_gpu(self) -> bool:
        return bool(_tf().config.list_logical_devices("GPU"))

    def reset_gpu_peak(self) -> None:
        _tf().config.experimental.reset_memory_stats("GPU:0")

    def gpu_peak_mb(self) -> float:
        return _tf().config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


@functools.cache
def _tf() -> ModuleType:
    """TensorFlow, imported once a process: first by `TensorFlowBackend.load`, through
    `load_tensorflow`, when `runner.backends.select` chose it; a backend taken from
    `runner.backends.of` finds it loaded by whatever its process runs on (a test, a benchmark)."""
    import tensorflow

    return tensorflow


def _not_retracing(record: logging.LogRecord) -> bool:
    """Drops TensorFlow's retracing warning, which a sweep's jobs in one process all trigger:
    each builds a new model, hence new functions to trace."""
    return "triggered tf.function retracing" not in record.getMessage()


def _split_cpu(count: int) -> None:
    if count == 1:
        return
    tf = _tf()
    [cpu] = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise cpu_split_refused(
                count,
                "TensorFlow already set up its devices in this process (a reused sweep worker)",
            ) from None


def _gpu(device: Any, index: int) -> Gpu:
    details = _tf().config.experimental.get_device_details(device)
    return Gpu(
        details.get("device_name", device.name),
        details.get("compute_capability"),
        gpu_memory_mib(index),
    )


def batch_indices(n: int, batch_size: int, seed: int) -> Any:
    """The example indices of each training batch, in training order, as a tf.data dataset: the
    same `seed` replays the same sequence."""
    tf = _tf()
    check_batch_fits(n, batch_size)
    return (
        tf.data.Dataset.range(n)
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )
