"""Two processes on 127.0.0.1 train one model through Keras's multi-process
`keras.distribution.initialize` and JAX's CPU collectives, as docs/performance.md reports
("Several processes on JAX"): what works, and what Keras refuses (tests/jax_process.py)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "tests" / "jax_process.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def said(process: subprocess.Popen, log: Path) -> dict:
    process.wait(timeout=240)
    assert process.returncode == 0, log.read_text()[-3000:]
    return json.loads(process.stdout.read().strip().splitlines()[-1])


def test_two_processes_train_as_one_on_the_global_batches(tmp_path):
    """Each process feeds its half of every global batch (auto-sharding off): both report the
    loss of one process trained on the whole batches. Left on, auto-sharding refuses numpy
    input, as the docs quote."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    runs = [["0", str(port)], ["1", str(port)], ["alone"]]
    logs = [tmp_path / f"{args[0]}.log" for args in runs]
    started = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        for args, log in zip(runs, logs, strict=True)
    ]
    try:
        first, second, alone = (
            said(process, log) for process, log in zip(started, logs, strict=True)
        )
    finally:  # a process left waiting for its peer
        for process in started:
            process.kill()
    for each in (first, second):
        assert each["devices"] == 2 and each["local_devices"] == 1
        assert each["auto_sharded_numpy"].startswith(
            "When using a multi-worker distribution with auto-sharding enabled, the data must "
            "be provided as a `tf.data.Dataset` instance. Received: "
            "type(x)=<class 'numpy.ndarray'>."
        )
    assert second["losses"] == first["losses"]
    assert first["losses"] == pytest.approx(alone["losses"], rel=1e-5)
    assert first["losses"][-1] < first["losses"][0] / 2
