"""Training steps per second of the runner, of bare Keras `fit`, and of the tutorial's own loop,
on TensorFlow and on JAX.

    uv run python benchmarks/throughput.py               # all models, both backends, 5 repeats
    uv run python benchmarks/throughput.py cnn_raw --repeats 7 --set device.jit_compile=true
    uv run python benchmarks/throughput.py softmax --repeats 15 --only runner "bare fit"
    uv run python benchmarks/throughput.py --backends tensorflow  # TensorFlow alone, in-process

Everything runs in this one process, on the same MNIST training images, at the tutorials' batch
sizes. Each repeat measures the contenders one after the other, in an order that rotates from
one repeat to the next, so a repeat's ratios compare figures taken side by side; the table gives
the median over repeats of each figure and of each ratio. Every contender is timed the same way:
training runs in windows of 100 steps (the runner's default `trainer.log_every`, and the
tutorial's interval between accuracy checks), the first window holds the tracing and is left
out, and a repeat's figure is the steps of the other windows over the wall time from the end of
the first to the end of the last. The time between windows counts, since the runner logs and
checkpoints there; each contender trains for 10-20 s, so that the runner's batched metric writes
(every `tracking.metrics_flush_every_s`) fall inside the timing.

That time is what the runner adds to bare fit, and a few percent of it drowns in the machine's
noise, so for the runner and bare fit the milliseconds per window are also split into the time
in executions of the training function (the same compiled step in both) and the time between
one execution's end and the next one's start (Keras's epoch bookkeeping, the callbacks, the
metric writes), median over repeats.

- runner: `runner.cli.train.train` as `uv run runner model=NAME` would run it (callbacks, MLflow
  logging and system metrics on, scratch store; one checkpoint, after the last step), timed by
  the MLflow timestamps of its windows' `train/loss`; its last window, which ends with
  validation, is left out.
- bare fit: what the runner trains, with nothing around it: the same compiled model (optimizer,
  steps per execution), the same input pipeline, and `model.fit` with a timing callback only.
  runner/bare is the cost of the runner's callbacks, logging and system metrics.
- Keras fit: the same model as a Keras user would first write it: `compile` with Keras's
  defaults (one step per execution) and a `from_tensor_slices` pipeline that shuffles examples.
- tutorial: "Deep MNIST for Experts" as its text writes it, in TF1 style through
  `tf.compat.v1` (graph, placeholders, `feed_dict`, `Session.run`, `next_batch` on a shuffled
  numpy array); the CNN loop evaluates training accuracy every 100 steps, as the text does.

Keras runs one backend a process. With both backends (the default), each repeat of a model runs
one process a backend, the TensorFlow one and the JAX one side by side, in an order that rotates
from one repeat to the next; on JAX the contenders are the runner and bare fit (Keras fit and the
TF1 tutorial are TensorFlow's). The JAX/TF columns are the medians of each repeat's ratio.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from reproduce_seeds import device  # noqa: E402

from runner import (
    backends,  # noqa: E402
    data,  # noqa: E402
)
from runner.backends import devices
from runner.cli.train import compose, train  # noqa: E402
from runner.config.settings import check_config  # noqa: E402
from runner.training import modeling, optim  # noqa: E402

NUM_CLASSES = 10  # MNIST's digits

WINDOW = 100
# Model: (batch size, optimizer override, timed windows per measurement).
MODELS = {
    "softmax": (100, "optimizer=sgd", 200),
    "cnn_raw": (50, "optimizer=adam", 4),
    "cnn_layers": (100, "optimizer=sgd", 3),
}
TUTORIAL_MODELS = ("softmax", "cnn_raw")
CONTENDERS = ("runner", "bare fit", "Keras fit", "tutorial")
SPLIT = ("runner", "bare fit")  # timed in and between executions too
# What each backend can run: Keras fit and the tutorial are written for TensorFlow.
ON = {"tensorflow": CONTENDERS, "jax": SPLIT}


def runner_config(name: str, work: str, extra: list[str]) -> object:
    batch, optimizer, windows = MODELS[name]
    steps = WINDOW * (windows + 2)  # the traced window, the timed ones, the validated one
    return compose(
        [
            f"model={name}",
            optimizer,
            f"data.batch_size={batch}",
            f"trainer.steps={steps}",
            f"trainer.log_every={WINDOW}",
            f"trainer.eval_every={steps}",
            f"trainer.checkpoint_every={steps}",
            f"trainer.checkpoint_dir={work}/checkpoints",
            "trainer.progress_bar=false",
            "trainer.log_model=false",
            f"tracking.uri=sqlite:///{work}/mlflow.db",
            f"tracking.experiment_name=throughput-{name}",
            f"backend={keras_backend()}",
            *extra,
        ]
    )


def keras_backend() -> str:
    import keras

    return keras.backend.backend()


def runner_rate(name: str, extra: list[str]) -> float:
    import mlflow

    with tempfile.TemporaryDirectory() as work:
        cfg = runner_config(name, work, extra)
        train(cfg)  # which keeps the scratch store's artifacts beside it
        run = mlflow.last_active_run()
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        windows = sorted(history, key=lambda m: m.step)
        first, last = windows[0], windows[-2]  # after the traced window; before the validated
        return (last.step - first.step) / ((last.timestamp - first.timestamp) / 1000)


def bare_fit_rate(name: str, extra: list[str], train_split: data.Split) -> float:
    import keras

    with tempfile.TemporaryDirectory() as work:
        cfg = runner_config(name, work, extra)
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    t = cfg.trainer
    backend = backends.of(keras_backend())  # main selected it
    every = [t.log_every, t.eval_every, t.checkpoint_every]
    plan = devices.plan(cfg.device, backend.detect(), every, keras_backend())
    model = modeling.build(cfg.model, train_split.x.shape[1:], NUM_CLASSES)
    own = check_config(cfg)
    optimizer = optim.build(own.options.optimizer, own.optimizer, own.trainer.steps)
    modeling.compiled(model, optimizer, own.options.loss, plan)
    dataset = backend.training_dataset(train_split, cfg.data.batch_size, cfg.seed)
    return _timed_fit(model, dataset, MODELS[name][2])


def keras_fit_rate(name: str, train_split: data.Split) -> float:
    import keras
    import tensorflow as tf

    KERAS_OPTIMIZERS = {
        "optimizer=adam": keras.optimizers.Adam,
        "optimizer=sgd": keras.optimizers.SGD,
    }
    batch, optimizer, windows = MODELS[name]
    cfg = compose([f"model={name}", optimizer])
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = modeling.build(cfg.model, train_split.x.shape[1:], NUM_CLASSES)
    model.compile(
        optimizer=KERAS_OPTIMIZERS[optimizer](learning_rate=cfg.optimizer.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((train_split.x, train_split.y))
        .shuffle(len(train_split.y), seed=0)
        .repeat()
        .batch(batch, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return _timed_fit(model, dataset, windows)


def _timed_fit(model, dataset, windows: int) -> float:
    """Steps per second over `windows` windows of `fit`, after one window of tracing."""
    import keras

    ends = []

    class WindowEnds(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    model.fit(
        dataset,
        steps_per_epoch=WINDOW,
        epochs=windows + 1,
        callbacks=[WindowEnds()],
        verbose=0,
        shuffle=False,  # the dataset shuffles itself
    )
    return windows * WINDOW / (ends[-1] - ends[0])


def tutorial_rate(name: str, train_split: data.Split) -> float:
    """The tutorial's TF1 loop, in a graph of its own."""
    import tensorflow as tf

    v1 = tf.compat.v1
    batch, _, windows = MODELS[name]
    # The tutorial's placeholders take flat rows of 784 pixels.
    images = train_split.x.reshape(len(train_split.x), -1)
    labels = np.eye(NUM_CLASSES, dtype=np.float32)[train_split.y]
    order = np.random.default_rng(0).permutation(len(labels))
    position = 0

    def next_batch():
        nonlocal order, position
        if position + batch > len(order):
            order, position = np.random.default_rng(position).permutation(len(labels)), 0
        chosen = order[position : position + batch]
        position += batch
        return images[chosen], labels[chosen]

    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(0)
        x = v1.placeholder(tf.float32, [None, 784])
        y_ = v1.placeholder(tf.float32, [None, 10])
        keep_prob = v1.placeholder(tf.float32)
        if name == "softmax":
            w, b = tf.Variable(tf.zeros([784, 10])), tf.Variable(tf.zeros([10]))
            y = tf.matmul(x, w) + b
            feed_extra = {}
            optimizer = v1.train.GradientDescentOptimizer(0.5)
        else:
            y = _tutorial_cnn(x, keep_prob)
            feed_extra = {keep_prob: 0.5}
            optimizer = v1.train.AdamOptimizer(1e-4)
        cross_entropy = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=y_, logits=y))
        train_step = optimizer.minimize(cross_entropy)
        correct = tf.equal(tf.argmax(y, 1), tf.argmax(y_, 1))
        accuracy = tf.reduce_mean(tf.cast(correct, tf.float32))
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            for w in range(windows + 1):
                if w == 1:  # the first window holds the graph's first runs
                    start = time.perf_counter()
                for i in range(WINDOW):
                    xs, ys = next_batch()
                    if name != "softmax" and i % 100 == 0:
                        sess.run(accuracy, feed_dict={x: xs, y_: ys, keep_prob: 1.0})
                    sess.run(train_step, feed_dict={x: xs, y_: ys, **feed_extra})
            return windows * WINDOW / (time.perf_counter() - start)


def _tutorial_cnn(x, keep_prob):
    import tensorflow as tf

    def weight(shape):
        return tf.Variable(tf.random.truncated_normal(shape, stddev=0.1))

    def bias(shape):
        return tf.Variable(tf.constant(0.1, shape=shape))

    def conv_pool(inputs, shape):
        conv = tf.nn.conv2d(inputs, weight(shape), strides=[1, 1, 1, 1], padding="SAME")
        relu = tf.nn.relu(conv + bias(shape[-1:]))
        return tf.nn.max_pool2d(relu, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="SAME")

    h_pool1 = conv_pool(tf.reshape(x, [-1, 28, 28, 1]), [5, 5, 1, 32])
    h_pool2 = conv_pool(h_pool1, [5, 5, 32, 64])
    flat = tf.reshape(h_pool2, [-1, 7 * 7 * 64])
    h_fc1 = tf.nn.relu(tf.matmul(flat, weight([7 * 7 * 64, 1024])) + bias([1024]))
    h_fc1_drop = tf.compat.v1.nn.dropout(h_fc1, keep_prob)
    return tf.matmul(h_fc1_drop, weight([1024, 10])) + bias([10])


class Executions:
    """Times each execution of the training function in `fit`, and each gap between one and
    the next, where Keras keeps its epoch books and the callbacks run and write. It wraps the
    hooks of `keras.callbacks.CallbackList` that bracket each execution, for every `fit` from
    then on."""

    def __init__(self) -> None:
        import keras

        self.reset()
        hooks = keras.callbacks.CallbackList
        begin, end = hooks.on_train_batch_begin, hooks.on_train_batch_end

        def on_train_batch_begin(callbacks, batch, logs=None):
            begin(callbacks, batch, logs)
            self._began = time.perf_counter()
            if self._ended is not None:
                self.gaps.append(self._began - self._ended)

        def on_train_batch_end(callbacks, batch, logs=None):
            self._ended = time.perf_counter()
            self.inside.append(self._ended - self._began)
            end(callbacks, batch, logs)

        hooks.on_train_batch_begin = on_train_batch_begin
        hooks.on_train_batch_end = on_train_batch_end

    def reset(self) -> None:
        self.inside: list[float] = []
        self.gaps: list[float] = []
        self._began = self._ended = None

    def ms_per_window(self, windows: int) -> tuple[float, float]:
        """Milliseconds per window in executions and between them, after the first window, in
        a `fit` of `windows` windows: the mean times the executions in a window."""
        executions = len(self.inside) // windows
        return tuple(
            statistics.mean(times[executions:]) * executions * 1e3
            for times in (self.inside, self.gaps)
        )


def measure(
    name: str,
    extra: list[str],
    train_split: data.Split,
    executions: Executions,
    repeat: int,
    only: list[str],
) -> dict[str, float]:
    """One repeat: every contender once, side by side, starting with the `repeat`-th; for the
    runner and bare fit, also the milliseconds per window in executions and between them."""
    windows = MODELS[name][2]
    contenders = {
        "runner": lambda: runner_rate(name, extra),
        "bare fit": lambda: bare_fit_rate(name, extra, train_split),
        "Keras fit": lambda: keras_fit_rate(name, train_split),
    }
    if name in TUTORIAL_MODELS:
        contenders["tutorial"] = lambda: tutorial_rate(name, train_split)
    on = ON[keras_backend()]
    order = [contender for contender in contenders if contender in only and contender in on]
    figures = {}
    for contender in order[repeat % len(order) :] + order[: repeat % len(order)]:
        executions.reset()
        figures[contender] = contenders[contender]()
        if contender in SPLIT:
            windows_run = windows + (2 if contender == "runner" else 1)
            inside, between = executions.ms_per_window(windows_run)
            figures[f"{contender} in"], figures[f"{contender} between"] = inside, between
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="*", choices=[*MODELS, []], metavar="MODEL", help=f"of {list(MODELS)}"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="runner override, k=v")
    parser.add_argument(
        "--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), metavar="CONTENDER"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=backends.NAMES, default=list(backends.NAMES)
    )
    parser.add_argument("--repeat-index", type=int, help=argparse.SUPPRESS)  # a child's repeat
    args = parser.parse_args()
    models = args.models or list(MODELS)
    if args.repeat_index is not None:  # a child process: one repeat of one model, as JSON
        backends.select(args.backends[0])
        figures = measure_here(models[0], args, args.repeat_index)
        print("FIGURES", json.dumps(figures), flush=True)
        return
    by_backend = {b: {name: [] for name in models} for b in args.backends}
    if args.backends == ["tensorflow"]:
        backends.select("tensorflow")
    for name in models:
        for repeat in range(args.repeats):
            rotation = args.backends[repeat % len(args.backends) :]
            for backend in rotation + args.backends[: repeat % len(args.backends)]:
                if args.backends == ["tensorflow"]:
                    figures = measure_here(name, args, repeat)
                else:
                    figures = measure_in_child(name, backend, args, repeat)
                by_backend[backend][name].append(figures)
                print(name, backend, {k: round(v, 2) for k, v in figures.items()}, flush=True)
    report(by_backend, args)


def measure_here(name: str, args: argparse.Namespace, repeat: int) -> dict[str, float]:
    train_split = data.load(compose([]).data, check_config(compose([])).data).train
    return measure(name, args.set, train_split, Executions(), repeat, args.only)


def measure_in_child(
    name: str, backend: str, args: argparse.Namespace, repeat: int
) -> dict[str, float]:
    """One repeat of `name` on `backend`, in a process of its own."""
    command = [sys.executable, __file__, name, "--backends", backend, "--repeat-index", str(repeat)]
    command += ["--only", *args.only] + [f"--set={override}" for override in args.set]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FIGURES ")]
    if done.returncode or not lines:
        sys.exit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("FIGURES "))


def report(by_backend: dict[str, dict[str, list[dict[str, float]]]], args) -> None:
    print(f"\nsteps/s, median of {args.repeats} repeats; {device()}\n")
    ratios = ("runner/bare", "runner/tutorial", "Keras fit/tutorial")
    print(markdown_header(["model", "backend", "batch", *CONTENDERS, *ratios]))
    for backend, models in by_backend.items():
        print("\n".join(median_row(name, backend, repeats) for name, repeats in models.items()))
    if set(by_backend) == set(backends.NAMES):
        print("\nJAX against TensorFlow, median of each repeat's ratio:\n")
        print(markdown_header(["model", "runner JAX/TF", "bare fit JAX/TF"]))
        for name, jax_repeats in by_backend["jax"].items():
            pairs = list(zip(jax_repeats, by_backend["tensorflow"][name], strict=True))
            cells = [
                f"{statistics.median(j[c] / t[c] for j, t in pairs):.2f}"
                if all(c in j and c in t for j, t in pairs)
                else "n/a"
                for c in SPLIT
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nEach repeat's figures (" + ", ".join(CONTENDERS) + "):\n")
    print(markdown_header(["model", "backend", *CONTENDERS]))
    for backend, models in by_backend.items():
        print("\n".join(singles_row(name, backend, repeats) for name, repeats in models.items()))
    print(f"\nms per {WINDOW}-step window in executions and between them, median of repeats:\n")
    columns = [f"{c} {part}" for c in SPLIT for part in ("in", "between")]
    extra = "runner's extra between, % of its window"
    print(markdown_header(["model", "backend", *columns, "runner/bare in", extra]))
    for backend, models in by_backend.items():
        print("\n".join(split_row(name, backend, repeats) for name, repeats in models.items()))
    print(f"\nmade by: uv run python benchmarks/throughput.py {shlex.join(sys.argv[1:])}")


def markdown_header(columns: list[str]) -> str:
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def median_row(name: str, backend: str, repeats: list[dict[str, float]]) -> str:
    """Median figures, and the median of each repeat's own ratio (figures taken side by side)."""

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "n/a"

    rates = [median([r[c] for r in repeats if c in r]) for c in CONTENDERS]
    ratios = [
        median([r[a] / r[b] for r in repeats if a in r and b in r])
        for a, b in (("runner", "bare fit"), ("runner", "tutorial"), ("Keras fit", "tutorial"))
    ]
    return f"| {name} | {backend} | {MODELS[name][0]} | " + " | ".join(rates + ratios) + " |"


def split_row(name: str, backend: str, repeats: list[dict[str, float]]) -> str:
    """Runner and bare fit, in executions and between them; runner/bare in executions (the same
    step function, so machine noise only) and the runner's extra time between executions."""
    if any(f"{contender} in" not in repeats[0] for contender in SPLIT):
        return f"| {name} | {backend} |" + " n/a |" * 6
    columns = [[r[f"{c} {part}"] for r in repeats] for c in SPLIT for part in ("in", "between")]
    columns.append([r["runner in"] / r["bare fit in"] for r in repeats])
    columns.append(
        [
            (r["runner between"] - r["bare fit between"]) / (WINDOW / r["runner"] * 1e3) * 100
            for r in repeats
        ]
    )
    medians = (statistics.median(values) for values in columns)
    return f"| {name} | {backend} | " + " | ".join(f"{m:.2f}" for m in medians) + " |"


def singles_row(name: str, backend: str, repeats: list[dict[str, float]]) -> str:
    cells = [", ".join(f"{r[c]:.1f}" for r in repeats if c in r) or "n/a" for c in CONTENDERS]
    return f"| {name} | {backend} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
