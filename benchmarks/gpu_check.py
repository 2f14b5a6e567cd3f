"""The GPU check: the runner on an NVIDIA machine that has JAX and no TensorFlow, nor a network.

Here, once, where the package registries answer:

    python3 benchmarks/gpu_check.py wheels .whl    # what that machine lacks, as wheels
    mkdir -p .mnist && cp "$MNIST_DIR"/*-ubyte.gz .mnist/

There, with `.whl` and `.mnist` beside the checkout, one command of a few minutes:

    python3 benchmarks/gpu_check.py run --wheels .whl --data .mnist --store /tmp/store

`run` installs the wheels into a scratch folder and trains on JAX, with `device.precision=auto`
(bfloat16 from compute capability 8.0), XLA, and `device.deterministic=false` (XLA's faster GPU
kernels):

- softmax, the raw-ops CNN and the TF Layers CNN, `--steps` steps each (2,000) at their
  tutorials' batch sizes: steps/s (the median of `perf/steps_per_sec` over the windows after the
  first, which compiles), `perf/gpu_peak_mb` and the test accuracy;
- `experiment=fast_cnn` in full: its wall time, start-up included, and whether its test
  accuracy reached 0.992.

It prints the device line and a table, and records the runs in `STORE/mlflow.db`, artifacts
beside it: copy the folder back and open it with
`uv run mlflow ui --backend-store-uri sqlite:///store/mlflow.db`.

`wheels` downloads, for that machine's Python 3.12 on x86-64, the locked versions (uv.lock) of
the packages the runner imports that it lacks (its own list: `MISSING`), and checks that they
stay under 60 MiB.
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the runner imports, on JAX, that the GPU machine's image lacks. The rest is there: numpy,
# pandas, pyarrow, matplotlib, protobuf, requests, pyyaml, absl-py, rich, h5py, ml-dtypes,
# psutil, pillow, click, anyio, ... Found by training and evaluating in a Python environment
# holding only those, JAX and these wheels.
MISSING = (
    "keras",
    "namex",
    "optree",
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "submitit",
    "mlflow-skinny",
    "sqlalchemy",
    "alembic",
    "mako",
    "cryptography",
    "cffi",
    "pycparser",
    "cachetools",
    "databricks-sdk",
    "gitpython",
    "gitdb",
    "smmap",
    "sqlparse",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-proto",
    "opentelemetry-semantic-conventions",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "importlib-metadata",
    "fastapi",
    "starlette",
)
# Published as a source archive only (pure Python): built into a wheel here.
SOURCE_ONLY = ("antlr4-python3-runtime",)
PLATFORMS = (
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
LIMIT_MIB = 60
# Model: its tutorial's preset.
MODELS = {
    "softmax": "deep_mnist_softmax",
    "cnn_raw": "deep_mnist_cnn",
    "cnn_layers": "layers_cnn",
}
FAST_TARGET = 0.992


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"]}


def wheels(folder: Path, python: str) -> None:
    """Download MISSING's locked versions as wheels for CPython `python` on x86-64 Linux."""
    folder.mkdir(parents=True, exist_ok=True)
    versions = locked_versions()
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name in MISSING:
        if name in SOURCE_ONLY:
            pip = ("python3", "-m", "pip", "wheel", "--quiet", "--no-deps")
            subprocess.run(
                [*pip, "--wheel-dir", str(folder), f"{name}=={versions[name]}"], check=True
            )
            continue
        subprocess.run(
            [
                *("python3", "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--only-binary=:all:", "--python-version", python, "--implementation", "cp"),
                *platforms,
                *("--dest", str(folder), f"{name}=={versions[name]}"),
            ],
            check=True,
        )
    size = sum(f.stat().st_size for f in folder.glob("*.whl")) / 2**20
    print(f"{len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB in {folder}")
    if size > LIMIT_MIB:
        sys.exit(f"over {LIMIT_MIB} MiB: they would not travel")


def run(wheel_folder: Path, data: Path, store: Path, steps: int, fast_steps: int | None) -> None:
    """Install the wheels, train each model and fast_cnn on JAX, print the table."""
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    carried = sorted(wheel_folder.glob("*.whl"))
    if carried:  # else the packages are installed already
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"),
                *("--no-compile", "--target", str(site), *map(str, carried)),
            ],
            check=True,
        )
    sys.path.insert(0, str(site))  # MLflow's client, to read the runs back
    store.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-runs-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(site)]),
        "MNIST_DIR": str(data.resolve()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{store.resolve()}/mlflow.db",
    }
    rows, device_line = [], None
    jobs = {
        name: [f"experiment={preset}", f"trainer.steps={steps}", f"trainer.eval_every={steps}"]
        for name, preset in MODELS.items()
    }
    jobs["fast_cnn"] = ["experiment=fast_cnn"]
    if fast_steps:
        jobs["fast_cnn"] += [f"trainer.steps={fast_steps}", f"trainer.eval_every={fast_steps}"]
    for name, overrides in jobs.items():
        output, wall = train(overrides, scratch / name, env)
        device_line = device_line or re.search(r"devices: (.*)", output)[1]
        run_id = re.search(r"MLflow run ([0-9a-f]{32})", output)[1]
        rows.append((name, *measured(store, run_id), wall))
    print(f"\ndevice: {device_line}\n")
    print("| run | steps | batch | steps/s | perf/gpu_peak_mb | test accuracy | wall time |")
    print("|---|---|---|---|---|---|---|")
    for name, run_steps, batch, rate, peak, accuracy, seconds in rows:
        print(
            f"| {name} | {run_steps} | {batch} | {rate:.1f} | {peak:.0f} | {accuracy:.4f} "
            f"| {seconds:.0f} s |"
        )
    *_, accuracy, wall = rows[-1]
    verdict = "met" if accuracy >= FAST_TARGET else "MISSED"
    print(f"\nfast_cnn: {wall / 60:.1f} min to test accuracy {accuracy:.4f} (>= 0.992 {verdict})")
    print(f"runs recorded in {store}/mlflow.db")


def train(overrides: list[str], folder: Path, env: dict) -> tuple[str, float]:
    """`runner backend=jax device.precision=auto OVERRIDES`, with XLA's faster non-deterministic
    GPU kernels, its checkpoints outside the store (which is to be copied back); its output and
    wall seconds."""
    command = [
        *(sys.executable, "-m", "runner", "backend=jax", "device.precision=auto"),
        "device.deterministic=false",
        *overrides,
        *("trainer.progress_bar=false", "trainer.log_model=false", "tracking.plots=false"),
        f"hydra.run.dir={folder}",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    print(done.stdout[-2000:] + done.stderr[-2000:], flush=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed with exit code {done.returncode}")
    return done.stdout + done.stderr, wall


def measured(store: Path, run_id: str) -> tuple[int, int, float, float, float]:
    """Steps, batch, median steps/s after the first window, peak GPU MiB and test accuracy of
    run `run_id` in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store.resolve()}/mlflow.db")
    run = client.get_run(run_id)
    rates = client.get_metric_history(run.info.run_id, "perf/steps_per_sec")
    peak = run.data.metrics.get("perf/gpu_peak_mb", float("nan"))
    return (
        int(run.data.params["trainer.steps"]),
        int(run.data.params["data.batch_size"]),
        statistics.median(m.value for m in sorted(rates, key=lambda m: m.step)[1:] or rates),
        peak,
        run.data.metrics["test/accuracy"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    download = verbs.add_parser("wheels", help="download the wheels (here)")
    download.add_argument("folder", type=Path)
    download.add_argument("--python", default="3.12", help="that machine's Python (3.12)")
    check = verbs.add_parser("run", help="install them and train (there)")
    check.add_argument("--wheels", type=Path, required=True)
    check.add_argument("--data", type=Path, required=True, help="MNIST's IDX files")
    check.add_argument("--store", type=Path, required=True, help="MLflow store folder")
    check.add_argument("--steps", type=int, default=2000, help="steps of each tutorial model")
    check.add_argument("--fast-steps", type=int, help="cut fast_cnn short, to try the check")
    args = parser.parse_args()
    if args.verb == "wheels":
        wheels(args.folder, args.python)
    else:
        run(args.wheels, args.data, args.store, args.steps, args.fast_steps)
    print(f"made by: python3 benchmarks/gpu_check.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
