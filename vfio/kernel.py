"""The system-call boundary of the VFIO layer, as a protocol.

Everything :mod:`iovirt.vfio` asks of the kernel goes through a :class:`VfioKernel`: opening
the VFIO/iommufd nodes, ioctls, ``pread``/``pwrite`` on device regions and ``mmap`` of BARs.
:class:`HostKernel` is the real one; :mod:`iovirt.vfio.simulator` implements the same
protocol with simulated devices, so container, config-space and interrupt logic are unit
tested without an IOMMU. Errors are :class:`OSError` with the kernel's errno, as the real
calls raise them; callers turn them into :class:`~iovirt.vfio.errors.VfioError` or a user
error that names the device.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Protocol


class VfioKernel(Protocol):
    """The calls the VFIO layer makes (see the module docstring)."""

    def open(self, path: str) -> int:
        """Open a device node read-write, close-on-exec; returns the fd."""
        ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: bytearray | int = 0) -> int:
        """``ioctl(fd, request, arg)``: a bytearray is passed by pointer and updated in
        place with what the kernel wrote back; an int is passed by value. Returns the
        ioctl's (non-negative) result."""
        ...

    def pread(self, fd: int, length: int, offset: int) -> bytes: ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        """A shared read-write mapping of ``length`` bytes at ``offset`` of ``fd``."""
        ...


class HostKernel:
    """The real kernel."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: bytearray | int = 0) -> int:
        if isinstance(arg, bytearray):
            # mutate_flag: the kernel's answer lands in ``arg`` (copied through a buffer
            # for small structs, passed directly for large ones).
            return int(fcntl.ioctl(fd, request, arg, True))
        return int(fcntl.ioctl(fd, request, arg))

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        return mmap.mmap(
            fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )
