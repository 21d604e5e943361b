"""Jobs outlive a Jupyter server that is killed and started again on the same state folder."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import processes_with_cmdline
from server import assert_no_job_leftovers, request, server_in
from test_server import ALICE, submit, wait_ended

from jupyter_linuxworker.sandbox.cgroups import CgroupLayout


def test_jobs_survive_server_kill(tmp_path: Path) -> None:
    """X1 for real: SIGKILL the server 2 s after submit, start it again on the same state."""
    first = server_in(tmp_path)
    first.start()
    try:
        sleeper = submit(first, {"command": "echo begin; sleep 600"})
        failing = submit(first, {"command": "sleep 3; echo e >&2; exit 3"})
        time.sleep(2)
    finally:
        first.kill()

    second = server_in(tmp_path)
    restarted = time.monotonic()
    second.start()
    try:
        status, job = request("GET", f"{second.api}jobs/{sleeper['id']}", ALICE)
        assert status == 200
        assert isinstance(job, dict)
        assert job["status"] == "RUNNING"
        assert time.monotonic() - restarted < 5.0
        assert request("GET", f"{second.api}jobs/{sleeper['id']}/output", ALICE) == (
            200,
            b"begin\n",
        )

        ended = wait_ended(second, str(failing["id"]))
        assert ended["status"] == "FAILED"
        assert ended["exit_code"] == 3
        assert request("GET", f"{second.api}jobs/{failing['id']}/output", ALICE) == (200, b"e\n")

        status, stopped = request("POST", f"{second.api}jobs/{sleeper['id']}/stop", ALICE, {})
        assert status == 200
        assert isinstance(stopped, dict)
        assert stopped["status"] == "STOPPED"
        assert processes_with_cmdline("sleep", "600") == []
    finally:
        second.stop()
    assert_no_job_leftovers(str(tmp_path / "state"))


def test_server_stop_leaves_jobs_running(tmp_path: Path) -> None:
    first = server_in(tmp_path)
    first.start()
    try:
        job = submit(first, {"command": "echo begin; sleep 600"})
        time.sleep(0.5)
    finally:
        first.stop()
    assert f"linuxworker: job {job['id']} keeps running after the server stops" in first.log()
    assert "linuxworker: stopped, 1 job(s) left running" in first.log()

    second = server_in(tmp_path)
    second.start()
    try:
        _, found = request("GET", f"{second.api}jobs/{job['id']}", ALICE)
        assert isinstance(found, dict)
        assert found["status"] == "RUNNING"
        request("POST", f"{second.api}jobs/{job['id']}/stop", ALICE, {"grace": 0})
    finally:
        second.stop()
    assert_no_job_leftovers(str(tmp_path / "state"))


def test_stop_jobs_on_shutdown(tmp_path: Path) -> None:
    server = server_in(tmp_path, ["--LinuxWorkerApp.stop_jobs_on_shutdown=True"])
    server.start()
    try:
        job = submit(server, {"command": "sleep 600"})
        time.sleep(0.5)
    finally:
        server.stop()
    assert f"stopping job {job['id']} at server shutdown" in server.log()
    deadline = time.monotonic() + 10
    layout = CgroupLayout.detect()
    while layout.for_job(str(job["id"])).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not layout.for_job(str(job["id"])).exists()
    assert processes_with_cmdline("sleep", "600") == []
