"""SD 2.x (the ``sd2`` family): the zoo's ``tiny-sd21`` / ``sd21`` in both layouts (OpenCLIP's
``cond_stage_model.model.*`` single file, the hub folder whose text encoder stops before the
last layer), the original backend's OpenCLIP tower and v-prediction denoiser, and both
backends on the same weights."""

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
from models import config_folder, materialize_formats, resolve, single_file_spec
from models.convert import OPENCLIP_PREFIX
from models.specs import SPECS
from tests.conftest import assert_agrees_across_backends, write_scenario

TINY_SD21 = """
name: sd21
prompt: a photograph of an astronaut riding a horse
negative_prompt: blurry
repeats: 1
warmup: 0
checks: [semantics, parity]
matrix:
  backend: [original, diffusers]
  model: tiny-sd21
  source: safetensors
  resolution: 64
  steps: 4
  sampler: euler
  seed: 1
  embedding: [none, zoo:sbstyle]
"""


def _pipelines(
    name: str, hub_dtype: torch.dtype = torch.float32, single_dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    from diffusers import StableDiffusionPipeline

    paths = materialize_formats(name, ("hub", "safetensors"))
    common = {"safety_checker": None, "requires_safety_checker": False, "local_files_only": True}
    hub = StableDiffusionPipeline.from_pretrained(str(paths["hub"]), torch_dtype=hub_dtype,
                                                  **common)
    single = StableDiffusionPipeline.from_single_file(
        str(paths["safetensors"]), config=str(config_folder(name)), torch_dtype=single_dtype,
        **common)
    return hub, single


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return set(left) == set(right) and all(
        torch.equal(left[k].float(), right[k].float()) for k in left)


def test_tiny_sd21_layouts_round_trip_and_load_strictly() -> None:
    """The single file holds OpenCLIP's layout with all its layers; diffusers reads it into
    exactly the hub folder's tensors; the original backend loads it strictly as v-prediction."""
    from backends.original.checkpoint import load_latent_diffusion
    from backends.original.text import FrozenOpenCLIPEmbedder

    spec = SPECS["tiny-sd21"]
    assert spec.family == "sd2" and spec.prediction == "v" and spec.text_file_layers() == 3
    paths = materialize_formats("tiny-sd21", ("hub", "safetensors"))
    state = load_file(str(paths["safetensors"]))
    text = sorted(k[len(OPENCLIP_PREFIX):] for k in state if k.startswith(OPENCLIP_PREFIX))
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight",
            "text_projection", "logit_scale",
            "transformer.resblocks.2.attn.in_proj_weight"} <= set(text)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    assert state[OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)

    hub, single = _pipelines("tiny-sd21")
    for name in ("unet", "vae", "text_encoder"):
        assert _same_tensors(getattr(hub, name), getattr(single, name)), name
    assert hub.text_encoder.config.num_hidden_layers == 2  # the penultimate layer's output
    assert single.scheduler.config.prediction_type == "v_prediction"

    ldm = load_latent_diffusion(paths["safetensors"], spec_name=None,
                                config_dir=config_folder("tiny-sd21"))
    assert ldm.parameterization == "v"
    assert isinstance(ldm.cond_stage_model, FrozenOpenCLIPEmbedder)
    assert len(ldm.cond_stage_model.model.transformer.resblocks) == 3
    # the OpenCLIP tower run to its penultimate block equals diffusers' text encoder
    ids = torch.tensor([[998, 5, 17, 300, 999] + [0] * 72])
    with torch.no_grad():
        ours = ldm.cond_stage_model.encode_chunk(ids)
        theirs = hub.text_encoder(input_ids=ids).last_hidden_state
    assert relative_error(ours, theirs) < 1e-5


def test_tiny_sd21_agrees_across_backends(tmp_path: Path) -> None:
    """txt2img plain, with an embedding and with two LoRAs (kohya's CLIP names on OpenCLIP's
    fused q/k/v in the original backend): parity ≤ 1e-4 (fp32, euler) and every check passes,
    the LoRA merged into the single file by hand included."""
    assert_agrees_across_backends(tmp_path, TINY_SD21)


def test_an_unknown_architecture_names_the_families(tmp_path: Path) -> None:
    state = load_file(str(materialize_formats("tiny-sd21", ("safetensors",))["safetensors"]))
    save_file(state, str(tmp_path / "community.safetensors"))  # no sdbench metadata
    with pytest.raises(UserError, match=r"UNet width 32, context 32\); expected an SD 1.x .*, "
                                        r"SD 2.x \(context 1024\) or SDXL base"):
        single_file_spec(tmp_path / "community.safetensors")


def _latents(cell: Any, model: Any) -> torch.Tensor:
    from backends import get_backend
    from harness.execute import request_for
    from harness.measure import GenerationTimer

    cpu = torch.device("cpu")
    session = get_backend(cell.backend).load(cell, model, cpu)
    with GenerationTimer(cpu) as timer:
        latents = session.generate(request_for(cell, session), timer).latents
    session.close()
    return latents


def test_the_prediction_axis_is_honoured_by_both_backends(tmp_path: Path) -> None:
    """``prediction: auto`` is the model's own (tiny-sd21: v); ``eps`` runs the same UNet as an
    eps model on both backends alike, and changes the image."""
    text = TINY_SD21.replace("  embedding: [none, zoo:sbstyle]\n",
                             "  prediction: [auto, eps, v]\n")
    cells = expand(load_scenario(write_scenario(tmp_path, text)))
    latents = {(c.backend, c.prediction): _latents(c, resolve(c.model, c.source, c.prediction))
               for c in cells}
    assert resolve("tiny-sd21", "safetensors").prediction is None  # as its spec says
    for prediction in ("auto", "eps", "v"):
        assert relative_error(latents["diffusers", prediction],
                              latents["original", prediction]) < 1e-4, prediction
    for backend in ("original", "diffusers"):
        assert torch.equal(latents[backend, "auto"], latents[backend, "v"])
        assert relative_error(latents[backend, "eps"], latents[backend, "v"]) > 0.1


def _community_sd2(tmp_path: Path, shift: float) -> Path:
    """tiny-sd21's single file without sdbench metadata, its UNet's output shifted by
    ``shift`` (the last conv's bias) so that it answers A1111's test one way or the other."""
    state = load_file(str(materialize_formats("tiny-sd21", ("safetensors",))["safetensors"]))
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + shift
    path = tmp_path / f"community-{shift:g}.safetensors"
    save_file(state, str(path))
    return path


def test_a1111s_test_decides_the_prediction_of_an_sd2_file_without_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UNet whose output at t = 999 is far below the latents is v, one above is eps; an SD
    2.x file without sdbench metadata resolves to what the test says (the test widths are no
    release's, so tiny-sd21's shapes are added to the recognition table here), a declared
    ``prediction`` wins, and both backends run it as eps, the LoRA merged into the file by
    hand included."""
    from models import sources

    spec = SPECS["tiny-sd21"]
    v_file, eps_file = _community_sd2(tmp_path, -5.0), _community_sd2(tmp_path, 5.0)
    assert sources.a1111_prediction(v_file, spec) == "v"
    assert sources.a1111_prediction(eps_file, spec) == "eps"
    monkeypatch.setitem(sources._KNOWN_SHAPES, (32, 32), "tiny-sd21")
    assert resolve(str(eps_file), "safetensors").prediction == "eps"
    assert resolve(str(v_file), "safetensors").prediction == "v"
    assert resolve(str(eps_file), "safetensors", "v").prediction == "v"
    text = TINY_SD21.replace("  model: tiny-sd21\n", f"  model: {eps_file}\n").replace(
        "  embedding: [none, zoo:sbstyle]\n", '  lora: "zoo:style@0.5"\n')
    results = Runner(tmp_path / "out", progress=False, isolate="none").run(
        expand(load_scenario(write_scenario(tmp_path, text))))
    assert [r.status for r in results] == ["ok", "ok"], [r.reason for r in results]
    for result in results:
        checks = {n: c["status"] for n, c in result.metrics["check_results"].items()}
        assert set(checks.values()) == {"pass"} and "lora_merged" in checks, checks


@pytest.mark.slow
def test_sd21_full_size_round_trip_components_and_recognition(tmp_path: Path) -> None:
    """``sd21`` (fp16 weights): the single file is the hub folder's tensors to diffusers and
    loads strictly into the original architecture; UNet, text encoder and VAE agree across the
    two at the smallest sizes; the file without sdbench metadata is recognised as SD 2.1."""
    from backends.original.checkpoint import load_latent_diffusion

    hub, single = _pipelines("sd21-fp16", torch.float32, torch.float16)  # fp16 as stored
    for name in ("unet", "vae", "text_encoder"):
        assert _same_tensors(getattr(hub, name), getattr(single, name)), name
    del single
    path = materialize_formats("sd21-fp16", ("safetensors",))["safetensors"]
    ldm = load_latent_diffusion(path, spec_name=None, config_dir=config_folder("sd21-fp16"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 1024, generator=generator)
    t = torch.tensor([500.0])
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [0] * 72])
    with torch.no_grad():
        assert relative_error(ldm.unet(x, t, context),
                              hub.unet(x, t, encoder_hidden_states=context).sample) < 1e-4
        assert relative_error(ldm.cond_stage_model.encode_chunk(ids),
                              hub.text_encoder(input_ids=ids).last_hidden_state) < 1e-4
        assert relative_error(ldm.decode_first_stage(x),
                              hub.vae.decode(x / hub.vae.config.scaling_factor).sample) < 1e-4
    del ldm, hub
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["sdbench_spec"])["family"] == "sd2"
    community = tmp_path / "sd21-community.safetensors"
    save_file(load_file(str(path)), str(community))  # fp16, no sdbench metadata
    assert single_file_spec(community).name == "sd21"
