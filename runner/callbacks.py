"""Keras callbacks that report training in optimizer steps rather than Keras epochs.

The runner trains in "epochs" of `trainer.log_every` steps, so each epoch's averaged metrics are
exactly the tutorial's periodic training report; these callbacks translate back to steps.
"""

from typing import Any

import keras


class MlflowMetrics(keras.callbacks.Callback):
    """Logs `train/<metric>` and `val/<metric>` at the optimizer step each epoch ends on."""

    def __init__(self, recorder: Any, steps_per_epoch: int):
        super().__init__()
        self.recorder = recorder
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {
            (f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"): value
            for key, value in (logs or {}).items()
        }
        self.recorder.log_metrics(metrics, step=(epoch + 1) * self.steps_per_epoch)


class StepProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, headed by the steps it covers instead of "Epoch i/n"."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._reset_progbar()
        self._maybe_init_progbar()
        if self.verbose:
            first, last = epoch * self.target + 1, (epoch + 1) * self.target
            print(f"Steps {first}-{last} of {self.epochs * self.target}", flush=True)
