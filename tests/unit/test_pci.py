"""Tests of PCI configuration mechanism #1 and the bus-0 host bridge, at the guest's ports.

:class:`PciRoot` is registered on a real port bus at 0xCF8 (8 ports), as the board wiring
does, and every access goes through ``Bus.read``/``Bus.write`` with the port numbers a guest
uses: 0xCF8 for CONFIG_ADDRESS, 0xCFC-0xCFF for CONFIG_DATA. Functions other than the host
bridge are ``RecordingFunction`` fakes that record each config access the root hands them.
"""

from __future__ import annotations

import pytest

from iovirt.bus import Bus
from iovirt.bus.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_PORTS,
    HOST_BRIDGE_DEVICE,
    HOST_BRIDGE_VENDOR,
    PCI_CLASS_BRIDGE_HOST,
    PCI_CLASS_DEVICE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_VENDOR_ID,
    PciConfigSpace,
    PciRoot,
)

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
