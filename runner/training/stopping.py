"""Stops before the last step: why training stopped (`StopReason`), and the one object per
command that hears the stop signals and keeps that reason (`Stops`).

Ctrl-C (SIGINT), SIGTERM and SLURM's notice (SIGUSR2) stop training at the end of the execution
under way, so that a checkpoint can be written; outside the training steps (starting, loading,
testing, logging the model) they raise `Stopped`, a KeyboardInterrupt, so that the MLflow run
ends KILLED instead of staying RUNNING, and a SLURM job stopped while it starts ends at once
rather than when SLURM kills it (submitit only logs SIGTERM).
"""

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from runner.errors import Interrupted, Stopped, stop_signal

log = logging.getLogger(__name__)

# SLURM's notice of a coming preemption or time limit, as submitit asks for it
# (runner.sweeps.preemption).
NOTICE = signal.SIGUSR2
# Ctrl-C; a stop by `kill`, or by SLURM for a cancelled or requeued job; SLURM's notice.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, NOTICE)


def _resume_alone(checkpoints: Path, verb: str) -> str:
    return f"{verb} with trainer.resume=true"


@dataclass(frozen=True)
class CarryOn:
    """How a run stopped before its end is carried on, as the command that started it knows:
    `command(checkpoints, verb)` says what to run to carry on (or, as `verb` says, finish) the
    run whose checkpoints are in `checkpoints`, and `requeued` whether SLURM requeues the job
    on its notice, which then carries it on by itself."""

    command: Callable[[Path, str], str] = _resume_alone
    requeued: bool = False

    def told(self, checkpoints: Path, stopped_by: signal.Signals, finish: bool = False) -> str:
        """What carries on (with `finish`, finishes) a run stopped by `stopped_by`."""
        if stopped_by == NOTICE and self.requeued:
            return f"the requeued job {'finishes it' if finish else 'carries on from it'}"
        return self.command(checkpoints, "finish it" if finish else "carry on")


class StopReason(Enum):
    """Why training stopped before `trainer.steps`."""

    SIGNAL = "signal"  # checkpointed; the run ends KILLED, and a resume carries it on
    SERVER_LOST = "server lost"  # tracking.server_patience_s unanswered: checkpointed, exits 1
    EARLY_STOP = "early stop"  # a callback: the run is tested, ends FINISHED, tagged
    PRUNED = "pruned"  # the Optuna trial's pruner: the run ends KILLED, untested
    NON_FINITE_LOSS = "non-finite loss"  # the run ends FAILED, naming the step

    @property
    def ends_training(self) -> bool:
        """Whether training is over, the run ending without an error; after any other stop
        the command ends with one, saying how to carry on."""
        return self in (StopReason.EARLY_STOP, StopReason.PRUNED)


class Stops:
    """The stop signals' handler for one command (or one `train` called from Python), and the
    reason training stopped: the first one given, as the first stop is the one acted on.

    `installed` puts the handler in place and the previous ones back however the block ends.
    While Keras runs the training steps (`runner.training.callbacks.StopOnSignal` says when, and
    acts on the stop) a signal asks for a stop at the end of the execution under way; elsewhere
    it raises `Stopped`. Once the command is ending on a stop (`closing`), a repeated SIGTERM or
    SIGUSR2 (SLURM may signal both a cancelled job and its step) is only logged: raised in the
    middle of the close, it would leave the MLflow run RUNNING. A second Ctrl-C is the user's,
    and still interrupts."""

    def __init__(self) -> None:
        self.reason: StopReason | None = None
        self.signal: signal.Signals | None = None  # the first stop signal acted on
        self._previous: dict[signal.Signals, Any] = {}
        self._steps: int | None = None  # while training: steps an execution runs
        self._held: list[signal.Signals] | None = None

    def request(self, reason: StopReason) -> None:
        """Stop training for `reason`, unless it is stopping for another already."""
        if self.reason is None:
            self.reason = reason

    @property
    def closing(self) -> bool:
        """Whether the command is ending on a stop, closing its run."""
        return self.signal is not None or (
            self.reason is not None and not self.reason.ends_training
        )

    @contextmanager
    def installed(self) -> Iterator["Stops"]:
        """Hear the stop signals within the block (in the main thread, which alone may), and
        put the previous handlers back as it ends; entered again, it does nothing more. A stop
        by SLURM's notice is then handed to the handler that was there before (submitit's,
        which requeues the job and exits), once the run is closed, with its checkpoint if it
        came during training."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {number: signal.signal(number, self._heard) for number in STOP_SIGNALS}
        try:
            yield self
        except (KeyboardInterrupt, Interrupted) as error:
            handler = self._restore()[NOTICE]
            if stop_signal(error) == NOTICE and callable(handler):
                handler(NOTICE, None)
            raise
        finally:
            self._restore()

    def _restore(self) -> dict[signal.Signals, Any]:
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler)
        return previous

    def steps_begin(self, steps_per_execution: int) -> None:
        """Keras starts running training steps, `steps_per_execution` a call: a stop signal now
        asks for a stop after the call under way rather than raising."""
        self._steps = steps_per_execution

    def steps_end(self) -> None:
        """Keras has run its last training step: a stop signal raises again."""
        self._steps = None

    @contextmanager
    def training(self) -> Iterator[None]:
        """Around Keras's `fit`, which skips its callbacks' `on_train_end` when it raises: the
        steps are over however it ends."""
        try:
            yield
        finally:
            self.steps_end()

    def signalled(self, received: signal.Signals) -> None:
        """`received` came during the training steps: stop once those under way are done."""
        self._acted_on(received)
        log.warning(
            "%s received: stopping after the %d step(s) under way", received.name, self._steps
        )

    @contextmanager
    def held(self) -> Iterator[None]:
        """Stop signals that arrive within the block raise `Stopped` as it ends, not inside it:
        MLflow creates a run, then starts its system metrics, then makes it the active run, and
        a run stopped in between could not be ended."""
        self._held = []
        try:
            yield
        finally:
            pending, self._held = self._held, None
            if pending:
                raise self._stopped(pending[0])

    def _heard(self, number: int, frame: Any) -> None:
        received = signal.Signals(number)
        if self._held is not None:
            self._held.append(received)
        elif self._steps is not None:
            self.signalled(received)
        elif self.closing and received != signal.SIGINT:
            log.warning("%s received: already stopping", received.name)
        else:
            raise self._stopped(received)

    def _stopped(self, received: signal.Signals) -> Stopped:
        self._acted_on(received)
        return Stopped(received)

    def _acted_on(self, received: signal.Signals) -> None:
        if self.signal is None:
            self.signal = received
        self.request(StopReason.SIGNAL)
