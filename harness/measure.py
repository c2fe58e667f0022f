"""Measurement: phase and step timing, CPU and GPU memory, derived figures.

Definitions (DESIGN.md, the contract with users):

- **it/s** = ``batch × steps / wall`` where wall is one whole generation (prompt encoding +
  denoising + VAE decode), the device synchronised at both ends.
- **denoise it/s** = ``batch × steps / denoise time``.
- **step latency**: each denoising step's time from device events (CUDA events on a GPU,
  ``perf_counter`` on the CPU), all steps of every timed repeat; median and spread.
- **memory cpu**: peak resident set size of this process during the cell, the larger of a
  ≈10 ms sampler and the OS high-water mark (``VmHWM``, reset per cell where Linux allows;
  there it is exact and covers every sample, so on the CPU the sampler runs only where the
  reset is refused).
- **memory gpu**: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after a
  reset, and device-level used memory (``torch.cuda.mem_get_info``, includes the CUDA
  context) sampled during the cell; allocator retries and OOM count.
- **memory above the baseline**: a :class:`Baseline` is taken in the measuring process after
  its imports and before the model loads; ``cpu_model_gb`` is the CPU peak less its RSS, and
  ``gpu_process_used_peak_gb`` the device memory of this process alone (NVML's per-process
  figure where NVML lists this process, else device used less device used at the baseline).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

GB = 1024**3
PHASES: tuple[str, ...] = ("encode", "denoise", "decode")
#: Parts of the denoising steps timed apart (their summed time per generation): the
#: ControlNets' forwards, what the add-on costs.
PARTS: tuple[str, ...] = ("controlnet",)


class CellTimeout(Exception):
    """Raised from a step callback when the cell's time budget is spent."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """A point in time on the device: a CUDA event, or the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.device.type == "cuda":
            return float(start.elapsed_time(end)) / 1000.0
        return float(end - start)


class GenerationTimer:
    """Timing of one generation, driven by the backend.

    A backend wraps its three phases in :meth:`phase` and calls :meth:`step` at the end of
    every denoising step (a k-diffusion style callback). The first step is timed from the
    start of the ``denoise`` phase. ``deadline`` (host clock) makes :meth:`step` raise
    :class:`CellTimeout` so a runaway cell stops between steps.
    """

    def __init__(self, device: torch.device, deadline: float | None = None) -> None:
        self._clock = _Clock(device)
        self.device = device
        self.deadline = deadline
        self._phase_marks: dict[str, tuple[Any, Any]] = {}
        self._open: dict[str, Any] = {}
        #: Runs of step marks, each from its denoising start: one per generation, or one per
        #: stage of a multi-stage model (:meth:`begin_stage`, :meth:`restart_steps`).
        self._step_runs: list[tuple[str | None, list[Any]]] = []
        self._stage: str | None = None
        self._stage_marks: dict[str, tuple[Any, Any]] = {}
        self._stage_open: dict[str, Any] = {}
        self._part_marks: dict[str, list[tuple[Any, Any]]] = {}
        self._part_open: dict[str, Any] = {}
        self._start: Any = None
        self._end: Any = None

    def __enter__(self) -> GenerationTimer:
        synchronize(self.device)
        self._start = self._clock.mark()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = self._clock.mark()
        synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (encode, denoise or decode)."""
        self.begin(name)
        yield
        self.end(name)

    def begin(self, name: str) -> None:
        """Start phase ``name``; for code whose phases are split by callbacks."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        start = self._clock.mark()
        if name == "denoise":
            self._step_runs = [(self._stage, [start])]
        self._open[name] = start

    def end(self, name: str) -> None:
        """End phase ``name`` (started with :meth:`begin`)."""
        start = self._open.pop(name)
        self._phase_marks[name] = (start, self._clock.mark())

    def begin_stage(self, name: str) -> None:
        """Start stage ``name`` of a multi-stage model (Kandinsky's prior, IF's stage II…):
        its whole pipeline call, conditioning and (for the last stage) decode included."""
        self._stage = name
        self._stage_open[name] = self._clock.mark()

    def end_stage(self, name: str) -> None:
        """End stage ``name`` (started with :meth:`begin_stage`)."""
        start = self._stage_open.pop(name)
        self._stage_marks[name] = (start, self._clock.mark())
        self._stage = None

    def restart_steps(self) -> None:
        """A later stage's denoising starts now: its first step is timed from here, not from
        the previous stage's last step (the first stage's starts with ``begin("denoise")``)."""
        self._step_runs.append((self._stage, [self._clock.mark()]))

    def begin_part(self, name: str) -> None:
        """Start a timed part of a step (:data:`PARTS`, e.g. a ControlNet's forward)."""
        if name not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {name!r}")
        self._part_open[name] = self._clock.mark()

    def end_part(self, name: str) -> None:
        """End the part started with :meth:`begin_part`; the times of a part add up."""
        start = self._part_open.pop(name)
        self._part_marks.setdefault(name, []).append((start, self._clock.mark()))

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the block as part ``name`` of the step it runs in."""
        self.begin_part(name)
        yield
        self.end_part(name)

    def part_s(self, name: str) -> float | None:
        """The summed time of part ``name`` in this generation; None if it never ran."""
        marks = self._part_marks.get(name)
        return None if marks is None else sum(self._clock.seconds(a, b) for a, b in marks)

    def step(self, *_args: Any, **_kwargs: Any) -> None:
        """Mark the end of a denoising step; accepts and ignores callback arguments."""
        self._step_runs[-1][1].append(self._clock.mark())
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise CellTimeout("cell exceeded its timeout_s")

    def wall_s(self) -> float:
        return self._clock.seconds(self._start, self._end)

    def phase_s(self, name: str) -> float | None:
        marks = self._phase_marks.get(name)
        return None if marks is None else self._clock.seconds(*marks)

    def step_s(self, stage: str | None = None) -> list[float]:
        """Every step's time, in order; ``stage``: that stage's steps only."""
        return [
            self._clock.seconds(a, b)
            for run_stage, marks in self._step_runs
            if stage is None or run_stage == stage
            for a, b in zip(marks, marks[1:], strict=False)
        ]

    def stages(self) -> dict[str, StageTiming]:
        """Each stage's times, in the order the stages ran (empty for a one-stage model)."""
        found: dict[str, StageTiming] = {}
        for name, (start, end) in self._stage_marks.items():
            runs = [marks for run_stage, marks in self._step_runs if run_stage == name]
            denoise = sum(self._clock.seconds(m[0], m[-1]) for m in runs if len(m) > 1)
            found[name] = StageTiming(wall=self._clock.seconds(start, end), denoise=denoise,
                                      steps=tuple(self.step_s(name)))
        return found


@dataclass(frozen=True)
class StageTiming:
    """One stage's times in one generation, seconds: its whole call, its denoising (first
    step's start to last step's end) and each of its steps."""

    wall: float
    denoise: float
    steps: tuple[float, ...]


@dataclass(frozen=True)
class Timing:
    """One generation's times, seconds."""

    wall: float
    encode: float | None
    denoise: float | None
    decode: float | None
    steps: tuple[float, ...]
    #: Part name -> its summed time in this generation (:data:`PARTS` that ran).
    parts: dict[str, float] = field(default_factory=dict)
    #: Stage name -> its times, for a multi-stage model (Kandinsky, DeepFloyd IF).
    stages: dict[str, StageTiming] = field(default_factory=dict)

    @classmethod
    def from_timer(cls, timer: GenerationTimer) -> Timing:
        parts = {name: timer.part_s(name) for name in PARTS}
        return cls(
            wall=timer.wall_s(),
            encode=timer.phase_s("encode"),
            denoise=timer.phase_s("denoise"),
            decode=timer.phase_s("decode"),
            steps=tuple(timer.step_s()),
            parts={name: value for name, value in parts.items() if value is not None},
            stages=timer.stages(),
        )

    @property
    def stage_steps(self) -> int:
        """Steps over all stages (0 for a one-stage model)."""
        return sum(len(stage.steps) for stage in self.stages.values())


# --- memory -------------------------------------------------------------------------------


def _reset_os_peak() -> bool:
    """Reset this process's ``VmHWM`` (Linux ``clear_refs`` value 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _os_peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class MemoryPeaks:
    cpu_rss_sampled_gb: float
    cpu_rss_os_peak_gb: float | None
    gpu_allocated_peak_gb: float | None = None
    gpu_reserved_peak_gb: float | None = None
    gpu_device_used_peak_gb: float | None = None
    gpu_alloc_retries: int | None = None
    gpu_ooms: int | None = None
    gpu_process_used_peak_gb: float | None = None
    #: Where ``gpu_process_used_peak_gb`` came from: ``nvml`` or ``mem_get_info``.
    gpu_process_used_source: str | None = None

    @property
    def cpu_peak_gb(self) -> float:
        """The table's memory cpu: the larger of the sampled and the OS peak."""
        return max(self.cpu_rss_sampled_gb, self.cpu_rss_os_peak_gb or 0.0)


@dataclass(frozen=True)
class Baseline:
    """The measuring process before a load: its RSS and the device's used memory."""

    cpu_rss_gb: float
    gpu_device_used_gb: float | None = None

    @classmethod
    def take(cls, device: torch.device) -> Baseline:
        rss = psutil.Process().memory_info().rss / GB
        if device.type != "cuda":
            return cls(rss)
        free, total = torch.cuda.mem_get_info(device)
        return cls(rss, (total - free) / GB)


class ProcessGpuMemory:
    """Device memory used by this process alone.

    NVML's per-process figure (``nvmlDeviceGetComputeRunningProcesses``, which includes the
    CUDA context) where NVML answers and lists this process; inside a container whose PIDs
    NVML cannot see, or without NVML, the device's used memory less the ``baseline`` one.
    """

    def __init__(self, device: torch.device, baseline_used_gb: float | None) -> None:
        self.device = device
        self.baseline_used = int((baseline_used_gb or 0.0) * GB)
        self._handle = _nvml_handle(device)
        self.source = "nvml" if self._handle is not None and self._nvml_used() else "mem_get_info"

    def _nvml_used(self) -> int | None:
        import pynvml

        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except pynvml.NVMLError:
            return None
        pid = os.getpid()
        for process in processes:
            if process.pid == pid and isinstance(process.usedGpuMemory, int):
                return int(process.usedGpuMemory)
        return None

    def used(self, device_used: int) -> int:
        """Bytes used by this process, given the device's used bytes sampled now."""
        if self.source == "nvml":
            found = self._nvml_used()
            if found is not None:
                return found
        return max(0, device_used - self.baseline_used)


def _nvml_handle(device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device (matched by UUID), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - no NVML here (not installed, no driver): fall back
        return None


class MemoryMonitor:
    """The peaks of one region: RSS, the OS high-water mark and the GPU's figures.

    A thread samples every ``interval`` seconds only where a peak needs it: on a GPU, for the
    device's used memory (which nothing else records), and on the CPU where the OS
    high-water mark cannot be reset. Where it can (Linux), ``VmHWM`` is exact and never below
    any sample, so the CPU's RSS is read at the region's ends only and no thread shares the
    cores with the generation (what a 10 ms sampler cost: docs/performance.md).
    With a :class:`Baseline` the peaks also say how much is this process's own GPU memory.
    """

    def __init__(
        self, device: torch.device, interval: float = 0.01, baseline: Baseline | None = None
    ) -> None:
        self.device = device
        self.interval = interval
        self.baseline = baseline
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rss_peak = 0
        self._device_used_peak = 0
        self._process_used_peak = 0
        self._process_gpu: ProcessGpuMemory | None = None
        self._os_peak_reset = False

    @property
    def sampling(self) -> bool:
        """Whether a sampler thread runs beside the region."""
        return self._thread is not None

    def _sample(self) -> None:
        self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self._device_used_peak = max(self._device_used_peak, total - free)
            if self._process_gpu is not None:
                used = self._process_gpu.used(total - free)
                self._process_used_peak = max(self._process_used_peak, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemoryMonitor:
        self._os_peak_reset = _reset_os_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.baseline is not None:
                self._process_gpu = ProcessGpuMemory(
                    self.device, self.baseline.gpu_device_used_gb
                )
        self._sample()
        if self.device.type == "cuda" or not self._os_peak_reset:
            self._thread = threading.Thread(
                target=self._loop, name="sdbench-memory", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def peaks(self) -> MemoryPeaks:
        os_peak = _os_peak_bytes() if self._os_peak_reset else None
        peaks = MemoryPeaks(
            cpu_rss_sampled_gb=self._rss_peak / GB,
            cpu_rss_os_peak_gb=None if os_peak is None else os_peak / GB,
        )
        if self.device.type != "cuda":
            return peaks
        stats = torch.cuda.memory_stats(self.device)
        process = self._process_gpu
        return MemoryPeaks(
            cpu_rss_sampled_gb=peaks.cpu_rss_sampled_gb,
            cpu_rss_os_peak_gb=peaks.cpu_rss_os_peak_gb,
            gpu_allocated_peak_gb=torch.cuda.max_memory_allocated(self.device) / GB,
            gpu_reserved_peak_gb=torch.cuda.max_memory_reserved(self.device) / GB,
            gpu_device_used_peak_gb=self._device_used_peak / GB,
            gpu_alloc_retries=int(stats.get("num_alloc_retries", 0)),
            gpu_ooms=int(stats.get("num_ooms", 0)),
            gpu_process_used_peak_gb=None if process is None else self._process_used_peak / GB,
            gpu_process_used_source=None if process is None else process.source,
        )


# --- derived figures ----------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """Everything measured for one cell, raw repeats first, then derived figures."""

    batch: int
    steps: int
    wall_s: tuple[float, ...]
    encode_s: tuple[float, ...]
    denoise_s: tuple[float, ...]
    decode_s: tuple[float, ...]
    step_s: tuple[float, ...]
    first_call_s: float
    load_s: float
    memory: MemoryPeaks
    load_memory: MemoryPeaks | None = None
    baseline: Baseline | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Part name -> its time per timed repeat (only parts that ran in every repeat).
    parts_s: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: Stage name -> its times per timed repeat (multi-stage models), in running order.
    stages: dict[str, tuple[StageTiming, ...]] = field(default_factory=dict)

    @classmethod
    def from_timings(
        cls,
        *,
        batch: int,
        steps: int,
        timings: list[Timing],
        first_call_s: float,
        load_s: float,
        memory: MemoryPeaks,
        load_memory: MemoryPeaks | None = None,
        baseline: Baseline | None = None,
    ) -> Measurement:
        if not timings:
            raise ValueError("a measurement needs at least one timed repeat")
        return cls(
            batch=batch,
            steps=steps,
            wall_s=tuple(t.wall for t in timings),
            encode_s=tuple(t.encode or 0.0 for t in timings),
            denoise_s=tuple(t.denoise or 0.0 for t in timings),
            decode_s=tuple(t.decode or 0.0 for t in timings),
            step_s=tuple(s for t in timings for s in t.steps),
            first_call_s=first_call_s,
            load_s=load_s,
            memory=memory,
            load_memory=load_memory,
            baseline=baseline,
            parts_s={
                name: tuple(t.parts[name] for t in timings)
                for name in PARTS
                if all(name in t.parts for t in timings)
            },
            stages={
                name: tuple(t.stages[name] for t in timings)
                for name in timings[0].stages
                if all(name in t.stages for t in timings)
            },
        )

    @property
    def its_repeats(self) -> list[float]:
        return [self.batch * self.steps / wall for wall in self.wall_s]

    @property
    def denoise_its_repeats(self) -> list[float]:
        return [self.batch * self.steps / t for t in self.denoise_s if t > 0]

    def summary(self) -> dict[str, Any]:
        """Flat figures for the results store (see docs/results.md for each column)."""
        its = self.its_repeats
        denoise = self.denoise_its_repeats
        steps_ms = [s * 1000 for s in self.step_s]
        mean_its = statistics.fmean(its)
        row: dict[str, Any] = {
            "its": statistics.median(its),
            "its_min": min(its),
            "its_max": max(its),
            "its_cv": statistics.pstdev(its) / mean_its if len(its) > 1 and mean_its else 0.0,
            "its_repeats": its,
            "denoise_its": statistics.median(denoise) if denoise else None,
            "denoise_its_repeats": denoise,
            "wall_s": statistics.median(self.wall_s),
            "wall_s_repeats": list(self.wall_s),
            "encode_s": statistics.median(self.encode_s),
            "denoise_s": statistics.median(self.denoise_s),
            "decode_s": statistics.median(self.decode_s),
            "step_ms_median": statistics.median(steps_ms) if steps_ms else None,
            "step_ms_p10": _quantile(steps_ms, 0.10),
            "step_ms_p90": _quantile(steps_ms, 0.90),
            "step_ms_min": min(steps_ms) if steps_ms else None,
            "step_ms_max": max(steps_ms) if steps_ms else None,
            "first_call_s": self.first_call_s,
            "load_s": self.load_s,
            "cpu_peak_gb": self.memory.cpu_peak_gb,
            **asdict(self.memory),
        }
        if self.load_memory is not None:
            row["load_cpu_peak_gb"] = self.load_memory.cpu_peak_gb
            row["load_gpu_allocated_peak_gb"] = self.load_memory.gpu_allocated_peak_gb
        if self.baseline is not None:
            row["cpu_baseline_gb"] = self.baseline.cpu_rss_gb
            row["cpu_model_gb"] = self.memory.cpu_peak_gb - self.baseline.cpu_rss_gb
            row["gpu_device_baseline_gb"] = self.baseline.gpu_device_used_gb
        for name, values in self.parts_s.items():
            # NAME_s: the part's time per generation; NAME_share: of the denoising time
            row[f"{name}_s"] = statistics.median(values)
            shares = [v / d for v, d in zip(values, self.denoise_s, strict=True) if d > 0]
            row[f"{name}_share"] = statistics.median(shares) if shares else None
        if self.stages:
            row["stages"] = "+".join(self.stages)
        for name, repeats in self.stages.items():
            row.update(self.stage_summary(name, repeats))
        row.update(self.extra)
        return row

    def stage_summary(self, name: str, repeats: tuple[StageTiming, ...]) -> dict[str, Any]:
        """``NAME_*`` figures of stage ``NAME`` (``prior_its``, ``stage_2_its``…;
        docs/results.md): its steps, its it/s over its whole call and over its denoising, its
        time and its step latency."""
        steps = len(repeats[0].steps)
        its = [self.batch * steps / t.wall for t in repeats if t.wall > 0]
        denoise = [self.batch * steps / t.denoise for t in repeats if t.denoise > 0]
        steps_ms = [s * 1000 for t in repeats for s in t.steps]
        prefix = f"{name}_"
        return {
            prefix + "steps": steps,
            prefix + "its": statistics.median(its) if its else None,
            prefix + "denoise_its": statistics.median(denoise) if denoise else None,
            prefix + "s": statistics.median(t.wall for t in repeats),
            prefix + "step_ms_median": statistics.median(steps_ms) if steps_ms else None,
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
