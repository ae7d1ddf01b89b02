"""The host IOMMU side of passthrough: who owns the device, and what it may DMA to.

Two kernel interfaces, one :class:`IommuContext` protocol:

* :class:`Type1Container` -- the classic one. ``/dev/vfio/vfio`` is a container; each IOMMU
  group (``/dev/vfio/<group>``) is checked for viability and attached to it; the first group
  lets the container pick the type1 v2 IOMMU model; device fds come from
  ``VFIO_GROUP_GET_DEVICE_FD``; DMA mappings are ``VFIO_IOMMU_MAP_DMA``.
* :class:`IommufdContext` -- iommufd (``/dev/iommu``) with the VFIO device cdev
  (``/dev/vfio/devices/vfioN``, Linux 6.6+): one IO address space (IOAS), each device bound
  to the iommufd and attached to the IOAS, mappings with ``IOMMU_IOAS_MAP``.

:func:`open_iommu_context` prefers iommufd where the kernel has it and says which one it
chose. Either way the guest's RAM is mapped at IOVA = guest-physical address, and nothing
else is: the host IOMMU then translates every DMA the device makes to guest RAM, and a DMA
anywhere else faults in the IOMMU instead of reaching host memory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from iovirt.memory import GuestMemory
from iovirt.vfio import uapi
from iovirt.vfio.errors import (
    DeviceBusyError,
    GroupNotViableError,
    PassthroughError,
    PermissionDeniedError,
    VfioError,
)
from iovirt.vfio.host import (
    DEVFS,
    INTERFACE_IOMMUFD,
    INTERFACE_TYPE1,
    SYSFS,
    HostPci,
    iommufd_available,
    vfio_cdev_name,
)
from iovirt.vfio.kernel import VfioKernel

log = logging.getLogger(__name__)

# Room for the IOVA-range capability of VFIO_IOMMU_GET_INFO (a handful of ranges on x86).
_IOMMU_INFO_BUFFER = 4096


def _ioctl(
    kernel: VfioKernel, fd: int, request: int, arg: bytearray | int, op: str, device: str = ""
) -> int:
    """An ioctl whose failure becomes a VfioError naming it (and the device)."""
    try:
        return kernel.ioctl(fd, request, arg)
    except OSError as e:
        raise VfioError(op, e.errno or errno.EIO, device) from e


def _open_node(kernel: VfioKernel, path: str, device: str, what: str) -> int:
    """Open a VFIO node, turning the errors a user can fix into one clear line."""
    try:
        return kernel.open(path)
    except PermissionError as e:
        raise PermissionDeniedError(
            device,
            f"no permission to open {path}; run as root or give this user read-write "
            "access to it (e.g. a udev rule)",
        ) from e
    except FileNotFoundError as e:
        raise PassthroughError(
            device, f"{path} does not exist ({what}); is the device bound to vfio-pci?"
        ) from e
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusyError(
                device, f"{path} is already open (another VMM has {what}?)"
            ) from e
        raise PassthroughError(device, f"cannot open {path}: {e.strerror}") from e


def _memlock_hint() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
    return f"RLIMIT_MEMLOCK is {limit}; raise it (ulimit -l) or run as root"


class IommuContext(Protocol):
    """What a passthrough VM needs from the host IOMMU interface."""

    name: str  # "type1 container + groups" or "iommufd + vfio cdev"

    def open_device(self, bdf: str, group: int, sys_path: Path) -> int:
        """Attach the device (and its group) and return its VFIO device fd."""
        ...

    def map_memory(self, memory: GuestMemory) -> None:
        """Map every guest RAM region for DMA at IOVA = guest-physical address."""
        ...

    def group_fds(self) -> dict[int, int]:
        """Group number -> group fd of every group held (for PCI hot reset)."""
        ...

    def close(self) -> None: ...


class Type1Container:
    """A VFIO container with the type1 v2 IOMMU model (see the module docstring)."""

    name = INTERFACE_TYPE1

    def __init__(
        self,
        kernel: VfioKernel,
        devfs: Path = DEVFS,
        host: HostPci | None = None,
    ) -> None:
        self.kernel = kernel
        self.devfs = devfs
        self.host = host if host is not None else HostPci()
        path = str(devfs / "vfio" / "vfio")
        self.fd = _open_node(kernel, path, "the VFIO container", "the container")
        self._groups: dict[int, int] = {}  # group -> fd
        self._iommu_set = False
        self._mappings: list[tuple[int, int]] = []  # (iova, size)
        try:
            version = _ioctl(kernel, self.fd, uapi.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
            if version != uapi.VFIO_API_VERSION:
                raise VfioError("VFIO_GET_API_VERSION", errno.EPROTO, f"API {version}")
            if not _ioctl(
                kernel,
                self.fd,
                uapi.VFIO_CHECK_EXTENSION,
                uapi.VFIO_TYPE1v2_IOMMU,
                "VFIO_CHECK_EXTENSION",
            ):
                raise PassthroughError(
                    "the VFIO container", "the kernel's VFIO has no type1 v2 IOMMU model"
                )
        except BaseException:
            self.close()
            raise

    def _group_fd(self, group: int, bdf: str) -> int:
        if group in self._groups:
            return self._groups[group]
        fd = _open_node(self.kernel, str(self.devfs / "vfio" / str(group)), bdf, "its group")
        try:
            status = bytearray(uapi.GROUP_STATUS.pack(uapi.GROUP_STATUS.size, 0))
            _ioctl(self.kernel, fd, uapi.VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
            _, flags = uapi.GROUP_STATUS.unpack(status)
            if not flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
                raise GroupNotViableError(bdf, group, self.host.group_offenders(group))
            container = bytearray(struct.pack("<i", self.fd))
            _ioctl(
                self.kernel,
                fd,
                uapi.VFIO_GROUP_SET_CONTAINER,
                container,
                "VFIO_GROUP_SET_CONTAINER",
                bdf,
            )
            if not self._iommu_set:
                # The model is chosen once a first group is in the container.
                _ioctl(
                    self.kernel,
                    self.fd,
                    uapi.VFIO_SET_IOMMU,
                    uapi.VFIO_TYPE1v2_IOMMU,
                    "VFIO_SET_IOMMU",
                    bdf,
                )
                self._iommu_set = True
        except BaseException:
            self.kernel.close(fd)
            raise
        self._groups[group] = fd
        return fd

    def open_device(self, bdf: str, group: int, sys_path: Path) -> int:
        group_fd = self._group_fd(group, bdf)
        name = bytearray(bdf.encode() + b"\0")
        try:
            return self.kernel.ioctl(group_fd, uapi.VFIO_GROUP_GET_DEVICE_FD, name)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceBusyError(bdf, "the device is already open (another VMM?)") from e
            raise VfioError("VFIO_GROUP_GET_DEVICE_FD", e.errno or errno.EIO, bdf) from e

    def iova_ranges(self) -> list[tuple[int, int]] | None:
        """The IOVA ranges (start, inclusive end) the IOMMU can map, or None if the kernel
        does not say."""
        buf = bytearray(_IOMMU_INFO_BUFFER)
        uapi.IOMMU_TYPE1_INFO.pack_into(buf, 0, len(buf), 0, 0, 0, 0)
        _ioctl(self.kernel, self.fd, uapi.VFIO_IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
        argsz, flags, _, cap_offset, _ = uapi.IOMMU_TYPE1_INFO.unpack_from(buf)
        if not flags & uapi.VFIO_IOMMU_INFO_CAPS or argsz > len(buf):
            return None
        for cap_id, at in walk_caps(buf, cap_offset):
            if cap_id != uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                continue
            count, _ = uapi.IOVA_RANGE_HEADER.unpack_from(buf, at + uapi.CAP_HEADER.size)
            first = at + uapi.CAP_HEADER.size + uapi.IOVA_RANGE_HEADER.size
            count = min(count, (len(buf) - first) // uapi.IOVA_RANGE.size)
            return [
                uapi.IOVA_RANGE.unpack_from(buf, first + i * uapi.IOVA_RANGE.size)
                for i in range(count)
            ]
        return None

    def map_memory(self, memory: GuestMemory) -> None:
        ranges = self.iova_ranges()
        for region in memory.regions:
            _check_iova(ranges, region.gpa, region.size)
            arg = bytearray(
                uapi.DMA_MAP.pack(
                    uapi.DMA_MAP.size,
                    uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE,
                    region.host_addr,
                    region.gpa,
                    region.size,
                )
            )
            try:
                self.kernel.ioctl(self.fd, uapi.VFIO_IOMMU_MAP_DMA, arg)
            except OSError as e:
                if e.errno == errno.ENOMEM:
                    raise PassthroughError(
                        "guest RAM", f"cannot pin it for device DMA: {_memlock_hint()}"
                    ) from e
                raise VfioError(
                    "VFIO_IOMMU_MAP_DMA", e.errno or errno.EIO, f"guest RAM at {region.gpa:#x}"
                ) from e
            self._mappings.append((region.gpa, region.size))
            log.info(
                "DMA map: IOVA [%#x, %#x) -> guest RAM (type1)",
                region.gpa,
                region.gpa + region.size,
            )

    def group_fds(self) -> dict[int, int]:
        return dict(self._groups)

    def close(self) -> None:
        for iova, size in reversed(self._mappings):
            arg = bytearray(uapi.DMA_UNMAP.pack(uapi.DMA_UNMAP.size, 0, iova, size))
            with contextlib.suppress(OSError):
                self.kernel.ioctl(self.fd, uapi.VFIO_IOMMU_UNMAP_DMA, arg)
        self._mappings.clear()
        for fd in self._groups.values():
            with contextlib.suppress(OSError):
                self.kernel.ioctl(fd, uapi.VFIO_GROUP_UNSET_CONTAINER, 0)
            with contextlib.suppress(OSError):
                self.kernel.close(fd)
        self._groups.clear()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.kernel.close(self.fd)
            self.fd = -1


class IommufdContext:
    """iommufd with the VFIO device cdev (see the module docstring).

    Simulator-tested only: the kernels at hand (Debian 12's 6.1) predate the VFIO cdev.
    """

    name = INTERFACE_IOMMUFD

    def __init__(self, kernel: VfioKernel, devfs: Path = DEVFS) -> None:
        self.kernel = kernel
        self.devfs = devfs
        self.fd = _open_node(kernel, str(devfs / "iommu"), "iommufd", "iommufd")
        self._devices: list[int] = []
        self._mappings: list[tuple[int, int]] = []
        try:
            arg = bytearray(uapi.IOAS_ALLOC.pack(uapi.IOAS_ALLOC.size, 0, 0))
            _ioctl(kernel, self.fd, uapi.IOMMU_IOAS_ALLOC, arg, "IOMMU_IOAS_ALLOC")
            self.ioas_id = uapi.IOAS_ALLOC.unpack(arg)[2]
        except BaseException:
            self.close()
            raise

    def open_device(self, bdf: str, group: int, sys_path: Path) -> int:
        cdev = vfio_cdev_name(sys_path)
        if cdev is None:
            raise PassthroughError(bdf, f"{sys_path}/vfio-dev has no vfioN cdev")
        fd = _open_node(self.kernel, str(self.devfs / "vfio" / "devices" / cdev), bdf, "it")
        try:
            bind = bytearray(uapi.BIND_IOMMUFD.pack(uapi.BIND_IOMMUFD.size, 0, self.fd, 0))
            _ioctl(
                self.kernel,
                fd,
                uapi.VFIO_DEVICE_BIND_IOMMUFD,
                bind,
                "VFIO_DEVICE_BIND_IOMMUFD",
                bdf,
            )
            attach = bytearray(
                uapi.ATTACH_IOMMUFD_PT.pack(uapi.ATTACH_IOMMUFD_PT.size, 0, self.ioas_id)
            )
            _ioctl(
                self.kernel,
                fd,
                uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                attach,
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                bdf,
            )
        except BaseException:
            self.kernel.close(fd)
            raise
        self._devices.append(fd)
        return fd

    def map_memory(self, memory: GuestMemory) -> None:
        flags = (
            uapi.IOMMU_IOAS_MAP_FIXED_IOVA
            | uapi.IOMMU_IOAS_MAP_READABLE
            | uapi.IOMMU_IOAS_MAP_WRITEABLE
        )
        for region in memory.regions:
            arg = bytearray(
                uapi.IOAS_MAP.pack(
                    uapi.IOAS_MAP.size,
                    flags,
                    self.ioas_id,
                    0,
                    region.host_addr,
                    region.size,
                    region.gpa,
                )
            )
            try:
                self.kernel.ioctl(self.fd, uapi.IOMMU_IOAS_MAP, arg)
            except OSError as e:
                if e.errno == errno.ENOMEM:
                    raise PassthroughError(
                        "guest RAM", f"cannot pin it for device DMA: {_memlock_hint()}"
                    ) from e
                raise VfioError(
                    "IOMMU_IOAS_MAP", e.errno or errno.EIO, f"guest RAM at {region.gpa:#x}"
                ) from e
            self._mappings.append((region.gpa, region.size))
            log.info(
                "DMA map: IOVA [%#x, %#x) -> guest RAM (iommufd IOAS %d)",
                region.gpa,
                region.gpa + region.size,
                self.ioas_id,
            )

    def group_fds(self) -> dict[int, int]:
        return {}

    def close(self) -> None:
        # Device fds are the devices' to close; the IOAS goes with the iommufd.
        for iova, size in reversed(self._mappings):
            arg = bytearray(uapi.IOAS_UNMAP.pack(uapi.IOAS_UNMAP.size, self.ioas_id, iova, size))
            with contextlib.suppress(OSError):
                self.kernel.ioctl(self.fd, uapi.IOMMU_IOAS_UNMAP, arg)
        self._mappings.clear()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self.kernel.close(self.fd)
            self.fd = -1


def walk_caps(buf: bytes | bytearray, first: int) -> list[tuple[int, int]]:
    """(capability id, offset) of a VFIO info capability chain starting at ``first``.

    Offsets come from the kernel; each is checked to lie inside the buffer, move forward
    and the chain is bounded, so a bad chain ends the walk instead of looping."""
    caps: list[tuple[int, int]] = []
    at = first
    while at and at + uapi.CAP_HEADER.size <= len(buf) and len(caps) < 64:
        cap_id, _, nxt = uapi.CAP_HEADER.unpack_from(buf, at)
        caps.append((cap_id, at))
        if nxt <= at:
            break
        at = nxt
    return caps


def _check_iova(ranges: list[tuple[int, int]] | None, gpa: int, size: int) -> None:
    if ranges is None:
        return
    last = gpa + size - 1
    if not any(start <= gpa and last <= end for start, end in ranges):
        raise PassthroughError(
            "guest RAM",
            f"[{gpa:#x}, {gpa + size:#x}) is not inside the host IOMMU's usable IOVA ranges "
            f"({', '.join(f'{s:#x}-{e:#x}' for s, e in ranges)}); use less vm.memory",
        )


def open_iommu_context(
    kernel: VfioKernel,
    preference: str = "auto",
    sysfs: Path = SYSFS,
    devfs: Path = DEVFS,
    host: HostPci | None = None,
) -> IommuContext:
    """The IOMMU interface to use: iommufd + cdev where the kernel has both (or when
    ``preference`` is "iommufd"), else the type1 container. Logs which one."""
    if preference not in ("auto", "iommufd", "type1"):
        raise ValueError(f"unknown IOMMU interface {preference!r}")
    use_iommufd = preference == "iommufd" or (
        preference == "auto" and iommufd_available(sysfs, devfs)
    )
    context: IommuContext = (
        IommufdContext(kernel, devfs) if use_iommufd else Type1Container(kernel, devfs, host)
    )
    log.info("VFIO: using %s", context.name)
    return context


def closing(close: Callable[[], None]) -> Callable[[], None]:
    """A closer that logs instead of raising (closers run while the VM is torn down)."""

    def run() -> None:
        try:
            close()
        except (OSError, VfioError):
            log.exception("VFIO clean-up failed")

    return run
