"""Keras optimizers from the `optimizer` config group; `lr` is Keras's `learning_rate`. `adam`
is Keras's Adam with TensorFlow's fused update kernel (`runner.fused_adam`)."""

from typing import Any

from omegaconf import OmegaConf


def build(cfg: Any, total_steps: int) -> Any:
    """A `keras.optimizers.Optimizer` whose arguments are the group option's keys, its learning
    rate following `schedule` over a run of `total_steps` steps."""
    import keras

    from runner.fused_adam import FusedAdam

    classes = {"sgd": keras.optimizers.SGD, "adam": FusedAdam}
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    name = kwargs.pop("name")
    if name not in classes:
        raise ValueError(f"optimizer.name={name!r} is not one of {', '.join(classes)}")
    lr, schedule, warmup = kwargs.pop("lr"), kwargs.pop("schedule"), kwargs.pop("warmup_steps")
    kwargs["learning_rate"] = learning_rate(lr, schedule, warmup, total_steps)
    return classes[name](**kwargs)


def learning_rate(peak: float, schedule: str, warmup_steps: int, total_steps: int) -> Any:
    """`peak`, reached linearly over `warmup_steps`; then held (constant) or decayed to 0 along
    a half cosine by the last step (cosine). Keras's CosineDecay does both: with alpha=1 its
    "decay" holds the rate."""
    import keras

    if schedule == "constant" and not warmup_steps:
        return peak
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak,
        decay_steps=total_steps - warmup_steps,
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
