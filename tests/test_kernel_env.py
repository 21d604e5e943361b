"""A kernel started by the server finds the API in its environment and runs a job through it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from jupyter_client.blocking import BlockingKernelClient
from server import ServerProcess
from test_server import ALICE, request


@pytest.fixture
def kernel(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, BlockingKernelClient]]:
    base = tmp_path_factory.mktemp("kernel-server")
    for name in ("state", "root", "runtime"):
        (base / name).mkdir()
    server = ServerProcess(str(base / "state"), str(base / "root"), str(base / "runtime")).start()
    kernel_id = None
    client = None
    try:
        status, started = request(
            "POST",
            server.api.replace("linuxworker/api/", "api/kernels"),
            ALICE,
            {"name": "python3"},
        )
        assert status == 201, started
        assert isinstance(started, dict)
        kernel_id = started["id"]
        client = BlockingKernelClient()
        client.load_connection_file(os.path.join(server.runtime_dir, f"kernel-{kernel_id}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=30)
        yield server, client
    finally:
        if client is not None:
            client.stop_channels()
        if kernel_id is not None:
            request("DELETE", server.url + f"api/kernels/{kernel_id}", ALICE)
        server.stop()


def run_cell(client: BlockingKernelClient, code: str) -> str:
    """Execute ``code`` in the kernel; return what it printed, failing on an error."""
    printed: list[str] = []

    def collect(message: dict[str, object]) -> None:
        content = message["content"]
        assert isinstance(content, dict)
        if message["msg_type"] == "stream":  # type: ignore[index]
            printed.append(str(content["text"]))
        if message["msg_type"] == "error":  # type: ignore[index]
            raise AssertionError("\n".join(content["traceback"]))

    reply = client.execute_interactive(code, timeout=60, output_hook=collect)
    assert reply["content"]["status"] == "ok"
    return "".join(printed)


def test_kernel_reaches_api(kernel: tuple[ServerProcess, BlockingKernelClient]) -> None:
    server, client = kernel

    assert_kernel_runs_job(client, server.api)


def assert_kernel_runs_job(client: BlockingKernelClient, api: str) -> None:
    """Assert that the kernel was given ``api`` and runs a job through it with the client."""
    url = run_cell(client, "import os; print(os.environ['JUPYTER_LINUXWORKER_URL'])")
    assert url == api + "\n"
    output = run_cell(
        client,
        "from jupyter_linuxworker.client import Client\n"
        "job = Client().submit('echo from the kernel').wait(timeout=30)\n"
        "print(job.status, job.exit_code, job.output().decode(), end='')",
    )
    assert output == "COMPLETED 0 from the kernel\n"
