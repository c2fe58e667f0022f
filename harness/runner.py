"""The runner: cells → backend sessions → measured :class:`~harness.results.Result` records.

Cells are taken in order; consecutive cells with the same load key share one backend session
(:func:`harness.matrix.group_by_load` orders a scenario's cells so that they do), so a sweep of
batch sizes costs one load. Each cell runs ``warmup`` untimed generations, then ``repeats``
timed ones, under a memory monitor. Whatever happens in a cell — unsupported, an exception, an
out-of-memory error, a timeout — becomes that cell's status, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
import traceback as tb
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from backends import get_backend
from backends.base import Output, Request, Session
from harness import environment, inputs
from harness.conformance import CheckContext, ParityTracker, run_checks, to_uint8
from harness.errors import UnsupportedError, UserError
from harness.matrix import Cell, group_by_load
from harness.measure import (
    CellTimeout,
    GenerationTimer,
    Measurement,
    MemoryMonitor,
    MemoryPeaks,
    Timing,
)
from harness.results import Result, ResultStore
from harness.vocabulary import FAILED_STATUSES

#: ``timed_loop(generate_once, repeats)`` runs the timed repeats; the pytest plugin passes one
#: that goes through pytest-benchmark's ``benchmark.pedantic``.
TimedLoop = Callable[[Callable[[], None], int], None]


def plain_loop(generate_once: Callable[[], None], repeats: int) -> None:
    for _ in range(repeats):
        generate_once()


def resolve_device(name: str) -> torch.device | None:
    """``auto`` → CUDA if present, else CPU; ``cuda`` without CUDA → None."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return None if name == "cuda" else torch.device("cpu")


def make_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial latents of a cell: N(0, 1) float32 on the CPU from the cell's seed.

    Drawn by the harness, not the backend, so every backend starts from the same noise.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def request_for(cell: Cell, session: Session) -> Request:
    """The backend-neutral request of a cell: prompts, noise and workflow inputs."""
    width, height = cell.width, cell.height
    workflow = cell.workflow
    init_image = mask = hires_noise = None
    if workflow in ("img2img", "inpaint", "outpaint"):
        if cell.init_image == "generated":
            init_image = inputs.generated_image(width, height, cell.seed)
        else:
            init_image = inputs.load_image(cell.init_image, width, height)
    if workflow == "inpaint":
        mask = inputs.make_mask(cell.mask, width, height)
    elif workflow == "outpaint":
        assert init_image is not None
        init_image, mask = inputs.outpaint_canvas(init_image, cell.outpaint_px)
        width, height, workflow = cell.output_size[0], cell.output_size[1], "inpaint"
    elif workflow == "hires":
        final_width, final_height = cell.output_size
        hires_shape = session.latent_shape(cell.batch, final_width, final_height)
        hires_noise = make_noise(hires_shape, cell.seed + 1)
    embeddings = inputs.parse_embeddings(cell.embedding, cell.model)
    prompt = cell.prompt
    for embedding in embeddings:  # the trigger word must be in the prompt to take effect
        if embedding.token not in prompt.split():
            prompt = f"{prompt}, {embedding.token}"
    return Request(
        prompt=prompt,
        negative_prompt=cell.negative_prompt,
        batch=cell.batch,
        steps=cell.steps,
        width=width,
        height=height,
        sampler=cell.sampler,
        guidance=cell.guidance,
        seed=cell.seed,
        noise=make_noise(session.latent_shape(cell.batch, width, height), cell.seed),
        workflow=workflow,
        init_image=init_image,
        mask=mask,
        strength=cell.strength,
        hires_scale=cell.hires_scale,
        hires_upscaler=cell.hires_upscaler,
        hires_noise=hires_noise,
        loras=inputs.parse_loras(cell.lora, cell.model),
        embeddings=embeddings,
    )


def output_checks(output: Output, cell: Cell) -> dict[str, Any]:
    """Shape, finiteness and non-constancy of the produced images."""
    images = output.images
    width, height = cell.output_size
    expected = (cell.batch, height, width, 3)
    finite = bool(np.isfinite(images).all())
    spread = float(np.nanstd(images)) if images.size else 0.0
    return {
        "output_shape": list(images.shape),
        "output_shape_ok": tuple(images.shape) == expected,
        "output_finite": finite and bool(torch.isfinite(output.latents).all()),
        "output_std": spread,
        "output_constant": spread == 0.0,
    }


def _output_problem(checks: dict[str, Any], cell: Cell) -> str | None:
    if not checks["output_shape_ok"]:
        expected = [cell.batch, cell.output_size[1], cell.output_size[0], 3]
        return f"output shape {checks['output_shape']}, expected {expected}"
    if not checks["output_finite"]:
        return "output contains NaN or inf values"
    if checks["output_constant"]:
        return "output image is constant"
    return None


def _save_preview(output: Output, directory: Path, cell: Cell) -> str | None:
    """Write the first image as a small PNG; return its path relative to ``directory``."""
    from PIL import Image

    image = to_uint8(output.images[0])
    relative = Path("images") / f"{cell.scenario}--{cell.id}.png"
    target = directory / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    preview = Image.fromarray(image)
    preview.thumbnail((256, 256))
    preview.save(target)
    return relative.as_posix()


@dataclass
class _Loaded:
    key: tuple[Any, ...]
    session: Session | None
    load_s: float
    load_memory: MemoryPeaks | None
    #: A load failure, reused for every cell of the group: (status, reason, type, traceback).
    failure: tuple[str, str, str | None, str | None] | None = None


class Runner:
    """Runs cells and appends one result per cell to a store."""

    def __init__(
        self,
        out_dir: str | Path | None = None,
        *,
        run_id: str | None = None,
        progress: bool = True,
        save_images: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.store = ResultStore(self.out_dir) if self.out_dir is not None else None
        self.run_id = run_id or time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
        self.progress = progress
        self.save_images = save_images and self.out_dir is not None
        self.env = environment.collect()
        self.env_fingerprint = environment.fingerprint(self.env)
        self._loaded: _Loaded | None = None
        self.parity = ParityTracker()

    # -- public -------------------------------------------------------------------------

    def run(self, cells: Iterable[Cell]) -> list[Result]:
        """Run every cell (grouped by load key), with a progress bar; return the results."""
        ordered = [cell for group in group_by_load(list(cells)) for cell in group]
        self.parity.plan(ordered)
        results: list[Result] = []
        # The bar only on a terminal; one line per finished cell either way.
        show_bar = self.progress and sys.stderr.isatty()
        with tqdm(total=len(ordered), disable=not show_bar, unit="cell", leave=False) as bar:
            for cell in ordered:
                bar.set_description(cell.id)
                result = self.run_cell(cell)
                results.append(result)
                if self.progress:
                    bar.write(_progress_line(len(results), len(ordered), result), file=sys.stdout)
                bar.update()
        self.close()
        return results

    def run_cell(self, cell: Cell, timed_loop: TimedLoop = plain_loop) -> Result:
        """Run one cell, record it in the store, and return its result."""
        result = self._run_cell(cell, timed_loop)
        if self.store is not None:
            self.store.append(result)
        return result

    def close(self) -> None:
        self._release()

    # -- internals ----------------------------------------------------------------------

    def _result(self, cell: Cell, status: str, **fields: Any) -> Result:
        return Result(
            run_id=self.run_id,
            cell=cell,
            status=status,
            env=self.env,
            env_fingerprint=self.env_fingerprint,
            **fields,
        )

    def _run_cell(self, cell: Cell, timed_loop: TimedLoop) -> Result:
        device = resolve_device(cell.device)
        if device is None:
            return self._result(cell, "unsupported", reason="needs a CUDA device; none here")
        try:
            backend = get_backend(cell.backend)
            reason = backend.unsupported(cell, device)
        except Exception as error:  # noqa: BLE001 - a broken backend is that cell's error
            return self._failure(cell, error)
        if reason is not None:
            return self._result(cell, "unsupported", reason=reason)

        loaded = self._load(cell, device)
        if loaded.failure is not None:
            status, message, error_type, trace = loaded.failure
            return self._result(
                cell, status, reason=message, error_type=error_type, traceback=trace
            )
        assert loaded.session is not None
        try:
            return self._measure(cell, device, loaded, timed_loop)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            return self._failure(cell, error, device)

    def _load(self, cell: Cell, device: torch.device) -> _Loaded:
        key = cell.load_key()
        if self._loaded is not None and self._loaded.key == key:
            return self._loaded
        self._release()
        from models import resolve

        try:
            model = resolve(cell.model, cell.source)  # may synthesise a zoo model: not timed
            start = time.perf_counter()
            with MemoryMonitor(device) as monitor:
                session = get_backend(cell.backend).load(cell, model, device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            self._loaded = _Loaded(key, session, time.perf_counter() - start, monitor.peaks())
        except Exception as error:  # noqa: BLE001 - every cell of the group reports it
            failed = self._failure(cell, error, device)
            assert failed.reason is not None
            self._loaded = _Loaded(
                key,
                None,
                0.0,
                None,
                failure=(
                    failed.status,
                    f"load failed: {failed.reason}",
                    failed.error_type,
                    failed.traceback,
                ),
            )
        return self._loaded

    def _measure(
        self, cell: Cell, device: torch.device, loaded: _Loaded, timed_loop: TimedLoop
    ) -> Result:
        session = loaded.session
        assert session is not None
        request = request_for(cell, session)
        deadline = None if cell.timeout_s is None else time.perf_counter() + cell.timeout_s
        timings: list[Timing] = []
        outputs: list[Output] = []
        first_call: list[float] = []  # the wall time of the cell's first generation

        def generate(record: bool) -> None:
            with GenerationTimer(device, deadline) as timer:
                output = session.generate(request, timer)
            timing = Timing.from_timer(timer)
            if record:
                timings.append(timing)
            if not first_call:
                first_call.append(timing.wall)
            outputs[:] = [output]

        with MemoryMonitor(device) as monitor:
            try:
                for _ in range(cell.warmup):
                    generate(record=False)
                timed_loop(lambda: generate(record=True), cell.repeats)
            except CellTimeout as error:
                if not timings:
                    raise
                timeout: CellTimeout | None = error
            else:
                timeout = None
        measurement = Measurement.from_timings(
            batch=cell.batch,
            steps=cell.denoise_steps,
            timings=timings,
            first_call_s=first_call[0],
            load_s=loaded.load_s,
            memory=monitor.peaks(),
            load_memory=loaded.load_memory,
        )
        metrics = measurement.summary()
        metrics["repeats_done"] = len(timings)
        metrics["denoise_steps"] = cell.denoise_steps
        checks = output_checks(outputs[-1], cell)
        metrics.update(checks)
        if self.save_images and self.out_dir is not None:
            metrics["image"] = _save_preview(outputs[-1], self.out_dir, cell)
        problem = _output_problem(checks, cell)
        if timeout is not None:
            reason = f"timed out after {len(timings)} of {cell.repeats} repeats ({timeout})"
            return self._result(cell, "timeout", reason=reason, metrics=metrics)
        if problem is not None:
            return self._result(
                cell, "error", reason=problem, error_type="OutputCheck", metrics=metrics
            )
        metrics.update(self._conformance(cell, device, session, request, outputs[-1]))
        return self._result(cell, "ok", metrics=metrics)

    def _conformance(
        self, cell: Cell, device: torch.device, session: Session, request: Request, output: Output
    ) -> dict[str, Any]:
        """Parity against the other backend's cell, and the scenario's conformance checks."""
        figures = self.parity.record(cell, output)
        found: dict[str, Any] = {}
        if "parity_check" in figures:
            found["parity"] = figures.pop("parity_check")
        if cell.checks:
            backend = get_backend(cell.backend)

            def generate(variant: Request) -> Output:
                with GenerationTimer(device) as timer:
                    return session.generate(variant, timer)

            def load_merged(path: Path) -> Session:
                from models import resolve

                merged = dataclasses.replace(cell, model=str(path), source="safetensors")
                return backend.load(merged, resolve(str(path), "safetensors"), device)

            context = CheckContext(cell, backend, session, request, output, device, generate)
            ran = run_checks(context, load_merged)
            found.update({name: check.to_dict() for name, check in ran.items()})
        if found:
            figures["check_results"] = found
            figures["checks_failed"] = sum(c["status"] in ("fail", "error") for c in found.values())
        return figures

    def _failure(
        self, cell: Cell, error: BaseException, device: torch.device | None = None
    ) -> Result:
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]
        trace = "".join(tb.format_exception(error))
        if isinstance(error, UnsupportedError):
            return self._result(cell, "unsupported", reason=str(error))
        if isinstance(error, torch.OutOfMemoryError):
            if device is not None and device.type == "cuda":
                torch.cuda.empty_cache()
            return self._result(
                cell, "oom", reason=message, error_type=type(error).__name__, traceback=trace
            )
        if isinstance(error, CellTimeout):
            return self._result(cell, "timeout", reason=str(error), error_type="CellTimeout")
        if isinstance(error, UserError):
            message = str(error)
        return self._result(
            cell, "error", reason=message, error_type=type(error).__name__, traceback=trace
        )

    def _release(self) -> None:
        if self._loaded is not None and self._loaded.session is not None:
            self._loaded.session.close()
        self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _progress_line(index: int, total: int, result: Result) -> str:
    cell = result.cell
    head = f"[{index}/{total}] {cell.scenario}::{cell.id}"
    if result.status == "ok":
        metrics = result.metrics
        gpu = metrics.get("gpu_allocated_peak_gb")
        gpu_text = f" gpu {gpu:.2f} GB" if gpu is not None else ""
        line = (
            f"{head}  ok  {metrics['its']:.2f} it/s  cpu {metrics['cpu_peak_gb']:.2f} GB{gpu_text}"
        )
        if "parity_psnr_db" in metrics:
            line += (
                f"  parity vs {metrics['parity_ref_backend']}: "
                f"{metrics['parity_psnr_db']:.1f} dB {metrics['parity_status']}"
            )
        checks = metrics.get("check_results") or {}
        if checks:
            passed = sum(check["status"] == "pass" for check in checks.values())
            failed = [
                name for name, check in checks.items() if check["status"] in ("fail", "error")
            ]
            line += f"  checks {passed}/{len(checks)} pass"
            if failed:
                line += f" (failed: {', '.join(failed)})"
        return line
    return f"{head}  {result.status}: {result.reason}"


def any_failed(results: Iterable[Result]) -> bool:
    """A cell failed (error, oom, timeout) or one of its conformance checks failed."""
    return any(
        result.status in FAILED_STATUSES or result.metrics.get("checks_failed", 0) > 0
        for result in results
    )
