"""Search the schedule of the `fast_cnn` preset on a GPU: the raw-ops CNN, unchanged, trained
with Adam and a warm-up plus cosine learning rate, for several batch sizes, step counts and
peak rates; each candidate over a few seeds.

    KERAS_BACKEND=jax python benchmarks/fast_cnn_search_jax.py --data DIR --jobs 8 \\
        --grid 100:2000:2e-3 100:2000:4e-3 --seeds 0-1

A candidate is BATCH:STEPS:PEAK_LR. Like `layers_cnn_spread_jax.py` it runs the runner's own
model definition on Keras's JAX backend, so that a GPU machine without TensorFlow can explore
the schedule; the chosen candidate is then confirmed with the runner itself on the CPU
(docs/performance.md). Test accuracy depends on the schedule, not on the backend, up to seed
noise, which the seeds show.
"""

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layers_cnn_spread_jax import json_of, load, seeds, train_and_test

WARMUP_FRACTION = 0.05


def train_one(candidate: str, seed: int, directory: Path) -> dict:
    import keras

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from runner.models.cnn_raw import build_cnn_raw

    batch, steps, peak = candidate.split(":")
    batch, steps, peak = int(batch), int(steps), float(peak)
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = build_cnn_raw(keep_prob=0.5, init_stddev=0.1, bias_init=0.1)
    warmup = int(steps * WARMUP_FRACTION)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=steps - warmup,
        warmup_target=peak,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.Adam(schedule, epsilon=1e-8)
    accuracy = train_and_test(model, optimizer, load(directory), batch, steps, seed)
    return {
        "candidate": candidate,
        "seed": seed,
        "accuracy": accuracy,
        "seconds": time.perf_counter() - start,
    }


def in_subprocess(candidate: str, seed: int, args: argparse.Namespace) -> dict | None:
    command = [sys.executable, __file__, "--one", candidate, str(seed), "--data", str(args.data)]
    result = json_of(command, f"{candidate} seed {seed}", 600)
    if result:
        print(f"{candidate} seed {seed}: {result['accuracy']:.4f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of the MNIST IDX files")
    parser.add_argument("--grid", nargs="+", default=["100:2000:2e-3"], help="BATCH:STEPS:LR")
    parser.add_argument("--seeds", type=seeds, default=seeds("0-1"), help="a range, as 0-1")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_one(args.one[0], int(args.one[1]), args.data)))
        return
    work = [(candidate, seed) for candidate in args.grid for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(lambda w: in_subprocess(*w, args), work) if r]
    print(table(results))


def table(results: list[dict]) -> str:
    lines = [
        "| batch | steps | examples | peak lr | mean test accuracy | min | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for candidate in dict.fromkeys(r["candidate"] for r in results):
        accuracies = [r["accuracy"] for r in results if r["candidate"] == candidate]
        batch, steps, peak = candidate.split(":")
        lines.append(
            f"| {batch} | {steps} | {int(batch) * int(steps)} | {peak} "
            f"| {statistics.mean(accuracies):.4f} | {min(accuracies):.4f} | {len(accuracies)} |"
        )
    return "\n".join(lines) + f"\n\nmade by: KERAS_BACKEND=jax python {' '.join(sys.argv)}"


if __name__ == "__main__":
    main()
