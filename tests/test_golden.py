"""The golden check: short reference runs, rerun, must give the stored metric histories.

Each file is a golden file of `runner-repro`, checked as `runner-repro --golden FILE` checks
one, in-process: today's conf/ must compose its overrides into the config it records, and the
rerun must give its histories exactly where the environment matches the one it was recorded in
(package versions, Python, processor), within rtol 1e-3 otherwise, since other kernels round
otherwise. Refresh them deliberately with `uv run python tests/golden/update.py`.
cnn_layers.json (the TF Layers CNN with its probability hook) and softmax_probabilities.json (the
R edition) were recorded by the runner before its models, data and callbacks were built from
`_target_`, and keep that redesign honest: update.py does not rewrite them.
"""

from pathlib import Path

import pytest

from runner.cli.reruns import check_golden
from runner.tracking.differences import compare
from runner.tracking.golden import golden_rtol

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.json")))
def test_reference_run_reproduces(name, in_tmp_store):
    golden, found, environment = check_golden(GOLDEN / f"{name}.json", [])
    rtol = golden_rtol(golden["environment"], environment)
    assert compare(golden["metrics"], found, rtol=rtol) == [], f"rtol={rtol}"
    assert len(golden["metrics"]["train/loss"]) >= 3
