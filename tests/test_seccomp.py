"""The job seccomp filter: real syscalls through a static C probe, and the BPF program itself."""

from __future__ import annotations

import errno
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from jupyter_linuxworker.sandbox import seccomp
from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.store import JobStatus

PROBE_SOURCE = Path(__file__).parent / "probes" / "syscall_probe.c"

# Probe names that the filter must fail with EPERM: each denied syscall under its own name,
# and the cases that the filter decides by ABI or by argument.
DENIED_PROBES = (
    *seccomp.DENIED_SYSCALLS,
    "clone_newuser",
    "socket_vsock",
    "i386_getpid",
    "x32_getpid",
)
ALLOWED_PROBES = ("fork", "thread", "socket_unix")
ALL_PROBES = (*DENIED_PROBES, "clone3", *ALLOWED_PROBES)

SYSCALL_HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}
AUDIT_ARCH_I386 = 0x40000003
GETPID_NUMBERS = {"x86_64": 39, "aarch64": 172}
# The flags glibc's fork() passes to clone: CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD.
FORK_CLONE_FLAGS = 0x01200011
AF_UNIX = 1
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
RETURN_EPERM = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
RETURN_ENOSYS = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS

needs_x86_64 = pytest.mark.skipif(
    os.uname().machine != "x86_64", reason="the probe expectations are written for x86_64"
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the syscall probe statically and return its path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is missing; scripts/setup.sh installs gcc and libc6-dev")
    binary = tmp_path_factory.mktemp("probe") / "syscall_probe"
    build = subprocess.run(
        [gcc, "-static", "-O2", "-o", str(binary), str(PROBE_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0 and "cannot find -lc" in build.stderr:
        pytest.skip("the static C library is missing; scripts/setup.sh installs libc6-dev")
    assert build.returncode == 0, f"building {PROBE_SOURCE} failed:\n{build.stderr}"
    return str(binary)


def run_probe(probe: str, names: Sequence[str], *, filtered: bool) -> dict[str, str]:
    """Run the probe in a forked child, with the filter installed if ``filtered``.

    Returns each name's outcome ("OK", "errno=N", ...) keyed by name.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.dup2(write_fd, 1)
            if filtered:
                seccomp.install()
            os.execv(probe, [probe, *names])
        except BaseException as error:
            os.write(2, f"starting the probe failed: {error!r}\n".encode())
        finally:
            os._exit(127)

    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the probe failed; its output:\n{output}"

    outcomes = {}
    for line in output.splitlines():
        name, outcome = line.split(" ", 1)
        outcomes[name] = outcome
    assert list(outcomes) == list(names), f"the probe printed other names:\n{output}"
    return outcomes


@pytest.fixture(scope="module")
def filtered_outcomes(probe: str) -> dict[str, str]:
    return run_probe(probe, ALL_PROBES, filtered=True)


@pytest.fixture(scope="module")
def unfiltered_outcomes(probe: str) -> dict[str, str]:
    return run_probe(probe, ALL_PROBES, filtered=False)


@needs_x86_64
@pytest.mark.parametrize("name", DENIED_PROBES)
def test_filter_denies_with_eperm(filtered_outcomes: dict[str, str], name: str) -> None:
    if name == "i386_getpid" and filtered_outcomes[name].startswith("signal="):
        pytest.skip("this kernel has no IA32 emulation, so int 0x80 never reaches seccomp")
    assert f"{name} {filtered_outcomes[name]}" == f"{name} errno=1"


@needs_x86_64
def test_filter_answers_clone3_with_enosys(filtered_outcomes: dict[str, str]) -> None:
    assert f"clone3 {filtered_outcomes['clone3']}" == "clone3 errno=38"


@needs_x86_64
@pytest.mark.parametrize("name", ALLOWED_PROBES)
def test_filter_allows(filtered_outcomes: dict[str, str], name: str) -> None:
    assert f"{name} {filtered_outcomes[name]}" == f"{name} OK"


@needs_x86_64
@pytest.mark.skipif(
    os.geteuid() != 0, reason="without the filter, only root passes the kernel's permission checks"
)
@pytest.mark.parametrize("name", (*DENIED_PROBES, "clone3"))
def test_probe_reaches_kernel_unfiltered(unfiltered_outcomes: dict[str, str], name: str) -> None:
    # Without the filter the kernel returns another error or success, so the errno seen under
    # the filter comes from the filter and not from the kernel's own checks.
    filter_answer = "errno=38" if name == "clone3" else "errno=1"
    assert unfiltered_outcomes[name] != filter_answer, f"{name} gave {filter_answer} unfiltered"


@needs_x86_64
@pytest.mark.parametrize("name", ALLOWED_PROBES)
def test_probe_allowed_unfiltered(unfiltered_outcomes: dict[str, str], name: str) -> None:
    assert f"{name} {unfiltered_outcomes[name]}" == f"{name} OK"


def test_build_filter_unknown_machine() -> None:
    with pytest.raises(seccomp.SeccompError, match="sparc"):
        seccomp.build_filter("sparc")


def test_install_unknown_machine_changes_nothing() -> None:
    # In a child, because a successful install could not be undone.
    pid = os.fork()
    if pid == 0:
        exit_code = 1
        try:
            seccomp.install("sparc")
        except seccomp.SeccompError:
            with open("/proc/self/status", encoding="ascii") as status_file:
                no_new_privs = re.search(r"^NoNewPrivs:\s+(\d)", status_file.read(), re.MULTILINE)
            exit_code = 0 if no_new_privs is not None and no_new_privs[1] == "0" else 2
        finally:
            os._exit(exit_code)
    _, status = os.waitpid(pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    assert exit_code != 1, "install('sparc') did not raise SeccompError"
    assert exit_code == 0, "install('sparc') set no_new_privs before it raised"


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_filter_size(machine: str) -> None:
    program = seccomp.build_filter(machine)
    assert len(program) % seccomp.SOCK_FILTER.size == 0
    assert len(program) // seccomp.SOCK_FILTER.size < seccomp.BPF_MAXINSNS


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_syscall_table_matches_headers(machine: str) -> None:
    header = SYSCALL_HEADERS[machine]
    if not header.exists():
        pytest.skip(f"{header} is missing; apt-get install linux-libc-dev")
    defined = {
        name: int(number)
        for name, number in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text())
    }
    for name, number in seccomp._ARCHITECTURES[machine].syscall_numbers.items():
        assert defined.get(name) == number, f"{machine} {name}: {header} has {defined.get(name)}"


def run_filter(program: bytes, *, nr: int, arch: int, arg0: int = 0) -> int:
    """Run a classic BPF seccomp program on one ``struct seccomp_data``; return its action.

    Only the instructions that build_filter emits are understood.
    """
    data = struct.pack("=IIQ6Q", nr & 0xFFFFFFFF, arch, 0, arg0, 0, 0, 0, 0, 0)
    instructions = list(seccomp.SOCK_FILTER.iter_unpack(program))
    load = seccomp.BPF_LD | seccomp.BPF_W | seccomp.BPF_ABS
    jump_equal = seccomp.BPF_JMP | seccomp.BPF_JEQ | seccomp.BPF_K
    jump_set = seccomp.BPF_JMP | seccomp.BPF_JSET | seccomp.BPF_K
    ret = seccomp.BPF_RET | seccomp.BPF_K
    accumulator = 0
    pc = 0
    while True:
        code, jump_true, jump_false, k = instructions[pc]
        if code == load:
            (accumulator,) = struct.unpack_from("=I", data, k)
            pc += 1
        elif code == jump_equal:
            pc += 1 + (jump_true if accumulator == k else jump_false)
        elif code == jump_set:
            pc += 1 + (jump_true if accumulator & k else jump_false)
        elif code == ret:
            return int(k)
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x} at instruction {pc}")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_emulated_filter_decisions(machine: str) -> None:
    program = seccomp.build_filter(machine)
    architecture = seccomp._ARCHITECTURES[machine]
    numbers = architecture.syscall_numbers
    arch = architecture.audit_arch

    def decide(nr: int, arg0: int = 0, audit_arch: int = arch) -> int:
        return run_filter(program, nr=nr, arch=audit_arch, arg0=arg0)

    for name in seccomp.DENIED_SYSCALLS:
        assert decide(numbers[name]) == RETURN_EPERM, f"{machine} {name} is not denied"
    for flag in NAMESPACE_FLAGS:
        assert decide(numbers["clone"], FORK_CLONE_FLAGS | flag) == RETURN_EPERM, hex(flag)
    assert decide(numbers["clone"], FORK_CLONE_FLAGS) == seccomp.SECCOMP_RET_ALLOW
    assert decide(numbers["clone3"]) == RETURN_ENOSYS
    assert decide(numbers["socket"], seccomp.AF_VSOCK) == RETURN_EPERM
    assert decide(numbers["socket"], AF_UNIX) == seccomp.SECCOMP_RET_ALLOW
    assert decide(GETPID_NUMBERS[machine]) == seccomp.SECCOMP_RET_ALLOW
    assert decide(GETPID_NUMBERS[machine], audit_arch=AUDIT_ARCH_I386) == RETURN_EPERM


def test_emulated_filter_denies_x32() -> None:
    program = seccomp.build_filter("x86_64")
    x32_getpid = GETPID_NUMBERS["x86_64"] | seccomp.X32_SYSCALL_BIT
    action = run_filter(program, nr=x32_getpid, arch=seccomp.AUDIT_ARCH_X86_64)
    assert action == RETURN_EPERM


@needs_x86_64
async def test_probe_inside_job(probe: str, manager: JobManager) -> None:
    """A curious user runs the probe in a job: every denied call fails with EPERM there."""
    folder = os.path.join(manager.volume_roots[0], "probe")
    os.mkdir(folder)
    shutil.copy2(probe, folder)
    names = [*DENIED_PROBES, "clone3", "fork", "thread", "socket_unix"]

    job = await manager.submit(
        {"command": ["/probe/syscall_probe", *names], "volumes": [f"{folder}:/probe:ro"]}
    )
    record = await manager.wait(job.id, timeout=10)

    assert record.status == JobStatus.COMPLETED
    expected = [f"{name} errno=1" for name in DENIED_PROBES]
    expected += ["clone3 errno=38", "fork OK", "thread OK", "socket_unix OK"]
    assert manager.read_output(job.id).decode().splitlines() == expected
