"""The environment of a run: hardware, driver, library versions, harness commit.

Baselines compare like with like: :func:`fingerprint` hashes the fields that make numbers
comparable (GPU, CUDA, torch/diffusers/transformers/accelerate versions, CPU, OS) and, for a
backend that declares packages of its own (:meth:`backends.base.Backend.versions`, e.g. a
plugin's ``myapp 1.2``), ``backend_packages``: :func:`for_backend` is the environment of one
backend's cells.

``doctor`` holds the warn and fail findings of :func:`harness.doctor.diagnose` (as dicts) at
the time of collection: it describes the machine's state (clocks, other processes, …), not
its kind, so it is not a comparable field — the report shows it beside the figures instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

#: Fields that must be equal for two runs' numbers to be compared.
COMPARABLE_FIELDS: tuple[str, ...] = (
    "gpu_name",
    "gpu_count",
    "cuda",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "cpu",
    "os",
    "backend_packages",
)

_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    if result.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout.strip()
    return f"{commit}-dirty" if dirty else commit


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def collect() -> dict[str, Any]:
    """Describe this machine and its software (cached: it does not change within a run)."""
    import torch  # here, not at import: the CLI builds its parsers without torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_name(),
        "cpu_count": psutil.cpu_count(logical=True),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "harness_commit": _git_commit(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_name": None,
        "gpu_memory_gb": None,
        "driver": None,
        "executable": sys.executable,
        #: The GPUs this process was given (``run --gpus``, pytest-xdist workers); not compared.
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    for package in _PACKAGES:
        env[package] = _version(package)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu_name"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 1024**3, 1)
        env["driver"] = _nvidia_driver()
    from harness import doctor

    env["doctor"] = doctor.recorded()
    return env


def _nvidia_driver() -> str | None:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 else None


@lru_cache(maxsize=32)
def backend_packages(backend: str) -> str | None:
    """``"myapp 1.2, otherlib 3.4"``: the versions that identify ``backend``'s code (sorted),
    or None when it declares none (the built-in backends: their libraries are fields of
    their own) or cannot be imported here (its cells fail and say why)."""
    import backends

    try:
        found = backends.versions(backend)
    except Exception:  # noqa: BLE001 - the cell reports the broken backend itself
        return None
    return ", ".join(f"{name} {version}" for name, version in sorted(found.items())) or None


def for_backend(env: dict[str, Any], backend: str) -> dict[str, Any]:
    """``env`` with the ``backend_packages`` of ``backend`` (unchanged when it has none)."""
    packages = backend_packages(backend)
    return env if packages is None else {**env, "backend_packages": packages}


def fingerprint(env: dict[str, Any]) -> str:
    """A short hash of the comparable fields of an environment (``backend_packages`` only
    where present, so the fingerprints of built-in backends' records stay as they were)."""
    comparable = {key: env.get(key) for key in COMPARABLE_FIELDS
                  if key != "backend_packages" or env.get(key) is not None}
    return hashlib.sha256(json.dumps(comparable, sort_keys=True).encode()).hexdigest()[:12]


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Comparable fields whose values differ between two environments."""
    return {
        key: (a.get(key), b.get(key)) for key in COMPARABLE_FIELDS if a.get(key) != b.get(key)
    }
