"""Workflows, LoRA and textual inversion on the original backend (issue 4).

Everything runs on ``tiny`` / ``tiny-inpaint`` at 64x64 px with 2-4 steps; one session per
model is shared by the module (``tiny_session`` records a no-LoRA baseline right after loading,
before any LoRA touches its weights).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_original_parity import make_cell, rel_error
from test_original_text import prompt_of

from backends import get_backend
from backends.base import EmbeddingRef, LoraRef, Output, Request
from backends.original import OriginalSession
from backends.original.lora import UNET_PREFIX
from backends.original.text import PLACEHOLDER_ID
from backends.original.workflows import (
    encode,
    image_tensor,
    inpaint_conditioning,
    latent_mask,
    mask_tensor,
)
from harness.errors import UserError
from harness.execute import request_for
from harness.matrix import Cell
from harness.measure import GenerationTimer
from models import extra_file, get_spec, lora_targets, merge_loras, read_embedding, resolve

CPU = torch.device("cpu")
STEPS = 2


def load(model: str = "tiny", path: Path | None = None) -> OriginalSession:
    cell = make_cell(model=model, steps=STEPS)
    resolved = resolve(str(path) if path else model, "safetensors")
    session = get_backend("original").load(cell, resolved, CPU)
    assert isinstance(session, OriginalSession)
    return session


def run(session: OriginalSession, request: Request) -> tuple[Output, int]:
    """The output and the number of ``timer.step()`` calls."""
    with GenerationTimer(CPU) as timer:
        output = session.generate(request, timer)
    return output, len(timer.step_s())


def request(session: OriginalSession, **cell_values: Any) -> Request:
    return request_for(make_cell(**{"steps": STEPS, **cell_values}), session)


@pytest.fixture(scope="module")
def tiny_session() -> Any:
    session = load()
    session.baseline = run(session, request(session))[0]  # type: ignore[attr-defined]
    yield session
    session.close()


@pytest.fixture(scope="module")
def inpaint_session() -> Any:
    session = load("tiny-inpaint")
    yield session
    session.close()


def init_latents(session: OriginalSession, req: Request) -> torch.Tensor:
    assert req.init_image is not None
    pixels = image_tensor(req.init_image, req.width, req.height, CPU)
    with torch.no_grad():
        return encode(session.ldm, pixels).expand(req.batch, -1, -1, -1)


# --- workflows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"workflow": "img2img"},
        {"workflow": "inpaint"},
        {"workflow": "outpaint"},
        {"workflow": "hires", "hires_upscaler": "image"},
        {"lora": "zoo:style@0.5+zoo:detail@1"},
        {"embedding": "zoo:sbstyle"},
        {"model": "tiny-inpaint", "workflow": "inpaint"},
    ],
)
def test_workflows_and_features_are_supported(values: dict[str, Any]) -> None:
    from backends.original import OriginalBackend

    assert OriginalBackend().unsupported(make_cell(**values), CPU) is None


@pytest.mark.parametrize(
    ("workflow", "upscaler", "steps"),
    [
        ("txt2img", "latent", STEPS),
        ("img2img", "latent", int(STEPS * 0.75)),
        ("inpaint", "latent", int(STEPS * 0.75)),
        ("outpaint", "latent", int(STEPS * 0.75)),
        ("hires", "latent", STEPS + int(STEPS * 0.75)),
        ("hires", "image", STEPS + int(STEPS * 0.75)),
    ],
)
def test_workflow_output_size_and_steps(
    tiny_session: OriginalSession, workflow: str, upscaler: str, steps: int
) -> None:
    cell = make_cell(steps=STEPS, workflow=workflow, hires_upscaler=upscaler, batch=2)
    output, step_calls = run(tiny_session, request_for(cell, tiny_session))
    width, height = cell.output_size
    assert output.images.shape == (2, height, width, 3)
    assert output.latents.shape == (2, 4, height // 8, width // 8)
    assert np.isfinite(output.images).all() and output.images.std() > 0
    assert step_calls == steps


@pytest.mark.parametrize("workflow", ["txt2img", "img2img", "inpaint", "hires"])
def test_inpainting_model_runs_every_workflow(
    inpaint_session: OriginalSession, workflow: str
) -> None:
    cell = make_cell(model="tiny-inpaint", steps=STEPS, workflow=workflow)
    output, _ = run(inpaint_session, request_for(cell, inpaint_session))
    width, height = cell.output_size
    assert output.images.shape == (1, height, width, 3)
    assert np.isfinite(output.images).all()


def test_img2img_strength_zero_returns_the_init_latents(tiny_session: OriginalSession) -> None:
    req = request(tiny_session, workflow="img2img", strength=0.0)
    output, step_calls = run(tiny_session, req)
    assert step_calls == 0
    assert torch.equal(output.latents, init_latents(tiny_session, req))


def test_img2img_strength_moves_the_output(tiny_session: OriginalSession) -> None:
    low = run(tiny_session, request(tiny_session, workflow="img2img", strength=0.5))[0]
    high = run(tiny_session, request(tiny_session, workflow="img2img", strength=1.0))[0]
    init = init_latents(tiny_session, request(tiny_session, workflow="img2img"))
    assert rel_error(low.latents, init) < rel_error(high.latents, init)


@pytest.mark.parametrize("model", ["tiny", "tiny-inpaint"])
def test_inpaint_keeps_the_unmasked_latents(
    tiny_session: OriginalSession, inpaint_session: OriginalSession, model: str
) -> None:
    session = tiny_session if model == "tiny" else inpaint_session
    req = request(session, model=model, workflow="inpaint", mask="center", steps=4)
    output, _ = run(session, req)
    init = init_latents(session, req)
    assert req.mask is not None
    keep = latent_mask(mask_tensor(req.mask, req.width, req.height, CPU), (8, 8)) == 0
    keep = keep.expand_as(init)
    assert torch.equal(output.latents[keep], init[keep])
    assert not torch.allclose(output.latents[~keep], init[~keep])


def test_inpaint_conditioning_is_mask_then_masked_image(inpaint_session: OriginalSession) -> None:
    """diffusers' channel order: cat([latents, mask, masked_image_latents])."""
    req = request(inpaint_session, model="tiny-inpaint", workflow="inpaint", mask="left")
    assert req.init_image is not None and req.mask is not None
    pixels = image_tensor(req.init_image, 64, 64, CPU)
    mask = mask_tensor(req.mask, 64, 64, CPU)
    with torch.no_grad():
        cond = inpaint_conditioning(inpaint_session.ldm, (2, 4, 8, 8), pixels, mask, CPU)
        masked = encode(inpaint_session.ldm, pixels * (1 - mask))
    assert cond.shape == (2, 5, 8, 8)
    assert torch.equal(cond[:, 0, :, :4], torch.ones(2, 8, 4))
    assert torch.equal(cond[:, 0, :, 4:], torch.zeros(2, 8, 4))
    assert torch.equal(cond[:1, 1:], masked)


def test_mask_of_the_wrong_size_is_a_user_error(tiny_session: OriginalSession) -> None:
    req = request(tiny_session, workflow="inpaint")
    req = dataclasses.replace(req, mask=np.ones((32, 64), dtype=np.float32))
    with pytest.raises(UserError, match="mask is 64x32 px, the image 64x64 px"):
        run(tiny_session, req)


# --- LoRA ----------------------------------------------------------------------------------


def lora_request(session: OriginalSession, *loras: tuple[str, float]) -> Request:
    refs = tuple(LoraRef(extra_file("lora", name, "tiny"), strength) for name, strength in loras)
    return dataclasses.replace(request(session), loras=refs)


def test_lora_names_cover_the_zoo_targets(tiny_session: OriginalSession) -> None:
    """Every kohya name the zoo may write lands on the module the zoo merges into."""
    from backends.original.checkpoint import module_key

    modules = dict(tiny_session.ldm.named_modules())
    flat = not hasattr(tiny_session.ldm.cond_stage_model.transformer, "text_model")
    for name, target in lora_targets(get_spec("tiny")).items():
        if "embeddings" in name:  # token / position embeddings: not LoRA layers in A1111
            continue
        path = module_key(target.original_key, flat).removesuffix(".weight")
        assert tiny_session.lora.layers[name] is modules[path], name


def test_lora_strength_zero_equals_no_lora(tiny_session: OriginalSession) -> None:
    baseline: Output = tiny_session.baseline  # type: ignore[attr-defined]
    zero = run(tiny_session, lora_request(tiny_session, ("style", 0.0)))[0]
    assert torch.equal(zero.latents, baseline.latents)
    assert np.array_equal(zero.images, baseline.images)


def test_lora_moves_the_output_monotonically(tiny_session: OriginalSession) -> None:
    baseline: Output = tiny_session.baseline  # type: ignore[attr-defined]
    distances = [
        rel_error(
            run(tiny_session, lora_request(tiny_session, ("style", s)))[0].latents, baseline.latents
        )
        for s in (0.25, 0.5, 1.0)
    ]
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_lora_weights_are_restored_exactly(tiny_session: OriginalSession) -> None:
    run(tiny_session, request(tiny_session))  # patches stay until the set changes: clear them
    before = {k: v.clone() for k, v in tiny_session.ldm.state_dict().items()}
    run(tiny_session, lora_request(tiny_session, ("style", 0.8), ("detail", 0.6)))
    patched = tiny_session.ldm.state_dict()
    assert any(not torch.equal(patched[k], before[k]) for k in before)
    output = run(tiny_session, request(tiny_session))[0]
    after = tiny_session.ldm.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(output.latents, tiny_session.baseline.latents)  # type: ignore[attr-defined]


def test_two_loras_equal_the_weights_merged_by_hand(
    tiny_session: OriginalSession, tmp_path: Path
) -> None:
    pairs = [("style", 0.7), ("detail", -0.4)]
    both = run(tiny_session, lora_request(tiny_session, *pairs))[0]
    files = [(extra_file("lora", name, "tiny"), strength) for name, strength in pairs]
    merged_file = merge_loras("tiny", "safetensors", files, tmp_path / "merged.safetensors")
    merged = load(path=merged_file)
    try:
        reference = run(merged, request(merged))[0]
    finally:
        merged.close()
    assert rel_error(both.latents, reference.latents) <= 1e-4


def test_lora_keys_for_missing_modules_are_a_user_error(
    tiny_session: OriginalSession, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    name = UNET_PREFIX + "down_blocks_7_attentions_0_proj_in"
    save_file(
        {
            f"{name}.lora_down.weight": torch.zeros(2, 8),
            f"{name}.lora_up.weight": torch.zeros(8, 2),
            f"{name}.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    bad = dataclasses.replace(request(tiny_session), loras=(LoraRef(path, 1.0),))
    with pytest.raises(UserError, match=r"foreign\.safetensors.*down_blocks_7_attentions_0"):
        run(tiny_session, bad)
    output = run(tiny_session, request(tiny_session))[0]  # the session goes on, unpatched
    assert torch.equal(output.latents, tiny_session.baseline.latents)  # type: ignore[attr-defined]


# --- textual inversion ---------------------------------------------------------------------


def embedding_request(session: OriginalSession, name: str, **values: Any) -> Request:
    path = extra_file("embedding", name, "tiny")
    cell = dataclasses.replace(make_cell(steps=STEPS), embedding=f"zoo:{name}", **values)
    req = request_for(cell, session)
    assert req.embeddings == (EmbeddingRef(token=name, path=path),)
    assert name in req.prompt.split() or f", {name}" in req.prompt
    return req


@pytest.mark.parametrize("name", ["sbstyle", "sbmulti"])
def test_embedding_trigger_changes_the_output(tiny_session: OriginalSession, name: str) -> None:
    req = embedding_request(tiny_session, name)
    with_vectors = run(tiny_session, req)[0]
    without = run(tiny_session, dataclasses.replace(req, embeddings=()))[0]
    assert not torch.equal(with_vectors.latents, without.latents)


@pytest.mark.parametrize("name", ["sbstyle", "sbmulti"])
def test_embedding_file_and_vectors_by_hand_are_identical(
    tiny_session: OriginalSession, name: str
) -> None:
    req = embedding_request(tiny_session, name)
    token, vectors = read_embedding(extra_file("embedding", name, "tiny"))
    by_hand = dataclasses.replace(req, embeddings=(EmbeddingRef(token=token, vectors=vectors),))
    from_file = run(tiny_session, req)[0]
    assert torch.equal(run(tiny_session, by_hand)[0].latents, from_file.latents)
    assert np.array_equal(run(tiny_session, by_hand)[0].images, from_file.images)


def test_truncated_embedding_is_a_user_error(tiny_session: OriginalSession, tmp_path: Path) -> None:
    source = extra_file("embedding", "sbmulti", "tiny")
    broken = tmp_path / source.name
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    req = embedding_request(tiny_session, "sbmulti")
    req = dataclasses.replace(req, embeddings=(EmbeddingRef(token="sbmulti", path=broken),))
    with pytest.raises(UserError, match="sbmulti"):
        run(tiny_session, req)


def test_embedding_never_straddles_a_chunk(tiny_session: OriginalSession) -> None:
    text = tiny_session.ldm.cond_stage_model
    hidden = text.transformer.get_input_embeddings().embedding_dim
    vectors = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0))
    prompt, _ids = prompt_of(text, 74)
    chunks = text.prompt_chunks(f"{prompt} sbtrigger dog", {"sbtrigger": vectors})
    assert len(chunks) == 2
    assert chunks[0].fixes == [] and len(chunks[0].tokens) == 77
    assert chunks[1].tokens[1:4] == [PLACEHOLDER_ID] * 3
    assert [position for position, _ in chunks[1].fixes] == [1]


# --- parity with diffusers -----------------------------------------------------------------


def test_img2img_euler_parity_with_diffusers(tiny_session: OriginalSession) -> None:
    backend = get_backend("diffusers")
    cell: Cell = dataclasses.replace(
        make_cell(steps=4, workflow="img2img", strength=0.75), backend="diffusers"
    )
    reason = backend.unsupported(cell, CPU)
    if reason is not None:
        pytest.skip(f"diffusers backend: {reason}")
    ours = run(tiny_session, request_for(cell, tiny_session))[0]
    theirs_session = backend.load(cell, resolve("tiny", "safetensors"), CPU)
    try:
        with GenerationTimer(CPU) as timer:
            theirs = theirs_session.generate(request_for(cell, theirs_session), timer)
    finally:
        theirs_session.close()
    error = rel_error(ours.latents, theirs.latents.float().cpu())
    mse = float(np.mean((ours.images.astype(np.float64) - theirs.images) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    assert error <= 1e-4, f"latent rel. error {error:.2e}, image PSNR {psnr:.1f} dB"
