"""Baselines kept per environment fingerprint.

A baselines root (default ``.sdbench/baselines``) holds one results store per environment::

    .sdbench/baselines/<env fingerprint>/results.jsonl    newest record of every cell
    .sdbench/baselines/<env fingerprint>/environment.json the environment, for people

``python -m harness baseline save RESULTS`` merges a run's records into the store of their
fingerprint (a cell's newer record replaces its older one); ``baseline show`` lists them.
Wherever a baseline is asked for (``compare BASELINE``, ``pytest --bench-baseline PATH``) the
path may be a results directory, a ``.jsonl`` file, or a baselines root — from a root, the
baseline of the current run's environment is chosen, or, where there is none, the newest one
(its cells are then reported ``not comparable``, saying what differs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from harness.errors import UserError
from harness.results import RESULTS_FILE, Result, ResultStore, iter_results

ENVIRONMENT_FILE = "environment.json"


def is_root(path: Path) -> bool:
    """A directory of per-fingerprint baselines (not itself a results directory)."""
    return (
        path.is_dir()
        and not (path / RESULTS_FILE).exists()
        and any(child.is_dir() and (child / RESULTS_FILE).exists() for child in path.iterdir())
    )


def stores(root: Path) -> dict[str, Path]:
    """Fingerprint -> results file of every baseline under ``root``."""
    if not root.is_dir():
        return {}
    return {
        child.name: child / RESULTS_FILE
        for child in sorted(root.iterdir())
        if child.is_dir() and (child / RESULTS_FILE).exists()
    }


def fingerprint_of(frame: pd.DataFrame) -> str | None:
    """The environment fingerprint of a results frame's newest record (None when empty)."""
    if frame.empty or "env_fingerprint" not in frame:
        return None
    return str(frame["env_fingerprint"].iloc[-1])


def resolve(path: str | Path, fingerprint: str | None) -> Path:
    """The results file to use as the baseline for a run with environment ``fingerprint``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such baseline (expected a results dir, a .jsonl file "
                        "or a baselines root)")
    if not is_root(path):
        return path
    found = stores(path)
    if fingerprint in found:
        return found[str(fingerprint)]
    newest = max(found.values(), key=lambda file: file.stat().st_mtime)
    print(
        f"sdbench: no baseline for environment {fingerprint} in {path}; using {newest.parent.name}"
        " (its cells are not comparable)",
        file=sys.stderr,
    )
    return newest


def save(results: str | Path, root: str | Path) -> dict[str, Path]:
    """Merge a run's records into the baselines of their environments; fingerprint -> file.

    Failed and unsupported records are kept too, so a baseline says what did not run.
    """
    by_fingerprint: dict[str, dict[tuple[str, str], Result]] = {}
    for result in iter_results(results):
        key = (result.cell.scenario, result.cell.id)
        by_fingerprint.setdefault(result.env_fingerprint, {})[key] = result
    if not by_fingerprint:
        raise UserError(f"{results}: no result records to save as a baseline")
    written: dict[str, Path] = {}
    for fingerprint, records in by_fingerprint.items():
        if not fingerprint:
            raise UserError(f"{results}: a record has no env_fingerprint; re-run it")
        directory = Path(root) / fingerprint
        merged: dict[tuple[str, str], Result] = {}
        if (directory / RESULTS_FILE).exists():
            for old in iter_results(directory):
                merged[(old.cell.scenario, old.cell.id)] = old
        merged.update(records)
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / (RESULTS_FILE + ".tmp")
        temporary.unlink(missing_ok=True)
        store = ResultStore(directory)
        store.path = temporary
        for result in merged.values():
            store.append(result)
        temporary.replace(directory / RESULTS_FILE)
        env = next(iter(records.values())).env
        (directory / ENVIRONMENT_FILE).write_text(
            json.dumps(env, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        written[fingerprint] = directory / RESULTS_FILE
    return written


def describe(root: str | Path) -> list[str]:
    """One line per baseline: fingerprint, GPU (or CPU), torch, number of cells."""
    lines = []
    for fingerprint, file in stores(Path(root)).items():
        records = list(iter_results(file))
        env = records[-1].env if records else {}
        device = env.get("gpu_name") or f"CPU {env.get('cpu', '?')}"
        ok = sum(record.status == "ok" for record in records)
        lines.append(
            f"{fingerprint}  {device}  torch {env.get('torch', '?')}  "
            f"diffusers {env.get('diffusers', '?')}  {len(records)} cells ({ok} ok)  {file}"
        )
    return lines


def _cmd_save(args: argparse.Namespace) -> int:
    for fingerprint, file in save(args.results, args.dir).items():
        print(f"saved baseline for environment {fingerprint} to {file}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    lines = describe(args.dir)
    if not lines:
        print(f"no baselines in {args.dir}")
    for line in lines:
        print(line)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``baseline save RESULTS`` and ``baseline show`` to ``python -m harness``."""
    from harness.options import DEFAULT_BASELINES

    parser = subparsers.add_parser("baseline", help="keep baselines per environment")
    commands = parser.add_subparsers(dest="baseline_command", required=True)
    save_parser = commands.add_parser("save", help="save a run as the baseline of its environment")
    save_parser.add_argument("results", type=Path, metavar="RESULTS",
                             help="a results dir or .jsonl file")
    save_parser.add_argument("--dir", type=Path, default=DEFAULT_BASELINES,
                             help=f"baselines root (default {DEFAULT_BASELINES})")
    save_parser.set_defaults(handler=_cmd_save)
    show_parser = commands.add_parser("show", help="list the saved baselines")
    show_parser.add_argument("--dir", type=Path, default=DEFAULT_BASELINES,
                             help=f"baselines root (default {DEFAULT_BASELINES})")
    show_parser.set_defaults(handler=_cmd_show)
