"""Regions of a VFIO device: what ``VFIO_DEVICE_GET_REGION_INFO`` says, accesses through
``pread``/``pwrite``, and which page-aligned parts of a BAR can be mmapped into the guest.

vfio-pci exposes each BAR, the ROM and config space as a region at a fixed offset of the
device fd. A BAR with the MMAP flag can be mapped (all of it, or only the areas a sparse-mmap
capability lists); the MSI-X table and PBA pages are always left out here, so that the guest's
accesses to them trap to the emulated table instead of reaching the real one.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from iovirt.vfio import uapi
from iovirt.vfio.container import walk_caps
from iovirt.vfio.errors import VfioError
from iovirt.vfio.kernel import VfioKernel

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
# Region info with capabilities (sparse areas) rarely needs more; the kernel says if it does.
_REGION_INFO_BUFFER = 256
_REGION_INFO_MAX = 1 << 16


@dataclass(frozen=True)
class RegionInfo:
    """One region: flags, size, offset in the device fd, and where it may be mmapped."""

    index: int
    flags: int
    size: int
    offset: int
    sparse_areas: tuple[tuple[int, int], ...] | None = None  # (offset, size); None: none given
    msix_mappable: bool = False

    @property
    def readable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP)

    def mmap_areas(self) -> list[tuple[int, int]]:
        """Areas the kernel allows to be mmapped: the sparse list, else the whole region."""
        if not self.mmappable:
            return []
        if self.sparse_areas is not None:
            return [(o, s) for o, s in self.sparse_areas if s > 0 and o + s <= self.size]
        return [(0, self.size)]


def region_info(kernel: VfioKernel, fd: int, index: int, device: str) -> RegionInfo:
    """``VFIO_DEVICE_GET_REGION_INFO`` for region ``index``, with its capability chain."""
    size = _REGION_INFO_BUFFER
    while True:
        buf = bytearray(size)
        uapi.REGION_INFO.pack_into(buf, 0, size, 0, index, 0, 0, 0)
        try:
            kernel.ioctl(fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
        except OSError as e:
            raise VfioError(
                "VFIO_DEVICE_GET_REGION_INFO", e.errno or errno.EIO, f"{device} region {index}"
            ) from e
        argsz, flags, _, cap_offset, region_size, offset = uapi.REGION_INFO.unpack_from(buf)
        if argsz > size and size < _REGION_INFO_MAX:
            size = min(argsz, _REGION_INFO_MAX)  # the kernel asks for room for its caps
            continue
        break
    sparse: tuple[tuple[int, int], ...] | None = None
    msix_mappable = False
    if flags & uapi.VFIO_REGION_INFO_FLAG_CAPS and cap_offset:
        for cap_id, at in walk_caps(buf, cap_offset):
            if cap_id == uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                count, _ = uapi.SPARSE_MMAP_HEADER.unpack_from(buf, at + uapi.CAP_HEADER.size)
                first = at + uapi.CAP_HEADER.size + uapi.SPARSE_MMAP_HEADER.size
                count = min(count, max(0, (len(buf) - first) // uapi.SPARSE_MMAP_AREA.size))
                sparse = tuple(
                    uapi.SPARSE_MMAP_AREA.unpack_from(buf, first + i * uapi.SPARSE_MMAP_AREA.size)
                    for i in range(count)
                )
            elif cap_id == uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                msix_mappable = True
    return RegionInfo(index, flags, region_size, offset, sparse, msix_mappable)


def page_span(start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` widened to whole pages."""
    return start & ~(PAGE_SIZE - 1), (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def mappable_chunks(info: RegionInfo, traps: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, size) page-aligned pieces of the region that can be mmapped into the
    guest: the kernel's mmap areas, shrunk to whole pages, minus the pages of every
    ``traps`` range (e.g. the MSI-X table and PBA), which must keep trapping."""
    holes = sorted(page_span(s, e) for s, e in traps if e > s)
    chunks: list[tuple[int, int]] = []
    for offset, size in info.mmap_areas():
        start = (offset + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        end = (offset + size) & ~(PAGE_SIZE - 1)
        pieces = [(start, end)]
        for hole_start, hole_end in holes:
            cut: list[tuple[int, int]] = []
            for s, e in pieces:
                if hole_end <= s or e <= hole_start:
                    cut.append((s, e))
                    continue
                if s < hole_start:
                    cut.append((s, hole_start))
                if hole_end < e:
                    cut.append((hole_end, e))
            pieces = cut
        chunks.extend((s, e - s) for s, e in pieces if e > s)
    return chunks


class RegionAccess:
    """Byte accesses to one region through ``pread``/``pwrite`` on the device fd."""

    def __init__(self, kernel: VfioKernel, fd: int, info: RegionInfo, name: str) -> None:
        self.kernel = kernel
        self.fd = fd
        self.info = info
        self.name = name

    def read(self, offset: int, size: int) -> bytes | None:
        """``size`` bytes at ``offset``, or None if outside the region or refused."""
        if offset < 0 or size <= 0 or offset + size > self.info.size:
            return None
        try:
            data = self.kernel.pread(self.fd, size, self.info.offset + offset)
        except OSError:
            return None
        return data if len(data) == size else None

    def write(self, offset: int, data: bytes) -> bool:
        if offset < 0 or not data or offset + len(data) > self.info.size:
            return False
        try:
            return self.kernel.pwrite(self.fd, data, self.info.offset + offset) == len(data)
        except OSError:
            return False
