"""Tests of the MSI-X capability, table and PBA (PCI Local Bus 3.0, 6.8.2).

An :class:`MsixCapability` is installed in a plain :class:`PciFunction` whose BAR 2 serves
the table at offset 0 and the PBA at 0x800, the way a device model wires it. The guest side
is played through config space and the BAR's MMIO range on a real bus; vectors come from
:class:`SimulatedPlatform`, whose ``poll()`` turns eventfd signals into recorded deliveries
(or pending bits while masked).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from iovirt.bus import Bus
from iovirt.bus.msix import (
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    MsixCapability,
)
from iovirt.bus.pci import (
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_MEMORY,
    BarKind,
    PciFunction,
)
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedPlatform

TABLE_OFFSET = 0x000
PBA_OFFSET = 0x800
BAR_ADDRESS = 0xE000_0000
VECTORS = 5
MSI_ADDRESS = 0xFEE0_0000


class MsixFunction(PciFunction):
    """A function with MSI-X in BAR 2: table at 0, PBA at 0x800."""

    def __init__(self, platform: SimulatedPlatform, vectors: int = VECTORS) -> None:
        super().__init__(0x1234, 0x5678, 0xFF0000)
        self.control_changes = 0
        self.msix = MsixCapability(
            platform,
            vectors,
            bar=2,
            table_offset=TABLE_OFFSET,
            pba_offset=PBA_OFFSET,
            on_control_change=self._changed,
        )
        self.cap = self.msix.install(self)
        self.add_bar(2, 0x1000, BarKind.MEM32, self)

    def _changed(self) -> None:
        self.control_changes += 1

    def read(self, offset: int, size: int) -> int:
        if offset >= PBA_OFFSET:
            return self.msix.pba_read(offset - PBA_OFFSET, size)
        return self.msix.table_read(offset - TABLE_OFFSET, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= PBA_OFFSET:
            self.msix.pba_write(offset - PBA_OFFSET, size, value)
        else:
            self.msix.table_write(offset - TABLE_OFFSET, size, value)


class Guest:
    """The function on a real MMIO bus with its BAR mapped, and the guest's view of it."""

    def __init__(self, platform: SimulatedPlatform, vectors: int = VECTORS) -> None:
        self.platform = platform
        self.mmio = Bus("mmio", 1 << 40)
        self.function = MsixFunction(platform, vectors)
        self.function.attach(self.mmio, None)
        self.function.set_bar_address(2, BAR_ADDRESS)
        self.function.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
        self.vectors = platform.vectors[-vectors:]

    @property
    def control(self) -> int:
        return self.function.config_read(self.function.cap + PCI_MSIX_FLAGS, 2)

    def set_control(self, bits: int) -> None:
        self.function.config_write(self.function.cap + PCI_MSIX_FLAGS, 2, bits)

    def entry(self, i: int, field: int) -> int:
        return self.mmio.read(BAR_ADDRESS + i * PCI_MSIX_ENTRY_SIZE + field, 4)

    def program(self, i: int, address: int, data: int, masked: bool = False) -> None:
        base = BAR_ADDRESS + i * PCI_MSIX_ENTRY_SIZE
        self.mmio.write(base + 0, 4, address & 0xFFFF_FFFF)
        self.mmio.write(base + 4, 4, address >> 32)
        self.mmio.write(base + 8, 4, data)
        self.mmio.write(base + 12, 4, int(masked))

    def pba(self) -> int:
        return self.mmio.read(BAR_ADDRESS + PBA_OFFSET, 8)

    def fire(self, i: int) -> None:
        os.eventfd_write(self.function.msix.vector_eventfd(i), 1)
        self.platform.poll()


@pytest.fixture
def platform() -> Iterator[SimulatedPlatform]:
    with GuestMemory([(0, 0x10000)]) as memory:
        yield SimulatedPlatform(memory)


@pytest.fixture
def guest(platform: SimulatedPlatform) -> Iterator[Guest]:
    g = Guest(platform)
    yield g
    g.function.msix.close()


# -- the capability structure -----------------------------------------------------------------


def test_capability_structure_in_config_space(guest: Guest) -> None:
    f = guest.function
    assert f.config_read(PCI_CAPABILITY_LIST, 1) == f.cap
    assert f.config_read(f.cap, 1) == PCI_CAP_ID_MSIX == 0x11
    assert f.config_read(f.cap + 1, 1) == 0  # the only capability
    assert guest.control == VECTORS - 1  # table size N-1, disabled, not masked
    assert f.config_read(f.cap + PCI_MSIX_TABLE, 4) == TABLE_OFFSET | 2  # BIR 2
    assert f.config_read(f.cap + PCI_MSIX_PBA, 4) == PBA_OFFSET | 2


def test_only_enable_and_function_mask_are_writable(guest: Guest) -> None:
    f = guest.function
    guest.set_control(0xFFFF)
    assert guest.control == 0xC000 | (VECTORS - 1)
    assert guest.function.msix.enabled and guest.function.msix.function_masked
    f.config_write(f.cap + PCI_MSIX_TABLE, 4, 0xFFFF_FFFF)
    f.config_write(f.cap + PCI_MSIX_PBA, 4, 0)
    assert f.config_read(f.cap + PCI_MSIX_TABLE, 4) == TABLE_OFFSET | 2
    assert f.config_read(f.cap + PCI_MSIX_PBA, 4) == PBA_OFFSET | 2
    # Linux enables MSI-X with a byte write to the upper half of Message Control too.
    f.config_write(f.cap + PCI_MSIX_FLAGS + 1, 1, 0x00)
    assert not guest.function.msix.enabled
    assert guest.function.control_changes == 2


@pytest.mark.parametrize(
    ("size", "kwargs"),
    [
        (0, {}),
        (2049, {}),
        (4, {"table_offset": 4}),  # offsets are QWORD aligned (BIR in bits 2:0)
        (4, {"bar": 6}),
        (4, {"pba_bar": -1}),
    ],
)
def test_constructor_refuses_invalid_layouts(
    platform: SimulatedPlatform, size: int, kwargs: dict[str, int | None]
) -> None:
    args = {"bar": 0, "table_offset": 0, "pba_offset": 0x800, "pba_bar": None} | kwargs
    with pytest.raises(ValueError):
        MsixCapability(
            platform,
            size,
            bar=args["bar"] or 0,
            table_offset=args["table_offset"] or 0,
            pba_offset=args["pba_offset"] or 0,
            pba_bar=args["pba_bar"],
        )


# -- the table ---------------------------------------------------------------------------------


def test_table_entries_start_masked_and_zeroed(guest: Guest) -> None:
    for i in range(VECTORS):
        assert guest.entry(i, 0) == 0
        assert guest.entry(i, 4) == 0
        assert guest.entry(i, 8) == 0
        assert guest.entry(i, 12) == 1  # Vector Control: Mask Bit set
        assert guest.vectors[i].masked


def test_table_writes_program_the_vector_message(guest: Guest) -> None:
    guest.program(3, 0x1_FEE0_1000, 0x4041, masked=True)
    v = guest.vectors[3]
    assert (v.address, v.data) == (0x1_FEE0_1000, 0x4041)
    assert guest.entry(3, 0) == 0xFEE0_1000
    assert guest.entry(3, 4) == 1
    assert guest.entry(3, 8) == 0x4041
    # QWORD accesses: address in one write, data + vector control in another.
    base = BAR_ADDRESS + 2 * PCI_MSIX_ENTRY_SIZE
    guest.mmio.write(base, 8, 0x0000_0000_FEE0_2000)
    guest.mmio.write(base + 8, 8, 0x0000_0001_0000_0051)
    assert (guest.vectors[2].address, guest.vectors[2].data) == (0xFEE0_2000, 0x51)
    assert guest.mmio.read(base + 8, 8) == 0x0000_0001_0000_0051


def test_reserved_bits_of_an_entry_read_as_zero(guest: Guest) -> None:
    base = BAR_ADDRESS + PCI_MSIX_ENTRY_SIZE
    guest.mmio.write(base, 4, 0xFEE0_0003)  # address bits 1:0
    guest.mmio.write(base + 12, 4, 0xFFFF_FFFF)  # vector control bits 31:1
    assert guest.entry(1, 0) == 0xFEE0_0000
    assert guest.entry(1, 12) == 1


def test_a_vector_is_unmasked_only_when_enabled_unmasked_and_entry_unmasked(guest: Guest) -> None:
    v = guest.vectors[0]
    guest.program(0, MSI_ADDRESS, 0x30)
    assert v.masked  # MSI-X Enable still clear
    guest.set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    assert v.masked  # function mask
    guest.set_control(PCI_MSIX_FLAGS_ENABLE)
    assert not v.masked
    assert not guest.function.msix.masked(0)
    assert guest.vectors[1].masked  # its entry's Mask Bit is still set
    guest.program(0, MSI_ADDRESS, 0x30, masked=True)
    assert v.masked
    guest.program(0, MSI_ADDRESS, 0x30)
    guest.set_control(0)
    assert v.masked


def test_unmasked_signal_is_delivered_with_the_programmed_message(guest: Guest) -> None:
    guest.program(4, MSI_ADDRESS | 0x2000, 0x41)
    guest.set_control(PCI_MSIX_FLAGS_ENABLE)
    guest.fire(4)
    assert guest.vectors[4].delivered == [(MSI_ADDRESS | 0x2000, 0x41)]
    assert guest.pba() == 0


def test_masked_signal_sets_the_pending_bit_and_unmask_delivers_it(guest: Guest) -> None:
    guest.set_control(PCI_MSIX_FLAGS_ENABLE)
    guest.program(1, MSI_ADDRESS, 0x22, masked=True)
    guest.fire(1)
    assert guest.vectors[1].delivered == []
    assert guest.pba() == 1 << 1
    assert guest.mmio.read(BAR_ADDRESS + PBA_OFFSET, 4) == 1 << 1  # DWORD reads too
    guest.program(1, MSI_ADDRESS, 0x23)  # new message, then unmask
    assert guest.vectors[1].delivered == [(MSI_ADDRESS, 0x23)]
    assert guest.pba() == 0


def test_function_mask_holds_every_vector_pending(guest: Guest) -> None:
    for i in range(VECTORS):
        guest.program(i, MSI_ADDRESS, 0x30 + i)
    guest.set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    guest.fire(0)
    guest.fire(3)
    assert guest.pba() == 0b1001
    guest.set_control(PCI_MSIX_FLAGS_ENABLE)
    assert guest.vectors[0].delivered == [(MSI_ADDRESS, 0x30)]
    assert guest.vectors[3].delivered == [(MSI_ADDRESS, 0x33)]
    assert guest.pba() == 0


def test_pba_covers_many_vectors_in_qwords(platform: SimulatedPlatform) -> None:
    g = Guest(platform, vectors=70)
    msix = g.function.msix
    assert msix.pba_bytes == 16
    g.set_control(PCI_MSIX_FLAGS_ENABLE)
    g.fire(65)
    assert g.mmio.read(BAR_ADDRESS + PBA_OFFSET + 8, 8) == 1 << 1
    assert g.mmio.read(BAR_ADDRESS + PBA_OFFSET + 8, 4) == 1 << 1
    assert g.pba() == 0
    msix.close()


def test_pba_is_read_only(guest: Guest) -> None:
    guest.set_control(PCI_MSIX_FLAGS_ENABLE)
    guest.fire(2)
    guest.mmio.write(BAR_ADDRESS + PBA_OFFSET, 8, 0)
    guest.mmio.write(BAR_ADDRESS + PBA_OFFSET, 4, 0xFFFF_FFFF)
    assert guest.pba() == 1 << 2
    assert guest.function.msix.bad_accesses.count == 0


def test_vector_eventfd_and_signal(guest: Guest) -> None:
    msix = guest.function.msix
    assert msix.vector_eventfd(2) == guest.vectors[2].eventfd
    with pytest.raises(IndexError):
        msix.vector_eventfd(VECTORS)
    guest.program(2, MSI_ADDRESS, 0x77)
    guest.set_control(PCI_MSIX_FLAGS_ENABLE)
    msix.signal(2)
    guest.platform.poll()
    assert guest.vectors[2].delivered == [(MSI_ADDRESS, 0x77)]


def test_close_releases_every_vector(platform: SimulatedPlatform) -> None:
    g = Guest(platform)
    g.function.msix.close()
    assert all(v.closed for v in g.vectors)


# -- hostile accesses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, 1),
        (0, 2),
        (2, 4),  # misaligned DWORD
        (4, 8),  # misaligned QWORD
        (VECTORS * PCI_MSIX_ENTRY_SIZE, 4),  # past the table
        (VECTORS * PCI_MSIX_ENTRY_SIZE - 4, 8),
        (-4, 4),
        (0, 16),
    ],
)
def test_odd_table_accesses_read_zero_write_nothing_and_are_counted(
    guest: Guest, offset: int, size: int
) -> None:
    msix = guest.function.msix
    before = [msix.table_read(i, 4) for i in range(0, msix.table_bytes, 4)]
    assert msix.table_read(offset, size) == 0
    msix.table_write(offset, size, (1 << (8 * size)) - 1 if size else 0)
    assert [msix.table_read(i, 4) for i in range(0, msix.table_bytes, 4)] == before
    assert msix.bad_accesses.count == 2
    assert all(v.masked for v in guest.vectors)


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 2), (4, 8), (8, 8), (2, 4)])
def test_odd_pba_accesses_read_zero_and_are_counted(guest: Guest, offset: int, size: int) -> None:
    guest.set_control(PCI_MSIX_FLAGS_ENABLE)
    guest.fire(0)
    msix = guest.function.msix
    assert msix.pba_read(offset, size) == 0
    msix.pba_write(offset, size, 0)
    assert msix.bad_accesses.count == 2


def test_random_accesses_never_raise(guest: Guest) -> None:
    rng = random.Random(7)
    msix = guest.function.msix
    for _ in range(3000):
        offset = rng.randrange(-16, msix.table_bytes + 16)
        size = rng.choice((0, 1, 2, 3, 4, 8, 16))
        value = rng.getrandbits(64)
        msix.table_write(offset, size, value)
        msix.table_read(offset, size)
        msix.pba_read(offset % 32, size)
        guest.set_control(rng.getrandbits(16))
    guest.platform.poll()
