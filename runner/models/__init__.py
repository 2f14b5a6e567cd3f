"""The three tutorial models, each a builder that `conf/model/` names by `_target_`.

A builder takes the data's `input_shape` and `num_classes` (and its own keys) and returns an
uncompiled `keras.Model`, as a user's builder does. These emit logits unless `output` is
"probabilities", which puts a softmax on top, as the R edition of the tutorial does.
"""


def register_custom_objects() -> None:
    """Make the runner's own layers and losses known to Keras, which a saved model refers to by
    name: call before loading one."""
    import runner.fused_adam  # noqa: F401
    import runner.models.cnn_raw  # noqa: F401
    import runner.models.losses  # noqa: F401
