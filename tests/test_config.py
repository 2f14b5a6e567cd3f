"""The config is the interface: every option composes, and bad input fails before training."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from runner.config.schema import Config, EvaluateConf, PredictConf, keys, register_configs
from runner.config.settings import check_config
from runner.errors import UserError

from .conftest import ENTRIES, QUICK, cli, compose_config, store_client

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_hold_the_options_the_tutorials_need():
    assert options("model") == ["cnn_layers", "cnn_raw", "softmax", "speedrun"]
    assert {"sgd", "adam"} <= set(options("optimizer"))
    assert options("data") == ["fashion_mnist", "loader", "mnist", "npz"]
    assert options("loss") == ["cross_entropy_of_probabilities", "sparse_softmax_cross_entropy"]


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_option_composes_and_passes_checks(model, optimizer):
    cfg = compose_config([f"model={model}", f"optimizer={optimizer}"])
    assert cfg.model.name == model
    assert cfg.optimizer.name == optimizer
    assert cfg.optimizer.lr > 0
    assert OmegaConf.missing_keys(cfg) == set()
    check_config(cfg)


def test_every_yaml_starts_with_a_usage_comment():
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        if path.parent.name in ("experiment", "hparams_search", "debug", "model_optimizer"):
            # Hydra reads the package header only before any other comment.
            assert lines[0] == "# @package _global_", path
            lines = lines[1:]
        assert lines[0].startswith("# "), f"{path} lacks its usage comment"
        assert "uv run runner" in lines[0] or "=" in lines[0], f"{path}: say how to use it"


def _has_default(field: dataclasses.Field) -> bool:
    return field.default_factory is not dataclasses.MISSING or field.default not in (
        dataclasses.MISSING,
        MISSING,
    )


def _keys_set(path: Path) -> set[str]:
    """The keys YAML file `path` sets: its own, and the groups its defaults list picks."""
    node = yaml.safe_load(path.read_text())
    picked = {
        group.removeprefix("optional ")
        for entry in node.get("defaults", [])
        if isinstance(entry, dict)
        for group, option in entry.items()
        if option is not None and not group.startswith("override ")
    }
    return {key for key in node if key not in ("defaults", "hydra")} | picked


# Each schema the runner types a node with whole, and the YAML files that give its values.
WHOLE_NODES = [
    (Config, [CONF / "config.yaml"]),
    (EvaluateConf, [CONF / "evaluate.yaml"]),
    (PredictConf, [CONF / "predict.yaml"]),
    *(
        (field.type, sorted((CONF / field.name).glob("*.yaml")))
        for field in dataclasses.fields(Config)
        if dataclasses.is_dataclass(field.type)
    ),
]


@pytest.mark.parametrize(
    ("schema", "files"), WHOLE_NODES, ids=[schema.__name__ for schema, _ in WHOLE_NODES]
)
def test_each_runner_key_has_its_value_in_one_place(schema, files):
    """runner/config/schema.py's rule: a key a YAML file sets has no default in the schema, and a
    key no YAML file sets has one there. Written twice, the two values would drift apart."""
    defaulted = {field.name for field in dataclasses.fields(schema) if _has_default(field)}
    assert files
    for path in files:
        given = _keys_set(path) & set(keys(schema))
        twice = sorted(defaulted & given)
        assert not twice, (
            f"conf/{path.relative_to(CONF)} sets {twice}: drop their defaults in {schema.__name__}"
        )
        unset = sorted(set(keys(schema)) - defaulted - given)
        assert not unset, (
            f"neither conf/{path.relative_to(CONF)} nor {schema.__name__} gives {unset} a value"
        )


def test_defaults_match_the_tutorials():
    cfg = compose_config()
    assert (cfg.model.name, cfg.optimizer.name, cfg.optimizer.lr) == ("softmax", "sgd", 0.5)
    assert (cfg.trainer.steps, cfg.data.batch_size, cfg.trainer.log_every) == (1000, 100, 100)
    raw = compose_config(["model=cnn_raw", "optimizer=adam"])
    assert raw.model.keep_prob == 0.5 and raw.model.init_stddev == 0.1
    assert raw.optimizer.lr == 1e-4 and raw.optimizer.epsilon == 1e-8
    assert compose_config(["model=cnn_layers"]).model.dropout_rate == 0.4


def test_tracking_uri_follows_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert compose_config().tracking.uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert compose_config().tracking.uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.steps=0"], "trainer.steps=0 must be a positive integer"),
        (["data.batch_size=-5"], "data.batch_size=-5 must be a positive integer"),
        (["trainer.steps=250"], "must be a multiple of trainer.log_every=100"),
        (["trainer.eval_every=150"], "trainer.eval_every=150 must be a multiple"),
        (["optimizer.lr=0"], "optimizer.lr=0.0 must be positive"),
        (["data.limit=0"], "data.limit=0 must be positive"),
        (
            ["data.limit=50"],
            "data.limit=50 leaves fewer training examples than one batch of data.batch_size=100",
        ),
        (["optimizer.momentum=-1"], "optimizer.momentum=-1.0 must be in [0, 1]"),
        (["optimizer.momentum=1.5"], "optimizer.momentum=1.5 must be in [0, 1]"),
        (["optimizer=adam", "optimizer.beta_1=1"], "optimizer.beta_1=1.0 must be in [0, 1)"),
        (["optimizer=adam", "optimizer.beta_2=-0.1"], "optimizer.beta_2=-0.1 must be in [0, 1)"),
        (["optimizer=adam", "optimizer.epsilon=0"], "optimizer.epsilon=0.0 must be positive"),
        (["tracking.metrics_flush_every_s=-1"], "tracking.metrics_flush_every_s=-1.0 must be 0"),
        (["seed=-1"], "seed=-1 must be between 0 and 4294967295: NumPy takes no other seed"),
        (["seed=4294967296"], "seed=4294967296 must be between 0 and 4294967295"),
    ],
)
def test_check_config_names_the_bad_key(overrides, message):
    with pytest.raises(UserError) as error:
        check_config(compose_config(overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=cnn_raw", "model.keep_prob=0"],  # the integer reaches it as a float
            "model: runner.models.cnn_raw.build_cnn_raw raised ValueError: keep_prob=0.0 must be "
            "in (0, 1]",
        ),
        (["model=cnn_layers", "model.dropout_rate=1.0"], "dropout_rate=1.0 must be in [0, 1)"),
        (["model=cnn_raw", "model.keep_prob=high"], "model.keep_prob='high' is not of type float"),
        (["model=softmax", "+model.width=3"], "model.width is not a parameter of"),
        (["model.output=scores"], "model.output: Invalid value 'scores'"),
    ],
)
def test_a_model_that_cannot_build_is_one_line_naming_the_key(overrides, message):
    from runner.training import modeling

    with pytest.raises(UserError) as error:
        cfg = compose_config(overrides)
        check_config(cfg)
        modeling.build(cfg.model, (28, 28, 1), 10)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer.momentum=1", "optimizer.nesterov=true"],
        ["optimizer=adam", "optimizer.beta_1=0", "optimizer.beta_2=0", "optimizer.epsilon=1e-12"],
        ["data.limit=100"],
        ["seed=0"],
        ["seed=4294967295"],
    ],
)
def test_check_config_accepts_the_edges_of_each_range(overrides):
    check_config(compose_config(overrides))


def test_a_data_dir_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "mnist.tar").write_bytes(b"not a folder")
    cfg = compose_config([f"data.dir={tmp_path / 'mnist.tar'}"])
    with pytest.raises(UserError) as error:
        check_config(cfg)
    assert str(error.value) == (
        f"data.dir={tmp_path / 'mnist.tar'} is a file, not a folder: point it at the folder "
        f"holding the four IDX files"
    )


def test_help_lists_only_the_groups_users_pick_from(tmp_path):
    result = cli("runner", "--help", "--resolve", cwd=tmp_path, new_store=False)
    assert result.returncode == 0
    # Resolved before any run has a folder: not None/checkpoints, nor resume: 'False'.
    assert "  checkpoint_dir: <the run's folder>/checkpoints\n  resume: false\n" in result.stdout
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = [line.split(":")[0] for line in groups.splitlines() if ": " in line]
    assert listed == [
        "callbacks",
        "data",
        "debug",
        "device",
        "experiment",
        "hparams_search",
        "loss",
        "model",
        "model_optimizer",  # a model's own settings for an optimizer, picked by the two
        "optimizer",
        "tracking",
        "trainer",
    ]
    assert "schema" not in groups


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "optimizer.lrr=0.1",
            "optimizer.lrr is not a key of the config: did you mean optimizer.lr?",
        ),
        (
            "trainer.stepz=3",
            "trainer.stepz is not a key of the config: did you mean trainer.steps?",
        ),
        (
            "model.zzz=3",
            "model.zzz is not a key of the config; model's keys are _target_, name, output; "
            "to add one for its _target_: +model.zzz=VALUE",
        ),
        ("trainer.steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
        ("model=resnet", "Could not find 'model/resnet'"),
    ],
)
def test_bad_override_exits_non_zero_naming_it(override, message, tmp_path):
    result = cli("runner", override, cwd=tmp_path, new_store=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "mlflow.db").exists(), "a config error must not start an MLflow run"


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = cli("runner", "trainer.steps=-1", cwd=tmp_path, new_store=False)
    assert result.returncode == 1
    assert "runner: error: trainer.steps=-1 must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def runs_in(folder: Path) -> list:
    """Every run of every experiment in `folder`'s embedded store; none if there is no store."""
    if not (folder / "mlflow.db").exists():
        return []
    client = store_client(folder)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_limit_below_one_batch_is_refused_before_any_run(tmp_path, mnist_dir):
    result = cli("runner", *QUICK, "data.limit=50", cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 1, result.stderr
    assert (
        "runner: error: data.limit=50 leaves fewer training examples than one batch of "
        "data.batch_size=100: raise data.limit or lower data.batch_size\n"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert runs_in(tmp_path) == []


# Each command that trains nothing, as (command line, exit status, what it says): the help texts,
# the printed config, and an argument error of each command.
ANSWERED_AT_ONCE = [
    ("runner --help", 0, "== Configuration groups =="),
    ("runner --cfg job model=cnn_layers backend=jax", 0, "name: cnn_layers"),
    ("runner-compare --help", 0, "usage: runner-compare"),
    ("runner-eval --help", 0, "uv run runner-eval run_id=RUN_ID"),
    ("runner-predict --help", 0, "uv run runner-predict run_id=RUN_ID images=IMAGES"),
    ("runner-repro --help", 0, "usage: runner-repro RUN_ID"),
    ("runner trainer.stepz=3", 1, "runner: error: trainer.stepz is not a key of the config"),
    ("runner model=nope", 1, "runner: error: In 'config': Could not find 'model/nope'"),
    ("runner-eval", 1, "runner-eval: error: give exactly one of run_id="),
    ("runner-predict run_id=a", 1, "runner-predict: error: give the images to classify"),
    ("runner-compare --bogus", 2, "runner-compare: error: unrecognized arguments: --bogus"),
    ("runner-repro", 2, "runner-repro: error: give either a RUN_ID or --golden FILE"),
    ("runner-repro a --set data.dir", 1, "runner-repro: error: --set 'data.dir' is not KEY=VALUE"),
]
# Runs each command's `main` in turn in one process, as its script would, and records what it
# printed and which of the frameworks had been imported by its end.
_ONE_AFTER_ANOTHER = """
import contextlib, importlib, io, json, os, sys
frameworks = ('tensorflow', 'jax', 'keras', 'mlflow', 'sklearn', 'pandas', 'matplotlib', 'numpy')
results = []
for argv, module in json.loads(sys.argv[1]):
    os.environ.pop('HYDRA_FULL_ERROR', None)  # which each command sets, as if run alone
    sys.argv = argv
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            importlib.import_module(module).main()
            code = 0
        except SystemExit as exit:
            code = exit.code
    loaded = sorted(name for name in frameworks if name in sys.modules)
    results.append([code, out.getvalue() + err.getvalue(), loaded])
print(json.dumps(results))
"""


def test_commands_that_train_nothing_import_no_framework(tmp_path):
    """`--help`, `--cfg` and an argument error of each command answer within Hydra's start, as
    they load none of TensorFlow, JAX, Keras or MLflow (seconds), nor scikit-learn, pandas,
    matplotlib or NumPy. One process runs them all, so the first command to import one fails."""
    commands = [(line.split(), ENTRIES[line.split()[0]]) for line, _, _ in ANSWERED_AT_ONCE]
    result = subprocess.run(
        [sys.executable, "-c", _ONE_AFTER_ANOTHER, json.dumps(commands)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.splitlines()[-1])
    for (line, status, said), (code, output, loaded) in zip(ANSWERED_AT_ONCE, answers, strict=True):
        assert (code, said in output, loaded) == (status, True, []), (line, output[-2000:])
    assert "backend: jax" in answers[1][1]  # printed, not loaded
    assert list(tmp_path.iterdir()) == []


def test_hydra_reads_the_config_store_without_copying_it():
    """Hydra 1.3 deep-copies its config repository, ConfigStore included, each time it reads a
    config group: `runner --help` reads some 120, which took most of its time."""
    register_configs()
    store = ConfigStore.instance()
    assert copy.deepcopy({"store": store})["store"] is store


def test_an_unknown_optimized_metric_is_named_with_the_choices():
    with pytest.raises(UserError, match=r"optimized_metric=val/acc is not .*val/accuracy"):
        check_config(compose_config(["optimized_metric=val/acc"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+trainer.step=5",
            "trainer.step is not a setting of the runner: did you mean trainer.steps?",
        ),
        ("+seeed=1", "seeed is not a setting of the runner: did you mean seed?"),
        ("+device.precison=x", "did you mean device.precision?"),
        ("+tracking.urii=x", "did you mean tracking.uri?"),
    ],
)
def test_a_runner_key_added_with_a_plus_is_still_checked(override, message):
    """Hydra's message for a misspelt key suggests `+KEY=VALUE`, which adds it: training would
    then ignore it silently."""
    with pytest.raises(UserError) as error:
        check_config(compose_config([override]))
    assert message in str(error.value)


def test_a_yaml_of_ones_own_that_does_not_parse_is_one_line(tmp_path):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "broken.yaml").write_text("_target_: a.b\nwidth: : 3\n")
    result = cli(
        "runner",
        "--config-dir",
        "conf",
        "model=broken",
        "--cfg",
        "job",
        cwd=tmp_path,
        new_store=False,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("runner: error: mapping values are not allowed here")
    assert "broken.yaml" in line


def printed_config(argv: list[str], capsys, monkeypatch) -> str:
    """What `runner --cfg ...` prints, run in-process: it loads no backend and configures no
    logging (which `--help` does, and so runs in a process of its own)."""
    from runner.cli.train import run_hydra

    monkeypatch.setattr(sys, "argv", ["runner", *argv])
    run_hydra()
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "usage", "keys", "groups"),
    [
        (
            "runner-eval",
            "uv run runner-eval run_id=RUN_ID [KEY=VALUE ...]",
            ["run_id", "model_uri", "backend", "+data.KEY=VALUE", "tracking.uri"],
            ["data: fashion_mnist, loader, mnist, npz", "tracking: mlflow"],
        ),
        (
            "runner-predict",
            "uv run runner-predict run_id=RUN_ID images=IMAGES [KEY=VALUE ...]",
            ["run_id", "model_uri", "images", "invert", "backend", "tracking.uri"],
            ["tracking: mlflow"],
        ),
    ],
)
def test_eval_and_predict_help_give_their_usage_keys_and_groups(
    command, usage, keys, groups, tmp_path, mnist_dir
):
    result = cli(command, "--help", cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert usage in text
    listed = text.split("== Keys ==")[1].split("== Configuration groups ==")[0]
    assert [line.split()[0] for line in listed.splitlines() if line[:1].strip()] == keys
    found = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert [line.split("    ")[0] for line in found.splitlines() if line] == groups


@pytest.mark.parametrize("resolve", [[], ["--resolve"]])
def test_printed_config_shows_resume_as_a_flag_and_a_checkpoint_folder(
    resolve, capsys, monkeypatch
):
    trainer = OmegaConf.create(
        printed_config(["--cfg", "job", *resolve], capsys, monkeypatch)
    ).trainer
    assert trainer.resume is False
    assert OmegaConf.to_container(trainer)["checkpoint_dir"] == (
        "<the run's folder>/checkpoints" if resolve else "${hydra:runtime.output_dir}/checkpoints"
    )
