"""Two processes on 127.0.0.1 train one model through Keras's multi-process
`keras.distribution.initialize` and JAX's CPU collectives, as docs/performance.md reports
("Several processes on JAX"): what works, and what Keras refuses (tests/jax_process.py)."""

import json
import socket
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = REPO / "tests" / "jax_process.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def said(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_processes_train_as_one_on_the_global_batches():
    """Each process feeds its half of every global batch (auto-sharding off): both report the
    loss of one process trained on the whole batches. Left on, auto-sharding refuses numpy
    input, as the docs quote."""
    port = free_port()
    started = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["0", str(port)], ["1", str(port)], ["alone"])
    ]
    try:
        first, second, alone = (said(process) for process in started)
    finally:  # a process left waiting for its peer
        for process in started:
            process.kill()
    assert first["devices"] == 2 and first["local_devices"] == 1
    assert first["auto_sharded_numpy"].startswith(
        "When using a multi-worker distribution with auto-sharding enabled, the data must be "
        "provided as a `tf.data.Dataset` instance. Received: type(x)=<class 'numpy.ndarray'>."
    )
    assert second["losses"] == first["losses"]
    assert first["losses"] == pytest.approx(alone["losses"], rel=1e-5)
    assert first["losses"][-1] < first["losses"][0] / 2
