"""The parent's side of worker processes: start them, feed them cells, enforce budgets.

A :class:`Slot` runs cells one at a time on a :class:`WorkerProcess` (``python -m
harness.worker``, a fresh interpreter in a session of its own) and turns every way a worker
can fail into the cell's result, so the run goes on:

- **timeout**: each phase of a cell has a wall-clock budget — the model load
  ``load_timeout_s``, the warm-up and timed repeats ``timeout_s`` + :data:`GRACE_S` (the
  worker's own check between steps fires first when steps still end), the conformance checks
  ``timeout_s`` + :data:`GRACE_S` again. A worker that overruns one is killed with its whole
  process group (SIGKILL works on a stopped process too); the cell is ``timeout``. A load that
  times out is not tried again: the group's later cells are ``timeout`` at once.
- **crashed**: the worker died without reporting (a signal, a non-zero exit, a closed pipe).
  The cell in flight is ``crashed`` with the exit code or signal and the last lines of the
  worker's stderr. A crash while loading is retried once in a fresh worker; a second one is
  recorded for the cell and for every later cell of its load group without a third try.
- **oom**: recorded by the worker, which goes on — unless it reports its allocator unusable,
  and then it is replaced before the next cell.

The next cell after a kill or a crash starts a fresh worker.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import environment
from harness.matrix import Cell
from harness.results import Result
from harness.worker import NO_IMAGES, OUT_DIR, PAYLOAD_DIR, RUN_ID

#: Seconds past ``timeout_s`` before the parent kills a worker (its own check comes first).
GRACE_S = 2.0
#: Seconds a worker gets to exit after ``exit`` before it is killed.
EXIT_WAIT_S = 10.0
#: Lines of a dead worker's stderr kept in its cell's record.
STDERR_TAIL_LINES = 30
#: Where sdbench's own packages live; a worker finds them through ``PYTHONPATH``.
SOURCE_ROOT = Path(__file__).resolve().parent.parent

#: ``observer(event, cell, pid)``: a worker started (``ready``) or a cell entered a phase.
Observer = Callable[[str, Cell, int], None]


def _ignore(_event: str, _cell: Cell, _pid: int) -> None:
    return None


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a worker: which Python, what goes first on its path, extra variables."""

    python: str = sys.executable
    #: Prepended to ``PYTHONPATH``, before sdbench's own source root.
    pythonpath: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: Always a fresh interpreter, never a worker forked from the template (A/B sides: both
    #: arms must start the same way).
    fresh: bool = False

    @property
    def forkable(self) -> bool:
        """Whether a worker of this spec may be forked from the template (this interpreter,
        this tree, the parent's environment)."""
        return (not self.fresh and self.python == sys.executable and not self.pythonpath
                and not self.env)

    def environ(self) -> dict[str, str]:
        variables = dict(os.environ)
        paths = [*self.pythonpath, str(SOURCE_ROOT)]
        if variables.get("PYTHONPATH"):
            paths.append(variables["PYTHONPATH"])
        variables["PYTHONPATH"] = os.pathsep.join(paths)
        variables.update(self.env)
        return variables


class WorkerDied(Exception):
    """The worker's event stream ended without a result."""


class _Adopted:
    """A worker forked by a template (:mod:`harness.zygote`) and adopted by this process:
    the part of :class:`subprocess.Popen`'s interface the launcher uses."""

    def __init__(self, pid: int, stdin: Any, stdout: Any) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode


#: Variables that may differ between workers forked from one template (pytest sets this one
#: per test); any other difference in the environment gets a template of its own.
_PER_WORKER_VARIABLES = frozenset({"PYTEST_CURRENT_TEST"})
#: Seconds a template gets for its imports, and to answer a fork.
TEMPLATE_READY_S = 300.0
TEMPLATE_FORK_S = 30.0
#: Templates kept at once (one per environment seen; the oldest is closed).
MAX_TEMPLATES = 2
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class _Template:
    """One ``python -m harness.zygote`` of this process, for workers of one environment."""

    def __init__(self, environ: dict[str, str]) -> None:
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.owner = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harness.zygote", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        reply = self._reply(TEMPLATE_READY_S)
        if not reply.get("ready"):
            self.close()
            raise OSError(f"worker template not ready: {reply.get('why', 'no answer')}")

    def _reply(self, timeout: float) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 16)
        if not data:
            raise OSError("the worker template closed its socket")
        reply: dict[str, Any] = json.loads(data)
        return reply

    def fork(self, argv: list[str], environ: dict[str, str], fds: list[int]) -> int:
        """Fork a worker with ``fds`` as its stdin, stdout and stderr; its pid."""
        import socket

        request = json.dumps({"argv": argv, "env": environ}).encode("utf-8")
        socket.send_fds(self.sock, [request], fds)
        return int(self._reply(TEMPLATE_FORK_S)["pid"])

    def close(self) -> None:
        self.sock.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_templates: dict[frozenset[tuple[str, str]], _Template | None] = {}


def _template_key(environ: dict[str, str]) -> frozenset[tuple[str, str]]:
    return frozenset((k, v) for k, v in environ.items() if k not in _PER_WORKER_VARIABLES)


def _template_for(environ: dict[str, str]) -> _Template | None:
    """This process's template for ``environ``, started on first use; None where templates
    cannot work here (then workers start as fresh interpreters)."""
    key = _template_key(environ)
    if key in _templates:
        template = _templates[key]
        if template is None or (template.owner == os.getpid() and template.process.poll() is None):
            return template
        del _templates[key]
    if not _become_subreaper():
        _templates[key] = None
        return None
    while len(_templates) >= MAX_TEMPLATES:
        oldest = next(iter(_templates))
        stale = _templates.pop(oldest)
        if stale is not None and stale.owner == os.getpid():
            stale.close()
    try:
        _templates[key] = _Template(environ)
    except OSError:
        _templates[key] = None
    return _templates[key]


@atexit.register
def _close_templates() -> None:
    for template in _templates.values():
        if template is not None and template.owner == os.getpid():
            template.close()
    _templates.clear()


class WorkerProcess:
    """One running ``python -m harness.worker`` and its JSON-lines streams."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        run_id: str,
        payload_dir: Path,
        log_path: Path,
        out_dir: Path | None,
        save_images: bool,
    ) -> None:
        command = [spec.python, "-m", "harness.worker", RUN_ID, run_id]
        command += [PAYLOAD_DIR, str(payload_dir)]
        if out_dir is not None:
            command += [OUT_DIR, str(out_dir)]
        if not save_images:
            command.append(NO_IMAGES)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        environ = spec.environ()
        forked = self._fork(command[3:], environ) if spec.forkable else None
        if forked is not None:
            self.process: subprocess.Popen[bytes] | _Adopted = forked
        else:
            with log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=environ,
                    start_new_session=True,  # its own process group: killed whole, no ^C
                    bufsize=0,
                )
        assert self.process.stdout is not None and self.process.stdin is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        self._buffer = b""
        self.pid = self.process.pid

    def _fork(self, argv: list[str], environ: dict[str, str]) -> _Adopted | None:
        """The worker forked from this process's template, or None (start it afresh)."""
        template = _template_for(environ)
        if template is None:
            return None
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pid = template.fork(argv, environ, [stdin_read, stdout_write, log])
        except (OSError, ValueError, KeyError):
            for fd in (stdin_write, stdout_read):
                os.close(fd)
            return None
        finally:
            for fd in (stdin_read, stdout_write, log):
                os.close(fd)
        return _Adopted(pid, os.fdopen(stdin_write, "wb", buffering=0),
                        os.fdopen(stdout_read, "rb", buffering=0))

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied("the worker's stdin is closed") from None

    def next_event(self, deadline: float | None) -> dict[str, Any] | None:
        """The next event, or None when ``deadline`` (monotonic) passes first."""
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            if not self._selector.select(wait):
                continue
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            if not chunk:
                raise WorkerDied("the worker's event stream ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event

    def kill(self) -> None:
        """SIGKILL the worker's whole process group and reap it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:  # not yet the leader of its own session (a worker forked a moment ago)
                os.kill(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process.wait()
        self._close_streams()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not in :data:`EXIT_WAIT_S`."""
        try:
            self.send({"op": "exit"})
            self.process.wait(EXIT_WAIT_S)
        except (WorkerDied, subprocess.TimeoutExpired):
            pass
        self.kill()

    def death(self) -> str:
        """How the worker ended: ``signal SIGKILL`` or ``exit code 1`` (reaped first)."""
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:  # alive but its stream is closed: end it
            self.kill()
            code = self.process.wait()
        self._close_streams()
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def _close_streams(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            self._selector.close()
        except (OSError, ValueError, KeyError):
            pass


@dataclass
class Ran:
    """What a slot returns for a cell: its result and, if kept, the output's payload file."""

    result: Result
    payload: Path | None = None


_PHASE_TEXT = {
    "start": "starting",
    "load": "loading the model",
    "measure": "measuring (warm-up and timed repeats)",
    "checks": "running the conformance checks",
}


class Slot:
    """Runs cells on one worker at a time (replaced after a kill, a crash, or every cell)."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        run_id: str,
        work_dir: Path,
        payload_dir: Path,
        out_dir: Path | None,
        save_images: bool = True,
        worker_per_cell: bool = False,
        observer: Observer = _ignore,
        name: str = "0",
    ) -> None:
        self.spec = spec
        self.run_id = run_id
        self.work_dir = work_dir
        self.payload_dir = payload_dir
        self.out_dir = out_dir
        self.save_images = save_images
        self.worker_per_cell = worker_per_cell
        self.observer = observer
        self.name = name
        self.worker: WorkerProcess | None = None
        self._key: tuple[Any, ...] | None = None
        self._started = 0
        self._load_crashes: dict[tuple[Any, ...], int] = {}
        #: Load groups not tried again: load key -> (status, reason, stderr tail).
        self._given_up: dict[tuple[Any, ...], tuple[str, str, str | None]] = {}
        self.env = environment.collect()  # until a worker tells its own

    # -- public -------------------------------------------------------------------------

    def run(self, cell: Cell, keep_output: bool = False) -> Ran:
        """Run one cell on a worker with the cell's model loaded; never raises for the cell."""
        key = cell.load_key()
        while True:
            if key in self._given_up:
                status, reason, tail = self._given_up[key]
                return Ran(self._result(cell, status, reason, tail))
            if self.worker is not None and self._key != key:
                self.close()
            try:
                return self._attempt(cell, keep_output)
            except _LoadCrash as crash:
                self._load_crashes[key] = self._load_crashes.get(key, 0) + 1
                if self._load_crashes[key] >= 2:
                    reason = f"{crash.reason} (twice; not tried again)"
                    self._given_up[key] = ("crashed", reason, crash.tail)
            except _LoadTimeout as hung:
                self._given_up[key] = ("timeout", hung.reason, None)

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self.worker is not None:
            self.worker.stop()
            self._discard_log(self.worker)
        self.worker = None
        self._key = None

    def kill(self) -> None:
        """Kill the worker at once (Ctrl-C)."""
        if self.worker is not None:
            self.worker.kill()
        self.worker = None
        self._key = None

    # -- internals ----------------------------------------------------------------------

    def _spawn(self, cell: Cell) -> WorkerProcess:
        self._started += 1
        name = f"{self.run_id}-{os.getpid()}-{self.name}-{self._started}.log"
        log = self.work_dir / "logs" / name
        return WorkerProcess(
            self.spec,
            run_id=self.run_id,
            payload_dir=self.payload_dir,
            log_path=log,
            out_dir=self.out_dir,
            save_images=self.save_images,
        )

    def _attempt(self, cell: Cell, keep_output: bool) -> Ran:
        phase = "start"
        deadline: float | None = time.monotonic() + cell.load_timeout_s
        measured: dict[str, Any] | None = None
        if self.worker is None:
            self.worker = self._spawn(cell)
            self._key = cell.load_key()
        worker = self.worker
        try:
            worker.send({"op": "run", "cell": cell.to_dict(), "keep_output": keep_output})
            while True:
                event = worker.next_event(deadline)
                if event is None:
                    return self._killed_at(cell, phase, measured)
                kind = event["event"]
                if kind == "ready":
                    self.env = event.get("env") or self.env
                    self.observer("ready", cell, worker.pid)
                elif kind == "phase":
                    phase, measured = event["phase"], event.get("measured")
                    deadline = self._deadline(cell, phase)
                    self.observer(phase, cell, worker.pid)
                elif kind == "result":
                    result = Result.from_dict(event["result"])
                    if event.get("restart") or self.worker_per_cell:
                        self.close()
                    payload = event.get("payload")
                    return Ran(result, Path(payload) if payload else None)
        except WorkerDied:
            how = worker.death()
            tail = worker.stderr_tail()
            self.worker = None
            self._key = None
            reason = f"worker died ({how}) while {_PHASE_TEXT[phase]}"
            if tail:
                reason += f"; stderr: {tail[-1][:300]}"
            if phase in ("start", "load"):
                raise _LoadCrash(reason, "\n".join(tail) or None) from None
            return Ran(self._result(cell, "crashed", reason, "\n".join(tail) or None, measured))

    def _deadline(self, cell: Cell, phase: str) -> float | None:
        if phase == "load":
            return time.monotonic() + cell.load_timeout_s
        if cell.timeout_s is None:
            return None
        return time.monotonic() + cell.timeout_s + GRACE_S

    def _killed_at(self, cell: Cell, phase: str, measured: dict[str, Any] | None) -> Ran:
        assert self.worker is not None
        self.worker.kill()
        self.worker = None
        self._key = None
        if phase in ("start", "load"):
            raise _LoadTimeout(
                f"load did not finish within load_timeout_s ({cell.load_timeout_s:g} s); "
                "worker killed"
            )
        assert cell.timeout_s is not None
        reason = (
            f"no result within timeout_s ({cell.timeout_s:g} s + {GRACE_S:g} s grace) while "
            f"{_PHASE_TEXT[phase]}; worker killed"
        )
        return Ran(self._result(cell, "timeout", reason, None, measured))

    def _result(
        self,
        cell: Cell,
        status: str,
        reason: str,
        tail: str | None,
        measured: dict[str, Any] | None = None,
    ) -> Result:
        """A record the parent writes for a worker that could not: measured figures kept."""
        metrics = dict(measured["metrics"]) if measured else {}
        env = dict(measured["env"]) if measured else environment.for_backend(self.env, cell.backend)
        return Result(
            run_id=self.run_id,
            cell=cell,
            status=status,
            reason=reason,
            error_type="WorkerCrash" if status == "crashed" else "WorkerTimeout",
            traceback=tail,
            metrics=metrics,
            env=env,
            env_fingerprint=environment.fingerprint(env),
        )

    @staticmethod
    def _discard_log(worker: WorkerProcess) -> None:
        """A worker that exited cleanly leaves no log behind; a dead one's log is kept."""
        if worker.process.returncode in (0, -signal.SIGKILL):
            worker.log_path.unlink(missing_ok=True)


class _LoadCrash(Exception):
    def __init__(self, reason: str, tail: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tail = tail


class _LoadTimeout(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
