"""The KVM system handle: ``/dev/kvm``, API version, capabilities, supported CPUID."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from iovirt.errors import KvmError, ResourceError
from iovirt.kvm._ioctl import ffi, ioctl_int, ioctl_ptr, lib

KVM_DEVICE = "/dev/kvm"

# What the iovirt VMM core cannot work without, with the reason it is needed.
REQUIRED_CAPABILITIES: dict[str, str] = {
    "KVM_CAP_USER_MEMORY": "guest RAM from our memfd",
    "KVM_CAP_IRQCHIP": "in-kernel interrupt controllers",
    "KVM_CAP_IOEVENTFD": "queue notifications without a userspace exit",
    "KVM_CAP_IRQFD": "interrupt injection from eventfds",
    "KVM_CAP_IRQ_ROUTING": "GSI/MSI routing",
    "KVM_CAP_EXT_CPUID": "CPUID set-up",
    "KVM_CAP_IMMEDIATE_EXIT": "race-free vCPU kicks on shutdown",
}

_MAX_CPUID_ENTRIES = 1024


class Kvm:
    """An open ``/dev/kvm`` whose API version and required capabilities are checked."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise ResourceError(
                path, "not found: this host has no KVM (load kvm_intel or kvm_amd)"
            ) from e
        except PermissionError as e:
            raise ResourceError(
                path, "permission denied: run as root or add your user to the 'kvm' group"
            ) from e
        except OSError as e:
            raise ResourceError(path, f"cannot open: {e.strerror}") from e
        try:
            version = ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != lib.KVM_API_VERSION:
                raise ResourceError(
                    path, f"KVM API version {version}, iovirt needs {lib.KVM_API_VERSION}"
                )
            missing = [
                f"{cap} ({why})"
                for cap, why in REQUIRED_CAPABILITIES.items()
                if not self.check_extension(getattr(lib, cap))
            ]
            if missing:
                raise ResourceError(path, "missing KVM capabilities: " + ", ".join(missing))
            self.vcpu_mmap_size = ioctl_int(
                self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
            )
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else a capability-specific positive value."""
        return ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list[Any]:
        """KVM_GET_SUPPORTED_CPUID as a list of ``struct kvm_cpuid_entry2`` copies."""
        nent = 64
        while True:
            buf = new_cpuid2(nent)
            try:
                ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as e:
                if e.errno == errno.E2BIG and nent < _MAX_CPUID_ENTRIES:
                    nent *= 2
                    continue
                raise
            entries = cpuid2_entries(buf)
            out = []
            for i in range(buf.nent):
                copy = ffi.new("struct kvm_cpuid_entry2 *")
                copy[0] = entries[i]
                out.append(copy)
            return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_cpuid2(nent: int) -> Any:
    """A zeroed ``struct kvm_cpuid2`` with room for ``nent`` entries after its header."""
    size = ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2")
    raw = ffi.new("char[]", size)
    cpuid = ffi.cast("struct kvm_cpuid2 *", raw)
    cpuid.nent = nent
    # keep the allocation alive as long as the typed pointer
    return ffi.gc(cpuid, lambda _p, _raw=raw: None)


def cpuid2_entries(cpuid: Any) -> Any:
    """The entry array that follows a ``struct kvm_cpuid2`` header."""
    return ffi.cast(
        "struct kvm_cpuid_entry2 *", ffi.cast("char *", cpuid) + ffi.sizeof("struct kvm_cpuid2")
    )


def kvm_flavour() -> str:
    """Which KVM this host has: ``"vmx"`` (kvm_intel), ``"svm"`` (kvm_amd), ``"pvm"``
    (kvm_pvm: software virtualization that runs small guests but not a stock Linux
    kernel, see ENVIRONMENT.md), or ``"none"``."""
    modules = Path("/sys/module")
    for module, flavour in (("kvm_pvm", "pvm"), ("kvm_intel", "vmx"), ("kvm_amd", "svm")):
        if (modules / module).exists():
            return flavour
    return "none"
