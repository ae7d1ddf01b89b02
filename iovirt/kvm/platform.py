"""The :class:`~iovirt.platform.Platform` of a KVM :class:`~iovirt.vm.Vm`.

MSI vectors are GSIs routed to MSI messages (KVM_SET_GSI_ROUTING) with an irqfd bound to
each vector's eventfd, so a C worker raises an MSI-X interrupt with one write(2) and no
exit to Python. Masking unbinds the irqfd and watches the eventfd on the host I/O loop
instead: a signal that arrives while masked becomes the PCI pending bit and is delivered
when the guest unmasks, as the MSI-X spec requires.

RAM mappings (a framebuffer BAR) are KVM memory slots over the caller's buffer; with dirty
logging KVM_GET_DIRTY_LOG says which pages the guest wrote, so a display sends only those.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from iovirt.errors import KvmError, ResourceError
from iovirt.interrupt import Interrupt
from iovirt.kvm._ioctl import ffi
from iovirt.kvm.vm import NUM_IOAPIC_PINS
from iovirt.memory import PAGE_SIZE

if TYPE_CHECKING:
    from iovirt.vm import Vm

log = logging.getLogger(__name__)

# GSIs above the IOAPIC pins are ours to route to MSI messages. KVM allows 4096 routes
# (KVM_MAX_IRQ_ROUTES); 1024 MSI vectors is far more than any board here uses.
FIRST_MSI_GSI = NUM_IOAPIC_PINS
MAX_MSI_GSI = 1024


def _drain(fd: int) -> bool:
    """Read an eventfd's counter; True if it had been signalled."""
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


class KvmMsiVector:
    """One MSI vector: a GSI with an MSI route and an irqfd (see the module docstring)."""

    def __init__(self, platform: KvmPlatform, gsi: int) -> None:
        self._platform = platform
        self.gsi = gsi
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._message: tuple[int, int] | None = None
        self._masked = True
        self._bound = False
        self._pending = False
        self._closed = False
        platform.watch(self.eventfd, self._signalled_while_masked)

    def set_message(self, address: int, data: int) -> None:
        with self._lock:
            if self._closed or self._message == (address, data):
                return
            self._message = (address, data)
            self._platform.vm.kvm_vm.set_msi_route(self.gsi, address, data)
            self._update()

    def set_masked(self, masked: bool) -> None:
        with self._lock:
            if self._closed or self._masked == masked:
                return
            self._masked = masked
            self._update()

    @property
    def pending(self) -> bool:
        with self._lock:
            if not self._bound and _drain(self.eventfd):
                self._pending = True  # signalled, and the loop has not looked yet
            return self._pending

    def _update(self) -> None:
        """Bind the irqfd when the vector can deliver (unmasked, message set), else watch."""
        deliverable = not self._masked and self._message is not None
        vm = self._platform.vm
        if deliverable and not self._bound:
            self._platform.unwatch(self.eventfd)
            if _drain(self.eventfd):
                self._pending = True
            vm.kvm_vm.irqfd(self.eventfd, self.gsi)
            self._bound = True
            if self._pending:
                self._pending = False
                os.eventfd_write(self.eventfd, 1)
        elif not deliverable and self._bound:
            vm.kvm_vm.irqfd_remove(self.eventfd, self.gsi)
            self._bound = False
            self._platform.watch(self.eventfd, self._signalled_while_masked)

    def _signalled_while_masked(self) -> None:
        with self._lock:
            if not self._bound and _drain(self.eventfd):
                self._pending = True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            vm = self._platform.vm
            if self._bound:
                with contextlib.suppress(KvmError):
                    vm.kvm_vm.irqfd_remove(self.eventfd, self.gsi)
            else:
                self._platform.unwatch(self.eventfd)
            if self._message is not None:
                with contextlib.suppress(KvmError):
                    vm.kvm_vm.remove_msi_route(self.gsi)
            os.close(self.eventfd)
            self._platform.release_gsi(self.gsi)


class KvmRamMapping:
    """A buffer mapped into guest-physical space as one KVM memory slot (see
    :class:`iovirt.platform.RamMapping`).

    The mapping pins the buffer (a cffi ``from_buffer`` export), so the buffer cannot be
    unmapped under the guest's feet: ``mmap.close()`` raises BufferError until
    :meth:`close` has deleted the slot."""

    def __init__(self, platform: KvmPlatform, gpa: int, buffer: mmap.mmap, log_dirty: bool) -> None:
        size = len(buffer)
        if size <= 0 or size % PAGE_SIZE or gpa < 0 or gpa % PAGE_SIZE:
            raise ValueError(
                f"map_ram: [{gpa:#x}, +{size:#x}) is not a page-aligned, non-empty range"
            )
        self.gpa = gpa
        self.size = size
        self.log_dirty = log_dirty
        self._vm = platform.vm.kvm_vm
        self._lock = threading.Lock()
        self._closed = False
        self._pin = ffi.from_buffer(buffer, require_writable=True)
        try:
            host_addr = int(ffi.cast("uintptr_t", self._pin))
            self.slot = self._vm.add_memory_slot(gpa, size, host_addr, log_dirty=log_dirty)
        except BaseException:
            ffi.release(self._pin)
            raise

    def dirty_pages(self) -> list[int]:
        with self._lock:
            if self._closed or not self.log_dirty:
                return []
            return self._vm.get_dirty_log(self.slot, self.size // PAGE_SIZE)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._vm.remove_memory_slot(self.slot)
            except KvmError as e:
                # The VM is already gone (its fd closed): so is the slot. The number is
                # not handed out again, which is harmless for a VM that no longer runs.
                log.debug("deleting memory slot %d: %s", self.slot, e)
            ffi.release(self._pin)


class KvmPlatform:
    """Platform services over a KVM :class:`~iovirt.vm.Vm` (one per VM)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.memory = vm.memory
        self._lock = threading.Lock()
        self._free_gsis = list(range(MAX_MSI_GSI - 1, FIRST_MSI_GSI - 1, -1))

    def add_ioeventfd(self, fd: int, address: int, length: int, datamatch: int | None) -> None:
        self.vm.kvm_vm.ioeventfd(fd, address, length, pio=False, datamatch=datamatch)

    def remove_ioeventfd(self, fd: int, address: int, length: int, datamatch: int | None) -> None:
        self.vm.kvm_vm.ioeventfd(fd, address, length, pio=False, datamatch=datamatch, remove=True)

    def msi_vector(self) -> KvmMsiVector:
        with self._lock:
            if not self._free_gsis:
                raise ResourceError("MSI vectors", f"all {MAX_MSI_GSI - FIRST_MSI_GSI} in use")
            gsi = self._free_gsis.pop()
        try:
            return KvmMsiVector(self, gsi)
        except BaseException:
            self.release_gsi(gsi)  # e.g. no eventfd (EMFILE): the GSI must not leak
            raise

    def release_gsi(self, gsi: int) -> None:
        with self._lock:
            self._free_gsis.append(gsi)

    def irq(self, gsi: int) -> Interrupt:
        return self.vm.irq(gsi)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.vm.watch(fd, callback)

    def unwatch(self, fd: int) -> None:
        self.vm.unwatch(fd)

    def map_ram(self, gpa: int, buffer: mmap.mmap, log_dirty: bool = False) -> KvmRamMapping:
        """A KVM memory slot over ``buffer`` at ``gpa`` (KVM_MEM_LOG_DIRTY_PAGES with
        ``log_dirty``). Raises KvmError if KVM refuses it (e.g. EEXIST: it overlaps another
        slot) and ResourceError when every slot is in use."""
        return KvmRamMapping(self, gpa, buffer, log_dirty)
