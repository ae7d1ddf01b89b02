"""Tests of the AHCI HBA and its SATA disks, driven the way Linux's libahci drives them.

The board is a :class:`PciRoot` with real port and MMIO buses and one :class:`Ahci` whose
disks are :class:`FileBlockBackend` images in ``tmp_path``. :class:`LibAhci` finds ABAR
through 0xCF8/0xCFC, enables memory decode and bus mastering, and then does what
``ahci_init_one`` / ``ahci_port_start`` / ``ahci_hardreset`` / ``ahci_qc_issue`` do: HBA
reset through GHC.HR, per-port command list and FIS receive area in guest RAM, FRE and ST,
COMRESET through PxSCTL, commands built in the command list and issued through PxCI (and
PxSACT for NCQ). The INTx line is a :class:`RecordingInterrupt`.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iovirt.backends.block import FileBlockBackend
from iovirt.bus import Bus
from iovirt.bus.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_PORTS,
    PCI_CLASS_DEVICE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_VENDOR_ID,
    PciRoot,
)
from iovirt.devices.ahci import (
    AHCI_ABAR_SIZE,
    ATA_CMD_CHECK_POWER_MODE,
    ATA_CMD_FLUSH_CACHE,
    ATA_CMD_FLUSH_CACHE_EXT,
    ATA_CMD_IDENTIFY_DEVICE,
    ATA_CMD_READ_DMA,
    ATA_CMD_READ_DMA_EXT,
    ATA_CMD_READ_FPDMA_QUEUED,
    ATA_CMD_READ_LOG_DMA_EXT,
    ATA_CMD_READ_LOG_EXT,
    ATA_CMD_READ_NATIVE_MAX_EXT,
    ATA_CMD_READ_SECTORS,
    ATA_CMD_SET_FEATURES,
    ATA_CMD_WRITE_DMA,
    ATA_CMD_WRITE_DMA_EXT,
    ATA_CMD_WRITE_DMA_FUA_EXT,
    ATA_CMD_WRITE_FPDMA_QUEUED,
    ATA_ERROR_ABRT,
    ATA_ERROR_IDNF,
    CAP_S64A,
    CAP_SAM,
    CAP_SCLO,
    CAP_SNCQ,
    FIS_TYPE_PIO_SETUP,
    FIS_TYPE_REG_D2H,
    FIS_TYPE_REG_H2D,
    FIS_TYPE_SDB,
    GHC_AE,
    GHC_HR,
    GHC_IE,
    HOST_CAP,
    HOST_GHC,
    HOST_IS,
    HOST_PI,
    HOST_VS,
    PORT_CI,
    PORT_CLB,
    PORT_CLBU,
    PORT_CMD,
    PORT_CMD_CLO,
    PORT_CMD_CR,
    PORT_CMD_FR,
    PORT_CMD_FRE,
    PORT_CMD_POD,
    PORT_CMD_ST,
    PORT_CMD_SUD,
    PORT_FB,
    PORT_FBU,
    PORT_IE,
    PORT_IRQ_DHRS,
    PORT_IRQ_PSS,
    PORT_IRQ_SDBS,
    PORT_IRQ_TFES,
    PORT_IS,
    PORT_SACT,
    PORT_SCTL,
    PORT_SERR,
    PORT_SIG,
    PORT_SSTS,
    PORT_TFD,
    RFIS_PSFIS,
    RFIS_RFIS,
    RFIS_SDBFIS,
    SETFEATURES_WC_OFF,
    SETFEATURES_XFER,
    SIG_ATA,
    Ahci,
    ata_string,
)
from iovirt.interrupt import RecordingInterrupt
from iovirt.memory import GuestMemory

MiB = 1 << 20
RAM = 16 * MiB
DISK_SECTORS = 2048  # 1 MiB images
SLOT = 4
GSI = 18
# What libahci's ahci_port_start enables (DEF_PORT_IRQ): errors and every completion FIS.
DEF_PORT_IRQ = 0xFDC0_0000 | PORT_IRQ_DHRS | PORT_IRQ_PSS | PORT_IRQ_SDBS | 1 << 2
DATA = 0x40_0000  # guest buffers from 4 MiB up
SECTOR = 512


def port_base(port: int) -> int:
    """Where each port keeps its command list (1 KiB), FIS area and command tables."""
    return 0x10_0000 + port * 0x4_0000


def command_table(port: int, slot: int) -> int:
    return port_base(port) + 0x1000 + slot * 0x1000  # room for 248 PRD entries


def h2d(
    command: int,
    *,
    lba: int = 0,
    count: int = 0,
    features: int = 0,
    device: int = 0x40,
    control: int = 0,
    c: bool = True,
) -> bytes:
    """A Register H2D FIS as ata_tf_to_fis() builds it."""
    fis = bytearray(20)
    fis[0] = FIS_TYPE_REG_H2D
    fis[1] = 0x80 if c else 0
    fis[2] = command
    fis[3] = features & 0xFF
    fis[4:7] = (lba & 0xFF_FFFF).to_bytes(3, "little")
    fis[7] = device
    fis[8:11] = (lba >> 24 & 0xFF_FFFF).to_bytes(3, "little")
    fis[11] = features >> 8 & 0xFF
    fis[12] = count & 0xFF
    fis[13] = count >> 8 & 0xFF
    fis[15] = control
    return bytes(fis)


def fpdma(command: int, tag: int, lba: int, sectors: int, fua: bool = False) -> bytes:
    """READ/WRITE FPDMA QUEUED: sector count in FEATURES, tag in COUNT bits 7:3."""
    return h2d(command, lba=lba, features=sectors, count=tag << 3, device=0x40 | fua << 7)


class LibAhci:
    """The guest side: config space through ports, ABAR through the MMIO bus."""

    def __init__(self, pio: Bus, mmio: Bus, memory: GuestMemory, slot: int) -> None:
        self.pio, self.mmio, self.memory, self.slot = pio, mmio, memory, slot
        self.abar = 0

    # config space
    def cfg_read(self, reg: int, size: int) -> int:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | self.slot << 11 | reg & 0xFC)
        return self.pio.read(CONFIG_DATA_PORT + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | self.slot << 11 | reg & 0xFC)
        self.pio.write(CONFIG_DATA_PORT + (reg & 3), size, value)

    def size_bar(self, index: int) -> tuple[int, int, int]:
        """pci_read_bases() for a 32-bit BAR: (address, size, flags)."""
        reg = 0x10 + 4 * index
        old = self.cfg_read(reg, 4)
        self.cfg_write(reg, 4, 0xFFFF_FFFF)
        mask = self.cfg_read(reg, 4)
        self.cfg_write(reg, 4, old)
        return old & ~0xF, (~(mask & ~0xF) & 0xFFFF_FFFF) + 1, old & 0xF

    def probe(self) -> None:
        """pcim_enable_device + pci_set_master + pcim_iomap_regions(BAR5)."""
        self.abar, _, _ = self.size_bar(5)
        self.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    # ABAR
    def readl(self, offset: int) -> int:
        return self.mmio.read(self.abar + offset, 4)

    def writel(self, offset: int, value: int) -> None:
        self.mmio.write(self.abar + offset, 4, value)

    def preg(self, port: int, reg: int) -> int:
        return self.readl(0x100 + 0x80 * port + reg)

    def pwrite(self, port: int, reg: int, value: int) -> None:
        self.writel(0x100 + 0x80 * port + reg, value)

    # ahci_reset_controller + ahci_init_controller
    def init_controller(self) -> None:
        self.writel(HOST_GHC, self.readl(HOST_GHC) | GHC_AE)
        cap, pi = self.readl(HOST_CAP), self.readl(HOST_PI)
        self.writel(HOST_GHC, self.readl(HOST_GHC) | GHC_HR)
        for _ in range(10):  # libahci polls for up to a second
            if not self.readl(HOST_GHC) & GHC_HR:
                break
        assert not self.readl(HOST_GHC) & GHC_HR
        self.writel(HOST_GHC, self.readl(HOST_GHC) | GHC_AE)
        self.writel(HOST_CAP, cap)  # ahci_restore_initial_config
        self.writel(HOST_PI, pi)
        for port in range(pi.bit_length()):
            self.stop_engine(port)
            self.pwrite(port, PORT_SERR, self.preg(port, PORT_SERR))
            self.pwrite(port, PORT_IS, self.preg(port, PORT_IS))
            self.writel(HOST_IS, 1 << port)
        self.writel(HOST_GHC, self.readl(HOST_GHC) | GHC_IE)

    def stop_engine(self, port: int) -> None:
        cmd = self.preg(port, PORT_CMD)
        if cmd & (PORT_CMD_ST | PORT_CMD_CR):
            self.pwrite(port, PORT_CMD, cmd & ~PORT_CMD_ST)
            assert not self.preg(port, PORT_CMD) & PORT_CMD_CR

    def start_engine(self, port: int) -> None:
        self.pwrite(port, PORT_CMD, self.preg(port, PORT_CMD) | PORT_CMD_ST)

    # ahci_port_start + ahci_thaw + ahci_hardreset
    def start_port(self, port: int) -> None:
        base = port_base(port)
        self.memory.fill(base, 0x4_0000)
        self.pwrite(port, PORT_CLBU, 0)
        self.pwrite(port, PORT_CLB, base)
        self.pwrite(port, PORT_FBU, 0)
        self.pwrite(port, PORT_FB, base + 0x400)
        self.pwrite(port, PORT_CMD, self.preg(port, PORT_CMD) | PORT_CMD_FRE)
        self.start_engine(port)
        self.pwrite(port, PORT_IS, self.preg(port, PORT_IS))
        self.writel(HOST_IS, 1 << port)
        self.pwrite(port, PORT_IE, DEF_PORT_IRQ)
        self.hardreset(port)

    def hardreset(self, port: int) -> int:
        """ahci_do_hardreset: returns the signature it classifies by."""
        self.stop_engine(port)
        d2h = self.fis_area(port) + RFIS_RFIS
        self.memory.write(d2h, bytes([FIS_TYPE_REG_D2H, 0, 0x80]) + bytes(17))  # BSY
        sctl = self.preg(port, PORT_SCTL)
        self.pwrite(port, PORT_SCTL, (sctl & 0x0F0) | 0x301)
        self.pwrite(port, PORT_SCTL, (sctl & 0x0F0) | 0x300)
        assert self.preg(port, PORT_SSTS) & 0xF == 3
        assert not self.preg(port, PORT_TFD) & 0x80  # ahci_check_ready
        self.start_engine(port)
        return self.preg(port, PORT_SIG)

    def fis_area(self, port: int) -> int:
        return self.preg(port, PORT_FB)

    # commands
    def build(
        self,
        port: int,
        slot: int,
        fis: bytes,
        prds: list[tuple[int, int]] | None = None,
        *,
        write: bool = False,
        prdtl: int | None = None,
        cfl: int = 5,
        table: int | None = None,
    ) -> None:
        """ahci_qc_prep: the command table and the slot's command header."""
        prds = prds or []
        table = command_table(port, slot) if table is None else table
        if self.memory.contains(table, 0x80):
            self.memory.write(table, fis.ljust(0x80, b"\0"))
            for i, (addr, length) in enumerate(prds):
                entry = struct.pack("<IIII", addr & 0xFFFF_FFFF, addr >> 32, 0, length - 1)
                self.memory.write(table + 0x80 + 16 * i, entry)
        n = len(prds) if prdtl is None else prdtl
        flags = cfl | (1 << 6 if write else 0) | n << 16
        header = struct.pack("<IIII", flags, 0, table & 0xFFFF_FFFF, table >> 32) + bytes(16)
        self.memory.write(port_base(port) + 32 * slot, header)

    def issue(self, port: int, slot: int, ncq: bool = False) -> None:
        """ahci_qc_issue."""
        if ncq:
            self.pwrite(port, PORT_SACT, 1 << slot)
        self.pwrite(port, PORT_CI, 1 << slot)

    def run(
        self,
        port: int,
        slot: int,
        fis: bytes,
        prds: list[tuple[int, int]] | None = None,
        *,
        write: bool = False,
    ) -> None:
        self.build(port, slot, fis, prds, write=write)
        self.issue(port, slot)

    def prdbc(self, port: int, slot: int) -> int:
        return self.memory.read_u32(port_base(port) + 32 * slot + 4)

    def d2h(self, port: int) -> bytes:
        return self.memory.read(self.fis_area(port) + RFIS_RFIS, 20)

    def ack(self, port: int) -> int:
        """ahci_single_level_irq_intr for one port: PxIS then IS; returns PxIS."""
        status = self.preg(port, PORT_IS)
        self.pwrite(port, PORT_IS, status)
        self.writel(HOST_IS, self.readl(HOST_IS))
        return status

    def recover(self, port: int) -> None:
        """What ahci_error_handler does before retrying: restart the engine."""
        self.stop_engine(port)
        self.ack(port)
        self.start_engine(port)


class Board:
    def __init__(self, memory: GuestMemory, disks: list[FileBlockBackend | None]) -> None:
        self.memory = memory
        self.pio = Bus("pio", 0x1_0000)
        self.mmio = Bus("mmio", 1 << 46)
        self.root = PciRoot(self.mmio, self.pio)
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci-root")
        self.irq = RecordingInterrupt()
        self.disks = disks
        self.ahci = Ahci(
            memory,
            disks,
            intx=self.irq,
            serials=[f"SN-{i:04d}" for i in range(len(disks))],
            interrupt_line=GSI,
        )
        self.root.add(self.ahci, SLOT)
        self.guest = LibAhci(self.pio, self.mmio, memory, SLOT)


def make_image(path: Path, sectors: int = DISK_SECTORS) -> bytes:
    """An image whose every sector is different: it starts with its own number."""
    data = bytearray(bytes(range(256)) * (2 * sectors))
    for lba in range(sectors):
        data[lba * SECTOR : lba * SECTOR + 4] = lba.to_bytes(4, "little")
    path.write_bytes(data)
    return bytes(data)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, RAM)]) as mem:
        yield mem


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk0.img"
    return path, make_image(path)


@pytest.fixture
def board(memory: GuestMemory, image: tuple[Path, bytes], tmp_path: Path) -> Iterator[Board]:
    """Port 0: the read-write image, port 1: empty, port 2: a read-only image."""
    ro_path = tmp_path / "ro.img"
    make_image(ro_path, 64)
    disks: list[FileBlockBackend | None] = [
        FileBlockBackend(image[0]),
        None,
        FileBlockBackend(ro_path, readonly=True),
    ]
    b = Board(memory, disks)
    yield b
    for d in disks:
        if d is not None:
            d.close()


@pytest.fixture
def guest(board: Board) -> LibAhci:
    """A controller libahci has initialized, with port 0 started and reset."""
    g = board.guest
    g.probe()
    g.init_controller()
    g.start_port(0)
    return g


def fill_pattern(memory: GuestMemory, addr: int, length: int, seed: int) -> bytes:
    data = bytes((seed + i * 13) & 0xFF for i in range(length))
    memory.write(addr, data)
    return data


# -- PCI identity and HBA registers -------------------------------------------------------------


def test_pci_identity_is_ich9_ahci_with_a_4k_abar_in_bar5(board: Board) -> None:
    g = board.guest
    assert g.cfg_read(PCI_VENDOR_ID, 2) == 0x8086
    assert g.cfg_read(PCI_DEVICE_ID, 2) == 0x2922
    assert g.cfg_read(PCI_REVISION_ID, 1) == 2
    assert g.cfg_read(PCI_CLASS_DEVICE, 2) == 0x0106
    assert g.cfg_read(PCI_CLASS_PROG, 1) == 0x01
    assert g.cfg_read(PCI_INTERRUPT_PIN, 1) == 1
    assert g.cfg_read(PCI_INTERRUPT_LINE, 1) == GSI
    address, size, flags = g.size_bar(5)
    assert size == AHCI_ABAR_SIZE and flags == 0 and address
    for bar in range(5):
        assert g.size_bar(bar)[1] == 1 << 32  # reads back 0: not implemented


def test_abar_answers_only_with_memory_decode(board: Board) -> None:
    g = board.guest
    g.abar = g.size_bar(5)[0]
    assert g.readl(HOST_VS) == 0xFFFF_FFFF  # not decoded yet
    g.probe()
    assert g.readl(HOST_VS) == 0x0001_0300


def test_cap_pi_vs_describe_the_hba(board: Board) -> None:
    g = board.guest
    g.probe()
    cap = g.readl(HOST_CAP)
    assert cap & 0x1F == 2  # three ports
    assert cap >> 8 & 0x1F == 31  # 32 command slots
    assert cap & CAP_SNCQ and cap & CAP_S64A and cap & CAP_SAM and cap & CAP_SCLO
    assert cap >> 20 & 0xF == 3  # Gen3
    assert g.readl(HOST_PI) == 0b111
    assert g.readl(HOST_VS) == 0x0001_0300
    assert g.readl(HOST_GHC) == GHC_AE
    g.writel(HOST_CAP, 0)
    g.writel(HOST_PI, 0)
    g.writel(HOST_GHC, 0)  # AE is read-only with CAP.SAM
    assert g.readl(HOST_CAP) == cap and g.readl(HOST_PI) == 0b111
    assert g.readl(HOST_GHC) == GHC_AE
    assert g.readl(0x24) == 0 and g.readl(0x28) == 0  # CAP2, BOHC: nothing


def test_ghc_hr_resets_the_hba_and_reads_back_clear(guest: LibAhci, board: Board) -> None:
    g = guest
    g.pwrite(0, PORT_IE, 0xFFFF_FFFF)
    g.writel(HOST_GHC, GHC_AE | GHC_IE | GHC_HR)
    assert g.readl(HOST_GHC) == GHC_AE  # HR done, IE cleared
    assert g.preg(0, PORT_IE) == 0
    assert g.preg(0, PORT_CMD) == PORT_CMD_SUD | PORT_CMD_POD  # engine and FIS rx off
    assert g.preg(0, PORT_CLB) == port_base(0)  # PxCLB/PxFB survive an HBA reset
    assert g.preg(0, PORT_SSTS) == 0x133 and g.preg(0, PORT_SIG) == SIG_ATA
    assert not board.irq.level


def test_port_link_state_for_a_disk_and_an_empty_port(board: Board) -> None:
    g = board.guest
    g.probe()
    g.init_controller()
    assert g.preg(0, PORT_SSTS) == 0x133  # DET=3, SPD=Gen3, IPM=active
    assert g.preg(0, PORT_SIG) == SIG_ATA
    assert g.preg(0, PORT_TFD) == 0x150  # DRDY|DSC, error 01h after reset
    assert g.preg(1, PORT_SSTS) == 0
    assert g.preg(1, PORT_SIG) == 0xFFFF_FFFF
    assert g.preg(1, PORT_TFD) == 0x7F
    assert g.readl(0x100 + 0x80 * 3) == 0  # no port 3


def test_cmd_fr_and_cr_mirror_fre_and_st(board: Board) -> None:
    g = board.guest
    g.probe()
    g.init_controller()
    g.pwrite(0, PORT_CLB, 0x12345)
    assert g.preg(0, PORT_CLB) == 0x12000  # 1 KiB aligned
    g.pwrite(0, PORT_FB, 0x123FF)
    assert g.preg(0, PORT_FB) == 0x12300  # 256-byte aligned
    g.pwrite(0, PORT_CMD, PORT_CMD_FRE)
    assert g.preg(0, PORT_CMD) & (PORT_CMD_FRE | PORT_CMD_FR) == PORT_CMD_FRE | PORT_CMD_FR
    g.pwrite(0, PORT_CMD, PORT_CMD_FRE | PORT_CMD_ST)
    cmd = g.preg(0, PORT_CMD)
    assert cmd & PORT_CMD_CR and cmd & PORT_CMD_ST and cmd & PORT_CMD_SUD and cmd & PORT_CMD_POD
    g.pwrite(0, PORT_CMD, 0)
    assert g.preg(0, PORT_CMD) & (PORT_CMD_CR | PORT_CMD_FR | PORT_CMD_ST | PORT_CMD_FRE) == 0


def test_comreset_goes_through_busy_and_posts_the_signature(board: Board) -> None:
    g = board.guest
    g.probe()
    g.init_controller()
    g.start_port(0)
    g.stop_engine(0)
    d2h = g.fis_area(0) + RFIS_RFIS
    g.memory.write(d2h, bytes([FIS_TYPE_REG_D2H, 0, 0x80]) + bytes(17))
    g.pwrite(0, PORT_SCTL, 0x301)
    assert g.preg(0, PORT_SSTS) & 0xF == 0
    assert g.preg(0, PORT_TFD) & 0x80  # BSY while the link is in reset
    assert g.preg(0, PORT_SIG) == 0xFFFF_FFFF
    g.pwrite(0, PORT_SCTL, 0x300)
    assert g.preg(0, PORT_SSTS) == 0x133
    assert g.preg(0, PORT_SIG) == SIG_ATA
    assert g.preg(0, PORT_TFD) == 0x150
    fis = g.memory.read(d2h, 20)
    assert fis[0] == FIS_TYPE_REG_D2H and fis[2] == 0x50 and fis[3] == 0x01
    assert (fis[4], fis[12]) == (1, 1)  # the ATA signature in LBA low / count
    assert g.preg(0, PORT_IS) == 0  # the signature FIS has no I bit
    assert g.preg(0, PORT_SCTL) == 0x300


def test_sctl_det_4_takes_the_phy_offline(guest: LibAhci) -> None:
    guest.stop_engine(0)
    guest.pwrite(0, PORT_SCTL, 0x304)
    assert guest.preg(0, PORT_SSTS) == 4
    guest.pwrite(0, PORT_SCTL, 0x300)
    assert guest.preg(0, PORT_SSTS) == 0x133


def test_hardreset_of_an_empty_port_finds_no_link(guest: LibAhci) -> None:
    guest.pwrite(1, PORT_SCTL, 0x301)
    guest.pwrite(1, PORT_SCTL, 0x300)
    assert guest.preg(1, PORT_SSTS) == 0
    assert guest.preg(1, PORT_TFD) == 0x7F


# -- IDENTIFY -------------------------------------------------------------------------------------


def identify(g: LibAhci, port: int = 0) -> list[int]:
    g.run(port, 0, h2d(ATA_CMD_IDENTIFY_DEVICE, device=0), [(DATA, 256), (DATA + 0x1000, 256)])
    raw = g.memory.read(DATA, 256) + g.memory.read(DATA + 0x1000, 256)
    return list(struct.unpack("<256H", raw))


def words_string(words: list[int], first: int, length: int) -> str:
    raw = b"".join(w.to_bytes(2, "big") for w in words[first : first + length // 2])
    return raw.decode("ascii").rstrip()


def test_identify_reports_model_serial_size_and_features(guest: LibAhci, board: Board) -> None:
    w = identify(guest)
    assert words_string(w, 27, 40) == "iovirt SATA disk"
    assert words_string(w, 10, 20) == "SN-0000"
    assert words_string(w, 23, 8) == "1.0"
    assert w[0] & 0x8000 == 0  # ATA device
    assert w[49] & 0x0300 == 0x0300  # LBA and DMA
    assert w[60] | w[61] << 16 == DISK_SECTORS
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == DISK_SECTORS
    assert w[75] == 31  # queue depth 32
    assert w[76] & 0x0100  # NCQ
    assert w[83] & 0xC000 == 0x4000 and w[83] & 1 << 10 and w[83] & 1 << 13  # LBA48, FLUSH EXT
    assert w[86] & 1 << 10 and w[86] & 1 << 13
    assert w[82] & 1 << 5 and w[85] & 1 << 5  # write cache supported and enabled
    assert w[87] & 0xC000 == 0x4000 and w[87] & 1 << 6  # FUA
    assert w[80] & 1 << 8  # ATA8-ACS
    assert w[88] & 0x7F == 0x7F
    assert w[255] & 0xFF == 0xA5
    raw = struct.pack("<256H", *w)
    assert sum(raw) % 256 == 0


def test_identify_completes_with_a_pio_setup_fis_and_interrupt(
    guest: LibAhci, board: Board
) -> None:
    identify(guest)
    g = guest
    assert g.preg(0, PORT_CI) == 0
    assert g.prdbc(0, 0) == 512
    pio = g.memory.read(g.fis_area(0) + RFIS_PSFIS, 20)
    assert pio[0] == FIS_TYPE_PIO_SETUP
    assert pio[1] & 0x40 and pio[1] & 0x20  # I bit, device-to-host
    assert pio[15] == 0x50  # E_Status: what libahci's qc_fill_rtf reads
    assert g.preg(0, PORT_IS) & PORT_IRQ_PSS
    assert g.readl(HOST_IS) == 1
    assert board.irq.level
    assert g.ack(0) & PORT_IRQ_PSS
    assert not board.irq.level
    assert g.preg(0, PORT_TFD) & 0xFF == 0x50


def test_identify_of_a_big_disk_caps_the_lba28_count(tmp_path: Path, memory: GuestMemory) -> None:
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(200 << 30)  # sparse: 200 GiB is past the 128 GiB of LBA28
    backend = FileBlockBackend(path)
    try:
        b = Board(memory, [backend])
        g = b.guest
        g.probe()
        g.init_controller()
        g.start_port(0)
        w = identify(g)
        assert w[60] | w[61] << 16 == 0x0FFF_FFFF
        assert w[100] | w[101] << 16 | w[102] << 32 == (200 << 30) // 512
    finally:
        backend.close()


def test_ata_string_swaps_each_pair() -> None:
    assert ata_string("ABC", 4) == b"BA C"


def test_constructor_validates_ports_and_strings(memory: GuestMemory) -> None:
    with pytest.raises(ValueError):
        Ahci(memory, [])
    with pytest.raises(ValueError):
        Ahci(memory, [None] * 7)
    with pytest.raises(ValueError):
        Ahci(memory, [None, None], serials=["a"])
    ahci = Ahci(memory, [None])  # empty ports never look at their strings
    assert ahci.ports[0].disk is None


def test_constructor_rejects_a_serial_that_does_not_fit(
    memory: GuestMemory, image: tuple[Path, bytes]
) -> None:
    backend = FileBlockBackend(image[0])
    try:
        with pytest.raises(ValueError):
            Ahci(memory, [backend], serials=["x" * 21])
        with pytest.raises(ValueError):
            Ahci(memory, [backend], model="caf\u00e9")
    finally:
        backend.close()


# -- DMA reads and writes -------------------------------------------------------------------------


def test_read_dma_ext_scatters_into_a_multi_entry_prdt(
    guest: LibAhci, image: tuple[Path, bytes], board: Board
) -> None:
    _, data = image
    prds = [(DATA, 1024), (DATA + 0x10000, 512), (DATA + 0x20000, 2560)]  # 8 sectors
    guest.memory.fill(DATA + 0x20000 + 2560, 16, 0xEE)  # guard after the last buffer
    guest.run(0, 3, h2d(ATA_CMD_READ_DMA_EXT, lba=100, count=8), prds)
    want = data[100 * SECTOR : 108 * SECTOR]
    got = b"".join(guest.memory.read(a, n) for a, n in prds)
    assert got == want
    assert guest.memory.read(DATA + 0x20000 + 2560, 16) == b"\xee" * 16
    assert guest.preg(0, PORT_CI) == 0
    assert guest.prdbc(0, 3) == 8 * SECTOR
    fis = guest.d2h(0)
    assert fis[0] == FIS_TYPE_REG_D2H and fis[1] & 0x40 and fis[2] == 0x50 and fis[3] == 0
    assert guest.preg(0, PORT_IS) & PORT_IRQ_DHRS
    assert board.irq.level


def test_write_dma_ext_gathers_from_a_multi_entry_prdt(
    guest: LibAhci, image: tuple[Path, bytes]
) -> None:
    path, data = image
    parts = [
        fill_pattern(guest.memory, DATA, 512, 1),
        fill_pattern(guest.memory, DATA + 0x8000, 1536, 2),
        fill_pattern(guest.memory, DATA + 0x3000, 1024, 3),
    ]
    prds = [(DATA, 512), (DATA + 0x8000, 1536), (DATA + 0x3000, 1024)]
    guest.run(0, 0, h2d(ATA_CMD_WRITE_DMA_EXT, lba=2000, count=6), prds, write=True)
    assert guest.preg(0, PORT_CI) == 0
    assert guest.preg(0, PORT_TFD) == 0x50
    disk = path.read_bytes()
    assert disk[2000 * SECTOR : 2006 * SECTOR] == b"".join(parts)
    assert disk[: 2000 * SECTOR] == data[: 2000 * SECTOR]
    assert disk[2006 * SECTOR :] == data[2006 * SECTOR :]


def test_lba28_read_and_write_dma_with_count_0_meaning_256(
    guest: LibAhci, image: tuple[Path, bytes]
) -> None:
    path, data = image
    guest.run(0, 1, h2d(ATA_CMD_READ_DMA, lba=0x100, count=0), [(DATA, 256 * SECTOR)])
    assert guest.memory.read(DATA, 256 * SECTOR) == data[0x100 * SECTOR : 0x200 * SECTOR]
    new = fill_pattern(guest.memory, DATA, 4 * SECTOR, 9)
    guest.run(0, 2, h2d(ATA_CMD_WRITE_DMA, lba=8, count=4), [(DATA, 4 * SECTOR)], write=True)
    assert path.read_bytes()[8 * SECTOR : 12 * SECTOR] == new


def test_pio_read_sectors_moves_data_through_the_prdt(
    guest: LibAhci, image: tuple[Path, bytes]
) -> None:
    _, data = image
    guest.run(0, 0, h2d(ATA_CMD_READ_SECTORS, lba=5, count=2), [(DATA, 1024)])
    assert guest.memory.read(DATA, 1024) == data[5 * SECTOR : 7 * SECTOR]
    assert guest.preg(0, PORT_IS) & PORT_IRQ_PSS


def test_prdt_longer_than_the_transfer_is_used_only_as_far_as_needed(
    guest: LibAhci, image: tuple[Path, bytes]
) -> None:
    _, data = image
    guest.memory.fill(DATA, 0x3000, 0xAB)
    guest.run(
        0, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=1, count=1), [(DATA, 0x1000), (DATA + 0x2000, 512)]
    )
    assert guest.memory.read(DATA, 512) == data[512:1024]
    assert guest.memory.read(DATA + 512, 0x1000 - 512) == b"\xab" * (0x1000 - 512)
    assert guest.memory.read(DATA + 0x2000, 512) == b"\xab" * 512
    assert guest.prdbc(0, 0) == 512


def test_many_small_prd_entries_cross_the_iov_max_batches(
    guest: LibAhci, image: tuple[Path, bytes], memory: GuestMemory
) -> None:
    _, data = image
    n = 1100  # more iovecs than one preadv takes
    table = 0x80_0000
    prds = [(DATA + i * 1024, 512) for i in range(n)]
    guest.build(0, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=0, count=n), prds, table=table)
    guest.issue(0, 0)
    assert guest.preg(0, PORT_CI) == 0 and guest.preg(0, PORT_TFD) == 0x50
    got = b"".join(memory.read(a, n) for a, n in prds)
    assert got == data[: n * SECTOR]


# -- NCQ ------------------------------------------------------------------------------------------


def test_ncq_reads_and_writes_with_several_tags_in_flight(
    guest: LibAhci, image: tuple[Path, bytes], board: Board
) -> None:
    path, data = image
    g = guest
    writes = {
        1: fill_pattern(g.memory, DATA + 0x10000, 2 * SECTOR, 11),
        5: fill_pattern(g.memory, DATA + 0x20000, 3 * SECTOR, 12),
    }
    g.build(0, 0, fpdma(ATA_CMD_READ_FPDMA_QUEUED, 0, 10, 4), [(DATA, 4 * SECTOR)])
    g.build(
        0, 1, fpdma(ATA_CMD_WRITE_FPDMA_QUEUED, 1, 300, 2), [(DATA + 0x10000, 1024)], write=True
    )
    scattered = [(DATA + 0x20000, 1024), (DATA + 0x30000, 512)]
    g.build(0, 5, fpdma(ATA_CMD_WRITE_FPDMA_QUEUED, 5, 400, 3, fua=True), scattered, write=True)
    g.memory.write(DATA + 0x30000, writes[5][1024:])
    g.build(0, 31, fpdma(ATA_CMD_READ_FPDMA_QUEUED, 31, 2047, 1), [(DATA + 0x40000, 512)])
    tags = 1 << 0 | 1 << 1 | 1 << 5 | 1 << 31
    g.pwrite(0, PORT_SACT, tags)
    assert g.preg(0, PORT_SACT) == tags
    g.pwrite(0, PORT_CI, tags)
    assert g.preg(0, PORT_CI) == 0 and g.preg(0, PORT_SACT) == 0
    assert g.memory.read(DATA, 4 * SECTOR) == data[10 * SECTOR : 14 * SECTOR]
    assert g.memory.read(DATA + 0x40000, 512) == data[2047 * SECTOR :]
    disk = path.read_bytes()
    assert disk[300 * SECTOR : 302 * SECTOR] == writes[1]
    assert disk[400 * SECTOR : 403 * SECTOR] == writes[5]
    sdb = g.memory.read(g.fis_area(0) + RFIS_SDBFIS, 8)
    assert sdb[0] == FIS_TYPE_SDB and sdb[1] & 0x40
    assert sdb[2] & 0x01 == 0 and sdb[2] & 0x40  # DRDY, no ERR
    assert struct.unpack_from("<I", sdb, 4)[0] == tags
    status = g.preg(0, PORT_IS)
    assert status & PORT_IRQ_SDBS and not status & (PORT_IRQ_DHRS | PORT_IRQ_TFES)
    assert board.irq.level


def test_ncq_commands_issued_one_at_a_time_like_libahci(
    guest: LibAhci, image: tuple[Path, bytes]
) -> None:
    _, data = image
    for tag in range(8):
        guest.build(
            0, tag, fpdma(ATA_CMD_READ_FPDMA_QUEUED, tag, tag * 8, 1), [(DATA + tag * 512, 512)]
        )
        guest.issue(0, tag, ncq=True)
        assert guest.preg(0, PORT_SACT) == 0
        assert guest.ack(0) & PORT_IRQ_SDBS
    assert guest.memory.read(DATA, 8 * 512) == b"".join(
        data[t * 8 * SECTOR : (t * 8 + 1) * SECTOR] for t in range(8)
    )


# -- non-data commands ----------------------------------------------------------------------------


def test_flush_cache_syncs_the_image(
    guest: LibAhci, board: Board, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    guest.run(0, 0, h2d(ATA_CMD_FLUSH_CACHE_EXT))
    guest.run(0, 1, h2d(ATA_CMD_FLUSH_CACHE))
    disk = board.disks[0]
    assert disk is not None
    assert synced == [disk.fd, disk.fd]
    assert guest.preg(0, PORT_CI) == 0 and guest.preg(0, PORT_TFD) == 0x50
    assert guest.d2h(0)[2] == 0x50


def test_fua_writes_and_write_cache_off_sync_each_write(
    guest: LibAhci, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    fill_pattern(guest.memory, DATA, 512, 4)
    guest.run(0, 0, h2d(ATA_CMD_WRITE_DMA_EXT, lba=1, count=1), [(DATA, 512)], write=True)
    assert synced == []  # write-back cache on: no sync
    guest.run(0, 0, h2d(ATA_CMD_WRITE_DMA_FUA_EXT, lba=1, count=1), [(DATA, 512)], write=True)
    assert len(synced) == 1
    guest.run(0, 0, h2d(ATA_CMD_SET_FEATURES, features=SETFEATURES_WC_OFF))
    assert len(synced) == 2  # the cache is flushed as it is turned off
    guest.run(0, 0, h2d(ATA_CMD_WRITE_DMA_EXT, lba=1, count=1), [(DATA, 512)], write=True)
    assert len(synced) == 3
    w = identify(guest)
    assert not w[85] & 1 << 5


def test_write_cache_setting_survives_a_comreset(guest: LibAhci) -> None:
    guest.run(0, 0, h2d(ATA_CMD_SET_FEATURES, features=SETFEATURES_WC_OFF))
    assert guest.hardreset(0) == SIG_ATA
    assert not identify(guest)[85] & 1 << 5


def test_set_features_transfer_mode_shows_in_identify(guest: LibAhci) -> None:
    guest.run(0, 0, h2d(ATA_CMD_SET_FEATURES, features=SETFEATURES_XFER, count=0x46))
    assert guest.preg(0, PORT_TFD) == 0x50
    w = identify(guest)
    assert w[88] >> 8 == 1 << 6  # UDMA/133 selected
    guest.run(0, 0, h2d(ATA_CMD_SET_FEATURES, features=SETFEATURES_XFER, count=0x7F))
    assert guest.preg(0, PORT_TFD) == ATA_ERROR_ABRT << 8 | 0x51


def test_read_native_max_and_check_power_mode(guest: LibAhci) -> None:
    guest.run(0, 0, h2d(ATA_CMD_READ_NATIVE_MAX_EXT))
    fis = guest.d2h(0)
    assert int.from_bytes(fis[4:7] + fis[8:11], "little") == DISK_SECTORS - 1
    guest.run(0, 0, h2d(ATA_CMD_CHECK_POWER_MODE))
    assert guest.d2h(0)[12] == 0xFF


def test_softreset_through_device_control_fises(guest: LibAhci) -> None:
    """ahci_do_softreset: SRST set, then cleared; the device answers with its signature."""
    g = guest
    g.run(0, 0, h2d(0, control=0x04, c=False))
    assert g.preg(0, PORT_CI) == 0
    assert g.preg(0, PORT_TFD) & 0x80  # BSY while in reset
    g.pwrite(0, PORT_CMD, g.preg(0, PORT_CMD) | PORT_CMD_CLO)  # what ahci_kick_engine does
    assert not g.preg(0, PORT_TFD) & 0x80
    assert not g.preg(0, PORT_CMD) & PORT_CMD_CLO
    g.run(0, 1, h2d(0, control=0, c=False))
    assert g.preg(0, PORT_CI) == 0
    assert g.preg(0, PORT_TFD) == 0x150
    assert g.preg(0, PORT_SIG) == SIG_ATA
    assert g.d2h(0)[:3] == bytes([FIS_TYPE_REG_D2H, 0, 0x50])


# -- errors ---------------------------------------------------------------------------------------


def assert_task_file_error(g: LibAhci, slot: int, error: int) -> None:
    assert g.preg(0, PORT_IS) & PORT_IRQ_TFES
    assert g.preg(0, PORT_TFD) == error << 8 | 0x51
    fis = g.d2h(0)
    assert fis[0] == FIS_TYPE_REG_D2H and fis[2] == 0x51 and fis[3] == error
    assert g.preg(0, PORT_CI) == 1 << slot  # the failed command stays issued


def test_unknown_command_aborts_and_stops_the_port_until_st_cycles(
    guest: LibAhci, image: tuple[Path, bytes], board: Board
) -> None:
    g = guest
    g.run(0, 2, h2d(0x00))  # NOP always aborts
    assert_task_file_error(g, 2, ATA_ERROR_ABRT)
    assert board.irq.level
    # The port stays halted: a new command is not run.
    g.build(0, 3, h2d(ATA_CMD_READ_DMA_EXT, lba=0, count=1), [(DATA, 512)])
    g.issue(0, 3)
    assert g.preg(0, PORT_CI) == 1 << 2 | 1 << 3
    g.recover(0)
    assert g.preg(0, PORT_CI) == 0 and g.preg(0, PORT_SACT) == 0
    assert not board.irq.level
    g.run(0, 3, h2d(ATA_CMD_READ_DMA_EXT, lba=0, count=1), [(DATA, 512)])
    assert g.preg(0, PORT_CI) == 0 and g.memory.read(DATA, 512) == image[1][:512]


def test_read_only_disk_refuses_writes_with_a_task_file_error(board: Board) -> None:
    g = board.guest
    g.probe()
    g.init_controller()
    g.start_port(2)
    ro = board.disks[2]
    assert ro is not None
    before = os.pread(ro.fd, 64 * SECTOR, 0)
    fill_pattern(g.memory, DATA, 512, 5)
    g.run(2, 0, h2d(ATA_CMD_WRITE_DMA_EXT, lba=0, count=1), [(DATA, 512)], write=True)
    assert g.preg(2, PORT_IS) & PORT_IRQ_TFES
    assert g.preg(2, PORT_TFD) == ATA_ERROR_ABRT << 8 | 0x51
    assert g.preg(2, PORT_CI) == 1
    assert os.pread(ro.fd, 64 * SECTOR, 0) == before
    g.stop_engine(2)
    g.start_engine(2)
    g.run(2, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=0, count=1), [(DATA, 512)])
    assert g.preg(2, PORT_CI) == 0 and g.memory.read(DATA, 512) == before[:512]


def test_out_of_range_lba_fails_with_idnf(guest: LibAhci) -> None:
    guest.run(0, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=DISK_SECTORS - 1, count=2), [(DATA, 1024)])
    assert_task_file_error(guest, 0, ATA_ERROR_IDNF)
    guest.recover(0)
    guest.run(0, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=1 << 47, count=1), [(DATA, 512)])
    assert_task_file_error(guest, 0, ATA_ERROR_IDNF)


def test_ncq_error_reports_through_sdb_and_the_ncq_error_log(
    guest: LibAhci, image: tuple[Path, bytes], board: Board
) -> None:
    g = guest
    g.build(0, 0, fpdma(ATA_CMD_READ_FPDMA_QUEUED, 0, 0, 1), [(DATA, 512)])
    g.build(0, 4, fpdma(ATA_CMD_READ_FPDMA_QUEUED, 4, DISK_SECTORS, 8), [(DATA, 4096)])
    g.build(0, 6, fpdma(ATA_CMD_READ_FPDMA_QUEUED, 6, 0, 1), [(DATA + 0x1000, 512)])
    tags = 1 | 1 << 4 | 1 << 6
    g.pwrite(0, PORT_SACT, tags)
    g.pwrite(0, PORT_CI, tags)
    assert g.preg(0, PORT_IS) & PORT_IRQ_TFES
    assert g.preg(0, PORT_TFD) & 0xFF == 0x51 and g.preg(0, PORT_TFD) >> 8 == ATA_ERROR_IDNF
    assert g.preg(0, PORT_SACT) == 1 << 4 | 1 << 6  # tag 0 done, 4 failed, 6 never ran
    assert g.preg(0, PORT_CI) == 1 << 6
    sdb = g.memory.read(g.fis_area(0) + RFIS_SDBFIS, 8)
    assert sdb[0] == FIS_TYPE_SDB and sdb[2] & 0x01 and sdb[3] == ATA_ERROR_IDNF
    assert struct.unpack_from("<I", sdb, 4)[0] == 1  # only tag 0 completed
    assert board.irq.level
    # libata's EH: restart the engine, read log page 10h (READ LOG DMA EXT, as word 119 says).
    g.recover(0)
    g.memory.fill(DATA, 512, 0xFF)
    g.run(0, 0, h2d(ATA_CMD_READ_LOG_DMA_EXT, lba=0x10, count=1), [(DATA, 512)])
    log = g.memory.read(DATA, 512)
    assert g.preg(0, PORT_CI) == 0
    assert log[0] == 4  # NQ clear, tag 4
    assert log[2] == 0x51 and log[3] == ATA_ERROR_IDNF
    assert int.from_bytes(log[4:7] + log[8:11], "little") == DISK_SECTORS
    assert sum(log) % 256 == 0
    # Reading it cleared the error condition.
    g.run(0, 0, h2d(ATA_CMD_READ_LOG_EXT, lba=0x10, count=1), [(DATA, 512)])
    assert g.memory.read(DATA, 1)[0] & 0x80


def test_log_directory_lists_only_the_ncq_error_log(guest: LibAhci) -> None:
    guest.run(0, 0, h2d(ATA_CMD_READ_LOG_EXT, lba=0, count=1), [(DATA, 512)])
    directory = struct.unpack("<256H", guest.memory.read(DATA, 512))
    assert directory[0] == 1
    assert [i for i in range(1, 256) if directory[i]] == [0x10]
    guest.run(0, 1, h2d(ATA_CMD_READ_LOG_EXT, lba=0x30, count=1), [(DATA, 512)])
    assert_task_file_error(guest, 1, ATA_ERROR_ABRT)


def test_command_to_an_empty_port_fails(guest: LibAhci, board: Board) -> None:
    g = guest
    base = port_base(1)
    g.pwrite(1, PORT_CLB, base)
    g.pwrite(1, PORT_FB, base + 0x400)
    g.pwrite(1, PORT_CMD, PORT_CMD_FRE | PORT_CMD_ST)
    g.run(1, 0, h2d(ATA_CMD_IDENTIFY_DEVICE), [(DATA, 512)])
    assert g.preg(1, PORT_IS) & PORT_IRQ_TFES
    assert g.preg(1, PORT_CI) == 1


def test_image_shrunk_under_the_guest_fails_the_read(
    guest: LibAhci, image: tuple[Path, bytes]
) -> None:
    os.truncate(image[0], 100 * SECTOR)
    guest.run(0, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=200, count=1), [(DATA, 512)])
    assert_task_file_error(guest, 0, ATA_ERROR_ABRT)


# -- interrupts -----------------------------------------------------------------------------------


def test_port_ie_masks_and_ghc_ie_gates_the_line(guest: LibAhci, board: Board) -> None:
    g = guest
    g.pwrite(0, PORT_IE, 0)
    g.run(0, 0, h2d(ATA_CMD_FLUSH_CACHE_EXT))
    assert g.preg(0, PORT_IS) & PORT_IRQ_DHRS  # status is recorded...
    assert g.readl(HOST_IS) == 0 and not board.irq.level  # ...but not signalled
    g.pwrite(0, PORT_IE, PORT_IRQ_DHRS)  # enabling a pending bit raises it
    assert g.readl(HOST_IS) == 1 and board.irq.level
    g.writel(HOST_GHC, GHC_AE)  # GHC.IE off: the line drops, IS stays
    assert not board.irq.level and g.readl(HOST_IS) == 1
    g.writel(HOST_GHC, GHC_AE | GHC_IE)
    assert board.irq.level


def test_is_cannot_be_cleared_while_the_port_is_pending(guest: LibAhci, board: Board) -> None:
    g = guest
    g.run(0, 0, h2d(ATA_CMD_FLUSH_CACHE_EXT))
    assert board.irq.level
    g.writel(HOST_IS, 1)  # PxIS still has DHRS: IS.IPS[0] is set again
    assert g.readl(HOST_IS) == 1 and board.irq.level
    g.pwrite(0, PORT_IS, PORT_IRQ_DHRS)  # W1C of PxIS alone leaves IS latched
    assert g.preg(0, PORT_IS) == 0
    assert g.readl(HOST_IS) == 1 and board.irq.level
    g.writel(HOST_IS, 1)
    assert g.readl(HOST_IS) == 0 and not board.irq.level
    assert board.irq.transitions == [True, False]


def test_pxis_write_one_clears_only_the_bits_written(guest: LibAhci) -> None:
    g = guest
    g.run(0, 0, h2d(0x00))  # an error: TFES and DHRS
    assert g.preg(0, PORT_IS) == PORT_IRQ_TFES | PORT_IRQ_DHRS
    g.pwrite(0, PORT_IS, PORT_IRQ_DHRS)
    assert g.preg(0, PORT_IS) == PORT_IRQ_TFES
    g.pwrite(0, PORT_IS, 0)
    assert g.preg(0, PORT_IS) == PORT_IRQ_TFES


def test_pci_intx_disable_gates_the_line(guest: LibAhci, board: Board) -> None:
    g = guest
    g.run(0, 0, h2d(ATA_CMD_FLUSH_CACHE_EXT))
    assert board.irq.level
    g.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
    assert not board.irq.level
    g.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    assert board.irq.level


# -- hostile guests -------------------------------------------------------------------------------


def check_port_still_works(g: LibAhci, data: bytes) -> None:
    g.recover(0)
    g.run(0, 7, h2d(ATA_CMD_READ_DMA_EXT, lba=3, count=1), [(DATA + 0x5000, 512)])
    assert g.preg(0, PORT_CI) == 0
    assert g.memory.read(DATA + 0x5000, 512) == data[3 * SECTOR : 4 * SECTOR]


@pytest.mark.parametrize(
    "case",
    [
        "prd-outside-ram",
        "prd-straddles-ram-end",
        "table-outside-ram",
        "list-outside-ram",
        "huge-prdtl-off-the-end",
        "zero-prdtl",
        "prdt-short",
        "cfl-zero",
        "not-an-h2d-fis",
    ],
)
def test_hostile_commands_fail_cleanly_and_the_port_recovers(
    guest: LibAhci, image: tuple[Path, bytes], board: Board, case: str
) -> None:
    g = guest
    read = h2d(ATA_CMD_READ_DMA_EXT, lba=0, count=4)
    if case == "prd-outside-ram":
        g.build(0, 0, read, [(1 << 40, 2048)])
    elif case == "prd-straddles-ram-end":
        g.build(0, 0, read, [(RAM - 1024, 2048)])
    elif case == "table-outside-ram":
        g.build(0, 0, read, [(DATA, 2048)], table=0xF000_0000)
    elif case == "list-outside-ram":
        g.pwrite(0, PORT_CMD, PORT_CMD_FRE)
        g.pwrite(0, PORT_CLBU, 0x10)  # 64 GiB up: nothing there
        g.pwrite(0, PORT_CMD, PORT_CMD_FRE | PORT_CMD_ST)
    elif case == "huge-prdtl-off-the-end":
        # 65535 two-byte entries claimed, the table runs past the end of RAM.
        g.build(0, 0, read, [(DATA, 2)] * 8, prdtl=0xFFFF, table=RAM - 0x1000)
    elif case == "zero-prdtl":
        g.build(0, 0, read, [])
    elif case == "prdt-short":
        g.build(0, 0, read, [(DATA, 1024), (DATA + 0x1000, 512)])
    elif case == "cfl-zero":
        g.build(0, 0, read, [(DATA, 2048)], cfl=0)
    elif case == "not-an-h2d-fis":
        g.build(0, 0, b"\x34" + read[1:], [(DATA, 2048)])
    g.issue(0, 0)
    assert g.preg(0, PORT_IS) & PORT_IRQ_TFES
    assert g.preg(0, PORT_TFD) == ATA_ERROR_ABRT << 8 | 0x51
    assert board.irq.level
    assert board.ahci.command_errors.count == 1
    if case == "list-outside-ram":
        g.stop_engine(0)
        g.pwrite(0, PORT_CLBU, 0)
    check_port_still_works(g, image[1])


def test_huge_prdtl_of_tiny_entries_is_bounded_by_the_transfer(
    guest: LibAhci, image: tuple[Path, bytes]
) -> None:
    table = 0x80_0000
    prds = [(DATA + 2 * i, 2) for i in range(2048)]  # 4 KiB in 2-byte pieces
    guest.build(0, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=0, count=1), prds, prdtl=0xFFFF, table=table)
    start = time.monotonic()
    guest.issue(0, 0)
    assert time.monotonic() - start < 1.0
    assert guest.preg(0, PORT_CI) == 0
    assert guest.memory.read(DATA, 512) == image[1][:512]
    assert guest.prdbc(0, 0) == 512


def test_fis_area_outside_ram_still_completes_the_command(guest: LibAhci, board: Board) -> None:
    g = guest
    g.pwrite(0, PORT_FBU, 0x10)
    g.run(0, 0, h2d(ATA_CMD_FLUSH_CACHE_EXT))
    assert g.preg(0, PORT_CI) == 0
    assert g.preg(0, PORT_TFD) == 0x50
    assert board.ahci.command_errors.count == 1


def test_ci_and_sact_writes_with_the_engine_stopped_are_ignored(guest: LibAhci) -> None:
    guest.stop_engine(0)
    guest.build(0, 0, h2d(ATA_CMD_FLUSH_CACHE_EXT))
    guest.pwrite(0, PORT_SACT, 1)
    guest.pwrite(0, PORT_CI, 1)
    assert guest.preg(0, PORT_CI) == 0 and guest.preg(0, PORT_SACT) == 0


def test_every_offset_and_size_is_safe_to_read_and_write(guest: LibAhci, board: Board) -> None:
    mmio, base = board.mmio, guest.abar
    for offset in range(0, AHCI_ABAR_SIZE, 4):
        for size in (1, 2, 4):
            mmio.read(base + offset + 4 - size, size)
    assert mmio.read(base + HOST_CAP, 8) >> 32 == guest.readl(HOST_GHC)
    assert mmio.read(base + HOST_VS + 1, 2) == 0x0103
    for size in (1, 2):
        mmio.write(base + HOST_GHC, size, 0xFF)  # sub-dword writes are dropped
    assert guest.readl(HOST_GHC) == GHC_AE | GHC_IE
    assert board.ahci.bad_accesses.count == 2
    # Whole-dword garbage everywhere but GHC (whose HR would just reset) must not raise.
    for offset in range(0x100, AHCI_ABAR_SIZE, 4):
        mmio.write(base + offset, 4, 0xFFFF_FFFF)
    mmio.write(base + 0x100 + PORT_CLB, 8, 0x1_0000_0400)  # an 8-byte write: CLB and CLBU
    assert guest.preg(0, PORT_CLB) == 0x400 and guest.preg(0, PORT_CLBU) == 1


def test_direct_backend_with_unaligned_buffers_uses_a_bounce_buffer(
    tmp_path: Path, memory: GuestMemory
) -> None:
    path = tmp_path / "direct.img"
    data = make_image(path, 64)
    try:
        backend = FileBlockBackend(path, direct=True)
    except Exception:
        pytest.skip("O_DIRECT is not supported on this filesystem")
    try:
        b = Board(memory, [backend])
        g = b.guest
        g.probe()
        g.init_controller()
        g.start_port(0)
        g.run(
            0, 0, h2d(ATA_CMD_READ_DMA_EXT, lba=2, count=2), [(DATA + 6, 700), (DATA + 0x900, 324)]
        )
        assert memory.read(DATA + 6, 700) + memory.read(DATA + 0x900, 324) == data[1024:2048]
        new = fill_pattern(memory, DATA + 2, 512, 6)
        g.run(0, 0, h2d(ATA_CMD_WRITE_DMA_EXT, lba=9, count=1), [(DATA + 2, 512)], write=True)
        assert g.preg(0, PORT_CI) == 0
        # (The test reads the image through the page cache: its own buffer is unaligned.)
        assert path.read_bytes()[9 * SECTOR : 10 * SECTOR] == new
    finally:
        backend.close()
