"""Tests of the image store: the default busybox image, tarball imports and their checks."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from jupyter_linuxworker.sandbox.images import (
    BUSYBOX_PATH,
    ImageError,
    ImageInfo,
    ImageNotFound,
    ImageStore,
    check_static_busybox,
    main,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="owners are kept only when root")
needs_busybox = pytest.mark.skipif(
    not os.path.isfile(BUSYBOX_PATH), reason=f"{BUSYBOX_PATH} missing: install busybox-static"
)

MTIME = 1_700_000_000
BUSYBOX_BYTES = b"\x7fELF fake busybox\n"
PASSWD_BYTES = b"root:x:0:0:root:/root:/bin/sh\n"
NOTES_BYTES = b"private notes\n"

EXPECTED_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
EXPECTED_DIR_MODES = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "usr/local/bin": 0o755,
    "lib": 0o755,
    "etc": 0o755,
    "dev": 0o755,
    "proc": 0o555,
    "sys": 0o555,
    "tmp": 0o1777,
    "root": 0o700,
    "home": 0o755,
    "var/tmp": 0o1777,
    "var/log": 0o755,
    "run": 0o755,
    "mnt": 0o755,
}


# -- helpers ----------------------------------------------------------------------------------

# A tar header and the file data that follows it (None for entries without data).
Entry = tuple[tarfile.TarInfo, "bytes | None"]


def file_entry(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    entry = tarfile.TarInfo(name)
    entry.size = len(data)
    entry.mode = mode
    entry.uid = uid
    entry.gid = gid
    entry.mtime = MTIME
    return entry, data


def dir_entry(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    entry = tarfile.TarInfo(name)
    entry.type = tarfile.DIRTYPE
    entry.mode = mode
    entry.uid = uid
    entry.gid = gid
    entry.mtime = MTIME
    return entry, None


def link_entry(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Entry:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.linkname = target
    entry.mode = 0o777
    entry.mtime = MTIME
    return entry, None


def special_entry(name: str, kind: bytes) -> Entry:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.mode = 0o666
    entry.devmajor = 1
    entry.devminor = 3
    entry.mtime = MTIME
    return entry, None


def write_tarball(path: Path, entries: list[Entry], compression: str = "") -> str:
    """Write ``entries`` to a tarball at ``path`` and return the path as a string."""
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as archive:
        for entry, data in entries:
            archive.addfile(entry, None if data is None else io.BytesIO(data))
    return str(path)


def good_entries() -> list[Entry]:
    return [
        dir_entry("./", mode=0o711),
        dir_entry("./bin"),
        file_entry("./bin/busybox", BUSYBOX_BYTES, mode=0o4755),
        link_entry("./bin/sh", "/bin/busybox"),
        link_entry("./bin/busybox-copy", "bin/busybox", kind=tarfile.LNKTYPE),
        dir_entry("./etc"),
        file_entry("./etc/passwd", PASSWD_BYTES),
        dir_entry("./home/user", mode=0o750, uid=1000, gid=1000),
        file_entry("./home/user/notes", NOTES_BYTES, mode=0o600, uid=1000, gid=1000),
        dir_entry("./tmp", mode=0o1777),
        dir_entry("./usr/lib"),
        link_entry("./usr/lib/passwd-link", "../../etc/passwd"),
        dir_entry("./run"),
        special_entry("./run/initctl", tarfile.FIFOTYPE),
    ]


def images_dir_entries(store: ImageStore) -> list[str]:
    if not os.path.isdir(store.images_dir):
        return []
    return sorted(os.listdir(store.images_dir))


def fake_elf(path: Path, program_header_types: list[int]) -> str:
    """Write a little-endian ELF64 executable header with the given program header types."""
    header_size = 64
    entry_size = 56
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,
        62,
        1,
        0,
        header_size,
        0,
        0,
        header_size,
        entry_size,
        len(program_header_types),
        0,
        0,
        0,
    )
    program_headers = b"".join(
        struct.pack("<I", kind) + bytes(entry_size - 4) for kind in program_header_types
    )
    path.write_bytes(header + program_headers)
    return str(path)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(str(tmp_path / "images"))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the images folder that escape attempts point at."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "target.txt").write_text("outside\n")
    return folder


# -- the default image ------------------------------------------------------------------------


@needs_busybox
def test_default_image_layout(store: ImageStore) -> None:
    info = store.build_default()
    root = Path(info.path)

    assert os.readlink(root / "bin/sh") == "busybox"
    assert (root / "bin/busybox").read_bytes() == Path(BUSYBOX_PATH).read_bytes()
    assert stat.S_IMODE((root / "bin/busybox").stat().st_mode) == 0o755
    for folder, mode in EXPECTED_DIR_MODES.items():
        path = root / folder
        assert not path.is_symlink(), folder
        assert path.is_dir(), folder
        assert stat.S_IMODE(path.lstat().st_mode) == mode, folder
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


@needs_busybox
def test_default_image_etc_files(store: ImageStore) -> None:
    etc = Path(store.build_default().path) / "etc"

    assert (etc / "passwd").read_text() == EXPECTED_PASSWD
    assert (etc / "group").read_text() == "root:x:0:\nnogroup:x:65534:\n"
    assert (etc / "hosts").read_text() == (
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    assert (etc / "hostname").read_text() == "linuxworker\n"
    assert (etc / "shells").read_text() == "/bin/sh\n/bin/ash\n"
    assert (etc / "resolv.conf").read_text().startswith("#")
    assert 'NAME="jupyter-linuxworker busybox image"\n' in (etc / "os-release").read_text()
    assert "ID=jupyter-linuxworker-busybox\n" in (etc / "os-release").read_text()
    profile = (etc / "profile").read_text()
    assert 'export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"\n' in profile
    assert "export PS1='\\u@\\h:\\w\\$ '\n" in profile
    for name in ("passwd", "group", "hosts", "hostname", "shells", "resolv.conf", "profile"):
        assert stat.S_IMODE((etc / name).stat().st_mode) == 0o644, name


@needs_busybox
def test_default_image_applet_links(store: ImageStore) -> None:
    root = Path(store.build_default().path)
    listed = subprocess.run(
        [BUSYBOX_PATH, "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    busybox = os.path.join(root, "bin", "busybox")

    # busybox lists itself as bin/busybox, which stays the real binary.
    applets = [path for path in listed if "/" in path and path != "bin/busybox"]
    assert "bin/sh" in applets
    for applet in applets:
        link = root / applet
        assert link.is_symlink(), applet
        resolved = os.path.normpath(os.path.join(link.parent, os.readlink(link)))
        assert resolved == busybox, applet
    # linuxrc is listed at the top level and skipped.
    assert not (root / "linuxrc").exists()


@needs_busybox
@needs_root
def test_default_image_owned_by_root(store: ImageStore) -> None:
    root = store.build_default().path

    for folder, subfolders, files in os.walk(root):
        for name in [".", *subfolders, *files]:
            info = os.lstat(os.path.join(folder, name))
            assert (info.st_uid, info.st_gid) == (0, 0), os.path.join(folder, name)


@needs_busybox
def test_default_image_metadata(store: ImageStore) -> None:
    info = store.build_default()
    root = info.path
    # os.walk lists a symbolic link among the folders only when it points to a folder. Every
    # link in this image points to bin/busybox, so the file lists contain every non-folder.
    file_count = sum(len(files) for _, _, files in os.walk(root))

    assert info.name == "default"
    assert info.path == os.path.join(store.images_dir, "default", "rootfs")
    assert info.source == f"busybox-static {BUSYBOX_PATH}"
    assert info.files == file_count
    assert info.size == os.path.getsize(BUSYBOX_PATH) + sum(
        os.path.getsize(os.path.join(root, "etc", name))
        for name in os.listdir(os.path.join(root, "etc"))
        if not os.path.islink(os.path.join(root, "etc", name))
    )
    assert store.get("default") == info
    assert store.rootfs("default") == info.path
    assert store.list() == [info]
    with open(os.path.join(store.images_dir, "default", "image.json")) as file:
        assert json.load(file) == {
            "name": "default",
            "created_at": info.created_at,
            "source": info.source,
            "size": info.size,
            "files": info.files,
        }
    assert images_dir_entries(store) == ["default"]


@needs_busybox
def test_build_default_existing_needs_replace(store: ImageStore) -> None:
    first = store.build_default()

    with pytest.raises(ImageError) as raised:
        store.build_default()
    assert "replace=True" in str(raised.value)
    assert "--replace" in str(raised.value)
    assert store.get("default") == first

    second = store.build_default(replace=True)
    assert second.created_at > first.created_at
    assert store.get("default") == second
    assert images_dir_entries(store) == ["default"]


@needs_busybox
def test_ensure_default_builds_only_once(store: ImageStore) -> None:
    first = store.ensure_default()
    second = store.ensure_default()

    assert second == first
    assert store.list() == [first]


def test_build_default_missing_busybox(store: ImageStore, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-busybox")

    with pytest.raises(ImageError) as raised:
        store.build_default(busybox=missing)
    assert missing in str(raised.value)
    assert "busybox-static" in str(raised.value)
    assert images_dir_entries(store) == []


def test_build_default_rejects_dynamic_busybox(store: ImageStore, tmp_path: Path) -> None:
    dynamic = fake_elf(tmp_path / "dynamic", [6, 3, 1])  # PT_PHDR, PT_INTERP, PT_LOAD

    with pytest.raises(ImageError) as raised:
        store.build_default(busybox=dynamic)
    assert "dynamically linked" in str(raised.value)
    assert "busybox-static" in str(raised.value)
    assert images_dir_entries(store) == []


def test_check_static_busybox_cases(tmp_path: Path) -> None:
    check_static_busybox(fake_elf(tmp_path / "static", [1, 1, 4]))  # PT_LOAD twice, PT_NOTE

    text_file = tmp_path / "script"
    text_file.write_text("#!/bin/sh\n")
    with pytest.raises(ImageError) as raised:
        check_static_busybox(str(text_file))
    assert "not an ELF executable" in str(raised.value)

    with pytest.raises(ImageError) as raised:
        check_static_busybox(fake_elf(tmp_path / "dynamic", [3]))
    assert "dynamically linked" in str(raised.value)


@needs_busybox
def test_check_static_busybox_accepts_installed() -> None:
    check_static_busybox(BUSYBOX_PATH)


# -- tarball import ---------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("compression", ["", "gz", "xz", "bz2"])
def test_import_keeps_modes_links_owners(
    store: ImageStore, tmp_path: Path, compression: str
) -> None:
    tarball = write_tarball(tmp_path / f"root.tar.{compression}", good_entries(), compression)

    info = store.import_tarball("mini", tarball)
    root = Path(info.path)

    assert info.name == "mini"
    assert info.source == tarball
    assert info.path == os.path.join(store.images_dir, "mini", "rootfs")
    assert stat.S_IMODE(root.stat().st_mode) == 0o711
    assert stat.S_IMODE((root / "bin/busybox").stat().st_mode) == 0o4755
    assert (root / "bin/busybox").read_bytes() == BUSYBOX_BYTES
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert os.readlink(root / "usr/lib/passwd-link") == "../../etc/passwd"
    assert (root / "bin/busybox-copy").stat().st_ino == (root / "bin/busybox").stat().st_ino
    assert stat.S_ISFIFO((root / "run/initctl").lstat().st_mode)
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert (root / "tmp").stat().st_mtime == MTIME
    assert stat.S_IMODE((root / "home/user").stat().st_mode) == 0o750
    assert (root / "home/user").stat().st_uid == 1000
    assert (root / "home/user/notes").stat().st_uid == 1000
    assert (root / "home/user/notes").stat().st_gid == 1000
    assert stat.S_IMODE((root / "home/user/notes").stat().st_mode) == 0o600
    # Regular files, the hard link, two symbolic links and the FIFO.
    assert info.files == 7
    assert info.size == len(BUSYBOX_BYTES) + len(PASSWD_BYTES) + len(NOTES_BYTES)
    assert store.list() == [info]
    assert images_dir_entries(store) == ["mini"]


@needs_busybox
@needs_root
def test_import_roundtrip_of_default_image(store: ImageStore, tmp_path: Path) -> None:
    default = store.build_default()
    tarball = tmp_path / "default.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(default.path, arcname=".")

    copy = store.import_tarball("copy", str(tarball))

    assert copy.files == default.files
    assert copy.size == default.size
    for folder, subfolders, files in os.walk(default.path):
        for name in [".", *subfolders, *files]:
            original = os.lstat(os.path.join(folder, name))
            relative = os.path.relpath(os.path.join(folder, name), default.path)
            imported = os.lstat(os.path.join(copy.path, relative))
            assert imported.st_mode == original.st_mode, relative
            assert (imported.st_uid, imported.st_gid) == (original.st_uid, original.st_gid)
    assert os.readlink(os.path.join(copy.path, "usr/bin/awk")) == "../../bin/busybox"


def test_import_file_replaces_earlier_symlink(
    store: ImageStore, tmp_path: Path, outside: Path
) -> None:
    entries = [
        link_entry("config", str(outside / "target.txt")),
        file_entry("config", b"inside\n"),
    ]
    tarball = write_tarball(tmp_path / "root.tar", entries)

    root = Path(store.import_tarball("mini", tarball).path)

    assert not (root / "config").is_symlink()
    assert (root / "config").read_bytes() == b"inside\n"
    assert (outside / "target.txt").read_text() == "outside\n"


# Case: (entries made from the outside folder, entry name in the message, reason in the
# message). "{outside}" in the entry name stands for the outside folder.
BAD_TARBALLS: dict[str, tuple[Callable[[Path], list[Entry]], str, str]] = {
    "absolute path": (
        lambda outside: [file_entry(str(outside / "absolute.txt"), b"x")],
        "{outside}/absolute.txt",
        "the path is absolute",
    ),
    "dotdot component": (
        lambda outside: [dir_entry("a"), file_entry("a/../../escape.txt", b"x")],
        "a/../../escape.txt",
        "'..'",
    ),
    "char device": (
        lambda outside: [dir_entry("dev"), special_entry("dev/null", tarfile.CHRTYPE)],
        "dev/null",
        "device nodes",
    ),
    "block device": (
        lambda outside: [dir_entry("dev"), special_entry("dev/sda", tarfile.BLKTYPE)],
        "dev/sda",
        "device nodes",
    ),
    "symlink escaping": (
        lambda outside: [dir_entry("a"), link_entry("a/b", "../../etc/passwd")],
        "a/b",
        "leads outside the image root",
    ),
    "hardlink escaping": (
        lambda outside: [link_entry("evil", "../outside/target.txt", tarfile.LNKTYPE)],
        "evil",
        "leads outside the image root",
    ),
    "hardlink absolute": (
        lambda outside: [link_entry("evil", str(outside / "target.txt"), tarfile.LNKTYPE)],
        "evil",
        "leads outside the image root",
    ),
    "hardlink to symlink": (
        lambda outside: [
            link_entry("soft", str(outside / "target.txt")),
            link_entry("hard", "soft", tarfile.LNKTYPE),
        ],
        "hard",
        "is a folder or a symbolic link",
    ),
    "hardlink missing target": (
        lambda outside: [link_entry("hard", "missing", tarfile.LNKTYPE)],
        "hard",
        "not an earlier entry",
    ),
    "path through symlink": (
        lambda outside: [link_entry("link", str(outside)), file_entry("link/passwd", b"x")],
        "link/passwd",
        "its parent 'link' is a symbolic link",
    ),
    "folder through symlink": (
        lambda outside: [link_entry("link", str(outside)), dir_entry("link/sub")],
        "link/sub",
        "its parent 'link' is a symbolic link",
    ),
    "file replacing folder": (
        lambda outside: [dir_entry("etc"), file_entry("etc", b"x")],
        "etc",
        "would replace a folder",
    ),
    "root entry not folder": (
        lambda outside: [file_entry("./", b"x")],
        "./",
        "the root entry is not a folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TARBALLS))
def test_import_rejects_bad_entry_new_name(
    store: ImageStore, tmp_path: Path, outside: Path, case: str
) -> None:
    make_entries, entry_name, reason = BAD_TARBALLS[case]
    tarball = write_tarball(tmp_path / "bad.tar", make_entries(outside))

    with pytest.raises(ImageError) as raised:
        store.import_tarball("bad", tarball)

    message = str(raised.value)
    assert repr(entry_name.format(outside=outside)) in message
    assert reason in message
    assert tarball in message
    assert images_dir_entries(store) == []
    assert sorted(os.listdir(outside)) == ["target.txt"]
    assert (outside / "target.txt").read_text() == "outside\n"


@pytest.mark.parametrize("case", list(BAD_TARBALLS))
def test_import_rejects_bad_entry_keeps_existing(
    store: ImageStore, tmp_path: Path, outside: Path, case: str
) -> None:
    existing = store.import_tarball("mini", write_tarball(tmp_path / "good.tar", good_entries()))
    make_entries, entry_name, _reason = BAD_TARBALLS[case]
    tarball = write_tarball(tmp_path / "bad.tar", make_entries(outside))

    with pytest.raises(ImageError) as raised:
        store.import_tarball("mini", tarball, replace=True)

    assert repr(entry_name.format(outside=outside)) in str(raised.value)
    assert store.get("mini") == existing
    assert (Path(existing.path) / "etc/passwd").read_bytes() == PASSWD_BYTES
    assert images_dir_entries(store) == ["mini"]


def test_import_existing_name_needs_replace(store: ImageStore, tmp_path: Path) -> None:
    first = store.import_tarball("mini", write_tarball(tmp_path / "one.tar", good_entries()))
    second_tarball = write_tarball(
        tmp_path / "two.tar", [dir_entry("etc"), file_entry("etc/passwd", b"replaced\n")]
    )

    with pytest.raises(ImageError) as raised:
        store.import_tarball("mini", second_tarball)
    assert "replace=True" in str(raised.value)
    assert "--replace" in str(raised.value)
    assert store.get("mini") == first

    second = store.import_tarball("mini", second_tarball, replace=True)
    assert second.source == second_tarball
    assert (Path(second.path) / "etc/passwd").read_bytes() == b"replaced\n"
    assert not (Path(second.path) / "bin").exists()
    assert images_dir_entries(store) == ["mini"]


def test_import_missing_tarball(store: ImageStore, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.tar.gz")

    with pytest.raises(ImageError) as raised:
        store.import_tarball("mini", missing)
    assert str(raised.value) == f"tarball {missing} not found: check the path"
    assert images_dir_entries(store) == []


def test_import_invalid_tarball(store: ImageStore, tmp_path: Path) -> None:
    not_tar = tmp_path / "notes.tar"
    not_tar.write_bytes(b"this is not a tar archive\n" * 100)

    with pytest.raises(ImageError) as raised:
        store.import_tarball("mini", str(not_tar))
    assert f"invalid tarball {not_tar}" in str(raised.value)
    assert images_dir_entries(store) == []


def test_import_truncated_tarball(store: ImageStore, tmp_path: Path) -> None:
    whole = write_tarball(tmp_path / "whole.tar.gz", good_entries(), "gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(Path(whole).read_bytes()[:200])

    with pytest.raises(ImageError) as raised:
        store.import_tarball("mini", str(truncated))
    assert str(truncated) in str(raised.value)
    assert images_dir_entries(store) == []


# -- names, lookups and deletion --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "Upper", "-dash", ".hidden", "a/b", "..", "x" * 64, "newline\n"]
)
def test_invalid_names_rejected(store: ImageStore, tmp_path: Path, name: str) -> None:
    tarball = write_tarball(tmp_path / "root.tar", [dir_entry("etc")])

    for call in (
        lambda: store.import_tarball(name, tarball),
        lambda: store.get(name),
        lambda: store.delete(name),
    ):
        with pytest.raises(ImageError) as raised:
            call()
        assert "^[a-z0-9][a-z0-9._-]{0,62}$" in str(raised.value)
        assert repr(name) in str(raised.value)
    assert images_dir_entries(store) == []


def test_not_found_lists_available(store: ImageStore, tmp_path: Path) -> None:
    tarball = write_tarball(tmp_path / "root.tar", [dir_entry("etc")])
    store.import_tarball("beta", tarball)
    store.import_tarball("alpha", tarball)

    with pytest.raises(ImageNotFound) as raised:
        store.get("missing")
    assert str(raised.value) == "image 'missing' not found; available: alpha, beta"
    assert isinstance(raised.value, KeyError)
    with pytest.raises(ImageNotFound):
        store.rootfs("missing")


def test_not_found_in_empty_store(store: ImageStore) -> None:
    with pytest.raises(ImageNotFound) as raised:
        store.get("default")
    assert str(raised.value).startswith(
        f"image 'default' not found; no images in {store.images_dir}."
    )
    assert "build-default" in str(raised.value)


def test_list_skips_temporary_and_incomplete(store: ImageStore, tmp_path: Path) -> None:
    info = store.import_tarball("mini", write_tarball(tmp_path / "root.tar", [dir_entry("etc")]))
    images_dir = Path(store.images_dir)
    (images_dir / ".tmp-build-half-x1").mkdir()
    (images_dir / "half" / "rootfs").mkdir(parents=True)
    (images_dir / "broken" / "rootfs").mkdir(parents=True)
    (images_dir / "broken" / "image.json").write_text("{not json")
    (images_dir / "notes.txt").write_text("not an image")
    (images_dir / "alias").symlink_to(images_dir / "mini")

    assert store.list() == [info]
    with pytest.raises(ImageNotFound):
        store.get("alias")
    with pytest.raises(ImageError) as raised:
        store.get("half")
    assert "image.json is missing" in str(raised.value)


def test_build_removes_stale_temporary_folders(store: ImageStore, tmp_path: Path) -> None:
    stale = Path(store.images_dir) / ".tmp-build-mini-crashed"
    (stale / "rootfs").mkdir(parents=True)

    store.import_tarball("mini", write_tarball(tmp_path / "root.tar", [dir_entry("etc")]))

    assert images_dir_entries(store) == ["mini"]


def test_delete_removes_image(store: ImageStore, tmp_path: Path) -> None:
    tarball = write_tarball(tmp_path / "root.tar", [dir_entry("etc")])
    store.import_tarball("mini", tarball)
    store.import_tarball("other", tarball)

    store.delete("mini")

    assert [info.name for info in store.list()] == ["other"]
    assert images_dir_entries(store) == ["other"]
    with pytest.raises(ImageNotFound) as raised:
        store.delete("mini")
    assert str(raised.value) == "image 'mini' not found; available: other"


def test_image_info_to_dict() -> None:
    info = ImageInfo("mini", "/images/mini/rootfs", 12.5, "/tmp/root.tar", 10, 2)

    assert info.to_dict() == {
        "name": "mini",
        "path": "/images/mini/rootfs",
        "created_at": 12.5,
        "source": "/tmp/root.tar",
        "size": 10,
        "files": 2,
    }


# -- command line -----------------------------------------------------------------------------


def test_cli_import_list_delete(
    store: ImageStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tarball = write_tarball(tmp_path / "root.tar", [dir_entry("etc"), file_entry("etc/a", b"12")])
    base = ["--images-dir", store.images_dir]

    assert main([*base, "import", "mini", tarball]) == 0
    output = capsys.readouterr().out
    assert output == (
        f"imported image 'mini' in {store.images_dir}/mini/rootfs: 1 files, 2 bytes, "
        f"from {tarball}\n"
    )

    assert main([*base, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FILES", "BYTES", "CREATED", "SOURCE"]
    assert lines[1].split()[:3] == ["mini", "1", "2"]
    assert lines[1].endswith(tarball)

    assert main([*base, "delete", "mini"]) == 0
    assert capsys.readouterr().out == f"deleted image 'mini' from {store.images_dir}\n"

    assert main([*base, "list"]) == 0
    assert capsys.readouterr().out == f"no images in {store.images_dir}\n"


def test_cli_error_exits_one(
    store: ImageStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.tar")

    assert main(["--images-dir", store.images_dir, "import", "mini", missing]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: tarball {missing} not found: check the path\n"


@needs_busybox
def test_cli_build_default(store: ImageStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--images-dir", store.images_dir, "build-default"]) == 0
    info = store.get("default")
    assert capsys.readouterr().out == (
        f"built image 'default' in {info.path}: {info.files} files, {info.size} bytes, "
        f"from busybox-static {BUSYBOX_PATH}\n"
    )

    assert main(["--images-dir", store.images_dir, "build-default"]) == 1
    assert "--replace" in capsys.readouterr().err
