"""Guest RAM: memfd-backed regions with bounds-checked guest-physical access.

RAM lives in one memfd so that it can later be shared with a vhost-user back-end or
mapped for VFIO DMA. Every access names a guest-physical address (GPA) and a length; the
whole range must lie inside one RAM region or :class:`~iovirt.errors.GuestMemoryError` is
raised *before* any host memory is touched. Devices get guest data only through here.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from iovirt._native import ffi, lib
from iovirt.errors import GuestMemoryError, ResourceError

PAGE_SIZE = mmap.PAGESIZE
GPA_LIMIT = 1 << 64  # guest-physical addresses are 64-bit; a range ending past this wraps

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class MemoryRegion:
    """Contiguous guest RAM ``[gpa, gpa + size)``, backed by ``fd`` at ``fd_offset``."""

    gpa: int
    size: int
    fd: int
    fd_offset: int
    mapping: mmap.mmap = field(repr=False)
    host_addr: int = field(repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM made of page-aligned regions, all carved out of one memfd.

    ``layout`` is a sequence of ``(gpa, size)`` pairs; they must not overlap. For a guest
    with RAM below and above the 32-bit PCI hole pass two pairs.
    """

    def __init__(self, layout: Sequence[tuple[int, int]], name: str = "iovirt-ram") -> None:
        if not layout:
            raise ValueError("guest memory needs at least one region")
        checked = sorted(layout)
        for gpa, size in checked:
            if (
                size <= 0
                or gpa % PAGE_SIZE
                or size % PAGE_SIZE
                or gpa < 0
                or gpa + size > GPA_LIMIT
            ):
                raise ValueError(
                    f"region [{gpa:#x}, +{size:#x}) must be page-aligned and non-empty"
                )
        for (a, asz), (b, _) in itertools.pairwise(checked):
            if a + asz > b:
                raise ValueError(f"regions at {a:#x} and {b:#x} overlap")

        fd = lib.iovirt_memfd_create(name.encode(), lib.MFD_ALLOW_SEALING)
        if fd < 0:
            raise ResourceError("memfd_create", os.strerror(-fd))
        self.fd = fd
        self.regions: list[MemoryRegion] = []
        self._pins: list[object] = []
        total = sum(size for _, size in checked)
        try:
            os.ftruncate(fd, total)
            offset = 0
            for gpa, size in checked:
                mapping = mmap.mmap(
                    fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
                )
                pin = ffi.from_buffer(mapping)
                self._pins.append(pin)
                host_addr = int(ffi.cast("uintptr_t", pin))
                self.regions.append(MemoryRegion(gpa, size, fd, offset, mapping, host_addr))
                offset += size
        except BaseException:
            self.close()
            raise
        self.size = total

    # -- lookup ---------------------------------------------------------------------------

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        """The region holding all of ``[gpa, gpa + length)`` and the offset inside it."""
        if length < 0:
            raise GuestMemoryError(gpa, length, "has a negative length")
        if gpa < 0 or gpa + length > GPA_LIMIT:
            raise GuestMemoryError(gpa, length, "wraps around the address space")
        for r in self.regions:
            # A zero-length range is accepted at any address inside RAM or at its end.
            if r.gpa <= gpa and gpa + length <= r.end and (length > 0 or gpa <= r.end):
                return r, gpa - r.gpa
        raise GuestMemoryError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa + length)`` lies entirely inside one RAM region."""
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def host_address(self, gpa: int, length: int) -> int:
        """Host virtual address of ``gpa`` after checking the whole range (for C and KVM)."""
        region, off = self._locate(gpa, length)
        return region.host_addr + off

    # -- access ---------------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa + length)``; valid until :meth:`close`."""
        region, off = self._locate(gpa, length)
        return memoryview(region.mapping)[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest RAM (all of them, or raise)."""
        region, off = self._locate(gpa, length)
        return region.mapping[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest RAM at ``gpa`` (all of it, or raise and write nothing)."""
        # Count bytes, not items: a memoryview over array('I') has len() of its items.
        raw = memoryview(data)
        if not raw.c_contiguous:
            raw = memoryview(raw.tobytes())
        raw = raw.cast("B")
        length = raw.nbytes
        region, off = self._locate(gpa, length)
        region.mapping[off : off + length] = raw

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``value``."""
        region, off = self._locate(gpa, length)
        region.mapping[off : off + length] = bytes([value]) * length

    def read_u8(self, gpa: int) -> int:
        region, off = self._locate(gpa, 1)
        return region.mapping[off]

    def write_u8(self, gpa: int, value: int) -> None:
        region, off = self._locate(gpa, 1)
        region.mapping[off] = value & 0xFF

    def read_u16(self, gpa: int) -> int:
        region, off = self._locate(gpa, 2)
        return int(_U16.unpack_from(region.mapping, off)[0])

    def write_u16(self, gpa: int, value: int) -> None:
        region, off = self._locate(gpa, 2)
        _U16.pack_into(region.mapping, off, value & 0xFFFF)

    def read_u32(self, gpa: int) -> int:
        region, off = self._locate(gpa, 4)
        return int(_U32.unpack_from(region.mapping, off)[0])

    def write_u32(self, gpa: int, value: int) -> None:
        region, off = self._locate(gpa, 4)
        _U32.pack_into(region.mapping, off, value & 0xFFFF_FFFF)

    def read_u64(self, gpa: int) -> int:
        region, off = self._locate(gpa, 8)
        return int(_U64.unpack_from(region.mapping, off)[0])

    def write_u64(self, gpa: int, value: int) -> None:
        region, off = self._locate(gpa, 8)
        _U64.pack_into(region.mapping, off, value & 0xFFFF_FFFF_FFFF_FFFF)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap every region and close the memfd. Idempotent."""
        for pin in self._pins:
            ffi.release(pin)
        self._pins.clear()
        for r in self.regions:
            # A view still held somewhere keeps its mapping alive until it is released;
            # the memfd and the region table go now regardless.
            with contextlib.suppress(BufferError):
                r.mapping.close()
        self.regions.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
