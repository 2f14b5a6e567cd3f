"""The model a run trains: built by the `model` option's `_target_` for the data's shape and
classes, then compiled with the `optimizer` and `loss` options."""

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from runner import targets
from runner.config.schema import LossKeys, ModelKeys, keys
from runner.errors import UserError
from runner.models import classifier


def build(option: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> Any:
    """A fresh, uncompiled `keras.Model` from the `model` option, checked to be one and to give
    an output for each of the `num_classes` classes. Of the runner's keys (`ModelKeys`),
    `output` also reaches a builder that takes it."""
    target = option["_target_"]
    model = targets.build(
        option,
        "model",
        keys(ModelKeys),
        passed={"output": classifier.output(option)},
        input_shape=tuple(input_shape),
        num_classes=num_classes,
    )
    if not isinstance(model, keras.Model):
        raise UserError(f"model: {target} returned a {type(model).__name__}, not a keras.Model")
    if getattr(model, "optimizer", None) is not None:
        raise UserError(
            f"model: {target} returned a compiled model: return it uncompiled, and choose "
            f"its optimizer and loss with optimizer= and loss="
        )
    if classifier.output(option) == classifier.LOGITS and classifier.ends_in_softmax(model):
        raise UserError(
            f"model: {target} ends in a softmax, so it emits probabilities, but "
            f"model.output=logits: set model.output=probabilities and "
            f"loss=cross_entropy_of_probabilities, or end it in logits"
        )
    _check_input(model, target, input_shape)
    shape = _output_shape(model, target, input_shape, num_classes)
    if len(shape) != 2 or shape[-1] != num_classes:
        raise UserError(
            f"model: {target} built a model whose output has shape {shape}, not "
            f"(batch, {num_classes}): one value for each of the data's {num_classes} classes"
        )
    return model


def _check_input(model: Any, target: str, input_shape: tuple[int, ...]) -> None:
    """Refuse a model that declares other inputs than one of the data's images: built for a
    fixed image size, say, rather than for the `input_shape` the runner passed. A subclassed
    model, or a Sequential without an Input, declares none."""
    try:
        declared = [tuple(tensor.shape) for tensor in model.inputs]
    except (AttributeError, TypeError):
        return
    fits = len(declared) == 1 and len(declared[0]) == len(input_shape) + 1
    if fits and all(d in (None, i) for d, i in zip(declared[0][1:], input_shape, strict=True)):
        return
    shapes = " and ".join(str(shape) for shape in declared)
    raise UserError(
        f"model: {target} built a model whose input has shape {shapes}, not (batch, "
        f"{', '.join(map(str, input_shape))}), the data's images: build it for the "
        f"input_shape the runner passes"
    )


def _output_shape(model: Any, target: str, input_shape: tuple[int, ...], num_classes: int) -> tuple:
    """The shape of the model's output; a model of several outputs is refused, naming them."""
    outputs = _outputs(model, target, input_shape)
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    named = ", ".join(f"{name}: {shape}" for name, shape in outputs.items())
    raise UserError(
        f"model: {target} built a model of {len(outputs)} outputs ({named}): the runner trains "
        f"a classifier of one output, of shape (batch, {num_classes})"
    )


def _outputs(model: Any, target: str, input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """The shapes of the model's outputs, by name: a functional model declares them; a
    subclassed one, or a Sequential without an Input, tells them by running one example of
    zeros."""
    try:
        declared = list(model.outputs)
    except (AttributeError, TypeError):
        pass
    else:
        names = getattr(model, "output_names", None)  # a Sequential has none
        names = names or [f"output {i}" for i in range(len(declared))]
        return {name: tuple(t.shape) for name, t in zip(names, declared, strict=True)}
    try:
        ran = model(np.zeros((1, *input_shape), "float32"), training=False)
    except Exception as error:
        text = str(error).strip()
        raise UserError(
            f"model: the model {target} built fails on one input of shape "
            f"{(1, *input_shape)}: {type(error).__name__}: {text.splitlines()[0] if text else ''}"
        ) from None
    if isinstance(ran, dict):
        return {str(name): tuple(t.shape) for name, t in ran.items()}
    if isinstance(ran, list | tuple):
        return {f"output {i}": tuple(t.shape) for i, t in enumerate(ran)}
    return {"output": tuple(ran.shape)}


def compiled(model: Any, optimizer: Any, loss: Mapping[str, Any], plan: Any) -> Any:
    """`model` compiled as `plan` says, with `optimizer` (a resumed model's own, which keeps its
    state) and the `loss` option's loss, measuring accuracy; the optimizer's variables made."""
    model.compile(
        optimizer=optimizer,
        loss=targets.build(loss, "loss", keys(LossKeys)),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=plan.jit_compile,
        steps_per_execution=plan.steps_per_execution,
    )
    if not model.optimizer.built:
        # Now, not where Keras on TensorFlow would build it, while it traces the first step:
        # a function that creates variables is traced twice (Adam's, for its moments).
        model.optimizer.build(model.trainable_variables)
    return model


def check_loss(model: Any, target: str, x: Any, y: Any) -> None:
    """Score two examples with the compiled loss (the `_target_` `target`) before any run starts:
    a loss that cannot take the data's integer labels (one that wants one-hot targets, say)
    fails here in one line, not inside the first training step as a traceback."""
    try:
        keras.ops.convert_to_numpy(model.loss(y[:2], model(x[:2], training=False)))
    except Exception as error:
        text = str(error).strip()
        raise UserError(
            f"loss: {target} cannot score the model's outputs against the data's "
            f"labels, integers of shape (N,): {type(error).__name__}: "
            f"{text.splitlines()[0] if text else ''}"
        ) from None
