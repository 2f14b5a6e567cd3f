"""Structured-config schema: types every key of `conf/`, so a typo fails before training.

The values live in the YAML files under `conf/`; these dataclasses only say what keys exist
and of which type. Each group option's YAML names its schema first in its defaults list
(`- /model_softmax_schema@_here_`). The schemas are stored as root-level configs, not in groups
of their own: `runner --help` lists every group, and users must see only those they pick from.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from runner.errors import UserError


class Output(StrEnum):
    logits = "logits"
    probabilities = "probabilities"


@dataclass
class ModelConf:
    name: str = MISSING
    output: Output = Output.logits


@dataclass
class SoftmaxConf(ModelConf):
    name: str = "softmax"


@dataclass
class CnnRawConf(ModelConf):
    name: str = "cnn_raw"
    keep_prob: float = MISSING
    init_stddev: float = MISSING
    bias_init: float = MISSING


@dataclass
class CnnLayersConf(ModelConf):
    name: str = "cnn_layers"
    dropout_rate: float = MISSING


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class OptimizerConf:
    name: str = MISSING
    lr: float = MISSING
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0


@dataclass
class SGDConf(OptimizerConf):
    name: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class AdamConf(OptimizerConf):
    name: str = "adam"
    beta_1: float = MISSING
    beta_2: float = MISSING
    epsilon: float = MISSING
    amsgrad: bool = False


@dataclass
class DataConf:
    name: str = "mnist"
    dir: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    validation_size: int = MISSING
    limit: int | None = None
    download: bool = MISSING
    download_timeout_s: float = MISSING
    mirrors: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)


class Loss(StrEnum):
    sparse_softmax_cross_entropy = "sparse_softmax_cross_entropy"
    cross_entropy_of_probabilities = "cross_entropy_of_probabilities"


# What each loss expects the model to emit.
LOSS_INPUT = {
    Loss.sparse_softmax_cross_entropy: Output.logits,
    Loss.cross_entropy_of_probabilities: Output.probabilities,
}


class Precision(StrEnum):
    auto = "auto"
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


class Strategy(StrEnum):
    auto = "auto"
    single = "single"
    mirrored = "mirrored"


@dataclass
class TrainerConf:
    steps: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    loss: Loss = Loss.sparse_softmax_cross_entropy
    deterministic: bool = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    checkpoint_dir: str | None = None
    # "false", "true" (carry on with the checkpoint's settings) or "extend" (raise
    # trainer.steps); typed str because a field cannot be both a bool and "extend".
    resume: str = "false"
    log_probabilities_every: int = MISSING
    log_probabilities_examples: int = MISSING
    progress_bar: bool = True
    log_model: bool = True
    precision: Precision = Precision.auto
    # "auto", "true" or "false"; typed str because a field cannot be both a bool and "auto".
    jit_compile: str = "auto"
    # "auto" or a positive integer, likewise.
    steps_per_execution: str = "auto"
    strategy: Strategy = Strategy.auto
    cpu_devices: int = 1
    system_metrics: bool = True
    system_metrics_every_s: float = 10.0
    metrics_flush_every_s: float = 5.0


# The metrics every run ends with, each a sweeper may optimise.
RESULT_METRICS = tuple(
    f"{split}/{name}" for split in ("train", "val", "test") for name in ("loss", "accuracy")
)


@dataclass
class Config:
    model: Any = MISSING
    optimizer: Any = MISSING
    data: DataConf = MISSING
    trainer: TrainerConf = MISSING
    seed: int = MISSING
    experiment_name: str = MISSING
    tracking_uri: str | None = None
    optimized_metric: str = "val/accuracy"


@dataclass
class EvaluateConf:
    data: DataConf = MISSING
    run_id: str | None = None
    model_uri: str | None = None
    tracking_uri: str = MISSING


@dataclass
class PredictConf:
    run_id: str | None = None
    model_uri: str | None = None
    # A path, a glob, a folder of PNGs, or a list of those.
    images: Any = MISSING
    invert: bool = False
    tracking_uri: str = MISSING


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore; called before Hydra composes."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="evaluate_schema", node=EvaluateConf)
    cs.store(name="predict_schema", node=PredictConf)
    cs.store(name="model_softmax_schema", node=SoftmaxConf)
    cs.store(name="model_cnn_raw_schema", node=CnnRawConf)
    cs.store(name="model_cnn_layers_schema", node=CnnLayersConf)
    cs.store(name="optimizer_sgd_schema", node=SGDConf)
    cs.store(name="optimizer_adam_schema", node=AdamConf)
    cs.store(name="data_mnist_schema", node=DataConf)
    cs.store(name="trainer_schema", node=TrainerConf)


def check_config(cfg: Any) -> None:
    """Reject values the types allow but training cannot use, naming the key and a fix."""
    t, d = cfg.trainer, cfg.data
    for key, value in {
        "trainer.steps": t.steps,
        "trainer.log_every": t.log_every,
        "trainer.eval_every": t.eval_every,
        "data.batch_size": d.batch_size,
        "data.eval_batch_size": d.eval_batch_size,
        "trainer.log_probabilities_examples": t.log_probabilities_examples,
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
    if t.log_probabilities_every < 0:
        raise UserError(
            f"trainer.log_probabilities_every={t.log_probabilities_every} must be 0 (off) "
            f"or positive"
        )
    if LOSS_INPUT[t.loss] != cfg.model.output:
        raise UserError(
            f"trainer.loss={t.loss} expects the model to emit {LOSS_INPUT[t.loss]}, but "
            f"model.output={cfg.model.output}: set model.output={LOSS_INPUT[t.loss]}"
        )
    keep_prob = cfg.model.get("keep_prob", 1.0)
    if not 0.0 < keep_prob <= 1.0:
        raise UserError(f"model.keep_prob={keep_prob} must be in (0, 1]; 1 turns dropout off")
    dropout_rate = cfg.model.get("dropout_rate", 0.0)
    if not 0.0 <= dropout_rate < 1.0:
        raise UserError(f"model.dropout_rate={dropout_rate} must be in [0, 1); 0 turns dropout off")
    _check_optimizer(cfg.optimizer)
    if not 0 <= cfg.optimizer.warmup_steps < t.steps:
        raise UserError(
            f"optimizer.warmup_steps={cfg.optimizer.warmup_steps} must be at least 0 and "
            f"below trainer.steps={t.steps}"
        )
    _check_device_settings(t)
    _check_resume(t)
    if cfg.optimized_metric not in RESULT_METRICS:
        raise UserError(
            f"optimized_metric={cfg.optimized_metric} is not a metric every run records; "
            f"choose one of {', '.join(RESULT_METRICS)}"
        )
    _check_data(d)


def _check_data(d: Any) -> None:
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
    folder(d)


def _check_optimizer(o: Any) -> None:
    """Keras checks only SGD's momentum, and only once the optimizer is built, after the MLflow
    run exists; it takes any Adam beta or epsilon, and beta_1=1 or epsilon=0 train to NaN."""
    if o.lr <= 0:
        raise UserError(f"optimizer.lr={o.lr} must be positive")
    momentum = o.get("momentum", 0.0)
    if not 0.0 <= momentum <= 1.0:
        raise UserError(f"optimizer.momentum={momentum} must be in [0, 1]; 0 turns momentum off")
    for key in ("beta_1", "beta_2"):
        beta = o.get(key, 0.0)
        if not 0.0 <= beta < 1.0:
            raise UserError(f"optimizer.{key}={beta} must be in [0, 1), like Adam's 0.9 and 0.999")
    epsilon = o.get("epsilon", 1.0)
    if epsilon <= 0:
        raise UserError(
            f"optimizer.epsilon={epsilon} must be positive: it keeps Adam's step finite where "
            f"a gradient is 0"
        )


RESUME_MODES = ("false", "true", "extend")


def resume_mode(trainer: Any) -> str:
    """`trainer.resume` as one of RESUME_MODES; the YAML's booleans arrive as "True"/"False"."""
    return str(trainer.resume).lower()


def _check_resume(t: Any) -> None:
    if resume_mode(t) not in RESUME_MODES:
        raise UserError(
            f"trainer.resume={t.resume} must be false, true (carry on from the newest "
            f"checkpoint) or extend (carry on with a larger trainer.steps)"
        )


def _check_device_settings(t: Any) -> None:
    if str(t.jit_compile).lower() not in ("auto", "true", "false"):
        raise UserError(f"trainer.jit_compile={t.jit_compile} must be auto, true or false")
    spe = str(t.steps_per_execution)
    if spe != "auto" and not (spe.isdigit() and int(spe) > 0):
        raise UserError(f"trainer.steps_per_execution={spe} must be auto or a positive integer")
    if t.cpu_devices < 1:
        raise UserError(f"trainer.cpu_devices={t.cpu_devices} must be 1 or more")
    if t.system_metrics_every_s <= 0:
        raise UserError(
            f"trainer.system_metrics_every_s={t.system_metrics_every_s} must be positive"
        )
    if t.metrics_flush_every_s < 0:
        raise UserError(
            f"trainer.metrics_flush_every_s={t.metrics_flush_every_s} must be 0 (write every "
            f"window's metrics at once) or more"
        )
