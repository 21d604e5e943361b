"""The peers of the start benchmark: bwrap, crun, unshare+chroot and a plain exec, timed alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from common import BENCH_DIR


def time_first_byte(argv: list[str]) -> dict[str, Any]:
    """Start ``argv``; return the seconds until its first stdout byte, its output and exit code."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    first = os.read(process.stdout.fileno(), 65536)
    seconds = time.perf_counter() - start
    rest, errors = process.communicate()
    return {
        "seconds": seconds,
        "output": (first + rest).decode(errors="replace"),
        "errors": errors.decode(errors="replace")[-2000:],
        "rc": process.returncode,
    }


def bwrap_argv(rootfs: str, command: list[str]) -> list[str]:
    # --unshare-all is --unshare-user-try, -ipc, -pid, -net, -uts and -cgroup-try: the job's
    # namespaces, network included, since jobs have only a loopback interface.
    return [
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        rootfs,
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        *command,
    ]


def unshare_argv(rootfs: str, command: list[str]) -> list[str]:
    # --root chroots before --mount-proc mounts a fresh /proc, inside the new mount namespace.
    return [
        "unshare",
        "--fork",
        "--pid",
        "--mount",
        "--uts",
        "--ipc",
        "--net",
        "--cgroup",
        f"--root={rootfs}",
        "--mount-proc",
        *command,
    ]


class CrunPeer:
    """A crun_helper process in a private mount namespace that runs one container per call."""

    def __init__(self, empty_file: str, bundle: str, crun_root: str) -> None:
        os.makedirs(crun_root, exist_ok=True)
        with open(empty_file, "wb"):
            pass
        self.argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            os.path.join(BENCH_DIR, "crun_helper.py"),
            empty_file,
            bundle,
            crun_root,
        ]
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=BENCH_DIR,
        )

    def run(self) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write("run\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.process.stdout.readline()
        if not line:
            errors = self.process.stderr.read() if self.process.stderr else ""
            return {"seconds": 0.0, "output": "", "errors": errors[-2000:], "rc": -1}
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
