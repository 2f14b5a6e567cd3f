"""One study, several search processes: the same search command started more than once at a
time, on one machine or on several, each process a worker on the study in their shared storage.

The storage is all the workers share, so it holds what they agree on: which processes run which
trial and whether they live (`runner.sweeps.leases`), how many trials are left to ask (counted
from the study's trials, whose numbers the storage hands out one at a time), the settings the
study was started with, and the search's MLflow parent run (`PARENT_ATTR`). Where only one
process may write a value (the settings, the parent run, a dead worker's trial), the right to
write it is won by creating a study: a storage refuses a second study of one name, whichever
process asks a moment later.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from runner.sweeps.leases import WORKER_ATTR, abandoned, this_worker

log = logging.getLogger(__name__)

# The study's user attribute naming its search's MLflow parent run: {run_id, generation}.
PARENT_ATTR = "runner.parent_run"
# The user attribute of a trial asked when the other workers' trials had filled n_trials: it is
# marked failed at once, without running.
SURPLUS_ATTR = "runner.surplus"
# How long a take-over's lock bars the other workers from the trial: one that died holding it
# loses it then.
TAKE_OVER_S = 60
# How long a worker waits for another to record what it won the right to record.
WAIT_S = 10
POLL_S = 0.2
# File systems on which SQLite's locks cannot be trusted.
NETWORK_FILE_SYSTEMS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "fuse.sshfs",
    "9p",
    "afs",
}
SHARE_INSTEAD = (
    "share a study between processes with hydra.sweeper.storage=journal:optuna.journal (a "
    "journal file; on a shared file system for several machines) or a database server "
    "(postgresql://USER@HOST/DB)"
)


def at_work(study: Any) -> list[Any]:
    """The study's RUNNING trials that a live process runs."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t for t in running if not abandoned(t)]


def others_at_work(study: Any) -> bool:
    """Whether another process runs a trial of the study."""
    me = this_worker()
    return any(t.user_attrs.get(WORKER_ATTR) != me for t in at_work(study))


def counted(study: Any, below: int | None = None) -> int:
    """The trials that count towards n_trials or may yet: finished (completed or pruned) and at
    work; with `below`, those numbered below it, which the storage numbered first."""
    from optuna.trial import TrialState

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sum(below is None or t.number < below for t in finished + at_work(study))


def take_over(study: Any, storage: Any, mark: Callable[[Any], None]) -> Any | None:
    """A RUNNING trial of `study` whose workers are gone (`leases.abandoned`), made this
    process's by `mark(trial)`, as an Optuna `Trial`; None if there is none. Of processes that
    find the same trial at once, the one that creates the lock study `<name> (runner: trial N
    taken over, <minute>)` and then reads it still abandoned takes it."""
    import optuna
    from optuna.trial import TrialState

    for found in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not abandoned(found):
            continue
        minute = int(time.time() // TAKE_OVER_S)
        lock = f"{study.study_name} (runner: trial {found.number} taken over, {minute})"
        try:
            with _quiet():
                optuna.create_study(study_name=lock, storage=storage)
        except optuna.exceptions.DuplicatedStudyError:
            continue
        try:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if any(t.number == found.number and abandoned(t) for t in running):
                trial = optuna.Trial(study, found._trial_id)
                mark(trial)
                return trial
        finally:
            _unlock(storage, lock)
    return None


def joined_study(name: str, storage: Any, directions: list[str], attr: str, value: Any) -> Any:
    """The stored study and the value of its user attribute `attr` (None if it has none): a
    study created here, if there was none, with `value` there. A process that finds the study
    just created by another waits (WAIT_S at most) for the other to record its value."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # none yet
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=directions)
        except optuna.exceptions.DuplicatedStudyError:  # another process's, a moment before
            study = optuna.load_study(study_name=name, storage=storage)
        else:
            study.set_user_attr(attr, value)
            return study, value
    if attr not in study.user_attrs and not study.get_trials(deepcopy=False):
        _awaited(lambda: attr in study.user_attrs)
    return study, study.user_attrs.get(attr)


def _awaited(done: Callable[[], bool]) -> bool:
    """Whether `done()` came true within WAIT_S seconds."""
    deadline = time.monotonic() + WAIT_S
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


class SharedParent:
    """The MLflow parent run that the processes of a stored study's search share: the first to
    start opens it and records it in the study, the others join it while it runs, and the last to
    end closes it. Once closed, the study's next search opens a new one."""

    def __init__(self, study: Any, storage: Any) -> None:
        self.study = study
        self.storage = storage

    def join(self, open_parent: Callable[[], str]) -> str:
        """The id of the running parent run the study records, else of the one `open_parent()`
        opens, recorded for the others. Of processes starting at once, the one that creates the
        study `<name> (runner: parent run <generation>)` opens it; the others wait for its
        record (one that died holding it, WAIT_S on, loses it)."""
        import optuna

        for _ in range(3):
            record = self.study.user_attrs.get(PARENT_ATTR)
            if record and _running(record["run_id"]):
                return record["run_id"]
            generation = record["generation"] + 1 if record else 0
            lock = f"{self.study.study_name} (runner: parent run {generation})"
            try:
                with _quiet():
                    optuna.create_study(study_name=lock, storage=self.storage)
            except optuna.exceptions.DuplicatedStudyError:
                if not _awaited(lambda g=generation: self._generation() >= g):
                    _unlock(self.storage, lock)
                continue
            try:
                if self._generation() >= generation:  # recorded since it was read above
                    continue
                run_id = open_parent()
                record = {"run_id": run_id, "generation": generation}
                self.study.set_user_attr(PARENT_ATTR, record)
                return run_id
            finally:
                _unlock(self.storage, lock)
        log.warning(
            "could not agree on a parent run with the other processes of study %r: opening one "
            "of this process's own",
            self.study.study_name,
        )
        return open_parent()

    def others_at_work(self) -> bool:
        """Whether another process still runs a trial of the study, and so ends the parent."""
        return others_at_work(self.study)

    def _generation(self) -> int:
        record = self.study.user_attrs.get(PARENT_ATTR)
        return record["generation"] if record else -1


def _unlock(storage: Any, lock: str) -> None:
    import optuna

    with contextlib.suppress(KeyError):  # another process took it over first
        optuna.delete_study(study_name=lock, storage=storage)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without Optuna's note on each study it creates: a lock is no news to the user."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _running(run_id: str) -> bool:
    import mlflow

    try:
        return mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
    except mlflow.exceptions.MlflowException:  # not in this tracking store
        return False


def sqlite_file(spec: Any) -> Path | None:
    """The file of a SQLite storage URL (sqlite:///optuna.db), None for any other storage."""
    if not (isinstance(spec, str) and spec.startswith("sqlite:")):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(spec).database
    return Path(database) if database and database != ":memory:" else None


def network_file_system(path: Path) -> str | None:
    """The type of the network file system `path` is on (nfs4, lustre, ...), if it is on one:
    the mount point of /proc/self/mounts that holds it, the deepest."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    where = path.absolute().resolve()
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if where.is_relative_to(point) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind if kind in NETWORK_FILE_SYSTEMS else None
