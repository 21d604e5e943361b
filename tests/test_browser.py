"""The job views in a real browser: JupyterLab started by the tests, driven in headless Chromium.

Each test writes a screenshot of its final page and the browser console to
test-artifacts/browser/, and the folder also gets the JupyterLab log.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("playwright.sync_api")
from browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    INSTALL_LAG_MONITOR,
    INSTALL_STOP_TIMER,
    JupyterLab,
    Notebook,
    PageLog,
    job_id_of,
    output_text,
    write_notebook,
)
from playwright.sync_api import Page, expect, sync_playwright
from server import all_jobs, assert_no_job_leftovers
from server import request as api_request

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root"),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium",
    ),
]

REPOSITORY = Path(__file__).parent.parent
ARTIFACTS = REPOSITORY / "test-artifacts" / "browser"
FLOOD_BYTES = 50_000_000
TAIL_LINES = 200
TICKER_LINES = 20
RUNNING_VIEWS = 8
# A page that hangs cannot be photographed, so the test fails without waiting long for it.
SCREENSHOT_TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterLab]:
    """JupyterLab with the extension. At the end its jobs are stopped and checked for leftovers."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser test artifacts: {ARTIFACTS}")
    jupyter_lab = JupyterLab(tmp_path_factory.mktemp("jupyterlab"))
    jupyter_lab.root_dir.mkdir(parents=True)
    shutil.copy(REPOSITORY / "notebooks" / "quickstart.ipynb", jupyter_lab.root_dir)
    jupyter_lab.start()
    try:
        yield jupyter_lab
    finally:
        for job in all_jobs(str(jupyter_lab.state_dir)):
            if job["status"] in ("PENDING", "RUNNING"):
                api_request(
                    "POST",
                    f"{jupyter_lab.api}jobs/{job['id']}/stop",
                    jupyter_lab.token,
                    {"grace": 0},
                )
        jupyter_lab.stop()
        shutil.copy(jupyter_lab.log_path, ARTIFACTS / "jupyterlab.log")
    assert_no_job_leftovers(str(jupyter_lab.state_dir))


@pytest.fixture
def page_log() -> PageLog:
    """The console and failed API calls of the test's page, checked when the test passed."""
    return PageLog()


@pytest.fixture
def page(request: pytest.FixtureRequest, page_log: PageLog) -> Iterator[Page]:
    """A page of a fresh Chromium profile, whose screenshot and console are saved at the end."""
    name = request.node.name
    failed_before = request.session.testsfailed
    log = page_log
    with (
        tempfile.TemporaryDirectory(prefix="chromium-") as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        browser_page = context.pages[0] if context.pages else context.new_page()
        log.attach(browser_page)
        try:
            yield browser_page
        finally:
            try:
                browser_page.screenshot(
                    path=ARTIFACTS / f"{name}.png", full_page=True, timeout=SCREENSHOT_TIMEOUT_MS
                )
            finally:
                log.write(ARTIFACTS / f"{name}.console.log")
                context.close()
            print(f"\n{name}: screenshot and console log in {ARTIFACTS}")
    # The console and the API calls are checked after the test, so that a failed assertion
    # in the test itself is the one reported.
    if request.session.testsfailed == failed_before:
        assert log.errors == [], f"errors in the browser console: {log.errors}"
        assert log.failed_api_calls == [], f"failed API calls: {log.failed_api_calls}"


def find_code_cell(notebook: nbformat.NotebookNode, text: str) -> int:
    """Return the index of the first code cell of ``notebook`` whose source contains ``text``."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and text in cell.source:
            return index
    raise AssertionError(f"no code cell contains {text!r}")


def test_quickstart_in_browser(lab: JupyterLab, page: Page) -> None:
    quickstart = nbformat.read(lab.root_dir / "quickstart.ipynb", as_version=4)
    hello_cell = find_code_cell(quickstart, "--name hello")
    sleeper_cell = find_code_cell(quickstart, "--name sleeper")
    refresh_cell = find_code_cell(quickstart, "sleeper.refresh()")
    list_cell = find_code_cell(quickstart, "%linuxjob list")
    notebook = Notebook(page).open(lab.notebook_url("quickstart.ipynb"))

    notebook.run_until(hello_cell + 1)
    hello = notebook.view(hello_cell)
    expect(hello.locator(".lw-badge")).to_have_text("COMPLETED", timeout=20_000)
    hostname = hello.locator(".lw-header code").inner_text()
    assert re.fullmatch(r"[0-9a-f]{12}", hostname)
    expected = "".join(f"hello {i} from {hostname}\n" for i in (1, 2, 3))
    expect(hello.locator("pre.lw-output")).to_have_text(expected)
    assert output_text(hello) == expected
    expect(hello.locator(".lw-stop")).to_be_hidden()

    # The link opens with the browser's login cookie, as a click on it would.
    whole_output_url = hello.locator(".lw-footer a").evaluate("(link) => link.href")
    whole_output = page.request.get(whole_output_url)
    assert whole_output.status == 200
    assert whole_output.headers["content-type"] == "text/plain; charset=utf-8"
    assert whole_output.text() == expected

    # The usage graph polls once a second, so the 3 s job has drawn a line by now.
    graph_points = hello.locator("svg.lw-graph polyline").first.get_attribute("points") or ""
    assert len(graph_points.split()) >= 2, f"usage graph points: {graph_points!r}"
    expect(hello.locator(".lw-usage")).to_contain_text("of 1.0 GiB")

    notebook.run_until(sleeper_cell + 1)
    sleeper = notebook.view(sleeper_cell)
    expect(sleeper.locator(".lw-badge")).to_have_text("RUNNING", timeout=20_000)
    sleeper.locator(".lw-stop").click()
    expect(sleeper.locator(".lw-badge")).to_have_text("STOPPED", timeout=5_000)
    expect(sleeper.locator(".lw-header")).to_contain_text("exit code 143")
    expect(sleeper.locator(".lw-stop")).to_be_hidden()
    expect(sleeper.locator(".lw-error")).to_have_text("")
    hello.scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "test_quickstart_in_browser-views.png")

    # The rest of the notebook runs as it would without the click, and `sleeper.stop()` on the
    # stopped job only returns it.
    notebook.run_until(list_cell + 1)
    refresh_output = notebook.cell(refresh_cell).locator(".jp-OutputArea-output")
    expect(refresh_output).to_have_text("'STOPPED'")

    job_list = notebook.cell(list_cell).locator(".lw-list")
    hello_row = job_list.locator(f'tr[data-job-id="{job_id_of(hello)}"]')
    sleeper_row = job_list.locator(f'tr[data-job-id="{job_id_of(sleeper)}"]')
    expect(hello_row.locator(".lw-badge")).to_have_text("COMPLETED", timeout=10_000)
    expect(sleeper_row.locator(".lw-badge")).to_have_text("STOPPED")
    expect(hello_row).to_contain_text("hello")
    expect(sleeper_row).to_contain_text("sleeper")


def test_long_output_and_stop(lab: JupyterLab, page: Page) -> None:
    write_notebook(
        lab.root_dir / "long_output.ipynb",
        [
            "%load_ext jupyter_linuxworker",
            "%%linuxjob --name sleep\nsleep 600",
            f"%%linuxjob --name flood\nyes | head -c {FLOOD_BYTES}",
        ],
    )
    notebook = Notebook(page).open(lab.notebook_url("long_output.ipynb"))
    page.evaluate(INSTALL_LAG_MONITOR)
    notebook.run_until(2)
    sleep = notebook.view(1)
    expect(sleep.locator(".lw-badge")).to_have_text("RUNNING", timeout=20_000)
    sleep.evaluate(INSTALL_STOP_TIMER)

    # Stop is clicked once the first lines of the flood reach the page, which then usually
    # still receives the rest of it. The lag monitor covers the whole stream either way.
    notebook.run_next()
    flood = notebook.view(2)
    expect(flood.locator(".lw-notice")).to_contain_text("Showing the last", timeout=20_000)
    print(f"\nflood view at the click: {flood.locator('.lw-notice').inner_text()!r}")
    clicked_at = time.monotonic()
    sleep.locator(".lw-stop").click()
    expect(sleep.locator(".lw-badge")).to_have_text("STOPPED", timeout=5_000)
    seen_after = time.monotonic() - clicked_at
    times = sleep.evaluate("(view) => view.lwStopTimes")
    assert "stopped" in times, f"the page saw no STOPPED badge after the click: {times}"
    stop_ms = times["stopped"] - times["clicked"]
    print(f"Stop click to STOPPED: {stop_ms:.0f} ms in the page, {seen_after:.2f} s in the test")
    assert stop_ms < 1000

    # yes prints "y\n", so the job prints FLOOD_BYTES / 2 lines and the tail keeps the last 200.
    dropped = FLOOD_BYTES // 2 - TAIL_LINES
    notice = (
        f"Showing the last {TAIL_LINES} lines: {dropped} earlier lines are in the whole output."
    )
    expect(flood.locator(".lw-notice")).to_have_text(notice, timeout=60_000)
    expect(flood.locator(".lw-badge")).to_have_text("COMPLETED")
    lines = output_text(flood).splitlines()
    assert len(lines) == TAIL_LINES
    assert set(lines) == {"y"}

    max_lag_ms = page.evaluate("() => window.lwLagMonitor.maxLagMs")
    print(f"longest time the page did not respond: {max_lag_ms:.0f} ms")
    assert max_lag_ms < 1000


def test_more_views_than_connections(lab: JupyterLab, page: Page) -> None:
    # Chromium opens at most 6 HTTP/1.1 connections to one host, and a view that follows its
    # job live keeps one open, so the other views must poll without blocking JupyterLab.
    notebook_file = lab.root_dir / "many_views.ipynb"
    waiting_jobs = [
        f"%%linuxjob --name wait{i}\necho ready {i}; sleep 2; echo later {i}; sleep 600"
        for i in range(RUNNING_VIEWS)
    ]
    write_notebook(
        notebook_file, ["%load_ext jupyter_linuxworker", *waiting_jobs, "%linuxjob list"]
    )
    notebook = Notebook(page).open(lab.notebook_url(notebook_file.name))
    notebook.run_until(RUNNING_VIEWS + 2)
    views = [notebook.view(i + 1) for i in range(RUNNING_VIEWS)]

    for i, view in enumerate(views):
        expect(view.locator(".lw-badge")).to_have_text("RUNNING", timeout=10_000)
        expected = f"ready {i}\nlater {i}\n"
        expect(view.locator("pre.lw-output")).to_have_text(expected, timeout=10_000)
        assert output_text(view) == expected
    notebook.save()

    views[-1].locator(".lw-stop").click()
    expect(views[-1].locator(".lw-badge")).to_have_text("STOPPED", timeout=5_000)

    # The job list's Stop buttons stop the other jobs, and their views follow.
    job_list = notebook.cell(RUNNING_VIEWS + 1).locator(".lw-list")
    for view in views[:-1]:
        job_list.locator(f'tr[data-job-id="{job_id_of(view)}"] .lw-stop').click()
    for view in views[:-1]:
        expect(view.locator(".lw-badge")).to_have_text("STOPPED", timeout=10_000)
    expect(job_list.locator(".lw-stop")).to_have_count(0, timeout=10_000)


def test_views_after_reload(lab: JupyterLab, page: Page, page_log: PageLog) -> None:
    write_notebook(
        lab.root_dir / "reload.ipynb",
        [
            "%load_ext jupyter_linuxworker",
            "%%linuxjob --name deleted\necho short-lived",
            "%%linuxjob --name ticker\n"
            f'for i in $(seq 1 {TICKER_LINES}); do echo "line $i"; sleep 0.5; done',
        ],
    )
    notebook = Notebook(page).open(lab.notebook_url("reload.ipynb"))
    notebook.run_until(2)
    deleted = notebook.view(1)
    expect(deleted.locator(".lw-badge")).to_have_text("COMPLETED", timeout=20_000)
    deleted_id = job_id_of(deleted)
    # As `jupyter linuxworker delete ID` in a terminal would.
    status, _ = api_request("DELETE", f"{lab.api}jobs/{deleted_id}", lab.token)
    assert status == 204
    page_log.expected_failures.append(deleted_id)

    notebook.run_next()
    ticker = notebook.view(2)
    expect(ticker.locator("pre.lw-output")).to_contain_text("line 3", timeout=20_000)
    job_id = job_id_of(ticker)

    # The views come back from the saved output and the widget state kept by the kernel.
    notebook.save()
    page.reload()
    notebook = Notebook(page)
    notebook.wait_idle()
    ticker = notebook.view(2)
    expect(ticker).to_be_visible(timeout=20_000)
    assert job_id_of(ticker) == job_id
    expect(ticker.locator("pre.lw-output")).to_contain_text("line 1", timeout=10_000)
    expect(ticker.locator(".lw-badge")).to_have_text("RUNNING")
    lines = output_text(ticker).splitlines()
    assert len(lines) < TICKER_LINES, "the job ended before the reloaded view showed it"
    assert lines == [f"line {i}" for i in range(1, len(lines) + 1)]

    # The view of the deleted job shows NOT FOUND and stops requesting it.
    deleted = notebook.view(1)
    expect(deleted.locator(".lw-badge")).to_have_text("NOT FOUND", timeout=10_000)
    expect(deleted.locator(".lw-error")).to_contain_text("not found")
    expect(deleted.locator(".lw-stop")).to_be_hidden()

    expect(ticker.locator(".lw-badge")).to_have_text("COMPLETED", timeout=20_000)
    expected = "".join(f"line {i}\n" for i in range(1, TICKER_LINES + 1))
    expect(ticker.locator("pre.lw-output")).to_have_text(expected)
    assert output_text(ticker) == expected
