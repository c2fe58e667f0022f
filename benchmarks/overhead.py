"""The harness's it/s for a cell against a bare loop of the same backend call.

    python benchmarks/overhead.py                      # tiny 64 px and 256 px, both backends
    python benchmarks/overhead.py --model sd15 --resolution 128 --steps 4
    python benchmarks/overhead.py --device cuda --model sd15 --resolution 512 --batch 1 8
    python benchmarks/overhead.py --parts              # also the timed region's pieces
    python benchmarks/overhead.py --quick              # a few rounds: checks the script works

Per round, interleaved with the bare loop: the harness runs the cell as a scenario run does
(:class:`harness.execute.CellExecutor`: warm-up, timed repeats inside the memory monitor, the
generation timer, the output checks), and its reported ``its`` is taken; the bare loop times
the same number of calls of the backend itself on the same loaded session with
``time.perf_counter`` (device synchronised), warm-up included:

- diffusers: ``pipe(prompt=…, latents=noise, generator=…, output_type="np")`` — the pipeline
  call a user's app makes (seeded), with the session's scheduler;
- original: the session's own generation with a timer that records nothing (the backend's
  code is ours; what is measured is everything the harness adds around it).

One timed call per side per round by default: the pair is adjacent in time, so the machine's
drift lands on both; the rounds' spread is the noise of one generation, and more rounds
narrow the estimate. ``--parts`` then times, call by call against one bare call, what the
harness puts inside the timed region: the generation timer (its clock, phases and step
marks; the harness's own wall), and the timer inside the memory monitor.

The ratio harness / bare is 1.0 when the harness costs nothing; the targets are ≥ 0.99 at
tiny 64 px and ≥ 0.995 at 256 px (docs/performance.md).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from _common import (
    Ratio,
    interleave,
    parser,
    print_ratios,
    setup_threads,
    write_json,
)


class NullTimer:
    """A :class:`~harness.measure.GenerationTimer` stand-in that records nothing."""

    deadline = None

    def phase(self, _name: str) -> Any:
        from contextlib import nullcontext

        return nullcontext()

    def begin(self, _name: str) -> None:
        pass

    def end(self, _name: str) -> None:
        pass

    def step(self, *_args: Any, **_kwargs: Any) -> None:
        pass


def make_cell(backend: str, model: str, source: str, resolution: int, steps: int, batch: int,
              device: str, repeats: int) -> Any:
    from harness.matrix import expand
    from harness.scenario import Scenario

    scenario = Scenario.model_validate({
        "name": "overhead",
        "negative_prompt": "blurry",
        "repeats": repeats,
        "warmup": 1,
        "matrix": {
            "backend": backend, "model": model, "source": source, "device": device,
            "dtype": "fp32" if device == "cpu" else "fp16", "resolution": resolution,
            "steps": steps, "sampler": "euler", "guidance": 7.5, "seed": 42, "batch": batch,
        },
    })
    (cell,) = expand(scenario)
    return cell


def bare_call(session: Any, request: Any, backend: str) -> Any:
    """The backend's own call, with nothing of the harness around it."""
    import torch

    if backend == "diffusers":
        pipe = session.pipe
        device = pipe._execution_device

        def call() -> Any:
            with torch.no_grad():
                return pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt or None,
                    num_images_per_prompt=request.batch,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance,
                    height=request.height,
                    width=request.width,
                    latents=request.noise.to(device=device, dtype=session.dtype),
                    generator=torch.Generator().manual_seed(request.seed),  # as apps seed
                    output_type="np",
                ).images

        return call
    timer = NullTimer()
    return lambda: session.generate(request, timer)


def measure(backend: str, model: str, source: str, resolution: int, steps: int, batch: int,
            device_name: str, repeats: int, rounds: int, parts: bool = False) -> list[Ratio]:
    """The cell against the bare loop; with ``parts``, also each piece the harness puts
    inside the timed region against one bare call, call by call."""
    from harness.execute import CellExecutor, request_for, resolve_device
    from harness.measure import Baseline, GenerationTimer, MemoryMonitor, synchronize

    cell = make_cell(backend, model, source, resolution, steps, batch, device_name, repeats)
    device = resolve_device(device_name)
    assert device is not None, f"no {device_name} device here"
    executor = CellExecutor(None, run_id="overhead", save_images=False)
    first = executor.run(cell).result
    if first.status != "ok":
        raise SystemExit(f"{cell.id}: {first.status}: {first.reason}")
    session = executor.session
    request = request_for(cell, session)
    call = bare_call(session, request, backend)
    images = cell.batch * cell.denoise_steps
    name = f"{backend} {model} {resolution}px b{batch} {steps} steps"

    def harness_its() -> float:
        result = executor.run(cell).result
        assert result.status == "ok", result.reason
        return float(result.metrics["its"])

    def bare_once() -> float:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        return images / (time.perf_counter() - start)

    def bare_its() -> float:
        call()  # warm-up, as the harness's
        synchronize(device)
        return statistics.median(bare_once() for _ in range(repeats))

    def timed_its() -> float:  # the harness's own clock around the generation
        with GenerationTimer(device) as timer:
            session.generate(request, timer)
        return images / timer.wall_s()

    baseline = Baseline.take(device)  # a GPU monitor's per-process figure needs one

    def monitored_its() -> float:
        with MemoryMonitor(device, baseline=baseline):
            return timed_its()

    try:
        ratios = [interleave(name, ("harness", harness_its), ("bare", bare_its), rounds,
                             unit=" it/s")]
        if parts:
            session.prepare(request)
            ratios += [
                interleave(f"{name}, {piece}", (label, fn), ("bare", bare_once), rounds,
                           unit=" it/s")
                for piece, label, fn in (
                    ("generation timer", "timer", timed_its),
                    ("timer in the memory monitor", "monitored", monitored_its),
                )
            ]
        return ratios
    finally:
        executor.close()


def main(argv: list[str] | None = None) -> int:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--backend", nargs="+", default=["diffusers", "original"])
    args_parser.add_argument("--model", default="tiny")
    args_parser.add_argument("--resolution", type=int, nargs="+", default=[64, 256])
    args_parser.add_argument("--steps", type=int, default=8)
    args_parser.add_argument("--batch", type=int, nargs="+", default=[1])
    args_parser.add_argument(
        "--repeats", type=int, default=1,
        help="timed calls per round (one: each round's pair is adjacent in time, so the "
             "machine's drift cancels; more rounds tighten the estimate)",
    )
    args_parser.add_argument(
        "--parts", action="store_true",
        help="also time each piece of the timed region (the generation timer, the memory "
             "monitor) against one bare call, call by call",
    )
    args = args_parser.parse_args(argv)
    setup_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 40)
    resolutions = [64] if args.quick else args.resolution
    ratios = []
    for backend in args.backend:
        source = "hub" if backend == "diffusers" else "safetensors"
        for resolution in resolutions:
            for batch in args.batch:
                got = measure(backend, args.model, source, resolution, args.steps, batch,
                              args.device, args.repeats, rounds, parts=args.parts)
                for ratio in got:
                    print(ratio.line(), flush=True)
                ratios += got
    print_ratios("harness it/s / bare loop it/s (1.0 = the harness costs nothing)", ratios)
    write_json(args.json, [ratio.to_dict() for ratio in ratios])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
