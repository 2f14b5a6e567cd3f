"""How far one seed can land from another: the TF Layers guide's recipe over many seeds, on GPU.

    KERAS_BACKEND=jax python benchmarks/layers_cnn_spread_jax.py --data DIR --seeds 0-15 --jobs 4

The runner's `layers_cnn` preset is one seed of an under-trained SGD run (lr 0.001, batch 100,
20,000 steps, dropout 0.4), so one test accuracy says little about whether the recipe meets the
guide's 97.3%. This trains the runner's own layers-CNN definition with that recipe (shuffled
epochs of the 55,000 training images) once per seed and prints the spread of test accuracy.

It runs on Keras's JAX backend so that it can use a GPU machine that has JAX but no TensorFlow
(the `device` machines here): same layers, initialisers, optimizer and loss as the runner, but
other random streams and kernels, so its figures describe the recipe, not the runner's own runs;
`reproduce_seeds.py --seeds` measures those.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, read_idx  # noqa: E402

BATCH, LR, DROPOUT, VALIDATION, TARGET = 100, 0.001, 0.4, 5_000, 0.970


def load(directory: Path) -> tuple[np.ndarray, ...]:
    """Train (the 55,000 after the first 5,000) and test pixels in [0, 1], with labels."""

    def read(name: str) -> np.ndarray:
        plain = directory / name
        return read_idx(plain if plain.exists() else directory / f"{name}.gz")

    x_train = read(TRAIN_IMAGES).reshape(-1, 784)[VALIDATION:].astype("float32") / 255
    y_train = read(TRAIN_LABELS)[VALIDATION:].astype("int32")
    x_test = read(TEST_IMAGES).reshape(-1, 784).astype("float32") / 255
    return x_train, y_train, x_test, read(TEST_LABELS).astype("int32")


def train_one(seed: int, directory: Path, steps: int) -> tuple[int, float, float]:
    """Seed, test accuracy and wall seconds of one full run of the guide's recipe."""
    import keras

    from runner.models.cnn_layers import build_cnn_layers

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load(directory)
    keras.utils.set_random_seed(seed)
    model = build_cnn_layers(DROPOUT)
    accuracy = train_and_test(
        model, keras.optimizers.SGD(LR), (x_train, y_train, x_test, y_test), BATCH, steps, seed
    )
    return seed, accuracy, time.perf_counter() - start


def train_and_test(
    model: Any, optimizer: Any, data: tuple[np.ndarray, ...], batch: int, steps: int, seed: int
) -> float:
    """Test accuracy after `steps` steps of `batch` examples, in freshly shuffled epochs."""
    import keras

    x_train, y_train, x_test, y_test = data
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    order = np.random.default_rng(seed)
    per_epoch = len(y_train) // batch
    for done in range(0, steps, per_epoch):
        take = order.permutation(len(y_train))[: min(per_epoch, steps - done) * batch]
        model.fit(x_train[take], y_train[take], batch_size=batch, shuffle=False, verbose=0)
    result = model.evaluate(x_test, y_test, batch_size=1000, verbose=0, return_dict=True)
    return result["accuracy"]


def seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of the MNIST IDX files")
    parser.add_argument("--seeds", type=seeds, default=seeds("0-7"), help="a range, as 0-7")
    parser.add_argument("--steps", type=int, default=20_000, help="the guide's 20,000")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once")
    parser.add_argument("--minutes", type=float, default=8.0, help="give up on a seed after this")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(train_one(args.one, args.data, args.steps)))
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(lambda seed: in_subprocess(seed, args), args.seeds) if r]
    print(table(sorted(results)) if results else "no seed finished")


def in_subprocess(seed: int, args: argparse.Namespace) -> tuple[int, float, float] | None:
    """One seed in its own process, so that seeds train in parallel on one GPU."""
    command = [sys.executable, __file__, "--one", str(seed), "--data", str(args.data)]
    result = json_of([*command, "--steps", str(args.steps)], f"seed {seed}", args.minutes * 60)
    if result:
        print(f"seed {seed}: {result[1]:.4f} in {result[2]:.0f} s", flush=True)
        return tuple(result)
    return None


def json_of(command: list[str], label: str, timeout_s: float) -> Any:
    """The last line `command` prints, read as JSON; None, said why, if it fails or times out.
    JAX takes GPU memory as it needs it, so that several such processes share the GPU."""
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **os.environ}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{label}: not done after {timeout_s / 60:.1f} min", flush=True)
        return None
    if done.returncode:
        print(f"{label} failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[tuple[int, float, float]]) -> str:
    accuracies = [accuracy for _, accuracy, _ in results]
    rows = "".join(f"| {s} | {a:.4f} | {w / 60:.1f} min |\n" for s, a, w in results)
    hits = sum(a >= TARGET for a in accuracies)
    return (
        f"\n| seed | test accuracy | wall time |\n|---|---|---|\n{rows}\n"
        f"{len(results)} seeds: mean {statistics.mean(accuracies):.4f}, "
        f"sd {statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0:.4f}, "
        f"min {min(accuracies):.4f}, max {max(accuracies):.4f}; "
        f"{hits} reach >= {TARGET}\n"
        f"made by: KERAS_BACKEND=jax python {' '.join(sys.argv)}"
    )


if __name__ == "__main__":
    main()
