"""SDXL base (the ``sdxl`` family): the zoo's ``tiny-sdxl`` / ``sdxl`` in both layouts (sgm's
``conditioner.embedders.{0,1}.*`` single file, the hub folder with two text encoders), the
original backend's ``GeneralConditioner`` (CLIP ViT-L + OpenCLIP bigG, pooled output and
size/crop embeddings) and ``label_emb``, and both backends on the same weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.conformance import relative_error
from harness.errors import UserError
from harness.matrix import expand
from harness.runner import Runner
from harness.scenario import load_scenario
from models import config_folder, materialize_formats, single_file_spec
from models.convert import SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX
from models.specs import SPECS
from tests.conftest import assert_agrees_across_backends, write_scenario

TINY_SDXL = """
name: sdxl
prompt: a photograph of an astronaut riding a horse
negative_prompt: blurry
repeats: 1
warmup: 0
checks: [semantics, parity]
matrix:
  backend: [original, diffusers]
  model: tiny-sdxl
  source: safetensors
  resolution: 64
  steps: 4
  sampler: euler
  seed: 1
  embedding: [none, zoo:sbstyle]
"""

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _pipelines(
    name: str, hub_dtype: torch.dtype = torch.float32, single_dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    from diffusers import StableDiffusionXLPipeline

    paths = materialize_formats(name, ("hub", "safetensors"))
    hub = StableDiffusionXLPipeline.from_pretrained(
        str(paths["hub"]), torch_dtype=hub_dtype, local_files_only=True)
    single = StableDiffusionXLPipeline.from_single_file(
        str(paths["safetensors"]), config=str(config_folder(name)), torch_dtype=single_dtype,
        local_files_only=True)
    return hub, single


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return set(left) == set(right) and all(
        torch.equal(left[k].float(), right[k].float()) for k in left)


PROMPT = "a photograph of an astronaut riding a horse"


def _inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, a timestep and SDXL's time ids (original size, crop (0, 0), target size)."""
    x = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    return x, torch.tensor([500.0]), time_ids


@torch.no_grad()
def _diffusers_outputs(pipe: Any, unet: Any, size: int) -> dict[str, torch.Tensor]:
    """The prompt's context and pooled output, one VAE decode and one UNet pass (with the
    size/crop conditioning) of diffusers' SDXL components."""
    context, _, pooled, _ = pipe.encode_prompt(
        PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt="")
    x, t, time_ids = _inputs(size)
    return {
        "context": context, "pooled": pooled,
        "decoded": pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample,
        "eps": unet(x, t, encoder_hidden_states=context, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": time_ids}).sample,
    }


@torch.no_grad()
def _original_agrees(ldm: Any, reference: dict[str, torch.Tensor], size: int,
                     tolerance: float) -> None:
    """The original backend's conditioner (and an empty negative's zeros), UNet (on its own
    conditioning, size vector included) and VAE against ``reference``."""
    cond, uncond = ldm.conditioner.encode_pair([PROMPT], [""], size=(size, size))
    width = reference["pooled"].shape[1]
    assert relative_error(cond["crossattn"], reference["context"]) < tolerance
    assert relative_error(cond["vector"][:, :width], reference["pooled"]) < tolerance
    assert not uncond["crossattn"].any() and not uncond["vector"][:, :width].any()
    x, t, _ = _inputs(size)
    assert relative_error(ldm.unet(x, t, cond), reference["eps"]) < tolerance
    assert relative_error(ldm.decode_first_stage(x), reference["decoded"]) < tolerance


def test_tiny_sdxl_layouts_round_trip_and_load_strictly() -> None:
    """The single file holds sgm's layout (CLIP under ``embedders.0.transformer``, OpenCLIP
    bigG with fused q/k/v and its projection under ``embedders.1.model``, ``label_emb``);
    diffusers reads it into exactly the hub folder's tensors; the original backend loads it
    strictly, and its conditioner, UNet and VAE agree with the hub pipeline's."""
    from backends.original.checkpoint import checkpoint_key, load_latent_diffusion
    from backends.original.ldm import DiffusionEngine
    from backends.original.text import GeneralConditioner

    spec = SPECS["tiny-sdxl"]
    assert spec.family == "sdxl" and spec.prediction == "eps"
    assert spec.text_encoder_2 is not None
    paths = materialize_formats("tiny-sdxl", ("hub", "safetensors"))
    state = load_file(str(paths["safetensors"]))
    assert f"{SDXL_CLIP_PREFIX}text_model.embeddings.token_embedding.weight" in state
    assert {f"{SDXL_OPENCLIP_PREFIX}{k}" for k in (
        "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
        "transformer.resblocks.2.attn.in_proj_weight")} <= set(state)
    assert {"model.diffusion_model.label_emb.0.0.weight",
            "model.diffusion_model.label_emb.0.2.weight"} <= set(state)
    assert not any(k.startswith("cond_stage_model.") for k in state)
    assert not any(k in state for k in ("betas", "alphas_cumprod"))

    hub, single = _pipelines("tiny-sdxl")
    for name in COMPONENTS:
        assert _same_tensors(getattr(hub, name), getattr(single, name)), name
    assert hub.vae.config.scaling_factor == pytest.approx(0.13025)

    ldm = load_latent_diffusion(paths["safetensors"], spec_name=None,
                                config_dir=config_folder("tiny-sdxl"))
    assert isinstance(ldm, DiffusionEngine) and ldm.parameterization == "eps"
    assert isinstance(ldm.conditioner, GeneralConditioner)
    loaded = {checkpoint_key(key, flat_clip=True) for key in ldm.state_dict()}
    assert loaded == set(state)  # every tensor of the file, logit_scale included
    _original_agrees(ldm, _diffusers_outputs(hub, hub.unet, 64), 64, 1e-5)


def test_tiny_sdxl_agrees_across_backends(tmp_path: Path) -> None:
    """txt2img plain, with an embedding (``clip_l`` / ``clip_g`` vectors) and with two LoRAs
    (``lora_unet_input_blocks_…``, ``lora_te1_`` / ``lora_te2_``): parity ≤ 1e-4 (fp32,
    euler) and every check passes, the LoRA merged into the single file by hand included."""
    assert_agrees_across_backends(tmp_path, TINY_SDXL)


def test_tiny_sdxl_lora_and_embedding_use_each_familys_names() -> None:
    """The zoo's SDXL LoRA names the UNet's modules as sgm does and the two text encoders
    ``lora_te1_`` / ``lora_te2_``; its SDXL embedding is a safetensors file with ``clip_l``
    and ``clip_g`` vectors, each as wide as its text encoder (768 and 1280 at full size)."""
    from models.extras import extra_file

    lora = load_file(str(extra_file("lora", "style", "tiny-sdxl")))
    prefixes = {key.split(".")[0].split("_")[1] for key in lora}
    assert prefixes == {"unet", "te1", "te2"}
    assert any(key.startswith("lora_unet_input_blocks_") for key in lora)
    assert not any(key.startswith("lora_unet_down_blocks_") for key in lora)

    path = extra_file("embedding", "sbstyle", "tiny-sdxl")
    assert path.suffix == ".safetensors"
    vectors = load_file(str(path))
    spec = SPECS["tiny-sdxl"]
    assert set(vectors) == {"clip_l", "clip_g"}
    assert vectors["clip_l"].shape[1] == spec.text_encoder["hidden_size"]
    assert vectors["clip_g"].shape[1] == spec.text_encoder_2["hidden_size"]


def test_controlnet_on_sdxl_is_unsupported_on_both_backends(tmp_path: Path) -> None:
    """The zoo's ControlNets are SD 1.x / 2.x nets: on an SDXL model each backend's cell is
    ``unsupported`` with the reason, and the run goes on."""
    text = """
name: sdxl-control
prompt: a house
repeats: 1
warmup: 0
matrix:
  backend: [original, diffusers]
  model: tiny-sdxl
  source: safetensors
  resolution: 64
  steps: 2
  workflow: controlnet
  controlnet: zoo:canny
"""
    cells = expand(load_scenario(write_scenario(tmp_path, text)))
    results = Runner(tmp_path / "out", progress=False, isolate="none").run(cells)
    assert [r.status for r in results] == ["unsupported", "unsupported"]
    assert all("SDXL" in (r.reason or "") for r in results), [r.reason for r in results]


def test_a_tiny_community_sdxl_file_names_the_families(tmp_path: Path) -> None:
    """Without sdbench metadata a file is recognised by its shapes, which at test widths are
    no release's: the error names what was found and the three families."""
    state = load_file(str(materialize_formats("tiny-sdxl", ("safetensors",))["safetensors"]))
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "community.safetensors"))
    with pytest.raises(UserError, match=r"UNet width 32, context 96\); expected an SD 1.x .* "
                                        r"or SDXL base \(context 2048\)"):
        single_file_spec(tmp_path / "community.safetensors")


@pytest.mark.slow
def test_sdxl_full_size_round_trip_components_and_recognition(tmp_path: Path) -> None:
    """``sdxl`` (fp16 weights): the single file is the hub folder's tensors to diffusers and
    loads strictly into sgm's architecture; conditioner, UNet and VAE agree across the two in
    fp32 at the smallest sizes; the file without sdbench metadata is recognised as SDXL base.
    One model in memory at a time (the fp32 UNet alone is 10 GB)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from backends.original.checkpoint import load_latent_diffusion
    from models.convert import read_hub_states

    paths = materialize_formats("sdxl-fp16", ("hub", "safetensors"))
    single = StableDiffusionXLPipeline.from_single_file(
        str(paths["safetensors"]), config=str(config_folder("sdxl-fp16")),
        torch_dtype=torch.float16, local_files_only=True)  # fp16 as stored
    hub_states = read_hub_states(SPECS["sdxl-fp16"], paths["hub"])  # memory-mapped
    for name in COMPONENTS:
        theirs, ours = getattr(single, name).state_dict(), hub_states[name]
        assert set(theirs) == set(ours), name
        assert all(torch.equal(theirs[key], ours[key]) for key in ours), name
    del single, hub_states

    hub = StableDiffusionXLPipeline.from_pretrained(
        str(paths["hub"]), unet=None, torch_dtype=torch.float32, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(str(paths["hub"] / "unet"),
                                                torch_dtype=torch.float32)
    reference = _diffusers_outputs(hub, unet, 64)
    del hub, unet
    ldm = load_latent_diffusion(paths["safetensors"], spec_name=None,
                                config_dir=config_folder("sdxl-fp16"))
    _original_agrees(ldm.float(), reference, 64, 1e-4)
    del ldm
    from safetensors import safe_open

    with safe_open(str(paths["safetensors"]), framework="pt") as handle:
        assert json.loads(handle.metadata()["sdbench_spec"])["family"] == "sdxl"
    community = tmp_path / "sdxl-community.safetensors"
    save_file(load_file(str(paths["safetensors"])), str(community))  # fp16, no sdbench metadata
    assert single_file_spec(community).name == "sdxl"
