"""AHCI 1.3.1 host bus adapter with SATA disks, as the PCI function Linux's ``ahci`` binds.

The function identifies as Intel's ICH9 AHCI controller (8086:2922, class 01:06:01), which
Linux's ``ahci`` driver matches as a plain ``board_ahci``. Its registers live in ABAR (BAR5,
4 KiB of 32-bit MMIO): the generic host control block at 0x00-0xFF, then 0x80 bytes per port
from 0x100. Each port either holds a :class:`~iovirt.backends.block.BlockBackend` shown to
the guest as an ATA disk (ACS: LBA48, NCQ with 32 tags, write cache, FUA) or is empty.

Commands run synchronously on the vCPU thread that writes PxCI: the HBA fetches the command
header from the command list (PxCLB), the Register H2D FIS and the PRDT from the command
table, does ``preadv``/``pwritev`` between the backend fd and views of guest RAM, posts the
answer FIS into the FIS receive area (PxFB) and raises the port's interrupt. Nothing is ever
"in flight" when the write returns, so there are no worker threads and no completion queue.

How the model answers where the specification leaves room:

* CAP.SAM is set (AHCI only), so GHC.AE is read-only 1. CAP.SSS and CAP.CPD are clear, so
  PxCMD.SUD and PxCMD.POD read as 1. No port multipliers, FIS-based switching, enclosure
  management, command completion coalescing, link power management or BIOS handoff.
* IS.IPS[x] is set when PxIS & PxIE becomes non-zero for port x and stays set until the
  guest writes 1 to it; a write-1 cannot clear it while the port still has an enabled
  status bit pending (the order libahci's handler relies on: PxIS first, then IS). INTx is
  asserted while GHC.IE is set and IS is non-zero. There is no MSI capability: Linux falls
  back to INTx.
* A non-queued command that fails (unknown command, bad LBA, read-only disk, a guest
  address outside RAM, a PRDT that holds fewer bytes than the transfer) completes with a
  Register D2H FIS carrying ERR and the ATA error bits (ABRT, IDNF), PxTFD updated and
  PxIS.TFES set; its PxCI bit stays set and the port stops processing commands until the
  guest clears PxCMD.ST, as the spec's error handling (6.2.2) describes. A failed NCQ
  command is reported the same way through a Set Device Bits FIS, and its details are kept
  for the NCQ Command Error log (log page 10h), which libata reads during recovery.
* Register writes must be aligned dwords (8-byte writes are split in two); other writes are
  counted in ``bad_accesses`` and dropped. Reads of any size are served from the dwords.
* SET FEATURES settings (write cache, look-ahead, transfer mode, multiple count) survive
  COMRESET and software reset, as with SATA software settings preservation.
* PRD byte counts are used as given (the spec wants them even; an odd count is harmless
  here). A PRDT longer than the transfer is used up to the transfer length.
* O_DIRECT backends get the guest buffers directly when they are page-aligned, and a
  bounce buffer otherwise.

Every guest address goes through :class:`~iovirt.memory.GuestMemory`; failures are counted
in ``command_errors`` and logged rate-limited, never raised out of :meth:`Ahci.read` or
:meth:`Ahci.write`. All loops are bounded by 32 command slots, the 16-bit PRDTL and the
32 MiB largest transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import mmap
import os
import struct
from collections.abc import Sequence

from iovirt.backends.block import SECTOR_SIZE, BlockBackend
from iovirt.bus.pci import PCI_INTERRUPT_LINE_UNKNOWN, BarKind, GuestAccessLog, PciFunction
from iovirt.errors import GuestMemoryError
from iovirt.interrupt import Interrupt
from iovirt.memory import GuestMemory

log = logging.getLogger(__name__)

# --- PCI identity: Intel ICH9 6-port SATA AHCI controller.
AHCI_PCI_VENDOR = 0x8086
AHCI_PCI_DEVICE = 0x2922
AHCI_PCI_CLASS = 0x010601  # mass storage, SATA, AHCI 1.0 programming interface
AHCI_PCI_REVISION = 2
AHCI_ABAR = 5  # ABAR is BAR5 (AHCI 1.3.1, 2.1.11)
AHCI_ABAR_SIZE = 0x1000

AHCI_MAX_PORTS = 6  # ICH9 has six
AHCI_NUM_SLOTS = 32  # CAP.NCS + 1: command slots, and NCQ tags, per port

# --- Generic host control registers (3.1), offsets in ABAR.
HOST_CAP = 0x00  # HBA capabilities
HOST_GHC = 0x04  # global HBA control
HOST_IS = 0x08  # interrupt status (one bit per port, RWC)
HOST_PI = 0x0C  # ports implemented
HOST_VS = 0x10  # version
HOST_CCC_CTL = 0x14  # command completion coalescing control
HOST_CCC_PORTS = 0x18
HOST_EM_LOC = 0x1C  # enclosure management location
HOST_EM_CTL = 0x20
HOST_CAP2 = 0x24  # HBA capabilities extended
HOST_BOHC = 0x28  # BIOS/OS handoff control and status

AHCI_VERSION_1_3 = 0x0001_0300

# CAP bits.
CAP_NP_MASK = 0x1F  # number of ports - 1
CAP_NCS_SHIFT = 8  # number of command slots - 1
CAP_ISS_SHIFT = 20  # interface speed support
CAP_SCLO = 1 << 24  # supports command list override
CAP_SAM = 1 << 18  # supports AHCI mode only
CAP_SNCQ = 1 << 30  # supports native command queuing
CAP_S64A = 1 << 31  # supports 64-bit addressing

SATA_GEN3 = 3  # 6 Gb/s, in CAP.ISS and PxSSTS.SPD

# GHC bits.
GHC_HR = 1 << 0  # HBA reset
GHC_IE = 1 << 1  # interrupt enable
GHC_AE = 1 << 31  # AHCI enable

# --- Port registers (3.3), offsets in each port's 0x80-byte block.
PORT_BASE = 0x100
PORT_STRIDE = 0x80
PORT_CLB = 0x00  # command list base address (1 KiB aligned)
PORT_CLBU = 0x04
PORT_FB = 0x08  # FIS base address (256-byte aligned)
PORT_FBU = 0x0C
PORT_IS = 0x10  # interrupt status (RWC)
PORT_IE = 0x14  # interrupt enable
PORT_CMD = 0x18  # command and status
PORT_TFD = 0x20  # task file data: status in 7:0, error in 15:8
PORT_SIG = 0x24  # signature of the attached device
PORT_SSTS = 0x28  # SStatus (SCR0)
PORT_SCTL = 0x2C  # SControl (SCR2)
PORT_SERR = 0x30  # SError (SCR1, RWC)
PORT_SACT = 0x34  # SActive (SCR3): NCQ tags outstanding
PORT_CI = 0x38  # command issue
PORT_SNTF = 0x3C  # SNotification (SCR4, RWC)
PORT_FBS = 0x40  # FIS-based switching control (not supported: reads 0)
PORT_DEVSLP = 0x44

CLB_ALIGN_MASK = ~0x3FF & 0xFFFF_FFFF
FB_ALIGN_MASK = ~0xFF & 0xFFFF_FFFF

# PxIS / PxIE bits.
PORT_IRQ_DHRS = 1 << 0  # device to host register FIS received
PORT_IRQ_PSS = 1 << 1  # PIO setup FIS received
PORT_IRQ_DSS = 1 << 2  # DMA setup FIS received
PORT_IRQ_SDBS = 1 << 3  # set device bits FIS received
PORT_IRQ_UFS = 1 << 4  # unknown FIS
PORT_IRQ_DPS = 1 << 5  # descriptor processed
PORT_IRQ_PCS = 1 << 6  # port connect change (mirrors PxSERR.DIAG.X)
PORT_IRQ_DMPS = 1 << 7  # device mechanical presence
PORT_IRQ_PRCS = 1 << 22  # PhyRdy change (mirrors PxSERR.DIAG.N)
PORT_IRQ_IPMS = 1 << 23  # incorrect port multiplier
PORT_IRQ_OFS = 1 << 24  # overflow
PORT_IRQ_INFS = 1 << 26  # interface non-fatal error
PORT_IRQ_IFS = 1 << 27  # interface fatal error
PORT_IRQ_HBDS = 1 << 28  # host bus data error
PORT_IRQ_HBFS = 1 << 29  # host bus fatal error
PORT_IRQ_TFES = 1 << 30  # task file error
PORT_IRQ_CPDS = 1 << 31  # cold port detect
PORT_IRQ_ALL = 0xFDC0_00FF  # every defined bit
PORT_IRQ_RWC = PORT_IRQ_ALL & ~(PORT_IRQ_PCS | PORT_IRQ_PRCS)  # PCS/PRCS only mirror

# PxCMD bits.
PORT_CMD_ST = 1 << 0  # start: process the command list
PORT_CMD_SUD = 1 << 1  # spin-up device
PORT_CMD_POD = 1 << 2  # power on device
PORT_CMD_CLO = 1 << 3  # command list override
PORT_CMD_FRE = 1 << 4  # FIS receive enable
PORT_CMD_FR = 1 << 14  # FIS receive running
PORT_CMD_CR = 1 << 15  # command list running
PORT_CMD_ATAPI = 1 << 24  # device is ATAPI (drives the activity LED only)
PORT_CMD_DLAE = 1 << 25  # drive LED on ATAPI enable
PORT_CMD_ICC_SHIFT = 28  # interface communication control (reads back as idle)
PORT_CMD_WRITABLE = PORT_CMD_ST | PORT_CMD_FRE | PORT_CMD_ATAPI | PORT_CMD_DLAE
PORT_CMD_DEFAULT = PORT_CMD_SUD | PORT_CMD_POD

# PxSSTS / PxSCTL fields.
SSTS_DET_PRESENT = 0x3  # device present, Phy communication established
SSTS_DET_OFFLINE = 0x4  # Phy offline (PxSCTL.DET = 4)
SSTS_SPD_SHIFT = 4
SSTS_IPM_ACTIVE = 0x1 << 8
SCTL_DET_MASK = 0xF
SCTL_DET_COMRESET = 0x1
SCTL_DET_OFFLINE = 0x4
SCTL_WRITABLE = 0xFFF  # DET, SPD, IPM

SIG_ATA = 0x0000_0101  # signature of an ATA (non-packet) device
SIG_NONE = 0xFFFF_FFFF

# --- Command list and command table (4.2).
CMD_HEADER_SIZE = 32
CMD_HEADER_CFL_MASK = 0x1F  # command FIS length, dwords
CMD_HEADER_PRDTL_SHIFT = 16
CMD_TABLE_ALIGN_MASK = ~0x7F
CMD_TABLE_CFIS = 0x00
CMD_TABLE_PRDT = 0x80
PRD_SIZE = 16
PRD_DBC_MASK = 0x3F_FFFF  # data byte count - 1 (4 MiB at most per entry)
PRD_DBA_RESERVED = 0x1  # DBA bit 0 is reserved: buffers are word aligned
PRDT_READ_BATCH = 256  # PRDT entries fetched per guest memory read (4 KiB)

# --- FIS types and the FIS receive area layout (4.2.1).
FIS_TYPE_REG_H2D = 0x27
FIS_TYPE_REG_D2H = 0x34
FIS_TYPE_DMA_SETUP = 0x41
FIS_TYPE_PIO_SETUP = 0x5F
FIS_TYPE_SDB = 0xA1
FIS_H2D_C = 0x80  # byte 1: 1 = command register update, 0 = device control
FIS_I = 0x40  # byte 1 of device-to-host FISes: raise an interrupt
FIS_PIO_D = 0x20  # PIO setup byte 1: data moves device to host
FIS_REG_SIZE = 20
RFIS_DSFIS = 0x00  # DMA setup FIS
RFIS_PSFIS = 0x20  # PIO setup FIS
RFIS_RFIS = 0x40  # D2H register FIS
RFIS_SDBFIS = 0x58  # set device bits FIS
CFL_MIN = FIS_REG_SIZE // 4  # a Register H2D FIS is five dwords
CFL_MAX = 16

# --- ATA status and error registers.
ATA_ERR = 0x01
ATA_DRQ = 0x08
ATA_DSC = 0x10
ATA_DRDY = 0x40
ATA_BSY = 0x80
ATA_STATUS_OK = ATA_DRDY | ATA_DSC
ATA_STATUS_ERROR = ATA_DRDY | ATA_DSC | ATA_ERR
ATA_STATUS_NO_DEVICE = 0x7F
ATA_CONTROL_SRST = 0x04  # device control register: software reset

ATA_ERROR_ABRT = 0x04  # command aborted
ATA_ERROR_IDNF = 0x10  # ID (address) not found
ATA_ERROR_DIAG_PASSED = 0x01  # error register after reset / diagnostics: device 0 passed

# --- ATA commands (ACS-3).
ATA_CMD_READ_SECTORS = 0x20
ATA_CMD_READ_SECTORS_NORETRY = 0x21
ATA_CMD_READ_SECTORS_EXT = 0x24
ATA_CMD_READ_DMA_EXT = 0x25
ATA_CMD_READ_NATIVE_MAX_EXT = 0x27
ATA_CMD_READ_MULTIPLE_EXT = 0x29
ATA_CMD_READ_LOG_EXT = 0x2F
ATA_CMD_WRITE_SECTORS = 0x30
ATA_CMD_WRITE_SECTORS_NORETRY = 0x31
ATA_CMD_WRITE_SECTORS_EXT = 0x34
ATA_CMD_WRITE_DMA_EXT = 0x35
ATA_CMD_WRITE_MULTIPLE_EXT = 0x39
ATA_CMD_WRITE_DMA_FUA_EXT = 0x3D
ATA_CMD_VERIFY = 0x40
ATA_CMD_VERIFY_EXT = 0x42
ATA_CMD_READ_LOG_DMA_EXT = 0x47
ATA_CMD_READ_FPDMA_QUEUED = 0x60
ATA_CMD_WRITE_FPDMA_QUEUED = 0x61
ATA_CMD_EXECUTE_DEVICE_DIAGNOSTIC = 0x90
ATA_CMD_INITIALIZE_DEVICE_PARAMETERS = 0x91
ATA_CMD_READ_MULTIPLE = 0xC4
ATA_CMD_WRITE_MULTIPLE = 0xC5
ATA_CMD_SET_MULTIPLE_MODE = 0xC6
ATA_CMD_READ_DMA = 0xC8
ATA_CMD_WRITE_DMA = 0xCA
ATA_CMD_WRITE_MULTIPLE_FUA_EXT = 0xCE
ATA_CMD_STANDBY_IMMEDIATE = 0xE0
ATA_CMD_IDLE_IMMEDIATE = 0xE1
ATA_CMD_STANDBY = 0xE2
ATA_CMD_IDLE = 0xE3
ATA_CMD_CHECK_POWER_MODE = 0xE5
ATA_CMD_SLEEP = 0xE6
ATA_CMD_FLUSH_CACHE = 0xE7
ATA_CMD_FLUSH_CACHE_EXT = 0xEA
ATA_CMD_IDENTIFY_DEVICE = 0xEC
ATA_CMD_SET_FEATURES = 0xEF
ATA_CMD_READ_NATIVE_MAX = 0xF8

# SET FEATURES subcommands (features register).
SETFEATURES_WC_ON = 0x02
SETFEATURES_XFER = 0x03
SETFEATURES_DEFAULTS_OFF = 0x66  # disable reverting to power-on defaults
SETFEATURES_WC_OFF = 0x82
SETFEATURES_RA_ON = 0xAA
SETFEATURES_RA_OFF = 0x55
SETFEATURES_DEFAULTS_ON = 0xCC
# SET FEATURES / set transfer mode values (count register).
XFER_PIO_DEFAULT = 0x00
XFER_PIO_DEFAULT_NO_IORDY = 0x01
XFER_PIO_0 = 0x08
XFER_PIO_4 = 0x0C
XFER_MW_DMA_0 = 0x20
XFER_MW_DMA_2 = 0x22
XFER_UDMA_0 = 0x40
XFER_UDMA_6 = 0x46

# General purpose logs (READ LOG EXT): the directory and the NCQ command error log.
ATA_LOG_DIRECTORY = 0x00
ATA_LOG_NCQ_ERROR = 0x10
ATA_LOG_GPL_VERSION = 0x0001
NCQ_LOG_NQ = 0x80  # byte 0: the last error was not for a queued command

CHECK_POWER_ACTIVE = 0xFF  # CHECK POWER MODE count: active or idle
MAX_MULTIPLE = 16  # sectors per DRQ block for READ/WRITE MULTIPLE
DEVICE_LBA = 0x40  # device register: LBA addressing
DEVICE_FUA = 0x80  # FPDMA device register: force unit access
LBA28_LIMIT = 1 << 28
LBA48_LIMIT = 1 << 48
NCQ_TAG_SHIFT = 3  # FPDMA count register: tag in bits 7:3

# IDENTIFY DEVICE words (ACS-3, 7.12.7).
ID_WORDS = 256
ID_STRING_SERIAL = (10, 20)  # first word, length in bytes
ID_STRING_FIRMWARE = (23, 8)
ID_STRING_MODEL = (27, 40)
ID_INTEGRITY_SIGNATURE = 0xA5
FIRMWARE_REVISION = "1.0"

# Host side.
IOV_MAX = 1024  # Linux's limit on iovecs per preadv/pwritev call
PAGE_SIZE = mmap.PAGESIZE

_HEADER = struct.Struct("<IIII")  # DW0 flags/PRDTL, PRDBC, CTBA, CTBAU
_PRD = struct.Struct("<IIII")  # DBA, DBAU, reserved, DBC/I


class _AtaError(Exception):
    """A command ends with ERR set: ``error`` is the ATA error register it reports."""

    def __init__(self, error: int, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TaskFile:
    """The registers of a Register H2D FIS (SATA 3.x, 10.5.5)."""

    command: int
    features: int  # 16 bits: 7:0 in byte 3, 15:8 in byte 11
    lba: int  # 48 bits
    device: int
    count: int  # 16 bits
    control: int
    is_command: bool  # the C bit: command register update (else a device control FIS)

    @classmethod
    def parse(cls, fis: bytes) -> TaskFile:
        return cls(
            command=fis[2],
            features=fis[3] | fis[11] << 8,
            lba=int.from_bytes(fis[4:7] + fis[8:11], "little"),
            device=fis[7],
            count=fis[12] | fis[13] << 8,
            control=fis[15],
            is_command=bool(fis[1] & FIS_H2D_C),
        )

    @property
    def lba28(self) -> int:
        return (self.lba & 0xFF_FFFF) | (self.device & 0x0F) << 24


@dataclasses.dataclass(frozen=True)
class _Transfer:
    """How a data command moves sectors."""

    write: bool
    lba48: bool
    pio: bool = False
    fua: bool = False
    ncq: bool = False


_TRANSFERS: dict[int, _Transfer] = {
    ATA_CMD_READ_DMA: _Transfer(write=False, lba48=False),
    ATA_CMD_WRITE_DMA: _Transfer(write=True, lba48=False),
    ATA_CMD_READ_DMA_EXT: _Transfer(write=False, lba48=True),
    ATA_CMD_WRITE_DMA_EXT: _Transfer(write=True, lba48=True),
    ATA_CMD_WRITE_DMA_FUA_EXT: _Transfer(write=True, lba48=True, fua=True),
    ATA_CMD_READ_SECTORS: _Transfer(write=False, lba48=False, pio=True),
    ATA_CMD_READ_SECTORS_NORETRY: _Transfer(write=False, lba48=False, pio=True),
    ATA_CMD_READ_SECTORS_EXT: _Transfer(write=False, lba48=True, pio=True),
    ATA_CMD_READ_MULTIPLE: _Transfer(write=False, lba48=False, pio=True),
    ATA_CMD_READ_MULTIPLE_EXT: _Transfer(write=False, lba48=True, pio=True),
    ATA_CMD_WRITE_SECTORS: _Transfer(write=True, lba48=False, pio=True),
    ATA_CMD_WRITE_SECTORS_NORETRY: _Transfer(write=True, lba48=False, pio=True),
    ATA_CMD_WRITE_SECTORS_EXT: _Transfer(write=True, lba48=True, pio=True),
    ATA_CMD_WRITE_MULTIPLE: _Transfer(write=True, lba48=False, pio=True),
    ATA_CMD_WRITE_MULTIPLE_EXT: _Transfer(write=True, lba48=True, pio=True),
    ATA_CMD_WRITE_MULTIPLE_FUA_EXT: _Transfer(write=True, lba48=True, pio=True, fua=True),
    ATA_CMD_READ_FPDMA_QUEUED: _Transfer(write=False, lba48=True, ncq=True),
    ATA_CMD_WRITE_FPDMA_QUEUED: _Transfer(write=True, lba48=True, ncq=True),
}

# Commands that only change (or report) device state and always succeed.
_NO_DATA_OK = frozenset(
    {
        ATA_CMD_STANDBY_IMMEDIATE,
        ATA_CMD_IDLE_IMMEDIATE,
        ATA_CMD_STANDBY,
        ATA_CMD_IDLE,
        ATA_CMD_SLEEP,
        ATA_CMD_INITIALIZE_DEVICE_PARAMETERS,
    }
)


def ata_string(text: str, length: int) -> bytes:
    """``text`` as an IDENTIFY string field: space padded, first character of each pair in
    the high byte of its little-endian word."""
    raw = text.encode("ascii").ljust(length, b" ")
    out = bytearray(length)
    out[0::2] = raw[1::2]
    out[1::2] = raw[0::2]
    return bytes(out)


def _check_ata_text(what: str, text: str, length: int) -> None:
    if len(text) > length or not all(0x20 <= ord(c) < 0x7F for c in text):
        raise ValueError(f"ahci: {what} {text!r} must be at most {length} printable ASCII chars")


@dataclasses.dataclass
class _NcqError:
    """What the NCQ Command Error log (page 10h) reports about the last failed NCQ command."""

    tag: int
    status: int
    error: int
    lba: int
    count: int
    device: int


class SataDisk:
    """The ATA device on one port: its identity and the settings SET FEATURES changes."""

    def __init__(self, backend: BlockBackend, serial: str, model: str) -> None:
        _check_ata_text("serial", serial, ID_STRING_SERIAL[1])
        _check_ata_text("model", model, ID_STRING_MODEL[1])
        self.backend = backend
        self.serial = serial
        self.model = model
        self.sectors = backend.size // SECTOR_SIZE
        self.ncq_error: _NcqError | None = None
        self.srst = False  # a device control FIS with SRST set was seen
        self.write_cache = True
        self.read_ahead = True
        self.multiple = MAX_MULTIPLE
        self.udma_mode: int | None = 5
        self.mwdma_mode: int | None = None

    def after_reset(self) -> None:
        """A COMRESET or software reset ends any error condition. Settings made with SET
        FEATURES survive it, as on a drive with software settings preservation enabled:
        a guest that turned the write cache off must not find it silently back on."""
        self.ncq_error = None
        self.srst = False

    def identify(self) -> bytes:
        """The 512 bytes of IDENTIFY DEVICE data."""
        w = [0] * ID_WORDS
        n = self.sectors
        w[0] = 0x0040  # ATA device, fixed
        w[2] = 0xC837  # no SET FEATURES spin-up needed, IDENTIFY data complete
        w[47] = 0x8000 | MAX_MULTIPLE
        w[48] = 0x4000  # no trusted computing feature set
        w[49] = 0x0B00  # IORDY supported, LBA supported, DMA supported
        w[50] = 0x4000
        w[53] = 0x0006  # words 64-70 and 88 are valid
        w[59] = 0x0100 | self.multiple  # multiple sector setting is valid
        w[60] = min(n, LBA28_LIMIT - 1) & 0xFFFF
        w[61] = min(n, LBA28_LIMIT - 1) >> 16
        w[63] = 0x0007 | (0x0100 << self.mwdma_mode if self.mwdma_mode is not None else 0)
        w[64] = 0x0003  # PIO modes 3 and 4
        w[65] = w[66] = w[67] = w[68] = 120  # fastest cycle times, ns
        w[75] = AHCI_NUM_SLOTS - 1  # queue depth - 1
        w[76] = 0x0100 | 0x000E  # NCQ; SATA Gen1, Gen2 and Gen3 signalling speeds
        w[80] = 0x07F0  # ATA/ATAPI-4 through ACS-3
        # Command sets: NOP, read look-ahead, write cache, power management; FLUSH CACHE
        # (EXT), 48-bit addressing; WRITE DMA FUA EXT, general purpose logging.
        w[82] = 0x4068
        w[83] = 0x7400
        w[84] = 0x4060
        w[85] = 0x4008 | (0x0020 if self.write_cache else 0) | (0x0040 if self.read_ahead else 0)
        w[86] = 0xB400  # as 83, and words 119-120 are valid
        w[87] = 0x4060
        w[88] = 0x007F | (0x0100 << self.udma_mode if self.udma_mode is not None else 0)
        w[100] = n & 0xFFFF
        w[101] = n >> 16 & 0xFFFF
        w[102] = n >> 32 & 0xFFFF
        w[103] = n >> 48 & 0xFFFF
        w[106] = 0x4000  # one 512-byte logical sector per physical sector
        w[119] = 0x4008  # READ LOG DMA EXT supported
        w[120] = 0x4008  # ... and enabled
        w[217] = 0x0001  # non-rotating medium
        data = bytearray(struct.pack(f"<{ID_WORDS}H", *w))
        for (word, length), text in (
            (ID_STRING_SERIAL, self.serial),
            (ID_STRING_FIRMWARE, FIRMWARE_REVISION),
            (ID_STRING_MODEL, self.model),
        ):
            data[2 * word : 2 * word + length] = ata_string(text, length)
        data[510] = ID_INTEGRITY_SIGNATURE
        data[511] = -sum(data[:511]) & 0xFF  # all 512 bytes sum to 0 mod 256
        return bytes(data)

    def read_log(self, address: int, page: int) -> bytes | None:
        """One 512-byte page of general purpose log ``address``, or None if there is none."""
        if page != 0:
            return None
        data = bytearray(SECTOR_SIZE)
        if address == ATA_LOG_DIRECTORY:
            struct.pack_into("<H", data, 0, ATA_LOG_GPL_VERSION)
            struct.pack_into("<H", data, 2 * ATA_LOG_NCQ_ERROR, 1)  # one page
            return bytes(data)
        if address == ATA_LOG_NCQ_ERROR:
            err = self.ncq_error
            if err is None:
                data[0] = NCQ_LOG_NQ
            else:
                data[0] = err.tag
                data[2], data[3] = err.status, err.error
                data[4:7] = (err.lba & 0xFF_FFFF).to_bytes(3, "little")
                data[7] = err.device
                data[8:11] = (err.lba >> 24).to_bytes(3, "little")
                data[12:14] = err.count.to_bytes(2, "little")
            data[511] = -sum(data[:511]) & 0xFF
            # Reading the log clears the error condition (ACS-3, 9.14).
            self.ncq_error = None
            return bytes(data)
        return None


@dataclasses.dataclass
class AhciPort:
    """One port's registers (3.3) and its attached disk, if any."""

    disk: SataDisk | None
    clb: int = 0  # PxCLB and PxCLBU, 64 bits
    fb: int = 0  # PxFB and PxFBU, 64 bits
    is_: int = 0
    ie: int = 0
    cmd: int = PORT_CMD_DEFAULT
    tfd: int = ATA_STATUS_NO_DEVICE
    sig: int = SIG_NONE
    ssts: int = 0
    sctl: int = 0
    serr: int = 0
    sact: int = 0
    ci: int = 0
    sntf: int = 0
    stopped: bool = False  # a task file error halted command processing until ST is cleared

    def reset(self) -> None:
        """Registers to their reset values (PxCLB/PxFB keep theirs), then a COMRESET."""
        self.is_ = self.ie = self.sctl = self.serr = self.sact = self.ci = self.sntf = 0
        self.cmd = PORT_CMD_DEFAULT
        self.stopped = False
        self.link_up()

    def link_down(self) -> None:
        self.ssts = 0
        self.sig = SIG_NONE
        self.tfd = ATA_STATUS_NO_DEVICE if self.disk is None else ATA_BSY

    def link_up(self) -> None:
        """The end of a COMRESET: the device answers with its signature (posted by the HBA)."""
        if self.disk is None:
            self.ssts, self.sig, self.tfd = 0, SIG_NONE, ATA_STATUS_NO_DEVICE
            return
        self.disk.after_reset()
        self.ssts = SSTS_DET_PRESENT | SATA_GEN3 << SSTS_SPD_SHIFT | SSTS_IPM_ACTIVE
        self.sig = SIG_ATA
        self.tfd = ATA_ERROR_DIAG_PASSED << 8 | ATA_STATUS_OK


class Ahci(PciFunction):
    """An ICH9-compatible AHCI controller with one port per entry of ``disks``.

    ``disks`` holds one backend per port (at most :data:`AHCI_MAX_PORTS`); None is an empty
    port. ``serials`` gives each disk's IDENTIFY serial number (20 ASCII characters at most;
    default ``iovirt-sata-N``), ``model`` the model string of all of them (40 at most).
    ``intx`` is the line INTA# drives and ``interrupt_line`` the IRQ number firmware would
    have written to the Interrupt Line register. Put it on the bus with ``PciRoot.add``; the
    function is also the BusDevice of its ABAR.
    """

    def __init__(
        self,
        memory: GuestMemory,
        disks: Sequence[BlockBackend | None],
        *,
        intx: Interrupt | None = None,
        serials: Sequence[str] | None = None,
        model: str = "iovirt SATA disk",
        interrupt_line: int = PCI_INTERRUPT_LINE_UNKNOWN,
        name: str = "ahci",
    ) -> None:
        if not 1 <= len(disks) <= AHCI_MAX_PORTS:
            raise ValueError(f"ahci: {len(disks)} ports; it has 1 to {AHCI_MAX_PORTS}")
        if serials is not None and len(serials) != len(disks):
            raise ValueError("ahci: give one serial number per port")
        super().__init__(
            AHCI_PCI_VENDOR,
            AHCI_PCI_DEVICE,
            AHCI_PCI_CLASS,
            revision=AHCI_PCI_REVISION,
            intx=intx,
            interrupt_line=interrupt_line,
            name=name,
        )
        self.memory = memory
        self.ports: list[AhciPort] = []
        for i, backend in enumerate(disks):
            serial = serials[i] if serials is not None else f"iovirt-sata-{i}"
            disk = None if backend is None else SataDisk(backend, serial, model)
            self.ports.append(AhciPort(disk))
        self.cap = (
            (len(disks) - 1)
            | (AHCI_NUM_SLOTS - 1) << CAP_NCS_SHIFT
            | SATA_GEN3 << CAP_ISS_SHIFT
            | CAP_SAM
            | CAP_SCLO
            | CAP_SNCQ
            | CAP_S64A
        )
        self.pi = (1 << len(disks)) - 1
        self.ghc = GHC_AE
        self.is_ = 0
        self.bad_accesses = GuestAccessLog(name, log)
        self.command_errors = GuestAccessLog(name, log, what="failed commands")
        self.add_bar(AHCI_ABAR, AHCI_ABAR_SIZE, BarKind.MEM32, self)
        self.reset()

    # -- reset ------------------------------------------------------------------------------

    def reset(self) -> None:
        """HBA reset (GHC.HR, and power-on): global registers and every port to their
        defaults; disks are re-attached by a COMRESET, as without staggered spin-up."""
        with self.lock:
            self.ghc = GHC_AE
            self.is_ = 0
            for port in self.ports:
                port.reset()
            self._update_irq()

    # -- ABAR accesses (BusDevice) ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if size not in (1, 2, 4, 8) or offset < 0 or offset + size > AHCI_ABAR_SIZE:
                self.bad_accesses(f"{size}-byte read at {offset:#x}")
                return 0xFFFF_FFFF_FFFF_FFFF
            first = offset & ~3
            value = 0
            for i, dword in enumerate(range(first, offset + size, 4)):
                value |= self._read_dword(dword) << (32 * i)
            return (value >> (8 * (offset - first))) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if size not in (4, 8) or offset % size or not 0 <= offset <= AHCI_ABAR_SIZE - size:
                self.bad_accesses(f"{size}-byte write of {value:#x} at {offset:#x} ignored")
                return
            for i in range(size // 4):
                self._write_dword(offset + 4 * i, (value >> (32 * i)) & 0xFFFF_FFFF)

    def _port_at(self, offset: int) -> tuple[AhciPort, int, int] | None:
        if offset < PORT_BASE:
            return None
        index, reg = divmod(offset - PORT_BASE, PORT_STRIDE)
        if index >= len(self.ports):
            return None
        return self.ports[index], index, reg

    def _read_dword(self, offset: int) -> int:
        if offset < PORT_BASE:
            return {
                HOST_CAP: self.cap,
                HOST_GHC: self.ghc,
                HOST_IS: self.is_,
                HOST_PI: self.pi,
                HOST_VS: AHCI_VERSION_1_3,
            }.get(offset, 0)  # CCC, EM, CAP2, BOHC and vendor registers: nothing supported
        found = self._port_at(offset)
        if found is None:
            return 0
        port, _, reg = found
        if reg == PORT_CMD:
            cmd = port.cmd & ~(PORT_CMD_CR | PORT_CMD_FR)
            if cmd & PORT_CMD_ST:
                cmd |= PORT_CMD_CR
            if cmd & PORT_CMD_FRE:
                cmd |= PORT_CMD_FR
            return cmd
        return {
            PORT_CLB: port.clb & 0xFFFF_FFFF,
            PORT_CLBU: port.clb >> 32,
            PORT_FB: port.fb & 0xFFFF_FFFF,
            PORT_FBU: port.fb >> 32,
            PORT_IS: port.is_,
            PORT_IE: port.ie,
            PORT_TFD: port.tfd,
            PORT_SIG: port.sig,
            PORT_SSTS: port.ssts,
            PORT_SCTL: port.sctl,
            PORT_SERR: port.serr,
            PORT_SACT: port.sact,
            PORT_CI: port.ci,
            PORT_SNTF: port.sntf,
        }.get(reg, 0)

    def _write_dword(self, offset: int, value: int) -> None:
        if offset < PORT_BASE:
            self._write_host(offset, value)
            return
        found = self._port_at(offset)
        if found is None:
            self.bad_accesses(f"write of {value:#x} to unimplemented port register {offset:#x}")
            return
        port, index, reg = found
        if reg == PORT_CLB:
            port.clb = (port.clb & ~0xFFFF_FFFF) | (value & CLB_ALIGN_MASK)
        elif reg == PORT_CLBU:
            port.clb = (port.clb & 0xFFFF_FFFF) | value << 32
        elif reg == PORT_FB:
            port.fb = (port.fb & ~0xFFFF_FFFF) | (value & FB_ALIGN_MASK)
        elif reg == PORT_FBU:
            port.fb = (port.fb & 0xFFFF_FFFF) | value << 32
        elif reg == PORT_IS:
            port.is_ &= ~(value & PORT_IRQ_RWC)
            self._update_irq()
        elif reg == PORT_IE:
            port.ie = value & PORT_IRQ_ALL
            self._update_irq()
        elif reg == PORT_CMD:
            self._write_cmd(port, value)
        elif reg == PORT_SCTL:
            self._write_sctl(port, index, value)
        elif reg == PORT_SERR:
            port.serr &= ~value
        elif reg == PORT_SNTF:
            port.sntf &= ~value
        elif reg == PORT_SACT:
            # Software only sets bits, and only while the port runs (3.3.13).
            if port.cmd & PORT_CMD_ST:
                port.sact |= value
            else:
                self.bad_accesses(f"port {index}: PxSACT written while PxCMD.ST is clear")
        elif reg == PORT_CI:
            if port.cmd & PORT_CMD_ST:
                new = value & ~port.ci
                port.ci |= value
                if not port.stopped:
                    self._run_commands(port, index, new)
            else:
                self.bad_accesses(f"port {index}: PxCI written while PxCMD.ST is clear")
        # PxTFD, PxSIG, PxSSTS are read-only; PxFBS and PxDEVSLP are not implemented.

    def _write_host(self, offset: int, value: int) -> None:
        if offset == HOST_GHC:
            if value & GHC_HR:
                self.reset()  # completes at once: HR reads back 0
                return
            self.ghc = GHC_AE | (value & GHC_IE)  # AE is read-only 1 with CAP.SAM
            self._update_irq()
        elif offset == HOST_IS:
            self.is_ &= ~value
            self._update_irq()  # a port still pending sets its bit again
        # CAP and PI are read-only here (libahci writes back what it read); the rest are
        # features CAP/CAP2 do not advertise.

    def _write_cmd(self, port: AhciPort, value: int) -> None:
        old = port.cmd
        port.cmd = (old & ~PORT_CMD_WRITABLE) | (value & PORT_CMD_WRITABLE)
        if value & PORT_CMD_CLO:
            # Command list override: clear BSY and DRQ so a softreset FIS can be sent.
            port.tfd &= ~(ATA_BSY | ATA_DRQ)
        if old & PORT_CMD_ST and not value & PORT_CMD_ST:
            # Stopping the engine forgets every issued command and leaves the error state.
            port.ci = port.sact = 0
            port.stopped = False

    def _write_sctl(self, port: AhciPort, index: int, value: int) -> None:
        old_det = port.sctl & SCTL_DET_MASK
        port.sctl = value & SCTL_WRITABLE
        det = port.sctl & SCTL_DET_MASK
        if det == SCTL_DET_COMRESET:
            port.link_down()
        elif det == SCTL_DET_OFFLINE:
            port.link_down()
            port.ssts = SSTS_DET_OFFLINE
        elif det == 0 and old_det in (SCTL_DET_COMRESET, SCTL_DET_OFFLINE):
            port.link_up()
            if port.disk is not None:
                self._post_signature(port, index)

    # -- interrupts -------------------------------------------------------------------------

    def _update_irq(self) -> None:
        for i, port in enumerate(self.ports):
            if port.is_ & port.ie:
                self.is_ |= 1 << i
        self.set_intx(bool(self.ghc & GHC_IE) and self.is_ != 0)

    # -- FIS receive area -------------------------------------------------------------------

    def _post_fis(self, port: AhciPort, index: int, area: int, fis: bytes) -> bool:
        """Copy ``fis`` into the port's receive area when FIS receive is on."""
        if not port.cmd & PORT_CMD_FRE:
            return False
        try:
            self.memory.write(port.fb + area, fis)
        except GuestMemoryError as e:
            self.command_errors(f"port {index}: FIS receive area: {e}")
            return False
        return True

    def _post_signature(self, port: AhciPort, index: int) -> None:
        """The Register D2H FIS a device sends after reset (its I bit is clear)."""
        fis = bytearray(FIS_REG_SIZE)
        fis[0] = FIS_TYPE_REG_D2H
        fis[2], fis[3] = ATA_STATUS_OK, ATA_ERROR_DIAG_PASSED
        fis[4] = 0x01  # LBA low and count: 01h/01h, LBA mid/high 00h: an ATA device
        fis[12] = 0x01
        self._post_fis(port, index, RFIS_RFIS, bytes(fis))

    def _complete_d2h(
        self,
        port: AhciPort,
        index: int,
        status: int,
        error: int = 0,
        *,
        lba: int = 0,
        count: int = 0,
        device: int = 0,
    ) -> None:
        """A Register D2H FIS with the I bit: the end of a non-queued command."""
        fis = bytearray(FIS_REG_SIZE)
        fis[0] = FIS_TYPE_REG_D2H
        fis[1] = FIS_I
        fis[2], fis[3] = status, error
        fis[4:7] = (lba & 0xFF_FFFF).to_bytes(3, "little")
        fis[7] = device
        fis[8:11] = (lba >> 24 & 0xFF_FFFF).to_bytes(3, "little")
        fis[12:14] = (count & 0xFFFF).to_bytes(2, "little")
        port.tfd = error << 8 | status
        if self._post_fis(port, index, RFIS_RFIS, bytes(fis)):
            port.is_ |= PORT_IRQ_DHRS

    def _complete_pio_in(self, port: AhciPort, index: int, nbytes: int) -> None:
        """A PIO Setup FIS for data moving to the host; its E_Status ends the command."""
        fis = bytearray(FIS_REG_SIZE)
        fis[0] = FIS_TYPE_PIO_SETUP
        fis[1] = FIS_I | FIS_PIO_D
        fis[2] = ATA_DRDY | ATA_DSC | ATA_DRQ
        fis[15] = ATA_STATUS_OK
        fis[16:18] = min(nbytes, 0xFFFF).to_bytes(2, "little")
        port.tfd = ATA_STATUS_OK
        if self._post_fis(port, index, RFIS_PSFIS, bytes(fis)):
            port.is_ |= PORT_IRQ_PSS

    def _complete_sdb(self, port: AhciPort, index: int, tags: int, status: int, error: int) -> None:
        """A Set Device Bits FIS: NCQ tags done (or an NCQ error)."""
        fis = struct.pack("<BBBBI", FIS_TYPE_SDB, FIS_I, status & 0x77, error, tags)
        port.sact &= ~tags
        # The SDB FIS carries only the status bits outside BSY and DRQ.
        port.tfd = error << 8 | (port.tfd & (ATA_BSY | ATA_DRQ)) | (status & 0x77)
        if self._post_fis(port, index, RFIS_SDBFIS, fis):
            port.is_ |= PORT_IRQ_SDBS

    # -- command processing -----------------------------------------------------------------

    def _run_commands(self, port: AhciPort, index: int, slots: int) -> None:
        """Run the commands in ``slots`` (newly issued PxCI bits), lowest slot first."""
        ncq_done = 0
        for slot in range(AHCI_NUM_SLOTS):
            if not slots >> slot & 1:
                continue
            bit = 1 << slot
            ncq = False
            tf: TaskFile | None = None
            try:
                header, tf = self._fetch(port, slot)
                ncq = tf.is_command and tf.command in (
                    ATA_CMD_READ_FPDMA_QUEUED,
                    ATA_CMD_WRITE_FPDMA_QUEUED,
                )
                self._execute(port, index, slot, header, tf)
            except _AtaError as e:
                self.command_errors(
                    f"port {index} slot {slot}: command "
                    f"{'?' if tf is None else f'{tf.command:#04x}'}: {e.reason}"
                )
                port.is_ |= PORT_IRQ_TFES
                port.stopped = True
                if ncq and port.disk is not None and tf is not None:
                    port.ci &= ~bit  # accepted, then failed: it stays in PxSACT
                    port.disk.ncq_error = _NcqError(
                        slot, ATA_STATUS_ERROR, e.error, tf.lba, tf.features, tf.device
                    )
                    self._complete_sdb(port, index, ncq_done, ATA_STATUS_ERROR, e.error)
                    ncq_done = 0
                else:
                    if ncq_done:  # report the queued commands that did finish first
                        self._complete_sdb(port, index, ncq_done, ATA_STATUS_OK, 0)
                        ncq_done = 0
                    lba = 0 if tf is None else tf.lba
                    self._complete_d2h(port, index, ATA_STATUS_ERROR, e.error, lba=lba)
                break
            port.ci &= ~bit
            if ncq:
                ncq_done |= bit
        if ncq_done:
            self._complete_sdb(port, index, ncq_done, ATA_STATUS_OK, 0)
        self._update_irq()

    def _fetch(self, port: AhciPort, slot: int) -> tuple[tuple[int, int, int, int], TaskFile]:
        """The command header of ``slot`` and the command FIS it points at."""
        try:
            header = _HEADER.unpack(self.memory.read(port.clb + slot * CMD_HEADER_SIZE, 16))
        except GuestMemoryError as e:
            raise _AtaError(ATA_ERROR_ABRT, f"command list: {e}") from e
        cfl = header[0] & CMD_HEADER_CFL_MASK
        if not CFL_MIN <= cfl <= CFL_MAX:
            raise _AtaError(ATA_ERROR_ABRT, f"command FIS length of {cfl} dwords")
        table = self._table_address(header)
        try:
            fis = self.memory.read(table + CMD_TABLE_CFIS, FIS_REG_SIZE)
        except GuestMemoryError as e:
            raise _AtaError(ATA_ERROR_ABRT, f"command table: {e}") from e
        if fis[0] != FIS_TYPE_REG_H2D:
            raise _AtaError(ATA_ERROR_ABRT, f"command FIS of type {fis[0]:#x}")
        return header, TaskFile.parse(fis)

    @staticmethod
    def _table_address(header: tuple[int, int, int, int]) -> int:
        return (header[2] & CMD_TABLE_ALIGN_MASK & 0xFFFF_FFFF) | header[3] << 32

    def _set_prdbc(self, port: AhciPort, slot: int, nbytes: int) -> None:
        """Report the bytes transferred in the command header (PRDBC, DW1)."""
        # The header was just read from there, so this cannot normally fail.
        with contextlib.suppress(GuestMemoryError):
            self.memory.write_u32(port.clb + slot * CMD_HEADER_SIZE + 4, nbytes)

    def _execute(
        self,
        port: AhciPort,
        index: int,
        slot: int,
        header: tuple[int, int, int, int],
        tf: TaskFile,
    ) -> None:
        disk = port.disk
        if disk is None:
            raise _AtaError(ATA_ERROR_ABRT, "no device on the port")
        if not tf.is_command:
            self._device_control(port, index, disk, tf)
            return
        cmd = tf.command
        transfer = _TRANSFERS.get(cmd)
        if transfer is not None:
            nbytes = self._transfer(port, slot, header, disk, tf, transfer)
            self._set_prdbc(port, slot, nbytes)
            if transfer.ncq:
                return  # completed by the Set Device Bits FIS after the batch
            if transfer.pio and not transfer.write:
                self._complete_pio_in(port, index, nbytes)
            else:
                self._complete_d2h(port, index, ATA_STATUS_OK)
            return
        if cmd == ATA_CMD_IDENTIFY_DEVICE:
            self._data_in(port, index, slot, header, disk.identify(), pio=True)
        elif cmd in (ATA_CMD_READ_LOG_EXT, ATA_CMD_READ_LOG_DMA_EXT):
            pages = tf.count
            page = (tf.lba >> 8 & 0xFF) | (tf.lba >> 32 & 0xFF) << 8
            data = disk.read_log(tf.lba & 0xFF, page) if pages == 1 else None
            if data is None:
                raise _AtaError(ATA_ERROR_ABRT, f"log {tf.lba & 0xFF:#x} page {page} x{pages}")
            self._data_in(port, index, slot, header, data, pio=cmd == ATA_CMD_READ_LOG_EXT)
        elif cmd in (ATA_CMD_FLUSH_CACHE, ATA_CMD_FLUSH_CACHE_EXT):
            self._sync(disk)
            self._complete_d2h(port, index, ATA_STATUS_OK)
        elif cmd == ATA_CMD_SET_FEATURES:
            self._set_features(disk, tf)
            self._complete_d2h(port, index, ATA_STATUS_OK)
        elif cmd in (ATA_CMD_VERIFY, ATA_CMD_VERIFY_EXT):
            lba48 = cmd == ATA_CMD_VERIFY_EXT
            self._range(disk, tf, lba48=lba48, count=tf.count)
            self._complete_d2h(port, index, ATA_STATUS_OK)
        elif cmd == ATA_CMD_READ_NATIVE_MAX_EXT:
            self._complete_d2h(port, index, ATA_STATUS_OK, lba=disk.sectors - 1, device=DEVICE_LBA)
        elif cmd == ATA_CMD_READ_NATIVE_MAX:
            last = min(disk.sectors, LBA28_LIMIT) - 1
            device = DEVICE_LBA | last >> 24
            self._complete_d2h(port, index, ATA_STATUS_OK, lba=last & 0xFF_FFFF, device=device)
        elif cmd == ATA_CMD_SET_MULTIPLE_MODE:
            n = tf.count & 0xFF
            if n > MAX_MULTIPLE or n & (n - 1):
                raise _AtaError(ATA_ERROR_ABRT, f"SET MULTIPLE MODE to {n} sectors")
            disk.multiple = n
            self._complete_d2h(port, index, ATA_STATUS_OK)
        elif cmd == ATA_CMD_CHECK_POWER_MODE:
            self._complete_d2h(port, index, ATA_STATUS_OK, count=CHECK_POWER_ACTIVE)
        elif cmd == ATA_CMD_EXECUTE_DEVICE_DIAGNOSTIC:
            port.sig = SIG_ATA
            self._complete_d2h(port, index, ATA_STATUS_OK, ATA_ERROR_DIAG_PASSED, lba=1, count=1)
        elif cmd in _NO_DATA_OK:
            self._complete_d2h(port, index, ATA_STATUS_OK)
        else:
            raise _AtaError(ATA_ERROR_ABRT, "command not supported")

    def _device_control(self, port: AhciPort, index: int, disk: SataDisk, tf: TaskFile) -> None:
        """A device control FIS (C bit clear): libahci's softreset sets SRST, then clears
        it; the device answers the second with its signature."""
        if tf.control & ATA_CONTROL_SRST:
            disk.srst = True
            port.tfd = ATA_BSY
        elif disk.srst:
            port.link_up()
            self._post_signature(port, index)

    def _set_features(self, disk: SataDisk, tf: TaskFile) -> None:
        sub = tf.features & 0xFF
        if sub == SETFEATURES_WC_ON:
            disk.write_cache = True
        elif sub == SETFEATURES_WC_OFF:
            # Writes become durable one by one from now on; flush what the cache held.
            self._sync(disk)
            disk.write_cache = False
        elif sub == SETFEATURES_RA_ON:
            disk.read_ahead = True
        elif sub == SETFEATURES_RA_OFF:
            disk.read_ahead = False
        elif sub in (SETFEATURES_DEFAULTS_OFF, SETFEATURES_DEFAULTS_ON):
            pass
        elif sub == SETFEATURES_XFER:
            mode = tf.count & 0xFF
            if XFER_UDMA_0 <= mode <= XFER_UDMA_6:
                disk.udma_mode, disk.mwdma_mode = mode - XFER_UDMA_0, None
            elif XFER_MW_DMA_0 <= mode <= XFER_MW_DMA_2:
                disk.udma_mode, disk.mwdma_mode = None, mode - XFER_MW_DMA_0
            elif not (
                mode in (XFER_PIO_DEFAULT, XFER_PIO_DEFAULT_NO_IORDY)
                or XFER_PIO_0 <= mode <= XFER_PIO_4
            ):
                raise _AtaError(ATA_ERROR_ABRT, f"transfer mode {mode:#x}")
        else:
            raise _AtaError(ATA_ERROR_ABRT, f"SET FEATURES subcommand {sub:#x}")

    @staticmethod
    def _range(disk: SataDisk, tf: TaskFile, *, lba48: bool, count: int) -> tuple[int, int]:
        """``(lba, sectors)`` of a command, checked against the disk (IDNF if outside)."""
        if lba48:
            lba, sectors = tf.lba, count or 0x1_0000
        else:
            lba, sectors = tf.lba28, (count & 0xFF) or 0x100
        if lba + sectors > disk.sectors:
            raise _AtaError(ATA_ERROR_IDNF, f"sectors {lba}+{sectors} past {disk.sectors}")
        return lba, sectors

    def _transfer(
        self,
        port: AhciPort,
        slot: int,
        header: tuple[int, int, int, int],
        disk: SataDisk,
        tf: TaskFile,
        transfer: _Transfer,
    ) -> int:
        """Move the sectors of a read or write command; returns the bytes moved."""
        count = tf.features if transfer.ncq else tf.count
        lba, sectors = self._range(disk, tf, lba48=transfer.lba48, count=count)
        if transfer.write and disk.backend.readonly:
            raise _AtaError(ATA_ERROR_ABRT, "write to a read-only disk")
        nbytes = sectors * SECTOR_SIZE
        segments = self._prdt(port, header, nbytes)
        try:
            _disk_io(disk.backend, segments, lba * SECTOR_SIZE, write=transfer.write)
        except OSError as e:
            raise _AtaError(ATA_ERROR_ABRT, f"host I/O at sector {lba}: {e}") from e
        finally:
            for _, view in segments:
                view.release()
        fua = transfer.fua or (transfer.ncq and bool(tf.device & DEVICE_FUA))
        if transfer.write and (fua or not disk.write_cache):
            self._sync(disk)
        return nbytes

    def _data_in(
        self,
        port: AhciPort,
        index: int,
        slot: int,
        header: tuple[int, int, int, int],
        data: bytes,
        *,
        pio: bool,
    ) -> None:
        """Scatter ``data`` (made by the device) into the command's PRDT and complete."""
        segments = self._prdt(port, header, len(data))
        done = 0
        try:
            for _, view in segments:
                view[:] = data[done : done + len(view)]
                done += len(view)
        finally:
            for _, view in segments:
                view.release()
        self._set_prdbc(port, slot, len(data))
        if pio:
            self._complete_pio_in(port, index, len(data))
        else:
            self._complete_d2h(port, index, ATA_STATUS_OK)

    def _prdt(
        self, port: AhciPort, header: tuple[int, int, int, int], nbytes: int
    ) -> list[tuple[int, memoryview]]:
        """Views of guest RAM covering the first ``nbytes`` the command's PRDT describes."""
        prdtl = header[0] >> CMD_HEADER_PRDTL_SHIFT
        base = self._table_address(header) + CMD_TABLE_PRDT
        segments: list[tuple[int, memoryview]] = []
        remaining = nbytes
        try:
            # At most 65535 entries; stop as soon as the transfer is covered.
            for first in range(0, prdtl, PRDT_READ_BATCH):
                n = min(PRDT_READ_BATCH, prdtl - first)
                table = self.memory.read(base + first * PRD_SIZE, n * PRD_SIZE)
                for dba, dbau, _, dbc in _PRD.iter_unpack(table):
                    gpa = (dba & ~PRD_DBA_RESERVED) | dbau << 32
                    take = min((dbc & PRD_DBC_MASK) + 1, remaining)
                    segments.append((gpa, self.memory.view(gpa, take)))
                    remaining -= take
                    if remaining == 0:
                        return segments
        except GuestMemoryError as e:
            for _, view in segments:
                view.release()
            raise _AtaError(ATA_ERROR_ABRT, f"PRDT: {e}") from e
        for _, view in segments:
            view.release()
        raise _AtaError(
            ATA_ERROR_ABRT, f"PRDT of {prdtl} entries holds {nbytes - remaining} of {nbytes} bytes"
        )

    def _sync(self, disk: SataDisk) -> None:
        try:
            os.fdatasync(disk.backend.fd)
        except OSError as e:
            raise _AtaError(ATA_ERROR_ABRT, f"flush: {e}") from e


# -- host I/O ---------------------------------------------------------------------------------


def _disk_io(
    backend: BlockBackend, segments: list[tuple[int, memoryview]], offset: int, *, write: bool
) -> None:
    """preadv/pwritev between ``backend`` at ``offset`` and the guest buffers."""
    views = [view for _, view in segments]
    aligned = all(gpa % PAGE_SIZE == 0 and len(v) % SECTOR_SIZE == 0 for gpa, v in segments)
    if not backend.direct or aligned:
        _vectored_io(backend.fd, views, offset, write=write)
        return
    # O_DIRECT needs aligned buffers: go through an anonymous (page-aligned) mapping.
    total = sum(len(v) for v in views)
    with mmap.mmap(-1, total) as bounce:
        buf = memoryview(bounce)
        try:
            if write:
                done = 0
                for v in views:
                    buf[done : done + len(v)] = v
                    done += len(v)
            _vectored_io(backend.fd, [buf], offset, write=write)
            if not write:
                done = 0
                for v in views:
                    v[:] = buf[done : done + len(v)]
                    done += len(v)
        finally:
            buf.release()


def _vectored_io(fd: int, views: list[memoryview], offset: int, *, write: bool) -> None:
    """All of ``views`` to or from ``fd`` at ``offset``, in IOV_MAX batches, resuming after
    short transfers; a transfer that makes no progress (end of file) is an error."""
    pending = list(views)
    i = 0
    while i < len(pending):
        batch = pending[i : i + IOV_MAX]
        n = os.pwritev(fd, batch, offset) if write else os.preadv(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of the disk image")
        offset += n
        for view in batch:
            if n >= len(view):
                n -= len(view)
                i += 1
            else:
                pending[i] = view[n:]
                break
