"""A KVM vCPU: its ``kvm_run`` page, registers, CPUID, and KVM_RUN itself.

KVM_RUN goes through a C helper called by cffi, which drops the GIL for the call, so a
vCPU thread inside the guest never holds up the host I/O thread or other vCPUs. To pull
a vCPU out of KVM_RUN, :meth:`KvmVcpu.kick` sets ``immediate_exit`` and sends the thread a
signal whose handler does nothing: KVM_RUN then returns EINTR, and any later KVM_RUN
returns at once, so a kick can never be lost between two runs.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from iovirt.errors import KvmError
from iovirt.kvm._ioctl import ffi, ioctl_int, ioctl_ptr, lib
from iovirt.kvm.system import cpuid2_entries, new_cpuid2

if TYPE_CHECKING:
    from iovirt.kvm.vm import KvmVm

# The signal used to kick vCPU threads out of KVM_RUN (see the module docstring).
KICK_SIGNAL = signal.SIGRTMIN
_kick_installed = False
_kick_lock = threading.Lock()


def install_kick_handler() -> None:
    """Install the no-op, non-restarting handler for :data:`KICK_SIGNAL` (once per process)."""
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            ret = lib.iovirt_install_kick_handler(KICK_SIGNAL)
            if ret < 0:
                raise KvmError("sigaction(KICK_SIGNAL)", -ret)
            _kick_installed = True


# CPUID leaves that carry the APIC ID, which must be the vCPU's index.
_CPUID_FEATURES = 0x1
_CPUID_EXT_TOPOLOGY = (0xB, 0x1F)
# CPUID.1:ECX bit 31: "running under a hypervisor". KVM leaves it to userspace; without it
# Linux never looks at KVM's leaves at 0x40000000 and so never finds kvm-clock.
_CPUID_1_ECX_HYPERVISOR = 1 << 31


class KvmVcpu:
    """One vCPU file descriptor with its shared ``kvm_run`` structure."""

    def __init__(self, vm: KvmVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = ioctl_int(vm.fd, lib.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            self._run_map = mmap.mmap(
                self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            os.close(self.fd)
            raise
        self._run_pin = ffi.from_buffer(self._run_map)
        self.run_struct: Any = ffi.cast("struct kvm_run *", self._run_pin)
        # Typed views of the exit payload union; they point into the same page for good.
        self.io: Any = lib.iovirt_run_io(self.run_struct)
        self.mmio: Any = lib.iovirt_run_mmio(self.run_struct)
        self.internal: Any = lib.iovirt_run_internal(self.run_struct)
        self.system_event: Any = lib.iovirt_run_system_event(self.run_struct)
        self.fail_entry: Any = lib.iovirt_run_fail_entry(self.run_struct)
        # Byte offsets of the exit fields in the page, for struct-based reads on hot paths.
        base = int(ffi.cast("uintptr_t", self.run_struct))
        self.exit_reason_offset: int = ffi.offsetof("struct kvm_run", "exit_reason")
        self.io_offset = int(ffi.cast("uintptr_t", self.io)) - base
        self.mmio_offset = int(ffi.cast("uintptr_t", self.mmio)) - base
        self.thread_ident: int | None = None
        self.poll_requested = False  # set with a kick when the VM wants a state check

    @property
    def run_page(self) -> mmap.mmap:
        """The raw ``kvm_run`` mapping (port I/O data lives at ``io.data_offset`` in it)."""
        return self._run_map

    # -- running ------------------------------------------------------------------------

    def run(self) -> int:
        """One KVM_RUN. Returns 0, or a negative errno (``-EINTR`` after a kick)."""
        ret: int = lib.iovirt_kvm_run(self.fd)
        return ret

    @property
    def exit_reason(self) -> int:
        return int(self.run_struct.exit_reason)

    def kick(self) -> None:
        """Make the current (or next) KVM_RUN on this vCPU return promptly."""
        self.run_struct.immediate_exit = 1
        ident = self.thread_ident
        if ident is not None:
            with contextlib.suppress(ProcessLookupError):  # the thread already ended
                signal.pthread_kill(ident, KICK_SIGNAL)

    # -- registers ----------------------------------------------------------------------

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        ioctl_ptr(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: Any) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        ioctl_ptr(self.fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_cpuid(self, entries: list[Any]) -> None:
        """KVM_SET_CPUID2 with ``entries`` (from :meth:`Kvm.supported_cpuid`), APIC IDs set
        to this vCPU's index."""
        cpuid = new_cpuid2(len(entries))
        table = cpuid2_entries(cpuid)
        for i, entry in enumerate(entries):
            table[i] = entry[0]
            e = table[i]
            if e.function == _CPUID_FEATURES:
                e.ebx = (e.ebx & 0x00FF_FFFF) | (self.index << 24)
                e.ecx |= _CPUID_1_ECX_HYPERVISOR
            elif e.function in _CPUID_EXT_TOPOLOGY:
                e.edx = self.index
        ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def close(self) -> None:
        if self.fd >= 0:
            ffi.release(self._run_pin)
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1
