"""A SLURM job preempted, requeued or near its time limit: checkpointed, requeued, carried on.

SLURM warns a job with SIGUSR2 (submitit's `--signal=USR2@signal_delay_s`) before its time limit
or a preemption, and stops a job it requeues (`scontrol requeue`) or cancels with SIGTERM. On
either, the runner stops training at the end of the step under way, writes a checkpoint and
ends the MLflow run KILLED (runner.callbacks.StopOnSignal). SIGUSR2 is then handed to submitit's
own handler, which calls the launcher's `checkpoint` (resubmit the same job) and requeues it.
The requeued job runs the same command again; seeing `SLURM_RESTART_COUNT`, it carries on from
the checkpoint in the same MLflow run, as `trainer.resume=true` would.
"""

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.errors import Interrupted

# SLURM's notice of a coming preemption or time limit, as submitit asks for it.
NOTICE = signal.SIGUSR2


def requeued() -> bool:
    """Whether this is a SLURM job started again after a requeue."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resume_mode(configured: str, checkpoint_dir: str) -> str:
    """`trainer.resume` for this job: `true` in a requeued job whose earlier start wrote a
    checkpoint, as configured otherwise."""
    from runner.checkpoints import latest

    if configured == "false" and requeued() and latest(Path(checkpoint_dir)) is not None:
        return "true"
    return configured


@contextmanager
def handed_on() -> Iterator[None]:
    """Hand a stop by SLURM's notice, once the runner has checkpointed and closed its run, to
    the handler that was there before (submitit's, which requeues the job and exits)."""
    try:
        yield
    except Interrupted as error:
        if error.exit_code == 128 + NOTICE:
            _hand_on()
        raise
    except KeyboardInterrupt as error:  # raised outside the steps by terminate_as_interrupt
        if error.args == (NOTICE.name,):
            _hand_on()
        raise


def will_requeue() -> bool:
    """Whether a handler of SLURM's notice (submitit's) waits to requeue this job."""
    return callable(signal.getsignal(NOTICE))


def _hand_on() -> None:
    handler: Any = signal.getsignal(NOTICE)
    if callable(handler):
        handler(NOTICE, None)
