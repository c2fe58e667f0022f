"""LoRA network types (LoRA, LoCon, LoHa, LoKr, DoRA): the zoo's files, their deltas against
peft's own implementations, files written outside the zoo, and which backend loads which.

The files "made elsewhere" are written by :func:`write_external` below from the published
kohya / LyCORIS layouts (module names from a diffusers UNet of the tiny config, tensors of
its own seed), sharing no code with ``models.lora``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from harness.errors import UnsupportedError, UserError
from harness.vocabulary import NETWORK_TYPES
from models import extra_file, file_network_type, materialize, network_type, read_lora
from models.lora import LoraLayer, decompose

#: The zoo file of each network type.
ZOO = {"lora": "style", "locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "dora"}
#: What diffusers (0.42) makes of each: loads, or the start of its loader's refusal.
DIFFUSERS = {
    "lora": None,
    "locon": None,
    "loha": "does not load a loha file (ValueError: The following keys have not been correctly",
    "lokr": "does not load a lokr file (ValueError: The following keys have not been correctly",
    "dora": "loads a dora file only in part (It seems like you are using a DoRA checkpoint",
}


def test_the_zoo_writes_every_network_type() -> None:
    assert set(ZOO) == set(NETWORK_TYPES)
    for kind, name in ZOO.items():
        path = extra_file("lora", name, "tiny")
        layers = read_lora(path)
        assert network_type(layers) == file_network_type(path) == kind, name
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            keys = list(handle.keys())
        suffixes = {key.split(".", 1)[1] for key in keys}
        if kind == "lora":
            assert metadata["ss_network_module"] == "networks.lora"
            assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
            continue
        assert metadata["ss_network_module"] == "lycoris.kohya"
        args = json.loads(metadata["ss_network_args"])
        assert args["algo"] == {"dora": "locon"}.get(kind, kind)
        expected = {
            "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
            "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
            "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
            "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        }[kind]
        assert suffixes == expected, kind
        # LoCon, LoHa and LoKr adapt the ResNet 3x3 convolutions too
        if kind in ("locon", "loha", "lokr"):
            assert any("resnets" in key and "conv1" in key for key in keys), kind
    locon = read_lora(extra_file("lora", "locon", "tiny"))
    conv = next(layer for name, layer in locon.items() if name.endswith("conv1"))
    assert conv.down.ndim == 4 and tuple(conv.down.shape[2:]) == (3, 3)
    assert tuple(conv.up.shape[2:]) == (1, 1)


def test_every_zoo_type_changes_the_weights_measurably() -> None:
    """At strength 1 each file moves its weights by a tenth or more of their spread."""
    from models import get_spec, lora_targets

    targets = lora_targets(get_spec("tiny"))
    generator = torch.Generator().manual_seed(0)
    for kind, name in ZOO.items():
        for module, layer in read_lora(extra_file("lora", name, "tiny")).items():
            shape = targets[module].shape
            weight = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
            ratio = float(layer.delta(weight).std() / weight.std())
            assert 0.1 < ratio < 2.0, (kind, module, ratio)


# --- deltas against peft's LoHa, LoKr and DoRA ---------------------------------------------


def _peft_layer(config, base: nn.Module) -> nn.Module:  # noqa: ANN001 - a peft config
    from peft import get_peft_model

    model = get_peft_model(nn.Sequential(base), config)
    return model.base_model.model[0]


@pytest.mark.parametrize("base", [nn.Linear(24, 32), nn.Conv2d(8, 16, 3, padding=1)],
                         ids=["linear", "conv3x3"])
def test_loha_and_lokr_deltas_equal_peft(base: nn.Module) -> None:
    from peft import LoHaConfig, LoKrConfig

    torch.manual_seed(0)
    weight = base.weight.detach().clone()
    loha = _peft_layer(LoHaConfig(r=4, alpha=2.0, target_modules=["0"], init_weights=False),
                       base)
    tensors = {key: getattr(loha, key)["default"].detach().clone()
               for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    ours = LoraLayer("loha", {k: v.flatten(1) if k.endswith("_b") else v
                              for k, v in tensors.items()}, alpha=2.0)
    expected = loha.get_delta_weight("default")
    assert expected.abs().max() > 1e-3  # a real update, not two zeros agreeing
    torch.testing.assert_close(ours.delta(weight), expected, rtol=1e-5, atol=1e-6)

    lokr = _peft_layer(LoKrConfig(r=1, alpha=3.0, target_modules=["0"], init_weights=False),
                       type(base)(*_args(base)))
    lokr.base_layer.weight.data.copy_(weight)
    factors = {key: getattr(lokr, key)["default"].detach().clone()
               for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                           "lokr_w2_b") if "default" in getattr(lokr, key)}
    assert "lokr_w2_b" in factors  # a factored second factor: scale alpha / rank
    assert lokr.get_delta_weight("default").abs().max() > 1e-3
    ours = LoraLayer("lokr", {k: v.flatten(1) if k == "lokr_w2_b" else v
                              for k, v in factors.items()}, alpha=3.0)
    torch.testing.assert_close(ours.delta(weight), lokr.get_delta_weight("default"),
                               rtol=1e-5, atol=1e-6)


def _args(base: nn.Module) -> tuple[int, ...]:
    if isinstance(base, nn.Linear):
        return (base.in_features, base.out_features)
    assert isinstance(base, nn.Conv2d)
    return (base.in_channels, base.out_channels, base.kernel_size[0])


def test_dora_per_output_row_equals_peft_and_per_column_is_a1111s() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = nn.Linear(24, 32)
    weight = base.weight.detach().clone()
    model = get_peft_model(nn.Sequential(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = model.base_model.model[0]
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        magnitude.mul_(torch.exp(0.2 * torch.randn_like(magnitude)))
    down = layer.lora_A["default"].weight.detach().clone()
    up = layer.lora_B["default"].weight.detach().clone()
    merged = model.merge_and_unload()[0].weight.detach()
    assert (merged - weight).abs().max() > 1e-2
    # LyCORIS wd_on_out / peft: magnitudes per output row, dora_scale [out, 1]
    rows = LoraLayer("lora", {"lora_down.weight": down, "lora_up.weight": up}, alpha=8.0,
                     dora_scale=magnitude.detach().clone()[:, None])
    torch.testing.assert_close(weight + rows.delta(weight), merged, rtol=1e-5, atol=1e-6)
    # A1111 / the DoRA paper: per input column, dora_scale [1, in]
    columns_m = torch.rand(1, 24) + 0.5
    columns = LoraLayer("lora", {"lora_down.weight": down, "lora_up.weight": up}, alpha=8.0,
                        dora_scale=columns_m)
    updated = weight + 2.0 * up @ down
    by_hand = torch.stack([updated[:, j] * columns_m[0, j] / updated[:, j].norm()
                           for j in range(24)], dim=1)
    torch.testing.assert_close(weight + columns.delta(weight), by_hand, rtol=1e-5, atol=1e-6)
    half = columns.delta(weight, 0.5)  # strength scales the decomposed delta (A1111)
    torch.testing.assert_close(half, 0.5 * columns.delta(weight))
    with pytest.raises(ValueError, match="fits neither"):
        decompose(torch.zeros(32, 24), weight, torch.ones(5))


# --- reading: what is not applied is named ----------------------------------------------


def test_keys_of_layouts_not_applied_are_named(tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    tucker = {f"{name}.lora_down.weight": torch.zeros(4, 8, 1, 1),
              f"{name}.lora_up.weight": torch.zeros(8, 4, 1, 1),
              f"{name}.lora_mid.weight": torch.zeros(4, 4, 3, 3)}
    save_file(tucker, str(tmp_path / "tucker.safetensors"))
    with pytest.raises(UserError, match=rf"{name}\.lora_mid\.weight \(a LoCon CP/Tucker"):
        read_lora(tmp_path / "tucker.safetensors")
    half = {f"{name}.hada_w1_a": torch.zeros(8, 4), f"{name}.hada_w1_b": torch.zeros(4, 72)}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(UserError, match=rf"half.safetensors'.*{name}: unpaired.*missing hada_w2_a"):
        read_lora(tmp_path / "half.safetensors")
    odd = {f"{name}.lora_down.weight": torch.zeros(4, 8), f"{name}.weird": torch.zeros(1)}
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UserError, match=rf"unknown keys: {name}\.weird"):
        read_lora(tmp_path / "odd.safetensors")


# --- files made outside the zoo -------------------------------------------------------------


def write_external(kind: str, path: Path, seed: int = 7) -> Path:
    """A LoCon or LoHa file as LyCORIS writes one, for the tiny model: attention projections
    and ResNet convolutions of the diffusers UNet (names from diffusers itself), rank 4,
    alpha 2, fp16 tensors, kohya metadata."""
    from diffusers import UNet2DConditionModel

    unet_dir = materialize("tiny", "hub") / "unet"
    config = json.loads((unet_dir / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    rank, alpha = 4, 2.0
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in unet.named_modules():
        wanted = module_name.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0")) or (
            ".resnets." in module_name and module_name.endswith(("conv1", "conv2")))
        if not wanted:
            continue
        shape = tuple(module.weight.shape)
        fan_in = math.prod(shape[1:])
        key = "lora_unet_" + module_name.replace(".", "_")

        def normal(*size: int, std: float) -> torch.Tensor:
            return (torch.randn(size, generator=generator) * std).half()

        if kind == "locon":
            tensors[f"{key}.lora_down.weight"] = normal(rank, *shape[1:], std=fan_in**-0.5)
            up = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
            tensors[f"{key}.lora_up.weight"] = normal(*up, std=0.5 / rank**0.5)
        else:
            for pair in ("w1", "w2"):
                tensors[f"{key}.hada_{pair}_a"] = normal(shape[0], rank, std=rank**-0.5)
                tensors[f"{key}.hada_{pair}_b"] = normal(rank, fan_in, std=0.7 * fan_in**-0.25)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha),
                "ss_network_args": json.dumps({"algo": kind, "conv_dim": str(rank)})}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _by_hand(kind: str, tensors: dict[str, torch.Tensor], key: str,
             weight: torch.Tensor) -> torch.Tensor:
    """The published formulas, written out: kohya LoRA / LyCORIS LoHa at strength 1."""
    alpha = float(tensors[f"{key}.alpha"])
    if kind == "locon":
        down = tensors[f"{key}.lora_down.weight"].float()
        up = tensors[f"{key}.lora_up.weight"].float()
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        rank = down.shape[0]
    else:
        w = {n: tensors[f"{key}.hada_{n}"].float() for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        product = (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"])
        rank = w["w1_b"].shape[0]
    return weight.float() + alpha / rank * product.reshape(weight.shape)


@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_external_files_patch_the_original_backend_as_published(
    kind: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file
    from test_original_workflows import load

    path = write_external(kind, tmp_path / f"external-{kind}.safetensors")
    assert file_network_type(path) == kind
    tensors = load_file(str(path))
    session = load()
    try:
        keys = sorted({key.split(".", 1)[0] for key in tensors})
        before = {key: session.lora.layers[key].weight.detach().clone() for key in keys}
        session.lora.apply([(path, 1.0)])
        for key in keys:
            after = session.lora.layers[key].weight.detach()
            torch.testing.assert_close(after, _by_hand(kind, tensors, key, before[key]),
                                       rtol=1e-5, atol=1e-6, msg=key)
        session.lora.restore()
        assert all(torch.equal(session.lora.layers[k].weight, before[k]) for k in keys)
    finally:
        session.close()


def test_diffusers_loads_lora_and_locon_and_names_what_it_refuses(tmp_path: Path) -> None:
    """Through the backend's adapter manager: every zoo type and both external files."""
    from diffusers import StableDiffusionPipeline

    from backends.diffusers_features import LoraAdapters

    pipe = StableDiffusionPipeline.from_pretrained(materialize("tiny", "hub"),
                                                   local_files_only=True)
    adapters = LoraAdapters(pipe)
    files = {kind: extra_file("lora", name, "tiny") for kind, name in ZOO.items()}
    external = {kind: write_external(kind, tmp_path / f"ext-{kind}.safetensors")
                for kind in ("locon", "loha")}
    for kind, path in [*files.items(), *(("external " + k, p) for k, p in external.items())]:
        refusal = DIFFUSERS[kind.removeprefix("external ")]
        if refusal is None:
            assert adapters._load_lora(path) in pipe.get_list_adapters()["unet"], kind
            continue
        with pytest.raises(UnsupportedError) as raised:
            adapters._load_lora(path)
        message = str(raised.value)
        assert refusal in message and str(path) in message, (kind, message)
        assert "\n" not in message
        loaded = {name for names in pipe.get_list_adapters().values() for name in names}
        assert not any(name.startswith(path.stem) for name in loaded), kind  # nothing left


# --- end to end: the scenario, the report's table -------------------------------------------


@pytest.mark.slow
def test_networks_scenario_and_its_table(tmp_path: Path) -> None:
    """``scenarios/networks.yaml`` plus the two external files through ``python -m harness
    run``: every type on the original backend passes its checks, diffusers loads LoRA and
    LoCon with parity ≤ 1e-4 and refuses the rest with its message; the external files give
    the zoo's outcomes; ``report`` shows the network-types table."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    scenario = yaml.safe_load((root / "scenarios" / "networks.yaml").read_text())
    external = {kind: write_external(kind, tmp_path / f"ext-{kind}.safetensors")
                for kind in ("locon", "loha")}
    scenario["matrix"]["lora"] += [f"{path}@0.8" for path in external.values()]
    (tmp_path / "networks.yaml").write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "harness", "run", str(tmp_path / "networks.yaml"),
                    "--out", str(out)], cwd=root, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 8
    outcome: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for record in records:
        metrics = record["metrics"]
        kind = metrics["lora_types"]
        source = "external" if "ext-" in record["cell"]["lora"] else "zoo"
        checks = {n: c["status"] for n, c in (metrics.get("check_results") or {}).items()}
        outcome[(record["cell"]["backend"], f"{source} {kind}")] = (record["status"], checks)
        refusal = DIFFUSERS[kind.split("+")[0]]  # loha+locon: the LoHa is refused
        if record["cell"]["backend"] == "original" or refusal is None:
            assert record["status"] == "ok", record["reason"]
            assert set(checks.values()) == {"pass"}, checks
            assert {"lora_strength0", "lora_monotonic", "lora_merged"} <= set(checks)
            if record["cell"]["backend"] == "diffusers":
                assert metrics["parity_latent_rel_err"] <= 1e-4
        else:
            assert record["status"] == "unsupported" and refusal in record["reason"]
    for backend in ("original", "diffusers"):
        for kind in ("locon", "loha"):
            assert outcome[(backend, f"external {kind}")] == outcome[(backend, f"zoo {kind}")]
    subprocess.run([sys.executable, "-m", "harness", "report", str(out), "--format", "md",
                    "-o", str(tmp_path / "report.md")], cwd=root, check=True,
                   capture_output=True)
    table = (tmp_path / "report.md").read_text().split("### Network types", 1)[1]
    for kind in NETWORK_TYPES:
        assert f"| {kind} · " in table, kind
    # loha, lokr, dora, loha+locon, the external loha
    assert table.count("unsupported (diffusers 0.") == 5
    assert "| loha+locon · loha@0.6+locon@0.8 | runs | pass | unsupported (" in table
