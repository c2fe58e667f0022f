"""The pytest plugin: ``pytest --benchmark`` runs scenario files, one test item per cell.

Enabled by ``--benchmark`` only (as pytest's ``stepwise.py``): :func:`pytest_configure` then
builds a :class:`BenchSession`, keeps it in ``config.stash`` and registers it as a plugin;
without the flag nothing is collected and plain ``pytest`` runs the project's tests.

- Scenario files (``*.yaml``/``*.yml`` under ``--scenarios PATH...``, default ``scenarios/``,
  or named on the command line) are collected; each cell is a :class:`CellItem` with the id
  ``scenarios/smoke.yaml::diffusers-nooffload-hub-b1``. ``-k`` matches the id and the cell's
  axis values (``-k "diffusers and cpu"``). A run without explicit paths collects the scenarios
  only, not ``testpaths``.
- A cell runs through :class:`harness.runner.Runner` (one loaded model per load key, so the
  items of a file are ordered by load key). Its timed repeats go through pytest-benchmark's
  ``benchmark`` fixture in pedantic mode (one round per repeat), with it/s, memory, the cell
  and the environment in ``benchmark.extra_info``: ``--benchmark-json``, ``-autosave``,
  ``-compare``, ``-compare-fail`` and ``pytest-benchmark compare`` work on sdbench runs.
- Outcome: ``unsupported`` (including a CUDA cell without CUDA) → skip with the reason;
  ``error``/``oom``/``timeout`` → failure with the one-line message; with ``--bench-baseline``
  a regression (:mod:`harness.compare`) → failure naming metric, baseline, current and change.
- Every result is appended to ``--bench-results DIR``; ``--bench-report PATH`` writes the HTML
  report (with verdicts against the baseline) at the end of the session.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.errors import UserError
from harness.options import PYTEST_PREFIX, add_bench_options, alpha_option, get_option

if TYPE_CHECKING:
    import pandas as pd

    from harness.compare import Comparison
    from harness.matrix import Cell
    from harness.results import Result
    from harness.runner import Runner
    from harness.scenario import Scenario, Thresholds

SCENARIO_SUFFIXES = (".yaml", ".yml")
DEFAULT_SCENARIOS = Path("scenarios")
#: Metrics copied into ``benchmark.extra_info`` (besides the cell and the environment).
EXTRA_METRICS = (
    "its",
    "its_repeats",
    "denoise_its",
    "denoise_its_repeats",
    "cpu_peak_gb",
    "gpu_allocated_peak_gb",
    "gpu_reserved_peak_gb",
    "gpu_device_used_peak_gb",
    "load_s",
    "first_call_s",
)
ENV_EXTRA = (
    "gpu_name", "gpu_count", "gpu_memory_gb", "driver", "cuda", "torch", "diffusers", "doctor"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sdbench", "sdbench: benchmark scenario files")
    group.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="collect and run sdbench scenario files (one test per cell)",
    )
    group.addoption(
        "--scenarios",
        nargs="+",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"scenario files or directories to collect (default {DEFAULT_SCENARIOS}/)",
    )
    add_bench_options(group.addoption, PYTEST_PREFIX)


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("benchmark"):
        return
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("--benchmark needs the pytest-benchmark plugin (pip install "
                                "pytest-benchmark; do not disable it with -p no:benchmark)")
    try:
        session = BenchSession.from_config(config)
    except UserError as error:
        raise pytest.UsageError(str(error)) from None
    config.stash[session_key] = session
    config.pluginmanager.register(session, "sdbench-session")


class CellFailure(Exception):
    """A cell that failed or regressed; shown as its one-line message, no traceback."""


def _cell_test(benchmark: Any) -> None:
    """What a :class:`CellItem` asks of pytest: the ``benchmark`` fixture (run by runtest)."""


class CellItem(pytest.Function):
    """One cell of a scenario file: a function item so that it gets fixtures."""

    def __init__(self, *, cell: Cell, **kwargs: Any) -> None:
        super().__init__(callobj=_cell_test, **kwargs)
        self.cell = cell
        self.extra_keyword_matches.update(
            str(value)
            for value in (
                cell.scenario,
                cell.backend,
                cell.model,
                cell.source,
                cell.workflow,
                cell.device,
                cell.dtype,
                cell.offload,
                cell.sampler,
            )
        )

    #: Whether the cell reached its timed repeats (the ``benchmark`` fixture was used).
    timed = False

    def runtest(self) -> None:
        self.config.stash[session_key].run_item(self, self.funcargs["benchmark"])

    def repr_failure(  # type: ignore[override]
        self, excinfo: pytest.ExceptionInfo[BaseException]
    ) -> Any:
        if isinstance(excinfo.value, CellFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, self.name


class ScenarioFile(pytest.File):
    """A scenario file: its cells, ordered so that cells sharing a load key are adjacent."""

    def collect(self) -> Iterator[CellItem]:
        from harness.matrix import expand, group_by_load
        from harness.scenario import load_scenario

        bench = self.config.stash[session_key]
        # The path as in the node id, so that ``Cell.nodeid`` is this item's node id.
        scenario = load_scenario(self.path).model_copy(update={"path": self.nodeid})
        bench.scenarios[scenario.name] = scenario
        for group in group_by_load(expand(scenario)):
            for cell in group:
                bench.collected.add((cell.scenario, cell.id))
                yield CellItem.from_parent(self, name=cell.id, cell=cell)

    def repr_failure(  # type: ignore[override]
        self, excinfo: pytest.ExceptionInfo[BaseException]
    ) -> Any:
        if isinstance(excinfo.value, UserError):
            return str(excinfo.value).replace(str(self.path), self.nodeid, 1)
        return super().repr_failure(excinfo)


@dataclass(eq=False)  # a registered plugin must be hashable
class BenchSession:
    """State of one ``pytest --benchmark`` session (kept in ``config.stash``)."""

    config: pytest.Config
    results_dir: Path
    scenario_roots: list[Path]
    report: Path | None
    alpha: float
    overrides: dict[str, float]
    baseline_path: Path | None = None
    baseline: pd.DataFrame | None = None
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    #: (scenario, cell id) of every cell in the collected files, and of those selected to run.
    collected: set[tuple[str, str]] = field(default_factory=set)
    selected: set[tuple[str, str]] = field(default_factory=set)
    results: list[Result] = field(default_factory=list)
    verdicts: list[pd.DataFrame] = field(default_factory=list)
    report_error: str | None = None
    _runner: Runner | None = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> BenchSession:
        option = config.option
        here = config.invocation_params.dir
        given = config.getoption("scenarios")
        roots = [here / path for path in (given or [DEFAULT_SCENARIOS])]
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            # No paths on the command line: collect the scenarios, not ``testpaths``.
            missing = [str(path) for path in roots if not path.exists()]
            if missing:
                raise UserError(f"--scenarios: no such file or directory: {', '.join(missing)}")
            config.args = [str(path) for path in roots]
        elif given:
            config.args = [*config.args, *(str(path) for path in roots)]
        bench = cls(
            config=config,
            results_dir=here / get_option(option, PYTEST_PREFIX, "results"),
            scenario_roots=[path.resolve() for path in roots],
            report=_absolute(here, get_option(option, PYTEST_PREFIX, "report")),
            alpha=alpha_option(option, PYTEST_PREFIX),
            overrides=_overrides(option),
        )
        baseline = get_option(option, PYTEST_PREFIX, "baseline")
        if baseline is not None:
            bench.load_baseline(here / baseline)
        return bench

    def load_baseline(self, path: Path) -> None:
        from harness import baseline, environment
        from harness.results import load

        current = environment.fingerprint(environment.collect())
        self.baseline_path = baseline.resolve(path, current)
        self.baseline = load(self.baseline_path)

    # -- collection --------------------------------------------------------------------

    def pytest_collect_file(self, file_path: Path, parent: pytest.Collector) -> Any:
        if file_path.suffix not in SCENARIO_SUFFIXES or not self._wanted(file_path, parent):
            return None
        return ScenarioFile.from_parent(parent, path=file_path)

    def _wanted(self, file_path: Path, parent: pytest.Collector) -> bool:
        """Under a scenario root, or named on the command line itself."""
        resolved = file_path.resolve()
        if any(resolved == root or root in resolved.parents for root in self.scenario_roots):
            return True
        return parent.session.isinitpath(file_path)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        cells = [item.cell for item in session.items if isinstance(item, CellItem)]
        self.selected = {(cell.scenario, cell.id) for cell in cells}
        if cells:  # keep for parity only the outputs another backend's cell will need
            self.runner.parity.plan(cells)

    # -- running -----------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Iterator[None]:
        report = yield
        if isinstance(item, CellItem) and not item.timed:
            # Runs after pytest-benchmark's wrapper: a cell that failed or was skipped before
            # its repeats did not leave "the fixture unused" (its teardown warning).
            fixture: Any = item.funcargs.get("benchmark")
            if fixture is not None:
                fixture.skipped = True
        return report

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            from harness.runner import Runner

            self._runner = Runner(self.results_dir, progress=False)
        return self._runner

    def thresholds(self, scenario: str) -> Thresholds:
        from harness.scenario import Thresholds

        known = self.scenarios.get(scenario)
        base = known.thresholds if known is not None else Thresholds()
        return base.model_copy(update=self.overrides) if self.overrides else base

    def run_item(self, item: CellItem, benchmark: Any) -> None:
        cell = item.cell

        def timed_loop(generate_once: Any, repeats: int) -> None:
            benchmark.group = cell.scenario
            benchmark.pedantic(generate_once, rounds=repeats, iterations=1, warmup_rounds=0)

        result = self.runner.run_cell(cell, timed_loop)
        self.results.append(result)
        benchmark.extra_info.update(_extra_info(result))
        item.timed = benchmark.stats is not None
        if result.status == "unsupported":
            raise pytest.skip.Exception(result.reason or "unsupported", _use_item_location=True)
        if result.status != "ok":
            raise CellFailure(f"{result.status}: {result.reason}")
        checks = result.metrics.get("check_results") or {}
        failed = [f"{name}: {c['detail']}" for name, c in checks.items()
                  if c["status"] in ("fail", "error")]
        if failed:
            raise CellFailure("conformance: " + "; ".join(failed))
        if self.baseline is not None:
            self._check_regression(result)

    def _check_regression(self, result: Result) -> None:
        import pandas as pd

        from harness.compare import compare, describe
        from harness.results import to_row

        cell = result.cell
        base = self.baseline
        assert base is not None
        rows = base[(base["scenario"] == cell.scenario) & (base["cell_id"] == cell.id)]
        comparison = compare(
            rows,
            pd.DataFrame([to_row(result)]),
            self.thresholds(cell.scenario),
            alpha=self.alpha,
        )
        self.verdicts.append(comparison.table)
        regressions = comparison.regressions.to_dict("records")
        if regressions:
            raise CellFailure("regression: " + "; ".join(describe(row) for row in regressions))

    # -- end of session ----------------------------------------------------------------

    def comparison(self) -> Comparison | None:
        """All verdicts of the session, with the baseline's cells that did not run."""
        if self.baseline is None:
            return None
        import pandas as pd

        from harness.compare import COLUMNS, Comparison, compare
        from harness.results import to_row

        current = pd.DataFrame([to_row(result) for result in self.results])
        limits = {name: self.thresholds(name) for name in self.scenarios}
        if current.empty:
            return Comparison(pd.DataFrame(columns=list(COLUMNS)), self.alpha)
        # The baseline's cells that were selected, and those of the scenarios that ran which
        # the scenario files no longer have: a -k selection does not make the others missing.
        ran = set(current["scenario"])
        keys = list(zip(self.baseline["scenario"], self.baseline["cell_id"], strict=True))
        keep = [
            key in self.selected or (key[0] in ran and key not in self.collected)
            for key in keys
        ]
        baseline = self.baseline[keep]
        return compare(baseline, current, limits, alpha=self.alpha)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self._runner is not None:
            self._runner.close()
        if self.report is None or not self.results:
            return
        try:
            self._write_report()
        except Exception as error:  # noqa: BLE001 - the run's outcome stands; say why
            self.report_error = f"{type(error).__name__}: {error}"
            if session.exitstatus == 0:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _write_report(self) -> None:
        import pandas as pd

        from harness.results import to_row
        from reports import render

        assert self.report is not None
        frame = pd.DataFrame([to_row(result) for result in self.results])
        comparison = self.comparison()
        html = render(
            frame,
            fmt="html",
            baseline=self.baseline,
            verdicts=comparison.table if comparison is not None else None,
            image_root=self.results_dir,
        )
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.report.write_text(html, encoding="utf-8")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results:
            return
        from harness.compare import summary_line

        counts: dict[str, int] = {}
        for result in self.results:
            counts[result.status] = counts.get(result.status, 0) + 1
        statuses = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        write = terminalreporter.write_line
        terminalreporter.section("sdbench")
        store = self._runner.store.path if self._runner and self._runner.store else "-"
        write(f"{len(self.results)} cells: {statuses}; results in {store}")
        comparison = self.comparison()
        if comparison is not None:
            write(f"against {self.baseline_path}: {summary_line(comparison)}")
        if self.report_error is not None:
            write(f"report not written: {self.report_error}", red=True)
        elif self.report is not None:
            write(f"report: {self.report}")


session_key = pytest.StashKey[BenchSession]()


def _absolute(here: Path, path: Path | None) -> Path | None:
    return None if path is None else here / path


def _overrides(option: Any) -> dict[str, float]:
    from harness.options import threshold_overrides

    return threshold_overrides(option, PYTEST_PREFIX)


def _extra_info(result: Result) -> dict[str, Any]:
    metrics = result.metrics
    info: dict[str, Any] = {
        "status": result.status,
        "reason": result.reason,
        "cell": result.cell.to_dict(),
        "env": {key: result.env.get(key) for key in ENV_EXTRA},
        "env_fingerprint": result.env_fingerprint,
    }
    info.update({key: metrics[key] for key in EXTRA_METRICS if key in metrics})
    return {key: _jsonable(value) for key, value in info.items()}


def _jsonable(value: Any) -> Any:
    """pytest-benchmark writes extra_info as JSON: no NaN/inf, no tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value
