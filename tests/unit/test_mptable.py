"""Tests of the MP table, read back with a parser written from the Intel MP spec 1.4.

The parser below follows the spec's layouts (chapter 4: the 16-byte floating pointer
structure, the 44-byte configuration table header, and the base table entries: processor
20 bytes, bus / I/O APIC / I/O interrupt / local interrupt 8 bytes each), not the builder's
code, so a field the builder packs in the wrong place shows up as a wrong value here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from iovirt.boot import layout
from iovirt.boot.mptable import build_mptable

EBDA_SCAN_WINDOW = 0x400  # Linux scans the last KiB of base memory (639 KiB) for "_MP_"

# Entry types (MP spec table 4-3).
PROCESSOR, BUS, IOAPIC, IO_INTERRUPT, LOCAL_INTERRUPT = range(5)
ENTRY_LENGTHS = {PROCESSOR: 20, BUS: 8, IOAPIC: 8, IO_INTERRUPT: 8, LOCAL_INTERRUPT: 8}
# Interrupt types (table 4-9).
INT, NMI, SMI, EXTINT = range(4)


@dataclass(frozen=True)
class FloatingPointer:
    signature: bytes
    physical_pointer: int
    length: int  # in 16-byte paragraphs
    spec_rev: int
    checksum: int
    features: bytes


@dataclass(frozen=True)
class ConfigHeader:
    signature: bytes
    base_table_length: int
    spec_rev: int
    checksum: int
    oem_id: bytes
    product_id: bytes
    oem_table_pointer: int
    oem_table_size: int
    entry_count: int
    local_apic_address: int
    extended_table_length: int
    extended_table_checksum: int
    reserved: int


@dataclass(frozen=True)
class Processor:
    apic_id: int
    apic_version: int
    enabled: bool
    bsp: bool
    signature: int
    features: int


@dataclass(frozen=True)
class Bus:
    bus_id: int
    bus_type: str


@dataclass(frozen=True)
class IoApic:
    apic_id: int
    version: int
    enabled: bool
    address: int


@dataclass(frozen=True)
class Interrupt:
    kind: int  # IO_INTERRUPT or LOCAL_INTERRUPT
    int_type: int
    flags: int
    source_bus: int
    source_irq: int
    dest_apic: int
    dest_pin: int


Entry = Processor | Bus | IoApic | Interrupt


@dataclass(frozen=True)
class MpTable:
    raw: bytes
    pointer: FloatingPointer
    header: ConfigHeader
    table: bytes  # the configuration table: header and entries, base_table_length bytes
    entries: list[Entry]


def parse(raw: bytes, base: int) -> MpTable:
    """Read the floating pointer at ``raw[0]`` (placed at ``base``) and the table it names."""
    sig, phys, length, rev, checksum, features = struct.unpack_from("<4sIBBB5s", raw, 0)
    pointer = FloatingPointer(sig, phys, length, rev, checksum, features)
    start = phys - base
    assert 0 <= start < len(raw), "the physical pointer points outside the built bytes"
    header = ConfigHeader(*struct.unpack_from("<4sHBB8s12sIHHIHBB", raw, start))
    table = raw[start : start + header.base_table_length]
    entries: list[Entry] = []
    pos = 44
    while pos < len(table):
        kind = table[pos]
        size = ENTRY_LENGTHS[kind]
        chunk = table[pos : pos + size]
        assert len(chunk) == size, f"entry type {kind} at {pos} runs past the table"
        if kind == PROCESSOR:
            _, apic_id, version, flags, signature, feats = struct.unpack_from("<BBBBII", chunk)
            entries.append(
                Processor(apic_id, version, bool(flags & 1), bool(flags & 2), signature, feats)
            )
        elif kind == BUS:
            _, bus_id, bus_type = struct.unpack("<BB6s", chunk)
            entries.append(Bus(bus_id, bus_type.decode("ascii").rstrip()))
        elif kind == IOAPIC:
            _, apic_id, version, flags, address = struct.unpack("<BBBBI", chunk)
            entries.append(IoApic(apic_id, version, bool(flags & 1), address))
        else:
            entries.append(Interrupt(*struct.unpack("<BBHBBBB", chunk)))
        pos += size
    return MpTable(raw, pointer, header, table, entries)


def entry_type(entry: Entry) -> int:
    """The spec's entry type byte of a parsed entry."""
    if isinstance(entry, Processor):
        return PROCESSOR
    if isinstance(entry, Bus):
        return BUS
    if isinstance(entry, IoApic):
        return IOAPIC
    return entry.kind


def interrupts(mp: MpTable, kind: int) -> list[Interrupt]:
    return [e for e in mp.entries if isinstance(e, Interrupt) and e.kind == kind]


@pytest.fixture(params=[1, 2, 8], ids=lambda n: f"{n}cpu")
def vcpus(request: pytest.FixtureRequest) -> int:
    n: int = request.param
    return n


@pytest.fixture
def mp(vcpus: int) -> MpTable:
    return parse(build_mptable(vcpus, layout.EBDA_START), layout.EBDA_START)


# -- floating pointer structure ---------------------------------------------------------------


def test_floating_pointer_signature_length_and_revision(mp: MpTable) -> None:
    assert mp.pointer.signature == b"_MP_"
    assert mp.pointer.length == 1  # one 16-byte paragraph
    assert mp.pointer.spec_rev == 4  # MP spec 1.4
    assert mp.pointer.features[0] == 0  # feature byte 1: 0 = a configuration table follows


def test_floating_pointer_checksum_of_16_bytes_is_zero(mp: MpTable) -> None:
    assert sum(mp.raw[:16]) & 0xFF == 0


def test_floating_pointer_points_right_after_itself(mp: MpTable) -> None:
    assert mp.pointer.physical_pointer == layout.EBDA_START + 16


@pytest.mark.parametrize("base", [0x9_FC00, 0xF_0000, 0x1000])
def test_physical_pointer_follows_the_base(base: int) -> None:
    raw = build_mptable(2, base)
    assert struct.unpack_from("<I", raw, 4)[0] == base + 16
    assert parse(raw, base).header.signature == b"PCMP"


def test_floating_pointer_is_16_byte_aligned_at_the_ebda() -> None:
    # Linux's smp_scan_config() looks at 16-byte steps only.
    assert layout.EBDA_START % 16 == 0


# -- configuration table header ---------------------------------------------------------------


def test_config_table_signature_and_revision(mp: MpTable) -> None:
    assert mp.header.signature == b"PCMP"
    assert mp.header.spec_rev == 4


def test_base_table_length_covers_header_and_entries_exactly(mp: MpTable) -> None:
    entry_bytes = sum(ENTRY_LENGTHS[entry_type(e)] for e in mp.entries)
    assert mp.header.base_table_length == 44 + entry_bytes
    assert mp.header.base_table_length == len(mp.raw) - 16  # nothing after the table


def test_config_table_checksum_is_zero(mp: MpTable) -> None:
    assert len(mp.table) == mp.header.base_table_length
    assert sum(mp.table) & 0xFF == 0


def test_entry_count_matches_the_entries(mp: MpTable) -> None:
    assert mp.header.entry_count == len(mp.entries)


def test_local_apic_address_and_no_extended_table(mp: MpTable) -> None:
    assert mp.header.local_apic_address == 0xFEE0_0000
    assert mp.header.extended_table_length == 0
    assert mp.header.oem_table_pointer == 0
    assert mp.header.oem_table_size == 0


# -- entries ----------------------------------------------------------------------------------


def test_one_processor_entry_per_cpu_with_apic_ids_0_to_n_minus_1(mp: MpTable, vcpus: int) -> None:
    cpus = [e for e in mp.entries if isinstance(e, Processor)]
    assert [cpu.apic_id for cpu in cpus] == list(range(vcpus))


def test_only_cpu_0_is_the_bsp_and_all_are_enabled(mp: MpTable, vcpus: int) -> None:
    cpus = [c for c in mp.entries if isinstance(c, Processor)]
    assert len(cpus) == vcpus
    assert [c.bsp for c in cpus] == [True] + [False] * (vcpus - 1)
    assert all(c.enabled for c in cpus)


def test_processor_entries_come_first(mp: MpTable, vcpus: int) -> None:
    # Spec 4.3: entries are sorted by type; processors first.
    kinds = [entry_type(e) for e in mp.entries]
    assert kinds == sorted(kinds)
    assert kinds[:vcpus] == [PROCESSOR] * vcpus


def test_ioapic_entry_has_id_n_enabled_at_0xfec00000(mp: MpTable, vcpus: int) -> None:
    ioapics = [e for e in mp.entries if isinstance(e, IoApic)]
    assert len(ioapics) == 1
    (ioapic,) = ioapics
    assert ioapic.apic_id == vcpus  # after the CPUs' APIC IDs 0..n-1
    assert ioapic.enabled
    assert ioapic.address == 0xFEC0_0000


def test_isa_and_pci_bus_entries_exist(mp: MpTable) -> None:
    buses = {e.bus_type: e.bus_id for e in mp.entries if isinstance(e, Bus)}
    assert set(buses) == {"ISA", "PCI"}
    assert buses["ISA"] != buses["PCI"]


def test_16_io_interrupts_map_isa_irq_i_to_ioapic_pin_i(mp: MpTable, vcpus: int) -> None:
    isa = next(e.bus_id for e in mp.entries if isinstance(e, Bus) and e.bus_type == "ISA")
    ioapic_id = next(e.apic_id for e in mp.entries if isinstance(e, IoApic))
    ints = interrupts(mp, IO_INTERRUPT)
    assert len(ints) == 16
    assert [(i.source_irq, i.dest_pin) for i in ints] == [(n, n) for n in range(16)]
    for i in ints:
        assert i.int_type == INT
        assert i.source_bus == isa
        assert i.dest_apic == ioapic_id == vcpus
        assert i.flags == 0  # polarity and trigger "conform to the bus": ISA edge, high


def test_lint0_is_extint_and_lint1_is_nmi_on_all_cpus(mp: MpTable) -> None:
    lints = interrupts(mp, LOCAL_INTERRUPT)
    assert {(i.int_type, i.dest_pin) for i in lints} == {(EXTINT, 0), (NMI, 1)}
    assert len(lints) == 2
    assert all(i.dest_apic == 0xFF for i in lints)  # 0xFF: every local APIC


@pytest.mark.parametrize("vcpus", [0, -1, 255, 1000])
def test_invalid_vcpu_counts_raise_value_error(vcpus: int) -> None:
    with pytest.raises(ValueError):
        build_mptable(vcpus)


def test_largest_valid_vcpu_count_builds_a_consistent_table() -> None:
    mp = parse(build_mptable(254), layout.EBDA_START)
    assert len([e for e in mp.entries if isinstance(e, Processor)]) == 254
    assert mp.header.entry_count == len(mp.entries)
    assert sum(mp.table) & 0xFF == 0
    assert next(e.apic_id for e in mp.entries if isinstance(e, IoApic)) == 254


def test_table_for_8_vcpus_fits_the_1k_ebda_window() -> None:
    raw = build_mptable(8)
    assert len(raw) <= EBDA_SCAN_WINDOW
    assert layout.EBDA_START + len(raw) <= layout.EBDA_START + EBDA_SCAN_WINDOW == 0xA_0000


def test_default_base_is_the_ebda() -> None:
    assert build_mptable(1) == build_mptable(1, layout.EBDA_START)
