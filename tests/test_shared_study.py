"""One study, several search processes (hydra_plugins/runner_optuna/sharing.py): exactly
n_trials between them, one settings record and one MLflow parent run, however they interleave."""

import logging
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.runner_optuna import resumable_sweeper, sharing
from runner.sweeps import leases, nested_runs

from .conftest import QUICK, cli, parents_and_children, readme_commands, template_store
from .test_optuna import Launcher, sweeper

SECTION = "Sweeping and comparing"


def journal(path) -> optuna.storages.JournalStorage:
    """A journal file's storage, as one process opens it."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


class Raced:
    """A study whose every `ask` comes a moment after another process's, on another machine."""

    def __init__(self, study: optuna.Study):
        self.study = study

    def __getattr__(self, name: str):
        return getattr(self.study, name)

    def ask(self, *args, **kwargs) -> optuna.Trial:
        other = self.study.ask()
        other.set_user_attr(leases.WORKER_ATTR, "elsewhere:1")
        return self.study.ask(*args, **kwargs)


def raced_trials(wanted: int) -> tuple[optuna.Study, resumable_sweeper.Trials]:
    study = optuna.create_study()
    config = OmegaConf.create({"hydra": {"runtime": {"cwd": "/w"}, "sweep": {"dir": "m"}}})
    return study, resumable_sweeper.Trials(Raced(study), {}, {}, config, None, None, wanted=wanted)


def test_of_two_processes_that_see_the_last_trial_missing_the_second_to_ask_runs_nothing():
    """Both pass the count before asking; the storage numbers the other's trial first, so
    this one is marked failed, as surplus, and not launched."""
    study, trials = raced_trials(wanted=1)
    assert trials.ask(0) is None
    other, mine = study.trials
    assert (other.state, mine.state) == (TrialState.RUNNING, TrialState.FAIL)
    assert mine.user_attrs[sharing.SURPLUS_ATTR] is True


def test_with_two_trials_missing_both_processes_run_one():
    study, trials = raced_trials(wanted=2)
    trial, _ = trials.ask(0)
    assert trial.number == 1 and study.trials[1].state == TrialState.RUNNING
    assert study.trials[1].user_attrs[leases.WORKER_ATTR] == leases.this_worker()
    assert trials.ask(1) is None  # both at work: the study is full
    assert len(study.trials) == 2, "nothing asked once it was full"


def test_a_sqlite_study_that_another_process_shares_is_warned_of_once(caplog):
    _, trials = raced_trials(wanted=5)
    trials.unsafe = resumable_sweeper._unsafe_to_share("sqlite:///optuna.db", "s")
    with caplog.at_level(logging.WARNING):
        assert trials.ask(0) is not None and trials.ask(1) is not None
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "study 's' is in the SQLite file optuna.db, which another search process" in warning
    assert "hydra.sweeper.storage=journal:optuna.journal" in warning and "postgresql://" in warning


def test_a_sqlite_study_on_a_network_file_system_is_warned_of_at_once(caplog, monkeypatch):
    assert sharing.network_file_system(Path("/proc/self")) is None
    monkeypatch.setattr(sharing, "network_file_system", lambda path: "nfs4")
    with caplog.at_level(logging.WARNING):
        assert resumable_sweeper._unsafe_to_share("sqlite:////shared/optuna.db", "s") is None
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "SQLite file /shared/optuna.db on a network file system (nfs4)" in warning
    assert "hydra.sweeper.storage=journal:optuna.journal" in warning
    assert resumable_sweeper._unsafe_to_share("journal:optuna.journal", "s") is None


def test_two_sweepers_on_one_journal_run_exactly_n_trials(tmp_path):
    """Two searches at once, each with two slots and its own reader of one journal file."""
    path = tmp_path / "optuna.journal"
    searches = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        search, arguments = sweeper(tmp_path / folder, journal(path), 7, Slow())
        searches.append((search, arguments))
    threads = [threading.Thread(target=s.sweep, args=(a,)) for s, a in searches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    study = optuna.load_study(study_name="s", storage=journal(path))
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 7
    others = [t for t in study.trials if t.state != TrialState.COMPLETE]
    assert all(t.user_attrs[sharing.SURPLUS_ATTR] for t in others)
    ran = [first for s, _ in searches for _, first in s.launcher.batches]
    assert len(ran) == 7 and all(s.launcher.batches for s, _ in searches), "both took part"
    assert len({t.user_attrs["runner.job"] for t in finished}) == 7


class Slow(Launcher):
    def launch(self, overrides, initial_job_idx: int):
        time.sleep(0.3)
        return super().launch(overrides, initial_job_idx)


def test_a_process_that_finds_the_study_just_made_waits_for_its_settings(tmp_path):
    """The other process made the study and records its settings a moment later: this one,
    started with other settings, is refused, not recorded."""
    path = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="s", storage=journal(path))
    theirs = {"fixed": ["trainer.steps=20"], "searched": {}}
    mine = {"fixed": ["trainer.steps=30"], "searched": {}}
    later = threading.Timer(0.5, study.set_user_attr, (resumable_sweeper.SETTINGS_ATTR, theirs))
    later.start()
    with pytest.raises(resumable_sweeper.SettingsChanged, match="trainer.steps=20 then, trainer"):
        resumable_sweeper._checked_study("s", journal(path), mine, ["minimize"])
    later.join()
    assert study.user_attrs[resumable_sweeper.SETTINGS_ATTR] == theirs


def test_of_two_processes_started_at_once_with_other_settings_one_is_refused(tmp_path):
    path = tmp_path / "optuna.journal"
    outcomes = []

    def start(steps: int) -> None:
        now = {"fixed": [f"trainer.steps={steps}"], "searched": {}}
        try:
            resumable_sweeper._checked_study("s", journal(path), now, ["minimize"])
            outcomes.append("ran")
        except resumable_sweeper.SettingsChanged:
            outcomes.append("refused")

    threads = [threading.Thread(target=start, args=(steps,)) for steps in (20, 30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["ran", "refused"]


def test_processes_starting_at_once_share_one_parent_until_it_ends(tmp_path, monkeypatch):
    """Four at once open one parent run between them; once it has ended, the next search of
    the study opens the next."""
    path = tmp_path / "optuna.journal"
    optuna.create_study(study_name="s", storage=journal(path))
    opened, running = [], set()
    monkeypatch.setattr(sharing, "_running", lambda run_id: run_id in running)
    lock = threading.Lock()

    def open_parent() -> str:
        with lock:
            run_id = f"run{len(opened)}"
            opened.append(run_id)
            running.add(run_id)
        time.sleep(0.2)
        return run_id

    joined = []

    def join() -> None:
        storage = journal(path)
        study = optuna.load_study(study_name="s", storage=storage)
        joined.append(sharing.SharedParent(study, storage).join(open_parent))

    threads = [threading.Thread(target=join) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert joined == ["run0"] * 4 and opened == ["run0"]
    running.clear()
    storage = journal(path)
    study = optuna.load_study(study_name="s", storage=storage)
    assert sharing.SharedParent(study, storage).join(open_parent) == "run1"
    assert study.user_attrs[sharing.PARENT_ATTR] == {"run_id": "run1", "generation": 1}
    assert optuna.get_all_study_names(storage) == ["s"], "no lock left behind"


def test_a_trial_is_abandoned_only_when_its_process_is_gone():
    study = optuna.create_study()
    mine, gone, elsewhere, unmarked = (study.ask() for _ in range(4))
    mine.set_user_attr(leases.WORKER_ATTR, leases.this_worker())
    host = leases.this_worker().rpartition(":")[0]
    gone.set_user_attr(leases.WORKER_ATTR, f"{host}:{2**22 + 1}")  # above pid_max's default
    elsewhere.set_user_attr(leases.WORKER_ATTR, "elsewhere:1")
    assert [leases.abandoned(t) for t in study.trials] == [False, True, False, False]
    assert sharing.counted(study) == 3  # all but the one whose process is gone
    assert sharing.others_at_work(study)
    elsewhere_done = study.trials[2]
    study.tell(elsewhere_done.number, 1.0)
    study.tell(study.trials[3].number, 1.0)
    assert not sharing.others_at_work(study), "only this process's trial and a dead one's left"


def test_a_trial_elsewhere_is_abandoned_once_its_lease_runs_out(monkeypatch):
    study = optuna.create_study()
    held, lapsed, job_here, requeued, other_job = (study.ask() for _ in range(5))
    for trial in study.trials:
        study_trial = optuna.Trial(study, trial._trial_id)
        study_trial.set_user_attr(leases.WORKER_ATTR, "elsewhere:1")
        study_trial.set_user_attr(leases.LEASE_ATTR, time.time() + 60)
    lapsed.set_user_attr(leases.LEASE_ATTR, time.time() - 1)
    # The search process elsewhere, its job here and alive: this machine's process tells.
    job_here.set_user_attr(leases.LEASE_ATTR, time.time() - 1)
    job_here.set_user_attr(leases.JOB_WORKER_ATTR, leases.this_worker())
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued.set_user_attr(leases.SLURM_ATTR, "7.0")  # this SLURM job's start before its requeue
    other_job.set_user_attr(leases.SLURM_ATTR, "8.0")
    assert [leases.abandoned(t) for t in study.trials] == [False, True, False, True, False]


def test_a_lease_is_taken_at_once_and_renewed_until_told(monkeypatch):
    monkeypatch.setattr(leases, "RENEWALS", 100)  # every 10 ms
    study = optuna.create_study()
    trial = study.ask()
    lease = leases.Lease(1.0)
    lease.hold(trial)
    first = study.trials[0].user_attrs[leases.LEASE_ATTR]
    assert first > time.time() + 0.5
    time.sleep(0.1)
    assert study.trials[0].user_attrs[leases.LEASE_ATTR] > first
    study.tell(trial, 1.0)
    time.sleep(0.05)
    assert trial.number not in lease.held, "a trial told is no longer renewed"
    lease.close()
    lease.thread.join(1)
    assert not lease.thread.is_alive()


def test_of_two_workers_finding_a_dead_workers_trial_one_takes_it_over(tmp_path):
    storage = journal(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=storage)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    host = leases.this_worker().rpartition(":")[0]
    dead.set_user_attr(leases.WORKER_ATTR, f"{host}:{2**22 + 1}")
    marked = []

    def mark(trial: optuna.Trial) -> None:
        marked.append(trial.number)
        trial.set_user_attr(leases.WORKER_ATTR, leases.this_worker())

    with ThreadPoolExecutor(2) as pool:
        taken = list(pool.map(lambda _: sharing.take_over(study, storage, mark), range(2)))
    assert marked == [0]
    assert sorted(t is None for t in taken) == [False, True]
    [trial] = [t for t in taken if t is not None]
    assert (trial.number, trial.params) == (0, dead.params), "its number and parameters kept"
    assert sharing.take_over(study, storage, mark) is None, "now at work"
    assert optuna.get_all_study_names(storage) == ["s"], "no lock left behind"


def worker_args(line: str) -> list[str]:
    """The search command's arguments in a README line that starts its workers."""
    [command] = re.findall(r"uv run runner ([^&\"]*)", line)
    return shlex.split(command)


def shared_search(folder: Path, trials: int) -> list[str]:
    """Overrides that make the README's search a short one of `trials` trials, recording into
    `folder`, each of its processes running one or more (`tests.probes.WaitForOtherProcess`)
    where there are more trials than processes."""
    shutil.copyfile(template_store(), folder / "mlflow.db")  # one store, made before both start
    overrides = [*QUICK, "data.limit=500", f"hydra.sweeper.n_trials={trials}"]
    if trials == 1:
        return overrides
    begun = folder / "begun"
    begun.mkdir()
    return [
        *overrides,
        "+callbacks.wait._target_=tests.probes.WaitForOtherProcess",
        f"+callbacks.wait.folder={begun}",
    ]


def assert_one_study_one_parent(folder: Path, trials: int) -> optuna.Study:
    """The study holds exactly its `trials` trials, each a child of one parent run, which the
    last process closed with the comparison of them all."""
    study = optuna.load_study(study_name="cnn_optuna", storage=journal(folder / "optuna.journal"))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == trials
    assert all(t.user_attrs.get(sharing.SURPLUS_ATTR) for t in study.trials if t not in done)
    [parent], children = parents_and_children(folder)
    assert parent.info.status == "FINISHED"
    assert study.user_attrs[sharing.PARENT_ATTR]["run_id"] == parent.info.run_id
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [t.number for t in done]
    assert [c.info.status for c in children] == ["FINISHED"] * trials
    assert parent.data.metrics["best/val/accuracy"] == study.best_value
    return study


def test_two_processes_of_the_readme_share_one_study(tmp_path, mnist_dir):
    """The README's two workers on one machine, at once, on one journal file."""
    [line] = [c for c in readme_commands(SECTION) if c.startswith("for worker in 1 2")]
    args = [*worker_args(line), *shared_search(tmp_path, trials=3)]
    with ThreadPoolExecutor(2) as pool:
        started = [
            pool.submit(cli, "runner", *args, cwd=tmp_path, mnist_dir=mnist_dir) for _ in "ab"
        ]
        results = [f.result() for f in started]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    study = assert_one_study_one_parent(tmp_path, trials=3)
    workers = {t.user_attrs[leases.WORKER_ATTR] for t in study.trials if t.state.is_finished()}
    assert len(workers) == 2, "both processes ran trials"
    assert len(list(tmp_path.glob("multirun/*/*/mlflow_sweep.json"))) == 2, "a sweep folder each"


@pytest.mark.xdist_group("slurm")
def test_a_slurm_job_array_of_the_readme_shares_one_study(slurm_cluster, tmp_path, mnist_dir):
    """The README's job array as written, but for its size: two tasks on the test cluster's
    partition without GPUs, each a worker of a search of one trial (the test above has two
    processes share the work; here one runs the trial, the other finds it taken)."""
    [line] = [c for c in readme_commands(SECTION) if c.startswith("sbatch --array=")]
    runner = shlex.quote(str(Path(sys.executable).with_name("runner")))
    overrides = " ".join(shlex.quote(a) for a in shared_search(tmp_path, trials=1))
    options = {
        "--array": "1-2",
        "--partition": slurm_cluster.partition,
        "--cpus-per-task": "1",
        "--mem": "2G",
    }
    command = ["sbatch", "--parsable"]
    for token in shlex.split(line)[1:]:
        key, _, value = token.partition("=")
        if key == "--gpus-per-node":
            continue
        if key in options:
            token = f"{key}={options.pop(key)}"
        elif token.startswith("uv run runner "):
            token = f"{token.replace('uv run runner', runner, 1)} {overrides}"
        command.append(token)
    assert not options, f"the README's sbatch line lacks {options}"
    outer = {k: v for k, v in slurm_cluster.env.items() if not k.startswith("MLFLOW_TRACKING_")}
    env = {**outer, "MNIST_DIR": str(mnist_dir)}
    submitted = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    states = slurm_cluster.final_states(job, timeout_s=300)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("slurm-*.out")))
    assert states == [f"{job}_{n} COMPLETED {slurm_cluster.partition}" for n in (1, 2)], logs
    assert_one_study_one_parent(tmp_path, trials=1)


class Shared:
    """A sweeper's `SharedParent` whose other processes are, or are not, still at work."""

    def __init__(self, others: bool):
        self.others = others

    def others_at_work(self) -> bool:
        return self.others


def test_the_last_process_to_end_closes_the_parent_failed_if_one_before_it_failed(
    in_tmp_store,
):
    """A process that fails while another works leaves the parent running, marked; the last
    process closes it, FAILED for the earlier one's failure."""
    client = mlflow.MlflowClient()
    parent = client.create_run(client.create_experiment("shared")).info.run_id
    for others, status in [(True, "FAILED"), (False, "FINISHED")]:
        process = nested_runs.NestedRuns()
        process.parent_run_id, process.shared = parent, Shared(others)
        process._finish(status)
        run = client.get_run(parent)
        assert run.info.status == ("RUNNING" if others else "FAILED")
        assert run.data.tags["error"]
