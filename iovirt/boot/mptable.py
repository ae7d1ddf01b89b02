"""Intel MultiProcessor Specification 1.4 tables: CPUs, the IOAPIC and ISA interrupt wiring.

Why an MP table and not ACPI: it is the smallest description Linux accepts for what this
board has (n CPUs with local APICs, one IOAPIC, ISA IRQs wired 1:1 to IOAPIC pins as KVM's
default GSI routing does, a PCI bus 0), it needs no AML, and Firecracker and kvmtool boot
Linux the same way. Power-off and virtio-mmio discovery will need ACPI; that comes with
the devices that need it.

Placement: the floating pointer and the configuration table go at the start of the EBDA
(the e820 map reserves it); Linux scans the first KiB of the EBDA for ``_MP_``.
"""

from __future__ import annotations

import struct

from iovirt.boot import layout

APIC_DEFAULT_BASE = 0xFEE0_0000
IOAPIC_DEFAULT_BASE = 0xFEC0_0000
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
MP_SPEC_REV = 4  # 1.4

# Entry types.
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

# Processor flags.
CPU_ENABLED = 0x01
CPU_BOOTPROCESSOR = 0x02
# Interrupt types.
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3

PCI_BUS_ID = 0
ISA_BUS_ID = 1
ISA_IRQS = 16
# Family 6 signature and the FPU + APIC feature flags, enough for the kernel's sanity checks.
CPU_SIGNATURE = 0x600
CPU_FEATURES = 0x201


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(vcpus: int, base: int = layout.EBDA_START) -> bytes:
    """The floating pointer followed by the configuration table, for placement at ``base``."""
    if not 1 <= vcpus <= 254:
        raise ValueError("the MP table describes 1 to 254 CPUs")
    ioapic_id = vcpus  # APIC IDs 0..n-1 are the CPUs
    entries: list[bytes] = []
    for cpu in range(vcpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBII8x", MP_PROCESSOR, cpu, APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES
            )
        )
    entries.append(struct.pack("<BB6s", MP_BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(
        struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_DEFAULT_BASE)
    )
    for irq in range(ISA_IRQS):
        # ISA IRQ n -> IOAPIC pin n, the identity KVM's default routing implements.
        entries.append(
            struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, ISA_BUS_ID, irq, ioapic_id, irq)
        )
    # Virtual-wire mode: the PIC's output on LINT0 (ExtINT), NMI on LINT1, all CPUs.
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, ISA_BUS_ID, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, ISA_BUS_ID, 0, 0xFF, 1))

    body = b"".join(entries)
    header_size = 44
    table_addr = base + 16
    header = struct.pack(
        "<4sHBB8s12sIHHIHBB",
        b"PCMP",
        header_size + len(body),
        MP_SPEC_REV,
        0,
        b"IOVIRT  ",
        b"iovirt-pc   ",
        0,
        0,
        len(entries),
        APIC_DEFAULT_BASE,
        0,
        0,
        0,
    )
    table = bytearray(header + body)
    table[7] = _checksum(bytes(table))

    floating = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", table_addr, 1, MP_SPEC_REV, 0, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating) + bytes(table)
