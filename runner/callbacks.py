"""The callbacks users name in `conf/callbacks/`, and what a callback of theirs may build on
(`RunnerCallback`, `Training`): their `_target_` paths stay put for the configs that name them.
"""

import logging
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from runner.backends.base import Backend
from runner.data import Split
from runner.models import classifier

log = logging.getLogger(__name__)


def optimizer_step(model: keras.Model) -> int:
    """How many optimizer steps `model` has taken: the step a batch-end callback reports on."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


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
