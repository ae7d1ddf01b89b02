"""Tests of the bochs-display model, driven the way Linux's ``bochs`` DRM driver does.

The board is a :class:`PciRoot` on real port and MMIO buses with one
:class:`BochsDisplay`; :class:`Guest` reaches config space through 0xCF8/0xCFC and the
BARs through the MMIO bus at the addresses the guest reads back from the BARs. Video
memory mappings come from :class:`SimulatedPlatform`, whose mappings report exactly the
pages a test writes "as the guest" through them (the stand-in for KVM's dirty log).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from iovirt.bus import Bus
from iovirt.bus.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_PORTS,
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_COMMAND_MEMORY,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PciRoot,
)
from iovirt.devices.bochs_display import (
    DISPI_OFFSET,
    EDID_DESCRIPTORS,
    EDID_WINDOW_SIZE,
    MMIO_BAR,
    MMIO_BAR_SIZE,
    QEXT_OFFSET,
    VBE_DISPI_ENABLED,
    VBE_DISPI_GETCAPS,
    VBE_DISPI_ID0,
    VBE_DISPI_ID5,
    VBE_DISPI_INDEX_BANK,
    VBE_DISPI_INDEX_BPP,
    VBE_DISPI_INDEX_ENABLE,
    VBE_DISPI_INDEX_ID,
    VBE_DISPI_INDEX_VIDEO_MEMORY_64K,
    VBE_DISPI_INDEX_VIRT_HEIGHT,
    VBE_DISPI_INDEX_VIRT_WIDTH,
    VBE_DISPI_INDEX_X_OFFSET,
    VBE_DISPI_INDEX_XRES,
    VBE_DISPI_INDEX_Y_OFFSET,
    VBE_DISPI_INDEX_YRES,
    VBE_DISPI_LFB_ENABLED,
    VBE_DISPI_NOCLEARMEM,
    VGA_IOPORT_OFFSET,
    VRAM_BAR,
    BochsDisplay,
)
from iovirt.display import DisplayMode
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedPlatform, SimulatedRamMapping

PAGE = 4096
VRAM = 4 << 20  # 4 MiB: room for 1024x768x32 (3 MiB) and a little more


class Guest:
    """The guest side: config space through the ports, the BARs through MMIO."""

    def __init__(self, pio: Bus, mmio: Bus, slot: int) -> None:
        self.pio, self.mmio, self.slot = pio, mmio, slot

    def cfg_read(self, reg: int, size: int) -> int:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | self.slot << 11 | reg & 0xFC)
        return self.pio.read(CONFIG_DATA_PORT + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | self.slot << 11 | reg & 0xFC)
        self.pio.write(CONFIG_DATA_PORT + (reg & 3), size, value)

    def size_bar(self, index: int) -> tuple[int, int, int]:
        """(address, size, flag bits) of a 32-bit BAR, sized with all-ones as Linux does."""
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        original = self.cfg_read(reg, 4)
        self.cfg_write(reg, 4, 0xFFFF_FFFF)
        mask = self.cfg_read(reg, 4)
        self.cfg_write(reg, 4, original)
        return original & ~0xF, (~(mask & ~0xF) & 0xFFFF_FFFF) + 1, original & 0xF

    def bar(self, index: int) -> int:
        return self.cfg_read(PCI_BASE_ADDRESS_0 + 4 * index, 4) & ~0xF

    def enable_memory(self, on: bool = True) -> None:
        self.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY if on else 0)

    def regs_read(self, offset: int, size: int) -> int:
        return self.mmio.read(self.bar(MMIO_BAR) + offset, size)

    def regs_write(self, offset: int, size: int, value: int) -> None:
        self.mmio.write(self.bar(MMIO_BAR) + offset, size, value)

    def dispi_read(self, index: int) -> int:
        return self.regs_read(DISPI_OFFSET + 2 * index, 2)

    def dispi_write(self, index: int, value: int) -> None:
        self.regs_write(DISPI_OFFSET + 2 * index, 2, value)

    def set_mode(self, width: int, height: int, bpp: int = 32, flags: int = 0) -> None:
        """bochs_hw_setmode(): disable, program, enable with the linear framebuffer."""
        stride = width * ((bpp + 7) // 8)
        self.dispi_write(VBE_DISPI_INDEX_ENABLE, 0)
        self.dispi_write(VBE_DISPI_INDEX_BPP, bpp)
        self.dispi_write(VBE_DISPI_INDEX_XRES, width)
        self.dispi_write(VBE_DISPI_INDEX_YRES, height)
        self.dispi_write(VBE_DISPI_INDEX_BANK, 0)
        self.dispi_write(VBE_DISPI_INDEX_VIRT_WIDTH, width)
        self.dispi_write(VBE_DISPI_INDEX_VIRT_HEIGHT, VRAM // max(stride, 1))
        self.dispi_write(VBE_DISPI_INDEX_X_OFFSET, 0)
        self.dispi_write(VBE_DISPI_INDEX_Y_OFFSET, 0)
        self.dispi_write(VBE_DISPI_INDEX_ENABLE, VBE_DISPI_ENABLED | VBE_DISPI_LFB_ENABLED | flags)

    def set_base(self, x: int, y: int, stride: int, addr: int, bpp: int = 32) -> None:
        """bochs_hw_setbase(): scan out from ``addr`` with pitch ``stride``."""
        offset = addr + y * stride + x * (bpp // 8)
        self.dispi_write(VBE_DISPI_INDEX_VIRT_WIDTH, stride * 8 // bpp)
        self.dispi_write(VBE_DISPI_INDEX_X_OFFSET, (offset % stride) * 8 // bpp)
        self.dispi_write(VBE_DISPI_INDEX_Y_OFFSET, offset // stride)


class Board:
    def __init__(self, memory: GuestMemory, vram_size: int = VRAM) -> None:
        self.pio = Bus("pio", 0x1_0000)
        self.mmio = Bus("mmio", 1 << 48)
        self.root = PciRoot(mmio=self.mmio, pio=self.pio)
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci")
        self.platform = SimulatedPlatform(memory)
        self.display = BochsDisplay(self.platform, vram_size)
        devfn = self.root.add(self.display)
        self.guest = Guest(self.pio, self.mmio, devfn >> 3)

    def mapping(self) -> SimulatedRamMapping:
        (mapping,) = self.platform.open_mappings()
        return mapping


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 0x10000)]) as mem:
        yield mem


@pytest.fixture
def board(memory: GuestMemory) -> Iterator[Board]:
    b = Board(memory)
    b.guest.enable_memory()
    yield b
    b.display.close()


# -- PCI identity and BARs -----------------------------------------------------------------


def test_identity_is_qemus_bochs_display(board: Board) -> None:
    g = board.guest
    assert g.cfg_read(0x00, 2) == 0x1234
    assert g.cfg_read(0x02, 2) == 0x1111
    assert g.cfg_read(0x08, 4) == 0x0380_0002  # class 03/80/00, revision 2
    assert g.cfg_read(PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert g.cfg_read(PCI_SUBSYSTEM_ID, 2) == 0x1100


def test_bars_are_a_prefetchable_framebuffer_and_4k_of_registers(board: Board) -> None:
    g = board.guest
    g.enable_memory(False)  # as Linux sizes BARs: decode off
    address, size, flags = g.size_bar(VRAM_BAR)
    assert (size, flags) == (VRAM, 0x8)  # 32-bit memory, prefetchable
    assert address % VRAM == 0
    address, size, flags = g.size_bar(MMIO_BAR)
    assert (size, flags) == (MMIO_BAR_SIZE, 0x0)


@pytest.mark.parametrize("size", [0, 1 << 20 | 1, 3 << 20, 32 << 10, 512 << 20])
def test_video_memory_size_must_be_a_power_of_two_in_range(memory: GuestMemory, size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        BochsDisplay(SimulatedPlatform(memory), size)


# -- DISPI registers -----------------------------------------------------------------------


def test_id_and_video_memory_size(board: Board) -> None:
    g = board.guest
    assert g.dispi_read(VBE_DISPI_INDEX_ID) == VBE_DISPI_ID5
    assert g.dispi_read(VBE_DISPI_INDEX_VIDEO_MEMORY_64K) == VRAM // 65536
    g.dispi_write(VBE_DISPI_INDEX_ID, VBE_DISPI_ID0)  # a BIOS probing an older interface
    assert g.dispi_read(VBE_DISPI_INDEX_ID) == VBE_DISPI_ID0
    before = board.display.bad_accesses.count
    g.dispi_write(VBE_DISPI_INDEX_ID, 0x1234)
    assert g.dispi_read(VBE_DISPI_INDEX_ID) == VBE_DISPI_ID0
    g.dispi_write(VBE_DISPI_INDEX_VIDEO_MEMORY_64K, 1)
    assert g.dispi_read(VBE_DISPI_INDEX_VIDEO_MEMORY_64K) == VRAM // 65536
    assert board.display.bad_accesses.count == before + 2


def test_getcaps_reads_the_maximums(board: Board) -> None:
    g = board.guest
    g.dispi_write(VBE_DISPI_INDEX_XRES, 800)
    g.dispi_write(VBE_DISPI_INDEX_YRES, 600)
    g.dispi_write(VBE_DISPI_INDEX_BPP, 16)
    g.dispi_write(VBE_DISPI_INDEX_ENABLE, VBE_DISPI_GETCAPS)
    assert g.dispi_read(VBE_DISPI_INDEX_XRES) == 2560
    assert g.dispi_read(VBE_DISPI_INDEX_YRES) == 1600
    assert g.dispi_read(VBE_DISPI_INDEX_BPP) == 32
    assert board.display.mode() is None
    g.dispi_write(VBE_DISPI_INDEX_ENABLE, 0)
    assert [g.dispi_read(i) for i in (1, 2, 3)] == [800, 600, 16]


def test_linux_modeset_gives_the_mode(board: Board) -> None:
    g = board.guest
    assert board.display.mode() is None
    g.set_mode(1024, 768)
    assert board.display.mode() == DisplayMode(1024, 768, 32, 4096, 0)
    assert g.dispi_read(VBE_DISPI_INDEX_VIRT_HEIGHT) == VRAM // 4096
    assert g.dispi_read(VBE_DISPI_INDEX_ENABLE) == VBE_DISPI_ENABLED | VBE_DISPI_LFB_ENABLED
    assert board.display.bad_accesses.count == 0
    g.dispi_write(VBE_DISPI_INDEX_ENABLE, 0)
    assert board.display.mode() is None


def test_page_flip_moves_the_offset(board: Board) -> None:
    g = board.guest
    g.set_mode(640, 480)
    g.set_base(0, 0, 640 * 4, 0x20_0000)  # a buffer object at 2 MiB
    assert board.display.mode() == DisplayMode(640, 480, 32, 2560, 0x20_0000)
    g.set_base(8, 2, 1024 * 4, 0)  # a wider framebuffer, panned
    assert board.display.mode() == DisplayMode(640, 480, 32, 4096, 2 * 4096 + 8 * 4)


@pytest.mark.parametrize(
    ("bpp", "pixel"), [(8, 1), (15, 2), (16, 2), (24, 3), (32, 4)], ids=lambda v: str(v)
)
def test_every_depth_has_its_stride(board: Board, bpp: int, pixel: int) -> None:
    board.guest.set_mode(800, 600, bpp)
    assert board.display.mode() == DisplayMode(800, 600, bpp, 800 * pixel, 0)


def test_unknown_bpp_is_refused(board: Board) -> None:
    g = board.guest
    g.set_mode(800, 600, 16)
    before = board.display.bad_accesses.count
    for bad in (0, 4, 12, 33, 0xFFFF):
        g.dispi_write(VBE_DISPI_INDEX_BPP, bad)
        assert g.dispi_read(VBE_DISPI_INDEX_BPP) == 16
    assert board.display.bad_accesses.count == before + 5
    mode = board.display.mode()
    assert mode is not None and mode.bpp == 16


def test_resolution_is_clipped_to_the_maximum_and_to_video_memory(
    board: Board, caplog: pytest.LogCaptureFixture
) -> None:
    g = board.guest
    g.set_mode(4000, 3000)
    mode = board.display.mode()
    # 2560 pixels at 4 bytes: 10240-byte lines; 4 MiB holds 409 of them (< 1600).
    assert mode == DisplayMode(2560, VRAM // 10240, 32, 10240, 0)
    assert g.dispi_read(VBE_DISPI_INDEX_XRES) == 2560
    assert g.dispi_read(VBE_DISPI_INDEX_YRES) == VRAM // 10240
    assert g.dispi_read(VBE_DISPI_INDEX_VIRT_HEIGHT) == VRAM // 10240
    assert board.display.bad_accesses.count == 1  # one enable, one report
    assert "XRES 4000" in caplog.text and "YRES 3000" in caplog.text


def test_odd_width_and_zero_sizes_are_adjusted(board: Board) -> None:
    g = board.guest
    g.set_mode(1023, 500, 16)
    mode = board.display.mode()
    assert mode is not None and (mode.width, mode.stride) == (1022, 2044)
    g.dispi_write(VBE_DISPI_INDEX_XRES, 0)
    g.dispi_write(VBE_DISPI_INDEX_YRES, 0)
    mode = board.display.mode()
    assert mode is not None and (mode.width, mode.height) == (8, 1)
    # The virtual width stays the wider of what was asked and the screen.
    assert mode.stride == 2044


def test_offset_beyond_video_memory_is_reset(board: Board) -> None:
    g = board.guest
    g.set_mode(1024, 768)
    before = board.display.bad_accesses.count
    g.dispi_write(VBE_DISPI_INDEX_Y_OFFSET, 500)  # 500 + 768 rows of 4 KiB > 4 MiB
    assert g.dispi_read(VBE_DISPI_INDEX_Y_OFFSET) == 0
    g.dispi_write(VBE_DISPI_INDEX_Y_OFFSET, 200)  # fits: 968 rows
    assert g.dispi_read(VBE_DISPI_INDEX_Y_OFFSET) == 200
    # A column offset past the row wraps into later rows: allowed while it fits, so
    # here it is the row offset that goes.
    g.dispi_write(VBE_DISPI_INDEX_X_OFFSET, 0xFFFF)
    assert g.dispi_read(VBE_DISPI_INDEX_Y_OFFSET) == 0
    assert board.display.mode() == DisplayMode(1024, 768, 32, 4096, 0xFFFF * 4)
    assert board.display.bad_accesses.count == before + 2
    # A screen that fills video memory leaves no room for a column offset either.
    g.set_mode(2560, 409)  # 409 rows of 10240 bytes: 6144 bytes to spare
    g.dispi_write(VBE_DISPI_INDEX_X_OFFSET, 1536)
    assert g.dispi_read(VBE_DISPI_INDEX_X_OFFSET) == 1536
    g.dispi_write(VBE_DISPI_INDEX_X_OFFSET, 1537)
    assert g.dispi_read(VBE_DISPI_INDEX_X_OFFSET) == 0
    assert board.display.mode() == DisplayMode(2560, 409, 32, 10240, 0)


def test_every_mode_lies_inside_video_memory(board: Board) -> None:
    # Whatever the guest writes, in whatever order, the scan-out stays inside VRAM.
    g = board.guest
    values = [0, 1, 7, 64, 639, 640, 1024, 2047, 2560, 2561, 4096, 8191, 8192, 0x7FFF, 0xFFFF]
    for i, value in enumerate(values):
        g.set_mode(values[(i * 7) % len(values)], value, (8, 15, 16, 24, 32)[i % 5])
        for index in (
            VBE_DISPI_INDEX_XRES,
            VBE_DISPI_INDEX_YRES,
            VBE_DISPI_INDEX_VIRT_WIDTH,
            VBE_DISPI_INDEX_X_OFFSET,
            VBE_DISPI_INDEX_Y_OFFSET,
        ):
            g.dispi_write(index, values[(i + index) % len(values)])
            mode = board.display.mode()
            assert mode is not None
            assert 0 < mode.width <= 2560 and 0 < mode.height <= 1600
            assert mode.offset + mode.size <= VRAM
            assert mode.stride >= mode.width * mode.bytes_per_pixel


def test_enable_clears_the_visible_area_unless_noclearmem(board: Board) -> None:
    g, display = board.guest, board.display
    fill = b"\xaa" * (640 * 4)
    mapping = board.mapping()
    for row in range(480 + 1):
        mapping.guest_write(mapping.gpa + row * 640 * 4, fill)
    g.set_mode(640, 480)
    vram = display.vram()
    assert bytes(vram[: 640 * 4 * 480]) == bytes(640 * 4 * 480)
    assert bytes(vram[640 * 4 * 480 : 640 * 4 * 481]) == fill  # below the screen: kept
    mapping.guest_write(mapping.gpa, fill)
    g.set_mode(640, 480, flags=VBE_DISPI_NOCLEARMEM)
    assert bytes(display.vram()[: len(fill)]) == fill
    # Re-enabling while enabled is no mode switch: nothing is cleared either.
    g.dispi_write(VBE_DISPI_INDEX_ENABLE, VBE_DISPI_ENABLED | VBE_DISPI_LFB_ENABLED)
    assert bytes(display.vram()[: len(fill)]) == fill


def test_byte_and_dword_register_accesses(board: Board) -> None:
    g = board.guest
    g.regs_write(DISPI_OFFSET + 2 * VBE_DISPI_INDEX_XRES, 1, 0x20)
    g.regs_write(DISPI_OFFSET + 2 * VBE_DISPI_INDEX_XRES + 1, 1, 0x03)
    assert g.dispi_read(VBE_DISPI_INDEX_XRES) == 0x320
    assert g.regs_read(DISPI_OFFSET + 2 * VBE_DISPI_INDEX_XRES + 1, 1) == 0x03
    # One dword covers XRES (low half) and YRES (high half).
    g.regs_write(DISPI_OFFSET + 2 * VBE_DISPI_INDEX_XRES, 4, 600 << 16 | 800)
    assert g.dispi_read(VBE_DISPI_INDEX_XRES) == 800
    assert g.dispi_read(VBE_DISPI_INDEX_YRES) == 600
    assert g.regs_read(DISPI_OFFSET, 4) == 800 << 16 | VBE_DISPI_ID5


def test_bank_is_masked_to_video_memory(board: Board) -> None:
    g = board.guest
    g.dispi_write(VBE_DISPI_INDEX_BANK, 0xFFFF)
    assert g.dispi_read(VBE_DISPI_INDEX_BANK) == VRAM // 65536 - 1


def test_bad_register_accesses_are_counted_not_raised(board: Board) -> None:
    display = board.display
    assert display.mmio_read(MMIO_BAR_SIZE - 2, 4) == 0
    assert display.mmio_read(0x10, 3) == 0
    assert display.mmio_read(-4, 4) == 0
    assert board.guest.regs_read(0x800, 4) == 0  # unused space
    display.mmio_write(0x4FE, 4, 0xFFFF_FFFF)  # straddles the VGA ports and DISPI
    display.mmio_write(0x700, 2, 1)
    assert display.bad_accesses.count == 6
    assert board.guest.dispi_read(VBE_DISPI_INDEX_ID) == VBE_DISPI_ID5


# -- EDID ----------------------------------------------------------------------------------


def _edid(board: Board) -> bytes:
    return bytes(board.guest.regs_read(i, 1) for i in range(EDID_WINDOW_SIZE))


def test_edid_is_a_valid_1_4_block(board: Board) -> None:
    edid = _edid(board)
    block = edid[:128]
    assert block[:8] == bytes.fromhex("00ffffffffffff00")
    assert sum(block) % 256 == 0
    assert (block[0x12], block[0x13]) == (1, 4)
    assert block[0x7E] == 0  # no extension blocks
    assert edid[128:] == bytes(EDID_WINDOW_SIZE - 128)
    # Manufacturer: three 5-bit letters, big endian.
    code = int.from_bytes(block[8:10], "big")
    letters = "".join(chr(ord("A") - 1 + (code >> s & 0x1F)) for s in (10, 5, 0))
    assert letters.isalpha() and letters.isupper()
    names = [
        block[o + 5 : o + 18] for o in range(0x36, 0x7E, 18) if block[o : o + 4] == b"\0\0\0\xfc"
    ]
    assert names == [b"iovirt\n      "]


def test_edid_prefers_1024x768(board: Board) -> None:
    dtd = _edid(board)[EDID_DESCRIPTORS : EDID_DESCRIPTORS + 18]
    pixel_clock = int.from_bytes(dtd[0:2], "little") * 10_000
    h_active = dtd[2] | (dtd[4] >> 4) << 8
    h_blank = dtd[3] | (dtd[4] & 0xF) << 8
    v_active = dtd[5] | (dtd[7] >> 4) << 8
    v_blank = dtd[6] | (dtd[7] & 0xF) << 8
    assert (h_active, v_active) == (1024, 768)
    refresh = pixel_clock / ((h_active + h_blank) * (v_active + v_blank))
    assert 59.5 < refresh < 60.5
    assert _edid(board)[0x18] & 0x02  # the first detailed timing is the preferred mode


def test_edid_reads_as_linux_does_and_is_read_only(board: Board) -> None:
    g = board.guest
    header = g.regs_read(0, 4) | g.regs_read(4, 4) << 32
    assert header == 0x00FF_FFFF_FFFF_FF00
    assert g.regs_read(0, 8) == header
    g.regs_write(0x10, 1, 0x55)
    assert g.regs_read(0x10, 1) == _edid(board)[0x10] != 0x55
    assert sum(_edid(board)[:128]) % 256 == 0
    assert board.display.bad_accesses.count == 1


# -- VGA ports and QEMU extended registers -------------------------------------------------


def test_vga_ports_are_inert(board: Board) -> None:
    # bochs_hw_blank(): misc output write, input status read, attribute index write.
    g = board.guest
    g.regs_write(VGA_IOPORT_OFFSET + 0x02, 1, 0x01)
    assert g.regs_read(VGA_IOPORT_OFFSET + 0x1A, 1) == 0
    g.regs_write(VGA_IOPORT_OFFSET + 0x00, 1, 0x20)
    assert board.display.bad_accesses.count == 0


def test_extended_registers_report_size_and_little_endian(board: Board) -> None:
    g = board.guest
    assert g.regs_read(QEXT_OFFSET, 4) == 8
    assert g.regs_read(QEXT_OFFSET + 4, 4) == 0x1E1E_1E1E
    g.regs_write(QEXT_OFFSET + 4, 4, 0x1E1E_1E1E)
    assert board.display.bad_accesses.count == 0
    g.regs_write(QEXT_OFFSET + 4, 4, 0xBEBE_BEBE)  # big endian: refused
    assert g.regs_read(QEXT_OFFSET + 4, 4) == 0x1E1E_1E1E
    g.regs_write(QEXT_OFFSET, 4, 64)  # the size is read-only
    assert g.regs_read(QEXT_OFFSET, 4) == 8
    assert board.display.bad_accesses.count == 2


# -- BAR0: mapping and the fallback path ---------------------------------------------------


def test_decoded_bar0_is_mapped_as_ram_with_dirty_logging(board: Board) -> None:
    mapping = board.mapping()
    assert (mapping.gpa, mapping.size, mapping.log_dirty) == (board.guest.bar(VRAM_BAR), VRAM, True)
    mapping.guest_write(mapping.gpa + 0x1234, b"\x42")
    assert board.display.vram()[0x1234] == 0x42


def test_bar0_mapping_follows_decode_and_moves(board: Board) -> None:
    g, platform = board.guest, board.platform
    old = board.mapping()
    g.enable_memory(False)
    assert old.closed and platform.open_mappings() == []
    g.enable_memory(True)
    first = board.mapping()
    new_address = first.gpa + 2 * VRAM
    g.cfg_write(PCI_BASE_ADDRESS_0, 4, new_address)
    assert first.closed
    moved = board.mapping()
    assert moved.gpa == new_address and moved.log_dirty
    board.display.close()
    assert moved.closed and platform.open_mappings() == []
    assert board.display.mode() is None


def test_dirty_pages_survive_a_bar_move(board: Board) -> None:
    g = board.guest
    g.set_mode(1024, 768)
    assert board.display.dirty_rows() == [(0, 768)]
    mapping = board.mapping()
    mapping.guest_write(mapping.gpa + 100 * 4096, b"\x01\x02\x03\x04")  # row 100
    g.cfg_write(PCI_BASE_ADDRESS_0, 4, mapping.gpa + VRAM)  # the slot goes away
    assert mapping.closed
    assert board.display.dirty_rows() == [(100, 101)]


def test_refused_mapping_falls_back_to_the_bar() -> None:
    with GuestMemory([(0, 4 * VRAM)]) as ram:
        board = Board(ram)
        try:
            board.guest.cfg_write(PCI_BASE_ADDRESS_0, 4, VRAM)  # over guest RAM
            board.guest.enable_memory()  # the platform refuses the slot (EEXIST)
            assert board.platform.open_mappings() == []
            assert board.display.map_errors.count == 1
            board.mmio.write(VRAM + 8, 4, 0xDEAD_BEEF)  # BAR0 through the bus instead
            assert board.mmio.read(VRAM + 8, 4) == 0xDEAD_BEEF
            assert bytes(board.display.vram()[8:12]) == bytes.fromhex("efbeadde")
            board.guest.cfg_write(PCI_BASE_ADDRESS_0, 4, 8 * VRAM)  # moved out of RAM
            assert board.mapping().gpa == 8 * VRAM
        finally:
            board.display.close()


def test_fallback_reads_and_writes_reach_video_memory(board: Board) -> None:
    g, display = board.guest, board.display
    base = g.bar(VRAM_BAR)
    board.mmio.write(base + 0x10, 8, 0x0807_0605_0403_0201)
    board.mmio.write(base + VRAM - 1, 1, 0x99)
    assert bytes(display.vram()[0x10:0x18]) == bytes(range(1, 9))
    assert board.mmio.read(base + 0x12, 2) == 0x0403
    assert board.mmio.read(base + VRAM - 1, 1) == 0x99
    before = display.bad_accesses.count
    assert display.vram_read(VRAM - 2, 4) == 0
    display.vram_write(VRAM, 1, 1)
    display.vram_write(-1, 1, 1)
    assert display.bad_accesses.count == before + 3


# -- dirty rows ------------------------------------------------------------------------------


def test_dirty_rows_after_a_fallback_write(board: Board) -> None:
    g, display = board.guest, board.display
    assert display.dirty_rows() == []  # disabled: nothing to show
    g.set_mode(1024, 768)
    assert display.dirty_rows() == [(0, 768)]  # a new mode: everything
    assert display.dirty_rows() == []
    base = g.bar(VRAM_BAR)
    board.mmio.write(base + 10 * 4096 + 16, 4, 0x00FF_0000)  # one pixel of row 10
    board.mmio.write(base + 11 * 4096 - 2, 4, 0)  # straddles rows 10 and 11
    board.mmio.write(base + 700 * 4096, 4, 0)
    assert display.dirty_rows() == [(10, 12), (700, 701)]
    assert display.dirty_rows() == []


def test_dirty_rows_from_the_dirty_log(board: Board) -> None:
    g, display = board.guest, board.display
    g.set_mode(640, 480)  # 2560-byte rows: a page covers parts of 2 or 3 rows
    display.dirty_rows()
    mapping = board.mapping()
    mapping.guest_write(mapping.gpa + 5000, b"\xff")  # page 1: bytes 4096-8191
    # Rows 1 (2560-5119), 2 (5120-7679), 3 (7680-10239) touch page 1.
    assert display.dirty_rows() == [(1, 4)]
    mapping.guest_write(mapping.gpa + 0, b"\xff")  # page 0: rows 0, 1
    mapping.guest_write(mapping.gpa + 2 * PAGE, b"\xff")  # page 2: rows 3, 4
    assert display.dirty_rows() == [(0, 2), (3, 5)]
    mapping.guest_write(mapping.gpa + 480 * 2560 + 100, b"\xff")  # below the screen
    assert display.dirty_rows() == []


def test_dirty_rows_follow_the_scanout_offset(board: Board) -> None:
    g, display = board.guest, board.display
    g.set_mode(1024, 768)
    g.set_base(0, 0, 4096, 0x10_0000)  # scan out from 1 MiB: row r is page 256 + r
    assert display.dirty_rows() == [(0, 768)]  # the offset changed: everything
    mapping = board.mapping()
    mapping.guest_write(mapping.gpa + 5 * PAGE, b"\x01")  # above the screen now
    mapping.guest_write(mapping.gpa + (256 + 7) * PAGE, b"\x01")
    assert display.dirty_rows() == [(7, 8)]


def test_pages_in_the_gap_beyond_a_row_are_not_rows(board: Board) -> None:
    # 64 pixels of 4 bytes shown, 8192 bytes from one row to the next: bytes 256-8191
    # of each row are off screen.
    g, display = board.guest, board.display
    g.set_mode(64, 100)
    g.dispi_write(VBE_DISPI_INDEX_VIRT_WIDTH, 2048)
    assert display.mode() == DisplayMode(64, 100, 32, 8192, 0)
    display.dirty_rows()
    mapping = board.mapping()
    mapping.guest_write(mapping.gpa + PAGE, b"\x01")  # page 1: the gap after row 0
    assert display.dirty_rows() == []
    mapping.guest_write(mapping.gpa + 2 * PAGE, b"\x01")  # page 2: starts row 1
    assert display.dirty_rows() == [(1, 2)]


def test_any_mode_change_makes_the_screen_dirty(board: Board) -> None:
    g, display = board.guest, board.display
    g.set_mode(800, 600)
    display.dirty_rows()
    g.dispi_write(VBE_DISPI_INDEX_XRES, 800)  # the same value: no change
    assert display.dirty_rows() == []
    g.dispi_write(VBE_DISPI_INDEX_YRES, 500)
    assert display.dirty_rows() == [(0, 500)]
    g.dispi_write(VBE_DISPI_INDEX_BPP, 16)
    assert display.dirty_rows() == [(0, 500)]
    # Disabled and enabled again between two calls: the same mode, but cleared memory.
    g.set_mode(800, 500, 16)
    assert display.mode() == DisplayMode(800, 500, 16, 1600, 0)
    assert display.dirty_rows() == [(0, 500)]


def test_dirty_rows_is_safe_against_concurrent_writes(board: Board) -> None:
    g, display = board.guest, board.display
    g.set_mode(1024, 768)
    display.dirty_rows()
    base = g.bar(VRAM_BAR)
    rows = range(0, 768, 3)
    seen: set[int] = set()
    done = threading.Event()

    def writer() -> None:
        for row in rows:
            board.mmio.write(base + row * 4096 + 8, 4, row)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        for first, last in display.dirty_rows():
            seen.update(range(first, last))
    thread.join()
    for first, last in display.dirty_rows():
        seen.update(range(first, last))
    assert seen == set(rows)
