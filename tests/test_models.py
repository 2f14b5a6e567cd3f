"""The three tutorial models: shapes, parameter counts, initialisers and dropout as published."""

from types import SimpleNamespace

import keras
import numpy as np
import pytest

from runner.config.settings import check_config
from runner.models.cnn_raw import ConvReluPool, KeepProbDropout, RawDense
from runner.training import modeling, optim

from .conftest import compose_config

PARAMETERS = {"softmax": 7_850, "cnn_raw": 3_274_634, "cnn_layers": 3_274_634}


def build(name: str) -> keras.Model:
    return modeling.build(compose_config([f"model={name}"]).model, (28, 28, 1), 10)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_count_and_logits_shape(name):
    model = build(name)
    assert model.count_params() == PARAMETERS[name]
    logits = model(np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32))
    assert tuple(logits.shape) == (3, 10)


def test_softmax_starts_at_zero_and_predicts_uniformly():
    model = build("softmax")
    assert all(not np.any(w) for w in model.get_weights())
    probabilities = keras.ops.softmax(model(np.ones((1, 28, 28, 1), np.float32)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probabilities), 0.1)


def test_cnn_raw_uses_the_tutorials_initialisers():
    keras.utils.set_random_seed(0)
    model = build("cnn_raw")
    kernels = [layer.kernel.numpy() for layer in model.layers if hasattr(layer, "kernel")]
    biases = [layer.bias.numpy() for layer in model.layers if hasattr(layer, "bias")]
    assert [k.shape for k in kernels] == [(5, 5, 1, 32), (5, 5, 32, 64), (3136, 1024), (1024, 10)]
    for bias in biases:
        np.testing.assert_allclose(bias, 0.1)
    fc1 = kernels[2]
    assert np.abs(fc1).max() <= 0.2 + 1e-6, "truncated at two standard deviations"
    # A normal(0, 0.1) truncated at +-2 sigma has a standard deviation of 0.088.
    assert fc1.std() == pytest.approx(0.088, abs=0.002)


@pytest.mark.parametrize("name", ["cnn_raw", "cnn_layers"])
def test_dropout_only_while_training(name):
    keras.utils.set_random_seed(1)
    model = build(name)
    x = np.random.default_rng(1).random((4, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=True))


def test_cnn_raw_keep_prob_keeps_that_fraction():
    layer = KeepProbDropout(0.5, seed=3)
    kept = keras.ops.convert_to_numpy(layer(np.ones((200, 1024), np.float32), training=True))
    assert set(np.unique(kept)) == {0.0, 2.0}, "kept units are scaled by 1 / keep_prob"
    assert (kept > 0).mean() == pytest.approx(0.5, abs=0.01)


def test_cnn_raw_round_trips_through_keras_saving(tmp_path):
    model = build("cnn_raw")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(2).random((2, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


def optimizer_of(cfg):
    """The optimizer `cfg` trains with, for a run of 100 steps."""
    settings = check_config(cfg)
    return optim.build(settings.options.optimizer, settings.optimizer, 100)


def test_optimizers_carry_the_configured_knobs():
    adam = optimizer_of(compose_config(["optimizer=adam", "optimizer.lr=3e-4"]))
    assert isinstance(adam, keras.optimizers.Adam)
    assert float(adam.learning_rate) == pytest.approx(3e-4)
    assert adam.epsilon == 1e-8
    sgd = optimizer_of(compose_config(["optimizer.momentum=0.9"]))
    assert isinstance(sgd, keras.optimizers.SGD)
    assert (float(sgd.learning_rate), sgd.momentum) == (0.5, 0.9)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer.lr=1"],
        ["optimizer.lr=1", "optimizer.momentum=1", "optimizer.schedule=cosine"],
        ["optimizer=adam", "optimizer.lr=1", "optimizer.epsilon=1"],
    ],
)
def test_integers_for_float_keys_build_optimizers_that_step(overrides):
    """YAML and the command line read `1` as an integer, which Keras refuses for a rate."""
    cfg = compose_config(overrides)
    optimizer = optimizer_of(cfg)
    variable = keras.Variable(np.ones(3, np.float32))
    optimizer.apply([np.full(3, 0.5, np.float32)], [variable])
    assert not np.allclose(variable.numpy(), 1.0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_adam_updates_as_keras_adam_does(amsgrad):
    """Same formula, one kernel: the weights after a few steps agree to float rounding."""
    from runner.fused_adam import FusedAdam

    rng = np.random.default_rng(3)
    start = rng.normal(size=(300, 40)).astype("float32")
    grads = [rng.normal(size=start.shape).astype("float32") for _ in range(4)]
    weights = []
    for optimizer in (
        keras.optimizers.Adam(1e-2, epsilon=1e-8, amsgrad=amsgrad),
        FusedAdam(1e-2, epsilon=1e-8, amsgrad=amsgrad),
    ):
        variable = keras.Variable(start)
        for grad in grads:
            optimizer.apply([grad], [variable])
        weights.append(variable.numpy())
    assert not np.allclose(weights[0], start)
    np.testing.assert_allclose(weights[1], weights[0], rtol=1e-6, atol=1e-6)  # weights ~ 1


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [0.01, 0.01, 0.01, 0.01]),
        ("constant", 10, [0.0, 0.005, 0.01, 0.01]),
        ("cosine", 10, [0.0, 0.005, 0.01, 0.0]),
        (
            "cosine",
            0,
            [
                0.01,
                0.01 * (1 + np.cos(np.pi * 5 / 110)) / 2,
                0.01 * (1 + np.cos(np.pi * 10 / 110)) / 2,
                0.0,
            ],
        ),
    ],
)
def test_learning_rate_schedules(schedule, warmup, expected):
    """Rates at steps 0, 5, 10 and 110, the last step of a 110-step run."""
    rate = optim.learning_rate(0.01, schedule, warmup, 110)
    at = [float(rate(step)) if callable(rate) else rate for step in (0, 5, 10, 110)]
    np.testing.assert_allclose(at, expected, atol=1e-7)


def _tutorial_order(layer, x):
    """What the tutorial computes: relu(conv(x) + b) or relu(x @ W + b), then for a conv layer
    the 2x2 max-pool."""
    from keras import ops

    if isinstance(layer, ConvReluPool):
        y = ops.relu(ops.conv(x, layer.kernel, strides=1, padding="same") + layer.bias)
        return ops.max_pool(y, pool_size=2, strides=2, padding="same")
    return ops.relu(ops.matmul(x, layer.kernel) + layer.bias)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (ConvReluPool(64, init_stddev=0.1, bias_init=0.1), (6, 14, 14, 32)),
        (RawDense(1024, relu=True, init_stddev=0.1, bias_init=0.1), (6, 3136)),
    ],
    ids=["conv-pools-first", "dense-einsum-gradient"],
)
def test_cnn_raw_layers_compute_the_tutorials_function_and_gradients(layer, shape):
    """The layers reorder (pool before bias and ReLU) and regroup (the input gradient) the
    tutorial's arithmetic for speed; outputs and gradients must be the tutorial's, to float32's
    rounding of sums of hundreds of terms: 1e-5 of each array's largest value (here the two
    orders differ by at most 7e-7 of it, over 15 seeds)."""
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    x = tf.constant(np.random.default_rng(4).normal(size=shape).astype("float32"))
    layer.build(shape)
    results = []
    for compute in (layer, lambda inputs: _tutorial_order(layer, inputs)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = compute(x)
            loss = tf.reduce_sum(y * tf.cos(y))  # a non-uniform upstream gradient
        results.append([y, *tape.gradient(loss, [x, *layer.trainable_variables])])
    for ours, tutorial in zip(*results, strict=True):
        scale = float(np.abs(tutorial).max())
        np.testing.assert_allclose(ours, tutorial, rtol=1e-5, atol=1e-5 * scale)


def test_any_keras_optimizer_joins_by_target_with_its_own_arguments():
    cfg = compose_config(
        [
            "model=cnn_raw",
            "optimizer._target_=keras.optimizers.AdamW",
            "+optimizer.weight_decay=0.01",
            "optimizer.lr=3e-4",
        ]
    )
    adamw = optimizer_of(cfg)
    assert type(adamw) is keras.optimizers.AdamW
    assert (adamw.weight_decay, adamw.epsilon) == (0.01, 1e-8)
    assert float(adamw.learning_rate) == pytest.approx(3e-4)


def test_each_model_brings_its_tutorials_optimizer_unless_told_otherwise():
    picked = {
        name: (cfg.optimizer.name, cfg.optimizer.lr)
        for name in ("softmax", "cnn_raw", "cnn_layers")
        for cfg in [compose_config([f"model={name}"])]
    }
    assert picked == {
        "softmax": ("sgd", 0.5),
        "cnn_raw": ("adam", 1e-4),
        "cnn_layers": ("sgd", 1e-3),
    }
    assert compose_config(["model=cnn_raw"]).optimizer.epsilon == 1e-8
    chosen = compose_config(["model=cnn_layers", "optimizer=adam"]).optimizer
    assert (chosen.name, chosen.lr) == ("adam", 1e-4)
    assert compose_config(["model=cnn_layers", "optimizer.lr=0.2"]).optimizer.lr == 0.2


def smoothed_cross_entropy(smoothing: float) -> keras.losses.Loss:
    """A user's loss: cross-entropy against label-smoothed targets, named by `loss._target_`."""

    def loss(labels, logits):
        labels = keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32")
        targets = keras.ops.one_hot(labels, logits.shape[-1])
        return keras.losses.categorical_crossentropy(
            targets, logits, from_logits=True, label_smoothing=smoothing
        )

    return loss


def test_a_users_loss_joins_by_target(in_tmp_store):
    from runner.cli.train import train

    from .conftest import QUICK, only_run

    cfg = compose_config(
        [
            *QUICK,
            f"tracking.uri=sqlite:///{in_tmp_store}/mlflow.db",  # MLflow caches a relative one
            "loss._target_=tests.test_models.smoothed_cross_entropy",
            "~loss.from_logits",
            "+loss.smoothing=0.1",
        ]
    )
    final = train(cfg)
    run = only_run(in_tmp_store)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss._target_"] == "tests.test_models.smoothed_cross_entropy"
    assert final["test/accuracy"] > 0.5  # 30 steps learn with it


class Subclassed(keras.Model):
    """A model written as a subclass, whose output shape Keras knows only once it has run."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.flatten, self.dense = keras.layers.Flatten(), keras.layers.Dense(num_classes)

    def call(self, x):
        return self.dense(self.flatten(x))


def subclassed(input_shape, num_classes):
    return Subclassed(num_classes)


def sequential_without_input(input_shape, num_classes):
    return keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(num_classes)])


def too_few_outputs(input_shape, num_classes):
    return keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(num_classes - 1)])


def compiled_already(input_shape, num_classes):
    model = sequential_without_input(input_shape, num_classes)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("builder", ["subclassed", "sequential_without_input"])
def test_a_model_of_any_keras_kind_builds(builder):
    from omegaconf import OmegaConf

    model = modeling.build(
        OmegaConf.create({"_target_": f"tests.test_models.{builder}"}), (12, 12, 3), 5
    )
    assert tuple(model(np.zeros((2, 12, 12, 3), np.float32)).shape) == (2, 5)


@pytest.mark.parametrize("builder", ["softmax", "subclassed", "sequential_without_input"])
def test_training_with_adam_traces_its_step_once(builder):
    """Adam's moments are made as the model is compiled: made while Keras traced the first step,
    they made TensorFlow trace it twice."""
    from omegaconf import OmegaConf

    cfg = compose_config(["optimizer=adam"])
    target = f"tests.test_models.{builder}" if builder != "softmax" else cfg.model._target_
    model = modeling.build(OmegaConf.create({"_target_": target}), (28, 28, 1), 10)
    plan = SimpleNamespace(jit_compile=False, steps_per_execution=2)
    modeling.compiled(model, optimizer_of(cfg), cfg.loss, plan)
    traced = []
    step = model.train_step

    def counted(data):
        traced.append(data)
        return step(data)

    model.train_step = counted
    x, y = np.zeros((8, 28, 28, 1), np.float32), np.arange(8) % 10
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert len(traced) == 1
    assert int(model.optimizer.iterations) == 4


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        ("too_few_outputs", "output has shape (1, 4), not (batch, 5)"),
        ("compiled_already", "returned a compiled model: return it uncompiled"),
    ],
)
def test_a_model_the_runner_cannot_train_is_refused(builder, message):
    from omegaconf import OmegaConf

    from runner.errors import UserError

    with pytest.raises(UserError) as error:
        modeling.build(
            OmegaConf.create({"_target_": f"tests.test_models.{builder}"}), (12, 12, 3), 5
        )
    assert message in str(error.value)


def two_outputs(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    features = keras.layers.Flatten()(inputs)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs, [logits, keras.layers.Dense(1, name="aux")(features)])


class TwoHeads(Subclassed):
    def call(self, x):
        return self.dense(self.flatten(x)), self.flatten(x)


def subclassed_two_outputs(input_shape, num_classes):
    return TwoHeads(num_classes)


def built_for_cifar(input_shape, num_classes):
    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs)))


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        (
            "two_outputs",
            "built a model of 2 outputs (logits: (None, 10), aux: (None, 1)): the runner trains "
            "a classifier of one output, of shape (batch, 10)",
        ),
        (
            "subclassed_two_outputs",
            "built a model of 2 outputs (output 0: (1, 10), output 1: (1, 784)): the runner "
            "trains a classifier of one output, of shape (batch, 10)",
        ),
        (
            "built_for_cifar",
            "built a model whose input has shape (None, 32, 32, 3), not (batch, 28, 28, 1), the "
            "data's images: build it for the input_shape the runner passes",
        ),
    ],
    ids=["two-outputs", "subclassed-two-outputs", "fixed-input-shape"],
)
def test_a_model_of_other_outputs_or_inputs_than_the_data_needs_is_named(builder, message):
    """Refused as it is built, naming its outputs or its input shape, rather than failing
    later as the loss meets them."""
    from omegaconf import OmegaConf

    from runner.errors import UserError

    target = f"tests.test_models.{builder}"
    with pytest.raises(UserError) as error:
        modeling.build(OmegaConf.create({"_target_": target}), (28, 28, 1), 10)
    assert str(error.value) == f"model: {target} {message}"


def test_a_loss_that_cannot_take_integer_labels_is_refused_before_the_run():
    cfg = compose_config(["loss._target_=keras.losses.CategoricalFocalCrossentropy"])
    model = modeling.build(cfg.model, (28, 28, 1), 10)
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalFocalCrossentropy())
    x, y = np.zeros((2, 28, 28, 1), np.float32), np.array([3, 1])
    from runner.errors import UserError

    with pytest.raises(UserError, match="loss: keras.losses.CategoricalFocalCrossentropy cannot"):
        modeling.check_loss(model, cfg.loss._target_, x, y)


def ends_in_softmax(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs)


def test_a_model_ending_in_softmax_must_say_it_emits_probabilities():
    """Else the loss would take its probabilities for logits and softmax them again."""
    from omegaconf import OmegaConf

    from runner.errors import UserError

    target = {"_target_": "tests.test_models.ends_in_softmax"}
    with pytest.raises(UserError, match="ends in a softmax, so it emits probabilities"):
        modeling.build(OmegaConf.create(target), (12, 12, 3), 5)
    said = OmegaConf.create({**target, "output": "probabilities"})
    assert modeling.build(said, (12, 12, 3), 5).output_shape == (None, 5)
    softmax = compose_config(["model=softmax", "model.output=probabilities"]).model
    assert modeling.build(softmax, (28, 28, 1), 10).layers[-1].name == "probabilities"


def test_a_model_without_its_run_is_read_as_its_last_layer_says():
    """runner-predict softmaxes a model's outputs unless it emits probabilities: one without a
    run to say so is judged by the same rule that training checks, a softmax layer or a layer
    whose activation is one (only the first counted, and such a model's probabilities were
    softmaxed again)."""
    from runner.models import classifier
    from runner.tracking import logged_model

    def emitted(model: keras.Model) -> str:
        return logged_model.emitted(logged_model.LoggedModel(model, "a/folder", None))

    assert emitted(ends_in_softmax((12, 12, 3), 5)) == classifier.PROBABILITIES
    assert emitted(build("cnn_layers")) == classifier.LOGITS
    said = compose_config(["model=softmax", "model.output=probabilities"]).model
    assert emitted(modeling.build(said, (28, 28, 1), 10)) == classifier.PROBABILITIES
    outputs = np.array([[0.0, np.log(3.0)], [5.0, 5.0]], np.float32)
    probabilities = classifier.probabilities(outputs, classifier.LOGITS)
    np.testing.assert_allclose(probabilities, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)
    assert classifier.probabilities(probabilities, classifier.PROBABILITIES) is probabilities
    np.testing.assert_allclose(
        classifier.logits(probabilities, classifier.PROBABILITIES), np.log(probabilities)
    )
    assert classifier.accuracy(outputs, np.array([1, 1])) == 0.5
