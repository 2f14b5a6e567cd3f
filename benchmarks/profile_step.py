"""Where the raw-ops CNN's training step spends its time: TensorFlow's profiler, per op.

    uv run python benchmarks/profile_step.py            # the runner's model, as bare fit runs it
    uv run python benchmarks/profile_step.py tutorial   # the tutorial's TF1 loop

Profiles 200 steps after warm-up and prints, for the ops that took longest, the milliseconds a
step summed over TensorFlow's compute threads (ops running side by side each count in full).
"""

import collections
import glob
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import throughput  # noqa: E402

from runner import data  # noqa: E402
from runner.cli.train import compose  # noqa: E402
from runner.config.settings import check_config  # noqa: E402

STEPS = 200


def profile(which: str, logdir: str) -> None:
    import tensorflow as tf

    split = data.load(compose([]).data, check_config(compose([])).data).train
    if which == "tutorial":
        # Three 100-step windows: the first warms up; the loop starts its clock when the second
        # begins, and the profiler with it.
        throughput.MODELS["cnn_raw"] = (50, "optimizer=adam", STEPS // throughput.WINDOW)
        window_timer = throughput.time.perf_counter
        calls = 0

        def start_with_the_clock() -> float:
            nonlocal calls
            calls += 1
            if calls == 1:
                tf.profiler.experimental.start(logdir)
            return window_timer()

        throughput.time.perf_counter = start_with_the_clock
        throughput.tutorial_rate("cnn_raw", split)
    else:
        # Two windows each time: the timing needs two window ends.
        throughput.MODELS["cnn_raw"] = (50, "optimizer=adam", STEPS // throughput.WINDOW - 1)
        throughput.bare_fit_rate("cnn_raw", [], split)  # warm-up: traces the step
        tf.profiler.experimental.start(logdir)
        throughput.bare_fit_rate("cnn_raw", [], split)
    tf.profiler.experimental.stop()


def op_times(logdir: str) -> collections.Counter:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    [path] = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(path).read_bytes())
    [host] = [plane for plane in space.planes if plane.name == "/host:CPU"]
    totals = collections.Counter()
    for line in host.lines:
        if not line.name.startswith("tf_Compute"):
            continue
        for event in line.events:
            name = host.event_metadata[event.metadata_id].name
            if ":" in name and "::" not in name:  # "scope/name:OpType", not "ExecutorState::"
                totals[name.split("StatefulPartitionedCall/")[-1]] += event.duration_ps / 1e9
    return totals


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "runner"
    with tempfile.TemporaryDirectory() as logdir:
        profile(which, logdir)
        totals = op_times(logdir)
    print(f"\nms per step over {STEPS} steps, {which}; total {sum(totals.values()) / STEPS:.1f}\n")
    print("| ms | op |\n|---|---|")
    for name, ms in totals.most_common(25):
        print(f"| {ms / STEPS:.2f} | {name} |")
    print(f"\nmade by: uv run python benchmarks/profile_step.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
