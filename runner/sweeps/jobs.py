"""This Hydra job as its MLflow run sees it: its name and experiment, the sweep's parent run it
nests under, and where Hydra recorded its command. The one module that asks Hydra's runtime
(`HydraConfig`) about the job; it hands the rest of the runner plain values.

`runner.sweeps.nested_runs.NestedRuns`, in the process that starts the sweep, opens the parent
run and writes its id into the sweep directory; the jobs, wherever they run (joblib's workers,
submitit's processes, SLURM nodes), read it from there, since every launcher shares that
directory with its jobs.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from runner.masking import mask, mask_files
from runner.tracking.identity import RunIdentity

# Written into the sweep directory for the jobs: the parent run's id, and the keys that the
# sweep's command line sets to one value for every job.
SWEEP_FILE = "mlflow_sweep.json"


def run_identity(experiment_name: str, default_name: str) -> RunIdentity:
    """This job's run: a sweep's job is named `#NUM` and the overrides that set it apart, and
    nests under the sweep's parent run, in its experiment; any other run is named by its
    command line's overrides (else `default_name`), in `experiment_name`."""
    if in_multirun():
        hydra = HydraConfig.get()
        path = Path(hydra.sweep.dir).absolute() / SWEEP_FILE
        if path.is_file():  # else the NestedRuns callback was switched off
            sweep = json.loads(path.read_text())
            name = mask(job_name(hydra.job.num, hydra.overrides.task, sweep["fixed"]))[:250]
            return RunIdentity(name, sweep["experiment_name"], sweep["parent_run_id"])
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return RunIdentity(mask(overrides) or default_name, experiment_name)


def job_name(number: int, overrides: Sequence[str], fixed: Sequence[str]) -> str:
    """`#NUM` and the overrides that set a sweep's job apart from the rest of the sweep: all of
    its `overrides` but those of the keys the sweep's command line gave one value (`fixed`, as
    `sweep_keys` gives them)."""
    own = [o for o in overrides if override_key(o) not in fixed]
    return " ".join([f"#{number}", *own])


def sweep_keys(overrides: Sequence[str], swept: bool) -> list[str]:
    """The keys, as written, of a sweep's command-line `overrides` that sweep (`a=1,2`) or, not
    `swept`, that give one value to every job (`a=1`)."""
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


def multirun_settings() -> Any | None:
    """Hydra's own settings (the config's `hydra` node) of this job of a sweep; None outside
    a sweep."""
    return HydraConfig.get() if in_multirun() else None


def hydra_record_dir() -> Path | None:
    """Where Hydra wrote this command's config and overrides, if it did."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return None
    hydra = HydraConfig.get()
    return Path(hydra.runtime.output_dir) / hydra.output_subdir


def mask_hydra_record() -> None:
    """Mask the job's record of its command in its folder (`.hydra/*.yaml`), and the sweep's
    (`multirun.yaml`), which Hydra writes before the job starts."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    record = hydra_record_dir()
    files = list(record.glob("*.yaml")) if record is not None else []
    if hydra.mode is not None and hydra.mode.name == "MULTIRUN":
        files.append(Path(hydra.sweep.dir) / "multirun.yaml")
    mask_files(*files)
