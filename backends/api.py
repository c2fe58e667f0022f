"""What a backend adapter needs from sdbench, in one import (docs/backends.md).

::

    from backends.api import Backend, Output, Request, Session

Importing it pulls in torch and numpy (which an adapter uses anyway) and none of sdbench's
scenario schema, results store or statistics (no pydantic, pandas or scipy), so an adapter
module stays as cheap to import as its own code.

- :class:`Backend` — loads a model for a cell's load key (``load``), says what it cannot run
  (``unsupported``), names the packages whose versions identify it (``packages`` /
  ``versions``), preloads its libraries (``imports``).
- :class:`Session` — a loaded model: ``prepare`` (untimed set-up), ``generate`` (one timed
  generation), ``encode_image`` (conformance checks), ``close``.
- :class:`Request`, :class:`Output`, :class:`LoraRef`, :class:`EmbeddingRef`,
  :class:`ControlRef` (a ControlNet with its image and scale) — one generation's inputs and
  outputs; :data:`TORCH_DTYPES` maps a cell's dtype to torch's.
- :class:`GenerationTimer` — what ``generate`` reports its phases and steps to.
- :class:`Cell` — the workload (``cell.steps``, ``cell.offload``, …; every axis).
- :func:`resolve` / :class:`ResolvedModel` — a cell's model reference as files on disk.
- :class:`UserError` (bad input), :class:`UnsupportedError` (a cell this backend cannot run:
  the cell is recorded ``unsupported`` with the message).
"""

from __future__ import annotations

from backends.base import (
    TORCH_DTYPES,
    Backend,
    ControlRef,
    EmbeddingRef,
    LoraRef,
    Output,
    Request,
    Session,
)
from harness.cell import Cell
from harness.errors import UnsupportedError, UserError
from harness.measure import GenerationTimer
from models.sources import ResolvedModel, resolve

__all__ = [
    "TORCH_DTYPES",
    "Backend",
    "Cell",
    "ControlRef",
    "EmbeddingRef",
    "GenerationTimer",
    "LoraRef",
    "Output",
    "Request",
    "ResolvedModel",
    "Session",
    "UnsupportedError",
    "UserError",
    "resolve",
]
