"""A simulator of :class:`iovirt.platform.Platform` for unit tests of device transports.

This is a simulator, not a VMM: ioeventfds are only recorded (a transport also handles the
notify write itself, so kicks still arrive), MSI deliveries are counted by draining each
vector's eventfd in :meth:`SimulatedPlatform.poll`, and fd watches run when a test calls
:meth:`poll`. The real implementation (:mod:`iovirt.kvm.platform`) is exercised by the
host and lab tiers, where a stock Linux guest drives the transports.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable

from iovirt.interrupt import RecordingInterrupt
from iovirt.memory import GuestMemory


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


class SimulatedPlatform:
    """Records what a transport asks of the VMM; see the module docstring."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.ioeventfds: set[tuple[int, int, int, int | None]] = set()
        self.vectors: list[SimulatedMsiVector] = []
        self.lines: dict[int, RecordingInterrupt] = {}
        self.watches: dict[int, Callable[[], None]] = {}

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
