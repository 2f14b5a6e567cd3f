"""Checkpoints that a crash cannot leave half-written, and resuming from the latest of them.

A checkpoint is a folder `step-NNNNNNN/` holding `model.keras` (weights and optimizer state)
and `state.json` (the step, the MLflow run, the dropout generators' seeds). It is written under
a `.partial` name and renamed when complete, so a folder without that suffix is always whole.
The data position needs no saving: the batch order is a function of the seed and the step.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from hydra.core.hydra_config import HydraConfig

from runner.callbacks import StepCounter
from runner.errors import UserError
from runner.models import register_custom_objects

_PREFIX = "step-"
_PARTIAL = ".partial"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    run_id: str

    def load_model(self) -> keras.Model:
        """The model as it was at `step`, compiled, with its optimizer and dropout state."""
        register_custom_objects()
        model = keras.saving.load_model(self.path / "model.keras")
        seeds = json.loads((self.path / "state.json").read_text())["seed_states"]
        for variable, value in zip(_seed_states(model), seeds, strict=True):
            variable.assign(value)
        return model


def directory_for(configured: str | None) -> Path:
    """`trainer.checkpoint_dir`, else `checkpoints/` in the Hydra run's output folder (or in the
    working directory when `train` is called from Python)."""
    if configured:
        return Path(configured)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / "checkpoints"
    return Path("checkpoints")


def resume_point(trainer: Any) -> Checkpoint:
    """The checkpoint `trainer.resume=true` carries on from, or a clear error if there is none."""
    directory = directory_for(trainer.checkpoint_dir)
    found = latest(directory)
    if found is None:
        raise UserError(
            f"trainer.resume=true but {directory.resolve()} holds no complete checkpoint: pass "
            f"the interrupted run's folder, hydra.run.dir=outputs/<date>/<time>"
        )
    return found


def latest(directory: Path) -> Checkpoint | None:
    """The complete checkpoint of the highest step in `directory`, if any."""
    found = sorted(_complete(directory), key=lambda c: c.step)
    return found[-1] if found else None


def save(model: keras.Model, directory: Path, step: int, run_id: str, keep: int) -> Checkpoint:
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
    }
    (partial / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in sorted(_complete(directory), key=lambda c: c.step)[:-keep]:
        shutil.rmtree(old.path)
    return Checkpoint(final, step, run_id)


def _complete(directory: Path) -> list[Checkpoint]:
    found = []
    for path in directory.glob(f"{_PREFIX}*"):
        state = path / "state.json"
        if path.suffix != _PARTIAL and state.is_file():
            saved = json.loads(state.read_text())
            found.append(Checkpoint(path, saved["step"], saved["run_id"]))
    return found


def _seed_states(model: keras.Model) -> list[Any]:
    """The dropout layers' seed-generator states: variables of the model that `model.save` does
    not write, yet which decide the dropout masks of the steps still to come."""
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


class Checkpointer(keras.callbacks.Callback):
    """Saves a checkpoint every `every` steps, at the last step and where training was stopped,
    after flushing `recorder`'s metrics to MLflow, so a resumed run neither loses nor repeats a
    logged step."""

    def __init__(
        self, directory: Path, every: int, last: int, recorder: Any, keep: int, counter: StepCounter
    ):
        super().__init__()
        self.directory, self.every, self.last = directory, every, last
        self.recorder, self.keep, self.counter = recorder, keep, counter

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        step = self.counter.step
        if step % self.every == 0 or step == self.last or self.model.stop_training:
            self.recorder.flush()
            save(self.model, self.directory, step, self.recorder.run_id, self.keep)
