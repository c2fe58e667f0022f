"""The diffusers backend's workflows (img2img, inpaint, outpaint, hires) and features (LoRA,
textual inversion) on the tiny zoo model, CPU, 64x64 px, 2-3 steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from backends import get_backend
from backends.base import EmbeddingRef, Output, Request
from backends.diffusers_backend import DiffusersSession, denoising_steps
from harness import expand, parse_scenario
from harness.errors import UnsupportedError, UserError
from harness.execute import request_for
from harness.matrix import Cell
from harness.measure import GenerationTimer
from harness.runner import Runner

CPU = torch.device("cpu")
TINY = {
    "model": "tiny",
    "device": "cpu",
    "resolution": 64,
    "steps": 3,
    "seed": 7,
    "sampler": "euler",
    "guidance": 7.5,
}


def _cell(**axes: Any) -> Cell:
    data = {"name": "t", "repeats": 1, "warmup": 0, "matrix": TINY | axes}
    cells = expand(parse_scenario(data, "t.yaml"))
    assert len(cells) == 1
    return cells[0]


def _load(cell: Cell) -> DiffusersSession:
    session = get_backend("diffusers").load(cell, models.resolve(cell.model, cell.source), CPU)
    assert isinstance(session, DiffusersSession)
    return session


def _run(session: DiffusersSession, request: Request) -> tuple[Output, GenerationTimer]:
    with GenerationTimer(CPU) as timer:
        output = session.generate(request, timer)
    return output, timer


def _generate(session: DiffusersSession, cell: Cell) -> Output:
    return _run(session, request_for(cell, session))[0]


def _init_latents(session: DiffusersSession, request: Request) -> torch.Tensor:
    """The VAE mode of the request's init image times the scaling factor (computed here)."""
    assert request.init_image is not None
    vae = session.pipe.vae
    pixels = torch.from_numpy(request.init_image).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor


@pytest.fixture(scope="module")
def session() -> DiffusersSession:
    """A tiny session for workflows and features (LoRAs / embeddings get loaded into it)."""
    return _load(_cell())


@pytest.fixture(scope="module")
def pristine() -> DiffusersSession:
    """A tiny session that never loads a LoRA or an embedding."""
    return _load(_cell())


# -- workflows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("axes", "steps"),
    [
        ({"workflow": "txt2img"}, 3),
        ({"workflow": "img2img", "strength": 0.7}, 2),
        ({"workflow": "inpaint", "strength": 1.0}, 3),
        ({"workflow": "outpaint", "outpaint_px": 16, "strength": 1.0}, 3),
        ({"workflow": "hires", "hires_scale": 1.5, "strength": 0.7}, 3 + 2),
        ({"workflow": "hires", "hires_upscaler": "image", "strength": 0.4, "batch": 2}, 3 + 1),
    ],
)
def test_every_workflow_runs_at_the_output_size(
    session: DiffusersSession, axes: dict[str, Any], steps: int
) -> None:
    cell = _cell(**axes)
    output, timer = _run(session, request_for(cell, session))
    width, height = cell.output_size
    assert output.images.shape == (cell.batch, height, width, 3)
    assert output.images.dtype == np.float32 and np.isfinite(output.images).all()
    assert output.images.std() > 0
    assert tuple(output.latents.shape) == session.latent_shape(cell.batch, width, height)
    assert len(timer.step_s()) == steps  # timer.step() per step, both hires passes
    for phase in ("encode", "denoise", "decode"):
        assert (timer.phase_s(phase) or 0.0) > 0, phase


def test_img2img_at_strength_zero_returns_the_init_latents(session: DiffusersSession) -> None:
    request = request_for(_cell(workflow="img2img", strength=0.0, batch=2), session)
    output, timer = _run(session, request)
    init = _init_latents(session, request)
    assert torch.equal(output.latents, init.expand(2, -1, -1, -1))
    assert timer.step_s() == [] and output.images.shape == (2, 64, 64, 3)


def test_img2img_uses_the_harness_noise(session: DiffusersSession) -> None:
    request = request_for(_cell(workflow="img2img", strength=0.7), session)
    first = _run(session, request)[0]
    again = _run(session, dataclasses.replace(request, seed=request.seed + 1))[0]
    other = _run(session, dataclasses.replace(request, noise=torch.randn_like(request.noise)))[0]
    assert torch.equal(first.latents, again.latents)  # the seed only feeds ancestral noise
    assert not torch.equal(first.latents, other.latents)


def test_inpaint_keeps_the_unmasked_latents(session: DiffusersSession) -> None:
    request = request_for(_cell(workflow="inpaint", mask="left", strength=0.7), session)
    output = _run(session, request)[0]
    init = _init_latents(session, request)
    assert request.mask is not None
    mask = torch.nn.functional.interpolate(torch.from_numpy(request.mask)[None, None], size=(8, 8))
    keep = (mask < 0.5).expand_as(init)
    assert keep.any() and (~keep).any()
    assert torch.equal(output.latents[keep], init[keep])
    assert not torch.allclose(output.latents[~keep], init[~keep])


def test_inpaint_mask_of_another_size_is_an_error(session: DiffusersSession) -> None:
    request = request_for(_cell(workflow="inpaint"), session)
    bad = dataclasses.replace(request, mask=np.zeros((32, 48), dtype=np.float32))
    with pytest.raises(ValueError, match="mask is 48x32 px but the image is 64x64 px"):
        _run(session, bad)


def test_hires_second_pass_starts_from_the_upscaled_first_pass(session: DiffusersSession) -> None:
    hires = _cell(workflow="hires", strength=0.0)
    output, timer = _run(session, request_for(hires, session))
    first_pass = _generate(session, _cell())
    upscaled = torch.nn.functional.interpolate(first_pass.latents, size=(16, 16), mode="bilinear")
    assert len(timer.step_s()) == 3 + denoising_steps(3, 0.0)
    assert torch.equal(output.latents, upscaled)
    assert output.images.shape == (1, 128, 128, 3)


def test_nine_channel_inpainting_model(tmp_path: Path) -> None:
    backend = get_backend("diffusers")
    for source in ("hub", "safetensors"):
        cell = _cell(model="tiny-inpaint", source=source, workflow="inpaint", steps=2)
        session = _load(cell)
        assert session.unet_in_channels == 9
        output = _generate(session, cell)
        assert output.images.shape == (1, 64, 64, 3) and np.isfinite(output.images).all()
    txt2img = _cell(model="tiny-inpaint")
    assert "inpainting UNet" in (backend.unsupported(txt2img, CPU) or "")
    with pytest.raises(UnsupportedError, match="9 input channels"):
        _generate(session, _cell(model="tiny-inpaint", workflow="img2img"))


# -- LoRA ------------------------------------------------------------------------------------


def test_lora_strength_zero_equals_no_lora_and_a_session_that_never_loaded_one(
    session: DiffusersSession, pristine: DiffusersSession
) -> None:
    base = _generate(pristine, _cell())
    zero = _generate(session, _cell(lora="zoo:style@0+zoo:detail@0"))
    assert session.loras.files  # loaded
    none = _generate(session, _cell())
    for output in (zero, none):
        assert np.array_equal(output.images, base.images)
        assert torch.equal(output.latents, base.latents)


def test_lora_moves_the_output_monotonically_with_strength(
    session: DiffusersSession, pristine: DiffusersSession
) -> None:
    base = _generate(pristine, _cell()).latents
    distances = [
        float((_generate(session, _cell(lora=f"zoo:style@{s}")).latents - base).norm())
        for s in (0.25, 0.5, 1.0)
    ]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_lora_adapters_do_not_leak_between_requests(session: DiffusersSession) -> None:
    """After style (UNet + text encoder) ran, detail alone (UNet only) = a fresh session's."""
    _generate(session, _cell(lora="zoo:style@1"))
    detail = _generate(session, _cell(lora="zoo:detail@0.8"))
    fresh = _generate(_load(_cell()), _cell(lora="zoo:detail@0.8"))
    assert torch.equal(detail.latents, fresh.latents)


def test_two_loras_equal_the_weights_merged_by_hand(
    session: DiffusersSession, tmp_path: Path
) -> None:
    strengths = {"style": 0.8, "detail": 0.5}
    files = [(models.extra_file("lora", name, "tiny"), s) for name, s in strengths.items()]
    merged = models.merge_loras("tiny", "hub", files, tmp_path / "merged.safetensors")
    steps = {"steps": 2}
    by_adapters = _generate(session, _cell(lora="zoo:style@0.8+zoo:detail@0.5", **steps))
    by_hand = _generate(_load(_cell(model=str(merged), source="safetensors")), _cell(**steps))
    scale = float(by_hand.latents.abs().max())
    assert torch.allclose(by_adapters.latents, by_hand.latents, atol=1e-4 * scale, rtol=0)
    assert np.abs(by_adapters.images - by_hand.images).max() < 2e-3


def _bad_lora(tmp_path: Path) -> Path:
    tensors = load_file(str(models.extra_file("lora", "style", "tiny")))
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.ones(4, 32)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 4)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    return path


def test_lora_keys_for_missing_modules_are_an_error(
    session: DiffusersSession, pristine: DiffusersSession, tmp_path: Path
) -> None:
    path = _bad_lora(tmp_path)
    request = request_for(_cell(lora=f"{path}@1"), session)
    with pytest.raises(
        UserError, match=r"bad\.safetensors.*1 of its \d+ modules name nothing"
    ) as info:
        _run(session, request)
    assert "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight" in str(info.value)
    assert not any(name.startswith("bad_") for name in session.loras.files.values())
    # the session goes on, unchanged
    base = _generate(pristine, _cell())
    assert torch.equal(_generate(session, _cell()).latents, base.latents)


def test_bad_lora_is_that_cells_error_and_the_run_goes_on(tmp_path: Path) -> None:
    path = _bad_lora(tmp_path)
    data = {
        "name": "t",
        "repeats": 1,
        "warmup": 0,
        "matrix": TINY | {"steps": 2, "lora": [f"{path}@1", "none"]},
    }
    results = Runner(None, progress=False, isolate="none").run(expand(parse_scenario(data, "t.yaml")))
    by_lora = {result.cell.lora: result for result in results}
    assert by_lora["none"].status == "ok"
    failed = by_lora[f"{path}@1"]
    assert failed.status == "error" and "bad.safetensors" in (failed.reason or "")


# -- textual inversion -----------------------------------------------------------------------


def test_embedding_trigger_word_changes_the_output(
    session: DiffusersSession, pristine: DiffusersSession
) -> None:
    base = _generate(pristine, _cell())
    for name in ("sbstyle", "sbmulti"):  # 1 vector (.pt), 3 vectors (.safetensors)
        cell = _cell(embedding=f"zoo:{name}")
        assert name in request_for(cell, session).prompt
        assert not torch.allclose(_generate(session, cell).latents, base.latents)
    assert session.embeddings.loaded["sbmulti"][1] == ["sbmulti", "sbmulti_1", "sbmulti_2"]
    assert torch.equal(_generate(session, _cell()).latents, base.latents)


def test_embedding_file_and_vectors_by_hand_give_the_same_image(
    session: DiffusersSession,
) -> None:
    for name in ("sbstyle", "sbmulti"):
        request = request_for(_cell(embedding=f"zoo:{name}"), session)
        from_file = _run(session, request)[0]
        token, vectors = models.read_embedding(request.embeddings[0].path)
        by_hand = dataclasses.replace(request, embeddings=(EmbeddingRef(token, vectors=vectors),))
        from_vectors = _run(session, by_hand)[0]  # same token, other source: reloaded
        assert session.embeddings.loaded[token][0].startswith("vectors:")
        assert np.array_equal(from_file.images, from_vectors.images)
        assert torch.equal(from_file.latents, from_vectors.latents)


def test_truncated_embedding_is_an_error(session: DiffusersSession, tmp_path: Path) -> None:
    source = models.extra_file("embedding", "sbstyle", "tiny")
    truncated = tmp_path / "broken.pt"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    request = request_for(_cell(embedding=str(truncated)), session)
    with pytest.raises(UserError, match=r"broken\.pt"):
        _run(session, request)
    assert "broken" not in session.embeddings.loaded
