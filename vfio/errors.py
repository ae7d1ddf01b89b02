"""Errors of the VFIO layer.

A user mistake (device not bound to vfio-pci, a group that is not viable, no IOMMU, no
permission, a device the host still uses) is a :class:`~iovirt.errors.UserError` whose
message is one line naming the device and what to do. A VFIO ioctl that fails for another
reason is a :class:`VfioError` carrying the ioctl's name and errno.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from iovirt.errors import IovirtError, UserError, one_line


class VfioError(IovirtError):
    """A VFIO or iommufd ioctl (or region access) failed: ``op`` names it."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        self.op = op
        self.errno = errno
        msg = f"{op} failed: {os.strerror(errno)}"
        super().__init__(one_line(f"{msg} ({detail})" if detail else msg))


class PassthroughError(UserError):
    """Passthrough of host PCI device ``device`` cannot go ahead; the message says why
    and what to do."""

    prefix = "passthrough"

    def __init__(self, device: str, problem: str) -> None:
        self.device = device
        self.problem = problem
        super().__init__(one_line(f"{self.prefix} {device}: {problem}"))


class NoIommuError(PassthroughError):
    """The host has no (enabled) IOMMU, so the device is in no IOMMU group."""

    prefix = "no IOMMU:"


class DeviceNotFoundError(PassthroughError):
    """No PCI device with that address on this host."""


class NotBoundError(PassthroughError):
    """The device is bound to another driver (or none) instead of vfio-pci."""


class GroupNotViableError(PassthroughError):
    """Another device of the IOMMU group is bound to a host driver."""

    def __init__(self, device: str, group: int, offenders: Sequence[tuple[str, str]]) -> None:
        self.group = group
        self.offenders = list(offenders)
        listed = ", ".join(f"{bdf} (driver {driver})" for bdf, driver in offenders)
        super().__init__(
            device,
            f"IOMMU group {group} is not viable: {listed or 'the kernel says so'} "
            "still bound to a host driver; bind every device of the group to vfio-pci "
            "(iovirt host bind BDF) or unbind it",
        )


class PermissionDeniedError(PassthroughError):
    """The VFIO device nodes cannot be opened by this user."""


class DeviceBusyError(PassthroughError):
    """The group or device is already open (another VMM?)."""


class DeviceInUseError(PassthroughError):
    """``iovirt host bind`` refused: the host still uses the device."""
