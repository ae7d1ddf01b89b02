"""MSI-X table trapping, BAR mapping and interrupt routing of a passed-through function
(iovirt.vfio.device / iovirt.vfio.interrupts), against the VFIO simulator."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from iovirt.vfio import uapi
from iovirt.vfio.simulator import (
    PassthroughRig,
    SimulatedBar,
    SimulatedMsi,
    SimulatedMsix,
    SimulatedPciDevice,
)

MSIX_ENABLE = 0x8000
MSIX_MASKALL = 0x4000
TABLE = 0x2000
PBA = 0x3000
MSG_ADDRESS = 0xFEE0_0000


def device(msix_mappable: bool = False, intx_pin: int = 1) -> SimulatedPciDevice:
    return SimulatedPciDevice(
        bars={0: SimulatedBar(0x4000, "mem64"), 4: SimulatedBar(0x1000, "mem32")},
        msix=SimulatedMsix(
            table_size=4, bar=0, table_offset=TABLE, pba_offset=PBA, mappable=msix_mappable
        ),
        msi=SimulatedMsi(vectors=4, is_64bit=True, per_vector_mask=True),
        intx_pin=intx_pin,
    )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[PassthroughRig]:
    r = PassthroughRig(device(), tmp_path)
    yield r
    r.close()


def bar0(rig: PassthroughRig) -> int:
    return rig.device.bar_address(0)


def memory_on(rig: PassthroughRig) -> None:
    rig.device.config_write(0x04, 2, 0x0006)  # memory decode + bus master


def msix_control(rig: PassthroughRig, value: int) -> None:
    rig.device.config_write(rig.sim.cap_offsets[0x11] + 2, 2, value)


def program_entry(rig: PassthroughRig, index: int, data: int, masked: bool) -> None:
    base = bar0(rig) + TABLE + 16 * index
    rig.mmio.write(base, 4, MSG_ADDRESS)
    rig.mmio.write(base + 4, 4, 0)
    rig.mmio.write(base + 8, 4, data)
    rig.mmio.write(base + 12, 4, 1 if masked else 0)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


# -- BAR mapping --------------------------------------------------------------------------


def test_bar_pages_outside_msix_are_mapped_where_the_guest_put_the_bar(
    rig: PassthroughRig,
) -> None:
    assert rig.platform.open_mappings() == []  # memory decoding is off
    memory_on(rig)
    maps = sorted((m.gpa, m.size) for m in rig.platform.open_mappings())
    # BAR0: registers page 0-1 only (table and PBA pages trap); BAR4: all of it.
    assert maps == sorted([(bar0(rig), 0x2000), (rig.device.bar_address(4), 0x1000)])
    assert rig.device.mapped_ranges() == maps


def test_a_mapped_page_is_the_devices_memory(rig: PassthroughRig) -> None:
    memory_on(rig)
    mapping = next(m for m in rig.platform.open_mappings() if m.gpa == bar0(rig))
    mapping.guest_write(bar0(rig) + 0x1000, b"\xde\xad\xbe\xef")  # a doorbell, say
    assert rig.sim.bar_bytes(0, 0x1000, 4) == b"\xde\xad\xbe\xef"


def test_moving_the_bar_moves_the_mappings_and_decode_off_removes_them(
    rig: PassthroughRig,
) -> None:
    memory_on(rig)
    old = bar0(rig)
    rig.device.config_write(0x10, 4, 0xD000_0004)
    rig.device.config_write(0x14, 4, 0)
    assert bar0(rig) == 0xD000_0000 != old
    assert (0xD000_0000, 0x2000) in rig.device.mapped_ranges()
    assert all(m.gpa != old for m in rig.platform.open_mappings())
    rig.device.config_write(0x04, 2, 0)
    assert rig.platform.open_mappings() == []


def test_msix_mappable_bar_still_traps_table_and_pba(tmp_path: Path) -> None:
    r = PassthroughRig(device(msix_mappable=True), tmp_path)
    try:
        memory_on(r)
        assert (bar0(r), 0x2000) in r.device.mapped_ranges()
        assert all(
            not (gpa < bar0(r) + 0x4000 and bar0(r) + TABLE < gpa + size)
            for gpa, size in r.device.mapped_ranges()
        )
    finally:
        r.close()


# -- the table and PBA trap -----------------------------------------------------------------


def test_table_writes_are_emulated_and_never_reach_the_device(rig: PassthroughRig) -> None:
    memory_on(rig)
    program_entry(rig, 2, 0x4142, masked=True)
    base = bar0(rig) + TABLE + 32
    assert rig.mmio.read(base, 4) == MSG_ADDRESS
    assert rig.mmio.read(base + 8, 4) == 0x4142
    assert rig.mmio.read(base + 12, 4) == 1
    assert rig.sim.table_writes == []
    assert rig.sim.bar_bytes(0, TABLE, 64) == bytes(64)


def test_table_entries_come_out_of_reset_masked(rig: PassthroughRig) -> None:
    memory_on(rig)
    for i in range(4):
        assert rig.mmio.read(bar0(rig) + TABLE + 16 * i + 12, 4) == 1


def test_registers_sharing_the_pba_page_reach_the_device(rig: PassthroughRig) -> None:
    memory_on(rig)
    rig.mmio.write(bar0(rig) + 0x3800, 4, 0x1234_5678)
    assert rig.sim.bar_bytes(0, 0x3800, 4) == bytes.fromhex("78563412")
    assert rig.mmio.read(bar0(rig) + 0x3800, 4) == 0x1234_5678


def test_odd_table_accesses_are_counted_not_obeyed(rig: PassthroughRig) -> None:
    memory_on(rig)
    msix = rig.device.msix
    assert msix is not None
    before = msix.bad_accesses.count
    rig.mmio.write(bar0(rig) + TABLE + 8, 2, 0xFFFF)  # 16-bit: not allowed
    rig.mmio.write(bar0(rig) + TABLE + 2, 4, 0xFFFF_FFFF)  # misaligned
    assert rig.mmio.read(bar0(rig) + TABLE + 1, 4) == 0
    assert msix.bad_accesses.count == before + 3
    straddle = rig.device.bad_accesses.count
    rig.mmio.write(bar0(rig) + TABLE - 4, 8, 0xFFFF_FFFF_FFFF_FFFF)  # half in, half out
    assert rig.device.bad_accesses.count == straddle + 1
    assert rig.mmio.read(bar0(rig) + TABLE + 8, 4) == 0
    assert rig.sim.table_writes == []


def test_pba_is_read_only(rig: PassthroughRig) -> None:
    memory_on(rig)
    rig.mmio.write(bar0(rig) + PBA, 8, 0xF)
    assert rig.mmio.read(bar0(rig) + PBA, 8) == 0


# -- MSI-X routing --------------------------------------------------------------------------


def test_enabling_msix_binds_every_vector_and_switches_intx_off(rig: PassthroughRig) -> None:
    assert rig.sim.enabled_index() == uapi.VFIO_PCI_INTX_IRQ_INDEX
    msix_control(rig, MSIX_ENABLE | MSIX_MASKALL)
    assert rig.sim.enabled_index() == uapi.VFIO_PCI_MSIX_IRQ_INDEX
    fds = rig.sim.irqs[uapi.VFIO_PCI_MSIX_IRQ_INDEX].triggers
    assert fds == [v.eventfd for v in rig.platform.vectors[:4]]
    msix_control(rig, 0)
    assert rig.sim.enabled_index() == uapi.VFIO_PCI_INTX_IRQ_INDEX  # INTx is back


def test_an_unmasked_vector_delivers_the_guests_message(rig: PassthroughRig) -> None:
    memory_on(rig)
    program_entry(rig, 1, 0x41, masked=False)
    msix_control(rig, MSIX_ENABLE)
    assert rig.sim.fire(uapi.VFIO_PCI_MSIX_IRQ_INDEX, 1)
    rig.platform.poll()
    assert rig.platform.vectors[1].delivered == [(MSG_ADDRESS, 0x41)]
    assert rig.platform.vectors[0].delivered == []


def test_a_masked_vector_is_pending_then_delivered_on_unmask(rig: PassthroughRig) -> None:
    memory_on(rig)
    program_entry(rig, 1, 0x41, masked=True)
    msix_control(rig, MSIX_ENABLE)
    rig.sim.fire(uapi.VFIO_PCI_MSIX_IRQ_INDEX, 1)
    rig.platform.poll()
    vector = rig.platform.vectors[1]
    assert vector.delivered == []
    assert rig.mmio.read(bar0(rig) + PBA, 8) == 0b10
    rig.mmio.write(bar0(rig) + TABLE + 16 + 12, 4, 0)  # unmask entry 1
    assert vector.delivered == [(MSG_ADDRESS, 0x41)]
    assert rig.mmio.read(bar0(rig) + PBA, 8) == 0


def test_function_mask_holds_every_vector(rig: PassthroughRig) -> None:
    memory_on(rig)
    program_entry(rig, 0, 0x30, masked=False)
    msix_control(rig, MSIX_ENABLE | MSIX_MASKALL)
    rig.sim.fire(uapi.VFIO_PCI_MSIX_IRQ_INDEX, 0)
    rig.platform.poll()
    assert rig.platform.vectors[0].delivered == []
    msix_control(rig, MSIX_ENABLE)
    assert rig.platform.vectors[0].delivered == [(MSG_ADDRESS, 0x30)]


def test_reprogramming_an_entry_changes_the_route(rig: PassthroughRig) -> None:
    memory_on(rig)
    program_entry(rig, 3, 0x50, masked=False)
    msix_control(rig, MSIX_ENABLE)
    program_entry(rig, 3, 0x51, masked=False)
    rig.sim.fire(uapi.VFIO_PCI_MSIX_IRQ_INDEX, 3)
    rig.platform.poll()
    assert rig.platform.vectors[3].delivered == [(MSG_ADDRESS, 0x51)]


# -- MSI --------------------------------------------------------------------------------------


def test_msi_multiple_messages_with_per_vector_masking(rig: PassthroughRig) -> None:
    off = rig.sim.cap_offsets[0x05]
    d = rig.device
    d.config_write(off + 4, 4, MSG_ADDRESS)
    d.config_write(off + 8, 4, 0)
    d.config_write(off + 12, 2, 0x60)
    d.config_write(off + 16, 4, 0b0100)  # vector 2 masked
    d.config_write(off + 2, 2, 2 << 4 | 1)  # 4 messages, enable
    assert rig.sim.enabled_index() == uapi.VFIO_PCI_MSI_IRQ_INDEX
    msi = d.msi
    assert msi is not None and msi.vectors_enabled() == 4
    fds = rig.sim.irqs[uapi.VFIO_PCI_MSI_IRQ_INDEX].triggers
    vectors = [msi.vector(i) for i in range(4)]
    assert fds == [v.eventfd for v in vectors]
    for i in range(4):
        rig.sim.fire(uapi.VFIO_PCI_MSI_IRQ_INDEX, i)
    rig.platform.poll()
    delivered = [v.delivered for v in vectors]  # simulator vectors record them
    assert delivered == [[(MSG_ADDRESS, 0x60)], [(MSG_ADDRESS, 0x61)], [], [(MSG_ADDRESS, 0x63)]]
    assert d.config_read(off + 20, 4) == 0b0100  # vector 2 pending
    d.config_write(off + 16, 4, 0)
    assert d.config_read(off + 20, 4) == 0
    d.config_write(off + 2, 2, 0)
    assert rig.sim.enabled_index() == uapi.VFIO_PCI_INTX_IRQ_INDEX


# -- INTx -------------------------------------------------------------------------------------


def test_intx_goes_to_a_resampling_irqfd_on_the_boards_gsi(rig: PassthroughRig) -> None:
    intx = rig.device.intx
    assert intx is not None
    assert rig.irqfd.routes == {intx.trigger: (intx.resample, 17)}
    state = rig.sim.irqs[uapi.VFIO_PCI_INTX_IRQ_INDEX]
    assert state.triggers == [intx.trigger]
    assert state.unmask == intx.resample
    assert rig.sim.fire(uapi.VFIO_PCI_INTX_IRQ_INDEX)
    assert readable(intx.trigger)
    os.eventfd_read(intx.trigger)


def test_no_pin_no_intx(tmp_path: Path) -> None:
    r = PassthroughRig(device(intx_pin=0), tmp_path)
    try:
        assert r.device.intx is None
        assert r.irqfd.routes == {}
        assert r.device.config_read(0x3D, 1) == 0
        assert r.sim.enabled_index() is None
    finally:
        r.close()


def test_close_stops_every_route(rig: PassthroughRig) -> None:
    memory_on(rig)
    msix_control(rig, MSIX_ENABLE)
    rig.device.close()
    assert rig.irqfd.routes == {}
    assert rig.platform.open_mappings() == []
    assert all(v.closed for v in rig.platform.vectors)
