"""Intel 82540EM gigabit Ethernet controller ("e1000"), as Linux's stock ``e1000`` driver
drives it.

Facts come from Intel's *PCI/PCI-X Family of Gigabit Ethernet Controllers Software
Developer's Manual* (the 8254x SDM): the register map (chapter 13), the descriptor
formats (chapter 3), the EEPROM map (chapter 5) and the M88E1011 PHY registers; the
sequences are the ones Linux's ``drivers/net/ethernet/intel/e1000`` uses for an 82540.

The function (vendor 0x8086, device 0x100E, class 0x020000, revision 3) has:

* BAR0: 128 KiB of memory-mapped registers (:meth:`E1000.read` / :meth:`E1000.write`);
* BAR1: 64 bytes of I/O ports, IOADDR at 0 and IODATA at 4, an indirect window onto the
  same registers (Linux issues the global reset of an 82540 through it);
* INTA#, driven by ``(ICR & IMS) != 0``.

Threads and locking. vCPU threads enter through the BARs; the host I/O loop calls
:meth:`E1000.rx_ready` when ``backend.fds[0]`` is readable. Both take the function's lock
(:attr:`PciFunction.lock`), and so do the moderation deadlines that the board's timer
service calls back, so the model is single-threaded inside. The device starts no thread:
transmission happens on the vCPU thread that writes TDT, and reception on the I/O loop.

Reception. :meth:`E1000.rx_ready` reads up to :data:`RX_BATCH` packets (non-blocking;
every packet is a 12-byte virtio-net header and an Ethernet frame), filters them
(RCTL.UPE/MPE/BAM, the 16 exact receive addresses, the 4096-bit multicast hash table,
the VLAN filter table), strips an 802.1Q tag when CTRL.VME is set, pads runts to 60 bytes,
appends the FCS unless RCTL.SECRC is set (Linux's e1000 subtracts 4 from every length) and
DMAs the frame into legacy receive descriptors, spilling over several buffers of the RCTL
BSIZE/BSEX size with EOP on the last. Received frames are flagged IXSM (no checksum
verdict): the backend's offloads are set to 0 at reset, so the tap never hands us partial
checksums or GSO frames; a NEEDS_CSUM packet that arrives anyway is completed in Python.
When the ring lacks the descriptors a largest frame needs, packets stay in the tap: the
device calls ``rx_interest(False)`` (the board stops watching the fd) and
``rx_interest(True)`` once a write to RDT (or RDLEN, RCTL, CTRL, the PCI command register)
makes room again.

Transmission. A TDT write walks descriptors from TDH to TDT (at most the ring, and at most
:data:`TX_BUDGET_BYTES` of frame data per call; the rest continues at the guest's next ICR
read, IMS or TDT write). Legacy descriptors, TCP/IP context descriptors and data
descriptors are understood; a frame ends at EOP and is written to the backend as one
packet. Checksum offload is handed to the host kernel: TXSM (or a legacy IC) becomes
VIRTIO_NET_HDR_F_NEEDS_CSUM with ``csum_start = TUCSS`` and ``csum_offset = TUCSO - TUCSS``
(computed in Python when TUCSE ends before the frame does); IXSM (the IPv4 header
checksum) is computed in Python. TCP segmentation (TSE) is not done in Python either: the
frame goes out whole with VIRTIO_NET_HDR_GSO_TCPV4/TCPV6, ``gso_size = MSS`` and
``hdr_len = HDRLEN``, after the fix-ups the hardware would make on every segment and the
host kernel expects on the super-frame (IPv4 total length and header checksum, IPv6
payload length, the TCP pseudo-header checksum grown by the TCP length). UDP segmentation
(TSE without TUCMD.TCP) is not supported; Linux's e1000 never asks for it. With CTRL.VME, a
VLE descriptor's tag is inserted after the MAC addresses.

Choices where there is no clock or no wire:

* The link is up whenever CTRL.SLU is set (its reset value, as on QEMU's model): STATUS
  reads LU, full duplex, 1000 Mb/s; the PHY reports link, autonegotiation complete and
  1000BASE-T full duplex. A change of SLU, and every reset, set ICR.LSC.
* Interrupt moderation is timed on the board's :class:`~iovirt.timer.TimerService`:
  ITR holds INTA# down until its interval since the previous assertion has passed (causes
  gather in ICR meanwhile); RXT0 waits for RDTR to pass with no new frame, or RADV since
  the first delayed frame; TXDW of descriptors with IDE waits likewise for TIDV/TADV (no
  IDE: at once). A write of RDTR/TIDV with FPD set fires its pending cause at once.
  Without a timer service (``timers=None``) the registers are stored only and causes are
  raised as soon as they happen.
* The EEPROM (64 words, 93C46-style Microwire, bit-banged through EECD, or read through
  EERD) is read-only: writes and erase commands are ignored.
* PHY and MAC loopback, flow control frames, wake-up and manageability are stored only.
* DMA (both rings) happens only while COMMAND.MASTER is set, as on a real PCI device. A
  frame the backend refuses for lack of room (EAGAIN) is dropped, as a wire would.
* Statistics are clear-on-read; a 64-bit octet counter clears when its high half is read.

The guest is hostile: descriptor rings and buffers are reached only through
:class:`~iovirt.memory.GuestMemory`; a bad address, ring geometry, head/tail or length is
counted in :attr:`E1000.dma_errors` (logged rate-limited) and the descriptor skipped or
the frame dropped; unknown registers read 0 and are counted in :attr:`E1000.bad_accesses`.
Nothing raises out of :meth:`E1000.read`, :meth:`E1000.write`, the I/O BAR or
:meth:`E1000.rx_ready`.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from iovirt.backends.net import VNET_HDR_LEN, NetBackend
from iovirt.bus.pci import (
    PCI_COMMAND_MASTER,
    PCI_INTERRUPT_LINE_UNKNOWN,
    BarKind,
    GuestAccessLog,
    PciFunction,
)
from iovirt.errors import GuestMemoryError
from iovirt.interrupt import Interrupt
from iovirt.memory import GuestMemory
from iovirt.timer import TimerService

log = logging.getLogger(__name__)

# --- PCI identity. The subsystem is Intel's own PRO/1000 MT Desktop Adapter board.
E1000_VENDOR_ID = 0x8086
E1000_DEV_ID_82540EM = 0x100E
E1000_CLASS_ETHERNET = 0x020000
E1000_REVISION = 0x03
E1000_SUBSYSTEM_VENDOR_ID = 0x8086
E1000_SUBSYSTEM_ID = 0x001E

E1000_MMIO_BAR = 0
E1000_MMIO_SIZE = 0x20000  # 128 KiB register file
E1000_IO_BAR = 1
E1000_IO_SIZE = 0x40

# --- I/O BAR: indirect register access.
E1000_IOADDR = 0x00  # register offset to reach through IODATA
E1000_IODATA = 0x04  # reads/writes the register IOADDR names
IOADDR_MASK = 0x0001_FFFC  # dword offsets inside the 128 KiB register space

# --- Register offsets (SDM 13, "Register Summary").
E1000_CTRL = 0x00000  # device control
E1000_STATUS = 0x00008  # device status (read-only)
E1000_EECD = 0x00010  # EEPROM/flash control and data (Microwire bit-bang)
E1000_EERD = 0x00014  # EEPROM read
E1000_CTRL_EXT = 0x00018  # extended device control
E1000_FLA = 0x0001C  # flash access
E1000_MDIC = 0x00020  # MDI control (PHY access)
E1000_FCAL = 0x00028  # flow control address low
E1000_FCAH = 0x0002C  # flow control address high
E1000_FCT = 0x00030  # flow control type
E1000_VET = 0x00038  # VLAN Ethertype
E1000_ICR = 0x000C0  # interrupt cause read (clear on read)
E1000_ITR = 0x000C4  # interrupt throttling rate
E1000_ICS = 0x000C8  # interrupt cause set (write-only)
E1000_IMS = 0x000D0  # interrupt mask set / read
E1000_IMC = 0x000D8  # interrupt mask clear (write-only)
E1000_RCTL = 0x00100  # receive control
E1000_FCTTV = 0x00170  # flow control transmit timer value
E1000_TXCW = 0x00178  # transmit configuration word
E1000_RXCW = 0x00180  # receive configuration word (read-only)
E1000_TCTL = 0x00400  # transmit control
E1000_TIPG = 0x00410  # transmit inter-packet gap
E1000_AIT = 0x00458  # adaptive IFS throttle
E1000_LEDCTL = 0x00E00  # LED control
E1000_PBA = 0x01000  # packet buffer allocation
E1000_FCRTL = 0x02160  # flow control receive threshold low
E1000_FCRTH = 0x02168  # flow control receive threshold high
E1000_RDFH = 0x02410  # RX data FIFO head (diagnostic)
E1000_RDFT = 0x02418  # RX data FIFO tail
E1000_RDFHS = 0x02420  # RX data FIFO head saved
E1000_RDFTS = 0x02428  # RX data FIFO tail saved
E1000_RDFPC = 0x02430  # RX data FIFO packet count
E1000_RDBAL = 0x02800  # RX descriptor base address low
E1000_RDBAH = 0x02804  # RX descriptor base address high
E1000_RDLEN = 0x02808  # RX descriptor ring length in bytes
E1000_RDH = 0x02810  # RX descriptor head
E1000_RDT = 0x02818  # RX descriptor tail
E1000_RDTR = 0x02820  # RX delay timer
E1000_RXDCTL = 0x02828  # RX descriptor control
E1000_RADV = 0x0282C  # RX interrupt absolute delay
E1000_RSRPD = 0x02C00  # RX small packet detect
E1000_TXDMAC = 0x03000  # TX DMA control
E1000_TDFH = 0x03410  # TX data FIFO head (diagnostic)
E1000_TDFT = 0x03418  # TX data FIFO tail
E1000_TDFHS = 0x03420  # TX data FIFO head saved
E1000_TDFTS = 0x03428  # TX data FIFO tail saved
E1000_TDFPC = 0x03430  # TX data FIFO packet count
E1000_TDBAL = 0x03800  # TX descriptor base address low
E1000_TDBAH = 0x03804  # TX descriptor base address high
E1000_TDLEN = 0x03808  # TX descriptor ring length in bytes
E1000_TDH = 0x03810  # TX descriptor head
E1000_TDT = 0x03818  # TX descriptor tail
E1000_TIDV = 0x03820  # TX interrupt delay value
E1000_TXDCTL = 0x03828  # TX descriptor control
E1000_TADV = 0x0382C  # TX interrupt absolute delay
E1000_TSPMT = 0x03830  # TCP segmentation pad and threshold
E1000_RXCSUM = 0x05000  # RX checksum control
E1000_MTA = 0x05200  # multicast table array, 128 dwords
E1000_RA = 0x05400  # receive addresses: 16 pairs of RAL/RAH
E1000_VFTA = 0x05600  # VLAN filter table array, 128 dwords
E1000_WUC = 0x05800  # wake-up control
E1000_WUFC = 0x05808  # wake-up filter control
E1000_WUS = 0x05810  # wake-up status
E1000_MANC = 0x05820  # management control
E1000_IPAV = 0x05838  # IP address valid
E1000_IP4AT = 0x05840  # IPv4 address table
E1000_IP6AT = 0x05880  # IPv6 address table
E1000_WUPL = 0x05900  # wake-up packet length
E1000_WUPM = 0x05A00  # wake-up packet memory
E1000_FFLT = 0x05F00  # flexible filter length table
E1000_FFMT = 0x09000  # flexible filter mask table
E1000_FFVT = 0x09800  # flexible filter value table
E1000_PBM = 0x10000  # packet buffer memory (diagnostic window)

# Statistics (SDM 13.7): all clear on read.
E1000_CRCERRS = 0x04000
E1000_MPC = 0x04010  # missed packets
E1000_PRC64 = 0x0405C  # packets received by size: 64, 65-127, ..., 1024-1522
E1000_PRC127 = 0x04060
E1000_PRC255 = 0x04064
E1000_PRC511 = 0x04068
E1000_PRC1023 = 0x0406C
E1000_PRC1522 = 0x04070
E1000_GPRC = 0x04074  # good packets received
E1000_BPRC = 0x04078  # broadcast packets received
E1000_MPRC = 0x0407C  # multicast packets received
E1000_GPTC = 0x04080  # good packets transmitted
E1000_GORCL = 0x04088  # good octets received (64-bit, low/high)
E1000_GORCH = 0x0408C
E1000_GOTCL = 0x04090  # good octets transmitted
E1000_GOTCH = 0x04094
E1000_RNBC = 0x040A0  # receive no buffers
E1000_ROC = 0x040AC  # receive oversize
E1000_TORL = 0x040C0  # total octets received
E1000_TORH = 0x040C4
E1000_TOTL = 0x040C8  # total octets transmitted
E1000_TOTH = 0x040CC
E1000_TPR = 0x040D0  # total packets received
E1000_TPT = 0x040D4  # total packets transmitted
E1000_PTC64 = 0x040D8  # packets transmitted by size
E1000_PTC127 = 0x040DC
E1000_PTC255 = 0x040E0
E1000_PTC511 = 0x040E4
E1000_PTC1023 = 0x040E8
E1000_PTC1522 = 0x040EC
E1000_MPTC = 0x040F0  # multicast packets transmitted
E1000_BPTC = 0x040F4  # broadcast packets transmitted
E1000_TSCTC = 0x040F8  # TCP segmentation contexts transmitted
E1000_STATS_END = 0x04100

# 64-bit counters: the low half reads without clearing, reading the high half clears both.
_STATS64_LOW = frozenset((E1000_GORCL, E1000_GOTCL, E1000_TORL, E1000_TOTL))
_STATS64_HIGH = frozenset(low + 4 for low in _STATS64_LOW)

MTA_SIZE = 128  # dwords
RAR_ENTRIES = 16  # RAL/RAH pairs
VFTA_SIZE = 128  # dwords

# --- CTRL bits.
CTRL_FD = 0x0000_0001  # full duplex
CTRL_ASDE = 0x0000_0020  # auto-speed detection enable
CTRL_SLU = 0x0000_0040  # set link up
CTRL_SPD_1000 = 0x0000_0200
CTRL_SWDPIN0 = 0x0004_0000
CTRL_SWDPIN2 = 0x0010_0000
CTRL_RST = 0x0400_0000  # device reset, self-clearing
CTRL_VME = 0x4000_0000  # VLAN mode: strip on receive, insert on VLE transmit
CTRL_PHY_RST = 0x8000_0000  # PHY reset
# Power-on value as the EEPROM would load it: link forced up at 1000 Mb/s, full duplex.
CTRL_RESET = CTRL_SWDPIN2 | CTRL_SWDPIN0 | CTRL_SPD_1000 | CTRL_SLU | CTRL_ASDE | CTRL_FD

# --- STATUS bits.
STATUS_FD = 0x0000_0001
STATUS_LU = 0x0000_0002
STATUS_SPEED_1000 = 0x0000_0080
STATUS_ASDV_1000 = 0x0000_0200  # auto-speed detection value: 1000 Mb/s
STATUS_MTXCKOK = 0x0000_0400

# --- EECD bits.
EECD_SK = 0x0000_0001  # clock
EECD_CS = 0x0000_0002  # chip select
EECD_DI = 0x0000_0004  # data in (to the EEPROM)
EECD_DO = 0x0000_0008  # data out (from the EEPROM)
EECD_FWE_MASK = 0x0000_0030  # flash write enable
EECD_FWE_DIS = 0x0000_0010
EECD_REQ = 0x0000_0040  # software requests the EEPROM
EECD_GNT = 0x0000_0080  # ... and is granted it
EECD_PRES = 0x0000_0100  # an EEPROM is present
EECD_SIZE = 0x0000_0200  # 0: 64 words (6 address bits), 1: 256 words
EECD_WRITABLE = EECD_SK | EECD_CS | EECD_DI | EECD_FWE_MASK | EECD_REQ

# --- EERD bits.
EERD_START = 0x0000_0001
EERD_DONE = 0x0000_0010
EERD_ADDR_SHIFT = 8
EERD_ADDR_MASK = 0xFF
EERD_DATA_SHIFT = 16

# --- CTRL_EXT bits.
CTRL_EXT_EE_RST = 0x0000_2000  # reload from the EEPROM, self-clearing

# --- MDIC bits.
MDIC_DATA_MASK = 0x0000_FFFF
MDIC_REG_SHIFT = 16
MDIC_REG_MASK = 0x1F
MDIC_PHY_SHIFT = 21
MDIC_PHY_MASK = 0x1F
MDIC_OP_WRITE = 0x0400_0000
MDIC_OP_READ = 0x0800_0000
MDIC_READY = 0x1000_0000
MDIC_INT_EN = 0x2000_0000
MDIC_ERROR = 0x4000_0000
PHY_ADDRESS = 1  # the internal PHY's MDIO address (Linux's e1000 uses 1)

# --- Interrupt causes (ICR/ICS/IMS/IMC).
ICR_TXDW = 0x0000_0001  # transmit descriptor written back
ICR_TXQE = 0x0000_0002  # transmit queue empty
ICR_LSC = 0x0000_0004  # link status change
ICR_RXSEQ = 0x0000_0008  # receive sequence error
ICR_RXDMT0 = 0x0000_0010  # receive descriptors below the minimum threshold
ICR_RXO = 0x0000_0040  # receiver overrun
ICR_RXT0 = 0x0000_0080  # receiver timer (a frame was delivered)
ICR_MDAC = 0x0000_0200  # MDI access complete
ICR_INT_ASSERTED = 0x8000_0000  # reads set while the line is asserted
ICR_CAUSES = 0x0001_FFFF  # the cause bits an 8254x implements

# --- RCTL bits.
RCTL_EN = 0x0000_0002
RCTL_SBP = 0x0000_0004  # store bad packets
RCTL_UPE = 0x0000_0008  # unicast promiscuous
RCTL_MPE = 0x0000_0010  # multicast promiscuous
RCTL_LPE = 0x0000_0020  # long packets
RCTL_RDMTS_SHIFT = 8  # free-descriptor threshold: 1/2, 1/4, 1/8 of the ring
RCTL_RDMTS_MASK = 0x3
RCTL_MO_SHIFT = 12  # multicast offset: which 12 destination bits hash into the MTA
RCTL_MO_MASK = 0x3
RCTL_BAM = 0x0000_8000  # accept broadcast
RCTL_BSIZE_SHIFT = 16
RCTL_BSIZE_MASK = 0x3
RCTL_VFE = 0x0004_0000  # VLAN filter enable
RCTL_BSEX = 0x0200_0000  # buffer size extension (x16)
RCTL_SECRC = 0x0400_0000  # strip the Ethernet CRC

# --- TCTL bits.
TCTL_EN = 0x0000_0002
TCTL_PSP = 0x0000_0008

# --- RAH bits.
RAH_AV = 0x8000_0000  # address valid
RAH_WRITABLE = 0x8003_FFFF  # AV, ASEL, the two high address bytes

# --- Register widths.
DLEN_MASK = 0x000F_FF80  # RDLEN/TDLEN: a multiple of 128 bytes below 1 MiB
DBAL_MASK = 0xFFFF_FFF0  # RDBAL/TDBAL: 16-byte aligned
RING_INDEX_MASK = 0xFFFF
DELAY_MASK = 0xFFFF

# --- Interrupt moderation (SDM 13.4.17 ITR, 13.4.31 RDTR, 13.4.38 RADV, 13.4.44 TIDV,
# 13.4.45 TADV).
ITR_UNIT = 256e-9  # ITR counts the minimum gap between interrupts in 256 ns
DELAY_UNIT = 1.024e-6  # the delay timers count 1.024 us
DELAY_FPD = 0x8000_0000  # RDTR/TIDV "flush partial descriptor": fire the delayed cause now

# Descriptors (SDM 3.2.3, 3.3): 16 bytes each.
DESC_SIZE = 16

# Receive descriptor: buffer address, length, checksum, status, errors, special.
RXD_STAT_DD = 0x01  # descriptor done
RXD_STAT_EOP = 0x02  # end of packet
RXD_STAT_IXSM = 0x04  # ignore the checksum indications
RXD_STAT_VP = 0x08  # the frame was 802.1Q tagged; the tag is in special
RXD_ERR_RXE = 0x80  # RX data error (here: the buffer address was not guest RAM)
RXD_STATUS_OFFSET = 12
RXD_ERRORS_OFFSET = 13

# Transmit descriptor command byte (bits 24-31 of the second dword). In a context
# descriptor the same byte is TUCMD; TCP and IP share bit positions with EOP and IFCS.
TXD_CMD_EOP = 0x01  # end of packet
TXD_CMD_IFCS = 0x02  # insert FCS
TXD_CMD_IC = 0x04  # legacy: insert checksum at CSO
TXD_CMD_TSE = 0x04  # data descriptor: TCP segmentation
TXD_CMD_RS = 0x08  # report status (write DD back)
TXD_CMD_DEXT = 0x20  # extended descriptor (context or data)
TXD_CMD_VLE = 0x40  # insert the VLAN tag in special
TXD_CMD_IDE = 0x80  # interrupt delay enable
TUCMD_TCP = 0x01  # context: the L4 protocol is TCP
TUCMD_IP = 0x02  # context: IPv4 (else IPv6)
TUCMD_TSE = 0x04  # context: TCP segmentation context
TXD_DTYP_CONTEXT = 0x0
TXD_DTYP_DATA = 0x1
TXD_POPTS_IXSM = 0x01  # insert the IP checksum
TXD_POPTS_TXSM = 0x02  # insert the TCP/UDP checksum
TXD_STAT_DD = 0x01
TXD_STATUS_OFFSET = 12
TXD_LEGACY_LENGTH_MASK = 0xFFFF
TXD_DATA_LENGTH_MASK = 0xF_FFFF

_DESC = struct.Struct("<QII")  # buffer address, lower dword, upper dword
_RXD_LENGTH_CSUM = struct.Struct("<HH")
_RXD_ERRORS_SPECIAL = struct.Struct("<BH")
_CONTEXT = struct.Struct("<BBHBBHIBBH")  # the TCP/IP context descriptor, SDM 3.3.6

# --- PHY registers (IEEE 802.3 clause 22 plus the M88E1011's own).
PHY_CTRL = 0x00
PHY_STATUS = 0x01
PHY_ID1 = 0x02
PHY_ID2 = 0x03
PHY_AUTONEG_ADV = 0x04
PHY_LP_ABILITY = 0x05
PHY_AUTONEG_EXP = 0x06
PHY_1000T_CTRL = 0x09
PHY_1000T_STATUS = 0x0A
PHY_EXT_STATUS = 0x0F
M88_PHY_SPEC_CTRL = 0x10
M88_PHY_SPEC_STATUS = 0x11
M88_INT_STATUS = 0x13
M88_EXT_PHY_SPEC_CTRL = 0x14
M88_RX_ERR_CNTR = 0x15
PHY_REGISTERS = 32

MII_CR_RESTART_AUTO_NEG = 0x0200  # self-clearing
MII_CR_RESET = 0x8000  # self-clearing
# Link up, autonegotiation complete and able, 10/100 half/full, extended status.
PHY_STATUS_VALUE = 0x796D
M88E1011_I_PHY_ID = 0x0141_0C20  # what Linux's e1000_detect_gig_phy expects of an 82540
# Resolved 1000 Mb/s full duplex, link up.
M88_PHY_SPEC_STATUS_VALUE = 0xAC00

_PHY_RESET: dict[int, int] = {
    PHY_CTRL: 0x1140,  # autonegotiation enabled, full duplex, 1000 Mb/s
    PHY_STATUS: PHY_STATUS_VALUE,
    PHY_ID1: M88E1011_I_PHY_ID >> 16,
    PHY_ID2: M88E1011_I_PHY_ID & 0xFFFF,
    PHY_AUTONEG_ADV: 0x01E1,  # 10/100 half/full, IEEE 802.3 selector
    PHY_LP_ABILITY: 0x41E1,  # the partner acknowledges and offers 10/100 half/full
    PHY_AUTONEG_EXP: 0x0001,  # the partner can autonegotiate
    PHY_1000T_CTRL: 0x0300,  # advertise 1000BASE-T half and full duplex
    PHY_1000T_STATUS: 0x3C00,  # partner 1000BASE-T half/full, receivers OK
    PHY_EXT_STATUS: 0x3000,  # 1000BASE-T half/full capable
    M88_PHY_SPEC_CTRL: 0x0360,
    M88_PHY_SPEC_STATUS: M88_PHY_SPEC_STATUS_VALUE,
    M88_EXT_PHY_SPEC_CTRL: 0x0D60,
}
_PHY_READ_ONLY = frozenset(
    (
        PHY_STATUS,
        PHY_ID1,
        PHY_ID2,
        PHY_LP_ABILITY,
        PHY_AUTONEG_EXP,
        PHY_1000T_STATUS,
        PHY_EXT_STATUS,
        M88_PHY_SPEC_STATUS,
        M88_INT_STATUS,
        M88_RX_ERR_CNTR,
    )
)

# --- EEPROM (SDM 5.6, the 82540's 64-word Microwire part).
EEPROM_WORDS = 64
EEPROM_ADDRESS_BITS = 6
EEPROM_READ_OPCODE = 0b10  # after the start bit; Linux shifts out 0b110 with the start bit
EEPROM_OPCODE_BITS = 2
EEPROM_SUM = 0xBABA  # the 64 words, checksum word included, sum to this
EEPROM_ID_LED_SETTINGS = 0x04
EEPROM_INIT_CONTROL1 = 0x0A
EEPROM_SUBSYSTEM_ID = 0x0B
EEPROM_SUBSYSTEM_VENDOR_ID = 0x0C
EEPROM_DEVICE_ID = 0x0D
EEPROM_VENDOR_ID = 0x0E
EEPROM_INIT_CONTROL2 = 0x0F  # bits 12-13: pause capability (0: no flow control)
EEPROM_INIT_CONTROL3_PORT_A = 0x24  # bit 10: APM (wake-up) enable
EEPROM_CHECKSUM_REG = 0x3F

# --- Ethernet and the virtio-net header (struct virtio_net_hdr_v1).
ETH_ALEN = 6
ETH_HLEN = 14
ETH_ZLEN = 60  # shortest frame without FCS; shorter ones are padded
ETH_FCS_LEN = 4
ETH_P_8021Q = 0x8100
VLAN_HLEN = 4
VLAN_VID_MASK = 0x0FFF
MAX_FRAME_NORMAL = 1522  # with FCS and one VLAN tag: longer frames need RCTL.LPE
MAX_FRAME_LPE = 16384
BROADCAST = b"\xff" * ETH_ALEN

VIRTIO_NET_HDR_F_NEEDS_CSUM = 0x01
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
_VNET_HDR = struct.Struct("<BBHHHHH")

IPV4_MIN_HLEN = 20
IPV6_HLEN = 40
TCP_MIN_HLEN = 20
TCP_FLAGS_OFFSET = 13
TCP_FLAG_CWR = 0x80

# --- Bounds on the work one call does (the guest decides how much it asks for).
RX_BATCH = 64  # packets per rx_ready() call
RX_READ_SIZE = VNET_HDR_LEN + 0x10000 + 64  # more than any packet a tap hands out
TX_MAX_FRAME = 0x10000 + 256  # a 64 KiB TSO payload plus headers
TX_BUDGET_BYTES = 4 << 20  # frame data per TDT write; the rest continues later
TX_BUDGET_DESCRIPTORS = 4096


def _ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's-complement sum (RFC 1071) of ``data``, padded to an even length.

    Summing the whole buffer as one big-endian integer and reducing it modulo 0xFFFF gives
    the same result (2**16 is 1 modulo 0xFFFF) at C speed; a non-zero sum is never 0.
    """
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    total = int.from_bytes(raw, "big")
    if total == 0:
        return 0
    folded = total % 0xFFFF
    return folded if folded else 0xFFFF


def _ones_add(a: int, b: int) -> int:
    """One's-complement addition of two 16-bit values."""
    total = a + b
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def _store_checksum(
    frame: bytearray, start: int, end: int, position: int, *, nozero: bool = True
) -> None:
    """Put the checksum of ``frame[start:end]`` (which includes the field's current
    contents, as the hardware's does) at ``position``. With ``nozero`` (TCP/UDP) a zero
    result is sent as 0xFFFF, which means the same and is what UDP requires."""
    value = ~_ones_sum(frame[start:end]) & 0xFFFF
    if nozero and value == 0:
        value = 0xFFFF
    frame[position : position + 2] = value.to_bytes(2, "big")


def build_eeprom(
    mac: bytes,
    *,
    vendor_id: int = E1000_VENDOR_ID,
    device_id: int = E1000_DEV_ID_82540EM,
    subsystem_vendor_id: int = E1000_SUBSYSTEM_VENDOR_ID,
    subsystem_id: int = E1000_SUBSYSTEM_ID,
) -> list[int]:
    """The 64-word EEPROM image: the MAC address in words 0-2, the PCI IDs, no flow control,
    no wake-up, and the checksum word making the sum 0xBABA. Other words are 0, which
    Linux's e1000 reads as "use the defaults" where it reads them at all."""
    if len(mac) != ETH_ALEN:
        raise ValueError("a MAC address has 6 bytes")
    words = [0] * EEPROM_WORDS
    for i in range(3):
        words[i] = mac[2 * i] | mac[2 * i + 1] << 8
    words[EEPROM_SUBSYSTEM_ID] = subsystem_id
    words[EEPROM_SUBSYSTEM_VENDOR_ID] = subsystem_vendor_id
    words[EEPROM_DEVICE_ID] = device_id
    words[EEPROM_VENDOR_ID] = vendor_id
    words[EEPROM_CHECKSUM_REG] = (EEPROM_SUM - sum(words[:EEPROM_CHECKSUM_REG])) & 0xFFFF
    return words


# Plain registers: offset -> (reset value, guest-writable bits). Registers with side
# effects are here too (for their reset value) and have a handler besides.
_REGISTERS: dict[int, tuple[int, int]] = {
    E1000_CTRL: (CTRL_RESET, 0xFFFF_FFFF & ~CTRL_RST),
    E1000_STATUS: (0, 0),
    E1000_EECD: (EECD_FWE_DIS, EECD_WRITABLE),
    E1000_EERD: (0, 0xFFFF_FF01),
    E1000_CTRL_EXT: (0, 0xFFFF_FFFF & ~CTRL_EXT_EE_RST),
    E1000_FLA: (0, 0xFFFF_FFFF),
    E1000_MDIC: (0, 0),
    E1000_FCAL: (0, 0xFFFF_FFFF),
    E1000_FCAH: (0, 0xFFFF),
    E1000_FCT: (0, 0xFFFF),
    E1000_VET: (ETH_P_8021Q, 0xFFFF),
    E1000_ICR: (0, 0),
    E1000_ITR: (0, DELAY_MASK),
    E1000_ICS: (0, 0),
    E1000_IMS: (0, 0),
    E1000_IMC: (0, 0),
    E1000_RCTL: (0, 0xFFFF_FFFF),
    E1000_FCTTV: (0, 0xFFFF),
    E1000_TXCW: (0, 0xFFFF_FFFF),
    E1000_RXCW: (0, 0),
    E1000_TCTL: (0, 0xFFFF_FFFF),
    E1000_TIPG: (0, 0xFFFF_FFFF),
    E1000_AIT: (0, 0xFFFF),
    E1000_LEDCTL: (0x0706_8302, 0xFFFF_FFFF),
    E1000_PBA: (0x0010_0030, 0xFFFF_FFFF),  # 48 KiB receive, 16 KiB transmit
    E1000_FCRTL: (0, 0xFFFF_FFFF),
    E1000_FCRTH: (0, 0xFFFF_FFFF),
    E1000_RDFH: (0, 0x1FFF),
    E1000_RDFT: (0, 0x1FFF),
    E1000_RDFHS: (0, 0x1FFF),
    E1000_RDFTS: (0, 0x1FFF),
    E1000_RDFPC: (0, 0x1FFF),
    E1000_RDBAL: (0, DBAL_MASK),
    E1000_RDBAH: (0, 0xFFFF_FFFF),
    E1000_RDLEN: (0, DLEN_MASK),
    E1000_RDH: (0, RING_INDEX_MASK),
    E1000_RDT: (0, RING_INDEX_MASK),
    E1000_RDTR: (0, DELAY_MASK),
    E1000_RXDCTL: (0, 0xFFFF_FFFF),
    E1000_RADV: (0, DELAY_MASK),
    E1000_RSRPD: (0, 0xFFF),
    E1000_TXDMAC: (0, 0xFFFF_FFFF),
    E1000_TDFH: (0, 0x7FF),
    E1000_TDFT: (0, 0x7FF),
    E1000_TDFHS: (0, 0x1FFF),
    E1000_TDFTS: (0, 0x1FFF),
    E1000_TDFPC: (0, 0x1FFF),
    E1000_TDBAL: (0, DBAL_MASK),
    E1000_TDBAH: (0, 0xFFFF_FFFF),
    E1000_TDLEN: (0, DLEN_MASK),
    E1000_TDH: (0, RING_INDEX_MASK),
    E1000_TDT: (0, RING_INDEX_MASK),
    E1000_TIDV: (0, DELAY_MASK),
    E1000_TXDCTL: (0, 0xFFFF_FFFF),
    E1000_TADV: (0, DELAY_MASK),
    E1000_TSPMT: (0, 0xFFFF_FFFF),
    E1000_RXCSUM: (0x0000_0300, 0x0000_07FF),  # IP and TCP/UDP checksum offload on
    E1000_WUC: (0, 0xFFFF_FFFF),
    E1000_WUFC: (0, 0xFFFF_FFFF),
    E1000_WUS: (0, 0xFFFF_FFFF),
    E1000_MANC: (0, 0xFFFF_FFFF),
    E1000_IPAV: (0, 0xFFFF_FFFF),
    E1000_WUPL: (0, 0xFFF),
}

# Tables kept only so the guest reads back what it wrote (wake-up, flexible filters, the
# packet buffer window): [start, end) ranges, stored sparsely.
_TABLES: tuple[tuple[int, int], ...] = (
    (E1000_IP4AT, E1000_IP4AT + 7 * 8),
    (E1000_IP6AT, E1000_IP6AT + 16),
    (E1000_WUPM, E1000_WUPM + 128),
    (E1000_FFLT, E1000_FFLT + 4 * 8),
    (E1000_FFMT, E1000_FFMT + 128 * 8),
    (E1000_FFVT, E1000_FFVT + 128 * 8),
    (E1000_PBM, E1000_MMIO_SIZE),
)

# Statistics counted per frame size, with FCS (64, 65-127, ..., 1024-1522).
_SIZE_BINS = (64, 127, 255, 511, 1023, 1522)
_RX_SIZE_REGS = (
    E1000_PRC64,
    E1000_PRC127,
    E1000_PRC255,
    E1000_PRC511,
    E1000_PRC1023,
    E1000_PRC1522,
)
_TX_SIZE_REGS = (
    E1000_PTC64,
    E1000_PTC127,
    E1000_PTC255,
    E1000_PTC511,
    E1000_PTC1023,
    E1000_PTC1522,
)


@dataclass
class E1000Counters:
    """Host-side counters, for tests and metrics (the guest has its statistics registers)."""

    rx_frames: int = 0  # delivered into the ring
    rx_dropped_disabled: int = 0  # receiver off or link down
    rx_dropped_filtered: int = 0  # refused by the address or VLAN filter
    rx_dropped_oversize: int = 0  # longer than RCTL.LPE allows
    rx_dropped_no_buffers: int = 0  # did not fit the descriptors the guest gave
    rx_dropped_bad: int = 0  # malformed packet from the backend, or a DMA error
    tx_frames: int = 0  # written to the backend
    tx_dropped: int = 0  # bad descriptors, unsupported offload, backend full or failing


@dataclass
class _DelayTimer:
    """One delayed interrupt cause: a delay restarted by every event (RDTR, TIDV) and an
    absolute bound from the first one (RADV, TADV), as deadlines; None while idle."""

    delay_at: float | None = None
    absolute_at: float | None = None

    def deadline(self) -> float:
        assert self.delay_at is not None
        if self.absolute_at is None:
            return self.delay_at
        return min(self.delay_at, self.absolute_at)

    def fire(self, now: float, flush: bool) -> bool:
        """Whether the cause is due now (or flushed); if so the timer goes idle."""
        if self.delay_at is None or not (flush or now >= self.deadline()):
            return False
        self.delay_at = self.absolute_at = None
        return True


@dataclass
class _TxContext:
    """A TCP/IP context descriptor (SDM 3.3.6): where the checksums go, and TSO setup."""

    ipcss: int = 0  # IP checksum start
    ipcso: int = 0  # IP checksum offset (where the result goes)
    ipcse: int = 0  # IP checksum end, inclusive; 0 means the end of the frame
    tucss: int = 0  # TCP/UDP checksum start
    tucso: int = 0  # TCP/UDP checksum offset
    tucse: int = 0  # TCP/UDP checksum end, inclusive; 0 means the end of the frame
    paylen: int = 0  # TSO payload length
    tucmd: int = 0
    hdr_len: int = 0  # TSO: bytes of headers copied into every segment
    mss: int = 0  # TSO: payload bytes per segment

    @classmethod
    def parse(cls, desc: bytes) -> _TxContext:
        fields = _CONTEXT.unpack(desc)
        ipcss, ipcso, ipcse, tucss, tucso, tucse, cmd_and_length, _status, hdr_len, mss = fields
        paylen, tucmd = cmd_and_length & TXD_DATA_LENGTH_MASK, cmd_and_length >> 24
        return cls(ipcss, ipcso, ipcse, tucss, tucso, tucse, paylen, tucmd, hdr_len, mss)


@dataclass
class _TxPacket:
    """The frame being gathered from descriptors until EOP."""

    data: bytearray = field(default_factory=bytearray)
    started: bool = False
    extended: bool = False  # made of data descriptors (else legacy)
    popts: int = 0  # data descriptors: POPTS of the first one
    tse: bool = False  # data descriptors: TCP segmentation
    css: int = 0  # legacy: checksum start, from the first descriptor
    broken: bool = False  # a buffer was not guest RAM, or the frame grew too long


@dataclass
class _VnetHeader:
    """The virtio-net header written in front of every transmitted frame."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return _VNET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            0,
        )


@dataclass
class _Microwire:
    """The EEPROM's side of the bit-banged Microwire interface (93C46-style).

    While CS is high, each rising SK edge shifts DI in: leading zeros are ignored until the
    start bit (a 1), then come 2 opcode bits and 6 address bits. A READ then drives a dummy
    0 on DO and, on each further rising edge, the next data bit (most significant first),
    moving on to the next word after 16 bits. Dropping CS ends the command.
    """

    sk: bool = False
    cs: bool = False
    started: bool = False
    command: int = 0  # opcode and address bits shifted in after the start bit
    bits: int = 0
    reading: bool = False
    address: int = 0
    out_bit: int = 0
    do: bool = True  # DO idles high

    def restart(self) -> None:
        self.started = False
        self.command = self.bits = self.out_bit = 0
        self.reading = False
        self.do = True


class _RxState(enum.Enum):
    """What the receiver can do with the next packet from the backend."""

    DROP = "drop"  # receiver off or link down: read and discard (as the wire would)
    WAIT = "wait"  # enabled but short of descriptors: leave packets in the backend
    ACCEPT = "accept"


class _E1000IoPort:
    """BAR1, the I/O window: IOADDR selects a register, IODATA reads or writes it."""

    def __init__(self, nic: E1000) -> None:
        self._nic = nic

    def read(self, offset: int, size: int) -> int:
        return self._nic.io_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._nic.io_write(offset, size, value)


class E1000(PciFunction):
    """The 82540EM; see the module docstring.

    ``backend.fds[0]`` carries the traffic (made non-blocking here); ``mac`` is the
    permanent address the EEPROM holds. ``rx_interest(on)`` tells the board to watch the fd
    (and call :meth:`rx_ready` when it is readable) or to stop; it starts on, so the board
    watches the fd from the start. The function is the bus device of BAR0; put it on the bus
    with :meth:`PciRoot.add`.
    """

    def __init__(
        self,
        memory: GuestMemory,
        backend: NetBackend,
        mac: bytes,
        *,
        intx: Interrupt | None = None,
        rx_interest: Callable[[bool], None] = lambda on: None,
        interrupt_line: int = PCI_INTERRUPT_LINE_UNKNOWN,
        timers: TimerService | None = None,
        name: str = "e1000",
    ) -> None:
        mac = bytes(mac)
        if len(mac) != ETH_ALEN or mac[0] & 1 or mac == bytes(ETH_ALEN):
            raise ValueError(f"{name}: {mac.hex(':')} is not a unicast MAC address")
        if not backend.fds:
            raise ValueError(f"{name}: the backend has no packet fd")
        super().__init__(
            E1000_VENDOR_ID,
            E1000_DEV_ID_82540EM,
            E1000_CLASS_ETHERNET,
            revision=E1000_REVISION,
            subsystem_vendor=E1000_SUBSYSTEM_VENDOR_ID,
            subsystem_id=E1000_SUBSYSTEM_ID,
            intx=intx,
            interrupt_line=interrupt_line,
            name=name,
        )
        self.memory = memory
        self.backend = backend
        self.mac = mac
        self.eeprom = build_eeprom(mac)
        self.counters = E1000Counters()
        # Odd register accesses; DMA and ring errors; backend read/write failures; and
        # anything unexpected inside the model (caught so it never reaches the vCPU loop).
        self.bad_accesses = GuestAccessLog(name, log)
        self.dma_errors = GuestAccessLog(name, log, what="DMA errors")
        self.backend_errors = GuestAccessLog(name, log, what="backend errors")
        self.internal_errors = GuestAccessLog(name, log, what="internal errors")
        self._fd = backend.fds[0]
        self._rx_interest = rx_interest
        self._rx_interested = True
        os.set_blocking(self._fd, False)  # rx_ready reads until EAGAIN; TX never blocks
        backend.set_offloads(0)  # the guest takes only whole, checksummed frames

        self._regs: dict[int, int] = {}
        self._mta = [0] * MTA_SIZE
        self._ra = [0] * (2 * RAR_ENTRIES)
        self._ra_valid: frozenset[bytes] = frozenset()
        self._vfta = [0] * VFTA_SIZE
        self._tables: dict[int, int] = {}
        self._stats: dict[int, int] = {}
        self._phy = [0] * PHY_REGISTERS
        self._wire = _Microwire()
        self._ioaddr = 0
        self._irq_level = False
        self._tx = _TxPacket()
        self._csum_ctx = _TxContext()
        self._tso_ctx = _TxContext()
        self._tx_pending = False  # the budget ran out with descriptors left
        self._tx_budget = 0
        # Interrupt moderation: deadlines on self._timers' clock (None: not running).
        self._timers = timers
        self._throttle_until = 0.0  # ITR: no new assertion of INTA# before this
        self._rx_delay = _DelayTimer()  # RDTR/RADV for RXT0
        self._tx_delay = _DelayTimer()  # TIDV/TADV for TXDW of IDE descriptors
        self._timer_wanted: float | None = None  # earliest deadline a callback is due for

        self._read_handlers: dict[int, Callable[[], int]] = {
            E1000_STATUS: self._read_status,
            E1000_EECD: self._read_eecd,
            E1000_ICR: self._read_icr,
            E1000_ICS: lambda: self._regs[E1000_ICR],
        }
        self._write_handlers: dict[int, Callable[[int], None]] = {
            E1000_CTRL: self._write_ctrl,
            E1000_EECD: self._write_eecd,
            E1000_EERD: self._write_eerd,
            E1000_CTRL_EXT: self._write_ctrl_ext,
            E1000_MDIC: self._write_mdic,
            E1000_ICR: self._write_icr,
            E1000_ICS: self._write_ics,
            E1000_IMS: self._write_ims,
            E1000_IMC: self._write_imc,
        }
        for offset in (E1000_RCTL, E1000_RDLEN, E1000_RDH, E1000_RDT):
            self._write_handlers[offset] = functools.partial(self._write_rx_register, offset)
        for offset in (E1000_TCTL, E1000_TDT):
            self._write_handlers[offset] = functools.partial(self._write_tx_register, offset)
        self._write_handlers[E1000_RDTR] = functools.partial(self._write_delay, E1000_RDTR)
        self._write_handlers[E1000_TIDV] = functools.partial(self._write_delay, E1000_TIDV)

        self.add_bar(E1000_MMIO_BAR, E1000_MMIO_SIZE, BarKind.MEM32, self)
        self.add_bar(E1000_IO_BAR, E1000_IO_SIZE, BarKind.IO, _E1000IoPort(self))
        with self.lock:
            self._reset_state()

    # -- public entry points ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A guest read of BAR0 (the register file)."""
        with self.lock:
            try:
                return self._read_access(offset, size)
            except Exception as e:  # a model bug must not end the vCPU loop
                self._internal_error(f"read {offset:#x}/{size}", e)
                return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of BAR0."""
        with self.lock:
            try:
                self._write_access(offset, size, value)
            except Exception as e:
                self._internal_error(f"write {offset:#x}/{size}", e)

    def io_read(self, offset: int, size: int) -> int:
        """A guest read of BAR1: IOADDR, or the register it names through IODATA."""
        with self.lock:
            try:
                if size == 4 and offset == E1000_IOADDR:
                    return self._ioaddr
                if size == 4 and offset == E1000_IODATA:
                    return self._read_register(self._ioaddr & IOADDR_MASK)
                self.bad_accesses(f"I/O read at {offset:#x}/{size}")
                return 0
            except Exception as e:
                self._internal_error(f"I/O read {offset:#x}/{size}", e)
                return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        """A guest write of BAR1."""
        with self.lock:
            try:
                if size == 4 and offset == E1000_IOADDR:
                    self._ioaddr = value & IOADDR_MASK
                elif size == 4 and offset == E1000_IODATA:
                    self._write_register(self._ioaddr & IOADDR_MASK, value)
                else:
                    self.bad_accesses(f"I/O write at {offset:#x}/{size}")
            except Exception as e:
                self._internal_error(f"I/O write {offset:#x}/{size}", e)

    def rx_ready(self) -> None:
        """The backend fd is readable: receive up to :data:`RX_BATCH` packets. Called on the
        host I/O loop while the device wants packets (see ``rx_interest``)."""
        with self.lock:
            try:
                self._receive_batch()
            except Exception as e:
                self._internal_error("receive", e)

    def reset(self) -> None:
        """Reset the device as CTRL.RST does (the board calls this on a VM reset)."""
        with self.lock:
            try:
                self._device_reset()
            except Exception as e:
                self._internal_error("reset", e)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Config space write; turning bus mastering on lets pending DMA proceed."""
        with self.lock:
            before = self.command & PCI_COMMAND_MASTER
            super().config_write(offset, size, value)
            if self.command & PCI_COMMAND_MASTER != before:
                try:
                    self._transmit()
                    self._rx_recheck()
                except Exception as e:
                    self._internal_error("bus master change", e)

    @property
    def rx_interested(self) -> bool:
        """Whether the device currently wants :meth:`rx_ready` calls."""
        return self._rx_interested

    def _internal_error(self, what: str, e: Exception) -> None:
        log.debug("%s: %s failed", self.name, what, exc_info=True)
        self.internal_errors(f"{what}: {e!r}")

    # -- register access -------------------------------------------------------------------

    def _read_access(self, offset: int, size: int) -> int:
        if size == 4 and offset % 4 == 0:
            return self._read_register(offset)
        if size == 8 and offset % 8 == 0:
            low = self._read_register(offset)
            return low | self._read_register(offset + 4) << 32
        if size in (1, 2) and offset % size == 0:
            # Narrow reads see the bytes of the dword (Linux never does them).
            value = self._read_register(offset & ~3)
            return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)
        self.bad_accesses(f"{size}-byte read at {offset:#x}")
        return 0

    def _write_access(self, offset: int, size: int, value: int) -> None:
        if size == 4 and offset % 4 == 0:
            self._write_register(offset, value)
        elif size == 8 and offset % 8 == 0:
            self._write_register(offset, value & 0xFFFF_FFFF)
            self._write_register(offset + 4, value >> 32)
        else:
            # Registers are 32 bits wide: a narrow write has no defined meaning.
            self.bad_accesses(f"{size}-byte write at {offset:#x} ignored")

    def _read_register(self, offset: int) -> int:
        handler = self._read_handlers.get(offset)
        if handler is not None:
            return handler()
        if offset in _REGISTERS:
            return self._regs[offset]
        if E1000_CRCERRS <= offset < E1000_STATS_END:
            return self._read_stat(offset)
        if E1000_MTA <= offset < E1000_MTA + 4 * MTA_SIZE:
            return self._mta[(offset - E1000_MTA) >> 2]
        if E1000_RA <= offset < E1000_RA + 8 * RAR_ENTRIES:
            return self._ra[(offset - E1000_RA) >> 2]
        if E1000_VFTA <= offset < E1000_VFTA + 4 * VFTA_SIZE:
            return self._vfta[(offset - E1000_VFTA) >> 2]
        if any(start <= offset < end for start, end in _TABLES):
            return self._tables.get(offset, 0)
        self.bad_accesses(f"read of unknown register {offset:#x}")
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        value &= 0xFFFF_FFFF
        handler = self._write_handlers.get(offset)
        if handler is not None:
            handler(value)
            return
        known = _REGISTERS.get(offset)
        if known is not None:
            self._regs[offset] = value & known[1]  # read-only registers have no writable bits
        elif E1000_CRCERRS <= offset < E1000_STATS_END:
            pass  # statistics are read-only
        elif E1000_MTA <= offset < E1000_MTA + 4 * MTA_SIZE:
            self._mta[(offset - E1000_MTA) >> 2] = value
        elif E1000_RA <= offset < E1000_RA + 8 * RAR_ENTRIES:
            index = (offset - E1000_RA) >> 2
            self._ra[index] = value & RAH_WRITABLE if index % 2 else value
            self._update_ra_valid()
        elif E1000_VFTA <= offset < E1000_VFTA + 4 * VFTA_SIZE:
            self._vfta[(offset - E1000_VFTA) >> 2] = value
        elif any(start <= offset < end for start, end in _TABLES):
            self._tables[offset] = value
        else:
            self.bad_accesses(f"write of unknown register {offset:#x}")

    # -- reset -----------------------------------------------------------------------------

    def _reset_state(self) -> None:
        """Power-on values, the EEPROM's MAC in receive address 0; ICR.LSC set so a driver
        that looks sees the link come up."""
        self._regs = {offset: reset for offset, (reset, _) in _REGISTERS.items()}
        self._mta = [0] * MTA_SIZE
        self._vfta = [0] * VFTA_SIZE
        self._ra = [0] * (2 * RAR_ENTRIES)
        self._load_mac_from_eeprom()
        self._tables.clear()
        self._stats.clear()
        self._phy = [0] * PHY_REGISTERS
        for reg, value in _PHY_RESET.items():
            self._phy[reg] = value
        self._wire = _Microwire()
        self._tx = _TxPacket()
        self._csum_ctx = _TxContext()
        self._tso_ctx = _TxContext()
        self._tx_pending = False
        # Pending moderation deadlines die with the reset (a late callback finds nothing).
        self._throttle_until = 0.0
        self._rx_delay = _DelayTimer()
        self._tx_delay = _DelayTimer()
        self._regs[E1000_ICR] = ICR_LSC
        self._update_irq()
        self._rx_recheck()

    def _device_reset(self) -> None:
        self._reset_state()
        try:
            self.backend.set_offloads(0)
        except Exception as e:  # the tap went away: receiving will report it
            self.backend_errors(f"set_offloads(0) at reset: {e}")

    def _load_mac_from_eeprom(self) -> None:
        words = self.eeprom
        ral = words[0] | words[1] << 16
        rah = words[2] | RAH_AV
        self._ra[0], self._ra[1] = ral, rah
        self._update_ra_valid()

    def _update_ra_valid(self) -> None:
        valid = set()
        for i in range(RAR_ENTRIES):
            ral, rah = self._ra[2 * i], self._ra[2 * i + 1]
            if rah & RAH_AV:
                valid.add(ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little"))
        self._ra_valid = frozenset(valid)

    # -- control and status ----------------------------------------------------------------

    def _link_up(self) -> bool:
        return bool(self._regs[E1000_CTRL] & CTRL_SLU)

    def _bus_master(self) -> bool:
        return bool(self.command & PCI_COMMAND_MASTER)

    def _read_status(self) -> int:
        status = STATUS_FD | STATUS_SPEED_1000 | STATUS_ASDV_1000 | STATUS_MTXCKOK
        return status | (STATUS_LU if self._link_up() else 0)

    def _write_ctrl(self, value: int) -> None:
        if value & CTRL_RST:
            self._device_reset()
            return
        link_before = self._link_up()
        phy_reset_before = self._regs[E1000_CTRL] & CTRL_PHY_RST
        self._regs[E1000_CTRL] = value
        if value & CTRL_PHY_RST and not phy_reset_before:
            for reg in range(PHY_REGISTERS):
                self._phy[reg] = _PHY_RESET.get(reg, 0)
        if self._link_up() != link_before:
            self._raise(ICR_LSC)
            self._rx_recheck()

    def _write_ctrl_ext(self, value: int) -> None:
        if value & CTRL_EXT_EE_RST:
            self._load_mac_from_eeprom()  # what an EEPROM reload changes that we model
        self._regs[E1000_CTRL_EXT] = value & ~CTRL_EXT_EE_RST

    # -- EEPROM ----------------------------------------------------------------------------

    def _read_eecd(self) -> int:
        value = (self._regs[E1000_EECD] & EECD_WRITABLE) | EECD_PRES
        if value & EECD_REQ:
            value |= EECD_GNT  # nothing else competes for the EEPROM
        if self._wire.do:
            value |= EECD_DO
        return value

    def _write_eecd(self, value: int) -> None:
        self._regs[E1000_EECD] = value & EECD_WRITABLE
        wire = self._wire
        cs, sk, di = bool(value & EECD_CS), bool(value & EECD_SK), bool(value & EECD_DI)
        rising = sk and not wire.sk
        if cs and not wire.cs:
            wire.restart()
        wire.cs, wire.sk = cs, sk
        if not cs:
            wire.restart()
            return
        if not rising:
            return
        if wire.reading:
            word = self.eeprom[wire.address]
            wire.do = bool(word >> (15 - wire.out_bit) & 1)
            wire.out_bit += 1
            if wire.out_bit == 16:  # sequential read goes on with the next word
                wire.out_bit = 0
                wire.address = (wire.address + 1) % EEPROM_WORDS
            return
        if not wire.started:
            wire.started = di  # zeros before the start bit are ignored
            return
        if wire.bits >= EEPROM_OPCODE_BITS + EEPROM_ADDRESS_BITS:
            return  # a command we do not carry out (write, erase): ignore until CS drops
        wire.command = wire.command << 1 | di
        wire.bits += 1
        if wire.bits == EEPROM_OPCODE_BITS + EEPROM_ADDRESS_BITS:
            opcode = wire.command >> EEPROM_ADDRESS_BITS
            if opcode == EEPROM_READ_OPCODE:
                wire.reading = True
                wire.address = wire.command & (EEPROM_WORDS - 1)
                wire.out_bit = 0
                wire.do = False  # the dummy zero before the data

    def _write_eerd(self, value: int) -> None:
        if not value & EERD_START:
            self._regs[E1000_EERD] = value & ~EERD_DONE
            return
        address = (value >> EERD_ADDR_SHIFT) & EERD_ADDR_MASK
        data = self.eeprom[address] if address < EEPROM_WORDS else 0
        self._regs[E1000_EERD] = data << EERD_DATA_SHIFT | address << EERD_ADDR_SHIFT | EERD_DONE

    # -- PHY -------------------------------------------------------------------------------

    def _write_mdic(self, value: int) -> None:
        reg = (value >> MDIC_REG_SHIFT) & MDIC_REG_MASK
        phy = (value >> MDIC_PHY_SHIFT) & MDIC_PHY_MASK
        result = value & ~(MDIC_DATA_MASK | MDIC_READY | MDIC_ERROR)
        if phy != PHY_ADDRESS:
            result |= MDIC_ERROR  # nothing answers at that address
        elif value & MDIC_OP_READ and not value & MDIC_OP_WRITE:
            result |= self._phy[reg]
        elif value & MDIC_OP_WRITE and not value & MDIC_OP_READ:
            data = value & MDIC_DATA_MASK
            if reg == PHY_CTRL:
                data &= ~(MII_CR_RESET | MII_CR_RESTART_AUTO_NEG)  # done at once
            if reg not in _PHY_READ_ONLY:
                self._phy[reg] = data
            result |= value & MDIC_DATA_MASK
        else:
            result |= MDIC_ERROR
        self._regs[E1000_MDIC] = result | MDIC_READY
        if value & MDIC_INT_EN:
            self._raise(ICR_MDAC)

    # -- interrupts ------------------------------------------------------------------------

    def _raise(self, cause: int) -> None:
        if cause:
            self._regs[E1000_ICR] |= cause
            self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self._regs[E1000_ICR] & self._regs[E1000_IMS])
        if level == self._irq_level:
            return
        if level and self._timers is not None and self._regs[E1000_ITR]:
            now = self._timers.now()
            if now < self._throttle_until:
                self._arm_timer(self._throttle_until)  # assert then, if still wanted
                return
            self._throttle_until = now + self._regs[E1000_ITR] * ITR_UNIT
        self._irq_level = level
        self.set_intx(level)

    # -- interrupt moderation timers ---------------------------------------------------------

    def _delay_rx(self, cause: int) -> int:
        """RXT0 under RDTR/RADV: start (or restart) the delay; returns the causes to raise
        now (SDM 3.2.7)."""
        if cause & ICR_RXT0 and self._start_delay(self._rx_delay, E1000_RDTR, E1000_RADV):
            return cause & ~ICR_RXT0
        return cause

    def _delay_tx(self) -> bool:
        """A descriptor with IDE asks for TXDW: start (or restart) TIDV/TADV; returns
        whether TXDW is delayed (SDM 3.4.1)."""
        return self._start_delay(self._tx_delay, E1000_TIDV, E1000_TADV)

    def _start_delay(self, timer: _DelayTimer, delay_reg: int, absolute_reg: int) -> bool:
        delay = self._regs[delay_reg]
        if self._timers is None or not delay:
            return False
        now = self._timers.now()
        timer.delay_at = now + delay * DELAY_UNIT
        absolute = self._regs[absolute_reg]
        if absolute and timer.absolute_at is None:
            timer.absolute_at = now + absolute * DELAY_UNIT
        self._arm_timer(timer.deadline())
        return True

    def _arm_timer(self, when: float) -> None:
        if self._timers is None:
            return
        if self._timer_wanted is not None and self._timer_wanted <= when:
            return  # a callback comes earlier and re-arms for what is left
        self._timer_wanted = when
        self._timers.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """A deadline passed (or a stale callback: all state is re-checked here)."""
        with self.lock:
            try:
                self._timer_wanted = None
                self._fire_due_delays(flush_rx=False, flush_tx=False)
                self._update_irq()
                self._rearm()
            except Exception as e:
                self._internal_error("timer", e)

    def _fire_due_delays(self, *, flush_rx: bool, flush_tx: bool) -> None:
        now = self._timers.now() if self._timers is not None else 0.0
        if self._rx_delay.fire(now, flush_rx):
            self._regs[E1000_ICR] |= ICR_RXT0
        if self._tx_delay.fire(now, flush_tx):
            self._regs[E1000_ICR] |= ICR_TXDW

    def _rearm(self) -> None:
        deadlines = [
            t.deadline() for t in (self._rx_delay, self._tx_delay) if t.delay_at is not None
        ]
        if self._regs[E1000_ICR] & self._regs[E1000_IMS] and not self._irq_level:
            deadlines.append(self._throttle_until)
        if deadlines:
            self._arm_timer(min(deadlines))

    def _write_delay(self, offset: int, value: int) -> None:
        """RDTR/TIDV: the delay is stored; FPD (write-only) fires the pending cause now."""
        self._regs[offset] = value & DELAY_MASK
        if value & DELAY_FPD:
            self._fire_due_delays(flush_rx=offset == E1000_RDTR, flush_tx=offset == E1000_TIDV)
            self._update_irq()

    def _read_icr(self) -> int:
        icr = self._regs[E1000_ICR]
        value = icr | (ICR_INT_ASSERTED if icr & self._regs[E1000_IMS] else 0)
        self._regs[E1000_ICR] = 0  # the 82540 clears ICR on every read
        self._update_irq()
        self._resume_transmit()
        return value

    def _write_icr(self, value: int) -> None:
        self._regs[E1000_ICR] &= ~value  # write 1 to clear
        self._update_irq()

    def _write_ics(self, value: int) -> None:
        self._raise(value & ICR_CAUSES)

    def _write_ims(self, value: int) -> None:
        self._regs[E1000_IMS] |= value & ICR_CAUSES
        self._update_irq()
        self._resume_transmit()

    def _write_imc(self, value: int) -> None:
        self._regs[E1000_IMS] &= ~value
        self._update_irq()

    # -- statistics ------------------------------------------------------------------------

    def _read_stat(self, offset: int) -> int:
        if offset in _STATS64_LOW:
            return self._stats.get(offset, 0) & 0xFFFF_FFFF
        if offset in _STATS64_HIGH:
            return self._stats.pop(offset - 4, 0) >> 32
        return self._stats.pop(offset, 0)

    def _count(self, offset: int, n: int = 1) -> None:
        """Add to a statistics register; 32-bit ones stick at their maximum."""
        limit = 0xFFFF_FFFF_FFFF_FFFF if offset in _STATS64_LOW else 0xFFFF_FFFF
        self._stats[offset] = min(self._stats.get(offset, 0) + n, limit)

    def _count_size(self, registers: tuple[int, ...], length: int, n: int = 1) -> None:
        for limit, reg in zip(_SIZE_BINS, registers, strict=True):
            if length <= limit:
                self._count(reg, n)
                return

    # -- transmit --------------------------------------------------------------------------

    def _write_tx_register(self, offset: int, value: int) -> None:
        """TCTL or TDT: store, then send what the ring holds."""
        self._regs[offset] = value & _REGISTERS[offset][1]
        if offset == E1000_TDT and value > RING_INDEX_MASK:
            self.bad_accesses(f"TDT {value:#x} wider than 16 bits")
        self._transmit()

    def _resume_transmit(self) -> None:
        if self._tx_pending:
            self._transmit()

    def _transmit(self) -> None:
        """Walk the TX ring from TDH to TDT; see the module docstring."""
        self._tx_pending = False
        regs = self._regs
        if not regs[E1000_TCTL] & TCTL_EN or not self._bus_master():
            return
        count = regs[E1000_TDLEN] // DESC_SIZE
        head, tail = regs[E1000_TDH], regs[E1000_TDT]
        if head == tail:
            return
        if head >= count or tail >= count:
            self.dma_errors(f"TX ring: TDH {head}, TDT {tail} outside a {count}-entry ring")
            return
        base = regs[E1000_TDBAH] << 32 | regs[E1000_TDBAL]
        cause = 0
        self._tx_budget = TX_BUDGET_BYTES
        for _ in range(min(count, TX_BUDGET_DESCRIPTORS)):
            if head == tail or self._tx_budget <= 0:
                break
            address = base + head * DESC_SIZE
            try:
                desc = self.memory.read(address, DESC_SIZE)
            except GuestMemoryError as e:
                # TDH stays: the guest may fix the ring and write TDT again.
                self.dma_errors(f"TX descriptor {head}: {e}")
                self._raise(cause)
                return
            cause |= self._tx_descriptor(address, desc)
            head = (head + 1) % count
            regs[E1000_TDH] = head
        if head == tail:
            cause |= ICR_TXQE
        else:
            # Out of budget: go on at the guest's next ICR read, IMS or TDT write rather
            # than hold the lock (and the I/O loop waiting for it) any longer.
            self._tx_pending = True
        self._raise(cause)

    def _tx_descriptor(self, address: int, desc: bytes) -> int:
        """Handle one descriptor; returns the interrupt causes it raises."""
        buffer, lower, upper = _DESC.unpack(desc)
        cmd = lower >> 24
        if cmd & TXD_CMD_DEXT:
            dtyp = (lower >> 20) & 0xF
            if dtyp == TXD_DTYP_CONTEXT:
                context = _TxContext.parse(desc)
                if context.tucmd & TUCMD_TSE:
                    self._tso_ctx = context
                else:
                    self._csum_ctx = context
            elif dtyp == TXD_DTYP_DATA:
                packet = self._tx
                if not packet.started:
                    packet.started = packet.extended = True
                    packet.popts = (upper >> 8) & 0xFF
                    packet.tse = bool(cmd & TXD_CMD_TSE)
                self._tx_gather(buffer, lower & TXD_DATA_LENGTH_MASK)
                if cmd & TXD_CMD_EOP:
                    self._tx_finish(cmd, upper >> 16, 0)
            else:
                self.dma_errors(f"TX descriptor type {dtyp} unknown; skipped")
        else:
            packet = self._tx
            if not packet.started:
                packet.started = True
                packet.css = (upper >> 8) & 0xFF  # CSS comes from the first descriptor
            self._tx_gather(buffer, lower & TXD_LEGACY_LENGTH_MASK)
            if cmd & TXD_CMD_EOP:
                self._tx_finish(cmd, upper >> 16, (lower >> 16) & 0xFF)
        if not cmd & TXD_CMD_RS:
            return 0
        try:  # DD in the status nibble, clearing the error bits; the reserved bits stay
            status = desc[TXD_STATUS_OFFSET] & 0xF0 | TXD_STAT_DD
            self.memory.write_u8(address + TXD_STATUS_OFFSET, status)
        except GuestMemoryError as e:
            self.dma_errors(f"TX descriptor write-back: {e}")
        if cmd & TXD_CMD_IDE and self._delay_tx():
            return 0
        return ICR_TXDW

    def _tx_gather(self, buffer: int, length: int) -> None:
        packet = self._tx
        if packet.broken or length == 0 or buffer == 0:
            return  # null descriptors transfer nothing (SDM 3.3.3)
        if len(packet.data) + length > TX_MAX_FRAME:
            self.dma_errors(f"TX frame longer than {TX_MAX_FRAME} bytes; dropped")
            packet.broken = True
            packet.data = bytearray()
            return
        self._tx_budget -= length
        try:
            packet.data += self.memory.read(buffer, length)
        except GuestMemoryError as e:
            self.dma_errors(f"TX buffer: {e}; frame dropped")
            packet.broken = True
            packet.data = bytearray()

    def _tx_finish(self, cmd: int, special: int, cso: int) -> None:
        """EOP: apply the offloads the descriptors asked for and send the frame."""
        packet, self._tx = self._tx, _TxPacket()
        frame = packet.data
        if packet.broken or len(frame) < ETH_HLEN:
            if not packet.broken:
                self.dma_errors(f"TX frame of {len(frame)} bytes is shorter than a header")
            self.counters.tx_dropped += 1
            return
        header = _VnetHeader()
        segments = 1
        if packet.extended and packet.tse:
            tso = self._tx_tso(frame, packet.popts, header)
            if tso is None:
                self.counters.tx_dropped += 1
                return
            segments = tso
        elif packet.extended:
            ctx = self._csum_ctx
            if packet.popts & TXD_POPTS_IXSM:
                self._tx_ip_checksum(frame, ctx)
            if packet.popts & TXD_POPTS_TXSM:
                self._tx_l4_checksum(frame, ctx.tucss, ctx.tucso, ctx.tucse, header)
        elif cmd & TXD_CMD_IC:
            self._tx_l4_checksum(frame, packet.css, cso, 0, header)
        if cmd & TXD_CMD_VLE and self._regs[E1000_CTRL] & CTRL_VME:
            tag = self._regs[E1000_VET].to_bytes(2, "big") + special.to_bytes(2, "big")
            frame[2 * ETH_ALEN : 2 * ETH_ALEN] = tag
            if header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                header.csum_start += VLAN_HLEN
            if header.gso_type != VIRTIO_NET_HDR_GSO_NONE:
                header.hdr_len += VLAN_HLEN
        self._tx_send(header, frame, segments)

    @staticmethod
    def _tx_ip_checksum(frame: bytearray, ctx: _TxContext) -> None:
        """IXSM: the checksum over [IPCSS, IPCSE] goes to IPCSO (ignored when out of range)."""
        end = len(frame) if ctx.ipcse == 0 else min(ctx.ipcse + 1, len(frame))
        if ctx.ipcss < end and ctx.ipcso + 2 <= len(frame):
            _store_checksum(frame, ctx.ipcss, end, ctx.ipcso, nozero=False)

    def _tx_l4_checksum(
        self, frame: bytearray, start: int, position: int, end: int, header: _VnetHeader
    ) -> None:
        """TXSM or a legacy IC: the checksum from ``start`` to ``end`` (inclusive, 0 for the
        end of the frame) goes to ``position``. Up to the end of the frame the host kernel
        does it (NEEDS_CSUM); a shorter range, or a field before the start, is done here.
        Out-of-range fields are ignored, as the SDM says the hardware does."""
        length = len(frame)
        if start >= length or position + 2 > length:
            return
        stop = length if end == 0 or end + 1 >= length else end + 1
        if stop == length and position >= start:
            header.flags |= VIRTIO_NET_HDR_F_NEEDS_CSUM
            header.csum_start = start
            header.csum_offset = position - start
        elif start < stop:
            _store_checksum(frame, start, stop, position)

    def _tx_tso(self, frame: bytearray, popts: int, header: _VnetHeader) -> int | None:
        """TSE: fix the headers up for the whole super-frame and describe the segmentation
        in the virtio-net header. Returns the number of segments, or None to drop."""
        ctx = self._tso_ctx
        length = len(frame)
        if not ctx.tucmd & TUCMD_TCP:
            self.dma_errors("UDP segmentation offload is not supported; frame dropped")
            return None
        ip_header = IPV4_MIN_HLEN if ctx.tucmd & TUCMD_IP else IPV6_HLEN
        if (
            ctx.mss == 0
            or ctx.hdr_len > length
            or ctx.ipcss < ETH_HLEN
            or ctx.ipcss + ip_header > ctx.tucss
            or ctx.tucss + TCP_MIN_HLEN > ctx.hdr_len
            or not ctx.tucss <= ctx.tucso <= ctx.hdr_len - 2
        ):
            self.dma_errors(
                f"TSO context unusable (hdr_len {ctx.hdr_len}, mss {ctx.mss}, ipcss "
                f"{ctx.ipcss}, tucss {ctx.tucss}, tucso {ctx.tucso}, frame {length})"
            )
            return None
        if ctx.tucmd & TUCMD_IP:
            ip_length = length - ctx.ipcss
            gso_type = VIRTIO_NET_HDR_GSO_TCPV4
        else:
            ip_length = length - ctx.ipcss - IPV6_HLEN
            gso_type = VIRTIO_NET_HDR_GSO_TCPV6
        if ip_length > 0xFFFF:
            self.dma_errors(f"TSO frame of {length} bytes does not fit an IP packet")
            return None
        if ctx.tucmd & TUCMD_IP:  # IPv4 total length, then (IXSM) the header checksum
            frame[ctx.ipcss + 2 : ctx.ipcss + 4] = ip_length.to_bytes(2, "big")
            if popts & TXD_POPTS_IXSM:
                self._tx_ip_checksum(frame, ctx)
        else:  # IPv6 payload length
            frame[ctx.ipcss + 4 : ctx.ipcss + 6] = ip_length.to_bytes(2, "big")
        # The driver seeds the TCP checksum with a pseudo-header of length 0; the hardware
        # adds each segment's length, the host kernel wants the whole TCP length in it.
        seed = int.from_bytes(frame[ctx.tucso : ctx.tucso + 2], "big")
        frame[ctx.tucso : ctx.tucso + 2] = _ones_add(seed, length - ctx.tucss).to_bytes(2, "big")
        header.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
        header.csum_start = ctx.tucss
        header.csum_offset = ctx.tucso - ctx.tucss
        payload = length - ctx.hdr_len
        segments = max(1, -(-payload // ctx.mss))
        if segments > 1:
            if frame[ctx.tucss + TCP_FLAGS_OFFSET] & TCP_FLAG_CWR:
                gso_type |= VIRTIO_NET_HDR_GSO_ECN
            header.gso_type = gso_type
            header.gso_size = ctx.mss
            header.hdr_len = ctx.hdr_len
        self._count(E1000_TSCTC)
        return segments

    def _tx_send(self, header: _VnetHeader, frame: bytearray, segments: int) -> None:
        try:
            os.writev(self._fd, [header.pack(), frame])
        except BlockingIOError:
            self.counters.tx_dropped += 1  # the backend is full: the frame is lost on the wire
            return
        except OSError as e:
            self.backend_errors(f"TX write: {e.strerror or e}")
            self.counters.tx_dropped += 1
            return
        self.counters.tx_frames += 1
        # The guest's counters see the segments the wire would have carried.
        wire_bytes = len(frame) + (segments - 1) * header.hdr_len + segments * ETH_FCS_LEN
        dst = bytes(frame[:ETH_ALEN])
        for counter in (E1000_GPTC, E1000_TPT):
            self._count(counter, segments)
        for counter in (E1000_GOTCL, E1000_TOTL):
            self._count(counter, wire_bytes)
        if dst == BROADCAST:
            self._count(E1000_BPTC, segments)
        elif dst[0] & 1:
            self._count(E1000_MPTC, segments)
        segment = len(frame) if segments == 1 else header.hdr_len + header.gso_size
        self._count_size(_TX_SIZE_REGS, segment + ETH_FCS_LEN, segments)

    # -- receive ---------------------------------------------------------------------------

    def _write_rx_register(self, offset: int, value: int) -> None:
        """RCTL, RDLEN, RDH or RDT: store, then see whether packets can flow again."""
        self._regs[offset] = value & _REGISTERS[offset][1]
        if offset in (E1000_RDH, E1000_RDT):
            count = self._regs[E1000_RDLEN] // DESC_SIZE
            if value >= max(count, 1):
                self.dma_errors(f"RX ring: index {value} outside a {count}-entry ring")
        self._rx_recheck()

    def _rx_buffer_size(self) -> int:
        size = (self._regs[E1000_RCTL] >> RCTL_BSIZE_SHIFT) & RCTL_BSIZE_MASK
        if self._regs[E1000_RCTL] & RCTL_BSEX:
            # 16384, 8192, 4096; BSEX with BSIZE 0 is reserved: treat it as 2048.
            return 2048 if size == 0 else 32768 >> size
        return 2048 >> size

    def _rx_max_frame(self) -> int:
        """Longest frame accepted, with FCS (and a VLAN tag)."""
        return MAX_FRAME_LPE if self._regs[E1000_RCTL] & RCTL_LPE else MAX_FRAME_NORMAL

    def _rx_ring_count(self) -> int:
        return self._regs[E1000_RDLEN] // DESC_SIZE

    def _rx_free(self) -> int:
        """Descriptors the guest has handed over (0 if the ring is not usable)."""
        count = self._rx_ring_count()
        head, tail = self._regs[E1000_RDH], self._regs[E1000_RDT]
        if count == 0 or head >= count or tail >= count:
            return 0
        return (tail - head) % count

    def _rx_state(self) -> _RxState:
        if not self._regs[E1000_RCTL] & RCTL_EN or not self._link_up():
            return _RxState.DROP
        if not self._bus_master():
            return _RxState.WAIT
        free = self._rx_free()
        # Room for the longest frame the guest allows (or for as much of the ring as it can
        # ever hand over), so a packet once read always has a place to go.
        needed = -(-self._rx_max_frame() // self._rx_buffer_size())
        if free == 0 or free < min(needed, self._rx_ring_count() - 1):
            return _RxState.WAIT
        return _RxState.ACCEPT

    def _rx_recheck(self) -> None:
        self._set_rx_interest(self._rx_state() is not _RxState.WAIT)

    def _set_rx_interest(self, on: bool) -> None:
        if on == self._rx_interested:
            return
        self._rx_interested = on
        try:
            self._rx_interest(on)
        except Exception as e:
            self._internal_error(f"rx_interest({on})", e)

    def _receive_batch(self) -> None:
        cause = 0
        for _ in range(RX_BATCH):
            state = self._rx_state()
            if state is _RxState.WAIT:
                self._set_rx_interest(False)
                break
            try:
                packet = os.read(self._fd, RX_READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                self.backend_errors(f"RX read: {e.strerror or e}")
                break
            if not packet:
                # The other end is gone: stop watching an fd that is always "readable";
                # the next RDT or RCTL write looks again.
                self.backend_errors("RX: end of file on the backend")
                self._set_rx_interest(False)
                break
            if state is _RxState.DROP:
                self.counters.rx_dropped_disabled += 1
                continue
            cause |= self._rx_packet(packet)
        self._raise(self._delay_rx(cause))

    def _rx_packet(self, packet: bytes) -> int:
        """Filter one backend packet and DMA it into the ring; returns interrupt causes."""
        if len(packet) < VNET_HDR_LEN + ETH_HLEN:
            self.backend_errors(f"RX: {len(packet)}-byte packet is too short")
            self.counters.rx_dropped_bad += 1
            return 0
        flags, gso_type, _, _, csum_start, csum_offset, _ = _VNET_HDR.unpack_from(packet)
        frame = bytearray(packet[VNET_HDR_LEN:])
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            self.backend_errors("RX: GSO packet although offloads are off; dropped")
            self.counters.rx_dropped_bad += 1
            return 0
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            # The e1000 has no "checksum pending" notion: finish it as the sender would.
            position = csum_start + csum_offset
            if csum_start >= len(frame) or position + 2 > len(frame):
                self.backend_errors("RX: NEEDS_CSUM outside the frame; dropped")
                self.counters.rx_dropped_bad += 1
                return 0
            _store_checksum(frame, csum_start, len(frame), position)
        self._count(E1000_TPR)
        self._count(E1000_TORL, len(frame) + ETH_FCS_LEN)
        if len(frame) + ETH_FCS_LEN > self._rx_max_frame():
            self._count(E1000_ROC)
            self.counters.rx_dropped_oversize += 1
            return 0
        if not self._rx_accept(frame):
            self.counters.rx_dropped_filtered += 1
            return 0
        status, special = 0, 0
        regs = self._regs
        tagged = int.from_bytes(frame[12:14], "big") == regs[E1000_VET]
        if tagged and regs[E1000_CTRL] & CTRL_VME and len(frame) >= ETH_HLEN + VLAN_HLEN:
            special = int.from_bytes(frame[14:16], "big")
            del frame[12:16]
            status |= RXD_STAT_VP
        if len(frame) < ETH_ZLEN:
            frame += bytes(ETH_ZLEN - len(frame))
        if not regs[E1000_RCTL] & RCTL_SECRC:
            frame += zlib.crc32(frame).to_bytes(ETH_FCS_LEN, "little")
        return self._rx_dma(frame, status, special)

    def _rx_accept(self, frame: bytearray) -> bool:
        """The receive filter: VLAN table, then promiscuous modes, exact addresses and the
        multicast hash (SDM 3.2.1 / 13.4.22)."""
        regs = self._regs
        rctl = regs[E1000_RCTL]
        if rctl & RCTL_VFE and int.from_bytes(frame[12:14], "big") == regs[E1000_VET]:
            if len(frame) < ETH_HLEN + VLAN_HLEN:
                return False
            vid = int.from_bytes(frame[14:16], "big") & VLAN_VID_MASK
            if not self._vfta[vid >> 5] & (1 << (vid & 0x1F)):
                return False
        dst = bytes(frame[:ETH_ALEN])
        if dst[0] & 1:
            if dst == BROADCAST and rctl & RCTL_BAM:
                return True
            if rctl & RCTL_MPE:
                return True
        elif rctl & RCTL_UPE:
            return True
        if dst in self._ra_valid:
            return True
        if dst[0] & 1:
            shift = (4, 3, 2, 0)[(rctl >> RCTL_MO_SHIFT) & RCTL_MO_MASK]
            bit = ((dst[5] << 8 | dst[4]) >> shift) & 0xFFF
            return bool(self._mta[bit >> 5] & (1 << (bit & 0x1F)))
        return False

    def _rx_dma(self, data: bytearray, status: int, special: int) -> int:
        """Write ``data`` (frame and FCS) into descriptors from RDH; returns causes."""
        regs = self._regs
        count = self._rx_ring_count()
        base = regs[E1000_RDBAH] << 32 | regs[E1000_RDBAL]
        buffer_size = self._rx_buffer_size()
        head = regs[E1000_RDH]
        total = len(data)
        offset = 0
        errors = 0
        last = False
        for _ in range(count):  # every descriptor at most once, even with null buffers
            if head == regs[E1000_RDT]:
                # The guest's descriptors ran out inside the frame (null buffers, or a
                # ring too small for it): the rest is lost, as on an overrun.
                self._count(E1000_MPC)
                self._count(E1000_RNBC)
                self.counters.rx_dropped_no_buffers += 1
                return ICR_RXO
            address = base + head * DESC_SIZE
            try:
                buffer = self.memory.read_u64(address)
            except GuestMemoryError as e:
                self.dma_errors(f"RX descriptor {head}: {e}; frame dropped")
                self.counters.rx_dropped_bad += 1
                return 0
            length, errors = 0, 0
            if buffer:  # a null buffer is skipped (SDM 3.2.3)
                length = min(buffer_size, total - offset)
                try:
                    self.memory.write(buffer, data[offset : offset + length])
                    offset += length
                except GuestMemoryError as e:
                    self.dma_errors(f"RX buffer: {e}; frame dropped")
                    errors = RXD_ERR_RXE
                    length, offset = 0, total
            last = offset >= total
            desc_status = RXD_STAT_DD | RXD_STAT_IXSM | status | (RXD_STAT_EOP if last else 0)
            try:
                self.memory.write(address + 8, _RXD_LENGTH_CSUM.pack(length, 0))
                self.memory.write(
                    address + RXD_ERRORS_OFFSET, _RXD_ERRORS_SPECIAL.pack(errors, special)
                )
                # Status last: DD tells the driver the rest of the descriptor is there.
                self.memory.write_u8(address + RXD_STATUS_OFFSET, desc_status)
            except GuestMemoryError as e:
                self.dma_errors(f"RX descriptor write-back: {e}")
            head = (head + 1) % count
            regs[E1000_RDH] = head
            if last:
                break
        if not last:  # unreachable while RDH and RDT are inside the ring; kept as a bound
            self.counters.rx_dropped_no_buffers += 1
            return ICR_RXO
        if errors:
            self.counters.rx_dropped_bad += 1
            return ICR_RXT0
        self.counters.rx_frames += 1
        frame_length = total if not regs[E1000_RCTL] & RCTL_SECRC else total + ETH_FCS_LEN
        dst = bytes(data[:ETH_ALEN])
        self._count(E1000_GPRC)
        self._count(E1000_GORCL, frame_length)
        if dst == BROADCAST:
            self._count(E1000_BPRC)
        elif dst[0] & 1:
            self._count(E1000_MPRC)
        self._count_size(_RX_SIZE_REGS, frame_length)
        cause = ICR_RXT0
        threshold_shift = ((regs[E1000_RCTL] >> RCTL_RDMTS_SHIFT) & RCTL_RDMTS_MASK) + 1
        if self._rx_free() * DESC_SIZE <= regs[E1000_RDLEN] >> threshold_shift:
            cause |= ICR_RXDMT0
        return cause
