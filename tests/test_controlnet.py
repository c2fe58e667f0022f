"""ControlNet: the zoo's nets in both layouts, the original (``cldm``) architecture against
diffusers' ``ControlNetModel``, the axes and the harness's part of it, and both backends end
to end (single and double nets, parity, the scale-0 and control-image checks, the timing
split and the report's column)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backends.base import Backend, Output, Request, Session
from harness.conformance import relative_error
from harness.errors import UserError
from harness.execute import CellExecutor, request_for
from harness.inputs import edge_map, generated_image
from harness.matrix import expand
from harness.measure import GenerationTimer, Measurement, MemoryPeaks, Timing
from harness.scenario import load_scenario
from models import controlnet_config_folder, extra_file
from models.controlnet import CONTROL_PREFIX, residual_count
from models.specs import SPECS
from tests.conftest import write_scenario

ROOT = Path(__file__).resolve().parents[1]

TINY_CONTROLNET = """
name: cn
prompt: a photograph of an astronaut riding a horse
repeats: 1
warmup: 0
checks: [semantics, parity]
matrix:
  backend: [original, diffusers]
  model: tiny
  source: safetensors
  resolution: 64
  steps: 4
  sampler: euler
  workflow: controlnet
  controlnet: [auto, "zoo:canny@1+zoo:depth@0.5"]
"""


def _diffusers_controlnet(name: str = "canny") -> torch.nn.Module:
    from diffusers import ControlNetModel

    folder = extra_file("controlnet", name, "tiny", layout="folder")
    return ControlNetModel.from_pretrained(str(folder), local_files_only=True).eval()


# --- the zoo ------------------------------------------------------------------------------


def test_zoo_controlnet_single_file_is_the_folder_and_has_no_zero_layer() -> None:
    """The original single file holds ``control_model.*`` only, no tensor (no layer) is zero,
    and diffusers' ``from_single_file`` reads it into exactly the folder's tensors."""
    from diffusers import ControlNetModel

    path = extra_file("controlnet", "canny", "tiny")
    state = load_file(str(path))
    assert state and all(key.startswith(CONTROL_PREFIX) for key in state)
    names = {key[len(CONTROL_PREFIX):].split(".")[0] for key in state}
    assert names == {"time_embed", "input_hint_block", "input_blocks", "zero_convs",
                     "middle_block", "middle_block_out"}
    assert all(bool((value != 0).all()) for value in state.values())
    zero_convs = [v for k, v in state.items() if ".zero_convs." in k and k.endswith("weight")]
    assert len(zero_convs) == residual_count(dict(
        block_out_channels=SPECS["tiny"].unet["block_out_channels"],
        layers_per_block=SPECS["tiny"].unet["layers_per_block"])) - 1
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["sdbench_controlnet"])["name"] == "canny"

    folder = _diffusers_controlnet().state_dict()
    single = ControlNetModel.from_single_file(
        str(path), config=str(controlnet_config_folder("tiny")), local_files_only=True
    ).state_dict()
    assert set(single) == set(folder)
    assert all(torch.equal(single[key], folder[key]) for key in folder)
    # two nets of the zoo are two different nets; the inpainting variant shares tiny's
    other = load_file(str(extra_file("controlnet", "depth", "tiny")))
    assert not torch.equal(other["control_model.zero_convs.0.0.weight"],
                           state["control_model.zero_convs.0.0.weight"])
    assert extra_file("controlnet", "canny", "tiny-inpaint").read_bytes() == path.read_bytes()


def test_unknown_zoo_controlnet_names_the_known() -> None:
    with pytest.raises(UserError, match="unknown controlnet 'nope'; expected one of: canny, depth"):
        extra_file("controlnet", "nope", "tiny")


# --- the original architecture ------------------------------------------------------------


def test_original_controlnet_loads_strictly_and_equals_diffusers(tmp_path: Path) -> None:
    """``cldm``'s ControlNet on the single file gives diffusers' residuals on the folder."""
    from backends.original.controlnet import load_controlnet
    from backends.original.unet import UNetConfig

    config = UNetConfig.from_ldm(SPECS["tiny"].ldm_config()["unet"])
    path = extra_file("controlnet", "canny", "tiny")
    net = load_controlnet(path, config, torch.float32, torch.device("cpu"))
    reference = _diffusers_controlnet()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    hint = torch.rand(2, 3, 64, 64, generator=generator)
    timesteps = torch.tensor([500.0, 20.5])
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        outs = net(x, hint, timesteps, context)
        down, mid = reference(x, timesteps, encoder_hidden_states=context,
                              controlnet_cond=hint, return_dict=False)
    assert len(outs) == len(down) + 1
    for ours, theirs in zip(outs, [*down, mid], strict=True):
        assert relative_error(ours, theirs) < 1e-6
        assert float(theirs.std()) > 0.1  # no vacuous zero residual

    # the .pth layout without the prefix loads the same; a missing tensor is named
    state = load_file(str(path))
    bare = {key[len(CONTROL_PREFIX):]: value for key, value in state.items()}
    torch.save(bare, tmp_path / "bare.pth")
    again = load_controlnet(tmp_path / "bare.pth", config, torch.float32, torch.device("cpu"))
    assert torch.equal(again.zero_convs[0][0].weight, net.zero_convs[0][0].weight)
    del state["control_model.middle_block_out.0.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match=r"broken.safetensors' does not fit the model's UNet: .*"
                                        r"middle_block_out.0.bias"):
        load_controlnet(tmp_path / "broken.safetensors", config, torch.float32,
                        torch.device("cpu"))


# --- axes, inputs, timing -----------------------------------------------------------------


def test_controlnet_axes_are_checked_with_one_line_errors(tmp_path: Path) -> None:
    bad_ref = write_scenario(tmp_path, TINY_CONTROLNET.replace('"zoo:canny@1+zoo:depth@0.5"',
                                                               '"zoo:canny@x"'))
    with pytest.raises(UserError) as caught:
        load_scenario(bad_ref)
    message = str(caught.value)
    assert "matrix.controlnet" in message and "NET[@SCALE]" in message and "\n" not in message
    window = write_scenario(tmp_path, TINY_CONTROLNET + "  control_start: 0.6\n"
                            "  control_end: 0.5\n", name="window.yaml")
    with pytest.raises(UserError, match=r"window.yaml: matrix: control_start 0.6 with "
                                        r"control_end 0.5: expected control_start below"):
        expand(load_scenario(window))


def test_request_of_a_controlnet_cell(tmp_path: Path) -> None:
    """The base workflow plus the controls: the zoo net in the model source's layout, the
    axis's scale where a net names none, the edge map of the generated picture."""
    text = TINY_CONTROLNET.replace("source: safetensors", "source: [safetensors, hub]")
    cells = {(c.source, c.controlnet): c for c in expand(load_scenario(
        write_scenario(tmp_path, text + "  control_scale: 0.7\n")))}

    class _Shape(Session):
        def generate(self, request: Request, timer: GenerationTimer) -> Output:
            raise AssertionError

    single = request_for(cells[("safetensors", "auto")], _Shape())
    assert single.workflow == "txt2img" and len(single.controls) == 1
    (control,) = single.controls
    assert control.path == extra_file("controlnet", "canny", "tiny") and control.folder is None
    assert control.config is not None and control.scale == 0.7
    np.testing.assert_array_equal(control.image, edge_map(generated_image(64, 64, 0)))
    assert set(np.unique(control.image)) == {0.0, 1.0}
    double = request_for(cells[("hub", "zoo:canny@1+zoo:depth@0.5")], _Shape())
    assert [ref.scale for ref in double.controls] == [1.0, 0.5]
    assert [ref.folder and ref.folder.name for ref in double.controls] == ["canny", "depth"]


def test_the_timer_splits_a_part_of_the_steps_and_the_summary_reports_it() -> None:
    device = torch.device("cpu")
    with GenerationTimer(device) as timer:
        timer.begin("denoise")
        for _ in range(3):
            with timer.part("controlnet"):
                sum(range(20000))
            timer.step()
        timer.end("denoise")
    timing = Timing.from_timer(timer)
    assert 0 < timing.parts["controlnet"] < timing.denoise  # type: ignore[operator]
    assert timer.part_s("controlnet") == timing.parts["controlnet"]
    measurement = Measurement.from_timings(
        batch=1, steps=3, timings=[timing, timing], first_call_s=0.0, load_s=0.0,
        memory=MemoryPeaks(cpu_rss_sampled_gb=0.0, cpu_rss_os_peak_gb=None),
    )
    summary = measurement.summary()
    assert summary["controlnet_s"] == timing.parts["controlnet"]
    assert summary["controlnet_share"] == pytest.approx(timing.parts["controlnet"] / timing.denoise)
    with pytest.raises(ValueError, match="part must be one of"):
        timer.begin_part("lora")


class IgnoresControls(Backend):
    """A backend that would run a ControlNet cell as plain txt2img (it does not claim to)."""

    name = "ignores-controls"

    def load(self, cell, model, device):  # type: ignore[no-untyped-def]
        raise AssertionError("a ControlNet cell must not load on a backend without ControlNet")


def test_a_backend_that_does_not_claim_controlnet_gets_unsupported(tmp_path: Path) -> None:
    text = TINY_CONTROLNET.replace("backend: [original, diffusers]",
                                   "backend: 'tests.test_controlnet:IgnoresControls'")
    cell = expand(load_scenario(write_scenario(tmp_path, text)))[0]
    result = CellExecutor(None, run_id="t").run(cell).result
    assert result.status == "unsupported"
    assert "does not run ControlNet (Backend.controlnet)" in str(result.reason)


# --- both backends, end to end ------------------------------------------------------------


def test_single_and_double_controlnet_agree_across_backends(tmp_path: Path) -> None:
    """Tiny cells of one and of two ControlNets on both backends: latent parity ≤ 1e-4 (fp32,
    euler), the scale-0 and control-image checks pass, the ControlNets' share is recorded."""
    from harness.runner import Runner

    cells = expand(load_scenario(write_scenario(tmp_path, TINY_CONTROLNET)))
    records = Runner(tmp_path / "out", progress=False, isolate="none").run(cells)
    by_id = {r.cell.id: r for r in records}
    assert len(by_id) == 4
    for record in records:
        assert record.status == "ok", record.reason
        checks = {name: c["status"] for name, c in record.metrics["check_results"].items()}
        checks.pop("parity", None)
        assert checks == {"controlnet_scale0": "pass", "controlnet_image_effect": "pass"}
        assert 0 < record.metrics["controlnet_share"] < 1
        if record.cell.backend == "diffusers":
            assert record.metrics["parity_status"] == "pass"
            assert record.metrics["parity_latent_rel_err"] <= 1e-4
    # two nets cost more of the step than one
    for backend in ("original", "diffusers"):
        one = by_id[f"{backend}"].metrics["controlnet_s"]
        two = by_id[f"{backend}-cn-canny@1+depth@0.5"].metrics["controlnet_s"]
        assert two > one


@pytest.mark.slow
def test_controlnet_scenario_and_its_report(tmp_path: Path) -> None:
    """``scenarios/controlnet.yaml`` through ``python -m harness run``: every cell but
    diffusers' prompt mode (unsupported, with the reason) is ok with its checks passing;
    balanced cells agree across backends; the report shows the ControlNet column."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "harness", "run", "scenarios/controlnet.yaml",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 15
    for record in records:
        cell, metrics = record["cell"], record["metrics"]
        if cell["backend"] == "diffusers" and cell["control_mode"] == "prompt":
            assert record["status"] == "unsupported" and "soft injection" in record["reason"]
            continue
        assert record["status"] == "ok", record["reason"]
        checks = {n: c["status"] for n, c in metrics["check_results"].items() if n != "parity"}
        assert set(checks.values()) == {"pass"}, (cell["id"], checks)
        if cell["backend"] == "diffusers":
            # guess mode: diffusers scales residual i by 10^(-1 + i/(K-1)), A1111 by
            # 0.825^(K-1-i): a real difference the parity shows
            expected = "differs" if cell["control_mode"] == "controlnet" else "pass"
            assert metrics["parity_status"] == expected, cell["id"]
            if expected == "pass":
                assert metrics["parity_latent_rel_err"] <= 1e-4, cell["id"]
    report = tmp_path / "report.md"
    subprocess.run([sys.executable, "-m", "harness", "report", str(out), "--format", "md",
                    "-o", str(report)], cwd=ROOT, check=True, capture_output=True)
    text = report.read_text()
    assert "ControlNet share of denoise (batch 1)" in text


def test_scale0_check_fails_when_the_control_leaks(tmp_path: Path) -> None:
    """The scale-0 check is not vacuous: a session that ignores the scale fails it."""
    from harness.conformance import CheckContext, check_controlnet_scale0

    class Leaky(Session):
        def generate(self, request: Request, timer: GenerationTimer) -> Output:
            shift = 1.0 if request.controls else 0.0
            return Output(images=np.zeros((1, 8, 8, 3), np.float32),
                          latents=torch.ones(1, 4, 1, 1) + shift)

    cell = expand(load_scenario(write_scenario(tmp_path, TINY_CONTROLNET)))[0]
    request = request_for(cell, Leaky())
    session = Leaky()
    context = CheckContext(cell, IgnoresControls(), session, request,
                           session.generate(request, None),  # type: ignore[arg-type]
                           torch.device("cpu"),
                           lambda r: session.generate(r, None))  # type: ignore[arg-type]
    assert check_controlnet_scale0(context).status == "fail"
    zero = tuple(dataclasses.replace(ref, scale=0.0) for ref in request.controls)
    assert zero[0].image is request.controls[0].image


@pytest.mark.slow
def test_sd15_controlnet_single_file_loads_strictly_and_is_the_folder() -> None:
    """The sd15 ControlNet (361M parameters, SD 1.5 ControlNet shapes): its single file loads
    strictly into ``cldm``'s architecture, and ``from_single_file`` reads it into exactly the
    folder's tensors."""
    from diffusers import ControlNetModel

    from backends.original.controlnet import load_controlnet
    from backends.original.unet import UNetConfig

    path = extra_file("controlnet", "canny", "sd15-fp16")
    config = UNetConfig.from_ldm(SPECS["sd15"].ldm_config()["unet"])
    net = load_controlnet(path, config, torch.float16, torch.device("cpu"))
    count = sum(p.numel() for p in net.parameters())
    assert len(net.zero_convs) == 12
    del net
    folder = extra_file("controlnet", "canny", "sd15-fp16", layout="folder")
    single = ControlNetModel.from_single_file(
        str(path), config=str(controlnet_config_folder("sd15-fp16")), local_files_only=True,
        torch_dtype=torch.float16,
    ).state_dict()
    reference = ControlNetModel.from_pretrained(
        str(folder), local_files_only=True, torch_dtype=torch.float16).state_dict()
    assert set(single) == set(reference)
    assert all(torch.equal(single[key], reference[key]) for key in reference)
    assert count == sum(value.numel() for value in reference.values()) > 360_000_000
