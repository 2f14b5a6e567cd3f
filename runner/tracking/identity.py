"""Which MLflow run a command records into: its name, its experiment, and the run of the sweep
it is a job of. The sweeps layer tells it (`runner.sweeps.jobs.run_identity`); tracking opens the
run by it, knowing nothing of Hydra's sweeps."""

from dataclasses import dataclass

# The tag of a sweep's parent run that names the sweep's folder: it tells the parent runs apart
# from the runs of single commands.
SWEEP_DIR_TAG = "sweep.dir"


@dataclass(frozen=True)
class RunIdentity:
    # The command line's overrides; in a sweep, "#NUM" and those that set the job apart.
    name: str
    # The experiment the run records into: a sweep's jobs all join their parent's.
    experiment_name: str
    # A sweep's parent run, which a job's new run is nested under; None outside a sweep.
    parent_run_id: str | None = None
