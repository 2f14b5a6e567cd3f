"""Structured-config schemas: the types of the runner's own keys, so a typo fails before training,
and of the frozen settings a checked config becomes (`runner.config.settings`).

These dataclasses say what keys exist and of which type; each key's value is written once. A key
a YAML file under `conf/` sets (where users read and turn the knobs) is `MISSING` here, only
typed; a key no YAML sets (`callbacks`, runner-eval's `data`) has its default here, and
tests/test_config.py holds to this. No default stands in for a key that a config recorded by an
older run lacks: each key of `trainer`, `device`, `tracking` and the root is older than
`backend`, which a rerun of a recorded config (`runner-repro`) cannot do without.

`trainer`, `device` and `tracking` are the runner's alone and typed whole by `Config`. `model`,
`optimizer`, `loss`, `data` and `callbacks` name a `_target_` whose own keys only it knows:
`runner.targets` checks those against its signature, and `check_config` types the few keys of
theirs that the runner reads (`ModelKeys`, ...). Those keep their defaults here: an option a
user writes (their own model's YAML) need not set `output` or `name`, while conf/'s options
spell them out to show them. The schemas are stored as root-level configs, not in groups of
their own: `runner --help` lists every group, and users must see only those they pick from.
"""

from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# The YAML files: the package's conf/ in an installed wheel (pyproject.toml's wheel sources put it
# there), else conf/ at the top of the checkout, which uv installs in editable mode.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
if not CONF_DIR.is_dir():
    CONF_DIR = CONF_DIR.parents[1] / "conf"


class Output(StrEnum):
    logits = "logits"
    probabilities = "probabilities"


@dataclass(frozen=True)
class ModelKeys:
    """The runner's keys of a `model` option; `output` also reaches a builder that takes it."""

    name: str | None = None
    output: Output = Output.logits


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"


@dataclass(frozen=True)
class OptimizerKeys:
    """The runner's keys of an `optimizer` option: `lr` becomes the class's `learning_rate`,
    following `schedule`."""

    name: str | None = None
    lr: float = MISSING
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0


@dataclass(frozen=True)
class LossKeys:
    # What the loss takes, checked against model.output; unchecked when unset.
    expects: Output | None = None


@dataclass(frozen=True)
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


class Resume(StrEnum):
    """`trainer.resume`: start afresh, carry on from the newest checkpoint with its settings, or
    carry on with a larger trainer.steps."""

    false = "false"
    true = "true"
    extend = "extend"


class JitCompile(StrEnum):
    auto = "auto"
    true = "true"
    false = "false"


@dataclass(frozen=True)
class TrainerConf:
    steps: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    checkpoint_dir: str = MISSING
    # false, true (carry on with the checkpoint's settings) or "extend" (raise trainer.steps):
    # untyped, as a field cannot be both a bool and "extend" (OmegaConf's Union breaks Hydra's
    # merge), so that `--cfg job` shows `resume: false`; the settings hold it as a `Resume`.
    resume: Any = MISSING
    progress_bar: bool = MISSING
    log_model: bool = MISSING
    register_as: str | None = MISSING
    register_alias: str = MISSING
    register_force: bool = MISSING


@dataclass(frozen=True)
class DeviceConf:
    precision: Precision = MISSING
    deterministic: bool = MISSING
    # "auto", "true" or "false"; typed str because a field cannot be both a bool and "auto". The
    # settings hold it as a `JitCompile`.
    jit_compile: str = MISSING
    # "auto" or a positive integer, likewise; the settings hold "auto" or the integer.
    steps_per_execution: str = MISSING
    strategy: Strategy = MISSING
    cpu_devices: int = MISSING


@dataclass(frozen=True)
class TrackingConf:
    uri: str = MISSING
    experiment_name: str = MISSING
    plots: bool = MISSING
    system_metrics: bool = MISSING
    system_metrics_every_s: float = MISSING
    metrics_flush_every_s: float = MISSING
    server_patience_s: float = MISSING


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
    optimized_metric: str = MISSING
    backend: Backend = MISSING


# The nodes the runner's schemas type whole, by their path ("": the root).
SECTIONS = (
    ("", Config),
    ("trainer", TrainerConf),
    ("device", DeviceConf),
    ("tracking", TrackingConf),
)


@dataclass(frozen=True)
class EvaluateConf:
    tracking: TrackingConf = MISSING
    # Empty: the data the run trained on, with these keys changed; a data option replaces it.
    data: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = MISSING
    model_uri: str | None = MISSING
    # None: the backend the model was saved on.
    backend: Backend | None = MISSING


@dataclass(frozen=True)
class PredictConf:
    tracking: TrackingConf = MISSING
    run_id: str | None = MISSING
    model_uri: str | None = MISSING
    backend: Backend | None = MISSING
    # A path, a glob, a folder of PNGs, or a list of those.
    images: Any = MISSING
    invert: bool = MISSING


def keys(schema: type) -> tuple[str, ...]:
    """The keys `schema` types: of an option, those the runner reads rather than passes on."""
    return tuple(f.name for f in fields(schema))


def mergeable(schema: type) -> DictConfig:
    """The structured config of `schema`, into which Hydra can merge the YAML values: OmegaConf
    makes the node of a frozen dataclass read-only, while only the settings built from it
    (`OmegaConf.to_object`) are to stay as they are."""
    node = OmegaConf.structured(schema)
    for nested in [node, *(node._get_node(key) for key in node)]:
        if isinstance(nested, DictConfig):
            nested._set_flag("readonly", None)
    return node


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore, and make `${group_options:GROUP}` available to
    the help texts; called before Hydra composes."""
    _share_config_store()
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=mergeable(Config))
    cs.store(name="evaluate_schema", node=mergeable(EvaluateConf))
    cs.store(name="predict_schema", node=mergeable(PredictConf))
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
