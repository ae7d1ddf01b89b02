"""Tests of PCI configuration mechanism #1 and the bus-0 host bridge, at the guest's ports.

:class:`PciRoot` is registered on a real port bus at 0xCF8 (8 ports), as the board wiring
does, and every access goes through ``Bus.read``/``Bus.write`` with the port numbers a guest
uses: 0xCF8 for CONFIG_ADDRESS, 0xCFC-0xCFF for CONFIG_DATA. Functions other than the host
bridge are ``RecordingFunction`` fakes that record each config access the root hands them.
"""

from __future__ import annotations

import itertools
import random

import pytest

from iovirt.bus import Bus
from iovirt.bus.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_PORTS,
    HOST_BRIDGE_DEVICE,
    HOST_BRIDGE_VENDOR,
    PCI_CAPABILITY_LIST,
    PCI_CLASS_BRIDGE_HOST,
    PCI_CLASS_DEVICE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_IO_WINDOW,
    PCI_MEM_WINDOW,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    BarKind,
    PciConfigSpace,
    PciFunction,
    PciRoot,
)
from iovirt.interrupt import RecordingInterrupt

ENABLE = 0x8000_0000
SIZES = (1, 2, 4)


def ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def config_address(bus: int, slot: int, function: int, reg: int) -> int:
    """The CONFIG_ADDRESS value a guest writes to select ``bus:slot.function`` register ``reg``."""
    return ENABLE | bus << 16 | slot << 11 | function << 8 | (reg & 0xFC)


class RecordingFunction:
    """A PCI function that records config accesses and answers reads with ``read_value``."""

    def __init__(self, read_value: int = 0x1234_5678) -> None:
        self.read_value = read_value
        self.accesses: list[tuple[str, int, int, int | None]] = []

    def config_read(self, offset: int, size: int) -> int:
        self.accesses.append(("read", offset, size, None))
        return self.read_value & ones(size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("write", offset, size, value))


class Machine:
    """A port bus with a PciRoot at 0xCF8, and helpers named after the guest's port I/O."""

    def __init__(self) -> None:
        self.pio = Bus("pio", 0x1_0000)
        self.root = PciRoot()
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci-root")

    def outb(self, port: int, value: int) -> None:
        self.pio.write(port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self.pio.write(port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self.pio.write(port, 4, value)

    def inb(self, port: int) -> int:
        return self.pio.read(port, 1)

    def inw(self, port: int) -> int:
        return self.pio.read(port, 2)

    def inl(self, port: int) -> int:
        return self.pio.read(port, 4)

    def io(self, port: int, size: int) -> int:
        return self.pio.read(port, size)

    def select(self, bus: int, slot: int, function: int, reg: int) -> None:
        self.outl(CONFIG_ADDRESS_PORT, config_address(bus, slot, function, reg))

    def config_read(self, slot: int, function: int, reg: int, size: int) -> int:
        """Read ``reg`` of ``0:slot.function`` the way Linux's pci_conf1_read does."""
        self.select(0, slot, function, reg)
        return self.pio.read(CONFIG_DATA_PORT + (reg & 3), size)

    def config_write(self, slot: int, function: int, reg: int, size: int, value: int) -> None:
        self.select(0, slot, function, reg)
        self.pio.write(CONFIG_DATA_PORT + (reg & 3), size, value)


@pytest.fixture
def m() -> Machine:
    return Machine()


# -- CONFIG_ADDRESS ---------------------------------------------------------------------------


def test_linux_type1_probe_reads_back_the_enable_bit(m: Machine) -> None:
    # arch/x86/pci/direct.c pci_check_type1(): outb(0x01, 0xCFB); tmp = inl(0xCF8);
    # outl(0x80000000, 0xCF8); inl(0xCF8) == 0x80000000 -> mechanism #1 present.
    m.outb(0xCFB, 0x01)
    saved = m.inl(CONFIG_ADDRESS_PORT)
    m.outl(CONFIG_ADDRESS_PORT, 0x8000_0000)
    assert m.inl(CONFIG_ADDRESS_PORT) == 0x8000_0000
    m.outl(CONFIG_ADDRESS_PORT, saved)
    assert m.inl(CONFIG_ADDRESS_PORT) == saved


def test_byte_write_to_0xcfb_does_not_change_the_latched_address(m: Machine) -> None:
    m.outl(CONFIG_ADDRESS_PORT, 0x8000_0000)
    m.outb(0xCFB, 0x01)  # pci_check_type1's first step, aimed at mechanism #2 chipsets
    assert m.inl(CONFIG_ADDRESS_PORT) == 0x8000_0000
    for port in range(CONFIG_ADDRESS_PORT, CONFIG_ADDRESS_PORT + 4):
        m.outb(port, 0x00)
    m.outw(CONFIG_ADDRESS_PORT, 0x0000)
    m.outw(CONFIG_ADDRESS_PORT + 2, 0x0000)
    assert m.inl(CONFIG_ADDRESS_PORT) == 0x8000_0000


def test_sub_dword_reads_of_config_address_are_all_ones(m: Machine) -> None:
    # So Linux's mechanism #2 check (inb(0xCF8) == 0 && inb(0xCFA) == 0) fails.
    m.outl(CONFIG_ADDRESS_PORT, 0x8000_0000)
    assert m.inb(CONFIG_ADDRESS_PORT) == 0xFF
    assert m.inb(CONFIG_ADDRESS_PORT + 2) == 0xFF
    assert m.inw(CONFIG_ADDRESS_PORT) == 0xFFFF


def test_config_address_keeps_enable_bus_devfn_and_dword_register_only(m: Machine) -> None:
    m.outl(CONFIG_ADDRESS_PORT, 0xFFFF_FFFF)
    # Reserved bits 30:24 and the byte-select bits 1:0 read as zero.
    assert m.inl(CONFIG_ADDRESS_PORT) == 0x80FF_FFFC


# -- the host bridge through CONFIG_DATA ------------------------------------------------------


def test_host_bridge_identity_through_0xcfc(m: Machine) -> None:
    assert m.config_read(0, 0, PCI_VENDOR_ID, 2) == HOST_BRIDGE_VENDOR
    assert m.config_read(0, 0, PCI_DEVICE_ID, 2) == HOST_BRIDGE_DEVICE
    assert m.config_read(0, 0, PCI_VENDOR_ID, 4) == HOST_BRIDGE_DEVICE << 16 | HOST_BRIDGE_VENDOR
    assert m.config_read(0, 0, PCI_CLASS_DEVICE, 2) == PCI_CLASS_BRIDGE_HOST == 0x0600
    # Dword 0x08: class code 06 00 00, revision 0.
    assert m.config_read(0, 0, PCI_REVISION_ID, 4) == 0x0600_0000
    assert m.config_read(0, 0, PCI_HEADER_TYPE, 1) == 0x00


def test_byte_and_word_reads_at_0xcfd_to_0xcff_select_the_right_bytes(m: Machine) -> None:
    dword0 = HOST_BRIDGE_DEVICE << 16 | HOST_BRIDGE_VENDOR
    dword2 = PCI_CLASS_BRIDGE_HOST << 16  # 0x08: revision, prog-if, subclass, class
    m.select(0, 0, 0, PCI_VENDOR_ID)
    for i in range(4):
        assert m.inb(CONFIG_DATA_PORT + i) == (dword0 >> (8 * i)) & 0xFF
    assert m.inw(CONFIG_DATA_PORT) == HOST_BRIDGE_VENDOR
    assert m.inw(CONFIG_DATA_PORT + 2) == HOST_BRIDGE_DEVICE
    m.select(0, 0, 0, PCI_REVISION_ID)
    for i in range(4):
        assert m.inb(CONFIG_DATA_PORT + i) == (dword2 >> (8 * i)) & 0xFF
    assert m.inb(CONFIG_DATA_PORT + 3) == 0x06  # base class: bridge
    assert m.inw(CONFIG_DATA_PORT + 2) == 0x0600


@pytest.mark.parametrize("size", SIZES)
def test_empty_slot_reads_all_ones(m: Machine, size: int) -> None:
    for slot, function in ((1, 0), (5, 0), (31, 7), (0, 1)):
        assert m.config_read(slot, function, PCI_VENDOR_ID, size) == ones(size)


@pytest.mark.parametrize("size", SIZES)
def test_bus_other_than_zero_reads_all_ones(m: Machine, size: int) -> None:
    for bus in (1, 2, 0xFF):
        m.select(bus, 0, 0, PCI_VENDOR_ID)  # slot 0 holds the host bridge on bus 0
        assert m.io(CONFIG_DATA_PORT, size) == ones(size)


@pytest.mark.parametrize("size", SIZES)
def test_enable_bit_clear_reads_all_ones(m: Machine, size: int) -> None:
    m.outl(CONFIG_ADDRESS_PORT, config_address(0, 0, 0, PCI_VENDOR_ID) & ~ENABLE)
    assert m.io(CONFIG_DATA_PORT, size) == ones(size)


def test_writes_with_enable_bit_clear_or_other_bus_reach_nobody(m: Machine) -> None:
    fake = RecordingFunction()
    m.root.add(fake, slot=3)
    m.outl(CONFIG_ADDRESS_PORT, config_address(0, 3, 0, PCI_COMMAND) & ~ENABLE)
    m.outl(CONFIG_DATA_PORT, 0xFFFF_FFFF)
    m.select(1, 3, 0, PCI_COMMAND)
    m.outl(CONFIG_DATA_PORT, 0xFFFF_FFFF)
    assert fake.accesses == []


def test_identity_registers_ignore_writes(m: Machine) -> None:
    before = [m.config_read(0, 0, reg, 4) for reg in range(0, 0x40, 4)]
    for reg in (PCI_VENDOR_ID, PCI_REVISION_ID, 0x0C):  # vendor/device, class/rev, header
        m.config_write(0, 0, reg, 4, 0xFFFF_FFFF)
        m.config_write(0, 0, reg, 4, 0)
    m.config_write(0, 0, PCI_VENDOR_ID, 2, 0xDEAD)
    m.config_write(0, 0, PCI_DEVICE_ID, 2, 0xBEEF)
    m.config_write(0, 0, PCI_CLASS_DEVICE, 2, 0x0200)
    m.config_write(0, 0, PCI_CLASS_PROG, 1, 0x55)
    m.config_write(0, 0, PCI_STATUS, 2, 0xFFFF)
    after = [m.config_read(0, 0, reg, 4) for reg in range(0, 0x40, 4)]
    assert after == before
    assert m.config_read(0, 0, PCI_VENDOR_ID, 2) == HOST_BRIDGE_VENDOR
    assert m.config_read(0, 0, PCI_CLASS_DEVICE, 2) == 0x0600


def test_command_register_is_writable_only_in_its_mask_bits(m: Machine) -> None:
    # I/O space, memory space, bus master (bits 0-2) and INTx disable (bit 10).
    mask = 0x0407
    assert m.config_read(0, 0, PCI_COMMAND, 2) == 0
    m.config_write(0, 0, PCI_COMMAND, 2, 0xFFFF)
    assert m.config_read(0, 0, PCI_COMMAND, 2) == mask
    assert m.config_read(0, 0, PCI_STATUS, 2) == 0
    m.config_write(0, 0, PCI_COMMAND, 2, 0x0002)
    assert m.config_read(0, 0, PCI_COMMAND, 2) == 0x0002
    # A dword write covering command and status changes only the command mask bits.
    m.config_write(0, 0, PCI_COMMAND, 4, 0xFFFF_FFF8)
    assert m.config_read(0, 0, PCI_COMMAND, 4) == 0x0400
    # Byte writes to each half of the register.
    m.config_write(0, 0, PCI_COMMAND, 1, 0xFF)
    m.config_write(0, 0, PCI_COMMAND + 1, 1, 0x00)
    assert m.config_read(0, 0, PCI_COMMAND, 2) == 0x0007


# -- misaligned accesses ----------------------------------------------------------------------


@pytest.mark.parametrize(("port", "size"), [(CONFIG_DATA_PORT + 1, 2), (CONFIG_DATA_PORT + 3, 2)])
def test_misaligned_word_read_at_config_data_is_all_ones(m: Machine, port: int, size: int) -> None:
    m.select(0, 0, 0, PCI_VENDOR_ID)
    assert m.io(port, size) == ones(size)


@pytest.mark.parametrize("port", [CONFIG_DATA_PORT + 1, CONFIG_DATA_PORT + 2, CONFIG_DATA_PORT + 3])
def test_misaligned_dword_read_at_config_data_is_all_ones(m: Machine, port: int) -> None:
    m.select(0, 0, 0, PCI_VENDOR_ID)
    assert m.inl(port) == 0xFFFF_FFFF
    # The port bus already refuses a dword that runs past 0xCFF; PciRoot itself must too.
    assert m.root.read(port - CONFIG_ADDRESS_PORT, 4) == 0xFFFF_FFFF


def test_misaligned_writes_at_config_data_are_ignored(m: Machine) -> None:
    fake = RecordingFunction()
    m.root.add(fake, slot=3)
    m.select(0, 3, 0, PCI_COMMAND)
    m.outw(CONFIG_DATA_PORT + 1, 0xFFFF)
    m.outw(CONFIG_DATA_PORT + 3, 0xFFFF)
    m.outl(CONFIG_DATA_PORT + 2, 0xFFFF_FFFF)
    m.root.write(CONFIG_DATA_PORT + 2 - CONFIG_ADDRESS_PORT, 4, 0xFFFF_FFFF)
    assert fake.accesses == []
    m.select(0, 0, 0, PCI_COMMAND)
    m.outw(CONFIG_DATA_PORT + 1, 0xFFFF)  # would set command bits 8-15 and status 0-7
    assert m.config_read(0, 0, PCI_COMMAND, 4) == 0


@pytest.mark.parametrize(
    ("offset", "size"), [(1, 2), (3, 2), (1, 4), (2, 4), (3, 4), (255, 2), (254, 4), (0, 3)]
)
def test_config_space_misaligned_access_reads_all_ones_and_ignores_writes(
    offset: int, size: int
) -> None:
    space = PciConfigSpace(0x1AF4, 0x1041, 0x020000)
    space.writable[:] = b"\xff" * len(space.writable)  # even a writable byte stays put
    before = bytes(space.data)
    assert space.read(offset, size) == ones(size)
    space.write(offset, size, 0)
    assert bytes(space.data) == before


def test_config_space_last_aligned_dword_is_readable() -> None:
    space = PciConfigSpace(0x1AF4, 0x1041, 0x020000)
    space.writable[0xFC:0x100] = b"\xff" * 4
    space.write(0xFC, 4, 0x1122_3344)
    assert space.read(0xFC, 4) == 0x1122_3344
    assert space.read(0xFE, 2) == 0x1122
    assert space.read(0xFF, 1) == 0x11


# -- PciRoot.add and dispatch to functions ----------------------------------------------------


def test_add_places_devices_in_the_first_free_slot() -> None:
    root = PciRoot()
    a, b, c = RecordingFunction(), RecordingFunction(), RecordingFunction()
    assert root.add(a) == 1 << 3  # slot 0 is the host bridge
    assert root.add(b, slot=3) == 3 << 3
    assert root.add(c) == 2 << 3
    assert root.add(RecordingFunction()) == 4 << 3
    assert root.functions[1 << 3] is a
    assert root.functions[2 << 3] is c
    assert root.functions[3 << 3] is b


def test_add_refuses_a_taken_slot() -> None:
    root = PciRoot()
    first = RecordingFunction()
    root.add(first, slot=3)
    with pytest.raises(ValueError, match=r"3\.0"):
        root.add(RecordingFunction(), slot=3)
    with pytest.raises(ValueError, match=r"0\.0"):
        root.add(RecordingFunction(), slot=0)  # the host bridge's
    assert root.functions[3 << 3] is first
    # Another function of the same slot is a different devfn and is accepted.
    assert root.add(RecordingFunction(), slot=3, function=1) == 3 << 3 | 1


@pytest.mark.parametrize(("slot", "function"), [(32, 0), (-1, 0), (1, 8), (1, -1)])
def test_add_refuses_an_invalid_slot_or_function(slot: int, function: int) -> None:
    root = PciRoot()
    with pytest.raises(ValueError):
        root.add(RecordingFunction(), slot=slot, function=function)
    assert list(root.functions) == [0]


def test_add_to_a_full_bus_raises_value_error() -> None:
    # Slots 1-31 all taken: "no free slot" must be the same ValueError a taken slot gives,
    # not a StopIteration leaking out of the slot search.
    root = PciRoot()
    for slot in range(1, 32):
        root.add(RecordingFunction(), slot=slot)
    with pytest.raises(ValueError):
        root.add(RecordingFunction())


def test_function_in_slot_3_gets_accesses_at_the_right_register_offsets(m: Machine) -> None:
    fake = RecordingFunction(read_value=0xAABB_CCDD)
    assert m.root.add(fake, slot=3, function=0) == 0x18
    assert m.config_read(3, 0, 0x00, 4) == 0xAABB_CCDD
    assert m.config_read(3, 0, 0x10, 4) == 0xAABB_CCDD  # BAR0
    assert m.config_read(3, 0, 0x06, 2) == 0xCCDD  # status, through 0xCFE
    assert m.config_read(3, 0, 0x3D, 1) == 0xDD  # interrupt pin, through 0xCFD
    m.config_write(3, 0, 0x04, 2, 0x0007)  # command
    m.config_write(3, 0, 0x10, 4, 0xFFFF_FFFF)  # BAR sizing
    m.config_write(3, 0, 0x3C, 1, 0x0B)  # interrupt line
    m.config_write(3, 0, 0xFF, 1, 0x5A)  # the last byte, through 0xCFF
    assert fake.accesses == [
        ("read", 0x00, 4, None),
        ("read", 0x10, 4, None),
        ("read", 0x06, 2, None),
        ("read", 0x3D, 1, None),
        ("write", 0x04, 2, 0x0007),
        ("write", 0x10, 4, 0xFFFF_FFFF),
        ("write", 0x3C, 1, 0x0B),
        ("write", 0xFF, 1, 0x5A),
    ]


def test_other_functions_of_slot_3_do_not_reach_function_0(m: Machine) -> None:
    fake = RecordingFunction()
    m.root.add(fake, slot=3, function=0)
    for function in range(1, 8):
        assert m.config_read(3, function, PCI_VENDOR_ID, 4) == 0xFFFF_FFFF
        m.config_write(3, function, PCI_COMMAND, 2, 0x7)
    assert m.config_read(2, 0, PCI_VENDOR_ID, 4) == 0xFFFF_FFFF
    assert m.config_read(4, 0, PCI_VENDOR_ID, 4) == 0xFFFF_FFFF
    assert fake.accesses == []


# -- PciFunction: BARs, decode, mapping -------------------------------------------------------
#
# These tests put a PciFunction behind a PciRoot that has real MMIO and port buses, probe it
# through 0xCF8/0xCFC the way Linux's pci_read_bases() does, and check where the BAR's
# device ends up on the bus.

MMIO_LIMIT = 1 << 40


class BoardWithBuses(Machine):
    """A Machine whose PciRoot maps BARs onto a real MMIO bus and the port bus."""

    def __init__(self, **windows: tuple[int, int]) -> None:
        self.pio = Bus("pio", 0x1_0000)
        self.mmio = Bus("mmio", MMIO_LIMIT)
        self.root = PciRoot(mmio=self.mmio, pio=self.pio, **windows)
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci-root")

    def size_bar(self, slot: int, reg: int) -> int:
        """pci_read_bases(): save, write all-ones, read the mask back, restore."""
        saved = self.config_read(slot, 0, reg, 4)
        self.config_write(slot, 0, reg, 4, 0xFFFF_FFFF)
        mask = self.config_read(slot, 0, reg, 4)
        self.config_write(slot, 0, reg, 4, saved)
        return mask


class RegisterFile:
    """A BAR's bus device: remembers writes, answers reads with what was written."""

    def __init__(self) -> None:
        self.regs: dict[int, int] = {}

    def read(self, offset: int, size: int) -> int:
        return self.regs.get(offset, 0x5A)

    def write(self, offset: int, size: int, value: int) -> None:
        self.regs[offset] = value


class FunctionWithBars(PciFunction):
    """Three BARs of every kind, recording on_map calls."""

    def __init__(self, intx: RecordingInterrupt | None = None) -> None:
        super().__init__(0x1234, 0x5678, 0x020000, revision=3, intx=intx, interrupt_line=10)
        self.mem32 = RegisterFile()
        self.mem64 = RegisterFile()
        self.io = RegisterFile()
        self.maps: dict[int, list[int | None]] = {0: [], 2: [], 5: []}
        self.add_bar(0, 0x1000, BarKind.MEM32, self.mem32, on_map=self.maps[0].append)
        self.add_bar(
            2, 0x4000, BarKind.MEM64, self.mem64, prefetchable=True, on_map=self.maps[2].append
        )
        self.add_bar(5, 0x20, BarKind.IO, self.io, on_map=self.maps[5].append)


BAR0, BAR2, BAR3, BAR5 = 0x10, 0x18, 0x1C, 0x24


@pytest.fixture
def board() -> BoardWithBuses:
    return BoardWithBuses()


def test_bar_sizing_reads_back_size_masks_and_read_only_type_bits(board: BoardWithBuses) -> None:
    board.root.add(FunctionWithBars(), slot=2)
    assert board.size_bar(2, BAR0) == 0xFFFF_F000  # 4 KiB, 32-bit, not prefetchable
    assert board.size_bar(2, BAR2) == 0xFFFF_C000 | 0x8 | 0x4  # 16 KiB, 64-bit, prefetchable
    assert board.size_bar(2, BAR3) == 0xFFFF_FFFF  # upper half: every bit is an address bit
    assert board.size_bar(2, BAR5) == 0xFFFF_FFE0 | 0x1  # 32 ports, I/O space indicator
    # Unimplemented BARs (1, 4 is BAR2's upper half at 0x1C, so 1 only) read 0 even after
    # all-ones, which is how the guest learns there is nothing there.
    assert board.size_bar(2, 0x14) == 0
    # Writing zero leaves the type bits set: they are read-only.
    board.config_write(2, 0, BAR2, 4, 0)
    assert board.config_read(2, 0, BAR2, 4) == 0xC
    board.config_write(2, 0, BAR5, 4, 0)
    assert board.config_read(2, 0, BAR5, 4) == 0x1


def test_a_64_bit_bar_larger_than_4_gib_sizes_through_its_upper_register() -> None:
    function = PciFunction(0x1234, 0x5678, 0)
    function.add_bar(0, 1 << 33, BarKind.MEM64, RegisterFile())
    function.config_write(0x10, 4, 0xFFFF_FFFF)
    function.config_write(0x14, 4, 0xFFFF_FFFF)
    assert function.config_read(0x10, 4) == 0x4  # no address bits below 8 GiB
    assert function.config_read(0x14, 4) == 0xFFFF_FFFE


def test_add_assigns_naturally_aligned_addresses_in_the_windows(board: BoardWithBuses) -> None:
    a, b = FunctionWithBars(), FunctionWithBars()
    board.root.add(a, slot=1)
    board.root.add(b, slot=2)
    for function in (a, b):
        for index, bar in function.bars.items():
            address = function.bar_address(index)
            assert address % bar.size == 0
            if bar.kind is BarKind.IO:
                assert PCI_IO_WINDOW[0] <= address < address + bar.size <= PCI_IO_WINDOW[1]
            else:
                assert PCI_MEM_WINDOW[0] <= address < address + bar.size <= PCI_MEM_WINDOW[1]
    # Programmed into config space, where the guest reads it (flags in the low bits).
    low = board.config_read(2, 0, BAR2, 4)
    high = board.config_read(2, 0, BAR3, 4)
    assert (high << 32 | low) == b.bar_address(2) | 0xC
    assert board.config_read(2, 0, BAR5, 4) == b.bar_address(5) | 0x1
    # No two BARs of one address space overlap.
    for io in (True, False):
        spans = sorted(
            (f.bar_address(i), f.bar_address(i) + bar.size)
            for f in (a, b)
            for i, bar in f.bars.items()
            if (bar.kind is BarKind.IO) == io
        )
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start


def test_add_refuses_a_function_whose_bars_do_not_fit_and_keeps_the_window() -> None:
    board = BoardWithBuses(mem_window=(0xE000_0000, 0xE000_8000))
    big = PciFunction(0x1234, 0x1, 0)
    big.add_bar(0, 0x1_0000, BarKind.MEM32, RegisterFile())
    with pytest.raises(ValueError, match="no room"):
        board.root.add(big)
    assert list(board.root.functions) == [0]
    small = PciFunction(0x1234, 0x2, 0)
    small.add_bar(0, 0x8000, BarKind.MEM32, RegisterFile())
    board.root.add(small)
    assert small.bar_address(0) == 0xE000_0000


def test_bars_are_on_the_bus_only_while_decode_is_enabled(board: BoardWithBuses) -> None:
    function = FunctionWithBars()
    board.root.add(function, slot=2)
    base0, base2, base5 = (function.bar_address(i) for i in (0, 2, 5))
    assert board.mmio.ranges == () and board.pio.ranges[1:] == ()
    assert board.mmio.read(base0, 4) == 0xFFFF_FFFF  # nobody there yet

    board.config_write(2, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert function.maps == {0: [base0], 2: [base2], 5: []}
    board.mmio.write(base0 + 8, 4, 0xCAFE)
    assert function.mem32.regs == {8: 0xCAFE}
    assert board.mmio.read(base2 + 0x3FFC, 4) == 0x5A
    assert board.pio.find(base5) is None  # I/O decode still off

    board.config_write(2, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_IO)
    assert function.maps[5] == [base5]
    board.pio.write(base5 + 4, 2, 0x77)
    assert function.io.regs == {4: 0x77}

    board.config_write(2, 0, PCI_COMMAND, 2, 0)
    assert function.maps == {0: [base0, None], 2: [base2, None], 5: [base5, None]}
    assert board.mmio.ranges == ()
    assert board.pio.find(base5) is None


def test_guest_moving_a_bar_moves_its_registration(board: BoardWithBuses) -> None:
    function = FunctionWithBars()
    board.root.add(function, slot=2)
    board.config_write(2, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    old = function.bar_address(0)
    board.config_write(2, 0, BAR0, 4, 0xD000_0000)
    assert function.maps[0] == [old, 0xD000_0000]
    assert board.mmio.find(old) is None
    assert board.mmio.find(0xD000_0000) is not None
    # The 64-bit BAR moves above 4 GiB through its upper register.
    board.config_write(2, 0, BAR3, 4, 0x1)
    assert function.maps[2][-1] == 0x1_0000_0000 | function.bar_address(2) & 0xFFFF_FFFF
    assert board.mmio.find(function.maps[2][-1] or 0) is not None


def test_sizing_with_decode_enabled_does_not_map_the_all_ones_pattern(
    board: BoardWithBuses,
) -> None:
    function = FunctionWithBars()
    board.root.add(function, slot=2)
    board.config_write(2, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    base0, base2 = function.bar_address(0), function.bar_address(2)
    board.size_bar(2, BAR0)
    board.size_bar(2, BAR2)
    board.size_bar(2, BAR3)
    # Unmapped while the register held the sizing pattern, mapped back after the restore.
    assert function.maps[0] == [base0, None, base0]
    assert function.maps[2] == [base2, None, base2, None, base2]
    assert {r.base for r in board.mmio.ranges} == {base0, base2}


def test_a_bar_at_zero_is_not_mapped(board: BoardWithBuses) -> None:
    function = FunctionWithBars()
    board.root.add(function, slot=2)
    board.config_write(2, 0, BAR0, 4, 0)
    board.config_write(2, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert function.maps[0] == []
    assert board.mmio.find(0) is None


def test_a_guest_mapping_over_another_device_is_refused_not_raised(
    board: BoardWithBuses, caplog: pytest.LogCaptureFixture
) -> None:
    other = RegisterFile()
    board.mmio.register(0xD000_0000, 0x1000, other, "other")
    function = FunctionWithBars()
    board.root.add(function, slot=2)
    board.config_write(2, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    base0 = function.bar_address(0)
    for _ in range(10):  # moved onto the other device again and again: logged once
        board.config_write(2, 0, BAR0, 4, 0xD000_0000)
        board.config_write(2, 0, BAR0, 4, 0xFFFF_FFFF)
    assert function.maps[0][:2] == [base0, None]
    assert board.mmio.find(0xD000_0000).device is other  # type: ignore[union-attr]
    assert function.mapping_conflicts.count == 10
    assert len([r for r in caplog.records if "mapping refused" in r.getMessage()]) == 1
    # Moving it somewhere free maps it again.
    board.config_write(2, 0, BAR0, 4, 0xD100_0000)
    assert function.maps[0][-1] == 0xD100_0000
    # Two BARs of one function pointed at the same place: the second is refused.
    board.config_write(2, 0, BAR2, 4, 0xD100_0000 | 0xC)
    board.config_write(2, 0, BAR3, 4, 0)
    assert function.maps[2][-1] is None


def test_a_bar_past_the_bus_limit_is_not_mapped(board: BoardWithBuses) -> None:
    function = FunctionWithBars()
    board.root.add(function, slot=2)
    board.config_write(2, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    board.config_write(2, 0, BAR3, 4, MMIO_LIMIT >> 32)  # BAR2 now starts at the limit
    assert function.maps[2][-1] is None


def test_root_without_buses_assigns_bars_but_never_maps_them() -> None:
    root = PciRoot()
    function = FunctionWithBars()
    root.add(function)
    assert function.bar_address(0) != 0
    function.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_IO)
    assert function.maps == {0: [], 2: [], 5: []}


@pytest.mark.parametrize(
    ("index", "size", "kind"),
    [
        (0, 0x1800, BarKind.MEM32),  # not a power of two
        (0, 8, BarKind.MEM32),  # below 16 bytes
        (0, 2, BarKind.IO),  # below 4 ports
        (5, 0x1000, BarKind.MEM64),  # a 64-bit BAR needs two registers
        (6, 0x1000, BarKind.MEM32),
        (1, 0x1000, BarKind.MEM32),  # taken: BAR0 is 64-bit and uses register 1
        (0, 1 << 32, BarKind.MEM32),
    ],
)
def test_add_bar_refuses_invalid_declarations(index: int, size: int, kind: BarKind) -> None:
    function = PciFunction(0x1234, 0x5678, 0)
    function.add_bar(0, 0x1000, BarKind.MEM64, RegisterFile())
    with pytest.raises(ValueError):
        function.add_bar(index, size, kind, RegisterFile())


# -- PciFunction: header, capability list, INTx ------------------------------------------------


def test_function_header_identity_subsystem_and_interrupt_pin(board: BoardWithBuses) -> None:
    function = PciFunction(
        0x1AF4, 0x1042, 0x018000, revision=1, subsystem_vendor=0x1AF4, subsystem_id=2,
        intx=RecordingInterrupt(), interrupt_line=11,
    )  # fmt: skip
    board.root.add(function, slot=4)
    assert board.config_read(4, 0, PCI_VENDOR_ID, 4) == 0x1042_1AF4
    assert board.config_read(4, 0, PCI_REVISION_ID, 4) == 0x0180_0001
    assert board.config_read(4, 0, PCI_SUBSYSTEM_VENDOR_ID, 4) == 0x0002_1AF4
    assert board.config_read(4, 0, PCI_INTERRUPT_PIN, 1) == 1  # INTA#
    assert board.config_read(4, 0, PCI_INTERRUPT_LINE, 1) == 11
    board.config_write(4, 0, PCI_INTERRUPT_LINE, 2, 0x0405)  # the line is the OS's, the pin not
    assert board.config_read(4, 0, PCI_INTERRUPT_LINE, 2) == 0x0105
    assert PciFunction(1, 2, 3).config_read(PCI_INTERRUPT_PIN, 1) == 0  # no INTx declared


def test_capability_list_walk() -> None:
    function = PciFunction(0x1234, 0x5678, 0)
    assert function.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST == 0
    first = function.add_capability(0x09, bytes([7, 1, 2, 3, 4]))
    second = function.add_capability(0x11, bytes(10))
    third = function.add_capability(0x05, bytes([0xAA, 0xBB]))
    assert function.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST
    walked = []
    pointer = function.config_read(PCI_CAPABILITY_LIST, 1)
    while pointer:
        assert pointer % 4 == 0 and pointer >= 0x40
        walked.append((pointer, function.config_read(pointer, 1)))
        pointer = function.config_read(pointer + 1, 1)
    assert walked == [(first, 0x09), (second, 0x11), (third, 0x05)]
    assert function.config_read(first + 2, 1) == 7
    assert function.config_read(third + 2, 2) == 0xBBAA
    # Read-only unless the mask says otherwise; hooks see offsets inside the capability.
    function.config_write(first + 2, 1, 0xFF)
    assert function.config_read(first + 2, 1) == 7


def test_capability_hooks_and_writable_mask() -> None:
    function = PciFunction(0x1234, 0x5678, 0)
    seen: list[tuple[str, int, int]] = []
    offset = function.add_capability(
        0x09,
        bytes(6),
        bytes([0, 0, 0xFF, 0x0F, 0, 0]),
        on_read=lambda off, size: seen.append(("read", off, size)),
        on_write=lambda off, size: seen.append(("write", off, size)),
    )
    function.config_write(offset + 4, 2, 0xFFFF)
    assert function.config_read(offset + 4, 2) == 0x0FFF
    function.config_read(0x00, 4)  # outside: no hook
    assert seen == [("write", 4, 2), ("read", 4, 2)]


def test_capability_list_refuses_to_overflow_config_space() -> None:
    function = PciFunction(0x1234, 0x5678, 0)
    for _ in range(3):
        function.add_capability(0x09, bytes(60))
    with pytest.raises(ValueError, match="no room"):
        function.add_capability(0x09, bytes(60))


def test_intx_follows_the_function_and_the_interrupt_disable_bit() -> None:
    line = RecordingInterrupt()
    function = FunctionWithBars(intx=line)
    function.set_intx(True)
    assert line.level
    assert function.config_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT
    function.config_write(PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE)
    assert not line.level  # gated by the guest...
    assert function.config_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT  # ...still requested
    function.config_write(PCI_COMMAND, 2, 0)
    assert line.level
    function.set_intx(False)
    assert not line.level
    assert function.config_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT == 0
    assert line.transitions == [True, False, True, False]


def test_hostile_config_accesses_to_a_function_never_raise() -> None:
    board = BoardWithBuses()
    board.mmio.register(0xD000_0000, 0x1000, RegisterFile(), "other")
    function = FunctionWithBars(intx=RecordingInterrupt())
    function.add_capability(0x09, bytes(14), bytes([0xFF] * 14))
    board.root.add(function, slot=1)
    rng = random.Random(1234)
    for _ in range(5000):
        size = rng.choice((1, 2, 4, 3, 8, 0))
        reg = rng.randrange(-4, 260)
        value = rng.choice((0, 0xFFFF_FFFF, 0xD000_0000, rng.getrandbits(32)))
        function.config_write(reg, size, value)
        function.config_read(reg, size)
