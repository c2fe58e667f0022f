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


def test_memory_monitor_sees_an_allocation() -> None:
    with MemoryMonitor(CPU, interval=0.005) as monitor:
        before = monitor.peaks().cpu_rss_sampled_gb
        block = np.ones(64 * 1024**2 // 8)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    peaks = monitor.peaks()
    assert peaks.cpu_rss_sampled_gb >= before + 0.05
    assert peaks.cpu_peak_gb >= peaks.cpu_rss_sampled_gb
    assert peaks.gpu_allocated_peak_gb is None  # no GPU figures on the CPU


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
