"""Samplers, sigma schedules and the session of the original backend on ``tiny``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from backends.original import OriginalBackend, OriginalSession
from backends.original.denoiser import DiscreteEpsDenoiser
from backends.original.memory import place
from backends.original.samplers import build_sigmas
from harness.measure import GenerationTimer
from harness.vocabulary import SAMPLERS, split_sampler
from models import resolve
from tests.test_original_parity import make_cell, make_request

CPU = torch.device("cpu")
IMPLEMENTED = [name for name in SAMPLERS if split_sampler(name)[0] not in ("deis", "unipc", "ddpm")]


@pytest.fixture(scope="module")
def session() -> Iterator[OriginalSession]:
    cell = make_cell()
    backend = OriginalBackend()
    loaded = backend.load(cell, resolve("tiny", "safetensors"), CPU)
    assert isinstance(loaded, OriginalSession)
    yield loaded
    loaded.close()


def generate(session: OriginalSession, **overrides: Any) -> Any:
    cell = make_cell(**overrides)
    request = make_request(cell, session.latent_shape(cell.batch, cell.width, cell.height))
    with GenerationTimer(CPU) as timer:
        output = session.generate(request, timer)
    return output, timer


@pytest.mark.parametrize("sampler", IMPLEMENTED)
def test_every_sampler_runs_and_is_deterministic(session: OriginalSession, sampler: str) -> None:
    first, timer = generate(session, sampler=sampler, steps=3)
    second, _ = generate(session, sampler=sampler, steps=3)
    assert first.images.shape == (1, 64, 64, 3) and first.images.dtype == np.float32
    assert first.latents.shape == (1, 4, 8, 8)
    assert torch.isfinite(first.latents).all()
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0
    assert torch.equal(first.latents, second.latents)
    assert len(timer.step_s()) == 3
    assert all(timer.phase_s(phase) is not None for phase in ("encode", "denoise", "decode"))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_sde", "dpm_2_a", "dpmpp_2s_a"])
def test_stochastic_samplers_follow_the_seed(session: OriginalSession, sampler: str) -> None:
    a, _ = generate(session, sampler=sampler, steps=3, seed=1)
    b, _ = generate(session, sampler=sampler, steps=3, seed=2)
    assert not torch.equal(a.latents, b.latents)


def test_batch_and_no_guidance(session: OriginalSession) -> None:
    unguided, _ = generate(session, batch=2, guidance=1.0, steps=2)
    guided, _ = generate(session, batch=2, guidance=7.5, steps=2)
    assert unguided.latents.shape == guided.latents.shape == (2, 4, 8, 8)
    assert not torch.allclose(unguided.latents, guided.latents)


# --- sigma schedules -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def denoiser(session: OriginalSession) -> DiscreteEpsDenoiser:
    return session.denoiser.inner


def test_default_schedule_is_k_diffusion_get_sigmas(denoiser: DiscreteEpsDenoiser) -> None:
    sigmas = build_sigmas(denoiser, "euler", False, 10)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    assert torch.isclose(sigmas[0], denoiser.sigma_max)
    assert torch.isclose(sigmas[-2], denoiser.sigma_min)
    t = denoiser.sigma_to_t(sigmas[:-1])
    assert torch.allclose(t, torch.linspace(999, 0, 10), atol=1e-3)


def test_euler_sigmas_equal_diffusers_linspace(denoiser: DiscreteEpsDenoiser) -> None:
    from diffusers import EulerDiscreteScheduler

    from models import get_spec

    config = dict(get_spec("tiny").scheduler) | {"timestep_spacing": "linspace"}
    scheduler = EulerDiscreteScheduler.from_config(config)
    for steps in (4, 10):
        scheduler.set_timesteps(steps)
        ours = build_sigmas(denoiser, "euler", False, steps)
        assert torch.allclose(ours, scheduler.sigmas.float(), rtol=1e-5), steps


def test_karras_schedule(denoiser: DiscreteEpsDenoiser) -> None:
    sigmas = build_sigmas(denoiser, "dpmpp_2m", True, 8)
    assert len(sigmas) == 9 and sigmas[-1] == 0
    assert torch.isclose(sigmas[0], denoiser.sigma_max)
    assert torch.isclose(sigmas[-2], denoiser.sigma_min)
    assert (sigmas[:-1].diff() < 0).all()


def test_dpm_2_discards_the_next_to_last_sigma(denoiser: DiscreteEpsDenoiser) -> None:
    full = build_sigmas(denoiser, "euler", False, 6)
    dpm2 = build_sigmas(denoiser, "dpm_2", False, 5)
    assert len(dpm2) == 6
    assert torch.equal(dpm2[:-1], full[:-2]) and dpm2[-1] == 0


def test_ddim_timesteps(denoiser: DiscreteEpsDenoiser) -> None:
    sigmas = build_sigmas(denoiser, "ddim", False, 4)
    t = denoiser.sigma_to_t(sigmas)
    assert torch.allclose(t, torch.tensor([751.0, 501.0, 251.0, 1.0, 0.0]), atol=1e-3)


# --- backend -------------------------------------------------------------------------------


def test_unsupported_reasons() -> None:
    backend = OriginalBackend()
    assert backend.unsupported(make_cell(), CPU) is None
    assert "single files" in (backend.unsupported(make_cell(source="hub"), CPU) or "")
    assert "diffusers scheduler" in (backend.unsupported(make_cell(sampler="unipc"), CPU) or "")
    assert backend.unsupported(make_cell(offload="medvram"), CPU) == (
        "offload medvram needs a CUDA device; none here"
    )
    assert "CUDA" in (backend.unsupported(make_cell(offload="lowvram"), CPU) or "")
    assert "xformers" in (backend.unsupported(make_cell(attention="xformers"), CPU) or "")
    assert backend.unsupported(make_cell(workflow="img2img"), CPU) is None


@pytest.mark.parametrize("offload", ["medvram", "lowvram"])
def test_offload_hooks_give_the_same_latents(session: OriginalSession, offload: str) -> None:
    """The memory modes on the CPU (device = cpu): hooks fire, results are unchanged."""
    reference, _ = generate(session, steps=2)
    other = OriginalBackend().load(make_cell(), resolve("tiny", "safetensors"), CPU)
    assert isinstance(other, OriginalSession)
    other.swapper = place(other.ldm, CPU, offload)
    assert other.swapper is not None
    output, _ = generate(other, steps=2)
    assert other.swapper.in_gpu is other.ldm.first_stage_model
    assert torch.equal(output.latents, reference.latents)
    other.close()


@pytest.mark.parametrize(
    "option", [{"attention": "math"}, {"channels_last": True}, {"dtype": "bf16"}]
)
def test_load_options(option: dict[str, Any]) -> None:
    cell = dataclasses.replace(make_cell(), **option)
    session = OriginalBackend().load(cell, resolve("tiny", "safetensors"), CPU)
    assert isinstance(session, OriginalSession)
    output, _ = generate(session, steps=2)
    assert torch.isfinite(output.latents).all()
    session.close()


@pytest.mark.slow
def test_compile_default() -> None:
    cell = make_cell(compile="default")
    session = OriginalBackend().load(cell, resolve("tiny", "safetensors"), CPU)
    assert isinstance(session, OriginalSession)
    output, _ = generate(session, steps=2)
    assert torch.isfinite(output.latents).all()
    session.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", ["none", "medvram", "lowvram"])
def test_cuda_fp16_offload_modes(offload: str) -> None:
    """On a GPU: fp16 in every memory mode gives (nearly) the same latents as no offload."""
    device = torch.device("cuda")
    results = []
    for mode in ("none", offload):
        cell = make_cell(device="cuda", dtype="fp16", offload=mode)
        assert OriginalBackend().unsupported(cell, device) is None
        session = OriginalBackend().load(cell, resolve("tiny", "safetensors"), device)
        request = make_request(cell, session.latent_shape(1, 64, 64))
        with GenerationTimer(device) as timer:
            results.append(session.generate(request, timer).latents)
        session.close()
    assert torch.isfinite(results[1]).all()
    assert torch.allclose(results[0], results[1], atol=1e-3)
