"""Worker processes: crashes, hangs, load failures, isolation modes, several GPUs, payloads.

Every test runs real workers (``python -m harness.worker``) on the tiny zoo model on the CPU,
and hurts them the way real backends do: SIGKILL, SIGSTOP, a process that exits mid-step.
(Tests about backends and conformance run their cells in-process, ``isolate="none"``, to keep
the suite fast; the worker path is tested here and end to end in test_cli, test_plugin and
test_ab.)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from harness import expand, load, parse_scenario
from harness.launcher import WorkerSpec
from harness.matrix import Cell
from harness.results import latest
from harness.runner import Runner

DATA = Path(__file__).resolve().parent / "data"
TINY = {"model": "tiny", "device": "cpu", "resolution": 64, "steps": 2}


def _cells(matrix: dict, **settings) -> list[Cell]:
    data = {"name": "w", "repeats": 1, "warmup": 0, **settings, "matrix": TINY | matrix}
    return expand(parse_scenario(data, "w.yaml"))


class Recorder:
    """An observer: every (event, cell id, worker pid), and an action on one of them."""

    def __init__(self, when: tuple[str, str] | None = None, action=None) -> None:
        self.events: list[tuple[str, str, int]] = []
        self.when, self.action = when, action
        self.fired_at: float | None = None

    def __call__(self, event: str, cell: Cell, pid: int) -> None:
        self.events.append((event, cell.id, pid))
        if self.when == (event, cell.id) and self.fired_at is None:
            self.fired_at = time.monotonic()
            self.action(pid)

    def workers(self) -> set[int]:
        return {pid for event, _, pid in self.events if event == "ready"}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_worker_makes_its_cell_crashed_and_the_rest_finish(tmp_path: Path) -> None:
    cells = _cells({"seed": [1, 2, 3]})
    kill = Recorder(("measure", cells[1].id), lambda pid: os.kill(pid, signal.SIGKILL))
    results = Runner(tmp_path, progress=False, observer=kill).run(cells)
    assert [r.status for r in results] == ["ok", "crashed", "ok"]
    crashed = results[1]
    assert "signal SIGKILL" in crashed.reason and "measuring" in crashed.reason
    assert crashed.error_type == "WorkerCrash"
    assert len(kill.workers()) == 2  # the third cell ran in a fresh worker
    assert len(load(tmp_path)) == 3


@pytest.mark.slow
def test_a_worker_that_exits_mid_step_is_crashed_with_its_stderr(tmp_path: Path) -> None:
    cells = _cells({"seed": [1, 2]})
    spec = WorkerSpec(pythonpath=(str(DATA / "crashing_worker"),))
    results = Runner(tmp_path, progress=False, spec=spec).run(cells)
    assert [r.status for r in results] == ["crashed", "crashed"]
    assert "exit code 7" in results[0].reason
    assert "boom: the backend fell over" in results[0].reason
    assert "boom: the backend fell over" in results[0].traceback
    assert list((tmp_path / "workers" / "logs").glob("*.log"))  # a dead worker's log is kept


def test_a_stopped_worker_times_out_and_the_run_goes_on(tmp_path: Path) -> None:
    cells = _cells({"seed": [1, 2]}, timeout_s=3)
    stop = Recorder(("measure", cells[0].id), lambda pid: os.kill(pid, signal.SIGSTOP))
    runner = Runner(tmp_path, progress=False, observer=stop)
    first = runner.run_cell(cells[0])
    waited = time.monotonic() - stop.fired_at
    second = runner.run_cell(dataclasses.replace(cells[1], timeout_s=120))  # a loaded CI box
    runner.close()
    assert first.status == "timeout" and "timeout_s (3 s" in first.reason
    assert waited < 3 + 5
    assert second.status == "ok"
    stopped = {pid for event, cell, pid in stop.events if cell == cells[0].id}
    assert all(_gone(pid) for pid in stopped)


def test_a_group_that_crashes_twice_at_load_is_not_tried_a_third_time(tmp_path: Path) -> None:
    cells = _cells({"seed": [1, 2, 3]})
    loads = Recorder()

    def kill_at_load(event: str, cell: Cell, pid: int) -> None:
        loads(event, cell, pid)
        if event == "load":
            os.kill(pid, signal.SIGKILL)

    results = Runner(tmp_path, progress=False, observer=kill_at_load).run(cells)
    assert [r.status for r in results] == ["crashed"] * 3
    assert all("loading the model" in r.reason and "twice" in r.reason for r in results)
    assert len(loads.workers()) == 2


def test_isolation_modes_and_parity_across_workers(tmp_path: Path) -> None:
    cells = _cells({"backend": ["diffusers", "original"], "source": "safetensors",
                    "seed": [1, 2]})
    per_group = Recorder()
    results = Runner(tmp_path / "load", progress=False, observer=per_group).run(cells)
    assert [r.status for r in results] == ["ok"] * 4
    assert len(per_group.workers()) == 2
    original = [r for r in results if r.cell.backend == "original"]
    assert all(r.metrics["parity_status"] == "pass" for r in original)  # payloads compared
    assert all(r.metrics["check_results"]["parity"]["status"] == "pass" for r in original)
    assert not (tmp_path / "load" / "workers").exists()  # payloads and clean logs removed
    for result in results:
        metrics = result.metrics
        assert metrics["cpu_model_gb"] == pytest.approx(
            metrics["cpu_peak_gb"] - metrics["cpu_baseline_gb"]
        )
        assert 0 < metrics["cpu_baseline_gb"] < metrics["cpu_peak_gb"]

    per_cell = Recorder()
    diffusers = [cell for cell in cells if cell.backend == "diffusers"]
    ran = Runner(None, progress=False, isolate="cell", observer=per_cell).run(diffusers)
    assert [r.status for r in ran] == ["ok", "ok"] and len(per_cell.workers()) == 2

    inline = Runner(None, progress=False, isolate="none").run(cells)
    assert inline[-1].metrics["parity_status"] == "pass"


@pytest.mark.slow
def test_one_worker_per_gpu_at_a_time(tmp_path: Path) -> None:
    cells = _cells({"seed": [1, 2], "batch": [1, 2]}) + _cells({"dtype": "bf16"})
    workers = Recorder()
    results = Runner(tmp_path, progress=False, gpus=["0", "1"], observer=workers).run(cells)
    assert sorted(r.status for r in results) == ["ok"] * 5
    frame = latest(load(tmp_path))
    assert set(frame["env.cuda_visible_devices"]) == {"0", "1"}
    assert len(frame) == 5


@pytest.mark.slow
def test_an_oom_that_breaks_the_allocator_gets_a_fresh_worker(tmp_path: Path) -> None:
    cells = _cells({"seed": [1, 2]})
    spec = WorkerSpec(
        pythonpath=(str(DATA / "oom_worker"),),
        env={"SDBENCH_TEST_OOM_ONCE": str(tmp_path / "oom-happened")},
    )
    workers = Recorder()
    results = Runner(tmp_path, progress=False, spec=spec, observer=workers).run(cells)
    assert [r.status for r in results] == ["oom", "ok"]
    assert "out of memory" in results[0].reason
    assert len(workers.workers()) == 2


def test_default_workers_are_forked_from_a_template_and_die_like_processes(
    tmp_path: Path,
) -> None:
    """This interpreter's workers come from the template (adopted children of this process,
    in sessions of their own); other specs start as fresh interpreters."""
    import subprocess

    from harness.launcher import WorkerProcess, _Adopted

    def start(spec: WorkerSpec, name: str) -> WorkerProcess:
        worker = WorkerProcess(spec, run_id="t", payload_dir=tmp_path / "p",
                               log_path=tmp_path / f"{name}.log", out_dir=None,
                               save_images=False)
        ready = worker.next_event(time.monotonic() + 300)
        assert ready is not None and ready["event"] == "ready" and ready["pid"] == worker.pid
        return worker

    forked = start(WorkerSpec(), "forked")
    assert isinstance(forked.process, _Adopted)
    assert os.getsid(forked.pid) == forked.pid  # its own session: killed whole by killpg
    with open(f"/proc/{forked.pid}/stat") as stat:
        assert int(stat.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # adopted by us
    (cell,) = _cells({})
    forked.send({"op": "run", "cell": cell.to_dict(), "keep_output": False})
    events = [forked.next_event(time.monotonic() + 300) for _ in range(3)]
    assert [e["event"] for e in events] == ["phase", "phase", "result"]
    assert events[-1]["result"]["status"] == "ok"
    os.kill(forked.pid, signal.SIGKILL)
    assert forked.death() == "signal SIGKILL"

    assert not WorkerSpec(env={"SDBENCH_TEST": "1"}).forkable
    assert not WorkerSpec(pythonpath=("elsewhere",)).forkable
    fresh = start(WorkerSpec(fresh=True), "fresh")  # as both A/B sides start
    assert isinstance(fresh.process, subprocess.Popen)
    fresh.stop()
    assert fresh.process.returncode == 0
