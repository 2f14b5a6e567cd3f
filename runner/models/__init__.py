"""The three tutorial models, built from the `model` config group; they emit logits unless
`model.output=probabilities` puts a softmax on top, as the R edition of the tutorial does."""

from typing import Any

MODEL_NAMES = ("softmax", "cnn_raw", "cnn_layers")


def register_custom_objects() -> None:
    """Make the runner's own layers and losses known to Keras, which a saved model refers to by
    name: call before loading one."""
    import runner.fused_adam  # noqa: F401
    import runner.models.cnn_raw  # noqa: F401
    import runner.models.losses  # noqa: F401


def build(cfg: Any) -> Any:
    """A fresh, uncompiled `keras.Model` mapping (batch, 784) pixels to (batch, 10) outputs."""
    model = _build_logits_model(cfg)
    if cfg.output == "logits":
        return model
    import keras

    probabilities = keras.layers.Softmax(name="probabilities", dtype="float32")(model.output)
    return keras.Model(model.input, probabilities, name=model.name)


def _build_logits_model(cfg: Any) -> Any:
    if cfg.name == "softmax":
        from runner.models.softmax import build_softmax

        return build_softmax()
    if cfg.name == "cnn_raw":
        from runner.models.cnn_raw import build_cnn_raw

        return build_cnn_raw(cfg.keep_prob, cfg.init_stddev, cfg.bias_init)
    if cfg.name == "cnn_layers":
        from runner.models.cnn_layers import build_cnn_layers

        return build_cnn_layers(cfg.dropout_rate)
    raise ValueError(f"model.name={cfg.name!r} is not one of {', '.join(MODEL_NAMES)}")


def compiled(cfg: Any, plan: Any, model: Any = None) -> Any:
    """`model` (else a fresh one) compiled as `plan` says, with the configured loss, measuring
    accuracy; a loaded model keeps its optimizer and so its state."""
    import keras

    from runner import optim

    model = model or build(cfg.model)
    model.compile(
        optimizer=getattr(model, "optimizer", None)
        or optim.build(cfg.optimizer, cfg.trainer.steps),
        loss=loss(cfg.trainer.loss),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=plan.jit_compile,
        steps_per_execution=plan.steps_per_execution,
    )
    return model


def loss(name: str) -> Any:
    """The training loss named by `trainer.loss`."""
    import keras

    if name == "sparse_softmax_cross_entropy":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if name == "cross_entropy_of_probabilities":
        from runner.models.losses import cross_entropy_of_probabilities

        return cross_entropy_of_probabilities
    raise ValueError(f"trainer.loss={name!r} is unknown")
