"""A user's callback and models for the tests, named by `_target_` (with the repository on
PYTHONPATH): a callback that signals its own process at a chosen step, one that holds a sweep's
job until another has begun, one that holds a search process's first trial until another
process has begun one, a model with dropout, and a model that records how each training batch
is laid out over JAX's devices."""

import json
import os
import signal
import time
from pathlib import Path

import keras


class SignalAt(keras.callbacks.Callback):
    """Sends the signal RUNNER_TEST_SIGNAL (`KILL@50`: SIGKILL once step 50 has trained;
    `INT@end`: SIGINT as Keras's `fit` ends, in a run started afresh once its last checkpoint
    is written) to this process;
    does nothing where it is unset. Set by environment, not by config, so the run it stops and
    its resume have the same settings."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        name, step = self._wanted()
        if name and step != "end" and self._step() == int(step):
            os.kill(os.getpid(), signal.Signals[f"SIG{name}"])

    def on_train_end(self, logs: dict | None = None) -> None:
        name, step = self._wanted()
        if name and step == "end":
            os.kill(os.getpid(), signal.Signals[f"SIG{name}"])

    def _wanted(self) -> tuple[str, str]:
        name, _, step = os.environ.get("RUNNER_TEST_SIGNAL", "").partition("@")
        return name, step

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))


@keras.saving.register_keras_serializable(package="tests")
class RecordSharding(keras.layers.Layer):
    """Passes its input on, writing to RUNNER_TEST_SHARDING, as JSON, the shape of the batch
    and of each device's shard of it, as XLA laid it out when `fit` compiled its step."""

    def call(self, x):
        import jax

        def record(sharding):
            with open(os.environ["RUNNER_TEST_SHARDING"], "a") as file:
                shard = sharding.shard_shape(tuple(x.shape))
                devices = len(sharding.device_set)
                file.write(json.dumps({"batch": list(x.shape), "shard": shard, "devices": devices}))
                file.write("\n")

        jax.debug.inspect_array_sharding(x, callback=record)
        return x


def sharded_softmax(input_shape: tuple, num_classes: int) -> keras.Model:
    """Softmax regression whose input passes `RecordSharding`."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(RecordSharding()(inputs))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def dropout_softmax(input_shape: tuple, num_classes: int, output: str = "logits") -> keras.Model:
    """Softmax regression behind Keras's Dropout, whose random state a resumed run must carry
    on from its checkpoint; emits probabilities if `output` says so."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Dropout(0.2)(keras.layers.Flatten()(inputs))
    outputs = keras.layers.Dense(num_classes)(x)
    if output == "probabilities":
        outputs = keras.layers.Softmax()(outputs)
    return keras.Model(inputs, outputs)


class WaitForJob(keras.callbacks.Callback):
    """Marks in `folder` that this sweep job has begun training; job `waiter` then holds its end
    until job `awaited` has begun too (at most `timeout` seconds), so that a sweep's jobs are of
    unequal length and a test can tell whether `awaited` had to wait for `waiter` to end."""

    def __init__(self, folder: str, waiter: int = 0, awaited: int = 2, timeout: float = 60):
        super().__init__()
        from hydra.core.hydra_config import HydraConfig

        self.folder, self.job = Path(folder), HydraConfig.get().job.num
        self.waiter, self.awaited, self.timeout = waiter, awaited, timeout

    def on_train_begin(self, logs: dict | None = None) -> None:
        (self.folder / f"{self.job}.begun").touch()

    def on_train_end(self, logs: dict | None = None) -> None:
        deadline = time.monotonic() + self.timeout
        while self.job == self.waiter and time.monotonic() < deadline:
            if (self.folder / f"{self.awaited}.begun").exists():
                return
            time.sleep(0.1)


class WaitForOtherProcess(keras.callbacks.Callback):
    """Marks in `folder` that a job of this process has begun training, and holds the end of
    this process's first job until a job of another process has begun (at most `timeout`
    seconds): each of the search processes sharing a study then runs a trial."""

    def __init__(self, folder: str, timeout: float = 120):
        super().__init__()
        self.folder, self.timeout = Path(folder), timeout
        self.mark = self.folder / f"{os.getpid()}.begun"
        self.first = not self.mark.exists()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.mark.touch()

    def on_train_end(self, logs: dict | None = None) -> None:
        deadline = time.monotonic() + self.timeout
        while self.first and time.monotonic() < deadline:
            if any(p != self.mark for p in self.folder.glob("*.begun")):
                return
            time.sleep(0.1)
