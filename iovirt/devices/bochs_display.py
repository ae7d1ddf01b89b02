"""QEMU's "bochs-display": a PCI framebuffer with the Bochs DISPI (VBE) mode registers,
the device Linux's ``bochs`` DRM driver (``drivers/gpu/drm/tiny/bochs.c``) binds.

Facts come from QEMU's ``hw/display/bochs-display.c`` and ``include/hw/display/bochs-vbe.h``
(the register map and the PCI identity), QEMU's ``hw/display/vga.c`` (how the DISPI
registers are checked: ``vbe_fixup_regs``, GETCAPS, clearing on enable) and the Linux
driver (what it reads and writes, in which order). VESA's E-EDID 1.4 standard gives the
EDID block layout.

The function (vendor 0x1234, device 0x1111, class 0x038000 "display, other", revision 2,
subsystem 1af4:1100) has:

* BAR0: video memory, a prefetchable 32-bit memory BAR of ``vram_size`` bytes. While the
  guest decodes it the platform maps it as RAM (:meth:`~iovirt.platform.Platform.map_ram`,
  a KVM memory slot with dirty logging), so pixel writes cause no exit; only while that
  mapping is missing (unit tests, or a platform refusal) does the BAR's bus device read
  and write video memory, one access per exit.
* BAR2: 4 KiB of registers:

  - 0x000-0x3FF: the EDID of a virtual monitor (128 bytes, then zeros), read-only.
    Linux's driver reads its modes from it; the preferred one is 1024x768.
  - 0x400-0x41F: the VGA I/O ports 0x3C0-0x3DF. A bochs-display has no VGA core: reads
    give 0 and writes are dropped (Linux's driver pokes the attribute controller here to
    blank the screen, which QEMU's bochs-display ignores too).
  - 0x500-0x515: the DISPI registers, 16 bits each at ``index * 2``.
  - 0x600-0x607: QEMU's extended registers: the size of this block, and the framebuffer
    byte order. Only little endian is offered; a request for big endian is refused (the
    register keeps reading little endian) because :class:`~iovirt.display.DisplayMode`
    describes little-endian pixels only.

Registers follow QEMU's standard VGA (``vbe_fixup_regs``) rather than bochs-display's
plain storage, so that every mode the guest can program lies inside video memory: while
the display is enabled each write to XRES, YRES, BPP, VIRT_WIDTH or the offsets is checked
and bad values are clipped, never raised: a width is rounded down to even and limited to
:data:`VBE_DISPI_MAX_XRES`, the virtual width is at least the width, the height is limited
by :data:`VBE_DISPI_MAX_YRES` and by what fits in video memory (VIRT_HEIGHT reads that
limit), offsets that would push the picture past the end of video memory are reset to
zero. A BPP other than 8, 15, 16, 24, 32 is refused (the register keeps its value).
Enabling (ENABLE bit 0 from 0 to 1) resets the virtual width and the offsets, as on QEMU,
and clears the visible area unless NOCLEARMEM is set. With GETCAPS set in ENABLE, XRES,
YRES and BPP read the maximums. Refused or clipped values are counted in
:attr:`BochsDisplay.bad_accesses` (logged, rate-limited).

The host side is the :class:`~iovirt.display.Display` protocol: :meth:`BochsDisplay.mode`,
:meth:`BochsDisplay.vram` and :meth:`BochsDisplay.dirty_rows`, which merges the memory
slot's dirty pages (each 4 KiB page of video memory becomes the rows of the current mode it
touches), the pages written through the BAR0 fallback path and a full-screen update after
any change of mode or offset. Pages still unreported when the slot goes away (the BAR
moves, memory decode is turned off) are collected first, so no write is lost.

Threads and locking: vCPU threads enter through the BARs and config space, a front-end
calls the Display methods from the host I/O loop; everything takes the function's lock
(:attr:`PciFunction.lock`). The device starts no thread and holds no timer.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from dataclasses import dataclass

from iovirt.bus.pci import BarKind, GuestAccessLog, PciFunction
from iovirt.display import DisplayMode
from iovirt.errors import IovirtError
from iovirt.platform import Platform, RamMapping

log = logging.getLogger(__name__)

# --- PCI identity (QEMU's bochs-display; Linux's bochs driver matches 1234:1111).
BOCHS_VENDOR_ID = 0x1234  # PCI_VENDOR_ID_QEMU
BOCHS_DEVICE_ID = 0x1111  # PCI_DEVICE_ID_QEMU_VGA
BOCHS_CLASS_DISPLAY_OTHER = 0x038000
BOCHS_REVISION = 2  # Linux looks for the QEMU extended registers only from revision 2 on
BOCHS_SUBSYSTEM_VENDOR_ID = 0x1AF4  # QEMU's default subsystem for its PCI devices
BOCHS_SUBSYSTEM_ID = 0x1100

# --- BARs.
VRAM_BAR = 0
MMIO_BAR = 2
MMIO_BAR_SIZE = 0x1000  # PCI_VGA_MMIO_SIZE
VRAM_PAGE_SIZE = 4096  # the granule of dirty tracking (RamMapping.dirty_pages)
VRAM_MIN_SIZE = 64 * 1024  # one VIDEO_MEMORY_64K unit
VRAM_MAX_SIZE = 256 * 1024 * 1024  # as QEMU's bochs-display allows
DEFAULT_VRAM_SIZE = 16 << 20

# --- BAR2 layout (bochs-vbe.h).
EDID_OFFSET = 0x000
EDID_WINDOW_SIZE = 0x400  # Linux reads EDID blocks below the VGA ports only
VGA_IOPORT_OFFSET = 0x400  # PCI_VGA_IOPORT_OFFSET: ports 0x3C0-0x3DF
VGA_IOPORT_SIZE = 0x20
DISPI_OFFSET = 0x500  # PCI_VGA_BOCHS_OFFSET
DISPI_SIZE = 0x0B * 2  # PCI_VGA_BOCHS_SIZE: registers 0x0-0xA
QEXT_OFFSET = 0x600  # PCI_VGA_QEXT_OFFSET
QEXT_SIZE = 8  # PCI_VGA_QEXT_SIZE

# --- DISPI register indexes (16-bit registers at DISPI_OFFSET + 2 * index).
VBE_DISPI_INDEX_ID = 0x0
VBE_DISPI_INDEX_XRES = 0x1
VBE_DISPI_INDEX_YRES = 0x2
VBE_DISPI_INDEX_BPP = 0x3
VBE_DISPI_INDEX_ENABLE = 0x4
VBE_DISPI_INDEX_BANK = 0x5
VBE_DISPI_INDEX_VIRT_WIDTH = 0x6
VBE_DISPI_INDEX_VIRT_HEIGHT = 0x7  # read-only here: the rows that fit in video memory
VBE_DISPI_INDEX_X_OFFSET = 0x8
VBE_DISPI_INDEX_Y_OFFSET = 0x9
VBE_DISPI_INDEX_NB = 0xA  # registers with storage
VBE_DISPI_INDEX_VIDEO_MEMORY_64K = 0xA  # read-only: video memory in 64 KiB units

# VBE_DISPI_INDEX_ID: the interface versions; a guest may select an older one.
VBE_DISPI_ID0 = 0xB0C0
VBE_DISPI_ID5 = 0xB0C5
VBE_DISPI_IDS = range(VBE_DISPI_ID0, VBE_DISPI_ID5 + 1)

# VBE_DISPI_INDEX_ENABLE bits.
VBE_DISPI_DISABLED = 0x00
VBE_DISPI_ENABLED = 0x01
VBE_DISPI_GETCAPS = 0x02  # XRES/YRES/BPP read the maximums
VBE_DISPI_8BIT_DAC = 0x20
VBE_DISPI_LFB_ENABLED = 0x40
VBE_DISPI_NOCLEARMEM = 0x80

# VBE_DISPI_INDEX_BPP values this device scans out (15 is x1r5g5b5 in 16-bit pixels).
VBE_DISPI_BPP_VALUES = (8, 15, 16, 24, 32)
VBE_DISPI_DEFAULT_BPP = 8  # what a never-programmed BPP becomes on enable, as on QEMU

# Limits (GETCAPS reports the first three). The virtual width may exceed the screen for
# panning; 8192 is the widest framebuffer Linux's bochs driver creates.
VBE_DISPI_MAX_XRES = 2560
VBE_DISPI_MAX_YRES = 1600
VBE_DISPI_MAX_BPP = 32
VBE_DISPI_MAX_VIRT_WIDTH = 8192
VBE_DISPI_MIN_XRES = 8  # what a zero width becomes, as on QEMU

# --- QEMU extended registers (offsets inside the QEXT block).
PCI_VGA_QEXT_REG_SIZE = 0x0  # reads the size of the block (QEXT_SIZE)
PCI_VGA_QEXT_REG_BYTEORDER = 0x4
PCI_VGA_QEXT_LITTLE_ENDIAN = 0x1E1E1E1E
PCI_VGA_QEXT_BIG_ENDIAN = 0xBEBEBEBE

# --- EDID 1.4 (VESA E-EDID standard, base block). Offsets inside the 128-byte block.
EDID_BLOCK_SIZE = 128
EDID_HEADER = bytes((0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00))
EDID_MANUFACTURER = 0x08  # 2 bytes, big endian: three 5-bit letters
EDID_PRODUCT_CODE = 0x0A  # 2 bytes, little endian
EDID_SERIAL = 0x0C  # 4 bytes
EDID_WEEK = 0x10
EDID_YEAR = 0x11  # year - 1990
EDID_VERSION = 0x12
EDID_REVISION = 0x13
EDID_VIDEO_INPUT = 0x14
EDID_WIDTH_CM = 0x15
EDID_HEIGHT_CM = 0x16
EDID_GAMMA = 0x17  # (gamma * 100) - 100
EDID_FEATURES = 0x18
EDID_CHROMA = 0x19  # 10 bytes of chromaticity coordinates
EDID_ESTABLISHED = 0x23  # 3 bytes of established-timing bits
EDID_STANDARD = 0x26  # 8 standard timings, 2 bytes each
EDID_DESCRIPTORS = 0x36  # 4 descriptors, 18 bytes each
EDID_DESCRIPTOR_SIZE = 18
EDID_EXTENSIONS = 0x7E
EDID_CHECKSUM = 0x7F

EDID_VIDEO_DIGITAL_8BPC = 0x80 | 0x20  # digital input, 8 bits per primary colour
EDID_FEATURE_SRGB = 0x04  # sRGB is the default colour space
EDID_FEATURE_PREFERRED_NATIVE = 0x02  # the first detailed timing is the preferred mode
EDID_DESCRIPTOR_MONITOR_NAME = 0xFC
EDID_DESCRIPTOR_RANGE_LIMITS = 0xFD
EDID_DESCRIPTOR_DUMMY = 0x10
EDID_RANGE_LIMITS_ONLY = 0x01  # range limits descriptor: no GTF/CVT formula follows
EDID_DTD_DIGITAL_SEPARATE_SYNC = 0x18
EDID_DTD_VSYNC_POSITIVE = 0x04
EDID_DTD_HSYNC_POSITIVE = 0x02

# Established timings byte 0: 640x480@60 (bit 5), 800x600@60 (bit 0); byte 1: 1024x768@60
# (bit 3).
EDID_ESTABLISHED_BITS = bytes((0x21, 0x08, 0x00))
# Standard timings: (width, aspect bits, refresh). Aspect bits 7:6: 00 16:10, 01 4:3,
# 10 5:4, 11 16:9 (EDID 1.3 and later).
EDID_ASPECT_16_10 = 0x00
EDID_ASPECT_4_3 = 0x40
EDID_ASPECT_5_4 = 0x80
EDID_ASPECT_16_9 = 0xC0
EDID_STANDARD_TIMINGS = (
    (1280, EDID_ASPECT_16_9, 60),  # 1280x720
    (1280, EDID_ASPECT_16_10, 60),  # 1280x800
    (1280, EDID_ASPECT_5_4, 60),  # 1280x1024
    (1440, EDID_ASPECT_16_10, 60),  # 1440x900
    (1600, EDID_ASPECT_4_3, 60),  # 1600x1200
    (1680, EDID_ASPECT_16_10, 60),  # 1680x1050
    (1920, EDID_ASPECT_16_9, 60),  # 1920x1080
    (1920, EDID_ASPECT_16_10, 60),  # 1920x1200
)
EDID_MONITOR_NAME = b"iovirt"
EDID_MANUFACTURER_ID = "IOV"  # not a registered PNP ID: this monitor does not exist
EDID_PRODUCT = 0x1111
EDID_YEAR_OF_MANUFACTURE = 2024
EDID_DPI = 96  # the physical size claimed: a 96 dpi screen at the preferred mode


@dataclass(frozen=True)
class DetailedTiming:
    """A monitor timing as an EDID detailed timing descriptor encodes it."""

    pixel_clock_khz: int
    h_active: int
    h_front_porch: int
    h_sync: int
    h_back_porch: int
    v_active: int
    v_front_porch: int
    v_sync: int
    v_back_porch: int
    hsync_positive: bool = False
    vsync_positive: bool = False

    @property
    def h_blank(self) -> int:
        return self.h_front_porch + self.h_sync + self.h_back_porch

    @property
    def v_blank(self) -> int:
        return self.v_front_porch + self.v_sync + self.v_back_porch


# VESA DMT 1024x768 at 60 Hz: 65 MHz, 1344x806 total, both syncs negative.
DMT_1024X768_60 = DetailedTiming(65000, 1024, 24, 136, 160, 768, 3, 6, 29)
EDID_PREFERRED_TIMING = DMT_1024X768_60


def _detailed_timing_descriptor(t: DetailedTiming, width_mm: int, height_mm: int) -> bytes:
    """The 18-byte detailed timing descriptor of ``t`` (E-EDID 1.4, 3.10.2)."""
    d = bytearray(EDID_DESCRIPTOR_SIZE)
    d[0:2] = (t.pixel_clock_khz // 10).to_bytes(2, "little")  # units of 10 kHz
    d[2] = t.h_active & 0xFF
    d[3] = t.h_blank & 0xFF
    d[4] = (t.h_active >> 8) << 4 | t.h_blank >> 8
    d[5] = t.v_active & 0xFF
    d[6] = t.v_blank & 0xFF
    d[7] = (t.v_active >> 8) << 4 | t.v_blank >> 8
    d[8] = t.h_front_porch & 0xFF
    d[9] = t.h_sync & 0xFF
    d[10] = (t.v_front_porch & 0xF) << 4 | t.v_sync & 0xF
    d[11] = (
        (t.h_front_porch >> 8) << 6
        | (t.h_sync >> 8) << 4
        | (t.v_front_porch >> 4) << 2
        | t.v_sync >> 4
    )
    d[12] = width_mm & 0xFF
    d[13] = height_mm & 0xFF
    d[14] = (width_mm >> 8) << 4 | height_mm >> 8
    # d[15], d[16]: no borders
    d[17] = (
        EDID_DTD_DIGITAL_SEPARATE_SYNC
        | (EDID_DTD_VSYNC_POSITIVE if t.vsync_positive else 0)
        | (EDID_DTD_HSYNC_POSITIVE if t.hsync_positive else 0)
    )
    return bytes(d)


def _text_descriptor(tag: int, text: bytes) -> bytes:
    """A display descriptor carrying up to 13 bytes of text (newline-ended, space-padded)."""
    body = text[:13]
    if len(body) < 13:
        body += b"\n"
    return bytes((0, 0, 0, tag, 0)) + body.ljust(13, b" ")


def _range_limits_descriptor() -> bytes:
    """Display range limits wide enough for every mode offered: 50-75 Hz vertical,
    30-160 kHz horizontal, 300 MHz pixel clock; no formula for other timings."""
    body = bytes((50, 75, 30, 160, 300 // 10, EDID_RANGE_LIMITS_ONLY)) + b"\n"
    return bytes((0, 0, 0, EDID_DESCRIPTOR_RANGE_LIMITS, 0)) + body.ljust(13, b" ")


def _chromaticity_srgb() -> bytes:
    """The 10 chromaticity bytes for sRGB primaries and a D65 white point."""
    coords = [0.640, 0.330, 0.300, 0.600, 0.150, 0.060, 0.3127, 0.3290]
    values = [round(c * 1024) for c in coords]
    rx, ry, gx, gy, bx, by, wx, wy = values
    low_rg = (rx & 3) << 6 | (ry & 3) << 4 | (gx & 3) << 2 | gy & 3
    low_bw = (bx & 3) << 6 | (by & 3) << 4 | (wx & 3) << 2 | wy & 3
    return bytes([low_rg, low_bw] + [v >> 2 for v in values])


def build_edid(timing: DetailedTiming = EDID_PREFERRED_TIMING) -> bytes:
    """The 128-byte EDID 1.4 base block of the virtual monitor, checksum included;
    ``timing`` is the preferred (first detailed) mode."""
    e = bytearray(EDID_BLOCK_SIZE)
    e[0:8] = EDID_HEADER
    letters = [ord(c) - ord("A") + 1 for c in EDID_MANUFACTURER_ID]
    e[EDID_MANUFACTURER : EDID_MANUFACTURER + 2] = (
        letters[0] << 10 | letters[1] << 5 | letters[2]
    ).to_bytes(2, "big")
    e[EDID_PRODUCT_CODE : EDID_PRODUCT_CODE + 2] = EDID_PRODUCT.to_bytes(2, "little")
    e[EDID_WEEK] = 1
    e[EDID_YEAR] = EDID_YEAR_OF_MANUFACTURE - 1990
    e[EDID_VERSION] = 1
    e[EDID_REVISION] = 4
    e[EDID_VIDEO_INPUT] = EDID_VIDEO_DIGITAL_8BPC
    width_mm = round(timing.h_active * 25.4 / EDID_DPI)
    height_mm = round(timing.v_active * 25.4 / EDID_DPI)
    e[EDID_WIDTH_CM] = width_mm // 10
    e[EDID_HEIGHT_CM] = height_mm // 10
    e[EDID_GAMMA] = 220 - 100  # gamma 2.2
    e[EDID_FEATURES] = EDID_FEATURE_SRGB | EDID_FEATURE_PREFERRED_NATIVE
    e[EDID_CHROMA : EDID_CHROMA + 10] = _chromaticity_srgb()
    e[EDID_ESTABLISHED : EDID_ESTABLISHED + 3] = EDID_ESTABLISHED_BITS
    for i, (width, aspect, refresh) in enumerate(EDID_STANDARD_TIMINGS):
        e[EDID_STANDARD + 2 * i] = width // 8 - 31
        e[EDID_STANDARD + 2 * i + 1] = aspect | (refresh - 60)
    descriptors = (
        _detailed_timing_descriptor(timing, width_mm, height_mm),
        _range_limits_descriptor(),
        _text_descriptor(EDID_DESCRIPTOR_MONITOR_NAME, EDID_MONITOR_NAME),
        bytes((0, 0, 0, EDID_DESCRIPTOR_DUMMY)) + bytes(EDID_DESCRIPTOR_SIZE - 4),
    )
    for i, descriptor in enumerate(descriptors):
        start = EDID_DESCRIPTORS + i * EDID_DESCRIPTOR_SIZE
        e[start : start + EDID_DESCRIPTOR_SIZE] = descriptor
    e[EDID_EXTENSIONS] = 0
    e[EDID_CHECKSUM] = -sum(e[:EDID_CHECKSUM]) & 0xFF
    return bytes(e)


def _within(offset: int, size: int, base: int, length: int) -> bool:
    """Whether the access ``[offset, offset + size)`` lies inside ``[base, base + length)``."""
    return base <= offset and offset + size <= base + length


def _bytes_per_pixel(bpp: int) -> int:
    return (bpp + 7) // 8


class _BarWindow:
    """A BAR's bus device that forwards to two methods of the display."""

    def __init__(
        self, read: Callable[[int, int], int], write: Callable[[int, int, int], None]
    ) -> None:
        self.read = read
        self.write = write


class BochsDisplay(PciFunction):
    """The bochs-display PCI function; see the module docstring.

    ``vram_size`` (a power of two from 64 KiB to 256 MiB) is the size of video memory and
    of BAR0. Put it on the bus with :meth:`PciRoot.add`; it needs no interrupt. Call
    :meth:`close` before the VM goes away (it deletes the memory slot).
    """

    def __init__(
        self, platform: Platform, vram_size: int = DEFAULT_VRAM_SIZE, *, name: str = "bochs-display"
    ) -> None:
        if vram_size < VRAM_MIN_SIZE or vram_size > VRAM_MAX_SIZE or vram_size & (vram_size - 1):
            raise ValueError(
                f"{name}: video memory of {vram_size:#x} bytes; it must be a power of two "
                f"from {VRAM_MIN_SIZE >> 10} KiB to {VRAM_MAX_SIZE >> 20} MiB"
            )
        super().__init__(
            BOCHS_VENDOR_ID,
            BOCHS_DEVICE_ID,
            BOCHS_CLASS_DISPLAY_OTHER,
            revision=BOCHS_REVISION,
            subsystem_vendor=BOCHS_SUBSYSTEM_VENDOR_ID,
            subsystem_id=BOCHS_SUBSYSTEM_ID,
            name=name,
        )
        self.platform = platform
        self.vram_size = vram_size
        # Anonymous shared memory: the same pages back the KVM memory slot and what the
        # front-end reads, and nothing else in the process can reach them.
        self._vram = mmap.mmap(-1, vram_size, mmap.MAP_SHARED)
        self.edid = build_edid()
        self.bad_accesses = GuestAccessLog(name, log)
        # Failures the guest can provoke over and over (a BAR placed where KVM refuses it).
        self.map_errors = GuestAccessLog(name, log, what="refused video memory mappings")
        self._regs = [0] * VBE_DISPI_INDEX_NB
        self._regs[VBE_DISPI_INDEX_ID] = VBE_DISPI_ID5
        self._mapping: RamMapping | None = None
        self._dirty_pages: set[int] = set()  # written by the fallback path or not yet reported
        self._full_dirty = True
        self._last_mode: DisplayMode | None = None
        self._closed = False
        # Guest accesses to video memory that exited to the VMM (the mapping was missing):
        # a running guest with a working memory slot keeps this at 0.
        self.fallback_accesses = 0
        self.add_bar(
            VRAM_BAR,
            vram_size,
            BarKind.MEM32,
            _BarWindow(self.vram_read, self.vram_write),
            prefetchable=True,
            on_map=self._on_vram_map,
        )
        self.add_bar(
            MMIO_BAR, MMIO_BAR_SIZE, BarKind.MEM32, _BarWindow(self.mmio_read, self.mmio_write)
        )

    # -- Display protocol ------------------------------------------------------------------

    def mode(self) -> DisplayMode | None:
        with self.lock:
            return self._mode()

    def vram(self) -> memoryview:
        return memoryview(self._vram).toreadonly()

    def dirty_rows(self) -> list[tuple[int, int]]:
        with self.lock:
            mode = self._mode()
            pages = self._dirty_pages
            self._dirty_pages = set()
            if self._mapping is not None and not self._closed:
                pages.update(self._collect_dirty_pages())
            full = self._full_dirty or mode != self._last_mode
            self._full_dirty = False
            self._last_mode = mode
            if mode is None:
                return []
            if full:
                return [(0, mode.height)]
            return _rows_of_pages(mode, sorted(pages))

    # -- BAR0: video memory (only while no RAM mapping is there) ------------------------------

    def vram_read(self, offset: int, size: int) -> int:
        with self.lock:
            self.fallback_accesses += 1
            if self._closed or not self._vram_access_ok(offset, size):
                self.bad_accesses(f"video memory read of {size} bytes at {offset:#x}")
                return 0
            return int.from_bytes(self._vram[offset : offset + size], "little")

    def vram_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.fallback_accesses += 1
            if self._closed or not self._vram_access_ok(offset, size):
                self.bad_accesses(f"video memory write of {size} bytes at {offset:#x}")
                return
            self._vram[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
                size, "little"
            )
            first = offset // VRAM_PAGE_SIZE
            last = (offset + size - 1) // VRAM_PAGE_SIZE
            self._dirty_pages.update(range(first, last + 1))

    def _vram_access_ok(self, offset: int, size: int) -> bool:
        return 1 <= size <= 8 and _within(offset, size, 0, self.vram_size)

    def _on_vram_map(self, address: int | None) -> None:
        """BAR0 moved or stopped being decoded: move the RAM mapping with it."""
        with self.lock:
            if self._mapping is not None:
                self._dirty_pages.update(self._collect_dirty_pages())
                mapping, self._mapping = self._mapping, None
                try:
                    mapping.close()
                except IovirtError as e:
                    self.map_errors(f"removing the video memory mapping: {e}")
            if address is None or self._closed:
                return
            try:
                self._mapping = self.platform.map_ram(address, self._vram, log_dirty=True)
            except (IovirtError, ValueError) as e:
                # E.g. the guest put the BAR over RAM: accesses go to the fallback path.
                self.map_errors(f"video memory at {address:#x} not mapped as RAM: {e}")

    def _collect_dirty_pages(self) -> list[int]:
        assert self._mapping is not None
        try:
            return self._mapping.dirty_pages()
        except IovirtError as e:
            self.map_errors(f"reading the dirty log: {e}")
            self._full_dirty = True  # whatever was written, the whole screen is resent
            return []

    # -- BAR2: EDID, VGA ports, DISPI and QEMU extended registers ----------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        with self.lock:
            if size not in (1, 2, 4, 8) or offset < 0 or offset + size > MMIO_BAR_SIZE:
                self.bad_accesses(f"{size}-byte register read at {offset:#x}")
                return 0
            end = offset + size
            if _within(offset, size, EDID_OFFSET, EDID_WINDOW_SIZE):
                window = self.edid[offset:end]  # past the block: zeros
                return int.from_bytes(window.ljust(size, b"\0"), "little")
            if _within(offset, size, VGA_IOPORT_OFFSET, VGA_IOPORT_SIZE):
                return 0
            if _within(offset, size, DISPI_OFFSET, DISPI_SIZE):
                return self._dispi_read_bytes(offset - DISPI_OFFSET, size)
            if _within(offset, size, QEXT_OFFSET, QEXT_SIZE):
                block = QEXT_SIZE.to_bytes(4, "little") + (
                    PCI_VGA_QEXT_LITTLE_ENDIAN.to_bytes(4, "little")
                )
                start = offset - QEXT_OFFSET
                return int.from_bytes(block[start : start + size], "little")
            self.bad_accesses(f"{size}-byte read of unused register space at {offset:#x}")
            return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if size not in (1, 2, 4, 8) or offset < 0 or offset + size > MMIO_BAR_SIZE:
                self.bad_accesses(f"{size}-byte register write at {offset:#x}")
                return
            end = offset + size
            value &= (1 << (8 * size)) - 1
            if _within(offset, size, VGA_IOPORT_OFFSET, VGA_IOPORT_SIZE):
                return  # no VGA core; Linux blanks through here, harmlessly ignored
            if _within(offset, size, DISPI_OFFSET, DISPI_SIZE):
                self._dispi_write_bytes(offset - DISPI_OFFSET, size, value)
                return
            if _within(offset, size, QEXT_OFFSET, QEXT_SIZE):
                self._qext_write(offset - QEXT_OFFSET, size, value)
                return
            where = "the EDID" if end <= EDID_WINDOW_SIZE else "unused register space"
            self.bad_accesses(f"{size}-byte write of {value:#x} to {where} at {offset:#x}")

    def _qext_write(self, offset: int, size: int, value: int) -> None:
        if offset == PCI_VGA_QEXT_REG_BYTEORDER and size == 4:
            if value == PCI_VGA_QEXT_BIG_ENDIAN:
                self.bad_accesses("big-endian framebuffer requested; only little endian is offered")
            elif value != PCI_VGA_QEXT_LITTLE_ENDIAN:
                self.bad_accesses(f"unknown framebuffer byte order {value:#x}")
            return
        self.bad_accesses(f"{size}-byte write of {value:#x} to extended register {offset:#x}")

    def _dispi_read_bytes(self, offset: int, size: int) -> int:
        """Bytes of the DISPI block; an access may cover parts of several registers."""
        data = bytearray()
        for index in range(offset // 2, (offset + size - 1) // 2 + 1):
            data += self._dispi_read(index).to_bytes(2, "little")
        start = offset % 2
        return int.from_bytes(data[start : start + size], "little")

    def _dispi_write_bytes(self, offset: int, size: int, value: int) -> None:
        """Write each register the access covers; bytes it leaves out keep their value."""
        raw = value.to_bytes(size, "little")
        for index in range(offset // 2, (offset + size - 1) // 2 + 1):
            current = bytearray(self._dispi_stored(index).to_bytes(2, "little"))
            for byte_index in range(2):
                position = index * 2 + byte_index - offset
                if 0 <= position < size:
                    current[byte_index] = raw[position]
            self._dispi_write(index, int.from_bytes(current, "little"))

    def _dispi_stored(self, index: int) -> int:
        if index < VBE_DISPI_INDEX_NB:
            return self._regs[index]
        return self._dispi_read(index)

    def _dispi_read(self, index: int) -> int:
        regs = self._regs
        if index == VBE_DISPI_INDEX_VIDEO_MEMORY_64K:
            return self.vram_size // (64 * 1024)
        if regs[VBE_DISPI_INDEX_ENABLE] & VBE_DISPI_GETCAPS:
            if index == VBE_DISPI_INDEX_XRES:
                return VBE_DISPI_MAX_XRES
            if index == VBE_DISPI_INDEX_YRES:
                return VBE_DISPI_MAX_YRES
            if index == VBE_DISPI_INDEX_BPP:
                return VBE_DISPI_MAX_BPP
        return regs[index]

    def _dispi_write(self, index: int, value: int) -> None:
        regs = self._regs
        before = self._mode()
        if index == VBE_DISPI_INDEX_ID:
            if value in VBE_DISPI_IDS:
                regs[index] = value
            else:
                self.bad_accesses(f"unknown DISPI interface ID {value:#x}")
        elif index in (
            VBE_DISPI_INDEX_XRES,
            VBE_DISPI_INDEX_YRES,
            VBE_DISPI_INDEX_VIRT_WIDTH,
            VBE_DISPI_INDEX_X_OFFSET,
            VBE_DISPI_INDEX_Y_OFFSET,
        ):
            regs[index] = value
            self._fixup()
        elif index == VBE_DISPI_INDEX_BPP:
            if value in VBE_DISPI_BPP_VALUES:
                regs[index] = value
                self._fixup()
            else:
                self.bad_accesses(f"unsupported BPP {value} refused")
        elif index == VBE_DISPI_INDEX_ENABLE:
            self._write_enable(value)
        elif index == VBE_DISPI_INDEX_BANK:
            # Banks select a 64 KiB window of the legacy VGA aperture, which this device
            # lacks; the register is kept (masked to video memory) for software that reads it.
            regs[index] = value & (self.vram_size // (64 * 1024) - 1)
        elif index == VBE_DISPI_INDEX_VIRT_HEIGHT:
            pass  # derived from video memory (Linux writes it anyway), as on QEMU's VGA
        else:
            self.bad_accesses(f"write of {value:#x} to read-only DISPI register {index:#x}")
        if self._mode() != before:
            self._full_dirty = True

    def _write_enable(self, value: int) -> None:
        regs = self._regs
        if value & VBE_DISPI_ENABLED and not regs[VBE_DISPI_INDEX_ENABLE] & VBE_DISPI_ENABLED:
            # A new mode starts at the top of video memory, as QEMU's VGA does it.
            regs[VBE_DISPI_INDEX_VIRT_WIDTH] = 0
            regs[VBE_DISPI_INDEX_X_OFFSET] = 0
            regs[VBE_DISPI_INDEX_Y_OFFSET] = 0
            regs[VBE_DISPI_INDEX_ENABLE] = value
            self._fixup()
            if not value & VBE_DISPI_NOCLEARMEM:
                visible = regs[VBE_DISPI_INDEX_YRES] * self._line_length()
                self._vram[0:visible] = bytes(visible)
            self._full_dirty = True
        regs[VBE_DISPI_INDEX_ENABLE] = value

    def _bits(self) -> int:
        """Bits per pixel in video memory (15 bpp pixels take 16 bits)."""
        bpp = self._regs[VBE_DISPI_INDEX_BPP]
        return 16 if bpp == 15 else bpp

    def _line_length(self) -> int:
        return self._regs[VBE_DISPI_INDEX_VIRT_WIDTH] * self._bits() // 8

    def _fixup(self) -> None:
        """Clip the mode registers to what the device can show (QEMU's vbe_fixup_regs),
        while the display is enabled; a disabled display just stores what is written.

        Values a guest can mean (a virtual width of 0 or below the width: "as wide as the
        screen"; a height of 0) are adjusted silently; impossible ones are counted."""
        regs = self._regs
        if not regs[VBE_DISPI_INDEX_ENABLE] & VBE_DISPI_ENABLED:
            return
        if regs[VBE_DISPI_INDEX_BPP] not in VBE_DISPI_BPP_VALUES:
            regs[VBE_DISPI_INDEX_BPP] = VBE_DISPI_DEFAULT_BPP  # enabled before BPP was set
        clipped: list[str] = []
        xres = regs[VBE_DISPI_INDEX_XRES]
        if xres & 1 or xres > VBE_DISPI_MAX_XRES:
            clipped.append(f"XRES {xres}")
        xres = min(xres & ~1 or VBE_DISPI_MIN_XRES, VBE_DISPI_MAX_XRES)
        virt_width = regs[VBE_DISPI_INDEX_VIRT_WIDTH]
        if virt_width & 1 or virt_width > VBE_DISPI_MAX_VIRT_WIDTH:
            clipped.append(f"VIRT_WIDTH {virt_width}")
        virt_width = max(min(virt_width & ~1, VBE_DISPI_MAX_VIRT_WIDTH), xres)
        regs[VBE_DISPI_INDEX_XRES] = xres
        regs[VBE_DISPI_INDEX_VIRT_WIDTH] = virt_width
        line = self._line_length()
        max_rows = self.vram_size // line  # at least 2: a line is at most 32 KiB
        yres = regs[VBE_DISPI_INDEX_YRES]
        if yres > min(VBE_DISPI_MAX_YRES, max_rows):
            clipped.append(f"YRES {yres}")
        regs[VBE_DISPI_INDEX_YRES] = yres = min(yres or 1, VBE_DISPI_MAX_YRES, max_rows)
        pixel = self._bits() // 8
        x_offset, y_offset = regs[VBE_DISPI_INDEX_X_OFFSET], regs[VBE_DISPI_INDEX_Y_OFFSET]
        # The picture must end inside video memory: drop the row offset, then the column one.
        if x_offset * pixel + (y_offset + yres) * line > self.vram_size:
            clipped.append(f"Y_OFFSET {y_offset}")
            y_offset = 0
            if x_offset * pixel + yres * line > self.vram_size:
                clipped.append(f"X_OFFSET {x_offset}")
                x_offset = 0
        regs[VBE_DISPI_INDEX_X_OFFSET], regs[VBE_DISPI_INDEX_Y_OFFSET] = x_offset, y_offset
        regs[VBE_DISPI_INDEX_VIRT_HEIGHT] = max_rows
        if clipped:
            self.bad_accesses("DISPI values clipped: " + ", ".join(clipped))

    def _mode(self) -> DisplayMode | None:
        regs = self._regs
        if self._closed or not regs[VBE_DISPI_INDEX_ENABLE] & VBE_DISPI_ENABLED:
            return None
        bpp = regs[VBE_DISPI_INDEX_BPP]
        pixel = _bytes_per_pixel(bpp)
        stride = regs[VBE_DISPI_INDEX_VIRT_WIDTH] * pixel
        offset = regs[VBE_DISPI_INDEX_X_OFFSET] * pixel + regs[VBE_DISPI_INDEX_Y_OFFSET] * stride
        return DisplayMode(
            width=regs[VBE_DISPI_INDEX_XRES],
            height=regs[VBE_DISPI_INDEX_YRES],
            bpp=bpp,
            stride=stride,
            offset=offset,
        )

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the memory slot (call it before the VM goes); the display goes blank.
        Video memory itself is freed with the object (front-ends may still hold views)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            if self._mapping is not None:
                mapping, self._mapping = self._mapping, None
                try:
                    mapping.close()
                except IovirtError as e:
                    log.warning("%s: removing the video memory mapping: %s", self.name, e)


def _rows_of_pages(mode: DisplayMode, pages: list[int]) -> list[tuple[int, int]]:
    """Rows ``[first, last)`` of ``mode`` whose visible bytes touch any of ``pages``
    (sorted), merged and ascending."""
    row_bytes = mode.width * mode.bytes_per_pixel
    rows: list[tuple[int, int]] = []
    i = 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1  # one run of consecutive pages is one byte range
        start = pages[i] * VRAM_PAGE_SIZE - mode.offset
        end = (pages[j] + 1) * VRAM_PAGE_SIZE - mode.offset
        # Row r shows bytes [r * stride, r * stride + row_bytes) (relative to offset).
        first = max(0, (start - row_bytes) // mode.stride + 1)
        last = min(mode.height, -(-end // mode.stride))
        if first < last:
            if rows and first <= rows[-1][1]:
                rows[-1] = (rows[-1][0], max(rows[-1][1], last))
            else:
                rows.append((first, last))
        i = j + 1
    return rows
