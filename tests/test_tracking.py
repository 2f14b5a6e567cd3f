"""The recorder batches metric writes, without losing a value or its time."""

import time
from collections.abc import Iterator

import mlflow
import pytest

from runner.tracking import Recorder, open_store


@pytest.fixture
def run_id(tmp_path) -> Iterator[str]:
    """An active run in a scratch store."""
    open_store(f"sqlite:///{tmp_path}/mlflow.db", "recorder")
    with mlflow.start_run() as run:
        yield run.info.run_id


def history(run_id: str, key: str) -> list[tuple[int, float, int]]:
    return [
        (m.step, m.value, m.timestamp)
        for m in mlflow.MlflowClient().get_metric_history(run_id, key)
    ]


def test_metrics_wait_for_the_flush_and_keep_the_time_they_were_logged(run_id):
    recorder = Recorder(run_id, steps=20, flush_every_s=3600)
    before = int(time.time() * 1000)
    recorder.log_metrics({"train/loss": 2.0}, step=10)
    recorder.log_metrics({"train/loss": 1.0, "train/accuracy": 0.5}, step=20)
    assert history(run_id, "train/loss") == [], "nothing written before the flush"
    time.sleep(0.05)
    flushed = int(time.time() * 1000)
    recorder.flush()
    written = history(run_id, "train/loss")
    assert [(step, value) for step, value, _ in written] == [(10, 2.0), (20, 1.0)]
    assert all(before <= stamp < flushed for _, _, stamp in written)
    assert [v for _, v, _ in history(run_id, "train/accuracy")] == [0.5]
    recorder.log_metrics({"train/loss": 9.0}, step=20)
    recorder.flush()
    assert len(history(run_id, "train/loss")) == 2, "a step is logged once"
    assert recorder.final_metrics() == {"train/loss": 1.0, "train/accuracy": 0.5}


def test_metrics_are_written_once_the_interval_has_passed(run_id):
    recorder = Recorder(run_id, steps=20, flush_every_s=60)
    recorder.log_metrics({"train/loss": 2.0}, step=10)
    assert history(run_id, "train/loss") == []
    recorder._flushed_at -= 60  # a minute passes
    recorder.log_metrics({"train/loss": 1.0}, step=20)
    assert [step for step, _, _ in history(run_id, "train/loss")] == [10, 20]
    at_once = Recorder(run_id, steps=20, flush_every_s=0)
    at_once.log_metrics({"val/loss": 3.0}, step=20)
    assert [v for _, v, _ in history(run_id, "val/loss")] == [3.0]
