"""Board wiring for ``[[passthrough]]``: check the host devices, open VFIO, map guest RAM
for DMA and put each device on the guest's PCI bus.

:func:`check_passthrough` runs first, before any VM (or lab) exists, so that a device not
bound to vfio-pci, a group that is not viable, a host without an IOMMU or a missing
permission ends ``iovirt run``/``check`` with one line. :func:`add_passthrough` is what the
board calls while building the VM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from iovirt.boot.acpi import pci_intx_gsi
from iovirt.errors import ConfigError
from iovirt.platform import Platform
from iovirt.vfio.container import closing, open_iommu_context
from iovirt.vfio.device import VfioPciDevice
from iovirt.vfio.host import HostPci, PciHostDevice
from iovirt.vfio.interrupts import KvmLevelIrqfd, LevelIrqfd
from iovirt.vfio.kernel import HostKernel, VfioKernel

if TYPE_CHECKING:
    from iovirt.vm import Vm

log = logging.getLogger(__name__)


class PassthroughEntry(Protocol):
    """One ``[[passthrough]]`` table (the config model has these fields)."""

    @property
    def host(self) -> str:
        """The host PCI address, e.g. ``0000:00:04.0``."""
        ...

    @property
    def iommu(self) -> str:
        """ "auto" (iommufd where the kernel has it, else type1), "iommufd" or "type1"."""
        ...


def _pin_gsi(slot: int, pin: int) -> int:
    """The GSI of INTx pin ``pin`` (1 = INTA#) of bus 0 slot ``slot`` (the DSDT's _PRT)."""
    return pci_intx_gsi(slot, pin - 1)


def check_passthrough(
    entries: Sequence[PassthroughEntry], host: HostPci | None = None
) -> list[PciHostDevice]:
    """The host devices of ``entries``, each checked (see the module docstring)."""
    host = host if host is not None else HostPci()
    devices: list[PciHostDevice] = []
    for i, entry in enumerate(entries):
        device = host.check_passthrough(entry.host)
        if any(d.bdf == device.bdf for d in devices):
            raise ConfigError(f"passthrough.{i}.host", f"{device.bdf} is listed twice")
        devices.append(device)
    preferences = {entry.iommu for entry in entries}
    if len(preferences) > 1:
        raise ConfigError(
            "passthrough.iommu", f"all devices share one IOMMU context; got {sorted(preferences)}"
        )
    return devices


def add_passthrough(
    vm: Vm,
    platform: Platform,
    entries: Sequence[PassthroughEntry],
    *,
    kernel: VfioKernel | None = None,
    host: HostPci | None = None,
) -> list[VfioPciDevice]:
    """Open every ``[[passthrough]]`` device through VFIO, map all guest RAM for its DMA
    and add it to ``vm.pci`` (INTx pin A of slot s on the board's usual GSI). Everything
    opened is closed by ``vm.close()``, also when this raises half-way."""
    if not entries:
        return []
    assert vm.pci is not None, "the board adds the PCI root first"
    host = host if host is not None else HostPci()
    kernel = kernel if kernel is not None else HostKernel()
    devices = check_passthrough(entries, host)
    context = open_iommu_context(kernel, entries[0].iommu, host.sysfs, host.devfs, host)
    vm.add_closer(closing(context.close))
    # Device fds first (for type1 the first group picks the IOMMU model, which the DMA
    # mappings need), then guest RAM, then the devices: none of them can DMA before that.
    fds: list[int] = []
    try:
        for device in devices:
            assert device.iommu_group is not None  # check_passthrough made sure
            fds.append(context.open_device(device.bdf, device.iommu_group, device.sys_path))
        context.map_memory(vm.memory)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                kernel.close(fd)
        raise
    router: LevelIrqfd | None = KvmLevelIrqfd(vm.kvm_vm) if vm.kvm_vm.has_irqchip else None
    functions: list[VfioPciDevice] = []
    for i, (device, fd) in enumerate(zip(devices, fds, strict=True)):
        slot = vm.pci.free_slot()
        if slot is None:
            for rest in fds[i:]:
                with contextlib.suppress(OSError):
                    kernel.close(rest)
            raise ConfigError(f"passthrough.{i}", "no free PCI slot left on bus 0")
        try:
            function = VfioPciDevice(
                kernel,
                fd,
                platform,
                name=f"vfio {device.bdf}",
                intx_router=router,
                intx_gsi=functools.partial(_pin_gsi, slot),
                group_fds=context.group_fds,
            )
        except BaseException:
            for rest in fds[i + 1 :]:
                with contextlib.suppress(OSError):
                    kernel.close(rest)
            raise
        vm.add_closer(closing(function.close))
        vm.pci.add(function, slot)
        functions.append(function)
        log.info(
            "passthrough %s (%s) -> guest 00:%02x.0 via %s",
            device.bdf,
            device.ids,
            slot,
            context.name,
        )
    return functions
