"""virtio-mmio (version 2) at its registers, against the simulated platform: identity,
feature negotiation, queue setup, activation with kick/call eventfds, the level interrupt,
reset, needs-reset, config space, and what a hostile driver gets for odd accesses."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedPlatform
from iovirt.virtio.device import (
    RING_FEATURES,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    Activation,
    QueueConfig,
)
from iovirt.virtio.mmio import (
    CONFIG,
    CONFIG_GENERATION,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DEVICE_ID,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC_VALUE,
    QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    SHM_LEN_HIGH,
    SHM_LEN_LOW,
    SHM_SEL,
    STATUS,
    VENDOR_ID,
    VERSION,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_SIZE,
    VirtioMmioTransport,
)

BASE = 0xFC00_0000
GSI = 5
RAM = 1 << 20
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_F_NOTIFICATION_DATA = 38
DEVICE_FEATURE_BITS = RING_FEATURES | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_F_NOTIFICATION_DATA
# Queue q's rings: descriptors, available (driver) and used (device) areas.
RINGS = {0: (0x1_0000, 0x1_1000, 0x1_2000), 1: (0x2_0000, 0x2_1000, 0x2_2000)}
QUEUE_SIZE = 128


class FakeDevice:
    """A VirtioDevice that records what the transport asks of it."""

    device_id = VIRTIO_ID_BLOCK
    num_queues = 2
    queue_max_size = 256

    def __init__(self) -> None:
        self.config = bytearray(range(0x40))
        self.config_writes: list[tuple[int, int, int]] = []
        self.activations: list[Activation] = []
        self.resets = 0
        self.fail_activation = False
        self.reset_from_activate = False

    def device_features(self) -> int:
        return DEVICE_FEATURE_BITS

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config_writes.append((offset, size, value))

    def activate(self, activation: Activation) -> None:
        if self.fail_activation:
            raise IovirtError("backend gone")
        self.activations.append(activation)
        if self.reset_from_activate:
            activation.needs_reset()  # synchronously, while the transport holds its lock

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


@pytest.fixture
def platform(memory: GuestMemory) -> SimulatedPlatform:
    return SimulatedPlatform(memory)


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def mmio(device: FakeDevice, platform: SimulatedPlatform) -> Iterator[VirtioMmioTransport]:
    transport = VirtioMmioTransport(device, platform, BASE, GSI)
    yield transport
    transport.close()


def rd(mmio: VirtioMmioTransport, offset: int) -> int:
    return mmio.read(offset, 4)


def wr(mmio: VirtioMmioTransport, offset: int, value: int) -> None:
    mmio.write(offset, 4, value)


def negotiate(mmio: VirtioMmioTransport, features: int) -> int:
    """ACKNOWLEDGE, DRIVER, write the features, set FEATURES_OK; the status read back."""
    wr(mmio, STATUS, 0)
    wr(mmio, STATUS, STATUS_ACKNOWLEDGE)
    wr(mmio, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for word in range(2):
        wr(mmio, DRIVER_FEATURES_SEL, word)
        wr(mmio, DRIVER_FEATURES, features >> (32 * word) & 0xFFFF_FFFF)
    wr(mmio, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    return rd(mmio, STATUS)


def setup_queue(
    mmio: VirtioMmioTransport, index: int, size: int = QUEUE_SIZE, rings: tuple[int, ...] = ()
) -> None:
    desc, driver, device = rings or RINGS[index]
    wr(mmio, QUEUE_SEL, index)
    assert rd(mmio, QUEUE_READY) == 0
    wr(mmio, QUEUE_NUM, size)
    for low, high, address in (
        (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc),
        (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, driver),
        (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, device),
    ):
        wr(mmio, low, address & 0xFFFF_FFFF)
        wr(mmio, high, address >> 32)
    wr(mmio, QUEUE_READY, 1)


FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH
RUNNING = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK


def bring_up(mmio: VirtioMmioTransport, features: int = FEATURES) -> None:
    """What Linux's virtio_mmio + virtio core do, up to DRIVER_OK."""
    assert negotiate(mmio, features) & STATUS_FEATURES_OK
    setup_queue(mmio, 0)
    setup_queue(mmio, 1)
    wr(mmio, STATUS, RUNNING)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- identity ------------------------------------------------------------------------


def test_identity_registers(mmio: VirtioMmioTransport) -> None:
    assert rd(mmio, MAGIC_VALUE) == 0x7472_6976
    assert rd(mmio, VERSION) == 2
    assert rd(mmio, DEVICE_ID) == VIRTIO_ID_BLOCK
    assert rd(mmio, VENDOR_ID) != 0
    assert rd(mmio, CONFIG_GENERATION) == 0
    assert rd(mmio, STATUS) == 0
    assert mmio.acpi_device() == (BASE, VIRTIO_MMIO_SIZE, GSI) == (BASE, 0x200, GSI)


def test_queue_num_max_is_zero_for_queues_the_device_lacks(mmio: VirtioMmioTransport) -> None:
    wr(mmio, QUEUE_SEL, 1)
    assert rd(mmio, QUEUE_NUM_MAX) == 256
    wr(mmio, QUEUE_SEL, 2)
    assert rd(mmio, QUEUE_NUM_MAX) == 0
    assert rd(mmio, QUEUE_READY) == 0


def test_no_shared_memory_regions(mmio: VirtioMmioTransport) -> None:
    wr(mmio, SHM_SEL, 0)
    assert (rd(mmio, SHM_LEN_LOW), rd(mmio, SHM_LEN_HIGH)) == (0xFFFF_FFFF, 0xFFFF_FFFF)


# -- features ------------------------------------------------------------------------


def test_device_features_are_offered_in_two_words_minus_unsupported_transport_bits(
    mmio: VirtioMmioTransport,
) -> None:
    words = []
    for sel in (0, 1, 2):
        wr(mmio, DEVICE_FEATURES_SEL, sel)
        words.append(rd(mmio, DEVICE_FEATURES))
    offered = words[0] | words[1] << 32
    assert offered == DEVICE_FEATURE_BITS & ~(1 << VIRTIO_F_NOTIFICATION_DATA)
    assert words[2] == 0


def test_features_ok_needs_version_1(mmio: VirtioMmioTransport) -> None:
    status = negotiate(mmio, 1 << VIRTIO_BLK_F_FLUSH)
    assert not status & STATUS_FEATURES_OK
    assert mmio.device_errors == 1


def test_features_ok_needs_a_subset_of_the_offer(mmio: VirtioMmioTransport) -> None:
    assert not negotiate(mmio, FEATURES | 1 << VIRTIO_F_NOTIFICATION_DATA) & STATUS_FEATURES_OK
    assert negotiate(mmio, FEATURES) & STATUS_FEATURES_OK


def test_driver_features_are_frozen_once_features_ok(
    mmio: VirtioMmioTransport, device: FakeDevice
) -> None:
    negotiate(mmio, FEATURES)
    wr(mmio, DRIVER_FEATURES_SEL, 0)
    wr(mmio, DRIVER_FEATURES, 0xFFFF_FFFF)
    assert mmio.bad_accesses == 1
    setup_queue(mmio, 0)
    wr(mmio, STATUS, RUNNING)
    assert device.activations[0].features == FEATURES


def test_a_huge_feature_selector_is_ignored(mmio: VirtioMmioTransport, device: FakeDevice) -> None:
    wr(mmio, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    wr(mmio, DRIVER_FEATURES_SEL, 0xFFFF_FFFF)
    wr(mmio, DRIVER_FEATURES, 1)
    assert mmio.bad_accesses == 1
    wr(mmio, DEVICE_FEATURES_SEL, 0xFFFF_FFFF)
    assert rd(mmio, DEVICE_FEATURES) == 0


# -- activation ----------------------------------------------------------------------


def test_driver_ok_hands_the_device_its_queues_and_eventfds(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform, memory: GuestMemory
) -> None:
    bring_up(mmio)
    assert rd(mmio, STATUS) == RUNNING
    assert mmio.activated
    (activation,) = device.activations
    assert activation.memory is memory
    assert activation.features == FEATURES
    assert activation.queues == [
        QueueConfig(QUEUE_SIZE, *RINGS[0], enabled=True),
        QueueConfig(QUEUE_SIZE, *RINGS[1], enabled=True),
    ]
    kicks, calls = activation.kick_fds, activation.call_fds
    assert len(set(kicks)) == 2 and len(calls) == 2 and calls[0] == calls[1]
    assert platform.ioeventfds == {
        (kicks[0], BASE + QUEUE_NOTIFY, 4, 0),
        (kicks[1], BASE + QUEUE_NOTIFY, 4, 1),
    }
    assert calls[0] in platform.watches


def test_queue_addresses_take_both_halves(device: FakeDevice) -> None:
    big = GuestMemory([(0, RAM), (1 << 32, RAM)])
    try:
        platform = SimulatedPlatform(big)
        transport = VirtioMmioTransport(device, platform, BASE, GSI)
        negotiate(transport, FEATURES)
        high = (1 << 32) + 0x1000
        setup_queue(transport, 0, rings=(high, high + 0x1000, high + 0x2000))
        wr(transport, STATUS, RUNNING)
        assert device.activations[0].queues[0].desc == high
        assert device.activations[0].queues[0].device == high + 0x2000
        transport.close()
    finally:
        big.close()


def test_a_disabled_queue_is_passed_as_disabled(
    mmio: VirtioMmioTransport, device: FakeDevice
) -> None:
    negotiate(mmio, FEATURES)
    setup_queue(mmio, 0)
    wr(mmio, STATUS, RUNNING)
    assert [q.enabled for q in device.activations[0].queues] == [True, False]


def test_notify_that_exits_to_python_kicks_the_queue(
    mmio: VirtioMmioTransport, device: FakeDevice
) -> None:
    bring_up(mmio)
    wr(mmio, QUEUE_NOTIFY, 1)
    kick = device.activations[0].kick_fds[1]
    assert os.eventfd_read(kick) == 1
    assert mmio.notifies == 1
    wr(mmio, QUEUE_NOTIFY, 7)  # no such queue
    assert mmio.bad_accesses == 1


def test_notify_before_driver_ok_is_ignored(mmio: VirtioMmioTransport) -> None:
    negotiate(mmio, FEATURES)
    wr(mmio, QUEUE_NOTIFY, 0)
    assert mmio.bad_accesses == 1
    assert mmio.notifies == 0


def test_driver_ok_without_features_ok_is_refused(
    mmio: VirtioMmioTransport, device: FakeDevice
) -> None:
    wr(mmio, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    wr(mmio, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert rd(mmio, STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert not device.activations


def test_queue_registers_are_frozen_after_driver_ok(
    mmio: VirtioMmioTransport, device: FakeDevice
) -> None:
    bring_up(mmio)
    wr(mmio, QUEUE_SEL, 0)
    wr(mmio, QUEUE_NUM, 4)
    wr(mmio, QUEUE_READY, 0)
    assert rd(mmio, QUEUE_READY) == 1
    assert device.activations[0].queues[0].size == QUEUE_SIZE
    assert mmio.bad_accesses == 2


# -- the interrupt -------------------------------------------------------------------


def test_a_call_raises_the_level_line_until_acknowledged(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    bring_up(mmio)
    line = platform.lines[GSI]
    os.eventfd_write(device.activations[0].call_fds[0], 1)
    platform.poll()
    assert rd(mmio, INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    assert line.level
    wr(mmio, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert rd(mmio, INTERRUPT_STATUS) == 0
    assert line.transitions == [True, False]
    platform.poll()  # the eventfd was drained: no second interrupt
    assert not line.level


def test_the_line_stays_up_while_any_status_bit_is_set(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    bring_up(mmio)
    os.eventfd_write(device.activations[0].call_fds[0], 1)
    platform.poll()
    mmio.config_changed()
    assert rd(mmio, INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    wr(mmio, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert platform.lines[GSI].level
    wr(mmio, INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG)
    assert not platform.lines[GSI].level


def test_config_changed_bumps_the_generation_and_interrupts_a_running_driver(
    mmio: VirtioMmioTransport, platform: SimulatedPlatform
) -> None:
    mmio.config_changed()  # before DRIVER_OK: generation only
    assert rd(mmio, CONFIG_GENERATION) == 1
    assert rd(mmio, INTERRUPT_STATUS) == 0
    bring_up(mmio)
    mmio.config_changed()
    assert rd(mmio, CONFIG_GENERATION) == 2
    assert rd(mmio, INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    assert platform.lines[GSI].level


# -- reset ---------------------------------------------------------------------------


def test_status_zero_resets_the_device_and_releases_everything(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    bring_up(mmio)
    activation = device.activations[0]
    os.eventfd_write(activation.call_fds[0], 1)
    platform.poll()
    resets_before = device.resets
    wr(mmio, STATUS, 0)
    assert device.resets == resets_before + 1
    assert platform.ioeventfds == set()
    assert activation.call_fds[0] not in platform.watches
    assert not any(fd_is_open(fd) for fd in (*activation.kick_fds, activation.call_fds[0]))
    assert not mmio.activated
    assert rd(mmio, STATUS) == 0
    assert rd(mmio, INTERRUPT_STATUS) == 0
    assert not platform.lines[GSI].level
    wr(mmio, QUEUE_SEL, 0)
    assert rd(mmio, QUEUE_READY) == 0
    # A second bring-up works from scratch.
    bring_up(mmio)
    assert len(device.activations) == 2
    assert len(platform.ioeventfds) == 2


def test_clearing_status_bits_without_a_reset_is_ignored(mmio: VirtioMmioTransport) -> None:
    negotiate(mmio, FEATURES)
    wr(mmio, STATUS, STATUS_ACKNOWLEDGE)
    assert rd(mmio, STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    assert mmio.bad_accesses == 1


def test_needs_reset_sets_the_status_bit_and_a_config_interrupt(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    bring_up(mmio)
    device.activations[0].needs_reset()
    platform.poll()
    assert rd(mmio, STATUS) == RUNNING | STATUS_DEVICE_NEEDS_RESET
    assert rd(mmio, INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    assert platform.lines[GSI].level
    # The driver writes the status back with the bit included (Linux reads, ORs, writes).
    wr(mmio, STATUS, RUNNING | STATUS_DEVICE_NEEDS_RESET)
    assert rd(mmio, STATUS) & STATUS_DEVICE_NEEDS_RESET
    wr(mmio, STATUS, 0)
    assert rd(mmio, STATUS) == 0


def test_a_stale_needs_reset_from_before_a_reset_is_ignored(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    bring_up(mmio)
    stale = device.activations[0]
    wr(mmio, STATUS, 0)
    bring_up(mmio)
    stale.needs_reset()
    platform.poll()
    assert not rd(mmio, STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_needs_reset_from_inside_activate_does_not_deadlock(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    device.reset_from_activate = True
    bring_up(mmio)
    platform.poll()
    assert rd(mmio, STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_a_failed_activation_means_needs_reset_and_nothing_left_registered(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    device.fail_activation = True
    watches_before = set(platform.watches)
    bring_up(mmio)
    assert rd(mmio, STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert rd(mmio, INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    assert not mmio.activated
    assert platform.ioeventfds == set()
    assert set(platform.watches) == watches_before
    assert mmio.device_errors == 1


@pytest.mark.parametrize(
    ("size", "rings", "packed"),
    [
        (100, RINGS[0], False),  # split rings are powers of two
        (512, RINGS[0], False),  # above QueueNumMax (256)
        (0, RINGS[0], False),
        (QUEUE_SIZE, (0x1_0008, 0x1_1000, 0x1_2000), False),  # descriptors 16-aligned
        (QUEUE_SIZE, (0x1_0000, 0x1_1001, 0x1_2000), False),  # avail 2-aligned
        (QUEUE_SIZE, (0x1_0000, 0x1_1000, 0x1_2002), False),  # used 4-aligned
        (QUEUE_SIZE, (RAM - 0x100, 0x1_1000, 0x1_2000), False),  # table runs past RAM
        (QUEUE_SIZE, (0x1_0000, 0x1_1000, 0x8000_0000), False),  # not RAM at all
        (QUEUE_SIZE, (0x1_0000, 0x1_1002, 0x1_2000), True),  # packed event areas: 4
    ],
)
def test_a_queue_that_cannot_work_means_needs_reset_not_activation(
    mmio: VirtioMmioTransport,
    device: FakeDevice,
    size: int,
    rings: tuple[int, int, int],
    packed: bool,
) -> None:
    features = FEATURES | (1 << VIRTIO_F_RING_PACKED if packed else 0)
    negotiate(mmio, features)
    setup_queue(mmio, 0, size=size, rings=rings)
    wr(mmio, STATUS, RUNNING)
    assert rd(mmio, STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert not device.activations
    assert mmio.device_errors == 1


def test_packed_rings_may_have_any_size(mmio: VirtioMmioTransport, device: FakeDevice) -> None:
    negotiate(mmio, FEATURES | 1 << VIRTIO_F_RING_PACKED)
    setup_queue(mmio, 0, size=100)
    wr(mmio, STATUS, RUNNING)
    assert device.activations[0].queues[0].size == 100


def test_close_releases_every_fd_and_watch(device: FakeDevice, platform: SimulatedPlatform) -> None:
    transport = VirtioMmioTransport(device, platform, BASE, GSI)
    bring_up(transport)
    transport.close()
    assert platform.watches == {}
    assert platform.ioeventfds == set()
    transport.close()  # idempotent
    wr(transport, STATUS, 0)  # a late access after teardown is harmless


# -- config space and odd accesses ---------------------------------------------------


def test_config_space_takes_any_width(mmio: VirtioMmioTransport, device: FakeDevice) -> None:
    assert mmio.read(CONFIG + 1, 1) == 1
    assert mmio.read(CONFIG + 2, 2) == 0x0302
    assert mmio.read(CONFIG + 4, 8) == int.from_bytes(bytes(range(4, 12)), "little")
    mmio.write(CONFIG + 3, 1, 0xAA)
    assert device.config_writes == [(3, 1, 0xAA)]


@pytest.mark.parametrize(("offset", "size"), [(MAGIC_VALUE, 1), (STATUS, 2), (VERSION + 1, 4)])
def test_registers_only_answer_aligned_32_bit_reads(
    mmio: VirtioMmioTransport, offset: int, size: int
) -> None:
    assert mmio.read(offset, size) == 0
    assert mmio.bad_accesses == 1


def test_odd_register_accesses_are_counted_not_raised(
    mmio: VirtioMmioTransport, device: FakeDevice
) -> None:
    mmio.write(STATUS, 1, STATUS_ACKNOWLEDGE)  # 8-bit register write
    assert rd(mmio, STATUS) == 0
    wr(mmio, MAGIC_VALUE, 0)  # read-only
    assert rd(mmio, QUEUE_NOTIFY) == 0  # write-only
    assert rd(mmio, 0x0F8) == 0  # no register there
    wr(mmio, QUEUE_SEL, 9)
    wr(mmio, QUEUE_NUM, 16)  # no queue 9
    assert mmio.bad_accesses == 5
    assert not device.activations


def test_concurrent_register_traffic_and_calls_keep_the_line_consistent(
    mmio: VirtioMmioTransport, device: FakeDevice, platform: SimulatedPlatform
) -> None:
    """vCPU threads ack and notify while the I/O loop delivers calls: the line ends high
    exactly when InterruptStatus is non-zero."""
    bring_up(mmio)
    call = device.activations[0].call_fds[0]
    stop = threading.Event()

    def vcpu() -> None:
        while not stop.is_set():
            status = rd(mmio, INTERRUPT_STATUS)
            if status:
                wr(mmio, INTERRUPT_ACK, status)
            wr(mmio, QUEUE_NOTIFY, 0)

    threads = [threading.Thread(target=vcpu) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):
            os.eventfd_write(call, 1)
            platform.poll()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert platform.lines[GSI].level == bool(rd(mmio, INTERRUPT_STATUS))
