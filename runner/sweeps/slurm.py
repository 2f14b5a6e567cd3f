"""A sweep on SLURM (hydra/launcher=slurm), as the process that submits its jobs sees it.

submitit learns its jobs' states from `sacct`. On a cluster without accounting, sacct fails:
submitit then warns at every poll ("Bypassing sacct error"), keeps every job's state UNKNOWN,
and waits for a job's result file alone. A job that ends without one (cancelled, killed, out
of memory, a node lost) would be waited for forever. There `QueueWatcher` reads the states
from `squeue` instead, and says so once. `job_failure` tells such a job in one line.
"""

import json
import logging
import re
import subprocess
import time
import traceback
from typing import Any

from hydra.utils import get_class
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import Container, read_write
from submitit.core.core import Job
from submitit.core.utils import DelayedSubmission, FailedJobError, UncompletedJobError
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from runner.sweeps.jobs import SWEEP_FILE, job_name

log = logging.getLogger(__name__)

# States in which a job may still write its result: submitit's, and those squeue shows of a job
# whose node is booting, that is suspended or signalled, or that a requeue holds.
LIVE_STATES = {
    *("READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED"),
    *("CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"),
    *("REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"),
}
# The state of a job squeue no longer lists: it ended more than MinJobAge (300 s by default)
# ago, or was cancelled while pending in an array.
LEFT_QUEUE = "LEFT_QUEUE"
# The longest wait between two looks at squeue (submitit waits up to 10 minutes between calls
# to sacct): squeue forgets a job MinJobAge (300 s by default) after it ends, and answers from
# slurmctld's memory, cheaply.
SQUEUE_DELAY_S = 5
ACCOUNTING_OFF = re.compile(r"^AccountingStorageType\s*=\s*accounting_storage/none\s*$", re.M)


class QueueWatcher(SlurmInfoWatcher):
    """submitit's watcher of SLURM jobs, which asks `sacct` every so often (2, 4, 8, ... s after
    the last submission, then every `delay_s`); on a cluster without accounting, `squeue`, at
    least every `SQUEUE_DELAY_S`."""

    def __init__(self, delay_s: int = 600) -> None:
        super().__init__(delay_s)
        self.accounting: bool | None = None  # known once scontrol answered

    def update(self) -> None:
        if self.accounting is None:
            self.accounting = _has_accounting()
            if self.accounting is False:
                self._delay_s = min(self._delay_s, SQUEUE_DELAY_S)
                log.info(
                    "SLURM accounting is off on this cluster, so sacct cannot tell the jobs' "
                    "states: they are read from squeue instead"
                )
        if self.accounting is not False:
            super().update()
            return
        waiting = self._registered - self._finished
        if not waiting:
            return
        self._num_calls += 1
        listed = subprocess.run(
            [
                *("squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N"),
                f"--jobs={','.join(sorted({job_id.split('_')[0] for job_id in waiting}))}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # squeue refuses a list of jobs it all forgot; any other failure leaves states as they were.
        if listed.returncode and "Invalid job id" not in listed.stderr:
            log.warning("squeue failed, job states may be stale: %s", listed.stderr.strip())
        else:
            states = dict(line.split("|", 2)[:2] for line in listed.stdout.splitlines())
            for job_id in waiting:
                state = states.get(job_id, LEFT_QUEUE)
                self._info_dict[job_id] = {"JobID": job_id, "State": state}
        self._last_status_check = time.time()
        for job_id in waiting:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode=mode).split()[0].upper() not in LIVE_STATES


def _has_accounting() -> bool | None:
    """Whether the cluster records jobs for sacct; None when scontrol cannot say (yet)."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode:
        return None
    return not ACCOUNTING_OFF.search(shown.stdout)


def prepare_sweep(launcher: Container) -> None:
    """Before a sweep's jobs are submitted, given Hydra's `launcher` settings (`hydra.launcher`):
    with a SLURM launcher, watch the jobs with `QueueWatcher`; and `gpus_per_node=0` asks for no
    GPU at all, where submitit would write `--gpus-per-node=0` into the job script, a GPU
    request (of none) that a site's job submission rules may send to a GPU partition or
    refuse."""
    try:
        kind = get_class(launcher._target_)
    except (ImportError, ValueError):  # Hydra says so itself when it builds the launcher
        return
    if not issubclass(kind, SlurmLauncher):
        return
    if not isinstance(SlurmJob.watcher, QueueWatcher):
        SlurmJob.watcher = QueueWatcher(SlurmJob.watcher._delay_s)
    if launcher.get("gpus_per_node") == 0:
        with read_write(launcher):
            launcher.gpus_per_node = None


def job_failure(error: BaseException) -> str | None:
    """One line for a sweep whose SLURM job ended without its result, naming the job (id,
    number and overrides, state, log), or whose jobs sbatch refused; None for other errors."""
    if not isinstance(error, UncompletedJobError):
        return None
    cause = error.__cause__
    if isinstance(cause, subprocess.CalledProcessError) and cause.cmd[:1] == ["sbatch"]:
        said = "; ".join(line.removeprefix("sbatch: error: ") for line in cause.stderr.splitlines())
        return (
            f"sbatch refused the sweep's jobs: {said}; set hydra.launcher.partition, "
            "gpus_per_node, cpus_per_task and mem_gb to what the cluster has "
            "(sinfo -o '%P %c %m %G' lists them)"
        )
    job = _job_of(error)
    if job is None:
        return f"a SLURM job ended without its result: {str(error).splitlines()[0]}"
    logs = job.paths.stderr if job.paths.stderr.exists() else job.paths.stdout
    if isinstance(error, FailedJobError):
        # submitit's message holds the job's traceback between two lines of dashes.
        parts = str(error).split("-" * 22)
        trace = parts[1].strip().splitlines() if len(parts) > 2 else []
        what = f"failed: {trace[-1]}" if trace else "failed"
    else:
        state = job.watcher.get_state(job.job_id, mode="cache")
        what = (
            "left the queue without its result"
            if state == LEFT_QUEUE
            else f"ended {state} without its result"
        )
    return f"SLURM job {job.job_id} ({_job_name(job)}) {what}; its log: {logs}"


def _job_of(error: BaseException) -> Job | None:
    """The submitit job whose result `error` is about, found in the frames it was raised from:
    submitit's message names the job's files, not its place in the sweep."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        job = frame.f_locals.get("self")
        if isinstance(job, Job):
            return job
    return None


def _job_name(job: Job) -> str:
    """`#NUM` and the overrides that set the job apart, as its MLflow run is named; from the
    job's pickled call to Hydra's launcher, `(overrides, job_dir_key, job_num, ...)`."""
    try:
        call: Any = DelayedSubmission.load(job.paths.submitted_pickle)
        overrides, number = list(call.args[0]), call.args[2]
    except (OSError, EOFError, IndexError, AttributeError):
        return "overrides unknown"
    sweep_file = job.paths.folder.parent.parent / SWEEP_FILE  # hydra.sweep.dir/.submitit/ID
    fixed = json.loads(sweep_file.read_text())["fixed"] if sweep_file.is_file() else []
    return job_name(number, overrides, fixed)
