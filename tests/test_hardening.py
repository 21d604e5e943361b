"""What a curious user sees when probing a job's walls from inside.

Nothing here writes a value into a kernel interface, even where the write is expected to fail.
"""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_linuxworker.sandbox import userns
from jupyter_linuxworker.sandbox.manager import JobManager
from jupyter_linuxworker.sandbox.store import JobStatus

HOST_ROOT_ID = userns.DEFAULT_HOST_START


async def run(manager: JobManager, command: str, **fields: object) -> bytes:
    job = await manager.submit({"command": command, **fields})
    record = await manager.wait(job.id, timeout=10)
    assert record.status == JobStatus.COMPLETED, (record.detail, manager.read_output(job.id))
    return manager.read_output(job.id)


async def test_root_inside_is_unprivileged_outside(manager: JobManager) -> None:
    job = await manager.submit({"command": "echo ready; exec sleep 30"})
    # PID 1 is host root while it builds the root: look once the command has started.
    async for _chunk in manager.follow(job.id):
        break
    pids = manager.cgroups.for_job(job.id).pids()
    uids = set()
    for pid in pids:
        with open(f"/proc/{pid}/status", encoding="ascii") as file:
            line = next(line for line in file if line.startswith("Uid:"))
        uids.add(int(line.split()[1]))
    await manager.stop(job.id, grace=0)

    assert uids == {HOST_ROOT_ID}


async def test_user_namespace_map(manager: JobManager) -> None:
    output = await run(manager, "id -u; id -g; cat /proc/self/uid_map | tr -s ' '")
    assert output == f"0\n0\n 0 {HOST_ROOT_ID} 65536\n".encode()


async def test_image_files_owned_by_root(manager: JobManager) -> None:
    output = await run(manager, "stat -c '%u:%g %n' /bin/busybox /etc/passwd /")
    assert output == b"0:0 /bin/busybox\n0:0 /etc/passwd\n0:0 /\n"


async def test_volume_files_belong_to_folder_owner(manager: JobManager) -> None:
    folder = Path(manager.volume_roots[0]) / "owned"
    folder.mkdir()
    os.chown(folder, 1234, 2345)
    (folder / "existing").write_text("x")
    os.chown(folder / "existing", 1234, 2345)

    output = await run(
        manager,
        "stat -c '%u:%g' /data/existing; echo new > /data/new; mkdir /data/sub",
        volumes=[f"{folder}:/data"],
    )

    assert output == b"0:0\n"
    assert (os.stat(folder / "new").st_uid, os.stat(folder / "new").st_gid) == (1234, 2345)
    assert (os.stat(folder / "sub").st_uid, os.stat(folder / "sub").st_gid) == (1234, 2345)


async def test_capabilities_reduced(manager: JobManager) -> None:
    output = await run(
        manager, "grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status"
    )
    # CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID and NET_BIND_SERVICE.
    assert output == (
        b"CapEff:\t00000000000004fb\n"
        b"CapBnd:\t00000000000004fb\n"
        b"CapAmb:\t0000000000000000\n"
        b"NoNewPrivs:\t1\n"
        b"Seccomp:\t2\n"
    )


async def test_setuid_binary_gains_nothing(manager: JobManager) -> None:
    output = await run(
        manager,
        "cp /bin/busybox /busybox-suid && chmod 4755 /busybox-suid && "
        "su -s /bin/sh nobody -c '/busybox-suid id -u'",
    )
    assert output == b"65534\n"


async def test_image_read_only_beneath_layer(manager: JobManager) -> None:
    output = await run(
        manager,
        "awk '$2 == \"/\" {print $3}' /proc/mounts; "
        "echo changed > /etc/hostname; cat /etc/hostname",
    )
    assert output == b"overlay\nchanged\n"
    image_hostname = Path(manager.images.rootfs("default")) / "etc" / "hostname"
    assert image_hostname.read_text() != "changed\n"


async def test_tmp_and_shm_nosuid_nodev(manager: JobManager) -> None:
    output = await run(
        manager, 'awk \'$2 == "/tmp" || $2 == "/dev/shm" {print $2, $3, $4}\' /proc/mounts'
    )
    lines = output.decode().splitlines()
    assert len(lines) == 2
    for line in lines:
        _point, fstype, options = line.split()
        assert fstype == "tmpfs"
        assert "nosuid" in options.split(",")
        assert "nodev" in options.split(",")


async def test_writable_layer_size_limited(manager: JobManager) -> None:
    output = await run(
        manager,
        "dd if=/dev/zero of=/big bs=1M count=64 2>/dev/null; echo $?; du -m /big | cut -f1",
        disk="16M",
    )
    code, size = output.decode().split()
    assert code == "1"
    assert int(size) <= 16


async def test_proc_paths_masked(manager: JobManager) -> None:
    output = await run(
        manager, "cat /proc/keys /proc/timer_list | wc -c; ls -A /sys/firmware | wc -l"
    )
    assert output.split() == [b"0", b"0"]


async def test_proc_paths_read_only(manager: JobManager) -> None:
    present = [p for p in ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys") if os.path.exists(p)]
    output = await run(manager, "awk '{print $2, $4}' /proc/mounts")
    options = dict(line.split() for line in output.decode().splitlines())

    for path in present:
        assert options[path].split(",")[0] == "ro", path


async def test_dev_holds_only_safe_devices(manager: JobManager) -> None:
    output = await run(manager, "ls -A /dev")
    assert output.split() == [
        b"fd",
        b"full",
        b"null",
        b"ptmx",
        b"pts",
        b"random",
        b"shm",
        b"stderr",
        b"stdin",
        b"stdout",
        b"tty",
        b"urandom",
        b"zero",
    ]


async def test_mount_and_unshare_denied(manager: JobManager) -> None:
    output = await run(
        manager,
        "mount -t tmpfs none /mnt 2>&1; unshare -m true 2>&1; nsenter -t $$ -n true 2>&1; "
        "swapon /dev/null 2>&1; true",
    )
    text = output.decode()
    assert "mount: permission denied (are you root?)" in text
    assert "unshare: unshare(0x20000): Operation not permitted" in text
    assert "nsenter: setns(): can't reassociate to namespace 'net': Operation not permitted" in text
    assert "swapon: /dev/null: Operation not permitted" in text


async def test_no_descriptor_leaks(manager: JobManager) -> None:
    # The trailing `true` keeps the shell from replacing itself with ls, so $$ is the shell.
    output = await run(manager, "ls /proc/$$/fd; true")
    assert output == b"0\n1\n2\n"


async def test_working_directory_inside_root(manager: JobManager) -> None:
    output = await run(
        manager, "readlink /proc/self/cwd; cd ..; cd ..; pwd -P", workdir="/srv/work"
    )
    assert output == b"/srv/work\n/\n"


async def test_job_cannot_see_or_signal_host(manager: JobManager) -> None:
    output = await run(manager, f"kill -0 {os.getpid()} 2>&1; echo $?; ls /proc | grep -c '^[0-9]'")
    lines = output.decode().splitlines()
    assert lines[-2] == "1"
    assert int(lines[-1]) <= 4
