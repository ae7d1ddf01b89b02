"""Interrupts of a passed-through PCI function: INTx, MSI and MSI-X, routed by eventfds.

The device signals the host; vfio-pci turns each interrupt into a write to an eventfd we
hand it with ``VFIO_DEVICE_SET_IRQS``, and KVM turns that write into a guest interrupt
through an irqfd, without a trip through this process:

* **MSI-X** -- one platform :class:`~iovirt.platform.MsiVector` per table entry. The guest's
  MSI-X table and PBA are emulated here (the real table belongs to the host kernel, which
  programs it with host vectors); each entry's message and mask go to its vector, whose
  eventfd is the one vfio-pci signals. A masked vector keeps a signal as its pending bit
  and delivers it on unmask, which is what the PBA shows. MSI-X Enable (re)enables the
  whole table in vfio-pci at once, so no vector ever has to be added later.
* **MSI** -- the capability is emulated the same way: address, data, Multiple Message
  Enable, and per-vector mask and pending bits where the device has them.
* **INTx** -- level-triggered, with vfio-pci's automasking: a trigger eventfd on a KVM
  irqfd for the GSI the board routed the pin to, and a resample eventfd that KVM signals
  when the guest EOIs the interrupt and vfio-pci uses to unmask the line again. The irqfd
  is a KVM service that device transports do not otherwise need, so it is asked for
  through the small :class:`LevelIrqfd` protocol.

Only one of the three is enabled in vfio-pci at a time (the kernel refuses otherwise):
the device switches INTx off before it enables MSI or MSI-X, and back on after.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from iovirt.bus.pci import GuestAccessLog
from iovirt.platform import MsiVector, Platform
from iovirt.vfio import uapi
from iovirt.vfio.errors import VfioError
from iovirt.vfio.kernel import VfioKernel

if TYPE_CHECKING:
    from iovirt.kvm.vm import KvmVm

log = logging.getLogger(__name__)

# MSI-X capability (PCI Local Bus 3.0, 6.8.2), offsets from the capability's first byte.
PCI_MSIX_FLAGS = 2  # Message Control
PCI_MSIX_TABLE = 4  # Table Offset / BIR
PCI_MSIX_PBA = 8  # PBA Offset / BIR
PCI_MSIX_CAP_SIZE = 12
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 1 << 14
PCI_MSIX_FLAGS_ENABLE = 1 << 15
PCI_MSIX_BIR_MASK = 0x7
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 1
PCI_MSIX_ENTRY_ADDR_MASK = 0xFFFF_FFFC  # Message Address bits 1:0 are reserved

# MSI capability (6.8.1), offsets from the capability's first byte.
PCI_MSI_FLAGS = 2
PCI_MSI_ADDRESS_LO = 4
PCI_MSI_FLAGS_ENABLE = 1 << 0
PCI_MSI_FLAGS_QMASK = 0x7 << 1  # Multiple Message Capable
PCI_MSI_FLAGS_QSIZE = 0x7 << 4  # Multiple Message Enable
PCI_MSI_FLAGS_64BIT = 1 << 7
PCI_MSI_FLAGS_MASKBIT = 1 << 8  # per-vector masking capable
PCI_MSI_MAX_VECTORS = 32


class LevelIrqfd(Protocol):
    """A level-triggered irqfd with resampling (KVM_IRQFD_FLAG_RESAMPLE)."""

    def add_level_irqfd(self, trigger_fd: int, resample_fd: int, gsi: int) -> None:
        """Assert ``gsi`` when ``trigger_fd`` is signalled; on the guest's EOI deassert it
        and signal ``resample_fd``."""
        ...

    def remove_level_irqfd(self, trigger_fd: int, gsi: int) -> None: ...


class KvmLevelIrqfd:
    """:class:`LevelIrqfd` on a KVM VM's in-kernel irqchip."""

    def __init__(self, kvm_vm: KvmVm) -> None:
        self._vm = kvm_vm

    def add_level_irqfd(self, trigger_fd: int, resample_fd: int, gsi: int) -> None:
        self._vm.irqfd(trigger_fd, gsi, resample_fd)

    def remove_level_irqfd(self, trigger_fd: int, gsi: int) -> None:
        self._vm.irqfd_remove(trigger_fd, gsi)


class VfioIrqs:
    """``VFIO_DEVICE_GET_IRQ_INFO`` / ``VFIO_DEVICE_SET_IRQS`` on one device fd."""

    def __init__(self, kernel: VfioKernel, fd: int, name: str) -> None:
        self.kernel = kernel
        self.fd = fd
        self.name = name

    def info(self, index: int) -> tuple[int, int]:
        """(flags, count) of IRQ index ``index``; (0, 0) if the device has none."""
        arg = bytearray(uapi.IRQ_INFO.pack(uapi.IRQ_INFO.size, 0, index, 0))
        try:
            self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_GET_IRQ_INFO, arg)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return 0, 0
            raise VfioError("VFIO_DEVICE_GET_IRQ_INFO", e.errno or errno.EIO, self.name) from e
        _, flags, _, count = uapi.IRQ_INFO.unpack(arg)
        return flags, count

    def set_eventfds(
        self,
        index: int,
        fds: Sequence[int],
        start: int = 0,
        action: int = uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
    ) -> int:
        """Bind eventfds to ``index``'s interrupts ``start``..; returns the ioctl's result
        (vfio-pci returns a positive count when it could enable fewer MSI/MSI-X vectors)."""
        head = uapi.IRQ_SET.pack(
            uapi.IRQ_SET.size + 4 * len(fds),
            uapi.VFIO_IRQ_SET_DATA_EVENTFD | action,
            index,
            start,
            len(fds),
        )
        arg = bytearray(head + struct.pack(f"<{len(fds)}i", *fds))
        try:
            return self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_SET_IRQS, arg)
        except OSError as e:
            raise VfioError("VFIO_DEVICE_SET_IRQS", e.errno or errno.EIO, self.name) from e

    def disable(self, index: int) -> None:
        """Switch IRQ index ``index`` off (DATA_NONE | ACTION_TRIGGER, count 0)."""
        arg = bytearray(
            uapi.IRQ_SET.pack(
                uapi.IRQ_SET.size,
                uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                0,
                0,
            )
        )
        try:
            self.kernel.ioctl(self.fd, uapi.VFIO_DEVICE_SET_IRQS, arg)
        except OSError as e:
            raise VfioError("VFIO_DEVICE_SET_IRQS", e.errno or errno.EIO, self.name) from e


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class PassthroughIntx:
    """INTx of a passed-through function (see the module docstring)."""

    def __init__(self, irqs: VfioIrqs, router: LevelIrqfd, gsi: int) -> None:
        self.irqs = irqs
        self.router = router
        self.gsi = gsi
        self.enabled = False
        self.trigger = _eventfd()
        self.resample = _eventfd()
        try:
            router.add_level_irqfd(self.trigger, self.resample, gsi)
        except BaseException:
            os.close(self.trigger)
            os.close(self.resample)
            raise

    def enable(self) -> None:
        if self.enabled:
            return
        self.irqs.set_eventfds(uapi.VFIO_PCI_INTX_IRQ_INDEX, [self.trigger])
        self.irqs.set_eventfds(
            uapi.VFIO_PCI_INTX_IRQ_INDEX, [self.resample], action=uapi.VFIO_IRQ_SET_ACTION_UNMASK
        )
        self.enabled = True

    def disable(self) -> None:
        if not self.enabled:
            return
        self.irqs.disable(uapi.VFIO_PCI_INTX_IRQ_INDEX)
        self.enabled = False

    def close(self) -> None:
        if self.trigger < 0:
            return
        with contextlib.suppress(VfioError):
            self.disable()
        with contextlib.suppress(Exception):
            self.router.remove_level_irqfd(self.trigger, self.gsi)
        os.close(self.trigger)
        os.close(self.resample)
        self.trigger = self.resample = -1


def _access_ok(offset: int, size: int, length: int) -> bool:
    """MSI-X table/PBA accesses software may make: aligned DWORDs and QWORDs inside."""
    return size in (4, 8) and offset % size == 0 and 0 <= offset <= length - size


class PassthroughMsix:
    """The guest's MSI-X table, PBA and capability control for a passed-through function.

    ``control`` is the capability's Message Control as the device reports it (for the table
    size); ``table``/``pba`` are the raw Table and PBA Offset/BIR registers. The owner calls
    :meth:`control_written` after each guest write to the capability, and forwards BAR
    accesses that fall into :attr:`table_range` / :attr:`pba_range`. ``on_enable(True)`` runs
    before MSI-X is enabled in vfio-pci (the owner turns INTx off) and ``on_enable(False)``
    after it is disabled.
    """

    def __init__(
        self,
        platform: Platform,
        irqs: VfioIrqs,
        control: int,
        table: int,
        pba: int,
        *,
        name: str,
        on_enable: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name
        self.irqs = irqs
        self.table_size = (control & PCI_MSIX_FLAGS_QSIZE) + 1
        self.bar = table & PCI_MSIX_BIR_MASK
        self.table_offset = table & ~PCI_MSIX_BIR_MASK & 0xFFFF_FFFF
        self.pba_bar = pba & PCI_MSIX_BIR_MASK
        self.pba_offset = pba & ~PCI_MSIX_BIR_MASK & 0xFFFF_FFFF
        self.on_enable = on_enable
        self.bad_accesses = GuestAccessLog(name, log, what="odd MSI-X table/PBA accesses")
        self._lock = threading.Lock()
        self._table = bytearray(self.table_size * PCI_MSIX_ENTRY_SIZE)
        for i in range(self.table_size):  # every entry comes out of reset masked
            self._table[i * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] = 1
        self._control = 0
        self._vfio_enabled = False
        self._vectors: list[MsiVector] = []
        try:
            for _ in range(self.table_size):
                self._vectors.append(platform.msi_vector())
        except BaseException:
            self.close()
            raise
        self._messages: list[tuple[int, int] | None] = [None] * self.table_size
        self._masked = [True] * self.table_size

    @property
    def table_bytes(self) -> int:
        return self.table_size * PCI_MSIX_ENTRY_SIZE

    @property
    def pba_bytes(self) -> int:
        return (self.table_size + 63) // 64 * 8

    @property
    def table_range(self) -> tuple[int, int]:
        return self.table_offset, self.table_offset + self.table_bytes

    @property
    def pba_range(self) -> tuple[int, int]:
        return self.pba_offset, self.pba_offset + self.pba_bytes

    @property
    def enabled(self) -> bool:
        return bool(self._control & PCI_MSIX_FLAGS_ENABLE)

    @property
    def vfio_enabled(self) -> bool:
        return self._vfio_enabled

    def vector(self, index: int) -> MsiVector:
        return self._vectors[index]

    def masked(self, index: int) -> bool:
        return self._masked[index]

    # -- capability --------------------------------------------------------------------

    def control_written(self, control: int) -> None:
        """The guest wrote Message Control (only Enable and Function Mask are writable)."""
        control &= PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL
        was_enabled = self.enabled
        if control & PCI_MSIX_FLAGS_ENABLE and not was_enabled:
            if self.on_enable is not None:
                self.on_enable(True)
            self._enable_vfio()
        with self._lock:
            self._control = control
            for i in range(self.table_size):
                self._apply_mask(i)
        if was_enabled and not control & PCI_MSIX_FLAGS_ENABLE:
            self._disable_vfio()
            if self.on_enable is not None:
                self.on_enable(False)

    def _enable_vfio(self) -> None:
        fds = [v.eventfd for v in self._vectors]
        got = self.irqs.set_eventfds(uapi.VFIO_PCI_MSIX_IRQ_INDEX, fds)
        if 0 < got < len(fds):
            # The host could not give every vector (older kernels say so with a positive
            # count): take what there is; the rest of the table can never fire.
            log.warning("%s: host gave %d of %d MSI-X vectors", self.name, got, len(fds))
            self.irqs.set_eventfds(uapi.VFIO_PCI_MSIX_IRQ_INDEX, fds[:got])
        self._vfio_enabled = True

    def _disable_vfio(self) -> None:
        if self._vfio_enabled:
            self._vfio_enabled = False
            self.irqs.disable(uapi.VFIO_PCI_MSIX_IRQ_INDEX)

    def _apply_mask(self, index: int) -> None:
        base = index * PCI_MSIX_ENTRY_SIZE
        entry_masked = self._table[base + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT
        masked = (
            bool(entry_masked)
            or bool(self._control & PCI_MSIX_FLAGS_MASKALL)
            or not self._control & PCI_MSIX_FLAGS_ENABLE
        )
        if not masked:
            self._program(index)  # the message the guest wrote, before anything is delivered
        if masked != self._masked[index]:
            self._masked[index] = masked
            self._vectors[index].set_masked(masked)

    def _program(self, index: int) -> None:
        base = index * PCI_MSIX_ENTRY_SIZE
        address = int.from_bytes(self._table[base : base + 8], "little")
        data = int.from_bytes(self._table[base + 8 : base + 12], "little")
        if self._messages[index] != (address, data):
            self._messages[index] = (address, data)
            self._vectors[index].set_message(address, data)

    # -- table and PBA -----------------------------------------------------------------

    def table_read(self, offset: int, size: int) -> int:
        if not _access_ok(offset, size, self.table_bytes):
            self.bad_accesses(f"guest {size}-byte table read at {offset:#x}")
            return 0
        with self._lock:
            return int.from_bytes(self._table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if not _access_ok(offset, size, self.table_bytes):
            self.bad_accesses(f"guest {size}-byte table write at {offset:#x}")
            return
        index = offset // PCI_MSIX_ENTRY_SIZE
        base = index * PCI_MSIX_ENTRY_SIZE
        with self._lock:
            entry = bytearray(self._table[base : base + PCI_MSIX_ENTRY_SIZE])
            start = offset - base
            entry[start : start + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            lower = int.from_bytes(entry[0:4], "little") & PCI_MSIX_ENTRY_ADDR_MASK
            entry[0:4] = lower.to_bytes(4, "little")
            ctrl = int.from_bytes(entry[12:16], "little") & PCI_MSIX_ENTRY_CTRL_MASKBIT
            entry[12:16] = ctrl.to_bytes(4, "little")
            self._table[base : base + PCI_MSIX_ENTRY_SIZE] = entry
            if not self._masked[index]:
                self._program(index)  # an unmasked entry follows what the guest writes
            self._apply_mask(index)

    def pba_read(self, offset: int, size: int) -> int:
        if not _access_ok(offset, size, self.pba_bytes):
            self.bad_accesses(f"guest {size}-byte PBA read at {offset:#x}")
            return 0
        first = offset * 8
        value = 0
        with self._lock:
            for bit in range(max(0, min(size * 8, self.table_size - first))):
                if self._vectors[first + bit].pending:
                    value |= 1 << bit
        return value

    def pba_write(self, offset: int, size: int, value: int) -> None:
        """The PBA is read-only; writes are dropped (odd ones counted)."""
        if not _access_ok(offset, size, self.pba_bytes):
            self.bad_accesses(f"guest {size}-byte PBA write at {offset:#x}")

    def close(self) -> None:
        with contextlib.suppress(VfioError):
            self._disable_vfio()
        for vector in self._vectors:
            vector.close()
        self._vectors.clear()


class PassthroughMsi:
    """The MSI capability of a passed-through function, emulated (see the module
    docstring). ``control`` is the device's Message Control (64-bit, per-vector masking
    and Multiple Message Capable come from it); the owner keeps the capability's bytes and
    calls :meth:`written` with them after each guest write, and :meth:`pending_bits` to
    fill the Pending Bits register on reads."""

    def __init__(
        self,
        platform: Platform,
        irqs: VfioIrqs,
        control: int,
        *,
        name: str,
        on_enable: Callable[[bool], None] | None = None,
    ) -> None:
        self.platform = platform
        self.irqs = irqs
        self.name = name
        self.on_enable = on_enable
        self.is_64bit = bool(control & PCI_MSI_FLAGS_64BIT)
        self.per_vector_mask = bool(control & PCI_MSI_FLAGS_MASKBIT)
        self.max_vectors = 1 << min((control & PCI_MSI_FLAGS_QMASK) >> 1, 5)
        self.data_offset = 12 if self.is_64bit else 8
        self.mask_offset = self.data_offset + 4 if self.per_vector_mask else None
        self.pending_offset = self.data_offset + 8 if self.per_vector_mask else None
        self.length = self.data_offset + (12 if self.per_vector_mask else 4)
        self._lock = threading.Lock()
        self._vectors: list[MsiVector] = []
        self._enabled_count = 0  # vectors enabled in vfio-pci (0: MSI off)
        self._messages: list[tuple[int, int] | None] = []
        self._masked: list[bool] = []

    def writable_mask(self) -> bytes:
        """The guest-writable bits of the capability's bytes (ID and next pointer included)."""
        mask = bytearray(self.length)
        mask[PCI_MSI_FLAGS] = PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE
        mask[PCI_MSI_ADDRESS_LO : PCI_MSI_ADDRESS_LO + 4] = (0xFFFF_FFFC).to_bytes(4, "little")
        if self.is_64bit:
            mask[8:12] = b"\xff" * 4
        mask[self.data_offset : self.data_offset + 2] = b"\xff\xff"
        if self.mask_offset is not None:
            bits = (1 << self.max_vectors) - 1
            mask[self.mask_offset : self.mask_offset + 4] = bits.to_bytes(4, "little")
        return bytes(mask)

    @property
    def enabled(self) -> bool:
        return self._enabled_count > 0

    def vectors_enabled(self) -> int:
        return self._enabled_count

    def vector(self, index: int) -> MsiVector:
        return self._vectors[index]

    def pending_bits(self) -> int:
        with self._lock:
            return sum(1 << i for i in range(self._enabled_count) if self._vectors[i].pending)

    def written(self, cap: bytes) -> None:
        """Re-read the capability (``cap``: its bytes as the guest left them)."""
        control = int.from_bytes(cap[PCI_MSI_FLAGS : PCI_MSI_FLAGS + 2], "little")
        enable = bool(control & PCI_MSI_FLAGS_ENABLE)
        wanted = min(1 << ((control & PCI_MSI_FLAGS_QSIZE) >> 4), self.max_vectors)
        address = int.from_bytes(cap[4:8], "little")
        if self.is_64bit:
            address |= int.from_bytes(cap[8:12], "little") << 32
        data = int.from_bytes(cap[self.data_offset : self.data_offset + 2], "little")
        mask = 0
        if self.mask_offset is not None:
            mask = int.from_bytes(cap[self.mask_offset : self.mask_offset + 4], "little")
        if not enable:
            if self.enabled:
                self._disable()
            return
        if self.enabled and wanted != self._enabled_count:
            self._disable()  # a new vector count needs a fresh enable in vfio-pci
        if not self.enabled:
            self._enable(wanted)
        with self._lock:
            for i in range(self._enabled_count):
                # Multiple messages differ in the low bits of the data (6.8.3.3).
                message = (address, (data & ~(self._enabled_count - 1)) | i)
                if self._messages[i] != message:
                    self._messages[i] = message
                    self._vectors[i].set_message(*message)
                masked = bool(mask >> i & 1)
                if masked != self._masked[i]:
                    self._masked[i] = masked
                    self._vectors[i].set_masked(masked)

    def _enable(self, count: int) -> None:
        while len(self._vectors) < count:
            self._vectors.append(self.platform.msi_vector())
            self._messages.append(None)
            self._masked.append(True)
        if self.on_enable is not None:
            self.on_enable(True)
        fds = [v.eventfd for v in self._vectors[:count]]
        got = self.irqs.set_eventfds(uapi.VFIO_PCI_MSI_IRQ_INDEX, fds)
        if 0 < got < count:
            log.warning("%s: host gave %d of %d MSI vectors", self.name, got, count)
            count = got
            self.irqs.set_eventfds(uapi.VFIO_PCI_MSI_IRQ_INDEX, fds[:count])
        self._enabled_count = count

    def _disable(self) -> None:
        self._enabled_count = 0
        self.irqs.disable(uapi.VFIO_PCI_MSI_IRQ_INDEX)
        with self._lock:
            for i, vector in enumerate(self._vectors):
                if not self._masked[i]:
                    self._masked[i] = True
                    vector.set_masked(True)
        if self.on_enable is not None:
            self.on_enable(False)

    def close(self) -> None:
        if self.enabled:
            with contextlib.suppress(VfioError):
                self._disable()
        for vector in self._vectors:
            vector.close()
        self._vectors.clear()
