"""The virtio-pci modern transport (virtio 1.2, 4.1): a PCI function that carries any
:class:`~iovirt.virtio.device.VirtioDevice`.

The function has one 64-bit prefetchable memory BAR (:data:`VIRTIO_BAR`) laid out in 4 KiB
pages: common configuration, ISR status, device-specific configuration, the notification
area (``queue_notify_off`` = queue index, multiplier 4), the MSI-X table and the PBA. Vendor
capabilities (ID 0x09) point the driver at each structure; a VIRTIO_PCI_CAP_PCI_CFG
capability gives config-space access to the BAR as the spec requires.

The driver's notifications normally end in a KVM ioeventfd on the queue's notify address
(registered while the BAR is mapped, moved when the guest moves the BAR); a write that
reaches Python anyway signals the same kick eventfd. Interrupts go to the queue's MSI-X
vector eventfd when MSI-X is enabled; otherwise every queue shares one eventfd the host I/O
loop watches, which sets ISR bit 0 and raises INTx.

One lock (the function's) serializes vCPU accesses, config space, BAR moves and the I/O
loop's callbacks. A device's ``needs_reset`` only writes an eventfd, so it never waits for
that lock (a device's workers may be joined while the lock is held, in ``device.reset()``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os

from iovirt.bus.msix import MsixCapability
from iovirt.bus.pci import (
    PCI_CAP_ID_VNDR,
    BarKind,
    GuestAccessLog,
    PciFunction,
)
from iovirt.errors import IovirtError
from iovirt.platform import Platform
from iovirt.virtio.device import (
    QUEUE_MAX_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_INPUT,
    VIRTIO_ID_NET,
    Activation,
    QueueConfig,
    VirtioDevice,
)

log = logging.getLogger(__name__)

# PCI identity (virtio 1.2, 4.1.2).
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040  # modern devices: 0x1040 + virtio device ID
VIRTIO_PCI_REVISION = 1
VIRTIO_PCI_CLASS_CODES = {
    VIRTIO_ID_BLOCK: 0x018000,  # mass storage, other
    VIRTIO_ID_NET: 0x020000,  # network, ethernet
    VIRTIO_ID_INPUT: 0x098000,  # input, other
}
PCI_CLASS_OTHER = 0xFF0000

# Capability cfg_type values (4.1.4).
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# struct virtio_pci_cap, offsets from the capability's first byte.
VIRTIO_PCI_CAP_LEN = 2
VIRTIO_PCI_CAP_CFG_TYPE = 3
VIRTIO_PCI_CAP_BAR = 4
VIRTIO_PCI_CAP_ID = 5
VIRTIO_PCI_CAP_OFFSET = 8
VIRTIO_PCI_CAP_LENGTH = 12
VIRTIO_PCI_CAP_SIZE = 16
VIRTIO_PCI_NOTIFY_CAP_MULT = 16  # struct virtio_pci_notify_cap: notify_off_multiplier
VIRTIO_PCI_NOTIFY_CAP_SIZE = 20
VIRTIO_PCI_CFG_DATA = 16  # struct virtio_pci_cfg_cap: pci_cfg_data[4]
VIRTIO_PCI_CFG_CAP_SIZE = 20

# struct virtio_pci_common_cfg (4.1.4.3).
VIRTIO_PCI_COMMON_DFSELECT = 0x00
VIRTIO_PCI_COMMON_DF = 0x04
VIRTIO_PCI_COMMON_GFSELECT = 0x08
VIRTIO_PCI_COMMON_GF = 0x0C
VIRTIO_PCI_COMMON_MSIX = 0x10
VIRTIO_PCI_COMMON_NUMQ = 0x12
VIRTIO_PCI_COMMON_STATUS = 0x14
VIRTIO_PCI_COMMON_CFGGENERATION = 0x15
VIRTIO_PCI_COMMON_Q_SELECT = 0x16
VIRTIO_PCI_COMMON_Q_SIZE = 0x18
VIRTIO_PCI_COMMON_Q_MSIX = 0x1A
VIRTIO_PCI_COMMON_Q_ENABLE = 0x1C
VIRTIO_PCI_COMMON_Q_NOFF = 0x1E
VIRTIO_PCI_COMMON_Q_DESC = 0x20  # 64-bit: lo at 0x20, hi at 0x24
VIRTIO_PCI_COMMON_Q_AVAIL = 0x28  # driver area
VIRTIO_PCI_COMMON_Q_USED = 0x30  # device area
VIRTIO_PCI_COMMON_CFG_SIZE = 0x38

# The natural width of every common config field, by offset.
_COMMON_FIELDS = {
    VIRTIO_PCI_COMMON_DFSELECT: 4,
    VIRTIO_PCI_COMMON_DF: 4,
    VIRTIO_PCI_COMMON_GFSELECT: 4,
    VIRTIO_PCI_COMMON_GF: 4,
    VIRTIO_PCI_COMMON_MSIX: 2,
    VIRTIO_PCI_COMMON_NUMQ: 2,
    VIRTIO_PCI_COMMON_STATUS: 1,
    VIRTIO_PCI_COMMON_CFGGENERATION: 1,
    VIRTIO_PCI_COMMON_Q_SELECT: 2,
    VIRTIO_PCI_COMMON_Q_SIZE: 2,
    VIRTIO_PCI_COMMON_Q_MSIX: 2,
    VIRTIO_PCI_COMMON_Q_ENABLE: 2,
    VIRTIO_PCI_COMMON_Q_NOFF: 2,
    VIRTIO_PCI_COMMON_Q_DESC: 8,
    VIRTIO_PCI_COMMON_Q_AVAIL: 8,
    VIRTIO_PCI_COMMON_Q_USED: 8,
}

# ISR status bits (4.1.4.5).
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

VIRTIO_MSI_NO_VECTOR = 0xFFFF

# Feature words the driver may select: bits 0-127 (virtio 1.2 defines none past 41).
FEATURE_SELECT_LIMIT = 4

# The BAR and its layout: one 4 KiB page per structure, MSI-X table and PBA on their own
# pages as the PCI spec recommends.
VIRTIO_BAR = 4
PAGE = 0x1000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
DEVICE_CFG_SIZE = PAGE
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
NOTIFY_WRITE_SIZE = 2  # the driver writes the 16-bit queue index (no NOTIFICATION_DATA)
MSIX_TABLE_OFFSET = 0x4000
MAX_QUEUES = PAGE // NOTIFY_OFF_MULTIPLIER


def _page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


class VirtioPciTransport(PciFunction):
    """``device`` as a virtio-pci modern function; see the module docstring.

    ``intx_gsi`` is the IOAPIC input the function's INTA# is routed to (None: no INTx; the
    driver must then use MSI-X). Put it on the bus with :meth:`PciRoot.add`. The transport
    is also the :class:`~iovirt.bus.bus.BusDevice` of its BAR (:meth:`read`/:meth:`write`).
    """

    def __init__(
        self,
        device: VirtioDevice,
        platform: Platform,
        intx_gsi: int | None = None,
        *,
        name: str | None = None,
    ) -> None:
        num_queues = device.num_queues
        if not 0 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"virtio-pci: {num_queues} queues; at most {MAX_QUEUES}")
        name = name or f"virtio-pci ({VIRTIO_PCI_DEVICE_ID_BASE + device.device_id:#x})"
        super().__init__(
            VIRTIO_PCI_VENDOR_ID,
            VIRTIO_PCI_DEVICE_ID_BASE + device.device_id,
            VIRTIO_PCI_CLASS_CODES.get(device.device_id, PCI_CLASS_OTHER),
            revision=VIRTIO_PCI_REVISION,
            subsystem_vendor=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=device.device_id,
            intx=None if intx_gsi is None else platform.irq(intx_gsi),
            interrupt_line=0xFF if intx_gsi is None else intx_gsi,
            name=name,
        )
        self.device = device
        self.platform = platform
        self.num_queues = num_queues
        self.queue_max_size = max(0, min(device.queue_max_size, QUEUE_MAX_SIZE))
        self.bad_accesses = GuestAccessLog(name, log)
        # Failures the guest can provoke over and over (activate, ioeventfd placement).
        self.device_errors = GuestAccessLog(name, log, what="device errors")

        vectors = num_queues + 1  # one per queue and one for configuration changes
        table_bytes = vectors * 16
        self.pba_offset = MSIX_TABLE_OFFSET + _page_align(table_bytes)
        self.bar_size = _pow2_at_least(self.pba_offset + PAGE)
        self.notify_length = max(num_queues, 1) * NOTIFY_OFF_MULTIPLIER

        # Driver-visible state, reset by writing 0 to device_status.
        self._status = 0
        self._generation = 0
        self._dfselect = 0
        self._gfselect = 0
        self._driver_features = 0
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_select = 0
        self._queues = [QueueConfig(size=self.queue_max_size) for _ in range(num_queues)]
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * num_queues
        self._isr = 0
        # Per activation: kick eventfds, the ioeventfds registered for them, and an epoch
        # so a late needs_reset from an earlier activation is ignored.
        self._kick_fds: list[int] = []
        self._ioeventfds: set[tuple[int, int, int, int | None]] = set()
        self._epoch = 0
        self._bar_address: int | None = None
        self._closed = False

        # For the transport's lifetime: the shared (INTx) call eventfd and the needs-reset
        # eventfd, both watched on the host I/O loop.
        self._reset_requests: collections.deque[int] = collections.deque()
        self._intx_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._reset_fd = -1
        try:
            self._reset_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.msix = MsixCapability(
                platform,
                vectors,
                bar=VIRTIO_BAR,
                table_offset=MSIX_TABLE_OFFSET,
                pba_offset=self.pba_offset,
                on_control_change=self._update_intx_request,
                name=f"{name} msix",
            )
        except BaseException:
            self._close_fds()
            raise
        self.bar = self.add_bar(
            VIRTIO_BAR,
            self.bar_size,
            BarKind.MEM64,
            self,
            prefetchable=True,
            on_map=self._on_map,
        )
        self._add_virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, VIRTIO_PCI_COMMON_CFG_SIZE)
        self._add_virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            self.notify_length,
            NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"),
        )
        self._add_virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1)
        self._add_virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_CFG_SIZE)
        self.pci_cfg_cap = self._add_pci_cfg_cap()
        self.msix.install(self)
        platform.watch(self._intx_fd, self._on_shared_call)
        platform.watch(self._reset_fd, self._on_needs_reset)

    # -- capabilities ----------------------------------------------------------------------

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"") -> int:
        body = bytearray(VIRTIO_PCI_CAP_SIZE - 2)
        body[VIRTIO_PCI_CAP_LEN - 2] = VIRTIO_PCI_CAP_SIZE + len(extra)
        body[VIRTIO_PCI_CAP_CFG_TYPE - 2] = cfg_type
        body[VIRTIO_PCI_CAP_BAR - 2] = VIRTIO_BAR
        body[VIRTIO_PCI_CAP_ID - 2] = 0
        body[VIRTIO_PCI_CAP_OFFSET - 2 : VIRTIO_PCI_CAP_OFFSET + 2] = offset.to_bytes(4, "little")
        body[VIRTIO_PCI_CAP_LENGTH - 2 : VIRTIO_PCI_CAP_LENGTH + 2] = length.to_bytes(4, "little")
        return self.add_capability(PCI_CAP_ID_VNDR, bytes(body) + extra)

    def _add_pci_cfg_cap(self) -> int:
        """VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are the
        driver's; touching the window performs the BAR access they describe."""
        body = bytearray(VIRTIO_PCI_CFG_CAP_SIZE - 2)
        body[VIRTIO_PCI_CAP_LEN - 2] = VIRTIO_PCI_CFG_CAP_SIZE
        body[VIRTIO_PCI_CAP_CFG_TYPE - 2] = VIRTIO_PCI_CAP_PCI_CFG
        writable = bytearray(len(body))
        writable[VIRTIO_PCI_CAP_BAR - 2] = 0xFF
        writable[VIRTIO_PCI_CAP_OFFSET - 2 :] = b"\xff" * (VIRTIO_PCI_CFG_CAP_SIZE - 8)
        return self.add_capability(
            PCI_CAP_ID_VNDR,
            bytes(body),
            bytes(writable),
            on_read=self._pci_cfg_read,
            on_write=self._pci_cfg_write,
        )

    def _pci_cfg_window(self, offset: int, size: int) -> tuple[int, int] | None:
        """The BAR access the PCI_CFG capability describes, if the config access touched
        its data window and the access is one the spec allows; else None."""
        if offset + size <= VIRTIO_PCI_CFG_DATA:
            return None
        cap = self.pci_cfg_cap
        data = self.config.data
        bar = data[cap + VIRTIO_PCI_CAP_BAR]
        where = int.from_bytes(data[cap + VIRTIO_PCI_CAP_OFFSET : cap + 12], "little")
        length = int.from_bytes(data[cap + VIRTIO_PCI_CAP_LENGTH : cap + 16], "little")
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or where % length:
            self.bad_accesses(f"guest PCI_CFG access to BAR {bar} at {where:#x} of {length} bytes")
            return None
        if where + length > self.bar_size:
            self.bad_accesses(f"guest PCI_CFG access at {where:#x} past the BAR")
            return None
        return where, length

    def _pci_cfg_read(self, offset: int, size: int) -> None:
        window = self._pci_cfg_window(offset, size)
        if window is not None:
            where, length = window
            value = self.read(where, length)
            at = self.pci_cfg_cap + VIRTIO_PCI_CFG_DATA
            self.config.data[at : at + length] = value.to_bytes(length, "little")

    def _pci_cfg_write(self, offset: int, size: int) -> None:
        window = self._pci_cfg_window(offset, size)
        if window is not None:
            where, length = window
            at = self.pci_cfg_cap + VIRTIO_PCI_CFG_DATA
            self.write(where, length, int.from_bytes(self.config.data[at : at + length], "little"))

    # -- the BAR (BusDevice) ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A guest read of the virtio BAR at ``offset``."""
        with self.lock:
            if self._closed:
                return 0
            if COMMON_OFFSET <= offset < COMMON_OFFSET + PAGE:
                return self._common_read(offset - COMMON_OFFSET, size)
            if ISR_OFFSET <= offset < ISR_OFFSET + PAGE:
                return self._isr_read(offset - ISR_OFFSET, size)
            if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_CFG_SIZE:
                return self._device_config_read(offset - DEVICE_OFFSET, size)
            if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_bytes:
                return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
            if self.pba_offset <= offset < self.pba_offset + self.msix.pba_bytes:
                return self.msix.pba_read(offset - self.pba_offset, size)
            if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + self.notify_length:
                return 0  # the notification area is write-only
            self.bad_accesses(f"guest {size}-byte read at BAR offset {offset:#x}")
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write to the virtio BAR at ``offset``."""
        with self.lock:
            if self._closed:
                return
            if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + self.notify_length:
                self._notify(offset - NOTIFY_OFFSET, size)
            elif COMMON_OFFSET <= offset < COMMON_OFFSET + PAGE:
                self._common_write(offset - COMMON_OFFSET, size, value)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_CFG_SIZE:
                self._device_config_write(offset - DEVICE_OFFSET, size, value)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_bytes:
                self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)
            elif self.pba_offset <= offset < self.pba_offset + self.msix.pba_bytes:
                self.msix.pba_write(offset - self.pba_offset, size, value)
            else:
                self.bad_accesses(f"guest {size}-byte write at BAR offset {offset:#x}")

    # -- common configuration --------------------------------------------------------------

    def _common_field(self, offset: int, size: int) -> tuple[int, int] | None:
        """``(field offset, byte offset inside it)`` for an access of the field's natural
        width, or a 32-bit half of a 64-bit field; None for anything else."""
        base = offset & ~7 if offset >= VIRTIO_PCI_COMMON_Q_DESC else offset
        width = _COMMON_FIELDS.get(base)
        if width is None or offset >= VIRTIO_PCI_COMMON_CFG_SIZE:
            return None
        if size == width and offset == base:
            return base, 0
        if width == 8 and size == 4:
            return base, offset - base
        return None

    def _selected_queue(self) -> int | None:
        q = self._queue_select
        return q if q < self.num_queues else None

    def _common_read(self, offset: int, size: int) -> int:
        found = self._common_field(offset, size)
        if found is None:
            self.bad_accesses(f"guest {size}-byte common config read at {offset:#x}")
            return 0
        base, part = found
        q = self._selected_queue()
        value: int
        if base == VIRTIO_PCI_COMMON_DFSELECT:
            value = self._dfselect
        elif base == VIRTIO_PCI_COMMON_DF:
            value = self._feature_word(self.device.device_features(), self._dfselect)
        elif base == VIRTIO_PCI_COMMON_GFSELECT:
            value = self._gfselect
        elif base == VIRTIO_PCI_COMMON_GF:
            value = self._feature_word(self._driver_features, self._gfselect)
        elif base == VIRTIO_PCI_COMMON_MSIX:
            value = self._config_vector
        elif base == VIRTIO_PCI_COMMON_NUMQ:
            value = self.num_queues
        elif base == VIRTIO_PCI_COMMON_STATUS:
            value = self._status
        elif base == VIRTIO_PCI_COMMON_CFGGENERATION:
            value = self._generation
        elif base == VIRTIO_PCI_COMMON_Q_SELECT:
            value = self._queue_select
        elif base == VIRTIO_PCI_COMMON_Q_MSIX:
            value = VIRTIO_MSI_NO_VECTOR if q is None else self._queue_vectors[q]
        elif q is None:
            value = 0  # queue_size 0 tells the driver the selected queue does not exist
        elif base == VIRTIO_PCI_COMMON_Q_SIZE:
            value = self._queues[q].size
        elif base == VIRTIO_PCI_COMMON_Q_ENABLE:
            value = int(self._queues[q].enabled)
        elif base == VIRTIO_PCI_COMMON_Q_NOFF:
            value = q  # notify address = notify area + q * NOTIFY_OFF_MULTIPLIER
        elif base == VIRTIO_PCI_COMMON_Q_DESC:
            value = self._queues[q].desc
        elif base == VIRTIO_PCI_COMMON_Q_AVAIL:
            value = self._queues[q].driver
        else:
            value = self._queues[q].device
        return (value >> (8 * part)) & ((1 << (8 * size)) - 1)

    @staticmethod
    def _feature_word(features: int, select: int) -> int:
        if select >= FEATURE_SELECT_LIMIT:
            return 0
        return (features >> (32 * select)) & 0xFFFF_FFFF

    def _common_write(self, offset: int, size: int, value: int) -> None:
        found = self._common_field(offset, size)
        if found is None:
            self.bad_accesses(f"guest {size}-byte common config write at {offset:#x}")
            return
        base, part = found
        if base == VIRTIO_PCI_COMMON_DFSELECT:
            self._dfselect = value
        elif base == VIRTIO_PCI_COMMON_GFSELECT:
            self._gfselect = value
        elif base == VIRTIO_PCI_COMMON_GF:
            self._write_driver_features(value)
        elif base == VIRTIO_PCI_COMMON_MSIX:
            self._config_vector = self._checked_vector(value)
        elif base == VIRTIO_PCI_COMMON_STATUS:
            self._write_status(value)
        elif base == VIRTIO_PCI_COMMON_Q_SELECT:
            self._queue_select = value
        elif base in (
            VIRTIO_PCI_COMMON_Q_DESC,
            VIRTIO_PCI_COMMON_Q_AVAIL,
            VIRTIO_PCI_COMMON_Q_USED,
        ):
            self._write_queue_address(base, part, size, value)
        elif base == VIRTIO_PCI_COMMON_Q_SIZE:
            self._write_queue_size(value)
        elif base == VIRTIO_PCI_COMMON_Q_MSIX:
            q = self._selected_queue()
            if q is None:
                self.bad_accesses(f"guest queue_msix_vector write for queue {self._queue_select}")
            else:
                self._queue_vectors[q] = self._checked_vector(value)
        elif base == VIRTIO_PCI_COMMON_Q_ENABLE:
            self._write_queue_enable(value)
        else:  # device_feature, num_queues, config_generation, queue_notify_off
            self.bad_accesses(f"guest write to read-only common config field {base:#x}")

    def _checked_vector(self, vector: int) -> int:
        """An MSI-X vector the driver assigns; one outside the table reads back NO_VECTOR,
        which is how the driver learns the assignment failed."""
        return vector if vector < self.msix.table_size else VIRTIO_MSI_NO_VECTOR

    def _write_driver_features(self, value: int) -> None:
        select = self._gfselect
        if self._status & STATUS_FEATURES_OK or select >= FEATURE_SELECT_LIMIT:
            self.bad_accesses(
                f"guest driver_feature write (select {select}, status {self._status:#x})"
            )
            return
        shift = 32 * select
        self._driver_features = self._driver_features & ~(0xFFFF_FFFF << shift) | value << shift

    def _queue_writable(self) -> int | None:
        """The selected queue, if the driver may still configure it."""
        q = self._selected_queue()
        if q is None or self._queues[q].enabled or self._status & STATUS_DRIVER_OK:
            self.bad_accesses(f"guest configuring queue {self._queue_select} now is not allowed")
            return None
        return q

    def _write_queue_size(self, value: int) -> None:
        q = self._queue_writable()
        if q is None:
            return
        packed = bool(self._driver_features >> VIRTIO_F_RING_PACKED & 1)
        # Split rings need a power of two; packed rings any size up to the maximum.
        if not 1 <= value <= self.queue_max_size or (not packed and value & (value - 1)):
            self.bad_accesses(f"guest queue_size {value} for queue {q}")
            return
        self._queues[q].size = value

    def _write_queue_address(self, base: int, part: int, size: int, value: int) -> None:
        q = self._queue_writable()
        if q is None:
            return
        queue = self._queues[q]
        attr = {
            VIRTIO_PCI_COMMON_Q_DESC: "desc",
            VIRTIO_PCI_COMMON_Q_AVAIL: "driver",
            VIRTIO_PCI_COMMON_Q_USED: "device",
        }[base]
        mask = ((1 << (8 * size)) - 1) << (8 * part)
        old: int = getattr(queue, attr)
        setattr(queue, attr, old & ~mask | (value << (8 * part)) & mask)

    def _write_queue_enable(self, value: int) -> None:
        q = self._queue_writable()
        if q is None:
            return
        # Only 1 means something: disabling a queue needs VIRTIO_F_RING_RESET (not offered).
        if value != 1 or self._queues[q].size == 0:
            self.bad_accesses(f"guest queue_enable {value} for queue {q}")
            return
        self._queues[q].enabled = True

    # -- device status ---------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old = self._status
        # Bits only accumulate until reset; DEVICE_NEEDS_RESET is the device's to set.
        new = old | (value & ~STATUS_DEVICE_NEEDS_RESET)
        if new & ~old & STATUS_FEATURES_OK and not self._features_acceptable():
            new &= ~STATUS_FEATURES_OK  # the driver reads the bit back and gives up
        if new & ~old & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            self.bad_accesses("guest DRIVER_OK without FEATURES_OK")
            new &= ~STATUS_DRIVER_OK
        self._status = new
        if new & ~old & STATUS_DRIVER_OK:
            self._activate()

    def _features_acceptable(self) -> bool:
        offered = self.device.device_features()
        wanted = self._driver_features
        if wanted & ~offered:
            self.bad_accesses(f"guest driver asked for unoffered features {wanted & ~offered:#x}")
            return False
        if not wanted >> VIRTIO_F_VERSION_1 & 1:
            self.bad_accesses("guest driver did not accept VIRTIO_F_VERSION_1 (legacy driver?)")
            return False
        return True

    def _activate(self) -> None:
        epoch = self._epoch
        self._kick_fds = [
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)
        ]
        self._sync_ioeventfds()
        activation = Activation(
            memory=self.platform.memory,
            features=self._driver_features,
            queues=[dataclasses.replace(queue) for queue in self._queues],
            kick_fds=list(self._kick_fds),
            call_fds=[self._call_fd(q) for q in range(self.num_queues)],
            needs_reset=lambda: self._request_reset(epoch),
        )
        try:
            self.device.activate(activation)
        except IovirtError as e:
            self.device_errors(f"activating the device failed: {e}; device needs reset")
            self._set_needs_reset()

    def _call_fd(self, q: int) -> int:
        """Where queue ``q``'s interrupts go: its MSI-X vector, or the shared INTx eventfd
        (which also absorbs a queue with NO_VECTOR while MSI-X is on: no interrupt)."""
        vector = self._queue_vectors[q]
        if self.msix.enabled and vector != VIRTIO_MSI_NO_VECTOR:
            return self.msix.vector_eventfd(vector)
        return self._intx_fd

    def _reset(self) -> None:
        """The driver wrote 0 to device_status: back to the state after power-on (MSI-X
        table and PCI config space are the PCI function's and survive)."""
        try:
            self.device.reset()
        except IovirtError as e:
            self.device_errors(f"resetting the device failed: {e}")
        self._epoch += 1
        kicks, self._kick_fds = self._kick_fds, []
        self._sync_ioeventfds()
        for fd in kicks:
            os.close(fd)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._intx_fd)  # interrupts of the old activation are void
        self._status = 0
        self._dfselect = self._gfselect = 0
        self._driver_features = 0
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_select = 0
        self._queues = [QueueConfig(size=self.queue_max_size) for _ in range(self.num_queues)]
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * self.num_queues
        self._isr = 0
        self._update_intx_request()

    # -- notifications ---------------------------------------------------------------------

    def _notify(self, offset: int, size: int) -> None:
        """A notify write no ioeventfd caught: signal the queue's kick eventfd ourselves."""
        q, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if rest or size not in (2, 4) or q >= len(self._kick_fds):
            self.bad_accesses(f"guest {size}-byte notify at {offset:#x} (status {self._status:#x})")
            return
        with contextlib.suppress(BlockingIOError):  # the counter is saturated: kicked anyway
            os.eventfd_write(self._kick_fds[q], 1)

    def _sync_ioeventfds(self) -> None:
        """Register exactly the ioeventfds for the enabled queues at the BAR's address."""
        wanted: set[tuple[int, int, int, int | None]] = set()
        if self._bar_address is not None:
            for q, fd in enumerate(self._kick_fds):
                if self._queues[q].enabled:
                    address = self._bar_address + NOTIFY_OFFSET + q * NOTIFY_OFF_MULTIPLIER
                    wanted.add((fd, address, NOTIFY_WRITE_SIZE, None))
        for key in self._ioeventfds - wanted:
            try:
                self.platform.remove_ioeventfd(*key)
            except IovirtError as e:
                self.device_errors(f"removing ioeventfd at {key[1]:#x} failed: {e}")
        self._ioeventfds &= wanted
        for key in wanted - self._ioeventfds:
            try:
                self.platform.add_ioeventfd(*key)
            except IovirtError as e:
                # Kicks still arrive, through an exit to Python and _notify.
                self.device_errors(f"ioeventfd at {key[1]:#x} failed: {e}")
                continue
            self._ioeventfds.add(key)

    def _on_map(self, address: int | None) -> None:
        """The BAR moved (or stopped being decoded): move the ioeventfds with it."""
        with self.lock:
            self._bar_address = address
            if not self._closed:
                self._sync_ioeventfds()

    # -- interrupts ------------------------------------------------------------------------

    def _isr_read(self, offset: int, size: int) -> int:
        if offset != 0 or size != 1:
            self.bad_accesses(f"guest {size}-byte ISR read at {offset:#x}")
            return 0
        # Reading ISR acknowledges: the bits clear and INTx goes down.
        value, self._isr = self._isr, 0
        self._update_intx_request()
        return value

    def _update_intx_request(self) -> None:
        """INTx follows ISR, except while MSI-X is enabled (then the function must not
        use INTx at all)."""
        with self.lock:
            self.set_intx(bool(self._isr) and not self.msix.enabled)

    def _on_shared_call(self) -> None:
        """The host I/O loop saw the shared call eventfd: a queue interrupt via ISR/INTx."""
        with self.lock:
            if self._closed:
                return
            try:
                os.eventfd_read(self._intx_fd)
            except BlockingIOError:
                return
            if self.msix.enabled:
                return  # a queue with NO_VECTOR under MSI-X gets no interrupt (4.1.5.1.2)
            self._isr |= VIRTIO_PCI_ISR_QUEUE
            self._update_intx_request()

    def _config_interrupt(self) -> None:
        if self.msix.enabled:
            if self._config_vector != VIRTIO_MSI_NO_VECTOR:
                self.msix.signal(self._config_vector)
        else:
            self._isr |= VIRTIO_PCI_ISR_CONFIG
            self._update_intx_request()

    def config_changed(self) -> None:
        """The device's config space changed (link status, capacity): bump
        config_generation and send a configuration change interrupt. Do not call it from a
        thread ``device.reset()`` waits for."""
        with self.lock:
            if self._closed:
                return
            self._generation = (self._generation + 1) & 0xFF
            if self._status & STATUS_DRIVER_OK:
                self._config_interrupt()

    def _request_reset(self, epoch: int) -> None:
        """Activation.needs_reset: any thread, never blocks (see the module docstring)."""
        if self._closed:
            return
        self._reset_requests.append(epoch)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._reset_fd, 1)

    def _on_needs_reset(self) -> None:
        with self.lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._reset_fd)
            epochs = set()
            while self._reset_requests:
                epochs.add(self._reset_requests.popleft())
            if self._epoch in epochs and self._status & STATUS_DRIVER_OK:
                self._set_needs_reset()

    def _set_needs_reset(self) -> None:
        if self._status & STATUS_DEVICE_NEEDS_RESET:
            return
        self._status |= STATUS_DEVICE_NEEDS_RESET
        if self._status & STATUS_DRIVER_OK:
            self._config_interrupt()

    # -- device configuration --------------------------------------------------------------

    def _device_config_read(self, offset: int, size: int) -> int:
        if size == 8:  # two 32-bit halves, as the device protocol takes at most 4 bytes
            low = self.device.config_read(offset, 4) & 0xFFFF_FFFF
            return low | (self.device.config_read(offset + 4, 4) & 0xFFFF_FFFF) << 32
        if size not in (1, 2, 4):
            self.bad_accesses(f"guest {size}-byte device config read at {offset:#x}")
            return 0
        return self.device.config_read(offset, size) & ((1 << (8 * size)) - 1)

    def _device_config_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.device.config_write(offset, 4, value & 0xFFFF_FFFF)
            self.device.config_write(offset + 4, 4, value >> 32)
        elif size in (1, 2, 4):
            self.device.config_write(offset, size, value)
        else:
            self.bad_accesses(f"guest {size}-byte device config write at {offset:#x}")

    # -- state for tests and the board -----------------------------------------------------

    @property
    def status(self) -> int:
        return self._status

    @property
    def isr(self) -> int:
        """ISR status without acknowledging it."""
        return self._isr

    @property
    def kick_fds(self) -> list[int]:
        return list(self._kick_fds)

    @property
    def intx_fd(self) -> int:
        """The call eventfd queues share when they have no MSI-X vector."""
        return self._intx_fd

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """VM teardown: reset the device, release ioeventfds, vectors and eventfds."""
        with self.lock:
            if self._closed:
                return
            self._reset()
            self._closed = True
            self.platform.unwatch(self._intx_fd)
            self.platform.unwatch(self._reset_fd)
            self._close_fds()
            self.msix.close()

    def _close_fds(self) -> None:
        for fd in (self._intx_fd, self._reset_fd):
            if fd >= 0:
                os.close(fd)
        self._intx_fd = self._reset_fd = -1
