"""Loading original single files: strict round trip, both .ckpt layouts, refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backends.original.checkpoint import (
    CLIP_TEXT_MODEL,
    load_latent_diffusion,
    load_weights,
    read_checkpoint,
)
from backends.original.ldm import LatentDiffusion
from backends.original.text import FrozenCLIPEmbedder
from backends.original.unet import UNetConfig, UNetModel
from backends.original.vae import AutoencoderConfig, AutoencoderKL
from harness.errors import UserError
from models import config_folder, get_spec, resolve


@pytest.fixture(scope="module")
def tiny_file() -> Path:
    return resolve("tiny", "safetensors").path


def file_state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def load_tiny(path: Path) -> LatentDiffusion:
    model: LatentDiffusion = load_latent_diffusion(
        path, spec_name="tiny", config_dir=config_folder("tiny")
    )
    return model


def test_zoo_file_loads_strictly_and_keys_round_trip(tiny_file: Path) -> None:
    model = load_tiny(tiny_file)
    state = file_state(tiny_file)
    ours = model.state_dict()
    # Every module tensor came from the file, under the file's (text_model.-prefixed) name.
    for key, value in ours.items():
        file_key = key.replace("cond_stage_model.transformer.", CLIP_TEXT_MODEL, 1)
        assert torch.equal(value, state[file_key]), key
    assert torch.allclose(model.alphas_cumprod, state["alphas_cumprod"].float())


def test_random_modules_round_trip_strict(tmp_path: Path) -> None:
    """Our own randomly initialised modules -> file -> strict load gives the same tensors."""
    ldm = get_spec("tiny").ldm_config()
    reference = load_tiny(resolve("tiny", "safetensors").path)
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.from_ldm(ldm["unet"]))
    vae = AutoencoderKL(AutoencoderConfig.from_ldm(ldm["first_stage"]))
    source = LatentDiffusion(
        unet, vae, reference.cond_stage_model, ldm["scale_factor"], reference.alphas_cumprod
    )
    state = {
        key.replace("cond_stage_model.transformer.", CLIP_TEXT_MODEL, 1): value.contiguous()
        for key, value in source.state_dict().items()
    }
    path = tmp_path / "random.safetensors"
    save_file(state, str(path), metadata={"sdbench_spec": json.dumps(get_spec("tiny").to_dict())})
    loaded = load_latent_diffusion(path, spec_name=None, config_dir=config_folder("tiny"))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_and_unexpected_keys_are_listed(tiny_file: Path) -> None:
    state = file_state(tiny_file)
    state.pop("model.diffusion_model.out.2.weight")
    state.pop("first_stage_model.quant_conv.bias")
    state["model.diffusion_model.extra_layer.weight"] = torch.zeros(1)
    model = load_tiny(tiny_file)
    with pytest.raises(UserError) as info:
        load_weights(model, state, "broken.safetensors")
    message = str(info.value)
    assert "2 missing keys" in message and "1 unexpected keys" in message
    assert "model.diffusion_model.out.2.weight" in message
    assert "first_stage_model.quant_conv.bias" in message
    assert "model.diffusion_model.extra_layer.weight" in message


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict", "top-level"])
def test_ckpt_with_and_without_state_dict(tiny_file: Path, tmp_path: Path, wrapped: bool) -> None:
    state = file_state(tiny_file)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7} if wrapped else state, path)
    model = load_tiny(path)
    reference = load_tiny(tiny_file)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


class NotAWeight:
    """Unpickling this needs code: weights_only=True must refuse it."""


def test_pickle_needing_more_than_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": {}, "payload": NotAWeight()}, handle)
    with pytest.raises(UserError, match="refusing to load .*needs more than tensors"):
        read_checkpoint(path)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "absent.safetensors")
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    with pytest.raises(UserError, match="must end in .safetensors or .ckpt"):
        read_checkpoint(other)


def test_dtype_fp16(tiny_file: Path) -> None:
    model = load_latent_diffusion(
        tiny_file, spec_name="tiny", config_dir=config_folder("tiny"), dtype=torch.float16
    )
    assert model.unet.dtype == torch.float16
    assert model.first_stage_model.dtype == torch.float16
    assert isinstance(model.cond_stage_model, FrozenCLIPEmbedder)
