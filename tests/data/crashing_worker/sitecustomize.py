"""Put first on a worker's PYTHONPATH by tests: the backend "falls over" in its first step.

It prints a line to stderr and leaves with exit code 7 — the way a native crash or an
``os._exit`` inside a backend ends a worker without a result.
"""

import os
import sys


def _fall_over(*_args: object, **_kwargs: object) -> None:
    print("boom: the backend fell over in a denoising step", file=sys.stderr, flush=True)
    os._exit(7)


import harness.measure  # noqa: E402 - after the helper, on purpose

harness.measure.GenerationTimer.step = _fall_over  # type: ignore[method-assign]
