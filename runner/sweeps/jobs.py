"""A sweep's job as its MLflow run sees it: the sweep's parent run and the job's own name.

`runner.sweeps.nested_runs.NestedRuns`, in the process that starts the sweep, opens the parent
run and writes its id into the sweep directory; the jobs, wherever they run (joblib's workers,
submitit's processes, SLURM nodes), read it from there, since every launcher shares that
directory with its jobs. This module is what the jobs' side needs, and imports no other part
of the runner.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from runner.masking import mask

# Written into the sweep directory for the jobs: the parent run's id, and the keys that the
# sweep's command line sets to one value for every job.
SWEEP_FILE = "mlflow_sweep.json"
# The tag that marks a run as a sweep's parent, holding the sweep directory.
SWEEP_DIR_TAG = "sweep.dir"


@dataclass(frozen=True)
class SweepJob:
    parent_run_id: str
    # "#NUM" and the overrides that set this job apart from the rest of the sweep.
    name: str
    # The parent's experiment, which the job's run joins.
    experiment_name: str


def current_job() -> SweepJob | None:
    """The sweep this job belongs to; None outside a sweep."""
    if not in_multirun():
        return None
    hydra = HydraConfig.get()
    path = Path(hydra.sweep.dir).absolute() / SWEEP_FILE
    if not path.is_file():  # the NestedRuns callback was switched off
        return None
    sweep = json.loads(path.read_text())
    name = mask(job_name(hydra.job.num, hydra.overrides.task, sweep["fixed"]))[:250]
    return SweepJob(sweep["parent_run_id"], name, sweep["experiment_name"])


def job_name(number: int, overrides: Sequence[str], fixed: Sequence[str]) -> str:
    """`#NUM` and the overrides that set a sweep's job apart from the rest of the sweep: all of
    its `overrides` but those of the keys the sweep's command line gave one value (`fixed`, as
    `sweep_keys` gives them)."""
    own = [o for o in overrides if override_key(o) not in fixed]
    return " ".join([f"#{number}", *own])


def sweep_keys(overrides: Sequence[str], swept: bool) -> list[str]:
    """The keys, as written, of a sweep's command-line `overrides` that sweep (`a=1,2`) or, not
    `swept`, that give one value to every job (`a=1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        override_key(text)
        for text, override in zip(overrides, parsed, strict=True)
        if override.is_sweep_override() == swept
    ]


def override_key(override: str) -> str:
    """An override's key as written, its `+`, `++` or `~` kept: `+a.b` of `+a.b=1`."""
    return override.split("=", 1)[0]


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
