"""Keras optimizers from the `optimizer` config group; `lr` is Keras's `learning_rate`."""

from typing import Any

from omegaconf import OmegaConf


def build(cfg: Any) -> Any:
    """A `keras.optimizers.Optimizer` whose arguments are the group option's keys."""
    import keras

    classes = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    name = kwargs.pop("name")
    if name not in classes:
        raise ValueError(f"optimizer.name={name!r} is not one of {', '.join(classes)}")
    kwargs["learning_rate"] = kwargs.pop("lr")
    return classes[name](**kwargs)
