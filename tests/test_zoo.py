"""The model zoo: tokenizer, deterministic synthesis, formats, cache (all on ``tiny``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harness.errors import UserError
from models import (
    SPEC_METADATA_KEY,
    SPECS,
    STAGED_SPECS,
    config_folder,
    get_spec,
    list_models,
    materialize,
    model_dir,
    parameter_counts,
    read_spec_metadata,
    synthesize,
    write_model,
)
from models import zoo as zoo_module
from models.convert import ddpm_buffers
from models.synth import seeded_normal, tensor_seed
from models.tokenizer import BOS_TOKEN, EOS_TOKEN, build_vocab

PROMPT = "a photograph of an astronaut riding a horse"
COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A zoo cache shared by this session's tests (tiny is synthesised once per format)."""
    root = tmp_path_factory.mktemp("zoo-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDBENCH_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_hub(zoo_cache: Path) -> Path:
    return materialize("tiny", "hub")


@pytest.fixture(scope="session")
def hub_pipeline(tiny_hub: Path):  # noqa: ANN201 - diffusers pipeline
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_hub, local_files_only=True)


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --------------------------------------------------------------------------- tokenizer


def test_vocab_layout_matches_clip() -> None:
    vocab, merges = build_vocab(1000)
    assert len(vocab) == 1000 and sorted(vocab.values()) == list(range(1000))
    assert vocab[BOS_TOKEN] == 998 and vocab[EOS_TOKEN] == 999
    assert vocab["a</w>"] == 320  # as in the real CLIP vocabulary
    assert all(a in vocab and b in vocab for a, b in merges)
    assert len(merges) == 1000 - 512 - 2


def test_sd15_vocab_special_ids_match_spec() -> None:
    spec = get_spec("sd15")
    vocab, _ = build_vocab(spec.tokenizer["vocab_size"])
    assert vocab[BOS_TOKEN] == spec.text_encoder["bos_token_id"] == 49406
    assert vocab[EOS_TOKEN] == spec.text_encoder["eos_token_id"] == 49407


def test_tokenizer_loads_offline(zoo_cache: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        config_folder("tiny") / "tokenizer", local_files_only=True
    )
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == 998 and ids[-1] == 999
    assert 8 <= len(ids) <= 30 and max(ids) < 1000
    padded = tokenizer(
        PROMPT, padding="max_length", max_length=tokenizer.model_max_length
    ).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id == 999


# --------------------------------------------------------------------------- synthesis


def test_tensor_seeds_are_stable() -> None:
    # Golden values: a change here changes every synthesised model (bump ZOO_FORMAT_VERSION).
    assert tensor_seed(0, "unet.conv_in.weight") == 318492528952606404
    expected = [0.7250480055809021, 1.0430397987365723, -1.8378732204437256, -1.3029824495315552]
    assert seeded_normal((4,), 0.0, 1.0, 0, "unet.conv_in.weight").tolist() == expected


def test_synthesis_is_deterministic_and_seeded() -> None:
    spec = get_spec("tiny")
    first, second = synthesize(spec), synthesize(spec)
    other = synthesize(spec, seed=1)
    for name in COMPONENTS:
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        c = getattr(other, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert not any(torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("name", ["tiny", "tiny-fp16", "tiny-sdxl"])
def test_streamed_hub_folder_is_the_synthesised_model(zoo_cache: Path, name: str) -> None:
    """The zoo streams each component's safetensors file a tensor at a time; the files read
    back (with safetensors, and as diffusers / transformers load them) as exactly the tensors
    and dtypes of the model synthesised in memory, and as ``save_pretrained`` would lay them
    out (file names, ``format`` metadata, configs)."""
    from safetensors import safe_open

    from models.convert import component_weights_file

    spec = get_spec(name)
    hub = materialize(name, "hub")
    for component, model in synthesize(spec).items():
        expected = model.state_dict()
        path = component_weights_file(hub, component)
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert set(handle.keys()) == set(expected)
            for key, value in expected.items():
                stored = handle.get_tensor(key)
                assert stored.dtype == value.dtype and torch.equal(stored, value), key
    text_config = json.loads((hub / "text_encoder" / "config.json").read_text())
    assert text_config["dtype"] == spec.weights_dtype


def test_synthesis_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    synthesize(get_spec("tiny"))
    assert torch.equal(torch.rand(3), expected)


def test_no_tensor_is_zero_or_constant() -> None:
    components = synthesize(get_spec("tiny"))
    for name, model in components.items():
        for key, value in model.state_dict().items():
            assert value.abs().max() > 0, f"{name}.{key} is zero"
            assert value.numel() == 1 or value.std() > 0, f"{name}.{key} is constant"


def test_tiny_generates_finite_varied_image(hub_pipeline) -> None:  # noqa: ANN001
    from diffusers import EulerDiscreteScheduler

    hub_pipeline.scheduler = EulerDiscreteScheduler.from_config(hub_pipeline.scheduler.config)
    image = hub_pipeline(
        PROMPT,
        num_inference_steps=20,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()
    assert image.std() > 0.1
    saturated = ((image <= 0.0) | (image >= 1.0)).mean()
    assert saturated < 0.5


# --------------------------------------------------------------------------- formats


def test_hub_folder_layout(tiny_hub: Path, hub_pipeline) -> None:  # noqa: ANN001
    index = json.loads((tiny_hub / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for name in COMPONENTS:
        assert list((tiny_hub / name).glob("*.safetensors")), name
    assert hub_pipeline.safety_checker is None


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_round_trip(zoo_cache: Path, hub_pipeline, fmt: str) -> None:  # noqa: ANN001
    from diffusers import StableDiffusionPipeline

    path = materialize("tiny", fmt)
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder("tiny")), local_files_only=True
    )
    for name in COMPONENTS:
        expected = getattr(hub_pipeline, name).state_dict()
        actual = getattr(loaded, name).state_dict()
        assert actual.keys() == expected.keys(), name
        differing = [key for key in expected if not torch.equal(actual[key], expected[key])]
        assert not differing, f"{name}: {differing[:5]}"


def test_ckpt_loads_weights_only(zoo_cache: Path) -> None:
    spec = get_spec("tiny")
    data = torch.load(materialize("tiny", "ckpt"), weights_only=True)
    assert set(data) == {"state_dict", SPEC_METADATA_KEY, "global_step"}
    assert json.loads(data[SPEC_METADATA_KEY])["name"] == "tiny"
    state = data["state_dict"]
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert {p for p in prefixes if any(k.startswith(p) for k in state)} == set(prefixes)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "model.diffusion_model.out.2.weight" in state
    buffers = ddpm_buffers(spec.scheduler)
    assert all(torch.equal(state[key], value) for key, value in buffers.items())


def test_ddpm_buffers_match_diffusers_schedule() -> None:
    from diffusers import DDPMScheduler

    spec = get_spec("tiny")
    buffers = ddpm_buffers(spec.scheduler)
    scheduler = DDPMScheduler.from_config(spec.scheduler)
    torch.testing.assert_close(buffers["alphas_cumprod"], scheduler.alphas_cumprod)
    torch.testing.assert_close(buffers["betas"], scheduler.betas)
    assert buffers["alphas_cumprod_prev"][0] == 1.0


def test_single_files_carry_the_spec(zoo_cache: Path) -> None:
    spec = get_spec("tiny")
    for fmt in ("safetensors", "ckpt"):
        stored = read_spec_metadata(materialize("tiny", fmt))
        assert stored is not None and stored["name"] == "tiny"
        assert type(spec).from_dict(stored).fingerprint() == spec.fingerprint()


# --------------------------------------------------------------------------- cache


def test_cache_path_has_fingerprint(zoo_cache: Path) -> None:
    spec = get_spec("tiny")
    assert model_dir("tiny") == zoo_cache / "zoo" / f"tiny-{spec.fingerprint()}"


def test_materialize_reuses_cache(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = (tiny_hub / "unet" / "config.json").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(zoo_module, "write_hub_folder", fail)
    assert materialize("tiny", "hub") == tiny_hub
    assert (tiny_hub / "unet" / "config.json").stat().st_mtime_ns == mtime


def test_spec_change_invalidates_cache(zoo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = model_dir("tiny")
    monkeypatch.setitem(SPECS, "tiny", dataclasses.replace(SPECS["tiny"], seed=7))
    assert model_dir("tiny") != before


def test_interrupted_build_leaves_nothing(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo_module, "write_hub_folder", boom)
    with pytest.raises(KeyboardInterrupt):
        materialize("tiny", "safetensors")
    assert list(model_dir("tiny").iterdir()) == []


def test_write_model(zoo_cache: Path, tmp_path: Path) -> None:
    hub = write_model("tiny", "hub", tmp_path / "hub")
    assert (hub / "model_index.json").is_file()
    single = write_model("tiny", "safetensors", tmp_path / "model.safetensors")
    assert read_spec_metadata(single) is not None
    into_folder = write_model("tiny", "ckpt", tmp_path)
    assert into_folder == tmp_path / "tiny.ckpt" and into_folder.is_file()
    with pytest.raises(UserError, match="ending in .ckpt"):
        write_model("tiny", "ckpt", tmp_path / "model.bin")
    with pytest.raises(UserError, match="not an empty folder"):
        write_model("tiny", "hub", hub)


def test_list_models(tiny_hub: Path) -> None:
    records = {record["name"]: record for record in list_models()}
    assert set(records) == set(SPECS) | set(STAGED_SPECS)
    tiny = records["tiny"]
    assert tiny["fingerprint"] == get_spec("tiny").fingerprint()
    assert "hub" in tiny["cached_formats"]
    assert set(tiny["parameters"]) == set(COMPONENTS) and all(tiny["parameters"].values())
    assert records["sd15"]["parameters"]["unet"] == 859_520_964


def test_unknown_zoo_name_and_format(zoo_cache: Path) -> None:
    with pytest.raises(UserError, match="unknown zoo model 'sd99'; expected one of: tiny, sd15"):
        materialize("sd99", "hub")
    with pytest.raises(UserError, match="unknown model format 'bin'"):
        materialize("tiny", "bin")


@pytest.mark.slow
def test_sd15_synthesis_parameter_counts() -> None:
    components = synthesize(get_spec("sd15"))
    counts = parameter_counts(components)
    assert counts["unet"] == pytest.approx(859.5e6, rel=1e-3)
    assert counts["text_encoder"] == pytest.approx(123.06e6, rel=1e-3)
    assert counts["vae"] == pytest.approx(83.65e6, rel=1e-3)
    for name, model in components.items():
        for key, value in model.state_dict().items():
            assert value.abs().max() > 0 and value.std() > 0, f"{name}.{key} is constant"


@pytest.mark.parametrize("name", ["tiny", "sd15"])
def test_key_mapping_inverts_diffusers_conversion(name: str) -> None:
    """Names and shapes only (meta tensors): diffusers maps our original keys back exactly."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from models.convert import to_original_state_dict
    from models.synth import empty_components

    spec = get_spec(name)
    components = empty_components(spec)
    states = {key: model.state_dict() for key, model in components.items()}
    original = to_original_state_dict(spec, states)
    unet = convert_ldm_unet_checkpoint(original, spec.unet)
    vae = convert_ldm_vae_checkpoint(original, spec.vae)
    for converted, expected in ((unet, states["unet"]), (vae, states["vae"])):
        assert converted.keys() == expected.keys()
        assert all(converted[key].shape == expected[key].shape for key in expected)
