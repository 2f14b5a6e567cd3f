"""The heavy half of the `runner` command's composition root, imported once the backend is
chosen (`runner.cli.train.train`): it builds the data, the model and the callbacks from the
checked `Settings`, each layer given the part it needs, then trains and records the run."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runner import data
from runner.backends import devices
from runner.backends.base import Backend
from runner.config.schema import Resume, TrainerConf
from runner.config.settings import Settings
from runner.data import Splits
from runner.models import classifier
from runner.sweeps import preemption
from runner.sweeps.pruning import Attempt
from runner.tracking.runs import Resumed
from runner.training import checkpoints, fitting, modeling, optim
from runner.training.callbacks import ReportToTrial
from runner.training.checkpoints import Checkpoint
from runner.training.fitting import (
    check_even_batches,
    check_resumable,
    configured_callbacks,
    fit,
    intervals,
)
from runner.training.stopping import CarryOn, StopReason, Stops

# The line about the devices is the `runner` command's, as it was before this module split off.
log = logging.getLogger("runner.cli.train")


@dataclass(frozen=True)
class Prepared:
    """All a run needs before its MLflow run starts: a config that cannot train fails before."""

    backend: Backend
    found: devices.Devices
    plan: devices.Plan
    splits: Splits
    callbacks: dict[str, Any]
    run_settings: dict[str, Any]
    resumed: Checkpoint | None
    model: Any

    def tags(self) -> dict[str, str]:
        """What the run is tagged with of the machine and how it trains on it."""
        return {**self.found.tags(), **self.plan.tags()}

    def extends(self, steps: int) -> bool:
        """Whether this run carries on a checkpoint's with more steps (trainer.resume=extend):
        a new MLflow run, as a run's params cannot change."""
        return self.resumed is not None and self.resumed.settings.get("trainer.steps") != steps

    def reopens(self, trainer: TrainerConf, earlier: Attempt | None) -> Resumed | None:
        """The MLflow run this run carries on: its checkpoint's (or a new one that extends it),
        else that of the Optuna trial it took over, which had written no checkpoint."""
        if self.resumed is not None:
            r = self.resumed
            extends = self.extends(trainer.steps)
            return Resumed(r.run_id, r.unrecorded, extends, trainer.eval_every)
        return Resumed(earlier.run_id) if earlier is not None else None


def carried_on(settings: Settings, earlier: Attempt) -> Settings:
    """The settings of an Optuna trial taken over from workers that died: it trains on in its
    own checkpoints' folder, from the newest checkpoint there (else from its first step), into
    its own MLflow run, which keeps each step it logged once."""
    folder = Path(earlier.checkpoint_dir)
    resume = Resume.true if checkpoints.latest(folder) is not None else Resume.false
    trainer = replace(settings.trainer, checkpoint_dir=str(folder), resume=resume)
    return replace(settings, trainer=trainer)


def prepare(
    settings: Settings,
    resolved: dict[str, Any],
    *,
    backend: Backend,
    trial: Any,
    stops: Stops,
) -> Prepared:
    """Devices, data, callbacks, the checkpoint to resume from and the compiled model; the run's
    `resolved` config (a plain container) gives the settings a checkpoint records."""
    device, trainer = settings.device, settings.trainer
    found = backend.detect(device.cpu_devices)  # before anything runs on them
    callbacks = configured_callbacks(settings.options.callbacks)
    plan = devices.plan(device, found, intervals(trainer, callbacks), str(settings.backend))
    if trial is not None:
        callbacks["optuna_trial"] = ReportToTrial(trial, settings.optimized_metric, stops)
    log.info("devices: %s; %s", found.describe(), plan.describe())
    backend.start_clean(settings.seed, device.deterministic, plan)
    splits = data.load(settings.options.data, settings.data)
    folder = Path(trainer.checkpoint_dir)
    run_settings = checkpoints.settings(resolved, splits.digests)
    mode = preemption.resume_as(trainer.resume, checkpoints.latest(folder) is not None)
    resumed = (
        checkpoints.resume_point(
            folder,
            steps=trainer.steps,
            mode=mode,
            run_settings=run_settings,
            finish=preemption.requeued(),
        )
        if mode != "false"
        else None
    )
    check_resumable(resumed.step if resumed else 0, plan)
    check_even_batches(splits, settings.data.eval_batch_size, plan)
    options = settings.options
    with backend.build_scope(plan):
        if resumed:
            model = resumed.load_model(options.model["_target_"])
            optimizer = model.optimizer
        else:
            model = modeling.build(options.model, splits.input_shape, splits.num_classes)
            optimizer = optim.build(options.optimizer, settings.optimizer, trainer.steps)
        modeling.compiled(model, optimizer, options.loss, plan)
        modeling.check_loss(model, options.loss["_target_"], splits.train.x, splits.train.y)
    return Prepared(backend, found, plan, splits, callbacks, run_settings, resumed, model)


def train(
    prepared: Prepared, settings: Settings, recorder: Any, *, stops: Stops, carry_on: CarryOn
) -> dict[str, float]:
    """Train, then test and record the run in `recorder`'s MLflow run unless its pruner
    ended it; its final metrics."""
    p, trainer = prepared, settings.trainer
    reached = fit(
        p.model,
        p.splits,
        trainer=trainer,
        data=settings.data,
        seed=settings.seed,
        logits=settings.model.output == classifier.LOGITS,
        recorder=recorder,
        plan=p.plan,
        run_settings=p.run_settings,
        resumed=p.resumed,
        extra=p.callbacks,
        backend=p.backend,
        stops=stops,
        carry_on=carry_on,
    )
    if stops.reason is StopReason.PRUNED:
        recorder.prune(reached)
    else:
        _finish(recorder, prepared, settings, reached)
    return recorder.final_metrics()


def _finish(recorder: Any, prepared: Prepared, settings: Settings, reached: int) -> None:
    """Test the trained model, then record its plots and the model as the settings say."""
    model, test = prepared.model, prepared.splits.test
    if reached < settings.trainer.steps:
        recorder.set_tag("stopped_early_at", str(reached))
    outputs, loss = fitting.evaluate_outputs(
        model, test, settings.data.eval_batch_size, prepared.backend
    )
    recorder.log_test(test, outputs, loss, reached)
    if settings.tracking.plots:
        recorder.log_plots(test, outputs)
    if settings.trainer.log_model:
        target = settings.options.model["_target_"]
        output = classifier.output(settings.options.model)
        recorder.log_model(model, output, target, prepared.backend.requirements())
