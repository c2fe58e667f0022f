"""The HTML report in a real headless Chromium (Debian's ``chromium`` package).

The page is driven through the DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON; Python's standard library only): enable the
Runtime, Log, Network and Page domains, navigate to the file, wait for the load event, then
check that nothing was logged as an error, that no request left the file (``data:`` URIs
only), that the table and the charts are in the DOM, and take a screenshot.

Skipped where ``/usr/bin/chromium`` is absent; ``.ci/run`` installs it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.results import load
from reports import render
from reports.sample import sample_verdicts, write_sample

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 2000)
TIMEOUT_S = 60.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed"),
]


class DevTools:
    """A minimal DevTools-protocol client over Chromium's pipe transport."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes() -> None:  # runs in the child: the protocol lives on fds 3 and 4
            # Move both ends above 10 first: a pipe end may itself be fd 3 or 4, and dup2
            # onto itself would keep its close-on-exec flag.
            reading = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            writing = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(reading, 3)
            os.dup2(writing, 4)

        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=wire_pipes,
            close_fds=False,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.events: list[dict[str, Any]] = []
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                self._replies.put(json.loads(raw))

    def _pump(self, deadline: float) -> dict[str, Any]:
        try:
            message = self._replies.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise TimeoutError("chromium did not answer in time") from None
        if "method" in message:
            self.events.append(message)
        return message

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._pump(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        for event in self.events:
            if event["method"] == method:
                return event
        while True:
            message = self._pump(deadline)
            if message.get("method") == method:
                return message

    def close(self) -> str:
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            _, stderr = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        os.close(self._to_browser)
        return stderr.decode(errors="replace")


def open_page(html: Path, screenshot: Path, profile: Path) -> tuple[list[dict[str, Any]], dict]:
    """Load ``html``; return the protocol events and facts read from the DOM."""
    browser = DevTools(profile)
    try:
        targets = browser.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session = browser.call("Target.attachToTarget", targetId=page["targetId"],
                               flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable", session)
        browser.call("Emulation.setDeviceMetricsOverride", session, width=WINDOW[0],
                     height=WINDOW[1], deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", session, url=html.as_uri())
        browser.wait_for("Page.loadEventFired")
        facts = browser.call(
            "Runtime.evaluate", session, returnByValue=True,
            expression="""({
                tables: document.querySelectorAll('table.results').length,
                rows: document.querySelectorAll('table.results tbody tr').length,
                charts: document.querySelectorAll('svg.chart').length,
                images: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
                scripts: document.scripts.length,
                text: document.body.innerText.slice(0, 20000),
            })""",
        )["result"]["value"]
        shot = browser.call("Page.captureScreenshot", session, format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    return browser.events, facts


def _problems(events: list[dict[str, Any]], page_url: str) -> list[str]:
    problems = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            problems.append(f"console {params['type']}: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params.get('exceptionDetails')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            problems.append(f"log error: {params['entry'].get('text')} "
                            f"{params['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if url != page_url and not url.startswith("data:"):
                problems.append(f"network request: {url}")
        elif method == "Network.loadingFailed":
            problems.append(f"loading failed: {params.get('errorText')}")
    return problems


def test_report_renders_in_chromium_without_errors_or_network(tmp_path: Path) -> None:
    current = write_sample(tmp_path / "current", run_id="current")
    baseline = write_sample(tmp_path / "baseline", run_id="baseline", scale=1.03,
                            timestamp="2024-12-01T00:00:00+00:00")
    html = tmp_path / "report.html"
    html.write_text(
        render(load(current), "html", baseline=load(baseline), verdicts=sample_verdicts(),
               image_root=current),
        encoding="utf-8",
    )
    screenshot = tmp_path / "report.png"

    events, facts = open_page(html, screenshot, tmp_path / "profile")

    assert _problems(events, html.as_uri()) == []
    assert any(e["method"] == "Network.requestWillBeSent" for e in events), "Network not seen"
    assert facts["tables"] == 2 and facts["rows"] == 9
    assert facts["charts"] == 8 + 2  # it/s per pipeline with figures, memory per scenario
    assert facts["images"] >= 35
    assert facts["scripts"] == 0
    assert "diffusers with safetensors" in facts["text"]
    assert "2 regressions against the baseline" in facts["text"]
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 50_000  # a rendered page, not a blank one
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == WINDOW
    if target := os.environ.get("SDBENCH_SCREENSHOT"):
        Path(target).write_bytes(data)
