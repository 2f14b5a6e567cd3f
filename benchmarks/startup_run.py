"""How long a training command takes to start, beside importing the frameworks it runs on.

    uv run python benchmarks/startup_run.py                # 10 starts of each
    uv run python benchmarks/startup_run.py --repeats 5

A start of `runner debug=quick` is timed from the command's launch until it logs that its
MLflow run is open: the data is loaded, the model built and compiled, and the next thing it does
is the first training step. Beside it, in the same repeats and in alternating order, the floor:
`python -c "import keras, mlflow"` on the TensorFlow backend, which no run can beat. Each runs
in a scratch folder of its own with its own MLflow store, as a new user's first run would. The
table gives the medians, the goal of issue 27 (start-up at most 1.15 times the floor), and the
host's matmul speed, as hosts differ several-fold.

A second table splits a start into its parts, measured inside the command (PARTS: each part
ends when the runner returns from the step named; the training modules' import, when the data
starts loading), medians over the same number of starts.

The runs read a copy of $MNIST_DIR's IDX files in a scratch folder, with the arrays decoded into
their cache beside them beforehand, as a user's runs after the first find them
(`runner.data.idx_cache`); with `--no-cache`, the copy is read-only, so every start decodes the
files, as a first run, or a run on a read-only data folder, does.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from startup_commands import matmul_gflops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.backends.devices import cpu_cores  # noqa: E402
from runner.data import FILES, idx_files  # noqa: E402
from runner.tracking.environment import cpu_model  # noqa: E402

GOAL = 1.15
# What the runner logs once its MLflow run is open, just before training.
OPENED = "MLflow run "


def floor(env: dict[str, str], cwd: Path) -> float:
    """Seconds to import Keras (on TensorFlow) and MLflow in a fresh interpreter."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import keras, mlflow"],
        env=env,
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return time.perf_counter() - start


def start_up(env: dict[str, str], cwd: Path) -> float:
    """Seconds from launching `runner debug=quick` until its MLflow run is open; the command
    then runs to its end, so that every start leaves a finished run as a user's would."""
    runner = str(Path(sys.executable).parent / "runner")
    start = time.perf_counter()
    process = subprocess.Popen(
        [runner, "debug=quick", f"tracking.uri=sqlite:///{cwd}/mlflow.db"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    opened = None
    for line in process.stdout:
        if opened is None and OPENED in line:
            opened = time.perf_counter() - start
    if process.wait() != 0 or opened is None:
        sys.exit(f"`runner debug=quick` in {cwd} failed or never opened its MLflow run")
    return opened


# Run as `runner debug=quick ...` in a process of its own: the time each step of the start ends,
# from the interpreter's start, written as JSON to the file named by the first argument.
PARTS = """
import atexit, json, sys, time
start = time.perf_counter()
out, sys.argv = sys.argv[1], ["runner", *sys.argv[2:]]
marks = {}
atexit.register(lambda: open(out, "w").write(json.dumps(marks)))

def mark(name):
    marks[name] = time.perf_counter() - start

def after(owner, attribute, name):
    wrapped = getattr(owner, attribute)
    def call(*args, **kwargs):
        result = wrapped(*args, **kwargs)
        mark(name)
        return result
    setattr(owner, attribute, call)

import runner.cli.train as train
from runner import backends
mark("Python, Hydra, OmegaConf and the runner's light modules imported")


def tracking():
    from runner.tracking import runs, store

    after(store, "open_store", "MLflow imported, its store opened")
    opening = runs.mlflow_run
    def mlflow_run(*args, **kwargs):
        context = opening(*args, **kwargs)
        class Opened:
            def __enter__(self):
                recorder = context.__enter__()
                mark("MLflow run opened")
                return recorder
            def __exit__(self, *exc):
                return context.__exit__(*exc)
        return Opened()
    runs.mlflow_run = mlflow_run


def before(owner, attribute, name):
    wrapped = getattr(owner, attribute)
    def call(*args, **kwargs):
        mark(name)
        return wrapped(*args, **kwargs)
    setattr(owner, attribute, call)


def heavy():
    from runner import data
    from runner.training import modeling

    after(data, "load", "data loaded")
    before(data, "load", "the runner's training modules imported")
    after(modeling, "check_loss", "model built and compiled")


def then(owner, attribute, name, next_step):
    after(owner, attribute, name)
    wrapped = getattr(owner, attribute)
    def call(*args, **kwargs):
        result = wrapped(*args, **kwargs)
        next_step()
        return result
    setattr(owner, attribute, call)


then(train, "check_config", "config composed by Hydra and checked", tracking)
then(backends, "select", "backend chosen: TensorFlow and Keras imported", heavy)
train.main()
"""


def parts(env: dict[str, str], cwd: Path) -> dict[str, float]:
    """When each part of a start of `runner debug=quick` ends, seconds from the start."""
    out = cwd / "parts.json"
    subprocess.run(
        [
            sys.executable,
            "-c",
            PARTS,
            str(out),
            "debug=quick",
            f"tracking.uri=sqlite:///{cwd}/p.db",
        ],
        env=env,
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def data_copy(folder: Path, cache: bool) -> Path:
    """$MNIST_DIR's IDX files copied into `folder`, their arrays decoded into the cache beside
    them if `cache`, else the folder made read-only, which keeps the runner from writing one."""
    source = Path(os.environ["MNIST_DIR"])
    folder.mkdir()
    for name in FILES:
        found = next(p for p in (source / f"{name}.gz", source / name) if p.is_file())
        shutil.copyfile(found, folder / found.name)
    if cache:
        idx_files(str(folder))
    else:
        folder.chmod(0o555)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="starts of each (default 10)")
    parser.add_argument(
        "--no-cache", action="store_true", help="decode the IDX files at every start"
    )
    args = parser.parse_args()
    if "MNIST_DIR" not in os.environ:
        sys.exit("set MNIST_DIR to the folder of MNIST's IDX files")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["KERAS_BACKEND"] = "tensorflow"
    load_before = os.getloadavg()
    gflops = matmul_gflops()
    floors, starts, ends = [], [], []
    with tempfile.TemporaryDirectory(prefix="startup-run-") as scratch:
        env["MNIST_DIR"] = str(data_copy(Path(scratch) / "mnist", cache=not args.no_cache))
        for repeat in range(args.repeats):
            folder = Path(scratch) / str(repeat)
            folder.mkdir()
            pair = [("floor", floor), ("start", start_up)]
            for label, measure in pair if repeat % 2 == 0 else reversed(pair):
                (floors if label == "floor" else starts).append(measure(env, folder))
            ends.append(parts(env, folder))
    load_after = os.getloadavg()
    bare, runner = statistics.median(floors), statistics.median(starts)
    print(
        f"{date.today()}, CPU: {cpu_cores()} cores, {cpu_model()}; 4096x4096 float32 matmul in "
        f"TensorFlow: {gflops:.0f} GFLOP/s; load averages (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.2f}' for x in load_after)}; IDX files "
        f"{'decoded at each start' if args.no_cache else 'read from their decoded cache'}\n"
    )
    print("| what | median s | min s | max s |\n|---|---|---|---|")
    for label, times in (
        ('`python -c "import keras, mlflow"` (the floor)', floors),
        ("`runner debug=quick` until its MLflow run opens", starts),
    ):
        print(f"| {label} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")
    print("\n| part of a start | ends at, s (median) | takes, s |\n|---|---|---|")
    previous = 0.0
    for name in ends[0]:
        at = statistics.median(end[name] for end in ends)
        print(f"| {name} | {at:.2f} | {at - previous:.2f} |")
        previous = at
    verdict = "met" if runner <= GOAL * bare else "NOT met"
    print(f"\nstart-up / floor: {runner / bare:.2f} (goal at most {GOAL}: {verdict})")
    flags = f"--repeats {args.repeats}{' --no-cache' if args.no_cache else ''}"
    print(f"\nmade by: uv run python benchmarks/startup_run.py {flags}")


if __name__ == "__main__":
    main()
