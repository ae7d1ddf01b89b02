"""Tests of the virtio-blk front half (:mod:`iovirt.virtio.blk`).

Two levels. First :class:`VirtioBlk` alone: the feature bits it offers for each option and
backend, and its config space read at the byte offsets of ``struct virtio_blk_config``
(virtio 1.2, 5.2.4) rather than through the module's own struct. Then end to end, the way
a guest meets it: the device behind the real virtio-pci transport on a :class:`PciRoot`
with port and MMIO buses, a :class:`SimulatedPlatform` (``poll()`` runs what the host I/O
loop would), a real image file, and the synthetic driver laying out split or packed rings
in guest RAM. The guest probes the capabilities through 0xCF8/0xCFC, negotiates, programs
MSI-X and the queues, sets DRIVER_OK, and from then on the C worker threads serve its
requests; the test kicks through the notify address (or the kick eventfd) and waits for
used entries, interrupts, and DEVICE_NEEDS_RESET when the guest breaks a ring.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from iovirt.backends.block import FileBlockBackend
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
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedMsiVector, SimulatedPlatform
from iovirt.testing.virtio_driver import PackedDriver, SplitDriver, make_driver
from iovirt.virtio.blk import (
    CONFIG_SIZE,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    BlkOptions,
    VirtioBlk,
)
from iovirt.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
)
from iovirt.virtio.pci import (
    VIRTIO_BAR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
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
    VIRTIO_PCI_ISR_QUEUE,
    VirtioPciTransport,
)

T = TypeVar("T")

# virtio 1.2, 5.2.6: request types and status values.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# struct virtio_blk_config offsets (virtio 1.2, 5.2.4).
CFG_CAPACITY = 0
CFG_SIZE_MAX = 8
CFG_SEG_MAX = 12
CFG_GEOMETRY = 16
CFG_BLK_SIZE = 20
CFG_TOPOLOGY = 24
CFG_WRITEBACK = 32
CFG_NUM_QUEUES = 34
CFG_MAX_DISCARD_SECTORS = 36
CFG_MAX_DISCARD_SEG = 40
CFG_DISCARD_SECTOR_ALIGNMENT = 44
CFG_MAX_WRITE_ZEROES_SECTORS = 48
CFG_MAX_WRITE_ZEROES_SEG = 52
CFG_WRITE_ZEROES_MAY_UNMAP = 56

SECTOR = 512
DISK_BYTES = 64 * SECTOR
SLOT = 5
GSI = 10
MSI_ADDRESS = 0xFEE0_0000
MSI_DATA_BASE = 0x30
QUEUE_SIZE = 16
# Guest RAM: region 0 is spare (the malformed chain's status byte lives there); queue q
# gets its own region, so each driver's data arena runs to its own region's end.
REGION = 0x10_0000
RAM = [(0, REGION), (2 * REGION, REGION), (4 * REGION, REGION)]
OUTSIDE_RAM = 0x1_0000_0000
WAIT_S = 5.0  # generous: a worker answers in microseconds
BOARD_OPTIONS = BlkOptions(queue_size=64)

DRIVER_FEATURES = (
    1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_F_INDIRECT_DESC
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH
)

Driver = SplitDriver | PackedDriver


def header(req_type: int, sector: int = 0) -> bytes:
    """struct virtio_blk_req's header: le32 type, le32 reserved, le64 sector."""
    return struct.pack("<IIQ", req_type, 0, sector)


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
    """Threads of this process that Python did not start: the C workers (and nothing else
    comes and goes there while a test runs, unlike Python helper threads)."""
    python = {t.native_id for t in threading.enumerate()}
    return sum(int(tid) not in python for tid in os.listdir("/proc/self/task"))


@dataclass
class FakeBackend:
    """A BlockBackend for the tests that never touch the data path."""

    size: int = DISK_BYTES
    readonly: bool = False
    direct: bool = False
    fd: int = -1
    closed: bool = False

    def close(self) -> None:
        self.closed = True


# -- feature bits ---------------------------------------------------------------------------


def has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


@pytest.mark.parametrize(
    ("readonly", "discard", "queues", "packed"),
    list(itertools.product([False, True], [False, True], [1, 4], [False, True])),
)
def test_device_features_follow_options_and_backend(
    readonly: bool, discard: bool, queues: int, packed: bool
) -> None:
    blk = VirtioBlk(
        FakeBackend(readonly=readonly),
        BlkOptions(discard=discard, num_queues=queues, packed=packed),
    )
    features = blk.device_features()
    assert has(features, VIRTIO_F_VERSION_1)  # a modern-only device
    assert has(features, VIRTIO_BLK_F_FLUSH)
    assert has(features, VIRTIO_BLK_F_BLK_SIZE)
    assert has(features, VIRTIO_BLK_F_SEG_MAX)
    assert has(features, VIRTIO_BLK_F_RO) == readonly
    assert has(features, VIRTIO_BLK_F_DISCARD) == (discard and not readonly)
    assert has(features, VIRTIO_BLK_F_WRITE_ZEROES) == (discard and not readonly)
    assert has(features, VIRTIO_BLK_F_MQ) == (queues > 1)
    assert has(features, VIRTIO_F_RING_PACKED) == packed
    assert not has(features, VIRTIO_BLK_F_SIZE_MAX)  # size_max 0: no limit, not offered


def test_size_max_is_offered_only_when_set() -> None:
    blk = VirtioBlk(FakeBackend(), BlkOptions(size_max=65536))
    assert has(blk.device_features(), VIRTIO_BLK_F_SIZE_MAX)


def test_device_identity() -> None:
    blk = VirtioBlk(FakeBackend(), BlkOptions(num_queues=3, queue_size=128))
    assert blk.device_id == VIRTIO_ID_BLOCK
    assert blk.num_queues == 3
    assert blk.queue_max_size == 128


@pytest.mark.parametrize(
    "options",
    [
        BlkOptions(num_queues=0),
        BlkOptions(num_queues=65),
        BlkOptions(queue_size=2),
        BlkOptions(queue_size=100),
        BlkOptions(queue_size=2048),
        BlkOptions(blk_size=256),
        BlkOptions(blk_size=1000),
        BlkOptions(serial=b"x" * 21),
    ],
)
def test_bad_options_are_refused(options: BlkOptions) -> None:
    with pytest.raises(ValueError):
        VirtioBlk(FakeBackend(), options)


# -- config space -----------------------------------------------------------------------------


def config_bytes(blk: VirtioBlk) -> bytes:
    """The config space as a driver reads it, one byte at a time."""
    return bytes(blk.config_read(i, 1) for i in range(CONFIG_SIZE))


def test_config_space_layout() -> None:
    backend = FakeBackend(size=10 * (1 << 20) + 100)  # the odd tail is not addressable
    blk = VirtioBlk(
        backend, BlkOptions(num_queues=3, queue_size=128, blk_size=4096, size_max=65536)
    )
    raw = config_bytes(blk)
    assert len(raw) == CONFIG_SIZE == 60

    def u8(at: int) -> int:
        return raw[at]

    def u16(at: int) -> int:
        value: int = struct.unpack_from("<H", raw, at)[0]
        return value

    def u32(at: int) -> int:
        value: int = struct.unpack_from("<I", raw, at)[0]
        return value

    assert struct.unpack_from("<Q", raw, CFG_CAPACITY)[0] == 10 * 2048  # 512-byte sectors
    assert u32(CFG_SIZE_MAX) == 65536
    assert u32(CFG_SEG_MAX) == 126  # queue_size - 2, as QEMU offers
    assert raw[CFG_GEOMETRY:CFG_BLK_SIZE] == bytes(4)  # geometry not offered
    assert u32(CFG_BLK_SIZE) == 4096
    assert raw[CFG_TOPOLOGY:CFG_WRITEBACK] == bytes(8)  # topology not offered
    assert u8(CFG_WRITEBACK) == 0
    assert u16(CFG_NUM_QUEUES) == 3
    assert u32(CFG_MAX_DISCARD_SECTORS) == MAX_DISCARD_SECTORS
    assert u32(CFG_MAX_DISCARD_SEG) == MAX_DISCARD_SEG
    assert u32(CFG_DISCARD_SECTOR_ALIGNMENT) == 4096 // SECTOR  # in 512-byte sectors
    assert u32(CFG_MAX_WRITE_ZEROES_SECTORS) == MAX_DISCARD_SECTORS
    assert u32(CFG_MAX_WRITE_ZEROES_SEG) == MAX_DISCARD_SEG
    assert u8(CFG_WRITE_ZEROES_MAY_UNMAP) == 1
    assert raw[57:60] == bytes(3)  # unused1


def test_config_reads_of_every_width_agree_with_the_bytes() -> None:
    blk = VirtioBlk(FakeBackend(size=(1 << 40) + 512), BlkOptions(seg_max=7, num_queues=2))
    raw = config_bytes(blk)
    for size in (1, 2, 4):
        for at in range(0, CONFIG_SIZE - size + 1, size):
            assert blk.config_read(at, size) == int.from_bytes(raw[at : at + size], "little")
    capacity = (1 << 40) // SECTOR + 1
    assert blk.config_read(CFG_CAPACITY, 4) == capacity & 0xFFFF_FFFF
    assert blk.config_read(CFG_CAPACITY + 4, 4) == capacity >> 32
    assert blk.config_read(CFG_SEG_MAX, 4) == 7


@pytest.mark.parametrize(("offset", "size"), [(60, 1), (58, 4), (4095, 1), (-1, 1), (0, 0)])
def test_config_read_outside_the_structure_is_zero(offset: int, size: int) -> None:
    blk = VirtioBlk(FakeBackend(), BlkOptions())
    assert blk.config_read(offset, size) == 0


def test_config_writes_are_ignored() -> None:
    blk = VirtioBlk(FakeBackend(), BlkOptions())
    before = config_bytes(blk)
    for at in range(0, CONFIG_SIZE, 4):
        blk.config_write(at, 4, 0xFFFF_FFFF)
    blk.config_write(CFG_WRITEBACK, 1, 1)  # writeback needs CONFIG_WCE, not offered
    assert config_bytes(blk) == before


def test_close_closes_the_backend() -> None:
    backend = FakeBackend()
    VirtioBlk(backend).close()
    assert backend.closed


def test_reset_before_activation_is_harmless() -> None:
    blk = VirtioBlk(FakeBackend())
    blk.reset()
    blk.reset()
    assert blk.engine is None


# -- end to end through virtio-pci --------------------------------------------------------


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
        assert self.cfg_read(0x00, 4) == 0x1AF4 | (0x1040 + VIRTIO_ID_BLOCK) << 16
        pointer = self.cfg_read(PCI_CAPABILITY_LIST, 1)
        for _ in range(48):
            if not pointer:
                break
            cap_id = self.cfg_read(pointer, 1)
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type = self.cfg_read(pointer + 3, 1)
                if cfg_type != VIRTIO_PCI_CAP_PCI_CFG:  # its BAR field is the driver's
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
        """Linux's order: enable MSI-X, program and unmask the table, then config vector 0."""
        self.cfg_write(self.msix_cap + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE)
        table = self.bar + (self.cfg_read(self.msix_cap + PCI_MSIX_TABLE, 4) & ~7)
        for i in range(vectors):
            self.mmio.write(table + 16 * i, 4, MSI_ADDRESS)
            self.mmio.write(table + 16 * i + 4, 4, 0)
            self.mmio.write(table + 16 * i + 8, 4, MSI_DATA_BASE + i)
            self.mmio.write(table + 16 * i + 12, 4, 0)  # unmasked
        self.common_write(VIRTIO_PCI_COMMON_MSIX, 2, 0)

    def setup_queue(
        self, q: int, driver: Driver, vector: int | None, desc: int | None = None
    ) -> None:
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
        if vector is not None:
            self.common_write(VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
            assert self.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2) == vector
        assert self.common_read(VIRTIO_PCI_COMMON_Q_NOFF, 2) == q
        self.common_write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        self.drivers[q] = driver

    def notify(self, q: int) -> None:
        self.mmio.write(self.addr(VIRTIO_PCI_CAP_NOTIFY_CFG, q * self.notify_multiplier), 2, q)

    def read_isr(self) -> int:
        return self.mmio.read(self.addr(VIRTIO_PCI_CAP_ISR_CFG), 1)


@dataclass
class Completion:
    used_len: int
    status: int
    data: bytes  # the writable bytes before the status byte


class Board:
    """RAM, buses, the PCI root, the transport carrying a VirtioBlk over an image file."""

    def __init__(
        self,
        memory: GuestMemory,
        disk: Path,
        options: BlkOptions,
        *,
        readonly: bool = False,
        intx: bool = False,
    ) -> None:
        self.memory = memory
        self.disk = disk
        self.platform = SimulatedPlatform(memory)
        self.pio = Bus("pio", 0x1_0000)
        self.mmio = Bus("mmio", 1 << 46)
        self.root = PciRoot(mmio=self.mmio, pio=self.pio)
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci-root")
        self.backend = FileBlockBackend(disk, readonly=readonly)
        self.blk = VirtioBlk(self.backend, options)
        self.blk.attach(self.platform)
        self.transport = VirtioPciTransport(self.blk, self.platform, GSI if intx else None)
        self.root.add(self.transport, SLOT)
        self.guest = Guest(self.pio, self.mmio, memory)
        self.guest.probe()

    def close(self) -> None:
        self.transport.close()
        self.blk.close()

    def bring_up(self, *, packed: bool, msix: bool = True, extra: int = 0, queues: int = 1) -> None:
        """A whole driver probe: features, MSI-X, fresh rings per queue, DRIVER_OK."""
        g = self.guest
        g.negotiate(DRIVER_FEATURES | extra | (1 << VIRTIO_F_RING_PACKED if packed else 0))
        if msix:
            g.enable_msix(queues + 1)
        for q in range(queues):
            driver = make_driver(self.memory, QUEUE_SIZE, RAM[q + 1][0], packed=packed)
            g.setup_queue(q, driver, vector=q + 1 if msix else None)
        g.add_status(STATUS_DRIVER_OK)
        assert g.status & STATUS_DRIVER_OK

    def vector(self, index: int) -> SimulatedMsiVector:
        """The platform vector behind MSI-X table entry ``index``."""
        fd = self.transport.msix.vector_eventfd(index)
        return next(v for v in self.platform.vectors if v.eventfd == fd)

    def submit(
        self, q: int, readable: list[bytes], writable: list[int], *, kick_fd: bool = False
    ) -> Completion:
        """Make a chain available, kick, wait for its used entry."""
        driver = self.guest.drivers[q]
        head = driver.add_chain(readable, writable)
        bufs = driver.writable_buffers(head)
        if kick_fd:
            os.eventfd_write(self.transport.kick_fds[q], 1)
        else:
            self.guest.notify(q)
        used = wait_until(driver.used, f"the used entry on queue {q}")
        assert [h for h, _ in used] == [head]
        raw = b"".join(self.memory.read(gpa, n) for gpa, n in bufs)
        return Completion(used[0][1], raw[-1], raw[:-1])

    def write(self, q: int, sector: int, data: bytes) -> Completion:
        return self.submit(q, [header(VIRTIO_BLK_T_OUT, sector), data], [1])

    def read(self, q: int, sector: int, length: int) -> Completion:
        return self.submit(q, [header(VIRTIO_BLK_T_IN, sector)], [length, 1])

    def wait_for_msi(self, index: int, count: int) -> list[tuple[int, int]]:
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


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([s]) * SECTOR for s in range(DISK_BYTES // SECTOR)))
    return path


@pytest.fixture
def make_board(disk: Path) -> Iterator[Callable[..., Board]]:
    memory = GuestMemory(RAM)
    boards: list[Board] = []

    def make(options: BlkOptions = BOARD_OPTIONS, **kwargs: bool) -> Board:
        board = Board(memory, disk, options, **kwargs)
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


def test_device_config_through_the_bar(make_board: Callable[..., Board]) -> None:
    board = make_board(BlkOptions(num_queues=2, queue_size=32, blk_size=4096))
    g = board.guest
    assert g.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    assert g.device_config(CFG_CAPACITY, 8) == DISK_BYTES // SECTOR  # as two 32-bit halves
    assert g.device_config(CFG_SEG_MAX, 4) == 30
    assert g.device_config(CFG_BLK_SIZE, 4) == 4096
    assert g.device_config(CFG_NUM_QUEUES, 2) == 2
    assert g.device_config(CFG_WRITE_ZEROES_MAY_UNMAP, 1) == 1
    offered = g.device_features()
    assert offered == board.blk.device_features()
    assert has(offered, VIRTIO_BLK_F_MQ)


def test_write_then_read_through_the_transport(
    make_board: Callable[..., Board], packed: bool
) -> None:
    board = make_board()
    threads = thread_count()
    board.bring_up(packed=packed)
    assert thread_count() == threads + 1  # one worker for the one queue
    # The engine's error fd is on the host I/O loop (attach() gave it the platform).
    assert board.blk.engine is not None
    assert board.blk.engine.error_fd in board.platform.watches

    payload = os.urandom(2 * SECTOR)
    done = board.write(0, 5, payload)
    assert (done.status, done.used_len) == (VIRTIO_BLK_S_OK, 1)
    with board.disk.open("rb") as f:
        f.seek(5 * SECTOR)
        assert f.read(2 * SECTOR) == payload  # in the file, not just in a cache of ours
    msis = board.wait_for_msi(1, 1)
    assert msis[0] == (MSI_ADDRESS, MSI_DATA_BASE + 1)  # queue 0's vector, its message

    done = board.read(0, 4, 4 * SECTOR)
    assert (done.status, done.used_len) == (VIRTIO_BLK_S_OK, 4 * SECTOR + 1)
    assert done.data == bytes([4]) * SECTOR + payload + bytes([7]) * SECTOR
    assert len(board.wait_for_msi(1, 2)) == 2
    assert board.vector(0).delivered == []  # no configuration interrupt
    assert not board.transport.status & STATUS_DEVICE_NEEDS_RESET


def test_flush_and_get_id(make_board: Callable[..., Board], packed: bool) -> None:
    board = make_board(BlkOptions(serial=b"iovirt-disk-7"))
    board.bring_up(packed=packed)
    done = board.submit(0, [header(VIRTIO_BLK_T_FLUSH)], [1])
    assert done.status == VIRTIO_BLK_S_OK
    done = board.submit(0, [header(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert done.status == VIRTIO_BLK_S_OK
    assert done.data == b"iovirt-disk-7".ljust(20, b"\0")


@pytest.mark.parametrize("negotiated", [True, False], ids=["negotiated", "not-negotiated"])
def test_discard_is_served_only_when_negotiated(
    make_board: Callable[..., Board], disk: Path, negotiated: bool
) -> None:
    before = disk.read_bytes()
    board = make_board()
    board.bring_up(packed=False, extra=1 << VIRTIO_BLK_F_DISCARD if negotiated else 0)
    segment = struct.pack("<QII", 8, 4, 0)  # struct virtio_blk_discard_write_zeroes
    done = board.submit(0, [header(VIRTIO_BLK_T_DISCARD), segment], [1])
    after = disk.read_bytes()
    if negotiated:
        assert done.status == VIRTIO_BLK_S_OK
        assert after[8 * SECTOR : 12 * SECTOR] == bytes(4 * SECTOR)
        assert after[: 8 * SECTOR] + after[12 * SECTOR :] == (
            before[: 8 * SECTOR] + before[12 * SECTOR :]
        )
    else:
        assert done.status == VIRTIO_BLK_S_UNSUPP
        assert after == before


def test_readonly_disk_refuses_writes(make_board: Callable[..., Board], disk: Path) -> None:
    before = disk.read_bytes()
    board = make_board(readonly=True)
    assert has(board.guest.device_features(), VIRTIO_BLK_F_RO)
    board.bring_up(packed=False, extra=1 << VIRTIO_BLK_F_RO)
    done = board.write(0, 0, b"\xff" * SECTOR)
    assert done.status == VIRTIO_BLK_S_IOERR
    assert disk.read_bytes() == before
    assert board.read(0, 3, SECTOR).data == bytes([3]) * SECTOR


def test_multiqueue_each_queue_has_its_worker_and_vector(
    make_board: Callable[..., Board], packed: bool
) -> None:
    board = make_board(BlkOptions(num_queues=2, queue_size=64))
    threads = thread_count()
    board.bring_up(packed=packed, extra=1 << VIRTIO_BLK_F_MQ, queues=2)
    assert thread_count() == threads + 2
    board.write(0, 1, b"\x11" * SECTOR)
    board.wait_for_msi(1, 1)
    # Queue 1 kicked through its kick eventfd, as KVM's ioeventfd would.
    done = board.submit(1, [header(VIRTIO_BLK_T_IN, 1)], [SECTOR, 1], kick_fd=True)
    assert done.data == b"\x11" * SECTOR
    assert board.wait_for_msi(2, 1) == [(MSI_ADDRESS, MSI_DATA_BASE + 2)]
    assert len(board.vector(1).delivered) == 1  # queue 0's vector saw only its own


def test_intx_when_msix_is_off(make_board: Callable[..., Board]) -> None:
    board = make_board(intx=True)
    board.bring_up(packed=False, msix=False)
    line = board.platform.irq(GSI)
    assert not line.level
    board.write(0, 0, b"\x01" * SECTOR)

    def raised() -> bool:
        board.platform.poll()  # the shared call eventfd is watched on the I/O loop
        return line.level

    wait_until(raised, "INTx")
    assert board.guest.read_isr() == VIRTIO_PCI_ISR_QUEUE
    assert not line.level  # reading ISR acknowledged it


def test_malformed_chain_sets_needs_reset_and_a_reset_recovers(
    make_board: Callable[..., Board], packed: bool
) -> None:
    board = make_board()
    threads = thread_count()
    board.bring_up(packed=packed)
    assert board.write(0, 0, b"\xaa" * SECTOR).status == VIRTIO_BLK_S_OK
    engine = board.blk.engine
    assert engine is not None
    error_fd = engine.error_fd

    # A header descriptor outside guest RAM: the worker must break the queue, not read it.
    driver = board.guest.drivers[0]
    driver.add_descriptors([(OUTSIDE_RAM, 16, 0, 0)])
    board.guest.notify(0)
    board.wait_for_needs_reset()
    assert engine.queue_error(0) == -errno.EFAULT
    assert board.guest.status & STATUS_DRIVER_OK  # the driver's bits stay until it resets
    # The configuration-change interrupt tells the driver (vector 0).
    assert board.wait_for_msi(0, 1) == [(MSI_ADDRESS, MSI_DATA_BASE)]

    # Reset: workers stop and are joined, the error fd leaves the I/O loop.
    board.guest.reset()
    assert board.transport.status == 0
    assert board.blk.engine is None
    assert error_fd not in board.platform.watches
    wait_until(lambda: thread_count() == threads, "the worker threads to end")

    # And the device works again after a fresh probe.
    board.bring_up(packed=packed)
    assert thread_count() == threads + 1
    done = board.read(0, 0, SECTOR)
    assert (done.status, done.data) == (VIRTIO_BLK_S_OK, b"\xaa" * SECTOR)
    assert not board.transport.status & STATUS_DEVICE_NEEDS_RESET


def break_queue(board: Board) -> None:
    """Publish a chain whose header lies outside guest RAM, kick, wait for the worker to
    report it on the engine's error fd."""
    engine = board.blk.engine
    assert engine is not None
    board.guest.drivers[0].add_descriptors([(OUTSIDE_RAM, 16, 0, 0)])
    board.guest.notify(0)
    wait_until(lambda: select.select([engine.error_fd], [], [], 0)[0], "the broken queue")


def test_reset_racing_the_error_callback_waits_for_it(
    make_board: Callable[..., Board], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a VM the error callback runs on the host I/O loop while a vCPU may reset the
    device: the reset must wait until the callback is done with the engine, or the
    callback would use freed C state. Here the reset starts right after the callback has
    read the error fd."""
    board = make_board()
    board.bring_up(packed=False)
    break_queue(board)
    engine = board.blk.engine
    assert engine is not None
    error_fd = engine.error_fd
    callback = board.platform.watches[error_fd]
    vcpu = threading.Thread(target=board.guest.reset)
    real_eventfd_read = os.eventfd_read

    def read_then_race(fd: int) -> int:
        value = real_eventfd_read(fd)
        if fd == error_fd and not vcpu.is_alive():
            vcpu.start()
            vcpu.join(timeout=0.2)  # as long as the reset needs, unless it must wait
        return value

    monkeypatch.setattr(os, "eventfd_read", read_then_race)
    callback()  # must not fail on an engine freed under it
    monkeypatch.undo()
    vcpu.join(timeout=WAIT_S)
    assert not vcpu.is_alive()
    assert board.blk.engine is None
    assert board.transport.status == 0


def test_a_guest_breaking_queues_over_and_over_cannot_flood_the_log(
    make_board: Callable[..., Board], caplog: pytest.LogCaptureFixture
) -> None:
    board = make_board()
    rounds = 24
    with caplog.at_level(logging.WARNING, logger="iovirt.virtio.blk"):
        for _ in range(rounds):
            board.bring_up(packed=False)
            break_queue(board)
            board.wait_for_needs_reset()
    assert board.blk.queue_errors.count == rounds  # every one counted
    logged = [r for r in caplog.records if r.name == "iovirt.virtio.blk"]
    assert 1 <= len(logged) <= 17  # the first 16, then one line saying it goes quiet


def test_rings_outside_ram_fail_activation(make_board: Callable[..., Board], packed: bool) -> None:
    board = make_board()
    threads = thread_count()
    g = board.guest
    g.negotiate(DRIVER_FEATURES | (1 << VIRTIO_F_RING_PACKED if packed else 0))
    g.enable_msix(2)
    driver = make_driver(board.memory, QUEUE_SIZE, RAM[1][0], packed=packed)
    g.setup_queue(0, driver, vector=1, desc=OUTSIDE_RAM)
    g.add_status(STATUS_DRIVER_OK)
    assert g.status & STATUS_DEVICE_NEEDS_RESET
    assert board.blk.engine is None
    assert thread_count() == threads  # the half-built engine was closed
    # A correct probe afterwards works.
    board.bring_up(packed=packed)
    assert board.write(0, 9, b"\x09" * SECTOR).status == VIRTIO_BLK_S_OK


def test_close_stops_the_data_path_and_releases_the_image(
    make_board: Callable[..., Board], disk: Path
) -> None:
    board = make_board()
    threads = thread_count()
    board.bring_up(packed=True)
    assert thread_count() == threads + 1
    board.transport.close()
    board.blk.close()
    assert board.blk.engine is None
    assert board.backend.fd == -1
    wait_until(lambda: thread_count() == threads, "the worker thread to end")
    # The image lock went with the fd: another read-write open succeeds.
    FileBlockBackend(disk).close()
    board.blk.close()  # idempotent, as VM teardown may run it twice
