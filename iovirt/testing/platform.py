"""A simulator of :class:`iovirt.platform.Platform` for unit tests of device transports.

This is a simulator, not a VMM: ioeventfds are only recorded (a transport also handles the
notify write itself, so kicks still arrive), MSI deliveries are counted by draining each
vector's eventfd in :meth:`SimulatedPlatform.poll`, and fd watches run when a test calls
:meth:`poll`. RAM mappings (:meth:`SimulatedPlatform.map_ram`) stand in for KVM memory
slots: there is no guest to write into them, so a test plays the guest with
:meth:`SimulatedRamMapping.guest_write`, which writes the buffer and marks the pages it
touched; :meth:`SimulatedRamMapping.dirty_pages` reports exactly those marks (no page
snapshots are compared), so, as with KVM's dirty log, the host's own writes to the buffer
are never reported. The real implementation (:mod:`iovirt.kvm.platform`) is exercised by
the host and lab tiers, where a stock Linux guest drives the transports.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
from collections.abc import Callable

from iovirt.errors import KvmError
from iovirt.interrupt import RecordingInterrupt
from iovirt.memory import PAGE_SIZE, GuestMemory


class SimulatedMsiVector:
    """An MSI vector whose deliveries are recorded as ``(address, data)`` in ``delivered``."""

    def __init__(self) -> None:
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.address = 0
        self.data = 0
        self.masked = True
        self._pending = False
        self.delivered: list[tuple[int, int]] = []
        self.closed = False

    def set_message(self, address: int, data: int) -> None:
        self.address, self.data = address, data

    def set_masked(self, masked: bool) -> None:
        self.masked = masked
        if not masked and self._pending:
            self._pending = False
            self.delivered.append((self.address, self.data))

    @property
    def pending(self) -> bool:
        return self._pending

    def poll(self) -> None:
        """Turn eventfd signals into deliveries (or a pending bit while masked)."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return
        if self.masked:
            self._pending = True
        else:
            self.delivered.append((self.address, self.data))

    def close(self) -> None:
        if not self.closed:
            os.close(self.eventfd)
            self.closed = True


class SimulatedRamMapping:
    """A buffer "mapped" at :attr:`gpa`; the test writes as the guest (see the module
    docstring). Closed mappings are kept in :attr:`SimulatedPlatform.mappings` with
    :attr:`closed` set, so a test can see what was unmapped."""

    def __init__(self, gpa: int, buffer: mmap.mmap, log_dirty: bool) -> None:
        self.gpa = gpa
        self.size = len(buffer)
        self.buffer = buffer
        self.log_dirty = log_dirty
        self.closed = False
        self._dirty: set[int] = set()

    def guest_write(self, gpa: int, data: bytes) -> None:
        """The guest writes ``data`` at guest-physical ``gpa`` inside the mapping."""
        if self.closed:
            raise ValueError(f"mapping at {self.gpa:#x} is closed")
        offset = gpa - self.gpa
        if not data or offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"[{gpa:#x}, +{len(data):#x}) is not inside the mapping")
        self.buffer[offset : offset + len(data)] = data
        if self.log_dirty:
            self._dirty.update(
                range(offset // PAGE_SIZE, (offset + len(data) - 1) // PAGE_SIZE + 1)
            )

    def guest_read(self, gpa: int, length: int) -> bytes:
        """What the guest reads at ``gpa`` inside the mapping."""
        offset = gpa - self.gpa
        if self.closed or offset < 0 or offset + length > self.size:
            raise ValueError(f"[{gpa:#x}, +{length:#x}) is not inside an open mapping")
        return bytes(self.buffer[offset : offset + length])

    def dirty_pages(self) -> list[int]:
        pages = sorted(self._dirty)
        self._dirty.clear()
        return pages

    def close(self) -> None:
        self.closed = True
        self._dirty.clear()


class SimulatedPlatform:
    """Records what a transport asks of the VMM; see the module docstring."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.ioeventfds: set[tuple[int, int, int, int | None]] = set()
        self.vectors: list[SimulatedMsiVector] = []
        self.lines: dict[int, RecordingInterrupt] = {}
        self.watches: dict[int, Callable[[], None]] = {}
        self.mappings: list[SimulatedRamMapping] = []

    def add_ioeventfd(self, fd: int, address: int, length: int, datamatch: int | None) -> None:
        key = (fd, address, length, datamatch)
        if key in self.ioeventfds:
            raise ValueError(f"ioeventfd {key} registered twice")
        self.ioeventfds.add(key)

    def remove_ioeventfd(self, fd: int, address: int, length: int, datamatch: int | None) -> None:
        self.ioeventfds.remove((fd, address, length, datamatch))

    def msi_vector(self) -> SimulatedMsiVector:
        vector = SimulatedMsiVector()
        self.vectors.append(vector)
        return vector

    def irq(self, gsi: int) -> RecordingInterrupt:
        return self.lines.setdefault(gsi, RecordingInterrupt())

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.watches[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.watches.pop(fd, None)

    def map_ram(self, gpa: int, buffer: mmap.mmap, log_dirty: bool = False) -> SimulatedRamMapping:
        """Record a mapping; refused like KVM refuses a memory slot: a range that is not
        page-aligned (EINVAL) or overlaps guest RAM or another open mapping (EEXIST)."""
        size = len(buffer)
        if size <= 0 or size % PAGE_SIZE or gpa < 0 or gpa % PAGE_SIZE:
            raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.EINVAL, f"{gpa:#x}+{size:#x}")
        taken = [(r.gpa, r.size) for r in self.memory.regions]
        taken += [(m.gpa, m.size) for m in self.mappings if not m.closed]
        if any(start < gpa + size and gpa < start + length for start, length in taken):
            raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.EEXIST, f"{gpa:#x}+{size:#x}")
        mapping = SimulatedRamMapping(gpa, buffer, log_dirty)
        self.mappings.append(mapping)
        return mapping

    def open_mappings(self) -> list[SimulatedRamMapping]:
        return [m for m in self.mappings if not m.closed]

    def poll(self) -> None:
        """Run what the host I/O loop would: watches on readable fds, MSI deliveries."""
        if self.watches:
            ready, _, _ = select.select(list(self.watches), [], [], 0)
            for fd in ready:
                callback = self.watches.get(fd)
                if callback is not None:
                    callback()
        for vector in self.vectors:
            if not vector.closed:
                vector.poll()
