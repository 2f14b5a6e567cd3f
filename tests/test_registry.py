"""`trainer.register_as`: a run's model registered in MLflow's Model Registry, the `champion`
alias moved onto it only when it beats the model the alias holds (or when forced), a sweep's
best job registered at its end, and the commands that take `models:/NAME@ALIAS`."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from runner.cli import repro
from runner.cli.evaluate import evaluate
from runner.cli.predict import predict
from runner.cli.train import train
from runner.data import read_idx
from runner.errors import UserError
from runner.tracking import registry

from .conftest import QUICK, REPO, cli, compose_config, parents_and_children, store_client
from .test_inference import app_config

# One worker runs this file: its tests share a module-scoped store.
pytestmark = pytest.mark.xdist_group("test_registry")

NAME = "mnist-softmax"
REGISTER = [*QUICK, "trainer.log_model=true", f"trainer.register_as={NAME}"]
# A learning rate with which softmax regression learns nothing in 30 steps.
HOPELESS = "optimizer.lr=1e-7"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mnist_dir) -> Path:
    """The README's command, then a hopeless run registered under the same name in-process,
    in one folder's store: version 1 holds the alias, version 2 was refused it."""
    work = tmp_path_factory.mktemp("registry")
    result = cli("runner", *REGISTER, cwd=work, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"registered models:/{NAME}/1, now models:/{NAME}@champion" in result.stdout
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setenv("MNIST_DIR", str(mnist_dir))
        train(compose_config([*REGISTER, HOPELESS, f"tracking.uri=sqlite:///{work}/mlflow.db"]))
    return work


def versions(work: Path) -> dict[int, object]:
    client = store_client(work)
    return {int(v.version): v for v in client.search_model_versions(f"name = '{NAME}'")}


def test_a_worse_model_is_registered_but_the_alias_stays(registered):
    client = store_client(registered)
    found = versions(registered)
    assert sorted(found) == [1, 2]
    first, second = (client.get_run(found[v].run_id) for v in (1, 2))
    assert [run.data.params["optimizer.lr"] for run in (first, second)] == ["0.5", "1e-07"]
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1
    for version, run in ((found[1], first), (found[2], second)):
        assert version.tags["run_id"] == run.info.run_id
        assert version.tags["chosen_by"] == f"val/accuracy={run.data.metrics['val/accuracy']}"
    assert found[1].tags["overrides"] == " ".join(REGISTER)  # the command's
    assert first.data.metrics["val/accuracy"] > second.data.metrics["val/accuracy"]


def test_eval_predict_and_repro_take_the_alias(registered, mnist_dir, monkeypatch, capsys):
    """The alias holds version 1 (the forcing test below runs after this one)."""
    client = store_client(registered)
    champion = client.get_run(client.get_model_version_by_alias(NAME, "champion").run_id)
    assert champion.info.run_id == versions(registered)[1].run_id
    store = f"tracking.uri=sqlite:///{registered}/mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{registered}/mlflow.db")
    found = evaluate(app_config("evaluate", [f"model_uri=models:/{NAME}@champion", store]))
    assert found["accuracy"] == pytest.approx(champion.data.metrics["test/accuracy"], abs=1e-6)
    seven = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[0]  # the first test digit, a 7
    Image.fromarray(seven).save(registered / "seven.png")
    by_alias = [f"model_uri=models:/{NAME}@champion", f"images={registered}/seven.png", store]
    [(_, digit, _)] = predict(app_config("predict", by_alias))
    assert digit == 7
    monkeypatch.chdir(registered)
    # Absolute: MLflow caches a store by its URI, so a relative one could read another folder's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registered}/mlflow.db")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    repro.main([f"models:/{NAME}/1"])
    out = capsys.readouterr().out
    assert f"original run {champion.info.run_id}," in out
    assert "every metric history agrees (rtol=0.0, atol=0.0)" in out
    assert sorted(versions(registered)) == [1, 2], "a rerun registers no new version"


def serving_section() -> tuple[str, str]:
    """The README's `mlflow models serve` command and its Python client."""
    text = (REPO / "README.md").read_text().split("\n### Serving a model\n", 1)[1]
    [command] = re.findall(r"```bash\n(.*?)\n```", text.split("\n## ", 1)[0], re.S)
    [client] = re.findall(r"```python\n(.*?)```", text, re.S)
    return command, client


@contextmanager
def served(folder: Path, command: str) -> Iterator[int]:
    """The README's serve command run in `folder` as `uv run` would (the environment's bin
    first on PATH), on a free port; yields the port once the server answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv, run, *args = shlex.split(command.replace("-p 5001", f"-p {port}"))
    assert (uv, run, args[:3]) == ("uv", "run", ["mlflow", "models", "serve"]), command
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    server = subprocess.Popen(
        [str(Path(bin_dir) / args[0]), *args[1:]],
        cwd=folder,
        env={**env, "PATH": f"{bin_dir}:{env['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(server.stderr.read().decode()[-3000:]) from None
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def post(port: int, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_served_champion_classifies_the_first_test_digits(registered, mnist_dir):
    """The README's server and client: the champion's classes for the first ten test digits,
    each answer with probabilities and logits that agree with it; bad requests are told why."""
    command, client = serving_section()
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:10]
    digits = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:10]
    with served(registered, command) as port:
        result = subprocess.run(
            [sys.executable, "-c", client.replace(":5001/", f":{port}/")],
            cwd=registered,
            env={**os.environ, "MNIST_DIR": str(mnist_dir)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        classes = json.loads(result.stdout)
        # 30 steps of softmax regression: one digit of the ten, a 5, is read as a 6.
        assert sum(c == label for c, label in zip(classes, labels, strict=True)) >= 9
        status, flat = post(port, {"inputs": (digits.reshape(10, -1) / 255.0).tolist()})
        assert status == 200
        for answer, expected in zip(flat["predictions"], classes, strict=True):
            assert answer["class"] == expected
            assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5)
            assert max(range(10), key=answer["logits"].__getitem__) == expected
        for body, message in [
            ({"inputs": digits[:, :14].tolist()}, "each image must have shape (28, 28, 1) or"),
            ({"inputs": [["a"] * 784]}, "pixels must be numbers"),
            ({"inputs": []}, "the batch is empty"),
            ({"inputs": [0.0] * 784}, "send a list of images, even of one"),
            ({"inputs": [[300] * 784]}, "integer pixels must lie in 0-255"),
            ({"inputs": "hello"}, "send a list of images, not one value ('hello')"),
            ({"inputs": 5}, "send a list of images, not one value (5)"),
            (
                {"inputs": [[0.0] * 784, [0.5] * 783 + [float("nan")]]},
                "pixels must be finite numbers, but image 1 holds nan",
            ),
        ]:
            status, error = post(port, body)
            assert status == 400 and message in error["message"], (status, error)


def test_forced_the_alias_moves_to_a_worse_model(registered, mnist_dir, monkeypatch):
    monkeypatch.chdir(registered)
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    forced = [*REGISTER, HOPELESS, "trainer.register_force=true"]
    train(compose_config([*forced, f"tracking.uri=sqlite:///{registered}/mlflow.db"]))
    client = store_client(registered)
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 3


def test_registering_without_a_logged_model_is_refused_before_training(in_tmp_store):
    with pytest.raises(UserError, match=re.escape("add trainer.log_model=true")):
        train(compose_config([*QUICK, f"trainer.register_as={NAME}"]))
    client = MlflowClient(f"sqlite:///{in_tmp_store}/mlflow.db")
    assert client.search_registered_models() == []
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_sweep_registers_its_best_job(tmp_path, mnist_dir):
    """Two jobs, one that cannot learn: the other's model becomes version 1, champion, and the
    parent run names it."""
    swept = ["-m", f"optimizer.lr={HOPELESS.split('=')[1]},0.5", *REGISTER]
    result = cli("runner", *swept, cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    [parent], children = parents_and_children(tmp_path)
    [best] = [c for c in children if c.data.params["optimizer.lr"] == "0.5"]
    client = store_client(tmp_path)
    [version] = client.search_model_versions(f"name = '{NAME}'")
    assert version.run_id == best.info.run_id
    assert client.get_model_version_by_alias(NAME, "champion").version == version.version
    assert parent.data.tags["registered"] == f"models:/{NAME}/1"


def test_a_sweep_over_the_name_is_refused_before_it_starts(tmp_path, mnist_dir):
    swept = [*REGISTER[:-1], "trainer.register_as=a,b"]
    result = cli("runner", "-m", *swept, cwd=tmp_path, mnist_dir=mnist_dir, new_store=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "runner: error: trainer.register_as cannot be swept: a sweep registers its best job's "
        "model once, under one name; give it one value, or run a sweep for each"
    ]
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.glob("multirun/*/*"))


def test_better_is_lower_for_a_loss_and_higher_otherwise():
    assert registry._better(0.1, 0.2, "val/loss") and not registry._better(0.2, 0.1, "val/loss")
    assert registry._better(0.9, 0.8, "val/accuracy")
    assert not registry._better(0.8, 0.8, "val/accuracy")
