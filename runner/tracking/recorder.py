"""What a run logs while it is on: its metrics, buffered and kept through a server's outage,
and its tags, test results, plots and model.

Training metrics are buffered and written in one batch every `tracking.metrics_flush_every_s`
seconds, at each checkpoint and when the run ends: a write to the SQLite store costs the same
whatever its size, and a large share of a short window's time (docs/performance.md).
"""

import logging
import time
from contextlib import nullcontext
from importlib.metadata import version
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from runner.data import Split
from runner.models import classifier
from runner.tracking import serving
from runner.tracking.store import BATCH, one_attempt, unanswered

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
# The tag of a run whose Optuna trial was pruned: its step. The run ends KILLED, yet is over.
PRUNED_TAG = "pruned_at_step"


class Recorder:
    """Logs into the active MLflow run and keeps the metric histories for the plots.

    Metrics wait in memory, stamped with the time they were logged, until `flush` writes them in
    one batch, which `log_metrics` does once `flush_every_s` seconds have passed since the last.
    A resumed run starts from the histories already in MLflow, and the metrics its checkpoint
    holds as `unrecorded`, and skips any step logged before the interruption, so each metric
    keeps one value a step.

    A tracking server that does not answer (restarted, or gone) does not stop training: its
    metrics stay in memory, and in each checkpoint, and are written once it answers again. After
    `patience_s` seconds without an answer the recorder is `lost`, and training stops."""

    def __init__(
        self,
        run_id: str,
        *,
        history: dict | None = None,
        flush_every_s: float = 0.0,
        patience_s: float = 0.0,
        unrecorded: list[list[Any]] | None = None,
    ):
        self.run_id = run_id
        self.history: dict[str, list[tuple[int, float]]] = history or {}
        self._logged = {(key, step) for key, points in self.history.items() for step, _ in points}
        self.flush_every_s = flush_every_s
        self.patience_s = patience_s
        self._pending: list[Metric] = []
        for key, value, timestamp, step in unrecorded or []:
            if (key, step) not in self._logged:
                self.history.setdefault(key, []).append((step, value))
                self._logged.add((key, step))
                self._pending.append(Metric(key, value, timestamp, step))
        self._flushed_at = time.monotonic()
        self._unanswered_since: float | None = None
        self.lost = False
        # How the run ends if nothing raises: KILLED for an Optuna trial called off (`prune`).
        self.end_status = "FINISHED"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            if (key, step) not in self._logged:
                self.history.setdefault(key, []).append((step, float(value)))
                self._logged.add((key, step))
                self._pending.append(Metric(key, float(value), now_ms, step))
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write the metrics logged since the last flush. Unless `final`, a server that does not
        answer is tried once, and the metrics kept for the next flush."""
        self._flushed_at = time.monotonic()
        client = mlflow.MlflowClient()
        while self._pending:
            batch = self._pending[:BATCH]
            try:
                with nullcontext() if final else one_attempt():
                    client.log_batch(self.run_id, metrics=batch)
            except MlflowException as error:
                if final or not unanswered(error):
                    raise
                self._not_answered(error)
                return
            del self._pending[: len(batch)]
        self.lost = False
        if self._unanswered_since is not None:
            log.warning("the MLflow tracking server answers again: its metrics are written")
            self._unanswered_since = None

    def _not_answered(self, error: MlflowException) -> None:
        now = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = now
            log.warning(
                "the MLflow tracking server does not answer (%s): training goes on, and its "
                "metrics wait in memory and in the checkpoints for up to %g s",
                error.message.split(" failed with exception ")[-1][:200],
                self.patience_s,
            )
        self.lost = now - self._unanswered_since >= self.patience_s

    def unrecorded(self) -> list[list[Any]]:
        """The metrics not yet written, as [key, value, timestamp, step], for a checkpoint."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self._pending]

    def set_tag(self, key: str, value: str) -> None:
        mlflow.MlflowClient().set_tag(self.run_id, key, value)

    def prune(self, step: int) -> None:
        """End the run KILLED, tagged with the step its Optuna trial was pruned at."""
        self.set_tag(PRUNED_TAG, str(step))
        self.end_status = "KILLED"

    def log_test(self, test: Split, outputs: np.ndarray, loss: float, step: int) -> None:
        """Test metrics at `step`, the last."""
        accuracy = classifier.accuracy(outputs, test.y)
        self.log_metrics({"test/loss": loss, "test/accuracy": accuracy}, step=step)
        log.info("test accuracy %.4f, test loss %.4f", accuracy, loss)

    def log_plots(self, test: Split, outputs: np.ndarray) -> None:
        """The test set's confusion matrix and the training curves, as PNG artifacts."""
        from runner.tracking import plots  # matplotlib: half a second, for runs that draw none

        confusion = plots.confusion_matrix(test.y, classifier.classes(outputs), outputs.shape[1])
        mlflow.log_figure(confusion, "plots/confusion_matrix.png")
        mlflow.log_figure(plots.training_curves(self.history), "plots/training_curves.png")

    def log_model(self, model: Any, output: str, target: str, requirements: list[str]) -> None:
        """The trained model, which emits `output` (logits or probabilities) and was built by
        `_target_` `target`, served as `runner.tracking.serving` says; pinned requirements
        (Keras's, MLflow's and its backend's `requirements`) skip MLflow's slow inference of
        them."""
        # uv's environments have no pip, which MLflow reports as a warning while writing conda.yaml.
        logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
        serving.log_model(
            model,
            name=MODEL_ARTIFACT,
            output=output,
            target=target,
            pip_requirements=[
                f"keras=={version('keras')}",
                *requirements,
                f"mlflow=={mlflow.__version__}",
            ],
        )

    def final_metrics(self) -> dict[str, float]:
        return {key: values[-1][1] for key, values in self.history.items()}
