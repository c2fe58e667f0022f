"""scenarios/conformance.yaml on tiny: every workflow on both backends, checked.

The whole scenario takes most of a minute on a 2-core CPU, so its tests are slow-marked; each
workflow's checks also run in the default suite through tests/test_conformance.py and the
backends' workflow tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from harness import expand, load_scenario, parse_scenario
from harness.results import Result
from harness.runner import Runner, any_failed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    cells = expand(load_scenario(ROOT / "scenarios/conformance.yaml"))
    ran = Runner(tmp_path_factory.mktemp("conformance"), progress=False, isolate="none").run(cells)
    assert not any_failed(ran), [
        (r.cell.id, r.reason, r.metrics.get("check_results")) for r in ran if r.status != "ok"
        and r.status != "unsupported" or r.metrics.get("checks_failed")
    ]
    return {r.cell.id: r for r in ran}


def _checks(results: dict[str, Result], cell_id: str) -> dict[str, dict]:
    result = results[cell_id]
    assert result.status == "ok", result.reason
    return result.metrics["check_results"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["original", "diffusers"])
def test_semantic_checks_pass_on_both_backends(results: dict[str, Result], backend: str) -> None:
    lora = _checks(results, f"{backend}-tiny-txt2img-safetensors-euler-lora-style@0.5+detail@1.0")
    for name in ("determinism", "lora_strength0", "lora_monotonic", "lora_merged"):
        assert lora[name]["status"] == "pass", (name, lora[name])
    embedding = _checks(results, f"{backend}-tiny-txt2img-safetensors-euler-embedding-sbstyle+sbmulti")
    for name in ("determinism", "embedding_effect", "embedding_by_hand"):
        assert embedding[name]["status"] == "pass", (name, embedding[name])
    img2img = _checks(results, f"{backend}-tiny-img2img-safetensors-euler-str0.5")
    assert img2img["img2img_strength0"]["status"] == "pass"
    inpaint = _checks(results, f"{backend}-tiny-inpaint-safetensors-euler-str1-mask-center")
    assert inpaint["inpaint_keeps_unmasked"]["status"] == "pass"
    outpaint = _checks(results, f"{backend}-tiny-outpaint-safetensors-euler-str1-pad16")
    assert outpaint["inpaint_keeps_unmasked"]["status"] == "pass"
    for family in ("sd21", "sdxl"):
        outpaint = _checks(results, f"{backend}-tiny-{family}-outpaint-safetensors-euler-str1-pad16")
        assert outpaint["inpaint_keeps_unmasked"]["status"] == "pass", family
    for cell_id in (f"{backend}-tiny-hires-safetensors-euler-str0.5-x2-latent",
                    f"{backend}-tiny-inpaint-inpaint-safetensors-euler-str1-mask-left"):
        assert _checks(results, cell_id)["determinism"]["status"] == "pass"


@pytest.mark.slow
def test_long_prompts_kept_by_original_truncated_by_diffusers(results: dict[str, Result]) -> None:
    original = _checks(results, "original-tiny-txt2img-safetensors-euler")["long_prompt"]
    diffusers = _checks(results, "diffusers-tiny-txt2img-safetensors-euler")["long_prompt"]
    assert original["status"] == diffusers["status"] == "pass"
    assert "keeps long prompts" in original["detail"]
    assert "truncates at 77" in diffusers["detail"]


@pytest.mark.slow
def test_every_sampler_runs_or_is_unsupported(results: dict[str, Result]) -> None:
    samplers = [r for r in results.values() if r.cell.workflow == "txt2img"
                and r.cell.lora == "none" and r.cell.embedding == "none"
                and r.cell.model == "tiny"]
    assert len(samplers) == 42
    unsupported = {r.cell.id for r in samplers if r.status == "unsupported"}
    assert unsupported == {
        "original-tiny-txt2img-safetensors-deis",
        "original-tiny-txt2img-safetensors-unipc",
        "diffusers-tiny-txt2img-safetensors-dpmpp_2s_a",
        "diffusers-tiny-txt2img-safetensors-dpmpp_2s_a_karras",
        "diffusers-tiny-txt2img-safetensors-euler_a_karras",
    }
    for result in samplers:
        if result.status == "ok":
            assert result.metrics["check_results"]["determinism"]["status"] == "pass", result.cell.id


@pytest.mark.slow
def test_parity_where_both_backends_compute_the_same(results: dict[str, Result]) -> None:
    for cell_id in ("diffusers-tiny-txt2img-safetensors-euler", "diffusers-tiny-txt2img-safetensors-heun",
                    "diffusers-tiny-txt2img-safetensors-lms", "diffusers-tiny-img2img-safetensors-euler-str0.5",
                    "diffusers-tiny-hires-safetensors-euler-str0.5-x2-latent",
                    "diffusers-tiny-txt2img-safetensors-euler-lora-style@0.5+detail@1.0",
                    "diffusers-tiny-txt2img-safetensors-euler-embedding-sbstyle+sbmulti",
                    "diffusers-tiny-sd21-txt2img-safetensors-euler", "diffusers-tiny-sd21-img2img-safetensors-euler-str0.5",
                    "diffusers-tiny-sd21-hires-safetensors-euler-str0.5-x2-latent",
                    "diffusers-tiny-sd21-txt2img-safetensors-euler-embedding-sbstyle",
                    "diffusers-tiny-sdxl-txt2img-safetensors-euler", "diffusers-tiny-sdxl-txt2img-safetensors-ddim",
                    "diffusers-tiny-sdxl-img2img-safetensors-euler-str0.5",
                    "diffusers-tiny-sdxl-hires-safetensors-euler-str0.5-x2-latent",
                    "diffusers-tiny-sdxl-txt2img-safetensors-euler-embedding-sbstyle",
                    "diffusers-tiny-sdxl-txt2img-safetensors-euler-lora-style@0.5+detail@1.0"):
        metrics = results[cell_id].metrics
        assert metrics["parity_status"] == "pass", (cell_id, metrics["check_results"]["parity"])
        assert metrics["parity_latent_rel_err"] < 1e-3
        assert metrics["parity_ref"] == cell_id.replace("diffusers-", "original-", 1)


def _bad_inputs(folder: Path) -> dict[str, str]:
    from models import extra_file, lora_targets, model_spec

    name, target = next(
        (name, target) for name, target in lora_targets(model_spec("tiny")).items()
        if "down_blocks_0_attentions_0" in name and len(target.shape) == 2
    )
    rank = 2
    bad = name.replace("down_blocks_0", "down_blocks_7")
    lora = folder / "ghost.safetensors"
    save_file(
        {
            f"{bad}.lora_down.weight": torch.zeros(rank, target.shape[1]),
            f"{bad}.lora_up.weight": torch.zeros(target.shape[0], rank),
            f"{bad}.alpha": torch.tensor(float(rank)),
        },
        lora,
    )
    embedding = folder / "halfword.pt"
    data = extra_file("embedding", "sbstyle", "tiny").read_bytes()
    embedding.write_bytes(data[: len(data) // 2])
    mask = folder / "small-mask.png"
    Image.new("L", (32, 32), 255).save(mask)
    return {"lora": str(lora), "embedding": str(embedding), "mask": str(mask)}


def test_bad_inputs_fail_their_cell_and_the_run_goes_on(tmp_path: Path) -> None:
    bad = _bad_inputs(tmp_path)
    data = {
        "name": "bad-inputs",
        "repeats": 1,
        "warmup": 0,
        "matrix": {
            "backend": ["original", "diffusers"],
            "model": "tiny",
            "source": "safetensors",
            "device": "cpu",
            "resolution": 64,
            "steps": 2,
            "include": [
                {"backend": "original", "lora": f"{bad['lora']}@1"},
                {"backend": "diffusers", "lora": f"{bad['lora']}@1"},
                {"backend": "original", "embedding": bad["embedding"]},
                {"backend": "diffusers", "embedding": bad["embedding"]},
                {"backend": "original", "workflow": "inpaint", "mask": bad["mask"]},
                {"backend": "diffusers", "workflow": "inpaint", "mask": bad["mask"]},
            ],
        },
    }
    results = Runner(tmp_path / "out", progress=False, isolate="none").run(expand(parse_scenario(data, "b.yaml")))
    assert [r.status for r in results].count("ok") == 2
    failed = [r for r in results if r.status != "ok"]
    assert len(failed) == 6 and all(r.status == "error" for r in failed)
    for result in failed:
        assert "\n" not in result.reason
        if result.cell.lora != "none":
            assert "ghost.safetensors" in result.reason and "down_blocks_7" in result.reason
        elif result.cell.embedding != "none":
            assert "halfword.pt" in result.reason
        else:
            assert "small-mask.png" in result.reason and "32x32" in result.reason
