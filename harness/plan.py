"""Which cells a run executes, and in what order: resume, shards, longest groups first.

Pure functions over cells and records; the runner and the CLI call them.

- :func:`pending`: ``run --resume`` skips a cell that has a finished record in the results
  directory — the same scenario and cell id, the same :meth:`~harness.matrix.Cell.fingerprint`
  (the workload) and the same environment fingerprint. With ``rerun_failed`` a record whose
  status is a failure (error, oom, timeout, crashed) does not count as finished.
- :func:`shard`: ``run --shard K/N`` keeps the K-th of N deterministic, disjoint parts of the
  load groups (a group is never split), balanced by estimated cost, so that N CI runners cover
  a scenario between them.
- :func:`longest_first`: groups by estimated cost, largest first (``run --gpus``: the long
  groups start early, the short ones fill the gaps at the end).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from harness.errors import UserError
from harness.matrix import Cell
from harness.results import Result, newest
from harness.vocabulary import FAILED_STATUSES


def pending(
    cells: Iterable[Cell],
    finished: Iterable[Result],
    env_fingerprint: str | Callable[[Cell], str],
    *,
    rerun_failed: bool = False,
) -> list[Cell]:
    """The cells without a finished record among ``finished`` (the latest one counts)."""
    latest = {(r.cell.scenario, r.cell.id): r
              for r in newest(finished, lambda r: (r.cell.scenario, r.cell.id),
                              lambda r: r.timestamp)}
    fingerprint_of = (env_fingerprint if callable(env_fingerprint)
                      else lambda _cell: env_fingerprint)
    todo = []
    for cell in cells:
        record = latest.get((cell.scenario, cell.id))
        done = (
            record is not None
            and record.cell.fingerprint() == cell.fingerprint()
            and record.env_fingerprint == fingerprint_of(cell)
            and not (rerun_failed and record.status in FAILED_STATUSES)
        )
        if not done:
            todo.append(cell)
    return todo


def cost(group: list[Cell]) -> float:
    """A relative estimate of a load group's run time: pixels × steps × generations, + a load."""
    work = sum(
        (cell.warmup + cell.repeats) * cell.batch * cell.denoise_steps * cell.width * cell.height
        for cell in group
    )
    return 1.0 + float(work)


def longest_first(groups: list[list[Cell]]) -> list[list[Cell]]:
    return sorted(groups, key=cost, reverse=True)  # stable: equal costs keep their order


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → (2, 4); a one-line :class:`UserError` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise UserError(f"--shard: expected K/N with 1 <= K <= N, got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise UserError(f"--shard: expected K/N with 1 <= K <= N, got {text!r}")
    return index, count


def shard(groups: list[list[Cell]], index: int, count: int) -> list[list[Cell]]:
    """The ``index``-th (1-based) of ``count`` parts of ``groups``, whole groups only.

    Greedy by cost (largest group to the lightest part; ties to the lower part), so parts are
    balanced and the same for the same groups on every machine. Groups keep their order.
    """
    if not 1 <= index <= count:
        raise ValueError(f"shard index must be in 1..{count}, got {index}")
    loads = [0.0] * count
    chosen: set[int] = set()
    for position, group in sorted(enumerate(groups), key=lambda item: -cost(item[1])):
        part = min(range(count), key=lambda p: (loads[p], p))
        loads[part] += cost(group)
        if part == index - 1:
            chosen.add(position)
    return [group for position, group in enumerate(groups) if position in chosen]
