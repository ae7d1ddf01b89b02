"""KVM memory slots with dirty logging (:meth:`KvmPlatform.map_ram`) and the bochs-display
framebuffer BAR on this machine's /dev/kvm.

Guests run in real mode from the reset vector with 1 MiB of RAM, so the first byte they
cannot reach as RAM, 0x100000, is where the mapped buffers go: ES = 0xFFFF reaches
[0x100000, 0x10FFF0) with offsets 0x10 and up.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable
from typing import Any

import pytest

from iovirt.bus.pci import PCI_BASE_ADDRESS_0, PCI_COMMAND, PCI_COMMAND_MEMORY, PciRoot
from iovirt.devices.bochs_display import (
    DISPI_OFFSET,
    MMIO_BAR,
    VBE_DISPI_ENABLED,
    VBE_DISPI_INDEX_BPP,
    VBE_DISPI_INDEX_ENABLE,
    VBE_DISPI_INDEX_XRES,
    VBE_DISPI_INDEX_YRES,
    VBE_DISPI_LFB_ENABLED,
    VRAM_BAR,
    BochsDisplay,
)
from iovirt.display import DisplayMode
from iovirt.errors import KvmError
from iovirt.kvm.platform import KvmPlatform, KvmRamMapping
from iovirt.vm import VmExitReason

pytestmark = pytest.mark.hostkvm

ONE_MIB = 1 << 20
BUFFER_GPA = 0x10_0000
PAGE = 4096
ACTION_PORT = 0x610
EXIT = "mov $0x501, %dx\n mov ${code}, %al\n out %al, %dx\n"
ES_HIGH = "mov $0xffff, %ax\n mov %ax, %es\n"


def es_offset(gpa: int) -> int:
    """The ES:offset (ES = 0xFFFF) that reaches ``gpa``."""
    return gpa - 0xFFFF0


class _Port:
    """A port whose write runs ``action`` on the vCPU thread."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.action()


class _Recorder:
    """An MMIO device that records the writes that reach it."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_dirty_log_reports_exactly_the_written_pages(make_guest: Any) -> None:
    guest = make_guest(
        ES_HIGH
        + f"movb $0xab, %es:{es_offset(BUFFER_GPA + 1 * PAGE + 0x10):#x}\n"
        + f"movl $0x12345678, %es:{es_offset(BUFFER_GPA + 5 * PAGE + 0x20):#x}\n"
        + EXIT.format(code=0x21),
        memory=ONE_MIB,
    )
    platform = KvmPlatform(guest.vm)
    buffer = mmap.mmap(-1, 64 * 1024)
    mapping = platform.map_ram(BUFFER_GPA, buffer, log_dirty=True)
    try:
        assert mapping.dirty_pages() == []  # nothing written yet
        result = guest.vm.run(timeout=20)
        assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x21)
        assert buffer[1 * PAGE + 0x10] == 0xAB
        assert buffer[5 * PAGE + 0x20 : 5 * PAGE + 0x24] == bytes.fromhex("78563412")
        assert mapping.dirty_pages() == [1, 5]
        assert mapping.dirty_pages() == []  # reading the log cleared it
    finally:
        mapping.close()


def test_without_dirty_logging_writes_land_but_nothing_is_reported(make_guest: Any) -> None:
    guest = make_guest(
        ES_HIGH
        + f"movw $0xbeef, %es:{es_offset(BUFFER_GPA + 3 * PAGE):#x}\n"
        + EXIT.format(code=0x22),
        memory=ONE_MIB,
    )
    buffer = mmap.mmap(-1, 16 * 1024)
    mapping = KvmPlatform(guest.vm).map_ram(BUFFER_GPA, buffer)
    try:
        assert guest.vm.run(timeout=20).code == 0x22
        assert buffer[3 * PAGE : 3 * PAGE + 2] == bytes.fromhex("efbe")
        assert mapping.dirty_pages() == []
    finally:
        mapping.close()


def test_a_deleted_slot_is_gone_and_its_number_reused(make_guest: Any) -> None:
    # The guest writes to A, asks the host (port) to remove A and map a second buffer at
    # B, then writes to A again (now the MMIO bus's) and to B.
    half = 32 * 1024
    a, b = BUFFER_GPA, BUFFER_GPA + half
    guest = make_guest(
        ES_HIGH
        + f"movb $0x11, %es:{es_offset(a + 0x10):#x}\n"
        + f"mov ${ACTION_PORT:#x}, %dx\n out %al, %dx\n"
        + f"movb $0x22, %es:{es_offset(a + 0x20):#x}\n"
        + f"movb $0x33, %es:{es_offset(b + PAGE + 0x30):#x}\n"
        + EXIT.format(code=0x23),
        memory=ONE_MIB,
    )
    vm = guest.vm
    platform = KvmPlatform(vm)
    first, second = mmap.mmap(-1, half), mmap.mmap(-1, half)
    recorder = _Recorder()
    vm.mmio.register(a, half, recorder, "where A was")
    mappings: list[KvmRamMapping] = [platform.map_ram(a, first, log_dirty=True)]

    def move() -> None:
        mappings[0].close()
        mappings.append(platform.map_ram(b, second, log_dirty=True))

    vm.pio.register(ACTION_PORT, 1, _Port(move), "move")
    try:
        assert vm.run(timeout=20).code == 0x23
        assert len(mappings) == 2
        assert mappings[1].slot == mappings[0].slot  # the freed number came back
        assert first[0x10] == 0x11
        assert first[0x20] == 0  # the slot was really gone ...
        assert recorder.writes == [(0x20, 1, 0x22)]  # ... so the write exited to the bus
        assert second[PAGE + 0x30] == 0x33
        assert mappings[1].dirty_pages() == [1]
        with pytest.raises(BufferError):
            second.close()  # pinned while KVM maps it
    finally:
        for mapping in mappings:
            mapping.close()
    first.close()
    second.close()  # unpinned once the slot is deleted


def test_a_refused_slot_leaks_nothing(make_guest: Any) -> None:
    guest = make_guest(EXIT.format(code=0), memory=ONE_MIB)
    platform = KvmPlatform(guest.vm)
    buffer = mmap.mmap(-1, 64 * 1024)
    first = platform.map_ram(BUFFER_GPA, buffer)
    first.close()  # its number is the lowest free one now
    with pytest.raises(KvmError) as refused:
        platform.map_ram(0x8_0000, buffer)  # over guest RAM
    assert refused.value.errno == errno.EEXIST
    with pytest.raises(ValueError):
        platform.map_ram(BUFFER_GPA + 1, buffer)  # not page-aligned: refused before KVM
    again = platform.map_ram(BUFFER_GPA, buffer)
    try:
        assert again.slot == first.slot  # the refusal gave its number back
    finally:
        again.close()


def test_bochs_display_framebuffer_is_a_dirty_logged_slot(make_guest: Any) -> None:
    # 64 KiB of video memory at 0x100000, 128x100 at 32 bpp: 512-byte rows, 8 to a page.
    width, height, row = 128, 100, 128 * 4
    pixels = [(10, 4, 0x00FF_0000), (90, 0, 0x0000_FF00)]  # (row, column, xrgb)
    body = ES_HIGH
    for y, x, colour in pixels:
        body += f"movl ${colour:#x}, %es:{es_offset(BUFFER_GPA + y * row + x * 4):#x}\n"
    guest = make_guest(body + EXIT.format(code=0x24), memory=ONE_MIB)
    vm = guest.vm
    platform = KvmPlatform(vm)
    display = BochsDisplay(platform, 64 * 1024)
    vm.pci = PciRoot(mmio=vm.mmio, pio=vm.pio, mem_window=(BUFFER_GPA, BUFFER_GPA + ONE_MIB))
    vm.pci.add(display)
    vm.add_closer(display.close)
    # Program it from the host as firmware and the driver would: BAR, decode, mode.
    display.config_write(PCI_BASE_ADDRESS_0 + 4 * VRAM_BAR, 4, BUFFER_GPA)
    display.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    regs = display.bar_address(MMIO_BAR)

    def dispi(index: int, value: int) -> None:
        vm.mmio.write(regs + DISPI_OFFSET + 2 * index, 2, value)  # as a guest access

    dispi(VBE_DISPI_INDEX_BPP, 32)
    dispi(VBE_DISPI_INDEX_XRES, width)
    dispi(VBE_DISPI_INDEX_YRES, height)
    dispi(VBE_DISPI_INDEX_ENABLE, VBE_DISPI_ENABLED | VBE_DISPI_LFB_ENABLED)
    assert display.mode() == DisplayMode(width, height, 32, row, 0)
    assert display.dirty_rows() == [(0, height)]
    assert display.dirty_rows() == []

    result = vm.run(timeout=20)
    assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x24)
    vram = display.vram()
    for y, x, colour in pixels:
        at = y * row + x * 4
        assert int.from_bytes(vram[at : at + 4], "little") == colour
    assert display.fallback_accesses == 0  # no pixel write exited to the VMM
    # Row 10 is in page 1 (rows 8-15), row 90 in page 11 (rows 88-95).
    assert display.dirty_rows() == [(8, 16), (88, 96)]
    assert display.dirty_rows() == []
