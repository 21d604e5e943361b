"""A server on a Unix socket (`jupyter server --sock`): the clients, command line and kernels."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from jupyter_client.blocking import BlockingKernelClient
from server import (
    ADMIN_TOKEN,
    ServerProcess,
    assert_no_job_leftovers,
    assert_server_took_it_quietly,
    leave_mid_stream,
    log_size,
    server_in,
)
from test_kernel_env import assert_kernel_runs_job

from jupyter_linuxworker.client import AsyncClient, Client, LinuxWorkerError, UnixHTTPConnection

CLI = [sys.executable, "-m", "jupyter_linuxworker.cli"]
# Far more than a Unix socket's default send buffer (net.core.wmem_default, 208 KiB).
LARGE_OUTPUT = 8 * 1024 * 1024
# Readers that leave a job's stream early, one after the other, and the job's output size.
FOLLOWERS_THAT_LEAVE = 5
LEAVING_OUTPUT = 50_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A socket's path must fit in 108 bytes, which pytest's folders may not.
    folder = tempfile.mkdtemp(prefix="lw-sock-")
    process = server_in(tmp_path_factory.mktemp("unix-server"))
    process.sock = os.path.join(folder, "server.sock")
    process.start()
    try:
        yield process
    finally:
        admin = Client(process.url, ADMIN_TOKEN)
        for job in admin.jobs():
            if job["status"] in ("PENDING", "RUNNING"):
                admin.stop(job["id"], grace=0)
        process.stop()
        shutil.rmtree(folder)
    assert_no_job_leftovers(process.state_dir)


def test_client_submits_and_follows(server: ServerProcess) -> None:
    client = Client(server.url, "alice-token")

    job = client.submit(r"printf 'a\nb\000c'; exit 3")

    assert b"".join(client.follow(job.id)) == b"a\nb\x00c"
    assert job.wait(timeout=30).status == "FAILED"
    assert job.exit_code == 3
    assert client.output(job.id, offset=2) == b"b\x00c"


def test_large_output_arrives_whole(server: ServerProcess) -> None:
    client = Client(server.url, "alice-token")

    job = client.submit(f"head -c {LARGE_OUTPUT} /dev/zero")
    received = b"".join(client.follow(job.id))

    assert len(received) == LARGE_OUTPUT
    assert received.count(0) == LARGE_OUTPUT
    assert job.wait(timeout=30).status == "COMPLETED"


def test_leaving_follower_logs_no_error(server: ServerProcess) -> None:
    assert server.process is not None
    pid = server.process.pid
    # An ended job: the server sends its whole log at once, and waits on the reader.
    job = Client(server.url, "alice-token").submit(f"head -c {LEAVING_OUTPUT} /dev/zero")
    job.wait(timeout=60)
    baseline_fds = len(os.listdir(f"/proc/{pid}/fd"))
    log_start = log_size(server)

    leave_mid_stream(server, job.id, "alice-token", FOLLOWERS_THAT_LEAVE)

    assert_server_took_it_quietly(server, baseline_fds, log_start)


def test_async_client_follows(server: ServerProcess) -> None:
    async def run() -> tuple[bytes, str]:
        client = AsyncClient(server.url, "alice-token")
        job = await client.submit("echo from the socket")
        output = b"".join([chunk async for chunk in client.follow(job["id"])])
        return output, (await client.get(job["id"]))["status"]

    assert asyncio.run(run()) == (b"from the socket\n", "COMPLETED")


def test_cli_finds_socket_server(server: ServerProcess) -> None:
    environment = dict(os.environ, JUPYTER_RUNTIME_DIR=server.runtime_dir)
    environment.pop("JUPYTER_LINUXWORKER_URL", None)
    environment.pop("JUPYTER_LINUXWORKER_TOKEN", None)

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*CLI, *args], capture_output=True, timeout=60, check=False, env=environment
        )

    submitted = cli("submit", "--", "echo over the socket; echo err >&2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[-1].decode()
    logs = cli("logs", job_id, "-f")
    assert (logs.returncode, logs.stdout) == (0, b"over the socket\nerr\n")


def kernels_request(server: ServerProcess, method: str, path: str, body: bytes | None) -> bytes:
    """Send one request to Jupyter's kernels API over the socket; return the body."""
    assert server.sock is not None
    connection = UnixHTTPConnection(server.sock, timeout=60)
    try:
        headers = {"Authorization": "token alice-token", "Content-Type": "application/json"}
        connection.request(method, "/api/kernels" + path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        assert response.status < 300, data
        return data
    finally:
        connection.close()


def test_kernel_runs_job_over_socket(server: ServerProcess) -> None:
    kernel_id = json.loads(kernels_request(server, "POST", "", b'{"name": "python3"}'))["id"]
    client = BlockingKernelClient()
    try:
        client.load_connection_file(os.path.join(server.runtime_dir, f"kernel-{kernel_id}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=30)

        assert_kernel_runs_job(client, server.api)
    finally:
        client.stop_channels()
        kernels_request(server, "DELETE", f"/{kernel_id}", None)


def test_bad_socket_urls_explained() -> None:
    with pytest.raises(LinuxWorkerError) as relative:
        Client("http+unix://relative.sock/", "alice-token")
    assert str(relative.value) == (
        "invalid server URL 'http+unix://relative.sock/': expected "
        "http(s)://HOST:PORT/... or http+unix://%2Fpath%2Fto%2Fsocket/... "
        "(the socket's absolute path, percent-encoded)"
    )
    assert relative.value.field == "url"

    result = subprocess.run(
        [*CLI, "list", "--url", "http+unix://relative.sock/", "--token", "alice-token"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (
        2,
        b"jupyter linuxworker: --url: invalid server URL 'http+unix://relative.sock/': "
        b"expected http(s)://HOST:PORT/... or http+unix://%2Fpath%2Fto%2Fsocket/... "
        b"(the socket's absolute path, percent-encoded)\n",
    )

    missing = tempfile.mkdtemp(prefix="lw-sock-")
    try:
        url = "http+unix://" + (missing + "/absent.sock").replace("/", "%2F") + "/"
        with pytest.raises(LinuxWorkerError) as absent:
            Client(url, "alice-token").list()
        assert str(absent.value) == (
            f"cannot reach the Jupyter server at {url}linuxworker/api/ "
            f"(Unix socket {missing}/absent.sock): [Errno 2] No such file or directory; "
            f"is a server running with --ServerApp.sock={missing}/absent.sock?"
        )
    finally:
        os.rmdir(missing)
