"""Keras `fit` driven in optimizer steps: one Keras epoch is one logging window."""

from typing import Any

import numpy as np

from runner import checkpoints
from runner.callbacks import ProbabilityLogger, StepProgbar, StopOnNonFiniteLoss
from runner.checkpoints import Checkpointer
from runner.data import Split, Splits, training_dataset


def fit(model: Any, splits: Splits, cfg: Any, recorder: Any, start_step: int = 0) -> None:
    """Train from `start_step` to `trainer.steps`; validate every `eval_every` steps and after
    the last one; checkpoint every `checkpoint_every` steps and after the last one."""
    trainer = cfg.trainer
    validation = (splits.validation.x, splits.validation.y)
    callbacks = [
        recorder.callback(),
        StopOnNonFiniteLoss(),
        Checkpointer(
            checkpoints.directory_for(trainer.checkpoint_dir),
            trainer.checkpoint_every,
            trainer.steps,
            recorder.run_id,
            trainer.keep_checkpoints,
        ),
    ]
    if trainer.log_probabilities_every:
        callbacks.append(
            ProbabilityLogger(
                splits.train,
                cfg.data.batch_size,
                cfg.seed,
                trainer.log_probabilities_every,
                trainer.log_probabilities_examples,
                logits=cfg.model.output == "logits",
                start_step=start_step,
            )
        )
    if trainer.progress_bar:
        callbacks.append(StepProgbar())
    model.fit(
        training_dataset(splits.train, cfg.data.batch_size, cfg.seed, start_step),
        steps_per_epoch=trainer.log_every,
        initial_epoch=start_step // trainer.log_every,
        epochs=trainer.steps // trainer.log_every,
        validation_data=validation,
        validation_batch_size=cfg.data.eval_batch_size,
        validation_freq=trainer.eval_every // trainer.log_every,
        callbacks=callbacks,
        verbose=1 if trainer.progress_bar else 0,
        shuffle=False,  # the dataset shuffles itself, seeded
    )
    if trainer.steps % trainer.eval_every:
        final = model.evaluate(
            *validation, batch_size=cfg.data.eval_batch_size, verbose=0, return_dict=True
        )
        recorder.log_metrics({f"val/{k}": v for k, v in final.items()}, step=trainer.steps)


def evaluate_outputs(model: Any, split: Split, batch_size: int) -> tuple[np.ndarray, float]:
    """The model's outputs (logits or probabilities) for `split` and their mean loss, from one
    pass over it."""
    outputs = model.predict(split.x, batch_size=batch_size, verbose=0)
    loss = float(np.mean(model.loss(split.y, outputs)))
    return outputs, loss
