"""Building from `_target_`: what a config gives is checked against the callable before it runs,
and each failure is one line naming the config key."""

import pytest
from omegaconf import OmegaConf

from runner.errors import UserError
from runner.targets import build, label


def builder(input_shape: tuple[int, ...], num_classes: int, width: int = 8, rate: float = 0.5):
    """A stand-in builder: returns what it was given."""
    return {"input_shape": input_shape, "num_classes": num_classes, "width": width, "rate": rate}


def raising_builder(input_shape, num_classes):
    raise ValueError("no such layer: Dense3\nsecond line")


def needs_depth(input_shape, num_classes, depth: int):
    return depth


def takes_nothing(width: int = 1):
    return width


def node(target: str, **keys):
    return OmegaConf.create({"_target_": target, **keys})


GIVEN = {"input_shape": (12, 12, 3), "num_classes": 5}


def test_keys_reach_the_target_with_what_the_runner_gives_as_it_is():
    built = build(
        node("tests.test_targets.builder", width=4, name="mine"), "model", ["name"], **GIVEN
    )
    assert built == {"input_shape": (12, 12, 3), "num_classes": 5, "width": 4, "rate": 0.5}
    assert isinstance(built["input_shape"], tuple)


def scaled(input_shape, num_classes, width: int = 8, rate: float | None = None, scale=1.0):
    return width, rate, scale


def test_an_integer_for_a_float_parameter_arrives_as_a_float():
    """By annotation or by a float default, as Keras's classes declare theirs: Keras refuses
    `learning_rate=1`; an int parameter keeps its int."""
    keys = {"width": 3, "rate": 1, "scale": 2}
    width, rate, scale = build(node("tests.test_targets.scaled", **keys), "model", **GIVEN)
    assert (type(width), type(rate), type(scale)) == (int, float, float)
    assert (width, rate, scale) == (3, 1.0, 2.0)


def test_passed_keys_reach_only_targets_that_take_them():
    built = build(
        node("tests.test_targets.builder"), "model", passed={"rate": 0.1, "output": "x"}, **GIVEN
    )
    assert built["rate"] == 0.1


@pytest.mark.parametrize(
    ("target", "keys", "message"),
    [
        ("tests.test_targets.builder", {"widht": 3}, "model.widht is not a parameter of"),
        ("tests.test_targets.builder", {"width": "wide"}, "model.width='wide' is not of type int"),
        ("tests.test_targets.builder", {"rate": True}, "model.rate=True is not of type float"),
        ("tests.test_targets.needs_depth", {}, "model.depth is missing"),
        ("tests.test_targets.takes_nothing", {}, "must take input_shape and num_classes"),
        ("nowhere_pkg.build", {}, "model._target_=nowhere_pkg.build cannot be imported"),
        ("tests.test_targets.no_such", {}, "tests.test_targets holds no 'no_such'"),
        (
            "tests.test_targets.raising_builder",
            {},
            "model: tests.test_targets.raising_builder raised ValueError: no such layer: Dense3",
        ),
    ],
)
def test_a_bad_target_or_key_is_one_line_naming_it(target, keys, message):
    with pytest.raises(UserError) as error:
        build(node(target, **keys), "model", **GIVEN)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_unknown_key_message_lists_the_keys_the_target_takes():
    with pytest.raises(UserError, match=r"it takes: width, rate\)"):
        build(node("tests.test_targets.builder", widht=3), "model", **GIVEN)


def test_a_target_with_keyword_arguments_takes_any_key():
    built = build(node("builtins.dict", anything=1), "callbacks.mine")
    assert built == {"anything": 1}


def test_a_node_without_target_is_refused():
    with pytest.raises(UserError, match="callbacks.mine names no _target_"):
        build(OmegaConf.create({"every": 3}), "callbacks.mine")


def test_label_is_the_name_else_the_targets_own_name():
    assert label(node("pkg.mod.build_net", name="net")) == "net"
    assert label(node("pkg.mod.build_net")) == "build_net"


def test_a_target_whose_module_does_not_import_says_why(tmp_path, monkeypatch):
    (tmp_path / "broken_net.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as error:
        build(node("broken_net.build"), "model", **GIVEN)
    assert str(error.value).startswith(
        "model._target_=broken_net.build: importing broken_net raised SyntaxError"
    )


def not_a_callback():
    return 42


def test_a_callback_target_must_give_a_keras_callback():
    from runner.training.fitting import configured_callbacks

    options = {"h": {"_target_": "tests.test_targets.not_a_callback"}}
    with pytest.raises(
        UserError, match="callbacks.h: .*not_a_callback returned a int, not a keras"
    ):
        configured_callbacks(options)
