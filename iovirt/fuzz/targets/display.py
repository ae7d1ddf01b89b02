"""The fuzz target of the bochs-display framebuffer."""

from __future__ import annotations

from typing import Any

from iovirt.fuzz import ops as fops
from iovirt.fuzz.harness import FuzzMemory, OracleViolation, Region, Target
from iovirt.fuzz.ops import Op
from iovirt.fuzz.targets.common import (
    PciBoard,
)


class BochsDisplayTarget(Target):
    name = "bochs-display"
    summary = "bochs-display: DISPI mode registers, EDID, video memory BAR, the front-end's view"
    modules = ("iovirt.devices.bochs_display",)
    support_modules = ("iovirt.bus.pci",)
    host_events = ("refresh", "vram-read")
    vram_size = 256 * 1024

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import bochs_display
        from iovirt.testing.platform import SimulatedPlatform

        self.mod = bochs_display
        self._platform_cls = SimulatedPlatform
        self.layout = [("bar0-mmio", self.vram_size), ("bar2-mmio", bochs_display.MMIO_BAR_SIZE)]

    def begin(self) -> list[Region]:
        self.platform = self._platform_cls(self.memory)
        self.display = self.mod.BochsDisplay(self.platform, self.vram_size)
        self.board = PciBoard(self.display)
        vram, regs = self.board.regions()
        bus_read, bus_write = vram.read, vram.write
        # While the platform has video memory mapped as RAM, guest accesses go to that
        # RAM (dirty-logged), not to the device: what KVM does with a memory slot.
        bar = self.display.bars[self.mod.VRAM_BAR]

        def mapping() -> Any:
            if bar.mapped is None:
                return None
            open_maps = [mp for mp in self.platform.mappings if not mp.closed]
            return next((mp for mp in open_maps if mp.gpa == bar.mapped), None)

        def read(offset: int, size: int) -> int:
            mp = mapping()
            if mp is None:
                return bus_read(offset, size)
            end = min(offset + size, mp.size)
            return int.from_bytes(mp.buffer[offset:end], "little")

        def write(offset: int, size: int, value: int) -> None:
            mp = mapping()
            if mp is None:
                bus_write(offset, size, value)
                return
            data = value.to_bytes(size, "little")[: mp.size - offset]
            mp.guest_write(mp.gpa + offset, data)

        vram.read, vram.write = read, write
        return [vram, regs]

    def config_read(self, offset: int, size: int) -> int:
        return self.display.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.display.config_write(offset, size, value)

    def host(self, event: int, data: bytes) -> None:
        mode = self.display.mode()
        if event == 0:
            rows = self.display.dirty_rows()
            height = 0 if mode is None else mode.height
            last = 0
            for first, end in rows:
                if not last <= first < end <= height:
                    raise OracleViolation(
                        "display", f"dirty rows {rows} for a mode {height} rows high"
                    )
                last = end
        elif mode is not None:
            # What a front-end does with a mode: read the visible picture out of VRAM.
            vram = self.display.vram()
            end = mode.offset + max(mode.size, 0)
            if end > len(vram):
                raise OracleViolation("display", f"mode {mode} ends past VRAM ({len(vram)})")
            bytes(vram[mode.offset : end])

    def check(self) -> None:
        mode = self.display.mode()
        if mode is None:
            return
        m = self.mod
        problem = None
        if mode.bpp not in m.VBE_DISPI_BPP_VALUES:
            problem = f"bpp {mode.bpp}"
        elif mode.width <= 0 or mode.height <= 0 or mode.offset < 0:
            problem = "an empty or negative picture"
        elif mode.stride < mode.width * mode.bytes_per_pixel:
            problem = f"stride {mode.stride} shorter than a row"
        elif mode.offset + mode.size > self.vram_size:
            problem = f"the picture ends at {mode.offset + mode.size:#x}, past VRAM"
        if problem is not None:
            raise OracleViolation("display-mode", f"{mode}: {problem}")

    def end(self) -> None:
        self.display.close()

    def seeds(self) -> list[list[Op]]:
        m = self.mod

        def dispi(index: int, value: int) -> Op:
            return fops.write(1, m.DISPI_OFFSET + 2 * index, 2, value)

        def get(index: int) -> Op:
            return fops.read(1, m.DISPI_OFFSET + 2 * index, 2)

        linux = [
            fops.read(1, m.EDID_OFFSET, 4),
            fops.read(1, m.EDID_OFFSET + 0x36, 8),
            get(m.VBE_DISPI_INDEX_ID),
            dispi(m.VBE_DISPI_INDEX_ID, m.VBE_DISPI_ID5),
            get(m.VBE_DISPI_INDEX_VIDEO_MEMORY_64K),
            fops.read(1, m.QEXT_OFFSET, 4),
            fops.write(1, m.QEXT_OFFSET + 4, 4, 0x1E1E1E1E),
            dispi(m.VBE_DISPI_INDEX_ENABLE, 0),
            dispi(m.VBE_DISPI_INDEX_BPP, 32),
            dispi(m.VBE_DISPI_INDEX_XRES, 160),
            dispi(m.VBE_DISPI_INDEX_YRES, 120),
            dispi(m.VBE_DISPI_INDEX_BANK, 0),
            dispi(m.VBE_DISPI_INDEX_VIRT_WIDTH, 160),
            dispi(m.VBE_DISPI_INDEX_X_OFFSET, 0),
            dispi(m.VBE_DISPI_INDEX_Y_OFFSET, 0),
            dispi(m.VBE_DISPI_INDEX_ENABLE, m.VBE_DISPI_ENABLED | m.VBE_DISPI_LFB_ENABLED),
            get(m.VBE_DISPI_INDEX_VIRT_HEIGHT),
            fops.write(0, 0x1000, 4, 0x00FF00FF),
            fops.write(0, 0x8000, 8, 0x1234),
            fops.host(0),
            fops.host(1),
            dispi(m.VBE_DISPI_INDEX_Y_OFFSET, 100),
            fops.write(1, m.VGA_IOPORT_OFFSET, 1, 0x20),
            fops.host(0),
        ]
        caps = [
            dispi(m.VBE_DISPI_INDEX_ENABLE, m.VBE_DISPI_GETCAPS),
            get(m.VBE_DISPI_INDEX_XRES),
            get(m.VBE_DISPI_INDEX_YRES),
            get(m.VBE_DISPI_INDEX_BPP),
            fops.config_write(0x04, 2, 0),  # memory decode off: video memory goes unmapped
            fops.write(0, 0x10, 4, 5),
            fops.config_write(0x04, 2, 7),
            fops.read(0, 0x10, 4),
            dispi(m.VBE_DISPI_INDEX_BPP, 16),
            dispi(m.VBE_DISPI_INDEX_XRES, 2560),
            dispi(m.VBE_DISPI_INDEX_ENABLE, m.VBE_DISPI_ENABLED | m.VBE_DISPI_NOCLEARMEM),
            dispi(m.VBE_DISPI_INDEX_YRES, 1600),
            dispi(m.VBE_DISPI_INDEX_X_OFFSET, 9),
            fops.host(1),
            fops.host(0),
        ]
        return [linux, caps]
