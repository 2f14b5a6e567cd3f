"""Training steps per second of the runner, of bare Keras `fit`, and of the tutorial's own loop.

    uv run python benchmarks/throughput.py                      # all models, 3 repeats
    uv run python benchmarks/throughput.py cnn_raw --repeats 5 --set trainer.jit_compile=true

Everything runs in this one process, on the same MNIST training images, at the tutorials' batch
sizes; each repeat measures the contenders one after the other, so the ratios compare figures
taken side by side. Each figure is steps per second after warm-up (the first execution, which
traces the step function, is excluded); the table gives the median over the repeats.

- runner: `runner.train.train` as `uv run runner model=NAME` would run it (callbacks, MLflow
  logging and system metrics on; scratch store), read off its own `perf/steps_per_sec`; and
  again with `trainer.steps_per_execution=1`, Keras's default, which isolates the cost of the
  runner's callbacks and logging from the gain of running several steps per call.
- bare fit: the same Keras model and optimizer, compiled with Keras defaults, `model.fit` on a
  plain batched `tf.data` pipeline with nothing else.
- tutorial: "Deep MNIST for Experts" as its text writes it, in TF1 style through
  `tf.compat.v1` (graph, placeholders, `feed_dict`, `Session.run`, `next_batch` on a shuffled
  numpy array); the CNN loop evaluates training accuracy every 100 steps, as the text does.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from reproduce_seeds import device  # noqa: E402

from runner import data, models, optim  # noqa: E402
from runner.train import compose, train  # noqa: E402

# Model: (batch size, optimizer override, steps timed per measurement, logging window).
MODELS = {
    "softmax": (100, "optimizer=sgd", 2000, 500),
    "cnn_raw": (50, "optimizer=adam", 200, 50),
    "cnn_layers": (100, "optimizer=sgd", 150, 50),
}
TUTORIAL_MODELS = ("softmax", "cnn_raw")


def runner_rate(name: str, extra: list[str]) -> float:
    batch, optimizer, steps, window = MODELS[name]
    with tempfile.TemporaryDirectory() as work:
        cfg = compose(
            [
                f"model={name}",
                optimizer,
                f"data.batch_size={batch}",
                f"trainer.steps={steps + window}",
                f"trainer.log_every={window}",
                f"trainer.eval_every={steps + window}",
                f"trainer.checkpoint_every={steps + window}",
                f"trainer.checkpoint_dir={work}/checkpoints",
                "trainer.progress_bar=false",
                "trainer.log_model=false",
                f"tracking_uri=sqlite:///{work}/mlflow.db",
                f"experiment_name=throughput-{name}",
                *extra,
            ]
        )
        train(cfg)
        import mlflow

        run = mlflow.last_active_run()
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "perf/steps_per_sec")
        # The first window holds the tracing; the others are steady state.
        return statistics.median(m.value for m in history if m.step > window)


def bare_fit_rate(name: str, train_split: data.Split) -> float:
    import keras
    import tensorflow as tf

    batch, optimizer, steps, _ = MODELS[name]
    cfg = compose([f"model={name}", optimizer])
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = models.build(cfg.model)
    model.compile(
        optimizer=optim.build(cfg.optimizer, 10_000),
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
    model.fit(dataset, steps_per_epoch=10, epochs=1, verbose=0, shuffle=False)  # warm-up: tracing
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return steps / (time.perf_counter() - start)


def tutorial_rate(name: str, train_split: data.Split) -> float:
    """The tutorial's TF1 loop, in a graph of its own."""
    import tensorflow as tf

    v1 = tf.compat.v1
    batch, _, steps, _ = MODELS[name]
    images, labels = train_split.x, np.eye(10, dtype=np.float32)[train_split.y]
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

            def run_steps(count: int) -> None:
                for i in range(count):
                    xs, ys = next_batch()
                    if name != "softmax" and i % 100 == 0:
                        sess.run(accuracy, feed_dict={x: xs, y_: ys, keep_prob: 1.0})
                    sess.run(train_step, feed_dict={x: xs, y_: ys, **feed_extra})

            run_steps(10)  # warm-up
            start = time.perf_counter()
            run_steps(steps)
            return steps / (time.perf_counter() - start)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="*", choices=[*MODELS, []], metavar="MODEL", help=f"of {list(MODELS)}"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="runner override, k=v")
    args = parser.parse_args()
    mnist = compose([]).data
    train_split = data.load_mnist(mnist).train
    rows = []
    for name in args.models or MODELS:
        rates: dict[str, list[float]] = {
            "runner": [],
            "runner 1": [],
            "bare fit": [],
            "tutorial": [],
        }
        for _ in range(args.repeats):
            rates["runner"].append(runner_rate(name, args.set))
            rates["runner 1"].append(
                runner_rate(name, [*args.set, "trainer.steps_per_execution=1"])
            )
            rates["bare fit"].append(bare_fit_rate(name, train_split))
            if name in TUTORIAL_MODELS:
                rates["tutorial"].append(tutorial_rate(name, train_split))
            print(name, {k: [round(r, 1) for r in v] for k, v in rates.items()}, flush=True)
        rows.append(row(name, rates))
    print(table(rows, args))


def row(name: str, rates: dict[str, list[float]]) -> str:
    median = {k: statistics.median(v) if v else None for k, v in rates.items()}

    def cell(value: float | None, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    runner, single, bare, tutorial = (
        median[k] for k in ("runner", "runner 1", "bare fit", "tutorial")
    )
    return (
        f"| {name} | {MODELS[name][0]} | {cell(runner)} | {cell(single)} | {cell(bare)} "
        f"| {cell(tutorial)} | {cell(runner / bare, 2)} | {cell(single / bare, 2)} "
        f"| {cell(tutorial and runner / tutorial, 2)} |"
    )


def table(rows: list[str], args: argparse.Namespace) -> str:
    return (
        f"\nsteps/s, median of {args.repeats}; {device()}\n\n"
        "| model | batch | runner | runner, 1 step/execution | bare fit | tutorial loop "
        "| runner/bare | runner 1/bare | runner/tutorial |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"made by: uv run python benchmarks/throughput.py {' '.join(sys.argv[1:])}"
    )


if __name__ == "__main__":
    main()
