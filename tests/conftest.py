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
