"""Write BENCHMARKS.md from the results of one harness run."""

from __future__ import annotations

import math
import os
import shlex
import statistics
from dataclasses import dataclass, field
from typing import Any

import output as output_bench
import scale as scale_bench
import stop as stop_bench
from common import GIB, MB, LoadWindow, Samples, ms, table, verdict
from peers import bwrap_argv, unshare_argv
from start import COMMAND, ENGINE, ENGINE_EXEC, ENGINE_FORK, PEER_COMMAND, StartResults

from jupyter_linuxworker.sandbox.outputlog import PIPE_SIZE, RESERVE_AFTER, RESERVE_CHUNK

# The reason shown for a section that did not run: only --only leaves one out without an error.
NOT_RUN = "skipped (--only)"
# The project's targets.
START_BWRAP_FACTOR = 1.5
REST_OVERHEAD_MS = 3.0
FOLLOWER_SHARE_OF_FILE_WRITE = 0.5
MANY_FOLLOWERS_FACTOR = 3.0
STARTS_PER_SECOND = 100.0
HOST_MEMORY_PER_JOB = 3 * MB
GET_P99_MS = 20.0
STOP_ON_TERM_MS = 50.0
STOP_IGNORED_EXTRA_MS = 100.0
# A p90 over this many times the p10 gets a note in the output section.
WIDE_SPREAD = 2.5
# Fewer runs of each output path than this get a note that their medians are not stable.
FEW_RUNS = 5
# A busy share of all CPUs from which a run counts as bound by CPU time, not by waiting.
CPU_BOUND_SHARE = 0.9
# A supervisor's CPU time comes in 10 ms ticks: a mean below this is shown as such, not as 0.0.
MIN_SHOWN_CPU = 0.0001


@dataclass
class Run:
    """Everything one harness run found, section by section."""

    date: str = ""
    command_line: str = ""
    duration: float = 0.0
    facts: list[tuple[str, str]] = field(default_factory=list)
    busiest_before: list[tuple[str, float]] = field(default_factory=list)
    busiest_after: list[tuple[str, float]] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""
    rootfs: str = ""
    bundle: str = ""
    crun_note: str = ""
    windows: dict[str, LoadWindow] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    start: StartResults | None = None
    timeline: dict[str, Any] | None = None
    output: output_bench.OutputResults | None = None
    scale: scale_bench.ScaleResults | None = None
    stop: stop_bench.StopResults | None = None
    targets: list[tuple[str, str, str]] = field(default_factory=list)
    quick: bool = False  # a smoke run with --quick, too small to judge the targets


def rate(seconds: float) -> str:
    """Format the rate of 1 GiB in ``seconds`` as MB/s (MB = 10^6 bytes)."""
    return f"{GIB / seconds / MB:.0f}"


def spread(samples: Samples, low: float = 10, high: float = 90) -> str:
    return f"{samples.p(low):.2f} / {samples.p(high):.2f}"


def shell(argv: list[str]) -> str:
    return shlex.join(argv)


def _section_load(run: Run, name: str) -> str:
    window = run.windows.get(name)
    return f"Machine load: {window.describe()}." if window else ""


def _start_section(run: Run, lines: list[str]) -> None:
    results = run.start
    lines.append("## 1. Start: submit to the first output byte of `echo hi`\n")
    if results is None:
        lines.append(f"Not measured: {run.errors.get('start', NOT_RUN)}\n")
        return
    lines.append(
        f"{results.rounds} rounds after {results.warmup} warm-up rounds. Each round runs every "
        "method once, so that a change in load reaches all of them, in a random order of its "
        "own, then pauses 0.1 s. Times are from the first call to the first stdout byte read by "
        "the harness. The engine runs in three ways, each with a manager of its own: the "
        "default, and the two earlier ways of starting a supervisor, for before and after "
        "figures from the same run.\n"
    )
    lines.append(_section_load(run, "start") + "\n")
    rows: list[tuple[object, ...]] = []
    for name, samples in results.samples.items():
        if samples.count:
            rows.append((name, ms(samples.p(50)), ms(samples.p(90)), samples.count))
        else:
            rows.append((name, "-", "-", f"0 ({results.failures.get(name, 'no runs')})"))
    lines.append(table(("method", "p50 ms", "p90 ms", "runs"), rows) + "\n")

    engine = results.samples[ENGINE]
    rest = results.samples["REST"]
    bwrap = results.samples["bwrap"]
    crun = results.samples["crun"]
    ratio_rows = []
    if engine.count and bwrap.count:
        ratio = engine.p(50) / bwrap.p(50)
        ratio_rows.append(("engine / bwrap, p50", f"{ratio:.1f}x"))
        met = ratio <= START_BWRAP_FACTOR
        run.targets.append(("start: engine p50 at most 1.5x bwrap", f"{ratio:.1f}x", verdict(met)))
    if engine.count and crun.count:
        ratio = engine.p(50) / crun.p(50)
        ratio_rows.append(("engine / crun, p50", f"{ratio:.1f}x"))
        run.targets.append(
            ("start: engine p50 below crun", f"{ratio:.1f}x crun", verdict(ratio < 1))
        )
    else:
        run.targets.append(("start: engine p50 below crun", "crun did not run", verdict(None)))
    if engine.count and rest.count:
        extra = (rest.p(50) - engine.p(50)) * 1000
        ratio_rows.append(("REST - engine, p50", f"{extra:.1f} ms"))
        run.targets.append(
            ("start: REST adds at most 3 ms", f"{extra:.1f} ms", verdict(extra <= REST_OVERHEAD_MS))
        )
    before = results.samples[ENGINE_EXEC]
    fork = results.samples[ENGINE_FORK]
    if engine.count and before.count:
        ratio_rows.append(
            (
                "engine before (new interpreter) / engine now, p50",
                f"{before.p(50) / engine.p(50):.1f}x",
            )
        )
    if engine.count and fork.count:
        ratio_rows.append(
            ("engine, fresh fork / engine now, p50", f"{fork.p(50) / engine.p(50):.1f}x")
        )
    lines.append(table(("comparison (same run)", "value"), ratio_rows) + "\n")

    lines.append("Commands:\n")
    rootfs = run.rootfs
    lines.append(
        f'- engine (in-process): `await manager.submit({{"command": "{COMMAND}"}})`, then '
        "`manager.follow(id)` until the first chunk; the job runs `/bin/sh -c 'echo hi'` in "
        "the default image."
    )
    lines.append(
        '- engine, fresh fork per job: the same with `JobManager(supervisor_start="fork")`: '
        "the fork server forks a supervisor per job, which prepares its container on the job's "
        "start path."
    )
    lines.append(
        "- engine, new interpreter per job (before): the same with "
        '`JobManager(supervisor_start="exec")`: `python -I -S supervisor.py JOB_DIR` per job, '
        "as in every earlier version."
    )
    lines.append(
        f'- REST: `POST jobs` with `{{"command": "{COMMAND}"}}`, then '
        "`GET jobs/ID/output?follow=1` on a second keep-alive connection until the first byte "
        "(Python's http.client)."
    )
    lines.append(f"- bwrap: `{shell(bwrap_argv(rootfs, PEER_COMMAND))}`")
    lines.append(
        f"- crun: `crun --root ROOT run --bundle {run.bundle} ID` inside "
        "`unshare --mount --propagation private`; see the note below."
    )
    lines.append(f"- unshare + chroot: `{shell(unshare_argv(rootfs, PEER_COMMAND))}`")
    lines.append(
        f"- plain exec on the host: `{shell(PEER_COMMAND)}`, no isolation: Python's spawn cost."
    )
    lines.append(
        "\nThe peers are started with `subprocess.Popen` and timed to the first byte read from "
        "their stdout pipe. The engine does more than they do: a cgroup with limits, a user "
        "namespace with an idmapped image, an overlay with a tmpfs layer, a seccomp filter, and "
        "a supervisor that records the job. bwrap creates no cgroup; crun creates one and sets "
        "the same memory and pids limits, but no user namespace.\n"
    )
    if run.crun_note:
        lines.append(run.crun_note + "\n")

    lines.append(
        f"GET jobs/ID of one running job on the otherwise idle server ({results.idle_get.count} "
        f"requests, one keep-alive connection): p50 {ms(results.idle_get.p(50))} ms, "
        f"p99 {ms(results.idle_get.p(99))} ms. This is the baseline of section 3.\n"
    )

    if run.timeline:
        _timeline_section(run.timeline, lines)


TIMELINE_TITLES = {
    "prepared": "the default: a supervisor prepared by the fork server",
    "exec": "before: a new interpreter per supervisor",
}


def _timeline_section(timelines: dict[str, dict[str, Any]], lines: list[str]) -> None:
    lines.append("### Where the engine's start time goes\n")
    runs = next(iter(timelines.values()))["runs"]
    lines.append(
        f"Median of each step over {runs} `echo hi` jobs, in the order they happen on the way to "
        "the first byte, with a 0.1 s pause after each job. The manager is pointed at "
        "`bench/traced_supervisor.py`, which wraps the supervisor's, the container's and PID "
        "1's steps and records CLOCK_MONOTONIC at each. Medians of steps do not add up "
        "exactly to the median total. Both tables come from this run.\n"
    )
    for mode, timeline in timelines.items():
        lines.append(f"**{TIMELINE_TITLES.get(mode, mode)}**\n")
        total = timeline["total"]
        rows = [
            (str(label), f"{seconds * 1000:.2f}", f"{seconds / total * 100:.0f}%")
            for label, seconds in timeline["steps"]
        ]
        rows.append(("**total, submit to first chunk**", f"{total * 1000:.2f}", "100%"))
        lines.append(table(("step", "median ms", "share"), rows) + "\n")
    lines.append(
        "With a prepared supervisor, the user namespace, the container child, PID 1, its mount, "
        "PID, UTS, IPC and network namespaces, loopback and the move into a cgroup all happen "
        "before the job is submitted. After the command has started, the supervisor records "
        "RUNNING (writes state.json, no fsync): median "
        f"{timelines.get('prepared', timeline)['running_record'] * 1000:.2f} ms after the "
        "spawn.\n"
    )


def _output_section(run: Run, lines: list[str]) -> None:
    results = run.output
    lines.append("## 2. Output: 1 GiB through a job\n")
    if results is None:
        lines.append(f"Not measured: {run.errors.get('output', NOT_RUN)}\n")
        return
    lines.append(
        f"{_count(results.runs, 'run')} of the file write, the pipe, the job with no follower "
        f"and with one, and {_count(results.many_runs, 'run')} with {results.followers} "
        "followers, alternating, "
        "each after a `sync`; each path that fills the page cache also starts on recycled "
        "memory (see below). A follower's time runs from the `POST jobs` to the last of the "
        "1073741824 bytes it receives; every follower must receive every byte. MB/s are 10^6 "
        "bytes per second, at the median time.\n"
    )
    lines.append(_section_load(run, "output") + "\n")
    rows = [
        ("write to a file in the state folder", results.file_write),
        ("plain pipe", results.pipe),
        ("job → log, no follower (POST to the last byte in the log)", results.no_follower_logged),
        ("job → log, no follower (POST to the end in its record)", results.no_follower),
        ("job → REST, 1 follower", results.one_follower),
        (f"job → REST, {results.followers} followers (slowest of each run)", results.many_slowest),
        (f"job → REST, {results.followers} followers (every follower)", results.many_each),
        ("job → REST over a Unix socket, 1 follower", results.unix_one),
        (
            f"job → REST over a Unix socket, {results.followers} followers (slowest of each run)",
            results.unix_many_slowest,
        ),
        ("before: job → REST without sendfile, 1 follower", results.plain_one),
        (
            f"before: job → REST without sendfile, {results.followers} followers (slowest)",
            results.plain_many_slowest,
        ),
        ("before: job → log without the relay pipe, to the last byte", results.direct_logged),
        ("before: job → log without the relay pipe, to the end", results.direct_alone),
        ("before: job → REST without the relay pipe, 1 follower", results.direct_one),
        (
            "transport alone: sendfile of a cached file over loopback TCP to 1 reader",
            results.transport_one.seconds,
        ),
        (
            f"transport alone, {results.followers} readers at once (the last to finish)",
            results.transport_many.seconds,
        ),
        ("transport alone over a Unix socket, 1 reader", results.transport_unix_one.seconds),
        (
            f"transport alone over a Unix socket, {results.followers} readers at once",
            results.transport_unix_many.seconds,
        ),
    ]
    body = [
        (name, f"{s.p(50):.2f}", spread(s), rate(s.p(50)) if s.count else "-", s.count)
        for name, s in rows
        if s.count
    ]
    lines.append(table(("path", "median s", "p10 / p90 s", "MB/s", "samples"), body) + "\n")
    extra = []
    if results.one_follower_end.count:
        extra.append(
            "One follower's response ends "
            f"{results.one_follower_end.p(50) - results.one_follower.p(50):.2f} s "
            "(median) after its last byte: the job has to be recorded as ended first, after the "
            "supervisor fsyncs the log."
        )
    if results.one_follower_job.count:
        extra.append(
            "The job itself (started_at to ended_at of its record) took "
            f"{results.one_follower_job.p(50):.2f} s "
            f"(median) with one follower"
            + (
                f" and {results.many_job.p(50):.2f} s with {results.followers}."
                if results.many_job.count
                else "."
            )
        )
    if results.one_server_cpu.count:
        extra.append(
            f"The server process used {results.one_server_cpu.p(50):.2f} s of CPU per GiB "
            "delivered to one follower"
            + (
                f", and {results.many_server_cpu.p(50):.2f} s per GiB per follower with "
                f"{results.followers} (medians)."
                if results.many_server_cpu.count
                else " (median)."
            )
        )
    if results.plain_one_server_cpu.count:
        extra.append(
            "Through the server without sendfile: "
            f"{results.plain_one_server_cpu.p(50):.2f} s of CPU per GiB to one follower (median)."
        )
    if results.unix_one_server_cpu.count:
        extra.append(
            "Through the server on a Unix socket: "
            f"{results.unix_one_server_cpu.p(50):.2f} s of CPU per GiB to one follower (median)."
        )
    if results.writer_cpu.count and results.writer_cpu_unreserved.count:
        extra.append(
            "The supervisor's log writer, run alone in the harness on the same 1 GiB of dd "
            f"through a 1 MiB pipe, used {results.writer_cpu.p(50):.3f} s of CPU with the log's "
            f"blocks allocated ahead of its bytes and {results.writer_cpu_unreserved.p(50):.3f} s "
            f"without ({_count(results.writer_cpu.count, 'run')} each, medians; p10 "
            f"{results.writer_cpu.p(10):.3f} s and {results.writer_cpu_unreserved.p(10):.3f} s)."
        )
    if results.writer_cpu_idle.count and results.writer_cpu.count:
        extra.append(
            f"After memory stayed free for {output_bench.IDLE_SECONDS} s, the same writer used "
            f"{results.writer_cpu_idle.p(50):.3f} s "
            f"({_count(results.writer_cpu_idle.count, 'run')}, median), "
            f"{results.writer_cpu_idle.p(50) / results.writer_cpu.p(50):.1f} times as much: "
            "this machine hands memory that stays free back to its host (see the machine "
            "table), and the host most likely has to fault it in again on the next write. So "
            "every timed "
            "path that fills the page cache starts right after 1 GiB was written to a file in "
            "the state folder and deleted, and reuses that memory."
        )
    if results.head_one is not None and results.head_pipe is not None:
        extra.append(
            f"With `{output_bench.HEAD_COMMAND}` as the producer (one run each): "
            f"{rate(results.head_one)} MB/s through a job to one follower, "
            f"{rate(results.head_pipe)} MB/s through a plain pipe on the host. Busybox head "
            "copies 4 KiB at a time, so it, not the engine, sets that pace."
        )
    lines.append(" ".join(extra) + "\n")

    if results.one_follower.count and results.file_write.count:
        share = results.file_write.p(50) / results.one_follower.p(50)
        lines.append(
            table(
                ("comparison (same run)", "value"),
                [
                    ("1 follower / file write, rate", f"{share:.2f}"),
                    (
                        "1 follower / file write, rate, at the p10 times (the fast runs of each)",
                        f"{results.file_write.p(10) / results.one_follower.p(10):.2f}",
                    ),
                    (
                        "1 follower / pipe, rate",
                        f"{results.pipe.p(50) / results.one_follower.p(50):.2f}",
                    ),
                ]
                + (
                    [
                        (
                            "1 follower: without sendfile (before) / with it, time",
                            f"{results.plain_one.p(50) / results.one_follower.p(50):.2f}",
                        )
                    ]
                    if results.plain_one.count
                    else []
                )
                + (
                    [
                        (
                            f"slowest of {results.followers} followers: without sendfile "
                            "(before) / with it, time",
                            f"{results.plain_many_slowest.p(50) / results.many_slowest.p(50):.2f}",
                        )
                    ]
                    if results.plain_many_slowest.count and results.many_slowest.count
                    else []
                )
                + (
                    [
                        (
                            "1 follower / the job with no follower (to the last byte logged), rate",
                            f"{results.no_follower_logged.p(50) / results.one_follower.p(50):.2f}",
                        ),
                        (
                            "the job with no follower (to the last byte logged) / file write, rate",
                            f"{results.file_write.p(50) / results.no_follower_logged.p(50):.2f}",
                        ),
                    ]
                    if results.no_follower_logged.count
                    else []
                )
                + (
                    [
                        (
                            f"slowest of {results.followers} followers / 1 follower, time",
                            f"{results.many_slowest.p(50) / results.one_follower.p(50):.1f}x",
                        )
                    ]
                    if results.many_slowest.count
                    else []
                )
                + _unix_comparisons(results)
                + _transport_comparisons(results),
            )
            + "\n"
        )
        share_fast = results.file_write.p(10) / results.one_follower.p(10)
        run.targets.append(
            (
                "output: 1 follower at least half the file-write rate",
                f"{share:.2f} times its rate ({share_fast:.2f} at the p10 times)",
                _output_verdict(
                    share >= FOLLOWER_SHARE_OF_FILE_WRITE,
                    share_fast >= FOLLOWER_SHARE_OF_FILE_WRITE,
                ),
            )
        )
    if results.many_slowest.count and results.one_follower.count:
        factor = results.many_slowest.p(50) / results.one_follower.p(50)
        factor_fast = results.many_slowest.p(10) / results.one_follower.p(10)
        run.targets.append(
            (
                f"output: {results.followers} followers each get every byte in at most 3x "
                "the 1-follower time",
                f"{factor:.1f}x ({factor_fast:.1f}x at the p10 times)",
                _output_verdict(
                    factor <= MANY_FOLLOWERS_FACTOR, factor_fast <= MANY_FOLLOWERS_FACTOR
                ),
            )
        )
    _unix_targets(run, results)
    lines += _output_limits(results)
    if results.errors:
        lines.append("Errors: " + "; ".join(results.errors) + "\n")
    lines.append("Commands:\n")
    lines.append(
        f'- job: `POST jobs` with `{{"command": "{output_bench.JOB_COMMAND}", '
        f'"output_cap": "{output_bench.OUTPUT_CAP}"}}`; each follower is a process running '
        "`bench/follower.py` (http.client, `GET jobs/ID/output?follow=1`, 1 MiB reads); the job "
        "is deleted afterwards."
    )
    busybox = run.rootfs + "/bin/busybox"
    write_command = output_bench.file_write_command(busybox, results.file_path)
    lines.append(f"- file write: `{write_command}`, then the file is removed.")
    lines.append(f"- pipe: `{output_bench.pipe_command(busybox)}`")
    lines.append(
        "- transport alone: `bench/transport.py`. It writes the file as the file write does and "
        "keeps it, sends it once untimed, then in each run sends it with `os.sendfile` from one "
        "thread per reader; each reader is a process with `recv_into` of 1 MiB.\n"
    )
    lines.append(
        "The host commands run the image's own static busybox, so the producer is the same "
        "program in and out of the job. The producer is dd, not `head -c 1G`: the image's "
        "busybox head rejects the `G` suffix and copies 4 KiB at a time. The one run with "
        "`head -c 1073741824` above shows what that costs.\n"
    )


def _unix_comparisons(results: output_bench.OutputResults) -> list[tuple[str, str]]:
    """Return the rows that compare followers over a Unix socket with the file write and TCP."""
    one, many = results.unix_one, results.unix_many_slowest
    if not one.count:
        return []
    rows = [
        (
            "1 follower over a Unix socket / file write, rate",
            f"{results.file_write.p(50) / one.p(50):.2f}",
        ),
        (
            "1 follower: over TCP / over a Unix socket, time",
            f"{results.one_follower.p(50) / one.p(50):.2f}",
        ),
    ]
    if many.count:
        rows.append(
            (
                f"over a Unix socket: slowest of {results.followers} followers / 1 follower, time",
                f"{many.p(50) / one.p(50):.1f}x",
            )
        )
    return rows


def _unix_targets(run: Run, results: output_bench.OutputResults) -> None:
    """Judge the two output targets again for followers over a Unix socket."""
    one, many = results.unix_one, results.unix_many_slowest
    if not (one.count and results.file_write.count):
        return
    share = results.file_write.p(50) / one.p(50)
    share_fast = results.file_write.p(10) / one.p(10)
    run.targets.append(
        (
            "output over a Unix socket (`--ServerApp.sock`): 1 follower at least half the "
            "file-write rate",
            f"{share:.2f} times its rate ({share_fast:.2f} at the p10 times)",
            _output_verdict(
                share >= FOLLOWER_SHARE_OF_FILE_WRITE, share_fast >= FOLLOWER_SHARE_OF_FILE_WRITE
            ),
        )
    )
    if many.count:
        factor = many.p(50) / one.p(50)
        factor_fast = many.p(10) / one.p(10)
        run.targets.append(
            (
                f"output over a Unix socket: {results.followers} followers each get every byte "
                "in at most 3x the 1-follower time",
                f"{factor:.1f}x ({factor_fast:.1f}x at the p10 times)",
                _output_verdict(
                    factor <= MANY_FOLLOWERS_FACTOR, factor_fast <= MANY_FOLLOWERS_FACTOR
                ),
            )
        )


def _transport_comparisons(results: output_bench.OutputResults) -> list[tuple[str, str]]:
    """Return the rows that compare the transport alone with the file write and itself."""
    one, many = results.transport_one.seconds, results.transport_many.seconds
    rows = []
    if one.count:
        rows.append(
            (
                "transport alone to 1 reader / file write, rate",
                f"{results.file_write.p(50) / one.p(50):.2f}",
            )
        )
    if one.count and many.count:
        rows.append(
            (
                f"transport alone: {results.followers} readers / 1 reader, time",
                f"{many.p(50) / one.p(50):.1f}x",
            )
        )
    return rows


def _output_verdict(met_at_medians: bool, met_at_fast_runs: bool) -> str:
    """Return the verdict of an output target at the medians and at the p10 times.

    The verdict is "unstable" when the two differ. New page cache was sometimes several times
    slower to allocate on the test machine, so one path's median may come from its slow runs.
    """
    if met_at_medians == met_at_fast_runs:
        return verdict(met_at_medians)
    at_medians = "met" if met_at_medians else "missed"
    at_fast_runs = "met" if met_at_fast_runs else "missed"
    return f"**unstable**: {at_medians} at the medians, {at_fast_runs} at the p10 times"


def _join(names: list[str]) -> str:
    """Return ``names`` as an English list: "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _output_limits(results: output_bench.OutputResults) -> list[str]:
    """Return what bounds the follower figures, from this run's own numbers."""
    if not (results.pipe.count and results.file_write.count and results.one_follower.count):
        return []
    lines = []
    wide = [
        name
        for name, samples in (
            ("the file write", results.file_write),
            ("the job with no follower", results.no_follower_logged),
            ("one follower", results.one_follower),
        )
        if samples.count and samples.p(90) > WIDE_SPREAD * samples.p(10)
    ]
    if wide:
        lines.append(
            f"The times of {_join(wide)} spread more than {WIDE_SPREAD:g}-fold between p10 "
            "and p90 in this run, recycled page cache notwithstanding, so a median can land on "
            "either side. The p10 row above compares the fast runs of each path, and the targets "
            "table judges the two output targets at the medians and at the p10 times, and calls "
            "a target unstable where the two disagree.\n"
        )
    if results.runs < FEW_RUNS:
        lines.append(
            f"With {_count(results.runs, 'run')} of each path, one slow page-cache allocation "
            "can decide a median: compare figures from the default run counts.\n"
        )
    pipe_share = results.file_write.p(50) / results.pipe.p(50)
    lines.append(
        "A job's output crosses a pipe on its way to the log, since the output cap and the "
        "stderr ranges need one; the relay pipe behind it moves page references, not bytes. "
        "The plain pipe above has the kernel's default 64 KiB buffer, "
        f"while the engine gives the job's pipe {PIPE_SIZE // 1024**2} MiB. In this run one "
        "follower gets "
        f"{results.pipe.p(50) / results.one_follower.p(50):.2f} times the plain pipe's rate, "
        f"and the plain pipe reaches {pipe_share:.2f} times the file-write rate.\n"
    )
    return lines + _cpu_lines(results)


def _count(number: int, noun: str) -> str:
    """Return ``number`` with ``noun``, plural unless the number is 1."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _cpu_lines(results: output_bench.OutputResults) -> list[str]:
    """Return the CPU split of the followed runs and the bounds it sets."""
    cpus = os.cpu_count() or 1
    splits = [
        (f"{count} follower{'s' if count > 1 else ''}", split)
        for count, split in ((1, results.one_cpu), (results.followers, results.many_cpu))
        if split.window.count
    ]
    if not splits:
        return []
    rows = [
        (
            label,
            f"{split.window.p(50):.2f}",
            f"{split.job.p(50):.2f}",
            f"{split.rest.p(50):.2f}",
            f"{split.server.p(50):.2f}",
            f"{split.followers.p(50):.2f}",
            f"{split.machine.p(50):.2f}",
            f"{split.machine.p(50) / (cpus * split.window.p(50)):.0%}",
        )
        for label, split in splits
    ]
    header = (
        "run",
        "POST to the last byte, s",
        "job (its cgroup)",
        "rest: supervisor, interrupts, kernel threads, harness",
        "server",
        "followers",
        "all CPUs",
        f"busy share of the {cpus} CPUs",
    )
    lines = [
        "CPU seconds of each followed run, from the `POST` to the last follower's last byte "
        "(medians of each column, so a row's parts need not add up to its total). The machine's "
        "busy time comes from /proc/stat, the followers report their own, and the rest is the "
        "machine's busy time less the other columns. The job's and the server's figures run a "
        "little longer, to the end of the job and of the responses.\n",
        table(header, rows) + "\n",
    ]

    single, several = results.one_cpu, results.many_cpu
    text = []
    if single.window.count and results.file_write.count:
        busy = single.machine.p(50) / (cpus * single.window.p(50))
        target = results.file_write.p(50) / FOLLOWER_SHARE_OF_FILE_WRITE
        text.append(f"With one follower the CPUs are {busy:.0%} busy")
        if busy >= CPU_BOUND_SHARE:
            text[-1] += ", so only less CPU work, not less waiting, can shorten the run"
        text[-1] += (
            f". It uses {single.machine.p(50):.2f} s of CPU, "
            f"{single.followers.p(50) + single.server.p(50):.2f} s of it in the follower and "
            "the server."
        )
        excess = single.machine.p(50) - cpus * target
        if excess > 0:
            text[-1] += (
                f" Half the file-write rate means {target:.2f} s here, at most "
                f"{cpus * target:.2f} s of CPU on {cpus} CPUs, so meeting the target takes "
                f"{excess:.2f} s of CPU out of this path."
            )
        text[-1] += (
            f" The follower runs in one thread and spends {single.followers.p(50):.2f} s of "
            f"CPU, {single.followers_system.p(50) / single.followers.p(50):.0%} of it in the "
            "kernel, so it cannot finish sooner than that."
        )
        if results.writer_cpu.count:
            text.append(_one_follower_floor(results, cpus))
    if several.window.count and results.one_follower.count:
        delivery = several.server.p(50) + several.followers.p(50)
        floor = delivery / cpus
        text.append(
            f"With {results.followers} followers, the server and the follower processes take "
            f"{delivery:.2f} s of CPU, {several.delivery_system.p(50) / delivery:.0%} of it "
            f"system time: on {cpus} CPUs that needs at least {floor:.2f} s even if the job "
            f"cost nothing, {floor / results.one_follower.p(50):.1f}x the one-follower time "
            f"(the target is {MANY_FOLLOWERS_FACTOR:g}x)."
        )
    if text:
        lines.append(" ".join(text) + "\n")
    floors = _transport_floors(results, cpus)
    if floors:
        lines.append(floors + "\n")
    return lines


def _transport_floors(results: output_bench.OutputResults, cpus: int) -> str:
    """Return the shortest follower times that the transport alone allows, and their verdicts."""
    one, many = results.transport_one, results.transport_many
    if not (
        one.seconds.count
        and results.writer_cpu.count
        and results.one_cpu.job.count
        and results.one_server_cpu.count
    ):
        return ""

    # One follower: the job, the log writer and the transport's two ends share the CPUs.
    writer = results.writer_cpu.p(50)
    sender, reader = one.sender_cpu.p(50), one.reader_cpu.p(50)
    job = results.one_cpu.job.p(50)
    server = results.one_server_cpu.p(50)
    total = job + writer + sender + reader
    floor = max(total / cpus, one.seconds.p(50))
    share = results.file_write.p(50) / floor
    text = [
        "The transport alone sets a floor that no server sending over TCP can go below. It "
        f"sent 1 GiB to one reader in {one.seconds.p(50):.2f} s, with {sender:.2f} s of CPU in "
        "the sending thread (on loopback, that includes much of the receiving end's TCP work) "
        f"and {reader:.2f} s in the reader. The server used {server:.2f} s per GiB to one "
        f"follower, {server / sender:.1f} times the sending thread's CPU. Add the job "
        f"({job:.2f} s) and the log writer ({writer:.2f} s) to the transport, and one follower "
        f"needs {total:.2f} s of CPU: at least {floor:.2f} s on {cpus} CPUs, at best "
        f"{share:.2f} times the file-write rate."
    ]
    if share >= FOLLOWER_SHARE_OF_FILE_WRITE:
        text.append(
            "So a server that cost no more than the transport could meet the one-follower "
            "target on this machine."
        )
    else:
        text.append(
            "So while a job's output goes through a pipe into a log and out over TCP, "
            "no server can meet the one-follower target on this machine."
        )
    if not (many.seconds.count and results.many_cpu.job.count):
        return " ".join(text)

    # Many followers: the same with the transport to as many readers.
    many_sender = many.sender_cpu.p(50)
    many_total = results.many_cpu.job.p(50) + writer + many_sender + many.reader_cpu.p(50)
    many_floor = max(many_total / cpus, many.seconds.p(50))
    factor = many_floor / floor
    sentence = (
        f"To {results.followers} readers the transport alone took "
        f"{many.seconds.p(50):.2f} s, {many.seconds.p(50) / one.seconds.p(50):.1f}x its "
        f"time to one, with {many_sender + many.reader_cpu.p(50):.2f} s of CPU"
    )
    if results.many_server_cpu.count:
        server_share = results.many_server_cpu.p(50) * results.followers / many_sender
        sentence += (
            f"; the server used {results.many_server_cpu.p(50):.2f} s per GiB per follower, "
            f"{server_share:.1f} times the sending threads' CPU."
        )
    else:
        sentence += "."
    text.append(sentence)
    floor_text = (
        f"With the job and the log writer, {results.followers} followers need at least "
        f"{many_floor:.2f} s, {factor:.1f}x the one-follower floor"
    )
    if factor > MANY_FOLLOWERS_FACTOR:
        floor_text += (
            f", above the target of {MANY_FOLLOWERS_FACTOR:g}x even if both runs reached "
            "their floors."
        )
    else:
        floor_text += f", within the target of {MANY_FOLLOWERS_FACTOR:g}x."
    text.append(floor_text)
    return " ".join(text)


def _one_follower_floor(results: output_bench.OutputResults, cpus: int) -> str:
    """Return the shortest one-follower time that this run's CPU figures allow."""
    single = results.one_cpu
    job, writer = single.job.p(50), results.writer_cpu.p(50)
    server, follower = single.server.p(50), single.followers.p(50)
    server_system = single.delivery_system.p(50) - single.followers_system.p(50)
    total = job + writer + server + follower
    floor = total / cpus
    return (
        f"Leaving out the harness, interrupts and kernel threads, the job ({job:.2f} s), the "
        f"log writer's copy into the page cache ({writer:.2f} s, timed alone above), the "
        f"server ({server:.2f} s, {server_system / server:.0%} of it in the kernel) "
        f"and the follower ({follower:.2f} s) need {total:.2f} s of CPU: at least "
        f"{floor:.2f} s on {cpus} CPUs, or at best "
        f"{results.file_write.p(50) / floor:.2f} times the file-write rate, where the target "
        f"is {FOLLOWER_SHARE_OF_FILE_WRITE:g} times."
    )


def _scale_section(run: Run, lines: list[str]) -> None:
    results = run.scale
    lines.append("## 3. Scale: concurrent `sleep 600` jobs\n")
    if results is None:
        lines.append(f"Not measured: {run.errors.get('scale', NOT_RUN)}\n")
        return
    lines.append(_section_load(run, "scale") + "\n")

    rate_per_second = results.start_rates.p(50)
    per_job = results.pss_mean + results.shared_pss / results.jobs
    supervisor_cpu = statistics.fmean(results.supervisor_cpu.values or [math.nan])
    job_cpu = statistics.fmean(results.job_cpu.values or [math.nan])
    rows = [
        (
            f"{results.jobs} jobs submitted in-process, first submit to the last RUNNING, in "
            f"{_count(results.start_rates.count, 'burst')}",
            f"median **{rate_per_second:.0f} starts/s** (each burst: "
            f"{', '.join(f'{rate:.0f}' for rate in results.start_rates.values)}); the last "
            f"burst took {results.all_running_seconds:.2f} s, the submit calls alone "
            f"{results.submit_seconds:.2f} s, {ms(results.submit_seconds / results.jobs)} ms each",
        ),
        (
            "the same bursts with the state folder on a tmpfs, alternating with those above",
            (
                f"median {results.tmpfs_rates.p(50):.0f} starts/s (each burst: "
                f"{', '.join(f'{rate:.0f}' for rate in results.tmpfs_rates.values)})"
                if results.tmpfs_rates.count
                else f"not measured: {results.tmpfs_error}"
            ),
        ),
        (
            "the same bursts with the state folder on "
            f"{results.journal_file_system or 'ext4 with a journal'}, in an image file mounted "
            "through a loop device",
            (
                f"median {results.journal_rates.p(50):.0f} starts/s (each burst: "
                f"{', '.join(f'{rate:.0f}' for rate in results.journal_rates.values)})"
                if results.journal_rates.count
                else f"not measured: {results.journal_error}"
            ),
        ),
        (
            "CPU time of one job's start: its supervisor / its cgroup (PID 1 and `sleep`); "
            "the supervisor's is counted in clock ticks of 10 ms, so the mean is given",
            (
                f"mean {ms(supervisor_cpu)} ms"
                if supervisor_cpu >= MIN_SHOWN_CPU
                else "below 0.1 ms on average (most supervisors used no whole tick)"
            )
            + f" / {ms(job_cpu)} ms (not counted: the kernel's work in the fork server and the "
            "manager for each job)",
        ),
        (
            "host memory per job outside its cgroup: PSS of its supervisor, plus a share of "
            "the fork server and its prepared supervisors",
            f"**{per_job / MB:.2f} MB**: supervisors mean {results.pss_mean / MB:.2f} MB "
            f"(p50 {results.pss.p(50) / MB:.2f}, p90 {results.pss.p(90) / MB:.2f} MB), "
            f"plus {results.shared_pss / MB:.2f} MB / {results.jobs} jobs",
        ),
        (
            "the same supervisors: RSS / private (clean + dirty)",
            f"mean {results.rss_mean / MB:.2f} MB / {results.private_mean / MB:.2f} MB",
        ),
    ]
    if results.host_delta_per_job is not None and results.cgroup_per_job is not None:
        rows.append(
            (
                "used memory growth (MemTotal - MemAvailable) per job, minus the jobs' cgroups",
                f"{results.host_delta_per_job / MB:.2f} MB (kernel objects included; other "
                "processes on the machine add noise); charged to each job's own cgroup: "
                f"{results.cgroup_per_job / MB:.2f} MB",
            )
        )

    rows += [
        (
            f"GET jobs/ID over REST, {results.requests} requests on one keep-alive connection, "
            f"while the {results.jobs} run and {results.followers} followers stream another job",
            f"p50 {ms(results.get_latency.p(50))} ms, p90 {ms(results.get_latency.p(90))} ms, "
            f"**p99 {ms(results.get_latency.p(99))} ms**",
        ),
        ("server start, adopting the running jobs", f"{results.server_start_seconds:.2f} s"),
        (
            f"stop all {results.jobs} at once (grace 0, in-process)",
            f"{results.stop_all_seconds:.2f} s",
        ),
        (
            "left after the stop",
            f"{len(results.left_running)} running, {len(results.left_cgroups)} cgroups, "
            f"{len(results.left_supervisors)} supervisors",
        ),
    ]
    lines.append(table(("figure", "value"), rows) + "\n")

    if results.stream_bytes:
        received = (
            f"{results.stream_bytes[0]} bytes each"
            if min(results.stream_bytes) == max(results.stream_bytes)
            else f"{min(results.stream_bytes)} to {max(results.stream_bytes)} bytes each"
        )
        lines.append(
            f"The {results.followers} followers received {received} from "
            f"`{scale_bench.STREAM_COMMAND}`.\n"
        )
    if results.errors:
        lines.append("Errors: " + "; ".join(results.errors) + "\n")

    run.targets += [
        (
            "scale: at least 100 starts/s",
            f"{rate_per_second:.0f} starts/s" + _other_file_systems(results),
            verdict(rate_per_second >= STARTS_PER_SECOND),
        ),
        (
            "scale: at most 3 MB host memory per job",
            f"{per_job / MB:.2f} MB PSS",
            verdict(per_job <= HOST_MEMORY_PER_JOB),
        ),
        (
            "scale: p99 GET jobs/ID under 20 ms",
            f"{ms(results.get_latency.p(99))} ms",
            verdict(results.get_latency.p(99) * 1000 < GET_P99_MS),
        ),
    ]
    if results.tmpfs_rates.count:
        journal_ratio = (
            f", and on ext4 with a journal {results.journal_rates.p(50) / rate_per_second:.2f} "
            "times"
            if results.journal_rates.count
            else ""
        )
        lines.append(
            f"The state folder lies on {results.state_file_system}. The median rate on the "
            f"tmpfs is {results.tmpfs_rates.p(50) / rate_per_second:.2f} times the rate there"
            f"{journal_ratio} (from unrounded rates)."
            + (
                " To allocate an inode, ext4 without a journal passes over each free inode that "
                "was deleted in the last 60 s, or 360 s while its inode table block is dirty, "
                "checking the deletion time of each in the buffer cache "
                "(`recently_deleted()` in fs/ext4/ialloc.c). Each burst on the state folder but "
                f"the first follows the deletion of the {results.jobs} jobs before it. The first "
                f"reached {results.start_rates.values[0]:.0f} starts/s. Neither a tmpfs nor ext4 "
                "with a journal makes this check."
                if results.state_file_system == "ext4 without a journal"
                else ""
            )
            + "\n"
        )
    lines.append(
        'Commands: after a `sync`, `manager.submit({"command": "sleep 600"}, owner="alice")` '
        f"{results.jobs} times in a row, in {scale_bench.START_BURSTS} bursts, and as many with "
        f"the state folder on a tmpfs of {scale_bench.TMPFS_SIZE}, and on ext4 made by "
        f"`mkfs.ext4 -O has_journal` in a sparse image file made by `truncate -s "
        f"{scale_bench.JOURNAL_IMAGE_SIZE}` and mounted with `mount -o loop`; the rate takes "
        "the latest `started_at` (written by each supervisor when the job turns RUNNING). The "
        "jobs of each burst but the last are stopped and deleted before the next. PSS is read "
        "from /proc/PID/smaps_rollup of each supervisor, of the fork server, and of the "
        "prepared supervisors and their PID 1 that wait for the next job. Then the manager is "
        "closed, a server on the same state folder adopts the jobs, and GETs go to random ones "
        "of them as alice. At the end the server stops, and a new manager stops all jobs and "
        "checks for running records, job cgroups and supervisor processes.\n"
    )


def _other_file_systems(results: scale_bench.ScaleResults) -> str:
    """Return the median rates on the tmpfs and on ext4 with a journal, in parentheses."""
    parts = []
    if results.tmpfs_rates.count:
        parts.append(f"{results.tmpfs_rates.p(50):.0f} with the state folder on a tmpfs")
    if results.journal_rates.count:
        parts.append(f"{results.journal_rates.p(50):.0f} on ext4 with a journal")
    return f" ({', '.join(parts)})" if parts else ""


def _stop_section(run: Run, lines: list[str]) -> None:
    results = run.stop
    lines.append("## 4. Stop: from the stop request to STOPPED\n")
    if results is None:
        lines.append(f"Not measured: {run.errors.get('stop', NOT_RUN)}\n")
        return
    lines.append(_section_load(run, "stop") + "\n")
    lines.append(
        f"{_count(results.runs, 'run')} of each kind, alternating. Each job prints `ready` from "
        "its command; once the manager has followed that byte, `await manager.stop(id, grace=...)` "
        "is timed until it returns the STOPPED record.\n"
    )
    rows = [
        (
            f"`{stop_bench.EXITS_ON_TERM}`, grace {stop_bench.TERM_GRACE:g} s",
            ms(results.on_term.p(50)),
            f"{ms(results.on_term.p(10))} / {ms(results.on_term.p(90))}",
            results.on_term.count,
        ),
        (
            f"`{stop_bench.IGNORES_TERM}`, grace {stop_bench.IGNORED_GRACE:g} s",
            ms(results.ignored.p(50)),
            f"{ms(results.ignored.p(10))} / {ms(results.ignored.p(90))}",
            results.ignored.count,
        ),
    ]
    lines.append(table(("job", "p50 ms", "p10 / p90 ms", "runs"), rows) + "\n")
    if results.on_term.count:
        run.targets.append(
            (
                "stop: p50 under 50 ms on SIGTERM",
                f"{ms(results.on_term.p(50))} ms",
                verdict(results.on_term.p(50) * 1000 < STOP_ON_TERM_MS),
            )
        )
    if results.ignored.count:
        limit = stop_bench.IGNORED_GRACE * 1000 + STOP_IGNORED_EXTRA_MS
        run.targets.append(
            (
                "stop: p50 at most grace + 100 ms when SIGTERM is ignored",
                f"{ms(results.ignored.p(50))} ms (limit {limit:.0f} ms)",
                verdict(results.ignored.p(50) * 1000 <= limit),
            )
        )


def render(run: Run) -> str:
    """Return the text of BENCHMARKS.md."""
    sections: list[str] = []
    _start_section(run, sections)
    _output_section(run, sections)
    _scale_section(run, sections)
    _stop_section(run, sections)

    lines = ["# Benchmarks\n"]
    lines.append(
        "Figures of the job engine and its REST API next to bwrap, crun and unshare, written by "
        "`bench/run.py` (see [bench/README.md](bench/README.md)). Rerun on a quiet machine, as "
        "root, from the repository folder:\n"
    )
    lines.append("```sh\n.venv/bin/python bench/run.py\n```\n")
    lines.append(
        f"This run: {run.date}, `{run.command_line}`, {run.duration / 60:.1f} minutes. "
        "Benchmarks are not tests: no figure fails the run.\n"
    )
    lines.append("## Machine\n")
    lines.append(table(("", ""), run.facts) + "\n")
    busy_before = ", ".join(f"{name} {share:.0f}%" for name, share in run.busiest_before) or "none"
    busy_after = ", ".join(f"{name} {share:.0f}%" for name, share in run.busiest_after) or "none"
    lines.append(
        f"Load average (1, 5, 15 min): {run.load_before} before the run, {run.load_after} after "
        f"it. Busiest processes in a 1 s sample before the run (% of one CPU): {busy_before}; "
        f"after it: {busy_after}. Each section below gives its own load.\n"
    )
    lines.append("## Targets\n")
    targets = run.targets
    if run.quick:
        targets = [(target, figure, "not judged: --quick") for target, figure, _ in targets]
        lines.append(
            "This is a smoke run with `--quick`: it has fewer jobs and runs than the targets are "
            "set for, so no target is judged. A full run judges them.\n"
        )
    lines.append(table(("target", "this run", "result"), targets) + "\n")
    if run.errors:
        lines.append(
            "Errors: " + "; ".join(f"{name}: {text}" for name, text in run.errors.items()) + "\n"
        )
    lines += _changes_section(run)
    lines += sections
    return "\n".join(lines).rstrip() + "\n"


def _changes_section(run: Run) -> list[str]:
    """Return the before and after figures of this version's changes, from this run."""
    lines = ["## Changes and their effect, measured in this run\n"]
    rows: list[tuple[str, str, str]] = []
    start = run.start
    if start is not None and start.samples[ENGINE].count and start.samples[ENGINE_EXEC].count:
        rows.append(
            (
                "supervisors forked by a fork server, with a container prepared before the job",
                f"start p50 {ms(start.samples[ENGINE_EXEC].p(50))} ms with a new interpreter "
                f"per job, {ms(start.samples[ENGINE_FORK].p(50))} ms with a fresh fork per job",
                f"{ms(start.samples[ENGINE].p(50))} ms",
            )
        )
    output = run.output
    if output is not None and output.plain_one.count and output.one_follower.count:
        rows.append(
            (
                "followed output sent with sendfile, not through tornado's buffers",
                f"1 follower {output.plain_one.p(50):.2f} s, "
                f"{output.plain_one_server_cpu.p(50):.2f} s of server CPU per GiB; "
                f"{output.followers} followers {output.plain_many_slowest.p(50):.2f} s",
                f"{output.one_follower.p(50):.2f} s, {output.one_server_cpu.p(50):.2f} s; "
                f"{output.many_slowest.p(50):.2f} s",
            )
        )
    if output is not None and output.direct_one.count and output.one_follower.count:
        rows.append(
            (
                "the job's stdout moved into a relay pipe, then into the log",
                f"no follower: last byte logged {output.direct_logged.p(50):.2f} s, end "
                f"{output.direct_alone.p(50):.2f} s; 1 follower {output.direct_one.p(50):.2f} s",
                f"{output.no_follower_logged.p(50):.2f} s, {output.no_follower.p(50):.2f} s; "
                f"{output.one_follower.p(50):.2f} s",
            )
        )
    if output is not None and output.writer_cpu.count and output.writer_cpu_unreserved.count:
        rows.append(
            (
                f"the log's blocks allocated ahead of its bytes in steps of "
                f"{RESERVE_CHUNK // 1024**2} MiB, once it passes {RESERVE_AFTER // 1024**2} MiB",
                f"log writer alone: {output.writer_cpu_unreserved.p(50):.3f} s of CPU per GiB",
                f"{output.writer_cpu.p(50):.3f} s",
            )
        )
    if rows:
        lines.append(table(("change", "before", "after"), rows) + "\n")
    else:
        lines.append(
            "None in this run: they come from the start and output sections, and neither "
            "measured them.\n"
        )
    lines.append(
        "Changes since the first version that have no switch, so that their effect is in the "
        "figures but not measured alone: PID 1 starts the "
        "command with posix_spawn after restricting itself, instead of forking Python; the "
        "container child creates the user namespace, instead of a process of its own; jobs "
        "share one staging folder, and the range file is created only for stderr or a "
        "truncation marker; "
        "`POST jobs` counts the user's running jobs in SQLite; `submit` starts the supervisor in "
        "the background; the supervisor's pid goes into the job's row in SQLite, not into a "
        "file of its own in the job's folder.\n"
    )
    return lines
