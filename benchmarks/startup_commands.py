"""How long the commands that train nothing take to answer, beside the host's matmul speed.

    uv run python benchmarks/startup_commands.py               # 5 runs a command
    uv run python benchmarks/startup_commands.py --repeats 9
    uv run python benchmarks/startup_commands.py --against main  # main's code beside today's

Each command runs as a user runs it, the script uv installed, in an empty scratch folder (so no
MLflow store is found or made). A repeat runs every command once, in an order that rotates from
one repeat to the next, so the machine's noise falls on all of them alike; the table gives each
command's median wall time and median CPU time (user and system, the command's and its
children's), the latter less sensitive to what else runs on the machine. Three floors come
first: the interpreter alone; the interpreter importing `runner.cli.train`, that is Hydra, OmegaConf
and the runner's modules, which every Hydra command of the runner imports before it reads its
arguments; and `uv run true` in the checkout, what `uv run` adds to each command typed through
it.

Each command then runs once more under a wrapper that lists which of TensorFlow, JAX, Keras,
MLflow, scikit-learn, pandas, matplotlib and NumPy it imported (none should). Beside them: the
host's speed, a 4096x4096 float32 matmul in TensorFlow (median of 5, after one warm-up, in a
process of its own), and the load averages before and after, as hosts and their loads differ
several-fold.

With `--against REF`, each run of a command is paired with a run of it on REF's `runner/` and
`conf/` (put first on the Python path; everything else, `hydra_plugins/` included, is today's),
in an order that alternates between repeats; the last column is the median CPU time's ratio.
"""

import argparse
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.backends.devices import cpu_cores  # noqa: E402
from runner.tracking.environment import cpu_model  # noqa: E402

# The goal of issue 27 for each command below: an answer within this many seconds.
GOAL_S = 1.0
# (command line, the exit status it must end with): `--help`, printing the config, and an
# argument error of each command.
COMMANDS = [
    ("runner --help", 0),
    ("runner --cfg job", 0),
    ("runner-compare --help", 0),
    ("runner-eval --help", 0),
    ("runner-predict --help", 0),
    ("runner-repro --help", 0),
    ("runner trainer.stepz=3", 1),
    ("runner model=nope", 1),
    ("runner-eval", 1),
    ("runner-predict run_id=0123abcd", 1),
    ("runner-compare --bogus", 2),
    ("runner-repro", 2),
    ("runner-repro 0123abcd --set data.dir", 1),
]
FLOORS = [
    ("python -c pass", [sys.executable, "-c", "pass"]),
    ("python -c 'import runner.cli.train'", [sys.executable, "-c", "import runner.cli.train"]),
    ("uv run true", ["uv", "run", "true"]),
]
FRAMEWORKS = ("tensorflow", "jax", "keras", "mlflow", "sklearn", "pandas", "matplotlib", "numpy")
# Runs a command's `main` as its script would, then names the frameworks it imported.
WRAPPER = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('imported:', *sorted(m for m in {frameworks!r} "
    "if m in sys.modules), file=sys.stderr))\n"
    "sys.argv[0] = {name!r}\n"
    "from {module} import {function}\n"
    "{function}()\n"
)
MATMUL = """
import os, statistics, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
n = 4096
a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
tf.matmul(a, b).numpy()
times = []
for _ in range(5):
    start = time.perf_counter()
    tf.matmul(a, b).numpy()
    times.append(time.perf_counter() - start)
print(2 * n**3 / statistics.median(times) / 1e9)
"""


def scripts() -> dict[str, str]:
    """Each command's `module:function`, as pyproject.toml's [project.scripts] names it."""
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]["scripts"]


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds, exit status and stderr of one run of `argv` in `cwd`, with the
    variables `env` set over this process's (but for MLflow's tracking settings)."""
    outer = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        argv, cwd=cwd, env={**outer, **env}, capture_output=True, text=True, timeout=120
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.returncode, result.stderr


def imported(command: str, cwd: Path, env: dict[str, str]) -> list[str]:
    """The FRAMEWORKS that `command` imported, run through WRAPPER."""
    name, *args = shlex.split(command)
    module, function = scripts()[name].split(":")
    code = WRAPPER.format(frameworks=FRAMEWORKS, name=name, module=module, function=function)
    *_, stderr = timed([sys.executable, "-c", code, *args], cwd, env)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("imported:"), stderr[-2000:]
    return last.split()[1:]


def matmul_gflops() -> float:
    """The host's float32 matmul speed in TensorFlow, GFLOP/s."""
    result = subprocess.run(
        [sys.executable, "-c", MATMUL], capture_output=True, text=True, timeout=600, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def host_line(gflops: float, load_before: tuple, load_after: tuple) -> str:
    """The date, the host, its matmul speed and its load averages around a benchmark's runs."""
    return (
        f"{date.today()}, CPU: {cpu_cores()} cores, {cpu_model()}; 4096x4096 float32 matmul in "
        f"TensorFlow: {gflops:.0f} GFLOP/s; load averages (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.2f}' for x in load_after)}"
    )


def checkout(ref: str, folder: Path, parts: tuple[str, ...] = ("runner", "conf")) -> dict[str, str]:
    """The variables that make the commands run `ref`'s runner/ and conf/ (or other `parts`),
    written into `folder`: its packages come first on the path, before the checkout's own."""
    archive = subprocess.run(
        ["git", "archive", ref, *parts], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return {"PYTHONPATH": str(folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument(
        "--against",
        metavar="REF",
        help="also time the runner/ and conf/ of this git commit or branch (`main`, say), in "
        "the same repeats, each command's run beside today's",
    )
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    rows = [(label, argv, None) for label, argv in FLOORS if shutil.which(argv[0])]
    rows += [(c, [str(bin_dir / shlex.split(c)[0]), *shlex.split(c)[1:]], s) for c, s in COMMANDS]
    load_before = os.getloadavg()
    gflops = matmul_gflops()
    with (
        tempfile.TemporaryDirectory(prefix="startup-") as scratch,
        tempfile.TemporaryDirectory(prefix="startup-code-") as code,
    ):
        versions = {"today": {}}
        if args.against:
            versions[args.against] = checkout(args.against, Path(code))
        walls = {(v, label): [] for v in versions for label, _, _ in rows}
        cpus = {(v, label): [] for v in versions for label, _, _ in rows}
        for repeat in range(args.repeats):
            shift = repeat % len(rows)
            order = list(versions) if repeat % 2 == 0 else list(reversed(versions))
            for label, argv, status in rows[shift:] + rows[:shift]:
                # uv run finds the project from its folder; the others run where nothing is.
                where = REPO if argv[0] == "uv" else Path(scratch)
                for version in order:
                    wall, cpu, returned, stderr = timed(argv, where, versions[version])
                    if status is not None and returned != status:
                        sys.exit(f"{label} ({version}) exited {returned}, not {status}:\n{stderr}")
                    walls[version, label].append(wall)
                    cpus[version, label].append(cpu)
        frameworks = {
            (v, c): imported(c, Path(scratch), env)
            for v, env in versions.items()
            for c, _ in COMMANDS
        }
        assert not any(Path(scratch).iterdir()), "a command wrote into its working folder"
    load_after = os.getloadavg()

    print(host_line(gflops, load_before, load_after) + "\n")
    header = ["command", "exit", "wall s", "CPU s", f"within {GOAL_S} s", "imported"]
    for version in list(versions)[1:]:
        header += [f"{version}: wall s", "CPU s", "imported", f"CPU today/{version}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, _, status in rows:
        cells = [f"`{label}`", "" if status is None else str(status)]
        for version in versions:
            wall = statistics.median(walls[version, label])
            cpu = statistics.median(cpus[version, label])
            names = frameworks.get((version, label), [])
            shown = ", ".join(names) or ("none" if status is not None else "")
            cells += [f"{wall:.2f}", f"{cpu:.2f}"]
            if version == "today":
                cells += ["floor" if status is None else "yes" if wall <= GOAL_S else "NO", shown]
                today = cpu
            else:
                cells += [shown, f"{today / cpu:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nwall s and CPU s are medians; each run's wall seconds:\n")
    for version in versions:
        for label, _, _ in rows:
            runs = ", ".join(f"{w:.2f}" for w in walls[version, label])
            print(f"- {version}, `{label}`: {runs}")
    print(f"\nmade by: uv run python benchmarks/startup_commands.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
