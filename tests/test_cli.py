"""`jupyter linuxworker run` as a user types it: bytes, exit codes, Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounts_below, processes_with_cmdline

from jupyter_linuxworker import cli_remote
from jupyter_linuxworker.cli_output import write_output
from jupyter_linuxworker.sandbox.cgroups import CgroupLayout
from jupyter_linuxworker.sandbox.store import DATABASE_NAME, JobStore

CLI = [sys.executable, "-m", "jupyter_linuxworker.cli"]


@pytest.fixture
def cli(state_dir: str) -> Iterator[list[str]]:
    """The command line on a fresh state folder; its jobs are checked for leftovers after."""
    yield [*CLI, "--state-dir", state_dir]

    store = JobStore(os.path.join(state_dir, DATABASE_NAME))
    layout = CgroupLayout.detect()
    for record in store.list():
        assert record.status.ended
        assert not layout.for_job(record.id).exists()
    store.close()
    assert mounts_below(state_dir) == []


def run_cli(cli: list[str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*cli, *args], capture_output=True, timeout=timeout, check=False)


def test_run_streams_bytes_and_exit_code(cli: list[str]) -> None:
    result = run_cli(cli, "run", "--", r"printf 'a\377b'; printf 'err\n' >&2; exit 4")

    assert result.stdout == b"a\xffb"
    assert result.stderr == b"err\n"
    assert result.returncode == 4


def test_run_argv_and_options(cli: list[str]) -> None:
    result = run_cli(
        cli,
        "run",
        "--env",
        "GREETING=hi there",
        "--workdir",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo "$GREETING"; pwd',
    )

    assert result.stdout == b"hi there\n/tmp\n"
    assert result.returncode == 0


def test_run_signal_exit_code(cli: list[str]) -> None:
    result = run_cli(cli, "run", "--", "kill -KILL $$")
    assert result.returncode == 137


def test_run_bad_option_names_field(cli: list[str]) -> None:
    result = run_cli(cli, "run", "--memory", "lots", "--", "true")

    assert result.returncode == 2
    assert result.stderr.startswith(b"jupyter linuxworker: --memory: invalid value 'lots': ")


def test_run_setup_error_is_reported(cli: list[str]) -> None:
    result = run_cli(cli, "run", "--workdir", "/etc/passwd", "--", "true")

    assert result.returncode == 125
    assert b"setup failed at step 'enter working directory /etc/passwd'" in result.stderr


def test_run_volume(cli: list[str], tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"volume data\n")
    result = run_cli(
        cli,
        "run",
        "--volume-root",
        str(tmp_path),
        "--volume",
        f"{tmp_path}:/data:ro",
        "--",
        "cat /data/in.txt",
    )

    assert result.stdout == b"volume data\n"
    assert result.returncode == 0


def test_run_ctrl_c_stops_job(cli: list[str]) -> None:
    process = subprocess.Popen(
        [*cli, "run", "--grace", "1", "--", "echo ready; exec sleep 4321"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 143
    assert time.monotonic() - started < 2.0
    assert b"Stopping job" in stderr
    assert processes_with_cmdline("sleep", "4321") == []


def test_run_stats_and_limits(cli: list[str]) -> None:
    result = run_cli(
        cli,
        "run",
        "--memory",
        "32M",
        "--pids",
        "20",
        "--stats",
        "--",
        "dd if=/dev/zero of=/dev/null bs=100M count=1",
    )

    lines = result.stderr.decode().splitlines()
    assert result.returncode == 137
    assert lines[1] == "jupyter linuxworker: status: FAILED"
    assert lines[2] == "jupyter linuxworker: exit code: 137"
    assert lines[3].startswith("jupyter linuxworker: reason: out-of-memory (out of memory: ")
    assert lines[-1] == "jupyter linuxworker: oom kills: 1"
    assert lines[0] == f"jupyter linuxworker: job: {lines[0].split()[-1]}"
    assert len(lines[0].split()[-1]) == 12
    assert any(line.startswith("jupyter linuxworker: memory peak: ") for line in lines)


def test_run_timeout_exit_code(cli: list[str]) -> None:
    started = time.monotonic()
    result = run_cli(cli, "run", "--timeout", "1", "--grace", "0.5", "--", "sleep 100")

    assert result.returncode == 143
    assert time.monotonic() - started < 5
    assert b"FAILED: timed out after 1 s" in result.stderr


def test_run_full_stdout_stops_job(cli: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [*cli, "run", "--stats", "--", "while :; do head -c 65536 /dev/zero; done"],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )

    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    # With no grace, SIGTERM and SIGKILL follow each other, and either may end the shell.
    assert lines[2] in (f"jupyter linuxworker: exit code: {code}" for code in (137, 143))
    assert [lines[1], lines[3]] == [
        "jupyter linuxworker: status: STOPPED",
        "jupyter linuxworker: reason: stopped (cannot write the output to standard output: "
        "[Errno 28] No space left on device)",
    ]
    assert lines[-1] == (
        "jupyter linuxworker: cannot write the output to standard output: "
        "[Errno 28] No space left on device"
    )


def test_closed_stdout_ends_quietly(cli: list[str], state_dir: str) -> None:
    # As in `jupyter linuxworker run ... | head -c 5`: the reader closes the pipe early.
    process = subprocess.Popen(
        [*cli, "run", "--", "seq 1 2000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(5) == b"1\n2\n3"
    process.stdout.close()
    errors = process.stderr.read()
    assert process.wait(timeout=30) == 128 + signal.SIGPIPE
    assert errors == b""
    store = JobStore(os.path.join(state_dir, DATABASE_NAME))
    try:
        [record] = store.list()
    finally:
        store.close()
    assert (record.status.value, record.detail) == ("STOPPED", "the reader of its output went away")


def test_output_without_descriptor() -> None:
    # A test's captured output and a notebook's stdout have no descriptor to write to.
    buffer = io.BytesIO()
    write_output(buffer, b"a\0b")
    assert buffer.getvalue() == b"a\0b"

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        cli_remote._print("printed")
    assert text.getvalue() == "printed\n"
