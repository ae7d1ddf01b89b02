"""The fuzz target of the e1000 NIC, and the oracle on frames a NIC hands its backend."""

from __future__ import annotations

import contextlib
import os
import select
import struct

from iovirt.fuzz import ops as fops
from iovirt.fuzz.harness import FuzzMemory, OracleViolation, Region, Target
from iovirt.fuzz.ops import Op
from iovirt.fuzz.targets.common import (
    MAC,
    VNET_HDR,
    PciBoard,
    check_line,
    drain,
)
from iovirt.interrupt import RecordingInterrupt


class E1000Target(Target):
    name = "e1000"
    summary = "Intel 82540EM NIC: registers, EEPROM, PHY, TX/RX rings on a socket-pair backend"
    modules = ("iovirt.devices.e1000",)
    support_modules = ("iovirt.bus.pci",)
    host_events = ("rx-packet", "rx-ready", "reset", "tick")

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.backends.net import SocketPairNetBackend
        from iovirt.devices import e1000
        from iovirt.timer import ManualClock

        self.mod = e1000
        self._clock_cls = ManualClock
        self.backend = SocketPairNetBackend()
        self.peer = self.backend.peer_fds[0]
        os.set_blocking(self.peer, False)
        os.set_blocking(self.backend.fds[0], False)
        self.layout = [("bar0-mmio", e1000.E1000_MMIO_SIZE), ("bar1-io", e1000.E1000_IO_SIZE)]

    def begin(self) -> list[Region]:
        drain(self.peer)
        drain(self.backend.fds[0])
        self.irq = RecordingInterrupt()
        self.internal: BaseException | None = None
        # Interrupt moderation runs on a clock that moves only on HOST "tick" events.
        self.clock = self._clock_cls()
        self.nic = self.mod.E1000(self.memory, self.backend, MAC, intx=self.irq, timers=self.clock)
        # The model turns its own exceptions into a counted "internal error" so a bug cannot
        # end the vCPU loop; for the fuzzer each one is a crash, with its traceback.
        setattr(self.nic, "_internal_error", self._internal_error)  # noqa: B010
        self.board = PciBoard(self.nic)
        regions = self.board.regions()
        m = self.mod
        self.heads = self._heads()
        self.guest_set: set[int] = set()  # head registers the guest itself wrote
        mmio_write, io_write = regions[0].write, regions[1].write

        def bar0_write(offset: int, size: int, value: int) -> None:
            for reg in (m.E1000_RDH, m.E1000_TDH):
                if offset <= reg < offset + size:
                    self.guest_set.add(reg)
            mmio_write(offset, size, value)

        def bar1_write(offset: int, size: int, value: int) -> None:
            target_reg = self.nic._ioaddr & m.IOADDR_MASK
            if offset == m.E1000_IODATA and target_reg in (m.E1000_RDH, m.E1000_TDH):
                self.guest_set.add(target_reg)
            io_write(offset, size, value)

        regions[0].write, regions[1].write = bar0_write, bar1_write
        return regions

    def _heads(self) -> dict[int, int]:
        regs = self.nic._regs
        m = self.mod
        return {m.E1000_RDH: regs[m.E1000_RDH], m.E1000_TDH: regs[m.E1000_TDH]}

    def _internal_error(self, what: str, e: Exception) -> None:
        if self.internal is None:
            self.internal = e

    def config_read(self, offset: int, size: int) -> int:
        return self.nic.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.nic.config_write(offset, size, value)

    def host(self, event: int, data: bytes) -> None:
        if event == 0:
            with contextlib.suppress(BlockingIOError):  # a full socket drops it, as a tap would
                os.write(self.peer, data)
            if self.nic.rx_interested:
                self.nic.rx_ready()
        elif event == 1:
            if self.nic.rx_interested:
                self.nic.rx_ready()
        elif event == 2:
            self.nic.reset()
        else:
            # Up to about 67 ms: every moderation timer (ITR, RDTR/RADV, TIDV/TADV) fits.
            self.clock.advance(int.from_bytes(data[:2].ljust(2, b"\0"), "little") * 1.024e-6)

    def after_op(self) -> None:
        if select.select([self.peer], [], [], 0)[0]:
            for packet in drain(self.peer):
                check_vnet_frame(packet, self.mod.TX_MAX_FRAME)

    def close(self) -> None:
        self.backend.close()

    def check(self) -> None:
        if self.internal is not None:
            exc, self.internal = self.internal, None
            raise exc
        nic = self.nic
        regs = nic._regs
        m = self.mod
        wanted = bool(regs[m.E1000_ICR] & regs[m.E1000_IMS])
        # The line follows the model's level (gated by COMMAND.INTX_DISABLE); the level is
        # up only while a cause is wanted, and a wanted cause held back by ITR throttling
        # must have a timer coming to raise it.
        check_line("e1000", self.irq, nic._irq_level and self.board.intx_allowed())
        if nic._irq_level and not wanted:
            raise OracleViolation("irq-state", "e1000: INTA# asserted with ICR & IMS clear")
        if wanted and not nic._irq_level and self.clock.pending == 0:
            raise OracleViolation(
                "irq-state", "e1000: ICR & IMS set, INTA# low, and no moderation timer pending"
            )
        # A head the device moved itself (not the guest) stays inside its ring.
        heads = self._heads()
        for reg, length_reg in ((m.E1000_RDH, m.E1000_RDLEN), (m.E1000_TDH, m.E1000_TDLEN)):
            count = max(regs[length_reg] // m.DESC_SIZE, 1)
            moved = heads[reg] != self.heads[reg] and reg not in self.guest_set
            if moved and heads[reg] >= count:
                raise OracleViolation(
                    "ring-index",
                    f"e1000 moved head {reg:#x} to {heads[reg]} in a {count}-entry ring",
                )
        self.heads = heads
        self.guest_set.clear()

    def seeds(self) -> list[list[Op]]:
        m = self.mod
        w = fops.write

        def reg(offset: int, value: int) -> Op:
            return w(0, offset, 4, value)

        ident = [
            fops.config_read(0, 4),
            fops.read(0, m.E1000_STATUS, 4),
            reg(m.E1000_EERD, m.EERD_START),
            fops.read(0, m.E1000_EERD, 4),
            reg(m.E1000_MDIC, m.MDIC_OP_READ | m.PHY_ADDRESS << m.MDIC_PHY_SHIFT | 2 << 16),
            fops.read(0, m.E1000_MDIC, 4),
            w(1, m.E1000_IOADDR, 4, m.E1000_CTRL),
            w(1, m.E1000_IODATA, 4, m.CTRL_RST),
            reg(m.E1000_EECD, m.EECD_REQ | m.EECD_CS),
            *[reg(m.E1000_EECD, m.EECD_REQ | m.EECD_CS | b) for b in (0, 1, 4, 5, 4, 5, 0, 1)],
            fops.read(0, m.E1000_EECD, 4),
            fops.read(0, m.E1000_GPRC, 4),
        ]
        frame = MAC + bytes.fromhex("525400abcdef0800") + bytes(46)
        tx_desc = struct.pack(
            "<QII",
            0x2000,
            len(frame) | (m.TXD_CMD_EOP | m.TXD_CMD_IFCS | m.TXD_CMD_RS) << 24,
            0,
        )
        transmit = [
            fops.mem_write(0x1000, tx_desc),
            fops.mem_write(0x2000, frame),
            reg(m.E1000_TDBAL, 0x1000),
            reg(m.E1000_TDBAH, 0),
            reg(m.E1000_TDLEN, 128),
            reg(m.E1000_TDH, 0),
            reg(m.E1000_TCTL, m.TCTL_EN | m.TCTL_PSP),
            reg(m.E1000_IMS, 0xFF),
            reg(m.E1000_TDT, 1),
            fops.read(0, m.E1000_ICR, 4),
            fops.read(0, m.E1000_TDH, 4),
        ]
        rx_descs = b"".join(struct.pack("<QII", 0x4000 + 0x800 * i, 0, 0) for i in range(8))
        receive = [
            fops.mem_write(0x3000, rx_descs),
            reg(m.E1000_RDBAL, 0x3000),
            reg(m.E1000_RDLEN, 128),
            reg(m.E1000_RDH, 0),
            reg(m.E1000_RDT, 7),
            reg(m.E1000_RCTL, m.RCTL_EN | m.RCTL_BAM | m.RCTL_SECRC),
            reg(m.E1000_IMS, 0xFF),
            fops.host(0, bytes(12) + frame),
            fops.host(0, bytes(12) + b"\xff" * 6 + frame[6:]),
            fops.read(0, m.E1000_ICR, 4),
            fops.read(0, m.E1000_RDH, 4),
        ]
        # A TCP/IPv4 frame with checksum offload through a context descriptor, then TSO.
        ip = bytes.fromhex("4500002800000000400600000a0000010a000002")
        tcp = bytes.fromhex("1234005000000000000000005010ffff00000000")
        tso_frame = MAC + bytes.fromhex("525400abcdef0800") + ip + tcp + bytes(3000)
        context = struct.pack(
            "<BBHBBHIBBH",
            14,
            24,
            33,
            34,
            50,
            0,
            (len(tso_frame) - 54) | (m.TXD_CMD_DEXT | m.TUCMD_TCP | m.TUCMD_IP | 4) << 24,
            0,
            54,
            1460,
        )
        data_desc = struct.pack(
            "<QII",
            0x6000,
            len(tso_frame)
            | m.TXD_DTYP_DATA << 20
            | (m.TXD_CMD_EOP | m.TXD_CMD_DEXT | m.TXD_CMD_TSE | m.TXD_CMD_RS) << 24,
            (m.TXD_POPTS_IXSM | m.TXD_POPTS_TXSM) << 8,
        )
        offload = [
            fops.mem_write(0x5000, context + data_desc),
            fops.mem_write(0x6000, tso_frame),
            reg(m.E1000_TDBAL, 0x5000),
            reg(m.E1000_TDLEN, 128),
            reg(m.E1000_TCTL, m.TCTL_EN),
            reg(m.E1000_CTRL, m.CTRL_RESET | m.CTRL_VME),
            reg(m.E1000_TDT, 2),
            fops.read(0, m.E1000_TOTL, 4),
            fops.read(0, m.E1000_TOTH, 4),
        ]
        ide_desc = struct.pack(
            "<QII",
            0x2000,
            len(frame) | (m.TXD_CMD_EOP | m.TXD_CMD_RS | m.TXD_CMD_IDE) << 24,
            0,
        )
        moderation = [
            fops.mem_write(0x1000, ide_desc),
            fops.mem_write(0x2000, frame),
            reg(m.E1000_TDBAL, 0x1000),
            reg(m.E1000_TDLEN, 128),
            reg(m.E1000_TCTL, m.TCTL_EN),
            reg(m.E1000_ITR, 0x200),
            reg(m.E1000_TIDV, 0x20),
            reg(m.E1000_TADV, 0x40),
            reg(m.E1000_RDTR, 0x10),
            reg(m.E1000_RADV, 0x30),
            reg(m.E1000_IMS, 0xFF),
            reg(m.E1000_TDT, 1),
            reg(m.E1000_ICS, m.ICR_LSC),
            fops.host(3, (0x10).to_bytes(2, "little")),
            fops.read(0, m.E1000_ICR, 4),
            reg(m.E1000_ICS, m.ICR_RXT0),
            fops.host(3, (0x400).to_bytes(2, "little")),
            reg(m.E1000_TIDV, 0x20 | 0x8000_0000),  # FPD: flush now
            fops.read(0, m.E1000_ICR, 4),
            fops.host(3, b"\xff\xff"),
        ]
        return [ident, transmit, receive, offload, moderation]


def check_vnet_frame(packet: bytes, max_frame: int) -> None:
    """A frame a NIC model handed its backend must be one a tap takes as meant: a header,
    a frame of sane length, checksum and segmentation fields inside the frame."""
    if len(packet) < VNET_HDR.size:
        raise OracleViolation("backend-frame", f"{len(packet)}-byte packet without a header")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = VNET_HDR.unpack_from(packet)
    frame_len = len(packet) - VNET_HDR.size
    problem = None
    if frame_len > max_frame:
        problem = f"frame of {frame_len} bytes (at most {max_frame})"
    elif flags & ~0x03:
        problem = f"header flags {flags:#x}"
    elif flags & 0x01 and csum_start + csum_offset + 2 > frame_len:
        problem = f"checksum at {csum_start}+{csum_offset} outside a {frame_len}-byte frame"
    elif gso_type & 0x7F not in (0, 1, 3, 4):
        problem = f"gso_type {gso_type:#x}"
    elif gso_type & 0x7F and (gso_size == 0 or hdr_len > frame_len or not flags & 0x01):
        problem = f"GSO header (size {gso_size}, hdr_len {hdr_len}, flags {flags:#x})"
    if problem is not None:
        raise OracleViolation("backend-frame", problem)
