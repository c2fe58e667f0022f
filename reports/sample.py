"""Synthetic results in the real results format, for tests, demos and report design.

:func:`write_sample` writes a results directory through :class:`harness.results.ResultStore`
(so it is exactly what ``python -m harness run`` writes): the table of DESIGN.md (SD 1.5,
512x512, batch 1–16, original and diffusers, offload none/medvram/lowvram, the safetensors
source) plus a few CPU cells that did not run ok (error, oom, unsupported) and preview
images; optionally a conformance scenario (checks and cross-backend parity). ``scale``
multiplies every it/s, so a second call makes a baseline or a slower run.
:func:`sample_verdicts` gives a verdict frame in ``harness.compare``'s column contract.

Run ``python -m reports.sample DIR`` to write a sample and render it to ``DIR/report.html``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pandas as pd

#: The table users want (DESIGN.md): pipeline -> (it/s per batch 1/2/4/8/16, cpu GB, gpu GB).
DESIGN_TABLE: dict[tuple[str, str, str], tuple[tuple[float, ...], float, float]] = {
    ("original", "none", "hub"): ((7.99, 7.93, 8.83, 9.14, 9.2), 6.7, 7.2),
    ("original", "medvram", "hub"): ((6.23, 7.16, 8.41, 9.24, 9.68), 8.4, 6.8),
    ("original", "lowvram", "hub"): ((1.05, 1.94, 3.2, 4.81, 6.46), 8.8, 5.2),
    ("diffusers", "none", "hub"): ((9.0, 7.4, 8.2, 8.4, 7.0), 4.3, 9.0),
    ("diffusers", "medvram", "hub"): ((7.5, 6.7, 7.5, 7.8, 7.2), 6.6, 8.2),
    ("diffusers", "lowvram", "hub"): ((7.0, 7.0, 7.4, 7.7, 7.8), 4.3, 7.2),
    ("diffusers", "none", "safetensors"): ((8.9, 7.3, 8.1, 8.4, 7.1), 5.9, 9.0),
}
BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
STEPS = 20

SAMPLE_ENV: dict[str, Any] = {
    "gpu_name": "NVIDIA GeForce RTX 3060",
    "gpu_count": 1,
    "gpu_memory_gb": 12.0,
    "driver": "550.54.14",
    "cuda": "12.4",
    "torch": "2.13.0",
    "diffusers": "0.42.1",
    "transformers": "5.24.0",
    "accelerate": "1.10.0",
    "safetensors": "0.5.3",
    "huggingface_hub": "0.34.4",
    "python": "3.11.9",
    "cpu": "AMD Ryzen 7 5800X",
    "cpu_count": 16,
    "ram_gb": 62.7,
    "os": "Linux 6.8.0",
    "harness_commit": "0123456789abcdef",
}


def _cell(scenario: str, cell_id: str, **axes: Any) -> Any:
    from harness.matrix import Cell

    values: dict[str, Any] = {
        "scenario": scenario,
        "scenario_path": f"scenarios/{scenario}.yaml",
        "scenario_fingerprint": "f" * 16,
        "id": cell_id,
        "backend": "diffusers",
        "model": "sd15",
        "source": "hub",
        "workflow": "txt2img",
        "device": "cuda",
        "dtype": "fp16",
        "offload": "none",
        "compile": "none",
        "fullgraph": False,
        "attention": "sdp",
        "channels_last": False,
        "sampler": "euler",
        "width": 512,
        "height": 512,
        "steps": STEPS,
        "guidance": 7.5,
        "seed": 0,
        "batch": 1,
        "prompt": "a photograph of an astronaut riding a horse",
        "negative_prompt": "",
        "repeats": 3,
        "warmup": 1,
        "timeout_s": None,
    }
    values.update(axes)
    return Cell(**values)


def metrics_for(its: float, batch: int, steps: int, cpu_gb: float,
                gpu_gb: float | None) -> dict[str, Any]:
    """Plausible, self-consistent figures for a cell measured at ``its`` it/s."""
    repeats = [its * 0.99, its, its * 1.01]
    wall = batch * steps / its
    step_ms = wall * 0.9 / steps * 1000
    return {
        "its": its,
        "its_min": min(repeats),
        "its_max": max(repeats),
        "its_cv": 0.0082,
        "its_repeats": repeats,
        "denoise_its": its / 0.9,
        "denoise_its_repeats": [r / 0.9 for r in repeats],
        "wall_s": wall,
        "wall_s_repeats": [batch * steps / r for r in repeats],
        "encode_s": wall * 0.02,
        "denoise_s": wall * 0.9,
        "decode_s": wall * 0.08,
        "step_ms_median": step_ms,
        "step_ms_p10": step_ms * 0.97,
        "step_ms_p90": step_ms * 1.04,
        "step_ms_min": step_ms * 0.95,
        "step_ms_max": step_ms * 1.2,
        "first_call_s": wall * 1.8,
        "load_s": 4.2,
        "cpu_peak_gb": cpu_gb,
        "cpu_rss_sampled_gb": cpu_gb * 0.98,
        "cpu_rss_os_peak_gb": cpu_gb,
        "gpu_allocated_peak_gb": gpu_gb,
        "gpu_reserved_peak_gb": None if gpu_gb is None else gpu_gb * 1.1,
        "gpu_device_used_peak_gb": None if gpu_gb is None else gpu_gb * 1.15,
        "gpu_alloc_retries": None if gpu_gb is None else 0,
        "gpu_ooms": None if gpu_gb is None else 0,
        "load_cpu_peak_gb": cpu_gb * 0.8,
        "load_gpu_allocated_peak_gb": None if gpu_gb is None else gpu_gb * 0.5,
        "repeats_done": len(repeats),
        "output_shape": [batch, 512, 512, 3],
        "output_shape_ok": True,
        "output_finite": True,
        "output_std": 0.21,
        "output_constant": False,
    }


def _write_preview(directory: Path, relative: str, shade: int) -> None:
    from PIL import Image

    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), (shade, 96, 255 - shade))
    for x in range(0, 64, 8):
        for y in range(0, 64, 8):
            if (x + y) // 8 % 2:
                image.paste((255 - shade, shade, 128), (x, y, x + 8, y + 8))
    image.save(path)


def write_sample(
    directory: str | Path,
    *,
    run_id: str = "sample-run",
    scale: float = 1.0,
    env: dict[str, Any] | None = None,
    timestamp: str = "2025-01-01T00:00:00+00:00",
    failures: bool = True,
    images: bool = True,
    conformance: bool = False,
) -> Path:
    """Write sample results to ``directory`` and return it (see the module docstring).

    ``scale`` multiplies every it/s; ``env`` replaces the environment; ``failures`` adds the
    CPU cells that error, run out of memory or are unsupported (with ``<script>`` in their
    messages, to exercise escaping); ``conformance`` adds the ``conformance`` scenario of
    :data:`CONFORMANCE_CELLS` (checks and parity on two backends).
    """
    from harness.results import Result, ResultStore

    directory = Path(directory)
    store = ResultStore(directory)
    environment = dict(SAMPLE_ENV if env is None else env)
    fingerprint = hashlib.sha256(repr(sorted(environment.items())).encode()).hexdigest()[:12]
    for (backend, offload, source), (its_values, cpu, gpu) in DESIGN_TABLE.items():
        for batch, its in zip(BATCHES, its_values, strict=True):
            parts = [backend, {"none": "nooffload"}.get(offload, offload), source, f"b{batch}"]
            cell = _cell("sd15-table", "-".join(parts), backend=backend, offload=offload,
                         source=source, batch=batch)
            metrics = metrics_for(its * scale, batch, STEPS, cpu, gpu)
            if images:
                metrics["image"] = f"images/sd15-table--{cell.id}.png"
                _write_preview(directory, metrics["image"], (batch * 40 + len(backend)) % 256)
            store.append(Result(run_id=run_id, cell=cell, status="ok", metrics=metrics,
                                env=environment, env_fingerprint=fingerprint,
                                timestamp=timestamp))
    if failures:
        smoke = {"model": "tiny", "device": "cpu", "dtype": "fp32", "width": 64, "height": 64,
                 "steps": 4, "prompt": "a <script>alert('prompt')</script> & friends"}
        ok = _cell("smoke", "diffusers-b1", **smoke)
        metrics = metrics_for(12.5 * scale, 1, 4, 0.61, None)
        store.append(Result(run_id=run_id, cell=ok, status="ok", metrics=metrics,
                            env=environment, env_fingerprint=fingerprint, timestamp=timestamp))
        store.append(Result(
            run_id=run_id, cell=_cell("smoke", "diffusers-b2", batch=2, **smoke), status="error",
            reason="ValueError: bad <script>alert('error')</script> value",
            error_type="ValueError",
            traceback='Traceback (most recent call last):\n  File "x.py", line 1\n'
                      "ValueError: bad <script>alert('tb')</script> value",
            env=environment, env_fingerprint=fingerprint, timestamp=timestamp,
        ))
        store.append(Result(
            run_id=run_id, cell=_cell("smoke", "diffusers-b4", batch=4, **smoke), status="oom",
            reason="CUDA out of memory. Tried to allocate 2.00 GiB", error_type="OutOfMemoryError",
            env=environment, env_fingerprint=fingerprint, timestamp=timestamp,
        ))
        store.append(Result(
            run_id=run_id,
            cell=_cell("smoke", "diffusers-lowvram-b1", offload="lowvram", **smoke),
            status="unsupported",
            reason="sequential CPU offload needs an accelerator; this machine has none",
            env=environment, env_fingerprint=fingerprint, timestamp=timestamp,
        ))
    if conformance:
        _write_conformance(store, directory, run_id, environment, fingerprint, timestamp,
                           images, scale)
    return directory


#: The conformance sample: ``(cell id, axes, status, reason, checks, parity)`` per cell;
#: ``checks`` maps a check name to ``(status, detail, value[, finding])``, ``parity`` is
#: ``(reference cell id, latent rel. error, PSNR dB, status)``. It has one of each outcome:
#: pass, fail (a failed check, a check that raised, a cell that errored), differs and
#: unsupported, and reasons with ``<script>`` in them to exercise escaping.
CONFORMANCE_CELLS: tuple[tuple[str, dict[str, Any], str, str | None,
                               dict[str, tuple[Any, ...]],
                               tuple[str, float, float, str] | None], ...] = (
    ("original-txt2img-euler", {"backend": "original"}, "ok", None, {
        "determinism": ("pass", "same seed twice: identical images", 0.0),
        "long_prompt": ("pass", "keeps long prompts: tokens past 77 change the output "
                                "(latent rel. error 0.0619)", 0.0619, "keeps"),
    }, None),
    ("diffusers-txt2img-euler", {}, "ok", None, {
        "determinism": ("pass", "same seed twice: identical images", 0.0),
        "long_prompt": ("pass", "truncates at 77 tokens: tokens past 77 change nothing", 0.0,
                        "truncates"),
    }, ("original-txt2img-euler", 3.0979e-06, 86.0153, "pass")),
    ("original-txt2img-dpmpp_2m", {"backend": "original", "sampler": "dpmpp_2m"}, "ok", None, {
        "determinism": ("pass", "same seed twice: identical images", 0.0),
    }, None),
    ("diffusers-txt2img-dpmpp_2m", {"sampler": "dpmpp_2m"}, "ok", None, {
        "determinism": ("pass", "same seed twice: identical images", 0.0),
    }, ("original-txt2img-dpmpp_2m", 0.70890, 19.6937, "differs")),
    ("original-img2img", {"backend": "original", "workflow": "img2img", "strength": 0.5},
     "unsupported", "img2img is <b>not</b> implemented <script>alert('unsupported')</script>",
     {}, None),
    ("diffusers-img2img", {"workflow": "img2img", "strength": 0.5}, "ok", None, {
        "determinism": ("pass", "same seed twice: identical images", 0.0),
        "img2img_strength0": ("differs", "strength 0: latents differ from the input's by 0.0123",
                              0.0123),
    }, None),
    ("original-inpaint", {"backend": "original", "workflow": "inpaint",
                          "model": "tiny-inpaint"},
     "error", "ValueError: mask <script>alert('mask')</script> is 32x32, expected 64x64",
     {}, None),
    ("diffusers-inpaint", {"workflow": "inpaint", "model": "tiny-inpaint"}, "ok", None, {
        "inpaint_keeps_unmasked": ("pass", "unmasked latents unchanged (rel. error 2e-07)", 2e-07),
    }, None),
    ("original-lora", {"backend": "original", "lora": "zoo:style@0.5+zoo:detail@1"}, "ok", None, {
        "lora_strength0": ("pass", "strength 0 equals no LoRA (rel. error 0)", 0.0),
        "lora_monotonic": ("pass", "distance from no LoRA grows with strength: 0.02, 0.04, 0.07",
                           0.07),
        "lora_merged": ("pass", "LoRAs at (0.5, 1) equal the weights merged by hand "
                                "(latent rel. error 1e-06)", 1e-06),
    }, None),
    ("diffusers-lora", {"lora": "zoo:style@0.5+zoo:detail@1"}, "ok", None, {
        "lora_strength0": ("pass", "strength 0 equals no LoRA (rel. error 0)", 0.0),
        "lora_monotonic": ("fail", "distance from no LoRA at 0.25/0.5/1.0 not increasing: 0, 0, 0",
                           0.0),
        "lora_merged": ("differs", "LoRAs at (0.5, 1) differ from the merged weights by 0.618 "
                                   "(relative)", 0.618),
    }, ("original-lora", 2.1e-04, 41.23, "pass")),
    ("original-embedding", {"backend": "original", "embedding": "zoo:sbstyle"}, "ok", None, {
        "embedding_effect": ("pass", "trigger word(s) sbstyle change the output (rel. 0.2)", 0.2),
        "embedding_by_hand": ("error", "KeyError: 'string_to_param' <script>alert('check')"
                                       "</script>", None),
    }, None),
    ("diffusers-embedding", {"embedding": "zoo:sbstyle"}, "unsupported",
     "textual inversion needs transformers' tokenizer <i>add_tokens</i>", {}, None),
)


def _write_conformance(store: Any, directory: Path, run_id: str, environment: dict[str, Any],
                       fingerprint: str, timestamp: str, images: bool, scale: float) -> None:
    """The ``conformance`` scenario of :data:`CONFORMANCE_CELLS` (tiny, CPU, fp32)."""
    from harness.results import Result

    base = {"model": "tiny", "device": "cpu", "dtype": "fp32", "width": 64, "height": 64,
            "steps": 4, "source": "safetensors", "repeats": 1, "warmup": 0,
            "checks": ("determinism", "semantics", "parity")}
    for index, (cell_id, axes, status, reason, checks, parity) in enumerate(CONFORMANCE_CELLS):
        cell = _cell("conformance", cell_id, **{**base, **axes})
        if status != "ok":
            store.append(Result(run_id=run_id, cell=cell, status=status, reason=reason,
                                error_type="ValueError" if status == "error" else None,
                                env=environment, env_fingerprint=fingerprint,
                                timestamp=timestamp))
            continue
        metrics = metrics_for(8.0 * scale, 1, 4, 0.5, None)
        metrics["output_shape"] = [1, 64, 64, 3]
        found = {name: {"status": st, "detail": detail, "value": value,
                        "finding": finding[0] if finding else None}
                 for name, (st, detail, value, *finding) in checks.items()}
        if parity is not None:
            ref, error, quality, verdict = parity
            metrics.update(parity_ref=ref, parity_ref_backend="original",
                           parity_latent_rel_err=error, parity_psnr_db=quality,
                           parity_status=verdict)
            found["parity"] = {
                "status": verdict, "value": error,
                "detail": f"vs {ref}: latent rel. error {error:.3g}, PSNR {quality:.1f} dB "
                          f"(limits 0.001, 40 dB for fp32)",
            }
        metrics["check_results"] = found
        metrics["checks_failed"] = sum(c["status"] in ("fail", "error") for c in found.values())
        if images:
            metrics["image"] = f"images/conformance--{cell_id}.png"
            _write_preview(directory, metrics["image"], (index * 37 + 11) % 256)
        store.append(Result(run_id=run_id, cell=cell, status="ok", metrics=metrics,
                            env=environment, env_fingerprint=fingerprint, timestamp=timestamp))


def sample_verdicts() -> pd.DataFrame:
    """Hand-written verdicts on the sample's cells, one of each kind."""
    rows = [
        ("sd15-table", "diffusers-nooffload-hub-b4", "its", 8.2, 7.2, -0.122, "regression",
         0.008, 0.05, None),
        ("sd15-table", "diffusers-nooffload-hub-b1", "its", 9.0, 9.05, 0.0056, "unchanged",
         0.69, 0.05, None),
        ("sd15-table", "original-lowvram-hub-b1", "its", 0.95, 1.05, 0.105, "improvement",
         0.008, 0.05, None),
        ("sd15-table", "diffusers-medvram-hub-b2", "gpu_allocated_peak_gb", 7.2, 8.2, 0.139,
         "regression", 0.008, 0.10, None),
        ("sd15-table", "diffusers-lowvram-hub-b16", "its", None, 7.8, None, "new", None, 0.05,
         "not in the baseline"),
        ("sd15-table", "diffusers-lowvram-hub-b32", "its", 7.9, None, None, "missing", None,
         0.05, "not in the current run"),
        ("smoke", "diffusers-b1", "its", 12.0, 12.5, 0.042, "not comparable", None, 0.05,
         "gpu_name differs: <b>A100</b> vs RTX 3060"),
    ]
    columns = ["scenario", "cell_id", "metric", "baseline", "current", "change", "verdict",
               "p_value", "threshold", "note"]
    return pd.DataFrame(rows, columns=columns)


def main(argv: list[str] | None = None) -> int:
    from harness.results import load
    from reports.render import render

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m reports.sample DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    current = write_sample(out / "current", run_id="current", scale=1.0, conformance=True)
    baseline = write_sample(out / "baseline", run_id="baseline", scale=1.03,
                            timestamp="2024-12-01T00:00:00+00:00")
    html = render(load(current), "html", baseline=load(baseline), verdicts=sample_verdicts(),
                  image_root=current)
    (out / "report.html").write_text(html, encoding="utf-8")
    print(f"wrote {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
