"""%%linuxjob and %linuxjob in a real IPython kernel, against a real server."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from jupyter_client.manager import KernelManager
from server import ServerProcess, running_server
from test_server import ALICE, request

from jupyter_linuxworker.client import TOKEN_ENV, URL_ENV


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("magic-server")) as process:
        yield process


class Kernel:
    """A real kernel whose environment points at the test server, as the extension's would."""

    def __init__(self, server: ServerProcess) -> None:
        env = dict(os.environ)
        env[URL_ENV] = server.api
        env[TOKEN_ENV] = ALICE
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.run("%load_ext jupyter_linuxworker")

    def run(
        self, code: str, timeout: float = 60
    ) -> tuple[str, list[dict[str, object]], dict[str, object]]:
        """Execute ``code``; return (stdout text, the other output messages, the reply content)."""
        stdout: list[str] = []
        outputs: list[dict[str, object]] = []

        def collect(message: dict[str, object]) -> None:
            kind = message["msg_type"]
            content = message["content"]
            assert isinstance(content, dict)
            if kind == "stream" and content["name"] == "stdout":
                stdout.append(str(content["text"]))
            elif kind in ("stream", "display_data", "execute_result", "error"):
                outputs.append({"msg_type": kind, **content})

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=collect)
        return "".join(stdout), outputs, reply["content"]

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel(server: ServerProcess) -> Iterator[Kernel]:
    started = Kernel(server)
    try:
        yield started
    finally:
        started.close()


def test_wait_streams_output(kernel: Kernel) -> None:
    stdout, outputs, reply = kernel.run("%%linuxjob --wait\nprintf 'a\\377b\\n'; echo done")
    assert reply["status"] == "ok"
    assert stdout == "a\ufffdb\ndone\n"
    assert outputs == []


def test_wait_raises_on_failure(kernel: Kernel) -> None:
    stdout, _, reply = kernel.run("%%linuxjob --wait\necho before; exit 3")
    assert stdout == "before\n"
    assert reply["status"] == "error"
    assert reply["ename"] == "LinuxJobFailed"
    assert "FAILED: exited with code 3" in str(reply["evalue"])

    _, _, quiet = kernel.run("%%linuxjob --wait --no-raise\nexit 3")
    assert quiet["status"] == "ok"


def test_capture_is_whole(kernel: Kernel, server: ServerProcess) -> None:
    """O3: output captured into a variable is whole and equals what REST returns."""
    stdout, _, reply = kernel.run("%%linuxjob --out seq_job --wait\nseq 1 10000")
    assert reply["status"] == "ok"
    check, _, _ = kernel.run(
        "data = seq_job.output(); print(len(data), data[:2], data[-6:], seq_job.id)"
    )
    size, first, last, job_id = check.split()
    assert size == "48894"
    assert first == "b'1\\n'"
    assert last == "b'10000\\n'"
    status, rest = request("GET", f"{server.api}jobs/{job_id}/output", ALICE)
    assert status == 200
    assert isinstance(rest, bytes)
    assert len(rest) == 48894
    assert stdout.encode() == rest


def test_default_returns_handle_and_view(kernel: Kernel) -> None:
    _, outputs, reply = kernel.run("%%linuxjob --name greeter\necho hi")
    assert reply["status"] == "ok"
    kinds = [output["msg_type"] for output in outputs]
    assert kinds == ["display_data", "execute_result"]
    view = outputs[0]["data"]
    assert isinstance(view, dict)
    assert "application/vnd.jupyter.widget-view+json" in view
    result = outputs[1]["data"]
    assert isinstance(result, dict)
    assert "'greeter'" in str(result["text/plain"])
    done, _, _ = kernel.run("_.wait(timeout=30); print(_.status, _.output())")
    assert done == "COMPLETED b'hi\\n'\n"


def test_output_stays_in_its_cell(kernel: Kernel) -> None:
    """N1 on the kernel side: a running job prints nothing into a later cell."""
    kernel.run("%%linuxjob --out counter\nfor i in 1 2 3; do echo A$i; sleep 1; done")
    time.sleep(0.5)
    stdout, outputs, _ = kernel.run('print("B")')
    assert stdout == "B\n"
    assert outputs == []
    done, _, _ = kernel.run("counter.wait(timeout=30); print(counter.output())")
    assert done == "b'A1\\nA2\\nA3\\n'\n"


def test_interrupt_stops_waiting_job(kernel: Kernel, server: ServerProcess) -> None:
    """N3: a kernel interrupt while --wait runs stops the job; the kernel is usable after."""
    msg_id = kernel.client.execute("%%linuxjob --wait --out spinner\nwhile :; do :; done")
    time.sleep(1.0)
    interrupted = time.monotonic()
    kernel.manager.interrupt_kernel()
    reply = kernel.client.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kernel.client.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - interrupted < 1.0 + 1.0

    stdout, _, after = kernel.run("print(spinner.refresh().status)")
    assert after["status"] == "ok"
    assert stdout == "STOPPED\n"


def test_line_magics(kernel: Kernel) -> None:
    kernel.run("%%linuxjob --wait --out listed\necho listed")
    stdout, _, _ = kernel.run("%linuxjob logs {listed.id}")
    assert stdout == "listed\n"
    stdout, _, _ = kernel.run("%linuxjob status {listed.id}")
    assert stdout == "Status: COMPLETED\nExit code: 0\n"
    _, outputs, _ = kernel.run("%linuxjob images")
    assert outputs[0]["data"] == {"text/plain": "['default']"}
    _, outputs, _ = kernel.run("%linuxjob list")
    assert outputs[0]["msg_type"] == "display_data"
    _, _, bad = kernel.run("%%linuxjob --memory lots\necho x")
    assert bad["status"] == "error"
    assert "--memory: invalid value 'lots'" in str(bad["evalue"])


def test_huge_output_leaves_kernel_free(kernel: Kernel, server: ServerProcess) -> None:
    """N2 on the kernel side: 50 MB of output neither slows the kernel nor reaches it."""
    kernel.run("%%linuxjob --out flood\nyes | head -c 50000000")
    started = time.monotonic()
    stdout, outputs, _ = kernel.run('print("B")')
    assert time.monotonic() - started < 1.0
    assert stdout == "B\n"
    assert outputs == []

    done, _, _ = kernel.run(
        "flood.wait(timeout=60); print(flood.status, flood.data['output_size'])"
    )
    assert done == "COMPLETED 50000000\n"


def test_help_and_short_failure(kernel: Kernel) -> None:
    stdout, _, reply = kernel.run("%linuxjob --help")
    assert reply["status"] == "ok"
    assert stdout.startswith("%%linuxjob [options]     run the cell's body as a shell script")
    assert "usage: %%linuxjob [options]   (the cell body is the script)" in stdout
    assert "--memory MEMORY" in stdout

    _, outputs, reply = kernel.run("%%linuxjob --wait\nexit 4")
    errors = [output for output in outputs if output["msg_type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["traceback"] == [f"LinuxJobFailed: {reply['evalue']}"]
