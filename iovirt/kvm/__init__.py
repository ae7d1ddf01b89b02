"""The KVM API from Python: system handle, VMs, vCPUs (structs laid out by cffi from
<linux/kvm.h>, ioctls through C helpers that release the GIL)."""

from iovirt.kvm.system import Kvm
from iovirt.kvm.vcpu import KvmVcpu
from iovirt.kvm.vm import KvmVm

__all__ = ["Kvm", "KvmVcpu", "KvmVm"]
