"""The golden check: short reference runs, rerun, must give the stored metric histories.

Exactly, when the environment matches the one the references were recorded in (package
versions, Python, processor); within rtol 1e-3 otherwise, since other kernels round otherwise.
Refresh them deliberately with `uv run python tests/golden/update.py`. cnn_layers.json (the TF
Layers CNN with its probability hook) and softmax_probabilities.json (the R edition) were
recorded by the runner before its models, data and callbacks were built from `_target_`, and
keep that redesign honest: update.py does not rewrite them.
"""

import json
from pathlib import Path

import mlflow
import pytest

from runner.repro import SAME_IF_EQUAL, compare, histories, logged_environment
from runner.train import train

from .conftest import compose_config

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.json")))
def test_reference_run_reproduces(name, in_tmp_store):
    reference = json.loads((GOLDEN / f"{name}.json").read_text())
    uri = f"sqlite:///{in_tmp_store}/mlflow.db"
    train(compose_config([*reference["overrides"], f"tracking.uri={uri}"]))
    client = mlflow.MlflowClient(uri)
    run = client.get_run(mlflow.last_active_run().info.run_id)
    environment = logged_environment(run)
    same = all(environment.get(k) == reference["environment"].get(k) for k in SAME_IF_EQUAL)
    rtol = 0.0 if same else 1e-3
    expected = {k: [tuple(point) for point in v] for k, v in reference["metrics"].items()}
    differences = compare(expected, histories(client, run), rtol=rtol)
    assert differences == [], f"rtol={rtol}, same environment: {same}"
    assert len(expected["train/loss"]) >= 3
