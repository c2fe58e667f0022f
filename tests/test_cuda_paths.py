"""The code paths that only run on CUDA, tested on the CPU with test doubles of exactly the
``torch.cuda`` calls they make (CUDA-event timing, allocator peaks and retries, device-memory
sampling, OOM handling, offload hooks, compile), so that a renamed field or a wrong unit fails
in CI. The ``gpu``-marked twins at the end run the same paths on a real device.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import backends
from backends.base import Backend, Output, Request, Session
from harness import environment, expand, parse_scenario
from harness.measure import GB, GenerationTimer, MemoryMonitor, Timing
from harness.runner import Runner
from harness.vocabulary import Compile

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- the doubles --------------------------------------------------------------------------


class FakeEvent:
    """``torch.cuda.Event`` on a clock the test moves; ``elapsed_time`` is in milliseconds,
    and only valid once the device was synchronised after both events were recorded."""

    def __init__(self, fake: FakeCuda, enable_timing: bool = False) -> None:
        assert enable_timing, "timing events need enable_timing=True"
        self.fake = fake
        self.at: float | None = None
        self.synced = False

    def record(self, stream: Any = None) -> None:
        self.at = self.fake.now
        self.fake.pending.append(self)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None, "an event was never recorded"
        assert self.synced and end.synced, "elapsed_time before the device was synchronised"
        return (end.at - self.at) * 1000.0


@dataclass
class FakeCuda:
    """The torch.cuda calls of harness.measure and harness.runner, on one fake device."""

    total: int = 80 * GB
    used: int = 1 * GB
    allocated_peak: int = 0
    reserved_peak: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    now: float = 0.0
    pending: list[FakeEvent] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    used_samples: list[int] = field(default_factory=list)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
        environment.collect()  # cached first: the environment of a machine without CUDA
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "Event", lambda **kw: FakeEvent(self, **kw))
        for name in (
            "synchronize",
            "mem_get_info",
            "reset_peak_memory_stats",
            "memory_stats",
            "max_memory_allocated",
            "max_memory_reserved",
            "empty_cache",
        ):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self

    def _device(self, device: Any) -> None:
        assert torch.device(device).type == "cuda", f"a CUDA call for device {device!r}"

    def synchronize(self, device: Any = None) -> None:
        self.calls.append("synchronize")
        if device is not None:
            self._device(device)
        for event in self.pending:
            event.synced = True
        self.pending.clear()

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        self._device(device)
        self.used_samples.append(self.used)
        return self.total - self.used, self.total  # (free, total), bytes

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self._device(device)
        self.calls.append("reset_peak_memory_stats")
        self.allocated_peak = self.reserved_peak = 0

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        self._device(device)
        return dict(self.stats)

    def max_memory_allocated(self, device: Any = None) -> int:
        self._device(device)
        return self.allocated_peak

    def max_memory_reserved(self, device: Any = None) -> int:
        self._device(device)
        return self.reserved_peak

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCuda]:
    fake = FakeCuda().install(monkeypatch)
    CURRENT.append(fake)
    yield fake
    CURRENT.clear()


#: The installed :class:`FakeCuda`, for backends that note in its call log when they fail.
CURRENT: list[FakeCuda] = []


@dataclass
class Moves:
    """A double of ``nn.Module.to``: moves to CUDA are recorded, not made (the CPU keeps the
    weights); moves elsewhere are recorded and made."""

    log: list[tuple[torch.nn.Module, str]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Moves:
        real = torch.nn.Module.to

        def to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                self.log.append((module, device.type))
                if device.type == "cuda":
                    return module
            return real(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)
        return self

    def since(self, mark: int) -> list[tuple[torch.nn.Module, str]]:
        return self.log[mark:]


# --- CUDA-event timing --------------------------------------------------------------------


def test_cuda_event_timing_is_in_seconds(fake_cuda: FakeCuda) -> None:
    with GenerationTimer(CUDA) as timer:
        with timer.phase("encode"):
            fake_cuda.advance(0.1)
        with timer.phase("denoise"):
            for _ in range(3):
                fake_cuda.advance(0.2)
                timer.step()
        with timer.phase("decode"):
            fake_cuda.advance(0.05)
    timing = Timing.from_timer(timer)
    assert timing.wall == pytest.approx(0.75)  # seconds: elapsed_time's 750 ms / 1000
    assert timing.encode == pytest.approx(0.1) and timing.decode == pytest.approx(0.05)
    assert timing.steps == pytest.approx((0.2, 0.2, 0.2))
    assert timing.denoise == pytest.approx(0.6)
    assert fake_cuda.calls == ["synchronize", "synchronize"]  # at both ends


def _measure_memory(fake: FakeCuda) -> Any:
    with MemoryMonitor(CUDA, interval=0.002) as monitor:
        fake.used = 7 * GB
        deadline = time.monotonic() + 5
        while 7 * GB not in fake.used_samples and time.monotonic() < deadline:
            time.sleep(0.002)
        fake.used = 2 * GB
        fake.allocated_peak, fake.reserved_peak = 3 * GB, 4 * GB
        fake.stats = {"num_alloc_retries": 2, "num_ooms": 1}
    return monitor.peaks()


def test_gpu_peaks_are_gigabytes_from_the_allocator_and_the_sampler(fake_cuda: FakeCuda) -> None:
    fake_cuda.allocated_peak = 5 * GB  # left over from an earlier cell: reset at the start
    peaks = _measure_memory(fake_cuda)
    assert fake_cuda.calls[0] == "reset_peak_memory_stats"
    assert peaks.gpu_allocated_peak_gb == 3.0
    assert peaks.gpu_reserved_peak_gb == 4.0
    assert peaks.gpu_device_used_peak_gb == 7.0  # total - free at its highest sample
    assert (peaks.gpu_alloc_retries, peaks.gpu_ooms) == (2, 1)


# --- OOM handling -------------------------------------------------------------------------


class _Session(Session):
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        with timer.phase("encode"):
            pass
        CURRENT[0].calls.append("oom")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class OomBackend(Backend):
    """Runs out of device memory in every generation (with seed 1: while loading)."""

    name = "oom"

    def load(self, cell: Any, model: Any, device: torch.device) -> Session:
        assert device.type == "cuda"
        if cell.seed == 1:
            CURRENT[0].calls.append("oom")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return _Session()


def _cuda_cells(seed: int = 0) -> list[Any]:
    data = {
        "name": "oom",
        "repeats": 1,
        "warmup": 0,
        "matrix": {"model": "tiny", "device": "cuda", "resolution": 64, "steps": 2,
                   "seed": seed, "batch": [1, 2]},
    }
    return [dataclasses.replace(cell, backend="oom") for cell in expand(parse_scenario(data, "oom.yaml"))]


@pytest.fixture
def oom_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(backends.REGISTRY, "oom", f"{__name__}:OomBackend")


@pytest.mark.usefixtures("oom_backend")
@pytest.mark.parametrize("at_load", [False, True], ids=["in-generation", "at-load"])
def test_out_of_memory_is_recorded_as_oom(fake_cuda: FakeCuda, at_load: bool) -> None:
    results = Runner(progress=False, isolate="none").run(_cuda_cells(seed=1 if at_load else 0))
    assert [r.status for r in results] == ["oom", "oom"]  # and the run went on
    reason = results[0].reason or ""
    assert ("load failed: " if at_load else "") + "OutOfMemoryError: CUDA out of memory" in reason
    assert results[0].error_type == "OutOfMemoryError"
    if not at_load:  # the allocator's cache is released after the OOM, before the next cell
        after = fake_cuda.calls[fake_cuda.calls.index("oom") + 1:]
        assert "empty_cache" in after[: after.index("oom")], fake_cuda.calls


# --- offload hooks ------------------------------------------------------------------------


@pytest.fixture
def tiny_ldm() -> Any:
    from backends.original.checkpoint import load_latent_diffusion
    from models import resolve

    model = resolve("tiny", "safetensors")
    return load_latent_diffusion(model.path, spec_name="tiny", config_dir=model.config_dir)


def _run_parts(ldm: Any) -> None:
    """One forward of each sub-model, on the CPU: the text encoder, the UNet, the VAE."""
    ldm.cond_stage_model.transformer(input_ids=torch.tensor([[1, 2, 3]]))
    context = torch.zeros(1, 77, ldm.unet.config.context_dim)
    ldm.model.diffusion_model(torch.zeros(1, 4, 8, 8), torch.tensor([10]), context)
    ldm.decode_first_stage(torch.zeros(1, 4, 8, 8))


def test_medvram_keeps_one_sub_model_on_the_gpu(
    monkeypatch: pytest.MonkeyPatch, tiny_ldm: Any
) -> None:
    from backends.original.memory import place

    moves = Moves().install(monkeypatch)
    text, unet, vae = (tiny_ldm.cond_stage_model.transformer, tiny_ldm.model.diffusion_model,
                       tiny_ldm.first_stage_model)
    swapper = place(tiny_ldm, CUDA, "medvram")
    assert (tiny_ldm, "cuda") in moves.log  # the rest lives on the GPU …
    assert {(m, d) for m, d in moves.log if m in (text, unet, vae)} == {
        (text, "cpu"), (unet, "cpu"), (vae, "cpu")}  # … the sub-models wait on the CPU
    mark = len(moves.log)
    _run_parts(tiny_ldm)
    assert moves.since(mark) == [
        (text, "cuda"),
        (text, "cpu"), (unet, "cuda"),
        (unet, "cpu"), (vae, "cuda"),
    ]
    assert swapper is not None and swapper.in_gpu is vae
    swapper.remove()
    assert moves.log[-1] == (vae, "cpu") and swapper.in_gpu is None


def test_medvram_moves_sdxls_conditioner_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """As A1111 does: SDXL's two text encoders go to the GPU together, once per prompt
    encoding, not in turn for each."""
    from backends.original.checkpoint import load_latent_diffusion
    from backends.original.memory import place
    from models import resolve

    model = resolve("tiny-sdxl", "safetensors")
    ldm = load_latent_diffusion(model.path, spec_name=None, config_dir=model.config_dir)
    moves = Moves().install(monkeypatch)
    clip, openclip = (part.encoder for part in ldm.text.parts())
    unet = ldm.model.diffusion_model
    swapper = place(ldm, CUDA, "medvram")
    assert (ldm.conditioner, "cpu") in moves.log and (clip, "cpu") not in moves.log
    mark = len(moves.log)
    ids = torch.tensor([[1, 2, 3] + [0] * 74])  # OpenCLIP's positions are all 77
    clip(input_ids=ids)
    openclip(ids)
    clip(input_ids=ids)
    cond = {"crossattn": torch.zeros(1, 77, unet.config.context_dim),
            "vector": torch.zeros(1, unet.config.adm_in_channels)}
    unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]), cond)
    assert moves.since(mark) == [
        (ldm.conditioner, "cuda"), (ldm.conditioner, "cpu"), (unet, "cuda")]
    assert swapper is not None
    swapper.remove()


def test_lowvram_moves_each_unet_block_for_its_own_forward(
    monkeypatch: pytest.MonkeyPatch, tiny_ldm: Any
) -> None:
    from backends.original.memory import place

    moves = Moves().install(monkeypatch)
    unet = tiny_ldm.model.diffusion_model
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    place(tiny_ldm, CUDA, "lowvram")
    assert all((block, "cpu") in moves.log for block in blocks)
    assert (unet, "cuda") not in moves.log  # the UNet itself is not moved whole
    mark = len(moves.log)
    _run_parts(tiny_ldm)
    to_gpu = [m for m, d in moves.since(mark) if d == "cuda"]
    assert to_gpu[1:-1] == blocks  # in execution order, between the text encoder and the VAE
    on_gpu: set[torch.nn.Module] = set()
    for module, device in moves.since(mark):
        (on_gpu.add if device == "cuda" else on_gpu.discard)(module)
        assert len(on_gpu) <= 1, "two swapped modules on the GPU at once"


@pytest.mark.parametrize("offload", ["medvram", "lowvram"])
def test_controlnets_are_swapped_whole_under_offload(
    monkeypatch: pytest.MonkeyPatch, tiny_ldm: Any, offload: str
) -> None:
    """Under medvram / lowvram the session registers each ControlNet with the swapper: it
    waits on the CPU and is the one module on the GPU while it runs."""
    from backends.original.backend import OriginalSession
    from backends.original.memory import place
    from models import extra_file

    moves = Moves().install(monkeypatch)
    session = OriginalSession.__new__(OriginalSession)  # only what _controlnet reads
    session.ldm, session.device, session._dtype = tiny_ldm, CUDA, torch.float32
    session.swapper, session._controlnets = place(tiny_ldm, CUDA, offload), {}
    path = extra_file("controlnet", "canny", "tiny")
    net = session._controlnet(path, path)
    assert session._controlnet(path, path) is net  # loaded once per session
    assert moves.log[-1] == (net, "cpu")
    _run_parts(tiny_ldm)
    mark = len(moves.log)
    context = torch.zeros(1, 77, tiny_ldm.unet.config.context_dim)
    net(torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 64, 64), torch.tensor([10]), context)
    assert moves.since(mark) == [(tiny_ldm.first_stage_model, "cpu"), (net, "cuda")]
    assert session.swapper is not None and session.swapper.in_gpu is net


@pytest.mark.parametrize(("offload", "call"), [
    ("none", "to"),
    ("medvram", "enable_model_cpu_offload"),
    ("lowvram", "enable_sequential_cpu_offload"),
])
def test_diffusers_offload_modes_call_their_diffusers_method(
    monkeypatch: pytest.MonkeyPatch, fake_cuda: FakeCuda, offload: str, call: str
) -> None:
    from diffusers import StableDiffusionPipeline

    from backends.diffusers_backend import DiffusersBackend
    from models import resolve

    called: list[tuple[str, Any]] = []
    for name in ("to", "enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        monkeypatch.setattr(
            StableDiffusionPipeline, name,
            lambda pipe, *args, name=name, **kwargs: called.append((name, (args, kwargs))) or pipe,
        )
    cell = dataclasses.replace(_cuda_cells()[0], backend="diffusers", offload=offload)
    backend = DiffusersBackend()
    assert backend.unsupported(cell, CUDA) is None
    if offload != "none":
        assert "needs a CUDA device" in (backend.unsupported(cell, torch.device("cpu")) or "")
    backend.load(cell, resolve("tiny", "hub"), CUDA)
    assert [name for name, _ in called] == [call]
    args, kwargs = called[0][1]
    assert CUDA in args or kwargs.get("device") == CUDA


@pytest.mark.parametrize(("model", "offload", "call"), [  # each family, each offload method
    ("tiny-kandinsky22", "medvram", "enable_model_cpu_offload"),
    ("tiny-deepfloyd-if", "lowvram", "enable_sequential_cpu_offload"),
])
def test_staged_offload_modes_call_their_diffusers_method_on_every_stage(
    monkeypatch: pytest.MonkeyPatch, fake_cuda: FakeCuda, model: str, offload: str, call: str
) -> None:
    from diffusers import DiffusionPipeline

    from backends.diffusers_backend import DiffusersBackend
    from models import resolve

    called: list[tuple[str, str, Any]] = []
    for name in ("to", "enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        monkeypatch.setattr(
            DiffusionPipeline, name,
            lambda pipe, *args, name=name, **kwargs: called.append(
                (name, type(pipe).__name__, (args, kwargs))) or pipe,
        )
    cell = dataclasses.replace(_cuda_cells()[0], backend="diffusers", offload=offload,
                               model=model, source="hub", sampler="ddpm")
    backend = DiffusersBackend()
    assert backend.unsupported(cell, CUDA) is None
    if offload != "none":
        assert "needs a CUDA device" in (backend.unsupported(cell, torch.device("cpu")) or "")
    backend.load(cell, resolve(model, "hub"), CUDA)
    pipelines = (["KandinskyV22PriorPipeline", "KandinskyV22Pipeline"] if "kandinsky" in model
                 else ["IFPipeline", "IFSuperResolutionPipeline"])
    assert [(name, pipe) for name, pipe, _ in called] == [(call, p) for p in pipelines]
    for _, _, (args, kwargs) in called:
        assert CUDA in args or kwargs.get("device") == CUDA


# --- compile ------------------------------------------------------------------------------


COMPILE_VALUES = [value for value in typing.get_args(Compile) if value != "none"]


@pytest.fixture
def compile_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_compile(model: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def _valid_mode(mode: str | None) -> None:
    torch._inductor.list_mode_options(mode)  # raises for a mode torch.compile would refuse


@pytest.mark.parametrize("value", COMPILE_VALUES)
def test_original_compile_modes_reach_torch_compile(
    monkeypatch: pytest.MonkeyPatch, fake_cuda: FakeCuda, compile_calls: list[dict[str, Any]],
    value: str,
) -> None:
    from backends.original import OriginalBackend
    from models import resolve

    Moves().install(monkeypatch)
    cell = dataclasses.replace(_cuda_cells()[0], backend="original", source="safetensors",
                               compile=value, fullgraph=True)
    backend = OriginalBackend()
    assert backend.unsupported(cell, CUDA) is None
    backend.load(cell, resolve("tiny", "safetensors"), CUDA)
    assert len(compile_calls) == 1 and compile_calls[0]["fullgraph"] is True
    _valid_mode(compile_calls[0]["mode"])
    if value == "reduce-overhead":
        assert "CUDA" in (backend.unsupported(cell, torch.device("cpu")) or "")
    offloaded = dataclasses.replace(cell, offload="medvram")
    assert "offload" in (backend.unsupported(offloaded, CUDA) or "")


@pytest.mark.parametrize("value", COMPILE_VALUES)
def test_diffusers_compile_modes_reach_torch_compile(
    monkeypatch: pytest.MonkeyPatch, fake_cuda: FakeCuda, compile_calls: list[dict[str, Any]],
    value: str,
) -> None:
    from diffusers import StableDiffusionPipeline

    from backends.diffusers_backend import DiffusersBackend
    from models import resolve

    monkeypatch.setattr(StableDiffusionPipeline, "to", lambda pipe, *a, **k: pipe)
    cell = dataclasses.replace(_cuda_cells()[0], backend="diffusers", compile=value)
    session: Any = DiffusersBackend().load(cell, resolve("tiny", "hub"), CUDA)
    assert len(compile_calls) == 1 and compile_calls[0]["fullgraph"] is False
    _valid_mode(compile_calls[0]["mode"])
    assert session.pipe.unet is not None


# --- the real twins -----------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_real_cuda_events_agree_with_the_host_clock() -> None:
    x = torch.randn(4096, 4096, device=CUDA)
    start = time.perf_counter()
    with GenerationTimer(CUDA) as timer:
        with timer.phase("denoise"):
            for _ in range(5):
                x = (x @ x).tanh_()
                timer.step()
    host = time.perf_counter() - start
    timing = Timing.from_timer(timer)
    assert 0 < timing.wall <= host * 1.05 and timing.wall > host * 0.5
    assert sum(timing.steps) == pytest.approx(timing.denoise, rel=0.05)


@pytest.mark.gpu
@needs_cuda
def test_real_gpu_memory_peaks_see_an_allocation() -> None:
    with MemoryMonitor(CUDA, interval=0.005) as monitor:
        block = torch.empty(GB, dtype=torch.uint8, device=CUDA)  # 1 GB
        time.sleep(0.05)
        del block
    peaks = monitor.peaks()
    assert peaks.gpu_allocated_peak_gb is not None and peaks.gpu_allocated_peak_gb >= 1.0
    assert peaks.gpu_reserved_peak_gb is not None and peaks.gpu_reserved_peak_gb >= 1.0
    assert peaks.gpu_device_used_peak_gb is not None and peaks.gpu_device_used_peak_gb >= 1.0
    assert isinstance(peaks.gpu_alloc_retries, int) and isinstance(peaks.gpu_ooms, int)


class RealOomSession(Session):
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.empty(2 * total, dtype=torch.uint8, device=CUDA)
        raise AssertionError("allocated twice the device's memory")


class RealOomBackend(Backend):
    name = "real-oom"

    def load(self, cell: Any, model: Any, device: torch.device) -> Session:
        return RealOomSession()


@pytest.mark.gpu
@needs_cuda
def test_real_out_of_memory_is_recorded_as_oom(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(backends.REGISTRY, "real-oom", f"{__name__}:RealOomBackend")
    cells = [dataclasses.replace(c, backend="real-oom") for c in _cuda_cells()]
    results = Runner(tmp_path, progress=False).run(cells)
    assert [r.status for r in results] == ["oom", "oom"]
    assert (results[0].metrics or {}) == {}
    assert torch.cuda.memory_allocated() < GB  # nothing left behind


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("offload", ["medvram", "lowvram"])
def test_real_diffusers_offload_matches_no_offload(offload: str) -> None:
    from backends.diffusers_backend import DiffusersBackend
    from harness.execute import request_for
    from models import resolve

    latents = []
    for mode in ("none", offload):
        cell = dataclasses.replace(_cuda_cells()[0], backend="diffusers", dtype="fp16",
                                   offload=mode)
        session = DiffusersBackend().load(cell, resolve("tiny", "hub"), CUDA)
        with GenerationTimer(CUDA) as timer:
            latents.append(session.generate(request_for(cell, session), timer).latents.float())
        session.close()
    assert torch.isfinite(latents[1]).all()
    assert torch.allclose(latents[0], latents[1], rtol=1e-3, atol=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["tiny-kandinsky22", "tiny-deepfloyd-if"])
@pytest.mark.parametrize("offload", ["medvram", "lowvram"])
def test_real_staged_offload_matches_no_offload(model: str, offload: str) -> None:
    """Every stage offloaded gives the chain's images without offload (the dev log's "Cannot
    copy out of meta tensor" under sequential offload would fail it)."""
    from backends.diffusers_backend import DiffusersBackend
    from harness.execute import request_for
    from models import resolve

    images = []
    for mode in ("none", offload):
        cell = dataclasses.replace(_cuda_cells()[0], backend="diffusers", dtype="fp16",
                                   offload=mode, model=model, source="hub", sampler="ddpm",
                                   guidance=4.0)
        session = DiffusersBackend().load(cell, resolve(model, "hub"), CUDA)
        with GenerationTimer(CUDA) as timer:
            images.append(session.generate(request_for(cell, session), timer).images)
        session.close()
    assert np.isfinite(images[1]).all()
    assert np.allclose(images[0], images[1], atol=2e-2)


@pytest.mark.gpu
@pytest.mark.slow  # compiles: scripts/gpu-check.sh runs `gpu and not slow`, then its compile cells
@needs_cuda
@pytest.mark.parametrize(("backend", "source"), [("original", "safetensors"),
                                                 ("diffusers", "hub")])
def test_real_compile_default_runs(tmp_path: Path, backend: str, source: str) -> None:
    cell = dataclasses.replace(_cuda_cells()[0], backend=backend, source=source,
                               compile="default")
    result = Runner(tmp_path, progress=False).run([cell])[0]
    assert result.status == "ok", result.reason
