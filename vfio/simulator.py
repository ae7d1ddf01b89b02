"""A simulator of the kernel's VFIO interface, at the ioctl boundary, for unit tests.

This is a simulator, not a device: :class:`SimulatedVfioKernel` implements
:class:`~iovirt.vfio.kernel.VfioKernel` over :class:`SimulatedPciDevice` objects, answering
the container, group, iommufd and device ioctls the way ``<linux/vfio.h>`` documents them
(including the rules that matter to callers: a group must be viable and in a container
before the IOMMU model can be set, DMA maps need the model, only one IRQ index may be
enabled at a time, the MSI-X table cannot be written through the region). Config space is
a byte array with a writable mask, BARs are memfds (so ``pread`` and ``mmap`` see the same
bytes), and interrupts are raised by writing to whatever eventfds the caller handed over
with ``VFIO_DEVICE_SET_IRQS``. It records what callers did (config writes, DMA maps,
resets) for tests to check. The real kernel is exercised by the lab tier.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from iovirt.vfio import uapi

REGION_SHIFT = 40  # vfio-pci puts region N at device-fd offset N << 40
_REGION_MASK = (1 << REGION_SHIFT) - 1
PAGE = mmap.PAGESIZE


@dataclass
class SimulatedBar:
    """One BAR of a simulated device."""

    size: int
    kind: str = "mem32"  # "mem32", "mem64" or "io"
    prefetchable: bool = False
    mmap: bool = True
    sparse: list[tuple[int, int]] | None = None  # sparse mmap areas, None: whole BAR


@dataclass
class SimulatedMsix:
    table_size: int
    bar: int
    table_offset: int
    pba_offset: int
    pba_bar: int | None = None
    mappable: bool = False  # VFIO_REGION_INFO_CAP_MSIX_MAPPABLE


@dataclass
class SimulatedMsi:
    vectors: int = 1  # a power of two, 1-32
    is_64bit: bool = True
    per_vector_mask: bool = False


@dataclass
class _IrqState:
    triggers: list[int] = field(default_factory=list)  # eventfd per vector (-1: none)
    unmask: int = -1


class SimulatedPciDevice:
    """A PCI function as VFIO would show it: config space, BARs and IRQ indexes."""

    def __init__(
        self,
        bdf: str = "0000:00:04.0",
        *,
        vendor: int = 0x1B36,
        device: int = 0x0010,
        class_code: int = 0x010802,
        revision: int = 2,
        subsystem: tuple[int, int] = (0x1AF4, 0x1100),
        group: int = 5,
        bars: dict[int, SimulatedBar] | None = None,
        msix: SimulatedMsix | None = None,
        msi: SimulatedMsi | None = None,
        intx_pin: int = 1,
        reset: bool = True,
        multifunction: bool = False,
        extra_caps: list[tuple[int, bytes]] | None = None,
    ) -> None:
        self.bdf = bdf
        self.group = group
        self.bars = dict(bars or {})
        self.msix = msix
        self.msi = msi
        self.intx_pin = intx_pin
        self.can_reset = reset
        self.resets = 0
        self.hot_resets = 0
        self.hot_reset_groups: list[int] | None = None  # what GET_PCI_HOT_RESET_INFO lists
        self.config = bytearray(256)
        self.writable = bytearray(256)
        self.config_writes: list[tuple[int, bytes]] = []
        self.table_writes: list[tuple[int, int, bytes]] = []  # (bar, offset, data) refused
        self.irqs: dict[int, _IrqState] = {}
        self.opened = False
        c = self.config
        struct.pack_into("<HH", c, 0, vendor, device)
        struct.pack_into("<I", c, 8, revision | class_code << 8)
        c[0x0E] = 0x80 if multifunction else 0
        struct.pack_into("<HH", c, 0x2C, *subsystem)
        c[0x3D] = intx_pin
        c[0x3C] = 0x0B  # what host firmware routed; the guest must not see it
        self.writable[0x04] = 0x07
        self.writable[0x05] = 0x04
        self.writable[0x0C] = 0xFF  # cache line size
        self.writable[0x0D] = 0xFF  # latency timer
        for index, bar in self.bars.items():
            low = {"io": 0x1, "mem32": 0x0, "mem64": 0x4}[bar.kind]
            if bar.prefetchable:
                low |= 0x8
            c[0x10 + 4 * index] = low
        # Capabilities from 0x40: MSI, MSI-X, then the extra ones.
        caps: list[tuple[int, bytes]] = []
        if msi is not None:
            control = (msi.vectors.bit_length() - 1) << 1
            control |= 0x80 if msi.is_64bit else 0
            control |= 0x100 if msi.per_vector_mask else 0
            length = (12 if msi.is_64bit else 8) + (12 if msi.per_vector_mask else 4)
            msi_body = bytearray(length - 2)
            struct.pack_into("<H", msi_body, 0, control)
            caps.append((0x05, bytes(msi_body)))
        if msix is not None:
            pba_bar = msix.bar if msix.pba_bar is None else msix.pba_bar
            msix_body = struct.pack(
                "<HII",
                msix.table_size - 1,
                msix.table_offset | msix.bar,
                msix.pba_offset | pba_bar,
            )
            caps.append((0x11, msix_body))
        caps.extend(extra_caps or [])
        at = 0x40
        previous = 0x34
        self.cap_offsets: dict[int, int] = {}
        for cap_id, body in caps:
            c[previous] = at
            c[at] = cap_id
            c[at + 2 : at + 2 + len(body)] = body
            self.cap_offsets.setdefault(cap_id, at)
            previous = at + 1
            at = (at + 2 + len(body) + 3) & ~3
        if caps:
            struct.pack_into("<H", c, 0x06, 0x0010)  # STATUS: capability list
        # Extra (non-MSI) capability bodies are writable: vfio-pci passes them through.
        for cap_id, offset in self.cap_offsets.items():
            if cap_id not in (0x05, 0x11):
                self.writable[offset + 2 : offset + 16] = b"\xff" * 14
        self.memory: dict[int, mmap.mmap] = {}
        self._memfds: dict[int, int] = {}
        for index, bar in self.bars.items():
            if bar.kind == "io":
                self.memory[index] = mmap.mmap(-1, max(bar.size, PAGE))
                continue
            fd = os.memfd_create(f"sim-bar{index}", os.MFD_CLOEXEC)
            os.ftruncate(fd, max(bar.size, PAGE))
            self._memfds[index] = fd
            self.memory[index] = mmap.mmap(fd, max(bar.size, PAGE))

    # -- what the tests drive -----------------------------------------------------------

    def fire(self, index: int, vector: int = 0) -> bool:
        """The device raises interrupt ``vector`` of IRQ index ``index``: vfio-pci writes
        the eventfd bound to it. False if none is bound (the interrupt is lost)."""
        state = self.irqs.get(index)
        if state is None or vector >= len(state.triggers) or state.triggers[vector] < 0:
            return False
        os.eventfd_write(state.triggers[vector], 1)
        return True

    def enabled_index(self) -> int | None:
        for index, state in self.irqs.items():
            if any(fd >= 0 for fd in state.triggers):
                return index
        return None

    def bar_bytes(self, index: int, offset: int, length: int) -> bytes:
        return bytes(self.memory[index][offset : offset + length])

    def close(self) -> None:
        for m in self.memory.values():
            m.close()
        for fd in self._memfds.values():
            os.close(fd)
        self.memory.clear()
        self._memfds.clear()

    # -- regions as vfio-pci offers them ------------------------------------------------

    def region(self, index: int) -> tuple[int, int, list[tuple[int, int]] | None, bool]:
        """(flags, size, sparse areas, msix mappable) of region ``index``."""
        rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            return rw, 256, None, False
        bar = self.bars.get(index)
        if bar is None:
            return 0, 0, None, False
        flags = rw
        sparse = bar.sparse
        mappable = False
        if bar.mmap and bar.kind != "io":
            flags |= uapi.VFIO_REGION_INFO_FLAG_MMAP
            msix = self.msix
            if msix is not None and index in (msix.bar, self._pba_bar()):
                if msix.mappable:
                    mappable = True
                elif sparse is None:
                    # Like Linux before MSI-X mmap: everything but the table's pages.
                    start = msix.table_offset & ~(PAGE - 1)
                    end = (msix.table_offset + 16 * msix.table_size + PAGE - 1) & ~(PAGE - 1)
                    sparse = [(o, s) for o, s in ((0, start), (end, bar.size - end)) if s > 0]
        return flags, bar.size, sparse, mappable

    def _pba_bar(self) -> int | None:
        if self.msix is None:
            return None
        return self.msix.bar if self.msix.pba_bar is None else self.msix.pba_bar

    def _in_table(self, index: int, offset: int, length: int) -> bool:
        msix = self.msix
        if msix is None or index != msix.bar:
            return False
        return offset < msix.table_offset + 16 * msix.table_size and msix.table_offset < (
            offset + length
        )

    def read(self, index: int, offset: int, length: int) -> bytes:
        flags, size, _, _ = self.region(index)
        if not flags & uapi.VFIO_REGION_INFO_FLAG_READ or offset + length > size:
            raise OSError(errno.EINVAL, "outside the region")
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            return bytes(self.config[offset : offset + length])
        if self._in_table(index, offset, length):
            return b"\xff" * length  # vfio-pci hides the real table
        return bytes(self.memory[index][offset : offset + length])

    def write(self, index: int, offset: int, data: bytes) -> int:
        flags, size, _, _ = self.region(index)
        if not flags & uapi.VFIO_REGION_INFO_FLAG_WRITE or offset + len(data) > size:
            raise OSError(errno.EINVAL, "outside the region")
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            self.config_writes.append((offset, bytes(data)))
            for i, byte in enumerate(data):
                mask = self.writable[offset + i]
                old = self.config[offset + i]
                self.config[offset + i] = (old & ~mask) | (byte & mask)
            return len(data)
        if self._in_table(index, offset, len(data)):
            self.table_writes.append((index, offset, bytes(data)))
            return len(data)  # dropped, as vfio-pci does
        self.memory[index][offset : offset + len(data)] = data
        return len(data)

    def mmap(self, index: int, offset: int, length: int) -> mmap.mmap:
        flags, size, sparse, _ = self.region(index)
        if not flags & uapi.VFIO_REGION_INFO_FLAG_MMAP or offset % PAGE or offset + length > size:
            raise OSError(errno.EINVAL, "not mmappable there")
        if sparse is not None and not any(
            o <= offset and offset + length <= o + s for o, s in sparse
        ):
            raise OSError(errno.EINVAL, "outside the sparse mmap areas")
        return mmap.mmap(self._memfds[index], length, offset=offset)

    def irq_info(self, index: int) -> tuple[int, int]:
        if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
            if not self.intx_pin:
                return 0, 0
            flags = (
                uapi.VFIO_IRQ_INFO_EVENTFD
                | uapi.VFIO_IRQ_INFO_MASKABLE
                | uapi.VFIO_IRQ_INFO_AUTOMASKED
            )
            return flags, 1
        if index == uapi.VFIO_PCI_MSI_IRQ_INDEX and self.msi is not None:
            return uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE, self.msi.vectors
        if index == uapi.VFIO_PCI_MSIX_IRQ_INDEX and self.msix is not None:
            return uapi.VFIO_IRQ_INFO_EVENTFD | uapi.VFIO_IRQ_INFO_NORESIZE, self.msix.table_size
        return uapi.VFIO_IRQ_INFO_EVENTFD, 0

    def set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        _, available = self.irq_info(index)
        action = flags & (
            uapi.VFIO_IRQ_SET_ACTION_TRIGGER
            | uapi.VFIO_IRQ_SET_ACTION_UNMASK
            | uapi.VFIO_IRQ_SET_ACTION_MASK
        )
        if flags & uapi.VFIO_IRQ_SET_DATA_NONE and count == 0:
            if action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
                self.irqs.pop(index, None)  # disable the whole index
            return 0
        if start + count > available:
            raise OSError(errno.EINVAL, "more vectors than the device has")
        if not flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            raise OSError(errno.EINVAL, "only eventfd data is simulated")
        fds = list(struct.unpack_from(f"<{count}i", data))
        if action == uapi.VFIO_IRQ_SET_ACTION_UNMASK:
            if index not in self.irqs:
                raise OSError(errno.EINVAL, "unmask eventfd before a trigger")
            self.irqs[index].unmask = fds[0]
            return 0
        current = self.enabled_index()
        if current is not None and current != index:
            raise OSError(errno.EINVAL, f"IRQ index {current} is enabled")
        state = self.irqs.setdefault(index, _IrqState())
        if len(state.triggers) < start + count:
            state.triggers.extend([-1] * (start + count - len(state.triggers)))
        state.triggers[start : start + count] = fds
        return 0


@dataclass
class _Node:
    kind: str  # "container", "group", "device", "iommufd", "cdev"
    target: object = None  # group number, device, ...
    group_fd_container: int | None = None


class SimulatedVfioKernel:
    """A :class:`~iovirt.vfio.kernel.VfioKernel` over simulated devices (see the module
    docstring). ``viable`` maps group numbers to their VIABLE flag (default: viable);
    ``denied`` and ``busy`` are node paths whose open fails with EACCES / EBUSY."""

    def __init__(
        self,
        *devices: SimulatedPciDevice,
        devfs: str = "/dev",
        iommufd: bool = False,
        viable: dict[int, bool] | None = None,
        denied: tuple[str, ...] = (),
        busy: tuple[str, ...] = (),
        iova_ranges: list[tuple[int, int]] | None = None,
        map_errno: int | None = None,
    ) -> None:
        self.devices = {d.bdf: d for d in devices}
        self.devfs = devfs
        self.iommufd = iommufd
        self.viable = viable or {}
        self.denied = set(denied)
        self.busy = set(busy)
        self.iova_ranges = iova_ranges
        self.map_errno = map_errno
        self.fds: dict[int, _Node] = {}
        self._next_fd = itertools.count(10_000)  # fake numbers, far from real fds
        self.calls: list[str] = []
        self.dma_maps: list[tuple[int, int, int]] = []  # (iova, vaddr, size)
        self.dma_unmaps: list[tuple[int, int]] = []
        self.iommu_set = False
        self.groups_in_container: set[int] = set()
        self.ioas: int | None = None
        self.bound: set[str] = set()  # cdev devices bound to the iommufd
        self.attached: set[str] = set()

    def _new_fd(self, node: _Node) -> int:
        fd = next(self._next_fd)
        self.fds[fd] = node
        return fd

    def _node(self, fd: int) -> _Node:
        node = self.fds.get(fd)
        if node is None:
            raise OSError(errno.EBADF, "bad file descriptor")
        return node

    def cdev_name(self, device: SimulatedPciDevice) -> str:
        return f"vfio{sorted(self.devices).index(device.bdf)}"

    # -- VfioKernel ---------------------------------------------------------------------

    def _resolve(self, path: str) -> _Node:
        vfio = f"{self.devfs}/vfio/"
        if path == f"{vfio}vfio":
            return _Node("container")
        if path == f"{self.devfs}/iommu" and self.iommufd:
            return _Node("iommufd")
        if path.startswith(f"{vfio}devices/") and self.iommufd:
            for device in self.devices.values():
                if path == f"{vfio}devices/{self.cdev_name(device)}":
                    return _Node("cdev", device)
        if path.startswith(vfio) and path[len(vfio) :].isdigit():
            group = int(path[len(vfio) :])
            if any(d.group == group for d in self.devices.values()):
                return _Node("group", group)
        raise FileNotFoundError(errno.ENOENT, "no such file", path)

    def open(self, path: str) -> int:
        self.calls.append(f"open {path}")
        if path in self.denied:
            raise PermissionError(errno.EACCES, "permission denied", path)
        if path in self.busy:
            raise OSError(errno.EBUSY, "device or resource busy", path)
        return self._new_fd(self._resolve(path))

    def close(self, fd: int) -> None:
        node = self.fds.pop(fd, None)
        if node is None:
            raise OSError(errno.EBADF, "bad file descriptor")
        if node.kind in ("device", "cdev") and isinstance(node.target, SimulatedPciDevice):
            node.target.opened = False
            # Closing a device fd disables its interrupts, as vfio-pci does.
            node.target.irqs.clear()

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        device = self._device(fd)
        return device.read(offset >> REGION_SHIFT, offset & _REGION_MASK, length)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        device = self._device(fd)
        return device.write(offset >> REGION_SHIFT, offset & _REGION_MASK, bytes(data))

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        device = self._device(fd)
        return device.mmap(offset >> REGION_SHIFT, offset & _REGION_MASK, length)

    def _device(self, fd: int) -> SimulatedPciDevice:
        node = self._node(fd)
        if node.kind not in ("device", "cdev") or not isinstance(node.target, SimulatedPciDevice):
            raise OSError(errno.EINVAL, "not a device fd")
        if node.kind == "cdev" and node.target.bdf not in self.attached:
            raise OSError(errno.EINVAL, "cdev not bound and attached")
        return node.target

    def ioctl(self, fd: int, request: int, arg: bytearray | int = 0) -> int:
        node = self._node(fd)
        name = _NAMES.get((node.kind, request), f"{request:#x}")
        self.calls.append(name)
        kind = node.kind
        if kind == "cdev" and name not in (
            "VFIO_DEVICE_BIND_IOMMUFD",
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        ):
            # A cdev answers the device ioctls once it is bound and attached.
            assert isinstance(node.target, SimulatedPciDevice)
            if node.target.bdf not in self.attached:
                raise OSError(errno.EINVAL, "cdev not bound and attached")
            kind = "device"
        handler = getattr(self, f"_{kind}_{name}", None)
        if handler is None:
            raise OSError(errno.ENOTTY, f"{name} on a {node.kind} fd")
        result: int = handler(node, arg)
        return result

    # -- container ----------------------------------------------------------------------

    def _container_VFIO_GET_API_VERSION(self, node: _Node, arg: object) -> int:
        return uapi.VFIO_API_VERSION

    def _container_VFIO_CHECK_EXTENSION(self, node: _Node, arg: object) -> int:
        return 1 if arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) else 0

    def _container_VFIO_SET_IOMMU(self, node: _Node, arg: object) -> int:
        if not self.groups_in_container:
            raise OSError(errno.EINVAL, "no group in the container")
        if arg != uapi.VFIO_TYPE1v2_IOMMU:
            raise OSError(errno.EINVAL, "unsupported model")
        self.iommu_set = True
        return 0

    def _container_VFIO_IOMMU_GET_INFO(self, node: _Node, arg: bytearray) -> int:
        if not self.iommu_set:
            raise OSError(errno.EINVAL, "no IOMMU model")
        if self.iova_ranges is None:
            uapi.IOMMU_TYPE1_INFO.pack_into(arg, 0, uapi.IOMMU_TYPE1_INFO.size, 1, 0x1000, 0, 0)
            return 0
        cap_at = uapi.IOMMU_TYPE1_INFO.size
        needed = (
            cap_at
            + uapi.CAP_HEADER.size
            + uapi.IOVA_RANGE_HEADER.size
            + uapi.IOVA_RANGE.size * len(self.iova_ranges)
        )
        flags = uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
        uapi.IOMMU_TYPE1_INFO.pack_into(arg, 0, needed, flags, 0x1000, cap_at, 0)
        if len(arg) >= needed:
            uapi.CAP_HEADER.pack_into(arg, cap_at, uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0)
            at = cap_at + uapi.CAP_HEADER.size
            uapi.IOVA_RANGE_HEADER.pack_into(arg, at, len(self.iova_ranges), 0)
            at += uapi.IOVA_RANGE_HEADER.size
            for start, end in self.iova_ranges:
                uapi.IOVA_RANGE.pack_into(arg, at, start, end)
                at += uapi.IOVA_RANGE.size
        return 0

    def _container_VFIO_IOMMU_MAP_DMA(self, node: _Node, arg: bytearray) -> int:
        if not self.iommu_set:
            raise OSError(errno.EINVAL, "no IOMMU model set")
        if self.map_errno is not None:
            raise OSError(self.map_errno, os.strerror(self.map_errno))
        _, flags, vaddr, iova, size = uapi.DMA_MAP.unpack(arg)
        if flags != uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE:
            raise OSError(errno.EINVAL, "unexpected map flags")
        if any(i < iova + size and iova < i + s for i, _, s in self.dma_maps):
            raise OSError(errno.EEXIST, "IOVA range already mapped")
        self.dma_maps.append((iova, vaddr, size))
        return 0

    def _container_VFIO_IOMMU_UNMAP_DMA(self, node: _Node, arg: bytearray) -> int:
        _, _, iova, size = uapi.DMA_UNMAP.unpack(arg)
        self.dma_unmaps.append((iova, size))
        self.dma_maps = [m for m in self.dma_maps if (m[0], m[2]) != (iova, size)]
        return 0

    # -- group --------------------------------------------------------------------------

    def _group_VFIO_GROUP_GET_STATUS(self, node: _Node, arg: bytearray) -> int:
        group = node.target
        assert isinstance(group, int)
        flags = uapi.VFIO_GROUP_FLAGS_VIABLE if self.viable.get(group, True) else 0
        if group in self.groups_in_container:
            flags |= uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
        uapi.GROUP_STATUS.pack_into(arg, 0, uapi.GROUP_STATUS.size, flags)
        return 0

    def _group_VFIO_GROUP_SET_CONTAINER(self, node: _Node, arg: bytearray) -> int:
        group = node.target
        assert isinstance(group, int)
        if not self.viable.get(group, True):
            raise OSError(errno.EPERM, "group not viable")
        (container,) = struct.unpack("<i", bytes(arg[:4]))
        if self._node(container).kind != "container":
            raise OSError(errno.EBADF, "not a container")
        self.groups_in_container.add(group)
        return 0

    def _group_VFIO_GROUP_UNSET_CONTAINER(self, node: _Node, arg: object) -> int:
        assert isinstance(node.target, int)
        self.groups_in_container.discard(node.target)
        return 0

    def _group_VFIO_GROUP_GET_DEVICE_FD(self, node: _Node, arg: bytearray) -> int:
        group = node.target
        if group not in self.groups_in_container or not self.iommu_set:
            raise OSError(errno.EINVAL, "group not in a container with an IOMMU model")
        name = bytes(arg).split(b"\0", 1)[0].decode()
        device = self.devices.get(name)
        if device is None or device.group != group:
            raise OSError(errno.ENODEV, "no such device in the group")
        if device.opened:
            raise OSError(errno.EBUSY, "device already open")
        device.opened = True
        return self._new_fd(_Node("device", device))

    # -- iommufd and the device cdev ------------------------------------------------------

    def _iommufd_IOMMU_IOAS_ALLOC(self, node: _Node, arg: bytearray) -> int:
        self.ioas = 1
        uapi.IOAS_ALLOC.pack_into(arg, 0, uapi.IOAS_ALLOC.size, 0, self.ioas)
        return 0

    def _iommufd_IOMMU_IOAS_MAP(self, node: _Node, arg: bytearray) -> int:
        _, flags, ioas, _, user_va, length, iova = uapi.IOAS_MAP.unpack(arg)
        if ioas != self.ioas or not flags & uapi.IOMMU_IOAS_MAP_FIXED_IOVA:
            raise OSError(errno.EINVAL, "bad IOAS map")
        if self.map_errno is not None:
            raise OSError(self.map_errno, os.strerror(self.map_errno))
        self.dma_maps.append((iova, user_va, length))
        return 0

    def _iommufd_IOMMU_IOAS_UNMAP(self, node: _Node, arg: bytearray) -> int:
        _, _, iova, length = uapi.IOAS_UNMAP.unpack(arg)
        self.dma_unmaps.append((iova, length))
        return 0

    def _cdev_VFIO_DEVICE_BIND_IOMMUFD(self, node: _Node, arg: bytearray) -> int:
        _, _, iommufd, _ = uapi.BIND_IOMMUFD.unpack(arg)
        if self._node(iommufd).kind != "iommufd":
            raise OSError(errno.EBADF, "not an iommufd")
        assert isinstance(node.target, SimulatedPciDevice)
        self.bound.add(node.target.bdf)
        uapi.BIND_IOMMUFD.pack_into(arg, 0, uapi.BIND_IOMMUFD.size, 0, iommufd, 7)
        return 0

    def _cdev_VFIO_DEVICE_ATTACH_IOMMUFD_PT(self, node: _Node, arg: bytearray) -> int:
        assert isinstance(node.target, SimulatedPciDevice)
        _, _, pt_id = uapi.ATTACH_IOMMUFD_PT.unpack(arg)
        if node.target.bdf not in self.bound or pt_id != self.ioas:
            raise OSError(errno.EINVAL, "bind first, then attach to the IOAS")
        self.attached.add(node.target.bdf)
        return 0

    # -- device (the same ioctls on a group-opened fd and on a cdev) ---------------------

    def _device_VFIO_DEVICE_GET_INFO(self, node: _Node, arg: bytearray) -> int:
        device = node.target
        assert isinstance(device, SimulatedPciDevice)
        flags = uapi.VFIO_DEVICE_FLAGS_PCI | (
            uapi.VFIO_DEVICE_FLAGS_RESET if device.can_reset else 0
        )
        uapi.DEVICE_INFO.pack_into(
            arg, 0, uapi.DEVICE_INFO.size, flags, uapi.VFIO_PCI_NUM_REGIONS, 5, 0, 0
        )
        return 0

    def _device_VFIO_DEVICE_GET_REGION_INFO(self, node: _Node, arg: bytearray) -> int:
        device = node.target
        assert isinstance(device, SimulatedPciDevice)
        argsz, _, index, _, _, _ = uapi.REGION_INFO.unpack_from(arg)
        if index >= uapi.VFIO_PCI_NUM_REGIONS:
            raise OSError(errno.EINVAL, "no such region")
        flags, size, sparse, mappable = device.region(index)
        caps = bytearray()
        base = uapi.REGION_INFO.size
        if sparse is not None:
            nxt = base + uapi.CAP_HEADER.size + uapi.SPARSE_MMAP_HEADER.size
            nxt += uapi.SPARSE_MMAP_AREA.size * len(sparse)
            caps += uapi.CAP_HEADER.pack(
                uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, nxt if mappable else 0
            )
            caps += uapi.SPARSE_MMAP_HEADER.pack(len(sparse), 0)
            for offset, length in sparse:
                caps += uapi.SPARSE_MMAP_AREA.pack(offset, length)
        if mappable:
            caps += uapi.CAP_HEADER.pack(uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)
        needed = base + len(caps)
        if caps:
            flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
        cap_offset = base if caps and argsz >= needed else 0
        uapi.REGION_INFO.pack_into(
            arg, 0, needed, flags, index, cap_offset, size, index << REGION_SHIFT
        )
        if cap_offset:
            arg[base:needed] = caps
        return 0

    def _device_VFIO_DEVICE_GET_IRQ_INFO(self, node: _Node, arg: bytearray) -> int:
        device = node.target
        assert isinstance(device, SimulatedPciDevice)
        _, _, index, _ = uapi.IRQ_INFO.unpack(arg)
        if index > uapi.VFIO_PCI_REQ_IRQ_INDEX:
            raise OSError(errno.EINVAL, "no such IRQ index")
        flags, count = device.irq_info(index)
        uapi.IRQ_INFO.pack_into(arg, 0, uapi.IRQ_INFO.size, flags, index, count)
        return 0

    def _device_VFIO_DEVICE_SET_IRQS(self, node: _Node, arg: bytearray) -> int:
        device = node.target
        assert isinstance(device, SimulatedPciDevice)
        _, flags, index, start, count = uapi.IRQ_SET.unpack_from(arg)
        return device.set_irqs(flags, index, start, count, bytes(arg[uapi.IRQ_SET.size :]))

    def _device_VFIO_DEVICE_RESET(self, node: _Node, arg: object) -> int:
        device = node.target
        assert isinstance(device, SimulatedPciDevice)
        if not device.can_reset:
            raise OSError(errno.EINVAL, "no reset")
        device.resets += 1
        return 0

    def _device_VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(self, node: _Node, arg: bytearray) -> int:
        device = node.target
        assert isinstance(device, SimulatedPciDevice)
        if device.hot_reset_groups is None:
            raise OSError(errno.ENODEV, "no bus reset")
        groups = device.hot_reset_groups
        uapi.HOT_RESET_INFO.pack_into(arg, 0, len(arg), 0, len(groups))
        at = uapi.HOT_RESET_INFO.size
        for group in groups:
            uapi.HOT_RESET_DEVICE.pack_into(arg, at, group, 0, 0, 0)
            at += uapi.HOT_RESET_DEVICE.size
        return 0

    def _device_VFIO_DEVICE_PCI_HOT_RESET(self, node: _Node, arg: bytearray) -> int:
        device = node.target
        assert isinstance(device, SimulatedPciDevice)
        _, _, count = uapi.HOT_RESET.unpack_from(arg)
        fds = struct.unpack_from(f"<{count}i", arg, uapi.HOT_RESET.size)
        groups = {self._node(fd).target for fd in fds}
        if device.hot_reset_groups is None or not set(device.hot_reset_groups) <= groups:
            raise OSError(errno.EPERM, "not every affected group was given")
        device.hot_resets += 1
        return 0


_NAMES: dict[tuple[str, int], str] = {}
for _kind, _names in {
    "container": (
        "VFIO_GET_API_VERSION",
        "VFIO_CHECK_EXTENSION",
        "VFIO_SET_IOMMU",
        "VFIO_IOMMU_GET_INFO",
        "VFIO_IOMMU_MAP_DMA",
        "VFIO_IOMMU_UNMAP_DMA",
    ),
    "group": (
        "VFIO_GROUP_GET_STATUS",
        "VFIO_GROUP_SET_CONTAINER",
        "VFIO_GROUP_UNSET_CONTAINER",
        "VFIO_GROUP_GET_DEVICE_FD",
    ),
    "iommufd": ("IOMMU_IOAS_ALLOC", "IOMMU_IOAS_MAP", "IOMMU_IOAS_UNMAP", "IOMMU_DESTROY"),
    "device": (
        "VFIO_DEVICE_GET_INFO",
        "VFIO_DEVICE_GET_REGION_INFO",
        "VFIO_DEVICE_GET_IRQ_INFO",
        "VFIO_DEVICE_SET_IRQS",
        "VFIO_DEVICE_RESET",
        "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
        "VFIO_DEVICE_PCI_HOT_RESET",
    ),
}.items():
    for _name in _names:
        _NAMES[(_kind, getattr(uapi, _name))] = _name
for _name in (
    "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    "VFIO_DEVICE_GET_INFO",
    "VFIO_DEVICE_GET_REGION_INFO",
    "VFIO_DEVICE_GET_IRQ_INFO",
    "VFIO_DEVICE_SET_IRQS",
    "VFIO_DEVICE_RESET",
):
    _NAMES[("cdev", getattr(uapi, _name))] = _name


class RecordingIrqfd:
    """A :class:`~iovirt.vfio.interrupts.LevelIrqfd` that records its routes:
    ``routes[trigger_fd] = (resample_fd, gsi)``."""

    def __init__(self) -> None:
        self.routes: dict[int, tuple[int, int]] = {}

    def add_level_irqfd(self, trigger_fd: int, resample_fd: int, gsi: int) -> None:
        self.routes[trigger_fd] = (resample_fd, gsi)

    def remove_level_irqfd(self, trigger_fd: int, gsi: int) -> None:
        del self.routes[trigger_fd]


class PassthroughRig:
    """A simulated device opened the way the board opens a real one (type1 container,
    reset, :class:`~iovirt.vfio.device.VfioPciDevice`) and put in slot 3 of a PCI root with
    its own buses, over 1 MiB of guest RAM and the transport simulator's platform. INTx pin
    p is routed to GSI 16 + p; the routes land in :attr:`irqfd`."""

    def __init__(self, sim: SimulatedPciDevice, sysfs: Path) -> None:
        from iovirt.bus.bus import Bus
        from iovirt.bus.pci import PciRoot
        from iovirt.memory import GuestMemory
        from iovirt.testing.platform import SimulatedPlatform
        from iovirt.vfio.container import Type1Container
        from iovirt.vfio.device import VfioPciDevice
        from iovirt.vfio.host import HostPci

        self.sim = sim
        self.kernel = SimulatedVfioKernel(sim)
        self.memory = GuestMemory([(0, 1 << 20)])
        self.platform = SimulatedPlatform(self.memory)
        self.irqfd = RecordingIrqfd()
        self.container = Type1Container(self.kernel, host=HostPci(sysfs=sysfs))
        fd = self.container.open_device(sim.bdf, sim.group, sysfs)
        self.device = VfioPciDevice(
            self.kernel,
            fd,
            self.platform,
            name="vfio test",
            intx_router=self.irqfd,
            intx_gsi=lambda pin: 16 + pin,
            group_fds=self.container.group_fds,
        )
        self.mmio = Bus("mmio", 1 << 48)
        self.pio = Bus("pio", 1 << 16)
        self.root = PciRoot(self.mmio, self.pio)
        self.root.add(self.device, 3)

    def close(self) -> None:
        self.device.close()
        self.container.close()
        self.sim.close()
        self.memory.close()


class FakeHostTree:
    """A fake ``/sys``, ``/proc`` and ``/dev`` under ``root`` with the layout the kernel
    uses for PCI functions, drivers, IOMMU groups, block and net devices; for
    :class:`~iovirt.vfio.host.HostPci` in tests. Nothing in it acts like a kernel: writing
    ``drivers_probe`` binds nothing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sysfs = root / "sys"
        self.procfs = root / "proc"
        self.devfs = root / "dev"
        for folder in (
            self.sysfs / "bus" / "pci" / "devices",
            self.sysfs / "kernel" / "iommu_groups",
            self.sysfs / "class" / "block",
            self.sysfs / "class" / "net",
            self.procfs / "self",
            self.procfs / "net",
            self.devfs / "vfio",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        (self.sysfs / "bus" / "pci" / "drivers_probe").write_text("")
        (self.procfs / "self" / "mountinfo").write_text("")
        (self.procfs / "swaps").write_text("Filename Type Size Used Priority\n")
        (self.procfs / "net" / "route").write_text("Iface Destination Gateway Flags\n")
        (self.procfs / "net" / "ipv6_route").write_text("")

    def add_driver(self, name: str) -> Path:
        folder = self.sysfs / "bus" / "pci" / "drivers" / name
        folder.mkdir(parents=True, exist_ok=True)
        for attr in ("bind", "unbind"):
            (folder / attr).touch()
        return folder

    def add_device(
        self,
        bdf: str,
        *,
        vendor: int = 0x1B36,
        device: int = 0x0010,
        class_code: int = 0x010802,
        driver: str | None = None,
        group: int | None = None,
    ) -> Path:
        path = self.sysfs / "devices" / "pci0000:00" / bdf
        path.mkdir(parents=True)
        (path / "vendor").write_text(f"{vendor:#06x}\n")
        (path / "device").write_text(f"{device:#06x}\n")
        (path / "class").write_text(f"{class_code:#08x}\n")
        (path / "driver_override").write_text("(null)\n")
        (self.sysfs / "bus" / "pci" / "devices" / bdf).symlink_to(path)
        if driver is not None:
            (path / "driver").symlink_to(self.add_driver(driver))
        if group is not None:
            members = self.sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
            members.mkdir(parents=True, exist_ok=True)
            (members / bdf).symlink_to(path)
            (path / "iommu_group").symlink_to(members.parent)
            (self.devfs / "vfio" / "vfio").touch()
            (self.devfs / "vfio" / str(group)).touch()
        return path

    def add_class_device(self, parent: Path, kind: str, name: str, dev: str = "") -> Path:
        """A block or net class device below ``parent`` (``dev`` is block major:minor)."""
        path = parent / kind / name if kind == "net" else parent / name
        path.mkdir(parents=True)
        (path / "subsystem").symlink_to(self.sysfs / "class" / kind)
        if kind == "block":
            (path / "dev").write_text(dev + "\n")
            (path / "holders").mkdir()
        return path

    def mount(self, devnum: str, where: str) -> None:
        with (self.procfs / "self" / "mountinfo").open("a") as f:
            f.write(f"30 1 {devnum} / {where} rw,relatime shared:1 - ext4 /dev/x rw\n")

    def swap(self, name: str) -> None:
        with (self.procfs / "swaps").open("a") as f:
            f.write(f"/dev/{name} partition 1048572 0 -2\n")

    def default_route(self, iface: str, ipv6: bool = False) -> None:
        if ipv6:
            with (self.procfs / "net" / "ipv6_route").open("a") as f:
                f.write(f"{'0' * 32} 00 {'0' * 32} 00 {'0' * 32} 00000400 1 0 00000003 {iface}\n")
        else:
            with (self.procfs / "net" / "route").open("a") as f:
                f.write(f"{iface}\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
