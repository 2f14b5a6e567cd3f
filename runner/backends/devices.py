"""The devices a run trains on, as its backend found them (`runner.backends`), and what `auto`
picks for them: precision, XLA, steps per execution and distribution strategy."""

import math
import os
from dataclasses import dataclass
from typing import Any

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
    cpu_devices: int  # logical CPU devices the backend sees

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
    strategy: str  # single | mirrored (TensorFlow) | data_parallel (JAX)
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


def gpu_memory_mib(index: int) -> int | None:
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


# The device.strategy that replicates the model over every device, by backend.
REPLICATED = {"tensorflow": "mirrored", "jax": "data_parallel"}


def plan(device: Any, devices: Devices, intervals: list[int], backend: str = "tensorflow") -> Plan:
    """Resolve the `auto` settings of the `device` config for `devices` on `backend`;
    `intervals` are the step counts that callbacks act on (trainer.log_every, eval_every,
    checkpoint_every, ...). On JAX, XLA is how Keras runs at all, and `auto` replicates over a
    CPU split into devices as well as over GPUs."""
    replicated = REPLICATED[backend]
    strategy = str(device.strategy)
    if strategy == "auto":
        several = len(devices.gpus) > 1 or (
            backend == "jax" and not devices.gpus and devices.cpu_devices > 1
        )
        strategy = replicated if several else "single"
    elif strategy not in ("single", replicated):
        other = next(name for name, s in REPLICATED.items() if s == strategy)
        raise UserError(
            f"device.strategy={strategy} is for backend={other}; on backend={backend} use "
            f"device.strategy={replicated} (or auto)"
        )
    replicas = (len(devices.gpus) or devices.cpu_devices) if strategy != "single" else 1
    jit = str(device.jit_compile).lower()
    return Plan(
        precision=_precision(str(device.precision), devices),
        jit_compile=jit != "false"
        if backend == "jax"
        else _jit_compile(jit, devices, device.deterministic),
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


def cpu_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, as Linux does)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
