"""A SLURM job preempted, requeued or near its time limit: checkpointed, requeued, carried on.

SLURM warns a job with SIGUSR2 (submitit's `--signal=USR2@signal_delay_s`) before its time
limit, and before a preemption where the cluster says so (`PreemptParameters=send_user_signal`);
it stops a job it requeues (`scontrol requeue`, or a preemption without that setting) or cancels
with SIGTERM. On either, the runner stops training at the end of the execution under way (its
device.steps_per_execution steps), writes a checkpoint and ends the MLflow run KILLED
(runner.callbacks.StopOnSignal). SIGUSR2 is then handed to submitit's own handler, which calls
the launcher's `checkpoint` (resubmit the same job) and requeues it. The requeued job runs the
same command again; seeing `SLURM_RESTART_COUNT`, it carries on from the checkpoint in the same
MLflow run, as `trainer.resume=true` would: a job stopped after its last step is only tested
and its run ended.
"""

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from runner.errors import Interrupted

# SLURM's notice of a coming preemption or time limit, as submitit asks for it.
NOTICE = signal.SIGUSR2
# Ctrl-C; a stop by `kill`, or by SLURM for a cancelled or requeued job; SLURM's notice.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, NOTICE)
log = logging.getLogger(__name__)


def requeued() -> bool:
    """Whether this is a SLURM job started again after a requeue."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resume_as(configured: str, has_checkpoint: bool) -> str:
    """`trainer.resume` for this job: `true` in a requeued job whose earlier start wrote a
    checkpoint (`has_checkpoint`), as configured otherwise."""
    return "true" if configured == "false" and requeued() and has_checkpoint else configured


# Whether a stop is being acted on, until the outermost `terminate_as_interrupt` ends; and the
# stop signals `held` keeps while MLflow opens a run (None when it is not holding them).
_closing = False
_depth = 0
_held: list[int] | None = None


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Outside the training steps (starting, loading, testing, logging the model), SIGTERM and
    SIGUSR2 raise KeyboardInterrupt as Ctrl-C does, its argument naming the signal: the MLflow
    run ends KILLED instead of staying RUNNING, and a SLURM job stopped while it starts ends at
    once, rather than when SLURM kills it (submitit only logs SIGTERM). Once a stop is acted on,
    repeated SIGTERM and SIGUSR2 are only logged (`closing`)."""
    global _closing, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number: int, frame: Any) -> None:
        if _held is not None:
            _held.append(number)
        elif _closing and number != signal.SIGINT:
            log.warning("%s received: already stopping", signal.Signals(number).name)
        else:
            closing()
            raise KeyboardInterrupt(signal.Signals(number).name)

    previous = {number: signal.signal(number, interrupt) for number in STOP_SIGNALS}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _closing = False
        for number, handler in previous.items():
            signal.signal(number, handler)


def closing() -> None:
    """A stop is being acted on: from now until the run is closed, a repeated SIGTERM or SIGUSR2
    (SLURM may signal both a cancelled job and its step) is logged and otherwise ignored.
    Raised in the middle of the close, it would leave the MLflow run RUNNING. A second Ctrl-C
    is the user's, and still interrupts."""
    global _closing
    _closing = True


@contextmanager
def held() -> Iterator[None]:
    """Stop signals that arrive within the block raise their KeyboardInterrupt as it ends, not
    inside it: MLflow creates a run, then starts its system metrics, then makes it the active
    run, and a run stopped in between could not be ended."""
    global _held
    _held = []
    try:
        yield
    finally:
        pending, _held = _held, None
        if pending:
            closing()
            raise KeyboardInterrupt(signal.Signals(pending[0]).name)


@contextmanager
def handed_on() -> Iterator[None]:
    """Hand a stop by SLURM's notice, once the runner has closed its run (with a checkpoint,
    if it came during training), to the handler that was there before (submitit's, which
    requeues the job and exits)."""
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
    """Whether submitit runs this SLURM job, and so requeues it on SLURM's notice."""
    return "SLURM_JOB_ID" in os.environ and "SUBMITIT_FOLDER" in os.environ


def _hand_on() -> None:
    handler: Any = signal.getsignal(NOTICE)
    if callable(handler):
        handler(NOTICE, None)
