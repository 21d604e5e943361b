"""The notebooks in notebooks/ run clean, top to bottom, with a real kernel and server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from server import ServerProcess, running_server
from test_server import ALICE

from jupyter_linuxworker.client import TOKEN_ENV, URL_ENV

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
CELL_TIMEOUT = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("notebook-server")) as process:
        yield process


def execute(name: str, server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run notebook ``name``; return each code cell's text output (streams and plain results)."""
    # The kernel inherits these, as kernels of a server with the extension do.
    monkeypatch.setenv(URL_ENV, server.api)
    monkeypatch.setenv(TOKEN_ENV, ALICE)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    texts = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.outputs:
            assert output.output_type != "error", "\n".join(output.traceback)
            if output.output_type == "stream":
                parts.append(output.text)
            elif "text/plain" in output.get("data", {}):
                parts.append(output.data["text/plain"])
        texts.append("".join(parts))
    return texts


def test_quickstart(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = execute("quickstart.ipynb", server, monkeypatch)

    assert outputs[0] == ""
    listing = outputs[1]
    for folder in ("bin", "dev", "etc", "proc", "root", "tmp", "usr"):
        assert f" {folder}\n" in listing
    # A cell without --wait shows the live view and returns the job's handle.
    assert outputs[2].startswith("<JobView ")
    assert "<Job " in outputs[2]
    assert outputs[3].startswith("<JobView ")
    assert outputs[4] == "'RUNNING'"
    assert outputs[5] == "'STOPPED'"
    assert outputs[6].startswith("hello from a job\nLinux ")
    assert outputs[7].startswith("COMPLETED 0\nhello from a job\n")
    assert outputs[8].startswith("something went wrong\njob ")
    assert outputs[8].endswith(" FAILED: exited with code 3\n")
    assert outputs[9] == "FAILED 3 exited with code 3\n"
    assert outputs[10] == "<JobList status=any limit=20>"


def test_limits(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = execute("limits.ipynb", server, monkeypatch)

    assert outputs[1].endswith("fits in 64M\n")
    assert outputs[3] == "FAILED out-of-memory 137\n"
    cpu_seconds = float(outputs[5].split()[0])
    assert 2.0 <= cpu_seconds <= 3.0
    status, reason, _at, _maximum, peak, _processes = outputs[7].split()
    assert (status, reason) == ("FAILED", "timeout")
    assert int(peak) <= 64
    assert outputs[9] == "FAILED timeout\n"


def test_how_containers_work(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = execute("how-containers-work.ipynb", server, monkeypatch)

    job_processes = outputs[1].splitlines()
    assert job_processes[0].split() == ["PID", "USER", "COMMAND"]
    assert job_processes[1].split()[:3] == ["1", "root", "init"]
    assert int(outputs[2].split()[0]) > len(job_processes)
    assert len(outputs[3].strip()) == 12
    assert outputs[5].startswith("overlay / overlay\n")
    assert "/dev/null" in outputs[5]
    assert outputs[7].split() == ["lo"]
    assert outputs[9].startswith("uid=0(root) gid=0(root)")
    assert outputs[9].split()[-2:] == ["1000000000", "65536"]
    assert outputs[11].splitlines()[0].endswith(":/")
    assert "'memory': 134217728" in outputs[12]
    assert "'pids': 1024" in outputs[12]
    assert "mount was refused" in outputs[13]
    assert "unshare: unshare(0x10000000): Operation not permitted" in outputs[13]
    assert "Seccomp:\t2" in outputs[13]
