"""Tests of the virtio-pci modern transport, driven the way Linux's virtio_pci driver does.

The board is a :class:`PciRoot` with real port and MMIO buses and one
:class:`VirtioPciTransport` carrying ``FakeDevice`` (a tiny VirtioDevice that records
activate/reset and serves an 8-byte config space). :class:`LinuxDriver` probes it through
0xCF8/0xCFC — BAR sizing with all-ones, the capability walk, the virtio vendor
capabilities — enables memory decode, and then talks to the structures in the BAR through
the MMIO bus at the addresses the capabilities name. Interrupts and fd watches come from
:class:`SimulatedPlatform` (``poll()`` runs what the host I/O loop would).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from iovirt.bus import Bus
from iovirt.bus.msix import PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL
from iovirt.bus.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_PORTS,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PciRoot,
)
from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedPlatform
from iovirt.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE,
    VIRTIO_ID_INPUT,
    VIRTIO_ID_NET,
    Activation,
    QueueConfig,
)
from iovirt.virtio.pci import (
    VIRTIO_BAR,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_COMMON_CFGGENERATION,
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
    VIRTIO_PCI_ISR_CONFIG,
    VIRTIO_PCI_ISR_QUEUE,
    VirtioPciTransport,
)

SLOT = 3
GSI = 11
MSI_ADDRESS = 0xFEE0_0000
DEVICE_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << 5 | 1 << 40
FEATURE_BIT_5 = 1 << 5


class FakeDevice:
    """A VirtioDevice that records what the transport asks of it."""

    def __init__(self, device_id: int = VIRTIO_ID_BLOCK, num_queues: int = 2) -> None:
        self.device_id = device_id
        self.num_queues = num_queues
        self.queue_max_size = 256
        self.features = DEVICE_FEATURES
        self.config = bytearray(range(0x10, 0x18))
        self.activations: list[Activation] = []
        self.resets = 0
        self.fail_activate = False

    def device_features(self) -> int:
        return self.features

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset >= 0 and offset + size <= len(self.config):
            self.config[offset : offset + size] = value.to_bytes(size, "little")

    def activate(self, activation: Activation) -> None:
        self.activations.append(activation)
        if self.fail_activate:
            raise IovirtError("backend went away")

    def reset(self) -> None:
        self.resets += 1


class LinuxDriver:
    """The guest: config space through ports, the BAR's structures through MMIO."""

    def __init__(self, pio: Bus, mmio: Bus, slot: int) -> None:
        self.pio, self.mmio, self.slot = pio, mmio, slot
        self.caps: dict[int, tuple[int, int, int, int]] = {}  # cfg_type -> cap, bar, off, len
        self.msix_cap = 0
        self.bar_address = 0
        self.notify_multiplier = 0

    def cfg_read(self, reg: int, size: int) -> int:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | self.slot << 11 | reg & 0xFC)
        return self.pio.read(CONFIG_DATA_PORT + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.pio.write(CONFIG_ADDRESS_PORT, 4, 0x8000_0000 | self.slot << 11 | reg & 0xFC)
        self.pio.write(CONFIG_DATA_PORT + (reg & 3), size, value)

    def size_bar64(self, index: int) -> tuple[int, int, int]:
        """pci_read_bases() with decode off: (address, size, flags)."""
        lo_reg, hi_reg = 0x10 + 4 * index, 0x14 + 4 * index
        lo, hi = self.cfg_read(lo_reg, 4), self.cfg_read(hi_reg, 4)
        self.cfg_write(lo_reg, 4, 0xFFFF_FFFF)
        self.cfg_write(hi_reg, 4, 0xFFFF_FFFF)
        mask = self.cfg_read(hi_reg, 4) << 32 | self.cfg_read(lo_reg, 4) & ~0xF
        flags = self.cfg_read(lo_reg, 4) & 0xF
        self.cfg_write(lo_reg, 4, lo)
        self.cfg_write(hi_reg, 4, hi)
        size = (~mask & (1 << 64) - 1) + 1
        return hi << 32 | lo & ~0xF, size, flags

    def probe(self) -> None:
        """virtio_pci_modern_probe(): walk capabilities, find the virtio structures."""
        assert self.cfg_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST
        pointer = self.cfg_read(PCI_CAPABILITY_LIST, 1)
        seen = 0
        while pointer and seen < 48:
            cap_id = self.cfg_read(pointer, 1)
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type = self.cfg_read(pointer + 3, 1)
                bar = self.cfg_read(pointer + 4, 1)
                offset = self.cfg_read(pointer + 8, 4)
                length = self.cfg_read(pointer + 12, 4)
                self.caps.setdefault(cfg_type, (pointer, bar, offset, length))
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                    self.notify_multiplier = self.cfg_read(pointer + 16, 4)
            elif cap_id == PCI_CAP_ID_MSIX:
                self.msix_cap = pointer
            pointer = self.cfg_read(pointer + 1, 1)
            seen += 1
        self.bar_address, _, _ = self.size_bar64(VIRTIO_BAR)
        self.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def addr(self, cfg_type: int, offset: int = 0) -> int:
        _, _, base, _ = self.caps[cfg_type]
        return self.bar_address + base + offset

    def common_read(self, field: int, size: int) -> int:
        return self.mmio.read(self.addr(VIRTIO_PCI_CAP_COMMON_CFG, field), size)

    def common_write(self, field: int, size: int, value: int) -> None:
        self.mmio.write(self.addr(VIRTIO_PCI_CAP_COMMON_CFG, field), size, value)

    @property
    def status(self) -> int:
        return self.common_read(VIRTIO_PCI_COMMON_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.common_write(VIRTIO_PCI_COMMON_STATUS, 1, self.status | bits)

    def device_features(self) -> int:
        features = 0
        for word in range(2):
            self.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, word)
            features |= self.common_read(VIRTIO_PCI_COMMON_DF, 4) << (32 * word)
        return features

    def write_features(self, features: int) -> None:
        for word in range(2):
            self.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, word)
            self.common_write(VIRTIO_PCI_COMMON_GF, 4, features >> (32 * word) & 0xFFFF_FFFF)

    def negotiate(self, features: int) -> bool:
        self.common_write(VIRTIO_PCI_COMMON_STATUS, 1, 0)
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        self.write_features(features)
        self.add_status(STATUS_FEATURES_OK)
        return bool(self.status & STATUS_FEATURES_OK)

    def enable_msix(self, masked: bool = False) -> None:
        control = PCI_MSIX_FLAGS_ENABLE | (PCI_MSIX_FLAGS_MASKALL if masked else 0)
        self.cfg_write(self.msix_cap + PCI_MSIX_FLAGS, 2, control)

    def msix_entry(self, index: int, data: int, masked: bool = False) -> None:
        table = self.cfg_read(self.msix_cap + 4, 4)
        base = self.bar_address + (table & ~7) + 16 * index
        self.mmio.write(base, 4, MSI_ADDRESS)
        self.mmio.write(base + 4, 4, 0)
        self.mmio.write(base + 8, 4, data)
        self.mmio.write(base + 12, 4, int(masked))

    def pba(self) -> int:
        pba = self.cfg_read(self.msix_cap + 8, 4)
        return self.mmio.read(self.bar_address + (pba & ~7), 8)

    def setup_queue(self, q: int, size: int, base: int, vector: int | None = None) -> int:
        """setup_vq(): select, size, ring addresses, vector; returns queue_notify_off."""
        self.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
        assert self.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) >= size
        self.common_write(VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
        for field, offset in (
            (VIRTIO_PCI_COMMON_Q_DESC, 0),
            (VIRTIO_PCI_COMMON_Q_AVAIL, 0x1000),
            (VIRTIO_PCI_COMMON_Q_USED, 0x2000),
        ):
            self.common_write(field, 4, (base + offset) & 0xFFFF_FFFF)
            self.common_write(field + 4, 4, (base + offset) >> 32)
        if vector is not None:
            self.common_write(VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        return self.common_read(VIRTIO_PCI_COMMON_Q_NOFF, 2)

    def enable_queue(self, q: int) -> None:
        self.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
        self.common_write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)

    def notify(self, q: int) -> None:
        self.mmio.write(self.addr(VIRTIO_PCI_CAP_NOTIFY_CFG, q * self.notify_multiplier), 2, q)

    def read_isr(self) -> int:
        return self.mmio.read(self.addr(VIRTIO_PCI_CAP_ISR_CFG), 1)


class Board:
    def __init__(self, memory: GuestMemory, device: FakeDevice, intx: bool = True) -> None:
        self.platform = SimulatedPlatform(memory)
        self.pio = Bus("pio", 0x1_0000)
        self.mmio = Bus("mmio", 1 << 46)
        self.root = PciRoot(mmio=self.mmio, pio=self.pio)
        self.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.root, "pci-root")
        self.device = device
        self.transport = VirtioPciTransport(device, self.platform, GSI if intx else None)
        self.root.add(self.transport, SLOT)
        self.driver = LinuxDriver(self.pio, self.mmio, SLOT)

    @property
    def line(self) -> bool:
        return self.platform.irq(GSI).level

    def notify_address(self, q: int) -> int:
        return self.driver.addr(VIRTIO_PCI_CAP_NOTIFY_CFG, 4 * q)

    def bring_up(self, msix: bool = True, features: int = DEVICE_FEATURES) -> None:
        """The whole of a Linux probe: features, MSI-X (per-queue vectors), queues, DRIVER_OK."""
        d = self.driver
        d.probe()
        assert d.negotiate(features)
        if msix:
            d.enable_msix()
            d.common_write(VIRTIO_PCI_COMMON_MSIX, 2, 0)
            for i in range(self.device.num_queues + 1):
                d.msix_entry(i, 0x40 + i)
        for q in range(self.device.num_queues):
            d.setup_queue(q, 128, 0x10000 * (q + 1), vector=q + 1 if msix else None)
            d.enable_queue(q)
        d.add_status(STATUS_DRIVER_OK)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 0x10000)]) as mem:
        yield mem


@pytest.fixture
def board(memory: GuestMemory) -> Iterator[Board]:
    b = Board(memory, FakeDevice())
    yield b
    b.transport.close()


def readable(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# -- identity and probe -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_id", "class_code"),
    [
        (VIRTIO_ID_BLOCK, 0x018000),
        (VIRTIO_ID_NET, 0x020000),
        (VIRTIO_ID_INPUT, 0x098000),
        (VIRTIO_ID_CONSOLE, 0xFF0000),
    ],
)
def test_pci_identity(memory: GuestMemory, device_id: int, class_code: int) -> None:
    b = Board(memory, FakeDevice(device_id))
    d = b.driver
    assert d.cfg_read(0x00, 2) == 0x1AF4
    assert d.cfg_read(0x02, 2) == 0x1040 + device_id
    assert d.cfg_read(0x08, 1) == 1  # revision 1: a modern-only device
    assert d.cfg_read(0x08, 4) >> 8 == class_code
    assert d.cfg_read(0x2C, 2) == 0x1AF4
    assert d.cfg_read(0x2E, 2) == device_id
    assert d.cfg_read(0x3D, 1) == 1  # INTA#
    assert d.cfg_read(0x3C, 1) == GSI
    b.transport.close()


def test_probe_finds_a_64_bit_prefetchable_bar_and_every_virtio_structure(board: Board) -> None:
    d = board.driver
    d.probe()
    address, size, flags = d.size_bar64(VIRTIO_BAR)
    assert flags == 0xC  # 64-bit, prefetchable
    assert size >= 0x4000 and size & (size - 1) == 0
    assert address == d.bar_address and address % size == 0 and address != 0
    assert set(d.caps) == {
        VIRTIO_PCI_CAP_COMMON_CFG,
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        VIRTIO_PCI_CAP_ISR_CFG,
        VIRTIO_PCI_CAP_DEVICE_CFG,
        VIRTIO_PCI_CAP_PCI_CFG,
    }
    for cfg_type, (_, bar, offset, length) in d.caps.items():
        if cfg_type != VIRTIO_PCI_CAP_PCI_CFG:
            assert bar == VIRTIO_BAR
            assert offset + length <= size
    assert d.caps[VIRTIO_PCI_CAP_COMMON_CFG][3] >= 0x38
    assert d.notify_multiplier == 4
    assert d.caps[VIRTIO_PCI_CAP_NOTIFY_CFG][3] >= 4 * board.device.num_queues
    assert d.msix_cap
    assert d.cfg_read(d.msix_cap + 2, 2) & 0x7FF == board.device.num_queues  # N-1 = queues


def test_bar_is_reachable_only_after_memory_decode(board: Board) -> None:
    d = board.driver
    d.probe()
    assert d.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    d.cfg_write(PCI_COMMAND, 2, 0)
    assert d.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) == 0xFFFF  # nobody decodes it now


def test_pci_cfg_capability_reaches_the_bar_through_config_space(board: Board) -> None:
    d = board.driver
    d.probe()
    cap = d.caps[VIRTIO_PCI_CAP_PCI_CFG][0]
    d.cfg_write(cap + 4, 1, VIRTIO_BAR)
    d.cfg_write(cap + 8, 4, d.caps[VIRTIO_PCI_CAP_COMMON_CFG][2] + VIRTIO_PCI_COMMON_NUMQ)
    d.cfg_write(cap + 12, 4, 2)
    assert d.cfg_read(cap + 16, 2) == 2  # num_queues
    d.cfg_write(cap + 8, 4, d.caps[VIRTIO_PCI_CAP_COMMON_CFG][2] + VIRTIO_PCI_COMMON_STATUS)
    d.cfg_write(cap + 12, 4, 1)
    d.cfg_write(cap + 16, 1, STATUS_ACKNOWLEDGE)
    assert d.status == STATUS_ACKNOWLEDGE
    # A window into another BAR or of an odd length does nothing.
    d.cfg_write(cap + 4, 1, 0)
    d.cfg_write(cap + 16, 1, 0)
    d.cfg_write(cap + 4, 1, VIRTIO_BAR)
    d.cfg_write(cap + 12, 4, 3)
    d.cfg_write(cap + 16, 1, 0)
    assert d.status == STATUS_ACKNOWLEDGE


# -- feature negotiation ------------------------------------------------------------------


def test_device_features_are_offered_in_32_bit_windows(board: Board) -> None:
    board.driver.probe()
    assert board.driver.device_features() == DEVICE_FEATURES
    board.driver.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, 7)
    assert board.driver.common_read(VIRTIO_PCI_COMMON_DF, 4) == 0


def test_features_ok_is_refused_without_version_1(board: Board) -> None:
    board.driver.probe()
    assert not board.driver.negotiate(FEATURE_BIT_5)
    assert board.driver.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER


def test_features_ok_is_refused_for_features_not_offered(board: Board) -> None:
    board.driver.probe()
    assert not board.driver.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 6)


def test_features_ok_accepts_a_subset_with_version_1_and_then_freezes_them(board: Board) -> None:
    d = board.driver
    d.probe()
    wanted = 1 << VIRTIO_F_VERSION_1 | FEATURE_BIT_5
    assert d.negotiate(wanted)
    d.write_features(DEVICE_FEATURES)  # too late: FEATURES_OK is set
    d.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
    assert d.common_read(VIRTIO_PCI_COMMON_GF, 4) == wanted >> 32
    d.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, 0)
    assert d.common_read(VIRTIO_PCI_COMMON_GF, 4) == FEATURE_BIT_5


# -- queues, DRIVER_OK, notifications, interrupts ----------------------------------------


def test_driver_ok_activates_the_device_with_queues_and_msix_vectors(board: Board) -> None:
    board.bring_up()
    (activation,) = board.device.activations
    assert activation.memory is board.platform.memory
    assert activation.features == DEVICE_FEATURES
    assert activation.queues == [
        QueueConfig(128, 0x10000, 0x11000, 0x12000, True),
        QueueConfig(128, 0x20000, 0x21000, 0x22000, True),
    ]
    msix = board.transport.msix
    assert activation.call_fds == [msix.vector_eventfd(1), msix.vector_eventfd(2)]
    assert len(set(activation.kick_fds)) == 2
    assert board.driver.status & STATUS_DRIVER_OK
    # One ioeventfd per queue, on the queue's notify address, 16-bit writes.
    assert board.platform.ioeventfds == {
        (activation.kick_fds[q], board.notify_address(q), 2, None) for q in range(2)
    }


def test_queue_notify_off_and_vectors_read_back(board: Board) -> None:
    d = board.driver
    d.probe()
    d.negotiate(DEVICE_FEATURES)
    assert d.setup_queue(1, 64, 0x8000, vector=2) == 1
    assert d.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2) == 2
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) == 64
    assert d.common_read(VIRTIO_PCI_COMMON_Q_DESC, 8) == 0x8000
    assert d.common_read(VIRTIO_PCI_COMMON_Q_AVAIL + 4, 4) == 0
    assert d.common_read(VIRTIO_PCI_COMMON_Q_USED, 4) == 0xA000
    # A vector past the table reads back NO_VECTOR: how Linux learns it failed.
    d.common_write(VIRTIO_PCI_COMMON_Q_MSIX, 2, 3)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    d.common_write(VIRTIO_PCI_COMMON_MSIX, 2, 100)
    assert d.common_read(VIRTIO_PCI_COMMON_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    d.common_write(VIRTIO_PCI_COMMON_MSIX, 2, 0)
    assert d.common_read(VIRTIO_PCI_COMMON_MSIX, 2) == 0


def test_64_bit_ring_addresses_in_one_write(board: Board) -> None:
    d = board.driver
    d.probe()
    d.negotiate(DEVICE_FEATURES)
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    d.common_write(VIRTIO_PCI_COMMON_Q_DESC, 8, 0x1_2345_6000)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_DESC, 4) == 0x2345_6000
    assert d.common_read(VIRTIO_PCI_COMMON_Q_DESC + 4, 4) == 1


def test_notify_write_reaching_python_signals_the_kick_eventfd(board: Board) -> None:
    board.bring_up()
    kicks = board.device.activations[0].kick_fds
    board.driver.notify(1)
    assert readable(kicks[1]) == 1
    assert readable(kicks[0]) == 0
    board.mmio.write(board.notify_address(0), 4, 0)  # 32-bit writes kick too
    assert readable(kicks[0]) == 1


def test_call_fd_delivers_the_programmed_msi(board: Board) -> None:
    board.bring_up()
    call = board.device.activations[0].call_fds[1]
    os.eventfd_write(call, 1)
    board.platform.poll()
    vectors = board.platform.vectors
    assert vectors[2].delivered == [(MSI_ADDRESS, 0x42)]
    assert vectors[1].delivered == []
    assert not board.line  # MSI-X on: INTx stays quiet


def test_masked_vector_is_pending_in_the_pba_until_unmasked(board: Board) -> None:
    board.bring_up()
    d = board.driver
    d.msix_entry(1, 0x41, masked=True)
    os.eventfd_write(board.device.activations[0].call_fds[0], 1)
    board.platform.poll()
    assert board.platform.vectors[1].delivered == []
    assert d.pba() == 1 << 1
    d.msix_entry(1, 0x41, masked=False)
    assert board.platform.vectors[1].delivered == [(MSI_ADDRESS, 0x41)]
    assert d.pba() == 0


def test_function_mask_holds_queue_interrupts(board: Board) -> None:
    board.bring_up()
    board.driver.enable_msix(masked=True)
    os.eventfd_write(board.device.activations[0].call_fds[1], 1)
    board.platform.poll()
    assert board.driver.pba() == 1 << 2
    board.driver.enable_msix(masked=False)
    assert board.platform.vectors[2].delivered == [(MSI_ADDRESS, 0x42)]


def test_intx_fallback_sets_isr_and_raises_the_line(board: Board) -> None:
    board.bring_up(msix=False)
    activation = board.device.activations[0]
    assert activation.call_fds == [board.transport.intx_fd] * 2
    assert not board.line
    os.eventfd_write(activation.call_fds[1], 1)
    board.platform.poll()
    assert board.line
    assert board.driver.cfg_read(PCI_STATUS, 2) & 0x8  # Interrupt Status
    assert board.driver.read_isr() == VIRTIO_PCI_ISR_QUEUE
    assert not board.line  # reading ISR acknowledged it
    assert board.driver.read_isr() == 0
    # INTx Disable in COMMAND gates the line, not the request.
    board.driver.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_INTX_DISABLE)
    os.eventfd_write(activation.call_fds[0], 1)
    board.platform.poll()
    assert not board.line
    board.driver.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert board.line
    assert board.driver.read_isr() == VIRTIO_PCI_ISR_QUEUE


def test_enabling_msix_silences_intx(board: Board) -> None:
    board.bring_up(msix=False)
    os.eventfd_write(board.transport.intx_fd, 1)
    board.platform.poll()
    assert board.line
    board.driver.enable_msix()
    assert not board.line


def test_queue_without_a_vector_under_msix_gets_no_interrupt(board: Board) -> None:
    d = board.driver
    d.probe()
    d.negotiate(DEVICE_FEATURES)
    d.enable_msix()
    for q in range(2):
        d.setup_queue(q, 128, 0x10000 * (q + 1), vector=1 if q == 0 else None)
        d.enable_queue(q)
    d.add_status(STATUS_DRIVER_OK)
    calls = board.device.activations[0].call_fds
    assert calls[0] == board.transport.msix.vector_eventfd(1)
    assert calls[1] == board.transport.intx_fd
    os.eventfd_write(calls[1], 1)
    board.platform.poll()
    assert not board.line
    assert board.transport.isr == 0
    assert all(v.delivered == [] for v in board.platform.vectors)


def test_config_changed_bumps_generation_and_interrupts(board: Board) -> None:
    board.bring_up()
    d = board.driver
    generation = d.common_read(VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    board.transport.config_changed()
    assert d.common_read(VIRTIO_PCI_COMMON_CFGGENERATION, 1) == (generation + 1) & 0xFF
    board.platform.poll()
    assert board.platform.vectors[0].delivered == [(MSI_ADDRESS, 0x40)]


def test_config_changed_under_intx_sets_isr_bit_1(memory: GuestMemory) -> None:
    b = Board(memory, FakeDevice())
    b.bring_up(msix=False)
    b.transport.config_changed()
    assert b.line
    assert b.driver.read_isr() == VIRTIO_PCI_ISR_CONFIG
    assert not b.line
    b.transport.close()


def test_device_config_reads_and_writes_reach_the_device(board: Board) -> None:
    d = board.driver
    d.probe()
    base = d.addr(VIRTIO_PCI_CAP_DEVICE_CFG)
    assert board.mmio.read(base, 4) == 0x1312_1110
    assert board.mmio.read(base + 6, 2) == 0x1716
    assert board.mmio.read(base, 8) == 0x1716_1514_1312_1110
    board.mmio.write(base + 1, 1, 0xAB)
    assert board.device.config[1] == 0xAB


def test_needs_reset_sets_the_status_bit_and_interrupts(board: Board) -> None:
    board.bring_up()
    board.device.activations[0].needs_reset()
    board.platform.poll()
    assert board.driver.status & STATUS_DEVICE_NEEDS_RESET
    assert board.platform.vectors[0].delivered == [(MSI_ADDRESS, 0x40)]
    # The driver cannot clear it except by resetting.
    board.driver.common_write(VIRTIO_PCI_COMMON_STATUS, 1, STATUS_DRIVER_OK)
    assert board.driver.status & STATUS_DEVICE_NEEDS_RESET


def test_needs_reset_from_a_previous_activation_is_ignored(board: Board) -> None:
    board.bring_up()
    stale = board.device.activations[0].needs_reset
    board.bring_up()  # negotiate() resets first
    stale()
    board.platform.poll()
    assert not board.driver.status & STATUS_DEVICE_NEEDS_RESET


def test_activate_failure_sets_needs_reset_instead_of_raising(board: Board) -> None:
    board.device.fail_activate = True
    board.bring_up()
    assert board.driver.status & STATUS_DEVICE_NEEDS_RESET
    board.platform.poll()
    assert board.platform.vectors[0].delivered == [(MSI_ADDRESS, 0x40)]


def test_reset_forgets_features_and_queues_and_releases_kicks(board: Board) -> None:
    board.bring_up()
    kicks = board.device.activations[0].kick_fds
    d = board.driver
    resets = board.device.resets
    d.common_write(VIRTIO_PCI_COMMON_STATUS, 1, 0)
    assert board.device.resets == resets + 1
    assert d.status == 0
    assert board.platform.ioeventfds == set()
    for fd in kicks:
        with pytest.raises(OSError):
            os.fstat(fd)
    d.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, 0)
    assert d.common_read(VIRTIO_PCI_COMMON_GF, 4) == 0
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) == 256
    assert d.common_read(VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    assert d.common_read(VIRTIO_PCI_COMMON_Q_DESC, 8) == 0
    assert d.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    d.notify(0)  # no kick fds now: ignored, counted
    # And it comes up again.
    board.bring_up()
    assert len(board.device.activations) == 2
    assert len(board.platform.ioeventfds) == 2


def test_bar_remap_moves_the_ioeventfds(board: Board) -> None:
    board.bring_up()
    d = board.driver
    kicks = board.device.activations[0].kick_fds
    new = 0x2_0000_0000
    d.cfg_write(0x10 + 4 * VIRTIO_BAR, 4, new & 0xFFFF_FFFF)
    d.cfg_write(0x14 + 4 * VIRTIO_BAR, 4, new >> 32)
    d.bar_address = new
    assert board.platform.ioeventfds == {
        (kicks[q], new + 0x3000 + 4 * q, 2, None) for q in range(2)
    }
    d.notify(1)
    assert readable(kicks[1]) == 1
    d.cfg_write(PCI_COMMAND, 2, 0)  # decode off: nothing to catch writes
    assert board.platform.ioeventfds == set()
    d.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert len(board.platform.ioeventfds) == 2


def test_packed_rings_may_have_any_queue_size(board: Board) -> None:
    d = board.driver
    d.probe()
    board.device.features |= 1 << VIRTIO_F_RING_PACKED
    assert d.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_PACKED)
    d.common_write(VIRTIO_PCI_COMMON_Q_SIZE, 2, 100)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) == 100


def test_close_releases_everything(memory: GuestMemory) -> None:
    b = Board(memory, FakeDevice())
    b.bring_up()
    kicks = b.device.activations[0].kick_fds
    resets = b.device.resets
    b.transport.close()
    assert b.device.resets == resets + 1
    assert b.platform.ioeventfds == set()
    assert b.platform.watches == {}
    assert all(v.closed for v in b.platform.vectors)
    for fd in kicks:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert b.mmio.read(b.driver.addr(VIRTIO_PCI_CAP_COMMON_CFG, 0x12), 2) == 0
    b.transport.close()  # idempotent


# -- hostile accesses ------------------------------------------------------------------------


def test_hostile_common_config_accesses_are_ignored(board: Board) -> None:
    d = board.driver
    d.probe()
    d.negotiate(DEVICE_FEATURES)
    bad = board.transport.bad_accesses
    # Odd widths: a 4-byte read of 16-bit fields, a byte of a dword, an 8-byte feature read.
    assert d.common_read(VIRTIO_PCI_COMMON_NUMQ, 4) == 0
    assert d.common_read(VIRTIO_PCI_COMMON_DF + 1, 1) == 0
    assert d.common_read(VIRTIO_PCI_COMMON_DF, 8) == 0
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 4, 0xFFFF_0000)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0
    # Past the structure, and past the BAR's pages.
    assert d.common_read(0x38, 4) == 0
    assert d.common_read(0xFFC, 4) == 0
    # queue_select out of range: the queue does not exist.
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0xFFFF)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0
    assert d.common_read(VIRTIO_PCI_COMMON_Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    d.common_write(VIRTIO_PCI_COMMON_Q_SIZE, 2, 8)
    d.common_write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
    d.common_write(VIRTIO_PCI_COMMON_Q_DESC, 4, 0x1000)
    # queue_size: not a power of two, zero, above the maximum.
    d.common_write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    for size in (100, 0, 512, 0xFFFF):
        d.common_write(VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
        assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) == 256
    # Feature words far out.
    d.common_write(VIRTIO_PCI_COMMON_GFSELECT, 4, 0xFFFF_FFFF)
    d.common_write(VIRTIO_PCI_COMMON_DFSELECT, 4, 0xFFFF_FFFF)
    assert d.common_read(VIRTIO_PCI_COMMON_DF, 4) == 0
    # Read-only fields.
    d.common_write(VIRTIO_PCI_COMMON_NUMQ, 2, 9)
    assert d.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    # DRIVER_OK without FEATURES_OK.
    d.common_write(VIRTIO_PCI_COMMON_STATUS, 1, 0)
    d.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert not d.status & STATUS_DRIVER_OK
    assert board.device.activations == []
    assert bad.count >= 10


def test_queue_config_is_frozen_once_enabled(board: Board) -> None:
    d = board.driver
    d.probe()
    d.negotiate(DEVICE_FEATURES)
    d.setup_queue(0, 64, 0x8000)
    d.enable_queue(0)
    d.common_write(VIRTIO_PCI_COMMON_Q_SIZE, 2, 32)
    d.common_write(VIRTIO_PCI_COMMON_Q_DESC, 4, 0)
    assert d.common_read(VIRTIO_PCI_COMMON_Q_SIZE, 2) == 64
    assert d.common_read(VIRTIO_PCI_COMMON_Q_DESC, 4) == 0x8000
    d.common_write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0)  # disabling needs RING_RESET
    assert d.common_read(VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 1


def test_hostile_isr_notify_and_msix_accesses(board: Board) -> None:
    board.bring_up()
    d = board.driver
    kicks = board.device.activations[0].kick_fds
    isr = d.addr(VIRTIO_PCI_CAP_ISR_CFG)
    assert board.mmio.read(isr, 4) == 0
    assert board.mmio.read(isr + 1, 1) == 0
    notify = d.addr(VIRTIO_PCI_CAP_NOTIFY_CFG)
    board.mmio.write(notify + 1, 1, 0)  # misaligned
    board.mmio.write(notify + 4 * 2, 2, 2)  # queue 2 does not exist: past the area
    board.mmio.write(notify, 8, 0)
    assert [readable(fd) for fd in kicks] == [0, 0]
    assert board.mmio.read(notify, 2) == 0
    table = d.bar_address + (d.cfg_read(d.msix_cap + 4, 4) & ~7)
    assert board.mmio.read(table + 1, 1) == 0
    board.mmio.write(table + 2, 2, 0xFFFF)
    assert board.mmio.read(table + 8, 4) == 0x40  # entry 0 untouched


def test_random_bar_and_config_accesses_never_raise(board: Board) -> None:
    board.bring_up()
    d = board.driver
    rng = random.Random(99)
    bar_size = board.transport.bar_size
    for _ in range(4000):
        offset = rng.randrange(0, bar_size)
        size = rng.choice((1, 2, 4, 8))
        if offset + size > bar_size:
            continue
        value = rng.choice((0, 1, 0xFF, 0xFFFF, rng.getrandbits(8 * size)))
        if rng.random() < 0.5:
            board.mmio.write(d.bar_address + offset, size, value)
        else:
            board.mmio.read(d.bar_address + offset, size)
        if rng.random() < 0.05:
            reg = rng.randrange(0x40, 0x100)
            d.cfg_write(reg & ~3, 4, rng.getrandbits(32))
            d.cfg_read(reg, 1)
        if rng.random() < 0.05:
            board.platform.poll()
    # BAR could have moved or been disabled; the transport must still be usable.
    board.transport.close()
