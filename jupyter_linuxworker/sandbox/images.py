"""Root filesystem images that jobs run in, one folder per image.

Layout of the images folder::

    <images_dir>/<name>/rootfs/     root filesystem, which jobs mount as an overlay lower layer
    <images_dir>/<name>/image.json  name, created_at (epoch seconds), source, size (bytes), files
    <images_dir>/.tmp-*             images being built, replaced or deleted, never listed

Every image is built complete in a ``.tmp-`` folder and then renamed into place, so a reader
never sees a half-built image. Builds, imports and deletes hold an exclusive ``flock`` on the
images folder, so they run one at a time and may remove ``.tmp-`` folders left by a crash.
Reads take no lock.

Run ``python -m jupyter_linuxworker.sandbox.images --help`` to build, import, list or delete images.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import copy
import fcntl
import json
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Final, Literal

from .spec import DEFAULT_PATH, IMAGE_NAME_PATTERN

log = logging.getLogger(__name__)

DEFAULT_IMAGE_NAME: Final = "default"
BUSYBOX_PATH: Final = "/bin/busybox"
DEFAULT_IMAGES_DIR: Final = "/var/lib/jupyter-linuxworker/images"
# The name to run this module with: __name__ is "__main__" under python -m.
MODULE_NAME: Final = "jupyter_linuxworker.sandbox.images"

ROOTFS_DIR: Final = "rootfs"
METADATA_FILE: Final = "image.json"
# Image names cannot start with '.', so these folders never collide with an image.
TEMP_PREFIX: Final = ".tmp-"
IMAGES_DIR_MODE: Final = 0o755
IMAGE_DIR_MODE: Final = 0o755
ROOT_DIR_MODE: Final = 0o755
BUSYBOX_TIMEOUT_SECONDS: Final = 30.0
DEFAULT_HOSTNAME: Final = "linuxworker"

# Folders of the default image and their modes, parents before children.
DEFAULT_IMAGE_DIRS: Final = (
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("usr/local", 0o755),
    ("usr/local/bin", 0o755),
    ("usr/local/sbin", 0o755),
    ("lib", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("home", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/log", 0o755),
    ("run", 0o755),
    ("mnt", 0o755),
)
CONFIG_FILE_MODE: Final = 0o644
BUSYBOX_MODE: Final = 0o755

PASSWD_TEXT: Final = (
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP_TEXT: Final = "root:x:0:\nnogroup:x:65534:\n"
HOSTS_TEXT: Final = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
RESOLV_CONF_TEXT: Final = (
    '# No name servers: jobs run without a network by default (network mode "none").\n'
)
SHELLS_TEXT: Final = "/bin/sh\n/bin/ash\n"
PROFILE_TEXT: Final = (
    f'export PATH="{DEFAULT_PATH}"\n'
    # ash expands \u, \h and \w, and \$ to '#' for root and '$' for other users.
    "export PS1='\\u@\\h:\\w\\$ '\n"
)

# ELF constants from the System V ABI (elf(5)).
_ELF_MAGIC: Final = b"\x7fELF"
_ELF_CLASS_32: Final = 1
_ELF_CLASS_64: Final = 2
_ELF_DATA_LITTLE: Final = 1
_ELF_DATA_BIG: Final = 2
_ELF_TYPE_EXECUTABLE: Final = 2
_ELF_TYPE_SHARED: Final = 3  # also static PIE executables
_ELF_PT_INTERP: Final = 3
_ELF_PN_XNUM: Final = 0xFFFF
_ELF_IDENT_SIZE: Final = 16
# After e_ident: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
# e_phentsize, e_phnum. The address fields are 4 bytes in ELF32 and 8 bytes in ELF64.
_ELF_HEADER_FORMATS: Final = {_ELF_CLASS_32: "HHIIIIIHHH", _ELF_CLASS_64: "HHIQQQIHHH"}

_BUSYBOX_VERSION_PATTERN: Final = re.compile(r"BusyBox v([0-9][0-9A-Za-z.+~:-]*)")
_INSTALL_BUSYBOX_HINT: Final = "install Debian's busybox-static (apt-get install busybox-static)"
_TARBALL_KINDS: Final = "a tar archive, plain or compressed with gzip, xz or bzip2"

# Errors that reading a damaged or truncated tarball raises: gzip and bz2 raise OSError.
_TARBALL_READ_ERRORS: Final = (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError)
# Errors that writing one entry raises: ValueError and OverflowError come from paths with
# NUL bytes and from uid, gid or mtime values that the OS cannot store.
_EXTRACT_ERRORS: Final = (*_TARBALL_READ_ERRORS, ValueError, OverflowError)

ExistingImagePolicy = Literal["raise", "replace", "keep"]


class ImageError(Exception):
    """An image that cannot be built, imported, read or deleted. The message names the fix."""


class ImageNotFound(ImageError, KeyError):
    """A request for an image that does not exist."""

    def __init__(self, name: str, available: list[str], images_dir: str) -> None:
        self.name = name
        self.available = available
        if available:
            message = f"image '{name}' not found; available: {', '.join(available)}"
        else:
            message = (
                f"image '{name}' not found; no images in {images_dir}. Build the default "
                f"with: python -m {MODULE_NAME} --images-dir {images_dir} build-default"
            )
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0])


@dataclass(frozen=True)
class ImageInfo:
    """An installed image: ``path`` is its rootfs folder, ``size`` is in bytes.

    ``size`` counts the bytes of regular files, each hard-linked file once. ``files`` counts
    every entry that is not a folder (regular files, symbolic links, FIFOs).
    """

    name: str
    path: str
    created_at: float
    source: str
    size: int
    files: int

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


class ImageStore:
    """The images in one folder: list, look up, build, import and delete them."""

    def __init__(self, images_dir: str) -> None:
        # Overlay mount options need absolute lower-layer paths.
        self.images_dir = os.path.abspath(images_dir)

    # -- reading ------------------------------------------------------------------------------

    def list(self) -> list[ImageInfo]:
        """Return the complete images sorted by name, skipping temporary and broken folders."""
        images = []
        for name in self._image_names():
            try:
                images.append(self._read_info(name))
            except ImageError as error:
                log.warning("skipping image folder %s: %s", self._image_dir(name), error)
        return images

    def get(self, name: str) -> ImageInfo:
        """Return image ``name``, or raise ImageNotFound if it does not exist."""
        _check_name(name)
        if not _is_real_folder(self._image_dir(name)):
            raise ImageNotFound(name, [info.name for info in self.list()], self.images_dir)
        return self._read_info(name)

    def rootfs(self, name: str) -> str:
        """Return the rootfs folder of image ``name``, or raise ImageNotFound if it is missing."""
        return self.get(name).path

    # -- building -----------------------------------------------------------------------------

    def build_default(
        self, name: str = DEFAULT_IMAGE_NAME, busybox: str = BUSYBOX_PATH, replace: bool = False
    ) -> ImageInfo:
        """Build a small busybox distribution as image ``name`` from a static ``busybox``."""
        return self._build_busybox(name, busybox, "replace" if replace else "raise")

    def ensure_default(
        self, name: str = DEFAULT_IMAGE_NAME, busybox: str = BUSYBOX_PATH
    ) -> ImageInfo:
        """Return image ``name``, building it from ``busybox`` first if it does not exist."""
        _check_name(name)
        with contextlib.suppress(ImageNotFound):
            return self.get(name)
        return self._build_busybox(name, busybox, "keep")

    def import_tarball(self, name: str, tarball: str, replace: bool = False) -> ImageInfo:
        """Import a root filesystem tarball as image ``name`` after checking every entry.

        Absolute paths, ``..`` components, device nodes, links that leave the root and paths
        through an earlier symbolic link raise ImageError. FIFOs are accepted because they
        give a job no access to anything. Modes and numeric owners are kept.
        """
        _check_name(name)
        source = os.path.abspath(tarball)
        policy: ExistingImagePolicy = "replace" if replace else "raise"
        with _open_tarball(source) as archive:

            def fill(rootfs: str) -> None:
                _extract(archive, source, rootfs)

            return self._build(name, source, policy, fill)

    def delete(self, name: str) -> None:
        """Delete image ``name``, or raise ImageNotFound if it does not exist.

        NOTE: overlayfs does not support changes to a lower layer that is mounted, so
        delete or replace an image only while no job runs in it. This store cannot see
        the mounts of other mount namespaces to check that.
        """
        _check_name(name)
        with self._exclusive_lock():
            folder = self._image_dir(name)
            if not _is_real_folder(folder):
                raise ImageNotFound(name, [info.name for info in self.list()], self.images_dir)

            # Renaming first makes the image disappear at once, even if removing it fails.
            doomed = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}delete-{name}-", dir=self.images_dir)
            try:
                os.rename(folder, doomed)
                shutil.rmtree(doomed)
            except OSError as error:
                raise ImageError(
                    f"failed to delete image '{name}' in {self.images_dir}: {error}. "
                    "Check that the images folder is writable."
                ) from error
        log.info("deleted image %s from %s", name, self.images_dir)

    # -- internals ----------------------------------------------------------------------------

    def _image_dir(self, name: str) -> str:
        return os.path.join(self.images_dir, name)

    def _image_names(self) -> builtins.list[str]:
        try:
            entries = list(os.scandir(self.images_dir))
        except FileNotFoundError:
            return []
        names = [
            entry.name
            for entry in entries
            if IMAGE_NAME_PATTERN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
        return sorted(names)

    def _read_info(self, name: str) -> ImageInfo:
        folder = self._image_dir(name)
        metadata_path = os.path.join(folder, METADATA_FILE)
        rootfs = os.path.join(folder, ROOTFS_DIR)
        fix = f"delete it, or rebuild image '{name}' with replace=True (--replace)"
        try:
            with open(metadata_path, "rb") as file:
                metadata = json.load(file)
        except FileNotFoundError:
            raise ImageError(
                f"{folder} is not a complete image: {METADATA_FILE} is missing. {fix}"
            ) from None
        except (OSError, ValueError) as error:
            raise ImageError(f"cannot read {metadata_path}: {error}. {fix}") from error

        if not os.path.isdir(rootfs):
            raise ImageError(f"{folder} is not a complete image: {ROOTFS_DIR}/ is missing. {fix}")
        try:
            return ImageInfo(
                name=name,
                path=rootfs,
                created_at=float(metadata["created_at"]),
                source=str(metadata["source"]),
                size=int(metadata["size"]),
                files=int(metadata["files"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ImageError(
                f"invalid {metadata_path}: bad or missing field {error}. {fix}"
            ) from None

    @contextlib.contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        """Hold an exclusive flock on the images folder and remove stale temporary folders."""
        try:
            os.makedirs(self.images_dir, mode=IMAGES_DIR_MODE, exist_ok=True)
            fd = os.open(self.images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise ImageError(
                f"cannot open images folder {self.images_dir}: {error}. "
                "Create it or choose another folder with --images-dir."
            ) from error
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another image build or delete in %s", self.images_dir)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_stale_folders()
            yield
        finally:
            os.close(fd)

    def _remove_stale_folders(self) -> None:
        # Every writer holds the lock while its temporary folder exists, so a temporary
        # folder seen under the lock was left by a process that died.
        for entry in os.scandir(self.images_dir):
            if entry.name.startswith(TEMP_PREFIX) and entry.is_dir(follow_symlinks=False):
                log.warning("removing %s, left by an interrupted image build or delete", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)

    def _build_busybox(self, name: str, busybox: str, policy: ExistingImagePolicy) -> ImageInfo:
        _check_name(name)
        check_static_busybox(busybox)
        applets = _busybox_applets(busybox)
        version = _busybox_version(busybox)
        source = f"busybox-static {os.path.abspath(busybox)}"

        def fill(rootfs: str) -> None:
            _populate_busybox_root(rootfs, busybox, applets, version)

        return self._build(name, source, policy, fill)

    def _build(
        self, name: str, source: str, policy: ExistingImagePolicy, fill: Callable[[str], None]
    ) -> ImageInfo:
        """Fill a new rootfs with ``fill`` in a temporary folder, then move it into place."""
        with self._exclusive_lock():
            final = self._image_dir(name)
            if os.path.lexists(final):
                if policy == "keep":
                    return self.get(name)
                if policy == "raise":
                    raise ImageError(
                        f"{final} already exists: pass replace=True (--replace on the command "
                        f"line) to replace image '{name}', or choose another name"
                    )

            staging = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}build-{name}-", dir=self.images_dir)
            try:
                rootfs = os.path.join(staging, ROOTFS_DIR)
                os.mkdir(rootfs)
                os.chmod(rootfs, ROOT_DIR_MODE)
                fill(rootfs)

                size, files = _measure_tree(rootfs)
                info = ImageInfo(
                    name=name,
                    path=os.path.join(final, ROOTFS_DIR),
                    created_at=time.time(),
                    source=source,
                    size=size,
                    files=files,
                )
                metadata = info.to_dict()
                del metadata["path"]
                with open(os.path.join(staging, METADATA_FILE), "w", encoding="utf-8") as file:
                    json.dump(metadata, file, indent=2)
                os.chmod(staging, IMAGE_DIR_MODE)

                # Flush the files before the rename publishes them, so that a power loss
                # cannot leave a listed image with empty or truncated files.
                os.sync()
                self._install(staging, final)
            except OSError as error:
                raise ImageError(
                    f"failed to build image '{name}' in {self.images_dir}: {error}. "
                    "Check the free space and that the images folder is writable."
                ) from error
            finally:
                if os.path.lexists(staging):
                    shutil.rmtree(staging, ignore_errors=True)

        log.info("built image %s from %s: %d files, %d bytes", name, source, info.files, info.size)
        return info

    def _install(self, staging: str, final: str) -> None:
        """Rename ``staging`` to ``final``, replacing and removing an existing image there."""
        if not os.path.lexists(final):
            os.rename(staging, final)
            return

        # rename(2) can replace only an empty folder, so the old image moves aside first.
        # Between the two renames, which follow each other at once, get() finds no image.
        old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-", dir=self.images_dir)
        os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError:
            os.rename(old, final)
            raise
        log.info("replaced image folder %s", final)
        try:
            shutil.rmtree(old)
        except OSError as error:
            # The new image is in place. The next build or delete removes the rest.
            log.warning("failed to remove the replaced image %s: %s", old, error)


def _is_real_folder(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _check_name(name: str) -> None:
    # fullmatch, because the pattern's "$" also matches before a final newline.
    if not isinstance(name, str) or not IMAGE_NAME_PATTERN.fullmatch(name):
        raise ImageError(
            f"invalid image name {name!r}: use 1 to 63 characters from a-z, 0-9, '.', '_' "
            f"and '-', starting with a letter or digit (pattern {IMAGE_NAME_PATTERN.pattern})"
        )


def _measure_tree(root: str) -> tuple[int, int]:
    """Return the bytes of regular files (hard links once) and the count of non-folders."""
    size = 0
    files = 0
    seen_inodes: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue

                files += 1
                info = entry.stat(follow_symlinks=False)
                inode = (info.st_dev, info.st_ino)
                if stat.S_ISREG(info.st_mode) and inode not in seen_inodes:
                    seen_inodes.add(inode)
                    size += info.st_size
    return size, files


# -- the default busybox image ----------------------------------------------------------------


def check_static_busybox(path: str) -> None:
    """Raise ImageError unless ``path`` is a statically linked ELF executable.

    A program header of type PT_INTERP names the dynamic loader, which the image lacks.
    """
    try:
        with open(path, "rb") as file:
            interpreter = _elf_has_interpreter(file, path)
    except FileNotFoundError:
        raise ImageError(f"busybox {path} not found: {_INSTALL_BUSYBOX_HINT}") from None
    except OSError as error:
        raise ImageError(f"cannot read busybox {path}: {error}. {_INSTALL_BUSYBOX_HINT}") from error
    if interpreter:
        raise ImageError(
            f"busybox {path} is dynamically linked, but the image has no shared libraries: "
            f"{_INSTALL_BUSYBOX_HINT}, or pass the path of a static busybox"
        )


def _elf_has_interpreter(file: BinaryIO, path: str) -> bool:
    """Return whether the ELF file has a PT_INTERP program header. Raise ImageError if not ELF."""
    not_executable = ImageError(f"{path} is not an ELF executable: {_INSTALL_BUSYBOX_HINT}")
    ident = file.read(_ELF_IDENT_SIZE)
    if len(ident) < _ELF_IDENT_SIZE or not ident.startswith(_ELF_MAGIC):
        raise not_executable
    elf_class = ident[4]
    byte_order = {_ELF_DATA_LITTLE: "<", _ELF_DATA_BIG: ">"}.get(ident[5])
    header_format = _ELF_HEADER_FORMATS.get(elf_class)
    if byte_order is None or header_format is None:
        raise not_executable

    header_struct = struct.Struct(byte_order + header_format)
    header = file.read(header_struct.size)
    if len(header) < header_struct.size:
        raise not_executable
    elf_type, _machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = (
        header_struct.unpack(header)
    )
    if elf_type not in (_ELF_TYPE_EXECUTABLE, _ELF_TYPE_SHARED):
        raise not_executable
    if phnum == _ELF_PN_XNUM:
        # The real count would be in section header 0. No busybox build has that many.
        raise ImageError(f"{path} has more than 65534 program headers: {_INSTALL_BUSYBOX_HINT}")

    # p_type is the first 4-byte field of every program header, in ELF32 and ELF64 alike.
    type_struct = struct.Struct(byte_order + "I")
    for index in range(phnum):
        file.seek(phoff + index * phentsize)
        field = file.read(type_struct.size)
        if len(field) < type_struct.size:
            raise not_executable
        if type_struct.unpack(field)[0] == _ELF_PT_INTERP:
            return True
    return False


def _run_busybox(busybox: str, argument: str) -> str:
    try:
        completed = subprocess.run(
            [busybox, argument],
            capture_output=True,
            text=True,
            timeout=BUSYBOX_TIMEOUT_SECONDS,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise ImageError(
            f"'{busybox} {argument}' failed: {error}. Check that {busybox} is a busybox "
            f"for this machine's architecture, or {_INSTALL_BUSYBOX_HINT}"
        ) from error
    return completed.stdout


def _busybox_applets(busybox: str) -> list[str]:
    """Return the applet paths that ``busybox --list-full`` prints, such as ``usr/bin/awk``."""
    applets = []
    for line in _run_busybox(busybox, "--list-full").splitlines():
        path = line.strip()
        parts = path.split("/")
        if not path or "" in parts or "." in parts or ".." in parts:
            raise ImageError(f"'{busybox} --list-full' printed an invalid applet path {path!r}")
        # A top-level applet (linuxrc, the init of an initrd) would clutter /, so skip it.
        if len(parts) == 1 or path == "bin/busybox":
            continue
        applets.append(path)

    if "bin/sh" not in applets:
        raise ImageError(
            f"{busybox} has no sh applet, so /bin/sh would be missing: {_INSTALL_BUSYBOX_HINT}"
        )
    return applets


def _busybox_version(busybox: str) -> str | None:
    """Return the version in the first line of ``busybox --help``, such as ``1.35.0``."""
    # The version only goes into /etc/os-release, so an image without it is still usable.
    try:
        output = _run_busybox(busybox, "--help")
    except ImageError as error:
        log.warning("building without the busybox version in os-release: %s", error)
        return None
    match = _BUSYBOX_VERSION_PATTERN.search(output)
    return match.group(1) if match else None


def _populate_busybox_root(
    rootfs: str, busybox: str, applets: list[str], version: str | None
) -> None:
    """Create the folders, busybox with its applet links and /etc in ``rootfs``, owned by root."""
    for folder, mode in DEFAULT_IMAGE_DIRS:
        path = os.path.join(rootfs, folder)
        os.mkdir(path)
        # mkdir applies the umask and drops the sticky bit, so set the mode afterwards.
        os.chmod(path, mode)

    shutil.copyfile(busybox, os.path.join(rootfs, "bin", "busybox"))
    os.chmod(os.path.join(rootfs, "bin", "busybox"), BUSYBOX_MODE)
    for applet in applets:
        link = os.path.join(rootfs, applet)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            # Relative targets resolve the same inside the job and when browsing from the host.
            os.symlink(os.path.relpath("bin/busybox", os.path.dirname(applet)), link)

    pretty_name = "jupyter-linuxworker busybox image"
    os_release = f'NAME="{pretty_name}"\nID=jupyter-linuxworker-busybox\n'
    if version:
        pretty_name += f" (BusyBox v{version})"
        os_release += f'VERSION_ID="{version}"\n'
    os_release += f'PRETTY_NAME="{pretty_name}"\n'
    config_files = {
        "passwd": PASSWD_TEXT,
        "group": GROUP_TEXT,
        "hosts": HOSTS_TEXT,
        "resolv.conf": RESOLV_CONF_TEXT,
        "hostname": f"{DEFAULT_HOSTNAME}\n",
        "os-release": os_release,
        "profile": PROFILE_TEXT,
        "shells": SHELLS_TEXT,
    }
    for file_name, text in config_files.items():
        path = os.path.join(rootfs, "etc", file_name)
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(path, CONFIG_FILE_MODE)

    # NOTE: without root the files keep the builder's uid and gid.
    if os.geteuid() == 0:
        _chown_tree(rootfs, 0, 0)


def _chown_tree(root: str, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for folder, subfolders, files in os.walk(root):
        for entry in subfolders + files:
            os.lchown(os.path.join(folder, entry), uid, gid)


# -- tarball import -----------------------------------------------------------------------------


@contextlib.contextmanager
def _open_tarball(path: str) -> Iterator[tarfile.TarFile]:
    try:
        archive = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the with block below
    except FileNotFoundError:
        raise ImageError(f"tarball {path} not found: check the path") from None
    except OSError as error:
        raise ImageError(
            f"cannot read tarball {path}: {error}. Check that it is a readable file."
        ) from error
    except _TARBALL_READ_ERRORS as error:
        raise _invalid_tarball(path, error) from error
    with archive:
        # Raise ExtractError too (such as a failed chown), instead of only logging it.
        archive.errorlevel = 2
        yield archive


def _extract(archive: tarfile.TarFile, tarball: str, rootfs: str) -> None:
    """Check and extract each entry of ``archive`` in order into ``rootfs``.

    Each entry is checked against the files already extracted, so that no write follows a
    symbolic link. Folder modes, owners and times are set at the end, as
    ``tarfile.extractall`` does, so a read-only folder can still receive its entries.
    """
    folders: dict[str, tarfile.TarInfo] = {}
    members = iter(archive)
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except _TARBALL_READ_ERRORS as error:
            raise _invalid_tarball(tarball, error) from error

        parts = _check_entry_path(member, tarball)
        if not parts:
            # The entry for the root itself, named "." or "./".
            if not member.isdir():
                reason = "the root entry is not a folder"
                raise _entry_error(member, tarball, reason, "Make '.' a folder.")
            folders[rootfs] = member
            continue

        target = os.path.join(rootfs, *parts)
        _check_entry_type(member, tarball)
        _check_parents(member, tarball, rootfs, parts)
        entry = copy.copy(member)
        entry.name = "/".join(parts)
        if member.issym():
            _check_symlink_target(member, tarball, parts)
        elif member.islnk():
            entry.linkname = _check_hardlink_target(member, tarball, rootfs)
        _clear_target(member, tarball, target)

        # NOTE: the filter argument needs Python 3.11.4 or later. "fully_trusted" keeps
        # modes, including setuid and sticky bits, because the checks above already ran.
        # A hard link shares its target's inode, so it keeps the target's attributes
        # instead of applying those of its own header.
        try:
            archive.extract(
                entry,
                rootfs,
                set_attrs=not (entry.isdir() or entry.islnk()),
                numeric_owner=True,
                filter="fully_trusted",
            )
        except _EXTRACT_ERRORS as error:
            raise ImageError(
                f"failed to extract entry {member.name!r} from tarball {tarball}: {error}"
            ) from error
        if entry.isdir():
            folders[target] = entry

    # Children before parents, so that setting a parent's time is the last change to it.
    for path in sorted(folders, reverse=True):
        _set_folder_attributes(path, folders[path])


def _invalid_tarball(path: str, error: BaseException) -> ImageError:
    return ImageError(f"invalid tarball {path}: {error}. Expected {_TARBALL_KINDS}.")


def _entry_error(member: tarfile.TarInfo, tarball: str, reason: str, fix: str) -> ImageError:
    return ImageError(f"invalid entry {member.name!r} in tarball {tarball}: {reason}. {fix}")


def _check_entry_path(member: tarfile.TarInfo, tarball: str) -> tuple[str, ...]:
    """Return the components of the entry's path, or raise ImageError if it leaves the root."""
    relative_fix = "Create the tarball with relative paths, for example: tar -C ROOT -czf FILE ."
    if "\0" in member.name:
        raise _entry_error(member, tarball, "the path contains a NUL byte", relative_fix)
    if member.name.startswith("/"):
        raise _entry_error(member, tarball, "the path is absolute", relative_fix)
    parts = _path_parts(member.name)
    if ".." in parts:
        raise _entry_error(member, tarball, "the path contains '..'", relative_fix)
    return parts


def _path_parts(path: str) -> tuple[str, ...]:
    """Split a tar path into components, dropping the empty and '.' ones."""
    return tuple(part for part in path.split("/") if part not in ("", "."))


def _check_entry_type(member: tarfile.TarInfo, tarball: str) -> None:
    if member.ischr() or member.isblk():
        raise _entry_error(
            member,
            tarball,
            "device nodes are not allowed in images",
            "Remove the device nodes from the tarball. Jobs get their own /dev when they start.",
        )


def _check_parents(
    member: tarfile.TarInfo, tarball: str, rootfs: str, parts: tuple[str, ...]
) -> None:
    """Raise ImageError when a parent of the entry is an earlier symbolic link or a file."""
    for depth in range(1, len(parts)):
        parent = os.path.join(rootfs, *parts[:depth])
        try:
            mode = os.lstat(parent).st_mode
        except FileNotFoundError:
            # tarfile creates the missing parents, and no deeper one can exist.
            return
        parent_path = "/".join(parts[:depth])
        fix = f"Remove the entry, or make '{parent_path}' a folder."
        if stat.S_ISLNK(mode):
            reason = f"its parent '{parent_path}' is a symbolic link from an earlier entry"
            raise _entry_error(member, tarball, reason, fix)
        if not stat.S_ISDIR(mode):
            reason = f"its parent '{parent_path}' is not a folder"
            raise _entry_error(member, tarball, reason, fix)


def _check_symlink_target(member: tarfile.TarInfo, tarball: str, parts: tuple[str, ...]) -> None:
    """Raise ImageError when a relative link target climbs above the image root.

    An absolute target resolves inside the job's root, so it cannot leave the image. The
    check is on the text of the target because extraction never follows a link.
    """
    target = member.linkname
    if not target:
        reason = "the symbolic link target is empty"
        raise _entry_error(member, tarball, reason, "Give the link a target.")
    if target.startswith("/"):
        return

    depth = len(parts) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
        elif part not in ("", "."):
            depth += 1
        if depth < 0:
            raise _entry_error(
                member,
                tarball,
                f"the symbolic link target {target!r} leads outside the image root",
                "Point the link inside the root, for example with an absolute target.",
            )


def _check_hardlink_target(member: tarfile.TarInfo, tarball: str, rootfs: str) -> str:
    """Return the hard link's target as a clean relative path.

    The target must be an earlier non-folder entry that is not a symbolic link, because
    link(2) would follow a symbolic link out of the image.
    """
    target = member.linkname
    fix = "Link only to an earlier file of the tarball, with a path relative to its root."
    parts = _path_parts(target)
    if target.startswith("/") or ".." in parts or "\0" in target or not parts:
        reason = f"the hard link target {target!r} leads outside the image root"
        raise _entry_error(member, tarball, reason, fix)

    if parts == _path_parts(member.name):
        raise _entry_error(member, tarball, "the hard link points to itself", fix)

    for depth in range(1, len(parts) + 1):
        try:
            mode = os.lstat(os.path.join(rootfs, *parts[:depth])).st_mode
        except FileNotFoundError:
            raise _entry_error(
                member, tarball, f"the hard link target {target!r} is not an earlier entry", fix
            ) from None
        # Every component but the last must be a real folder, and the last must not be one.
        is_last = depth == len(parts)
        if stat.S_ISLNK(mode) or stat.S_ISDIR(mode) == is_last:
            raise _entry_error(
                member,
                tarball,
                f"the hard link target {target!r} is a folder or a symbolic link, or lies "
                "below something that is not a folder",
                fix,
            )
    return "/".join(parts)


def _clear_target(member: tarfile.TarInfo, tarball: str, target: str) -> None:
    """Remove an earlier non-folder entry at ``target`` so that extraction does not follow it."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        if not member.isdir():
            raise _entry_error(
                member,
                tarball,
                "it would replace a folder from an earlier entry",
                "Remove one of the two entries.",
            )
        return
    os.unlink(target)


def _set_folder_attributes(path: str, member: tarfile.TarInfo) -> None:
    if os.geteuid() == 0:
        os.chown(path, member.uid, member.gid)
    os.utime(path, (member.mtime, member.mtime))
    os.chmod(path, member.mode)


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m jupyter_linuxworker.sandbox.images``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE_NAME}", description="Build, import, list or delete job images."
    )
    parser.add_argument(
        "--images-dir",
        default=DEFAULT_IMAGES_DIR,
        help="folder that contains one folder per image (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    replace_help = "replace an existing image of that name"
    build = commands.add_parser("build-default", help="build a busybox image from a static busybox")
    build.add_argument(
        "--name", default=DEFAULT_IMAGE_NAME, help="image name (default: %(default)s)"
    )
    build.add_argument(
        "--busybox", default=BUSYBOX_PATH, help="static busybox binary (default: %(default)s)"
    )
    build.add_argument("--replace", action="store_true", help=replace_help)

    importer = commands.add_parser(
        "import", help="import a root filesystem tarball (.tar, .tar.gz, .tar.xz, .tar.bz2)"
    )
    importer.add_argument("name", help="image name")
    importer.add_argument("tarball", help="path of the tarball")
    importer.add_argument("--replace", action="store_true", help=replace_help)

    commands.add_parser("list", help="list the images")

    deleter = commands.add_parser("delete", help="delete an image")
    deleter.add_argument("name", help="image name")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Print the message and return 1 on ImageError."""
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    store = ImageStore(options.images_dir)
    try:
        if options.command == "build-default":
            info = store.build_default(options.name, options.busybox, replace=options.replace)
            print(f"built image '{info.name}' in {info.path}: {_describe(info)}")
        elif options.command == "import":
            info = store.import_tarball(options.name, options.tarball, replace=options.replace)
            print(f"imported image '{info.name}' in {info.path}: {_describe(info)}")
        elif options.command == "delete":
            store.delete(options.name)
            print(f"deleted image '{options.name}' from {store.images_dir}")
        else:
            _print_images(store)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _describe(info: ImageInfo) -> str:
    return f"{info.files} files, {info.size} bytes, from {info.source}"


def _print_images(store: ImageStore) -> None:
    images = store.list()
    if not images:
        print(f"no images in {store.images_dir}")
        return
    print(f"{'NAME':<24} {'FILES':>7} {'BYTES':>12}  {'CREATED':<19}  SOURCE")
    for info in images:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_at))
        print(f"{info.name:<24} {info.files:>7} {info.size:>12}  {created:<19}  {info.source}")


if __name__ == "__main__":
    sys.exit(main())
