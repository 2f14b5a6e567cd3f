"""Refresh the golden metric histories, deliberately: `uv run python tests/golden/update.py`.

Each reference is a short run whose metric histories and environment are stored here;
tests/test_golden.py reruns it and compares (see there for the tolerances). Refresh only when a
change is meant to alter the numbers, and say so in the commit.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import mlflow

GOLDEN = Path(__file__).resolve().parent
sys.path.insert(0, str(GOLDEN.parents[1]))

from runner.repro import histories, logged_environment  # noqa: E402
from runner.train import compose, train  # noqa: E402

QUICK = [
    "data.limit=2000",
    "trainer.log_every=10",
    "trainer.eval_every=20",
    "trainer.progress_bar=false",
    "trainer.log_model=false",
]
REFERENCES = {
    "softmax": [*QUICK, "trainer.steps=40"],
    "cnn_raw": [
        *QUICK,
        "model=cnn_raw",
        "optimizer=adam",
        "data.batch_size=50",
        "trainer.steps=30",
        "trainer.eval_every=30",
    ],
}


def record(name: str, overrides: list[str]) -> dict:
    """Run the reference in a scratch store; its overrides, environment and metric histories."""
    with tempfile.TemporaryDirectory() as work:
        uri = f"sqlite:///{work}/mlflow.db"
        cwd = Path.cwd()
        os.chdir(work)
        try:
            train(
                compose(
                    [*overrides, f"tracking.uri={uri}", f"tracking.experiment_name=golden_{name}"]
                )
            )
            client = mlflow.MlflowClient(uri)
            run = client.get_run(mlflow.last_active_run().info.run_id)
            return {
                "overrides": overrides,
                "environment": logged_environment(run),
                "metrics": histories(client, run),
            }
        finally:
            os.chdir(cwd)


def main() -> None:
    for name, overrides in REFERENCES.items():
        reference = record(name, overrides)
        (GOLDEN / f"{name}.json").write_text(json.dumps(reference, indent=1) + "\n")
        print(f"wrote {GOLDEN / name}.json")


if __name__ == "__main__":
    main()
