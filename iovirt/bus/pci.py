"""PCI: configuration space, the ``PciDevice`` protocol, and the host bridge that answers
configuration mechanism #1 (ports 0xCF8 address / 0xCFC data) for bus 0.

Every device on bus 0 is reached through :class:`PciRoot`; an empty slot reads as all-ones
(vendor 0xFFFF), which is how the guest's bus scan learns the slot is empty.
"""

from __future__ import annotations

import threading
from typing import Protocol

# Configuration space header (type 0) offsets.
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_HEADER_TYPE = 0x0E
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E

PCI_CONFIG_SPACE_SIZE = 256
PCI_CLASS_BRIDGE_HOST = 0x0600

# CONFIG_ADDRESS (0xCF8): enable, bus, device, function, register.
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_PORTS = 8  # 0xCF8-0xCFF

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

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size or offset + size > PCI_CONFIG_SPACE_SIZE:
            return (1 << (8 * max(size, 1))) - 1
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size or offset + size > PCI_CONFIG_SPACE_SIZE:
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


class PciRoot:
    """Configuration mechanism #1 over ports 0xCF8-0xCFF, for the functions of bus 0.

    Registered on the port bus at 0xCF8 with 8 ports: offsets 0-3 are CONFIG_ADDRESS
    (only whole 32-bit accesses, as on real chipsets, so byte probes of 0xCFB for
    mechanism #2 do not disturb it), offsets 4-7 are CONFIG_DATA.
    """

    def __init__(self) -> None:
        self._address = 0
        self._lock = threading.Lock()
        self.functions: dict[int, PciDevice] = {0: PciHostBridge()}  # devfn -> function

    def add(self, device: PciDevice, slot: int | None = None, function: int = 0) -> int:
        """Put ``device`` in ``slot`` (the first free one if None); returns the devfn."""
        if slot is None:
            free = (s for s in range(1, 32) if (s << 3 | function) not in self.functions)
            slot = next(free, None)
            if slot is None:
                raise ValueError("no free PCI slot on bus 0")
        devfn = slot << 3 | function
        if not 0 <= slot < 32 or not 0 <= function < 8 or devfn in self.functions:
            raise ValueError(f"PCI slot {slot}.{function} is taken or invalid")
        self.functions[devfn] = device
        return devfn

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
