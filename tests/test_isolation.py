"""A job's view of the system: its own processes, hostname, mounts, network and files; volumes."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.mounts import DEV_NODES, MASKED_PATHS, READ_ONLY_PATHS
from jupyter_linuxworker.sandbox.spec import SpecError
from jupyter_linuxworker.sandbox.store import JobStatus

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def run(
    manager: JobManager, command: str, **fields: object
) -> tuple[JobStatus, int | None, bytes]:
    job = await manager.submit({"command": command, **fields})
    record = await manager.wait(job.id, timeout=10)
    return record.status, record.exit_code, manager.read_output(job.id)


async def test_sees_only_own_processes(manager: JobManager) -> None:
    _, _, output = await run(manager, "ls /proc | grep -c '^[0-9]'; cat /proc/1/comm")
    # PID 1 (the init), the shell, ls and grep: the host's processes are absent.
    count, init_name = output.decode().split()
    assert int(count) <= 4
    assert init_name == "init"


async def test_hostname_is_short_id(manager: JobManager) -> None:
    job = await manager.submit(
        {"command": "hostname; cat /etc/hostname 2>/dev/null | wc -l >/dev/null"}
    )
    await manager.wait(job.id, timeout=5)
    assert manager.read_output(job.id) == job.id[:12].encode() + b"\n"


async def test_only_loopback_network(manager: JobManager) -> None:
    status, _, output = await run(
        manager,
        "ls /sys/class/net; cat /sys/class/net/lo/operstate; "
        "ip -o -4 addr show | awk '{print $2, $4}'",
    )
    assert status == JobStatus.COMPLETED
    assert output == b"lo\nunknown\nlo 127.0.0.1/8\n"


async def test_loopback_is_usable(manager: JobManager) -> None:
    status, _, output = await run(
        manager,
        # The listener reads a FIFO held open by the shell: at the end of its input, busybox
        # nc half-closes the connection, and a client that sees that before reading its own
        # input quits without sending. Retry until the listener is up, then wait for it.
        "mkfifo /tmp/hold; nc -l -p 8080 </tmp/hold >/tmp/got & listener=$!; "
        "exec 3>/tmp/hold; "
        "for i in $(seq 1 50); do echo ping | nc 127.0.0.1 8080 2>/dev/null && break; "
        "sleep 0.1; done; wait $listener; cat /tmp/got",
    )
    assert status == JobStatus.COMPLETED
    assert output == b"ping\n"


async def test_host_files_absent(manager: JobManager) -> None:
    status, _, output = await run(
        manager,
        f"test -e {PROJECT_DIR} && echo present || echo absent; "
        f"test -e {manager.state_dir} && echo present || echo absent",
    )
    assert status == JobStatus.COMPLETED
    assert output == b"absent\nabsent\n"


async def test_mounts_are_the_jobs_own(manager: JobManager) -> None:
    status, _, output = await run(manager, "awk '{print $2}' /proc/mounts")
    assert status == JobStatus.COMPLETED
    mount_points = output.decode().split()
    assert mount_points[0] == "/"
    base = {"/", "/proc", "/sys", "/tmp", "/dev", "/dev/pts", "/dev/shm"}
    devices = {f"/dev/{name}" for name in DEV_NODES}
    hidden = set(MASKED_PATHS) | set(READ_ONLY_PATHS)
    assert base | devices <= set(mount_points)
    assert set(mount_points) - base - devices <= hidden
    # The same kernel serves the host's /proc, so each hidden path it has is a mount in the job.
    present = {path for path in hidden if os.path.exists(path)}
    assert {"/proc/keys", "/proc/sys", "/sys/firmware"} <= present
    assert present <= set(mount_points)


async def test_ls_root_looks_like_a_distribution(manager: JobManager) -> None:
    status, _, output = await run(manager, "ls /")
    assert status == JobStatus.COMPLETED
    names = set(output.decode().split())
    assert {
        "bin",
        "dev",
        "etc",
        "home",
        "lib",
        "proc",
        "root",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "var",
    } <= names


async def test_writes_do_not_reach_the_image(manager: JobManager) -> None:
    status, _, _ = await run(manager, "echo x > /bin/new-file && rm /bin/ls")
    assert status == JobStatus.COMPLETED
    image_root = manager.images.rootfs("default")
    assert not os.path.exists(os.path.join(image_root, "bin", "new-file"))
    assert os.path.lexists(os.path.join(image_root, "bin", "ls"))

    status, _, output = await run(manager, "test -e /bin/new-file && echo leaked; ls /bin/ls")
    assert output == b"/bin/ls\n"


async def test_volume_read_write(manager: JobManager) -> None:
    root = Path(manager.volume_roots[0])
    (root / "data").mkdir()
    (root / "data" / "in.txt").write_bytes(b"from host\n")

    status, _, output = await run(
        manager,
        "cat /work/in.txt; echo from job > /work/out.txt",
        volumes=[f"{root / 'data'}:/work"],
    )

    assert status == JobStatus.COMPLETED
    assert output == b"from host\n"
    assert (root / "data" / "out.txt").read_bytes() == b"from job\n"


async def test_volume_below_tmp(manager: JobManager) -> None:
    root = Path(manager.volume_roots[0])
    (root / "cache").mkdir()
    (root / "cache" / "in.txt").write_bytes(b"cached\n")

    # Volumes are mounted after the job's /tmp, so one below it is not hidden by it.
    status, _, output = await run(
        manager, "cat /tmp/cache/in.txt; ls /tmp", volumes=[f"{root / 'cache'}:/tmp/cache"]
    )

    assert status == JobStatus.COMPLETED
    assert output == b"cached\ncache\n"


async def test_volume_read_only(manager: JobManager) -> None:
    root = Path(manager.volume_roots[0])
    (root / "ro").mkdir()

    status, _, output = await run(
        manager, "touch /data/x 2>/dev/null; echo $?", volumes=[f"{root / 'ro'}:/data:ro"]
    )

    assert status == JobStatus.COMPLETED
    assert output == b"1\n"
    assert not (root / "ro" / "x").exists()


async def test_volume_outside_roots_rejected(manager: JobManager, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(SpecError, match="lies outside the allowed volume roots") as caught:
        await manager.submit({"command": "true", "volumes": [f"{outside}:/data"]})
    assert caught.value.field == "volumes"
    assert manager.store.list() == []


async def test_volume_symlink_escape_rejected(manager: JobManager, tmp_path: Path) -> None:
    root = Path(manager.volume_roots[0])
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "inside").mkdir()
    (root / "inner-link").symlink_to(root / "inside")

    with pytest.raises(SpecError, match=str(outside)):
        await manager.submit({"command": "true", "volumes": [f"{root / 'link'}:/data"]})
    with pytest.raises(SpecError, match="outside"):
        await manager.submit({"command": "true", "volumes": [f"{root / 'link' / '.'}:/data"]})
    assert manager.store.list() == []

    # A link that stays inside the roots is fine.
    status, _, _ = await run(manager, "test -d /data", volumes=[f"{root / 'inner-link'}:/data"])
    assert status == JobStatus.COMPLETED


async def test_setup_error_names_step_and_errno(manager: JobManager) -> None:
    status, code, _ = await run(manager, "true", workdir="/etc/passwd")
    record = manager.list(limit=1)[0]

    assert status == JobStatus.FAILED
    assert code == 125
    assert record.reason == "setup-error"
    assert record.detail is not None
    assert record.detail.startswith("setup failed at step 'enter working directory /etc/passwd': ")
    assert "[Errno 17]" in record.detail


async def test_image_symlink_cannot_redirect_mounts(manager: JobManager, tmp_path: Path) -> None:
    image_root = manager.images.rootfs("default")
    tarball = tmp_path / "escape.tar"
    with tarfile.open(tarball, "w") as archive:
        archive.add(
            image_root,
            arcname=".",
            filter=lambda info: None if info.name.startswith("./proc") else info,
        )
        link = tarfile.TarInfo("./proc")
        link.type = tarfile.SYMTYPE
        link.linkname = "/"
        archive.addfile(link)
    manager.images.import_tarball("escape", str(tarball))

    status, code, _ = await run(manager, "true", image="escape")
    record = manager.list(limit=1)[0]

    assert status == JobStatus.FAILED
    assert code == 125
    assert record.detail is not None
    assert "setup failed at step 'create /proc'" in record.detail
    assert "/proc is a symlink or not a folder in the image" in record.detail
