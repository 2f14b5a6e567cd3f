"""The composed config checked once and turned into `Settings`: typed, frozen, each layer's part
handed to it by the composition root (`runner.cli.train`). Values the types allow but training
cannot use are refused here, in one line naming the key and a fix, before any run starts."""

from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config.schema import (
    RESULT_METRICS,
    SECTIONS,
    Backend,
    DataKeys,
    DeviceConf,
    JitCompile,
    LossKeys,
    ModelKeys,
    OptimizerKeys,
    Resume,
    TrackingConf,
    TrainerConf,
    keys,
    mergeable,
)
from runner.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Options:
    """The options that name a `_target_`, resolved to plain containers for
    `runner.targets.build`: all their keys, the runner's own among them."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    loss: dict[str, Any]
    data: dict[str, Any]
    # name -> a node naming a keras.callbacks.Callback
    callbacks: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Settings:
    """A checked training config: the runner's keys typed, `trainer.resume` a `Resume`,
    `device.jit_compile` a `JitCompile` and `device.steps_per_execution` "auto" or an int."""

    model: ModelKeys
    optimizer: OptimizerKeys
    loss: LossKeys
    data: DataKeys
    trainer: TrainerConf
    device: DeviceConf
    tracking: TrackingConf
    seed: int
    optimized_metric: str
    backend: Backend
    options: Options


def runner_keys(node: Any, schema: type, path: str) -> Any:
    """The keys of `node` that `schema` types, as an instance of it: a value of the wrong type,
    or a required key `node` lacks, is one line naming `path.KEY`."""
    present = {name: node[name] for name in keys(schema) if name in node}
    try:
        typed = OmegaConf.merge(mergeable(schema), present)
        OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", "") or ""
        raise UserError(f"{path}.{key}: {_message(error)}") from None
    return OmegaConf.to_object(typed)


def _message(error: OmegaConfBaseException) -> str:
    text = str(error).splitlines()[0]
    if "Missing mandatory value" in text:
        return "is not set; give it a value"
    return text


def check_config(cfg: DictConfig) -> Settings:
    """The settings `cfg` trains with, once its values are checked; the data option's paths
    are made absolute in `cfg` too, as it is recorded so (`runner.data.absolute_paths`)."""
    from runner import data

    for path, schema in SECTIONS:
        node = cfg.get(path) if path else cfg
        if OmegaConf.is_dict(node):
            _check_known_keys(path, list(node), schema)
    for path in _OPTIONS[:-1]:
        if not OmegaConf.is_dict(cfg.get(path)):
            raise UserError(f"{path} is not set: pick an option, {path}=NAME (see runner --help)")
    model = runner_keys(cfg.model, ModelKeys, "model")
    optimizer = runner_keys(cfg.optimizer, OptimizerKeys, "optimizer")
    loss = runner_keys(cfg.loss, LossKeys, "loss")
    d = runner_keys(cfg.data, DataKeys, "data")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # a `???` left in an option (`data=npz` without `data.path`)
        raise UserError(f"{missing[0]} is not set: give it on the command line, {missing[0]}=VALUE")
    _check_trainer(cfg.trainer, d)
    _check_output(cfg.loss._target_, model, loss)
    _check_optimizer(cfg.optimizer)
    _check_warmup(optimizer, cfg.trainer.steps)
    _check_device_settings(cfg.device, cfg.tracking)
    _check_resume(cfg.trainer)
    _check_run(cfg.optimized_metric, cfg.seed)
    _check_data(d, cfg.data)
    data.absolute_paths(cfg.data)
    # Typed here, as a config loaded from a run's record is not structured.
    trainer = runner_keys(cfg.trainer, TrainerConf, "trainer")
    device = runner_keys(cfg.device, DeviceConf, "device")
    spe = str(device.steps_per_execution)
    return Settings(
        model=model,
        optimizer=optimizer,
        loss=loss,
        data=d,
        trainer=replace(trainer, resume=Resume(resume_mode(trainer))),
        device=replace(
            device,
            jit_compile=JitCompile(str(device.jit_compile).lower()),
            steps_per_execution=spe if spe == "auto" else int(spe),
        ),
        tracking=runner_keys(cfg.tracking, TrackingConf, "tracking"),
        seed=cfg.seed,
        optimized_metric=cfg.optimized_metric,
        backend=Backend(cfg.backend),
        options=Options(
            **{
                key: {} if cfg[key] is None else OmegaConf.to_container(cfg[key], resolve=True)
                for key in _OPTIONS
            }
        ),
    )


def _check_run(optimized_metric: str, seed: int) -> None:
    if optimized_metric not in RESULT_METRICS:
        raise UserError(
            f"optimized_metric={optimized_metric} is not a metric every run records; "
            f"choose one of {', '.join(RESULT_METRICS)}"
        )
    if not 0 <= seed < 2**32:
        raise UserError(f"seed={seed} must be between 0 and {2**32 - 1}: NumPy takes no other seed")


_OPTIONS = ("model", "optimizer", "loss", "data", "callbacks")


def _check_output(loss_target: str, model: ModelKeys, loss: LossKeys) -> None:
    if loss.expects is not None and loss.expects != model.output:
        raise UserError(
            f"loss={loss_target} expects the model to emit {loss.expects}, but "
            f"model.output={model.output}: set model.output={loss.expects}, or pick a loss "
            f"that takes {model.output}"
        )


def _check_trainer(t: Any, d: DataKeys) -> None:
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
    for key in ("checkpoint_every", "eval_every"):
        if t[key] % t.log_every:
            raise UserError(
                f"trainer.{key}={t[key]} must be a multiple of trainer.log_every={t.log_every}"
            )


def _check_known_keys(path: str, given: list[str], schema: type) -> None:
    """Refuse a key the runner's own schemas lack: Hydra adds one given with `+` (as its own
    error message for a misspelt key suggests), and training would silently ignore it."""
    known = keys(schema)
    for key in given:
        if key in known or (not path and key == "hydra"):
            continue
        name = f"{path}.{key}" if path else key
        hint = (
            did_you_mean(str(key), list(known), f"{path}." if path else "")
            or f"the keys there are {', '.join(known)}"
        )
        raise UserError(f"{name} is not a setting of the runner: {hint}")


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


def _check_warmup(own: OptimizerKeys, steps: int) -> None:
    if not 0 <= own.warmup_steps < steps:
        raise UserError(
            f"optimizer.warmup_steps={own.warmup_steps} must be at least 0 and "
            f"below trainer.steps={steps}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def resume_mode(trainer: Any) -> str:
    """`trainer.resume` as a `Resume` value: a bool (the YAML's, `trainer.resume=true`) or
    "extend"; a config logged before it was untyped holds "True"/"False"."""
    return str(trainer.resume).lower()


def _check_resume(t: Any) -> None:
    if resume_mode(t) not in tuple(Resume):
        raise UserError(
            f"trainer.resume={t.resume} must be false, true (carry on from the newest "
            f"checkpoint) or extend (carry on with a larger trainer.steps)"
        )


def _check_device_settings(device: Any, tracking: Any) -> None:
    if str(device.jit_compile).lower() not in tuple(JitCompile):
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
