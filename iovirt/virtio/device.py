"""The virtio device contract, independent of the transport that carries it.

A virtio device (blk, net, input ...) offers feature bits, a device-specific config space
and a number of queues. The transport (virtio-pci modern or virtio-mmio) owns the
registers the driver writes, negotiates features, collects each queue's ring addresses
and, when the driver sets DRIVER_OK, hands the device an :class:`Activation`: the
negotiated features, the queue configs, and for each queue a *kick* eventfd (the driver's
notifications arrive there, normally through a KVM ioeventfd) and a *call* eventfd
(writing 1 to it interrupts the driver, normally through a KVM irqfd). The device's data
path then runs on those file descriptors alone, in C worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from iovirt.memory import GuestMemory

# Device status bits (virtio 1.2, 2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Reserved (device-independent) feature bits (virtio 1.2, 6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36

# Ring features the virtqueue engine implements; a device offers them with its own bits.
RING_FEATURES = (
    1 << VIRTIO_F_INDIRECT_DESC
    | 1 << VIRTIO_F_EVENT_IDX
    | 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_F_RING_PACKED
    | 1 << VIRTIO_F_IN_ORDER
)

# Device IDs (virtio 1.2, 5).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_INPUT = 18

# The largest queue the transports offer; a device may offer less.
QUEUE_MAX_SIZE = 1024


@dataclass
class QueueConfig:
    """One queue as the driver configured it through the transport."""

    size: int = 0
    desc: int = 0  # descriptor area (split: descriptor table; packed: descriptor ring)
    driver: int = 0  # driver area (split: available ring; packed: driver event suppression)
    device: int = 0  # device area (split: used ring; packed: device event suppression)
    enabled: bool = False


@dataclass
class Activation:
    """What a device gets when the driver sets DRIVER_OK."""

    memory: GuestMemory
    features: int  # the negotiated feature bits (device and reserved)
    queues: list[QueueConfig]  # index = queue number; disabled queues have enabled=False
    kick_fds: list[int]  # per queue: eventfd the driver's notifications arrive on
    call_fds: list[int]  # per queue: eventfd to write to interrupt the driver (may repeat)
    # The device found a queue unusable (a malformed ring or chain): the transport sets
    # DEVICE_NEEDS_RESET and sends a configuration-change interrupt. Thread-safe.
    needs_reset: Callable[[], None] = field(default=lambda: None)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)


class VirtioDevice(Protocol):
    """A virtio device's front half, as a transport sees it."""

    device_id: int  # VIRTIO_ID_*
    num_queues: int
    queue_max_size: int  # <= QUEUE_MAX_SIZE

    def device_features(self) -> int:
        """Feature bits offered (device bits plus the ring features from RING_FEATURES the
        device supports; VIRTIO_F_VERSION_1 must be among them)."""
        ...

    def config_read(self, offset: int, size: int) -> int:
        """Read of the device-specific config space (out of range reads as 0)."""
        ...

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write to the device-specific config space (read-only fields ignore it)."""
        ...

    def activate(self, activation: Activation) -> None:
        """The driver set DRIVER_OK: start the data path. Called once per reset cycle.
        May raise :class:`~iovirt.errors.IovirtError`; the transport then sets
        DEVICE_NEEDS_RESET."""
        ...

    def reset(self) -> None:
        """The driver wrote 0 to status (or the VM stops): stop the data path, forget the
        queues and negotiated features. Must be safe to call when not activated."""
        ...
