"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

One device behind a 0x200-byte MMIO window: 32-bit registers below 0x100, the device's
config space from 0x100. The driver negotiates features and programs each queue's size
and ring addresses here; when it sets DRIVER_OK the transport hands the device an
:class:`~iovirt.virtio.device.Activation`:

- one *kick* eventfd per queue, registered as a KVM ioeventfd on QueueNotify with the
  queue index as datamatch, so the driver's notifications reach the data path without an
  exit to Python (a notify that does exit, e.g. under the test platform, is forwarded);
- one *call* eventfd for the whole device (virtio-mmio has a single interrupt line),
  watched on the host I/O loop: a signal sets InterruptStatus bit 0 and raises the level
  line ``gsi``; the driver's InterruptACK clears the bits and the line drops at zero.

The guest is hostile: accesses of the wrong size or offset, reads of write-only and
writes of read-only registers, out-of-range selectors and rings outside RAM are counted
(``bad_accesses``, ``device_errors``) and logged a few times, never raised. A ring
configuration that cannot work makes the device DEVICE_NEEDS_RESET instead of starting.

Threads: vCPU threads access the registers, the I/O loop delivers call signals and
needs-reset requests. All state is under one lock. A device reports a broken queue
through ``Activation.needs_reset`` from any thread, even from inside ``activate`` or while
a vCPU thread holds the lock in ``reset``: it only records the request and signals an
eventfd that the I/O loop turns into DEVICE_NEEDS_RESET, so it can never deadlock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import NamedTuple

from iovirt.errors import IovirtError
from iovirt.platform import Platform
from iovirt.virtio.device import (
    QUEUE_MAX_SIZE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    Activation,
    QueueConfig,
    VirtioDevice,
)

log = logging.getLogger(__name__)

VIRTIO_MMIO_SIZE = 0x200
VIRTIO_MMIO_MAGIC = 0x7472_6976  # "virt", little-endian
VIRTIO_MMIO_VERSION = 2  # the non-legacy register layout
VIRTIO_MMIO_VENDOR_ID = 0x5456_4F49  # "IOVT", little-endian; drivers match any vendor

# Register offsets (virtio 1.2, 4.2.2). R: read-only, W: write-only, RW: both.
MAGIC_VALUE = 0x000  # R
VERSION = 0x004  # R
DEVICE_ID = 0x008  # R
VENDOR_ID = 0x00C  # R
DEVICE_FEATURES = 0x010  # R: 32 feature bits, selected by DEVICE_FEATURES_SEL
DEVICE_FEATURES_SEL = 0x014  # W
DRIVER_FEATURES = 0x020  # W
DRIVER_FEATURES_SEL = 0x024  # W
QUEUE_SEL = 0x030  # W
QUEUE_NUM_MAX = 0x034  # R: 0 if the selected queue does not exist
QUEUE_NUM = 0x038  # W
QUEUE_READY = 0x044  # RW
QUEUE_NOTIFY = 0x050  # W: the queue index (no VIRTIO_F_NOTIFICATION_DATA)
INTERRUPT_STATUS = 0x060  # R
INTERRUPT_ACK = 0x064  # W
STATUS = 0x070  # RW
QUEUE_DESC_LOW = 0x080  # W
QUEUE_DESC_HIGH = 0x084  # W
QUEUE_DRIVER_LOW = 0x090  # W: the available ring (split) / driver event area (packed)
QUEUE_DRIVER_HIGH = 0x094  # W
QUEUE_DEVICE_LOW = 0x0A0  # W: the used ring (split) / device event area (packed)
QUEUE_DEVICE_HIGH = 0x0A4  # W
SHM_SEL = 0x0AC  # W
SHM_LEN_LOW = 0x0B0  # R: all-ones: no shared memory region with that id
SHM_LEN_HIGH = 0x0B4  # R
SHM_BASE_LOW = 0x0B8  # R
SHM_BASE_HIGH = 0x0BC  # R
CONFIG_GENERATION = 0x0FC  # R
CONFIG = 0x100  # the device-specific config space, any access width

REGISTER_SIZE = 4

# InterruptStatus / InterruptACK bits.
VIRTIO_MMIO_INT_VRING = 1 << 0  # a used buffer was added to some queue
VIRTIO_MMIO_INT_CONFIG = 1 << 1  # the config space changed (or the device needs reset)

# Transport features this transport does not implement: never offered, whatever the device
# says (notification data changes what QueueNotify carries; queue reset needs QueueReset).
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40
_TRANSPORT_UNSUPPORTED = 1 << VIRTIO_F_NOTIFICATION_DATA | 1 << VIRTIO_F_RING_RESET

_U32 = 0xFFFF_FFFF
_FEATURE_WORDS = 2  # features 0-63; higher selectors read 0 and ignore writes

# Ring area sizes and alignments (virtio 1.2, 2.7 split and 2.8 packed).
_DESC_SIZE = 16
_DESC_ALIGN = 16
_SPLIT_AVAIL_ALIGN = 2
_SPLIT_USED_ALIGN = 4
_PACKED_EVENT_SIZE = 4
_PACKED_EVENT_ALIGN = 4

# Odd guest accesses and device errors get this many log lines per transport.
_MAX_LOGGED = 16


class MmioResources(NamedTuple):
    """What the DSDT says about one transport (a ``(base, size, gsi)`` tuple)."""

    base: int
    size: int
    gsi: int


class _Active:
    """The fds of one DRIVER_OK cycle, released on reset."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.kick_fds: list[int] = []
        self.call_fd = -1
        self.ioeventfds: list[tuple[int, int]] = []  # (fd, datamatch) registered
        self.watching = False


class VirtioMmioTransport:
    """A :class:`~iovirt.bus.bus.BusDevice` for ``[base, base + VIRTIO_MMIO_SIZE)`` carrying
    ``device``; its interrupt is the level line ``gsi`` (see the module docstring)."""

    def __init__(self, device: VirtioDevice, platform: Platform, base: int, gsi: int) -> None:
        if base < 0 or gsi < 0:
            raise ValueError(f"virtio-mmio: bad base {base:#x} or gsi {gsi}")
        self._device = device
        self._platform = platform
        self.base = base
        self.gsi = gsi
        self._irq = platform.irq(gsi)
        self._lock = threading.Lock()
        self._num_queues = device.num_queues
        self._queue_max = max(0, min(device.queue_max_size, QUEUE_MAX_SIZE))

        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._queues = [QueueConfig() for _ in range(self._num_queues)]
        self._interrupt_status = 0
        self._config_generation = 0
        self._active: _Active | None = None
        self._generation = 0  # bumped on every activation, so stale callbacks are ignored
        self._closed = False

        # Needs-reset requests arrive here from any thread (see the module docstring).
        self._reset_request_fd = _eventfd()
        self._reset_requested_generation = -1
        platform.watch(self._reset_request_fd, self._on_reset_request)

        self.bad_accesses = 0  # wrong size/offset, wrong direction, bad selector
        self.device_errors = 0  # unusable queue setup, failed activation, needs-reset
        self.notifies = 0  # QueueNotify writes that exited to Python and were forwarded

    # -- what others ask of the transport ------------------------------------------------

    def acpi_device(self) -> MmioResources:
        """The window and interrupt the DSDT describes (``_HID "LNRO0005"``)."""
        return MmioResources(self.base, VIRTIO_MMIO_SIZE, self.gsi)

    def config_changed(self) -> None:
        """The device's config space changed: bump ConfigGeneration and, once the driver is
        running, send a configuration-change interrupt. Call it from the control plane (not
        from inside the device's ``activate`` or ``reset``)."""
        with self._lock:
            self._config_generation = (self._config_generation + 1) & _U32
            if self._status & STATUS_DRIVER_OK:
                self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    def close(self) -> None:
        """VM teardown: stop the device and release every fd and registration."""
        with self._lock:
            if self._closed:
                return
            self._reset_locked()
            self._closed = True
            self._platform.unwatch(self._reset_request_fd)
            os.close(self._reset_request_fd)

    @property
    def status(self) -> int:
        with self._lock:
            return self._status

    @property
    def interrupt_status(self) -> int:
        with self._lock:
            return self._interrupt_status

    @property
    def activated(self) -> bool:
        """Whether the device is running its data path (DRIVER_OK and activation worked)."""
        with self._lock:
            return self._active is not None

    # -- BusDevice ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset >= CONFIG:
                return self._device.config_read(offset - CONFIG, size)
            if size != REGISTER_SIZE or offset % REGISTER_SIZE:
                self._bad(f"{size}-byte read at register offset {offset:#x}")
                return 0
            return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if self._closed:
                return
            if offset >= CONFIG:
                self._device.config_write(offset - CONFIG, size, value)
                return
            if size != REGISTER_SIZE or offset % REGISTER_SIZE:
                self._bad(f"{size}-byte write at register offset {offset:#x}")
                return
            self._write_register(offset, value & _U32)

    # -- registers ------------------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC
        if offset == VERSION:
            return VIRTIO_MMIO_VERSION
        if offset == DEVICE_ID:
            return self._device.device_id
        if offset == VENDOR_ID:
            return VIRTIO_MMIO_VENDOR_ID
        if offset == DEVICE_FEATURES:
            sel = self._device_features_sel
            return self._offered() >> (32 * sel) & _U32 if sel < _FEATURE_WORDS else 0
        if offset == QUEUE_NUM_MAX:
            return self._queue_max if self._selected_queue() is not None else 0
        if offset == QUEUE_READY:
            queue = self._selected_queue()
            return int(queue is not None and queue.enabled)
        if offset == INTERRUPT_STATUS:
            return self._interrupt_status
        if offset == STATUS:
            return self._status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return _U32  # no shared memory regions: length ~0 says "no such region"
        if offset == CONFIG_GENERATION:
            return self._config_generation
        self._bad(f"read of write-only or unknown register {offset:#x}")
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self._queue_sel = value
        elif offset in _QUEUE_FIELDS:
            self._write_queue_field(offset, value)
        elif offset == QUEUE_NOTIFY:
            self._notify(value)
        elif offset == INTERRUPT_ACK:
            self._ack_interrupt(value)
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == SHM_SEL:
            pass  # every region reads as absent
        else:
            self._bad(f"write of read-only or unknown register {offset:#x}")

    def _offered(self) -> int:
        return self._device.device_features() & ~_TRANSPORT_UNSUPPORTED

    def _selected_queue(self) -> QueueConfig | None:
        return self._queues[self._queue_sel] if self._queue_sel < self._num_queues else None

    def _write_driver_features(self, value: int) -> None:
        sel = self._driver_features_sel
        if self._status & STATUS_FEATURES_OK:
            self._bad("DriverFeatures written after FEATURES_OK")
        elif sel >= _FEATURE_WORDS:
            if value:
                self._bad(f"DriverFeatures word {sel} (only 0-1 exist) written {value:#x}")
        else:
            shift = 32 * sel
            self._driver_features = self._driver_features & ~(_U32 << shift) | value << shift

    def _write_queue_field(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            self._bad(f"queue register {offset:#x} written with QueueSel {self._queue_sel}")
            return
        if self._status & STATUS_DRIVER_OK:
            # The device already took its copy at DRIVER_OK; a late change cannot reach it.
            self._bad(f"queue register {offset:#x} written after DRIVER_OK")
            return
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset == QUEUE_READY:
            queue.enabled = bool(value & 1)
        elif offset == QUEUE_DESC_LOW:
            queue.desc = _set_low(queue.desc, value)
        elif offset == QUEUE_DESC_HIGH:
            queue.desc = _set_high(queue.desc, value)
        elif offset == QUEUE_DRIVER_LOW:
            queue.driver = _set_low(queue.driver, value)
        elif offset == QUEUE_DRIVER_HIGH:
            queue.driver = _set_high(queue.driver, value)
        elif offset == QUEUE_DEVICE_LOW:
            queue.device = _set_low(queue.device, value)
        elif offset == QUEUE_DEVICE_HIGH:
            queue.device = _set_high(queue.device, value)

    def _notify(self, index: int) -> None:
        """A notify that exited to Python (no ioeventfd matched): pass it to the kick fd."""
        active = self._active
        if active is None or index >= len(active.kick_fds):
            self._bad(f"QueueNotify {index} while not running or for no such queue")
            return
        self.notifies += 1
        with contextlib.suppress(BlockingIOError):  # counter saturated: a kick is pending
            os.eventfd_write(active.kick_fds[index], 1)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset_locked()
            return
        old = self._status
        # Only the device sets DEVICE_NEEDS_RESET, and it stays until the reset.
        value = value & ~STATUS_DEVICE_NEEDS_RESET | old & STATUS_DEVICE_NEEDS_RESET
        if old & ~value:
            self._bad(f"status {old:#x} -> {value:#x} clears bits without a reset")
            return
        new = value & ~old
        if new & STATUS_FEATURES_OK and not self._features_acceptable():
            value &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
            new &= ~STATUS_FEATURES_OK
        if new & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
            self._bad("DRIVER_OK without FEATURES_OK (legacy drivers are not supported)")
            value &= ~STATUS_DRIVER_OK
            new &= ~STATUS_DRIVER_OK
        self._status = value
        if new & STATUS_DRIVER_OK:
            self._activate()

    def _features_acceptable(self) -> bool:
        features = self._driver_features
        offered = self._offered()
        if not features >> VIRTIO_F_VERSION_1 & 1:
            self._device_error("driver did not accept VIRTIO_F_VERSION_1")
            return False
        if features & ~offered:
            self._device_error(f"driver accepted features never offered: {features & ~offered:#x}")
            return False
        return True

    # -- activation and reset -------------------------------------------------------------

    def _activate(self) -> None:
        queues = [QueueConfig(q.size, q.desc, q.driver, q.device, q.enabled) for q in self._queues]
        packed = bool(self._driver_features >> VIRTIO_F_RING_PACKED & 1)
        for index, queue in enumerate(queues):
            problem = self._queue_problem(queue, packed) if queue.enabled else None
            if problem is not None:
                self._device_error(f"queue {index}: {problem}")
                self._set_needs_reset()
                return
        self._generation += 1
        generation = self._generation
        active = _Active(generation)
        self._active = active
        try:
            active.call_fd = _eventfd()
            for _ in queues:
                active.kick_fds.append(_eventfd())
            notify_address = self.base + QUEUE_NOTIFY
            for index, fd in enumerate(active.kick_fds):
                self._platform.add_ioeventfd(fd, notify_address, REGISTER_SIZE, index)
                active.ioeventfds.append((fd, index))
            self._platform.watch(active.call_fd, lambda: self._on_call(generation))
            active.watching = True

            def needs_reset() -> None:
                self._request_reset(generation)

            self._device.activate(
                Activation(
                    memory=self._platform.memory,
                    features=self._driver_features,
                    queues=queues,
                    kick_fds=list(active.kick_fds),
                    call_fds=[active.call_fd] * len(queues),
                    needs_reset=needs_reset,
                )
            )
        except (IovirtError, OSError) as err:  # OSError: the host ran out of fds
            self._device_error(f"activation failed: {err}")
            self._release_active()
            self._set_needs_reset()

    def _queue_problem(self, queue: QueueConfig, packed: bool) -> str | None:
        """Why a queue the driver enabled cannot run, or None."""
        size = queue.size
        if not 0 < size <= self._queue_max:
            return f"size {size} is not in 1..{self._queue_max}"
        if not packed and size & (size - 1):
            return f"size {size} is not a power of two (split ring)"
        if packed:
            driver_len = device_len = _PACKED_EVENT_SIZE
            driver_align = device_align = _PACKED_EVENT_ALIGN
        else:
            # flags, idx, ring[size], used_event / avail_event (virtio 1.2, 2.7.6 and 2.7.8)
            driver_len, driver_align = 6 + 2 * size, _SPLIT_AVAIL_ALIGN
            device_len, device_align = 6 + 8 * size, _SPLIT_USED_ALIGN
        memory = self._platform.memory
        for area, address, length, align in (
            ("descriptor area", queue.desc, _DESC_SIZE * size, _DESC_ALIGN),
            ("driver area", queue.driver, driver_len, driver_align),
            ("device area", queue.device, device_len, device_align),
        ):
            if address % align:
                return f"{area} at {address:#x} is not {align}-byte aligned"
            if not memory.contains(address, length):
                return f"{area} [{address:#x}, +{length:#x}) is not in guest RAM"
        return None

    def _reset_locked(self) -> None:
        """Status 0 (or teardown): stop the device first (its data path uses the fds), then
        release what the activation registered and return every register to its reset value."""
        try:
            self._device.reset()
        except IovirtError as err:
            self._device_error(f"device reset failed: {err}")
        self._release_active()
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._queues = [QueueConfig() for _ in range(self._num_queues)]
        if self._interrupt_status:
            self._interrupt_status = 0
            self._irq.set_level(False)

    def _release_active(self) -> None:
        active, self._active = self._active, None
        if active is None:
            return
        notify_address = self.base + QUEUE_NOTIFY
        for fd, index in active.ioeventfds:
            try:
                self._platform.remove_ioeventfd(fd, notify_address, REGISTER_SIZE, index)
            except IovirtError as err:
                self._device_error(f"removing the ioeventfd of queue {index} failed: {err}")
        if active.watching:
            self._platform.unwatch(active.call_fd)
        for fd in (*active.kick_fds, active.call_fd):
            if fd >= 0:
                os.close(fd)

    def _set_needs_reset(self) -> None:
        self._status |= STATUS_DEVICE_NEEDS_RESET
        self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    # -- interrupts -----------------------------------------------------------------------

    def _raise_interrupt(self, bits: int) -> None:
        self._interrupt_status |= bits
        self._irq.set_level(True)

    def _ack_interrupt(self, bits: int) -> None:
        if not self._interrupt_status:
            return
        self._interrupt_status &= ~bits
        if not self._interrupt_status:
            self._irq.set_level(False)

    def _on_call(self, generation: int) -> None:
        """I/O loop: the device signalled its call eventfd (a used buffer is ready)."""
        with self._lock:
            active = self._active
            # A callback queued before a reset must not touch the (closed, maybe reused) fd.
            if active is None or active.generation != generation:
                return
            try:
                os.eventfd_read(active.call_fd)
            except BlockingIOError:
                return
            self._raise_interrupt(VIRTIO_MMIO_INT_VRING)

    def _request_reset(self, generation: int) -> None:
        """Activation.needs_reset, from any thread: record, and let the I/O loop act."""
        if self._closed:
            return
        self._reset_requested_generation = generation
        with contextlib.suppress(OSError):
            os.eventfd_write(self._reset_request_fd, 1)

    def _on_reset_request(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.eventfd_read(self._reset_request_fd)
            except BlockingIOError:
                return
            active = self._active
            if active is None or active.generation != self._reset_requested_generation:
                return  # the driver reset the device meanwhile: nothing left to report
            if not self._status & STATUS_DEVICE_NEEDS_RESET:
                self._device_error("the device found a queue unusable: needs reset")
                self._set_needs_reset()

    # -- accounting -----------------------------------------------------------------------

    def _bad(self, what: str) -> None:
        self.bad_accesses += 1
        if self.bad_accesses <= _MAX_LOGGED:
            log.warning("virtio-mmio@%#x: guest %s", self.base, what)
            if self.bad_accesses == _MAX_LOGGED:
                log.warning("virtio-mmio@%#x: further bad accesses only counted", self.base)

    def _device_error(self, what: str) -> None:
        self.device_errors += 1
        if self.device_errors <= _MAX_LOGGED:
            log.warning("virtio-mmio@%#x: %s", self.base, what)
            if self.device_errors == _MAX_LOGGED:
                log.warning("virtio-mmio@%#x: further device errors only counted", self.base)


_QUEUE_FIELDS = frozenset(
    {
        QUEUE_NUM,
        QUEUE_READY,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
    }
)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _set_low(address: int, value: int) -> int:
    return address & ~_U32 | value


def _set_high(address: int, value: int) -> int:
    return address & _U32 | value << 32
