"""What a tutorial model's last layer emits: its logits, or their softmax."""

from typing import Any


def emitting(model: Any, output: str) -> Any:
    """`model`, whose last layer emits logits, as emitting `output`: the logits themselves, or
    their softmax ("probabilities")."""
    if output == "logits":
        return model
    if output != "probabilities":
        raise ValueError(f"output={output!r} must be logits or probabilities")
    import keras

    probabilities = keras.layers.Softmax(name="probabilities", dtype="float32")(model.output)
    return keras.Model(model.input, probabilities, name=model.name)
