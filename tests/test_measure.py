"""Measurement: timer phases and steps, memory monitor, derived it/s."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from harness.measure import (
    CellTimeout,
    GenerationTimer,
    Measurement,
    MemoryMonitor,
    MemoryPeaks,
    Timing,
)

CPU = torch.device("cpu")


def test_timer_phases_and_steps_add_up() -> None:
    with GenerationTimer(CPU) as timer:
        with timer.phase("encode"):
            time.sleep(0.01)
        with timer.phase("denoise"):
            for _ in range(3):
                time.sleep(0.01)
                timer.step()
        timer.begin("decode")
        time.sleep(0.01)
        timer.end("decode")
    timing = Timing.from_timer(timer)
    assert len(timing.steps) == 3
    assert all(step >= 0.009 for step in timing.steps)
    assert timing.denoise == pytest.approx(sum(timing.steps), rel=0.05)
    parts = timing.encode + timing.denoise + timing.decode
    assert parts <= timing.wall
    assert timing.wall - parts < 0.01


def test_timer_rejects_unknown_phase() -> None:
    timer = GenerationTimer(CPU)
    with pytest.raises(ValueError, match="phase must be one of"):
        timer.begin("upscale")


def test_step_raises_after_deadline() -> None:
    timer = GenerationTimer(CPU, deadline=time.perf_counter() - 1)
    with timer.phase("denoise"), pytest.raises(CellTimeout):
        timer.step()


def _transient_block(monitor: MemoryMonitor) -> float:
    """Touch 64 MiB and free it inside ``monitor``; the RSS before it, in GB."""
    before = monitor.peaks().cpu_rss_sampled_gb
    block = np.ones(64 * 1024**2 // 8)
    time.sleep(0.05)
    del block
    return before


def test_memory_monitor_takes_a_transient_peak_from_the_os() -> None:
    """Where Linux resets ``VmHWM`` no thread samples the CPU, and the peak is still seen."""
    with MemoryMonitor(CPU, interval=0.005) as monitor:
        if not monitor._os_peak_reset:
            pytest.skip("this kernel refuses to reset VmHWM")
        assert not monitor.sampling
        before = _transient_block(monitor)
    peaks = monitor.peaks()
    assert peaks.cpu_rss_os_peak_gb is not None
    assert peaks.cpu_peak_gb >= before + 0.05  # freed before the end: only VmHWM holds it
    assert peaks.cpu_rss_os_peak_gb >= peaks.cpu_rss_sampled_gb
    assert peaks.gpu_allocated_peak_gb is None  # no GPU figures on the CPU


def test_memory_monitor_samples_where_the_os_peak_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("harness.measure._reset_os_peak", lambda: False)
    with MemoryMonitor(CPU, interval=0.005) as monitor:
        assert monitor.sampling
        before = _transient_block(monitor)
    peaks = monitor.peaks()
    assert peaks.cpu_rss_os_peak_gb is None
    assert peaks.cpu_rss_sampled_gb >= before + 0.05
    assert peaks.cpu_peak_gb == peaks.cpu_rss_sampled_gb


def test_measurement_definitions() -> None:
    timings = [
        Timing(wall=2.0, encode=0.1, denoise=1.6, decode=0.3, steps=(0.4,) * 4),
        Timing(wall=1.0, encode=0.1, denoise=0.8, decode=0.1, steps=(0.2,) * 4),
        Timing(wall=4.0, encode=0.1, denoise=3.2, decode=0.7, steps=(0.8,) * 4),
    ]
    measurement = Measurement.from_timings(
        batch=2,
        steps=4,
        timings=timings,
        first_call_s=9.0,
        load_s=3.0,
        memory=MemoryPeaks(cpu_rss_sampled_gb=1.0, cpu_rss_os_peak_gb=1.5),
    )
    summary = measurement.summary()
    assert summary["its_repeats"] == [4.0, 8.0, 2.0]  # batch x steps / wall
    assert summary["its"] == 4.0  # median
    assert summary["denoise_its"] == pytest.approx(8 / 1.6)
    assert summary["its_min"] == 2.0 and summary["its_max"] == 8.0
    assert summary["step_ms_median"] == pytest.approx(400.0)
    assert summary["cpu_peak_gb"] == 1.5  # the larger of sampled and OS peak
    assert summary["first_call_s"] == 9.0 and summary["load_s"] == 3.0


def test_measurement_needs_a_repeat() -> None:
    with pytest.raises(ValueError, match="at least one timed repeat"):
        Measurement.from_timings(
            batch=1,
            steps=1,
            timings=[],
            first_call_s=0.0,
            load_s=0.0,
            memory=MemoryPeaks(0.0, None),
        )


# --- GPU memory of this process: test doubles of exactly the torch.cuda and NVML calls -----

GB = 1024**3
CUDA = torch.device("cuda")


class FakeCuda:
    """What MemoryMonitor / Baseline / ProcessGpuMemory call on ``torch.cuda``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, used_gb: float, total_gb: float = 80.0):
        self.used, self.total = int(used_gb * GB), int(total_gb * GB)
        for name in ("mem_get_info", "reset_peak_memory_stats", "memory_stats",
                     "max_memory_allocated", "max_memory_reserved", "get_device_properties"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def mem_get_info(self, device=None):
        return self.total - self.used, self.total

    def reset_peak_memory_stats(self, device=None) -> None:
        return None

    def memory_stats(self, device=None) -> dict:
        return {"num_alloc_retries": 2, "num_ooms": 0}

    def max_memory_allocated(self, device=None) -> int:
        return 3 * GB

    def max_memory_reserved(self, device=None) -> int:
        return 4 * GB

    def get_device_properties(self, device=None):
        class Properties:
            uuid = "58a4d7b0-0000-4000-8000-000000000001"  # torch prints it without "GPU-"

        return Properties()


class FakeNvml:
    """``pynvml``: init, a handle by UUID, the compute processes of a device."""

    class NVMLError(Exception):
        pass

    def __init__(self, processes: list[tuple[int, int | None]]) -> None:
        self.processes = processes
        self.asked_uuid: str | None = None

    def nvmlInit(self) -> None:
        return None

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.asked_uuid = uuid
        return "handle"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list:
        class Process:
            def __init__(self, pid: int, used: int | None) -> None:
                self.pid, self.usedGpuMemory = pid, used

        return [Process(pid, used) for pid, used in self.processes]


def _install_nvml(monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml | None) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: "import pynvml" fails


def test_process_gpu_memory_from_nvml_when_it_lists_this_process(monkeypatch) -> None:
    import os

    from harness.measure import Baseline, ProcessGpuMemory

    cuda = FakeCuda(monkeypatch, used_gb=10.0)
    nvml = FakeNvml([(1, 50 * GB), (os.getpid(), int(2.5 * GB))])
    _install_nvml(monkeypatch, nvml)
    baseline = Baseline.take(CUDA)
    assert baseline.gpu_device_used_gb == pytest.approx(10.0)
    memory = ProcessGpuMemory(CUDA, baseline.gpu_device_used_gb)
    assert nvml.asked_uuid == "GPU-58a4d7b0-0000-4000-8000-000000000001"
    assert memory.source == "nvml"
    assert memory.used(cuda.used) == int(2.5 * GB)  # this process only, not the other one


@pytest.mark.parametrize("nvml", [None, FakeNvml([(1, 50 * GB)]), FakeNvml([])])
def test_process_gpu_memory_falls_back_to_the_device_delta(monkeypatch, nvml) -> None:
    from harness.measure import ProcessGpuMemory

    FakeCuda(monkeypatch, used_gb=10.0)
    _install_nvml(monkeypatch, nvml)  # no NVML / our PID not visible (containers)
    memory = ProcessGpuMemory(CUDA, baseline_used_gb=10.0)
    assert memory.source == "mem_get_info"
    assert memory.used(int(13.5 * GB)) == int(3.5 * GB)
    assert memory.used(int(9 * GB)) == 0  # never negative


def test_memory_monitor_gpu_peaks_with_a_baseline(monkeypatch) -> None:
    import os

    from harness.measure import Baseline

    cuda = FakeCuda(monkeypatch, used_gb=1.0)
    _install_nvml(monkeypatch, None)
    baseline = Baseline.take(CUDA)
    with MemoryMonitor(CUDA, interval=0.001, baseline=baseline) as monitor:
        cuda.used = 7 * GB
        time.sleep(0.02)
        cuda.used = 5 * GB
    peaks = monitor.peaks()
    assert peaks.gpu_device_used_peak_gb == pytest.approx(7.0)
    assert peaks.gpu_process_used_peak_gb == pytest.approx(6.0)
    assert peaks.gpu_process_used_source == "mem_get_info"
    assert peaks.gpu_allocated_peak_gb == 3.0 and peaks.gpu_reserved_peak_gb == 4.0
    assert peaks.gpu_alloc_retries == 2 and peaks.gpu_ooms == 0

    nvml = FakeNvml([(os.getpid(), 2 * GB)])
    _install_nvml(monkeypatch, nvml)
    with MemoryMonitor(CUDA, interval=0.001, baseline=baseline) as monitor:
        nvml.processes = [(os.getpid(), 4 * GB)]
        time.sleep(0.02)
    peaks = monitor.peaks()
    assert peaks.gpu_process_used_peak_gb == pytest.approx(4.0)
    assert peaks.gpu_process_used_source == "nvml"


def test_memory_above_the_baseline_in_the_summary() -> None:
    from harness.measure import Baseline

    timing = Timing(wall=1.0, encode=0.1, denoise=0.8, decode=0.1, steps=(0.2,) * 4)
    measurement = Measurement.from_timings(
        batch=1,
        steps=4,
        timings=[timing],
        first_call_s=1.0,
        load_s=1.0,
        memory=MemoryPeaks(cpu_rss_sampled_gb=2.0, cpu_rss_os_peak_gb=2.5),
        baseline=Baseline(cpu_rss_gb=0.5, gpu_device_used_gb=None),
    )
    summary = measurement.summary()
    assert summary["cpu_baseline_gb"] == 0.5
    assert summary["cpu_model_gb"] == pytest.approx(2.0)  # 2.5 GB peak less 0.5 GB baseline
