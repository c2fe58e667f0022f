"""``python -m harness ab``: base and head measured interleaved in one job, judged in pairs.

A **side** is what one arm of the comparison runs (:func:`resolve_side`): a git ref of a
repository (checked out into a worktree whose root goes first on the workers' ``PYTHONPATH``,
which is how source-tree apps run), a directory (first on ``PYTHONPATH`` as it is), or a
Python executable (another virtual environment with other versions of the backend's
packages). Each side's cells run in its own worker processes (:mod:`harness.launcher`).

Per cell, both sides' workers load the model and stay resident (if the second load runs out
of memory, the sides take turns and reload — with their warm-up — before each generation; the
record says which). After each side's warm-up, **rounds** of timed generations per side run
in a balanced order (ABBA / BAAB per pair of rounds, drawn from a recorded seed) so that
linear drift cancels. A round is one generation per side where a generation lasts
:data:`ROUND_MIN_S` or more; a faster one is repeated within the round (the same count on both
sides, recorded as ``repeats_per_round``), the sides taking turns generation by generation
(ABBA within the round too), and a side's figure for the round is the median of its
generations (memory: the largest peak).
Every ``2`` rounds from ``min_rounds`` on, the per-round it/s ratios
head / base are judged (:mod:`harness.paired`); an ``inconclusive`` cell gets more rounds, up
to ``max_rounds``. Memory figures come from each side's own worker, per round, and are
judged the same way. The two sides must run on the same hardware (:data:`SAME_ON_BOTH_SIDES`)
or the cell is ``not comparable`` with the difference named; package versions and commits
may differ — that is what is being compared — and are recorded.

Output: every round's record in ``DIR/results.jsonl`` (``metrics.ab_side``,
``metrics.ab_round``), one A/B record per cell in ``DIR/ab.jsonl``. Exit status 1 on any
regression or failed cell (and, with ``--strict``, on an inconclusive or not comparable
cell).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.launcher import Slot, WorkerSpec
from harness.matrix import Cell, group_by_load
from harness.paired import (
    DEFAULT_MAX_ROUNDS,
    DEFAULT_MIN_ROUNDS,
    PairedVerdict,
    balanced_orders,
    judge,
    settled,
)
from harness.results import Result, ResultStore, jsonable, newest

AB_FILE = "ab.jsonl"
#: Environment fields both sides must share for their numbers to be compared.
SAME_ON_BOTH_SIDES: tuple[str, ...] = (
    "gpu_name",
    "gpu_count",
    "driver",
    "cuda",
    "cpu",
    "os",
    "cuda_visible_devices",
)
#: The judged metrics: (name, higher is better, threshold kind). ``its`` decides the rounds.
AB_METRICS: tuple[tuple[str, bool, str], ...] = (
    ("its", True, "speed"),
    ("denoise_its", True, "speed"),
    ("cpu_peak_gb", False, "memory"),
    ("gpu_allocated_peak_gb", False, "memory"),
)
#: A round times each side for at least this long: a fast generation (a tiny model, a small
#: image) is repeated within the round, at most :data:`MAX_REPEATS_PER_ROUND` times, the sides
#: taking turns generation by generation, and a side's figure is the median of its
#: generations (timeit's autorange habit), so that one generation the machine disturbed
#: cannot swing a round. A generation as long as this runs once per round.
ROUND_MIN_S = 0.5
MAX_REPEATS_PER_ROUND = 8
#: Cell verdicts besides the paired ones.
CELL_FAILURES: tuple[str, ...] = ("error", "not comparable")


@dataclass
class Side:
    """One arm of an A/B comparison."""

    label: str
    given: str
    kind: str  # "ref" | "dir" | "python"
    spec: WorkerSpec
    commit: str | None = None
    worktree: Path | None = None
    repo: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {"side": self.given, "kind": self.kind, "commit": self.commit}

    def close(self) -> None:
        if self.worktree is not None and self.repo is not None:
            subprocess.run(
                ["git", "-C", str(self.repo), "worktree", "remove", "--force", str(self.worktree)],
                capture_output=True,
                check=False,
            )
            self.worktree = None


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )


def resolve_side(label: str, text: str, repo: Path, work_dir: Path) -> Side:
    """``--base`` / ``--head``: a Python executable, a directory or a git ref of ``repo``."""
    path = Path(text).expanduser()
    if path.is_file() and os.access(path, os.X_OK):
        return Side(label, text, "python", WorkerSpec(python=str(path.resolve()), fresh=True))
    if path.is_dir():
        return Side(label, text, "dir", WorkerSpec(pythonpath=(str(path.resolve()),), fresh=True))
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{text}^{{commit}}")
    if found.returncode != 0:
        raise UserError(
            f"--{label}: {text!r} is not a Python executable, a directory or a git ref of "
            f"{repo}"
        )
    commit = found.stdout.strip()
    tree = work_dir / f"{label}-{commit[:12]}"
    added = _git(repo, "worktree", "add", "--detach", "--force", str(tree), commit)
    if added.returncode != 0:
        raise UserError(f"--{label}: cannot check out {text} ({commit[:12]}): {added.stderr}")
    spec = WorkerSpec(pythonpath=(str(tree),), fresh=True)
    return Side(label, text, "ref", spec, commit=commit, worktree=tree, repo=repo)


@dataclass
class _Arm:
    side: Side
    slot: Slot
    env: dict[str, Any] = field(default_factory=dict)
    #: The warm-up generation's wall time (s): how many generations a round needs.
    warm_wall_s: float | None = None


def _cell_seed(seed: int, cell: Cell) -> int:
    return zlib.crc32(f"{seed}:{cell.scenario}:{cell.id}".encode())


def not_comparable(base: dict[str, Any], head: dict[str, Any]) -> str | None:
    """What differs between the sides' environments that must not, or None."""
    found = [
        f"{key}: {base.get(key)!r} vs {head.get(key)!r}"
        for key in SAME_ON_BOTH_SIDES
        if base.get(key) != head.get(key)
    ]
    return "; ".join(found) or None


class ABRunner:
    """Runs cells on both sides, interleaved, and judges each cell from paired rounds."""

    def __init__(
        self,
        base: Side,
        head: Side,
        out_dir: str | Path,
        *,
        min_rounds: int = DEFAULT_MIN_ROUNDS,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        seed: int = 0,
        progress: bool = True,
        thresholds: dict[str, dict[str, float]] | None = None,
    ) -> None:
        if not 6 <= min_rounds <= max_rounds:
            raise ValueError(f"need 6 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
        from harness.runner import new_run_id

        self.out_dir = Path(out_dir)
        self.store = ResultStore(self.out_dir)
        self.run_id = new_run_id()
        self.min_rounds, self.max_rounds, self.seed = min_rounds, max_rounds, seed
        self.progress = progress
        self.thresholds = thresholds or {}
        self._work = Path(tempfile.mkdtemp(prefix="sdbench-ab-"))
        self.arms = {
            side.label: _Arm(side, self._slot(side)) for side in (base, head)
        }

    def _slot(self, side: Side) -> Slot:
        return Slot(
            side.spec,
            run_id=self.run_id,
            work_dir=self.out_dir / "workers",
            payload_dir=self._work / side.label,
            out_dir=None,
            save_images=False,
            name=side.label,
        )

    # -- public -------------------------------------------------------------------------

    def run(self, cells: Iterable[Cell]) -> list[dict[str, Any]]:
        ordered = [cell for group in group_by_load(list(cells)) for cell in group]
        records = []
        try:
            for index, cell in enumerate(ordered, start=1):
                record = self.run_cell(cell)
                records.append(record)
                if self.progress:
                    print(f"[{index}/{len(ordered)}] {progress_line(record)}", flush=True)
        except BaseException:
            for arm in self.arms.values():
                arm.slot.kill()
            raise
        finally:
            self.close()
        return records

    def close(self) -> None:
        for arm in self.arms.values():
            arm.slot.close()
        import shutil

        shutil.rmtree(self._work, ignore_errors=True)

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        base, head = self.arms["base"], self.arms["head"]
        record: dict[str, Any] = {
            "schema_version": 1,
            "run_id": self.run_id,
            "scenario": cell.scenario,
            "cell_id": cell.id,
            "cell": cell.to_dict(),
            "seed": _cell_seed(self.seed, cell),
            "residency": "both",
        }
        warm = dataclasses.replace(cell, repeats=1, checks=())
        for arm in (base, head):
            result = arm.slot.run(warm)
            if result.result.status == "oom" and arm is head and base.slot.worker is not None:
                base.slot.close()  # both do not fit: take turns from now on
                record["residency"] = "one at a time"
                result = arm.slot.run(warm)
            if result.result.status != "ok":
                return self._finish(record, "error", f"{arm.side.label}: {_status(result.result)}")
            arm.env = result.result.env
            arm.warm_wall_s = result.result.metrics.get("wall_s")
        different = not_comparable(base.env, head.env)
        if different is not None:
            return self._finish(record, "not comparable", different)

        alternate = record["residency"] != "both"
        walls = [arm.warm_wall_s for arm in (base, head)]
        record["repeats_per_round"] = per_round = repeats_per_round(walls)
        # resident sides take turns generation by generation within a round; sides that
        # reload each time run their round's generations in one go after their warm-up
        turns, repeats = (1, per_round) if alternate else (per_round, 1)
        one = dataclasses.replace(cell, warmup=cell.warmup if alternate else 0,
                                  repeats=repeats, checks=())
        series: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
        orders = balanced_orders(self.max_rounds // 2 + 1, record["seed"])
        verdict: PairedVerdict | None = None
        for number, order in enumerate(orders[: self.max_rounds], start=1):
            ran_in_round: dict[str, list[Result]] = {"base": [], "head": []}
            for turn in range(turns):
                for label in order if turn % 2 == 0 else order[::-1]:
                    arm = self.arms[label]
                    if alternate:
                        self.arms["head" if label == "base" else "base"].slot.close()
                    ran = arm.slot.run(one).result
                    if ran.status != "ok":
                        return self._finish(record, "error",
                                            f"{label}, round {number}: {_status(ran)}")
                    metrics = {**ran.metrics, "ab_side": label, "ab_round": number,
                               "ab_turn": turn + 1}
                    self.store.append(dataclasses.replace(ran, run_id=self.run_id,
                                                          metrics=metrics))
                    ran_in_round[label].append(ran)
            for label, results in ran_in_round.items():
                series[label].append(round_figures(results))
            if number >= self.min_rounds and number % 2 == 0:
                verdict = self._judge("its", series, cell)
                if settled(verdict, self.max_rounds):
                    break
        record["order"] = [list(order) for order in orders[: len(series["base"])]]
        record["series"] = series
        verdicts = [self._judge(name, series, cell) for name, _, _ in AB_METRICS
                    if all(r.get(name) is not None for r in series["base"] + series["head"])]
        record["verdicts"] = [v.to_dict() for v in verdicts]
        return self._finish(record, verdicts[0].verdict, None)

    # -- internals ----------------------------------------------------------------------

    def _judge(
        self, name: str, series: dict[str, list[dict[str, Any]]], cell: Cell
    ) -> PairedVerdict:
        higher, kind = next((h, k) for n, h, k in AB_METRICS if n == name)
        limits = self.thresholds.get(cell.scenario, {})
        threshold = float(limits.get(kind, {"speed": 0.05, "memory": 0.10}[kind]))
        return judge(
            name,
            [float(r[name]) for r in series["base"]],
            [float(r[name]) for r in series["head"]],
            threshold,
            higher_is_better=higher,
        )

    def _finish(self, record: dict[str, Any], verdict: str, reason: str | None) -> dict[str, Any]:
        record["verdict"] = verdict
        record["reason"] = reason
        record["timestamp"] = datetime.now(UTC).isoformat(timespec="seconds")
        record["base"] = {**self.arms["base"].side.describe(), "env": self.arms["base"].env}
        record["head"] = {**self.arms["head"].side.describe(), "env": self.arms["head"].env}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / AB_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(jsonable(record), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record


def round_figures(results: Sequence[Result]) -> dict[str, Any]:
    """One side's figures of a round from its generations: the median of each speed metric,
    the largest memory peak, the median wall time."""
    figures: dict[str, Any] = {}
    for name, _higher, kind in AB_METRICS:
        values = [r.metrics.get(name) for r in results]
        known = [float(v) for v in values if v is not None]
        if len(known) != len(values) or not known:
            figures[name] = None
        else:
            figures[name] = statistics.median(known) if kind == "speed" else max(known)
    walls = [float(r.metrics["wall_s"]) for r in results if r.metrics.get("wall_s") is not None]
    figures["wall_s"] = statistics.median(walls) if walls else None
    return figures


def repeats_per_round(walls: Sequence[float | None]) -> int:
    """Generations per side per round: enough for :data:`ROUND_MIN_S` at the faster side's
    warm-up wall time, the same number on both sides."""
    known = [float(w) for w in walls if w is not None and float(w) > 0]
    if not known:
        return 1
    return max(1, min(MAX_REPEATS_PER_ROUND, math.ceil(ROUND_MIN_S / min(known))))


def _status(result: Result) -> str:
    return f"{result.status}: {result.reason}"


def progress_line(record: dict[str, Any]) -> str:
    return f"{record['scenario']}::{record['cell_id']}  {describe(record)}"


def describe(record: dict[str, Any]) -> str:
    """The one-line message of a cell's A/B outcome (pytest, CLI)."""
    if record["verdict"] in CELL_FAILURES:
        return f"{record['verdict']}: {record['reason']}"
    its = record["verdicts"][0]
    return (
        f"{its['verdict']}: its ×{its['ratio']:.3f} head / base [{its['low']:.3f}, "
        f"{its['high']:.3f}] after {its['rounds']} rounds (threshold {its['threshold']:.0%})"
    )


def this_tree() -> Side:
    """The head side of ``pytest --bench-ab-base``: the code this process runs."""
    return Side("head", "this tree", "dir", WorkerSpec(fresh=True))


def load_ab(directory: str | Path) -> list[dict[str, Any]]:
    """The A/B records of a directory (the latest per cell), or [] if it has none."""
    path = Path(directory) / AB_FILE
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON record") from None
        records.append(record)
    return newest(records, lambda r: (r["scenario"], r["cell_id"]), lambda r: r.get("timestamp"))


def failed(records: Sequence[dict[str, Any]], strict: bool = False) -> bool:
    bad = {"regression", "error"} | ({"inconclusive", "not comparable"} if strict else set())
    return any(record["verdict"] in bad for record in records)


# -- command line ---------------------------------------------------------------------------


def _cmd_ab(args: argparse.Namespace) -> int:
    from harness.matrix import expand
    from harness.scenario import load_scenario

    scenarios = [load_scenario(path) for path in args.scenarios]
    cells = [cell for scenario in scenarios for cell in expand(scenario)]
    if args.select:
        cells = [cell for cell in cells if all(part in cell.nodeid for part in args.select)]
        if not cells:
            raise UserError(f"--select {' '.join(args.select)}: no cell id matches")
    if not 6 <= args.min_rounds <= args.max_rounds:
        raise UserError(
            f"--min-rounds / --max-rounds: expected 6 <= min <= max, got "
            f"{args.min_rounds} and {args.max_rounds}"
        )
    repo = Path(args.repo).resolve()
    work = Path(tempfile.mkdtemp(prefix="sdbench-sides-"))
    sides = []
    try:
        for label in ("base", "head"):
            sides.append(resolve_side(label, getattr(args, label), repo, work))
        thresholds = {s.name: s.thresholds.model_dump() for s in scenarios}
        runner = ABRunner(
            sides[0],
            sides[1],
            args.out,
            min_rounds=args.min_rounds,
            max_rounds=args.max_rounds,
            seed=args.seed,
            progress=not args.quiet,
            thresholds=thresholds,
        )
        records = runner.run(cells)
    finally:
        for side in sides:
            side.close()
    counts: dict[str, int] = {}
    for record in records:
        counts[record["verdict"]] = counts.get(record["verdict"], 0) + 1
    summary = ", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items()))
    print(f"{len(records)} cells: {summary}; A/B records in {Path(args.out) / AB_FILE}")
    return 1 if failed(records, args.strict) else 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ab = subparsers.add_parser(
        "ab", help="measure base and head interleaved in one job and judge the paired ratios"
    )
    ab.add_argument("scenarios", nargs="+", type=Path, metavar="SCENARIO")
    ab.add_argument("--base", required=True, metavar="SIDE",
                    help="git ref (of --repo), directory, or Python executable")
    ab.add_argument("--head", required=True, metavar="SIDE", help="as --base")
    ab.add_argument("--repo", default=".", metavar="PATH",
                    help="repository of git-ref sides (default: the current directory)")
    ab.add_argument("--out", type=Path, default=Path("results-ab"), help="results directory")
    ab.add_argument("--min-rounds", type=int, default=DEFAULT_MIN_ROUNDS,
                    help=f"rounds before the first verdict (default {DEFAULT_MIN_ROUNDS})")
    ab.add_argument("--max-rounds", type=int, default=DEFAULT_MAX_ROUNDS,
                    help=f"round budget of an inconclusive cell (default {DEFAULT_MAX_ROUNDS})")
    ab.add_argument("--seed", type=int, default=0, help="seed of the ABBA/BAAB orders")
    ab.add_argument("--strict", action="store_true",
                    help="an inconclusive or not comparable cell fails the gate too")
    ab.add_argument("--select", nargs="+", default=[], metavar="TEXT",
                    help="only cells whose id (file::cell) contains every TEXT")
    ab.add_argument("--quiet", action="store_true", help="no progress output")
    ab.set_defaults(handler=_cmd_ab)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m harness ab ...")
