"""A KVM virtual machine: memory slots, in-kernel irqchip and PIT, irqfd, ioeventfd,
GSI routing, and vCPU creation."""

from __future__ import annotations

import contextlib
import heapq
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iovirt.errors import KvmError, ResourceError
from iovirt.kvm._ioctl import ffi, ioctl_int, ioctl_ptr, lib

if TYPE_CHECKING:
    from iovirt.kvm.system import Kvm
    from iovirt.kvm.vcpu import KvmVcpu

# Three pages below the 4 GiB boundary that Intel's VMX needs for real-mode emulation
# (TSS) plus one for the EPT identity map; the same addresses QEMU and kvmtool use, inside
# the BIOS area that guest RAM layouts leave unmapped.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

# What KVM allowed before KVM_CAP_NR_MEMSLOTS existed (used if the capability reads 0).
DEFAULT_NR_MEMSLOTS = 32

# Legacy ISA interrupts 0-15 go to both PICs and the IOAPIC; 16-23 to the IOAPIC only.
NUM_IOAPIC_PINS = 24


@dataclass(frozen=True)
class MsiRoute:
    """A GSI routed to an MSI message (address/data as the guest programmed them)."""

    gsi: int
    address: int
    data: int


class KvmVm:
    """One VM file descriptor and what hangs off it."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = ioctl_int(kvm.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        self.has_irqchip = False
        self._msi_routes: dict[int, MsiRoute] = {}
        # vCPU threads program MSI routes concurrently (each device's MSI-X table writes);
        # KVM_SET_GSI_ROUTING replaces the whole table, so building and pushing it is serialised.
        self._routes_lock = threading.Lock()
        # Memory slot numbers: never reused while in use, handed out again (lowest first)
        # once deleted, so a BAR that moves over and over does not run out of slots.
        self._slots_lock = threading.Lock()
        self._next_slot = 0
        self._free_slots: list[int] = []
        self._max_slots = DEFAULT_NR_MEMSLOTS
        try:
            self._max_slots = kvm.check_extension(lib.KVM_CAP_NR_MEMSLOTS) or DEFAULT_NR_MEMSLOTS
            # Only VMX needs these; elsewhere the ioctls may be refused, which is harmless.
            if kvm.check_extension(lib.KVM_CAP_SET_TSS_ADDR):
                with contextlib.suppress(KvmError):
                    ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
            if kvm.check_extension(lib.KVM_CAP_SET_IDENTITY_MAP_ADDR):
                addr = ffi.new("uint64_t *", IDENTITY_MAP_ADDR)
                with contextlib.suppress(KvmError):
                    ioctl_ptr(
                        self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr, "KVM_SET_IDENTITY_MAP_ADDR"
                    )
        except BaseException:
            os.close(self.fd)
            raise

    # -- memory -------------------------------------------------------------------------

    def add_memory_slot(
        self, gpa: int, size: int, host_addr: int, readonly: bool = False, log_dirty: bool = False
    ) -> int:
        """Map ``size`` bytes at host ``host_addr`` as guest-physical ``gpa``; returns the slot
        (the lowest free number: deleted slots are reused)."""
        with self._slots_lock:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
            elif self._next_slot < self._max_slots:
                slot = self._next_slot
                self._next_slot += 1
            else:
                raise ResourceError(
                    "KVM memory slots", f"all {self._max_slots} in use (KVM_CAP_NR_MEMSLOTS)"
                )
        try:
            self.set_memory_slot(slot, gpa, size, host_addr, readonly, log_dirty)
        except BaseException:
            self._release_slot(slot)  # e.g. EEXIST (overlap): the number must not leak
            raise
        return slot

    def remove_memory_slot(self, slot: int) -> None:
        """Delete a slot :meth:`add_memory_slot` handed out; its number becomes free."""
        self.set_memory_slot(slot, 0, 0, 0)
        self._release_slot(slot)

    def _release_slot(self, slot: int) -> None:
        with self._slots_lock:
            heapq.heappush(self._free_slots, slot)

    def set_memory_slot(
        self,
        slot: int,
        gpa: int,
        size: int,
        host_addr: int,
        readonly: bool = False,
        log_dirty: bool = False,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION (size 0 deletes the slot)."""
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = (lib.KVM_MEM_READONLY if readonly else 0) | (
            lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        )
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = host_addr
        ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, pages: int) -> list[int]:
        """KVM_GET_DIRTY_LOG: the pages of ``slot`` (``pages`` long, created with
        ``log_dirty``) written since the previous call, ascending. KVM clears the log and
        write-protects those pages again, so each write is reported once."""
        words = (pages + 63) // 64
        bitmap = ffi.new("uint64_t[]", max(words, 1))  # KVM fills whole 64-bit words
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        ioctl_ptr(self.fd, lib.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        dirty: list[int] = []
        for word_index in range(words):
            word = int(bitmap[word_index])
            while word:
                low = word & -word
                page = word_index * 64 + low.bit_length() - 1
                if page < pages:
                    dirty.append(page)
                word ^= low
        return dirty

    # -- interrupt controllers ----------------------------------------------------------

    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and per-vCPU LAPICs (before any vCPU exists)."""
        ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True

    def create_pit(self) -> None:
        """In-kernel i8254 PIT on ports 0x40-0x43 (speaker port left to userspace)."""
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, gsi: int, level: bool) -> None:
        """KVM_IRQ_LINE: drive a GSI's input level."""
        irq = ffi.new("struct kvm_irq_level *")
        irq.irq = gsi
        irq.level = 1 if level else 0
        ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, irq, "KVM_IRQ_LINE")

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Inject GSI ``gsi`` whenever eventfd ``fd`` is signalled (level + resample if given)."""
        req = ffi.new("struct kvm_irqfd *")
        req.fd = fd
        req.gsi = gsi
        if resample_fd is not None:
            req.flags = lib.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resample_fd
        ioctl_ptr(self.fd, lib.KVM_IRQFD, req, "KVM_IRQFD")

    def irqfd_remove(self, fd: int, gsi: int) -> None:
        req = ffi.new("struct kvm_irqfd *")
        req.fd = fd
        req.gsi = gsi
        req.flags = lib.KVM_IRQFD_FLAG_DEASSIGN
        ioctl_ptr(self.fd, lib.KVM_IRQFD, req, "KVM_IRQFD(deassign)")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        pio: bool,
        datamatch: int | None = None,
        remove: bool = False,
    ) -> None:
        """Signal eventfd ``fd`` on a guest write to ``addr`` instead of exiting to userspace."""
        req = ffi.new("struct kvm_ioeventfd *")
        req.addr = addr
        req.len = length
        req.fd = fd
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            req.datamatch = datamatch
        if remove:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req.flags = flags
        ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, req, "KVM_IOEVENTFD")

    # -- GSI routing --------------------------------------------------------------------

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to an MSI message and push the whole table to KVM."""
        with self._routes_lock:
            self._msi_routes[gsi] = MsiRoute(gsi, address, data)
            self._commit_routes()

    def remove_msi_route(self, gsi: int) -> None:
        with self._routes_lock:
            self._msi_routes.pop(gsi, None)
            self._commit_routes()

    def _commit_routes(self) -> None:
        """KVM_SET_GSI_ROUTING replaces the whole table, so it always carries the default
        irqchip routes for GSIs 0-23 alongside our MSI routes."""
        irqchip_entries: list[tuple[int, int, int]] = []
        if self.has_irqchip:
            for pin in range(NUM_IOAPIC_PINS):
                if pin < 16 and pin != 2:
                    chip = lib.KVM_IRQCHIP_PIC_MASTER if pin < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
                    irqchip_entries.append((pin, chip, pin % 8))
                # GSI n -> IOAPIC pin n: KVM's own default table, which the MP table describes.
                irqchip_entries.append((pin, lib.KVM_IRQCHIP_IOAPIC, pin))
        n = len(irqchip_entries) + len(self._msi_routes)
        size = ffi.sizeof("struct kvm_irq_routing") + n * ffi.sizeof("struct kvm_irq_routing_entry")
        raw = ffi.new("char[]", size)
        table = ffi.cast("struct kvm_irq_routing *", raw)
        table.nr = n
        entries = ffi.cast(
            "struct kvm_irq_routing_entry *", raw + ffi.sizeof("struct kvm_irq_routing")
        )
        i = 0
        for gsi, chip, pin in irqchip_entries:
            entries[i].gsi = gsi
            entries[i].type = lib.KVM_IRQ_ROUTING_IRQCHIP
            entries[i].u.irqchip.irqchip = chip
            entries[i].u.irqchip.pin = pin
            i += 1
        for route in self._msi_routes.values():
            entries[i].gsi = route.gsi
            entries[i].type = lib.KVM_IRQ_ROUTING_MSI
            entries[i].u.msi.address_lo = route.address & 0xFFFF_FFFF
            entries[i].u.msi.address_hi = route.address >> 32
            entries[i].u.msi.data = route.data
            i += 1
        ioctl_ptr(self.fd, lib.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: deliver one MSI now; >0 if delivered, 0 if the guest blocked it."""
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo = address & 0xFFFF_FFFF
        msi.address_hi = address >> 32
        msi.data = data
        return ioctl_ptr(self.fd, lib.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    # -- vCPUs --------------------------------------------------------------------------

    def create_vcpu(self, index: int) -> KvmVcpu:
        from iovirt.kvm.vcpu import KvmVcpu

        return KvmVcpu(self, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
