"""``python -m harness``: run scenarios, render reports, manage the model zoo.

Exit status: 0 every cell ran (ok or unsupported); 1 some cell failed (error, oom, timeout,
crashed) or a regression was found, or the run was interrupted; 2 bad input (printed as one
line, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.errors import UserError
from harness.options import add_isolate_option

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad usage, which is our 'bad input' status too."""


def _cmd_run(args: argparse.Namespace) -> int:
    from harness import plan
    from harness.matrix import expand, group_by_load
    from harness.runner import Runner, any_failed
    from harness.scenario import load_scenario

    scenarios = [load_scenario(path) for path in args.scenarios]  # all validated first
    cells = [cell for scenario in scenarios for cell in expand(scenario)]
    if args.select:
        cells = [cell for cell in cells if all(part in cell.nodeid for part in args.select)]
        if not cells:
            raise UserError(f"--select {' '.join(args.select)}: no cell id matches")
    if args.shard is not None:
        index, count = plan.parse_shard(args.shard)
        cells = [cell for group in plan.shard(group_by_load(cells), index, count) for cell in group]
    if args.list:
        for cell in cells:
            print(f"{cell.nodeid}  (load group: {', '.join(map(str, cell.load_key()))})")
        return EXIT_OK
    gpus = _parse_gpus(args.gpus)
    if args.isolate == "none" and len(gpus) > 1:
        raise UserError("--gpus: several GPUs need worker processes; drop --isolate none")
    runner = Runner(
        args.out,
        progress=not args.quiet,
        save_images=not args.no_images,
        isolate=args.isolate,
        gpus=gpus,
    )
    if args.resume or args.rerun_failed:
        total = len(cells)
        cells = runner.pending(cells, rerun_failed=args.rerun_failed)
        if not args.quiet:
            print(f"resuming: {total - len(cells)} of {total} cells already have a record")
    for finding in runner.env.get("doctor", []):  # recorded with every result; say it now
        if finding["status"] == "fail":
            print(f"doctor: fail: {finding['check']}: {finding['detail']}", file=sys.stderr)
    results = runner.run(cells)
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    print(
        f"{len(results)} cells: {summary or 'none to run'}; "
        f"results in {runner.store.path if runner.store else '-'}"
    )
    return EXIT_FAILED if any_failed(results) else EXIT_OK


def _parse_gpus(text: str | None) -> list[str]:
    """``--gpus 0,1`` → ["0", "1"]; ``auto`` → every CUDA device (none on a CPU machine)."""
    if text is None:
        return []
    if text.strip() == "auto":
        import torch

        return [str(index) for index in range(torch.cuda.device_count())]
    gpus = [part.strip() for part in text.split(",")]
    if not gpus or not all(part.isdigit() for part in gpus) or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus: expected 'auto' or distinct GPU indices like 0,1, got {text!r}")
    return gpus


def _cmd_report(args: argparse.Namespace) -> int:
    from harness.results import load
    from reports import render

    frame = load(args.results)
    baseline = None
    if args.baseline is not None:
        from harness import baseline as baselines

        baseline = load(baselines.resolve(args.baseline, baselines.fingerprint_of(frame)))
    from harness.ab import load_ab

    ab = [record for directory in args.results for record in load_ab(directory)]
    text = render(frame, fmt=args.format, baseline=baseline, image_root=args.results, ab=ab)
    if args.output is None or str(args.output) == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    return EXIT_OK


def _cmd_models_list(args: argparse.Namespace) -> int:
    from models import list_models

    for info in list_models():
        params = info.get("parameters", {})
        counts = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in params.items())
        cached = ", ".join(info.get("cached_formats", [])) or "none"
        print(f"{info['name']:13} {info['description']}")
        print(f"{'':13} parameters: {counts}; cached formats: {cached}")
    return EXIT_OK


def _cmd_models_write(args: argparse.Namespace) -> int:
    from models import write_model

    path = write_model(args.name, args.format, Path(args.out))
    print(f"wrote {args.name} ({args.format}) to {path}")
    return EXIT_OK


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    import time

    from models import materialize_formats

    start = time.perf_counter()
    paths = materialize_formats(args.name, args.format)
    for fmt, path in paths.items():
        print(f"{args.name} ({fmt}): {path}")
    print(f"ready in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    import time

    from models import fetch

    start = time.perf_counter()
    path = fetch(args.reference, args.revision)
    print(f"{args.reference}: {path}")
    print(f"in the Hugging Face cache in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run scenario files and store the results")
    run.add_argument("scenarios", nargs="+", type=Path, metavar="SCENARIO")
    run.add_argument("--out", type=Path, default=Path("results"), help="results directory")
    run.add_argument(
        "--select",
        nargs="+",
        default=[],
        metavar="TEXT",
        help="only cells whose id (file::cell) contains every TEXT",
    )
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--list", action="store_true",
                     help="print the cells the scenarios expand to (after --select, --shard) "
                     "and run nothing")
    run.add_argument("--no-images", action="store_true", help="do not save preview images")
    add_isolate_option(run.add_argument, "")
    run.add_argument(
        "--resume",
        action="store_true",
        help="run only the cells without a record in --out (same cell and environment)",
    )
    run.add_argument(
        "--rerun-failed",
        action="store_true",
        help="as --resume, and also redo cells recorded error / oom / timeout / crashed",
    )
    run.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="run the K-th of N deterministic parts of the load groups (CI matrices)",
    )
    run.add_argument(
        "--gpus",
        default=None,
        metavar="LIST",
        help="'auto' or GPU indices (0,1,...): one worker per GPU at a time, longest groups "
        "first",
    )
    run.set_defaults(handler=_cmd_run)

    report = commands.add_parser("report", help="render results as HTML or Markdown")
    report.add_argument("results", nargs="+", type=Path, metavar="DIR")
    report.add_argument("-o", "--output", type=Path, default=None, help="output file (- = stdout)")
    report.add_argument("--format", choices=("html", "md"), default="html")
    report.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="PATH",
        help="baseline (results dir, .jsonl or baselines root): adds verdicts, deltas, charts",
    )
    report.set_defaults(handler=_cmd_report)

    models = commands.add_parser("models", help="the model zoo")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", help="list the zoo's models")
    listing.set_defaults(handler=_cmd_models_list)
    write = model_commands.add_parser("write", help="write a zoo model in a format to a path")
    write.add_argument("name")
    write.add_argument("--format", choices=("hub", "safetensors", "ckpt"), required=True)
    write.add_argument("--out", required=True, type=Path)
    write.set_defaults(handler=_cmd_models_write)
    prepare = model_commands.add_parser(
        "prepare", help="synthesise a zoo model into the cache (formats share one synthesis)"
    )
    prepare.add_argument("name")
    prepare.add_argument(
        "--format", nargs="+", choices=("hub", "safetensors", "ckpt"), default=["hub"]
    )
    prepare.set_defaults(handler=_cmd_models_prepare)
    fetch = model_commands.add_parser(
        "fetch",
        help="download hub:ORG/NAME[/FILE] into the Hugging Face cache ahead of a run",
    )
    fetch.add_argument("reference", metavar="hub:ORG/NAME[@REVISION][/FILE]")
    fetch.add_argument("--revision", default=None,
                       help="branch, tag or commit (default: the reference's, else main)")
    fetch.set_defaults(handler=_cmd_models_fetch)

    for register in _extra_commands():
        register(commands)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Sub-commands that live beside the code they drive (compare, baseline, ab, doctor)."""
    from harness import ab, baseline, compare, doctor

    return [compare.register, baseline.register, ab.register, doctor.register]


def main(argv: Sequence[str] | None = None) -> int:
    # transformers warns at import about optional image processors; not ours to show
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; finished cells are in the results file", file=sys.stderr)
        return EXIT_FAILED
    return code
