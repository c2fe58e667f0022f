"""Backend plugins: the example package (examples/backend-plugin) really installed with pip.

It goes into a virtual environment that sees this one's packages (``--system-site-packages``,
so sdbench, torch and diffusers are there) and has only the plugin added, installed by pip
from its own ``pyproject.toml`` without the network (``--no-deps --no-build-isolation``).
The plugin's ``sdbench.backends`` entry point makes ``chunked-attention`` a backend name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_scenario

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "backend-plugin"
NAME = "chunked-attention"
ENV = os.environ | {"TQDM_DISABLE": "1", "CHUNKED_ATTENTION_SIZE": "16"}


def make_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(where)], check=True)
    return where / "bin" / "python"


def pip_install(python: Path, package: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-build-isolation", "--no-index", str(package)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def example_at_version(tmp_path: Path, version: str) -> Path:
    """A copy of the example package whose pyproject says ``version``."""
    copy = tmp_path / f"plugin-{version}"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    pyproject = copy / "pyproject.toml"
    text = re.sub(r'^version = ".*"$', f'version = "{version}"', pyproject.read_text(),
                  flags=re.MULTILINE)
    pyproject.write_text(text)
    return copy


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    python = make_venv(tmp_path_factory.mktemp("plugin") / "venv")
    pip_install(python, EXAMPLE)
    return python


def run(python: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, check=False)


def test_an_installed_plugin_is_a_backend_name_and_a_typo_lists_it(venv: Path,
                                                                   tmp_path: Path) -> None:
    listed = run(venv, "-c", "import backends, json; print(json.dumps([backends.names(), "
                             f"backends.versions({NAME!r})]))")
    assert listed.returncode == 0, listed.stderr
    names, versions = json.loads(listed.stdout)
    assert names == ["diffusers", "original", NAME]
    assert versions == {"sdbench-example-backend": "0.1.0",
                        "diffusers": versions["diffusers"]}
    # this environment has no such plugin: the same scenario is a one-line error there
    scenario = write_scenario(tmp_path, f"matrix:\n  backend: [{NAME}]\n", "p.yaml")
    for python, ok in ((venv, True), (Path(sys.executable), False)):
        shown = run(python, "-m", "harness", "run", str(scenario), "--list")
        if ok:
            assert shown.returncode == 0 and f"{NAME}" in shown.stdout, shown.stderr
        else:
            assert shown.returncode == 2
            (line,) = shown.stderr.strip().splitlines()
            assert line == (
                f"error: {scenario}: matrix.backend[0]: unknown backend {NAME!r}; known: "
                "diffusers, original; register one with an entry point in group "
                "'sdbench.backends' of an installed package (docs/backends.md), or name it "
                "as package.module:Class"
            )


def test_the_installed_plugin_runs_a_cell_with_its_version_recorded(venv: Path,
                                                                   tmp_path: Path) -> None:
    scenario = write_scenario(
        tmp_path, f"name: one\nrepeats: 1\nwarmup: 0\nmatrix:\n  backend: {NAME}\n"
        "  model: tiny\n  device: cpu\n  resolution: 64\n  steps: 2\n", "one.yaml")
    done = run(venv, "-m", "harness", "run", str(scenario), "--out", str(tmp_path / "out"),
               "--no-images")
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    assert record["status"] == "ok" and record["cell"]["id"] == NAME
    assert record["metrics"]["its"] > 0 and record["metrics"]["step_ms_median"] > 0
    assert record["env"]["backend_packages"] == (
        f"diffusers {record['env']['diffusers']}, sdbench-example-backend 0.1.0")


def test_a_module_class_backend_needs_no_registration(tmp_path: Path) -> None:
    """``backend: package.module:Class`` on the Python path, not installed."""
    scenario = write_scenario(
        tmp_path, "matrix:\n  backend: sdbench_example_backend.backend:ChunkedAttentionBackend\n",
        "direct.yaml")
    env = ENV | {"PYTHONPATH": str(EXAMPLE / "src")}
    shown = subprocess.run([sys.executable, "-m", "harness", "run", str(scenario), "--list"],
                           capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "sdbench_example_backend.backend_ChunkedAttentionBackend" in shown.stdout


def test_the_adapter_api_imports_no_pandas_pydantic_or_scipy() -> None:
    """What an adapter imports (the interface, the timer, the exceptions, model resolution)."""
    for module in ("backends.api", "harness.errors", "sdbench_example_backend.backend"):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True, text=True, check=False,
            env=os.environ | {"PYTHONPATH": str(EXAMPLE / "src")},
        )
        assert done.returncode == 0, done.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
        assert not imported & {"pandas", "pydantic", "scipy", "yaml"}, module


@pytest.mark.slow
def test_a_plugin_runs_under_both_entry_points_and_a_version_change_is_not_comparable(
    tmp_path: Path,
) -> None:
    """``python -m harness run`` with version 0.1.0, ``pytest --benchmark`` with 0.2.0 of the
    same plugin, then ``compare``: the cells are not comparable, naming the difference."""
    python = make_venv(tmp_path / "venv")
    pip_install(python, EXAMPLE)
    scenario = write_scenario(
        tmp_path,
        "name: plugin\nrepeats: 1\nwarmup: 0\nchecks: [parity]\nmatrix:\n"
        f"  backend: [diffusers, {NAME}]\n  model: tiny\n  device: cpu\n  resolution: 64\n"
        "  steps: 2\n",
        "plugin.yaml",
    )
    first = run(python, "-m", "harness", "run", str(scenario), "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stdout + first.stderr
    records = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").open()]
    plugin = next(r for r in records if r["cell"]["backend"] == NAME)
    assert plugin["status"] == "ok", plugin.get("reason")
    assert "sdbench-example-backend 0.1.0" in plugin["env"]["backend_packages"]
    assert plugin["metrics"]["parity_status"] == "pass"  # the chunked attention is exact
    builtin = next(r for r in records if r["cell"]["backend"] == "diffusers")
    assert "backend_packages" not in builtin["env"]

    pip_install(python, example_at_version(tmp_path, "0.2.0"))
    second = run(python, "-m", "pytest", "--benchmark", "--scenarios", str(scenario),
                 "--bench-results", str(tmp_path / "b"), "-p", "no:cacheprovider", "-q",
                 cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{NAME}" in second.stdout

    compared = run(python, "-m", "harness", "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                   "--format", "md")
    assert compared.returncode in (0, 1), compared.stdout + compared.stderr  # 1: noise
    rows = [line for line in compared.stdout.splitlines() if NAME in line]
    assert rows and all("not comparable" in row for row in rows), compared.stdout
    assert "sdbench-example-backend 0.1.0" in compared.stdout
    assert "sdbench-example-backend 0.2.0" in compared.stdout
