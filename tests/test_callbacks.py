"""The step counter agrees with the optimizer's own count, which it saves reading every window,
and the progress bar shows the steps it counts."""

import keras
import numpy as np

from runner.callbacks import StepCounter, StepProgbar, optimizer_step


class CompareWithOptimizer(keras.callbacks.Callback):
    """Records (counted, read) at each execution's end; stops training at step `stop_at`."""

    def __init__(self, counter: StepCounter, stop_at: int):
        super().__init__()
        self.counter, self.stop_at, self.seen = counter, stop_at, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((self.counter.step, optimizer_step(self.model)))
        if self.counter.step == self.stop_at:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append((self.counter.step, optimizer_step(self.model)))


def test_step_counter_follows_the_optimizer_across_fits_executions_and_a_stop():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    x, y = np.zeros((8, 3), np.float32), np.zeros((8, 2), np.float32)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)  # 4 steps before the counter starts
    counter = StepCounter()
    probe = CompareWithOptimizer(counter, stop_at=14)
    model.fit(x, y, batch_size=2, epochs=3, callbacks=[counter, probe], verbose=0)
    counted = [c for c, _ in probe.seen]
    assert counted == [6, 8, 8, 10, 12, 12, 14, 14], "two epochs of 4 steps, then stopped at 14"
    assert all(c == read for c, read in probe.seen)


def test_progress_bar_heads_each_window_with_the_steps_it_covers(capsys):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    x, y = np.zeros((8, 3), np.float32), np.zeros((8, 2), np.float32)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    counter = StepCounter()
    progress = StepProgbar(total_steps=12, counter=counter)
    model.fit(x, y, batch_size=2, epochs=2, callbacks=[counter, progress], verbose=1)
    headings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Steps")]
    assert headings == ["Steps 5-8 of 12", "Steps 9-12 of 12"]
