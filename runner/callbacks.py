"""Keras callbacks that report training in optimizer steps rather than Keras epochs.

The runner trains in "epochs" of `trainer.log_every` steps, so each epoch's averaged metrics are
exactly the tutorial's periodic training report. The step is the optimizer's iteration count
(`StepCounter`), which stays right across resumes and interrupted epochs.
"""

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from runner import classifier
from runner.backends.base import Backend
from runner.data import Split
from runner.errors import UserError
from runner.stopping import StopReason, Stops

log = logging.getLogger(__name__)


def optimizer_step(model: keras.Model) -> int:
    """How many optimizer steps `model` has taken: the step a batch-end callback reports on."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class StepCounter(keras.callbacks.Callback):
    """The optimizer step, read off the device once per `fit` and then counted from the batch
    index Keras passes at the end of each execution: a read waits for the device, which every
    callback that needs the step would otherwise do every window. Put it first, so that the
    others see the step of the execution that just ended."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step = optimizer_step(self.model)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = self.step

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step = self._epoch_start + batch + 1


class MlflowMetrics(keras.callbacks.Callback):
    """Logs `train/<metric>` and `val/<metric>` at the optimizer step each epoch ends on, if it
    ends a whole window of `window` steps: an epoch cut short by a stop averages only part of
    its window, and its resumed run logs the whole window instead."""

    def __init__(self, recorder: Any, counter: StepCounter, window: int):
        super().__init__()
        self.recorder, self.counter, self.window = recorder, counter, window

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.counter.step % self.window:
            return
        metrics = {_metric_name(key): value for key, value in (logs or {}).items()}
        self.recorder.log_metrics(metrics, step=self.counter.step)


def _metric_name(key: str) -> str:
    """Keras's `loss` and `val_loss` as `train/loss` and `val/loss`; `perf/...` stays."""
    if "/" in key:
        return key
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


class Throughput(keras.callbacks.Callback):
    """Adds `perf/steps_per_sec` and `perf/examples_per_sec` to each window's logs, timed over
    its training steps only (validation excluded), and on a GPU `perf/gpu_peak_mb`, the peak
    memory the backend allocated on the first GPU: in the window on TensorFlow, since the
    process started on JAX, which cannot reset its peak.

    The first execution of each `fit` is left out: it traces and compiles the step function."""

    def __init__(self, batch_size: int, steps_per_execution: int, backend: Backend):
        super().__init__()
        self.batch_size = batch_size
        self.steps_per_call = steps_per_execution
        self.backend = backend
        self.gpu = self.backend.has_gpu()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.traced = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = self.end = time.perf_counter() if self.traced else None
        self.steps = 0
        if self.gpu:
            self.backend.reset_gpu_peak()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        if not self.traced:
            self.traced, self.start, self.end = True, now, now
            return
        self.steps += self.steps_per_call
        self.end = now

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        if self.steps and self.end > self.start:
            rate = self.steps / (self.end - self.start)
            logs["perf/steps_per_sec"] = rate
            logs["perf/examples_per_sec"] = rate * self.batch_size
        if self.gpu:
            logs["perf/gpu_peak_mb"] = self.backend.gpu_peak_mb()


class TrainingDiverged(UserError):
    """The training loss stopped being a finite number."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the step whose loss is NaN or infinite, naming that step, and tells
    `stops` why. Keras's TerminateOnNaN either only stops, so that the run looks finished, or
    raises a RuntimeError naming the batch in the Keras epoch (a logging window here) with no
    fix: a traceback, where this ends the run FAILED with one line."""

    def __init__(self, stops: Stops):
        super().__init__()
        self.stops = stops

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if not np.isfinite(loss):
            self.stops.request(StopReason.NON_FINITE_LOSS)
            raise TrainingDiverged(
                f"the training loss became {loss} at step {optimizer_step(self.model)}; "
                f"lower optimizer.lr or check the data"
            )


class StepProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, headed by the steps it covers instead of "Epoch i/n"."""

    def __init__(self, total_steps: int, counter: StepCounter):
        super().__init__()
        self.total_steps, self.counter = total_steps, counter

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._reset_progbar()
        self._maybe_init_progbar()
        if self.verbose:
            first = self.counter.step + 1
            last = first + self.target - 1
            print(f"Steps {first}-{last} of {self.total_steps}", flush=True)


class StopOnSignal(keras.callbacks.Callback):
    """Stops training at the end of the execution under way (the device.steps_per_execution
    steps the backend runs in one call, after which Keras calls back) once `stops` has a
    reason: Ctrl-C (SIGINT), SIGTERM or SIGUSR2, which `stops` takes for a stop request from
    `on_train_begin` to `on_train_end`, or another callback's. So does a `recorder` whose
    tracking server has stopped answering, at the end of the window whose metrics it could not
    write."""

    def __init__(self, stops: Stops, recorder: Any) -> None:
        super().__init__()
        self.stops, self.recorder = stops, recorder

    @property
    def received(self) -> str | None:
        """The name of the stop signal received, if any; set, as if it were received now."""
        return self.stops.signal.name if self.stops.signal else None

    @received.setter
    def received(self, name: str) -> None:
        self.stops.signalled(signal.Signals[name])

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.stops.steps_begin(self.model.steps_per_execution)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.stops.reason is not None:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.recorder.lost:
            self.stops.request(StopReason.SERVER_LOST)
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        self.stops.steps_end()


@dataclass(frozen=True)
class Training:
    """What a callback of the runner's needs to know of the run it joins."""

    train: Split
    batch_size: int  # examples a step, over all replicas
    seed: int
    start_step: int
    steps_per_execution: int
    logits: bool  # whether the model emits logits (else probabilities)
    backend: Backend  # the run's, which replays its training order


class RunnerCallback(keras.callbacks.Callback):
    """A callback from `conf/callbacks/` that needs to know the run: the runner calls `attach`
    before training. An `interval` (in steps) keeps device.steps_per_execution=auto from
    running past the steps it acts on."""

    interval: int | None = None

    def attach(self, training: Training) -> None:
        """Called once, before training starts."""

    def state(self) -> Any:
        """What a checkpoint keeps of this callback (JSON), for `restore` on resuming."""
        return None

    def restore(self, state: Any) -> None:
        """Take back what `state` gave, from the checkpoint a run resumes from."""


class ProbabilityLogger(RunnerCallback):
    """The TF Layers guide's logging hook: every `every` steps, print the softmax probabilities
    of the first `examples` examples of the batch that step trained on.

    It replays the training order from the same seed (`every_nth_batch`), keeping only every
    `every`-th batch, so it reads no batch off the training pipeline and costs nothing between.
    """

    def __init__(self, every: int = 50, examples: int = 3):
        super().__init__()
        if every <= 0 or examples <= 0:
            raise ValueError(f"every={every} and examples={examples} must be positive")
        self.interval = self.every = every
        self.examples = examples

    def attach(self, training: Training) -> None:
        self.x = training.train.x
        self.logits = training.logits
        self.batches = training.backend.every_nth_batch(
            n=len(training.train.y),
            batch_size=training.batch_size,
            seed=training.seed,
            every=self.every,
            start_step=training.start_step,
        )
        self.step = training.start_step
        self.steps_per_call = training.steps_per_execution

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += self.steps_per_call  # cheaper than reading the optimizer's counter
        if self.step % self.every:
            return
        examples = next(self.batches)[: self.examples]
        outputs = keras.ops.convert_to_numpy(self.model(self.x[examples], training=False))
        emitted = classifier.LOGITS if self.logits else classifier.PROBABILITIES
        shown = np.array2string(classifier.probabilities(outputs, emitted), precision=3)
        log.info("step %d: probabilities = %s", self.step, shown)


class ReportToTrial(keras.callbacks.Callback):
    """Reports the validation metric `metric` to an Optuna trial (`runner.pruning.Trial`) at
    each validation, and stops training when its study's pruner calls the trial off, telling
    `stops` so."""

    def __init__(self, trial: Any, metric: str, stops: Stops):
        super().__init__()
        self.trial, self.key = trial, f"val_{metric.removeprefix('val/')}"
        self.stops = stops

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.key)
        if value is not None and self.trial.report(float(value), optimizer_step(self.model)):
            self.stops.request(StopReason.PRUNED)
            self.model.stop_training = True


class EarlyStopping(RunnerCallback):
    """Stops training once the validation metric `monitor` (val/loss or val/accuracy, measured
    every trainer.eval_every steps) has not improved on its best by more than `min_delta` for
    `patience_steps` steps. Keras's own EarlyStopping counts in epochs, which here are logging
    windows; this counts in the optimizer steps the rest of the runner speaks."""

    def __init__(
        self, monitor: str = "val/accuracy", patience_steps: int = 2000, min_delta: float = 0.0
    ):
        super().__init__()
        if monitor not in ("val/loss", "val/accuracy"):
            raise ValueError(
                f"monitor={monitor} must be a validation metric: val/loss or val/accuracy"
            )
        if patience_steps <= 0 or min_delta < 0:
            raise ValueError(
                f"patience_steps={patience_steps} must be positive and min_delta={min_delta} "
                f"at least 0"
            )
        self.monitor, self.patience_steps, self.min_delta = monitor, patience_steps, min_delta
        self.sign = -1.0 if monitor.endswith("loss") else 1.0  # lower is better for a loss
        self.best: float | None = None
        self.best_step = 0

    def attach(self, training: Training) -> None:
        self.best_step = training.start_step

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(f"val_{self.monitor[4:]}")
        if value is None:
            return
        step = optimizer_step(self.model)
        if self.best is None or self.sign * (value - self.best) > self.min_delta:
            self.best, self.best_step = float(value), step
        elif step - self.best_step >= self.patience_steps:
            log.info(
                "%s has not improved on %.4f (step %d) for %d steps: stopping at step %d",
                self.monitor,
                self.best,
                self.best_step,
                step - self.best_step,
                step,
            )
            self.model.stop_training = True
