"""The runner: cells → worker processes → :class:`~harness.results.Result` records in a store.

Cells are grouped by load key (:func:`harness.matrix.group_by_load`) so that a sweep of batch
sizes costs one load. How the groups are isolated is the ``isolate`` setting:

- ``load`` (default): each load group runs in a fresh worker process (:mod:`harness.launcher`,
  :mod:`harness.worker`) that loads the model once and runs the group's cells; nothing one
  group leaves behind (allocator caches, compiled graphs, imported modules) is measured in
  the next, and a hang, a crash or a kill becomes the cell's ``timeout`` / ``crashed``;
- ``cell``: a fresh worker for every cell (a load per cell);
- ``none``: everything in this process (:class:`harness.execute.CellExecutor`), for debugging
  with pdb; no hard timeout, and a crash ends the run.

With several GPUs (``gpus``), one worker per GPU runs at a time, each with
``CUDA_VISIBLE_DEVICES`` set to its GPU, the longest groups first. Every result is appended to
the store as it arrives; cross-backend parity (:class:`harness.conformance.ParityTracker`) is
computed here from the payload files the workers write, since the two cells compared run in
different workers. Whatever happens in a cell becomes its status, and the run goes on; Ctrl-C
kills the workers and keeps every finished cell.
"""

from __future__ import annotations

import dataclasses
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from backends import get_backend
from harness import environment, plan
from harness.conformance import ParityTracker, to_uint8
from harness.execute import NO_CUDA, CellExecutor, count_failed, resolve_device
from harness.launcher import Observer, Ran, Slot, WorkerSpec
from harness.matrix import Cell, group_by_load
from harness.options import ISOLATION
from harness.results import Result, ResultStore, iter_results
from harness.vocabulary import FAILED_STATUSES


def _ignore(_event: str, _cell: Cell, _pid: int) -> None:
    return None


def new_run_id() -> str:
    """``20261201T214500-1a2b3c``: when the run started, and a random tail."""
    return time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


class Runner:
    """Runs cells and appends one result per cell to a store."""

    def __init__(
        self,
        out_dir: str | Path | None = None,
        *,
        run_id: str | None = None,
        progress: bool = True,
        save_images: bool = True,
        isolate: str = "load",
        gpus: Sequence[str] | None = None,
        spec: WorkerSpec | None = None,
        observer: Observer = _ignore,
    ) -> None:
        if isolate not in ISOLATION:
            raise ValueError(f"isolate must be one of {ISOLATION}, got {isolate!r}")
        if isolate == "none" and gpus and len(gpus) > 1:
            raise ValueError("several GPUs need worker processes, not isolate='none'")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.store = ResultStore(self.out_dir) if self.out_dir is not None else None
        self.run_id = run_id or new_run_id()
        self.progress = progress
        self.save_images = save_images and self.out_dir is not None
        self.isolate = isolate
        self.gpus = list(gpus or [])
        self.spec = spec or WorkerSpec()
        self.observer = observer
        self.env = environment.collect()
        self.env_fingerprint = environment.fingerprint(self.env)
        self.parity = ParityTracker()
        self._executor: CellExecutor | None = None
        self._slots: list[Slot] = []
        self._work_dir: Path | None = None

    # -- public -------------------------------------------------------------------------

    def fingerprint_of(self, cell: Cell) -> str:
        """The environment fingerprint of ``cell``'s records (its backend's packages in it)."""
        return environment.fingerprint(environment.for_backend(self.env, cell.backend))

    def pending(self, cells: Iterable[Cell], *, rerun_failed: bool = False) -> list[Cell]:
        """The cells without a finished record in this runner's store (``run --resume``)."""
        cells = list(cells)
        if self.store is None or not self.store.path.exists():
            return cells
        return plan.pending(
            cells, iter_results(self.store.path), self.fingerprint_of, rerun_failed=rerun_failed
        )

    def run(self, cells: Iterable[Cell]) -> list[Result]:
        """Run every cell (grouped by load key), with a progress bar; return the results."""
        groups = group_by_load(list(cells))
        ordered = [cell for group in groups for cell in group]
        self.parity.plan(ordered)
        results: list[Result] = []
        # The bar only on a terminal; one line per finished cell either way.
        show_bar = self.progress and sys.stderr.isatty()
        with tqdm(total=len(ordered), disable=not show_bar, unit="cell", leave=False) as bar:

            def finished(result: Result) -> None:
                results.append(result)
                if self.progress:
                    bar.write(_progress_line(len(results), len(ordered), result), file=sys.stdout)
                bar.update()

            try:
                if len(self.gpus) > 1 and self.isolate != "none":
                    self._run_parallel(groups, finished)
                else:
                    for cell in ordered:
                        bar.set_description(cell.id)
                        finished(self.run_cell(cell))
            except BaseException:  # Ctrl-C: the workers go at once; finished cells are stored
                self.kill()
                raise
            finally:
                self.close()
        return results

    def run_cell(self, cell: Cell) -> Result:
        """Run one cell now (its load group's worker is kept for the next cell), record its
        result in the store and return it."""
        unsupported = self._unsupported(cell)
        if unsupported is not None:
            return self._record(unsupported)
        if self.isolate == "none":
            if self._executor is None:
                self._executor = CellExecutor(
                    self.out_dir, run_id=self.run_id, save_images=self.save_images
                )
            executed = self._executor.run(cell, keep_output=self.parity.wants(cell))
            result = executed.result
            if executed.output is not None:
                latents = executed.output.latents.detach().to("cpu", torch.float32)
                result = self._with_parity(result, latents, to_uint8(executed.output.images))
            return self._record(result)
        if not self._slots:
            gpu = self.gpus[0] if self.gpus else None
            self._slots.append(self._slot(gpu))
        return self._finish(self._slots[0].run(cell, keep_output=self.parity.wants(cell)))

    def kill(self) -> None:
        """Kill the workers at once (Ctrl-C)."""
        for slot in self._slots:
            slot.kill()

    def close(self) -> None:
        """Stop the workers (or release the in-process session); remove payload files."""
        for slot in self._slots:
            slot.close()
        self._slots = []
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self._clean_work_dir()

    # -- internals ----------------------------------------------------------------------

    def _slot(self, gpu: str | None) -> Slot:
        spec = self.spec
        if gpu is not None:
            spec = dataclasses.replace(spec, env={**spec.env, "CUDA_VISIBLE_DEVICES": gpu})
        return Slot(
            spec,
            run_id=self.run_id,
            work_dir=self._workers_dir(),
            payload_dir=self._payload_dir,
            out_dir=self.out_dir,
            save_images=self.save_images,
            worker_per_cell=self.isolate == "cell",
            observer=self.observer,
            name=gpu if gpu is not None else "0",
        )

    def _workers_dir(self) -> Path:
        """Worker logs (``DIR/workers/logs``) and this runner's payload files (a folder of its
        own under ``DIR/workers``: pytest-xdist workers share DIR); a temporary folder
        without DIR."""
        if self._work_dir is None:
            if self.out_dir is not None:
                self._work_dir = self.out_dir / "workers"
            else:
                self._work_dir = Path(tempfile.mkdtemp(prefix="sdbench-workers-"))
        return self._work_dir

    @property
    def _payload_dir(self) -> Path:
        return self._workers_dir() / f"payloads-{self.run_id}-{id(self):x}"

    def _clean_work_dir(self) -> None:
        if self._work_dir is None:
            return
        shutil.rmtree(self._payload_dir, ignore_errors=True)
        if self.out_dir is None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
        else:  # keep the logs of workers that died; drop what is empty
            for folder in (self._work_dir / "logs", self._work_dir):
                try:
                    folder.rmdir()
                except OSError:  # not empty (or another process's), or gone already
                    pass
        self._work_dir = None

    def _run_parallel(self, groups: list[list[Cell]], finished: Any) -> None:
        """One worker per GPU at a time; the longest groups first."""
        todo: queue.Queue[list[Cell]] = queue.Queue()
        for group in plan.longest_first(groups):
            todo.put(group)
        done: queue.Queue[tuple[Cell, Ran | Result]] = queue.Queue()
        stop = threading.Event()
        self._slots = [self._slot(gpu) for gpu in self.gpus]

        def serve(slot: Slot) -> None:
            while not stop.is_set():
                try:
                    group = todo.get_nowait()
                except queue.Empty:
                    break
                for cell in group:
                    if stop.is_set():
                        return
                    unsupported = self._unsupported(cell)
                    if unsupported is not None:
                        done.put((cell, unsupported))
                        continue
                    ran = slot.run(cell, keep_output=self.parity.wants(cell))
                    if not stop.is_set():
                        done.put((cell, ran))
                slot.close()  # the next group starts in a fresh worker

        threads = [
            threading.Thread(target=serve, args=(slot,), name=f"sdbench-gpu-{slot.name}")
            for slot in self._slots
        ]
        for thread in threads:
            thread.start()
        try:
            while any(thread.is_alive() for thread in threads) or not done.empty():
                try:
                    _cell, outcome = done.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(outcome, Result):
                    finished(self._record(outcome))
                else:
                    finished(self._finish(outcome))
        except BaseException:
            stop.set()
            self.kill()
            raise
        finally:
            for thread in threads:
                thread.join(timeout=30)

    def _unsupported(self, cell: Cell) -> Result | None:
        """A cell known to be unsupported before any worker starts, or None.

        A CUDA cell without CUDA, and — when the workers run this very interpreter and tree —
        a cell the backend's cheap :meth:`~backends.base.Backend.unsupported` declines (the
        backend's module is imported here once). Another Python or source tree answers for
        itself in its worker; so does a backend whose check raises.
        """
        device = resolve_device(cell.device)
        reason = NO_CUDA if device is None else None
        if device is not None and dataclasses.replace(self.spec, fresh=False) == WorkerSpec():
            try:
                reason = get_backend(cell.backend).unsupported(cell, device)
            except Exception:  # noqa: BLE001 - the worker records it as the cell's error
                reason = None
        if reason is None:
            return None
        return Result(
            run_id=self.run_id,
            cell=cell,
            status="unsupported",
            reason=reason,
            env=environment.for_backend(self.env, cell.backend),
            env_fingerprint=self.fingerprint_of(cell),
        )

    def _finish(self, ran: Ran) -> Result:
        result = ran.result
        if ran.payload is not None:
            from safetensors.torch import load_file

            tensors = load_file(str(ran.payload))
            ran.payload.unlink(missing_ok=True)
            result = self._with_parity(result, tensors["latents"], tensors["images"].numpy())
        return self._record(result)

    def _with_parity(self, result: Result, latents: torch.Tensor, images: Any) -> Result:
        """The result with its parity figures against another backend's cell, if any."""
        figures = self.parity.record(result.cell, latents, images)
        if not figures:
            return result
        check = figures.pop("parity_check")
        metrics = {**result.metrics, **figures}
        checks = {"parity": check, **(result.metrics.get("check_results") or {})}
        metrics["check_results"] = checks
        metrics["checks_failed"] = count_failed(checks)
        return dataclasses.replace(result, metrics=metrics)

    def _record(self, result: Result) -> Result:
        if self.store is not None:
            self.store.append(result)
        return result


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
    """A cell failed (error, oom, timeout, crashed) or one of its conformance checks failed."""
    return any(
        result.status in FAILED_STATUSES or result.metrics.get("checks_failed", 0) > 0
        for result in results
    )
