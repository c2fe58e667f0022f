"""Cells measured in this process: the part of the runner that a worker process runs.

A :class:`CellExecutor` holds one loaded backend session at a time (a new load key releases
the old session first) and turns each cell into a :class:`~harness.results.Result`: it runs
``warmup`` untimed generations, then ``repeats`` timed ones, under a memory monitor, then the
output checks and the scenario's conformance checks. Whatever happens in a cell — unsupported,
an exception, an out-of-memory error, a timeout between steps — becomes that cell's status.

Cross-backend parity needs two cells' outputs and so is not done here: with ``keep_output``
an ok cell's final latents and images come back with its result (:class:`Executed`) for the
parent's :class:`~harness.conformance.ParityTracker`.

Phases are announced through ``on_phase`` (``load``, ``measure``, ``checks``) so that a parent
process can enforce its wall-clock budgets (:mod:`harness.launcher`).
"""

from __future__ import annotations

import dataclasses
import gc
import time
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends import get_backend
from backends.base import ControlRef, Output, Request, Session
from harness import environment, inputs
from harness.axes import parse_stage_values
from harness.conformance import CheckContext, run_checks, to_uint8
from harness.errors import UnsupportedError, UserError
from harness.flops import step_figures, unet_config_path
from harness.matrix import Cell
from harness.measure import (
    Baseline,
    CellTimeout,
    GenerationTimer,
    Measurement,
    MemoryMonitor,
    MemoryPeaks,
    Timing,
)
from harness.results import Result

#: ``on_phase(name, measured)``: ``load`` / ``measure`` / ``checks`` begins; with ``checks``
#: the cell's result so far (measured, before its conformance checks).
PhaseHook = Callable[[str, Result | None], None]


def _no_hook(_phase: str, _measured: Result | None) -> None:
    return None


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
    workflow = cell.base_workflow  # a ControlNet workflow is its base plus the controls
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
    controls: tuple[ControlRef, ...] = ()
    if cell.uses_controlnet:
        controls = inputs.parse_controls(
            cell.controlnet, cell.model, cell.source, scale=cell.control_scale,
            image=cell.control_image, width=width, height=height, seed=cell.seed,
        )
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
        controls=controls,
        control_mode=cell.control_mode if controls else "balanced",
        control_start=cell.control_start if controls else 0.0,
        control_end=cell.control_end if controls else 1.0,
        stage_noise={  # each stage's start noise from a seed of its own
            name: make_noise(shape, cell.seed + 1 + index)
            for index, (name, shape) in enumerate(
                session.stage_noise_shapes(cell.batch, width, height).items()
            )
        },
        stage_steps={k: int(v) for k, v in parse_stage_values(cell.stage_steps).items()},
        stage_guidance=parse_stage_values(cell.stage_guidance),
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


def allocator_usable(device: torch.device) -> bool:
    """After an out-of-memory error: can the device still allocate a little?"""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.empty_cache()
        torch.empty(1024, device=device).fill_(0)
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - OOM, a CUDA error, a broken driver: all unusable
        return False
    return True


@dataclass
class _Loaded:
    key: tuple[Any, ...]
    session: Session | None
    load_s: float
    load_memory: MemoryPeaks | None
    baseline: Baseline | None = None
    #: A load failure, reused for every cell of the group: (status, reason, type, traceback).
    failure: tuple[str, str, str | None, str | None] | None = None
    #: The model's diffusers UNet config, for counting a step's FLOPs (:mod:`harness.flops`).
    unet_config: Path | None = None
    #: A ``hub:`` model: whether it was in the Hugging Face cache (None for the rest).
    from_cache: bool | None = None
    #: What the loaded UNet predicts when not its config's (:attr:`ResolvedModel.prediction`).
    prediction: str | None = None


@dataclass
class Executed:
    """A cell's result, its output when asked to keep it, and whether to start afresh."""

    result: Result
    output: Output | None = None
    #: The device's allocator is unusable after an OOM: the worker should be replaced.
    restart: bool = False


class CellExecutor:
    """Runs cells in this process, one loaded session at a time."""

    def __init__(
        self,
        out_dir: str | Path | None,
        *,
        run_id: str,
        save_images: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_id = run_id
        self.save_images = save_images and self.out_dir is not None
        self.env = environment.collect()
        self.env_fingerprint = environment.fingerprint(self.env)
        self._loaded: _Loaded | None = None

    def run(
        self, cell: Cell, *, keep_output: bool = False, on_phase: PhaseHook = _no_hook
    ) -> Executed:
        """Run one cell; its output comes back only if ``keep_output`` and it is ok."""
        device = resolve_device(cell.device)
        if device is None:
            return Executed(self.result(cell, "unsupported", reason=NO_CUDA))
        try:
            backend = get_backend(cell.backend)
            reason = backend.unsupported(cell, device)
        except Exception as error:  # noqa: BLE001 - a broken backend is that cell's error
            return Executed(self.failure(cell, error))
        if reason is None and cell.uses_controlnet and not backend.controlnet:
            reason = f"backend {cell.backend!r} does not run ControlNet (Backend.controlnet)"
        if reason is not None:
            return Executed(self.result(cell, "unsupported", reason=reason))

        loaded = self._load(cell, device, on_phase)
        if loaded.failure is not None:
            status, message, error_type, trace = loaded.failure
            return Executed(
                self.result(cell, status, reason=message, error_type=error_type, traceback=trace)
            )
        assert loaded.session is not None
        try:
            result, output = self._measure(cell, device, loaded, on_phase)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            failed = self.failure(cell, error, device)
            restart = failed.status == "oom" and not allocator_usable(device)
            return Executed(failed, restart=restart)
        return Executed(result, output if keep_output and result.status == "ok" else None)

    def close(self) -> None:
        self._release()

    @property
    def session(self) -> Session | None:
        """The loaded session (the last cell's load key), for benchmarks of the harness."""
        return None if self._loaded is None else self._loaded.session

    def result(self, cell: Cell, status: str, **fields: Any) -> Result:
        env = environment.for_backend(self.env, cell.backend)
        if cell.lora != "none":  # what the network-types table groups by, whatever the status
            types = inputs.lora_types(cell.lora, cell.model)
            if types is not None:
                fields["metrics"] = {"lora_types": types, **fields.get("metrics", {})}
        return Result(
            run_id=self.run_id,
            cell=cell,
            status=status,
            env=env,
            env_fingerprint=environment.fingerprint(env),
            **fields,
        )

    def failure(
        self, cell: Cell, error: BaseException, device: torch.device | None = None
    ) -> Result:
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]
        trace = "".join(tb.format_exception(error))
        if isinstance(error, UnsupportedError):
            return self.result(cell, "unsupported", reason=str(error))
        if isinstance(error, torch.OutOfMemoryError):
            if device is not None and device.type == "cuda":
                torch.cuda.empty_cache()
            return self.result(
                cell, "oom", reason=message, error_type=type(error).__name__, traceback=trace
            )
        if isinstance(error, CellTimeout):
            return self.result(cell, "timeout", reason=str(error), error_type="CellTimeout")
        if isinstance(error, UserError):
            message = str(error)
        return self.result(
            cell, "error", reason=message, error_type=type(error).__name__, traceback=trace
        )

    # -- internals ----------------------------------------------------------------------

    def _load(self, cell: Cell, device: torch.device, on_phase: PhaseHook) -> _Loaded:
        key = cell.load_key()
        if self._loaded is not None and self._loaded.key == key:
            return self._loaded
        self._release()
        from models import resolve

        on_phase("load", None)
        try:
            backend = get_backend(cell.backend)
            backend.imports()  # Python's imports are not the load's time
            baseline = Baseline.take(device)  # after the backend's imports, before the load
            # may synthesise a zoo model or run A1111's prediction test: not timed
            model = resolve(cell.model, cell.source, cell.prediction,
                            optional_stages=cell.x4_upscaler)
            start = time.perf_counter()
            with MemoryMonitor(device, baseline=baseline) as monitor:
                session = backend.load(cell, model, device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            self._loaded = _Loaded(
                key, session, time.perf_counter() - start, monitor.peaks(), baseline,
                unet_config=unet_config_path(model.source, model.path, model.config_dir),
                from_cache=model.from_cache,
                prediction=model.prediction,
            )
        except Exception as error:  # noqa: BLE001 - every cell of the group reports it
            failed = self.failure(cell, error, device)
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
        self, cell: Cell, device: torch.device, loaded: _Loaded, on_phase: PhaseHook
    ) -> tuple[Result, Output]:
        session = loaded.session
        assert session is not None
        request = request_for(cell, session)
        on_phase("measure", None)
        session.prepare(request)  # sampler, LoRA, embeddings: not the timed generation
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

        with MemoryMonitor(device, baseline=loaded.baseline) as monitor:
            try:
                for _ in range(cell.warmup):
                    generate(record=False)
                for _ in range(cell.repeats):
                    generate(record=True)
            except CellTimeout as error:
                if not timings:
                    raise
                timeout: CellTimeout | None = error
            else:
                timeout = None
        # a multi-stage model's steps are its stages' (each stage's steps as it ran them)
        steps = (timings[0].stage_steps if timings else 0) or cell.denoise_steps
        measurement = Measurement.from_timings(
            batch=cell.batch,
            steps=steps,
            timings=timings,
            first_call_s=first_call[0],
            load_s=loaded.load_s,
            memory=monitor.peaks(),
            load_memory=loaded.load_memory,
            baseline=loaded.baseline,
        )
        metrics = measurement.summary()
        metrics["repeats_done"] = len(timings)
        metrics["denoise_steps"] = steps
        metrics["model_from_cache"] = loaded.from_cache
        metrics.update(self._flops(cell, device, request, loaded, metrics))
        output = outputs[-1]
        checks = output_checks(output, cell)
        metrics.update(checks)
        if self.save_images and self.out_dir is not None:
            metrics["image"] = _save_preview(output, self.out_dir, cell)
        problem = _output_problem(checks, cell)
        if timeout is not None:
            reason = f"timed out after {len(timings)} of {cell.repeats} repeats ({timeout})"
            return self.result(cell, "timeout", reason=reason, metrics=metrics), output
        if problem is not None:
            failed = self.result(
                cell, "error", reason=problem, error_type="OutputCheck", metrics=metrics
            )
            return failed, output
        measured = self.result(cell, "ok", metrics=metrics)
        if not cell.checks:
            return measured, output
        on_phase("checks", measured)
        metrics.update(self._checks(cell, device, session, request, output))
        return self.result(cell, "ok", metrics=metrics), output

    def _flops(self, cell: Cell, device: torch.device, request: Request, loaded: _Loaded,
               metrics: dict[str, Any]) -> dict[str, Any]:
        """A step's FLOPs, the achieved TFLOP/s and the MFU (none for the hires fix, whose two
        passes run at two sizes); a count that fails is noted, never the cell's failure."""
        if cell.workflow == "hires":
            return {}
        try:
            return step_figures(
                loaded.unet_config,
                latent_shape=tuple(request.noise.shape),
                guidance=cell.guidance,
                steps=metrics["denoise_steps"],
                denoise_s=metrics.get("denoise_s"),
                device=device.type,
                gpu_name=self.env.get("gpu_name"),
                dtype=cell.dtype,
            )
        except Exception as error:  # noqa: BLE001 - a figure about the figures
            return {"flops_error": f"{type(error).__name__}: {error}"[:300]}

    def _checks(
        self, cell: Cell, device: torch.device, session: Session, request: Request, output: Output
    ) -> dict[str, Any]:
        """The scenario's conformance checks on the loaded session."""
        backend = get_backend(cell.backend)

        def generate(variant: Request) -> Output:
            with GenerationTimer(device) as timer:
                return session.generate(variant, timer)

        def load_merged(path: Path) -> Session:
            from models import resolve

            merged = dataclasses.replace(cell, model=str(path), source="safetensors")
            # the merged file carries the spec; the prediction is the loaded model's
            prediction = self._loaded.prediction if self._loaded is not None else None
            model = dataclasses.replace(resolve(str(path), "safetensors"), prediction=prediction)
            return backend.load(merged, model, device)

        context = CheckContext(cell, backend, session, request, output, device, generate)
        ran = run_checks(context, load_merged)
        found = {name: check.to_dict() for name, check in ran.items()}
        return {"check_results": found, "checks_failed": count_failed(found)}

    def _release(self) -> None:
        if self._loaded is not None and self._loaded.session is not None:
            self._loaded.session.close()
        self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


NO_CUDA = "needs a CUDA device; none here"


def count_failed(checks: dict[str, dict[str, Any]]) -> int:
    """Checks that failed or errored (``checks_failed``)."""
    return sum(check["status"] in ("fail", "error") for check in checks.values())
