"""``hub:`` models against a Hugging Face hub on the loopback address (:mod:`tests.fake_hub`):
``models fetch`` into the cache, runs that say whether the model came from it, a one-line
error for each way a repository cannot be had, and a token that never reaches any output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.matrix import expand
from harness.runner import Runner
from harness.scenario import load_scenario
from models import fetch, materialize, resolve
from tests.conftest import write_scenario
from tests.fake_hub import FakeHub, Repo

ROOT = Path(__file__).resolve().parent.parent
GOOD = "hf_sdbenchGoodToken0123456789"  # has accepted acme/gated's licence
OTHER = "hf_sdbenchOtherToken0123456789"  # a valid token of an account without access
BAD = "hf_sdbenchRevokedToken0123456789"  # not a token the hub knows
#: tiny from the hub, and a gated copy.
SCENARIO = """
name: hub
prompt: a house
repeats: 1
warmup: 0
matrix:
  backend: diffusers
  model: [hub:acme/tiny, hub:acme/gated]
  resolution: 64
  steps: 2
"""


@pytest.fixture(scope="module")
def repos() -> dict[str, Repo]:
    files = Repo.from_folder(materialize("tiny", "hub")).files
    files["tiny.safetensors"] = materialize("tiny", "safetensors").read_bytes()
    return {"acme/tiny": Repo(files), "acme/gated": Repo(dict(files), gated=True, allowed={GOOD}),
            "acme/single": Repo({"tiny.safetensors": files["tiny.safetensors"]})}


@pytest.fixture
def hub(repos: dict[str, Repo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake hub as huggingface_hub's endpoint, an empty cache, no token, online."""
    from huggingface_hub import constants

    with FakeHub(repos, {GOOD, OTHER}) as server:
        # what HF_ENDPOINT sets when huggingface_hub is imported (this process imported it)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # and for any subprocess
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the suite runs offline (conftest)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def _one_line(error: pytest.ExceptionInfo[UserError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("reference", "token", "expected"),
    [
        ("hub:acme/gated", None, "'hub:acme/gated': acme/gated is gated and no Hugging Face "
         "token is set; accept its licence at {url}/acme/gated, then set HF_TOKEN (or run "
         "`hf auth login`)"),
        ("hub:acme/gated", OTHER, "'hub:acme/gated': acme/gated is gated and the Hugging Face "
         "token in use has no access; accept its licence at {url}/acme/gated with that "
         "token's account"),
        ("hub:acme/tiny", BAD, "'hub:acme/tiny': the Hugging Face hub rejected the token in "
         "use (invalid or expired); set HF_TOKEN to a valid token or run `hf auth login`"),
        ("hub:acme/nothing", None, "'hub:acme/nothing': repository acme/nothing not found on "
         "the Hugging Face hub; check the name (a private repository also needs a Hugging "
         "Face token (set HF_TOKEN))"),
        ("hub:acme/nothing", GOOD, "'hub:acme/nothing': repository acme/nothing not found on "
         "the Hugging Face hub; check the name (a private repository also needs that the "
         "token in use has access to it)"),
        ("hub:acme/tiny@v9", None, "'hub:acme/tiny@v9': revision 'v9' not found in acme/tiny; "
         "expected a branch, tag or commit of it"),
        ("hub:acme/tiny/nope.safetensors", None, "'hub:acme/tiny/nope.safetensors': file "
         "'nope.safetensors' not found in acme/tiny"),
    ],
    ids=["gated-no-token", "gated-no-access", "bad-token", "missing-repo",
         "missing-repo-with-token", "missing-revision", "missing-file"],
)
def test_each_hub_failure_is_one_line_saying_what_to_do(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, reference: str, token: str | None,
    expected: str,
) -> None:
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    source = "safetensors" if reference.endswith(".safetensors") else "hub"
    for attempt in (lambda: fetch(reference), lambda: resolve(reference, source)):
        with pytest.raises(UserError) as error:
            attempt()
        message = _one_line(error)
        assert message == "model " + expected.format(url=hub.url)
        assert token is None or token not in message


def test_offline_and_not_cached_says_to_fetch_first(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        resolve("hub:acme/tiny", "hub")
    assert _one_line(error) == (
        "model 'hub:acme/tiny': not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "run `python -m harness models fetch hub:acme/tiny` with network access first")
    assert hub.requests == []  # offline means offline


def test_a_gated_repo_with_access_and_a_revision_fetch(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, repos: dict[str, Repo]
) -> None:
    monkeypatch.setenv("HF_TOKEN", GOOD)
    commit = repos["acme/gated"].commit
    folder = fetch("hub:acme/gated", revision=commit)
    assert folder.name == commit and (folder / "model_index.json").is_file()
    assert all(carried for method, path, carried in hub.requests if "/acme/gated" in path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(f"hub:acme/gated@{commit}", "hub").from_cache is True


def test_runs_record_whether_the_model_came_from_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    """A fetched folder runs from the cache (offline, even); a single file not fetched yet is
    downloaded by the resolution, before the load's clock, and says so; a repository that
    cannot be had fails its cells with the reason and the run goes on."""
    fetch("hub:acme/tiny")
    text = SCENARIO + "  include:\n    - {model: hub:acme/single/tiny.safetensors, source: safetensors}\n"
    results = Runner(tmp_path / "out", progress=False, isolate="none").run(
        expand(load_scenario(write_scenario(tmp_path, text))))
    by_model = {r.cell.model: r for r in results}
    assert by_model["hub:acme/tiny"].status == "ok"
    assert by_model["hub:acme/tiny"].metrics["model_from_cache"] is True
    single = by_model["hub:acme/single/tiny.safetensors"]
    assert single.status == "ok" and single.metrics["model_from_cache"] is False
    gated = by_model["hub:acme/gated"]
    assert gated.status == "error" and "is gated and no Hugging Face token is set" in (
        gated.reason or "")


def test_the_token_never_reaches_output_results_or_reports(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Through the public entry points, with HF_ENDPOINT and HF_TOKEN in the environment as
    a user sets them: ``models fetch`` (huggingface_hub's progress bar, the path), a run with
    a gated model the token opens and one it does not, the report; the token is sent to the
    hub and appears in no output and no file."""
    env = {**os.environ, "HF_TOKEN": OTHER, "PYTHONPATH": str(ROOT)}
    fetched = subprocess.run(
        [sys.executable, "-m", "harness", "models", "fetch", "hub:acme/tiny"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert fetched.returncode == 0, fetched.stderr
    assert "hub:acme/tiny: " in fetched.stdout and "Fetching" in fetched.stderr
    scenario = write_scenario(tmp_path, SCENARIO)
    out = tmp_path / "out"
    ran = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(scenario), "--out", str(out),
         "--isolate", "none"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "token in use has no access" in ran.stdout + ran.stderr
    report = subprocess.run(
        [sys.executable, "-m", "harness", "report", str(out), "-o", str(tmp_path / "r.html")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert report.returncode == 0, report.stderr
    assert any(carried for _method, _path, carried in hub.requests)  # it was used
    outputs = [fetched.stdout, fetched.stderr, ran.stdout, ran.stderr, report.stdout,
               report.stderr]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "r.html") in files and any(p.name == "results.jsonl" for p in files)
    for text in [*outputs, *(p.read_bytes().decode("utf-8", "replace") for p in files)]:
        assert OTHER not in text


def test_a_gated_stage_of_a_multi_stage_model_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepFloyd IF's stages are gated repositories each: the token's account accepted stage
    I's licence, not stage II's — the error names stage II's repository and its page; with
    access to both, ``models fetch`` of stage I takes every stage (the x4 upscaler too) and
    the chain then resolves offline from the cache."""
    from huggingface_hub import constants

    stages = resolve("tiny-deepfloyd-if", "hub").stages or {}
    repos = {
        "DeepFloyd/IF-I-XL-v1.0": Repo.from_folder(stages["stage_1"], gated=True,
                                                   allowed={GOOD, OTHER}),
        "DeepFloyd/IF-II-L-v1.0": Repo.from_folder(stages["stage_2"], gated=True,
                                                   allowed={GOOD}),
        "stabilityai/stable-diffusion-x4-upscaler": Repo.from_folder(stages["stage_3"]),
    }
    with FakeHub(repos, {GOOD, OTHER}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", OTHER)
        with pytest.raises(UserError) as error:
            resolve("hub:DeepFloyd/IF-I-XL-v1.0", "hub")
        assert _one_line(error) == (
            "model 'hub:DeepFloyd/IF-I-XL-v1.0': DeepFloyd/IF-II-L-v1.0 is gated and the "
            "Hugging Face token in use has no access; accept its licence at "
            f"{server.url}/DeepFloyd/IF-II-L-v1.0 with that token's account")
        monkeypatch.setenv("HF_TOKEN", GOOD)
        fetch("hub:DeepFloyd/IF-I-XL-v1.0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve("hub:DeepFloyd/IF-I-XL-v1.0", "hub")
    assert resolved.family == "deepfloyd-if" and resolved.from_cache is True
    assert list(resolved.stages or {}) == ["stage_1", "stage_2"]
    # models fetch took the x4 upscaler too: a run with it needs no network either
    with_x4 = resolve("hub:DeepFloyd/IF-I-XL-v1.0", "hub", optional_stages=True)
    assert list(with_x4.stages or {}) == ["stage_1", "stage_2", "stage_3"]
