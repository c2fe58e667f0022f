"""A worker template: a process that has done a worker's imports and forks workers on request.

A fresh interpreter spends seconds on imports before it can load a model (torch, transformers
and diffusers take 5–15 s on a small CPU), and a run starts one worker per load group. For
workers of the default :class:`~harness.launcher.WorkerSpec` (this interpreter, this source
tree, the parent's environment), the launcher keeps one template per environment and forks
each worker from it instead: the worker is a new process with the libraries already imported,
no model loaded and no device touched, so what it measures is what a fresh interpreter would
measure, less the wait. Workers of another Python, another tree or extra variables (A/B sides,
``--gpus``) are started as fresh interpreters as before.

The template never initialises CUDA (``PYTORCH_NVML_BASED_CUDA_CHECK=1``; it checks
``torch.cuda.is_initialized()`` after its imports and refuses to serve if some library did)
and refuses to serve when an import started a Python thread (a fork keeps only the forking
thread); the launcher then starts fresh interpreters. The native threads that ``import torch``
and OpenBLAS start are fork-aware, as every forked ``DataLoader`` worker relies on.

Protocol, one JSON message per packet over a UNIX ``SOCK_SEQPACKET`` pair whose other end the
parent keeps:

- the template sends ``{"ready": true}`` once its imports are done (or ``{"ready": false,
  "why": ...}`` and exits);
- the parent sends ``{"argv": [...], "env": {...}}`` per worker, with the
  worker's stdin, stdout and stderr as three file descriptors (``SCM_RIGHTS``);
- the template forks twice: the intermediate exits at once, so the worker is adopted by the
  parent (a child subreaper, ``prctl(PR_SET_CHILD_SUBREAPER)``), which can then wait for it and
  read its exit status like any child's; the template answers ``{"pid": N}``.

The worker starts a session of its own, takes the three descriptors as fd 0, 1 and 2, sets the
environment it was sent, waits until its parent is the launcher, and runs
:func:`harness.worker.main`. The template exits when the parent closes its end.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

#: Descriptors passed with each request: the worker's stdin, stdout and stderr.
STREAMS = 3
#: Seconds a forked worker waits to be adopted by the launcher before it gives up.
ADOPT_WAIT_S = 10.0


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode("utf-8"))  # one message per packet (SOCK_SEQPACKET)


def _preload() -> str | None:
    """Do a worker's imports; None when done, else why the template cannot serve."""
    import torch

    from backends import BUILTIN, get_backend
    from harness import execute, worker  # noqa: F401 - the worker's own modules

    for name in BUILTIN:  # not plugins: one that starts threads would disable the template
        try:
            get_backend(name).imports()
        except Exception:  # noqa: BLE001, S112 - a broken backend fails in its worker, as before
            continue
    if torch.cuda.is_initialized():
        return "an import initialised CUDA; forked workers could not use it"
    import threading

    if threading.active_count() != 1:  # a fork keeps only the forking thread
        return f"the imports started {threading.active_count() - 1} Python threads"
    return None


def _become_worker(fds: list[int], argv: list[str], env: dict[str, str], parent: int,
                   sock: socket.socket) -> None:
    """In the forked worker: take the streams and the environment, wait to be adopted, run."""
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sock.close()
    os.environ.clear()
    os.environ.update(env)
    deadline = time.monotonic() + ADOPT_WAIT_S
    while os.getppid() != parent:  # the intermediate exits at once; then the launcher adopts us
        if time.monotonic() > deadline:
            os._exit(4)
        time.sleep(0.001)
    sys.stdin = os.fdopen(0, "r", encoding="utf-8")
    sys.stdout = os.fdopen(1, "w", encoding="utf-8")
    sys.stderr = os.fdopen(2, "w", encoding="utf-8")
    sys.argv = ["harness.worker", *argv]
    from harness.worker import main

    code = 0
    try:
        main(argv)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported on stderr as an interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _serve(sock: socket.socket, parent: int) -> None:
    while True:
        try:
            line, fds, _flags, _address = socket.recv_fds(sock, 1 << 20, STREAMS)
        except OSError:
            return
        if not line:
            return
        request = json.loads(line)
        intermediate = os.fork()
        if intermediate == 0:
            worker = os.fork()
            if worker == 0:
                _become_worker(fds, request["argv"], request["env"], parent, sock)
            _send(sock, {"pid": worker})
            os._exit(0)
        for fd in fds:
            os.close(fd)
        os.waitpid(intermediate, 0)


def main() -> None:
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(fileno=fd)
    why = _preload()
    if why is not None:
        _send(sock, {"ready": False, "why": why})
        return
    _send(sock, {"ready": True})
    _serve(sock, parent)


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    main()
