"""The zoo's extras: kohya LoRAs, A1111 embeddings, merging by hand, inpainting specs (tiny)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from harness.errors import UserError
from models import (
    SPECS,
    config_folder,
    extra_file,
    get_spec,
    list_models,
    lora_targets,
    materialize,
    merge_loras,
    read_embedding,
    read_lora,
    resolve,
)
from models.convert import from_original_state_dict
from models.embeddings import synthesize_embedding
from models.lora import synthesize_lora
from models.synth import EMBEDDING_STD

COMPONENTS = ("unet", "vae", "text_encoder")
KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def loras() -> dict[str, Path]:
    return {name: extra_file("lora", name, "tiny") for name in ("style", "detail")}


@pytest.fixture(scope="module")
def lora_pipeline(loras: dict[str, Path]):  # noqa: ANN201 - diffusers pipeline
    """tiny (fp32) with both zoo LoRAs loaded as peft adapters."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        materialize("tiny", "hub"), local_files_only=True
    )
    for name, path in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def _truncate(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


# --------------------------------------------------------------------------- extras


def test_extras_are_deterministic_and_cached(loras: dict[str, Path]) -> None:
    spec = get_spec("tiny")
    for name in loras:
        first, second = synthesize_lora(spec, name), synthesize_lora(spec, name)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)
    assert torch.equal(synthesize_embedding(spec, "sbmulti"), synthesize_embedding(spec, "sbmulti"))
    style, detail = synthesize_lora(spec, "style"), synthesize_lora(spec, "detail")
    shared = style.keys() & detail.keys()
    assert shared and not any(torch.equal(style[k], detail[k]) for k in shared if "alpha" not in k)
    mtime = loras["style"].stat().st_mtime_ns
    assert extra_file("lora", "style", "tiny") == loras["style"]
    assert loras["style"].stat().st_mtime_ns == mtime


def test_extras_leave_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    synthesize_lora(get_spec("tiny"), "detail")
    synthesize_embedding(get_spec("tiny"), "sbstyle")
    assert torch.equal(torch.rand(2), expected)


def test_inpaint_variant_shares_the_base_files(loras: dict[str, Path]) -> None:
    inpaint_file = materialize("tiny-inpaint", "safetensors")
    for kind, name in (("lora", "style"), ("lora", "detail"), ("embedding", "sbstyle")):
        base = extra_file(kind, name, "tiny")
        for model in ("tiny-inpaint", str(inpaint_file)):
            other = extra_file(kind, name, model)
            assert other.name == base.name and other.read_bytes() == base.read_bytes()


def test_unknown_extra_names() -> None:
    with pytest.raises(UserError, match=r"unknown lora 'nope'; expected one of: style, detail, locon, loha, lokr, dora$"):
        extra_file("lora", "nope", "tiny")
    with pytest.raises(UserError, match="expected one of: sbstyle, sbmulti"):
        extra_file("embedding", "style", "tiny")
    with pytest.raises(UserError, match="unknown extra kind 'hypernetwork'"):
        extra_file("hypernetwork", "style", "tiny")
    with pytest.raises(UserError, match="sd99"):
        extra_file("lora", "style", "sd99")


# --------------------------------------------------------------------------- LoRA files


def test_lora_files_have_the_kohya_layout(loras: dict[str, Path]) -> None:
    from safetensors import safe_open

    expected_rank = {"style": 4, "detail": 8}
    for name, path in loras.items():
        assert path.name == f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            assert handle.metadata()["ss_network_module"] == "networks.lora"
        assert keys and all(KOHYA_KEY.match(key) for key in keys), keys[:3]
        layers = read_lora(path)
        assert {layer.rank for layer in layers.values()} == {expected_rank[name]}
        assert all(layer.down.dtype == torch.float16 for layer in layers.values())
        assert set(layers) <= set(lora_targets(get_spec("tiny")))
    style, detail = read_lora(loras["style"]), read_lora(loras["detail"])
    te = "lora_te_text_model_encoder_layers_0_self_attn_"
    assert {f"{te}{p}_proj" for p in ("q", "k", "v", "out")} <= set(style)
    assert not any(key.startswith("lora_te_") for key in detail)
    assert not any("ff_net" in key or "proj_in" in key for key in style)
    block = "lora_unet_down_blocks_0_attentions_0_"
    assert f"{block}transformer_blocks_0_attn2_to_out_0" in style
    assert {f"{block}transformer_blocks_0_ff_net_{p}" for p in ("0_proj", "2")} <= set(detail)
    width = get_spec("tiny").unet["block_out_channels"][0]
    assert detail[f"{block}proj_in"].down.shape == (8, width, 1, 1)
    assert detail[f"{block}proj_out"].up.shape == (width, 8, 1, 1)


def test_diffusers_loads_every_lora_key(lora_pipeline, loras: dict[str, Path]) -> None:  # noqa: ANN001
    """Every module of both files became a peft layer with the file's weights and alpha."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    targets = lora_targets(get_spec("tiny"))
    for adapter, path in loras.items():
        layers = read_lora(path)
        for module_name, layer in layers.items():
            target = targets[module_name]
            model = getattr(lora_pipeline, target.component)
            module = model.get_submodule(target.diffusers_key.removesuffix(".weight"))
            assert isinstance(module, PeftLoraLayer), module_name
            down = module.lora_A[adapter].weight
            assert torch.equal(down.reshape(layer.down.shape), layer.down.float()), module_name
            assert module.scaling[adapter] == pytest.approx(layer.scale), module_name
        injected = sum(
            1
            for component in ("unet", "text_encoder")
            for module in getattr(lora_pipeline, component).modules()
            if isinstance(module, PeftLoraLayer) and adapter in module.lora_A
        )
        assert injected == len(layers), adapter


def test_merge_by_hand_equals_diffusers_adapters(
    lora_pipeline,  # noqa: ANN001
    loras: dict[str, Path],
    tmp_path: Path,
) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = get_spec("tiny")
    strengths = {"style": 0.7, "detail": 0.4}
    merged = merge_loras(
        "tiny",
        "safetensors",
        [(loras[n], s) for n, s in strengths.items()],
        tmp_path / "m.safetensors",
    )
    assert resolve(str(merged), "safetensors").spec_name == "tiny"
    states, missing = from_original_state_dict(spec, load_file(str(merged)))
    assert not missing
    unet = UNet2DConditionModel.from_config(spec.unet)
    unet.load_state_dict(states["unet"])
    config = {k: v for k, v in spec.text_encoder.items() if k != "model_type"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder.load_state_dict(states["text_encoder"])

    lora_pipeline.set_adapters(list(strengths), adapter_weights=list(strengths.values()))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, spec.unet["cross_attention_dim"], generator=generator)
    ids = torch.randint(0, 998, (2, 77), generator=generator)
    with torch.no_grad():
        expected = lora_pipeline.unet(latents, 500, context).sample
        actual = unet.eval()(latents, 500, context).sample
        expected_text = lora_pipeline.text_encoder(ids).last_hidden_state
        actual_text = text_encoder.eval()(ids).last_hidden_state
        lora_pipeline.set_adapters(list(strengths), adapter_weights=[0.0, 0.0])
        without = lora_pipeline.unet(latents, 500, context).sample
    for got, want in ((actual, expected), (actual_text, expected_text)):
        assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert ((without - expected).norm() / expected.norm()).item() > 1e-2  # the LoRAs matter


def test_merge_strength_zero_and_formats(loras: dict[str, Path], tmp_path: Path) -> None:
    source = torch.load(materialize("tiny", "ckpt"), weights_only=True)["state_dict"]
    merged = merge_loras("tiny", "ckpt", [(loras["style"], 0.0)], tmp_path / "zero.ckpt")
    data = torch.load(merged, weights_only=True)
    assert json.loads(data["sdbench_spec"])["name"] == "tiny"
    assert data["state_dict"].keys() == source.keys()
    assert all(torch.equal(data["state_dict"][k], source[k]) for k in source)
    from_hub = merge_loras("tiny", "hub", [(loras["detail"], 1.0)], tmp_path / "hub.safetensors")
    assert resolve(str(from_hub), "safetensors").spec_name == "tiny"
    with pytest.raises(UserError, match=r"ending in \.ckpt"):
        merge_loras("tiny", "ckpt", [], tmp_path / "wrong.safetensors")


def test_merge_refuses_keys_for_missing_modules(loras: dict[str, Path], tmp_path: Path) -> None:
    tensors = synthesize_lora(get_spec("tiny"), "style")
    ghost = "lora_unet_down_blocks_7_attentions_0_proj_in"
    tensors[f"{ghost}.lora_down.weight"] = torch.ones(4, 32, 1, 1, dtype=torch.float16)
    tensors[f"{ghost}.lora_up.weight"] = torch.ones(32, 4, 1, 1, dtype=torch.float16)
    bad = _save(tensors, tmp_path / "ghost.safetensors")
    assert ghost in read_lora(bad)  # a well-formed file, just not for this model
    with pytest.raises(UserError, match=f"ghost.safetensors.*name no module of tiny: {ghost}"):
        merge_loras("tiny", "safetensors", [(bad, 1.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_read_lora_errors(loras: dict[str, Path], tmp_path: Path) -> None:
    truncated = _truncate(loras["style"], tmp_path / "cut.safetensors")
    with pytest.raises(UserError, match="cut.safetensors': cannot be read"):
        read_lora(truncated)
    not_lora = extra_file("embedding", "sbmulti", "tiny")
    with pytest.raises(UserError, match="sbmulti.safetensors': no network layers"):
        read_lora(not_lora)
    tensors = synthesize_lora(get_spec("tiny"), "detail")
    lonely = next(key for key in tensors if key.endswith(".lora_up.weight"))
    del tensors[lonely.replace("lora_up", "lora_down")]
    tensors["lora_unet_conv_in.hada_w1_a"] = torch.ones(2, 2)
    with pytest.raises(UserError, match="2 malformed layers: .*conv_in: unpaired \\(hada_w1_a"
                       ) as error:
        read_lora(_save(tensors, tmp_path / "odd.safetensors"))
    assert f"{lonely.split('.')[0]}: unpaired (lora_up.weight; missing lora_down" in str(
        error.value)
    with pytest.raises(UserError, match="expected a kohya .safetensors"):
        read_lora(tmp_path / "style.pt")


# --------------------------------------------------------------------------- embeddings


def test_embedding_files_have_the_a1111_layout() -> None:
    from safetensors.torch import load_file

    hidden = get_spec("tiny").text_encoder["hidden_size"]
    single = extra_file("embedding", "sbstyle", "tiny")
    assert single.name == "sbstyle.pt"
    data = torch.load(single, weights_only=True)
    assert set(data) == {
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    }
    assert data["string_to_token"] == {"*": 265} and data["name"] == "sbstyle"
    assert data["string_to_param"]["*"].shape == (1, hidden)
    multi = extra_file("embedding", "sbmulti", "tiny")
    assert multi.name == "sbmulti.safetensors"
    assert {k: tuple(v.shape) for k, v in load_file(str(multi)).items()} == {
        "emb_params": (3, hidden)
    }
    for path, count in ((single, 1), (multi, 3)):
        word, vectors = read_embedding(path)
        assert word == path.stem and vectors.shape == (count, hidden)
        assert vectors.dtype == torch.float32
    assert 0.7 * EMBEDDING_STD < float(synthesize_embedding(get_spec("tiny"), "sbmulti").std())
    assert float(synthesize_embedding(get_spec("tiny"), "sbmulti").std()) < 1.3 * EMBEDDING_STD


def test_trigger_word_loads_in_diffusers() -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        materialize("tiny", "hub"), local_files_only=True
    )
    prompt = "a photograph of sbstyle and sbmulti"
    ids = pipe.tokenizer(prompt, return_tensors="pt").input_ids
    before = pipe.text_encoder(ids).last_hidden_state
    for name in ("sbstyle", "sbmulti"):
        word, vectors = read_embedding(extra_file("embedding", name, "tiny"))
        pipe.load_textual_inversion(str(extra_file("embedding", name, "tiny")), token=word)
        token_ids = pipe.tokenizer.convert_tokens_to_ids(
            [word] + [f"{word}_{i}" for i in range(1, len(vectors))]
        )
        table = pipe.text_encoder.get_input_embeddings().weight
        assert torch.equal(table[token_ids].detach(), vectors)
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(converted, return_tensors="pt").input_ids
    after = pipe.text_encoder(ids).last_hidden_state
    assert after.shape != before.shape or not torch.allclose(after, before)


def test_read_embedding_errors(tmp_path: Path) -> None:
    for name in ("sbstyle", "sbmulti"):
        source = extra_file("embedding", name, "tiny")
        cut = _truncate(source, tmp_path / source.name)
        with pytest.raises(UserError, match=rf"'{re.escape(str(cut))}': .*truncated") as error:
            read_embedding(cut)
        assert "\n" not in str(error.value) and "expected an A1111 embedding" in str(error.value)
    torch.save({"weights": torch.ones(1, 32)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="plain.pt': no string_to_param"):
        read_embedding(tmp_path / "plain.pt")
    torch.save({"string_to_param": {"*": _Unsafe()}}, tmp_path / "unsafe.pt")
    with pytest.raises(UserError, match="unsafe.pt': refused to unpickle"):
        read_embedding(tmp_path / "unsafe.pt")
    _save({"a": torch.ones(1, 32), "b": torch.ones(1, 32)}, tmp_path / "two.safetensors")
    with pytest.raises(UserError, match="two.safetensors': no emb_params"):
        read_embedding(tmp_path / "two.safetensors")
    with pytest.raises(UserError, match="no such file"):
        read_embedding(tmp_path / "missing.pt")


class _Unsafe:
    """A class ``torch.load(weights_only=True)`` must refuse to rebuild."""


# --------------------------------------------------------------------------- inpainting


def test_inpaint_specs_differ_only_in_unet_input() -> None:
    for name, base in (("tiny-inpaint", "tiny"), ("sd15-inpaint", "sd15")):
        spec, base_spec = SPECS[name], SPECS[base]
        assert spec.unet == {**base_spec.unet, "in_channels": 9}
        assert (spec.vae, spec.text_encoder, spec.seed) == (
            base_spec.vae,
            base_spec.text_encoder,
            base_spec.seed,
        )
        assert spec.repo_id == f"sdbench/{name}" and spec.fingerprint() != base_spec.fingerprint()
    assert {"tiny-inpaint", "sd15-inpaint"} <= {record["name"] for record in list_models()}


def test_inpaint_round_trip() -> None:
    from diffusers import StableDiffusionInpaintPipeline

    hub = materialize("tiny-inpaint", "hub")
    assert json.loads((hub / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionInpaintPipeline"
    )
    assert resolve(str(hub), "hub").spec_name == "tiny-inpaint"
    expected = StableDiffusionInpaintPipeline.from_pretrained(hub, local_files_only=True)
    assert expected.unet.config.in_channels == 9
    for fmt in ("safetensors", "ckpt"):
        path = materialize("tiny-inpaint", fmt)
        assert resolve(str(path), fmt).spec_name == "tiny-inpaint"
        loaded = StableDiffusionInpaintPipeline.from_single_file(
            str(path), config=str(config_folder("tiny-inpaint")), local_files_only=True
        )
        assert loaded.unet.config.in_channels == 9
        for name in COMPONENTS:
            want, got = getattr(expected, name).state_dict(), getattr(loaded, name).state_dict()
            assert got.keys() == want.keys(), name
            differing = [key for key in want if not torch.equal(got[key], want[key])]
            assert not differing, f"{fmt} {name}: {differing[:5]}"


# --------------------------------------------------------------------------- sd15


@pytest.mark.slow
def test_sd15_extras_fit_the_architecture() -> None:
    spec = get_spec("sd15")
    targets = lora_targets(spec)
    from models.lora import LORAS

    for name in LORAS:  # every network type fits sd15's widths (LoKr's factors among them)
        layers = read_lora(extra_file("lora", name, "sd15"))
        assert set(layers) <= set(targets)
        for module, layer in layers.items():
            assert layer.delta(torch.zeros(targets[module].shape)).shape == targets[module].shape
        assert extra_file("lora", name, "sd15-inpaint").read_bytes() == (
            extra_file("lora", name, "sd15").read_bytes()
        )
    _, vectors = read_embedding(extra_file("embedding", "sbmulti", "sd15"))
    assert vectors.shape == (3, 768)
