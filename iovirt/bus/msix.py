"""MSI-X (PCI Local Bus 3.0, 6.8.2): the capability structure, the vector table and the
pending-bit array (PBA), each table entry backed by one platform :class:`MsiVector`.

The capability lives in the function's config space (:meth:`MsixCapability.install`); the
table and PBA live in a memory BAR the function serves, which forwards accesses at their
offsets to :meth:`~MsixCapability.table_read` / :meth:`~MsixCapability.table_write` /
:meth:`~MsixCapability.pba_read`. Every write to an entry reprograms its vector's message and
mask; a vector is masked while its entry's Mask bit, the Function Mask, or a clear MSI-X
Enable says so, and a signal that arrives masked shows up as its pending bit.

Table and PBA accept only naturally aligned DWORD and QWORD accesses, as the spec lets
software use; anything else is counted in :attr:`MsixCapability.bad_accesses`, ignored on
writes and read as 0.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from iovirt.bus.pci import PCI_CAP_ID_MSIX, PCI_NUM_BARS, GuestAccessLog, PciFunction
from iovirt.platform import MsiVector, Platform

log = logging.getLogger(__name__)

# Capability structure, offsets from the capability's first byte (ID at 0, next at 1).
PCI_MSIX_FLAGS = 2  # Message Control
PCI_MSIX_TABLE = 4  # Table Offset / Table BIR
PCI_MSIX_PBA = 8  # PBA Offset / PBA BIR
PCI_MSIX_CAP_SIZE = 12

# Message Control bits.
PCI_MSIX_FLAGS_QSIZE = 0x07FF  # table size - 1
PCI_MSIX_FLAGS_MASKALL = 1 << 14  # Function Mask
PCI_MSIX_FLAGS_ENABLE = 1 << 15  # MSI-X Enable
PCI_MSIX_BIR_MASK = 0x7  # low 3 bits of Table/PBA Offset: which BAR

# Table entry layout.
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 1
# Message Address bits 1:0 are zero (the message is a DWORD write).
PCI_MSIX_ENTRY_ADDR_MASK = 0xFFFF_FFFC

MSIX_MAX_ENTRIES = 2048


def _access_ok(offset: int, size: int, length: int) -> bool:
    return size in (4, 8) and offset % size == 0 and 0 <= offset <= length - size


class MsixCapability:
    """The MSI-X capability of one function, with ``table_size`` vectors.

    ``bar``/``table_offset`` and ``pba_bar``/``pba_offset`` say where the function serves
    the table and the PBA (offsets 8-byte aligned). ``on_control_change`` is called, without
    any of this object's locks held, after the guest writes Message Control, so the function
    can stop using INTx while MSI-X is enabled.
    """

    def __init__(
        self,
        platform: Platform,
        table_size: int,
        *,
        bar: int,
        table_offset: int,
        pba_offset: int,
        pba_bar: int | None = None,
        on_control_change: Callable[[], None] | None = None,
        name: str = "msix",
    ) -> None:
        pba_bar = bar if pba_bar is None else pba_bar
        if not 1 <= table_size <= MSIX_MAX_ENTRIES:
            raise ValueError(f"MSI-X table size {table_size} is not in 1..{MSIX_MAX_ENTRIES}")
        for which, index, offset in (("table", bar, table_offset), ("PBA", pba_bar, pba_offset)):
            if not 0 <= index < PCI_NUM_BARS or offset % 8 or not 0 <= offset < 1 << 32:
                raise ValueError(f"MSI-X {which} at BAR {index} offset {offset:#x} is invalid")
        self.name = name
        self.table_size = table_size
        self.bar = bar
        self.table_offset = table_offset
        self.pba_bar = pba_bar
        self.pba_offset = pba_offset
        self.on_control_change = on_control_change
        self.bad_accesses = GuestAccessLog(name, log)
        self._lock = threading.Lock()
        self._table = bytearray(table_size * PCI_MSIX_ENTRY_SIZE)
        for i in range(table_size):  # every entry comes out of reset masked
            self._table[i * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] = 1
        self._control = table_size - 1
        self._vectors: list[MsiVector] = []
        try:
            for _ in range(table_size):
                self._vectors.append(platform.msi_vector())
        except BaseException:
            self.close()
            raise
        self._messages: list[tuple[int, int] | None] = [None] * table_size  # as programmed
        self._masked = [True] * table_size  # as programmed (platform vectors start masked)
        self._function: PciFunction | None = None
        self._cap_offset = 0

    # -- sizes -----------------------------------------------------------------------------

    @property
    def table_bytes(self) -> int:
        return self.table_size * PCI_MSIX_ENTRY_SIZE

    @property
    def pba_bytes(self) -> int:
        """The PBA: one bit per entry, in whole QWORDs."""
        return (self.table_size + 63) // 64 * 8

    # -- the capability structure ----------------------------------------------------------

    def install(self, function: PciFunction) -> int:
        """Append the capability to ``function``'s list; returns its config offset."""
        body = bytearray(PCI_MSIX_CAP_SIZE - 2)
        body[0:2] = self._control.to_bytes(2, "little")
        body[2:6] = (self.table_offset | self.bar).to_bytes(4, "little")
        body[6:10] = (self.pba_offset | self.pba_bar).to_bytes(4, "little")
        writable = bytearray(len(body))
        writable[1] = (PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE) >> 8
        self._function = function
        self._cap_offset = function.add_capability(
            PCI_CAP_ID_MSIX, bytes(body), bytes(writable), on_write=self._control_written
        )
        return self._cap_offset

    def _control_written(self, offset: int, size: int) -> None:
        assert self._function is not None
        control = self._function.config.read(self._cap_offset + PCI_MSIX_FLAGS, 2)
        with self._lock:
            changed = control != self._control
            self._control = control
            if changed:
                for i in range(self.table_size):
                    self._apply_mask(i)
        if changed and self.on_control_change is not None:
            self.on_control_change()

    @property
    def enabled(self) -> bool:
        """MSI-X Enable is set: the function must signal through the table, not INTx."""
        return bool(self._control & PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control & PCI_MSIX_FLAGS_MASKALL)

    # -- vectors ---------------------------------------------------------------------------

    def vector_eventfd(self, index: int) -> int:
        """The eventfd that signals entry ``index`` (write 1 to it to raise the vector)."""
        if not 0 <= index < self.table_size:
            raise IndexError(f"MSI-X vector {index} is not in the table")
        return self._vectors[index].eventfd

    def signal(self, index: int) -> None:
        """Raise entry ``index`` from Python (e.g. a configuration-change interrupt)."""
        os.eventfd_write(self.vector_eventfd(index), 1)

    def masked(self, index: int) -> bool:
        """Whether entry ``index`` is masked now, for any of the three reasons."""
        return self._masked[index]

    def _apply_mask(self, index: int) -> None:
        base = index * PCI_MSIX_ENTRY_SIZE
        entry_masked = self._table[base + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT
        masked = bool(entry_masked) or self.function_masked or not self.enabled
        if not masked:
            # The message is programmed before unmasking, so a pending signal is delivered
            # with what the guest wrote, never a stale message.
            self._program_message(index)
        if masked != self._masked[index]:
            self._masked[index] = masked
            self._vectors[index].set_masked(masked)

    def _program_message(self, index: int) -> None:
        base = index * PCI_MSIX_ENTRY_SIZE
        t = self._table
        address = int.from_bytes(t[base : base + 8], "little")
        data = int.from_bytes(t[base + 8 : base + 12], "little")
        if self._messages[index] != (address, data):
            self._messages[index] = (address, data)
            self._vectors[index].set_message(address, data)

    # -- table and PBA (served from a BAR) -------------------------------------------------

    def table_read(self, offset: int, size: int) -> int:
        if not _access_ok(offset, size, self.table_bytes):
            self.bad_accesses(f"guest {size}-byte table read at {offset:#x}")
            return 0
        with self._lock:
            return int.from_bytes(self._table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if not _access_ok(offset, size, self.table_bytes):
            self.bad_accesses(f"guest {size}-byte table write at {offset:#x}")
            return
        index = offset // PCI_MSIX_ENTRY_SIZE
        base = index * PCI_MSIX_ENTRY_SIZE
        with self._lock:
            entry = bytearray(self._table[base : base + PCI_MSIX_ENTRY_SIZE])
            start = offset - base
            entry[start : start + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            # Reserved bits read as zero: the low address bits, Vector Control bits 31:1.
            lower = int.from_bytes(entry[0:4], "little") & PCI_MSIX_ENTRY_ADDR_MASK
            entry[0:4] = lower.to_bytes(4, "little")
            ctrl = int.from_bytes(entry[12:16], "little") & PCI_MSIX_ENTRY_CTRL_MASKBIT
            entry[12:16] = ctrl.to_bytes(4, "little")
            self._table[base : base + PCI_MSIX_ENTRY_SIZE] = entry
            # The message follows the table even while the entry is unmasked (the spec
            # leaves that case undefined; following the guest is the least surprising).
            self._program_message(index)
            self._apply_mask(index)

    def pba_read(self, offset: int, size: int) -> int:
        if not _access_ok(offset, size, self.pba_bytes):
            self.bad_accesses(f"guest {size}-byte PBA read at {offset:#x}")
            return 0
        first = offset * 8
        value = 0
        with self._lock:
            for bit in range(min(size * 8, self.table_size - first)):
                if self._vectors[first + bit].pending:
                    value |= 1 << bit
        return value

    def pba_write(self, offset: int, size: int, value: int) -> None:
        """The PBA is read-only; software writes are ignored (and odd ones counted)."""
        if not _access_ok(offset, size, self.pba_bytes):
            self.bad_accesses(f"guest {size}-byte PBA write at {offset:#x}")

    def close(self) -> None:
        """Release every vector (routes, irqfds, eventfds)."""
        for vector in self._vectors:
            vector.close()
        self._vectors.clear()
