"""Keras callbacks that report training in optimizer steps rather than Keras epochs.

The runner trains in "epochs" of `trainer.log_every` steps, so each epoch's averaged metrics are
exactly the tutorial's periodic training report. The step is the optimizer's iteration count
(`StepCounter`), which stays right across resumes and interrupted epochs.
"""

import logging
import signal
import time
from typing import Any

import keras
import numpy as np

from runner.backends.base import Backend
from runner.callbacks import optimizer_step
from runner.errors import UserError
from runner.training.stopping import StopReason, Stops

log = logging.getLogger(__name__)


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


class ReportToTrial(keras.callbacks.Callback):
    """Reports the validation metric `metric` to an Optuna trial (`runner.sweeps.pruning.Trial`) at
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
