"""JupyterLab and headless Chromium for the browser tests: start them, drive notebooks, log pages.

Chromium is Debian's /usr/bin/chromium (scripts/setup.sh installs it), never a downloaded one.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from playwright.sync_api import ConsoleMessage, Locator, Page, Response, expect
from server import free_port, request

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium tries to reach Google's services, and the
# tests must send nothing off this machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 60.0
KERNEL_TIMEOUT_MS = 60_000
IDLE_STATUS = re.compile(r"\| Idle$")
EXECUTED_PROMPT = re.compile(r"^\[(\d+)\]:$")
ACTIVE_CELL = re.compile(r"\bjp-mod-active\b")


@dataclass
class JupyterLab:
    """A `jupyter lab` process started by a test on 127.0.0.1, stopped by pid."""

    base: Path
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen[bytes] | None = None

    @property
    def root_dir(self) -> Path:
        return self.base / "root"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def log_path(self) -> Path:
        return self.base / "jupyterlab.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def api(self) -> str:
        return f"{self.url}linuxworker/api/"

    def notebook_url(self, name: str) -> str:
        """Return the URL that logs in with the token and opens notebook ``name`` alone."""
        # `reset` starts from an empty workspace, so no tab of an earlier test is restored.
        return f"{self.url}lab/tree/{name}?reset&token={self.token}"

    def start(self) -> JupyterLab:
        runtime = self.base / "runtime"
        settings = self.base / "settings"
        for folder in (self.root_dir, self.state_dir, runtime, settings, self.base / "workspaces"):
            folder.mkdir(parents=True, exist_ok=True)
        # Without this setting JupyterLab opens a popup that offers to fetch its news.
        notification = settings / "@jupyterlab" / "apputils-extension"
        notification.mkdir(parents=True, exist_ok=True)
        (notification / "notification.jupyterlab-settings").write_text(
            '{"fetchNews": "false", "checkForUpdates": false}'
        )

        env = dict(os.environ)
        env["JUPYTER_RUNTIME_DIR"] = str(runtime)
        env["JUPYTER_CONFIG_DIR"] = str(self.base / "config")
        env["IPYTHONDIR"] = str(self.base / "ipython")
        # Kernels must find this server, which sets these for them, not an outer one.
        env.pop("JUPYTER_LINUXWORKER_URL", None)
        env.pop("JUPYTER_LINUXWORKER_TOKEN", None)
        command = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            f"--LinuxWorkerApp.state_dir={self.state_dir}",
            "--LinuxWorkerApp.grace=1",
            # JupyterLab sends no request off this machine: no news, update check or PyPI.
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={self.base / 'workspaces'}",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, env=env, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                request("GET", self.api + "images", self.token, timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise RuntimeError(f"jupyter lab did not answer within {START_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        """Stop the server with SIGTERM, as Ctrl-C would, which also shuts down its kernels."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


def write_notebook(path: Path, sources: list[str]) -> None:
    """Write a notebook of code cells with ``sources``, for the python3 kernel."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nbformat.write(notebook, path)


@dataclass
class PageLog:
    """The browser console, uncaught page errors and failed calls to the linuxworker API."""

    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed_api_calls: list[str] = field(default_factory=list)
    # Parts of URLs whose failed requests a test expects, such as the id of a deleted job.
    expected_failures: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)
        page.on("response", self._on_response)

    def _on_console(self, message: ConsoleMessage) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message.type}: {message.text}"
        if message.type != "error":
            self.lines.append(line)
            return
        # The text of a failed request's error names no URL, so the location is added.
        source = message.location.get("url", "")
        self.lines.append(f"{line} ({source})")
        if not self._is_expected(source):
            self.errors.append(f"{message.text} ({source})")

    def _on_page_error(self, error: Exception) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} uncaught: {error}")
        self.errors.append(str(error))

    def _on_response(self, response: Response) -> None:
        if "/linuxworker/api/" in response.url and response.status >= 400:
            failure = f"{response.request.method} {response.url}: {response.status}"
            self.lines.append(f"{time.strftime('%H:%M:%S')} failed API call: {failure}")
            if not self._is_expected(response.url):
                self.failed_api_calls.append(failure)

    def _is_expected(self, url: str) -> bool:
        return any(part in url for part in self.expected_failures)

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


class Notebook:
    """A notebook open in JupyterLab, run cell by cell with the keyboard as a user does."""

    def __init__(self, page: Page) -> None:
        self.page = page
        # Only the notebook on show: hidden tabs keep their cells in the page.
        self.panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        self.cells = self.panel.locator(".jp-Notebook .jp-Cell")
        self.next_cell = 0

    def open(self, url: str) -> Notebook:
        self.page.goto(url)
        self.wait_idle()
        return self

    def wait_idle(self) -> None:
        """Wait until the status bar shows the notebook's kernel started and idle."""
        status = self.page.locator(".jp-StatusBar-TextItem", has_text=IDLE_STATUS)
        expect(status).to_be_visible(timeout=KERNEL_TIMEOUT_MS)

    def cell(self, index: int) -> Locator:
        return self.cells.nth(index)

    def view(self, index: int) -> Locator:
        """Return the job view in the output of cell ``index``."""
        return self.cell(index).locator(".lw-job")

    def run_next(self, timeout_ms: float = 30_000) -> Locator:
        """Run the next cell with Shift+Enter and return it once it ran and the kernel is idle."""
        cell = self.cell(self.next_cell)
        # Shift+Enter moves the selection to the next cell, but a click in a view, such as on
        # Stop, selects the view's cell, so the next cell is selected again by its prompt.
        if "jp-mod-active" not in (cell.get_attribute("class") or "").split():
            cell.locator(".jp-InputPrompt").click()
        expect(cell).to_have_class(ACTIVE_CELL)
        is_code = "jp-CodeCell" in (cell.get_attribute("class") or "")
        prompt = cell.locator(".jp-InputArea-prompt")
        before = prompt.inner_text().strip() if is_code else ""
        self.page.keyboard.press("Shift+Enter")
        if is_code:
            # The prompt shows [*] while the cell runs and its new execution count after.
            expect(prompt).not_to_have_text(before, timeout=timeout_ms)
            expect(prompt).to_have_text(EXECUTED_PROMPT, timeout=timeout_ms)
            self.wait_idle()
        self.next_cell += 1
        return cell

    def run_until(self, end: int) -> None:
        """Run the cells from the next one to cell ``end``, not included."""
        while self.next_cell < end:
            self.run_next()

    def save(self) -> None:
        """Save with Ctrl+S and wait until the tab no longer shows unsaved changes."""
        self.page.keyboard.press("Control+s")
        dirty_tab = self.page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty")
        expect(dirty_tab).to_have_count(0, timeout=10_000)


def job_id_of(view: Locator) -> str:
    """Return the full id of the job that ``view`` shows, from its link to the whole output."""
    href = view.locator(".lw-footer a").get_attribute("href") or ""
    match = re.search(r"/jobs/([0-9a-f]+)/output\?format=text$", href)
    assert match, f"no job id in the view's output link {href!r}"
    return match.group(1)


def output_text(view: Locator) -> str:
    return view.locator("pre.lw-output").inner_text()


# Installed in the page: the longest time a 50 ms timer fired late, which is how long the page
# could not react to the user.
INSTALL_LAG_MONITOR = """() => {
  const monitor = { maxLagMs: 0, last: performance.now() };
  window.lwLagMonitor = monitor;
  setInterval(() => {
    const now = performance.now();
    monitor.maxLagMs = Math.max(monitor.maxLagMs, now - monitor.last - 50);
    monitor.last = now;
  }, 50);
}"""

# Installed on a view: page times of the click on its Stop button and of the first moment its
# badge reads STOPPED after it.
INSTALL_STOP_TIMER = """(view) => {
  const times = {};
  view.lwStopTimes = times;
  const stopButton = view.querySelector(".lw-stop");
  stopButton.addEventListener("click", () => {
    times.clicked = performance.now();
    const observer = new MutationObserver(() => {
      const badge = view.querySelector(".lw-badge");
      if (badge && badge.textContent === "STOPPED") {
        times.stopped = performance.now();
        observer.disconnect();
      }
    });
    observer.observe(view, { subtree: true, childList: true, characterData: true });
  }, { capture: true });
}"""
