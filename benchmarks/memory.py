"""CPU and GPU memory of both backends loading the same file, each in a fresh process.

    python benchmarks/memory.py                        # sd15, 128 px, 4 steps, CPU fp32
    python benchmarks/memory.py --device cuda --dtype fp16 --resolution 512
    python benchmarks/memory.py --quick                # tiny

Each (backend, file) runs as one scenario cell in a worker of its own (``--isolate cell``), so
no figure carries memory over from another: the load's CPU peak (``load_cpu_peak_gb``), the
generation's (``cpu_peak_gb``, the figure of the table) and the model's share of it
(``cpu_model_gb``, the peak less the worker's RSS before the load), and on a GPU the
allocated peak. The ratio is original / diffusers (target ≤ 1.10): the original backend must
not keep a second copy of the checkpoint's tensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from _common import parser, write_json
from files import FILES, model_file

FIGURES = ("load_cpu_peak_gb", "cpu_peak_gb", "cpu_model_gb", "gpu_allocated_peak_gb")


def run_cells(model: str, files: list[str], device: str, dtype: str, resolution: int,
              steps: int, out: Path) -> list[Any]:
    from harness.matrix import expand
    from harness.runner import Runner
    from harness.scenario import Scenario

    cells = []
    for file in files:
        reference = model if file == "zoo" else str(model_file(model, file))
        scenario = Scenario.model_validate({
            "name": f"memory-{file}", "repeats": 1, "warmup": 1,
            "matrix": {"backend": ["original", "diffusers"], "model": reference,
                       "source": "safetensors", "device": device, "dtype": dtype,
                       "resolution": resolution, "steps": steps, "batch": 1},
        })
        cells += expand(scenario)
    return Runner(out, isolate="cell", progress=False, save_images=False).run(cells)


def main(argv: list[str] | None = None) -> int:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--model", default=None, help="zoo model (default sd15)")
    args_parser.add_argument("--file", choices=sorted(FILES), nargs="+", default=None,
                             help="default: both (zoo only with --quick: the tiny model's "
                                  "shapes are not recognisable without metadata)")
    args_parser.add_argument("--dtype", default="fp32")
    args_parser.add_argument("--resolution", type=int, default=None)
    args_parser.add_argument("--steps", type=int, default=4)
    args_parser.add_argument("--out", type=Path, default=None, help="keep the results here")
    args = args_parser.parse_args(argv)
    model = args.model or ("tiny" if args.quick else "sd15")
    files = args.file or (["zoo"] if args.quick else ["community", "zoo"])
    resolution = args.resolution or (64 if args.quick else 128)
    out = args.out or Path(tempfile.mkdtemp(prefix="sdbench-memory-"))
    results = run_cells(model, files, args.device, args.dtype, resolution, args.steps, out)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results:
        if result.status != "ok":
            raise SystemExit(f"{result.cell.id}: {result.status}: {result.reason}")
        file = result.cell.scenario.removeprefix("memory-")
        rows.setdefault(file, {})[result.cell.backend] = {
            figure: result.metrics.get(figure) for figure in FIGURES
        }
    print(f"# memory, {model} {resolution}px {args.steps} steps {args.dtype} on {args.device}: "
          "original / diffusers (≤ 1.10 is the target)")
    summary = []
    for file, by_backend in rows.items():
        for figure in FIGURES:
            o, d = by_backend["original"][figure], by_backend["diffusers"][figure]
            if o is None or d is None:
                continue
            ratio = o / d if d else float("nan")
            summary.append({"file": file, "figure": figure, "original": o, "diffusers": d,
                            "ratio": ratio})
            print(f"{file:>9} {figure:<22} original {o:7.3f} GB  diffusers {d:7.3f} GB  "
                  f"ratio {ratio:.3f}")
    write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
