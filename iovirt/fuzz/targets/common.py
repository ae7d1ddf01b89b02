"""What every fuzz target shares: throwaway backends, a PCI board, the interrupt oracle."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from typing import TYPE_CHECKING, Any

from iovirt.fuzz.harness import OracleViolation, Region
from iovirt.interrupt import RecordingInterrupt

if TYPE_CHECKING:
    from iovirt.backends.block import FileBlockBackend
    from iovirt.bus.pci import PciFunction

# Every backend file is this small, so whole-disk comparisons are cheap.
DISK_SECTORS = 128
SECTOR = 512
MAC = bytes.fromhex("525400123456")
GSI = 5
VIRTIO_MMIO_BASE = 0xD000_0000
VNET_HDR = struct.Struct("<BBHHHHH")  # struct virtio_net_hdr_v1

# PCI command bits the harness sets before the guest starts, as firmware would.
PCI_COMMAND = 0x04
PCI_COMMAND_ENABLE = 0x0007  # I/O, memory, bus master
PCI_COMMAND_INTX_DISABLE = 0x0400


def drain(fd: int) -> list[bytes]:
    """Every datagram waiting on a non-blocking socket."""
    out: list[bytes] = []
    while True:
        try:
            out.append(os.read(fd, 1 << 17))
        except (BlockingIOError, ConnectionError):
            return out


def temp_disk() -> tuple[str, bytes]:
    """A temporary disk image with a recognisable pattern in every sector."""
    where = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="iovirt-fuzz-", suffix=".img", dir=where)
    image = b"".join(bytes([i & 0xFF, 0xA5]) * (SECTOR // 2) for i in range(DISK_SECTORS))
    with os.fdopen(fd, "wb") as f:
        f.write(image)
    return path, image


class TempDisk:
    """A throwaway backend file, restored before every input and compared after it."""

    def __init__(self) -> None:
        from iovirt.backends.block import FileBlockBackend

        self.path, self.image = temp_disk()
        self.backend: FileBlockBackend = FileBlockBackend(self.path)

    def restore(self) -> None:
        fd = self.backend.fd
        os.ftruncate(fd, len(self.image))
        os.pwrite(fd, self.image, 0)

    def changed_sectors(self) -> tuple[int, list[int]]:
        """The file's size now, and the sectors that differ from the baseline."""
        fd = self.backend.fd
        size = os.fstat(fd).st_size
        now = os.pread(fd, max(size, len(self.image)), 0)
        changed = [
            s
            for s in range(DISK_SECTORS)
            if now[s * SECTOR : (s + 1) * SECTOR] != self.image[s * SECTOR : (s + 1) * SECTOR]
        ]
        return size, changed

    def close(self) -> None:
        self.backend.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class PciBoard:
    """Buses and a PCI root with one function on it, BARs placed and decoding on."""

    def __init__(self, function: PciFunction) -> None:
        from iovirt.bus import Bus
        from iovirt.bus.pci import PciRoot

        self.pio = Bus("pio", 0x1_0000)
        self.mmio = Bus("mmio", 1 << 46)
        self.root = PciRoot(self.mmio, self.pio)
        self.function = function
        self.root.add(function)
        function.config_write(PCI_COMMAND, 2, PCI_COMMAND_ENABLE)

    def regions(self) -> list[Region]:
        """One region per BAR, reached through the bus at the BAR's current address (an
        access while the guest has the BAR unmapped goes nowhere, as on real hardware)."""
        out = []
        for index in sorted(self.function.bars):
            bar = self.function.bars[index]
            bus = self.pio if bar.is_io else self.mmio

            def read(offset: int, size: int, bar: Any = bar, bus: Any = bus) -> int:
                if bar.mapped is None:
                    return (1 << (8 * size)) - 1
                return int(bus.read(bar.mapped + offset, size))

            def write(offset: int, size: int, value: int, bar: Any = bar, bus: Any = bus) -> None:
                if bar.mapped is not None:
                    bus.write(bar.mapped + offset, size, value)

            kind = "io" if bar.is_io else "mmio"
            out.append(Region(f"bar{index}-{kind}", bar.size, read, write))
        return out

    def intx_allowed(self) -> bool:
        return not self.function.config.read(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE


def check_line(name: str, line: RecordingInterrupt, expected: bool) -> None:
    if line.level != expected:
        raise OracleViolation(
            "irq-state",
            f"{name}: interrupt line is {'high' if line.level else 'low'} while the "
            f"registers say it should be {'high' if expected else 'low'}",
        )
