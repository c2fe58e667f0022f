"""Put first on a worker's PYTHONPATH by tests: one out-of-memory error that leaves the
allocator unusable, once per marker file (``SDBENCH_TEST_OOM_ONCE``)."""

import os
from pathlib import Path

import torch

import harness.execute
import harness.measure

_step = harness.measure.GenerationTimer.step


def _step_or_oom(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    marker = Path(os.environ["SDBENCH_TEST_OOM_ONCE"])
    if not marker.exists():
        marker.touch()
        harness.execute.allocator_usable = lambda device: False
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return _step(self, *args, **kwargs)


harness.measure.GenerationTimer.step = _step_or_oom  # type: ignore[method-assign]
