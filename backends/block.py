"""Block backends: what a disk model reads and writes on the host.

A disk model (virtio-blk, later AHCI) gets a :class:`BlockBackend`: an open file
descriptor, its size, and whether it may be written. The data path does its preadv/
pwritev/fdatasync on the fd itself (in C for virtio-blk), so the protocol is small on
purpose, like kvmtool's ``disk_image_operations``.

:class:`FileBlockBackend` is a raw image file. It takes an advisory lock (exclusive for
read-write, shared for read-only) so that two VMs — or a VM and an ``iovirt`` benchmark
— never write one image at the same time, as QEMU's image locking does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Protocol

from iovirt.errors import ResourceError, one_line

SECTOR_SIZE = 512


class BlockBackend(Protocol):
    """An open disk image."""

    fd: int
    size: int  # bytes the guest sees (a multiple of 512)
    readonly: bool
    direct: bool  # opened with O_DIRECT: buffers and offsets must be block-aligned

    def close(self) -> None:
        """Close the fd (after the data path has stopped)."""
        ...


class FileBlockBackend:
    """A raw image file (or a block device node) as a disk."""

    def __init__(self, path: str | Path, *, readonly: bool = False, direct: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.direct = direct
        # A path may hold a newline (a TOML "\n"); the error must still print as one line.
        what = one_line(f"disk {self.path}")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError as e:
            raise ResourceError(
                what, "no such file; create one with `truncate -s 1G FILE` or qemu-img"
            ) from e
        except PermissionError as e:
            hint = "" if readonly else " (or set readonly = true)"
            raise ResourceError(what, f"permission denied; check its mode{hint}") from e
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise ResourceError(
                    what, "this filesystem does not support O_DIRECT; set direct = false"
                ) from e
            raise ResourceError(what, e.strerror or str(e)) from e
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(self.fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise ResourceError(what, "not a regular file or block device")
            # A tail shorter than a sector cannot be addressed; QEMU drops it the same way.
            self.size = size - size % SECTOR_SIZE
            if self.size == 0:
                raise ResourceError(what, f"is {size} bytes; a disk needs at least 512")
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise ResourceError(what, "is in use by another process (it holds a lock)") from e
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
