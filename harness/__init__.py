"""sdbench's core: scenarios, matrix expansion, runner, measurement and results."""

from harness.errors import UnsupportedError, UserError
from harness.matrix import Cell, expand, group_by_load
from harness.results import Result, ResultStore, load
from harness.scenario import Scenario, load_scenario, parse_scenario

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
