"""hparams_search=cnn_optuna: Optuna's trials as MLflow children, and a study that resumes."""

import dataclasses
import functools
import re
import signal
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.runner_optuna import resumable_sweeper
from runner.errors import UserError
from runner.sweeps import leases, nested_runs, pruning
from runner.tracking.recorded import histories

from .conftest import PROBE, QUICK, cli, parents_and_children, store_client

# Two trials, the first with a rate that learns, the second (as TPE seeded with 10 picks them)
# with one that cannot: the median of the trials before it prunes it at its first validation.
RIGGED = [
    "-m",
    *QUICK,
    "trainer.eval_every=10",
    "hydra/sweeper=runner_optuna",
    "hydra.sweeper.storage=sqlite:///optuna.db",
    "hydra.sweeper.study_name=rigged",
    "hydra.sweeper.direction=maximize",
    "hydra.sweeper.n_jobs=1",
    "hydra.sweeper.sampler.seed=10",
    "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner,n_startup_trials:1}",
    "optimizer.lr=choice(0.5,1e-7)",
]


def test_a_hopeless_trial_is_pruned_and_the_study_resumes(tmp_path, mnist_dir):
    first = cli("runner", *RIGGED, "hydra.sweeper.n_trials=2", cwd=tmp_path, mnist_dir=mnist_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trial 1 pruned at step 10" in first.stdout
    study = optuna.load_study(study_name="rigged", storage=f"sqlite:///{tmp_path}/optuna.db")
    good, hopeless = study.trials
    assert (good.params["optimizer.lr"], hopeless.params["optimizer.lr"]) == (0.5, 1e-7)
    assert (good.state.name, hopeless.state.name) == ("COMPLETE", "PRUNED")
    assert sorted(good.intermediate_values) == [10, 20, 30]
    assert list(hopeless.intermediate_values) == [10]
    assert hopeless.intermediate_values[10] < good.intermediate_values[10]
    [parent], children = parents_and_children(tmp_path)
    runs = {c.data.tags["optuna.trial"]: c for c in children}
    assert (runs["0"].info.status, runs["1"].info.status) == ("FINISHED", "KILLED")
    assert runs["1"].data.tags["pruned_at_step"] == "10"
    assert "test/accuracy" not in runs["1"].data.metrics, "a pruned trial is not tested"
    assert runs["0"].data.metrics["val/accuracy"] == good.value
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.best_run_id"] == runs["0"].info.run_id

    # A trial left RUNNING by a search process on this machine that died after its job's run
    # had ended (the run of trial 0 stands for it): taken over first, its run's result stands.
    host = leases.this_worker().rpartition(":")[0]
    left = study.ask({"optimizer.lr": CategoricalDistribution([0.5, 1e-7])})
    left.set_user_attr(leases.WORKER_ATTR, f"{host}:{2**22 + 1}")  # above pid_max
    attempt = pruning.Attempt(runs["0"].info.run_id, str(tmp_path / "gone"))
    left.set_user_attr(pruning.ATTEMPT_ATTR, dataclasses.asdict(attempt))
    again = cli("runner", *RIGGED, "hydra.sweeper.n_trials=3", cwd=tmp_path, mnist_dir=mnist_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 3 trials finished, 1 left running by workers that are gone" in again.stdout
    assert "trial 2: its workers are gone; carrying it on" in again.stdout
    assert f"trial 2: its run {attempt.run_id} had ended; its result stands" in again.stdout
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert study.trials[2].value == good.value
    parents, children = parents_and_children(tmp_path)
    assert len(parents) == 2 and len(children) == 2, "nothing trained again"
    assert all(p.info.status == "FINISHED" for p in parents)


# One point searched, so both trials train alike: the second is the first left alone. A
# checkpoint every 10 steps of 30, 5 steps an execution, and a callback that kills the search
# at a chosen step (tests.probes.SignalAt, idle unless asked).
KILLABLE = [
    "-m",
    *QUICK,
    "trainer.checkpoint_every=10",
    "device.steps_per_execution=5",
    "+callbacks.signal._target_=tests.probes.SignalAt",
    "hydra/sweeper=runner_optuna",
    "hydra.sweeper.storage=journal:optuna.journal",
    "hydra.sweeper.study_name=killed",
    "hydra.sweeper.direction=maximize",
    "hydra.sweeper.n_trials=2",
    "hydra.sweeper.n_jobs=1",
    "optimizer.lr=choice(0.5)",
]


def test_a_search_stopped_then_killed_mid_trial_carries_the_trial_on_from_its_checkpoint(
    tmp_path, mnist_dir
):
    """Ctrl-C at step 5 of trial 0 stops the search at step 10, a checkpoint written, the trial
    left RUNNING with its lease given up. The command again takes it over from step 10, and is
    killed -9 at step 25 (checkpoint at 20): the trial, its run and the parent stay RUNNING. The
    command once more takes it over from step 20: the trial keeps its number and its MLflow run,
    each step logged once, and ends as the second trial, which no one stopped, ends."""

    def search(signal_at: str, code: int) -> str:
        env = {**PROBE, "RUNNER_TEST_SIGNAL": signal_at}
        done = cli("runner", *KILLABLE, cwd=tmp_path, mnist_dir=mnist_dir, env=env)
        assert done.returncode == code, done.stderr[-3000:]
        return done.stdout + done.stderr

    storage = pruning.open_storage(f"journal:{tmp_path / 'optuna.journal'}")
    said = search("INT@5", 128 + signal.SIGINT)
    assert "run the search's command again: it carries this trial on from here first" in said
    study = optuna.load_study(study_name="killed", storage=storage)
    [stopped] = study.trials
    assert stopped.state.name == "RUNNING" and stopped.user_attrs[leases.LEASE_ATTR] == 0
    assert stopped.user_attrs[leases.JOB_WORKER_ATTR] is None, "the job's process let it go"
    [child] = parents_and_children(tmp_path)[1]
    assert child.info.status == "KILLED"

    said = search("KILL@25", -signal.SIGKILL)
    assert "0 of 2 trials finished, 1 left running by workers that are gone" in said
    assert "trial 0: its workers are gone; carrying it on" in said
    assert f"resuming from step 10 of run {child.info.run_id}" in said

    said = search("", 0)
    assert f"resuming from step 20 of run {child.info.run_id}" in said
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert study.trials[0].value == study.trials[1].value
    marks = {t.user_attrs["runner.worker"] for t in study.trials}
    marks |= {t.user_attrs[pruning.ATTEMPT_ATTR]["worker"] for t in study.trials}
    assert len(marks) == 1, "the basic launcher runs each trial in the search's own process"
    parents, children = parents_and_children(tmp_path)
    # The stopped search's parent ended FAILED; the killed one's, left RUNNING, was joined by
    # the last search, which ended it.
    assert sorted(p.info.status for p in parents) == ["FAILED", "FINISHED"]
    runs = {c.data.tags["optuna.trial"]: c for c in children}
    assert runs["0"].info.run_id == child.info.run_id and len(runs) == 2
    assert [r.info.status for r in runs.values()] == ["FINISHED", "FINISHED"]
    client = store_client(tmp_path)
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
    assert steps == [10, 20, 30], "each step logged once"
    assert histories(client, runs["0"]) == histories(client, runs["1"])


def test_a_trial_carried_on_reports_only_the_validations_it_had_not():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = pruning.Trial(study.ask(), lease_s=60, reported=frozenset({10}))
    try:
        assert trial.report(0.1, 10) is False, "reported by the job before: not again"
        assert study.trials[0].intermediate_values == {}
        assert study.trials[0].user_attrs[leases.JOB_WORKER_ATTR] == leases.this_worker()
        assert trial.report(0.1, 20) is True
        assert study.trials[0].intermediate_values == {20: 0.1}
    finally:
        trial.close()
    assert study.trials[0].user_attrs[leases.JOB_WORKER_ATTR] is None


def test_pruners_by_name_and_a_misspelt_one():
    assert pruning.build_pruner("none") is None
    assert type(pruning.build_pruner("median")).__name__ == "MedianPruner"
    assert type(pruning.build_pruner("hyperband")).__name__ == "HyperbandPruner"
    with pytest.raises(UserError, match=r"pruner=medain is not none, median or hyperband"):
        pruning.build_pruner("medain")


@pytest.mark.parametrize(
    ("metric", "storage", "directions", "message"),
    [
        ("test/accuracy", "sqlite:///optuna.db", ["maximize"], "optimize a val/ one"),
        ("val/accuracy", None, ["maximize"], "hydra.sweeper.storage=sqlite:///optuna.db"),
        ("val/loss", "sqlite:///optuna.db", ["minimize"] * 2, "give hydra.sweeper.direction one"),
    ],
)
def test_a_pruner_is_refused_where_trials_could_not_report(metric, storage, directions, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resumable_sweeper._checked_pruner("median", metric, storage, "s", directions)
    assert resumable_sweeper._checked_pruner("none", metric, storage, "s", directions) is None


def test_a_grid_search_that_runs_out_of_points_is_told_its_last_trial():
    """GridSampler stops the study after its last point, which outside `optimize` raises."""

    def last_point() -> tuple[optuna.Study, optuna.Trial]:
        study = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [1]}))
        return study, study.ask({"x": optuna.distributions.CategoricalDistribution([1])})

    study, trial = last_point()
    with pytest.raises(RuntimeError, match="Study.stop"):
        study.tell(trial, 1.0)
    study, trial = last_point()
    resumable_sweeper._tell(study, trial, True, values=[1.0], state=TrialState.COMPLETE)
    assert study.trials[0].state == TrialState.COMPLETE


def test_the_search_space_speaks_hydras_sweep_syntax():
    """hydra.sweeper.params, then the command line's sweeps; a key set to one value is fixed."""
    params = {
        "a": "choice(50, 100)",
        "b": "range(1, 10, 3)",
        "c": "interval(0.3, 0.9)",
        "d": "tag(log, interval(1e-4, 1e-2))",
        "e": "interval(1, 8)",
        "f": "range(0.0, 1.0, 0.25)",
    }
    arguments = ["a=choice(1,2)", "model=cnn_raw", "c=0.5", "+g=x y"]
    space, fixed = resumable_sweeper.search_space(OmegaConf.create(params), arguments)
    assert list(space.items()) == [
        ("a", CategoricalDistribution([1, 2])),
        ("b", IntDistribution(1, 10, step=3)),
        ("d", FloatDistribution(1e-4, 1e-2, log=True)),
        ("e", FloatDistribution(1, 8)),
        ("f", FloatDistribution(0.0, 1.0, step=0.25)),
    ]
    assert {key: o.input_line for key, o in fixed.items()} == {
        "model": "model=cnn_raw",
        "c": "c=0.5",
        "+g": "+g=x y",
    }


def test_a_grid_search_takes_its_grid_from_the_space_and_refuses_intervals():
    space, _ = resumable_sweeper.search_space(None, ["a=choice(x,y)", "b=range(1,10,3)"])
    partial = functools.partial(optuna.samplers.GridSampler, seed=0)
    sampler, points = resumable_sweeper._with_grid(partial, space)
    assert isinstance(sampler, optuna.samplers.GridSampler) and points == 6  # b: 1, 4, 7
    space, _ = resumable_sweeper.search_space(None, ["a=choice(x,y)", "c=interval(0,1)"])
    with pytest.raises(UserError, match=re.escape("give c as choice(...) or range(...)")):
        resumable_sweeper._with_grid(partial, space)
    assert resumable_sweeper._with_grid("tpe", space) == ("tpe", None)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # Optuna's note on the old class
def test_a_study_begun_by_hydras_optuna_sweeper_is_refused_in_one_line(tmp_path):
    """That plugin stored Optuna 2's distribution classes, which Optuna's storages refuse to mix
    with today's for one parameter: a search could not add a trial."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="old", storage=storage)
    trial = study.ask()  # as that plugin suggested it:
    trial._suggest("optimizer.lr", optuna.distributions.LogUniformDistribution(1e-4, 1e-2))
    study.tell(trial, 0.9)
    with pytest.raises(ValueError, match="different distribution kind"):
        study.ask().suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
    with pytest.raises(UserError, match=r"stored optimizer.lr in a form Optuna no longer adds"):
        resumable_sweeper._checked_study("old", storage, {})


def test_a_direction_that_is_not_minimize_or_maximize_is_refused():
    assert resumable_sweeper._directions("maximize") == ["maximize"]
    both = OmegaConf.create(["minimize", "maximize"])
    assert resumable_sweeper._directions(both) == ["minimize", "maximize"]
    with pytest.raises(UserError, match=r"direction=maximise is not minimize or maximize"):
        resumable_sweeper._directions(["minimize", "maximise"])


def suggest_w(config, trial) -> None:
    """A hydra.sweeper.custom_search_space: one more parameter."""
    trial.suggest_int("w", 0, 3)


class Launcher:
    """Runs each batch of jobs at once, each returning its x, or failing with `error`; safe to
    call from several threads, as the sweeper's slots do."""

    def __init__(self, error: Exception | None = None):
        self.batches: list[tuple[list[list[str]], int]] = []
        self.error = error
        self.lock = threading.Lock()

    def launch(self, overrides, initial_job_idx: int) -> list[JobReturn]:
        with self.lock:
            self.batches.append(([list(job) for job in overrides], initial_job_idx))
        if self.error:
            return [JobReturn(status=JobStatus.FAILED, _return_value=self.error) for _ in overrides]
        return [
            JobReturn(status=JobStatus.COMPLETED, _return_value=float(job[1].split("=")[1]))
            for job in overrides
        ]


def sweeper(tmp_path, storage, n_trials: int, launcher: Launcher):
    """The runner's sweeper of n_jobs=2 on `storage`, its search on z and x, launching there."""
    arguments = ["x=range(0,10)", "seed=3"]
    hydra = {"overrides": {"task": arguments}, "sweeper": {"params": {"z": "choice(1,2)"}}}
    hydra |= {"sweep": {"dir": str(tmp_path)}, "runtime": {"cwd": str(tmp_path)}}
    search = resumable_sweeper.ResumableOptunaSweeper(
        sampler=optuna.samplers.RandomSampler(seed=0),
        direction="maximize",
        storage=storage,
        study_name="s",
        n_trials=n_trials,
        n_jobs=2,
        max_failure_rate=0.0,
        params=OmegaConf.create(hydra["sweeper"]["params"]),
        custom_search_space="tests.test_optuna.suggest_w",
    )
    search.config = OmegaConf.create({"optimized_metric": "val/accuracy", "hydra": hydra})
    search.launcher = launcher
    return search, arguments


def test_the_sweeper_launches_one_trial_per_slot_and_resumes(tmp_path):
    storage = optuna.storages.InMemoryStorage()
    launcher = Launcher()
    search, arguments = sweeper(tmp_path, storage, 5, launcher)
    search.sweep(arguments)
    assert sorted((len(jobs), first) for jobs, first in launcher.batches) == [
        (1, n) for n in range(5)
    ]
    for jobs, _ in launcher.batches:
        for job in jobs:
            assert [o.split("=")[0] for o in job] == ["z", "x", "w", "seed"] and job[-1] == "seed=3"
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert [t.user_attrs["runner.job"] for t in study.trials] == [
        f"{tmp_path}#{n}" for n in range(5)
    ]
    assert all(t.value == t.params["x"] for t in study.trials)
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.best_value == max(t.value for t in study.trials)

    launcher = Launcher()
    search, arguments = sweeper(tmp_path, storage, 7, launcher)
    search.sweep(arguments)
    assert sorted((len(jobs), first) for jobs, first in launcher.batches) == [(1, 0), (1, 1)]
    assert len(study.trials) == 7

    # A failed job stops the sweep (max_failure_rate=0): a trial the other slot had begun
    # ends, no other begins.
    search, arguments = sweeper(tmp_path, storage, 11, Launcher(RuntimeError("job failed")))
    with pytest.raises(RuntimeError, match="job failed"):
        search.sweep(arguments)
    failed = [t.state for t in study.trials][7:]
    assert failed in ([TrialState.FAIL], [TrialState.FAIL] * 2)

    # So does a job the launcher lost, raising its error: its trial is failed, not left running.
    search, arguments = sweeper(tmp_path, storage, 8, Lost())
    with pytest.raises(RuntimeError, match="job lost"):
        search.sweep(arguments)
    assert [t.state for t in study.trials][7 + len(failed) :] == [TrialState.FAIL]


class Lost(Launcher):
    def launch(self, overrides, initial_job_idx: int) -> list[JobReturn]:
        raise RuntimeError("job lost")


class Unequal(Launcher):
    """Job 0 lasts until job 3 has started (or 5 s), and 0.2 s more; the others end at once.
    Counts the jobs running at a time."""

    def __init__(self):
        super().__init__()
        self.third = threading.Event()
        self.running = self.most = 0
        self.waited_in_vain = False

    def launch(self, overrides, initial_job_idx: int) -> list[JobReturn]:
        with self.lock:
            self.running += len(overrides)
            self.most = max(self.most, self.running)
        if initial_job_idx + len(overrides) > 3:
            self.third.set()
        if initial_job_idx == 0:
            self.waited_in_vain = not self.third.wait(5)
        time.sleep(0.2 if initial_job_idx == 0 else 0.01)
        with self.lock:
            self.running -= len(overrides)
        return super().launch(overrides, initial_job_idx)


def test_a_slot_asks_for_its_next_trial_without_waiting_for_the_others(tmp_path):
    """No barrier: while job 0 runs, the other slot runs jobs 1, 2 and 3, each told to the
    study as it ends; never more than n_jobs=2 at once, and exactly n_trials of them."""
    storage = optuna.storages.InMemoryStorage()
    launcher = Unequal()
    search, arguments = sweeper(tmp_path, storage, 5, launcher)
    search.sweep(arguments)
    assert not launcher.waited_in_vain, "job 3 waited for job 0 to end"
    assert launcher.most == 2
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert sorted(t.user_attrs["runner.job"] for t in study.trials) == [
        f"{tmp_path}#{n}" for n in range(5)
    ]
    ended_first = [t.number for t in sorted(study.trials, key=lambda t: t.datetime_complete)]
    assert {1, 2, 3} <= set(ended_first[: ended_first.index(0)])  # told as they ended


def test_joblib_slots_start_a_trial_while_a_longer_one_runs(tmp_path, mnist_dir):
    """Two slots on two joblib workers."""
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    study = sweep_of_unequal_trials(tmp_path, mnist_dir, launcher)
    [search] = {t.user_attrs[leases.WORKER_ATTR] for t in study.trials}
    jobs = {t.user_attrs[pruning.ATTEMPT_ATTR]["worker"] for t in study.trials}
    assert len(jobs) == 2, "joblib's two workers ran the three trials: started once each"
    assert search not in jobs


def sweep_of_unequal_trials(
    tmp_path: Path, mnist_dir: Path, launcher: list[str], env: dict[str, str] | None = None
) -> optuna.Study:
    """Three trials in two slots on `launcher`, trial 0 held until trial 2 has begun
    (`tests.probes.WaitForJob`): trial 2 starts in the slot trial 1 freed, while trial 0 runs,
    where batches would have waited for trial 0. The study, the sweep's results and its parent
    run still hold exactly the three trials; the study is returned."""
    begun = tmp_path / "begun"
    begun.mkdir()
    result = cli(
        "runner",
        "-m",
        *QUICK,
        *launcher,
        "hydra/sweeper=runner_optuna",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.study_name=slots",
        "hydra.sweeper.direction=maximize",
        "optimizer.lr=interval(0.01,0.1)",
        "+callbacks.wait._target_=tests.probes.WaitForJob",
        f"+callbacks.wait.folder={begun}",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [parent], children = parents_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED"] * 3
    *earlier, last = sorted(children, key=lambda c: c.info.start_time)
    assert min(c.info.end_time for c in earlier) <= last.info.start_time  # a slot freed
    assert last.info.start_time < max(c.info.end_time for c in earlier), "it waited for a batch"
    study = optuna.load_study(study_name="slots", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [(t.number, t.state) for t in study.trials] == [
        (n, TrialState.COMPLETE) for n in range(3)
    ]
    assert len({t.user_attrs["runner.job"] for t in study.trials}) == 3
    return study
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_value == study.best_value
    best = {c.info.run_id: c for c in children}[parent.data.tags["sweep.best_run_id"]]
    assert best.data.metrics["val/accuracy"] == study.best_value


def test_a_pruned_child_is_never_the_sweeps_best(in_tmp_store):
    """Even one whose last validation beats the finished children's."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("pruned")
    parent = client.create_run(experiment).info.run_id
    ids = {}
    for status, accuracy in [("FINISHED", 0.8), ("KILLED", 0.9)]:
        child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_metric(child, "val/accuracy", accuracy)
        client.set_terminated(child, status)
        ids[status] = child
    nested_runs.summarize(client, parent, "val/accuracy")
    tags, metrics = client.get_run(parent).data.tags, client.get_run(parent).data.metrics
    assert tags["sweep.best_run_id"] == ids["FINISHED"]
    assert metrics["best/val/accuracy"] == 0.8


# A tiny search: one trial of a few steps.
TINY = [
    "hparams_search=cnn_optuna",
    "trainer.steps=20",
    "trainer.log_every=10",
    "trainer.eval_every=20",
    "trainer.progress_bar=false",
    "data.limit=500",
    "hydra.sweeper.n_trials=1",
]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A folder holding a completed tiny search: its study in optuna.db, its runs in mlflow.db."""
    folder = tmp_path_factory.mktemp("searched")
    done = cli("runner", *TINY, cwd=folder, mnist_dir=mnist_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FutureWarning" not in done.stderr  # Optuna's notes on the plugin's old API
    return folder


def run_ids(folder: Path) -> set[str]:
    client = store_client(folder)
    experiment = client.get_experiment_by_name("mnist").experiment_id
    return {r.info.run_id for r in client.search_runs([experiment])}


def sweep_folders(folder: Path) -> list[Path]:
    return sorted((folder / "multirun").glob("*/*"))


def test_the_cnn_search_reports_each_validation_of_its_trial(searched):
    """cnn_optuna searches cnn_raw's rate, batch and dropout, its trials reporting to a median
    pruner, which prunes nothing before five trials."""
    study = optuna.load_study(study_name="cnn_optuna", storage=f"sqlite:///{searched}/optuna.db")
    [trial] = study.trials
    assert trial.state.name == "COMPLETE" and trial.params["data.batch_size"] in (50, 100, 200)
    assert set(trial.params) == {"optimizer.lr", "data.batch_size", "model.keep_prob"}
    assert trial.intermediate_values == {20: trial.value}
    [parent], [child] = parents_and_children(searched)
    assert child.data.params["model.name"] == "cnn_raw"
    assert child.data.metrics["val/accuracy"] == trial.value


def test_a_study_refuses_other_settings_than_it_was_started_with(searched, mnist_dir):
    before, folders = run_ids(searched), sweep_folders(searched)
    other = [o for o in TINY if not o.startswith(("trainer.steps=", "data.limit="))]
    result = cli(
        "runner", *other, "trainer.steps=30", "data.limit=600", cwd=searched, mnist_dir=mnist_dir
    )
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert line.startswith("runner: error: study 'cnn_optuna'"), line
    for then, now in [
        ("data.limit=500", "data.limit=600"),
        ("trainer.steps=20", "trainer.steps=30"),
    ]:
        assert then in line and now in line and line.index(then) < line.index(now), line
    assert "hydra.sweeper.study_name=" in line
    assert run_ids(searched) == before
    assert sweep_folders(searched) == folders, "no empty sweep folder left behind"
    study = optuna.load_study(study_name="cnn_optuna", storage=f"sqlite:///{searched}/optuna.db")
    assert len(study.trials) == 1


def test_a_completed_study_run_again_says_so_and_leaves_no_empty_parent(searched, mnist_dir):
    before, folders = run_ids(searched), sweep_folders(searched)
    again = cli("runner", *TINY, cwd=searched, mnist_dir=mnist_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study 'cnn_optuna' already has its 1 finished trial" in again.stdout
    assert "raise hydra.sweeper.n_trials to run more" in again.stdout
    assert run_ids(searched) == before
    assert sweep_folders(searched) == folders
    compared = cli("runner-compare", cwd=searched, mnist_dir=mnist_dir)
    assert compared.returncode == 0, compared.stderr
