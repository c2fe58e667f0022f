"""Parity of the original backend with diffusers on the same single file (issue 3).

Component parity (UNet output, VAE decode, text-encoder hidden states) is checked against
diffusers' modules loaded with ``from_single_file`` from the very file the original backend
loads; end-to-end parity runs both backends through :func:`backends.get_backend` with the same
noise, seed and ``euler`` sampler and compares final latents. ``sd15`` runs only under
``-m slow``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from backends import get_backend
from backends.base import Request
from backends.original.checkpoint import load_latent_diffusion
from harness.matrix import Cell
from harness.measure import GenerationTimer
from models import ResolvedModel, resolve

COMPONENT_RTOL = 1e-5
LATENT_RTOL = 1e-4


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_cell(**overrides: Any) -> Cell:
    values: dict[str, Any] = {
        "scenario": "test",
        "scenario_path": "tests/test_original_parity.py",
        "scenario_fingerprint": "0",
        "id": "original-test",
        "backend": "original",
        "model": "tiny",
        "source": "safetensors",
        "workflow": "txt2img",
        "device": "cpu",
        "dtype": "fp32",
        "offload": "none",
        "compile": "none",
        "fullgraph": False,
        "attention": "sdp",
        "channels_last": False,
        "sampler": "euler",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance": 7.5,
        "seed": 0,
        "batch": 1,
        "prompt": "a photograph of an astronaut riding a horse",
        "negative_prompt": "",
        "repeats": 1,
        "warmup": 0,
        "timeout_s": None,
        # workflow and feature axes (added to Cell by other issues): scenario defaults
        "strength": 0.75,
        "init_image": "generated",
        "mask": "center",
        "outpaint_px": 32,
        "hires_scale": 2.0,
        "hires_upscaler": "latent",
        "lora": "none",
        "embedding": "none",
    }
    values.update(overrides)
    names = {field.name for field in dataclasses.fields(Cell)}
    return Cell(**{key: value for key, value in values.items() if key in names})


def make_request(cell: Cell, shape: tuple[int, ...]) -> Request:
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cell.seed))
    return Request(
        prompt=cell.prompt,
        negative_prompt=cell.negative_prompt,
        batch=cell.batch,
        steps=cell.steps,
        width=cell.width,
        height=cell.height,
        sampler=cell.sampler,
        guidance=cell.guidance,
        seed=cell.seed,
        noise=noise,
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# --- component parity ----------------------------------------------------------------------


def component_errors(model: ResolvedModel, latent_size: int) -> dict[str, float]:
    from diffusers import StableDiffusionPipeline

    ours = load_latent_diffusion(model.path, spec_name=model.spec_name, config_dir=model.config_dir)
    pipe = StableDiffusionPipeline.from_single_file(
        str(model.path), config=str(model.config_dir), local_files_only=True
    )
    gen = torch.Generator().manual_seed(0)
    hidden = ours.cond_stage_model.transformer.config.hidden_size
    x = torch.randn(2, 4, latent_size, latent_size, generator=gen)
    context = torch.randn(2, 77, hidden, generator=gen)
    timesteps = torch.tensor([999.0, 321.5])
    z = torch.randn(1, 4, latent_size, latent_size, generator=gen)
    prompt = "a photograph of an astronaut riding a horse"
    with torch.no_grad():
        errors = {
            "unet": rel_error(
                ours.unet(x, timesteps, context),
                pipe.unet(x, timesteps, encoder_hidden_states=context).sample,
            ),
            "vae": rel_error(ours.first_stage_model.decode(z), pipe.vae.decode(z).sample),
            "text": rel_error(
                ours.cond_stage_model([prompt]),
                pipe.encode_prompt(prompt, "cpu", 1, False)[0],
            ),
        }
    return errors


def test_component_parity_tiny() -> None:
    errors = component_errors(resolve("tiny", "safetensors"), latent_size=8)
    assert all(error <= COMPONENT_RTOL for error in errors.values()), errors


@pytest.mark.slow
def test_component_parity_sd15() -> None:
    errors = component_errors(resolve("sd15", "safetensors"), latent_size=8)
    assert all(error <= COMPONENT_RTOL for error in errors.values()), errors


# --- end-to-end parity ---------------------------------------------------------------------


def run_backend(name: str, cell: Cell, model: ResolvedModel) -> Any:
    backend = get_backend(name)
    device = torch.device("cpu")
    cell = dataclasses.replace(cell, backend=name)
    assert backend.unsupported(cell, device) is None
    session = backend.load(cell, model, device)
    try:
        request = make_request(cell, session.latent_shape(cell.batch, cell.width, cell.height))
        with GenerationTimer(device) as timer:
            output = session.generate(request, timer)
    finally:
        session.close()
    return output


@pytest.mark.parametrize("source", ["safetensors", "ckpt"])
def test_end_to_end_euler_parity_tiny(source: str) -> None:
    cell = make_cell(source=source, steps=4, batch=2)
    model = resolve("tiny", source)
    original = run_backend("original", cell, model)
    diffusers = run_backend("diffusers", cell, model)
    error = rel_error(original.latents, diffusers.latents)
    image_psnr = psnr(original.images, diffusers.images)
    assert error <= LATENT_RTOL, f"latent rel. error {error:.2e}, image PSNR {image_psnr:.1f} dB"
    assert image_psnr > 60.0


@pytest.mark.slow
def test_end_to_end_euler_parity_sd15() -> None:
    cell = make_cell(model="sd15", steps=4, width=64, height=64)
    model = resolve("sd15", "safetensors")
    original = run_backend("original", cell, model)
    diffusers = run_backend("diffusers", cell, model)
    assert rel_error(original.latents, diffusers.latents) <= LATENT_RTOL
