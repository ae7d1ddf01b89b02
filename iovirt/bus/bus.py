"""A bus dispatches guest accesses (port I/O or MMIO exits) to the device that owns the
address, passing only the offset inside the device's range.

Registration refuses overlapping ranges. An access nobody claims reads as all-ones (what
an ISA/PCI bus returns when no device answers) and is logged once per address, so a
guest probing empty ports cannot flood the log.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

from iovirt.errors import BusError

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """What a device model offers a bus: accesses at offsets within its own range."""

    def read(self, offset: int, size: int) -> int:
        """Return the value of a ``size``-byte read at ``offset`` (little-endian)."""
        ...

    def write(self, offset: int, size: int, value: int) -> None:
        """Perform a ``size``-byte write of ``value`` at ``offset``."""
        ...


@dataclass(frozen=True)
class BusRange:
    """One registration: ``[base, base + size)`` belongs to ``device``."""

    base: int
    size: int
    device: BusDevice
    name: str
    end: int = field(init=False)  # a field, not a property: it is read on every dispatch

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.base + self.size)


# How many distinct unclaimed addresses get their own log line before we go quiet.
_MAX_UNCLAIMED_LOGGED = 64


class Bus:
    """An address space of device ranges (one for port I/O, one for MMIO)."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        # Lookups run on vCPU threads without a lock: they read one immutable snapshot,
        # which registration replaces whole (under the lock) instead of editing in place.
        self._table: tuple[tuple[int, ...], tuple[BusRange, ...]] = ((), ())
        self._lock = threading.Lock()
        self._unclaimed_seen: set[int] = set()
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0

    def register(self, base: int, size: int, device: BusDevice, name: str) -> BusRange:
        """Give ``[base, base + size)`` to ``device``; refuse empty or overlapping ranges."""
        if size <= 0:
            raise BusError(f"{self.name}: {name}: empty range at {base:#x}")
        if base < 0 or base + size > self.limit:
            raise BusError(
                f"{self.name}: {name}: range [{base:#x}, {base + size:#x}) "
                f"is outside the bus (limit {self.limit:#x})"
            )
        new = BusRange(base, size, device, name)
        with self._lock:
            bases, ranges = self._table
            i = bisect.bisect_right(bases, base)
            for neighbour in ranges[max(i - 1, 0) : i + 1]:
                if neighbour.base < new.end and base < neighbour.end:
                    raise BusError(
                        f"{self.name}: {name} [{base:#x}, {new.end:#x}) overlaps "
                        f"{neighbour.name} [{neighbour.base:#x}, {neighbour.end:#x})"
                    )
            self._table = ((*bases[:i], base, *bases[i:]), (*ranges[:i], new, *ranges[i:]))
        return new

    def unregister(self, registration: BusRange) -> None:
        """Remove a range handed out by :meth:`register`."""
        with self._lock:
            bases, ranges = self._table
            if registration not in ranges:
                raise BusError(f"{self.name}: {registration.name} is not registered")
            i = ranges.index(registration)
            self._table = (bases[:i] + bases[i + 1 :], ranges[:i] + ranges[i + 1 :])

    def find(self, addr: int) -> BusRange | None:
        """The range containing ``addr``, or None."""
        bases, ranges = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        return r if addr < r.end else None

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return self._table[1]

    def read(self, addr: int, size: int) -> int:
        """Dispatch a read; all-ones if no device claims the whole access."""
        r = self.find(addr)
        if r is None or addr + size > r.end:
            self.unclaimed_reads += 1
            self._log_unclaimed("read", addr, size)
            return (1 << (8 * size)) - 1
        return r.device.read(addr - r.base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        """Dispatch a write; dropped (and logged once) if no device claims it."""
        r = self.find(addr)
        if r is None or addr + size > r.end:
            self.unclaimed_writes += 1
            self._log_unclaimed("write", addr, size)
            return
        r.device.write(addr - r.base, size, value & ((1 << (8 * size)) - 1))

    def _log_unclaimed(self, kind: str, addr: int, size: int) -> None:
        if addr in self._unclaimed_seen or len(self._unclaimed_seen) >= _MAX_UNCLAIMED_LOGGED:
            return
        self._unclaimed_seen.add(addr)
        log.info("%s: unclaimed %d-byte %s at %#x", self.name, size, kind, addr)
        if len(self._unclaimed_seen) == _MAX_UNCLAIMED_LOGGED:
            log.info(
                "%s: %d unclaimed addresses seen; not logging more",
                self.name,
                _MAX_UNCLAIMED_LOGGED,
            )
