"""Refresh the golden metric histories, deliberately: `uv run python tests/golden/update.py`.

Each reference is a short run, trained here in a scratch store; runner-repro's own save code
writes its golden file: its overrides, config, environment and metric histories, which
tests/test_golden.py checks as `runner-repro --golden FILE` does (see there for the tolerances).
The config leaves out the keys that name the machine (runner-repro's MACHINE_KEYS: where the
data, the store and the checkpoints were), which that check does not compare: the files record
no one's folders, and a rerun reads the data where its machine's conf/ finds it. Refresh only
when a change is meant to alter the numbers, and say so in the commit.
"""

import os
import sys
import tempfile
from pathlib import Path

import mlflow
from omegaconf import OmegaConf

GOLDEN = Path(__file__).resolve().parent
sys.path.insert(0, str(GOLDEN.parents[1]))

from runner.cli.train import compose, train  # noqa: E402
from runner.tracking.golden import machine_key  # noqa: E402
from runner.tracking.recorded import logged_run, save_run  # noqa: E402

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


def portable(config: dict, prefix: str = "") -> dict:
    """`config` without the keys that name the machine it ran on."""
    return {
        key: portable(value, f"{prefix}{key}.") if isinstance(value, dict) else value
        for key, value in config.items()
        if not machine_key(f"{prefix}{key}")
    }


def record(name: str, overrides: list[str]) -> Path:
    """Train the reference in a scratch store and write its golden file."""
    path = GOLDEN / f"{name}.json"
    with tempfile.TemporaryDirectory() as work:
        uri = f"sqlite:///{work}/mlflow.db"
        cwd = Path.cwd()
        os.chdir(work)
        try:
            train(compose([*overrides, f"tracking.uri={uri}"]))
            run, logged = logged_run(mlflow.last_active_run().info.run_id, uri)
            config = portable(OmegaConf.to_container(logged))
            save_run(path, run=run, overrides=overrides, config=config, tracking_uri=uri)
        finally:
            os.chdir(cwd)
    return path


def main() -> None:
    for name, overrides in REFERENCES.items():
        print(f"wrote {record(name, overrides)}")


if __name__ == "__main__":
    main()
