"""The optimizer an `optimizer` option names by `_target_`, any Keras optimizer class. The
runner's own keys (`lr`, `schedule`, `warmup_steps`) become its `learning_rate`; `adam` is
Keras's Adam with TensorFlow's fused update kernel (`runner.fused_adam`)."""

from collections.abc import Mapping
from typing import Any

import keras

from runner import targets
from runner.config.schema import OptimizerKeys, keys


def build(option: Mapping[str, Any], own: OptimizerKeys, total_steps: int) -> Any:
    """A `keras.optimizers.Optimizer` from the `optimizer` option: its class's own keys as they
    are, its learning rate following the runner's keys `own` over a run of `total_steps` steps."""
    rate = learning_rate(float(own.lr), str(own.schedule), own.warmup_steps, total_steps)
    return targets.build(option, "optimizer", keys(OptimizerKeys), learning_rate=rate)


def learning_rate(peak: float, schedule: str, warmup_steps: int, total_steps: int) -> Any:
    """`peak`, reached linearly over `warmup_steps`; then held (constant) or decayed to 0 along
    a half cosine by the last step (cosine). Keras's CosineDecay does both: with alpha=1 its
    "decay" holds the rate."""
    if schedule == "constant" and not warmup_steps:
        return peak
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak,
        decay_steps=total_steps - warmup_steps,
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
