"""A worker process: ``python -m harness.worker`` runs the cells its parent sends it.

The parent (:mod:`harness.launcher`) starts a fresh interpreter per load group (or per cell)
and talks to it in JSON lines: commands on the worker's stdin, events on its stdout. Anything
a backend prints goes to stderr (fd 1 is pointed there at start), which the parent keeps in a
log and quotes when the worker dies.

Commands:

- ``{"op": "run", "cell": {...}, "keep_output": bool}``: run one cell
  (:class:`harness.execute.CellExecutor`); with ``keep_output`` an ok cell's final latents and
  8-bit images are written to a payload file in ``payload_dir`` (safetensors), not the pipe.
- ``{"op": "exit"}`` (or end of stdin): release the session and exit.

Events:

- ``{"event": "ready", "pid": N, "env": {...}}`` once imports are done (its environment);
- ``{"event": "phase", "phase": "load" | "measure" | "checks", "measured": record | null}``
  as a cell enters each phase (``measured``: the result before the checks);
- ``{"event": "result", "result": record, "payload": path | null, "restart": bool}``.

The worker exits by itself when its parent dies (its parent PID changes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

#: Arguments of :func:`main`, so that the parent and the worker cannot disagree on them.
OUT_DIR, RUN_ID, PAYLOAD_DIR, NO_IMAGES = "--out-dir", "--run-id", "--payload-dir", "--no-images"


def _watch_parent(parent: int) -> None:
    """Exit at once when the parent is gone (SIGKILL'ed parents leave no one to stop us)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


class _Channel:
    """The event stream to the parent: one JSON line per event, flushed."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def send(self, event: str, **fields: Any) -> None:
        self._stream.write(json.dumps({"event": event, **fields}, allow_nan=False) + "\n")
        self._stream.flush()


def _save_payload(directory: Path, latents: Any, images: Any) -> str:
    import torch
    from safetensors.torch import save_file

    from harness.conformance import to_uint8

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}.safetensors"
    save_file(
        {
            "latents": latents.detach().to("cpu", torch.float32).contiguous(),
            "images": torch.from_numpy(to_uint8(images)).contiguous(),
        },
        str(path),
    )
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.worker")
    parser.add_argument(OUT_DIR, dest="out_dir", default=None)
    parser.add_argument(RUN_ID, dest="run_id", required=True)
    parser.add_argument(PAYLOAD_DIR, dest="payload_dir", required=True)
    parser.add_argument(NO_IMAGES, dest="no_images", action="store_true")
    args = parser.parse_args(argv)

    # Events go to the original stdout; whatever else writes to fd 1 lands in stderr.
    channel = _Channel(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    from harness.execute import CellExecutor
    from harness.matrix import Cell
    from harness.results import jsonable

    executor = CellExecutor(args.out_dir, run_id=args.run_id, save_images=not args.no_images)
    channel.send("ready", pid=os.getpid(), env=jsonable(executor.env))
    payloads = Path(args.payload_dir)

    def on_phase(phase: str, measured: Any) -> None:
        record = None if measured is None else jsonable(measured.to_dict())
        channel.send("phase", phase=phase, measured=record)

    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        cell = Cell.from_dict(command["cell"])
        executed = executor.run(cell, keep_output=command["keep_output"], on_phase=on_phase)
        payload = None
        if executed.output is not None:
            payload = _save_payload(payloads, executed.output.latents, executed.output.images)
        channel.send(
            "result",
            result=jsonable(executed.result.to_dict()),
            payload=payload,
            restart=executed.restart,
        )
        if executed.restart:
            break
    executor.close()
    # Everything the parent needs was sent; skip the interpreter's slow teardown of torch.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
