"""The zoo's fp16 twins (``tiny-fp16``, ``sd15-fp16``): fp32 weights rounded as they are
drawn, stored in fp16 in every format, loading on both backends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from backends import get_backend
from harness import expand, parse_scenario
from harness.cli import main
from harness.execute import request_for
from harness.measure import GenerationTimer
from models import SPECS, ModelSpec, materialize_formats, resolve, synthesize
from models import zoo as zoo_module
from models.convert import read_spec_metadata

CPU = torch.device("cpu")


def test_every_zoo_model_has_an_fp16_twin_and_fp32_fingerprints_stay() -> None:
    for name in [n for n in SPECS if not n.endswith("-fp16")]:
        spec, twin = SPECS[name], SPECS[f"{name}-fp16"]
        assert twin.weights_dtype == "float16" and twin.repo_id == f"sdbench/{name}-fp16"
        assert dataclasses.replace(twin, name=name, description=spec.description,
                                   repo_id=spec.repo_id, weights_dtype="float32") == spec
        assert "weights_dtype" not in spec.to_dict()  # fp32 caches keep their names
        assert ModelSpec.from_dict(twin.to_dict()) == twin
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        dataclasses.replace(SPECS["tiny"], weights_dtype="int8")


def test_twin_weights_are_the_fp32_weights_rounded() -> None:
    fp32, fp16 = synthesize(SPECS["tiny"]), synthesize(SPECS["tiny-fp16"])
    for (name, model), (_, twin) in zip(fp32.items(), fp16.items(), strict=True):
        state, twin_state = model.state_dict(), twin.state_dict()
        for key, param in model.named_parameters():
            assert twin_state[key].dtype == torch.float16, (name, key)
            assert torch.equal(twin_state[key], param.to(torch.float16)), (name, key)
        buffers = [key for key in state if key not in dict(model.named_parameters())]
        assert all(torch.equal(state[key], twin_state[key]) for key in buffers)


def test_formats_share_one_synthesis_and_store_fp16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub folder is drawn once; the single file is converted from it."""
    monkeypatch.setenv("SDBENCH_CACHE", str(tmp_path))
    calls: list[str] = []
    real = zoo_module.write_hub_folder
    monkeypatch.setattr(zoo_module, "write_hub_folder", lambda spec, path: calls.append(spec.name)
                        or real(spec, path))
    paths = materialize_formats("tiny-fp16", ("safetensors", "hub"))
    assert calls == ["tiny-fp16"]
    assert materialize_formats("tiny-fp16", ("hub", "safetensors")) == paths and len(calls) == 1
    with safe_open(str(paths["safetensors"]), "pt") as handle:
        unet_key = "model.diffusion_model.input_blocks.0.0.weight"
        assert handle.get_tensor(unet_key).dtype == torch.float16
    stored = read_spec_metadata(paths["safetensors"])
    assert stored is not None and stored["weights_dtype"] == "float16"
    with safe_open(str(paths["hub"] / "unet" / "diffusion_pytorch_model.safetensors"),
                   "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16


def test_an_fp16_twin_runs_in_fp32_like_its_fp32_model() -> None:
    """On the original backend, whose loader assigns the file's tensors and then casts (the
    diffusers hub folder runs in the GPU check's dry run)."""
    backend = "original"
    data = {"name": "twin", "repeats": 1, "warmup": 0,
            "matrix": {"backend": backend, "source": "safetensors", "model": ["tiny", "tiny-fp16"],
                       "device": "cpu", "dtype": "fp32", "resolution": 64, "steps": 2}}
    latents = []
    for cell in expand(parse_scenario(data, "twin.yaml")):
        session = get_backend(backend).load(cell, resolve(cell.model, cell.source), CPU)
        with GenerationTimer(CPU) as timer:
            latents.append(session.generate(request_for(cell, session), timer).latents)
        session.close()
    error = float((latents[1] - latents[0]).norm() / latents[0].norm())
    assert 0 < error < 0.02, error  # the weights differ by fp16 rounding only


def test_models_prepare_writes_the_formats_into_the_cache(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "prepare", "tiny-fp16", "--format", "safetensors", "hub"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == [
        "tiny-fp16 (safetensors)", "tiny-fp16 (hub)"]
    assert all(Path(line.split(": ", 1)[1]).exists() for line in lines[:2])
    assert lines[2].startswith("ready in ")
