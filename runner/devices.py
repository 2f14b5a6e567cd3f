"""The devices TensorFlow trains on, and what `auto` picks for them: precision, XLA, steps per
execution and distribution strategy."""

import contextlib
import math
from dataclasses import dataclass
from typing import Any

from runner.environment import cpu_cores
from runner.errors import UserError

# Largest steps_per_execution that `auto` picks: it cuts Python's share of a small model's step
# most (docs/performance.md); callbacks see only every Nth step.
AUTO_STEPS_PER_EXECUTION = 50


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int] | None
    memory_mib: int | None


@dataclass(frozen=True)
class Devices:
    gpus: tuple[Gpu, ...]
    cpu_cores: int
    cpu_devices: int  # logical CPU devices TensorFlow sees

    def describe(self) -> str:
        if not self.gpus:
            split = f", split into {self.cpu_devices} logical devices" * (self.cpu_devices > 1)
            return f"no GPU; CPU with {self.cpu_cores} cores{split}"
        return f"{len(self.gpus)} GPU(s): " + "; ".join(map(_describe_gpu, self.gpus))

    def tags(self) -> dict[str, str]:
        return {
            "device.kind": "GPU" if self.gpus else "CPU",
            "device.gpu_count": str(len(self.gpus)),
            "device.gpus": "; ".join(map(_describe_gpu, self.gpus)) or "none",
            "device.cpu_cores": str(self.cpu_cores),
        }


@dataclass(frozen=True)
class Plan:
    """What a run trains with, `auto` resolved."""

    precision: str
    jit_compile: bool
    steps_per_execution: int
    strategy: str  # single | mirrored
    replicas: int

    def describe(self) -> str:
        return (
            f"precision {self.precision}, XLA {'on' if self.jit_compile else 'off'}, "
            f"{self.steps_per_execution} step(s) per execution, strategy {self.strategy} "
            f"({self.replicas} replica(s))"
        )

    def tags(self) -> dict[str, str]:
        return {f"plan.{key}": str(value) for key, value in vars(self).items()}


def _describe_gpu(gpu: Gpu) -> str:
    details = []
    if gpu.compute_capability:
        details.append("compute capability {}.{}".format(*gpu.compute_capability))
    if gpu.memory_mib:
        details.append(f"{gpu.memory_mib} MiB")
    return f"{gpu.name} ({', '.join(details)})" if details else gpu.name


def detect(cpu_devices: int = 1) -> Devices:
    """The devices TensorFlow sees, with GPU memory growth on (so that sweep jobs can share a
    GPU) and the CPU split into `cpu_devices` logical devices. Call before anything runs on
    them: TensorFlow fixes its devices at first use."""
    import tensorflow as tf

    physical_gpus = tf.config.list_physical_devices("GPU")
    for gpu in physical_gpus:
        # RuntimeError: already initialized, by an earlier job in this process
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    _split_cpu(tf, cpu_devices)
    gpus = tuple(_gpu(tf, gpu, index) for index, gpu in enumerate(physical_gpus))
    return Devices(gpus, cpu_cores(), len(tf.config.list_logical_devices("CPU")))


def _split_cpu(tf: Any, count: int) -> None:
    if count == 1:
        return
    [cpu] = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UserError(
                f"device.cpu_devices={count} cannot take effect: TensorFlow already set up "
                f"its devices in this process (a reused sweep worker); run it in a new process"
            ) from None


def _gpu(tf: Any, device: Any, index: int) -> Gpu:
    details = tf.config.experimental.get_device_details(device)
    return Gpu(
        details.get("device_name", device.name),
        details.get("compute_capability"),
        _gpu_memory_mib(index),
    )


def _gpu_memory_mib(index: int) -> int | None:
    """Total memory of GPU `index` from NVML (nvidia-ml-py, in the `gpu` extra), if present."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // 2**20
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: memory is left out of the report
        return None


def plan(device: Any, devices: Devices, intervals: list[int]) -> Plan:
    """Resolve the `auto` settings of the `device` config for `devices`; `intervals` are the
    step counts that callbacks act on (trainer.log_every, eval_every, checkpoint_every, ...)."""
    strategy = str(device.strategy)
    if strategy == "auto":
        strategy = "mirrored" if len(devices.gpus) > 1 else "single"
    replicas = (len(devices.gpus) or devices.cpu_devices) if strategy == "mirrored" else 1
    return Plan(
        precision=_precision(str(device.precision), devices),
        jit_compile=_jit_compile(str(device.jit_compile).lower(), devices, device.deterministic),
        steps_per_execution=_steps_per_execution(
            str(device.steps_per_execution), intervals, mirrored=strategy == "mirrored"
        ),
        strategy=strategy,
        replicas=replicas,
    )


def _precision(setting: str, devices: Devices) -> str:
    if setting != "auto":
        return setting
    capabilities = [gpu.compute_capability or (0, 0) for gpu in devices.gpus]
    if not capabilities:
        return "float32"
    oldest = min(capabilities)
    if oldest >= (8, 0):
        return "mixed_bfloat16"
    return "mixed_float16" if oldest >= (7, 0) else "float32"


def _jit_compile(setting: str, devices: Devices, deterministic: bool) -> bool:
    if setting != "auto":
        return setting == "true"
    return bool(devices.gpus) and not deterministic


def _steps_per_execution(setting: str, intervals: list[int], mirrored: bool) -> int:
    """The configured number; for auto, the largest up to AUTO_STEPS_PER_EXECUTION that divides
    every interval a callback acts on, so none of them falls inside an execution. Mirrored
    training takes one step per execution: with more, Keras 3.15's multi-step loop fails under
    MirroredStrategy ("You must feed a value for placeholder tensor ...")."""
    common = math.gcd(*intervals)
    if setting == "auto":
        limit = 1 if mirrored else AUTO_STEPS_PER_EXECUTION
        return max(d for d in range(1, limit + 1) if common % d == 0)
    steps = int(setting)
    if mirrored and steps > 1:
        raise UserError(
            f"device.steps_per_execution={steps} does not work with device.strategy=mirrored "
            f"in Keras 3.15; use device.steps_per_execution=1 (or auto)"
        )
    if common % steps:
        raise UserError(
            f"device.steps_per_execution={steps} must divide trainer.log_every, eval_every, "
            f"checkpoint_every and each callback's interval (all multiples of {common}); "
            f"try device.steps_per_execution=auto"
        )
    return steps


def distribution(plan: Plan) -> Any:
    """The `tf.distribute` strategy whose scope the model is built in."""
    import tensorflow as tf

    if plan.strategy == "single":
        return tf.distribute.get_strategy()  # the default: one device, no replication
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])
