"""The kernel's VFIO and iommufd user API: ioctl numbers, flags and struct layouts.

Numbers and layouts come from ``<linux/vfio.h>`` and ``<linux/iommufd.h>``. Every VFIO and
iommufd ioctl is ``_IO(';', nr)`` (no size or direction bits: the structs carry their own
``argsz``/``size`` first), so a request number is just ``0x3B00 | nr``. Structs are packed
and unpacked with :mod:`struct` formats named after the C struct; all little-endian, with
the explicit padding the kernel's ``__aligned_u64`` members imply.
"""

from __future__ import annotations

import struct

VFIO_TYPE = ord(";")
VFIO_BASE = 100
IOMMUFD_CMD_BASE = 0x80


def _io(nr: int) -> int:
    """``_IO(';', nr)``: direction and size bits are zero for every VFIO/iommufd ioctl."""
    return (VFIO_TYPE << 8) | nr


VFIO_API_VERSION = 0

# Extensions (VFIO_CHECK_EXTENSION) and IOMMU models (VFIO_SET_IOMMU).
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

# -- /dev/vfio/vfio (the container) -------------------------------------------------------
VFIO_GET_API_VERSION = _io(VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_BASE + 1)
VFIO_SET_IOMMU = _io(VFIO_BASE + 2)
VFIO_IOMMU_GET_INFO = _io(VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _io(VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io(VFIO_BASE + 14)

# -- /dev/vfio/<group> --------------------------------------------------------------------
VFIO_GROUP_GET_STATUS = _io(VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _io(VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _io(VFIO_BASE + 6)

# struct vfio_group_status flags.
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# -- device file descriptors --------------------------------------------------------------
VFIO_DEVICE_GET_INFO = _io(VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _io(VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _io(VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _io(VFIO_BASE + 10)
VFIO_DEVICE_RESET = _io(VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _io(VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _io(VFIO_BASE + 13)
VFIO_DEVICE_BIND_IOMMUFD = _io(VFIO_BASE + 18)  # cdev only (Linux 6.6+)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _io(VFIO_BASE + 20)

# struct vfio_device_info flags.
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

# struct vfio_region_info flags and capability IDs.
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

# vfio-pci's fixed region indexes.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_NUM_REGIONS = 9

# vfio-pci's fixed IRQ indexes.
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4

# struct vfio_irq_info flags.
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# struct vfio_irq_set flags: one data type, one action.
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

# struct vfio_iommu_type1_dma_map / _unmap flags, and the info capability we read.
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1

# -- /dev/iommu (iommufd, Linux 6.2+) -----------------------------------------------------
IOMMU_DESTROY = _io(IOMMUFD_CMD_BASE + 0)
IOMMU_IOAS_ALLOC = _io(IOMMUFD_CMD_BASE + 1)
IOMMU_IOAS_MAP = _io(IOMMUFD_CMD_BASE + 5)
IOMMU_IOAS_UNMAP = _io(IOMMUFD_CMD_BASE + 6)

# enum iommufd_ioas_map_flags.
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# -- struct layouts -----------------------------------------------------------------------
GROUP_STATUS = struct.Struct("<II")  # argsz, flags
# argsz, flags, num_regions, num_irqs, cap_offset, pad
DEVICE_INFO = struct.Struct("<IIIIII")
# argsz, flags, index, cap_offset, size, offset
REGION_INFO = struct.Struct("<IIIIQQ")
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count; data follows
CAP_HEADER = struct.Struct("<HHI")  # id, version, next (offset from the info struct start)
SPARSE_MMAP_HEADER = struct.Struct("<II")  # nr_areas, reserved (after CAP_HEADER)
SPARSE_MMAP_AREA = struct.Struct("<QQ")  # offset, size
# argsz, flags, iova_pgsizes, cap_offset, pad
IOMMU_TYPE1_INFO = struct.Struct("<IIQII")
IOVA_RANGE_HEADER = struct.Struct("<II")  # nr_iovas, reserved (after CAP_HEADER)
IOVA_RANGE = struct.Struct("<QQ")  # start, end (inclusive)
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, vaddr, iova, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, iova, size
HOT_RESET_INFO = struct.Struct("<III")  # argsz, flags, count; devices follow
HOT_RESET_DEVICE = struct.Struct("<IHBB")  # group_id, segment, bus, devfn
HOT_RESET = struct.Struct("<III")  # argsz, flags, count; s32 group fds follow
BIND_IOMMUFD = struct.Struct("<IIiI")  # argsz, flags, iommufd, out_devid
ATTACH_IOMMUFD_PT = struct.Struct("<III")  # argsz, flags, pt_id
IOAS_ALLOC = struct.Struct("<III")  # size, flags, out_ioas_id
IOAS_MAP = struct.Struct("<IIIIQQQ")  # size, flags, ioas_id, reserved, user_va, length, iova
IOAS_UNMAP = struct.Struct("<IIQQ")  # size, ioas_id, iova, length
IOMMU_DESTROY_ARG = struct.Struct("<II")  # size, id
