"""PCI: configuration space, the ``PciDevice`` protocol, PCI functions with BARs and a
capability list, and the host bridge that answers configuration mechanism #1 (ports 0xCF8
address / 0xCFC data) for bus 0.

Every device on bus 0 is reached through :class:`PciRoot`; an empty slot reads as all-ones
(vendor 0xFFFF), which is how the guest's bus scan learns the slot is empty.

A :class:`PciFunction` owns its configuration space, its base address registers (BARs), its
capability list and its INTx pin. :meth:`PciRoot.add` gives each BAR an address in the PCI
windows, as firmware would; the BAR's :class:`~iovirt.bus.bus.BusDevice` is registered on the
MMIO or port bus only while the guest has the matching decode bit set in COMMAND, and moves
when the guest reprograms the BAR.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from iovirt.bus.bus import Bus, BusDevice, BusRange
from iovirt.errors import BusError
from iovirt.interrupt import Interrupt

log = logging.getLogger(__name__)

# Configuration space header (type 0) offsets.
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_CONFIG_SPACE_SIZE = 256
PCI_CLASS_BRIDGE_HOST = 0x0600

# COMMAND register bits.
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_INTX_DISABLE = 0x0400

# STATUS register bits.
PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010

# BAR register low bits (read-only: they tell the guest what kind of BAR it is).
PCI_NUM_BARS = 6
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_FLAGS = 0x0F  # bits below the address in a memory BAR
PCI_BASE_ADDRESS_IO_FLAGS = 0x03  # bits below the address in an I/O BAR

# Interrupt pin register values.
PCI_INTERRUPT_PIN_NONE = 0
PCI_INTERRUPT_PIN_A = 1
PCI_INTERRUPT_LINE_UNKNOWN = 0xFF

# Capability list: IDs, and where the list may live (after the 64-byte header).
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_LIST_START = 0x40
PCI_CAP_HEADER_SIZE = 2  # capability ID, next pointer

# Smallest BAR sizes the PCI spec allows (memory BARs decode at least 16 bytes).
PCI_BAR_MIN_MEM_SIZE = 16
PCI_BAR_MIN_IO_SIZE = 4

# CONFIG_ADDRESS (0xCF8): enable, bus, device, function, register.
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_PORTS = 8  # 0xCF8-0xCFF

# Where PciRoot.add places BARs: the 32-bit hole under 4 GiB (guest RAM stops at 3 GiB,
# the IOAPIC/LAPIC/firmware live from 0xFC00_0000 up), and the PC's high I/O ports.
PCI_MEM_WINDOW = (0xC000_0000, 0xFC00_0000)
PCI_IO_WINDOW = (0xC000, 0x1_0000)

# Host bridge identity: the same Intel ID Cloud Hypervisor gives its host bridge; Linux has
# no quirks keyed on it, so the guest treats it as a plain host bridge.
HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x0D57


class PciDevice(Protocol):
    """A function on the PCI bus, as its configuration space sees accesses."""

    def config_read(self, offset: int, size: int) -> int:
        """``size``-byte read (1, 2, 4) at ``offset`` (0-255), naturally aligned."""
        ...

    def config_write(self, offset: int, size: int, value: int) -> None:
        """``size``-byte write at ``offset``; read-only bits keep their value."""
        ...


class GuestAccessLog:
    """Counts a device's odd guest accesses (or errors a guest can provoke) and logs the
    first ``limit`` of them: the guest is hostile and must not be able to flood the log."""

    def __init__(
        self, name: str, logger: logging.Logger, limit: int = 16, what: str = "odd guest accesses"
    ) -> None:
        self.name = name
        self.count = 0
        self._log = logger
        self._limit = limit
        self._what = what

    def __call__(self, message: str) -> None:
        self.count += 1
        if self.count <= self._limit:
            self._log.warning("%s: %s", self.name, message)
            if self.count == self._limit:
                self._log.warning(
                    "%s: %d %s; counting silently from now on", self.name, self.count, self._what
                )


class PciConfigSpace:
    """256 bytes of configuration space with a per-byte writable mask.

    Devices build their header here and decide what the guest may change; writes only
    touch bits in the mask, so identification registers stay read-only.
    """

    def __init__(
        self, vendor: int, device: int, class_code: int, revision: int = 0, header_type: int = 0
    ) -> None:
        self.data = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.writable = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.set16(PCI_VENDOR_ID, vendor)
        self.set16(PCI_DEVICE_ID, device)
        self.data[PCI_REVISION_ID] = revision
        self.data[PCI_CLASS_PROG] = class_code & 0xFF
        self.set16(PCI_CLASS_DEVICE, class_code >> 8)
        self.data[PCI_HEADER_TYPE] = header_type
        # Command register: I/O, memory, bus master, INTx disable are the guest's to set.
        self.writable[PCI_COMMAND] = 0x07
        self.writable[PCI_COMMAND + 1] = 0x04

    def set16(self, offset: int, value: int) -> None:
        self.data[offset : offset + 2] = value.to_bytes(2, "little")

    def set32(self, offset: int, value: int) -> None:
        self.data[offset : offset + 4] = value.to_bytes(4, "little")

    @staticmethod
    def valid(offset: int, size: int) -> bool:
        """Whether ``(offset, size)`` is an access config space answers (aligned, inside)."""
        return (
            size in (1, 2, 4) and offset % size == 0 and 0 <= offset <= PCI_CONFIG_SPACE_SIZE - size
        )

    def read(self, offset: int, size: int) -> int:
        if not self.valid(offset, size):
            return (1 << (8 * max(size, 1))) - 1
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not self.valid(offset, size):
            return
        for i in range(size):
            mask = self.writable[offset + i]
            byte = (value >> (8 * i)) & 0xFF
            self.data[offset + i] = (self.data[offset + i] & ~mask) | (byte & mask)


class PciHostBridge:
    """Bus 0, device 0: the host bridge the guest's PCI probe looks for."""

    def __init__(self) -> None:
        self.config = PciConfigSpace(
            HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, PCI_CLASS_BRIDGE_HOST << 8
        )

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)


class BarKind(enum.Enum):
    """What a BAR decodes: 32-bit memory, 64-bit memory (two registers), or port I/O."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(eq=False)
class PciBar:
    """One BAR a function declares, and where it is mapped now.

    ``on_map`` is called with the new bus address whenever the BAR is registered somewhere
    else, and with None when it stops being decoded (so a device can move its ioeventfds).
    """

    index: int
    size: int
    kind: BarKind
    device: BusDevice
    prefetchable: bool = False
    on_map: Callable[[int | None], None] | None = None
    name: str = ""
    mapped: int | None = None  # the address it is registered at on its bus, if any
    registration: BusRange | None = field(default=None, repr=False)

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        flags = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return flags | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def address_mask(self) -> int:
        """The BAR's writable address bits (64-bit for MEM64): what sizing reads back."""
        width = 64 if self.kind is BarKind.MEM64 else 32
        low = PCI_BASE_ADDRESS_IO_FLAGS if self.is_io else PCI_BASE_ADDRESS_MEM_FLAGS
        return ~(self.size - 1) & ~low & ((1 << width) - 1)


@dataclass(eq=False)
class _Capability:
    offset: int
    length: int
    on_read: Callable[[int, int], None] | None
    on_write: Callable[[int, int], None] | None


class PciFunction:
    """A type-0 PCI function: config space header, BARs, capability list, INTx pin.

    Subclasses (device transports) declare BARs with :meth:`add_bar` and capabilities with
    :meth:`add_capability`, then are handed to :meth:`PciRoot.add`. All state changes take
    :attr:`lock` (re-entrant), which subclasses use as their own lock too, so BAR moves,
    capability hooks and BAR accesses are serialized with one lock.
    """

    def __init__(
        self,
        vendor: int,
        device: int,
        class_code: int,
        *,
        revision: int = 0,
        subsystem_vendor: int = 0,
        subsystem_id: int = 0,
        intx: Interrupt | None = None,
        interrupt_line: int = PCI_INTERRUPT_LINE_UNKNOWN,
        name: str = "pci-function",
    ) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.config = PciConfigSpace(vendor, device, class_code, revision)
        self.config.set16(PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor)
        self.config.set16(PCI_SUBSYSTEM_ID, subsystem_id)
        # The line register is scratch space for the OS (firmware writes the IRQ it routed);
        # the pin says which INTx pin the function drives, if any.
        self.config.writable[PCI_INTERRUPT_LINE] = 0xFF
        self.config.data[PCI_INTERRUPT_LINE] = interrupt_line & 0xFF
        self.config.data[PCI_INTERRUPT_PIN] = (
            PCI_INTERRUPT_PIN_A if intx is not None else PCI_INTERRUPT_PIN_NONE
        )
        self.bars: dict[int, PciBar] = {}
        self._capabilities: list[_Capability] = []
        self._intx = intx
        self._intx_asserted = False
        self._intx_level = False  # what the line is driven to now
        self._mmio: Bus | None = None
        self._pio: Bus | None = None
        self.mapping_conflicts = GuestAccessLog(name, log, limit=1, what="refused BAR mappings")

    # -- declaration (before the function is on the bus) -----------------------------------

    def add_bar(
        self,
        index: int,
        size: int,
        kind: BarKind,
        device: BusDevice,
        *,
        prefetchable: bool = False,
        on_map: Callable[[int | None], None] | None = None,
    ) -> PciBar:
        """Declare BAR ``index`` of ``size`` bytes (a power of two) served by ``device``."""
        minimum = PCI_BAR_MIN_IO_SIZE if kind is BarKind.IO else PCI_BAR_MIN_MEM_SIZE
        if size < minimum or size & (size - 1):
            raise ValueError(
                f"{self.name}: BAR {index} size {size:#x} is not a power of two >= {minimum}"
            )
        if kind is not BarKind.MEM64 and size > 1 << 31:
            raise ValueError(f"{self.name}: BAR {index} of {size:#x} bytes needs a 64-bit BAR")
        if kind is BarKind.IO and prefetchable:
            raise ValueError(f"{self.name}: an I/O BAR cannot be prefetchable")
        slots = (index, index + 1) if kind is BarKind.MEM64 else (index,)
        if not all(0 <= s < PCI_NUM_BARS for s in slots) or any(
            s in self._bar_slots() for s in slots
        ):
            raise ValueError(f"{self.name}: BAR {index} ({kind.value}) is taken or invalid")
        bar = PciBar(index, size, kind, device, prefetchable, on_map, f"{self.name} BAR{index}")
        self.bars[index] = bar
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        mask = bar.address_mask
        self.config.set32(reg, bar.flags)
        self.config.writable[reg : reg + 4] = (mask & 0xFFFF_FFFF).to_bytes(4, "little")
        if kind is BarKind.MEM64:
            self.config.set32(reg + 4, 0)
            self.config.writable[reg + 4 : reg + 8] = (mask >> 32).to_bytes(4, "little")
        return bar

    def _bar_slots(self) -> set[int]:
        slots = set()
        for bar in self.bars.values():
            slots.add(bar.index)
            if bar.kind is BarKind.MEM64:
                slots.add(bar.index + 1)
        return slots

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        writable: bytes | None = None,
        *,
        on_read: Callable[[int, int], None] | None = None,
        on_write: Callable[[int, int], None] | None = None,
    ) -> int:
        """Append a capability and return its config-space offset.

        ``body`` is the structure after the ID and next-pointer bytes; ``writable`` (same
        length) is the guest-writable bit mask of those bytes. ``on_read(offset, size)`` runs
        before a read that touches the capability (to refresh live bytes) and
        ``on_write(offset, size)`` after a write to it; offsets are relative to the
        capability's first byte.
        """
        if writable is not None and len(writable) != len(body):
            raise ValueError("writable mask must be as long as the capability body")
        length = PCI_CAP_HEADER_SIZE + len(body)
        if self._capabilities:
            last = self._capabilities[-1]
            offset = (last.offset + last.length + 3) & ~3  # capabilities are dword aligned
        else:
            offset = PCI_CAP_LIST_START
        if offset + length > PCI_CONFIG_SPACE_SIZE:
            raise ValueError(f"{self.name}: no room in config space for capability {cap_id:#x}")
        data = self.config.data
        data[offset] = cap_id
        data[offset + 1] = 0  # end of list until another capability is appended
        data[offset + 2 : offset + length] = body
        if writable is not None:
            self.config.writable[offset + 2 : offset + length] = writable
        if self._capabilities:
            data[self._capabilities[-1].offset + 1] = offset
        else:
            data[PCI_CAPABILITY_LIST] = offset
            self.config.set16(PCI_STATUS, self.config.read(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        self._capabilities.append(_Capability(offset, length, on_read, on_write))
        return offset

    # -- wiring (PciRoot) -----------------------------------------------------------------

    def bar_address(self, index: int) -> int:
        """The address BAR ``index``'s register(s) hold now (flag bits stripped)."""
        bar = self.bars[index]
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        value = int.from_bytes(self.config.data[reg : reg + 4], "little")
        if bar.kind is BarKind.MEM64:
            value |= int.from_bytes(self.config.data[reg + 4 : reg + 8], "little") << 32
        return value & bar.address_mask

    def set_bar_address(self, index: int, address: int) -> None:
        """Program BAR ``index`` as firmware does (the guest may move it later)."""
        with self.lock:
            bar = self.bars[index]
            if address & (bar.size - 1) or address & ~bar.address_mask:
                raise ValueError(f"{bar.name}: {address:#x} is not a valid address for it")
            reg = PCI_BASE_ADDRESS_0 + 4 * index
            self.config.set32(reg, (address & 0xFFFF_FFFF) | bar.flags)
            if bar.kind is BarKind.MEM64:
                self.config.set32(reg + 4, address >> 32)
            self._update_mappings()

    def attach(self, mmio: Bus | None, pio: Bus | None) -> None:
        """The buses BARs are registered on (None: that kind of BAR is never mapped)."""
        with self.lock:
            self._mmio, self._pio = mmio, pio
            self._update_mappings()

    # -- config space accesses (PciDevice) -------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        with self.lock:
            if PciConfigSpace.valid(offset, size):
                for cap in self._touched(offset, size):
                    if cap.on_read is not None:
                        cap.on_read(offset - cap.offset, size)
            return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if not PciConfigSpace.valid(offset, size):
                return
            self.config.write(offset, size, value)
            end = offset + size
            if offset < PCI_COMMAND + 2 and end > PCI_COMMAND:
                self._update_intx()
            bars_end = PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_BARS
            if (offset < PCI_COMMAND + 2 and end > PCI_COMMAND) or (
                offset < bars_end and end > PCI_BASE_ADDRESS_0
            ):
                self._update_mappings()
            for cap in self._touched(offset, size):
                if cap.on_write is not None:
                    cap.on_write(offset - cap.offset, size)

    def _touched(self, offset: int, size: int) -> list[_Capability]:
        return [
            c
            for c in self._capabilities
            if offset < c.offset + c.length and c.offset < offset + size
        ]

    @property
    def command(self) -> int:
        return self.config.read(PCI_COMMAND, 2)

    # -- INTx ------------------------------------------------------------------------------

    def set_intx(self, asserted: bool) -> None:
        """Assert or deassert INTx; COMMAND's Interrupt Disable gates the line, while
        STATUS's Interrupt Status shows the function's request regardless."""
        with self.lock:
            self._intx_asserted = asserted
            self._update_intx()

    def _update_intx(self) -> None:
        status = self.config.read(PCI_STATUS, 2) & ~PCI_STATUS_INTERRUPT
        if self._intx_asserted:
            status |= PCI_STATUS_INTERRUPT
        self.config.set16(PCI_STATUS, status)
        if self._intx is not None:
            gated = bool(self.command & PCI_COMMAND_INTX_DISABLE)
            level = self._intx_asserted and not gated
            if level != self._intx_level:  # each change is a KVM_IRQ_LINE ioctl
                self._intx_level = level
                self._intx.set_level(level)

    # -- BAR mapping -----------------------------------------------------------------------

    def _decoded_address(self, bar: PciBar) -> int | None:
        """Where the guest wants ``bar`` decoded now, or None if it should not be."""
        bus = self._pio if bar.is_io else self._mmio
        enable = PCI_COMMAND_IO if bar.is_io else PCI_COMMAND_MEMORY
        if bus is None or not self.command & enable:
            return None
        address = self.bar_address(bar.index)
        mask = bar.address_mask
        # Zero is "unassigned"; all writable bits set is the sizing pattern (in either
        # register of a 64-bit BAR), not an address anyone means.
        if address == 0 or address == mask:
            return None
        if bar.kind is BarKind.MEM64 and (
            address >> 32 == 0xFFFF_FFFF
            or (mask & 0xFFFF_FFFF and address & 0xFFFF_FFFF == mask & 0xFFFF_FFFF)
        ):
            return None
        if address + bar.size > bus.limit:
            return None
        return address

    def _update_mappings(self) -> None:
        """Bring every BAR's bus registration in line with COMMAND and the BAR registers."""
        wanted = {i: self._decoded_address(bar) for i, bar in self.bars.items()}
        moved: list[PciBar] = []
        # Unregister everything that moves first, so BARs may swap places.
        for i, bar in self.bars.items():
            if wanted[i] != bar.mapped and bar.registration is not None:
                self._bus(bar).unregister(bar.registration)
                bar.registration = None
        for i, bar in self.bars.items():
            address = wanted[i]
            if address == bar.mapped:
                continue
            new: int | None = None
            if address is not None:
                try:
                    bar.registration = self._bus(bar).register(
                        address, bar.size, bar.device, bar.name
                    )
                    new = address
                except BusError as e:
                    self.mapping_conflicts(f"guest BAR mapping refused: {e}")
            if new != bar.mapped:
                bar.mapped = new
                moved.append(bar)
        for bar in moved:
            if bar.on_map is not None:
                bar.on_map(bar.mapped)

    def _bus(self, bar: PciBar) -> Bus:
        bus = self._pio if bar.is_io else self._mmio
        assert bus is not None  # only mapped BARs are registered, and only with a bus
        return bus


class PciRoot:
    """Configuration mechanism #1 over ports 0xCF8-0xCFF, for the functions of bus 0.

    Registered on the port bus at 0xCF8 with 8 ports: offsets 0-3 are CONFIG_ADDRESS
    (only whole 32-bit accesses, as on real chipsets, so byte probes of 0xCFB for
    mechanism #2 do not disturb it), offsets 4-7 are CONFIG_DATA.

    ``mmio`` and ``pio`` are the buses BARs are mapped on; without them BARs still get
    addresses but are never registered. BARs are placed in ``mem_window`` (32- and 64-bit
    memory BARs alike) and ``io_window``.
    """

    def __init__(
        self,
        mmio: Bus | None = None,
        pio: Bus | None = None,
        *,
        mem_window: tuple[int, int] = PCI_MEM_WINDOW,
        io_window: tuple[int, int] = PCI_IO_WINDOW,
    ) -> None:
        self._address = 0
        self._lock = threading.Lock()
        self.functions: dict[int, PciDevice] = {0: PciHostBridge()}  # devfn -> function
        self.mmio = mmio
        self.pio = pio
        self._mem_next, self._mem_end = mem_window
        self._io_next, self._io_end = io_window

    def add(self, device: PciDevice, slot: int | None = None, function: int = 0) -> int:
        """Put ``device`` in ``slot`` (the first free one if None); returns the devfn.

        A :class:`PciFunction`'s BARs get naturally aligned addresses in the windows."""
        if slot is None:
            slot = self.free_slot(function)
            if slot is None:
                raise ValueError("no free PCI slot on bus 0")
        devfn = slot << 3 | function
        if not 0 <= slot < 32 or not 0 <= function < 8 or devfn in self.functions:
            raise ValueError(f"PCI slot {slot}.{function} is taken or invalid")
        if isinstance(device, PciFunction):
            self._assign_bars(device)
            device.attach(self.mmio, self.pio)
        self.functions[devfn] = device
        return devfn

    def free_slot(self, function: int = 0) -> int | None:
        """The first slot whose ``function`` is free (slot 0 is the host bridge's), or None."""
        free = (s for s in range(1, 32) if (s << 3 | function) not in self.functions)
        return next(free, None)

    def _assign_bars(self, device: PciFunction) -> None:
        """Give every BAR an address, largest first (less padding), or raise ValueError
        without using up any window space."""
        mem_next, io_next = self._mem_next, self._io_next
        plan: list[tuple[int, int]] = []
        for bar in sorted(device.bars.values(), key=lambda b: -b.size):
            if bar.is_io:
                address = (io_next + bar.size - 1) & ~(bar.size - 1)
                io_next = address + bar.size
                full = io_next > self._io_end
            else:
                address = (mem_next + bar.size - 1) & ~(bar.size - 1)
                mem_next = address + bar.size
                full = mem_next > self._mem_end
            if full:
                raise ValueError(f"{bar.name}: no room for {bar.size:#x} bytes in the PCI window")
            plan.append((bar.index, address))
        for index, address in plan:
            device.set_bar_address(index, address)
        self._mem_next, self._io_next = mem_next, io_next

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset < 4:
                return self._address if (offset, size) == (0, 4) else (1 << (8 * size)) - 1
            target = self._target(offset - 4, size)
        if target is None:
            return (1 << (8 * size)) - 1
        device, reg = target
        return device.config_read(reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset < 4:
                if (offset, size) == (0, 4):
                    self._address = value & 0x80FF_FFFC
                return
            target = self._target(offset - 4, size)
        if target is not None:
            device, reg = target
            device.config_write(reg, size, value)

    def _target(self, byte: int, size: int) -> tuple[PciDevice, int] | None:
        """The function and register CONFIG_ADDRESS selects, or None (all-ones)."""
        address = self._address
        if not address & CONFIG_ADDRESS_ENABLE or (address >> 16) & 0xFF != 0:
            return None  # disabled, or a bus other than 0: nobody there
        if byte % size:
            return None
        device = self.functions.get((address >> 8) & 0xFF)
        if device is None:
            return None
        return device, (address & 0xFC) + byte
