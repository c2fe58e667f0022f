"""``python -m harness doctor``: is this machine fit to benchmark?

Every check gives one :class:`Finding`: ``ok``, ``warn`` (numbers will be taken, but read them
knowing this) or ``fail`` (numbers taken now would not be this machine's; exit status 1), what
was found, and what to do. ``run`` records the warn and fail findings in the environment of
every result (:func:`harness.environment.collect`, key ``doctor``), and the report shows them
next to the figures they affect (each finding names its ``scope`` and what it ``affects``).

The GPU checks (:mod:`harness.doctor_gpu`) look at ``cuda:0``, the device the harness measures
on, through torch and NVML (``nvidia-ml-py``, imported lazily); without a CUDA device each says
so as a warn.

==============  ==========================  ==============================  ===================
check           ok                          warn                            fail
==============  ==========================  ==============================  ===================
gpus            torch and NVML see the GPU  no CUDA device; NVML missing;   torch cannot use
                                            counts differ                   the GPU NVML sees
cuda_driver     torch's CUDA ≤ the driver's torch's CUDA minor is newer     major is newer
processes       no other process            other processes hold the GPU    … half its memory
persistence     enabled (or n/a)            disabled                        -
clocks          locked, not throttled       not locked; power-capped now    slowed down now
power           at the default limit        below the default               below 75 % of it
temperature     cool                        within 10 °C of slowdown        at slowdown
ecc             no errors (or no ECC)       corrected errors                uncorrected errors
torch_backends  torch's defaults            TF32 / cuDNN settings changed   -
cpu_governor    performance (or n/a)        another governor                -
disk            ≥ 15 GB free                less                            < 5 GB free
hf_cache        where it is, token or not   cache not writable              -
==============  ==========================  ==============================  ===================
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from harness.doctor_gpu import (
    NO_CUDA,
    Gpu,
    Outcome,
    check_clocks,
    check_cuda_driver,
    check_ecc,
    check_gpus,
    check_persistence,
    check_power,
    check_processes,
    check_temperature,
    open_gpu,
)

STATUSES: tuple[str, ...] = ("ok", "warn", "fail")
#: ``gpu``: the finding matters for cells measured on the GPU; ``host``: for every cell.
SCOPES: tuple[str, ...] = ("gpu", "host")
#: The figures a finding can affect (the table's it/s, its memory, load and first-call time).
AFFECTS: tuple[str, ...] = ("speed", "memory", "load")
GB = 1024**3
#: Free disk below which the zoo cache cannot hold one sd15 file (4.3 GB in fp32): fail.
DISK_FAIL_GB = 5.0
#: Free disk below which it cannot hold sd15 in all three fp32 formats (13 GB): warn.
DISK_WARN_GB = 15.0
#: Where Linux exposes each CPU's frequency governor.
CPUFREQ = Path("/sys/devices/system/cpu")
#: torch's defaults for the settings that change fp32/cuDNN speed.
TORCH_DEFAULTS: dict[str, object] = {
    "float32_matmul_precision": "highest",
    "cudnn.allow_tf32": True,
    "cudnn.benchmark": False,
    "cudnn.deterministic": False,
    "deterministic_algorithms": False,
}
@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    check: str
    status: str
    detail: str
    #: What to do about a warn or fail (None when there is nothing to do).
    advice: str | None = None
    scope: str = "host"
    affects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        unknown = set(self.affects) - set(AFFECTS)
        if unknown:
            raise ValueError(f"affects must be among {AFFECTS}, got {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["affects"] = list(self.affects)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(**{**data, "affects": tuple(data.get("affects") or ())})

    def line(self) -> str:
        """``warn  clocks          SM 1980 / 1980 MHz, not locked → lock them: …``"""
        text = f"{self.status:<5} {self.check:<15} {self.detail}"
        return text + (f" → {self.advice}" if self.advice else "")


# --- host checks --------------------------------------------------------------------------


def torch_settings() -> dict[str, object]:
    """The process's settings that change fp32 matmul / cuDNN speed."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def check_torch_backends(_gpu: Gpu) -> Outcome:
    settings = torch_settings()
    shown = ", ".join(f"{name} {value}" for name, value in settings.items())
    changed = [name for name, value in settings.items() if value != TORCH_DEFAULTS[name]]
    if not changed:
        return "ok", f"torch defaults: {shown}", None
    return (
        "warn",
        f"not torch's defaults: {', '.join(f'{n} {settings[n]}' for n in changed)}",
        "fp32 and cuDNN speed (and numerics) depend on them; compare only like settings",
    )


def check_cpu_governor(_gpu: Gpu) -> Outcome:
    governors: dict[str, int] = {}
    for path in sorted(CPUFREQ.glob("cpu[0-9]*/cpufreq/scaling_governor")):
        try:
            name = path.read_text().strip()
        except OSError:
            continue
        governors[name] = governors.get(name, 0) + 1
    if not governors:
        return "ok", "no CPU frequency governor exposed (virtual machine or container)", None
    total = sum(governors.values())
    found = ", ".join(f"{name} on {count} of {total} CPUs" for name, count in governors.items())
    if set(governors) == {"performance"}:
        return "ok", f"governor {found}", None
    return (
        "warn",
        f"governor {found}: the host side of each step runs at a varying clock",
        "sudo cpupower frequency-set -g performance",
    )


def _free_gb(path: Path) -> tuple[Path, float]:
    """Free space of the file system that holds (or will hold) ``path``."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing, shutil.disk_usage(existing).free / GB


def check_disk(_gpu: Gpu) -> Outcome:
    from models.zoo import cache_root, hf_cache_dir

    places = {"zoo cache": cache_root(), "HF cache": hf_cache_dir()}
    free = {label: _free_gb(path)[1] for label, path in places.items()}
    found = "; ".join(f"{label} {places[label]}: {gb:.0f} GB free" for label, gb in free.items())
    least = min(free.values())
    advice = "free space or point SDBENCH_CACHE / HF_HUB_CACHE at a larger disk"
    if least < DISK_FAIL_GB:
        return "fail", found, advice
    if least < DISK_WARN_GB:
        return "warn", found, advice
    return "ok", found, None


def check_hf_cache(_gpu: Gpu) -> Outcome:
    from huggingface_hub import get_token

    from models.zoo import hf_cache_dir

    cache = hf_cache_dir()
    token = get_token() is not None  # the value is never kept, shown or stored
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    found = (
        f"{cache}; "
        + ("a token is configured" if token else "no token (public repositories only)")
        + ("; offline (HF_HUB_OFFLINE)" if offline else "")
    )
    existing = _free_gb(cache)[0]
    if not os.access(existing, os.W_OK):
        return "warn", f"{found}; {existing} is not writable", \
            "point HF_HUB_CACHE at a writable folder"
    return "ok", found, None


# --- the checks, in order -----------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A check's definition: its name, what it matters for, and how it runs."""

    name: str
    scope: str
    affects: tuple[str, ...]
    run: Callable[[Gpu], Outcome]
    #: A GPU check that needs NVML's handle of the benchmark GPU.
    needs_nvml: bool = False


CHECKS: tuple[Check, ...] = (
    Check("gpus", "gpu", (), check_gpus),
    Check("cuda_driver", "gpu", ("speed", "memory", "load"), check_cuda_driver, True),
    Check("processes", "gpu", ("speed", "memory"), check_processes, True),
    Check("persistence", "gpu", ("load",), check_persistence, True),
    Check("clocks", "gpu", ("speed",), check_clocks, True),
    Check("power", "gpu", ("speed",), check_power, True),
    Check("temperature", "gpu", ("speed",), check_temperature, True),
    Check("ecc", "gpu", ("speed", "memory"), check_ecc, True),
    Check("torch_backends", "gpu", ("speed",), check_torch_backends),
    Check("cpu_governor", "host", ("speed",), check_cpu_governor),
    Check("disk", "host", ("load",), check_disk),
    Check("hf_cache", "host", (), check_hf_cache),
)


def _run(check: Check, gpu: Gpu) -> Finding:
    def finding(status: str, detail: str, advice: str | None) -> Finding:
        return Finding(check.name, status, detail, advice, check.scope, check.affects)

    if check.needs_nvml and gpu.handle is None:
        if gpu.torch_count == 0 and not gpu.nvml_count:
            return finding("warn", f"{NO_CUDA}: not checked", None)
        return finding("warn", f"not checked: {gpu.nvml_error or 'NVML has no handle'}", None)
    try:
        outcome = check.run(gpu)
    except Exception as error:  # noqa: BLE001 - a broken probe is a warn, never a crash
        return finding("warn", f"could not check: {type(error).__name__}: {error}", None)
    return finding(*outcome)


def diagnose() -> list[Finding]:
    """Run every check, in the order of :data:`CHECKS`."""
    with open_gpu() as gpu:
        return [_run(check, gpu) for check in CHECKS]


def recorded() -> list[dict[str, Any]]:
    """The warn and fail findings, as stored in a result's environment (``env["doctor"]``).

    A run must not stop at its doctor: an unexpected error is itself recorded, as a warn.
    """
    try:
        found = diagnose()
    except Exception as error:  # noqa: BLE001 - recorded with the results instead
        found = [Finding("doctor", "warn", f"the doctor failed: {type(error).__name__}: {error}")]
    return [finding.to_dict() for finding in found if finding.status != "ok"]


def counts(findings: list[Finding]) -> dict[str, int]:
    return {status: sum(f.status == status for f in findings) for status in STATUSES}


# --- command line -------------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace) -> int:
    findings = diagnose()
    tally = counts(findings)
    fit = tally["fail"] == 0
    report = {"fit": fit, "counts": tally, "findings": [f.to_dict() for f in findings]}
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for finding in findings:
            print(finding.line())
        verdict = "fit to benchmark" if fit else "not fit to benchmark: fix the failures above"
        print(f"doctor: {tally['ok']} ok, {tally['warn']} warn, {tally['fail']} fail — {verdict}")
    return 0 if fit else 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``doctor`` to ``python -m harness``."""
    parser = subparsers.add_parser(
        "doctor",
        help="check that this machine is fit to benchmark; exit status 1 on a failed check",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, metavar="FILE", help="also write them as JSON"
    )
    parser.set_defaults(handler=_cmd_doctor)
