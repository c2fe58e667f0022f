"""End-to-end: the original backend's denoise it/s against diffusers' on the same file.

    python benchmarks/generate.py                      # sd15, 128 px, 8 steps, euler, CPU fp32
    python benchmarks/generate.py --file zoo --steps 4
    python benchmarks/generate.py --device cuda --dtype fp16 --resolution 512 --steps 20
    python benchmarks/generate.py --quick

Both backends load the same single file (``benchmarks/files.py``) in this process and run the
same cell (CFG, the harness's noise) alternately, each round one harness measurement per
backend (:class:`harness.execute.CellExecutor`: warm-up, timed repeats); the ratio is
original / diffusers of ``denoise_its`` (``batch × steps / denoise time``) and of ``its``
(the whole generation). Target: ≥ 0.95 for both files.
"""

from __future__ import annotations

from typing import Any

from _common import Ratio, interleave, parser, print_ratios, setup_threads, write_json
from files import FILES, model_file


def measure(model: str, file: str, resolution: int, steps: int, batch: int, device: str,
            dtype: str, repeats: int, rounds: int) -> list[Ratio]:
    import dataclasses

    from overhead import make_cell

    from harness.execute import CellExecutor

    reference = model if file == "zoo" else str(model_file(model, file))
    executors: dict[str, tuple[Any, Any]] = {}
    for backend in ("original", "diffusers"):
        cell = make_cell(backend, reference, "safetensors", resolution, steps, batch, device,
                         repeats)
        cell = dataclasses.replace(cell, dtype=dtype)
        executor = CellExecutor(None, run_id="generate", save_images=False)
        first = executor.run(cell).result
        if first.status != "ok":
            raise SystemExit(f"{backend}: {first.status}: {first.reason}")
        executors[backend] = (executor, cell)
    last: dict[str, dict[str, float]] = {}

    def run(backend: str) -> float:
        executor, cell = executors[backend]
        result = executor.run(cell).result
        assert result.status == "ok", result.reason
        last[backend] = result.metrics
        return float(result.metrics["denoise_its"])

    name = f"{model} ({file} file, {dtype}) {resolution}px b{batch} {steps} steps"
    its_o: list[float] = []
    its_d: list[float] = []

    def original() -> float:
        value = run("original")
        its_o.append(last["original"]["its"])
        return value

    def diffusers() -> float:
        value = run("diffusers")
        its_d.append(last["diffusers"]["its"])
        return value

    denoise = interleave(f"denoise it/s {name}", ("original", original),
                         ("diffusers", diffusers), rounds, unit=" it/s")
    whole = Ratio(f"it/s {name}", "original", "diffusers",
                  tuple(o / d for o, d in zip(its_o, its_d, strict=True)), tuple(its_o),
                  tuple(its_d), " it/s", "original / diffusers")
    for executor, _cell in executors.values():
        executor.close()
    return [denoise, whole]


def main(argv: list[str] | None = None) -> int:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--model", default=None, help="zoo model (default sd15)")
    args_parser.add_argument("--file", choices=sorted(FILES), nargs="+", default=None,
                             help="default: both (zoo only with --quick)")
    args_parser.add_argument("--dtype", default="fp32")
    args_parser.add_argument("--resolution", type=int, default=128)
    args_parser.add_argument("--steps", type=int, default=8)
    args_parser.add_argument("--batch", type=int, default=1)
    args_parser.add_argument("--repeats", type=int, default=1)
    args = args_parser.parse_args(argv)
    setup_threads(args.threads)
    model = args.model or ("tiny" if args.quick else "sd15")
    files = args.file or (["zoo"] if args.quick else ["community", "zoo"])
    rounds = args.rounds or (2 if args.quick else 6)
    resolution = 64 if args.quick else args.resolution
    ratios = []
    for file in files:
        found = measure(model, file, resolution, args.steps, args.batch, args.device,
                        args.dtype, args.repeats, rounds)
        for ratio in found:
            print(ratio.line(), flush=True)
        ratios += found
    print_ratios("original / diffusers (≥ 0.95 is the target)", ratios)
    write_json(args.json, [ratio.to_dict() for ratio in ratios])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
