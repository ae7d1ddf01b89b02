"""Tests of the emulated Intel 82540EM, driven the way Linux's e1000 driver drives it.

The board is a :class:`PciRoot` on real port and MMIO buses with one :class:`E1000` in slot
3; the guest enables memory, I/O and bus mastering through 0xCF8/0xCFC and then talks to
BAR0 (the register file) through the MMIO bus and to BAR1 (IOADDR/IODATA) through the port
bus. Guest RAM is a small :class:`GuestMemory`; the wire is a
:class:`SocketPairNetBackend` whose peer end the test holds (every packet there is a
12-byte virtio-net header and an Ethernet frame); INTA# is a :class:`RecordingInterrupt`.
Checksums are checked against a plain RFC 1071 loop written here, not the model's own.

One test uses a real tap in a network namespace it creates (root and /dev/net/tun, as
test_tap.py): the host kernel must take a TSO frame's virtio-net header as the model writes
it and cut it into segments whose checksums are right.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import struct
import time
import zlib
from collections.abc import Iterator

import pytest
from pyroute2 import NetNS
from pyroute2 import netns as pyroute2_netns

from iovirt.backends.net import VNET_HDR_LEN, SocketPairNetBackend
from iovirt.backends.tap import IFF_NO_PI, IFF_TUN, IFREQ, TUNSETIFF, TapBackend, run_in_netns
from iovirt.bus import Bus
from iovirt.bus.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_PORTS,
    PCI_CLASS_DEVICE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_INTERRUPT,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    PciRoot,
)
from iovirt.devices.e1000 import (
    CTRL_RST,
    CTRL_SLU,
    CTRL_VME,
    E1000,
    E1000_BPRC,
    E1000_CTRL,
    E1000_CTRL_EXT,
    E1000_EECD,
    E1000_EERD,
    E1000_GORCH,
    E1000_GORCL,
    E1000_GOTCH,
    E1000_GOTCL,
    E1000_GPRC,
    E1000_GPTC,
    E1000_ICR,
    E1000_ICS,
    E1000_IMC,
    E1000_IMS,
    E1000_ITR,
    E1000_MANC,
    E1000_MDIC,
    E1000_MPC,
    E1000_MTA,
    E1000_RA,
    E1000_RADV,
    E1000_RCTL,
    E1000_RDBAH,
    E1000_RDBAL,
    E1000_RDH,
    E1000_RDLEN,
    E1000_RDT,
    E1000_RDTR,
    E1000_ROC,
    E1000_STATUS,
    E1000_TADV,
    E1000_TCTL,
    E1000_TDBAH,
    E1000_TDBAL,
    E1000_TDH,
    E1000_TDLEN,
    E1000_TDT,
    E1000_TIDV,
    E1000_TPR,
    E1000_TPT,
    E1000_TSCTC,
    E1000_VET,
    E1000_VFTA,
    EECD_CS,
    EECD_DI,
    EECD_DO,
    EECD_GNT,
    EECD_PRES,
    EECD_REQ,
    EECD_SK,
    EERD_DONE,
    EERD_START,
    ICR_INT_ASSERTED,
    ICR_LSC,
    ICR_MDAC,
    ICR_RXDMT0,
    ICR_RXT0,
    ICR_TXDW,
    ICR_TXQE,
    M88_PHY_SPEC_STATUS,
    MDIC_ERROR,
    MDIC_INT_EN,
    MDIC_OP_READ,
    MDIC_OP_WRITE,
    MDIC_READY,
    MII_CR_RESET,
    MII_CR_RESTART_AUTO_NEG,
    PHY_1000T_STATUS,
    PHY_CTRL,
    PHY_ID1,
    PHY_ID2,
    PHY_STATUS,
    RAH_AV,
    RCTL_BAM,
    RCTL_EN,
    RCTL_LPE,
    RCTL_MPE,
    RCTL_SECRC,
    RCTL_UPE,
    RCTL_VFE,
    RXD_ERR_RXE,
    RXD_STAT_DD,
    RXD_STAT_EOP,
    RXD_STAT_IXSM,
    RXD_STAT_VP,
    STATUS_FD,
    STATUS_LU,
    STATUS_SPEED_1000,
    TCTL_EN,
    TCTL_PSP,
    TUCMD_IP,
    TUCMD_TCP,
    TUCMD_TSE,
    TX_MAX_FRAME,
    TXD_CMD_DEXT,
    TXD_CMD_EOP,
    TXD_CMD_IC,
    TXD_CMD_IDE,
    TXD_CMD_IFCS,
    TXD_CMD_RS,
    TXD_CMD_TSE,
    TXD_CMD_VLE,
    TXD_DTYP_DATA,
    TXD_POPTS_IXSM,
    TXD_POPTS_TXSM,
    TXD_STAT_DD,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
)
from iovirt.interrupt import RecordingInterrupt
from iovirt.memory import GuestMemory
from iovirt.timer import ManualClock

SLOT = 3
GSI = 11
RAM = 4 << 20
MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("52540000abcd")
OTHER_MAC = bytes.fromhex("525400999999")

TX_RING = 0x10000
RX_RING = 0x20000
TX_BUFS = 0x100000
RX_BUFS = 0x200000

_VNET = struct.Struct("<BBHHHHH")
IOADDR, IODATA = 0, 4


# -- reference helpers (independent of the model) ------------------------------------------


def rfc1071(data: bytes) -> int:
    """The Internet checksum, the slow and obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fold_sum(data: bytes) -> int:
    """The folded one's-complement sum (not complemented)."""
    return ~rfc1071(data) & 0xFFFF


def ipv4_header(src: bytes, dst: bytes, payload_len: int, *, proto: int = 6) -> bytearray:
    """An IPv4 header without options, checksum 0."""
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 1, 0, 64, proto, 0, src, dst)
    )
    return header


def tcp_header(flags: int = 0x18) -> bytearray:
    return bytearray(struct.pack("!HHIIBBHHH", 1234, 80, 1000, 0, 5 << 4, flags, 65535, 0, 0))


SRC_IP, DST_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def pseudo_v4(length: int) -> bytes:
    return SRC_IP + DST_IP + struct.pack("!BBH", 0, 6, length)


def eth(dst: bytes, src: bytes = PEER_MAC, ethertype: int = 0x0800) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big")


def tcp_frame(payload: bytes, dst: bytes = PEER_MAC, src: bytes = MAC) -> bytearray:
    """Ethernet + IPv4 + TCP, checksums left 0."""
    return bytearray(
        eth(dst, src) + ipv4_header(SRC_IP, DST_IP, 20 + len(payload)) + tcp_header() + payload
    )


def vnet(flags: int = 0, gso_type: int = 0, csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return _VNET.pack(flags, gso_type, 0, 0, csum_start, csum_offset, 0)


# -- the board and a driver that does what Linux's e1000 does ------------------------------


class Board:
    def __init__(self, timers: ManualClock | None = None) -> None:
        self.memory = GuestMemory([(0, RAM)])
        self.backend = SocketPairNetBackend()
        self.irq = RecordingInterrupt()
        self.interest: list[bool] = []
        self.nic = E1000(
            self.memory,
            self.backend,
            MAC,
            intx=self.irq,
            rx_interest=self.interest.append,
            interrupt_line=GSI,
            timers=timers,
        )
        self.mmio = Bus("mmio", 1 << 32)
        self.pio = Bus("pio", 0x1_0000)
        self.root = PciRoot(self.mmio, self.pio)
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci-root")
        self.root.add(self.nic, slot=SLOT)
        self.peer = self.backend.peer_fds[0]
        self.bar0 = self.bar1 = 0
        self.tx_next = 0  # the next TX descriptor the driver fills
        self.tx_count = 0

    def cfg_read(self, reg: int, size: int) -> int:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | SLOT << 11 | reg & 0xFC)
        return self.pio.read(CONFIG_DATA_PORT + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | SLOT << 11 | reg & 0xFC)
        self.pio.write(CONFIG_DATA_PORT + (reg & 3), size, value)

    def enable(self) -> None:
        """pci_enable_device() + pci_set_master()."""
        self.bar0 = self.cfg_read(0x10, 4) & ~0xF
        self.bar1 = self.cfg_read(0x14, 4) & ~0x3
        self.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER)

    def r32(self, reg: int) -> int:
        return self.mmio.read(self.bar0 + reg, 4)

    def w32(self, reg: int, value: int) -> None:
        self.mmio.write(self.bar0 + reg, 4, value)

    def io_r32(self, reg: int) -> int:
        self.pio.write(self.bar1 + IOADDR, 4, reg)
        return self.pio.read(self.bar1 + IODATA, 4)

    def io_w32(self, reg: int, value: int) -> None:
        self.pio.write(self.bar1 + IOADDR, 4, reg)
        self.pio.write(self.bar1 + IODATA, 4, value)

    def reset_hw(self) -> None:
        """e1000_reset_hw() for an 82540."""
        self.w32(E1000_IMC, 0xFFFF_FFFF)
        self.w32(E1000_RCTL, 0)
        self.w32(E1000_TCTL, TCTL_PSP)
        ctrl = self.r32(E1000_CTRL)
        self.io_w32(E1000_CTRL, ctrl | CTRL_RST)  # the 82540 takes its reset through I/O
        self.w32(E1000_MANC, self.r32(E1000_MANC) & ~0x2000)
        self.w32(E1000_IMC, 0xFFFF_FFFF)
        self.r32(E1000_ICR)

    # PHY through MDIC (e1000_read_phy_reg_ex / e1000_write_phy_reg_ex)
    def phy_read(self, reg: int, phy: int = 1) -> int:
        self.w32(E1000_MDIC, reg << 16 | phy << 21 | MDIC_OP_READ)
        mdic = self.r32(E1000_MDIC)
        assert mdic & MDIC_READY
        if mdic & MDIC_ERROR:
            raise OSError("MDI error")
        return mdic & 0xFFFF

    def phy_write(self, reg: int, value: int) -> None:
        self.w32(E1000_MDIC, value | reg << 16 | 1 << 21 | MDIC_OP_WRITE)
        mdic = self.r32(E1000_MDIC)
        assert mdic & MDIC_READY and not mdic & MDIC_ERROR

    # EEPROM through EERD and through the Microwire bit-bang of e1000_read_eeprom()
    def eerd_read(self, word: int) -> int:
        self.w32(E1000_EERD, word << 8 | EERD_START)
        value = self.r32(E1000_EERD)
        assert value & EERD_DONE
        return value >> 16

    def _shift_out(self, data: int, count: int) -> None:
        eecd = self.r32(E1000_EECD) & ~EECD_DO
        mask = 1 << (count - 1)
        while mask:
            eecd = eecd & ~EECD_DI | (EECD_DI if data & mask else 0)
            self.w32(E1000_EECD, eecd)
            eecd |= EECD_SK
            self.w32(E1000_EECD, eecd)
            eecd &= ~EECD_SK
            self.w32(E1000_EECD, eecd)
            mask >>= 1
        self.w32(E1000_EECD, eecd & ~EECD_DI)

    def _shift_in(self, count: int) -> int:
        eecd = self.r32(E1000_EECD) & ~(EECD_DO | EECD_DI)
        data = 0
        for _ in range(count):
            data <<= 1
            eecd |= EECD_SK
            self.w32(E1000_EECD, eecd)
            eecd = self.r32(E1000_EECD) & ~EECD_DI
            if eecd & EECD_DO:
                data |= 1
            eecd &= ~EECD_SK
            self.w32(E1000_EECD, eecd)
        return data

    def microwire_read(self, first: int, words: int) -> list[int]:
        eecd = self.r32(E1000_EECD) | EECD_REQ
        self.w32(E1000_EECD, eecd)
        eecd = self.r32(E1000_EECD)
        assert eecd & EECD_GNT
        eecd &= ~(EECD_DI | EECD_SK)
        self.w32(E1000_EECD, eecd)
        self.w32(E1000_EECD, eecd | EECD_CS)
        out = []
        for i in range(words):
            self._shift_out(0b110, 3)  # READ, with the start bit
            self._shift_out(first + i, 6)
            out.append(self._shift_in(16))
            # e1000_standby_eeprom()
            eecd = self.r32(E1000_EECD) & ~(EECD_CS | EECD_SK)
            self.w32(E1000_EECD, eecd)
            self.w32(E1000_EECD, eecd | EECD_SK)
            self.w32(E1000_EECD, eecd | EECD_SK | EECD_CS)
            self.w32(E1000_EECD, eecd | EECD_CS)
        # e1000_release_eeprom()
        eecd = self.r32(E1000_EECD) & ~(EECD_CS | EECD_DI)
        self.w32(E1000_EECD, eecd)
        self.w32(E1000_EECD, eecd | EECD_SK)
        self.w32(E1000_EECD, eecd)
        self.w32(E1000_EECD, eecd & ~EECD_REQ)
        return out

    # Rings
    def setup_tx(self, count: int = 8, ring: int = TX_RING) -> None:
        self.w32(E1000_TDBAL, ring & 0xFFFF_FFFF)
        self.w32(E1000_TDBAH, ring >> 32)
        self.w32(E1000_TDLEN, count * 16)
        self.w32(E1000_TDH, 0)
        self.w32(E1000_TDT, 0)
        self.w32(E1000_TCTL, TCTL_EN | TCTL_PSP)
        self.tx_next = 0
        self.tx_count = count

    def tx_desc(self, index: int) -> int:
        return TX_RING + 16 * index

    def put_legacy(
        self, data: bytes, cmd: int = TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS, **fields: int
    ) -> int:
        """Queue one legacy descriptor at tx_next (buffer in TX_BUFS); returns its index."""
        index = self.tx_next
        buf = TX_BUFS + 0x10000 * index
        self.memory.write(buf, data)
        lower = len(data) | fields.get("cso", 0) << 16 | cmd << 24
        upper = fields.get("css", 0) << 8 | fields.get("special", 0) << 16
        self.memory.write(self.tx_desc(index), struct.pack("<QII", buf, lower, upper))
        self.tx_next = (index + 1) % self.tx_count
        return index

    def put_raw(self, desc: bytes) -> int:
        index = self.tx_next
        self.memory.write(self.tx_desc(index), desc)
        self.tx_next = (index + 1) % self.tx_count
        return index

    def put_context(self, *, ipcss: int = 0, ipcso: int = 0, ipcse: int = 0, tucss: int = 0,
                    tucso: int = 0, tucse: int = 0, paylen: int = 0, tucmd: int = 0,
                    hdr_len: int = 0, mss: int = 0) -> int:  # fmt: skip
        cmd_len = paylen | (tucmd | TXD_CMD_DEXT) << 24
        desc = struct.pack(
            "<BBHBBHIBBH", ipcss, ipcso, ipcse, tucss, tucso, tucse, cmd_len, 0, hdr_len, mss
        )
        return self.put_raw(desc)

    def put_data(self, data: bytes, cmd: int, popts: int = 0, special: int = 0) -> int:
        index = self.tx_next
        buf = TX_BUFS + 0x10000 * index
        self.memory.write(buf, data)
        lower = len(data) | TXD_DTYP_DATA << 20 | (cmd | TXD_CMD_DEXT) << 24
        upper = popts << 8 | special << 16
        return self.put_raw(struct.pack("<QII", buf, lower, upper))

    def kick_tx(self) -> None:
        self.w32(E1000_TDT, self.tx_next)

    def setup_rx(self, count: int = 8, rctl: int = RCTL_BAM, tail: int | None = None,
                 buffer_size: int = 2048) -> None:  # fmt: skip
        for i in range(count):
            self.memory.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUFS + 0x4000 * i, 0))
        self.w32(E1000_RDBAL, RX_RING)
        self.w32(E1000_RDBAH, 0)
        self.w32(E1000_RDLEN, count * 16)
        self.w32(E1000_RDH, 0)
        self.w32(E1000_RCTL, rctl | RCTL_EN)
        self.w32(E1000_RDT, count - 1 if tail is None else tail)

    def rx_desc(self, index: int) -> tuple[int, int, int, int, int]:
        """(length, csum, status, errors, special) of RX descriptor ``index``."""
        _, length, csum, status, errors, special = struct.unpack(
            "<QHHBBH", self.memory.read(RX_RING + 16 * index, 16)
        )
        return length, csum, status, errors, special

    def rx_data(self, index: int, length: int) -> bytes:
        return self.memory.read(RX_BUFS + 0x4000 * index, length)

    # The wire
    def send(self, frame: bytes, header: bytes | None = None) -> None:
        os.write(self.peer, (header if header is not None else vnet()) + frame)

    def recv(self, timeout: float = 1.0) -> tuple[tuple[int, ...], bytes]:
        ready, _, _ = select.select([self.peer], [], [], timeout)
        assert ready, "nothing was transmitted"
        packet = os.read(self.peer, 1 << 17)
        return _VNET.unpack(packet[:VNET_HDR_LEN]), packet[VNET_HDR_LEN:]

    def nothing_sent(self) -> bool:
        ready, _, _ = select.select([self.peer], [], [], 0)
        return not ready

    def close(self) -> None:
        self.backend.close()
        self.memory.close()


@pytest.fixture
def raw_board() -> Iterator[Board]:
    board = Board()
    yield board
    board.close()


@pytest.fixture
def board(raw_board: Board) -> Board:
    raw_board.enable()
    raw_board.reset_hw()
    return raw_board


# -- identity, reset, EEPROM, PHY -----------------------------------------------------------


def test_pci_identity_and_bars(raw_board: Board) -> None:
    b = raw_board
    assert b.cfg_read(PCI_VENDOR_ID, 2) == 0x8086
    assert b.cfg_read(PCI_DEVICE_ID, 2) == 0x100E
    assert b.cfg_read(PCI_REVISION_ID, 1) == 3
    assert b.cfg_read(PCI_CLASS_DEVICE, 2) == 0x0200 and b.cfg_read(PCI_CLASS_PROG, 1) == 0
    assert b.cfg_read(PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x8086
    assert b.cfg_read(PCI_SUBSYSTEM_ID, 2) == 0x001E
    assert b.cfg_read(PCI_INTERRUPT_PIN, 1) == 1 and b.cfg_read(PCI_INTERRUPT_LINE, 1) == GSI
    # BAR sizing as pci_read_bases does it, decode off.
    sizes = []
    for reg in (0x10, 0x14):
        old = b.cfg_read(reg, 4)
        b.cfg_write(reg, 4, 0xFFFF_FFFF)
        sizes.append(b.cfg_read(reg, 4))
        b.cfg_write(reg, 4, old)
    assert sizes[0] & 0xF == 0 and (~sizes[0] & 0xFFFF_FFF0) + 0x10 == 0x20000  # mem32
    assert sizes[1] & 0x3 == 1 and (~sizes[1] & 0xFFFF_FFFC) + 4 == 0x40  # I/O, 64 ports


def test_io_bar_reaches_the_register_file(board: Board) -> None:
    assert board.io_r32(E1000_STATUS) == board.r32(E1000_STATUS)
    board.io_w32(E1000_RA + 8, 0x1122_3344)
    assert board.r32(E1000_RA + 8) == 0x1122_3344
    board.pio.write(board.bar1 + IOADDR, 4, E1000_RA + 8)
    assert board.pio.read(board.bar1 + IOADDR, 4) == E1000_RA + 8


def test_ctrl_rst_through_io_restores_reset_values(board: Board) -> None:
    board.w32(E1000_RA + 8, 0xDEAD_BEEF)
    board.w32(E1000_RA + 12, RAH_AV | 0x1234)
    board.w32(E1000_MTA + 12, 0x8000_0000)
    board.w32(E1000_IMS, ICR_RXT0)
    board.setup_rx()
    board.setup_tx()
    board.reset_hw()
    assert not board.r32(E1000_CTRL) & CTRL_RST  # self-clearing
    assert board.r32(E1000_CTRL) & CTRL_SLU
    status = board.r32(E1000_STATUS)
    assert status & STATUS_LU and status & STATUS_FD and status & STATUS_SPEED_1000
    for reg in (E1000_IMS, E1000_RCTL, E1000_RDLEN, E1000_RDT, E1000_TDLEN, E1000_TDT):
        assert board.r32(reg) == 0, hex(reg)
    assert board.r32(E1000_TCTL) == 0  # the PSP written before the reset is gone too
    assert board.r32(E1000_RA + 8) == 0 and board.r32(E1000_RA + 12) == 0
    assert board.r32(E1000_MTA + 12) == 0
    assert board.r32(E1000_RA) == int.from_bytes(MAC[:4], "little")
    assert board.r32(E1000_RA + 4) == RAH_AV | int.from_bytes(MAC[4:], "little")
    assert board.r32(E1000_EECD) & EECD_PRES
    assert board.r32(E1000_VET) == 0x8100
    assert not board.irq.level


def test_reset_raises_lsc_for_the_driver_to_see(board: Board) -> None:
    board.io_w32(E1000_CTRL, board.r32(E1000_CTRL) | CTRL_RST)
    assert board.r32(E1000_ICR) & ICR_LSC
    assert board.r32(E1000_ICR) == 0


def test_eeprom_through_eerd_has_mac_and_valid_checksum(board: Board) -> None:
    words = [board.eerd_read(i) for i in range(64)]
    assert sum(words) & 0xFFFF == 0xBABA
    mac = b"".join(w.to_bytes(2, "little") for w in words[:3])
    assert mac == MAC
    assert words[0x0D] == 0x100E and words[0x0E] == 0x8086


def test_eeprom_microwire_bitbang_matches_eerd(board: Board) -> None:
    words = board.microwire_read(0, 64)
    assert words == [board.eerd_read(i) for i in range(64)]
    assert sum(words) & 0xFFFF == 0xBABA
    assert words[:3] == [MAC[0] | MAC[1] << 8, MAC[2] | MAC[3] << 8, MAC[4] | MAC[5] << 8]
    # One word at a time from the middle, as e1000_read_eeprom(hw, offset, 1) does.
    assert board.microwire_read(0x3F, 1) == [words[0x3F]]
    assert not board.r32(E1000_EECD) & (EECD_REQ | EECD_GNT)


def test_eeprom_reload_restores_receive_address_0(board: Board) -> None:
    board.w32(E1000_RA, 0)
    board.w32(E1000_RA + 4, 0)
    board.w32(E1000_CTRL_EXT, board.r32(E1000_CTRL_EXT) | 0x2000)  # EE_RST
    assert board.r32(E1000_RA + 4) == RAH_AV | int.from_bytes(MAC[4:], "little")
    assert not board.r32(E1000_CTRL_EXT) & 0x2000


def test_phy_through_mdic_reports_m88_with_gigabit_link(board: Board) -> None:
    assert board.phy_read(PHY_ID1) << 16 | board.phy_read(PHY_ID2) == 0x0141_0C20
    status = board.phy_read(PHY_STATUS)
    assert status & 0x0004 and status & 0x0020  # link up, autonegotiation complete
    assert board.phy_read(M88_PHY_SPEC_STATUS) & 0xC000 == 0x8000  # 1000 Mb/s
    assert board.phy_read(PHY_1000T_STATUS) & 0x0800  # partner 1000BASE-T full duplex
    # A soft reset and a restart of autonegotiation finish at once (self-clearing bits).
    board.phy_write(PHY_CTRL, board.phy_read(PHY_CTRL) | MII_CR_RESET | MII_CR_RESTART_AUTO_NEG)
    assert not board.phy_read(PHY_CTRL) & (MII_CR_RESET | MII_CR_RESTART_AUTO_NEG)
    board.phy_write(PHY_STATUS, 0)  # read-only: ignored
    assert board.phy_read(PHY_STATUS) == status
    with pytest.raises(OSError):
        board.phy_read(PHY_STATUS, phy=2)  # no PHY at address 2


def test_mdic_interrupt_on_completion(board: Board) -> None:
    board.w32(E1000_IMS, ICR_MDAC)
    board.w32(E1000_MDIC, PHY_ID1 << 16 | 1 << 21 | MDIC_OP_READ | MDIC_INT_EN)
    assert board.irq.level
    assert board.r32(E1000_ICR) & ICR_MDAC


# -- interrupts ------------------------------------------------------------------------------


def test_icr_ims_imc_ics_and_the_intx_line(board: Board) -> None:
    board.w32(E1000_ICS, ICR_LSC | ICR_RXT0)
    assert not board.irq.level  # masked
    board.w32(E1000_IMS, ICR_RXT0)
    assert board.irq.level
    assert board.cfg_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT
    assert board.r32(E1000_IMS) == ICR_RXT0
    board.w32(E1000_IMC, ICR_RXT0)
    assert not board.irq.level and board.r32(E1000_IMS) == 0
    board.w32(E1000_IMS, ICR_RXT0 | ICR_LSC)
    assert board.irq.level
    icr = board.r32(E1000_ICR)  # read-to-clear
    assert icr == ICR_LSC | ICR_RXT0 | ICR_INT_ASSERTED
    assert not board.irq.level
    assert board.r32(E1000_ICR) == 0
    board.w32(E1000_ICS, ICR_LSC | ICR_TXDW)
    board.w32(E1000_ICR, ICR_LSC)  # write 1 to clear
    assert board.r32(E1000_ICR) == ICR_TXDW  # unmasked cause: no INT_ASSERTED
    assert board.irq.transitions == [True, False, True, False, True, False]


def test_slu_toggle_changes_link_and_raises_lsc(board: Board) -> None:
    board.w32(E1000_IMS, ICR_LSC)
    ctrl = board.r32(E1000_CTRL)
    board.w32(E1000_CTRL, ctrl & ~CTRL_SLU)
    assert not board.r32(E1000_STATUS) & STATUS_LU
    assert board.r32(E1000_ICR) & ICR_LSC
    board.w32(E1000_CTRL, ctrl | CTRL_SLU)
    assert board.r32(E1000_STATUS) & STATUS_LU
    assert board.irq.level and board.r32(E1000_ICR) & ICR_LSC


# -- transmit --------------------------------------------------------------------------------


def test_tx_legacy_frame_reaches_the_backend(board: Board) -> None:
    board.setup_tx()
    board.w32(E1000_IMS, ICR_TXDW)
    frame = bytes(tcp_frame(b"hello"))
    index = board.put_legacy(frame)
    board.kick_tx()
    header, data = board.recv()
    assert header == (0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 0)
    assert data == frame
    assert board.memory.read_u8(board.tx_desc(index) + 12) & TXD_STAT_DD
    assert board.r32(E1000_TDH) == 1
    assert board.irq.level
    assert board.r32(E1000_ICR) & (ICR_TXDW | ICR_TXQE) == ICR_TXDW | ICR_TXQE
    assert board.r32(E1000_GPTC) == 1 and board.r32(E1000_TPT) == 1
    assert board.r32(E1000_GOTCL) == len(frame) + 4


def test_tx_frame_over_several_descriptors_and_dd_only_with_rs(board: Board) -> None:
    board.setup_tx()
    frame = bytes(tcp_frame(bytes(range(200))))
    parts = [frame[:14], frame[14:100], frame[100:]]
    first = board.put_legacy(parts[0], cmd=0)
    board.put_legacy(parts[1], cmd=0)
    last = board.put_legacy(parts[2])
    board.kick_tx()
    _, data = board.recv()
    assert data == frame
    assert not board.memory.read_u8(board.tx_desc(first) + 12) & TXD_STAT_DD
    assert board.memory.read_u8(board.tx_desc(last) + 12) & TXD_STAT_DD


def test_tx_waits_for_tctl_en(board: Board) -> None:
    board.setup_tx()
    board.w32(E1000_TCTL, TCTL_PSP)
    board.put_legacy(bytes(tcp_frame(b"x")))
    board.kick_tx()
    assert board.nothing_sent() and board.r32(E1000_TDH) == 0
    board.w32(E1000_TCTL, TCTL_PSP | TCTL_EN)
    board.recv()
    assert board.r32(E1000_TDH) == 1


def test_tx_ring_wraps_around(board: Board) -> None:
    board.setup_tx(count=8)
    # Start near the end of the ring, as a driver does after running a while.
    board.w32(E1000_TDH, 6)
    board.w32(E1000_TDT, 6)
    board.tx_next = 6
    frames = [bytes(tcp_frame(bytes([i]) * (10 + i))) for i in range(5)]
    indexes = [board.put_legacy(f) for f in frames]
    assert indexes == [6, 7, 0, 1, 2]
    board.kick_tx()
    assert [board.recv()[1] for _ in frames] == frames
    assert board.r32(E1000_TDH) == 3
    assert all(board.memory.read_u8(board.tx_desc(i) + 12) & TXD_STAT_DD for i in indexes)


def test_tx_checksum_offload_with_context_descriptor(board: Board) -> None:
    """e1000_tx_csum(): a context descriptor, then data descriptors with TXSM (and IXSM)."""
    board.setup_tx()
    payload = bytes(range(77))
    frame = tcp_frame(payload)
    tcp_len = 20 + len(payload)
    # CHECKSUM_PARTIAL as the stack leaves it: the pseudo-header sum in the TCP field.
    frame[50:52] = fold_sum(pseudo_v4(tcp_len)).to_bytes(2, "big")
    board.put_context(ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, tucmd=TUCMD_TCP | TUCMD_IP)
    board.put_data(bytes(frame[:40]), cmd=0, popts=TXD_POPTS_IXSM | TXD_POPTS_TXSM)
    board.put_data(bytes(frame[40:]), cmd=TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS)
    board.kick_tx()
    (flags, gso, _, _, start, offset, _), data = board.recv()
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM and gso == VIRTIO_NET_HDR_GSO_NONE
    assert (start, offset) == (34, 16)
    assert rfc1071(data[14:34]) == 0  # the IP header checksum was inserted
    # Finish what NEEDS_CSUM asks of the host, then check against the real TCP checksum.
    done = bytearray(data)
    done[50:52] = rfc1071(bytes(done[34:])).to_bytes(2, "big")
    assert rfc1071(pseudo_v4(tcp_len) + bytes(done[34:])) == 0


def test_tx_checksum_with_end_before_frame_end_is_computed(board: Board) -> None:
    board.setup_tx()
    frame = tcp_frame(bytes(40))
    board.put_context(tucss=34, tucso=50, tucse=60)  # stops before the end of the frame
    board.put_data(bytes(frame), cmd=TXD_CMD_EOP | TXD_CMD_RS, popts=TXD_POPTS_TXSM)
    board.kick_tx()
    (flags, *_), data = board.recv()
    assert flags == 0
    assert rfc1071(data[34:61]) == 0


def test_tx_legacy_insert_checksum(board: Board) -> None:
    board.setup_tx()
    frame = tcp_frame(b"legacy checksum")
    board.put_legacy(bytes(frame), cmd=TXD_CMD_EOP | TXD_CMD_IC | TXD_CMD_RS, css=34, cso=50)
    board.kick_tx()
    (flags, _, _, _, start, offset, _), _ = board.recv()
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM and (start, offset) == (34, 16)


def test_tx_tso_becomes_a_gso_frame_with_fixed_headers(board: Board) -> None:
    """e1000_tso(): IPv4 tot_len and check zeroed, TCP check seeded without length."""
    board.setup_tx()
    payload = bytes(random.Random(1).randbytes(3000))
    frame = tcp_frame(payload)
    frame[16:18] = b"\0\0"  # iph->tot_len = 0
    frame[50:52] = fold_sum(pseudo_v4(0)).to_bytes(2, "big")
    hdr_len = 54
    board.put_context(
        ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, paylen=len(payload),
        tucmd=TUCMD_TCP | TUCMD_IP | TUCMD_TSE, hdr_len=hdr_len, mss=1448,
    )  # fmt: skip
    tso = TXD_CMD_TSE
    popts = TXD_POPTS_IXSM | TXD_POPTS_TXSM
    board.put_data(bytes(frame[:hdr_len]), cmd=tso, popts=popts)
    board.put_data(bytes(frame[hdr_len:]), cmd=tso | TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS)
    board.kick_tx()
    (flags, gso, vhdr_len, gso_size, start, offset, _), data = board.recv()
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert gso == VIRTIO_NET_HDR_GSO_TCPV4 and gso_size == 1448 and vhdr_len == hdr_len
    assert (start, offset) == (34, 16)
    assert int.from_bytes(data[16:18], "big") == len(frame) - 14
    assert rfc1071(data[14:34]) == 0
    tcp_len = len(frame) - 34
    assert int.from_bytes(data[50:52], "big") == fold_sum(pseudo_v4(tcp_len))
    assert data[54:] == payload
    assert board.r32(E1000_TSCTC) == 1
    assert board.r32(E1000_GPTC) == 3  # the segments the wire carries


def test_tx_tso_ipv6(board: Board) -> None:
    board.setup_tx()
    payload = bytes(2000)
    ip6 = bytearray(40)
    ip6[0] = 0x60
    ip6[6] = 6
    frame = bytearray(eth(PEER_MAC, MAC, 0x86DD)) + ip6 + tcp_header() + payload
    board.put_context(
        ipcss=14, tucss=54, tucso=70, tucmd=TUCMD_TCP | TUCMD_TSE, hdr_len=74, mss=1000
    )
    board.put_data(bytes(frame), cmd=TXD_CMD_TSE | TXD_CMD_EOP | TXD_CMD_RS, popts=TXD_POPTS_TXSM)
    board.kick_tx()
    (_, gso, hdr_len, gso_size, start, offset, _), data = board.recv()
    assert gso == VIRTIO_NET_HDR_GSO_TCPV6 and (hdr_len, gso_size) == (74, 1000)
    assert (start, offset) == (54, 16)
    assert int.from_bytes(data[18:20], "big") == len(frame) - 54  # payload length


def test_tx_vlan_tag_insertion(board: Board) -> None:
    board.setup_tx()
    board.w32(E1000_CTRL, board.r32(E1000_CTRL) | CTRL_VME)
    frame = bytes(tcp_frame(b"vlan"))
    board.put_legacy(frame, cmd=TXD_CMD_EOP | TXD_CMD_VLE | TXD_CMD_RS, special=0x2005)
    board.kick_tx()
    _, data = board.recv()
    assert data == frame[:12] + b"\x81\x00\x20\x05" + frame[12:]


# -- receive ---------------------------------------------------------------------------------


def test_rx_frame_lands_in_the_ring(board: Board) -> None:
    board.setup_rx()
    board.w32(E1000_IMS, ICR_RXT0)
    frame = eth(MAC) + bytes(range(100))
    board.send(frame)
    board.nic.rx_ready()
    length, _, status, errors, _ = board.rx_desc(0)
    assert status == RXD_STAT_DD | RXD_STAT_EOP | RXD_STAT_IXSM and errors == 0
    assert length == len(frame) + 4  # with the FCS, which Linux's e1000 strips
    assert board.rx_data(0, length) == frame + zlib.crc32(frame).to_bytes(4, "little")
    assert board.r32(E1000_RDH) == 1
    assert board.irq.level and board.r32(E1000_ICR) & ICR_RXT0
    assert board.r32(E1000_GPRC) == 1 and board.r32(E1000_TPR) == 1
    assert board.r32(E1000_GORCL) == len(frame) + 4


def test_rx_runt_is_padded_and_secrc_strips_fcs(board: Board) -> None:
    board.setup_rx(rctl=RCTL_BAM | RCTL_SECRC)
    arp = eth(b"\xff" * 6, ethertype=0x0806) + bytes(28)  # 42 bytes
    board.send(arp)
    board.nic.rx_ready()
    length, *_ = board.rx_desc(0)
    assert length == 60
    assert board.rx_data(0, 60) == arp + bytes(18)
    assert board.r32(E1000_BPRC) == 1


def test_rx_frame_spills_over_small_buffers(board: Board) -> None:
    board.setup_rx(rctl=RCTL_BAM | RCTL_LPE | 3 << 16)  # BSIZE 256
    frame = eth(MAC) + bytes(random.Random(2).randbytes(600))
    board.send(frame)
    board.nic.rx_ready()
    data = frame + zlib.crc32(frame).to_bytes(4, "little")
    descs = [board.rx_desc(i) for i in range(3)]
    assert [d[0] for d in descs] == [256, 256, len(data) - 512]
    assert [d[2] & RXD_STAT_EOP for d in descs] == [0, 0, RXD_STAT_EOP]
    assert all(d[2] & RXD_STAT_DD for d in descs)
    assert b"".join(board.rx_data(i, descs[i][0]) for i in range(3)) == data
    assert board.r32(E1000_RDH) == 3


def test_rx_oversize_without_lpe_is_dropped(board: Board) -> None:
    board.setup_rx()
    board.send(eth(MAC) + bytes(1600))
    board.nic.rx_ready()
    assert board.r32(E1000_RDH) == 0 and board.r32(E1000_ROC) == 1


def test_rx_filter(board: Board) -> None:
    board.setup_rx(count=32, rctl=0)
    mcast = bytes.fromhex("01005e000001")

    def delivered(frame: bytes) -> bool:
        before = board.r32(E1000_RDH)
        board.send(frame + bytes(50))
        board.nic.rx_ready()
        return board.r32(E1000_RDH) != before

    assert delivered(eth(MAC))  # RAL/RAH[0] from the EEPROM
    assert not delivered(eth(OTHER_MAC))
    assert not delivered(eth(b"\xff" * 6))  # BAM off
    assert not delivered(eth(mcast))
    # A second exact address, as e1000_set_rx_mode adds unicast addresses.
    board.w32(E1000_RA + 8, int.from_bytes(OTHER_MAC[:4], "little"))
    board.w32(E1000_RA + 12, RAH_AV | int.from_bytes(OTHER_MAC[4:], "little"))
    assert delivered(eth(OTHER_MAC))
    board.w32(E1000_RA + 12, int.from_bytes(OTHER_MAC[4:], "little"))  # AV cleared
    assert not delivered(eth(OTHER_MAC))
    # Multicast hash, MO = 0: bits 47:36 of the address (e1000_hash_mc_addr).
    hash_value = (mcast[4] >> 4 | mcast[5] << 4) & 0xFFF
    board.w32(E1000_MTA + 4 * (hash_value >> 5), 1 << (hash_value & 0x1F))
    assert delivered(eth(mcast))
    assert not delivered(eth(bytes.fromhex("01005e000002")))
    rctl = board.r32(E1000_RCTL)
    board.w32(E1000_RCTL, rctl | RCTL_BAM)
    assert delivered(eth(b"\xff" * 6))
    board.w32(E1000_RCTL, rctl | RCTL_MPE)
    assert delivered(eth(bytes.fromhex("01005e000002")))
    assert not delivered(eth(bytes.fromhex("525400777777")))
    board.w32(E1000_RCTL, rctl | RCTL_UPE)
    assert delivered(eth(bytes.fromhex("525400777777")))


def test_rx_vlan_filter_and_strip(board: Board) -> None:
    board.setup_rx(rctl=RCTL_BAM | RCTL_VFE)
    board.w32(E1000_CTRL, board.r32(E1000_CTRL) | CTRL_VME)
    tagged = eth(MAC, ethertype=0x8100) + (0x2005).to_bytes(2, "big") + b"\x08\x00" + bytes(60)
    board.send(tagged)
    board.nic.rx_ready()
    assert board.r32(E1000_RDH) == 0  # VLAN 5 not in the VFTA
    board.w32(E1000_VFTA, 1 << 5)
    board.send(tagged)
    board.nic.rx_ready()
    length, _, status, _, special = board.rx_desc(0)
    assert status & RXD_STAT_VP and special == 0x2005
    untagged = tagged[:12] + tagged[16:]
    assert board.rx_data(0, length - 4) == untagged


def test_rx_completes_a_partial_checksum_from_the_backend(board: Board) -> None:
    board.setup_rx()
    payload = b"partial"
    frame = tcp_frame(payload, dst=MAC, src=PEER_MAC)
    tcp_len = 20 + len(payload)
    frame[50:52] = fold_sum(pseudo_v4(tcp_len)).to_bytes(2, "big")
    board.send(bytes(frame), vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16))
    board.nic.rx_ready()
    length, *_ = board.rx_desc(0)
    data = board.rx_data(0, length - 4)
    assert rfc1071(pseudo_v4(tcp_len) + data[34 : 34 + tcp_len]) == 0


def test_rx_ring_full_stops_interest_and_rdt_resumes_it(board: Board) -> None:
    board.setup_rx(count=8, tail=3)  # three descriptors handed over
    frames = [eth(MAC) + bytes([i]) * 60 for i in range(5)]
    for frame in frames:
        board.send(frame)
    assert board.nic.rx_interested
    board.interest.clear()
    board.nic.rx_ready()
    assert board.r32(E1000_RDH) == 3
    assert board.interest == [False] and not board.nic.rx_interested
    assert [board.rx_data(i, 61)[-1] for i in range(3)] == [0, 1, 2]
    assert board.r32(E1000_ICR) & ICR_RXDMT0  # ran below the threshold
    board.nic.rx_ready()  # a stray call while not interested reads nothing
    assert board.r32(E1000_RDH) == 3
    board.w32(E1000_RDT, 6)  # the driver refilled three buffers
    assert board.interest == [False, True]
    board.nic.rx_ready()
    assert board.r32(E1000_RDH) == 5
    assert [board.rx_data(i, 61)[-1] for i in (3, 4)] == [3, 4]
    assert board.r32(E1000_MPC) == 0  # nothing was lost


def test_rx_disabled_drains_and_drops_keeping_interest(board: Board) -> None:
    board.send(eth(MAC) + bytes(60))
    board.nic.rx_ready()
    assert board.nic.counters.rx_dropped_disabled == 1
    assert board.interest == [] and board.nic.rx_interested


def test_statistics_clear_on_read(board: Board) -> None:
    board.setup_tx()
    frame = bytes(tcp_frame(b"stats"))
    board.put_legacy(frame)
    board.kick_tx()
    board.recv()
    assert board.r32(E1000_GPTC) == 1
    assert board.r32(E1000_GPTC) == 0
    assert board.r32(E1000_GOTCL) == len(frame) + 4
    assert board.r32(E1000_GOTCL) == len(frame) + 4  # the low half does not clear...
    assert board.r32(E1000_GOTCH) == 0  # ...reading the high half clears both
    assert board.r32(E1000_GOTCL) == 0
    assert board.r32(E1000_GORCH) == 0


# -- the hostile guest ------------------------------------------------------------------------


def test_tx_ring_outside_ram_then_fixed(board: Board) -> None:
    board.setup_tx()
    board.w32(E1000_TDBAH, 0x10)  # 64 GiB: no RAM there
    board.put_legacy(bytes(tcp_frame(b"x")))
    board.kick_tx()
    assert board.nothing_sent() and board.r32(E1000_TDH) == 0
    assert board.nic.dma_errors.count >= 1
    board.w32(E1000_TDBAH, 0)
    board.kick_tx()
    board.recv()
    assert board.r32(E1000_TDH) == 1
    assert board.nic.internal_errors.count == 0


def test_tx_buffer_outside_ram_drops_the_frame_only(board: Board) -> None:
    board.setup_tx()
    bad = board.put_raw(struct.pack("<QII", RAM - 8, 64 | (TXD_CMD_EOP | TXD_CMD_RS) << 24, 0))
    frame = bytes(tcp_frame(b"good"))
    board.put_legacy(frame)
    board.kick_tx()
    assert board.recv()[1] == frame
    assert board.nothing_sent()
    assert board.memory.read_u8(board.tx_desc(bad) + 12) & TXD_STAT_DD
    assert board.nic.counters.tx_dropped == 1


def test_tdt_beyond_the_ring_is_ignored(board: Board) -> None:
    board.setup_tx(count=8)
    board.put_legacy(bytes(tcp_frame(b"x")))
    board.w32(E1000_TDT, 100)
    assert board.nothing_sent() and board.r32(E1000_TDH) == 0
    assert board.nic.dma_errors.count >= 1
    board.kick_tx()
    board.recv()


def test_huge_lengths_are_bounded(board: Board) -> None:
    board.setup_tx(count=64)
    # A data descriptor claiming 1 MiB, and a chain without EOP growing past the limit.
    data_cmd = (TXD_CMD_DEXT | TXD_CMD_EOP) << 24
    board.put_raw(struct.pack("<QII", TX_BUFS, 0xF_FFFF | TXD_DTYP_DATA << 20 | data_cmd, 0))
    for _ in range(TX_MAX_FRAME // 0xFFFF + 2):
        board.put_raw(struct.pack("<QII", TX_BUFS, 0xFFFF, 0))  # legacy, no EOP
    board.put_raw(struct.pack("<QII", TX_BUFS, 14 | TXD_CMD_EOP << 24, 0))
    frame = bytes(tcp_frame(b"after"))
    board.put_legacy(frame)
    board.kick_tx()
    assert board.recv()[1] == frame
    assert board.nothing_sent()
    assert board.nic.counters.tx_dropped == 2
    assert board.nic.internal_errors.count == 0


def test_rdlen_zero_with_receiver_enabled(board: Board) -> None:
    board.w32(E1000_RDLEN, 0)
    board.w32(E1000_RCTL, RCTL_EN | RCTL_BAM)
    assert board.interest == [False]
    board.send(eth(MAC) + bytes(60))
    board.nic.rx_ready()
    assert select.select([board.backend.fds[0]], [], [], 0)[0]  # still in the backend
    board.w32(E1000_RDT, 5)  # indexes into an empty ring: counted, nothing happens
    assert board.nic.dma_errors.count >= 1
    assert board.nic.internal_errors.count == 0


def test_rx_buffer_outside_ram_is_reported_in_the_descriptor(board: Board) -> None:
    board.setup_rx()
    board.memory.write(RX_RING, struct.pack("<Q", RAM + 0x1000))
    board.send(eth(MAC) + bytes(60))
    board.send(eth(MAC) + bytes(61))
    board.nic.rx_ready()
    _, _, status, errors, _ = board.rx_desc(0)
    assert status & (RXD_STAT_DD | RXD_STAT_EOP) and errors == RXD_ERR_RXE
    length, _, status, errors, _ = board.rx_desc(1)
    assert length == 61 + 14 + 4 and errors == 0
    assert board.nic.dma_errors.count >= 1


def test_rx_ring_base_outside_ram(board: Board) -> None:
    board.setup_rx()
    board.w32(E1000_RDBAH, 0x20)
    board.send(eth(MAC) + bytes(60))
    board.nic.rx_ready()
    assert board.r32(E1000_RDH) == 0
    assert board.nic.counters.rx_dropped_bad == 1
    assert board.nic.internal_errors.count == 0


def test_unknown_registers_and_odd_accesses(board: Board) -> None:
    assert board.r32(0xF100) == 0  # nothing there
    assert board.nic.bad_accesses.count == 1
    board.w32(0x0F100, 0x1234)
    board.mmio.write(board.bar0 + E1000_RCTL, 2, 0xFFFF)  # narrow write: ignored
    assert board.r32(E1000_RCTL) == 0
    assert board.mmio.read(board.bar0 + E1000_STATUS, 1) == board.r32(E1000_STATUS) & 0xFF
    assert board.pio.read(board.bar1 + 0x10, 4) == 0  # reserved I/O offsets
    assert board.nic.bad_accesses.count == 4
    assert board.nic.internal_errors.count == 0


def random_descriptor(rng: random.Random) -> bytes:
    """Mostly plausible descriptors (buffers in RAM, sane lengths), some garbage."""
    if rng.random() < 0.1:
        return rng.randbytes(16)
    buffer = rng.choice((TX_BUFS + rng.randrange(0, 0x100000), 0, RAM - 8, rng.getrandbits(64)))
    length = rng.choice((0, 1, 14, 60, 1514, 0xFFFF, rng.randrange(0x10000)))
    cmd = rng.getrandbits(8)
    kind = rng.random()
    if kind < 0.4:  # legacy
        lower = length | rng.getrandbits(8) << 16 | (cmd & ~TXD_CMD_DEXT) << 24
    elif kind < 0.8:  # data
        lower = length | TXD_DTYP_DATA << 20 | (cmd | TXD_CMD_DEXT) << 24
    else:  # context
        return struct.pack(
            "<BBHBBHIBBH", *(rng.randrange(80) for _ in range(2)), rng.randrange(100),
            *(rng.randrange(80) for _ in range(2)), rng.randrange(100),
            rng.getrandbits(20) | (rng.getrandbits(8) | TXD_CMD_DEXT) << 24, 0,
            rng.randrange(100), rng.choice((0, 1, 100, 1448)),
        )  # fmt: skip
    return struct.pack("<QII", buffer, lower, rng.getrandbits(32))


def test_random_guest_never_breaks_the_model(board: Board) -> None:
    """A seeded fuzz: random registers, ring geometry and descriptor contents, packets."""
    rng = random.Random(1234)
    regs = [
        E1000_CTRL, E1000_EECD, E1000_EERD, E1000_MDIC, E1000_ICS, E1000_IMS, E1000_IMC,
        E1000_RCTL, E1000_RDBAL, E1000_RDBAH, E1000_RDLEN, E1000_RDH, E1000_RDT, E1000_TCTL,
        E1000_TDBAL, E1000_TDBAH, E1000_TDLEN, E1000_TDH, E1000_TDT, E1000_VET, E1000_RA + 4,
    ]  # fmt: skip
    for slot in range(TX_RING, TX_RING + 0x20000, 16):
        board.memory.write(slot, random_descriptor(rng))
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.6:
            reg = rng.choice(regs)
            value = rng.getrandbits(32)
            if reg in (E1000_RDBAL, E1000_TDBAL) and rng.random() < 0.7:
                value = rng.choice((TX_RING, RX_RING)) + rng.randrange(0, 0x1000, 16)
            if reg in (E1000_RDBAH, E1000_TDBAH) and rng.random() < 0.8:
                value = 0
            if reg in (E1000_RDLEN, E1000_TDLEN) and rng.random() < 0.8:
                value = rng.choice((0, 128, 256, 4096))
            if reg in (E1000_RDH, E1000_RDT, E1000_TDH, E1000_TDT) and rng.random() < 0.8:
                value = rng.randrange(0, 300)
            if reg == E1000_CTRL:
                value = value & ~CTRL_RST | CTRL_SLU if rng.random() < 0.95 else value
            if reg in (E1000_RCTL, E1000_TCTL) and rng.random() < 0.8:
                value |= RCTL_EN  # the same bit as TCTL_EN
            board.w32(reg, value)
        elif choice < 0.75:
            board.r32(rng.choice([*regs, E1000_ICR, E1000_STATUS, E1000_GPRC, E1000_GORCH]))
        elif choice < 0.85:
            slot = TX_RING + rng.randrange(0, 0x20000, 16)
            board.memory.write(slot, random_descriptor(rng))
        elif choice < 0.95:
            length = rng.choice((0, 5, 14, 60, 1000, 1600, 9000))
            flags = rng.choice((0, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM))
            header = vnet(flags, rng.choice((0, 0, 1)), rng.randrange(100), rng.randrange(100))
            dst = rng.choice((MAC, b"\xff" * 6, OTHER_MAC))
            try:  # the device may leave packets in the backend: never block on a full one
                os.set_blocking(board.peer, False)
                board.send((dst + rng.randbytes(length))[:length], header)
            except BlockingIOError:
                pass
            finally:
                os.set_blocking(board.peer, True)
            board.nic.rx_ready()
        else:
            while not board.nothing_sent():
                os.read(board.peer, 1 << 17)
    assert board.nic.internal_errors.count == 0


# -- through a real tap -----------------------------------------------------------------------


def test_tso_through_a_real_tap_is_segmented_by_the_host_kernel() -> None:
    """The netns routes 10.98.1.0/24 out of a plain tun (no vnet header, no offloads), so
    the kernel must segment the GSO frame from the tap and finish every checksum."""
    name = f"iovirt-e1000-{os.getpid()}"
    pyroute2_netns.create(name)
    tun_fd = -1
    tap: TapBackend | None = None
    memory: GuestMemory | None = None
    try:
        tap = TapBackend("e1ktap0", netns=name)

        def open_tun() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(b"e1ktun0", IFF_TUN | IFF_NO_PI))
            with open("/proc/sys/net/ipv4/ip_forward", "w") as sysctl:  # this netns only
                sysctl.write("1")
            return fd

        tun_fd = run_in_netns(name, open_tun)
        with NetNS(name, flags=0) as ipr:
            tap_index = ipr.link_lookup(ifname="e1ktap0")[0]
            ipr.addr("add", index=tap_index, address="10.98.0.2", prefixlen=24)
            ipr.link("set", index=tap_index, state="up")
            link = ipr.get_links(tap_index)[0]
            tap_mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
            tun_index = ipr.link_lookup(ifname="e1ktun0")[0]
            ipr.addr("add", index=tun_index, address="10.98.1.1", prefixlen=24)
            ipr.link("set", index=tun_index, state="up")
        memory = GuestMemory([(0, RAM)])
        nic = E1000(memory, tap, MAC)
        nic.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        nic.write(E1000_TDBAL, 4, TX_RING)
        nic.write(E1000_TDLEN, 4, 8 * 16)
        nic.write(E1000_TCTL, 4, TCTL_EN)
        src, dst = bytes([10, 98, 0, 1]), bytes([10, 98, 1, 2])
        payload = random.Random(3).randbytes(4000)
        frame = bytearray(eth(tap_mac, MAC) + ipv4_header(src, dst, 0) + tcp_header() + payload)
        frame[50:52] = fold_sum(src + dst + struct.pack("!BBH", 0, 6, 0)).to_bytes(2, "big")
        cmd_len = len(payload) | (TUCMD_TCP | TUCMD_IP | TUCMD_TSE | TXD_CMD_DEXT) << 24
        context = struct.pack("<BBHBBHIBBH", 14, 24, 33, 34, 50, 0, cmd_len, 0, 54, 1448)
        lower = len(frame) | TXD_DTYP_DATA << 20
        lower |= (TXD_CMD_DEXT | TXD_CMD_TSE | TXD_CMD_EOP | TXD_CMD_RS) << 24
        upper = (TXD_POPTS_IXSM | TXD_POPTS_TXSM) << 8
        memory.write(TX_RING, context + struct.pack("<QII", TX_BUFS, lower, upper))
        memory.write(TX_BUFS, bytes(frame))
        nic.write(E1000_TDT, 4, 2)
        assert nic.counters.tx_frames == 1 and nic.backend_errors.count == 0

        received = b""
        sizes = []
        deadline = time.monotonic() + 5
        while len(received) < len(payload) and time.monotonic() < deadline:
            if not select.select([tun_fd], [], [], 0.2)[0]:
                continue
            ip = os.read(tun_fd, 1 << 16)
            if ip[0] >> 4 != 4 or ip[9] != 6:
                continue  # IPv6 router solicitations and the like
            ihl, total = (ip[0] & 0xF) * 4, int.from_bytes(ip[2:4], "big")
            tcp = ip[ihl:total]
            assert rfc1071(ip[:ihl]) == 0
            assert rfc1071(ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp)) + tcp) == 0
            sizes.append(len(tcp) - 20)
            received += tcp[20:]
        assert sizes == [1448, 1448, 4000 - 2 * 1448]
        assert received == payload
    finally:
        if memory is not None:
            memory.close()
        if tap is not None:
            tap.close()
        if tun_fd >= 0:
            os.close(tun_fd)
        pyroute2_netns.remove(name)


# -- interrupt moderation (ITR, RDTR/RADV, TIDV/TADV) ----------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=100.0)


@pytest.fixture
def timed_board(clock: ManualClock) -> Iterator[Board]:
    board = Board(timers=clock)
    board.enable()
    board.reset_hw()
    yield board
    board.close()


US = 1e-6


def test_itr_spaces_interrupt_assertions(timed_board: Board, clock: ManualClock) -> None:
    board = timed_board
    board.w32(E1000_ITR, 400)  # 400 x 256 ns = 102.4 us between assertions
    board.w32(E1000_IMS, ICR_RXT0)
    board.w32(E1000_ICS, ICR_RXT0)
    assert board.irq.level  # the first one goes at once
    board.r32(E1000_ICR)
    assert not board.irq.level
    board.w32(E1000_ICS, ICR_RXT0)
    assert not board.irq.level  # inside the interval: the cause waits in ICR
    clock.advance(100 * US)
    assert not board.irq.level
    clock.advance(3 * US)
    assert board.irq.level  # 102.4 us after the previous assertion
    assert board.r32(E1000_ICR) == ICR_RXT0 | ICR_INT_ASSERTED
    clock.advance(200 * US)
    board.w32(E1000_ICS, ICR_RXT0)
    assert board.irq.level  # the interval has long passed: at once


def test_itr_zero_does_not_throttle(timed_board: Board) -> None:
    board = timed_board
    board.w32(E1000_IMS, ICR_RXT0)
    for _ in range(3):
        board.w32(E1000_ICS, ICR_RXT0)
        assert board.irq.level
        board.r32(E1000_ICR)
    assert board.irq.transitions[-6:] == [True, False] * 3


def test_itr_cause_cleared_while_throttled_raises_nothing(
    timed_board: Board, clock: ManualClock
) -> None:
    board = timed_board
    board.w32(E1000_ITR, 1000)
    board.w32(E1000_IMS, ICR_RXT0)
    board.w32(E1000_ICS, ICR_RXT0)
    board.r32(E1000_ICR)
    board.w32(E1000_ICS, ICR_RXT0)
    assert not board.irq.level
    assert board.r32(E1000_ICR) & ICR_RXT0  # polled by the driver before the line rose
    clock.advance(1000 * US)
    assert not board.irq.level  # nothing left to assert when the interval ended
    assert board.irq.transitions == [True, False]


def _rx_frame(board: Board) -> None:
    board.send(eth(MAC) + bytes(100))
    board.nic.rx_ready()


def test_rdtr_delays_rxt0_until_the_line_is_quiet(timed_board: Board, clock: ManualClock) -> None:
    board = timed_board
    board.setup_rx()
    board.w32(E1000_IMS, ICR_RXT0)
    board.w32(E1000_RDTR, 100)  # 102.4 us
    _rx_frame(board)
    assert board.rx_desc(0)[2] & RXD_STAT_DD  # the frame is there at once...
    assert not board.irq.level  # ...its interrupt waits
    clock.advance(60 * US)
    _rx_frame(board)  # a new frame restarts the delay
    clock.advance(60 * US)
    assert not board.irq.level
    clock.advance(50 * US)
    assert board.irq.level and board.r32(E1000_ICR) & ICR_RXT0


def test_radv_bounds_the_rdtr_delay(timed_board: Board, clock: ManualClock) -> None:
    board = timed_board
    board.setup_rx()
    board.w32(E1000_IMS, ICR_RXT0)
    board.w32(E1000_RDTR, 100)
    board.w32(E1000_RADV, 150)  # 153.6 us after the first frame, come what may
    _rx_frame(board)
    for _ in range(2):
        clock.advance(60 * US)
        _rx_frame(board)
    assert not board.irq.level  # 120 us: RDTR keeps restarting
    clock.advance(40 * US)
    assert board.irq.level  # 160 us > RADV


def test_rdtr_fpd_flushes_the_pending_rxt0(timed_board: Board) -> None:
    board = timed_board
    board.setup_rx()
    board.w32(E1000_IMS, ICR_RXT0)
    board.w32(E1000_RDTR, 1000)
    _rx_frame(board)
    assert not board.irq.level
    board.w32(E1000_RDTR, 1000 | 0x8000_0000)
    assert board.irq.level
    assert board.r32(E1000_RDTR) == 1000  # FPD is write-only


def test_tidv_delays_txdw_only_for_ide_descriptors(timed_board: Board, clock: ManualClock) -> None:
    board = timed_board
    board.setup_tx()
    board.w32(E1000_IMS, ICR_TXDW)
    board.w32(E1000_TIDV, 8)  # 8.192 us, Linux's default
    board.w32(E1000_TADV, 32)
    frame = bytes(tcp_frame(b"x"))
    board.put_legacy(frame, cmd=TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS | TXD_CMD_IDE)
    board.kick_tx()
    board.recv()
    assert not board.irq.level
    clock.advance(9 * US)
    assert board.irq.level and board.r32(E1000_ICR) & ICR_TXDW
    board.put_legacy(frame)  # no IDE: at once
    board.kick_tx()
    board.recv()
    assert board.irq.level


def test_tadv_bounds_the_tidv_delay(timed_board: Board, clock: ManualClock) -> None:
    board = timed_board
    board.setup_tx()
    board.w32(E1000_IMS, ICR_TXDW)
    board.w32(E1000_TIDV, 10)
    board.w32(E1000_TADV, 25)  # 25.6 us
    frame = bytes(tcp_frame(b"x"))
    for _ in range(3):
        board.put_legacy(frame, cmd=TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS | TXD_CMD_IDE)
        board.kick_tx()
        board.recv()
        assert not board.irq.level
        clock.advance(9 * US)  # each IDE descriptor restarts TIDV
    assert board.irq.level  # 27 us > TADV


def test_reset_drops_pending_moderation(timed_board: Board, clock: ManualClock) -> None:
    board = timed_board
    board.setup_rx()
    board.w32(E1000_IMS, ICR_RXT0)
    board.w32(E1000_RDTR, 100)
    _rx_frame(board)
    board.reset_hw()
    board.w32(E1000_IMS, ICR_RXT0)
    clock.advance(1000 * US)
    assert not board.r32(E1000_ICR) & ICR_RXT0  # the late callback found nothing to do
    assert clock.pending == 0


def test_moderation_registers_without_a_timer_service_are_stored_only(board: Board) -> None:
    board.setup_rx()
    board.w32(E1000_IMS, ICR_RXT0)
    board.w32(E1000_RDTR, 100)
    board.w32(E1000_ITR, 1000)
    _rx_frame(board)
    assert board.irq.level  # no clock: causes go at once
    assert board.r32(E1000_RDTR) == 100 and board.r32(E1000_ITR) == 1000
