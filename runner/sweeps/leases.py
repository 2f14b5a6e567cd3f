"""Who holds a search's running trial, and whether it still lives: a trial whose workers died
is taken over and carried on by another (`hydra_plugins.runner_optuna.sharing.take_over`).

A process that dies (kill -9, a node lost) cannot say so, and a process on another machine
cannot be asked whether it lives. So a trial records the processes at work on it, `host:pid`
(the search process that launched it, `WORKER_ATTR`, and the job that trains it,
`JOB_WORKER_ATTR`), and each of them renews a lease on it in the study's storage every sixth
of `lease_s` (`Lease`). Processes on this machine are asked directly; for the others, the
lease tells. A SLURM job that was requeued knows that its earlier start is gone at once.
"""

import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

# The trial's user attributes: the search process that runs it and the job process that
# trains it, each `host:pid`; and until when (seconds since the epoch) a live one holds it.
WORKER_ATTR = "runner.worker"
JOB_WORKER_ATTR = "runner.job_worker"
LEASE_ATTR = "runner.lease_until"
# The SLURM job the search process runs in, and its start: `JOBID.RESTARTS`.
SLURM_ATTR = "runner.slurm_job"
# Renewals per lease: a lease survives a few missed writes to a busy storage.
RENEWALS = 6
# A RUNNING trial without a worker's mark (asked a moment ago, or by a sweeper that predates the
# marks) is taken to be at work for this many seconds after it began.
UNMARKED_GRACE_S = 60


def this_host() -> str:
    return socket.gethostname()


def this_worker() -> str:
    return f"{this_host()}:{os.getpid()}"


def this_slurm_start() -> str | None:
    """This process's SLURM job and how many times it was requeued, if it runs in one."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT') or 0}" if job else None


def abandoned(trial: Any, now: float | None = None) -> bool:
    """Whether a (frozen) RUNNING trial has no live worker: its SLURM job's earlier start, or
    no live process of it on this machine and, where it has some elsewhere, its lease run out
    (a trial asked by a runner that took no leases is taken to be at work there). A trial
    without a worker's mark is abandoned UNMARKED_GRACE_S after it began."""
    marks = trial.user_attrs
    worker = marks.get(WORKER_ATTR)
    if worker is None:
        started = trial.datetime_start
        return started is None or datetime.now() - started > timedelta(seconds=UNMARKED_GRACE_S)
    if _earlier_start(marks.get(SLURM_ATTR)):
        return True
    workers = [w for w in (worker, marks.get(JOB_WORKER_ATTR)) if w]
    here = [int(w.rpartition(":")[2]) for w in workers if w.rpartition(":")[0] == this_host()]
    if any(_alive(pid) for pid in here):
        return False
    if len(here) == len(workers):
        return True
    until = marks.get(LEASE_ATTR)
    return until is not None and (time.time() if now is None else now) > until


def _earlier_start(slurm_start: str | None) -> bool:
    """Whether `slurm_start` is an earlier start of this process's own SLURM job, which SLURM
    requeued: that start is over."""
    mine = this_slurm_start()
    if not (slurm_start and mine):
        return False
    job, _, restarts = slurm_start.partition(".")
    my_job, _, my_restarts = mine.partition(".")
    return job == my_job and int(restarts) < int(my_restarts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class Lease:
    """Renews a lease of `seconds` on each trial it holds, on a daemon thread, until closed.
    Trials are Optuna `Trial`s, which write to their study's storage; the writes are made one at
    a time, so that a lease given up stays given up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.held: dict[int, Any] = {}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="trial-lease", daemon=True)
        self.thread.start()

    def hold(self, trial: Any) -> None:
        """Take the lease on `trial` now, and keep renewing it."""
        with self.lock:
            if self._write(trial, time.time() + self.seconds):
                self.held[trial.number] = trial

    def release(self, trial: Any) -> None:
        with self.lock:
            self.held.pop(trial.number, None)

    def give_up(self, trial: Any) -> None:
        """Release `trial` and end its lease now: a worker elsewhere may take it over at once."""
        with self.lock:
            self.held.pop(trial.number, None)
            self._write(trial, 0.0)

    def close(self) -> None:
        self.closed.set()

    def _renew(self) -> None:
        while not self.closed.wait(self.seconds / RENEWALS):
            with self.lock:
                for number, trial in list(self.held.items()):
                    if not self._write(trial, time.time() + self.seconds):
                        del self.held[number]

    def _write(self, trial: Any, until: float) -> bool:
        """Write the lease; whether the trial still runs."""
        import optuna

        try:
            trial.set_user_attr(LEASE_ATTR, until)
        except optuna.exceptions.UpdateFinishedTrialError:  # told while this was renewing it
            return False
        except Exception as error:  # a storage busy a moment: the next renewal tries again
            log.warning("could not renew the lease on trial %d: %s", trial.number, error)
        return True
