"""The seed tutorials' presets: their settings, short runs, and the guide's probability log."""

import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from runner.backends.tensorflow import batch_indices
from runner.cli.train import train
from runner.config.settings import check_config
from runner.data import load
from runner.errors import UserError

from .conftest import QUICK, cli, compose_config, only_run

PRESETS = {
    # name: (model, output, optimizer, lr, steps, batch, loss, probabilities every)
    "deep_mnist_softmax": ("softmax", "logits", "sgd", 0.5, 1000, 100, "Sparse", 0),
    "deep_mnist_cnn": ("cnn_raw", "logits", "adam", 1e-4, 20000, 50, "Sparse", 0),
    "layers_cnn": ("cnn_layers", "logits", "sgd", 0.001, 20000, 100, "Sparse", 50),
    "deep_mnist_r": ("softmax", "probabilities", "sgd", 0.5, 1000, 100, "probabilities", 0),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_the_tutorials_values(name):
    cfg = compose_config([f"experiment={name}"])
    model, output, optimizer, lr, steps, batch, loss, every = PRESETS[name]
    assert (cfg.model.name, cfg.model.output) == (model, output)
    assert (cfg.optimizer.name, cfg.optimizer.lr) == (optimizer, lr)
    assert (cfg.trainer.steps, cfg.data.batch_size) == (steps, batch)
    assert loss in cfg.loss._target_
    assert (cfg.callbacks.probabilities.every if cfg.callbacks else 0) == every
    check_config(cfg)


@pytest.mark.parametrize(
    "override, options",
    [("experiment=deep_mnist_cnnn", "experiment"), ("hparams_search=nope", "hparams_search")],
)
@pytest.mark.parametrize("print_config", [False, True], ids=["train", "cfg-job"])
def test_a_misspelt_preset_is_refused_like_any_unknown_option(
    override, options, print_config, tmp_path, mnist_dir
):
    args = [override, *QUICK, *(["--cfg", "job"] if print_config else [])]
    result = cli("runner", *args, cwd=tmp_path, mnist_dir=mnist_dir, new_store=False)
    name = override.split("=")[1]
    assert result.returncode == 1
    assert f"Could not find '{options}/{name}'" in result.stderr
    assert f"Available options in '{options}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # neither a config printed nor a run's output
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no outputs/ folder


def test_debug_quick_shortens_a_preset_and_keeps_the_rest():
    """`debug=quick`, which the README offers to try a command and the tests use, comes after the
    presets in the defaults list, so it shortens a preset's run without changing its model."""
    cfg = compose_config(["debug=quick", "experiment=deep_mnist_cnn"])
    assert (cfg.trainer.steps, cfg.data.limit, cfg.trainer.log_model) == (30, 1000, False)
    assert (cfg.model.name, cfg.optimizer.name, cfg.data.batch_size) == ("cnn_raw", "adam", 50)
    assert compose_config(["debug=quick", "trainer.steps=20"]).trainer.steps == 20
    check_config(cfg)


def test_no_preset_is_applied_by_default():
    choices = compose_config(hydra=True).hydra.runtime.choices
    assert (choices.experiment, choices.hparams_search) == (None, None)


def test_cnn_presets_keep_the_tutorials_dropout_and_logging():
    cnn = compose_config(["experiment=deep_mnist_cnn"])
    assert cnn.model.keep_prob == 0.5 and cnn.optimizer.epsilon == 1e-8
    assert cnn.trainer.log_every == 100
    assert compose_config(["experiment=layers_cnn"]).model.dropout_rate == 0.4


def test_loss_and_model_output_must_agree():
    cfg = compose_config(["loss=cross_entropy_of_probabilities"])
    with pytest.raises(UserError, match="set model.output=probabilities"):
        check_config(cfg)


def quick(name: str, store: Path, *overrides: str) -> dict[str, float]:
    return train(
        compose_config(
            [
                f"experiment={name}",
                f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                "trainer.progress_bar=false",
                "trainer.log_model=false",
                *overrides,
            ]
        )
    )


@pytest.mark.parametrize("name", ["deep_mnist_softmax", "deep_mnist_r"])
def test_short_softmax_presets_learn(name, in_tmp_store):
    final = quick(name, in_tmp_store, "trainer.steps=300")
    assert final["test/accuracy"] >= 0.88
    assert np.isfinite(final["test/loss"])


def test_r_loss_is_the_mean_of_minus_sum_y_log_y():
    from runner.models.losses import cross_entropy_of_probabilities

    probabilities = np.array([[0.7, 0.2, 0.1] + [0.0] * 7, [0.1] * 10], np.float32)
    labels = np.array([0, 3])
    expected = -(np.log(0.7) + np.log(0.1)) / 2
    loss = keras.losses.get(cross_entropy_of_probabilities)(labels, probabilities)
    assert float(np.mean(loss)) == pytest.approx(expected, rel=1e-6)


def test_probabilities_of_the_trained_batch_are_logged(in_tmp_store, mnist_dir, caplog):
    caplog.set_level(logging.INFO, logger="runner.callbacks")
    cfg_overrides = [
        "experiment=layers_cnn",
        "trainer.steps=40",
        "trainer.log_every=20",
        "trainer.eval_every=40",
        "callbacks.probabilities.every=20",
        "callbacks.probabilities.examples=2",
        "data.limit=600",
        "optimizer.lr=0.05",
    ]
    models = []
    import runner.training.modeling as model_factory

    build = model_factory.build
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_factory, "build", lambda *a: models.append(build(*a)) or models[-1])
        train(
            compose_config(
                [
                    *cfg_overrides,
                    f"tracking.uri=sqlite:///{in_tmp_store}/m.db",
                    "trainer.progress_bar=false",
                    "trainer.log_model=false",
                ]
            )
        )
    lines = [r.getMessage() for r in caplog.records if "probabilities = [[" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["step 20", "step 40"]
    logged = np.array(_parse_rows(lines[-1]))
    assert logged.shape == (2, 10)
    np.testing.assert_allclose(logged.sum(axis=1), 1.0, atol=0.01)
    # At the last step the weights are final, so the rows can be recomputed from the batch that
    # step trained on: the 40th batch of the seeded training order.
    cfg = compose_config(cfg_overrides)
    train_split = load(cfg.data, check_config(cfg).data).train
    rows = list(batch_indices(len(train_split.y), 100, cfg.seed).take(40))[-1].numpy()[:2]
    expected = keras.ops.softmax(models[0](train_split.x[rows], training=False))
    np.testing.assert_allclose(logged, keras.ops.convert_to_numpy(expected), atol=2e-3)


def _parse_rows(line: str) -> list[list[float]]:
    body = line.split("probabilities = ")[1]
    return [[float(v) for v in row.split()] for row in body.strip("[]").split("]\n [")]


def test_fast_cnn_keeps_the_tutorial_network_and_changes_only_the_schedule():
    fast, tutorial = (compose_config([f"experiment={n}"]) for n in ("fast_cnn", "deep_mnist_cnn"))
    assert fast.model == tutorial.model
    assert (fast.optimizer.name, fast.optimizer.schedule) == ("adam", "cosine")
    assert fast.trainer.steps * fast.data.batch_size < tutorial.trainer.steps * 50 / 4
    check_config(fast)


def test_short_fast_cnn_schedule_learns(in_tmp_store):
    """Its schedule squeezed into 100 steps on 2,000 examples already gets most of the first
    2,000 test digits right (0.934)."""
    metrics = quick(
        "fast_cnn",
        in_tmp_store,
        "trainer.steps=100",
        "optimizer.warmup_steps=10",
        "data.limit=2000",
    )
    assert metrics["test/accuracy"] >= 0.92


def test_speedrun_is_the_runners_own_small_cnn_validated_only_at_the_end():
    cfg = compose_config(["experiment=speedrun"])
    assert (cfg.model.name, cfg.model._target_) == (
        "speedrun",
        "runner.models.speedrun.build_speedrun",
    )
    assert (cfg.optimizer.name, cfg.optimizer.schedule) == ("adam", "cosine")
    assert cfg.trainer.eval_every == cfg.trainer.checkpoint_every == cfg.trainer.steps
    assert compose_config(["experiment=speedrun", "trainer.steps=200"]).trainer.eval_every == 200
    check_config(cfg)


def test_short_speedrun_learns(in_tmp_store):
    """Its recipe squeezed into 100 steps on 2,000 examples already gets most of the first 2,000
    test digits right, evaluated at the end and recorded in the run, as in a full run."""
    metrics = quick(
        "speedrun",
        in_tmp_store,
        "trainer.steps=100",
        "optimizer.warmup_steps=10",
        "data.limit=2000",
    )
    assert metrics["test/accuracy"] >= 0.9
    run = only_run(in_tmp_store)
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert run.data.tags["model"] == "speedrun"
