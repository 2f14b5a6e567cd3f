"""The step counter agrees with the optimizer's own count, which it saves reading every window,
and the progress bar shows the steps it counts."""

import json

import keras
import numpy as np
import pytest

from runner.callbacks import optimizer_step
from runner.errors import UserError
from runner.training.callbacks import StepCounter, StepProgbar


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


def test_early_stopping_ends_the_run_at_the_step_it_stopped(in_tmp_store, monkeypatch):
    """A rate too small to move the zero-initialised softmax keeps val/accuracy flat: with a
    patience of 20 steps, validated every 10, the best stays at step 10 and training stops at
    step 30 of 100, FINISHED, its test metrics and checkpoint at that step. Ctrl-C while it
    tests leaves it KILLED; its resume trains no more, and finishes it so."""
    import os
    import signal

    from runner.cli.train import train
    from runner.errors import Interrupted
    from runner.training import fitting

    from .conftest import QUICK, compose_config, only_run, store_client

    overrides = [
        *QUICK,
        f"tracking.uri=sqlite:///{in_tmp_store}/mlflow.db",  # MLflow caches a relative one
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience_steps=20",
        "trainer.steps=100",
        "trainer.eval_every=10",
        "optimizer.lr=1e-12",
        f"trainer.checkpoint_dir={in_tmp_store / 'checkpoints'}",
    ]
    evaluate_outputs = fitting.evaluate_outputs
    monkeypatch.setattr(fitting, "evaluate_outputs", lambda *a: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises((Interrupted, KeyboardInterrupt)) as stop:  # not pytest's own stop
        train(compose_config(overrides))
    assert isinstance(stop.value, Interrupted)
    assert "after the last training step, 30: training is complete" in str(stop.value)
    assert only_run(in_tmp_store).info.status == "KILLED"
    monkeypatch.setattr(fitting, "evaluate_outputs", evaluate_outputs)
    train(compose_config([*overrides, "trainer.resume=true"]))
    run = only_run(in_tmp_store)
    client = store_client(in_tmp_store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stopped_early_at"] == "30"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [10, 20, 30]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")] == [30]
    [checkpoint] = (in_tmp_store / "checkpoints").iterdir()
    assert checkpoint.name == "step-0000030"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["stopped_early"] is True
    assert state["callbacks"]["early_stopping"]["best_step"] == 10
    # The run is over: resuming it is refused, naming why, before anything trains.
    with pytest.raises(UserError, match="a callback stopped the run early, at step 30"):
        train(compose_config([*overrides, "trainer.resume=true"]))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_any_keras_callback_joins_by_target(in_tmp_store):
    """keras.callbacks.CSVLogger, added on the command line, writes a row each window."""
    from runner.cli.train import train

    from .conftest import QUICK, compose_config

    log = in_tmp_store / "log.csv"
    cfg = compose_config(
        [
            *QUICK,
            f"tracking.uri=sqlite:///{in_tmp_store}/mlflow.db",
            "+callbacks.csv._target_=keras.callbacks.CSVLogger",
            f"+callbacks.csv.filename={log}",
        ]
    )
    train(cfg)
    rows = log.read_text().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "accuracy"]
    assert len(rows) == 1 + 3  # a header and the three 10-step windows of debug=quick


def test_a_callback_that_does_not_build_is_one_line_and_no_run(in_tmp_store, mnist_dir):
    from .conftest import QUICK, cli, store_client

    result = cli(
        "runner",
        *QUICK,
        "callbacks=early_stopping",
        "callbacks.early_stopping.monitor=train/loss",
        cwd=in_tmp_store,
        mnist_dir=mnist_dir,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "runner: error: callbacks.early_stopping: runner.callbacks.EarlyStopping"
    )
    assert "monitor=train/loss must be a validation metric" in line
    assert "Traceback" not in result.stderr
    client = store_client(in_tmp_store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
