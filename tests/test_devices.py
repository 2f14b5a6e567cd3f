"""Device awareness: what `auto` picks for each device, a mirrored run on two logical CPUs, and
the throughput and system metrics each run records."""

import math
from pathlib import Path

import mlflow
import pytest

from runner.backends import devices
from runner.backends.devices import Devices, Gpu
from runner.cli.train import train
from runner.config.settings import check_config
from runner.errors import UserError
from runner.training.fitting import configured_callbacks, intervals

from .conftest import QUICK, cli, compose_config, only_run

CPU = Devices(gpus=(), cpu_cores=2, cpu_devices=1)


def gpus(*capabilities: tuple[int, int]) -> Devices:
    found = tuple(Gpu(f"GPU {i}", cc, 16_000) for i, cc in enumerate(capabilities))
    return Devices(gpus=found, cpu_cores=16, cpu_devices=1)


def plan(found: Devices, *overrides: str, backend: str = "tensorflow") -> devices.Plan:
    settings = check_config(compose_config(list(overrides)))
    every = intervals(settings.trainer, configured_callbacks(settings.options.callbacks))
    return devices.plan(settings.device, found, every, backend)


@pytest.mark.parametrize(
    ("found", "precision"),
    [
        (CPU, "float32"),
        (gpus((9, 0)), "mixed_bfloat16"),
        (gpus((8, 0)), "mixed_bfloat16"),
        (gpus((7, 5)), "mixed_float16"),
        (gpus((8, 6), (7, 0)), "mixed_float16"),  # the oldest GPU decides
        (gpus((6, 1)), "float32"),
    ],
)
def test_auto_precision_follows_the_compute_capability(found, precision):
    assert plan(found).precision == precision


def test_a_chosen_precision_is_kept_even_on_the_cpu():
    assert plan(CPU, "device.precision=mixed_bfloat16").precision == "mixed_bfloat16"


def test_auto_xla_only_on_gpus_and_only_without_op_determinism():
    assert plan(CPU).jit_compile is False
    assert plan(gpus((9, 0))).jit_compile is False  # deterministic=true is the default
    assert plan(gpus((9, 0)), "device.deterministic=false").jit_compile is True
    assert plan(CPU, "device.jit_compile=true").jit_compile is True
    assert plan(gpus((9, 0)), "device.jit_compile=false").jit_compile is False


def test_auto_steps_per_execution_divides_every_callback_interval():
    assert plan(CPU).steps_per_execution == devices.AUTO_STEPS_PER_EXECUTION
    assert (
        plan(CPU, "callbacks=probabilities", "callbacks.probabilities.every=30").steps_per_execution
        == 10
    )
    assert plan(CPU, "trainer.log_every=7", "trainer.steps=700", "trainer.eval_every=7",
                "trainer.checkpoint_every=7").steps_per_execution == 7  # fmt: skip
    assert plan(CPU, "device.steps_per_execution=20").steps_per_execution == 20


def test_steps_per_execution_that_would_skip_a_logging_step_is_refused():
    with pytest.raises(UserError, match=r"steps_per_execution=30 must divide .*multiples of 100"):
        plan(CPU, "device.steps_per_execution=30")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device.jit_compile=maybe", "device.jit_compile=maybe must be auto, true or false"),
        ("device.steps_per_execution=0", "must be auto or a positive integer"),
        ("device.cpu_devices=0", "device.cpu_devices=0 must be 1 or more"),
    ],
)
def test_bad_device_settings_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        check_config(compose_config([override]))


def test_resuming_between_executions_is_refused():
    from runner.training.fitting import check_resumable

    check_resumable(100, plan(CPU))
    with pytest.raises(UserError, match="step 137, which device.steps_per_execution=50"):
        check_resumable(137, plan(CPU))


def test_strategy_auto_mirrors_over_several_gpus_only():
    assert (plan(gpus((9, 0))).strategy, plan(gpus((9, 0))).replicas) == ("single", 1)
    two = plan(gpus((9, 0), (9, 0)))
    assert (two.strategy, two.replicas) == ("mirrored", 2)
    split_cpu = Devices(gpus=(), cpu_cores=2, cpu_devices=2)
    mirrored = plan(split_cpu, "device.strategy=mirrored")
    assert (mirrored.strategy, mirrored.replicas) == ("mirrored", 2)
    assert mirrored.steps_per_execution == 1
    with pytest.raises(UserError, match="does not work with device.strategy=mirrored"):
        plan(split_cpu, "device.strategy=mirrored", "device.steps_per_execution=10")


def test_on_jax_auto_replicates_over_any_devices_with_xla_always_on():
    split_cpu = Devices(gpus=(), cpu_cores=2, cpu_devices=2)
    two = plan(split_cpu, backend="jax")
    assert (two.strategy, two.replicas, two.jit_compile) == ("data_parallel", 2, True)
    one = plan(CPU, backend="jax")
    assert (one.strategy, one.replicas, one.jit_compile) == ("single", 1, True)
    assert plan(gpus((9, 0), (9, 0)), backend="jax").strategy == "data_parallel"
    assert not plan(CPU, "device.jit_compile=false", backend="jax").jit_compile
    with pytest.raises(UserError, match="mirrored is for backend=tensorflow; on backend=jax use"):
        plan(split_cpu, "device.strategy=mirrored", backend="jax")
    with pytest.raises(UserError, match="data_parallel is for backend=jax; on backend=tensorflow"):
        plan(split_cpu, "device.strategy=data_parallel")


def test_gpu_description_names_the_chip_its_capability_and_memory():
    text = gpus((9, 0)).describe()
    assert text == "1 GPU(s): GPU 0 (compute capability 9.0, 16000 MiB)"
    assert CPU.describe() == "no GPU; CPU with 2 cores"


def test_mirrored_run_on_two_logical_cpus(tmp_path: Path, mnist_dir: Path):
    """The CPU split in two stands in for two GPUs: each step trains 2 x 50 examples."""
    result = cli(
        "runner",
        *QUICK,
        "model=softmax",
        "data.batch_size=50",
        "device.strategy=mirrored",
        "device.cpu_devices=2",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "devices: no GPU; CPU with" in result.stdout
    assert "split into 2 logical devices" in result.stdout
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["plan.strategy"], tags["plan.replicas"]) == ("mirrored", "2")
    assert (tags["device.kind"], tags["device.gpu_count"]) == ("CPU", "0")
    metrics = run.data.metrics
    assert metrics["test/accuracy"] > 0.6
    ratio = metrics["perf/examples_per_sec"] / metrics["perf/steps_per_sec"]
    assert ratio == pytest.approx(100)  # the global batch


def test_each_run_records_throughput_and_system_metrics(in_tmp_store: Path):
    """Throughput is logged at each logging window after the first step; system metrics are
    sampled by MLflow on a thread; nothing claims a GPU that is not there."""
    cfg = compose_config(
        [
            *QUICK,
            "model=softmax",
            "trainer.steps=300",
            "trainer.log_every=100",
            "trainer.eval_every=300",
            "tracking.system_metrics_every_s=0.1",
        ]  # fmt: skip
    )
    train(cfg)
    client = mlflow.MlflowClient()
    run = client.get_run(mlflow.last_active_run().info.run_id)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "perf/steps_per_sec")]
    assert steps == [100, 200, 300]
    assert run.data.metrics["perf/steps_per_sec"] > 0
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert not any("gpu" in key for key in run.data.metrics)
    assert run.data.tags["plan.precision"] == "float32"


def test_system_metrics_can_be_switched_off(in_tmp_store: Path):
    train(compose_config([*QUICK, "model=softmax", "tracking.system_metrics=false"]))
    run = mlflow.last_active_run()
    assert not any(key.startswith("system/") for key in run.data.metrics)


def test_mixed_bfloat16_trains_with_float32_logits(in_tmp_store: Path):
    cfg = compose_config(
        [*QUICK, "model=cnn_layers", "device.precision=mixed_bfloat16", "trainer.log_model=true"]
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    run = mlflow.last_active_run()
    assert run.data.tags["plan.precision"] == "mixed_bfloat16"
    [logged] = mlflow.search_logged_models([run.info.experiment_id], output_format="list")
    model = mlflow.keras.load_model(logged.model_uri)
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.output.dtype == "float32"
