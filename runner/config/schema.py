"""Structured-config schemas: the types of the runner's own keys, so a typo fails before training.

The values live in the YAML files under `conf/`; these dataclasses only say what keys exist
and of which type. `trainer`, `device` and `tracking` are the runner's alone and typed whole by
`Config`. `model`, `optimizer`, `loss`, `data` and `callbacks` name a `_target_` whose own keys
only it knows: `runner.targets` checks those against its signature, and `check_config` types
the few keys of theirs that the runner reads (`ModelKeys`, ...). The schemas are stored as
root-level configs, not in groups of their own: `runner --help` lists every group, and users
must see only those they pick from.
"""

from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.errors import UserError, did_you_mean

# The YAML files: the package's conf/ in an installed wheel (pyproject.toml's wheel sources put it
# there), else conf/ at the top of the checkout, which uv installs in editable mode.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
if not CONF_DIR.is_dir():
    CONF_DIR = CONF_DIR.parents[1] / "conf"


class Output(StrEnum):
    logits = "logits"
    probabilities = "probabilities"


@dataclass
class ModelKeys:
    """The runner's keys of a `model` option; `output` also reaches a builder that takes it."""

    name: str | None = None
    output: Output = Output.logits


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class OptimizerKeys:
    """The runner's keys of an `optimizer` option: `lr` becomes the class's `learning_rate`,
    following `schedule`."""

    name: str | None = None
    lr: float = MISSING
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0


@dataclass
class LossKeys:
    # What the loss takes, checked against model.output; unchecked when unset.
    expects: Output | None = None


@dataclass
class DataKeys:
    name: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    validation_size: int = MISSING
    limit: int | None = None


class Precision(StrEnum):
    auto = "auto"
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


class Strategy(StrEnum):
    auto = "auto"
    single = "single"
    mirrored = "mirrored"
    data_parallel = "data_parallel"


class Backend(StrEnum):
    tensorflow = "tensorflow"
    jax = "jax"


@dataclass
class TrainerConf:
    steps: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    checkpoint_dir: str = MISSING
    # false, true (carry on with the checkpoint's settings) or "extend" (raise trainer.steps):
    # untyped, as a field cannot be both a bool and "extend" (OmegaConf's Union breaks Hydra's
    # merge), so that `--cfg job` shows `resume: false`; `_check_resume` names the choices.
    resume: Any = False
    progress_bar: bool = True
    log_model: bool = True
    register_as: str | None = None
    register_alias: str = "champion"
    register_force: bool = False


@dataclass
class DeviceConf:
    precision: Precision = Precision.auto
    deterministic: bool = True
    # "auto", "true" or "false"; typed str because a field cannot be both a bool and "auto".
    jit_compile: str = "auto"
    # "auto" or a positive integer, likewise.
    steps_per_execution: str = "auto"
    strategy: Strategy = Strategy.auto
    cpu_devices: int = 1


@dataclass
class TrackingConf:
    uri: str = MISSING
    experiment_name: str = MISSING
    plots: bool = True
    system_metrics: bool = True
    system_metrics_every_s: float = 10.0
    metrics_flush_every_s: float = 5.0
    server_patience_s: float = 300.0


# The metrics every run ends with, each a sweeper may optimise.
RESULT_METRICS = tuple(
    f"{split}/{name}" for split in ("train", "val", "test") for name in ("loss", "accuracy")
)


@dataclass
class Config:
    model: Any = MISSING
    optimizer: Any = MISSING
    loss: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConf = MISSING
    device: DeviceConf = MISSING
    tracking: TrackingConf = MISSING
    # name -> a node naming a keras.callbacks.Callback by _target_ (conf/callbacks/)
    callbacks: Any = None
    seed: int = MISSING
    optimized_metric: str = "val/accuracy"
    backend: Backend = Backend.tensorflow


@dataclass
class EvaluateConf:
    tracking: TrackingConf = MISSING
    # Empty: the data the run trained on, with these keys changed; a data option replaces it.
    data: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    model_uri: str | None = None
    # None: the backend the model was saved on.
    backend: Backend | None = None


@dataclass
class PredictConf:
    tracking: TrackingConf = MISSING
    run_id: str | None = None
    model_uri: str | None = None
    backend: Backend | None = None
    # A path, a glob, a folder of PNGs, or a list of those.
    images: Any = MISSING
    invert: bool = False


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore, and make `${group_options:GROUP}` available to
    the help texts; called before Hydra composes."""
    _share_config_store()
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="evaluate_schema", node=EvaluateConf)
    cs.store(name="predict_schema", node=PredictConf)
    OmegaConf.register_new_resolver("group_options", group_options, replace=True)


def _share_config_store() -> None:
    """Make a copy of Hydra's ConfigStore the store itself. Hydra 1.3 deep-copies it, every
    schema and option the runner and the plugins registered, each time it reads a config group:
    about 120 times for `runner --help`, most of its second. The copy is only read, and of a
    singleton; Hydra's own fix (facebookresearch/hydra#2928) is not in hydra-core 1.3.8."""
    ConfigStore.__deepcopy__ = lambda self, memo: self


def group_options(group: str) -> str:
    """The options of config group `group` (a --config-dir's too), as `runner --help` lists
    them: `runner-eval --help` and `runner-predict --help` name only the groups they use,
    which Hydra's own list of every group cannot."""
    from hydra.core.global_hydra import GlobalHydra

    return ", ".join(sorted(GlobalHydra.instance().config_loader().get_group_options(group)))


def runner_keys(node: Any, schema: type, path: str) -> Any:
    """The keys of `node` that `schema` types, as a typed config: a value of the wrong type, or
    a required key `node` lacks, is one line naming `path.KEY`."""
    names = [f.name for f in fields(schema)]
    present = {name: node[name] for name in names if name in node}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), present)
        OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", "") or ""
        raise UserError(f"{path}.{key}: {_message(error)}") from None
    return typed


def _message(error: OmegaConfBaseException) -> str:
    text = str(error).splitlines()[0]
    if "Missing mandatory value" in text:
        return "is not set; give it a value"
    return text


def check_config(cfg: Any) -> None:
    """Reject values the types allow but training cannot use, naming the key and a fix."""
    _check_known_keys(cfg)
    for path in ("model", "optimizer", "loss", "data"):
        if not OmegaConf.is_dict(cfg.get(path)):
            raise UserError(f"{path} is not set: pick an option, {path}=NAME (see runner --help)")
    model = runner_keys(cfg.model, ModelKeys, "model")
    optimizer = runner_keys(cfg.optimizer, OptimizerKeys, "optimizer")
    loss = runner_keys(cfg.loss, LossKeys, "loss")
    d = runner_keys(cfg.data, DataKeys, "data")
    _check_missing(cfg)
    t = cfg.trainer
    try:
        t.checkpoint_dir  # noqa: B018  (resolving it is the check)
    except OmegaConfBaseException as error:
        raise UserError(
            f"trainer.checkpoint_dir cannot be resolved outside a `runner` command "
            f"({str(error).splitlines()[0]}): compose the config with runner.cli.train.compose, or "
            f"set trainer.checkpoint_dir=DIR"
        ) from None
    if t.register_as and not t.log_model:
        raise UserError(
            f"trainer.register_as={t.register_as} registers the run's logged model: add "
            f"trainer.log_model=true (debug=quick turns it off)"
        )
    for key, value in {
        "trainer.steps": t.steps,
        "trainer.log_every": t.log_every,
        "trainer.eval_every": t.eval_every,
        "data.batch_size": d.batch_size,
        "data.eval_batch_size": d.eval_batch_size,
        "trainer.checkpoint_every": t.checkpoint_every,
        "trainer.keep_checkpoints": t.keep_checkpoints,
    }.items():
        if value <= 0:
            raise UserError(f"{key}={value} must be a positive integer")
    if t.steps % t.log_every:
        raise UserError(
            f"trainer.steps={t.steps} must be a multiple of trainer.log_every={t.log_every}: "
            f"training is logged in windows of log_every steps"
        )
    if t.checkpoint_every % t.log_every:
        raise UserError(
            f"trainer.checkpoint_every={t.checkpoint_every} must be a multiple of "
            f"trainer.log_every={t.log_every}"
        )
    if t.eval_every % t.log_every:
        raise UserError(
            f"trainer.eval_every={t.eval_every} must be a multiple of "
            f"trainer.log_every={t.log_every}"
        )
    if loss.expects is not None and loss.expects != model.output:
        raise UserError(
            f"loss={cfg.loss._target_} expects the model to emit {loss.expects}, but "
            f"model.output={model.output}: set model.output={loss.expects}, or pick a loss "
            f"that takes {model.output}"
        )
    _check_optimizer(cfg.optimizer)
    if not 0 <= optimizer.warmup_steps < t.steps:
        raise UserError(
            f"optimizer.warmup_steps={optimizer.warmup_steps} must be at least 0 and "
            f"below trainer.steps={t.steps}"
        )
    _check_device_settings(cfg.device, cfg.tracking)
    _check_resume(t)
    if cfg.optimized_metric not in RESULT_METRICS:
        raise UserError(
            f"optimized_metric={cfg.optimized_metric} is not a metric every run records; "
            f"choose one of {', '.join(RESULT_METRICS)}"
        )
    if not 0 <= cfg.seed < 2**32:
        raise UserError(
            f"seed={cfg.seed} must be between 0 and {2**32 - 1}: NumPy takes no other seed"
        )
    _check_data(d, cfg.data)


def _check_known_keys(cfg: Any) -> None:
    """Refuse a key the runner's own schemas lack: Hydra adds one given with `+` (as its own
    error message for a misspelt key suggests), and training would silently ignore it."""
    for path, schema in (
        ("", Config),
        ("trainer", TrainerConf),
        ("device", DeviceConf),
        ("tracking", TrackingConf),
    ):
        node = cfg.get(path) if path else cfg
        if not OmegaConf.is_dict(node):
            continue
        known = [f.name for f in fields(schema)]
        for key in node:
            if key in known or (not path and key == "hydra"):
                continue
            name = f"{path}.{key}" if path else key
            hint = (
                did_you_mean(str(key), known, f"{path}." if path else "")
                or f"the keys there are {', '.join(known)}"
            )
            raise UserError(f"{name} is not a setting of the runner: {hint}")


def _check_missing(cfg: Any) -> None:
    """A `???` left in an option (`data=npz` without `data.path`), named with its fix."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise UserError(f"{key} is not set: give it on the command line, {key}=VALUE")


def _check_data(d: Any, node: Any) -> None:
    """Refused here, before the MLflow run exists, rather than once the data is loaded."""
    from runner.data import folder

    if d.limit is not None and d.limit <= 0:
        raise UserError(f"data.limit={d.limit} must be positive, or null for the whole data set")
    # The training split holds at most `limit` examples; with strategy=mirrored each step takes
    # batch_size per replica, which runner.data checks once the replicas are known.
    if d.limit is not None and d.limit < d.batch_size:
        raise UserError(
            f"data.limit={d.limit} leaves fewer training examples than one batch of "
            f"data.batch_size={d.batch_size}: raise data.limit or lower data.batch_size"
        )
    if isinstance(node.get("dir"), str):
        folder(node.dir)


def _check_optimizer(o: Any) -> None:
    """Keras checks only SGD's momentum, and only once the optimizer is built, after the MLflow
    run exists; it takes any Adam beta or epsilon, and beta_1=1 or epsilon=0 train to NaN."""
    if float(o.lr) <= 0:
        raise UserError(f"optimizer.lr={float(o.lr)} must be positive")
    if not all(_is_number(o.get(key, 0.0)) for key in ("momentum", "beta_1", "beta_2", "epsilon")):
        return  # the class refuses a value of the wrong type, naming it, when it is built
    momentum = float(o.get("momentum", 0.0))
    if not 0.0 <= momentum <= 1.0:
        raise UserError(f"optimizer.momentum={momentum} must be in [0, 1]; 0 turns momentum off")
    for key in ("beta_1", "beta_2"):
        beta = float(o.get(key, 0.0))
        if not 0.0 <= beta < 1.0:
            raise UserError(f"optimizer.{key}={beta} must be in [0, 1), like Adam's 0.9 and 0.999")
    epsilon = float(o.get("epsilon", 1.0))
    if epsilon <= 0:
        raise UserError(
            f"optimizer.epsilon={epsilon} must be positive: it keeps Adam's step finite where "
            f"a gradient is 0"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


RESUME_MODES = ("false", "true", "extend")


def resume_mode(trainer: Any) -> str:
    """`trainer.resume` as one of RESUME_MODES: a bool (the YAML's, `trainer.resume=true`) or
    "extend"; a config logged before it was untyped holds "True"/"False"."""
    return str(trainer.resume).lower()


def _check_resume(t: Any) -> None:
    if resume_mode(t) not in RESUME_MODES:
        raise UserError(
            f"trainer.resume={t.resume} must be false, true (carry on from the newest "
            f"checkpoint) or extend (carry on with a larger trainer.steps)"
        )


def _check_device_settings(device: Any, tracking: Any) -> None:
    if str(device.jit_compile).lower() not in ("auto", "true", "false"):
        raise UserError(f"device.jit_compile={device.jit_compile} must be auto, true or false")
    spe = str(device.steps_per_execution)
    if spe != "auto" and not (spe.isdigit() and int(spe) > 0):
        raise UserError(f"device.steps_per_execution={spe} must be auto or a positive integer")
    if device.cpu_devices < 1:
        raise UserError(f"device.cpu_devices={device.cpu_devices} must be 1 or more")
    if tracking.system_metrics_every_s <= 0:
        raise UserError(
            f"tracking.system_metrics_every_s={tracking.system_metrics_every_s} must be positive"
        )
    if tracking.server_patience_s < 0:
        raise UserError(
            f"tracking.server_patience_s={tracking.server_patience_s} must be 0 or more"
        )
    if tracking.metrics_flush_every_s < 0:
        raise UserError(
            f"tracking.metrics_flush_every_s={tracking.metrics_flush_every_s} must be 0 (write "
            f"every window's metrics at once) or more"
        )
