"""Shared test set-up: every test session gets its own zoo cache and an offline HF cache.

The variables are set in ``pytest_configure``, before test modules import diffusers or
huggingface_hub (which read ``HF_HUB_*`` at import), and subprocesses started by tests
(``python -m harness ...``) inherit them, so they reuse the models the session synthesised.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_VARIABLES = ("SDBENCH_CACHE", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
_saved: dict[str, str | None] = {}
_root: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    root = Path(tempfile.mkdtemp(prefix="sdbench-tests-"))
    _root.append(root)
    _saved.update({key: os.environ.get(key) for key in _VARIABLES})
    os.environ["SDBENCH_CACHE"] = str(root / "sdbench")
    os.environ["HF_HUB_CACHE"] = str(root / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_unconfigure(config: pytest.Config) -> None:
    for key, value in _saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for root in _root:
        shutil.rmtree(root, ignore_errors=True)


def write_scenario(directory: Path, text: str, name: str = "scenario.yaml") -> Path:
    """Write a scenario file for a test and return its path."""
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_agrees_across_backends(directory: Path, scenario: str) -> None:
    """Run a model family's scenario (``scenario``: txt2img, plain and with an embedding, on
    both backends) plus the zoo's two LoRAs on each backend; every cell passes its checks
    (the LoRA semantics, merged into the single file by hand, included) and the diffusers
    cells' latents are within 1e-4 relative of the original's."""
    from harness.matrix import expand
    from harness.runner import Runner
    from harness.scenario import load_scenario

    text = scenario + ('  include:\n'
                       '    - {backend: original, lora: "zoo:style@0.5+zoo:detail@1"}\n'
                       '    - {backend: diffusers, lora: "zoo:style@0.5+zoo:detail@1"}\n')
    cells = expand(load_scenario(write_scenario(directory, text)))
    results = Runner(directory / "out", progress=False, isolate="none").run(cells)
    assert len(results) == 6
    for result in results:
        assert result.status == "ok", result.reason
        checks = {n: c["status"] for n, c in result.metrics["check_results"].items()}
        assert set(checks.values()) == {"pass"}, (result.cell.id, checks)
        if result.cell.lora != "none":
            assert {"lora_strength0", "lora_monotonic", "lora_merged"} <= set(checks)
        if result.cell.backend == "diffusers":
            assert result.metrics["parity_latent_rel_err"] <= 1e-4
