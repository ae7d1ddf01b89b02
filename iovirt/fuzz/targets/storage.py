"""The fuzz target of the AHCI controller, and the ATA decoding its backend oracle uses."""

from __future__ import annotations

import contextlib
import struct

from iovirt.fuzz import ops as fops
from iovirt.fuzz.harness import FuzzMemory, OracleViolation, Region, Target
from iovirt.fuzz.ops import Op
from iovirt.fuzz.targets.common import (
    DISK_SECTORS,
    PciBoard,
    TempDisk,
    check_line,
)
from iovirt.interrupt import RecordingInterrupt

# ATA commands that write the medium, and how they address it (independent of the model).
_ATA_WRITES_LBA28 = frozenset({0x30, 0x31, 0xC5, 0xCA})
_ATA_WRITES_LBA48 = frozenset({0x34, 0x35, 0x39, 0x3D, 0xCE})
_ATA_WRITE_FPDMA = 0x61


def ata_write_range(fis: bytes) -> tuple[int, int] | None:
    """``(first sector, sectors)`` a Register H2D FIS asks to write, or None."""
    if len(fis) < 16 or fis[0] != 0x27 or not fis[1] & 0x80:
        return None
    command = fis[2]
    lba48 = int.from_bytes(fis[4:7] + fis[8:11], "little")
    if command in _ATA_WRITES_LBA28:
        lba = int.from_bytes(fis[4:7], "little") | (fis[7] & 0x0F) << 24
        return lba, fis[12] or 0x100
    if command in _ATA_WRITES_LBA48:
        return lba48, (fis[12] | fis[13] << 8) or 0x1_0000
    if command == _ATA_WRITE_FPDMA:
        return lba48, (fis[3] | fis[11] << 8) or 0x1_0000
    return None


class AhciTarget(Target):
    name = "ahci"
    summary = "AHCI HBA (ICH9) with one SATA disk on a temp file and one empty port"
    modules = ("iovirt.devices.ahci",)
    support_modules = ("iovirt.bus.pci",)
    host_events = ("reset",)

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import ahci

        self.mod = ahci
        self.disk = TempDisk()
        self.layout = [("bar5-mmio", ahci.AHCI_ABAR_SIZE)]

    def begin(self) -> list[Region]:
        self.disk.restore()
        self.irq = RecordingInterrupt()
        self.hba = self.mod.Ahci(self.memory, [self.disk.backend, None], intx=self.irq)
        self.board = PciBoard(self.hba)
        self.allowed: set[int] = set()
        (abar,) = self.board.regions()
        inner_write = abar.write

        def write(offset: int, size: int, value: int) -> None:
            for i in range(0, size, 4):
                self._note_issue(offset + i, value >> (8 * i) & 0xFFFF_FFFF)
            inner_write(offset, size, value)

        abar.write = write
        return [abar]

    def _note_issue(self, offset: int, value: int) -> None:
        """Before a PxCI write: the sectors its commands address may change (read through
        the same RAM hooks the model uses, so both see the same DMA-filled bytes)."""
        m = self.mod
        if offset < m.PORT_BASE or (offset - m.PORT_BASE) % m.PORT_STRIDE != m.PORT_CI:
            return
        index = (offset - m.PORT_BASE) // m.PORT_STRIDE
        if index >= len(self.hba.ports) or not value:
            return
        port = self.hba.ports[index]
        for slot in range(m.AHCI_NUM_SLOTS):
            if not value >> slot & 1:
                continue
            with contextlib.suppress(Exception):
                header = self.memory.read(port.clb + slot * m.CMD_HEADER_SIZE, 16)
                table = int.from_bytes(header[8:12], "little") & ~0x7F
                table |= int.from_bytes(header[12:16], "little") << 32
                found = ata_write_range(self.memory.read(table, m.FIS_REG_SIZE))
                if found is not None:
                    lba, count = found
                    self.allowed.update(range(lba, min(lba + count, DISK_SECTORS)))

    def config_read(self, offset: int, size: int) -> int:
        return self.hba.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.hba.config_write(offset, size, value)

    def host(self, event: int, data: bytes) -> None:
        self.hba.reset()

    def check(self) -> None:
        m = self.mod
        hba = self.hba
        for i, port in enumerate(hba.ports):
            values = (port.ci, port.sact, port.is_, port.ie, port.serr, port.sntf, port.tfd)
            if min(values) < 0 or max(values) > 0xFFFF_FFFF:
                raise OracleViolation("register", f"port {i} register out of 32 bits: {values}")
            if port.is_ & ~m.PORT_IRQ_ALL:
                raise OracleViolation("register", f"port {i} PxIS has undefined bits")
        expected = bool(hba.ghc & m.GHC_IE) and hba.is_ != 0
        check_line("ahci", self.irq, expected and self.board.intx_allowed())

    def end(self) -> None:
        size, changed = self.disk.changed_sectors()
        if size != len(self.disk.image):
            raise OracleViolation("backend-size", f"disk file is {size} bytes, was {DISK_SECTORS}")
        outside = [s for s in changed if s not in self.allowed]
        if outside:
            raise OracleViolation(
                "backend-integrity",
                f"sectors {outside[:8]} changed; the guest's write commands addressed "
                f"{sorted(self.allowed)[:8]}{'...' if len(self.allowed) > 8 else ''}",
            )

    def close(self) -> None:
        self.disk.close()

    def seeds(self) -> list[list[Op]]:
        m = self.mod
        p0 = m.PORT_BASE

        def reg(offset: int, value: int) -> Op:
            return fops.write(0, offset, 4, value)

        def command(slot: int, fis: bytes, prdt: list[tuple[int, int]], table: int) -> list[Op]:
            header = struct.pack("<IIII", 5 | len(prdt) << 16, 0, table, 0)
            prds = b"".join(struct.pack("<IIII", a, 0, 0, n - 1) for a, n in prdt)
            return [
                fops.mem_write(0x1000 + slot * 32, header),
                fops.mem_write(table, fis.ljust(0x80, b"\0") + prds),
            ]

        def h2d(cmd: int, lba: int = 0, count: int = 0, features: int = 0) -> bytes:
            fis = bytearray(20)
            fis[0], fis[1], fis[2], fis[3] = 0x27, 0x80, cmd, features & 0xFF
            fis[4:7] = (lba & 0xFFFFFF).to_bytes(3, "little")
            fis[7] = m.DEVICE_LBA
            fis[8:11] = (lba >> 24).to_bytes(3, "little")
            fis[11] = features >> 8
            fis[12:14] = count.to_bytes(2, "little")
            return bytes(fis)

        start = [
            fops.config_read(0, 4),
            fops.read(0, m.HOST_CAP, 4),
            reg(m.HOST_GHC, m.GHC_AE | m.GHC_IE),
            reg(p0 + m.PORT_CLB, 0x1000),
            reg(p0 + m.PORT_FB, 0x2000),
            reg(p0 + m.PORT_IE, m.PORT_IRQ_ALL),
            reg(p0 + m.PORT_CMD, m.PORT_CMD_FRE | m.PORT_CMD_ST),
            reg(p0 + m.PORT_SERR, 0xFFFF_FFFF),
        ]
        ack = [
            fops.read(0, p0 + m.PORT_IS, 4),
            reg(p0 + m.PORT_IS, 0xFFFF_FFFF),
            reg(m.HOST_IS, 0xFF),
            fops.read(0, p0 + m.PORT_TFD, 4),
        ]
        identify = [
            *start,
            *command(0, h2d(m.ATA_CMD_IDENTIFY_DEVICE), [(0x8000, 512)], 0x3000),
            reg(p0 + m.PORT_CI, 1),
            *ack,
        ]
        rw = [
            *start,
            fops.mem_write(0x9000, b"\x5a" * 1024),
            *command(0, h2d(m.ATA_CMD_WRITE_DMA_EXT, 3, 2), [(0x9000, 512), (0x9200, 512)], 0x3000),
            *command(1, h2d(m.ATA_CMD_READ_DMA_EXT, 3, 2), [(0xA000, 1024)], 0x3100),
            *command(2, h2d(m.ATA_CMD_FLUSH_CACHE_EXT), [], 0x3200),
            reg(p0 + m.PORT_CI, 0x7),
            *ack,
            *command(3, h2d(m.ATA_CMD_WRITE_FPDMA_QUEUED, 5, features=1), [(0x9000, 512)], 0x3300),
            *command(4, h2d(m.ATA_CMD_READ_FPDMA_QUEUED, 5, features=1), [(0xB000, 512)], 0x3400),
            reg(p0 + m.PORT_SACT, 0x18),
            reg(p0 + m.PORT_CI, 0x18),
            *ack,
        ]
        log_read = h2d(m.ATA_CMD_READ_LOG_EXT, m.ATA_LOG_NCQ_ERROR, 1)
        errors = [
            *start,
            *command(0, h2d(m.ATA_CMD_READ_DMA_EXT, DISK_SECTORS, 1), [(0x9000, 512)], 0x3000),
            reg(p0 + m.PORT_CI, 1),
            *ack,
            reg(p0 + m.PORT_CMD, m.PORT_CMD_FRE),
            reg(p0 + m.PORT_CMD, m.PORT_CMD_FRE | m.PORT_CMD_ST),
            *command(1, log_read, [(0x9000, 512)], 0x3100),
            *command(2, h2d(m.ATA_CMD_SET_FEATURES, 0, 0x45, m.SETFEATURES_XFER), [], 0x3200),
            reg(p0 + m.PORT_CI, 0x6),
            reg(p0 + m.PORT_SCTL, m.SCTL_DET_COMRESET),
            reg(p0 + m.PORT_SCTL, 0),
            *ack,
        ]
        return [identify, rw, errors]
