"""What a device transport needs from the VMM, as a protocol.

Transports (virtio-pci, virtio-mmio, later VFIO) ask the platform for ioeventfds, MSI
vectors bound to irqfds, level interrupt lines and fd watches on the host I/O loop. The
KVM implementation lives in :mod:`iovirt.kvm.platform`; unit tests use the simulator in
:mod:`iovirt.testing.platform`, so the transports are tested at their registers without a VM.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Protocol

from iovirt.interrupt import Interrupt
from iovirt.memory import GuestMemory


class MsiVector(Protocol):
    """One MSI/MSI-X vector: a message, and an eventfd that raises it.

    Writing 1 to :attr:`eventfd` delivers the message (KVM: an irqfd on an MSI route)
    unless the vector is masked; then the platform remembers it as pending and delivers
    it on unmask, as the PCI spec's pending-bit array does."""

    eventfd: int

    def set_message(self, address: int, data: int) -> None:
        """(Re)program the message the guest wrote into the MSI-X table or MSI capability."""
        ...

    def set_masked(self, masked: bool) -> None:
        """Mask (deliveries become pending) or unmask (a pending one is delivered now)."""
        ...

    @property
    def pending(self) -> bool:
        """Whether a delivery arrived while masked and has not been delivered yet."""
        ...

    def close(self) -> None:
        """Release the route, the irqfd and the eventfd."""
        ...


class RamMapping(Protocol):
    """Host memory mapped into the guest-physical address space (e.g. a framebuffer BAR
    as a KVM memory slot), so guest accesses to it cause no exits."""

    gpa: int
    size: int

    def dirty_pages(self) -> list[int]:
        """Indexes (4 KiB pages from :attr:`gpa`) the guest wrote since the previous call,
        ascending; the call clears them. Empty unless mapped with ``log_dirty``."""
        ...

    def close(self) -> None:
        """Remove the mapping (the guest's accesses there go back to the MMIO bus)."""
        ...


class Platform(Protocol):
    """Services of the VMM that device transports use."""

    memory: GuestMemory

    def add_ioeventfd(self, fd: int, address: int, length: int, datamatch: int | None) -> None:
        """Signal eventfd ``fd`` on a guest MMIO write to ``address`` (of ``length`` bytes,
        optionally only when the value equals ``datamatch``) without a VM exit to Python."""
        ...

    def remove_ioeventfd(
        self, fd: int, address: int, length: int, datamatch: int | None
    ) -> None: ...

    def msi_vector(self) -> MsiVector:
        """A new MSI vector (masked, no message yet)."""
        ...

    def irq(self, gsi: int) -> Interrupt:
        """The level-triggered line for IOAPIC input ``gsi``."""
        ...

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the host I/O loop whenever ``fd`` is readable (it must drain
        it). Thread-safe: transports call it from vCPU threads."""
        ...

    def unwatch(self, fd: int) -> None: ...

    def map_ram(self, gpa: int, buffer: mmap.mmap, log_dirty: bool = False) -> RamMapping:
        """Map all of ``buffer`` (a page-aligned multiple of 4 KiB) at guest-physical
        ``gpa``; with ``log_dirty`` the guest's writes are tracked per page."""
        ...
