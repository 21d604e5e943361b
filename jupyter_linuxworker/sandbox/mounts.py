"""The job's root filesystem, built by PID 1 in the job's mount namespace while still host root.

The image is attached through an idmapped mount, so its files (owned by host root) appear owned
by the job's root. A tmpfs writable layer goes on top with overlayfs. Volumes are idmapped so
that what the job's root writes belongs on the host to the owner of the volume's folder. All of
this lives in the job's mount namespace and disappears with it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from . import syscalls

DEV_NODES: Final = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS: Final = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
DEV_TMPFS_SIZE: Final = "64k"
SHM_TMPFS_SIZE: Final = "64m"
DEVPTS_OPTIONS: Final = "newinstance,ptmxmode=0666,mode=0620"
# The paths the OCI runtimes hide from containers: kernel memory, timers that leak host
# activity, and hardware folders. Files are covered with /dev/null, folders with an empty tmpfs.
MASKED_PATHS: Final = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
READ_ONLY_PATHS: Final = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_NO_EXEC: Final = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
_NO_DEV: Final = syscalls.MS_NOSUID | syscalls.MS_NODEV


class SetupError(Exception):
    """A container setup step failed; ``step`` names it and ``errno`` is the system error."""

    def __init__(self, step: str, error: OSError) -> None:
        self.step = step
        self.errno = error.errno or 0
        super().__init__(str(error))


def step(name: str, action: Callable[..., object], *args: object) -> None:
    """Run one setup step; turn its OSError into a SetupError that names the step."""
    try:
        action(*args)
    except OSError as error:
        raise SetupError(name, error) from None


def make_mounts_private() -> None:
    """Stop mount events between the host and this mount namespace, both ways."""
    private = syscalls.MS_REC | syscalls.MS_PRIVATE
    step("make mounts private", syscalls.mount, "none", "/", None, private)


@dataclass(frozen=True)
class RootSpec:
    """The inputs of a job's root before its volumes, which most jobs share."""

    staging: str
    image_root: str
    disk: int
    owner: int

    @classmethod
    def from_launch(cls, launch: dict[str, Any]) -> RootSpec:
        """Return the root spec of a job's launch data."""
        return cls(
            launch["staging"],
            launch["image_root"],
            int(launch["disk"]),
            int(launch["id_map"]["host_start"]),
        )


def build_root(spec: RootSpec, image_userns: int) -> str:
    """Build a root below ``spec.staging`` from the image, without volumes; return its path.

    The root is a writable tmpfs layer over the idmapped image, with /proc, /sys, /tmp and
    /dev mounted and the kernel's sensitive files masked. Call :func:`make_mounts_private`
    first, so that none of these mounts reaches the host.
    """
    staging = spec.staging
    root = os.path.join(staging, "root")
    lower = os.path.join(staging, "lower")
    upper = os.path.join(staging, "upper")
    work = os.path.join(staging, "work")
    owner = spec.owner

    # The writable layer lives in a tmpfs of this mount namespace, so it dies with the job.
    layer_options = f"mode=755,size={spec.disk}"
    step(
        f"mount writable layer on {staging}",
        syscalls.mount,
        "tmpfs",
        staging,
        "tmpfs",
        0,
        layer_options,
    )
    for folder in (root, lower, upper, work):
        step(f"create {folder}", os.mkdir, folder, 0o755)
    step(f"give {upper} to the job's root", os.chown, upper, owner, owner)

    image = spec.image_root
    step(f"mount image {image}", _attach_idmapped, image, image_userns, lower, 0)
    # Relative layer paths keep the host's folder names out of the job's /proc/mounts.
    step(f"enter {staging}", os.chdir, staging)
    overlay_options = "lowerdir=lower,upperdir=upper,workdir=work"
    step(
        "mount the writable layer over the image",
        syscalls.mount,
        "overlay",
        root,
        "overlay",
        0,
        overlay_options,
    )

    proc = make_dir_beneath(root, "/proc")
    step("mount /proc", syscalls.mount, "proc", proc, "proc", _NO_EXEC)
    sys_dir = make_dir_beneath(root, "/sys")
    step("mount /sys", syscalls.mount, "sysfs", sys_dir, "sysfs", _NO_EXEC | syscalls.MS_RDONLY)
    _mask_paths(root)

    tmp = make_dir_beneath(root, "/tmp")
    tmp_options = f"mode=1777,uid={owner},gid={owner}"
    step("mount /tmp", syscalls.mount, "tmpfs", tmp, "tmpfs", _NO_DEV, tmp_options)
    _setup_dev(root, owner)
    return root


def discard_root(spec: RootSpec) -> None:
    """Unmount a root built by :func:`build_root`, with everything below it."""
    step(f"unmount {spec.staging}", syscalls.umount2, spec.staging, syscalls.MNT_DETACH)


def add_volumes(root: str, volumes: list[dict[str, Any]], volume_userns: list[int]) -> None:
    """Mount each volume at its destination in ``root``, idmapped to its owner's namespace."""
    for volume, userns in zip(volumes, volume_userns, strict=True):
        step(
            f"mount volume {volume['source']} on {volume['dest']}",
            _mount_volume,
            root,
            volume,
            userns,
        )


def _setup_dev(root: str, owner: int) -> None:
    """Give the job a /dev of its own with only the harmless devices, bound from the host's."""
    dev = make_dir_beneath(root, "/dev")
    no_exec = syscalls.MS_NOSUID | syscalls.MS_NOEXEC
    dev_options = f"mode=755,size={DEV_TMPFS_SIZE},uid={owner},gid={owner}"
    step("mount /dev", syscalls.mount, "tmpfs", dev, "tmpfs", no_exec, dev_options)

    for name in DEV_NODES:
        node = os.path.join(dev, name)
        step(f"create /dev/{name}", _create_file, node)
        step(f"bind /dev/{name}", syscalls.mount, f"/dev/{name}", node, None, syscalls.MS_BIND)
    for name, target in DEV_LINKS.items():
        step(f"link /dev/{name}", os.symlink, target, os.path.join(dev, name))

    pts = os.path.join(dev, "pts")
    step("create /dev/pts", os.mkdir, pts, 0o755)
    step("mount /dev/pts", syscalls.mount, "devpts", pts, "devpts", no_exec, DEVPTS_OPTIONS)
    shm = os.path.join(dev, "shm")
    step("create /dev/shm", os.mkdir, shm, 0o1777)
    shm_options = f"mode=1777,size={SHM_TMPFS_SIZE},uid={owner},gid={owner}"
    step("mount /dev/shm", syscalls.mount, "shm", shm, "tmpfs", _NO_DEV, shm_options)


def _mask_paths(root: str) -> None:
    for path in MASKED_PATHS:
        target = root + path
        if os.path.isdir(target):
            flags = _NO_EXEC | syscalls.MS_RDONLY
            step(f"mask {path}", syscalls.mount, "tmpfs", target, "tmpfs", flags, "size=0")
        elif os.path.exists(target):
            step(f"mask {path}", syscalls.mount, "/dev/null", target, None, syscalls.MS_BIND)
    for path in READ_ONLY_PATHS:
        target = root + path
        if os.path.exists(target):
            step(
                f"bind {path}",
                syscalls.mount,
                target,
                target,
                None,
                syscalls.MS_BIND | syscalls.MS_REC,
            )
            flags = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | _NO_EXEC
            step(f"make {path} read-only", syscalls.mount, "none", target, None, flags)


def _create_file(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))


def _attach_idmapped(source: str, userns_fd: int, target: str, attributes: int) -> None:
    tree = syscalls.open_tree_clone(source)
    try:
        syscalls.set_idmap(tree, userns_fd, source, attributes)
        syscalls.move_mount(tree, target)
    finally:
        os.close(tree)


def make_dir_beneath(root: str, path: str) -> str:
    """Create ``path`` inside ``root`` without following any symlink; return the host path.

    An image may contain a link such as ``/mnt -> /``. Resolving it on the host would mount
    over a host folder, so each component is opened with ``O_NOFOLLOW`` relative to its parent.
    """
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in path.split("/") if p]:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as error:
                raise SetupError(f"create {path}", error) from None
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                next_fd = os.open(part, flags, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    message = f"{path} is a symlink or not a folder in the image"
                    error = OSError(error.errno, message)
                raise SetupError(f"create {path}", error) from None
            os.close(fd)
            fd = next_fd
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _mount_volume(root: str, volume: dict[str, Any], userns_fd: int) -> None:
    # Bind from an O_PATH descriptor so a symlink swapped in after the manager's checks
    # cannot redirect the mount: the descriptor's real path is checked against the roots.
    source_fd = os.open(volume["source"], os.O_PATH | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{source_fd}")
        roots: list[str] = volume["roots"]
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
            message = f"{volume['source']} resolves to {real}, outside the volume roots"
            raise OSError(errno.EACCES, message)
        target = make_dir_beneath(root, volume["dest"])
        attributes = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
        if volume["read_only"]:
            attributes |= syscalls.MOUNT_ATTR_RDONLY
        _attach_idmapped(f"/proc/self/fd/{source_fd}", userns_fd, target, attributes)
    finally:
        os.close(source_fd)


def pivot_root(root: str) -> None:
    """Make ``root`` the root of this mount namespace and detach the host's."""
    # pivot_root(".", ".") stacks the old root under the new one; detaching the old one leaves
    # only the job's root.
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")
