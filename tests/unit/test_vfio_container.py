"""The host IOMMU side (iovirt.vfio.container) and the board hook (iovirt.vfio.board),
against the VFIO simulator: which ioctls, in which order, what gets mapped for DMA, and
the one-line errors a user sees."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from iovirt.bus.bus import Bus
from iovirt.bus.pci import PciRoot
from iovirt.errors import ConfigError
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedPlatform
from iovirt.vfio import uapi
from iovirt.vfio.board import add_passthrough, check_passthrough
from iovirt.vfio.container import IommufdContext, Type1Container, open_iommu_context
from iovirt.vfio.device import VfioPciDevice
from iovirt.vfio.errors import (
    DeviceBusyError,
    GroupNotViableError,
    NotBoundError,
    PassthroughError,
    PermissionDeniedError,
)
from iovirt.vfio.host import INTERFACE_IOMMUFD, INTERFACE_TYPE1, HostPci
from iovirt.vfio.simulator import (
    FakeHostTree,
    SimulatedBar,
    SimulatedMsix,
    SimulatedPciDevice,
    SimulatedVfioKernel,
)

NVME = "0000:00:04.0"
GIB = 1 << 30


def nvme() -> SimulatedPciDevice:
    return SimulatedPciDevice(
        NVME,
        bars={0: SimulatedBar(0x4000, "mem64")},
        msix=SimulatedMsix(table_size=2, bar=0, table_offset=0x2000, pba_offset=0x3000),
    )


@pytest.fixture
def memory() -> GuestMemory:
    # Two regions, as a guest with RAM above the 32-bit hole has.
    return GuestMemory([(0, 2 << 20), (4 * GIB, 1 << 20)])


def test_type1_attaches_the_group_then_maps_all_guest_ram(
    memory: GuestMemory, tmp_path: Path
) -> None:
    sim = nvme()
    kernel = SimulatedVfioKernel(sim)
    container = Type1Container(kernel, host=HostPci(sysfs=tmp_path))
    fd = container.open_device(NVME, 5, tmp_path)
    container.map_memory(memory)
    assert kernel.calls[:7] == [
        "open /dev/vfio/vfio",
        "VFIO_GET_API_VERSION",
        "VFIO_CHECK_EXTENSION",
        "open /dev/vfio/5",
        "VFIO_GROUP_GET_STATUS",
        "VFIO_GROUP_SET_CONTAINER",
        "VFIO_SET_IOMMU",
    ]
    assert "VFIO_GROUP_GET_DEVICE_FD" in kernel.calls
    # IOVA = guest-physical address, the guest's own pages behind it, and nothing else.
    assert sorted(kernel.dma_maps) == [
        (0, memory.regions[0].host_addr, 2 << 20),
        (4 * GIB, memory.regions[1].host_addr, 1 << 20),
    ]
    assert container.group_fds().keys() == {5}
    kernel.close(fd)
    container.close()
    assert kernel.dma_maps == []
    assert kernel.groups_in_container == set()
    assert kernel.fds == {}


def test_a_group_that_is_not_viable_names_the_offender(tmp_path: Path) -> None:
    tree = FakeHostTree(tmp_path)
    tree.add_device(NVME, driver="vfio-pci", group=5)
    tree.add_device("0000:00:04.1", driver="e1000e", group=5)
    kernel = SimulatedVfioKernel(nvme(), viable={5: False})
    container = Type1Container(kernel, host=HostPci(sysfs=tree.sysfs))
    with pytest.raises(GroupNotViableError, match=r"0000:00:04\.1 \(driver e1000e\)"):
        container.open_device(NVME, 5, tmp_path)
    assert kernel.groups_in_container == set()
    container.close()


@pytest.mark.parametrize(
    ("setting", "error", "text"),
    [
        ("denied", PermissionDeniedError, "no permission to open /dev/vfio/5; run as root"),
        ("busy", DeviceBusyError, "/dev/vfio/5 is already open"),
    ],
)
def test_group_open_errors_are_one_line(
    tmp_path: Path, setting: str, error: type[Exception], text: str
) -> None:
    kernel = SimulatedVfioKernel(nvme(), **{setting: ("/dev/vfio/5",)})  # type: ignore[arg-type]
    container = Type1Container(kernel, host=HostPci(sysfs=tmp_path))
    with pytest.raises(error) as err:
        container.open_device(NVME, 5, tmp_path)
    assert text in str(err.value) and "\n" not in str(err.value)
    container.close()


def test_a_device_opened_twice_is_busy(tmp_path: Path) -> None:
    kernel = SimulatedVfioKernel(nvme())
    container = Type1Container(kernel, host=HostPci(sysfs=tmp_path))
    container.open_device(NVME, 5, tmp_path)
    with pytest.raises(DeviceBusyError, match="already open"):
        container.open_device(NVME, 5, tmp_path)
    container.close()


def test_pinning_failure_points_at_the_memlock_limit(memory: GuestMemory, tmp_path: Path) -> None:
    kernel = SimulatedVfioKernel(nvme(), map_errno=errno.ENOMEM)
    container = Type1Container(kernel, host=HostPci(sysfs=tmp_path))
    container.open_device(NVME, 5, tmp_path)
    with pytest.raises(PassthroughError, match="RLIMIT_MEMLOCK"):
        container.map_memory(memory)
    container.close()


def test_guest_ram_outside_the_iommus_ranges_is_refused(
    memory: GuestMemory, tmp_path: Path
) -> None:
    # An IOMMU that can only address 4 GiB: the high region cannot be mapped.
    kernel = SimulatedVfioKernel(nvme(), iova_ranges=[(0, 0xFEDF_FFFF)])
    container = Type1Container(kernel, host=HostPci(sysfs=tmp_path))
    container.open_device(NVME, 5, tmp_path)
    with pytest.raises(PassthroughError, match=r"not inside the host IOMMU's usable IOVA"):
        container.map_memory(memory)
    container.close()


def fake_iommufd_host(tmp_path: Path) -> tuple[FakeHostTree, Path]:
    tree = FakeHostTree(tmp_path)
    path = tree.add_device(NVME, driver="vfio-pci", group=5)
    (path / "vfio-dev" / "vfio0").mkdir(parents=True)
    (tree.devfs / "iommu").touch()
    (tree.devfs / "vfio" / "devices").mkdir()
    (tree.devfs / "vfio" / "devices" / "vfio0").touch()
    return tree, path


def test_iommufd_is_preferred_where_the_kernel_has_it(memory: GuestMemory, tmp_path: Path) -> None:
    tree, path = fake_iommufd_host(tmp_path)
    sim = nvme()
    kernel = SimulatedVfioKernel(sim, devfs=str(tree.devfs), iommufd=True)
    host = HostPci(sysfs=tree.sysfs, devfs=tree.devfs)
    assert host.vfio_interface() == INTERFACE_IOMMUFD
    context = open_iommu_context(kernel, "auto", tree.sysfs, tree.devfs, host)
    assert isinstance(context, IommufdContext)
    fd = context.open_device(NVME, 5, path)
    context.map_memory(memory)
    assert kernel.calls[:5] == [
        f"open {tree.devfs}/iommu",
        "IOMMU_IOAS_ALLOC",
        f"open {tree.devfs}/vfio/devices/vfio0",
        "VFIO_DEVICE_BIND_IOMMUFD",
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    ]
    assert sorted(kernel.dma_maps) == [
        (0, memory.regions[0].host_addr, 2 << 20),
        (4 * GIB, memory.regions[1].host_addr, 1 << 20),
    ]
    # The cdev fd is a full device fd: the passthrough device works over it.
    platform = SimulatedPlatform(memory)
    device = VfioPciDevice(kernel, fd, platform, name="vfio cdev")
    assert device.config_read(0, 2) == 0x1B36
    assert sim.resets == 1
    device.close()
    context.close()
    sim.close()


def test_type1_where_there_is_no_iommufd(tmp_path: Path) -> None:
    tree = FakeHostTree(tmp_path)
    tree.add_device(NVME, driver="vfio-pci", group=5)
    kernel = SimulatedVfioKernel(nvme(), devfs=str(tree.devfs))
    host = HostPci(sysfs=tree.sysfs, devfs=tree.devfs)
    context = open_iommu_context(kernel, "auto", tree.sysfs, tree.devfs, host)
    assert isinstance(context, Type1Container)
    assert context.name == INTERFACE_TYPE1
    context.close()


# -- the board hook ---------------------------------------------------------------------------


class FakeKvmVm:
    has_irqchip = False  # no in-kernel irqchip: the device gets no INTx route


class FakeVm:
    """What add_passthrough uses of a Vm: pci, memory, kvm_vm, add_closer."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.pci = PciRoot(Bus("mmio", 1 << 48), Bus("pio", 1 << 16))
        self.kvm_vm = FakeKvmVm()
        self.closers: list[Callable[[], None]] = []

    def add_closer(self, closer: Callable[[], None]) -> None:
        self.closers.append(closer)

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()


class Entry:
    def __init__(self, host: str, iommu: str = "auto") -> None:
        self.host = host
        self.iommu = iommu


def test_add_passthrough_puts_the_device_on_the_bus_and_cleans_up(
    memory: GuestMemory, tmp_path: Path
) -> None:
    tree = FakeHostTree(tmp_path)
    tree.add_device(NVME, driver="vfio-pci", group=5)
    sim = nvme()
    kernel = SimulatedVfioKernel(sim, devfs=str(tree.devfs))
    host = HostPci(sysfs=tree.sysfs, procfs=tree.procfs, devfs=tree.devfs)
    vm = FakeVm(memory)
    vm.pci.add(SimulatedPlatformFunction(), 1)  # slot 1 is taken by another device
    functions = add_passthrough(
        vm,  # type: ignore[arg-type]
        SimulatedPlatform(memory),
        [Entry(NVME)],
        kernel=kernel,
        host=host,
    )
    assert len(functions) == 1
    assert vm.pci.functions[2 << 3] is functions[0]  # the first free slot
    assert functions[0].config_read(0, 4) == 0x0010_1B36
    assert len(kernel.dma_maps) == 2
    assert sim.opened
    vm.close()
    assert not sim.opened
    assert kernel.dma_maps == [] and kernel.fds == {}
    assert sim.resets == 2  # on open and on close
    sim.close()


def test_check_passthrough_refuses_duplicates_and_unbound_devices(tmp_path: Path) -> None:
    tree = FakeHostTree(tmp_path)
    tree.add_device(NVME, driver="vfio-pci", group=5)
    tree.add_device("0000:00:05.0", driver="e1000e", group=6)
    host = HostPci(sysfs=tree.sysfs, devfs=tree.devfs)
    with pytest.raises(ConfigError, match=r"passthrough\.1\.host: 0000:00:04\.0 is listed twice"):
        check_passthrough([Entry(NVME), Entry("00:04.0")], host)
    with pytest.raises(NotBoundError, match="bound to e1000e"):
        check_passthrough([Entry("0000:00:05.0")], host)
    assert [d.bdf for d in check_passthrough([Entry(NVME)], host)] == [NVME]


def test_add_passthrough_without_entries_opens_nothing(memory: GuestMemory) -> None:
    vm = FakeVm(memory)
    kernel = SimulatedVfioKernel()
    assert add_passthrough(vm, SimulatedPlatform(memory), [], kernel=kernel) == []  # type: ignore[arg-type]
    assert kernel.calls == [] and vm.closers == []


class SimulatedPlatformFunction:
    """A config-space-only PCI function to occupy a slot."""

    def config_read(self, offset: int, size: int) -> int:
        return 0x1234 if (offset, size) == (0, 2) else 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass


def test_the_uapi_numbers_match_linux() -> None:
    # _IO(';', 100 + n) from <linux/vfio.h>; iommufd's from 0x80.
    assert uapi.VFIO_GET_API_VERSION == 0x3B64
    assert uapi.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert uapi.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert uapi.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert uapi.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert uapi.IOMMU_IOAS_MAP == 0x3B85
    assert uapi.REGION_INFO.size == 32 and uapi.DMA_MAP.size == 32
    assert uapi.IOAS_MAP.size == 40 and uapi.IOMMU_TYPE1_INFO.size == 24
