"""The doctor's GPU checks: torch's view of the GPUs, and NVML's of ``cuda:0``.

Each check takes a :class:`Gpu` (:func:`open_gpu` initialises NVML once for all of them) and
returns an :data:`Outcome`; :mod:`harness.doctor` names them, says what they affect and runs
them. Only NVML and ``torch.cuda`` are touched here, so tests replace exactly those calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

NO_CUDA = "no CUDA device"
GB = 1024**3
#: Other processes holding this share of the GPU's memory make the run unfit.
PROCESS_MEMORY_FAIL = 0.5
#: An enforced power limit below this share of the default is a fail.
POWER_FAIL = 0.75
#: Degrees below the slowdown temperature from which the GPU is reported hot.
TEMPERATURE_MARGIN_C = 10
#: NVML clock event reasons that mean the GPU is slowed down right now (nvml.h).
_SLOWDOWN_REASONS: dict[int, str] = {
    0x08: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
}
_APPLICATIONS_CLOCKS = 0x02  # clocks held by the applications-clocks / locked-clocks setting
_SW_POWER_CAP = 0x04
_GPU_IDLE = 0x01


#: What a check returns: (status, detail, advice).
Outcome = tuple[str, str, str | None]


@dataclass(frozen=True)
class Gpu:
    """What the GPU checks look at: torch's view of the GPUs and NVML's handle of cuda:0."""

    torch_count: int
    name: str | None = None
    total_memory: int | None = None
    #: Why torch could not initialise CUDA, when it could not.
    torch_error: str | None = None
    #: The initialised ``pynvml`` module, or None with ``nvml_error`` saying why.
    nvml: Any = None
    nvml_error: str | None = None
    nvml_count: int = 0
    #: NVML's handle of the benchmark device (torch's cuda:0, else NVML's first GPU).
    handle: Any = None


def _torch_gpus() -> dict[str, Any]:
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        props = torch.cuda.get_device_properties(0) if count else None
    except RuntimeError as error:  # a CUDA build of torch that cannot initialise the device
        return {"torch_count": 0, "torch_error": f"{type(error).__name__}: {error}"}
    if props is None:
        return {"torch_count": 0}
    return {"torch_count": count, "name": str(props.name),
            "total_memory": int(props.total_memory), "uuid": getattr(props, "uuid", None)}


@contextmanager
def open_gpu() -> Iterator[Gpu]:
    """Torch's GPUs and an initialised NVML (shut down on exit)."""
    seen = _torch_gpus()
    uuid = seen.pop("uuid", None)
    try:
        import pynvml
    except ImportError:
        yield Gpu(**seen, nvml_error="nvidia-ml-py is not installed (pip install nvidia-ml-py)")
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        yield Gpu(**seen, nvml_error=f"NVML: {error}")
        return
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        handle = _handle(pynvml, uuid) if count else None
    except pynvml.NVMLError as error:
        pynvml.nvmlShutdown()
        yield Gpu(**seen, nvml_error=f"NVML: {error}")
        return
    try:
        yield Gpu(**seen, nvml=pynvml, nvml_count=count, handle=handle)
    finally:
        pynvml.nvmlShutdown()


def _handle(pynvml: Any, uuid: Any) -> Any:
    """NVML's handle of torch's cuda:0 (by UUID: CUDA_VISIBLE_DEVICES renumbers devices)."""
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(0)


# --- GPU checks ---------------------------------------------------------------------------


def check_gpus(gpu: Gpu) -> Outcome:
    build = torch.version.cuda
    if gpu.torch_error is not None:
        return "fail", f"torch cannot initialise CUDA: {gpu.torch_error}", \
            "check the driver against torch's CUDA build (nvidia-smi, torch.version.cuda)"
    if gpu.torch_count == 0:
        why = f"torch {torch.__version__} is a CPU build" if build is None else (
            f"torch {torch.__version__} (CUDA {build}) finds none")
        if gpu.nvml_count:
            return (
                "fail",
                f"NVML sees {gpu.nvml_count} GPU(s) but {why}",
                "install a CUDA build of torch, or check CUDA_VISIBLE_DEVICES",
            )
        return "warn", f"{NO_CUDA}: {why}", "cells with device cuda will be unsupported"
    memory = f" ({gpu.total_memory / GB:.1f} GB)" if gpu.total_memory else ""
    seen = f"{gpu.torch_count} × {gpu.name}{memory} visible to torch; benchmarks run on cuda:0"
    if gpu.nvml is None:
        return "warn", f"{seen}; {gpu.nvml_error}", "the GPU checks need NVML"
    if gpu.nvml_count != gpu.torch_count and "CUDA_VISIBLE_DEVICES" not in os.environ:
        return (
            "warn",
            f"{seen}, NVML sees {gpu.nvml_count}",
            "torch and NVML disagree without CUDA_VISIBLE_DEVICES (MIG? a container?)",
        )
    return "ok", f"{seen}, NVML sees {gpu.nvml_count}", None


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def check_cuda_driver(gpu: Gpu) -> Outcome:
    nvml = gpu.nvml
    driver = nvml.nvmlSystemGetDriverVersion()
    encoded = int(nvml.nvmlSystemGetCudaDriverVersion())  # 12040 = CUDA 12.4
    supported = (encoded // 1000, encoded % 1000 // 10)
    build = torch.version.cuda
    if build is None:
        return "fail", f"torch {torch.__version__} is a CPU build; driver {driver}", \
            "install a CUDA build of torch"
    found = f"torch built for CUDA {build}, driver {driver} supports CUDA {supported[0]}." \
        f"{supported[1]}"
    wanted = _version(build)
    if wanted[0] > supported[0]:
        return "fail", found, \
            f"upgrade the driver, or install torch built for CUDA {supported[0]}.x"
    if wanted > supported:
        return (
            "warn",
            f"{found} (minor-version compatibility: no PTX JIT)",
            f"upgrade the driver to one for CUDA ≥ {build}",
        )
    return "ok", found, None


def check_processes(gpu: Gpu) -> Outcome:
    nvml, handle = gpu.nvml, gpu.handle
    found = {}
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses,
                  nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for process in query(handle):
            if process.pid != os.getpid():
                found[process.pid] = process.usedGpuMemory  # bytes, None where not reported
    if not found:
        return "ok", "no other process on the GPU", None
    total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    held = sum(memory or 0 for memory in found.values())
    listed = ", ".join(
        f"{pid} {_process_name(pid)} ({'?' if memory is None else f'{memory / GB:.1f} GB'})"
        for pid, memory in sorted(found.items())
    )
    detail = f"{len(found)} other process(es) on the GPU: {listed}"
    advice = "stop them: they share the SMs, and device-used memory counts theirs"
    if held >= PROCESS_MEMORY_FAIL * total:
        return "fail", f"{detail}; {held / total:.0%} of its memory", advice
    return "warn", detail, advice


def _process_name(pid: int) -> str:
    import psutil

    try:
        return str(psutil.Process(pid).name())
    except (psutil.Error, OSError):
        return "?"  # another container's process, or gone


def check_persistence(gpu: Gpu) -> Outcome:
    nvml = gpu.nvml
    with _not_supported(nvml) as unsupported:
        mode = nvml.nvmlDeviceGetPersistenceMode(gpu.handle)
    if unsupported:
        return "ok", "persistence mode not supported here (nothing to set)", None
    if mode == nvml.NVML_FEATURE_ENABLED:
        return "ok", "persistence mode on", None
    return (
        "warn",
        "persistence mode off: the driver re-initialises the GPU for each new process",
        "sudo nvidia-smi -pm 1",
    )


def check_clocks(gpu: Gpu) -> Outcome:
    nvml, handle = gpu.nvml, gpu.handle
    current = nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)
    top = nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM)
    reasons_of = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons  # its older name
    reasons = int(reasons_of(handle))
    clock = f"SM {current} / {top} MHz" + (" (idle)" if reasons & _GPU_IDLE else "")
    slowed = [name for bit, name in _SLOWDOWN_REASONS.items() if reasons & bit]
    if slowed:
        return "fail", f"{clock}, slowed down now: {', '.join(slowed)}", \
            "let it cool / check its power and cooling before measuring"
    if reasons & _SW_POWER_CAP:
        return "warn", f"{clock}, held back by the power cap now", \
            "check the power limit (nvidia-smi -q -d POWER)"
    if reasons & _APPLICATIONS_CLOCKS:
        return "ok", f"{clock}, locked (applications / locked clocks setting)", None
    return (
        "warn",
        f"{clock}, not locked: boost clocks follow temperature and power",
        f"for steady it/s: sudo nvidia-smi --lock-gpu-clocks={top},{top}",
    )


def check_power(gpu: Gpu) -> Outcome:
    nvml, handle = gpu.nvml, gpu.handle
    enforced = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000  # mW → W
    default = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000
    found = f"power limit {enforced:.0f} W (default {default:.0f} W)"
    if enforced >= default:
        return "ok", found, None
    advice = f"sudo nvidia-smi -pl {default:.0f}, or read the numbers as a capped GPU's"
    if enforced < POWER_FAIL * default:
        return "fail", found, advice
    return "warn", found, advice


def check_temperature(gpu: Gpu) -> Outcome:
    nvml, handle = gpu.nvml, gpu.handle
    now = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
    with _not_supported(nvml) as unsupported:
        slowdown = nvml.nvmlDeviceGetTemperatureThreshold(
            handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        )
    if unsupported:
        return "ok", f"{now} °C (no slowdown threshold reported)", None
    found = f"{now} °C (slowdown at {slowdown} °C)"
    if now >= slowdown:
        return "fail", found, "let it cool; it is throttling"
    if now >= slowdown - TEMPERATURE_MARGIN_C:
        return "warn", found, "check its cooling: under load it will throttle"
    return "ok", found, None


def check_ecc(gpu: Gpu) -> Outcome:
    nvml, handle = gpu.nvml, gpu.handle
    with _not_supported(nvml) as unsupported:
        current, _pending = nvml.nvmlDeviceGetEccMode(handle)
    if unsupported or current != nvml.NVML_FEATURE_ENABLED:
        return "ok", "no ECC on this GPU" if unsupported else "ECC disabled", None

    def errors(kind: int) -> int:
        return int(nvml.nvmlDeviceGetTotalEccErrors(handle, kind, nvml.NVML_VOLATILE_ECC))

    uncorrected = errors(nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
    corrected = errors(nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED)
    found = f"ECC errors since the driver loaded: {uncorrected} uncorrected, {corrected} corrected"
    if uncorrected:
        return "fail", found, "reset the GPU (nvidia-smi -r) or take the runner out of service"
    if corrected:
        return "warn", found, "watch it: rising corrected counts mean failing memory"
    return "ok", "ECC on, no errors since the driver loaded", None


@contextmanager
def _not_supported(nvml: Any) -> Iterator[list[bool]]:
    """``with _not_supported(nvml) as flag``: NVML's 'Not Supported' sets the flag instead."""
    flag: list[bool] = []
    try:
        yield flag
    except nvml.NVMLError as error:
        if getattr(error, "value", None) != nvml.NVML_ERROR_NOT_SUPPORTED:
            raise
        flag.append(True)
