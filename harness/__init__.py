"""sdbench's core: scenarios, matrix expansion, runner, measurement and results.

The names below are imported on first use (PEP 562), so that ``import harness.errors`` — what
a backend adapter needs — does not pull in the scenario schema (pydantic) or the results
store (pandas). The adapter API itself is :mod:`sdbench` (docs/backends.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.errors import UnsupportedError, UserError
    from harness.matrix import Cell, expand, group_by_load
    from harness.results import Result, ResultStore, load
    from harness.scenario import Scenario, load_scenario, parse_scenario

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "Cell": "harness.matrix",
    "Result": "harness.results",
    "ResultStore": "harness.results",
    "Scenario": "harness.scenario",
    "UnsupportedError": "harness.errors",
    "UserError": "harness.errors",
    "expand": "harness.matrix",
    "group_by_load": "harness.matrix",
    "load": "harness.results",
    "load_scenario": "harness.scenario",
    "parse_scenario": "harness.scenario",
}
__all__ = [
    "Cell",
    "Result",
    "ResultStore",
    "Scenario",
    "UnsupportedError",
    "UserError",
    "expand",
    "group_by_load",
    "load",
    "load_scenario",
    "parse_scenario",
]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'harness' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)
