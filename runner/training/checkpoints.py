"""Checkpoints that a crash cannot leave half-written, and resuming from the latest of them.

A checkpoint is a folder `step-NNNNNNN/` holding `model.keras` (weights and optimizer state)
and `state.json` (the step, the MLflow run, the dropout generators' seeds, the settings the run
trains with and, for a run stopped mid-window, the training metrics' running sums). It is written
under a `.partial` name and renamed when complete, so a folder without that suffix is always
whole. The data position needs no saving: the batch order is a function of the seed and the step.
"""

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from runner.callbacks import RunnerCallback
from runner.config.schema import Resume
from runner.errors import UserError
from runner.models import register_custom_objects
from runner.targets import import_code
from runner.tracking.provenance import flatten
from runner.tracking.runs import run_ended
from runner.training.callbacks import StepCounter
from runner.training.stopping import StopReason, Stops

log = logging.getLogger(__name__)

_PREFIX = "step-"
_PARTIAL = ".partial"


# The settings a resumed run must share with its checkpoint's run, as dotted config keys (a key
# ending in "." stands for all below it): they decide the model, its optimizer, the data and its
# order, and the metric history's steps. trainer.steps may grow with trainer.resume=extend.
RESUME_KEYS = (
    "backend",
    "model.",
    "optimizer.",
    "loss.",
    "data._target_",
    "data.name",
    "data.path",
    "data.batch_size",
    "data.validation_size",
    "data.limit",
    "seed",
    "trainer.steps",
    "trainer.log_every",
    "trainer.eval_every",
    "device.deterministic",
    "device.precision",
    "callbacks.",
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    run_id: str
    # RESUME_KEYS of the run's config; empty in checkpoints written before they were recorded.
    settings: dict[str, Any] = field(default_factory=dict)
    # The training metrics' variables mid-window, so that the resumed window averages all its steps.
    metric_state: list[Any] | None = None
    # What each configured callback of the runner's keeps (RunnerCallback.state), by name.
    callbacks: dict[str, Any] = field(default_factory=dict)
    # Whether a callback (early stopping) ended training here: the run is over.
    stopped_early: bool = False
    # Metrics the tracking server had not taken when this was written, as [key, value,
    # timestamp, step]: the resumed run writes those it lacks.
    unrecorded: list[list[Any]] = field(default_factory=list)

    def load_model(self, target: str | None = None) -> keras.Model:
        """The model as it was at `step`, compiled, with its optimizer and dropout state; the
        module of its `_target_` `target`, if given, is imported first, for the classes it
        defines."""
        register_custom_objects()
        if target:
            import_code(target, near=str(self.path))
        model = keras.saving.load_model(self.path / "model.keras")
        seeds = json.loads((self.path / "state.json").read_text())["seed_states"]
        for variable, value in zip(_seed_states(model), seeds, strict=True):
            variable.assign(value)
        return model


def resume_point(
    directory: Path, *, steps: int, mode: Resume, run_settings: dict[str, Any], finish: bool = False
) -> Checkpoint:
    """The checkpoint in `directory` that `trainer.resume=<mode>` carries on from, or a clear
    error if there is none or if `run_settings` (`settings`) differ from its run's: `true` must
    match them all, `extend` may raise trainer.steps, to `steps`. A checkpoint where training
    ended (at the last step, or stopped early) is taken while its MLflow run has not recorded
    its ending (`tracking.run_ended`): the run was stopped after training, before its test and
    model were recorded, and the resume finishes it. With `finish` (a requeued SLURM job) it is
    taken in any case."""
    found = latest(directory)
    if found is None:
        raise UserError(
            f"trainer.resume={mode} but {directory.resolve()} holds no complete checkpoint: pass "
            f"the interrupted run's folder, hydra.run.dir=outputs/<date>/<time>"
        )
    _check_settings(found, run_settings, mode)
    trained = found.stopped_early or found.step >= steps
    if trained and (mode == Resume.extend or (not finish and run_ended(found.run_id))):
        if found.stopped_early:
            raise UserError(
                f"the checkpoint in {directory} is where a callback stopped the run early, at "
                f"step {found.step}: the run is over; start a new run to train again"
            )
        raise UserError(
            f"the checkpoint in {directory} is at step {found.step}, the run's last: nothing is "
            f"left to train; to train it further, use trainer.resume=extend with a larger "
            f"trainer.steps"
        )
    ending = ", whose training is complete: testing it and ending the run" if trained else ""
    log.info("resuming from step %d of run %s%s", found.step, found.run_id, ending)
    return found


def settings(resolved: dict[str, Any], digests: dict[str, str]) -> dict[str, Any]:
    """The RESUME_KEYS of a run's `resolved` config (a plain container), flattened, and a
    digest of the data's arrays: any loader's keys may change the data, which this catches
    whatever they are."""
    chosen = {
        key: value
        for key, value in flatten(resolved)
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_KEYS)
    }
    data = hashlib.sha256("".join(digests[k] for k in sorted(digests)).encode()).hexdigest()
    return {**chosen, "data.sha256": data[:16]}


def _check_settings(checkpoint: Checkpoint, now: dict[str, Any], mode: str) -> None:
    if not checkpoint.settings:
        log.warning("%s records no settings to check the resumed run against", checkpoint.path)
        return
    was = {"backend": "tensorflow", **checkpoint.settings}  # as runs before `backend` were
    differ = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
    if mode == Resume.extend and differ == ["trainer.steps"]:
        if now["trainer.steps"] <= checkpoint.step:
            raise UserError(
                f"trainer.resume=extend needs trainer.steps above the checkpoint's step "
                f"{checkpoint.step}, not {now['trainer.steps']}"
            )
        if now.get("optimizer.schedule", "constant") != "constant":
            raise UserError(
                f"trainer.resume=extend cannot lengthen optimizer.schedule="
                f"{now.get('optimizer.schedule')}: its rate reaches 0 at the run's "
                f"trainer.steps={was['trainer.steps']}; start a new run instead"
            )
        return
    if not differ:
        return
    changes = ", ".join(f"{k}={was.get(k)} (now {now.get(k)})" for k in differ)
    hint = (
        "; to train the run further, use trainer.resume=extend"
        if differ == ["trainer.steps"]
        else ": resume with the run's own settings, or start a new run without trainer.resume"
    )
    raise UserError(
        f"trainer.resume={mode} refused: the checkpoint's run {checkpoint.run_id} trained with "
        f"{changes}{hint}"
    )


def latest(directory: Path) -> Checkpoint | None:
    """The complete checkpoint of the highest step in `directory`, if any."""
    found = sorted(_complete(directory), key=lambda c: c.step)
    return found[-1] if found else None


def save(
    model: keras.Model,
    directory: Path,
    *,
    step: int,
    run_id: str,
    keep: int,
    run_settings: dict[str, Any],
    metric_state: list[Any] | None = None,
    callbacks: dict[str, Any] | None = None,
    stopped_early: bool = False,
    unrecorded: list[list[Any]] | None = None,
) -> Checkpoint:
    """Write a checkpoint atomically, then drop all but the newest `keep`."""
    final = directory / f"{_PREFIX}{step:07d}"
    partial = final.with_name(final.name + _PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save(partial / "model.keras")
    state = {
        "step": step,
        "run_id": run_id,
        "seed_states": [keras.ops.convert_to_numpy(v).tolist() for v in _seed_states(model)],
        "settings": run_settings,
        "metric_state": metric_state,
        "callbacks": callbacks or {},
        "stopped_early": stopped_early,
        "unrecorded": unrecorded or [],
    }
    (partial / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in sorted(_complete(directory), key=lambda c: c.step)[:-keep]:
        shutil.rmtree(old.path)
    return Checkpoint(
        final,
        step,
        run_id,
        run_settings,
        metric_state,
        callbacks or {},
        stopped_early,
        unrecorded or [],
    )


def _complete(directory: Path) -> list[Checkpoint]:
    found = []
    for path in directory.glob(f"{_PREFIX}*"):
        state = path / "state.json"
        if path.suffix != _PARTIAL and state.is_file():
            saved = json.loads(state.read_text())
            found.append(
                Checkpoint(
                    path,
                    saved["step"],
                    saved["run_id"],
                    saved.get("settings", {}),
                    saved.get("metric_state"),
                    saved.get("callbacks", {}),
                    saved.get("stopped_early", False),
                    saved.get("unrecorded", []),
                )
            )
    return found


def _seed_states(model: keras.Model) -> list[Any]:
    """The dropout layers' seed-generator states: variables of the model that `model.save` does
    not write, yet which decide the dropout masks of the steps still to come."""
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


class Checkpointer(keras.callbacks.Callback):
    """Saves a checkpoint every `every` steps, at the last step and where training was stopped,
    after flushing `recorder`'s metrics to MLflow, with those the server did not take, so a
    resumed run neither loses nor repeats a logged step. A stop inside a logging window of
    `window` steps also saves the training metrics' running sums, taken before Keras's
    validation resets them; each of `callbacks` (the configured ones of the runner's, by name)
    saves its state; a stop for no reason given to `stops` (by a signal, a lost server or a
    pruner) is an early stop, which ends the run."""

    def __init__(
        self,
        *,
        directory: Path,
        every: int,
        last: int,
        recorder: Any,
        keep: int,
        counter: StepCounter,
        window: int,
        run_settings: dict[str, Any],
        callbacks: dict[str, RunnerCallback],
        stops: Stops,
    ):
        super().__init__()
        self.directory, self.every, self.last = directory, every, last
        self.recorder, self.keep, self.counter = recorder, keep, counter
        self.window, self.run_settings = window, run_settings
        self.callbacks, self.stops = callbacks, stops
        self.metric_state: list[Any] | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.model.stop_training and self.counter.step % self.window:
            self.metric_state = [
                keras.ops.convert_to_numpy(v).tolist() for v in self.model.metrics_variables
            ]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        step = self.counter.step
        if self.model.stop_training:
            self.stops.request(StopReason.EARLY_STOP)
        if step % self.every == 0 or step == self.last or self.model.stop_training:
            self.recorder.flush()  # keeps what a server that does not answer has not taken
            save(
                self.model,
                self.directory,
                step=step,
                run_id=self.recorder.run_id,
                keep=self.keep,
                run_settings=self.run_settings,
                metric_state=self.metric_state,
                callbacks={name: callback.state() for name, callback in self.callbacks.items()},
                stopped_early=self.stops.reason is not None and self.stops.reason.ends_training,
                unrecorded=self.recorder.unrecorded(),
            )


class RestoreMetrics(keras.callbacks.Callback):
    """Puts a checkpoint's mid-window metric sums back after Keras resets the metrics at the
    start of the resumed window, so that window's average covers all its steps, as unresumed."""

    def __init__(self, state: list[Any], num_classes: int):
        super().__init__()
        self.state: list[Any] | None = state
        self.num_classes = num_classes

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Create the compiled metrics' variables, which Keras creates only when it traces the
        first step unless a distribution strategy made it build them already: one update on a
        dummy example, which the epoch's reset undoes."""
        if all(metric.variables for metric in self.model.metrics):
            return
        self.model.compute_metrics(
            None, np.zeros((1,), "int32"), np.zeros((1, self.num_classes), "float32"), None
        )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.state is not None:
            for variable, value in zip(self.model.metrics_variables, self.state, strict=True):
                variable.assign(value)
            self.state = None
