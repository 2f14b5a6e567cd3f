"""The model a run trains: built by the `model` option's `_target_` for the data's shape and
classes, then compiled with the `optimizer` and `loss` options."""

from typing import Any

from runner import optim, targets
from runner.errors import UserError

# Keys of a `model` option that the runner reads; `output` also reaches a builder that takes it.
RUNNER_KEYS = ("name", "output")


def build(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """A fresh, uncompiled `keras.Model` from the `model` option, checked to be one and to give
    an output for each of the `num_classes` classes."""
    import keras

    model = targets.build(
        cfg,
        "model",
        RUNNER_KEYS,
        passed={"output": str(cfg.get("output", "logits"))},
        input_shape=tuple(input_shape),
        num_classes=num_classes,
    )
    if not isinstance(model, keras.Model):
        raise UserError(
            f"model: {cfg._target_} returned a {type(model).__name__}, not a keras.Model"
        )
    if getattr(model, "optimizer", None) is not None:
        raise UserError(
            f"model: {cfg._target_} returned a compiled model: return it uncompiled, and choose "
            f"its optimizer and loss with optimizer= and loss="
        )
    output = str(cfg.get("output", "logits"))
    if output == "logits" and _ends_in_softmax(model):
        raise UserError(
            f"model: {cfg._target_} ends in a softmax, so it emits probabilities, but "
            f"model.output=logits: set model.output=probabilities and "
            f"loss=cross_entropy_of_probabilities, or end it in logits"
        )
    shape = _output_shape(model, cfg._target_, input_shape)
    if len(shape) != 2 or shape[-1] != num_classes:
        raise UserError(
            f"model: {cfg._target_} built a model whose output has shape {shape}, not "
            f"(batch, {num_classes}): one value for each of the data's {num_classes} classes"
        )
    return model


def _ends_in_softmax(model: Any) -> bool:
    """Whether the model's last layer is a softmax, or has one as its activation."""
    import keras

    layers = getattr(model, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    return isinstance(last, keras.layers.Softmax) or (
        getattr(last, "activation", None) is keras.activations.softmax
    )


def _output_shape(model: Any, target: str, input_shape: tuple[int, ...]) -> tuple:
    """The shape of the model's output: a functional model knows it; a subclassed one, or a
    Sequential without an Input, tells it by running one example of zeros."""
    import numpy as np

    try:
        return tuple(model.outputs[0].shape)
    except (AttributeError, IndexError, TypeError):
        pass
    try:
        return tuple(model(np.zeros((1, *input_shape), "float32"), training=False).shape)
    except Exception as error:
        text = str(error).strip()
        raise UserError(
            f"model: the model {target} built fails on one input of shape "
            f"{(1, *input_shape)}: {type(error).__name__}: {text.splitlines()[0] if text else ''}"
        ) from None


def compiled(model: Any, cfg: Any, plan: Any, resumed: bool = False) -> Any:
    """`model` compiled as `plan` says, with the configured optimizer and loss, measuring
    accuracy; a model `resumed` from a checkpoint keeps its optimizer and so its state."""
    import keras

    model.compile(
        optimizer=model.optimizer if resumed else optim.build(cfg.optimizer, cfg.trainer.steps),
        loss=targets.build(cfg.loss, "loss", ("expects",)),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=plan.jit_compile,
        steps_per_execution=plan.steps_per_execution,
    )
    return model


def check_loss(model: Any, cfg: Any, x: Any, y: Any) -> None:
    """Score two examples with the compiled loss before any run starts: a loss that cannot take
    the data's integer labels (one that wants one-hot targets, say) fails here in one line,
    not inside the first training step as a traceback."""
    import keras

    try:
        keras.ops.convert_to_numpy(model.loss(y[:2], model(x[:2], training=False)))
    except Exception as error:
        text = str(error).strip()
        raise UserError(
            f"loss: {cfg.loss._target_} cannot score the model's outputs against the data's "
            f"labels, integers of shape (N,): {type(error).__name__}: "
            f"{text.splitlines()[0] if text else ''}"
        ) from None
