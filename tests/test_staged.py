"""Kandinsky 2.2 and DeepFloyd IF: the zoo's multi-stage models, their hub layout and cache
install, the diffusers backend's chains (harness noise for every stage, per-stage timing), the
original backend's ``unsupported``, and the reports' per-stage column."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from backends import get_backend
from harness.cli import main
from harness.errors import UserError
from harness.execute import request_for
from harness.matrix import expand
from harness.measure import GenerationTimer, Timing
from harness.scenario import parse_scenario
from models import resolve
from models.staged import STAGED_SPECS, parameter_counts, read_stages
from tests.conftest import write_scenario

ROOT = Path(__file__).resolve().parent.parent
#: The shipped tables' settings for their tiny copies (CPU, 64 px, a few steps).
TINY = {"device": "cpu", "resolution": 64, "steps": 4, "batch": [1, 2]}
TABLES = {"tiny-kandinsky22": "kandinsky-table", "tiny-deepfloyd-if": "deepfloyd-table"}
STAGE_STEPS = {"tiny-kandinsky22": "prior=3", "tiny-deepfloyd-if": "stage_2=2"}


def tiny_table(name: str, model: str, **matrix: Any) -> dict[str, Any]:
    """A tiny copy of ``scenarios/NAME.yaml``: the zoo's tiny twin, determinism checked."""
    data = yaml.safe_load((ROOT / "scenarios" / f"{name}.yaml").read_text())
    data.update(repeats=2, warmup=0, checks=["determinism"], timeout_s=300)
    data["matrix"].update(TINY, model=model, dtype="fp32", **matrix)
    return data


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """Tiny copies of the shipped Kandinsky and DeepFloyd tables (plus Kandinsky's img2img)
    through ``python -m harness run`` (in this process), and their records by cell id."""
    folder = tmp_path_factory.mktemp("chains")
    kandinsky = tiny_table("kandinsky-table", "tiny-kandinsky22",
                           stage_steps=STAGE_STEPS["tiny-kandinsky22"])
    kandinsky["matrix"]["include"] = [{"backend": "diffusers", "workflow": "img2img",
                                       "strength": 0.5, "batch": 1}]
    deepfloyd = tiny_table("deepfloyd-table", "tiny-deepfloyd-if",
                           stage_steps=STAGE_STEPS["tiny-deepfloyd-if"])
    include = deepfloyd["matrix"]["include"][0]
    include.update(resolution=64, batch=1, stage_steps="stage_2=2,stage_3=2")
    paths = []
    for data in (kandinsky, deepfloyd):
        paths.append(str(write_scenario(folder, yaml.safe_dump(data), f"{data['name']}.yaml")))
    assert main(["run", *paths, "--out", str(folder / "out"), "--quiet",
                 "--isolate", "none"]) == 0
    records = [json.loads(line) for line in (folder / "out" / "results.jsonl").open()]
    return folder, {record["cell"]["id"]: record for record in records}


def test_tiny_chains_run_deterministically_with_per_stage_timings(
    chains: tuple[Path, dict[str, dict]],
) -> None:
    _, records = chains
    kandinsky = records["diffusers-txt2img-nooffload-b2"]
    assert kandinsky["status"] == "ok", kandinsky.get("reason")
    metrics = kandinsky["metrics"]
    assert metrics["check_results"]["determinism"]["status"] == "pass"
    assert metrics["stages"] == "prior+decoder"
    assert (metrics["prior_steps"], metrics["decoder_steps"]) == (3, 4)
    assert metrics["denoise_steps"] == 7  # the chain's steps: every stage's
    assert metrics["its"] == pytest.approx(2 * 7 / metrics["wall_s"], rel=0.2)
    for stage in ("prior", "decoder"):
        assert metrics[f"{stage}_its"] > 0 and metrics[f"{stage}_denoise_its"] > 0
        assert metrics[f"{stage}_s"] < metrics["wall_s"]
    # the stages and the work between them make up the generation
    assert metrics["prior_s"] + metrics["decoder_s"] <= metrics["wall_s"] * 1.001
    assert metrics["encode_s"] < metrics["prior_s"]
    assert metrics["output_shape"] == [2, 64, 64, 3] and metrics["output_finite"]
    assert not metrics["output_constant"]
    img2img = records["diffusers-img2img-nooffload-b1-str0.5"]["metrics"]
    assert img2img["decoder_steps"] == 2  # int(4 * 0.5)
    assert img2img["check_results"]["determinism"]["status"] == "pass"
    cfg = "cfg-stage_1_7-stage_2_4"
    for cell_id, stages in ((f"diffusers-nooffload-steps-stage_2_2-{cfg}-b2", "stage_1+stage_2"),
                            (f"diffusers-nooffload-steps-stage_2_2-stage_3_2-{cfg}-stage_3_9-x4-b1",
                             "stage_1+stage_2+stage_3")):
        record = records[cell_id]
        assert record["status"] == "ok", record.get("reason")
        assert record["metrics"]["stages"] == stages
        assert record["metrics"]["stage_2_steps"] == 2
        assert record["metrics"]["check_results"]["determinism"]["status"] == "pass"
    for cell_id, family in (("original-txt2img-nooffload-b1", "kandinsky22"),
                            (f"original-nooffload-steps-stage_2_2-{cfg}-b1", "deepfloyd-if")):
        assert records[cell_id]["status"] == "unsupported"
        assert records[cell_id]["reason"] == (
            f"{family}: the original (A1111 / CompVis LDM) backend never ran this family; "
            "its releases are diffusers pipelines, which the diffusers backend runs")


def test_the_report_row_shows_each_stage(chains: tuple[Path, dict[str, dict]]) -> None:
    folder, _ = chains
    out = folder / "report.md"
    assert main(["report", str(folder / "out"), "-o", str(out), "--format", "md"]) == 0
    text = out.read_text()
    assert "per-stage it/s (batch 1 / 2)" in text
    row = next(line for line in text.splitlines()
               if line.startswith("| diffusers (txt2img"))
    assert row.count(" · decoder ") == 2  # "prior P · decoder D" at each batch size


def _cells(model: str, **matrix: Any) -> list[Any]:
    """The diffusers txt2img cells without offload of ``model``'s tiny table copy."""
    data = tiny_table(TABLES[model], model, **{"batch": 1, "stage_steps": STAGE_STEPS[model],
                                               **matrix})
    data["matrix"].pop("include", None)
    return [c for c in expand(parse_scenario(data, "table.yaml"))
            if c.backend == "diffusers" and c.offload == "none"]


def _session(model: str) -> tuple[Any, Any]:
    """A diffusers session of ``model`` and its cell (txt2img, batch 1)."""
    cell = _cells(model)[0]
    session = get_backend("diffusers").load(cell, resolve(cell.model, cell.source),
                                            torch.device("cpu"))
    return cell, session


def _generate(session: Any, request: Any) -> np.ndarray:
    with GenerationTimer(torch.device("cpu")) as timer:
        output = session.generate(request, timer)
    return np.asarray(output.images)


@pytest.mark.parametrize("model", ["tiny-kandinsky22", "tiny-deepfloyd-if"])
def test_every_stage_starts_from_the_harness_noise(model: str) -> None:
    """The same request twice gives the same images; another start noise for any one stage
    (the decoder's / stage I's, the prior's / stage II's) gives other images."""
    cell, session = _session(model)
    request = request_for(cell, session)
    first = _generate(session, request)
    assert np.array_equal(first, _generate(session, request))
    other = dataclasses.replace(request, noise=torch.randn_like(request.noise))
    assert not np.allclose(first, _generate(session, other), atol=1e-4)
    (stage, noise), = request.stage_noise.items()
    assert stage == ("prior" if model == "tiny-kandinsky22" else "stage_2")
    other = dataclasses.replace(request, stage_noise={stage: torch.randn_like(noise)})
    assert not np.allclose(first, _generate(session, other), atol=1e-4)


def test_stage_axes_and_sizes_say_what_is_expected() -> None:
    cell, session = _session("tiny-kandinsky22")
    request = request_for(cell, session)
    with pytest.raises(UserError, match="stage_steps: decodr is no stage of this model; "
                                        "its stages: prior, decoder"):
        session.prepare(dataclasses.replace(request, stage_steps={"decodr": 3}))
    with pytest.raises(UserError, match="resolution 96x96: Kandinsky 2.2 decodes multiples "
                                        "of 64 px"):
        session.prepare(dataclasses.replace(request, width=96, height=96))
    with pytest.raises(UserError, match="stage_steps.*expected 'same' or "
                                        "'STAGE=VALUE\\[,STAGE=VALUE...\\]'"):
        _cells("tiny-kandinsky22", stage_steps="prior:3")
    (euler,) = _cells("tiny-deepfloyd-if", sampler="euler")
    assert get_backend("diffusers").unsupported(euler, torch.device("cpu")) == (
        "sampler euler: DeepFloyd IF's pipelines need its learned-variance DDPM scheduler; "
        "expected sampler ddpm")


def test_the_zoo_writes_one_release_repo_per_stage() -> None:
    """The hub layout (a pipeline folder per stage + stages.json), the HF-cache install (one
    repository per stage, the main one resolving the chain offline) and no single file."""
    resolved = resolve("tiny-kandinsky22", "hub")
    assert read_stages(resolved.path) == {
        "family": "kandinsky22", "name": "tiny-kandinsky22",
        "stages": {"prior": "prior", "decoder": "decoder"}}
    classes = {name: json.loads((path / "model_index.json").read_text())["_class_name"]
               for name, path in (resolved.stages or {}).items()}
    assert classes == {"prior": "KandinskyV22PriorPipeline", "decoder": "KandinskyV22Pipeline"}
    # T5's shared and encoder token embeddings are one tensor, stored under both names
    from transformers import T5EncoderModel

    deepfloyd = resolve("tiny-deepfloyd-if", "hub").stages or {}
    t5 = T5EncoderModel.from_pretrained(str(deepfloyd["stage_1"] / "text_encoder"))
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
    hub = resolve("hub:sdbench/tiny-deepfloyd-IF-I", "hub")
    assert hub.family == "deepfloyd-if" and hub.from_cache is True
    assert list(hub.stages or {}) == ["stage_1", "stage_2"]  # the x4 upscaler only on request
    with_x4 = resolve("hub:sdbench/tiny-deepfloyd-IF-I", "hub", optional_stages=True)
    assert list(with_x4.stages or {}) == ["stage_1", "stage_2", "stage_3"]
    assert "models--sdbench--tiny-deepfloyd-x4-upscaler" in str(with_x4.stages["stage_3"])
    with pytest.raises(UserError, match="model 'tiny-deepfloyd-if': tiny-deepfloyd-if "
                       r"\(deepfloyd-if\) has no original single-file layout: its releases are "
                       r"diffusers folders only \(one per stage\); expected source hub"):
        resolve("tiny-deepfloyd-if", "safetensors")


def test_full_size_specs_have_the_releases_sizes() -> None:
    """Parameter counts on the meta device against the releases' stated sizes."""
    stated = {  # billions, from the model cards
        ("kandinsky22", "prior.prior"): 1.0, ("kandinsky22", "prior.image_encoder"): 1.8,
        ("kandinsky22", "decoder.unet"): 1.22, ("kandinsky22", "decoder.movq"): 0.067,
        ("deepfloyd-if", "stage_1.unet"): 4.3, ("deepfloyd-if", "stage_1.text_encoder"): 4.76,
        ("deepfloyd-if", "stage_2.unet"): 1.2, ("deepfloyd-if", "stage_3.unet"): 0.473,
    }
    counts = {name: parameter_counts(STAGED_SPECS[name]) for name in ("kandinsky22",
                                                                      "deepfloyd-if")}
    for (model, component), billions in stated.items():
        assert counts[model][component] / 1e9 == pytest.approx(billions, rel=0.04), component


def test_the_timer_times_each_stage_from_its_own_start() -> None:
    import time

    with GenerationTimer(torch.device("cpu")) as timer:
        timer.begin("encode")
        timer.begin_stage("a")
        timer.end("encode")
        timer.begin("denoise")
        for _ in range(2):
            timer.step()
        timer.end_stage("a")
        time.sleep(0.05)  # between the stages: not a step of either
        timer.begin_stage("b")
        timer.restart_steps()
        for _ in range(3):
            timer.step()
        timer.end("denoise")
        timer.end_stage("b")
    timing = Timing.from_timer(timer)
    assert list(timing.stages) == ["a", "b"] and timing.stage_steps == 5
    assert len(timing.stages["a"].steps) == 2 and len(timing.stages["b"].steps) == 3
    assert max(timing.steps) < 0.05 < timing.denoise  # type: ignore[operator]


@pytest.mark.slow
def test_kandinsky22_full_size_loads_and_runs_each_stage() -> None:
    """The release-shaped kandinsky22-fp16 (9.2 GB, streamed in fp16): each stage loads with
    every weight from its files and runs two steps on the CPU (in fp32: ~15 GB at the prior)."""
    from diffusers import DiffusionPipeline

    stages = resolve("kandinsky22-fp16", "hub").stages or {}
    generator = torch.Generator().manual_seed(0)
    prior = DiffusionPipeline.from_pretrained(str(stages["prior"]), dtype=torch.float32,
                                              local_files_only=True)
    assert sum(p.numel() for p in prior.prior.parameters()) == 1_026_225_920
    embeds = prior("a photograph of an astronaut riding a horse", num_inference_steps=2,
                   generator=generator)
    assert embeds.image_embeds.shape == (1, 1280) and torch.isfinite(embeds.image_embeds).all()
    del prior
    decoder = DiffusionPipeline.from_pretrained(str(stages["decoder"]), dtype=torch.float32,
                                                local_files_only=True)
    assert not any(p.is_meta for p in decoder.unet.parameters())
    images = decoder(image_embeds=embeds.image_embeds,
                     negative_image_embeds=embeds.negative_image_embeds, height=64, width=64,
                     num_inference_steps=2, generator=generator, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
