"""A pruned cnn_optuna search in two slots: batch against no barrier, two workers against one.

    MNIST_DIR=/path/to/mnist uv run python benchmarks/parallel_search.py
    MNIST_DIR=/path/to/mnist uv run python benchmarks/parallel_search.py --trials 4 --steps 100
    MNIST_DIR=/path/to/mnist uv run python benchmarks/parallel_search.py --configs batch no-barrier
    MNIST_DIR=/path/to/mnist uv run python benchmarks/parallel_search.py --keep FOLDER  # kept

The same shortened `runner hparams_search=cnn_optuna` search (median pruner; --trials trials of
--steps steps, validated every --eval-every, on the first --limit examples of each split) runs
in four configurations (CONFIGS), each in a scratch folder of its own (its own study and MLflow
store), one after the other:

- batch: hydra/launcher=joblib hydra.sweeper.n_jobs=2 on the sweeper before slots that do not
  wait for each other (BATCH_REF's runner/, conf/ and hydra_plugins/, first on the path): two
  trials are launched together and the next two only once both have ended;
- no barrier: the same command on today's sweeper, each slot starting its next trial as soon as
  its own ends;
- one worker: n_jobs=1 on the basic launcher, the study in a journal file;
- two workers: that command started twice at once on one journal study.

Each job computes on --threads threads (TF_NUM_INTRAOP_THREADS and TF_NUM_INTEROP_THREADS: the
runner has no setting of its own for it), so that two jobs on two cores do not fight for them.
The study is read back from its storage: trials completed and pruned, the best val/accuracy, and
the share of the wall time during which two trials were at work at once, measured twice. "Both
running" takes each trial from the opening to the end of its MLflow run, the job's own work;
"both held" from Optuna's ask to its tell (datetime_start, datetime_complete), which the batch
sweeper tells for a whole batch once its slowest trial ends, so that there an idle slot counts
as held. The wall time is the command's (the later worker's end, for two), start-up included.
With --repeats N, the configurations run N times in alternating order and the table gives
medians. The host's 4096x4096 float32 matmul speed in TensorFlow comes first, as hosts differ.
With --keep FOLDER, the searches run in FOLDER's subfolders, kept with each worker's log.
"""

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState
from startup_commands import checkout, host_line, matmul_gflops

from runner.sweeps.pruning import open_storage

# The commit before f89fae0 ("n_jobs slots that do not wait for each other"): batches of n_jobs.
BATCH_REF = "f89fae0^"
STUDY = "cnn_optuna"
JOURNAL = "journal:optuna.journal"
# Trials at a time, in the two configurations of one search command.
SLOTS = 2
SWEEPER = "hydra_plugins.runner_optuna.resumable_sweeper"
# Two slots, each job in a joblib worker process of its own.
JOBLIB = (
    "hydra/launcher=joblib",
    f"hydra.launcher.n_jobs={SLOTS}",
    f"hydra.sweeper.n_jobs={SLOTS}",
)


@dataclass(frozen=True)
class Config:
    label: str
    overrides: tuple[str, ...]
    workers: int = 1
    batch: bool = False  # runs BATCH_REF's code


CONFIGS = {
    "batch": Config(
        f"batch: n_jobs=2, joblib, {BATCH_REF}",
        JOBLIB,
        batch=True,
    ),
    "no-barrier": Config("no barrier: n_jobs=2, joblib", JOBLIB),
    "one-worker": Config(
        "one worker: n_jobs=1, journal",
        ("hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={JOURNAL}"),
    ),
    "two-workers": Config(
        "two workers: n_jobs=1 each, one journal",
        ("hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={JOURNAL}"),
        workers=2,
    ),
}
COLUMNS = ("wall_s", "completed", "pruned", "best", "running", "held")


def search_argv(args: argparse.Namespace, config: Config) -> list[str]:
    """The command line of one worker of `config`'s search."""
    workload = [
        f"hydra.sweeper.n_trials={args.trials}",
        f"trainer.steps={args.steps}",
        f"trainer.eval_every={args.eval_every}",
    ]
    if args.limit:
        workload.append(f"data.limit={args.limit}")
    return [
        sys.executable,
        "-m",
        "runner",
        "hparams_search=cnn_optuna",
        *workload,
        *config.overrides,
    ]


def environment(threads: int, code: dict[str, str]) -> dict[str, str]:
    """The jobs' variables: this process's, but for MLflow's tracking settings (each search
    records into its own folder), with the thread limits and `code`'s path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    if threads:
        env["TF_NUM_INTRAOP_THREADS"] = env["TF_NUM_INTEROP_THREADS"] = str(threads)
    return {**env, **code}


def launch(argv: list[str], workers: int, folder: Path, env: dict[str, str]) -> float:
    """Start `workers` copies of `argv` in `folder` at once; seconds until the last one ends.
    Each writes its output to worker-N.log there, shown if it fails."""
    folder.mkdir(parents=True)
    logs = [folder / f"worker-{n}.log" for n in range(workers)]
    start = time.perf_counter()
    processes = []
    for log in logs:
        with log.open("w") as out:
            processes.append(
                subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    codes = [process.wait() for process in processes]
    wall_s = time.perf_counter() - start
    for log, code in zip(logs, codes, strict=True):
        if code:
            sys.exit(
                f"{shlex.join(argv[1:])} in {folder} exited {code}:\n{log.read_text()[-3000:]}"
            )
    return wall_s


def both_busy(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least two of `spans` (start, end) overlap."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    busy, running, since = 0.0, 0, 0.0
    for at, step in events:
        if running >= 2:
            busy += at - since
        running, since = running + step, at
    return busy


def trial_runs(folder: Path) -> list[tuple[float, float]]:
    """(start, end) in seconds of each trial's MLflow run in `folder`'s store."""
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=10_000)
    return [
        (r.info.start_time / 1000, r.info.end_time / 1000)
        for r in runs
        if "optuna.trial" in r.data.tags and r.info.end_time
    ]


def check_batches(trials: list[optuna.trial.FrozenTrial], n_jobs: int) -> None:
    """Exit unless each batch of `n_jobs` trials was asked after the previous one was told:
    the code run as the batch sweeper must be it."""
    for first in range(n_jobs, len(trials), n_jobs):
        told = max(t.datetime_complete for t in trials[first - n_jobs : first])
        asked = min(t.datetime_start for t in trials[first : first + n_jobs])
        if asked < told:
            sys.exit(f"trial {first} was asked before the batch before it ended: no barrier")


def measured(folder: Path, storage: str, wall_s: float, batch: bool) -> dict[str, float]:
    """The row of the search that ran in `folder` for `wall_s` seconds, read from its study;
    a `batch` search's is checked to have run in batches."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    if batch:
        check_batches(trials, SLOTS)
    held = [
        (t.datetime_start.timestamp(), t.datetime_complete.timestamp())
        for t in trials
        if t.datetime_start and t.datetime_complete
    ]
    states = [t.state for t in trials]
    return {
        "wall_s": wall_s,
        "completed": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "best": study.best_value,
        "running": both_busy(trial_runs(folder)) / wall_s,
        "held": both_busy(held) / wall_s,
    }


def run(args: argparse.Namespace, name: str, folder: Path, code: dict[str, str]) -> dict:
    """Run configuration `name`'s search in `folder`; its row."""
    config = CONFIGS[name]
    env = environment(args.threads, code if config.batch else {})
    wall_s = launch(search_argv(args, config), config.workers, folder, env)
    journal = f"hydra.sweeper.storage={JOURNAL}" in config.overrides
    storage = f"journal:{folder}/optuna.journal" if journal else f"sqlite:///{folder}/optuna.db"
    return measured(folder, storage, wall_s, config.batch)


def batch_code(folder: Path) -> dict[str, str]:
    """BATCH_REF's runner/, conf/ and hydra_plugins/ in `folder`, and the variables that make
    a command run them; exits unless its runner and sweeper are the ones imported there."""
    folder.mkdir()
    env = checkout(BATCH_REF, folder, ("runner", "conf", "hydra_plugins"))
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import {SWEEPER} as s, runner; print(s.__file__, runner.__file__)",
        ],
        env={**os.environ, **env},
        cwd=folder.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not all(Path(path).is_relative_to(folder) for path in found):
        sys.exit(f"{BATCH_REF}'s code is not the one imported: {', '.join(found)}")
    return env


def table(results: dict[str, list[dict]]) -> list[str]:
    """The table's lines, each cell the median over the repeats."""
    lines = [
        "| configuration | wall time | completed | pruned | best val/accuracy "
        "| both slots running | both slots held |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        m = {c: statistics.median(row[c] for row in rows) for c in COLUMNS}
        lines.append(
            f"| {CONFIGS[name].label} | {m['wall_s'] / 60:.1f} min | {m['completed']:g} "
            f"| {m['pruned']:g} | {m['best']:.4f} | {m['running']:.0%} | {m['held']:.0%} |"
        )
    return lines


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--trials", type=int, default=10, help="trials a search (default 10)")
    parser.add_argument("--steps", type=int, default=400, help="steps a trial (default 400)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps (default 100)")
    parser.add_argument(
        "--limit", type=int, default=2000, help="data.limit (default 2000; 0: all the data)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads a job (default 1; 0: TensorFlow's own)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (default 1)")
    parser.add_argument(
        "--keep", type=Path, metavar="FOLDER", help="run in FOLDER (new) and keep what ran there"
    )
    args = parser.parse_args()
    if not os.environ.get("MNIST_DIR"):
        sys.exit("MNIST_DIR is unset: set it to the folder of the MNIST IDX files")
    return args


def main() -> None:
    args = arguments()
    load_before = os.getloadavg()
    gflops = matmul_gflops()
    results = {name: [] for name in args.configs}
    if args.keep:
        args.keep.mkdir(parents=True)
        where = contextlib.nullcontext(str(args.keep.resolve()))
    else:
        where = tempfile.TemporaryDirectory(prefix="parallel-search-")
    with where as scratch:
        code = batch_code(Path(scratch, "code")) if "batch" in args.configs else {}
        for repeat in range(args.repeats):
            order = args.configs if repeat % 2 == 0 else args.configs[::-1]
            for name in order:
                folder = Path(scratch, f"{name}-{repeat}")
                results[name].append(run(args, name, folder, code))
    load_after = os.getloadavg()
    print(host_line(gflops, load_before, load_after) + "\n")
    print(
        f"{args.trials}-trial cnn_optuna search, median pruner, {args.steps} steps a trial, "
        f"validated every {args.eval_every}, data.limit={args.limit or 'null'}, "
        f"{args.threads or 'default'} thread(s) a job; "
        f"{'median of ' + str(args.repeats) + ' runs' if args.repeats > 1 else 'one run'} each\n"
    )
    print("\n".join(table(results)))
    print(f"\nmade by: uv run python benchmarks/parallel_search.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
