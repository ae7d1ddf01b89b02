"""Tests of the virtio-net front half (:mod:`iovirt.virtio.net`).

First :class:`VirtioNet` alone: the feature bits it offers for each option and backend
(and that every offered bit's dependencies of virtio 1.2, 5.1.3.1 are offered too), and its
config space read at the byte offsets of ``struct virtio_net_config`` (5.1.4). Then end to
end, the way a guest meets it: the device behind the real virtio-pci transport on a
:class:`PciRoot` with port and MMIO buses, a :class:`SimulatedPlatform` (``poll()`` runs
what the host I/O loop would: the control queue's kick watch, the error fd, MSI
deliveries), a :class:`SocketPairNetBackend` whose peer end plays the tap, and the
synthetic driver laying out split or packed rings in guest RAM. The guest probes through
0xCF8/0xCFC, negotiates, programs MSI-X and the receive, transmit and control queues, sets
DRIVER_OK; the C workers then move packets between the rings and the peer fds, and the
control queue's requests (virtio 1.2, 5.1.6.5) change which frames the receive filter lets
through. Constants from the spec are written out here, not imported from the module under
test, so a wrong constant there fails a test.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from iovirt.backends.net import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    SocketPairNetBackend,
)
from iovirt.bus import Bus
from iovirt.bus.msix import PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_TABLE
from iovirt.bus.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_PORTS,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PciRoot,
)
from iovirt.errors import ResourceError
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedMsiVector, SimulatedPlatform
from iovirt.testing.virtio_driver import PackedDriver, SplitDriver, make_driver
from iovirt.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from iovirt.virtio.net import NetOptions, VirtioNet, parse_mac
from iovirt.virtio.pci import (
    VIRTIO_BAR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_COMMON_DF,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_AVAIL,
    VIRTIO_PCI_COMMON_Q_DESC,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USED,
    VIRTIO_PCI_COMMON_STATUS,
    VirtioPciTransport,
)

T = TypeVar("T")
Driver = SplitDriver | PackedDriver

# Device-independent feature bits (virtio 1.2, 6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34

# virtio-net feature bits (virtio 1.2, 5.1.3).
F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_CTRL_RX_EXTRA = 20
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23
GUEST_OFFLOADS = (F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO)

# 5.1.3.1: a feature and the features it requires (any one of the listed alternatives).
REQUIRES: dict[int, tuple[int, ...]] = {
    F_GUEST_TSO4: (F_GUEST_CSUM,),
    F_GUEST_TSO6: (F_GUEST_CSUM,),
    F_GUEST_ECN: (F_GUEST_TSO4, F_GUEST_TSO6),
    F_GUEST_UFO: (F_GUEST_CSUM,),
    F_HOST_TSO4: (F_CSUM,),
    F_HOST_TSO6: (F_CSUM,),
    F_HOST_ECN: (F_HOST_TSO4, F_HOST_TSO6),
    F_HOST_UFO: (F_CSUM,),
    F_CTRL_RX: (F_CTRL_VQ,),
    F_CTRL_VLAN: (F_CTRL_VQ,),
    F_GUEST_ANNOUNCE: (F_CTRL_VQ,),
    F_MQ: (F_CTRL_VQ,),
    F_CTRL_MAC_ADDR: (F_CTRL_VQ,),
    F_CTRL_RX_EXTRA: (F_CTRL_RX,),
}

# struct virtio_net_config (5.1.4): mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu.
CFG_MAC = 0
CFG_STATUS = 6
CFG_MAX_VIRTQUEUE_PAIRS = 8
CFG_MTU = 10
CFG_END = 12
VIRTIO_NET_S_LINK_UP = 1

# The control queue (5.1.6.5).
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
CTRL_RX = 0
CTRL_RX_PROMISC = 0
CTRL_RX_ALLMULTI = 1
CTRL_RX_ALLUNI = 2
CTRL_RX_NOMULTI = 3
CTRL_RX_NOUNI = 4
CTRL_RX_NOBCAST = 5
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
MAX_CTRL_BATCH = 64  # requests the device serves per wake-up of the host I/O loop

# struct virtio_net_hdr_v1 (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers.
VNET_HDR = struct.Struct("<BBHHHHH")
VNET_HDR_LEN = VNET_HDR.size
NUM_BUFFERS = 10
ETH_FRAME_MAX = 1514

OWN_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("525400abcdef")
FOREIGN_MAC = bytes.fromhex("525400999999")
EXTRA_UNICAST = bytes.fromhex("525400777777")
NEW_MAC = bytes.fromhex("5254000000aa")
BROADCAST = b"\xff" * 6
MCAST_LISTED = bytes.fromhex("01005e000001")
MCAST_OTHER = bytes.fromhex("333300000001")

SLOT = 3
MSI_ADDRESS = 0xFEE0_0000
MSI_DATA_BASE = 0x40
QUEUE_SIZE = 16
# Guest RAM: region 0 spare, queue q's rings and buffers in region q + 1 (a driver takes
# its buffers from the rest of its region).
REGION = 0x10_0000
RAM = [(2 * i * REGION, REGION) for i in range(6)]
OUTSIDE_RAM = 0x1_0000_0000
WAIT_S = 5.0  # generous: a worker answers in microseconds
RX_BUFFERS = 8
BOARD_OPTIONS = NetOptions(queue_size=64)

DRIVER_FEATURES = (
    1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_F_INDIRECT_DESC
    | 1 << F_MAC
    | 1 << F_STATUS
    | 1 << F_CTRL_VQ
    | 1 << F_CTRL_RX
    | 1 << F_CTRL_RX_EXTRA
    | 1 << F_CTRL_MAC_ADDR
)


def has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = WAIT_S) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def thread_count() -> int:
    """Threads of this process that Python did not start: the C workers."""
    python = {t.native_id for t in threading.enumerate()}
    return sum(int(tid) not in python for tid in os.listdir("/proc/self/task"))


def vnet_hdr(flags: int = 0, num_buffers: int = 0) -> bytes:
    return VNET_HDR.pack(flags, 0, 0, 0, 0, 0, num_buffers)


def packet(dst: bytes, payload: bytes = b"payload", src: bytes = PEER_MAC) -> bytes:
    """A virtio-net header and an Ethernet frame (IPv4 ethertype) to ``dst``."""
    return vnet_hdr() + dst + src + b"\x08\x00" + payload


def mac_table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET's data: two struct virtio_net_ctrl_mac (le32 entries,
    then the MACs)."""
    return b"".join(struct.pack("<I", len(t)) + b"".join(t) for t in (unicast, multicast))


class LimitedBackend(SocketPairNetBackend):
    """A socket-pair backend that can deliver only some offloads to the guest."""

    def __init__(self, supported: int, pairs: int = 1) -> None:
        super().__init__(pairs)
        self.supported = supported

    def supported_offloads(self) -> int:
        return self.supported


class RecordingBackend(SocketPairNetBackend):
    """Counts close() calls; can refuse MQ_VQ_PAIRS_SET as a tap that cannot attach would."""

    def __init__(self, pairs: int = 1, refuse_pairs: bool = False) -> None:
        super().__init__(pairs)
        self.closes = 0
        self.refuse_pairs = refuse_pairs

    def set_active_pairs(self, pairs: int) -> None:
        if self.refuse_pairs and pairs > 1:
            raise ResourceError("tap test0", f"cannot attach queue {pairs - 1}: Invalid argument")
        super().set_active_pairs(pairs)

    def close(self) -> None:
        self.closes += 1
        super().close()


# -- feature bits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "mtu", "packed"), list(itertools.product([1, 2], [None, 1500], [False, True]))
)
def test_device_features_follow_the_options(pairs: int, mtu: int | None, packed: bool) -> None:
    net = VirtioNet(
        SocketPairNetBackend(pairs), NetOptions(queue_pairs=pairs, mtu=mtu, packed=packed)
    )
    features = net.device_features()
    for bit in (
        VIRTIO_F_VERSION_1,
        F_MAC,
        F_STATUS,
        F_MRG_RXBUF,
        F_CTRL_VQ,
        F_CTRL_RX,
        F_CTRL_RX_EXTRA,
        F_CTRL_MAC_ADDR,
        F_CSUM,
        F_HOST_TSO4,
        F_HOST_TSO6,
    ):
        assert has(features, bit), bit
    assert has(features, F_MQ) == (pairs > 1)
    assert has(features, F_MTU) == (mtu is not None)
    assert has(features, VIRTIO_F_RING_PACKED) == packed
    # The socket pair "supports" every offload: all guest offloads we implement are offered.
    for bit in (F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN):
        assert has(features, bit), bit
    # Never offered: what the device does not implement.
    for bit in (F_GUEST_UFO, F_HOST_UFO, F_CTRL_VLAN, F_GUEST_ANNOUNCE):
        assert not has(features, bit), bit


@pytest.mark.parametrize(
    ("supported", "offered"),
    [
        (0, set()),
        (TUN_F_CSUM, {F_GUEST_CSUM}),
        (TUN_F_CSUM | TUN_F_TSO4, {F_GUEST_CSUM, F_GUEST_TSO4}),
        (TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN, {F_GUEST_CSUM, F_GUEST_TSO6, F_GUEST_ECN}),
        (TUN_F_CSUM | TUN_F_TSO_ECN, {F_GUEST_CSUM}),  # ECN without TSO means nothing
        (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, set()),  # no TSO without checksum offload
        (TUN_F_CSUM | TUN_F_UFO, {F_GUEST_CSUM}),  # UFO is not offered at all
        (
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
            {F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN},
        ),
    ],
)
def test_guest_offloads_are_only_those_the_backend_delivers(
    supported: int, offered: set[int]
) -> None:
    features = VirtioNet(LimitedBackend(supported)).device_features()
    assert {bit for bit in GUEST_OFFLOADS if has(features, bit)} == offered
    assert has(features, F_CSUM)  # what the guest sends does not depend on the backend


@pytest.mark.parametrize(
    ("supported", "pairs"),
    list(
        itertools.product(
            [0, TUN_F_CSUM, TUN_F_CSUM | TUN_F_TSO4, TUN_F_TSO4 | TUN_F_TSO_ECN, 0x1F], [1, 4]
        )
    ),
)
def test_every_offered_feature_has_its_dependencies(supported: int, pairs: int) -> None:
    net = VirtioNet(LimitedBackend(supported, pairs), NetOptions(queue_pairs=pairs, mtu=9000))
    features = net.device_features()
    for bit, needs in REQUIRES.items():
        if has(features, bit):
            assert any(has(features, need) for need in needs), (bit, needs)


def test_device_identity() -> None:
    net = VirtioNet(SocketPairNetBackend(3), NetOptions(queue_pairs=3, queue_size=128))
    assert net.device_id == 1  # VIRTIO_ID_NET
    assert net.num_queues == 7  # three rx/tx pairs and the control queue
    assert net.queue_max_size == 128


@pytest.mark.parametrize(
    "options",
    [
        NetOptions(mac=bytes.fromhex("015400123456")),  # multicast
        NetOptions(mac=bytes(5)),
        NetOptions(queue_pairs=0),
        NetOptions(queue_pairs=2),  # more than the backend's one fd
        NetOptions(queue_size=2),
        NetOptions(queue_size=100),
        NetOptions(queue_size=2048),
        NetOptions(mtu=67),
        NetOptions(mtu=65536),
    ],
)
def test_bad_options_are_refused(options: NetOptions) -> None:
    backend = SocketPairNetBackend()
    with pytest.raises(ValueError):
        VirtioNet(backend, options)
    backend.close()


def test_parse_mac() -> None:
    assert parse_mac("52:54:00:12:34:56") == OWN_MAC
    assert parse_mac("02:AB:cd:00:00:01") == bytes.fromhex("02abcd000001")
    for bad in ("52:54:00:12:34", "52-54-00-12-34-56", "52:54:00:12:34:5g", "525400123456", ""):
        with pytest.raises(ValueError):
            parse_mac(bad)
    with pytest.raises(ValueError, match="multicast"):
        parse_mac("01:00:5e:00:00:01")


# -- config space -------------------------------------------------------------------------------


def config_bytes(net: VirtioNet) -> bytes:
    """The config space as a driver reads it, one byte at a time."""
    return bytes(net.config_read(i, 1) for i in range(CFG_END))


def test_config_space_layout() -> None:
    options = NetOptions(mac=bytes.fromhex("0a0b0c0d0e0f"), queue_pairs=3, mtu=9000)
    net = VirtioNet(SocketPairNetBackend(3), options)
    raw = config_bytes(net)
    assert raw[CFG_MAC : CFG_MAC + 6] == bytes.fromhex("0a0b0c0d0e0f")
    assert struct.unpack_from("<H", raw, CFG_STATUS)[0] == VIRTIO_NET_S_LINK_UP
    assert struct.unpack_from("<H", raw, CFG_MAX_VIRTQUEUE_PAIRS)[0] == 3
    assert struct.unpack_from("<H", raw, CFG_MTU)[0] == 9000
    for size in (1, 2, 4):  # every width agrees with the bytes
        for at in range(0, CFG_END - size + 1, size):
            assert net.config_read(at, size) == int.from_bytes(raw[at : at + size], "little")


@pytest.mark.parametrize(("offset", "size"), [(12, 1), (11, 2), (4095, 1), (-1, 1), (0, 0)])
def test_config_read_outside_the_structure_is_zero(offset: int, size: int) -> None:
    assert VirtioNet(SocketPairNetBackend()).config_read(offset, size) == 0


def test_config_writes_are_ignored() -> None:
    net = VirtioNet(SocketPairNetBackend())
    before = config_bytes(net)
    for at in range(0, CFG_END, 2):
        net.config_write(at, 2, 0xFFFF)
    assert config_bytes(net) == before


def test_close_closes_the_backend() -> None:
    backend = RecordingBackend()
    net = VirtioNet(backend)
    net.reset()  # harmless before any activation
    net.close()
    assert backend.closes == 1
    assert backend.fds == [-1] and backend.peer_fds == [-1]


# -- end to end through virtio-pci ------------------------------------------------------------


class Guest:
    """The guest's driver: config space through ports, the BAR through MMIO, rings in RAM."""

    def __init__(self, pio: Bus, mmio: Bus, memory: GuestMemory) -> None:
        self.pio, self.mmio, self.memory = pio, mmio, memory
        self.caps: dict[int, int] = {}  # cfg_type -> offset of the structure in the BAR
        self.notify_multiplier = 0
        self.msix_cap = 0
        self.bar = 0
        self.drivers: dict[int, Driver] = {}

    def cfg_read(self, reg: int, size: int) -> int:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | SLOT << 11 | reg & 0xFC)
        return self.pio.read(CONFIG_DATA_PORT + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | SLOT << 11 | reg & 0xFC)
        self.pio.write(CONFIG_DATA_PORT + (reg & 3), size, value)

    def probe(self) -> None:
        """Walk the capability list, read the BAR's address, enable decode and mastering."""
        assert self.cfg_read(0x00, 4) == 0x1AF4 | 0x1041 << 16  # virtio-net, modern
        pointer = self.cfg_read(PCI_CAPABILITY_LIST, 1)
        for _ in range(48):
            if not pointer:
                break
            cap_id = self.cfg_read(pointer, 1)
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type = self.cfg_read(pointer + 3, 1)
                if cfg_type != VIRTIO_PCI_CAP_PCI_CFG:
                    assert self.cfg_read(pointer + 4, 1) == VIRTIO_BAR
                    self.caps.setdefault(cfg_type, self.cfg_read(pointer + 8, 4))
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                    self.notify_multiplier = self.cfg_read(pointer + 16, 4)
            elif cap_id == PCI_CAP_ID_MSIX:
                self.msix_cap = pointer
            pointer = self.cfg_read(pointer + 1, 1)
        bar_reg = 0x10 + 4 * VIRTIO_BAR
        self.bar = self.cfg_read(bar_reg + 4, 4) << 32 | self.cfg_read(bar_reg, 4) & ~0xF
        assert self.bar
        self.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def addr(self, cfg_type: int, offset: int = 0) -> int:
        return self.bar + self.caps[cfg_type] + offset

    def common_read(self, field: int, size: int) -> int:
        return self.mmio.read(self.addr(VIRTIO_PCI_CAP_COMMON_CFG, field), size)

    def common_write(self, field: int, size: int, value: int) -> None:
        self.mmio.write(self.addr(VIRTIO_PCI_CAP_COMMON_CFG, field), size, value)

    def device_config(self, offset: int, size: int) -> int:
        return self.mmio.read(self.addr(VIRTIO_PCI_CAP_DEVICE_CFG, offset), size)

    @property
    def status(self) -> int:
        return self.common_read(VIRTIO_PCI_COMMON_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.common_write(VIRTIO_PCI_COMMON_STATUS, 1, self.status | bits)

    def reset(self) -> None:
        self.common_write(VIRTIO_PCI_COMMON_STATUS, 1, 0)

    def device_features(self) -> int:
        features = 0
        for word in range(2):
            self.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, word)
            features |= self.common_read(VIRTIO_PCI_COMMON_DF, 4) << (32 * word)
        return features

    def negotiate(self, wanted: int) -> None:
        self.reset()
        self.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        assert wanted & ~offered == 0, f"device does not offer {wanted & ~offered:#x}"
        for word in range(2):
            self.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, word)
            self.common_write(VIRTIO_PCI_COMMON_GF, 4, wanted >> (32 * word) & 0xFFFF_FFFF)
        self.add_status(STATUS_FEATURES_OK)
        assert self.status & STATUS_FEATURES_OK

    def enable_msix(self, vectors: int) -> None:
        """Enable MSI-X, program and unmask the table, then the config vector 0."""
        self.cfg_write(self.msix_cap + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE)
        table = self.bar + (self.cfg_read(self.msix_cap + PCI_MSIX_TABLE, 4) & ~7)
        for i in range(vectors):
            self.mmio.write(table + 16 * i, 4, MSI_ADDRESS)
            self.mmio.write(table + 16 * i + 4, 4, 0)
            self.mmio.write(table + 16 * i + 8, 4, MSI_DATA_BASE + i)
            self.mmio.write(table + 16 * i + 12, 4, 0)  # unmasked
        self.common_write(VIRTIO_PCI_COMMON_MSIX, 2, 0)

    def setup_queue(self, q: int, driver: Driver, vector: int, desc: int | None = None) -> None:
        """setup_vq(): select, size, ring addresses, vector, enable."""
        self.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
        assert self.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) >= driver.size
        self.common_write(VIRTIO_PCI_COMMON_Q_SIZE, 2, driver.size)
        for field, gpa in (
            (VIRTIO_PCI_COMMON_Q_DESC, driver.desc_gpa if desc is None else desc),
            (VIRTIO_PCI_COMMON_Q_AVAIL, driver.driver_gpa),
            (VIRTIO_PCI_COMMON_Q_USED, driver.device_gpa),
        ):
            self.common_write(field, 4, gpa & 0xFFFF_FFFF)
            self.common_write(field + 4, 4, gpa >> 32)
        self.common_write(VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        assert self.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2) == vector
        assert self.common_read(VIRTIO_PCI_COMMON_Q_NOFF, 2) == q
        self.common_write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        self.drivers[q] = driver

    def notify(self, q: int) -> None:
        self.mmio.write(self.addr(VIRTIO_PCI_CAP_NOTIFY_CFG, q * self.notify_multiplier), 2, q)


class Board:
    """RAM, buses, the PCI root, the transport carrying a VirtioNet over a socket pair."""

    def __init__(
        self, memory: GuestMemory, options: NetOptions, backend: SocketPairNetBackend
    ) -> None:
        self.memory = memory
        self.platform = SimulatedPlatform(memory)
        self.pio = Bus("pio", 0x1_0000)
        self.mmio = Bus("mmio", 1 << 46)
        self.root = PciRoot(mmio=self.mmio, pio=self.pio)
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci-root")
        self.backend = backend
        self.net = VirtioNet(backend, options)
        self.net.attach(self.platform)
        self.transport = VirtioPciTransport(self.net, self.platform)
        self.root.add(self.transport, SLOT)
        self.guest = Guest(self.pio, self.mmio, memory)
        self.guest.probe()
        self.ctrl_q = -1  # the control queue's index in the current activation
        self.rx_buffers: dict[int, list[int]] = {}  # rx queue -> heads it holds

    def close(self) -> None:
        self.transport.close()
        self.net.close()

    def bring_up(
        self,
        *,
        packed: bool,
        extra: int = 0,
        features: int = DRIVER_FEATURES,
        pairs: int = 1,
        ctrl: bool = True,
        ctrl_size: int = QUEUE_SIZE,
        rx_size: int = ETH_FRAME_MAX + VNET_HDR_LEN,
    ) -> None:
        """A whole driver probe: features, MSI-X, rings for ``pairs`` rx/tx pairs and the
        control queue after them, DRIVER_OK, then receive buffers on every receiveq.
        Queue ``q`` gets MSI-X vector ``q + 1``; vector 0 is for configuration changes."""
        g = self.guest
        g.drivers.clear()
        g.negotiate(features | extra | (1 << VIRTIO_F_RING_PACKED if packed else 0))
        self.ctrl_q = 2 * pairs
        g.enable_msix(self.ctrl_q + 2)
        for q in range(self.ctrl_q + (1 if ctrl else 0)):
            size = ctrl_size if q == self.ctrl_q else QUEUE_SIZE
            g.setup_queue(q, make_driver(self.memory, size, RAM[q + 1][0], packed=packed), q + 1)
        g.add_status(STATUS_DRIVER_OK)
        assert g.status & STATUS_DRIVER_OK
        assert not g.status & STATUS_DEVICE_NEEDS_RESET
        for pair in range(pairs):
            self.post_rx(2 * pair, RX_BUFFERS, rx_size)

    # -- data queues ---------------------------------------------------------------------

    def post_rx(self, q: int, count: int, size: int = ETH_FRAME_MAX + VNET_HDR_LEN) -> None:
        driver = self.guest.drivers[q]
        for _ in range(count):
            driver.add_chain([], [size])
        self.guest.notify(q)

    def receive(self, q: int = 0) -> list[bytes]:
        """Wait for used entries on receiveq ``q``: the bytes of each (then a fresh buffer
        replaces it)."""
        driver = self.guest.drivers[q]
        used = wait_until(driver.used, f"a used entry on receiveq {q}")
        out = []
        for head, length in used:
            raw = b"".join(self.memory.read(gpa, n) for gpa, n in driver.writable_buffers(head))
            out.append(raw[:length])
        self.post_rx(q, len(used))
        return out

    def transmit(self, q: int, data: bytes) -> None:
        """Post one TX chain on transmitq ``q``, kick, wait for its used entry."""
        driver = self.guest.drivers[q]
        head = driver.add_chain([data[:VNET_HDR_LEN], data[VNET_HDR_LEN:]], [])
        self.guest.notify(q)
        assert [h for h, _ in wait_until(driver.used, f"the used entry on transmitq {q}")] == [head]

    def peer_recv(self, pair: int = 0) -> bytes:
        fd = self.backend.peer_fds[pair]
        readable, _, _ = select.select([fd], [], [], WAIT_S)
        assert readable, f"nothing reached peer {pair}"
        return os.read(fd, 1 << 17)

    def peer_send(self, data: bytes, pair: int = 0) -> None:
        os.write(self.backend.peer_fds[pair], data)

    def rx_outcome(self, dst: bytes, pair: int = 0) -> bytes | None:
        """Send a frame to ``dst`` from the peer: the bytes the guest got, or None if the
        receive filter dropped it (the engine's counters tell which, without sleeping)."""
        engine = self.net.engine
        assert engine is not None

        def counters() -> tuple[int, int]:
            stats = engine.stats()
            return stats["rx_packets"], stats["rx_dropped_filter"]

        before = counters()
        sent = packet(dst, payload=os.urandom(32))
        self.peer_send(sent, pair)
        after = wait_until(lambda: counters() if counters() != before else None, "the frame")
        if after[1] > before[1]:
            return None
        (got,) = self.receive(2 * pair)
        assert got[VNET_HDR_LEN:] == sent[VNET_HDR_LEN:]
        return got

    def passes(self, dst: bytes) -> bool:
        return self.rx_outcome(dst) is not None

    # -- the control queue ---------------------------------------------------------------

    def ctrl_chain(self, readable: list[bytes], writable: list[int]) -> tuple[int, int | None]:
        """Post one control chain, kick, let the I/O loop serve it: (used length, ack)."""
        driver = self.guest.drivers[self.ctrl_q]
        head = driver.add_chain([r for r in readable if r], writable)
        segments = driver.writable_buffers(head)
        for gpa, n in segments:
            self.memory.fill(gpa, n, 0xEE)  # so we see whether the device wrote the ack
        self.guest.notify(self.ctrl_q)

        def served() -> list[tuple[int, int]]:
            self.platform.poll()
            return driver.used()

        used = wait_until(served, "the control request's used entry")
        assert [h for h, _ in used] == [head]
        ack = self.memory.read_u8(segments[0][0]) if segments else None
        return used[0][1], ack

    def ctrl(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """A control request as Linux sends it (header, data, ack); returns the ack."""
        length, ack = self.ctrl_chain([bytes([cls, cmd]), data], [1])
        assert length == 1 and ack is not None
        return ack

    def rx_mode(self, cmd: int, on: bool) -> None:
        assert self.ctrl(CTRL_RX, cmd, bytes([on])) == VIRTIO_NET_OK

    def config_mac(self) -> bytes:
        return bytes(self.guest.device_config(CFG_MAC + i, 1) for i in range(6))

    # -- interrupts and errors -----------------------------------------------------------

    def vector(self, index: int) -> SimulatedMsiVector:
        """The platform vector behind MSI-X table entry ``index``."""
        fd = self.transport.msix.vector_eventfd(index)
        return next(v for v in self.platform.vectors if v.eventfd == fd)

    def wait_for_msi(self, index: int, count: int = 1) -> list[tuple[int, int]]:
        vector = self.vector(index)

        def delivered() -> list[tuple[int, int]] | None:
            self.platform.poll()
            return vector.delivered if len(vector.delivered) >= count else None

        return wait_until(delivered, f"MSI-X vector {index} delivery #{count}")

    def wait_for_needs_reset(self) -> None:
        def flagged() -> bool:
            self.platform.poll()
            return bool(self.transport.status & STATUS_DEVICE_NEEDS_RESET)

        wait_until(flagged, "DEVICE_NEEDS_RESET")

    @property
    def needs_reset(self) -> bool:
        return bool(self.transport.status & STATUS_DEVICE_NEEDS_RESET)


BoardFactory = Callable[..., Board]


@pytest.fixture
def make_board() -> Iterator[BoardFactory]:
    memory = GuestMemory(RAM)
    boards: list[Board] = []

    def make(
        options: NetOptions = BOARD_OPTIONS,
        backend: SocketPairNetBackend | None = None,
    ) -> Board:
        board = Board(memory, options, backend or SocketPairNetBackend(options.queue_pairs))
        boards.append(board)
        return board

    yield make
    for board in boards:  # workers stop before guest RAM goes away
        board.close()
    memory.close()


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def test_config_space_through_the_device_cfg_capability(make_board: BoardFactory) -> None:
    options = NetOptions(mac=bytes.fromhex("02aabbccddee"), queue_pairs=2, mtu=1400)
    board = make_board(options)
    g = board.guest
    assert g.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) == 5  # 2 pairs and the control queue
    assert board.config_mac() == bytes.fromhex("02aabbccddee")
    assert g.device_config(CFG_STATUS, 2) == VIRTIO_NET_S_LINK_UP
    assert g.device_config(CFG_MAX_VIRTQUEUE_PAIRS, 2) == 2
    assert g.device_config(CFG_MTU, 2) == 1400
    assert g.device_config(CFG_MAC, 4) == 0xCCBBAA02  # mac[0..3] as a little-endian word
    offered = g.device_features()
    assert offered == board.net.device_features()
    assert has(offered, F_MQ) and has(offered, F_MTU)


def test_tx_and_rx_end_to_end(make_board: BoardFactory, packed: bool) -> None:
    board = make_board()
    threads = thread_count()
    board.bring_up(packed=packed)
    assert thread_count() == threads + 1  # one worker for the one pair
    engine = board.net.engine
    assert engine is not None
    assert engine.error_fd in board.platform.watches
    assert board.transport.kick_fds[board.ctrl_q] in board.platform.watches  # control queue

    # TX: the guest's header and frame reach the peer exactly as posted.
    sent = packet(PEER_MAC, payload=os.urandom(100), src=OWN_MAC)
    board.transmit(1, sent)
    assert board.peer_recv() == sent

    # RX: the peer's header and frame land in a guest buffer with num_buffers = 1.
    incoming = vnet_hdr(num_buffers=0x7777) + OWN_MAC + PEER_MAC + b"\x08\x00" + os.urandom(200)
    board.peer_send(incoming)
    (got,) = board.receive(0)
    assert len(got) == len(incoming)
    assert struct.unpack_from("<H", got, NUM_BUFFERS)[0] == 1
    assert got[:NUM_BUFFERS] == incoming[:NUM_BUFFERS]
    assert got[VNET_HDR_LEN:] == incoming[VNET_HDR_LEN:]
    # The receiveq's vector (queue 0 -> entry 1) carried the interrupt, with its message.
    assert board.wait_for_msi(1)[0] == (MSI_ADDRESS, MSI_DATA_BASE + 1)
    assert board.vector(0).delivered == []  # no configuration interrupt
    assert not board.needs_reset


def test_mergeable_rx_buffers_span_several_chains(make_board: BoardFactory, packed: bool) -> None:
    board = make_board()
    board.bring_up(packed=packed, extra=1 << F_MRG_RXBUF, rx_size=256)
    incoming = packet(OWN_MAC, payload=os.urandom(600 - VNET_HDR_LEN - 14))
    board.peer_send(incoming)
    got: list[bytes] = []
    while sum(map(len, got)) < len(incoming):
        got += board.receive(0)
    assert [len(b) for b in got] == [256, 256, 88]
    whole = b"".join(got)
    assert struct.unpack_from("<H", whole, NUM_BUFFERS)[0] == 3
    assert whole[VNET_HDR_LEN:] == incoming[VNET_HDR_LEN:]


def test_without_mergeable_buffers_a_packet_never_spans_chains(make_board: BoardFactory) -> None:
    board = make_board()
    board.bring_up(packed=False, rx_size=256)
    engine = board.net.engine
    assert engine is not None
    board.peer_send(packet(OWN_MAC, payload=bytes(600)))
    assert board.receive(0) == [b""]  # the too-small chain comes back empty
    assert engine.stats()["rx_packets"] == 0


def test_receive_filter_follows_the_control_queue(make_board: BoardFactory, packed: bool) -> None:
    board = make_board()
    board.bring_up(packed=packed)
    # A reset device is promiscuous (as QEMU's): everything passes.
    assert board.passes(FOREIGN_MAC) and board.passes(MCAST_OTHER)

    board.rx_mode(CTRL_RX_PROMISC, False)
    assert board.passes(OWN_MAC)
    assert not board.passes(FOREIGN_MAC)
    assert board.passes(BROADCAST)
    assert not board.passes(MCAST_LISTED)  # not in the (empty) multicast table

    board.rx_mode(CTRL_RX_NOBCAST, True)
    assert not board.passes(BROADCAST)
    assert board.passes(OWN_MAC)
    board.rx_mode(CTRL_RX_NOBCAST, False)
    assert board.passes(BROADCAST)

    # The multicast table lets its entries through, and only those.
    assert board.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, mac_table([], [MCAST_LISTED])) == 0
    assert board.passes(MCAST_LISTED)
    assert not board.passes(MCAST_OTHER)
    board.rx_mode(CTRL_RX_ALLMULTI, True)
    assert board.passes(MCAST_OTHER)
    board.rx_mode(CTRL_RX_NOMULTI, True)  # NOMULTI wins over ALLMULTI and the table
    assert not board.passes(MCAST_OTHER) and not board.passes(MCAST_LISTED)
    assert board.passes(BROADCAST)  # broadcast is its own class
    board.rx_mode(CTRL_RX_NOMULTI, False)
    board.rx_mode(CTRL_RX_ALLMULTI, False)
    assert not board.passes(MCAST_OTHER)

    # The unicast table adds addresses next to our own MAC; a new table replaces both lists.
    assert board.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, mac_table([EXTRA_UNICAST], [])) == 0
    assert board.passes(EXTRA_UNICAST) and board.passes(OWN_MAC)
    assert not board.passes(FOREIGN_MAC)
    assert not board.passes(MCAST_LISTED)
    board.rx_mode(CTRL_RX_ALLUNI, True)
    assert board.passes(FOREIGN_MAC)
    board.rx_mode(CTRL_RX_ALLUNI, False)
    board.rx_mode(CTRL_RX_NOUNI, True)
    assert not board.passes(OWN_MAC)
    board.rx_mode(CTRL_RX_NOUNI, False)

    board.rx_mode(CTRL_RX_PROMISC, True)
    assert board.passes(FOREIGN_MAC)
    assert not board.needs_reset
    assert board.net.ctrl_errors == 0


def test_mac_addr_set_moves_the_unicast_filter_and_the_config_mac(
    make_board: BoardFactory,
) -> None:
    board = make_board()
    board.bring_up(packed=False)
    board.rx_mode(CTRL_RX_PROMISC, False)
    assert board.config_mac() == OWN_MAC
    assert board.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, NEW_MAC) == VIRTIO_NET_OK
    assert board.passes(NEW_MAC)
    assert not board.passes(OWN_MAC)
    # 5.1.6.5.2: with VIRTIO_NET_F_MAC negotiated the new address shows in the config space.
    assert board.config_mac() == NEW_MAC
    # The driver's address belongs to that driver: after a reset the configured one is back,
    # before DRIVER_OK (a driver reads the MAC while probing) and after it.
    board.guest.reset()
    assert board.config_mac() == OWN_MAC
    board.bring_up(packed=False)
    assert board.config_mac() == OWN_MAC
    board.rx_mode(CTRL_RX_PROMISC, False)
    assert board.passes(OWN_MAC) and not board.passes(NEW_MAC)


def test_mac_addr_set_needs_its_feature(make_board: BoardFactory) -> None:
    board = make_board()
    board.bring_up(packed=False, features=DRIVER_FEATURES & ~(1 << F_CTRL_MAC_ADDR))
    assert board.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, NEW_MAC) == VIRTIO_NET_ERR
    assert board.config_mac() == OWN_MAC


def test_an_overflowing_table_widens_the_filter_only_while_it_overflows(
    make_board: BoardFactory,
) -> None:
    board = make_board()
    board.bring_up(packed=False)
    board.rx_mode(CTRL_RX_PROMISC, False)
    many_uni = [bytes.fromhex("5254aa") + i.to_bytes(3, "big") for i in range(100)]
    many_multi = [bytes.fromhex("01005e") + i.to_bytes(3, "big") for i in range(100)]
    table = mac_table(many_uni, many_multi)
    assert board.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, table) == VIRTIO_NET_OK
    # More addresses than the engine's filter holds: all unicast and multicast pass.
    assert board.passes(FOREIGN_MAC) and board.passes(MCAST_OTHER)
    board.rx_mode(CTRL_RX_NOBCAST, True)  # a mode change keeps the overflow in force
    assert board.passes(FOREIGN_MAC) and board.passes(MCAST_OTHER)
    # A table that fits again filters exactly again.
    table = mac_table([EXTRA_UNICAST], [MCAST_LISTED])
    assert board.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, table) == VIRTIO_NET_OK
    assert not board.passes(FOREIGN_MAC) and not board.passes(MCAST_OTHER)
    assert board.passes(EXTRA_UNICAST) and board.passes(MCAST_LISTED)


def test_rx_modes_need_their_features(make_board: BoardFactory) -> None:
    board = make_board()
    board.bring_up(packed=False, features=DRIVER_FEATURES & ~(1 << F_CTRL_RX_EXTRA))
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_OK
    for cmd in (CTRL_RX_ALLUNI, CTRL_RX_NOMULTI, CTRL_RX_NOUNI, CTRL_RX_NOBCAST):
        assert board.ctrl(CTRL_RX, cmd, b"\1") == VIRTIO_NET_ERR  # CTRL_RX_EXTRA's commands
    assert board.passes(BROADCAST)  # NOBCAST was refused, not applied

    no_rx = DRIVER_FEATURES & ~(1 << F_CTRL_RX | 1 << F_CTRL_RX_EXTRA)
    board.bring_up(packed=False, features=no_rx)
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_ERR
    assert board.passes(FOREIGN_MAC)  # still promiscuous


def test_multiqueue_pairs(make_board: BoardFactory, packed: bool) -> None:
    board = make_board(NetOptions(queue_pairs=2, queue_size=64))
    threads = thread_count()
    board.bring_up(packed=packed, extra=1 << F_MQ, pairs=2)
    assert thread_count() == threads + 2  # a worker per pair
    assert board.backend.active_pairs == 1  # the spec's start: one pair until the driver asks
    assert board.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == VIRTIO_NET_OK
    assert board.backend.active_pairs == 2
    assert board.net.active_pairs == 2
    for bad in (0, 3, 0x8000, 0xFFFF):
        assert board.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", bad)) == VIRTIO_NET_ERR
    assert board.backend.active_pairs == 2  # refused requests change nothing
    # Pair 1: transmitq 3 goes to the second fd, the second fd's packets to receiveq 2.
    sent = packet(PEER_MAC, src=OWN_MAC)
    board.transmit(3, sent)
    assert board.peer_recv(1) == sent
    assert board.rx_outcome(OWN_MAC, pair=1) is not None
    assert board.wait_for_msi(3)[0] == (MSI_ADDRESS, MSI_DATA_BASE + 3)
    assert board.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == VIRTIO_NET_OK
    assert board.backend.active_pairs == 1


def test_without_mq_the_control_queue_follows_the_first_pair(make_board: BoardFactory) -> None:
    """5.1.2: without VIRTIO_NET_F_MQ the driver uses one pair and the control queue is
    queue 2, whatever max_virtqueue_pairs says."""
    board = make_board(NetOptions(queue_pairs=2, queue_size=64))
    threads = thread_count()
    board.bring_up(packed=False, pairs=1)
    assert board.ctrl_q == 2
    assert thread_count() == threads + 1
    board.rx_mode(CTRL_RX_PROMISC, False)
    assert not board.passes(FOREIGN_MAC)
    # MQ is not negotiated: its command is refused.
    assert board.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == VIRTIO_NET_ERR
    sent = packet(PEER_MAC, src=OWN_MAC)
    board.transmit(1, sent)
    assert board.peer_recv(0) == sent


def test_a_host_refusing_more_pairs_is_an_err_ack(make_board: BoardFactory) -> None:
    backend = RecordingBackend(pairs=2, refuse_pairs=True)
    board = make_board(NetOptions(queue_pairs=2, queue_size=64), backend)
    board.bring_up(packed=False, extra=1 << F_MQ, pairs=2)
    assert board.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == VIRTIO_NET_ERR
    assert board.net.active_pairs == 1
    assert board.net.host_errors.count == 1  # counted (and logged, rate-limited)
    assert not board.needs_reset
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_OK  # the queue goes on


MALFORMED: list[tuple[str, list[bytes]]] = [
    ("empty", []),
    ("class only", [bytes([CTRL_RX])]),
    ("unknown class", [bytes([9, 0]), b"\1"]),
    ("unknown rx command", [bytes([CTRL_RX, 9]), b"\1"]),
    ("rx without data", [bytes([CTRL_RX, CTRL_RX_PROMISC])]),
    ("rx with two bytes", [bytes([CTRL_RX, CTRL_RX_PROMISC]), b"\0\0"]),
    ("unknown mac command", [bytes([CTRL_MAC, 7]), bytes(6)]),
    ("mac addr short", [bytes([CTRL_MAC, CTRL_MAC_ADDR_SET]), NEW_MAC[:5]]),
    ("mac addr long", [bytes([CTRL_MAC, CTRL_MAC_ADDR_SET]), NEW_MAC + b"\0"]),
    ("table without counts", [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET])]),
    ("table count truncated", [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]), b"\0\0"]),
    (
        "unicast count past the data",
        [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]), struct.pack("<I", 2) + FOREIGN_MAC + bytes(4)],
    ),
    (
        "huge unicast count",
        [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]), struct.pack("<II", 0xFFFF_FFFF, 0)],
    ),
    ("multicast table missing", [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]), struct.pack("<I", 0)]),
    (
        "multicast count past the data",
        [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]), struct.pack("<II", 0, 1) + b"\1\0"],
    ),
    (
        "trailing bytes",
        [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]), mac_table([FOREIGN_MAC], []) + b"\0"],
    ),
    ("oversize", [bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]), mac_table([FOREIGN_MAC] * 700, [])]),
    ("mq short", [bytes([CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET]), b"\1"]),
    ("mq not negotiated", [bytes([CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET]), struct.pack("<H", 1)]),
    ("unknown mq command", [bytes([CTRL_MQ, 1]), struct.pack("<H", 1)]),
]


@pytest.mark.parametrize("readable", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_control_requests_get_err(
    make_board: BoardFactory, readable: list[bytes]
) -> None:
    board = make_board()
    board.bring_up(packed=False)
    board.rx_mode(CTRL_RX_PROMISC, False)
    assert board.ctrl_chain(readable, [1]) == (1, VIRTIO_NET_ERR)
    assert board.net.ctrl_errors == 1
    assert not board.needs_reset
    # The filter is as it was (the bad table did not half-apply) and the queue goes on.
    assert board.passes(OWN_MAC) and not board.passes(FOREIGN_MAC)
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\1") == VIRTIO_NET_OK
    assert board.passes(FOREIGN_MAC)


def test_a_request_split_over_many_descriptors_is_read_whole(make_board: BoardFactory) -> None:
    board = make_board()
    board.bring_up(packed=True)
    board.rx_mode(CTRL_RX_PROMISC, False)
    data = bytes([CTRL_MAC, CTRL_MAC_TABLE_SET]) + mac_table([EXTRA_UNICAST], [])
    pieces = [data[i : i + 3] for i in range(0, len(data), 3)]
    assert board.ctrl_chain(pieces, [1]) == (1, VIRTIO_NET_OK)
    assert board.passes(EXTRA_UNICAST)


def test_a_request_without_an_ack_buffer_is_still_completed(make_board: BoardFactory) -> None:
    board = make_board()
    board.bring_up(packed=False)
    assert board.ctrl_chain([bytes([CTRL_RX, CTRL_RX_PROMISC]), b"\0"], []) == (0, None)
    assert not board.passes(FOREIGN_MAC)  # executed, just not acknowledged
    assert not board.needs_reset
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\1") == VIRTIO_NET_OK


def test_control_requests_interrupt_the_driver(make_board: BoardFactory) -> None:
    board = make_board()
    board.bring_up(packed=False)
    board.rx_mode(CTRL_RX_PROMISC, False)
    assert board.wait_for_msi(board.ctrl_q + 1)[0] == (
        MSI_ADDRESS,
        MSI_DATA_BASE + board.ctrl_q + 1,
    )


def test_a_flood_of_control_requests_is_served_in_bounded_batches(
    make_board: BoardFactory,
) -> None:
    board = make_board(NetOptions(queue_size=128))
    board.bring_up(packed=False, ctrl_size=128)
    driver = board.guest.drivers[board.ctrl_q]
    requests = 100
    for i in range(requests):
        driver.add_chain([bytes([CTRL_RX, CTRL_RX_PROMISC]), bytes([i & 1])], [1], indirect=True)
    board.guest.notify(board.ctrl_q)
    board.platform.poll()  # one turn of the host I/O loop
    assert len(driver.used()) == MAX_CTRL_BATCH
    board.platform.poll()  # the device kicked itself for the rest
    assert len(driver.used()) == requests - MAX_CTRL_BATCH
    assert board.net.ctrl_requests == requests
    assert board.passes(FOREIGN_MAC)  # applied in order: the last one (odd) set PROMISC


def test_a_control_chain_outside_ram_needs_reset(make_board: BoardFactory, packed: bool) -> None:
    board = make_board()
    board.bring_up(packed=packed)
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_OK
    driver = board.guest.drivers[board.ctrl_q]
    driver.add_descriptors([(OUTSIDE_RAM, 2, 0, 0)])
    board.guest.notify(board.ctrl_q)
    board.wait_for_needs_reset()
    assert board.wait_for_msi(0) == [(MSI_ADDRESS, MSI_DATA_BASE)]  # configuration change
    assert driver.used() == []  # nothing was completed
    # The data path still runs until the driver resets; more kicks are ignored quietly.
    for _ in range(5):
        board.guest.notify(board.ctrl_q)
        board.platform.poll()
    assert board.net.queue_errors.count == 1
    assert board.passes(OWN_MAC)
    # A reset and a fresh probe bring the control queue back.
    board.guest.reset()
    board.bring_up(packed=packed)
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_OK
    assert not board.needs_reset


def test_control_rings_outside_ram_fail_activation(make_board: BoardFactory) -> None:
    board = make_board()
    threads = thread_count()
    g = board.guest
    g.negotiate(DRIVER_FEATURES)
    g.enable_msix(4)
    for q in range(3):
        driver = make_driver(board.memory, QUEUE_SIZE, RAM[q + 1][0], packed=False)
        g.setup_queue(q, driver, q + 1, desc=OUTSIDE_RAM if q == 2 else None)
    g.add_status(STATUS_DRIVER_OK)
    assert g.status & STATUS_DEVICE_NEEDS_RESET
    assert board.net.engine is None
    wait_until(lambda: thread_count() == threads, "the half-started worker to end")
    board.bring_up(packed=False)  # a correct probe afterwards works
    assert board.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_OK


def test_reset_stops_the_workers_and_reactivation_works(
    make_board: BoardFactory, packed: bool
) -> None:
    board = make_board()
    threads = thread_count()
    board.bring_up(packed=packed)
    assert thread_count() == threads + 1
    board.rx_mode(CTRL_RX_PROMISC, False)
    engine = board.net.engine
    assert engine is not None
    error_fd, kick_fd = engine.error_fd, board.transport.kick_fds[board.ctrl_q]

    board.guest.reset()
    assert board.transport.status == 0
    assert board.net.engine is None
    assert error_fd not in board.platform.watches
    assert kick_fd not in board.platform.watches
    wait_until(lambda: thread_count() == threads, "the worker thread to end")

    board.bring_up(packed=packed)
    assert thread_count() == threads + 1
    assert board.passes(FOREIGN_MAC)  # promiscuous again, as after power-on
    sent = packet(PEER_MAC, src=OWN_MAC)
    board.transmit(1, sent)
    assert board.peer_recv() == sent
    assert not board.needs_reset


def test_close_stops_the_data_path_and_closes_the_backend(make_board: BoardFactory) -> None:
    backend = RecordingBackend()
    board = make_board(BOARD_OPTIONS, backend)
    threads = thread_count()
    board.bring_up(packed=True)
    assert thread_count() == threads + 1
    board.transport.close()
    board.net.close()
    assert board.net.engine is None
    assert backend.closes == 1
    assert backend.fds == [-1]
    wait_until(lambda: thread_count() == threads, "the worker thread to end")
    board.net.close()  # idempotent, as VM teardown may run it twice


@pytest.mark.parametrize(
    ("negotiated", "tun"),
    [
        (0, 0),
        (1 << F_GUEST_CSUM, TUN_F_CSUM),
        (1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4, TUN_F_CSUM | TUN_F_TSO4),
        (
            1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6 | 1 << F_GUEST_ECN,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
        ),
        (1 << F_CSUM | 1 << F_HOST_TSO4, 0),  # what the guest sends is not a receive offload
    ],
)
def test_negotiated_guest_offloads_reach_the_backend(
    make_board: BoardFactory, negotiated: int, tun: int
) -> None:
    board = make_board()
    board.backend.offloads = -1  # so we see that activation set it
    board.bring_up(packed=False, extra=negotiated)
    assert board.backend.offloads == tun


def test_a_broken_data_queue_needs_reset(make_board: BoardFactory, packed: bool) -> None:
    board = make_board()
    board.bring_up(packed=packed)
    engine = board.net.engine
    assert engine is not None
    board.guest.drivers[1].add_descriptors([(OUTSIDE_RAM, 64, 0, 0)])
    board.guest.notify(1)
    board.wait_for_needs_reset()
    assert engine.queue_error(1) == -errno.EFAULT
    assert board.guest.status & STATUS_DRIVER_OK  # the driver's bits stay until it resets
    assert board.wait_for_msi(0) == [(MSI_ADDRESS, MSI_DATA_BASE)]


def break_tx(board: Board) -> None:
    """Publish a TX chain outside guest RAM, kick, wait for the worker to report it."""
    engine = board.net.engine
    assert engine is not None
    board.guest.drivers[1].add_descriptors([(OUTSIDE_RAM, 64, 0, 0)])
    board.guest.notify(1)
    wait_until(lambda: select.select([engine.error_fd], [], [], 0)[0], "the broken queue")


def test_a_guest_breaking_queues_over_and_over_cannot_flood_the_log(
    make_board: BoardFactory, caplog: pytest.LogCaptureFixture
) -> None:
    board = make_board()
    rounds = 20
    with caplog.at_level(logging.WARNING, logger="iovirt.virtio.net"):
        for _ in range(rounds):
            board.bring_up(packed=False)
            break_tx(board)
            board.wait_for_needs_reset()
    assert board.net.queue_errors.count == rounds  # every one counted
    logged = [r for r in caplog.records if r.name == "iovirt.virtio.net"]
    assert 1 <= len(logged) <= 17  # the first 16, then one line saying it goes quiet


def test_reset_racing_the_error_callback_waits_for_it(
    make_board: BoardFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error callback runs on the host I/O loop while a vCPU may reset the device: the
    reset must wait until the callback is done with the engine."""
    board = make_board()
    board.bring_up(packed=False)
    break_tx(board)
    engine = board.net.engine
    assert engine is not None
    error_fd = engine.error_fd
    callback = board.platform.watches[error_fd]
    vcpu = threading.Thread(target=board.guest.reset)
    reset_was_running: list[bool] = []
    real_eventfd_read = os.eventfd_read

    def read_then_race(fd: int) -> int:
        value = real_eventfd_read(fd)
        if fd == error_fd and not reset_was_running:
            vcpu.start()
            vcpu.join(timeout=0.2)  # as long as the reset needs, unless it must wait
            reset_was_running.append(vcpu.is_alive())
        return value

    monkeypatch.setattr(os, "eventfd_read", read_then_race)
    callback()  # must not fail on an engine closed under it
    monkeypatch.undo()
    vcpu.join(timeout=WAIT_S)
    assert not vcpu.is_alive()
    assert reset_was_running == [True]  # the reset waited until the callback was done
    assert board.net.queue_errors.count == 1  # the callback finished its work, then reset
    assert board.net.engine is None
    assert board.transport.status == 0


def test_reset_racing_a_control_request_waits_for_it(
    make_board: BoardFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset that arrives while the I/O loop serves a control request must not let the
    request finish afterwards: the device would write into rings the driver took back."""
    board = make_board()
    board.bring_up(packed=False)
    driver = board.guest.drivers[board.ctrl_q]
    head = driver.add_chain([bytes([CTRL_RX, CTRL_RX_PROMISC]), b"\0"], [1])
    board.guest.notify(board.ctrl_q)
    kick_fd = board.transport.kick_fds[board.ctrl_q]
    callback = board.platform.watches[kick_fd]
    vcpu = threading.Thread(target=board.guest.reset)
    reset_was_running: list[bool] = []
    real_eventfd_read = os.eventfd_read

    def read_then_race(fd: int) -> int:
        value = real_eventfd_read(fd)
        if fd == kick_fd and not reset_was_running:
            vcpu.start()
            vcpu.join(timeout=0.2)
            reset_was_running.append(vcpu.is_alive())
        return value

    monkeypatch.setattr(os, "eventfd_read", read_then_race)
    callback()
    monkeypatch.undo()
    vcpu.join(timeout=WAIT_S)
    assert reset_was_running == [True]  # the reset waited for the request
    assert driver.used() == [(head, 1)]  # which completed before the reset
    assert board.net.engine is None
    assert board.transport.status == 0
