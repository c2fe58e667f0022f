"""The pytest plugin: ``pytest --benchmark`` runs scenario files, one test item per cell.

Enabled by ``--benchmark`` only (as pytest's ``stepwise.py``): :func:`pytest_configure` then
builds a :class:`BenchSession`, keeps it in ``config.stash`` and registers it as a plugin;
without the flag nothing is collected and plain ``pytest`` runs the project's tests.

- Scenario files (``*.yaml``/``*.yml`` under ``--scenarios PATH...``, default ``scenarios/``,
  or named on the command line) are collected; each cell is a :class:`CellItem` with the id
  ``scenarios/smoke.yaml::diffusers-nooffload-hub-b1``. ``-k`` matches the id and the cell's
  axis values (``-k "diffusers and cpu"``). A run without explicit paths collects the scenarios
  only, not ``testpaths``.
- A cell runs through :class:`harness.runner.Runner`: in a worker process per load group by
  default (``--bench-isolate``; the items of a file are ordered by load key so one worker
  serves a group). The timed repeats happen in the worker; their device-synchronised wall
  times are handed to pytest-benchmark through the ``benchmark`` marker's public ``timer``
  argument: a :class:`ReplayClock` per item makes ``benchmark.pedantic`` (one round per
  repeat) record exactly those times, never the round trip to the worker. it/s, memory, the
  cell and the environment go into ``benchmark.extra_info``: ``--benchmark-json``,
  ``-autosave``, ``-compare``, ``-compare-fail`` and ``pytest-benchmark compare`` work on
  sdbench runs.
- Under pytest-xdist (``-n N``) the cells of one load group — and the groups whose cells are
  compared for cross-backend parity — carry one ``xdist_group`` mark and ``--dist loadgroup``
  is chosen, so they stay on one xdist worker; every xdist worker appends to the same results
  store under one run id, takes its own GPU when there are several, and the controller writes
  the report and the summary from the store.
- Outcome: ``unsupported`` (including a CUDA cell without CUDA) → skip with the reason;
  ``error``/``oom``/``timeout`` → failure with the one-line message; with ``--bench-baseline``
  a regression (:mod:`harness.compare`) → failure naming metric, baseline, current and change.
- Every result is appended to ``--bench-results DIR``; ``--bench-report PATH`` writes the HTML
  report (with verdicts against the baseline) at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.errors import UserError
from harness.options import (
    PYTEST_PREFIX,
    add_bench_options,
    add_isolate_option,
    alpha_option,
    get_option,
)

if TYPE_CHECKING:
    import pandas as pd

    from harness.ab import ABRunner
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
    "gpu_process_used_peak_gb",
    "cpu_model_gb",
    "load_s",
    "first_call_s",
)
ENV_EXTRA = (
    "gpu_name", "gpu_count", "gpu_memory_gb", "driver", "cuda", "torch", "diffusers",
    "backend_packages", "doctor",
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
    add_isolate_option(group.addoption, PYTEST_PREFIX)
    group.addoption(
        f"--{PYTEST_PREFIX}ab-base",
        dest="bench_ab_base",
        default=None,
        metavar="SIDE",
        help="run the cells as A/B: this tree (head) against SIDE (a git ref of the rootdir's "
        "repository, a directory or a Python executable), interleaved; a regression fails",
    )
    group.addoption(
        f"--{PYTEST_PREFIX}ab-max-rounds",
        dest="bench_ab_max_rounds",
        type=int,
        default=None,
        metavar="N",
        help="round budget of an inconclusive A/B cell (default: as python -m harness ab)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Under pytest-xdist, ``--benchmark`` distributes by ``xdist_group`` (load groups).

    This sets the controller's scheduling; the workers, which parse the command line again
    and never see this, are told in :func:`pytest_configure`."""
    if config.getoption("benchmark") and getattr(config.option, "numprocesses", None):
        config.option.dist = "loadgroup"


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
    if hasattr(config, "workerinput"):  # an xdist worker: name items by their xdist_group
        config.option.loadgroup = True
    # Cell items carry pytest-xdist's group mark; known even where xdist is not installed.
    config.addinivalue_line("markers", "xdist_group(name): run in one pytest-xdist worker")


class CellFailure(Exception):
    """A cell that failed or regressed; shown as its one-line message, no traceback."""


class ReplayClock:
    """A pytest-benchmark timer that replays times measured elsewhere.

    pytest-benchmark times a round as ``timer()``, the target, ``timer()``. This clock reads
    0.0 at the start of a round and, at its end, the duration that the round's target handed
    to :meth:`replay`, so each round's duration is exactly a time the worker measured.
    """

    __name__ = "ReplayClock"  # how pytest-benchmark names the timer in its JSON

    def __init__(self) -> None:
        self._next = 0.0

    def __call__(self) -> float:
        value, self._next = self._next, 0.0
        return value

    def replay(self, seconds: float) -> None:
        self._next = float(seconds)


def _cell_test(benchmark: Any) -> None:
    """What a :class:`CellItem` asks of pytest: the ``benchmark`` fixture (run by runtest)."""


class CellItem(pytest.Function):
    """One cell of a scenario file: a function item so that it gets fixtures."""

    def __init__(self, *, cell: Cell, xdist_group: str, **kwargs: Any) -> None:
        super().__init__(callobj=_cell_test, **kwargs)
        self.cell = cell
        self.clock = ReplayClock()
        self.add_marker(pytest.mark.benchmark(timer=self.clock, group=cell.scenario))
        self.add_marker(pytest.mark.xdist_group(xdist_group))
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
        groups = group_by_load(expand(scenario))
        names = xdist_groups(groups)
        for group in groups:
            for cell in group:
                bench.collected.add((cell.scenario, cell.id))
                yield CellItem.from_parent(
                    self, name=cell.id, cell=cell, xdist_group=names[cell.load_key()]
                )

    def repr_failure(  # type: ignore[override]
        self, excinfo: pytest.ExceptionInfo[BaseException]
    ) -> Any:
        if isinstance(excinfo.value, UserError):
            return str(excinfo.value).replace(str(self.path), self.nodeid, 1)
        return super().repr_failure(excinfo)


def xdist_groups(groups: list[list[Cell]]) -> dict[tuple[Any, ...], str]:
    """An ``xdist_group`` name per load key: load groups whose cells are compared for
    cross-backend parity (equal :func:`~harness.conformance.parity_key`) share one."""
    from harness.conformance import parity_key

    keys = [group[0].load_key() for group in groups]
    parent = list(range(len(groups)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first: dict[tuple[Any, ...], int] = {}
    for index, group in enumerate(groups):
        for cell in group:
            other = first.setdefault(parity_key(cell), index)
            parent[root(index)] = root(other)
    return {key: f"{groups[root(i)][0].scenario}:{root(i)}" for i, key in enumerate(keys)}


@dataclass(eq=False)  # a registered plugin must be hashable
class BenchSession:
    """State of one ``pytest --benchmark`` session (kept in ``config.stash``)."""

    config: pytest.Config
    results_dir: Path
    scenario_roots: list[Path]
    report: Path | None
    alpha: float
    overrides: dict[str, float]
    isolate: str = "load"
    #: Shared by the xdist workers (the controller hands it over in ``workerinput``).
    run_id: str | None = None
    ab_base: str | None = None
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
    _ab: ABRunner | None = None
    ab_records: list[dict[str, Any]] = field(default_factory=list)

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
            isolate=get_option(option, PYTEST_PREFIX, "isolate"),
            run_id=getattr(config, "workerinput", {}).get("sdbench_run_id"),
            ab_base=config.getoption("bench_ab_base"),
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
    def is_xdist_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist controller: every worker records under this session's run id."""
        node.workerinput["sdbench_run_id"] = self.ensure_run_id()

    def ensure_run_id(self) -> str:
        if self.run_id is None:
            from harness.runner import new_run_id

            self.run_id = new_run_id()
        return self.run_id

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            from harness.runner import Runner

            self._runner = Runner(
                self.results_dir,
                run_id=self.ensure_run_id(),
                progress=False,
                isolate=self.isolate,
                gpus=_xdist_worker_gpu(self.config),
            )
        return self._runner

    def thresholds(self, scenario: str) -> Thresholds:
        from harness.scenario import Thresholds

        known = self.scenarios.get(scenario)
        base = known.thresholds if known is not None else Thresholds()
        return base.model_copy(update=self.overrides) if self.overrides else base

    @property
    def ab(self) -> ABRunner:
        if self._ab is None:
            import tempfile

            from harness.ab import ABRunner, resolve_side, this_tree

            assert self.ab_base is not None
            work = Path(tempfile.mkdtemp(prefix="sdbench-sides-"))
            base = resolve_side("base", self.ab_base, self.config.rootpath, work)
            limits = {name: s.thresholds.model_dump() for name, s in self.scenarios.items()}
            limits = {name: {**value, **self.overrides} for name, value in limits.items()}
            rounds = self.config.getoption("bench_ab_max_rounds")
            budget = {"max_rounds": rounds} if rounds else {}
            self._ab = ABRunner(base, this_tree(), self.results_dir, progress=False,
                                thresholds=limits, **budget)
        return self._ab

    def run_ab_item(self, item: CellItem, benchmark: Any) -> None:
        """``--bench-ab-base``: the cell as A/B; pytest-benchmark gets the head's rounds."""
        from harness.ab import describe

        record = self.ab.run_cell(item.cell)
        self.ab_records.append(record)
        walls = [r["wall_s"] for r in (record.get("series") or {}).get("head", [])]
        if walls:
            durations = iter(walls)
            benchmark.pedantic(lambda: item.clock.replay(next(durations)), rounds=len(walls),
                               iterations=1, warmup_rounds=0)
        benchmark.extra_info.update(
            {"ab_verdict": record["verdict"], "ab_base": self.ab_base,
             "ab": (record.get("verdicts") or [None])[0], "cell": item.cell.to_dict()}
        )
        item.timed = benchmark.stats is not None
        if record["verdict"] in ("regression", "error"):
            raise CellFailure(describe(record))
        if record["verdict"] == "not comparable":
            raise pytest.skip.Exception(describe(record), _use_item_location=True)

    def run_item(self, item: CellItem, benchmark: Any) -> None:
        if self.ab_base is not None:
            return self.run_ab_item(item, benchmark)
        result = self.runner.run_cell(item.cell)
        self.results.append(result)
        walls = result.metrics.get("wall_s_repeats") or []
        if walls:  # the worker's timed repeats, one pytest-benchmark round each
            durations = iter(walls)
            benchmark.pedantic(
                lambda: item.clock.replay(next(durations)),
                rounds=len(walls),
                iterations=1,
                warmup_rounds=0,
            )
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

    @property
    def is_xdist_controller(self) -> bool:
        return self.config.pluginmanager.has_plugin("dsession")

    def session_results(self) -> list[Result]:
        """This session's results: its own, or on an xdist controller those its workers
        appended to the store under the session's run id."""
        if not self.is_xdist_controller:
            return self.results
        from harness.results import ResultStore, iter_results

        store = ResultStore(self.results_dir)
        if not store.path.exists():
            return []
        found = [result for result in iter_results(store.path) if result.run_id == self.run_id]
        for result in found:  # the controller collected nothing: know the scenarios that ran
            self._know_scenario(result.cell)
            self.selected.add((result.cell.scenario, result.cell.id))
        return found

    def _know_scenario(self, cell: Cell) -> None:
        from harness.scenario import load_scenario

        path = self.config.rootpath / cell.scenario_path
        if cell.scenario not in self.scenarios and path.is_file():
            self.scenarios[cell.scenario] = load_scenario(path)

    def comparison(self) -> Comparison | None:
        """All verdicts of the session, with the baseline's cells that did not run."""
        if self.baseline is None:
            return None
        import pandas as pd

        from harness.compare import COLUMNS, Comparison, compare
        from harness.results import to_row

        current = pd.DataFrame([to_row(result) for result in self.session_results()])
        limits = {name: self.thresholds(name) for name in self.scenarios}
        if current.empty:
            return Comparison(pd.DataFrame(columns=list(COLUMNS)), self.alpha)
        # The baseline's cells that were selected, and those of the scenarios that ran which
        # the scenario files no longer have: a -k selection does not make the others missing.
        # (An xdist controller collects nothing: there, the cells that ran are the selection.)
        ran = set(current["scenario"])
        collected = self.collected or self.selected
        keys = list(zip(self.baseline["scenario"], self.baseline["cell_id"], strict=True))
        keep = [
            key in self.selected or (key[0] in ran and key not in collected)
            for key in keys
        ]
        baseline = self.baseline[keep]
        return compare(baseline, current, limits, alpha=self.alpha)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self._runner is not None:
            self._runner.close()
        if self._ab is not None:
            self._ab.close()
            self._ab.arms["base"].side.close()
        if self.report is None or self.is_xdist_worker or not self.session_results():
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
        frame = pd.DataFrame([to_row(result) for result in self.session_results()])
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
        if self.ab_records:
            verdicts: dict[str, int] = {}
            for record in self.ab_records:
                verdicts[record["verdict"]] = verdicts.get(record["verdict"], 0) + 1
            shown = ", ".join(f"{n} {verdict}" for verdict, n in sorted(verdicts.items()))
            terminalreporter.section("sdbench A/B")
            terminalreporter.write_line(
                f"{len(self.ab_records)} cells against {self.ab_base}: {shown}; "
                f"A/B records in {self.results_dir / 'ab.jsonl'}"
            )
        results = self.session_results()
        if not results:
            return
        from harness.compare import summary_line
        from harness.results import ResultStore

        counts: dict[str, int] = {}
        for result in results:
            counts[result.status] = counts.get(result.status, 0) + 1
        statuses = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        write = terminalreporter.write_line
        terminalreporter.section("sdbench")
        write(f"{len(results)} cells: {statuses}; results in {ResultStore(self.results_dir).path}")
        comparison = self.comparison()
        if comparison is not None:
            write(f"against {self.baseline_path}: {summary_line(comparison)}")
        if self.report_error is not None:
            write(f"report not written: {self.report_error}", red=True)
        elif self.report is not None:
            write(f"report: {self.report}")


def _xdist_worker_gpu(config: pytest.Config) -> list[str]:
    """On an xdist worker with several GPUs visible, the one GPU this worker takes."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return []
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return []
    index = int(str(workerinput.get("workerid", "gw0")).lstrip("gw") or 0)
    return [str(index % count)]


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
    from harness.results import jsonable

    return {key: jsonable(value) for key, value in info.items()}
