"""A host PCI function passed through to the guest: a :class:`~iovirt.bus.pci.PciFunction`
whose config space, BARs and interrupts are backed by a VFIO device fd.

Config space is part emulated, part passed through, byte by byte:

* emulated: the identity registers (vendor, device, class, revision, subsystem, header
  type without the multi-function bit), COMMAND (kept here and forwarded: the guest's I/O,
  memory, bus-master and INTx-disable bits go on to the device), the six BARs (the guest
  sizes and places them here; the device keeps its host addresses), the expansion ROM BAR
  (reads 0: no ROM is offered), the capability pointer, interrupt line and pin, and the MSI
  and MSI-X capabilities, whose state lives in :mod:`iovirt.vfio.interrupts`;
* passed through: STATUS, cache line size, latency timer, BIST and every other capability
  and byte from 0x40 up. vfio-pci sits behind those accesses and virtualizes what it must
  to keep the host safe.

A BAR is served in two ways at once. Its bus device (:class:`BarWindow`) forwards accesses
with ``pread``/``pwrite`` on the device fd; that path always works and is what the MSI-X
table and PBA pages use, since their accesses are emulated. Every other page-aligned part
the kernel lets us mmap is mapped into the guest as a KVM memory slot
(:meth:`~iovirt.platform.Platform.map_ram`) wherever the guest places the BAR, so accesses
there (an NVMe doorbell, say) never leave the guest.

The device is reset (function-level reset, or a PCI hot reset when every function it
affects is ours) when it is opened and again when it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from iovirt.bus.pci import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_CONFIG_SPACE_SIZE,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_PIN,
    PCI_NUM_BARS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    BarKind,
    GuestAccessLog,
    PciConfigSpace,
    PciFunction,
)
from iovirt.errors import IovirtError
from iovirt.platform import Platform, RamMapping
from iovirt.vfio import uapi
from iovirt.vfio.errors import PassthroughError, VfioError
from iovirt.vfio.interrupts import (
    PCI_MSIX_CAP_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_FLAGS_QSIZE,
    LevelIrqfd,
    PassthroughIntx,
    PassthroughMsi,
    PassthroughMsix,
    VfioIrqs,
)
from iovirt.vfio.kernel import VfioKernel
from iovirt.vfio.regions import RegionAccess, mappable_chunks, region_info

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)

# Header registers this file handles that iovirt.bus.pci has no name for.
PCI_REVISION_CLASS = 0x08  # revision ID and the 24-bit class code
PCI_CACHE_LINE_SIZE = 0x0C
PCI_BIST = 0x0F
PCI_CARDBUS_CIS = 0x28
PCI_ROM_ADDRESS = 0x30
PCI_MIN_GNT = 0x3E
PCI_HEADER_END = 0x40
PCI_HEADER_TYPE_LAYOUT = 0x7F  # bit 7 is the multi-function bit
PCI_HEADER_TYPE_NORMAL = 0

# Capability IDs this file emulates.
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_MSIX = 0x11
_MAX_CAPABILITIES = 48  # (256 - 64) / 4: more means a loop in the list

# The COMMAND bits the guest controls and the device gets.
COMMAND_FORWARDED = (
    PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE
)

_HOT_RESET_INFO_BUFFER = 4096


def capabilities(config: bytes) -> list[tuple[int, int]]:
    """(ID, offset) of each capability in a config-space snapshot, in list order. The list
    comes from the device: offsets are checked and a loop ends the walk."""
    status = int.from_bytes(config[PCI_STATUS : PCI_STATUS + 2], "little")
    if not status & PCI_STATUS_CAP_LIST:
        return []
    caps: list[tuple[int, int]] = []
    seen: set[int] = set()
    pointer = config[PCI_CAPABILITY_LIST] & 0xFC
    while PCI_HEADER_END <= pointer < PCI_CONFIG_SPACE_SIZE and pointer not in seen:
        if len(caps) == _MAX_CAPABILITIES:
            break
        seen.add(pointer)
        caps.append((config[pointer], pointer))
        pointer = config[pointer + 1] & 0xFC
    return caps


class BarWindow:
    """The bus device of one BAR: accesses that trap (see the module docstring)."""

    def __init__(self, device: VfioPciDevice, index: int) -> None:
        self._device = device
        self._index = index

    def read(self, offset: int, size: int) -> int:
        return self._device.bar_read(self._index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device.bar_write(self._index, offset, size, value)


class VfioPciDevice(PciFunction):
    """A passed-through PCI function (see the module docstring).

    Takes ownership of ``fd`` (a VFIO device fd, closed by :meth:`close`). ``intx_gsi``
    maps the device's interrupt pin (1-4) to the GSI the board routes it to; with
    ``intx_router`` it enables INTx. ``group_fds`` gives the group fds a hot reset needs.
    """

    def __init__(
        self,
        kernel: VfioKernel,
        fd: int,
        platform: Platform,
        *,
        name: str,
        intx_router: LevelIrqfd | None = None,
        intx_gsi: Callable[[int], int] | None = None,
        group_fds: Callable[[], dict[int, int]] | None = None,
    ) -> None:
        self.name = name  # PciFunction sets it too; reset() may log before that
        self.kernel = kernel
        self.fd = fd
        self.platform = platform
        self._group_fds = group_fds
        self.info_flags = 0
        self._msix_offset = 0
        self._msi_offset = 0
        self._closed = False
        self.msix: PassthroughMsix | None = None
        self.msi: PassthroughMsi | None = None
        self.intx: PassthroughIntx | None = None
        self.irqs = VfioIrqs(kernel, fd, name)
        self._regions: dict[int, RegionAccess] = {}
        self._chunks: dict[int, list[tuple[int, mmap.mmap]]] = {}
        self._ram_maps: dict[int, list[RamMapping]] = {}
        self._map_failures = GuestAccessLog(name, log, limit=1, what="BAR mappings refused")
        self.bad_accesses = GuestAccessLog(name, log, what="refused BAR accesses")
        self.reset_method: str | None = None
        try:
            self._setup(name, intx_router, intx_gsi)
        except BaseException:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------------

    def _setup(
        self,
        name: str,
        intx_router: LevelIrqfd | None,
        intx_gsi: Callable[[int], int] | None,
    ) -> None:
        info = bytearray(uapi.DEVICE_INFO.pack(uapi.DEVICE_INFO.size, 0, 0, 0, 0, 0))
        self._ioctl(uapi.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO", name)
        _, self.info_flags, num_regions, self.num_irqs, _, _ = uapi.DEVICE_INFO.unpack(info)
        if not self.info_flags & uapi.VFIO_DEVICE_FLAGS_PCI:
            raise PassthroughError(name, "VFIO says this is not a PCI device")
        if num_regions <= uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            raise PassthroughError(name, f"VFIO offers only {num_regions} regions, no config space")
        config_info = region_info(self.kernel, self.fd, uapi.VFIO_PCI_CONFIG_REGION_INDEX, name)
        self._config = RegionAccess(self.kernel, self.fd, config_info, f"{name} config")
        # Quiesce what a previous user left running before the guest sees anything; the
        # config space is read after the reset, as the device comes out of it.
        self.reset_method = self.reset()
        snapshot = self._config.read(0, PCI_CONFIG_SPACE_SIZE)
        if snapshot is None:
            raise VfioError("pread(config space)", errno.EIO, name)
        if snapshot[PCI_HEADER_TYPE] & PCI_HEADER_TYPE_LAYOUT != PCI_HEADER_TYPE_NORMAL:
            raise PassthroughError(name, "bridges (header type 1/2) cannot be passed through")

        def u16(at: int) -> int:
            return int.from_bytes(snapshot[at : at + 2], "little")

        class_rev = int.from_bytes(snapshot[PCI_REVISION_CLASS : PCI_REVISION_CLASS + 4], "little")
        pin = snapshot[PCI_INTERRUPT_PIN]
        intx_flags, intx_count = self.irqs.info(uapi.VFIO_PCI_INTX_IRQ_INDEX)
        use_intx = (
            1 <= pin <= 4
            and intx_count > 0
            and intx_flags & uapi.VFIO_IRQ_INFO_EVENTFD
            and intx_router is not None
            and intx_gsi is not None
        )
        gsi = intx_gsi(pin) if use_intx and intx_gsi is not None else None
        super().__init__(
            u16(0),
            u16(2),
            class_rev >> 8,
            revision=class_rev & 0xFF,
            subsystem_vendor=u16(PCI_SUBSYSTEM_VENDOR_ID),
            subsystem_id=u16(PCI_SUBSYSTEM_ID),
            intx=None,  # INTx goes through a KVM irqfd, not PciFunction's line
            interrupt_line=0xFF if gsi is None else gsi,
            name=name,
        )
        # Which bytes are ours (1) and which go to the device (0); see the module docstring.
        self._emulated = bytearray(PCI_CONFIG_SPACE_SIZE)
        for start, end in (
            (0, PCI_STATUS),  # IDs and COMMAND
            (PCI_REVISION_CLASS, PCI_CACHE_LINE_SIZE),
            (PCI_HEADER_TYPE, PCI_BIST),
            (PCI_BASE_ADDRESS_0, PCI_HEADER_END),
        ):
            self._emulated[start:end] = b"\x01" * (end - start)
        data = self.config.data
        data[PCI_HEADER_END:] = snapshot[PCI_HEADER_END:]
        data[PCI_CAPABILITY_LIST] = snapshot[PCI_CAPABILITY_LIST]
        data[PCI_INTERRUPT_PIN] = pin if gsi is not None else 0
        data[PCI_MIN_GNT:PCI_HEADER_END] = snapshot[PCI_MIN_GNT:PCI_HEADER_END]

        self._setup_bars(snapshot, name)
        for cap_id, offset in capabilities(snapshot):
            if cap_id == PCI_CAP_ID_MSIX and self.msix is None:
                self._setup_msix(snapshot, offset, name)
            elif cap_id == PCI_CAP_ID_MSI and self.msi is None:
                self._setup_msi(snapshot, offset, name)
        self._setup_mmaps(name)
        if gsi is not None and intx_router is not None:
            self.intx = PassthroughIntx(self.irqs, intx_router, gsi)
            self.intx.enable()
        log.info(
            "%s: %04x:%04x, BARs %s, %s, reset: %s",
            name,
            self.config.read(0, 2),
            self.config.read(2, 2),
            ", ".join(f"{i}:{b.kind.value}/{b.size:#x}" for i, b in sorted(self.bars.items()))
            or "none",
            "MSI-X" if self.msix else "MSI" if self.msi else "INTx" if self.intx else "no IRQ",
            self.reset_method or "none",
        )

    def _setup_bars(self, snapshot: bytes, name: str) -> None:
        index = 0
        while index < PCI_NUM_BARS:
            info = region_info(self.kernel, self.fd, index, name)
            reg = PCI_BASE_ADDRESS_0 + 4 * index
            raw = int.from_bytes(snapshot[reg : reg + 4], "little")
            if raw & PCI_BASE_ADDRESS_SPACE_IO:
                kind = BarKind.IO
            elif raw & PCI_BASE_ADDRESS_MEM_TYPE_64:
                kind = BarKind.MEM64
            else:
                kind = BarKind.MEM32
            if info.size:
                size = info.size
                if size & (size - 1) or size < (4 if kind is BarKind.IO else 16):
                    raise PassthroughError(name, f"BAR {index} has an odd size {size:#x}")
                prefetch = kind is not BarKind.IO and bool(raw & PCI_BASE_ADDRESS_MEM_PREFETCH)
                self.add_bar(
                    index,
                    size,
                    kind,
                    BarWindow(self, index),
                    prefetchable=prefetch,
                    on_map=functools.partial(self._bar_moved, index),
                )
                self._regions[index] = RegionAccess(
                    self.kernel, self.fd, info, f"{name} BAR{index}"
                )
            index += 2 if kind is BarKind.MEM64 else 1

    def _setup_msix(self, snapshot: bytes, offset: int, name: str) -> None:
        flags, count = self.irqs.info(uapi.VFIO_PCI_MSIX_IRQ_INDEX)
        if count == 0 or not flags & uapi.VFIO_IRQ_INFO_EVENTFD:
            return  # vfio-pci cannot route it: leave the capability as the device has it
        control = int.from_bytes(snapshot[offset + 2 : offset + 4], "little")
        table = int.from_bytes(snapshot[offset + 4 : offset + 8], "little")
        pba = int.from_bytes(snapshot[offset + 8 : offset + 12], "little")
        msix = PassthroughMsix(
            self.platform,
            self.irqs,
            control,
            table,
            pba,
            name=name,
            on_enable=self._msi_enabled,
        )
        self.msix = msix
        for bar, (start, end) in ((msix.bar, msix.table_range), (msix.pba_bar, msix.pba_range)):
            region = self._regions.get(bar)
            if region is None or end > region.info.size:
                raise PassthroughError(
                    name, f"MSI-X structure at BAR {bar} [{start:#x}, {end:#x}) is outside it"
                )
        self._msix_offset = offset
        self._emulated[offset : offset + PCI_MSIX_CAP_SIZE] = b"\x01" * PCI_MSIX_CAP_SIZE
        # Out of reset: disabled, not function-masked; Enable and Function Mask are the
        # guest's to write (the upper byte of Message Control).
        self.config.set16(offset + PCI_MSIX_FLAGS, control & PCI_MSIX_FLAGS_QSIZE)
        self.config.writable[offset + PCI_MSIX_FLAGS + 1] = (
            PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL
        ) >> 8  # Table and PBA Offset/BIR stay read-only, as the device has them

    def _setup_msi(self, snapshot: bytes, offset: int, name: str) -> None:
        flags, count = self.irqs.info(uapi.VFIO_PCI_MSI_IRQ_INDEX)
        if count == 0 or not flags & uapi.VFIO_IRQ_INFO_EVENTFD:
            return
        control = int.from_bytes(snapshot[offset + 2 : offset + 4], "little")
        msi = PassthroughMsi(
            self.platform, self.irqs, control, name=name, on_enable=self._msi_enabled
        )
        if offset + msi.length > PCI_CONFIG_SPACE_SIZE:
            raise PassthroughError(name, f"MSI capability at {offset:#x} runs off config space")
        self.msi = msi
        self._msi_offset = offset
        self._emulated[offset : offset + msi.length] = b"\x01" * msi.length
        mask = msi.writable_mask()
        self.config.writable[offset + 2 : offset + msi.length] = mask[2:]
        data = self.config.data
        data[offset + 2 : offset + msi.length] = bytes(msi.length - 2)  # all state from reset
        data[offset + 2 : offset + 4] = (control & ~0x71 & 0xFFFF).to_bytes(2, "little")

    def _setup_mmaps(self, name: str) -> None:
        """mmap the parts of each memory BAR that do not need to trap (done once; the
        mappings follow the BAR wherever the guest places it)."""
        for index, region in self._regions.items():
            if self.bars[index].is_io:
                continue
            traps: list[tuple[int, int]] = []
            if self.msix is not None:
                if self.msix.bar == index:
                    traps.append(self.msix.table_range)
                if self.msix.pba_bar == index:
                    traps.append(self.msix.pba_range)
            for offset, size in mappable_chunks(region.info, traps):
                try:
                    mapping = self.kernel.mmap(self.fd, size, region.info.offset + offset)
                except (OSError, ValueError) as e:
                    log.info("%s BAR%d: mmap refused (%s); every access will trap", name, index, e)
                    break
                self._chunks.setdefault(index, []).append((offset, mapping))

    # -- config space (PciDevice) -------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        if not PciConfigSpace.valid(offset, size):
            return (1 << (8 * max(size, 1))) - 1
        with self.lock:
            emulated = self._emulated[offset : offset + size]
            if all(emulated):
                self._refresh(offset, size)
                return self.config.read(offset, size)
            raw = self._config.read(offset, size)
            if raw is None:
                self.bad_accesses(f"config read at {offset:#x} failed on the device")
                raw = b"\xff" * size
            if any(emulated):
                self._refresh(offset, size)
                merged = bytearray(raw)
                for i, mine in enumerate(emulated):
                    if mine:
                        merged[i] = self.config.data[offset + i]
                raw = bytes(merged)
            return int.from_bytes(raw, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not PciConfigSpace.valid(offset, size):
            return
        with self.lock:
            if self._closed:
                return
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            emulated = self._emulated[offset : offset + size]
            if all(emulated):
                super().config_write(offset, size, value)
            elif not any(emulated):
                self._config_pwrite(offset, data)
            else:
                # Mixed: emulated bytes one by one, the device's as contiguous runs.
                run_start: int | None = None
                for i in range(size + 1):
                    mine = i == size or emulated[i]
                    if mine and run_start is not None:
                        self._config_pwrite(offset + run_start, data[run_start:i])
                        run_start = None
                    if i == size:
                        break
                    if mine:
                        super().config_write(offset + i, 1, data[i])
                    elif run_start is None:
                        run_start = i
            end = offset + size
            if offset < PCI_COMMAND + 2 and end > PCI_COMMAND:
                self._forward_command()
            if self.msix is not None and self._touches(offset, end, self._msix_offset, 4):
                control = self.config.read(self._msix_offset + PCI_MSIX_FLAGS, 2)
                self.msix.control_written(control)
            if self.msi is not None and self._touches(
                offset, end, self._msi_offset, self.msi.length
            ):
                start = self._msi_offset
                self.msi.written(bytes(self.config.data[start : start + self.msi.length]))

    @staticmethod
    def _touches(offset: int, end: int, start: int, length: int) -> bool:
        return offset < start + length and start < end

    def _refresh(self, offset: int, size: int) -> None:
        """Bring live emulated bytes up to date before a read (MSI Pending Bits)."""
        msi = self.msi
        if msi is None or msi.pending_offset is None:
            return
        at = self._msi_offset + msi.pending_offset
        if offset < at + 4 and at < offset + size:
            self.config.set32(at, msi.pending_bits())

    def _config_pwrite(self, offset: int, data: bytes) -> None:
        if not self._config.write(offset, data):
            self.bad_accesses(f"config write at {offset:#x} refused by the device")

    def _forward_command(self) -> None:
        """Give the device the guest's COMMAND bits (vfio-pci virtualizes what it must)."""
        raw = self._config.read(PCI_COMMAND, 2)
        current = int.from_bytes(raw, "little") if raw is not None else 0
        wanted = (current & ~COMMAND_FORWARDED) | (self.command & COMMAND_FORWARDED)
        if raw is None or wanted != current:
            self._config_pwrite(PCI_COMMAND, wanted.to_bytes(2, "little"))

    # -- BARs ---------------------------------------------------------------------------

    def _bar_moved(self, index: int, address: int | None) -> None:
        """PciFunction moved BAR ``index`` (None: no longer decoded): move its RAM maps."""
        for ram in self._ram_maps.pop(index, []):
            ram.close()
        if address is None or self._closed:
            return
        # Memory decoding must be on in the device before a guest access can reach the
        # mmap directly (vfio-pci refuses mmap faults while it is off).
        self._forward_command()
        maps: list[RamMapping] = []
        for offset, mapping in self._chunks.get(index, []):
            try:
                maps.append(self.platform.map_ram(address + offset, mapping))
            except (IovirtError, OSError, ValueError) as e:
                # The trap path still serves these pages; only speed is lost.
                self._map_failures(f"BAR{index} page {offset:#x} at {address + offset:#x}: {e}")
        self._ram_maps[index] = maps

    def _msix_part(self, index: int, offset: int, size: int) -> str | None:
        """'table' / 'pba' if the access lies in the MSI-X table / PBA, 'straddle' if it
        overlaps one without lying inside it, else None."""
        msix = self.msix
        if msix is None:
            return None
        for part, bar, (start, end) in (
            ("table", msix.bar, msix.table_range),
            ("pba", msix.pba_bar, msix.pba_range),
        ):
            if bar != index or offset >= end or offset + size <= start:
                continue
            return part if start <= offset and offset + size <= end else "straddle"
        return None

    def bar_read(self, index: int, offset: int, size: int) -> int:
        msix = self.msix
        part = self._msix_part(index, offset, size)
        if msix is not None and part == "table":
            return msix.table_read(offset - msix.table_offset, size)
        if msix is not None and part == "pba":
            return msix.pba_read(offset - msix.pba_offset, size)
        if part == "straddle":
            self.bad_accesses(f"BAR{index} {size}-byte read at {offset:#x} straddles MSI-X")
            return 0
        region = self._regions.get(index)
        data = region.read(offset, size) if region is not None else None
        if data is None:
            self.bad_accesses(f"BAR{index} {size}-byte read at {offset:#x} failed")
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        msix = self.msix
        part = self._msix_part(index, offset, size)
        if msix is not None and part == "table":
            msix.table_write(offset - msix.table_offset, size, value)
            return
        if msix is not None and part == "pba":
            msix.pba_write(offset - msix.pba_offset, size, value)
            return
        if part == "straddle":
            self.bad_accesses(f"BAR{index} {size}-byte write at {offset:#x} straddles MSI-X")
            return
        region = self._regions.get(index)
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if region is None or not region.write(offset, data):
            self.bad_accesses(f"BAR{index} {size}-byte write at {offset:#x} failed")

    def mapped_ranges(self) -> list[tuple[int, int]]:
        """(guest address, size) of every BAR part mapped into the guest now."""
        with self.lock:
            return sorted((m.gpa, m.size) for maps in self._ram_maps.values() for m in maps)

    # -- interrupts ---------------------------------------------------------------------

    def _msi_enabled(self, enabled: bool) -> None:
        """MSI or MSI-X goes on (INTx off first: vfio-pci runs one kind at a time) or off
        (INTx back on)."""
        if self.intx is None:
            return
        if enabled:
            self.intx.disable()
        elif not (self.msix is not None and self.msix.vfio_enabled) and not (
            self.msi is not None and self.msi.enabled
        ):
            self.intx.enable()

    # -- reset and lifetime -------------------------------------------------------------

    def reset(self) -> str | None:
        """Reset the device: function-level reset (VFIO_DEVICE_RESET picks FLR, PM or
        slot reset) if it has one, else a PCI hot reset of its bus when every function
        that affects is ours. Returns how, or None (logged) if it could not."""
        if self.info_flags & uapi.VFIO_DEVICE_FLAGS_RESET:
            try:
                self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_RESET, 0)
                return "function reset"
            except OSError as e:
                log.warning("%s: VFIO_DEVICE_RESET failed: %s", self.name, e.strerror)
        if self._hot_reset():
            return "bus reset"
        log.warning("%s: the device has no reset method; its state carries over", self.name)
        return None

    def _hot_reset(self) -> bool:
        if self._group_fds is None:
            return False
        buf = bytearray(_HOT_RESET_INFO_BUFFER)
        uapi.HOT_RESET_INFO.pack_into(buf, 0, len(buf), 0, 0)
        try:
            self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
        except OSError:
            return False  # ENODEV: no bus reset for it (e.g. on a root bus)
        _, _, count = uapi.HOT_RESET_INFO.unpack_from(buf)
        first = uapi.HOT_RESET_INFO.size
        count = min(count, (len(buf) - first) // uapi.HOT_RESET_DEVICE.size)
        groups = {
            uapi.HOT_RESET_DEVICE.unpack_from(buf, first + i * uapi.HOT_RESET_DEVICE.size)[0]
            for i in range(count)
        }
        held = self._group_fds()
        if not groups or not groups <= held.keys():
            log.info(
                "%s: a bus reset would also reset groups %s, which are not ours",
                self.name,
                sorted(groups - held.keys()),
            )
            return False
        fds = [held[g] for g in sorted(groups)]
        arg = bytearray(
            uapi.HOT_RESET.pack(uapi.HOT_RESET.size + 4 * len(fds), 0, len(fds))
            + struct.pack(f"<{len(fds)}i", *fds)
        )
        try:
            self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_PCI_HOT_RESET, arg)
        except OSError as e:
            log.warning("%s: VFIO_DEVICE_PCI_HOT_RESET failed: %s", self.name, e.strerror)
            return False
        return True

    def _ioctl(self, request: int, arg: bytearray | int, op: str, name: str) -> int:
        try:
            return self.kernel.ioctl(self.fd, request, arg)
        except OSError as e:
            raise VfioError(op, e.errno or errno.EIO, name) from e

    def close(self) -> None:
        """Stop interrupts, unmap the BARs, reset the device and close its fd."""
        lock = getattr(self, "lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            if self._closed:
                return
            self._closed = True
            for maps in self._ram_maps.values():
                for ram in maps:
                    with contextlib.suppress(IovirtError, OSError):
                        ram.close()
            self._ram_maps.clear()
            for chunks in self._chunks.values():
                for _, mapping in chunks:
                    with contextlib.suppress(BufferError, OSError):
                        mapping.close()
            self._chunks.clear()
            for irq in _present(self.msix, self.msi, self.intx):
                irq.close()
            if self.fd >= 0:
                with contextlib.suppress(IovirtError, OSError):
                    self.reset()
            if self.fd >= 0:
                with contextlib.suppress(OSError):
                    self.kernel.close(self.fd)
                self.fd = -1


def _present(
    *irqs: PassthroughMsix | PassthroughMsi | PassthroughIntx | None,
) -> Iterable[PassthroughMsix | PassthroughMsi | PassthroughIntx]:
    return [irq for irq in irqs if irq is not None]
