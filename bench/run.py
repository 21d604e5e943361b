"""Run every benchmark once and write BENCHMARKS.md. Needs root; see bench/README.md.

Usage: .venv/bin/python bench/run.py [--quick] [--output PATH] [--keep] [counts...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from typing import Any

import output as output_bench
import prepare
import report
import scale as scale_bench
import start as start_bench
import stop as stop_bench
from common import (
    ALICE,
    REPO_DIR,
    Api,
    LoadWindow,
    busiest_processes,
    load_average,
    machine_facts,
    start_server,
)
from peers import CrunPeer

from jupyter_linuxworker.sandbox import JobManager

# Run counts of a full run, chosen to finish in about 5 minutes on 2 cores. --quick uses QUICK.
DEFAULTS = {
    "start_rounds": 150,
    "timeline_runs": 60,
    "output_runs": 13,
    "output_many_runs": 5,
    "followers": 10,
    "jobs": 200,
    "requests": 3000,
    "stop_runs": 20,
}
QUICK = {
    "start_rounds": 10,
    "timeline_runs": 5,
    "output_runs": 1,
    "output_many_runs": 1,
    "followers": 10,
    "jobs": 20,
    "requests": 200,
    "stop_runs": 3,
}


def under_test(server: Any, api: Api | None = None) -> output_bench.ServerUnderTest:
    """Return what the output benchmark needs of a started server."""
    return output_bench.ServerUnderTest(
        api or Api(server.port, ALICE), server.process.pid, server.state_dir
    )


def maybe_under_test(server: Any) -> output_bench.ServerUnderTest | None:
    """Return :func:`under_test` of ``server``, or None when no such server was started."""
    return None if server is None else under_test(server)


def unix_under_test(server: Any) -> output_bench.ServerUnderTest | None:
    """Return :func:`under_test` of a server on a Unix socket, or None when none was started."""
    if server is None:
        return None
    return under_test(server, Api(0, ALICE, sock=server.sock))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        default=os.path.join(REPO_DIR, "BENCHMARKS.md"),
        help="the Markdown file to write (default: BENCHMARKS.md in the repository)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with a few runs of each benchmark"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder with the state folders"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("start", "output", "scale", "stop"),
        help="run only these sections",
    )
    for name, value in DEFAULTS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {value}, {QUICK[name]} with --quick",
        )
    args = parser.parse_args(argv)
    for name in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, (QUICK if args.quick else DEFAULTS)[name])
    return args


async def open_engine(state_dir: str) -> str:
    """Open a manager on a new state folder, which builds the default image; return its rootfs."""
    async with JobManager(state_dir) as manager:
        return str(manager.images.rootfs("default"))


async def start_section(
    args: argparse.Namespace,
    state_dir: str,
    api: Api,
    rootfs: str,
    crun: CrunPeer | None,
    crun_error: str | None,
) -> start_bench.StartResults:
    async with contextlib.AsyncExitStack() as stack:
        managers = {}
        for name, mode in start_bench.ENGINE_MODES.items():
            # One state folder per manager; the first is the one the rest of the run uses.
            folder = state_dir if mode == "prepared" else f"{state_dir}-{mode}"
            managers[name] = await stack.enter_async_context(
                JobManager(folder, supervisor_start=mode)
            )
        return await start_bench.run(
            managers, api, rootfs, crun, crun_error, args.start_rounds, warmup=3
        )


def open_crun(temp: str, rootfs: str) -> tuple[CrunPeer | None, str | None, str]:
    """Build the OCI bundle and start the crun helper; return it, or why crun cannot run."""
    bundle = os.path.join(temp, "bundle")
    if shutil.which("crun") is None:
        return None, "crun is not installed", bundle
    prepare.build_crun_bundle(bundle, rootfs, start_bench.PEER_COMMAND)
    peer = CrunPeer(os.path.join(temp, "empty"), bundle, os.path.join(temp, "crun-state"))
    result = peer.run()
    if result["rc"] != 0 or result["output"] != start_bench.EXPECTED:
        peer.close()
        return (
            None,
            f"crun run failed: exit code {result['rc']}: {result['errors'].strip()}",
            bundle,
        )
    return peer, None, bundle


CRUN_NOTE = (
    "**crun and the hybrid cgroup layout.** crun 1.8 rejects this machine's layout (cgroup v1 "
    "controllers plus a cgroup2 mount at /sys/fs/cgroup/unified) whenever "
    '/sys/fs/cgroup/unified/cgroup.controllers is not empty, with "cgroups in hybrid mode not '
    "supported, drop all controllers from cgroupv2\" (the check is in crun's libcrun/cgroup.c). "
    "Here that file lists `{controllers}`. The harness runs crun from `bench/crun_helper.py`, "
    "started with `unshare --mount --propagation private`, which bind-mounts an empty file over "
    "that one file in its private mount namespace only. crun then uses the v1 hierarchies with "
    "the cgroupfs manager and the cgroup path `{cgroup}`, which the harness removes at the end."
)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root: jobs run in namespaces and cgroups", file=sys.stderr)
        return 2
    began = time.monotonic()
    run = report.Run(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command_line=shlex.join([".venv/bin/python", "bench/run.py", *argv]),
        quick=args.quick,
    )
    sections = args.only or ["start", "output", "scale", "stop"]

    prepare.ensure_packages()
    temp = tempfile.mkdtemp(prefix="linuxworker-bench-")
    engine_state = os.path.join(temp, "engine", "state")
    server_base = os.path.join(temp, "server")
    os.makedirs(engine_state)
    print(f"temporary folder: {temp}", flush=True)

    run.load_before = load_average()
    run.busiest_before = busiest_processes()
    run.facts = machine_facts(temp)
    run.rootfs = asyncio.run(open_engine(engine_state))
    crun, crun_error, run.bundle = open_crun(temp, run.rootfs)
    controllers_file = "/sys/fs/cgroup/unified/cgroup.controllers"
    if os.path.exists(controllers_file):
        with open(controllers_file, encoding="ascii") as file:
            controllers = file.read().strip() or "nothing"
        run.crun_note = CRUN_NOTE.format(
            controllers=controllers, cgroup=f"/{prepare.CRUN_CGROUP_PARENT}/crun"
        )
    if crun_error:
        run.crun_note += f"\n\ncrun did not run in this run: {crun_error}"

    def section(name: str, action, part: str | None = None):  # type: ignore[no-untyped-def]
        if (part or name) not in sections:
            return None
        print(f"running: {name}", flush=True)
        window = LoadWindow()
        try:
            return action()
        except Exception as error:  # a failed section is reported; the others still run
            traceback.print_exc()
            run.errors[name] = f"{type(error).__name__}: {error}"
            return None
        finally:
            run.windows[name] = window.close()

    server = None
    plain_server = None
    direct_server = None
    unix_server = None
    try:
        if "start" in sections or "output" in sections:
            server = start_server(server_base)
            api = Api(server.port, ALICE)
            run.start = section(
                "start",
                lambda: asyncio.run(
                    start_section(args, engine_state, api, run.rootfs, crun, crun_error)
                ),
            )
            run.timeline = section(
                "timeline",
                lambda: {
                    mode: asyncio.run(start_bench.timeline(engine_state, args.timeline_runs, mode))
                    for mode in ("prepared", "exec")
                },
                part="start",
            )
            if "output" in sections:
                plain_server = start_server(
                    os.path.join(temp, "server-plain"),
                    ["--LinuxWorkerApp.sendfile_output=False"],
                )
                direct_server = start_server(
                    os.path.join(temp, "server-direct"),
                    ["--LinuxWorkerApp.output_relay=False"],
                )
                unix_server = start_server(
                    os.path.join(temp, "server-unix"), sock=os.path.join(temp, "server.sock")
                )
            try:
                run.output = section(
                    "output",
                    lambda: output_bench.run(
                        under_test(server, api),
                        os.path.join(run.rootfs, "bin", "busybox"),
                        args.output_runs,
                        args.output_many_runs,
                        args.followers,
                        maybe_under_test(plain_server),
                        maybe_under_test(direct_server),
                        unix_under_test(unix_server),
                    ),
                )
            finally:
                for extra in (plain_server, direct_server, unix_server):
                    if extra is not None:
                        extra.stop()
            api.close()
            server.stop()
            server = None
        run.scale = section(
            "scale",
            lambda: scale_bench.run(
                os.path.join(temp, "scale"), args.jobs, args.followers, args.requests
            ),
        )
        run.stop = section(
            "stop", lambda: asyncio.run(stop_bench.run(engine_state, args.stop_runs))
        )
    finally:
        if server is not None:
            server.stop()
        if crun is not None:
            crun.close()
        left = prepare.remove_crun_cgroups()
        if left:
            run.errors["cleanup"] = "crun cgroups left: " + ", ".join(left)
        if not args.keep:
            shutil.rmtree(temp, ignore_errors=True)

    run.load_after = load_average()
    run.busiest_after = busiest_processes()
    run.duration = time.monotonic() - began
    text = report.render(run)
    with open(args.output, "w", encoding="utf-8") as file:
        file.write(text)
    print(f"wrote {args.output} after {run.duration / 60:.1f} minutes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
