"""Keras `fit` driven in optimizer steps: one Keras epoch is one logging window."""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np

from runner import targets
from runner.backends.base import Backend
from runner.backends.devices import Plan
from runner.callbacks import RunnerCallback, Training, optimizer_step
from runner.config.schema import DataKeys, TrainerConf
from runner.data import Split, Splits
from runner.errors import Interrupted, ServerLost, UserError, stop_signal
from runner.training import checkpoints
from runner.training.callbacks import (
    MlflowMetrics,
    StepCounter,
    StepProgbar,
    StopOnNonFiniteLoss,
    StopOnSignal,
    Throughput,
)
from runner.training.checkpoints import Checkpoint, Checkpointer, RestoreMetrics
from runner.training.stopping import CarryOn, StopReason, Stops


def fit(
    model: Any,
    splits: Splits,
    *,
    trainer: TrainerConf,
    data: DataKeys,
    seed: int,
    logits: bool,
    recorder: Any,
    plan: Plan,
    run_settings: dict[str, Any],
    resumed: Checkpoint | None = None,
    extra: dict[str, Any] | None = None,
    backend: Backend,
    stops: Stops | None = None,
    carry_on: CarryOn,
) -> int:
    """Train from the `resumed` checkpoint's step (else 0) to `trainer.steps` (unless training
    ended there), `data.batch_size` examples per replica a step, with the configured `extra`
    callbacks (by name) among the runner's own; validate every `eval_every` steps and after the
    last; checkpoint, with `run_settings`, every `checkpoint_every` steps, after the last and on
    SIGINT, SIGTERM or SIGUSR2, which `stops` hears and which then raise `Interrupted`, saying
    how to carry on (`carry_on`). Metrics are logged for whole windows only, so a run stopped
    and resumed logs the history of one left alone. Returns the step training ended at, before
    `trainer.steps` where a callback stopped it (early stopping)."""
    start_step = resumed.step if resumed else 0
    stops = Stops() if stops is None else stops
    batch, spe = data.batch_size * plan.replicas, plan.steps_per_execution
    training = Training(splits.train, batch, seed, start_step, spe, logits, backend)
    callbacks = _callbacks(
        training=training,
        trainer=trainer,
        recorder=recorder,
        stops=stops,
        run_settings=run_settings,
        resumed=resumed,
        extra=extra or {},
        num_classes=splits.num_classes,
    )
    # A run resumed where a callback stopped it early (stopped while it tested) trains no more.
    last = start_step if resumed and resumed.stopped_early else trainer.steps
    windows_from = partial(_fit_windows, model, splits, trainer=trainer, training=training)
    windows_from = partial(
        windows_from, eval_batch_size=data.eval_batch_size, callbacks=callbacks, backend=backend
    )
    with stops.installed():
        with stops.training():
            _windows(windows_from, start=start_step, last=last, trainer=trainer, stops=stops)
        _raise_if_stopped(
            stops, model, recorder, folder=Path(trainer.checkpoint_dir), carry_on=carry_on
        )
    reached = optimizer_step(model)
    if reached % trainer.eval_every:
        batches = backend.in_batches(splits.validation, data.eval_batch_size)
        final = model.evaluate(batches, verbose=0, return_dict=True)
        recorder.log_metrics({f"val/{k}": v for k, v in final.items()}, step=reached)
    return reached


def _windows(
    windows_from: Callable[..., None], *, start: int, last: int, trainer: TrainerConf, stops: Stops
) -> None:
    """Train from step `start` to `last` in windows of log_every steps; a run stopped
    mid-window first finishes that window on its own."""
    aligned = min(-(-start // trainer.log_every) * trainer.log_every, last)
    if start < aligned:
        at_eval = aligned % trainer.eval_every == 0
        windows_from(start=start, windows=1, window=aligned - start, validate=at_eval)
    if stops.reason is None and aligned < last:
        windows = (last - aligned) // trainer.log_every
        windows_from(start=aligned, windows=windows, window=trainer.log_every, validate=True)


def _callbacks(
    *,
    training: Training,
    trainer: TrainerConf,
    recorder: Any,
    stops: Stops,
    run_settings: dict[str, Any],
    resumed: Checkpoint | None,
    extra: dict[str, Any],
    num_classes: int,
) -> list[Any]:
    """The runner's callbacks for `training`, with the configured `extra` ones among them, in
    the order they must run."""
    counter = StepCounter()
    own = {name: c for name, c in extra.items() if isinstance(c, RunnerCallback)}
    for name, callback in own.items():
        callback.attach(training)
        if resumed and resumed.callbacks.get(name) is not None:
            callback.restore(resumed.callbacks[name])
    callbacks = [
        counter,  # first: the others read the step it counts
        # adds to the logs the others see
        Throughput(training.batch_size, training.steps_per_execution, training.backend),
        MlflowMetrics(recorder, counter, trainer.log_every),
        StopOnNonFiniteLoss(stops),
        StopOnSignal(stops, recorder),
        *extra.values(),  # before the checkpointer, which saves where one stops training
        Checkpointer(
            directory=Path(trainer.checkpoint_dir),
            every=trainer.checkpoint_every,
            last=trainer.steps,
            recorder=recorder,
            keep=trainer.keep_checkpoints,
            counter=counter,
            window=trainer.log_every,
            run_settings=run_settings,
            callbacks=own,
            stops=stops,
        ),
    ]
    if resumed and resumed.metric_state is not None:
        callbacks.append(RestoreMetrics(resumed.metric_state, num_classes))
    if trainer.progress_bar:
        callbacks.append(StepProgbar(trainer.steps, counter))
    return callbacks


def _raise_if_stopped(
    stops: Stops, model: Any, recorder: Any, *, folder: Path, carry_on: CarryOn
) -> None:
    """A lost tracking server or a stop signal ended training: raise `ServerLost` or
    `Interrupted`, saying where the checkpoint is and how to carry on."""
    step = optimizer_step(model)
    if stops.reason is StopReason.SERVER_LOST:
        raise ServerLost(
            f"the MLflow tracking server has not answered for {recorder.patience_s:g} s "
            f"(tracking.server_patience_s): training stopped at step {step}, checkpoint "
            f"written to {folder} with the metrics the server has not taken; once the server "
            f"is back, {carry_on.command(folder, 'carry on')}"
        )
    if stops.signal is not None:
        raise Interrupted(
            f"stopped by {stops.signal.name} at step {step}, checkpoint written to {folder}; "
            f"{carry_on.told(folder, stops.signal)}",
            stops.signal,
        )


def configured_callbacks(options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The callbacks the `callbacks` group adds to the runner's own, built by their `_target_`
    from `options` (by name), by name."""
    built = {name: targets.build(node, f"callbacks.{name}") for name, node in options.items()}
    for name, callback in built.items():
        if not isinstance(callback, keras.callbacks.Callback):
            raise UserError(
                f"callbacks.{name}: {options[name]['_target_']} returned a "
                f"{type(callback).__name__}, not a keras.callbacks.Callback"
            )
    return built


def intervals(trainer: Any, callbacks: dict[str, Any]) -> list[int]:
    """The step counts something acts on: logging, validating, checkpointing, and each
    callback's `interval`; steps_per_execution=auto divides them all."""
    own = [trainer.log_every, trainer.eval_every, trainer.checkpoint_every]
    return own + [c.interval for c in callbacks.values() if getattr(c, "interval", None)]


@contextmanager
def finishable(folder: Path, steps: int, run_id: str, carry_on: CarryOn) -> Iterator[None]:
    """Around training and the run's ending (final validation, test, plots, model): a stop
    (a KeyboardInterrupt, as `stopping.Stops` raises) that comes once training is complete,
    its last checkpoint (in `folder`, at `steps` or stopped early) written by the run `run_id`,
    raises `Interrupted` saying so and how to finish the run (`carry_on`), as a stop during
    training says how to carry it on."""
    try:
        yield
    except KeyboardInterrupt as error:
        last = checkpoints.latest(folder)
        trained = last is not None and (last.stopped_early or last.step >= steps)
        if not trained or last.run_id != run_id:
            raise
        stopped_by = stop_signal(error)
        raise Interrupted(
            f"stopped by {stopped_by.name} after the last training step, {last.step}: training "
            f"is complete, checkpoint in {folder}; to test it and end its MLflow run, "
            f"{carry_on.told(folder, stopped_by, finish=True)}",
            stopped_by,
        ) from None


def check_resumable(start_step: int, plan: Plan) -> None:
    """Windows end on multiples of steps_per_execution, so a resumed run must start on one."""
    if start_step % plan.steps_per_execution:
        raise UserError(
            f"the checkpoint is at step {start_step}, which device.steps_per_execution="
            f"{plan.steps_per_execution} does not divide; resume with the steps_per_execution "
            f"the run started with"
        )


def check_even_batches(splits: Splits, eval_batch_size: int, plan: Plan) -> None:
    """A data-parallel run on JAX splits every batch evenly over its devices, the last batch of
    the validation and test sets too; Keras would fail on an uneven one inside the run."""
    if plan.strategy != "data_parallel":
        return
    for name, split in (("validation", splits.validation), ("test", splits.test)):
        last = len(split.y) % eval_batch_size or eval_batch_size
        if eval_batch_size % plan.replicas or last % plan.replicas:
            raise UserError(
                f"device.strategy=data_parallel splits every batch evenly over "
                f"{plan.replicas} devices, but data.eval_batch_size={eval_batch_size} leaves a "
                f"last {name} batch of {last} examples: pick a data.eval_batch_size (or "
                f"data.limit) that makes both multiples of {plan.replicas}"
            )


def _fit_windows(
    model: Any,
    splits: Splits,
    *,
    start: int,
    windows: int,
    window: int,
    validate: bool,
    trainer: TrainerConf,
    eval_batch_size: int,
    training: Training,
    callbacks: list,
    backend: Backend,
) -> None:
    """`windows` Keras epochs of `window` steps from step `start`. Keras numbers the epochs from
    start // window, so with window = log_every, validation_freq lands on multiples of
    eval_every; a lone shorter window validates at its end if `validate`."""
    first = start // window
    full = window == trainer.log_every
    validation = backend.in_batches(splits.validation, eval_batch_size) if validate else None
    model.fit(
        backend.training_dataset(training.train, training.batch_size, training.seed, start),
        steps_per_epoch=window,
        initial_epoch=first,
        epochs=first + windows,
        validation_data=validation,
        validation_freq=trainer.eval_every // trainer.log_every if full else 1,
        callbacks=callbacks,
        verbose=1 if trainer.progress_bar else 0,
        shuffle=False,  # the dataset shuffles itself, seeded
    )


def evaluate_outputs(
    model: Any, split: Split, batch_size: int, backend: Backend
) -> tuple[np.ndarray, float]:
    """The model's outputs (logits or probabilities) for `split` and their mean loss, from one
    pass over `backend`'s batches of it."""
    outputs = model.predict(backend.in_batches(split, batch_size, labels=False), verbose=0)
    loss = float(np.mean(model.loss(split.y, outputs)))
    return outputs, loss
