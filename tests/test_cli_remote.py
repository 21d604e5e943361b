"""The command line against a real server: submit, status, logs, stop, list, delete, images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from server import ServerProcess, running_server

CLI = [sys.executable, "-m", "jupyter_linuxworker.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("cli-server")) as process:
        yield process


def cli(
    server: ServerProcess, *args: str, token: str = "alice-token"
) -> subprocess.CompletedProcess[bytes]:
    command = [*CLI, args[0], "--url", server.url, "--token", token, *args[1:]]
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


def submitted_id(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr
    prefix = b"Id of submitted job: "
    assert result.stdout.startswith(prefix)
    job_id = result.stdout[len(prefix) :].strip().decode()
    assert len(job_id) == 32
    return job_id


def test_submit_status_logs(server: ServerProcess) -> None:
    job_id = submitted_id(cli(server, "submit", "--", r"printf 'a\377b\n'; echo err >&2"))

    logs = cli(server, "logs", job_id, "-f")
    assert logs.returncode == 0
    assert logs.stdout == b"a\xffb\nerr\n"
    status = cli(server, "status", job_id)
    assert status.stdout == b"Status: COMPLETED\nExit code: 0\n"
    assert status.returncode == 0
    as_json = json.loads(cli(server, "status", job_id, "--json").stdout)
    assert as_json["id"] == job_id
    assert as_json["status"] == "COMPLETED"


def test_failed_job_status_shows_reason(server: ServerProcess) -> None:
    job_id = submitted_id(cli(server, "submit", "--", "exit 3"))
    cli(server, "logs", job_id, "-f")

    status = cli(server, "status", job_id)
    assert (
        status.stdout == b"Status: FAILED\nExit code: 3\nReason: exit-code (exited with code 3)\n"
    )


def test_status_says_when_output_was_dropped(server: ServerProcess) -> None:
    job_id = submitted_id(cli(server, "submit", "--output-cap", "5", "--", "echo 1234567890"))
    cli(server, "logs", job_id, "-f")

    status = cli(server, "status", job_id)
    assert status.stdout == (
        b"Status: COMPLETED\nExit code: 0\n"
        b"Output: cut short; the log ends with a marker that gives the reason\n"
    )


def test_stop_and_list(server: ServerProcess) -> None:
    job_id = submitted_id(cli(server, "submit", "--name", "sleeper", "--", "sleep 600"))
    time.sleep(0.5)

    listing = cli(server, "list", "--status", "RUNNING")
    assert listing.returncode == 0
    lines = listing.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "STATUS", "EXIT", "CREATED", "NAME"]
    assert any(line.startswith(job_id[:12]) and line.endswith("sleeper") for line in lines[1:])

    stopped = cli(server, "stop", job_id, "--grace", "1")
    assert stopped.returncode == 0
    assert stopped.stdout.startswith(b"Status: STOPPED\nExit code: 143\n")


def test_delete_and_exit_codes(server: ServerProcess) -> None:
    job_id = submitted_id(cli(server, "submit", "--", "sleep 600"))

    conflict = cli(server, "delete", job_id)
    assert conflict.returncode == 4
    assert b"stop it before deleting it" in conflict.stderr
    cli(server, "stop", job_id, "--grace", "0")
    deleted = cli(server, "delete", job_id)
    assert deleted.returncode == 0
    assert deleted.stdout == f"Deleted job {job_id}\n".encode()

    missing = cli(server, "status", job_id)
    assert missing.returncode == 3
    assert missing.stderr == f"jupyter linuxworker: job '{job_id}' not found (HTTP 404)\n".encode()
    invalid = cli(server, "submit", "--memory", "lots", "--", "true")
    assert invalid.returncode == 2
    assert invalid.stderr.startswith(b"jupyter linuxworker: --memory: invalid value 'lots': ")
    forbidden = cli(server, "list", token="wrong")
    assert forbidden.returncode == 5


def test_logs_closed_pipe_exits_quietly(server: ServerProcess) -> None:
    job_id = submitted_id(cli(server, "submit", "--", "head -c 50000000 /dev/zero"))
    cli(server, "logs", job_id, "-f")

    for follow in ((), ("-f",)):
        # As in `jupyter linuxworker logs ID | head -c 5`: the reader closes the pipe early.
        command = [*CLI, "logs", "--url", server.url, "--token", "alice-token", job_id, *follow]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.read(5) == b"\0" * 5
        process.stdout.close()
        assert (process.wait(timeout=30), process.stderr.read()) == (128 + signal.SIGPIPE, b"")
        process.stderr.close()


def test_full_stdout_exits_with_message(server: ServerProcess) -> None:
    job_id = submitted_id(cli(server, "submit", "--", "head -c 1000000 /dev/zero"))
    cli(server, "logs", job_id, "-f")

    for args in (("logs", job_id), ("logs", job_id, "-f"), ("status", job_id), ("list",)):
        command = [*CLI, args[0], "--url", server.url, "--token", "alice-token", *args[1:]]
        with open("/dev/full", "wb") as full:
            result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, timeout=60)
        assert (result.returncode, result.stderr) == (
            1,
            b"jupyter linuxworker: cannot write the output to standard output: "
            b"[Errno 28] No space left on device\n",
        )


def test_unreachable_server(server: ServerProcess) -> None:
    result = subprocess.run(
        [*CLI, "list", "--url", "http://127.0.0.1:9/", "--token", "x"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 5
    assert result.stderr.startswith(b"jupyter linuxworker: cannot reach the Jupyter server at ")


def test_server_options_before_command(server: ServerProcess) -> None:
    base = [*CLI, "--url", server.url, "--token", "alice-token"]
    before = subprocess.run([*base, "images"], capture_output=True, timeout=30, check=False)
    assert before.returncode == 0, before.stderr
    assert before.stdout.startswith(b"default\t")

    # The token after the command wins over the one before it.
    both = subprocess.run(
        [*base, "images", "--token", "wrong"], capture_output=True, timeout=30, check=False
    )
    assert both.returncode == 5
    assert b"HTTP 403" in both.stderr

    local = subprocess.run([*base, "run", "--", "true"], capture_output=True, timeout=30)
    assert local.returncode == 2
    assert local.stderr.endswith(
        b"error: run: --url and --token are for the commands that call a server; "
        b"run uses the engine on this machine, so leave them out\n"
    )


def test_images(server: ServerProcess) -> None:
    result = cli(server, "images")
    assert result.returncode == 0
    assert result.stdout.startswith(b"default\t")


def test_server_found_from_runtime_file(server: ServerProcess) -> None:
    """Without --url, the client reads the server's runtime file."""
    env = {"JUPYTER_RUNTIME_DIR": server.runtime_dir, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*CLI, "images"], capture_output=True, timeout=30, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"default\t")
