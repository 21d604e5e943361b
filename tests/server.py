"""Start a real Jupyter server process with the extension, for the server and client tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_linuxworker.client import UnixHTTPConnection
from jupyter_linuxworker.sandbox.cgroups import CgroupLayout

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A `jupyter server` started by a test, stopped by pid."""

    state_dir: str
    root_dir: str
    runtime_dir: str
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    # The path of a Unix socket to listen on instead of the port, as `jupyter server --sock`.
    sock: str | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        if self.sock is not None:
            return f"http+unix://{urllib.parse.quote(self.sock, safe='')}/"
        return f"http://127.0.0.1:{self.port}/"

    @property
    def api(self) -> str:
        return f"{self.url}linuxworker/api/"

    def start(self) -> ServerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env.get("PYTHONPATH", "")
        env["JUPYTER_RUNTIME_DIR"] = self.runtime_dir
        env["JUPYTER_CONFIG_DIR"] = os.path.join(self.runtime_dir, "config")
        env.pop("JUPYTER_LINUXWORKER_URL", None)
        env.pop("JUPYTER_LINUXWORKER_TOKEN", None)

        command = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--allow-root",
            *(
                [f"--ServerApp.sock={self.sock}"]
                if self.sock is not None
                else [
                    "--ServerApp.ip=127.0.0.1",
                    f"--ServerApp.port={self.port}",
                    "--ServerApp.port_retries=0",
                ]
            ),
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.jpserver_extensions={'jupyter_linuxworker': True}",
            "--ServerApp.identity_provider_class=identity_provider.TwoUserIdentityProvider",
            f"--LinuxWorkerApp.state_dir={self.state_dir}",
            "--LinuxWorkerApp.grace=1.0",
            "--LinuxWorkerApp.admin_users=admin",
            *self.extra,
        ]
        self.log_path = os.path.join(self.runtime_dir, f"server-{self.port}-{time.time():.0f}.log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes it until it stops
        self.process = subprocess.Popen(
            command, stdout=log, stderr=log, env=env, start_new_session=True
        )
        log.close()

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                self._probe()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"the server did not answer within {START_TIMEOUT} s:\n{self.log()}")

    def _probe(self) -> None:
        """Send one request to the API; raise OSError until the server responds."""
        if self.sock is None:
            request("GET", self.api + "images", "alice-token")
            return
        connection = UnixHTTPConnection(self.sock, timeout=5)
        try:
            connection.request(
                "GET", "/linuxworker/api/images", headers={"Authorization": "token alice-token"}
            )
            connection.getresponse().read()
        finally:
            connection.close()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()[-5000:]

    def kill(self) -> None:
        """End the server at once, as a crash would."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop the server as Ctrl-C would."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


def request(
    method: str, url: str, token: str | None, body: object = None, timeout: float = 30
) -> tuple[int, object]:
    """Send one request; return the status and the decoded JSON (or raw bytes)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"token {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw, kind = (
                response.status,
                response.read(),
                response.headers.get("Content-Type", ""),
            )
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers.get("Content-Type", "")
    if "json" in kind and raw:
        return status, json.loads(raw)
    return status, raw


ADMIN_TOKEN = "admin-token"


def all_jobs(state_dir: str) -> list[dict[str, str]]:
    """Return the id and status of every job recorded in ``state_dir``."""
    database = sqlite3.connect(os.path.join(state_dir, "jobs.sqlite"))
    try:
        rows = database.execute("SELECT id, status FROM jobs").fetchall()
    finally:
        database.close()
    return [{"id": row[0], "status": row[1]} for row in rows]


def assert_no_job_leftovers(state_dir: str) -> None:
    """Assert that every job of ``state_dir`` has ended and left no cgroup."""
    layout = CgroupLayout.detect()
    for job in all_jobs(state_dir):
        assert job["status"] not in ("PENDING", "RUNNING"), job
        assert not layout.for_job(job["id"]).exists(), job


def server_in(base: Path, extra: Sequence[str] = ()) -> ServerProcess:
    """Return a server, not yet started, whose state, root and runtime folders lie in ``base``."""
    for name in ("state", "root", "runtime"):
        (base / name).mkdir(exist_ok=True)
    return ServerProcess(
        str(base / "state"), str(base / "root"), str(base / "runtime"), extra=list(extra)
    )


@contextlib.contextmanager
def running_server(base: Path, extra: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """Run a server in folder ``base``; at the end stop its jobs and it, and check leftovers."""
    process = server_in(base, extra).start()
    try:
        yield process
    finally:
        for job in all_jobs(process.state_dir):
            if job["status"] in ("PENDING", "RUNNING"):
                request("POST", f"{process.api}jobs/{job['id']}/stop", ADMIN_TOKEN, {"grace": 0})
        process.stop()
    assert_no_job_leftovers(process.state_dir)


def log_size(server: ServerProcess) -> int:
    """Return how many bytes the server has written to its log so far."""
    return os.path.getsize(server.log_path)


def log_since(server: ServerProcess, start: int) -> str:
    """Return what the server wrote to its log after its first ``start`` bytes."""
    with open(server.log_path, "rb") as log:
        log.seek(start)
        return log.read().decode(errors="replace")


def leave_mid_stream(server: ServerProcess, job_id: str, token: str, times: int) -> None:
    """Follow a job with the command line ``times`` times, closing its stdout after 5 bytes.

    As `jupyter linuxworker logs -f ID | head -c 5` does: the command line stops at the closed
    pipe, and its connection closes with bytes unread.
    """
    command = [
        sys.executable,
        "-m",
        "jupyter_linuxworker.cli",
        "logs",
        "--url",
        server.url,
        "--token",
        token,
        job_id,
        "-f",
    ]
    for _ in range(times):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert process.stdout is not None
        assert process.stdout.read(5) == b"\0" * 5
        process.stdout.close()
        assert process.wait(timeout=30) == 128 + signal.SIGPIPE


def assert_server_took_it_quietly(server: ServerProcess, baseline_fds: int, log_start: int) -> None:
    """Assert that the server logged no traceback after ``log_start``.

    Also assert that, within 5 s, it has no more open descriptors than ``baseline_fds``.
    """
    assert server.process is not None
    fd_dir = f"/proc/{server.process.pid}/fd"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(os.listdir(fd_dir)) > baseline_fds:
        time.sleep(0.1)
    written = log_since(server, log_start)
    assert "Traceback" not in written
    assert "Uncaught exception" not in written
    assert len(os.listdir(fd_dir)) <= baseline_fds
