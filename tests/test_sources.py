"""Resolution of model references: zoo names, local paths, ``hub:`` ids (offline, on tiny)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harness.errors import UserError
from models import config_folder, install_in_hf_cache, materialize, resolve


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("sources-zoo-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDBENCH_CACHE", str(root))
        yield root


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo_cache: Path) -> Path:
    """An empty Hugging Face cache in ``tmp_path`` with the hub offline."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _one_line(error: pytest.ExceptionInfo[UserError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- zoo and local


@pytest.mark.parametrize("source", ["hub", "safetensors", "ckpt"])
def test_zoo_name(zoo_cache: Path, source: str) -> None:
    resolved = resolve("tiny", source)
    assert resolved.spec_name == "tiny" and resolved.source == source
    assert resolved.path == materialize("tiny", source)
    assert resolved.config_dir == config_folder("tiny")
    assert resolved.is_single_file == (source != "hub")


def test_local_single_file_uses_its_metadata(zoo_cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    path.write_bytes(materialize("tiny", "safetensors").read_bytes())
    resolved = resolve(str(path), "safetensors")
    assert resolved.spec_name == "tiny" and resolved.path == path
    assert (resolved.config_dir / "model_index.json").is_file()


def test_local_folder(zoo_cache: Path) -> None:
    folder = materialize("tiny", "hub")
    resolved = resolve(str(folder), "hub")
    assert resolved.path == folder and resolved.config_dir == folder
    assert resolved.spec_name == "tiny"
    with pytest.raises(UserError, match="is a folder, but source is 'ckpt'"):
        resolve(str(folder), "ckpt")


def test_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model_index.json"):
        resolve(str(tmp_path), "hub")


def test_missing_file(zoo_cache: Path) -> None:
    with pytest.raises(UserError) as error:
        resolve("x.safetensors", "safetensors")
    assert _one_line(error) == "model 'x.safetensors': no such file"


def test_unknown_zoo_name(zoo_cache: Path) -> None:
    with pytest.raises(UserError) as error:
        resolve("sd99", "hub")
    assert "'sd99'" in _one_line(error) and "tiny" in str(error.value)


def test_source_must_match_file(zoo_cache: Path) -> None:
    with pytest.raises(UserError, match="is a .safetensors file, but source is 'ckpt'"):
        resolve(str(materialize("tiny", "safetensors")), "ckpt")


def _save_without_metadata(path: Path, width: int, context: int, level: int = 1) -> Path:
    """A file with only the two tensors recognition reads: the UNet's input conv and the first
    cross-attention's ``to_k`` (SDXL's first is at ``input_blocks.4``)."""
    from safetensors.torch import save_file

    attention = f"model.diffusion_model.input_blocks.{level}.1.transformer_blocks.0.attn2.to_k"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.ones(width, 4, 3, 3),
            f"{attention}.weight": torch.ones(width, context),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize(
    ("width", "context", "level", "spec"),
    [(320, 768, 1, "sd15"), (320, 1024, 1, "sd21"), (320, 2048, 4, "sdxl")],
)
def test_third_party_file_inferred_by_shapes(
    zoo_cache: Path, tmp_path: Path, width: int, context: int, level: int, spec: str
) -> None:
    path = _save_without_metadata(tmp_path / "community.safetensors", width, context, level)
    resolved = resolve(str(path), "safetensors", "eps")  # declared: no A1111 test to run
    assert resolved.spec_name == spec and resolved.prediction == "eps"
    assert (resolved.config_dir / "unet" / "config.json").is_file()
    if spec == "sd21":  # auto runs A1111's test on the UNet, which this file lacks
        with pytest.raises(UserError) as error:
            resolve(str(path), "safetensors")
        message = _one_line(error)
        assert "community.safetensors" in message and "A1111's prediction test" in message


def test_unrecognised_third_party_file(zoo_cache: Path, tmp_path: Path) -> None:
    path = _save_without_metadata(tmp_path / "sd3.safetensors", 320, 4096)  # no such family
    with pytest.raises(UserError) as error:
        resolve(str(path), "safetensors")
    message = _one_line(error)
    assert "sd3.safetensors" in message and "expected" in message and "context 4096" in message
    assert "SDXL base (context 2048)" in message


# --------------------------------------------------------------------------- hub ids


def test_zoo_model_in_hf_cache_resolves_offline(hf_offline: Path) -> None:
    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download

    assert install_in_hf_cache("tiny") == "sdbench/tiny"
    snapshot = Path(snapshot_download("sdbench/tiny", cache_dir=hf_offline, local_files_only=True))
    assert (snapshot / "model_index.json").is_file()
    assert (snapshot / "unet" / "config.json").is_symlink()
    pipeline = DiffusionPipeline.from_pretrained(
        "sdbench/tiny", cache_dir=hf_offline, local_files_only=True
    )
    expected = torch.load(materialize("tiny", "ckpt"), weights_only=True)["state_dict"]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(pipeline.unet.state_dict()["conv_in.weight"], expected[key])


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_hub_reference_to_zoo_repo(hf_offline: Path, name: str) -> None:
    resolved = resolve(f"hub:sdbench/{name}", "hub")
    assert resolved.spec_name == name and resolved.source == "hub"
    assert resolved.from_cache is True  # the zoo installs it there
    assert str(resolved.path).startswith(str(hf_offline))
    assert (resolved.path / "model_index.json").is_file()
    if name == "tiny-sdxl":
        assert {"text_encoder_2", "tokenizer_2"} <= {p.name for p in resolved.path.iterdir()}


def test_hub_reference_single_file(hf_offline: Path) -> None:
    resolved = resolve("hub:sdbench/tiny", "safetensors")
    assert resolved.path.name == "tiny.safetensors" and resolved.spec_name == "tiny"
    assert str(resolved.path).startswith(str(hf_offline))
    named = resolve("hub:sdbench/tiny/tiny.safetensors", "safetensors")
    assert named.path == resolved.path


def test_unknown_hub_repo_offline(hf_offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    with pytest.raises(UserError) as error:
        resolve("hub:nobody/nothing", "hub")
    message = _one_line(error)
    assert "'hub:nobody/nothing'" in message and "not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "hf_not_a_real_token_123" not in message


def test_bad_hub_reference() -> None:
    with pytest.raises(UserError, match="expected hub:ORG/NAME"):
        resolve("hub:justaname", "hub")


