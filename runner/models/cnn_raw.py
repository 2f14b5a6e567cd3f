"""The raw-ops CNN of "Deep MNIST for Experts": hand-made weights, computed with `keras.ops`.

The tutorial builds its weights with `weight_variable` (truncated normal, stddev 0.1) and
`bias_variable` (constant 0.1) and wires `tf.nn.conv2d`, `max_pool` and `matmul` by hand. These
layers keep that: each creates its weights with `add_weight` and computes with `keras.ops`, so
the model is plain Keras (saves, loads, distributes) yet reads like the tutorial. Two changes of
order make it faster without changing what it computes: conv layers pool before adding the bias,
and dense layers take their input gradient through TensorFlow's einsum.
"""

import keras
from keras import ops

from runner.models.heads import emitting


class _RawLayer(keras.layers.Layer):
    """Holds the tutorial's two initialisers."""

    def __init__(self, init_stddev: float, bias_init: float, **kwargs):
        super().__init__(**kwargs)
        self.init_stddev = init_stddev
        self.bias_init = bias_init

    def _weights(self, kernel_shape: tuple[int, ...]) -> None:
        self.kernel = self.add_weight(
            shape=kernel_shape,
            initializer=keras.initializers.TruncatedNormal(stddev=self.init_stddev),
            name="kernel",
        )
        self.bias = self.add_weight(
            shape=(kernel_shape[-1],),
            initializer=keras.initializers.Constant(self.bias_init),
            name="bias",
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "init_stddev": self.init_stddev,
            "bias_init": self.bias_init,
        }


@keras.saving.register_keras_serializable(package="runner")
class ConvReluPool(_RawLayer):
    """relu(conv2d(x, W, stride 1, SAME) + b), then 2x2 max-pool with stride 2."""

    def __init__(self, filters: int, kernel_size: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size

    def build(self, input_shape: tuple) -> None:
        self._weights((self.kernel_size, self.kernel_size, input_shape[-1], self.filters))

    def call(self, x):
        # Max-pooling commutes with adding a per-channel bias and with ReLU (both monotone), so
        # pooling first computes the tutorial's pool(relu(conv + b)) exactly, with the bias, the
        # ReLU and their gradients on a quarter of the values.
        x = ops.max_pool(
            ops.conv(x, self.kernel, strides=1, padding="same"),
            pool_size=2,
            strides=2,
            padding="same",
        )
        return ops.relu(x + self.bias)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        def half(n):
            return None if n is None else (n + 1) // 2

        return (input_shape[0], half(input_shape[1]), half(input_shape[2]), self.filters)

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="runner")
class RawDense(_RawLayer):
    """matmul(x, W) + b, with an optional ReLU."""

    def __init__(self, units: int, relu: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.relu = relu

    def build(self, input_shape: tuple) -> None:
        self._weights((input_shape[-1], self.units))

    def call(self, x):
        y = _matmul(x, self.kernel) + self.bias
        return ops.relu(y) if self.relu else y

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units, "relu": self.relu}


def _matmul(x, kernel):
    """`x @ kernel`. On TensorFlow its input gradient is `einsum("bn,kn->bk", upstream, kernel)`:
    the same sums as MatMul's own gradient, `upstream @ kernel^T`, which oneDNN computes slower
    for fc1's 3.2M weights on the CPU, apparently by transposing the kernel first
    (docs/performance.md has the measurements)."""
    if keras.backend.backend() != "tensorflow":
        return ops.matmul(x, kernel)
    import tensorflow as tf

    @tf.custom_gradient
    def matmul(x, kernel):
        def grad(upstream):
            dx = tf.einsum("bn,kn->bk", upstream, kernel)
            return dx, tf.matmul(x, upstream, transpose_a=True)

        return tf.matmul(x, kernel), grad

    return matmul(x, tf.convert_to_tensor(kernel))  # a tensor: the variable stays outside


@keras.saving.register_keras_serializable(package="runner")
class KeepProbDropout(keras.layers.Layer):
    """`tf.nn.dropout(x, keep_prob)`: keeps each unit with probability keep_prob, scaled by
    1/keep_prob, in training only."""

    def __init__(self, keep_prob: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.keep_prob = keep_prob
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training: bool = False):
        if not training or self.keep_prob == 1.0:
            return x
        return keras.random.dropout(x, rate=1.0 - self.keep_prob, seed=self.seed_generator)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "keep_prob": self.keep_prob, "seed": self.seed}


def build_cnn_raw(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    keep_prob: float = 0.5,
    init_stddev: float = 0.1,
    bias_init: float = 0.1,
    output: str = "logits",
) -> keras.Model:
    """Two 5x5 convolutions (32 and 64 filters) with ReLU, each max-pooled by 2, a 1024-wide
    ReLU layer with dropout, then the logits."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob} must be in (0, 1]; 1 turns dropout off")
    init = {"init_stddev": init_stddev, "bias_init": bias_init}
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = ConvReluPool(32, name="conv1", **init)(inputs)
    x = ConvReluPool(64, name="conv2", **init)(x)
    x = keras.layers.Flatten()(x)
    x = RawDense(1024, relu=True, name="fc1", **init)(x)
    x = KeepProbDropout(keep_prob, name="dropout")(x)
    logits = RawDense(num_classes, name="logits", dtype="float32", **init)(x)  # float32 under mixed
    return emitting(keras.Model(inputs, logits, name="cnn_raw"), output)
