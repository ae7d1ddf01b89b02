"""ACPI tables for the iovirt PC board (ACPI 6.x): RSDP, XSDT, FADT, MADT and DSDT.

What they tell the OS:

- the FADT: a *hardware-reduced* ACPI platform (ACPI 6.x, 4.1): no PM1 blocks, no SCI, no
  PM timer, no FACS; power-off goes through the 8-bit SLEEP_CONTROL/SLEEP_STATUS
  registers at ``sleep_port`` (:mod:`iovirt.devices.acpi_pm`). IAPC_BOOT_ARCH says an
  8042 and legacy ISA devices are present, so Linux still probes the i8042.
- the MADT: one enabled local APIC per vCPU (APIC IDs 0..n-1), one IOAPIC (ID n, 24 pins,
  GSI base 0), NMI on LINT1. There is no interrupt source override: KVM's routing here is
  the identity (ISA IRQ n -> IOAPIC pin n, the in-kernel PIT included; see
  ``iovirt.kvm.vm``), which is also what ACPI assumes without overrides, and what the MP
  table says.
- the DSDT: ``\\_S5`` (SLP_TYP 5) and, under ``\\_SB``, the PCI root bridge ``PCI0``
  (PNP0A03: bus 0-255, configuration mechanism #1 at 0xCF8, the I/O windows around it,
  the 32-bit memory window for BARs, and ``_PRT`` routing slot s pin p to GSI
  16 + (s + p) % 8), the legacy devices COM1, KBD and RTC, and one ``LNRO0005`` device
  per virtio-mmio transport with a level-triggered, active-high Interrupt descriptor (the
  extended descriptor carries the trigger mode, so no MADT override is needed).

Placement: :func:`build_acpi_tables` lays the tables out from ``base`` in one blob: the
RSDP first (16-byte aligned, so Linux finds it by scanning 0xE0000-0xFFFFF when the boot
loader does not pass ``acpi_rsdp_addr``), then XSDT, FADT, MADT and DSDT, each 16-byte
aligned. Every pointer is a 32-bit address; below 1 MiB the blob must end by 1 MiB.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from iovirt.boot import layout
from iovirt.boot.aml import (
    Term,
    device,
    dword_memory,
    eisa_id,
    extended_interrupt,
    io_port,
    irq_no_flags,
    memory32_fixed,
    name,
    package,
    resource_template,
    scope,
    word_bus_number,
    word_io,
)
from iovirt.boot.mptable import APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE
from iovirt.devices.acpi_pm import (
    ACPI_SLEEP_REGS_SIZE,
    DEFAULT_SLEEP_PORT,
    SLEEP_CONTROL,
    SLEEP_STATUS,
    SLP_TYP_S5,
)

# Identification in every table header.
OEM_ID = b"IOVIRT"
OEM_TABLE_ID = b"IOVIRTPC"
OEM_REVISION = 1
CREATOR_ID = b"IOVT"
CREATOR_REVISION = 1

TABLE_ALIGN = 16
RSDP_ALIGN = 16  # the OS scans for the signature on 16-byte boundaries

# Root System Description Pointer (5.2.5.3): revision 2 carries the XSDT address.
RSDP = struct.Struct("<8sB6sBIIQB3x")
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2
RSDP_V1_LENGTH = 20  # what the first checksum covers
RSDP_CHECKSUM_OFFSET = 8
RSDP_EXTENDED_CHECKSUM_OFFSET = 32

# System description table header (5.2.6).
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_CHECKSUM_OFFSET = 9

XSDT_REVISION = 1
DSDT_REVISION = 2  # 2 and up: AML integers are 64-bit
MADT_REVISION = 4  # ACPI 6.0 errata A
FADT_REVISION = 6  # ACPI 6.0: adds the hypervisor vendor identity
FADT_MINOR_VERSION = 0

# FADT field offsets (5.2.9, table 5.9) and length.
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_MINOR_VERSION_OFFSET = 131
FADT_X_DSDT = 140
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR_ID = 268
FADT_LENGTH = 276
HYPERVISOR_VENDOR_ID = b"IOVIRT\0\0"

# FADT flags (table 5.10).
FADT_F_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_F_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_F_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (table 5.11).
IAPC_LEGACY_DEVICES = 1 << 0  # ISA/LPC devices (COM1, RTC) are present
IAPC_8042 = 1 << 1  # an 8042 keyboard controller is present

# Generic Address Structure (5.2.3.2).
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# MADT (5.2.12): header fields, flags and interrupt controller structure types.
MADT_FLAGS = struct.Struct("<II")
MADT_PCAT_COMPAT = 1 << 0  # a dual 8259 is present too
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_APIC_STRUCT = struct.Struct("<BBBBI")
MADT_IO_APIC_STRUCT = struct.Struct("<BBBBII")
MADT_LOCAL_APIC_NMI_STRUCT = struct.Struct("<BBBHB")
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF
NMI_LINT = 1
MAX_CPUS = 254  # xAPIC IDs 0..254 hold the CPUs and the IOAPIC; 255 is broadcast
IOAPIC_PINS = 24

# The board's legacy ISA devices: the PC's fixed resources.
COM1_PORT, COM1_PORTS, COM1_IRQ = 0x3F8, 8, 4
I8042_DATA_PORT, I8042_COMMAND_PORT, I8042_IRQ = 0x60, 0x64, 1
I8042_AUX_IRQ = 12
RTC_PORT, RTC_PORTS, RTC_IRQ = 0x70, 2, 8
PIT_GSI = 0  # KVM's in-kernel PIT drives GSI 0

# PCI: bus 0 behind configuration mechanism #1, INTx swizzled over GSIs 16-23.
PCI_CONFIG_PORT, PCI_CONFIG_PORTS = 0xCF8, 8
PCI_IO_END = 0xFFFF
IO_PORT_LIMIT = 0x1_0000
PCI_MAX_BUS = 0xFF
PCI_SLOTS = 32
PCI_PINS = 4  # INTA-INTD
PCI_INTX_GSI_BASE = 16
PCI_INTX_GSIS = 8
DEFAULT_PCI_WINDOW = (0xC000_0000, 0xFC00_0000)

VIRTIO_MMIO_HID = "LNRO0005"  # what Linux's virtio_mmio driver matches in ACPI
MAX_MMIO_DEVICES = 256  # DSDT names VR00..VRFF
FOUR_GIB = 1 << 32


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out from ``base``: write ``blob`` there."""

    base: int
    blob: bytes
    rsdp_address: int
    xsdt_address: int
    fadt_address: int
    madt_address: int
    dsdt_address: int


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with it in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    header = SDT_HEADER.pack(
        signature,
        SDT_HEADER.size + len(body),
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[SDT_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def build_rsdp(xsdt_address: int) -> bytes:
    """The RSDP (36 bytes): revision 2, no RSDT, the XSDT pointer, both checksums."""
    rsdp = bytearray(
        RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP.size, xsdt_address, 0)
    )
    rsdp[RSDP_CHECKSUM_OFFSET] = checksum(rsdp[:RSDP_V1_LENGTH])
    rsdp[RSDP_EXTENDED_CHECKSUM_OFFSET] = checksum(rsdp)
    return bytes(rsdp)


def build_xsdt(table_addresses: Sequence[int]) -> bytes:
    """The XSDT: 64-bit pointers to every other table but the DSDT (the FADT has it)."""
    return _sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_addresses))


def _io_register(port: int) -> bytes:
    """A GAS for one 8-bit register in I/O space."""
    return GAS.pack(GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


def build_fadt(dsdt_address: int, sleep_port: int = DEFAULT_SLEEP_PORT) -> bytes:
    """A revision-6 FADT for a hardware-reduced platform (see the module docstring)."""
    table = bytearray(FADT_LENGTH)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, table, offset, *values)

    put(FADT_FIRMWARE_CTRL, "<I", 0)  # no FACS: allowed for hardware-reduced ACPI
    put(FADT_DSDT, "<I", dsdt_address)
    put(FADT_IAPC_BOOT_ARCH, "<H", IAPC_LEGACY_DEVICES | IAPC_8042)
    put(FADT_FLAGS, "<I", FADT_F_HW_REDUCED_ACPI | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON)
    put(FADT_MINOR_VERSION_OFFSET, "<B", FADT_MINOR_VERSION)
    put(FADT_X_DSDT, "<Q", dsdt_address)
    table[FADT_SLEEP_CONTROL_REG : FADT_SLEEP_CONTROL_REG + GAS.size] = _io_register(
        sleep_port + SLEEP_CONTROL
    )
    table[FADT_SLEEP_STATUS_REG : FADT_SLEEP_STATUS_REG + GAS.size] = _io_register(
        sleep_port + SLEEP_STATUS
    )
    put(FADT_HYPERVISOR_VENDOR_ID, "8s", HYPERVISOR_VENDOR_ID)
    return _sdt(b"FACP", FADT_REVISION, bytes(table[SDT_HEADER.size :]))


def build_madt(cpus: int) -> bytes:
    """The MADT: a local APIC per vCPU, the IOAPIC with ID ``cpus``, NMI on LINT1."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"the MADT describes 1 to {MAX_CPUS} CPUs, not {cpus}")
    entries = [MADT_FLAGS.pack(APIC_DEFAULT_BASE, MADT_PCAT_COMPAT)]
    for cpu in range(cpus):
        # ACPI processor UID = APIC ID = vCPU index.
        entries.append(
            MADT_LOCAL_APIC_STRUCT.pack(
                MADT_LOCAL_APIC, MADT_LOCAL_APIC_STRUCT.size, cpu, cpu, LOCAL_APIC_ENABLED
            )
        )
    entries.append(
        MADT_IO_APIC_STRUCT.pack(
            MADT_IO_APIC, MADT_IO_APIC_STRUCT.size, cpus, 0, IOAPIC_DEFAULT_BASE, 0
        )
    )
    # Flags 0: polarity and trigger conform to the bus (NMI is edge, active high).
    entries.append(
        MADT_LOCAL_APIC_NMI_STRUCT.pack(
            MADT_LOCAL_APIC_NMI, MADT_LOCAL_APIC_NMI_STRUCT.size, ALL_PROCESSORS, 0, NMI_LINT
        )
    )
    return _sdt(b"APIC", MADT_REVISION, b"".join(entries))


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The GSI of INTx pin ``pin`` (0 = INTA) of bus 0 slot ``slot``: the usual swizzle,
    spread over the eight IOAPIC pins above the ISA IRQs."""
    return PCI_INTX_GSI_BASE + (slot + pin) % PCI_INTX_GSIS


def _pci_root(pci_window: tuple[int, int]) -> Term:
    start, end = pci_window
    routes = [
        # Address: the slot in the high word, any function (0xFFFF); Source 0: the last
        # field is a GSI rather than an index into a link device.
        package(slot << 16 | 0xFFFF, pin, 0, pci_intx_gsi(slot, pin))
        for slot in range(1, PCI_SLOTS)
        for pin in range(PCI_PINS)
    ]
    return device(
        "PCI0",
        # PCI, not PCIe: there is no MCFG/ECAM. No _ADR: a device has _HID or _ADR, and
        # a root bridge is found by its _HID.
        name("_HID", eisa_id("PNP0A03")),
        name("_SEG", 0),
        name("_UID", 0),
        name("_BBN", 0),
        name(
            "_CRS",
            resource_template(
                word_bus_number(0, PCI_MAX_BUS),
                io_port(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORTS),
                word_io(0, PCI_CONFIG_PORT - 1),
                word_io(PCI_CONFIG_PORT + PCI_CONFIG_PORTS, PCI_IO_END),
                dword_memory(start, end - 1),
            ),
        ),
        name("_PRT", package(*routes)),
    )


def _legacy_devices() -> list[Term]:
    return [
        device(
            "COM1",
            name("_HID", eisa_id("PNP0501")),  # 16550A-compatible UART
            name("_UID", 1),
            name(
                "_CRS",
                resource_template(
                    io_port(COM1_PORT, COM1_PORT, 1, COM1_PORTS), irq_no_flags(COM1_IRQ)
                ),
            ),
        ),
        device(
            "KBD",
            name("_HID", eisa_id("PNP0303")),  # IBM enhanced keyboard on an 8042
            name(
                "_CRS",
                resource_template(
                    io_port(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
                    io_port(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1),
                    irq_no_flags(I8042_IRQ),
                ),
            ),
        ),
        device(
            "MOU",
            # The 8042's auxiliary port: without it Linux's i8042 PNP probe decides the AUX
            # port is absent and never looks for the PS/2 mouse.
            name("_HID", eisa_id("PNP0F13")),  # PS/2 mouse
            name("_CRS", resource_template(irq_no_flags(I8042_AUX_IRQ))),
        ),
        device(
            "RTC",
            name("_HID", eisa_id("PNP0B00")),  # AT real-time clock
            name(
                "_CRS",
                resource_template(io_port(RTC_PORT, RTC_PORT, 1, RTC_PORTS), irq_no_flags(RTC_IRQ)),
            ),
        ),
    ]


def _virtio_mmio_device(index: int, base: int, size: int, gsi: int) -> Term:
    return device(
        f"VR{index:02X}",
        name("_HID", VIRTIO_MMIO_HID),
        name("_UID", index),
        name("_CCA", 1),  # DMA is cache-coherent (x86 assumes so anyway)
        name(
            "_CRS",
            resource_template(
                memory32_fixed(base, size),
                extended_interrupt(gsi, edge=False, active_low=False, shared=False),
            ),
        ),
    )


def _check_board(mmio_devices: Sequence[tuple[int, int, int]], pci_window: tuple[int, int]) -> None:
    start, end = pci_window
    if not 0 <= start < end <= FOUR_GIB:
        raise ValueError(f"PCI window [{start:#x}, {end:#x}) is not a 32-bit range")
    if len(mmio_devices) > MAX_MMIO_DEVICES:
        raise ValueError(f"{len(mmio_devices)} virtio-mmio devices (at most {MAX_MMIO_DEVICES})")
    reserved_gsis = {PIT_GSI, COM1_IRQ, I8042_IRQ, RTC_IRQ} | set(
        range(PCI_INTX_GSI_BASE, PCI_INTX_GSI_BASE + PCI_INTX_GSIS)
    )
    ranges = [(start, end, "the PCI window")]
    for base, size, gsi in mmio_devices:
        what = f"virtio-mmio device at {base:#x}"
        if size <= 0 or base < 0 or base + size > FOUR_GIB:
            raise ValueError(f"{what}: [{base:#x}, +{size:#x}) is not a 32-bit range")
        if not 0 <= gsi < IOAPIC_PINS or gsi in reserved_gsis:
            raise ValueError(f"{what}: GSI {gsi} is not a free IOAPIC pin")
        reserved_gsis.add(gsi)  # level-triggered and exclusive: one device per pin
        for other_start, other_end, other in ranges:
            if base < other_end and other_start < base + size:
                raise ValueError(f"{what} overlaps {other}")
        ranges.append((base, base + size, what))


def build_dsdt(
    mmio_devices: Sequence[tuple[int, int, int]] = (),
    pci_window: tuple[int, int] = DEFAULT_PCI_WINDOW,
) -> bytes:
    """The DSDT (see the module docstring). ``mmio_devices`` are ``(base, size, gsi)``;
    ``pci_window`` is ``[start, end)``, below 4 GiB."""
    _check_board(mmio_devices, pci_window)
    body = (
        # SLP_TYPa, SLP_TYPb (unused on hardware-reduced platforms), two reserved.
        name("_S5", package(SLP_TYP_S5, 0, 0, 0)),  # the DSDT's scope is the root
        scope(
            "_SB",  # at the root: \_SB
            _pci_root(pci_window),
            *_legacy_devices(),
            *(
                _virtio_mmio_device(i, base, size, gsi)
                for i, (base, size, gsi) in enumerate(mmio_devices)
            ),
        ),
    )
    return _sdt(b"DSDT", DSDT_REVISION, b"".join(body))


def _align(address: int, alignment: int) -> int:
    return (address + alignment - 1) // alignment * alignment


def build_acpi_tables(
    base: int,
    *,
    cpus: int,
    mmio_devices: Sequence[tuple[int, int, int]] = (),
    pci_window: tuple[int, int] = DEFAULT_PCI_WINDOW,
    sleep_port: int = DEFAULT_SLEEP_PORT,
) -> AcpiTables:
    """All tables, laid out from ``base`` (see the module docstring)."""
    if base < 0 or base % RSDP_ALIGN:
        raise ValueError(f"ACPI tables at {base:#x}: the RSDP needs a 16-byte aligned address")
    if not 0 < sleep_port <= IO_PORT_LIMIT - ACPI_SLEEP_REGS_SIZE:
        raise ValueError(f"ACPI sleep registers at port {sleep_port:#x}: not two I/O ports")
    dsdt = build_dsdt(mmio_devices, pci_window)
    madt = build_madt(cpus)

    # The XSDT lists the FADT and the MADT: two 8-byte pointers.
    xsdt_address = _align(base + RSDP.size, TABLE_ALIGN)
    fadt_address = _align(xsdt_address + SDT_HEADER.size + 2 * 8, TABLE_ALIGN)
    madt_address = _align(fadt_address + FADT_LENGTH, TABLE_ALIGN)
    dsdt_address = _align(madt_address + len(madt), TABLE_ALIGN)
    end = dsdt_address + len(dsdt)
    if base < layout.BIOS_AREA_END < end or end > FOUR_GIB:
        raise ValueError(
            f"ACPI tables [{base:#x}, {end:#x}) do not fit "
            f"{'below 1 MiB' if base < layout.BIOS_AREA_END else 'below 4 GiB'}"
        )

    placed = (
        (base, build_rsdp(xsdt_address)),
        (xsdt_address, build_xsdt([fadt_address, madt_address])),
        (fadt_address, build_fadt(dsdt_address, sleep_port)),
        (madt_address, madt),
        (dsdt_address, dsdt),
    )
    blob = bytearray(end - base)
    for address, table in placed:
        blob[address - base : address - base + len(table)] = table
    return AcpiTables(
        base=base,
        blob=bytes(blob),
        rsdp_address=base,
        xsdt_address=xsdt_address,
        fadt_address=fadt_address,
        madt_address=madt_address,
        dsdt_address=dsdt_address,
    )
