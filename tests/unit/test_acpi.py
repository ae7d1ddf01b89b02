"""ACPI tables: checksums, lengths, the RSDP as Linux finds it, every field the guest uses,
the DSDT read back by a small AML walker and by iasl (Debian's acpica-tools), and the
hardware-reduced sleep registers that turn the DSDT's \\_S5 into a power-off."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iovirt.boot.acpi import (
    DEFAULT_PCI_WINDOW,
    FADT_LENGTH,
    AcpiTables,
    build_acpi_tables,
    build_dsdt,
    build_madt,
    pci_intx_gsi,
)
from iovirt.bus.bus import Bus
from iovirt.devices.acpi_pm import (
    ACPI_SLEEP_REGS_SIZE,
    SLEEP_CONTROL,
    SLEEP_STATUS,
    SLP_EN,
    SLP_TYP_S5,
    WAK_STS,
    AcpiSleepRegisters,
)

BASE = 0xE_0000
BIOS_SCAN_START, BIOS_SCAN_END = 0xE_0000, 0x10_0000
MMIO = [(0xFC00_0000, 0x200, 5), (0xFC00_1000, 0x200, 6), (0xFC00_2000, 0x200, 7)]
SLEEP_PORT = 0x600


def build(cpus: int = 2, mmio: list[tuple[int, int, int]] | None = None) -> AcpiTables:
    return build_acpi_tables(
        BASE,
        cpus=cpus,
        mmio_devices=MMIO if mmio is None else mmio,
        pci_window=DEFAULT_PCI_WINDOW,
        sleep_port=SLEEP_PORT,
    )


def table_at(tables: AcpiTables, address: int) -> bytes:
    offset = address - tables.base
    length = struct.unpack_from("<I", tables.blob, offset + 4)[0]
    assert offset + length <= len(tables.blob)
    return tables.blob[offset : offset + length]


def tables_by_signature(tables: AcpiTables) -> dict[bytes, bytes]:
    """Follow the pointers as the OS does: RSDP -> XSDT -> FADT, MADT; FADT -> DSDT."""
    rsdp = table_at_rsdp(tables)
    xsdt_address = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = table_at(tables, xsdt_address)
    found = {b"XSDT": xsdt}
    for (address,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = table_at(tables, address)
        found[table[:4]] = table
    fadt = found[b"FACP"]
    (dsdt32,) = struct.unpack_from("<I", fadt, 40)
    (x_dsdt,) = struct.unpack_from("<Q", fadt, 140)
    assert dsdt32 == x_dsdt
    found[b"DSDT"] = table_at(tables, x_dsdt)
    return found


def table_at_rsdp(tables: AcpiTables) -> bytes:
    offset = tables.rsdp_address - tables.base
    return tables.blob[offset : offset + 36]


# -- RSDP, checksums, lengths --------------------------------------------------------


def scan_for_rsdp(memory: bytes, start: int) -> int | None:
    """Linux/ACPICA's search (acpi_tb_scan_memory_for_rsdp): "RSD PTR " on a 16-byte
    boundary, the first 20 bytes summing to 0 and, for revision 2+, all 36 bytes too."""
    for offset in range(0, len(memory) - 36 + 1, 16):
        candidate = memory[offset : offset + 36]
        if candidate[:8] != b"RSD PTR " or sum(candidate[:20]) & 0xFF:
            continue
        if candidate[15] >= 2 and sum(candidate) & 0xFF:
            continue
        return start + offset
    return None


def test_linux_finds_the_rsdp_by_scanning_the_bios_area() -> None:
    tables = build()
    bios = bytearray(BIOS_SCAN_END - BIOS_SCAN_START)
    bios[BASE - BIOS_SCAN_START : BASE - BIOS_SCAN_START + len(tables.blob)] = tables.blob
    assert scan_for_rsdp(bytes(bios), BIOS_SCAN_START) == tables.rsdp_address == BASE
    assert BASE + len(tables.blob) <= BIOS_SCAN_END


def test_rsdp_is_revision_2_with_only_an_xsdt() -> None:
    tables = build()
    rsdp = table_at_rsdp(tables)
    signature, _, oem, revision, rsdt, length, xsdt, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert (signature, oem, revision, rsdt, length) == (b"RSD PTR ", b"IOVIRT", 2, 0, 36)
    assert xsdt == tables.xsdt_address
    assert sum(rsdp[:20]) & 0xFF == 0
    assert sum(rsdp) & 0xFF == 0


@pytest.mark.parametrize("cpus", [1, 2, 8, 254])
def test_every_table_sums_to_zero_and_has_the_right_length(cpus: int) -> None:
    tables = build(cpus=cpus)
    found = tables_by_signature(tables)
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for signature, table in found.items():
        assert sum(table) & 0xFF == 0, signature
        assert struct.unpack_from("<I", table, 4)[0] == len(table), signature
        assert table[10:16] == b"IOVIRT"
    assert len(found[b"XSDT"]) == 36 + 2 * 8
    assert len(found[b"FACP"]) == FADT_LENGTH == 276
    assert len(found[b"APIC"]) == 44 + 8 * cpus + 12 + 6


def test_tables_are_aligned_and_do_not_overlap() -> None:
    tables = build()
    addresses = [
        tables.rsdp_address,
        tables.xsdt_address,
        tables.fadt_address,
        tables.madt_address,
        tables.dsdt_address,
    ]
    assert all(a % 16 == 0 for a in addresses)
    ends = [tables.rsdp_address + 36] + [a + len(table_at(tables, a)) for a in addresses[1:]]
    assert all(end <= nxt for end, nxt in zip(ends, addresses[1:], strict=False))
    assert ends[-1] == tables.base + len(tables.blob)


# -- FADT and MADT -------------------------------------------------------------------


def test_fadt_describes_a_hardware_reduced_pc_with_sleep_registers() -> None:
    fadt = tables_by_signature(build())[b"FACP"]
    assert fadt[8] == 6  # revision
    (flags,) = struct.unpack_from("<I", fadt, 112)
    assert flags >> 20 & 1  # HW_REDUCED_ACPI
    (boot_arch,) = struct.unpack_from("<H", fadt, 109)
    assert boot_arch & 0b10  # 8042 present
    assert not boot_arch & 0b100  # VGA Not Present left clear
    # No SCI, no PM1 blocks, no PM timer (32-bit and extended fields), no FACS.
    assert fadt[36:40] == bytes(4)
    assert fadt[46:48] == bytes(2)
    assert fadt[56:96] == bytes(40)
    assert fadt[148:244] == bytes(96)
    gas = struct.Struct("<BBBBQ")
    assert gas.unpack_from(fadt, 244) == (1, 8, 0, 1, SLEEP_PORT + SLEEP_CONTROL)
    assert gas.unpack_from(fadt, 256) == (1, 8, 0, 1, SLEEP_PORT + SLEEP_STATUS)


def madt_entries(madt: bytes) -> list[bytes]:
    entries = []
    offset = 44
    while offset < len(madt):
        length = madt[offset + 1]
        assert length >= 2
        entries.append(madt[offset : offset + length])
        offset += length
    assert offset == len(madt)
    return entries


def test_madt_has_one_enabled_lapic_per_cpu_and_the_ioapic_after_them() -> None:
    madt = build_madt(4)
    lapic_address, flags = struct.unpack_from("<II", madt, 36)
    assert (lapic_address, flags) == (0xFEE0_0000, 1)  # PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 0]
    assert lapics == [(0, 8, cpu, cpu, 1) for cpu in range(4)]
    ioapics = [struct.unpack("<BBBBII", e) for e in entries if e[0] == 1]
    assert ioapics == [(1, 12, 4, 0, 0xFEC0_0000, 0)]
    nmis = [struct.unpack("<BBBHB", e) for e in entries if e[0] == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]
    # KVM routes ISA IRQ n to IOAPIC pin n: no interrupt source overrides.
    assert not [e for e in entries if e[0] == 2]


# -- the DSDT, read back -------------------------------------------------------------


@dataclass
class Device:
    """A Device() object: its named values."""

    names: dict[str, Any]


class AmlWalker:
    """Reads back the AML subset the encoder writes (Scope, Device, Name, Package, Buffer,
    integers, strings). Strict: an unknown opcode or a package whose length does not match
    its contents fails the test."""

    def __init__(self, aml: bytes) -> None:
        self.aml = aml
        self.pos = 0
        self.namespace: dict[str, Any] = {}

    def walk(self) -> dict[str, Any]:
        self.term_list(len(self.aml), "\\")
        return self.namespace

    def byte(self) -> int:
        value = self.aml[self.pos]
        self.pos += 1
        return value

    def pkg_end(self) -> int:
        start = self.pos
        lead = self.byte()
        extra = lead >> 6
        length = lead & 0x3F if extra == 0 else lead & 0x0F
        for i in range(extra):
            length |= self.byte() << (4 + 8 * i)
        return start + length

    def name_string(self, scope: str) -> str:
        if self.aml[self.pos] == ord("\\"):  # a path from the root
            self.pos += 1
            scope = "\\"
        count = 1
        lead = self.aml[self.pos]
        if lead == 0x2E:
            self.pos, count = self.pos + 1, 2
        elif lead == 0x2F:
            self.pos += 1
            count = self.byte()
        elif lead == 0x00:
            self.pos += 1
            return scope
        segs = []
        for _ in range(count):
            seg = self.aml[self.pos : self.pos + 4].decode("ascii")
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]{3}", seg), seg
            segs.append(seg)
            self.pos += 4
        joined = ".".join(segs)
        return scope + joined if scope == "\\" else f"{scope}.{joined}"

    def data(self) -> Any:
        op = self.byte()
        if op in (0x00, 0x01):
            return op
        if op == 0xFF:
            return (1 << 64) - 1
        sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
        if op in sizes:
            value = int.from_bytes(self.aml[self.pos : self.pos + sizes[op]], "little")
            self.pos += sizes[op]
            return value
        if op == 0x0D:
            end = self.aml.index(b"\0", self.pos)
            text = self.aml[self.pos : end].decode("ascii")
            self.pos = end + 1
            return text
        if op == 0x11:
            end = self.pkg_end()
            size = self.data()
            contents = self.aml[self.pos : end]
            assert len(contents) == size
            self.pos = end
            return bytes(contents)
        if op == 0x12:
            end = self.pkg_end()
            count = self.byte()
            elements = [self.data() for _ in range(count)]
            assert self.pos == end, "package length does not match its elements"
            return elements
        raise AssertionError(f"unexpected data opcode {op:#x} at {self.pos - 1}")

    def term_list(self, end: int, scope: str) -> None:
        while self.pos < end:
            op = self.byte()
            if op == 0x08:  # Name
                path = self.name_string(scope)
                assert path not in self.namespace, f"{path} defined twice"
                self.namespace[path] = self.data()
            elif op == 0x10:  # Scope
                body_end = self.pkg_end()
                self.term_list(body_end, self.name_string(scope))
            elif op == 0x5B and self.aml[self.pos] == 0x82:  # Device
                self.pos += 1
                body_end = self.pkg_end()
                path = self.name_string(scope)
                self.namespace[path] = Device({})
                self.term_list(body_end, path)
            else:
                raise AssertionError(f"unexpected opcode {op:#x} at {self.pos - 1}")
        assert self.pos == end, "a package length does not match its contents"


def resources(template: bytes) -> list[tuple[int, bytes]]:
    """(descriptor type, its data) for each descriptor; checks the end tag is last."""
    items = []
    pos = 0
    while True:
        tag = template[pos]
        if tag & 0x80:
            (length,) = struct.unpack_from("<H", template, pos + 1)
            items.append((tag, template[pos + 3 : pos + 3 + length]))
            pos += 3 + length
        else:
            kind, length = tag >> 3 & 0x0F, tag & 0x07
            if kind == 0x0F:
                assert pos + 1 + length == len(template), "end tag is not last"
                return items
            items.append((kind, template[pos + 1 : pos + 1 + length]))
            pos += 1 + length


def eisa(text: str) -> int:
    vendor = 0
    for letter in text[:3]:
        vendor = vendor << 5 | (ord(letter) - 0x40)
    return int.from_bytes(
        vendor.to_bytes(2, "big") + int(text[3:], 16).to_bytes(2, "big"), "little"
    )


def namespace(mmio: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    dsdt = build_dsdt(MMIO if mmio is None else mmio, DEFAULT_PCI_WINDOW)
    assert dsdt[:4] == b"DSDT" and dsdt[8] == 2  # revision 2: 64-bit integers
    return AmlWalker(dsdt[36:]).walk()


def test_dsdt_has_s5_for_hardware_reduced_power_off() -> None:
    assert namespace()["\\_S5_"] == [SLP_TYP_S5, 0, 0, 0]


def test_pci_root_bridge_is_pnp0a03_with_its_windows() -> None:
    ns = namespace()
    assert isinstance(ns["\\_SB_.PCI0"], Device)
    assert ns["\\_SB_.PCI0._HID"] == eisa("PNP0A03")
    assert "\\_SB_.PCI0._CID" not in ns  # PCI, not PCIe: no MCFG
    assert (ns["\\_SB_.PCI0._SEG"], ns["\\_SB_.PCI0._UID"], ns["\\_SB_.PCI0._BBN"]) == (0, 0, 0)
    crs = resources(ns["\\_SB_.PCI0._CRS"])
    word = struct.Struct("<BBBHHHHH")
    bus = word.unpack(crs[0][1])
    assert crs[0][0] == 0x88 and bus[0] == 2 and (bus[4], bus[5], bus[7]) == (0, 0xFF, 0x100)
    assert crs[1] == (0x08, struct.pack("<BHHBB", 1, 0xCF8, 0xCF8, 1, 8))
    io_windows = [word.unpack(d) for t, d in crs[2:4]]
    assert [(w[0], w[4], w[5]) for w in io_windows] == [(1, 0, 0xCF7), (1, 0xD00, 0xFFFF)]
    memory = struct.unpack("<BBBIIIII", crs[4][1])
    assert crs[4][0] == 0x87 and memory[0] == 0
    assert (memory[4], memory[5], memory[7]) == (0xC000_0000, 0xFBFF_FFFF, 0x3C00_0000)
    assert all(w[1] & 0b1 == 0 for w in (bus, *io_windows, memory))  # producer: windows


def test_prt_routes_every_slot_and_pin_to_the_swizzled_gsi() -> None:
    prt = namespace()["\\_SB_.PCI0._PRT"]
    expected = [
        [slot << 16 | 0xFFFF, pin, 0, 16 + (slot + pin) % 8]
        for slot in range(1, 32)
        for pin in range(4)
    ]
    assert prt == expected
    assert pci_intx_gsi(1, 0) == 17
    assert {entry[3] for entry in prt} == set(range(16, 24))


def test_every_virtio_mmio_device_has_its_window_and_a_level_interrupt() -> None:
    ns = namespace()
    for index, (base, size, gsi) in enumerate(MMIO):
        path = f"\\_SB_.VR{index:02X}"
        assert isinstance(ns[path], Device)
        assert ns[f"{path}._HID"] == "LNRO0005"
        assert ns[f"{path}._UID"] == index
        crs = resources(ns[f"{path}._CRS"])
        assert crs[0] == (0x86, struct.pack("<BII", 1, base, size))  # Memory32Fixed RW
        tag, data = crs[1]
        assert tag == 0x89
        # ResourceConsumer, Level, ActiveHigh, Exclusive; one interrupt: the GSI.
        assert data == bytes([0b0001, 1]) + struct.pack("<I", gsi)
    assert f"\\_SB_.VR{len(MMIO):02X}" not in ns


def test_legacy_devices_claim_their_isa_ports_and_irqs() -> None:
    ns = namespace()

    def io(base: int, length: int) -> tuple[int, bytes]:
        return (0x08, struct.pack("<BHHBB", 1, base, base, 1, length))

    def irq(n: int) -> tuple[int, bytes]:
        return (0x04, struct.pack("<H", 1 << n))

    assert ns["\\_SB_.COM1._HID"] == eisa("PNP0501")
    assert resources(ns["\\_SB_.COM1._CRS"]) == [io(0x3F8, 8), irq(4)]
    assert ns["\\_SB_.KBD_._HID"] == eisa("PNP0303")
    assert resources(ns["\\_SB_.KBD_._CRS"]) == [io(0x60, 1), io(0x64, 1), irq(1)]
    assert ns["\\_SB_.MOU_._HID"] == eisa("PNP0F13")  # the 8042's AUX port, on IRQ 12
    assert resources(ns["\\_SB_.MOU_._CRS"]) == [irq(12)]
    assert ns["\\_SB_.RTC_._HID"] == eisa("PNP0B00")
    assert resources(ns["\\_SB_.RTC_._CRS"]) == [io(0x70, 2), irq(8)]


def test_dsdt_without_virtio_mmio_devices() -> None:
    ns = namespace(mmio=[])
    assert not [path for path in ns if ".VR" in path]
    assert "\\_SB_.PCI0._PRT" in ns


# -- the DSDT and tables, by iasl ----------------------------------------------------


def iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        pytest.fail(
            "iasl not found: install the Debian package acpica-tools "
            "(install.sh lists it; the ACPI tests check the tables with it)"
        )
    return path


def run_iasl(tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [iasl(), "-vs", *args], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_iasl_disassembles_the_dsdt_and_recompiles_it_to_the_same_aml(tmp_path: Path) -> None:
    dsdt = tables_by_signature(build())[b"DSDT"]
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    run_iasl(tmp_path, "-d", "dsdt.dat")
    source = (tmp_path / "dsdt.dsl").read_text()
    for expected in (
        "Name (_S5, Package (0x04)",
        'Name (_HID, EisaId ("PNP0A03")',
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "Device (VR02)",
        'Name (_HID, "LNRO0005")',
        "Memory32Fixed (ReadWrite,\n                    0xFC002000,",
        "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )\n"
        "                {\n                    0x00000007,",
        'Name (_HID, EisaId ("PNP0501")',
        "IRQNoFlags ()\n                    {4}",
    ):
        assert expected in source, expected
    # Compiling the disassembly gives back our AML byte for byte, with no warnings.
    output = run_iasl(tmp_path, "-p", "again", "dsdt.dsl")
    assert "0 Errors, 0 Warnings, 0 Remarks" in output, output
    assert (tmp_path / "again.aml").read_bytes()[36:] == dsdt[36:]


def test_iasl_decodes_the_data_tables_without_complaint(tmp_path: Path) -> None:
    found = tables_by_signature(build(cpus=3))
    decoded = {}
    for signature in (b"XSDT", b"FACP", b"APIC"):
        stem = signature.decode().lower()
        (tmp_path / f"{stem}.dat").write_bytes(found[signature])
        output = run_iasl(tmp_path, "-d", f"{stem}.dat")
        assert not re.search(r"(?i)warning|error|invalid|checksum", output), output
        decoded[signature] = (tmp_path / f"{stem}.dsl").read_text()
    fadt = decoded[b"FACP"]
    assert re.search(r"Hardware Reduced \(V5\) : 1", fadt)
    assert re.search(r"8042 Present on ports 60/64 \(V2\) : 1", fadt)
    assert re.search(r"Sleep Control Register : \[Generic Address Structure\]", fadt)
    assert re.search(r"Address : 0000000000000600", fadt)
    assert re.search(r"Address : 0000000000000601", fadt)
    madt = decoded[b"APIC"]
    assert len(re.findall(r"\[Processor Local APIC\]", madt)) == 3
    assert re.search(r"I/O Apic ID : 03", madt)


# -- board checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"base": 0xE_0008}, "16-byte aligned"),
        ({"cpus": 0}, "1 to 254"),
        ({"cpus": 255}, "1 to 254"),
        ({"mmio_devices": [(0xC000_1000, 0x200, 5)]}, "overlaps the PCI window"),
        ({"mmio_devices": [(0xFC00_0000, 0x200, 5), (0xFC00_0100, 0x200, 6)]}, "overlaps"),
        ({"mmio_devices": [(0xFC00_0000, 0x200, 4)]}, "GSI 4"),
        ({"mmio_devices": [(0xFC00_0000, 0x200, 16)]}, "GSI 16"),
        ({"mmio_devices": [(0xFC00_0000, 0x200, 24)]}, "GSI 24"),
        ({"mmio_devices": [(0xFC00_0000, 0x200, 5), (0xFC00_1000, 0x200, 5)]}, "GSI 5"),
        ({"mmio_devices": [(0xFFFF_FF00, 0x200, 5)]}, "32-bit range"),
        ({"pci_window": (0xC000_0000, 0x1_0000_0001)}, "PCI window"),
        ({"sleep_port": 0xFFFF}, "port"),
        ({"base": 0xF_FF00}, "below 1 MiB"),
    ],
)
def test_a_board_the_tables_cannot_describe_is_refused(
    kwargs: dict[str, Any], problem: str
) -> None:
    args: dict[str, Any] = {
        "base": BASE,
        "cpus": 1,
        "mmio_devices": [],
        "pci_window": DEFAULT_PCI_WINDOW,
        "sleep_port": SLEEP_PORT,
    }
    args.update(kwargs)
    base = args.pop("base")
    with pytest.raises(ValueError, match=re.escape(problem)):
        build_acpi_tables(base, **args)


# -- the sleep registers -------------------------------------------------------------


class PowerOff:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_the_guest_powers_off_the_way_acpica_does_with_these_tables() -> None:
    """acpi_hw_extended_sleep: SLP_TYPa from \\_S5, clear WAK_STS, write SLP_TYP | SLP_EN
    to the FADT's SLEEP_CONTROL_REG; then it polls SLEEP_STATUS for WAK_STS."""
    tables = build()
    fadt = tables_by_signature(tables)[b"FACP"]
    control_port = struct.unpack_from("<Q", fadt, 244 + 4)[0]
    status_port = struct.unpack_from("<Q", fadt, 256 + 4)[0]
    slp_typ_a = namespace()["\\_S5_"][0]

    power_off = PowerOff()
    pio = Bus("pio", 0x1_0000)
    pio.register(SLEEP_PORT, ACPI_SLEEP_REGS_SIZE, AcpiSleepRegisters(power_off), "acpi-sleep")
    pio.write(status_port, 1, WAK_STS)
    assert power_off.calls == 0
    pio.write(control_port, 1, (slp_typ_a << 2) & 0x1C | 0x20)
    assert power_off.calls == 1
    assert pio.read(status_port, 1) & WAK_STS == 0  # no wake: the guest waits, stopped


def test_sleep_control_needs_slp_en_and_the_s5_type() -> None:
    power_off = PowerOff()
    regs = AcpiSleepRegisters(power_off)
    regs.write(SLEEP_CONTROL, 1, SLP_TYP_S5 << 2)  # no SLP_EN
    assert power_off.calls == 0
    regs.write(SLEEP_CONTROL, 1, 3 << 2 | SLP_EN)  # S3 is not offered
    assert power_off.calls == 0
    assert regs.ignored_requests == 1
    assert not regs.poweroff_requested
    regs.write(SLEEP_CONTROL, 1, SLP_TYP_S5 << 2 | SLP_EN)
    assert power_off.calls == 1
    assert regs.poweroff_requested


def test_sleep_registers_read_zero_and_a_word_write_reaches_control() -> None:
    power_off = PowerOff()
    regs = AcpiSleepRegisters(power_off)
    assert regs.read(SLEEP_CONTROL, 1) == 0
    assert regs.read(SLEEP_STATUS, 1) == 0
    regs.write(SLEEP_STATUS, 1, SLP_TYP_S5 << 2 | SLP_EN)  # the status register: no effect
    assert power_off.calls == 0
    regs.write(SLEEP_CONTROL, 2, WAK_STS << 8 | SLP_TYP_S5 << 2 | SLP_EN)
    assert power_off.calls == 1
