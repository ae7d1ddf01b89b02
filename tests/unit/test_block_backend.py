"""Tests of :class:`iovirt.backends.block.FileBlockBackend`: opening a raw image file.

What a user meets is checked at its edges: the size the guest sees (rounded down to whole
512-byte sectors), every refusal as one :class:`ResourceError` line naming the disk (a
missing file, a file the user may not write, a file too small, a directory, an image
another process holds), the advisory lock (exclusive for read-write, shared for read-only),
O_DIRECT as this machine's filesystem gives it, and an idempotent close.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iovirt.backends.block import SECTOR_SIZE, BlockBackend, FileBlockBackend
from iovirt.errors import ResourceError, UserError

UNPRIVILEGED_UID = 65534  # nobody: root passes every file-mode check, nobody does not


@pytest.fixture
def backends() -> Iterator[list[FileBlockBackend]]:
    """Backends a test opened; closed at teardown even when an assertion failed."""
    opened: list[FileBlockBackend] = []
    yield opened
    for backend in opened:
        backend.close()


@pytest.fixture
def open_backend(backends: list[FileBlockBackend]) -> Callable[..., FileBlockBackend]:
    def open_(path: Path, **kwargs: Any) -> FileBlockBackend:
        backend = FileBlockBackend(path, **kwargs)
        backends.append(backend)
        return backend

    return open_


def image(tmp_path: Path, size: int, name: str = "disk.img") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(size))
    return path


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def refusal(path: Path, **kwargs: Any) -> ResourceError:
    """The ResourceError opening ``path`` gives; it must be one line and leak no fd."""
    before = open_fds()
    with pytest.raises(ResourceError) as info:
        FileBlockBackend(path, **kwargs)
    assert open_fds() == before
    text = str(info.value)
    assert "\n" not in text and "\r" not in text, repr(text)
    assert isinstance(info.value, UserError)  # the CLI prints it as a line, no traceback
    return info.value


# -- size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_size", "disk_size"),
    [
        (512, 512),
        (1 << 20, 1 << 20),
        (1000, 512),  # a tail shorter than a sector cannot be addressed
        (4096 + 511, 4096),
        (3 * 512 + 1, 3 * 512),
    ],
)
def test_size_is_rounded_down_to_whole_sectors(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend], file_size: int, disk_size: int
) -> None:
    backend = open_backend(image(tmp_path, file_size))
    assert backend.size == disk_size
    assert backend.size % SECTOR_SIZE == 0


def test_sparse_image_size_is_its_apparent_size(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    path = tmp_path / "sparse.img"
    with path.open("wb") as f:
        f.truncate(1 << 30)  # `truncate -s 1G`, as the error message suggests
    assert open_backend(path).size == 1 << 30


@pytest.mark.parametrize("file_size", [0, 1, SECTOR_SIZE - 1])
@pytest.mark.parametrize("readonly", [False, True])
def test_image_smaller_than_a_sector_is_refused(
    tmp_path: Path, file_size: int, readonly: bool
) -> None:
    path = image(tmp_path, file_size)
    err = refusal(path, readonly=readonly)
    assert err.resource == f"disk {path}"
    assert f"is {file_size} bytes" in err.problem
    assert "at least 512" in err.problem


# -- open modes -----------------------------------------------------------------------------


def test_read_write_open(tmp_path: Path, open_backend: Callable[..., FileBlockBackend]) -> None:
    path = image(tmp_path, 4096)
    backend: BlockBackend = open_backend(path)  # a FileBlockBackend is a BlockBackend
    assert not backend.readonly and not backend.direct
    assert os.pwrite(backend.fd, b"\xaa" * SECTOR_SIZE, SECTOR_SIZE) == SECTOR_SIZE
    assert path.read_bytes()[SECTOR_SIZE : 2 * SECTOR_SIZE] == b"\xaa" * SECTOR_SIZE


def test_readonly_open_cannot_write(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    path = image(tmp_path, 4096)
    backend = open_backend(path, readonly=True)
    assert backend.readonly
    assert fcntl.fcntl(backend.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    with pytest.raises(OSError) as info:
        os.pwrite(backend.fd, b"x", 0)
    assert info.value.errno == errno.EBADF
    assert os.pread(backend.fd, 4, 0) == bytes(4)


def test_fd_is_close_on_exec(tmp_path: Path, open_backend: Callable[..., FileBlockBackend]) -> None:
    # A tap helper or qemu-storage-daemon started later must not inherit the image.
    backend = open_backend(image(tmp_path, 4096))
    assert fcntl.fcntl(backend.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def _filesystem_takes_o_direct(path: Path) -> bool:
    """Ask the filesystem itself, independently of the code under test."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def test_direct_open_follows_what_the_filesystem_supports(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    path = image(tmp_path, 8192)
    if _filesystem_takes_o_direct(path):
        backend = open_backend(path, direct=True)
        assert backend.direct
        assert fcntl.fcntl(backend.fd, fcntl.F_GETFL) & os.O_DIRECT
        assert backend.size == 8192
    else:
        err = refusal(path, direct=True)
        assert "O_DIRECT" in err.problem and "direct = false" in err.problem


def test_buffered_open_has_no_o_direct(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    backend = open_backend(image(tmp_path, 4096))
    assert not fcntl.fcntl(backend.fd, fcntl.F_GETFL) & os.O_DIRECT


def test_einval_from_a_direct_open_says_to_turn_direct_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The branch for filesystems without O_DIRECT (tmpfs on older kernels, the lab's
    overlay): open(2) fails with EINVAL there, which this machine's /tmp never does."""
    path = image(tmp_path, 4096)
    real_open = os.open

    def open_without_direct(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_direct)
    err = refusal(path, direct=True)
    assert err.resource == f"disk {path}"
    assert "does not support O_DIRECT" in err.problem
    assert "direct = false" in err.problem


# -- refusals ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.img"
    err = refusal(path)
    assert err.resource == f"disk {path}"
    assert "no such file" in err.problem
    assert "truncate -s" in err.problem  # says how to make one
    assert str(err).startswith(f"disk {path}: ")
    assert isinstance(err.__cause__, FileNotFoundError)


def test_directory_is_refused(tmp_path: Path) -> None:
    err = refusal(tmp_path)  # read-write: open(2) itself says EISDIR
    assert err.resource == f"disk {tmp_path}"
    assert err.problem == os.strerror(errno.EISDIR)


def test_directory_is_refused_read_only(tmp_path: Path) -> None:
    err = refusal(tmp_path, readonly=True)  # opens fine; fstat tells
    assert "not a regular file or block device" in err.problem


def test_path_with_a_newline_is_still_one_line(tmp_path: Path) -> None:
    # A TOML string may hold "\n"; the refusal still has to print as one line.
    err = refusal(tmp_path / "a\nb.img")
    assert err.resource.endswith("a\\nb.img")  # escaped, still recognisable
    refusal(image(tmp_path, 100, name="c\nd.img"))


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory an unprivileged user can traverse (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="iovirt-blk-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _open_unprivileged(path: Path, readonly: bool) -> str:
    """Open ``path`` in a child that is not root (root passes every mode check); returns
    what it printed: 'ok SIZE' or the ResourceError's text."""
    code = (
        "import sys\n"
        "from iovirt.backends.block import FileBlockBackend\n"
        "from iovirt.errors import ResourceError\n"
        "try:\n"
        f"    b = FileBlockBackend(sys.argv[1], readonly={readonly})\n"
        "except ResourceError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    print('ok', b.size)\n"
    )
    user = UNPRIVILEGED_UID if os.geteuid() == 0 else None
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        user=user,
        cwd="/",
    )
    return proc.stdout.strip()


def test_permission_denied_suggests_readonly(world_dir: Path) -> None:
    path = image(world_dir, 4096)
    path.chmod(0o444)
    out = _open_unprivileged(path, readonly=False)
    assert out == (f"disk {path}: permission denied; check its mode (or set readonly = true)"), out
    # The suggestion works: read-only needs only the read bit.
    assert _open_unprivileged(path, readonly=True) == "ok 4096"


def test_permission_denied_read_only(world_dir: Path) -> None:
    path = image(world_dir, 4096)
    path.chmod(0o000)
    out = _open_unprivileged(path, readonly=True)
    assert out == f"disk {path}: permission denied; check its mode", out


# -- the image lock ---------------------------------------------------------------------------


def test_second_read_write_open_is_refused_as_in_use(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    path = image(tmp_path, 4096)
    open_backend(path)
    err = refusal(path)
    assert err.resource == f"disk {path}"
    assert "in use" in err.problem
    assert isinstance(err.__cause__, BlockingIOError)


@pytest.mark.parametrize(
    ("first_readonly", "second_readonly"), [(False, True), (True, False)], ids=["rw-ro", "ro-rw"]
)
def test_reader_and_writer_exclude_each_other(
    tmp_path: Path,
    open_backend: Callable[..., FileBlockBackend],
    first_readonly: bool,
    second_readonly: bool,
) -> None:
    path = image(tmp_path, 4096)
    open_backend(path, readonly=first_readonly)
    assert "in use" in refusal(path, readonly=second_readonly).problem


def test_two_read_only_opens_coexist(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    path = image(tmp_path, 4096)
    a = open_backend(path, readonly=True)
    b = open_backend(path, readonly=True)
    assert a.fd != b.fd
    assert a.size == b.size == 4096


def test_lock_is_taken_on_the_file_itself(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    """Another process's flock (what a second iovirt or a benchmark takes) sees it."""
    path = image(tmp_path, 4096)
    open_backend(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_close_releases_the_lock(
    tmp_path: Path, open_backend: Callable[..., FileBlockBackend]
) -> None:
    path = image(tmp_path, 4096)
    first = open_backend(path)
    first.close()
    second = open_backend(path)
    assert second.fd >= 0


# -- close ------------------------------------------------------------------------------------


def test_close_is_idempotent(tmp_path: Path) -> None:
    before = open_fds()
    backend = FileBlockBackend(image(tmp_path, 4096))
    fd = backend.fd
    assert str(fd) in open_fds()
    backend.close()
    assert backend.fd == -1
    assert open_fds() == before
    backend.close()  # a second close must not close whatever now has that number
    assert backend.fd == -1
    other = os.open(os.devnull, os.O_RDONLY)  # likely reuses the old number
    try:
        backend.close()
        os.fstat(other)  # still open
    finally:
        os.close(other)
