"""The host's PCI devices as passthrough sees them: discovery, IOMMU groups, binding.

Discovery enumerates the ``pci`` subsystem with pyudev and reads each function's sysfs
attributes: vendor/device, class, driver, IOMMU group and the group's other members.
:meth:`HostPci.bind` moves a function to vfio-pci through ``driver_override`` (the kernel's
own mechanism: the override makes the next probe pick vfio-pci and no other driver), and
:meth:`HostPci.unbind` clears it and lets the host driver probe again.

Binding refuses a function the host still uses unless forced: a block device below it that
is mounted, used as swap or held by device-mapper/md, or a network interface that carries
the default route. It also refuses a function in no IOMMU group *before* touching it: vfio-pci
cannot take such a device, and unbinding it from its driver would only take it from the host.

The sysfs and procfs roots are parameters so that the checks run against a fake tree in
unit tests; with the real ``/sys`` the enumeration goes through pyudev.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from iovirt.errors import ResourceError
from iovirt.vfio.errors import (
    DeviceInUseError,
    DeviceNotFoundError,
    GroupNotViableError,
    NoIommuError,
    NotBoundError,
    PassthroughError,
    PermissionDeniedError,
)

log = logging.getLogger(__name__)

SYSFS = Path("/sys")
PROCFS = Path("/proc")
DEVFS = Path("/dev")
PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))

VFIO_PCI_DRIVER = "vfio-pci"
# Drivers that leave an IOMMU group viable: they never do DMA for the device themselves
# (the kernel's driver_managed_dma). vfio-pci variant drivers end in "vfio-pci" / "_vfio_pci".
VIABLE_DRIVERS = frozenset({VFIO_PCI_DRIVER, "pci-stub", "pcieport"})

# Domain:bus:device.function; the domain may be left out (it is 0000 on a PC).
_BDF_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<dev>[0-1][0-9a-fA-F])\.(?P<fn>[0-7])$"
)

# How the IOMMU interface is called in messages (see vfio_interface()).
INTERFACE_IOMMUFD = "iommufd + vfio cdev"
INTERFACE_TYPE1 = "type1 container + groups"
INTERFACE_NONE = "none (no IOMMU)"


def normalize_bdf(text: str) -> str:
    """``00:04.0`` or ``0000:00:04.0`` -> ``0000:00:04.0``; ValueError if it is not one."""
    m = _BDF_RE.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a PCI address like 0000:00:04.0")
    domain = m.group("domain") or "0000"
    return f"{domain}:{m.group('bus')}:{m.group('dev')}.{m.group('fn')}".lower()


def is_vfio_driver(driver: str | None) -> bool:
    """vfio-pci itself or one of its variant drivers (e.g. mlx5_vfio_pci)."""
    return driver is not None and (
        driver == VFIO_PCI_DRIVER or driver.endswith(("-vfio-pci", "_vfio_pci"))
    )


@dataclass(frozen=True)
class PciHostDevice:
    """One PCI function of the host, as sysfs describes it now."""

    bdf: str
    vendor: int
    device: int
    class_code: int  # 24 bits: base class, subclass, programming interface
    driver: str | None
    iommu_group: int | None
    group_members: tuple[str, ...]
    sys_path: Path = field(repr=False)
    driver_override: str | None = None

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def description(self) -> str:
        """Vendor and device names from pci.ids (if installed), else the class name."""
        names = _pci_ids()
        vendor = names.vendors.get(self.vendor)
        device = names.devices.get((self.vendor, self.device))
        klass = names.classes.get(self.class_code >> 8) or names.classes.get(self.class_code >> 16)
        parts = [p for p in (vendor, device) if p]
        if klass:
            parts.append(f"[{klass}]")
        return " ".join(parts)


@dataclass(frozen=True)
class BindResult:
    """What :meth:`HostPci.bind` did."""

    device: PciHostDevice  # after the bind
    previous_driver: str | None
    unbound_members: tuple[tuple[str, str | None], ...]  # group members not on vfio-pci


@dataclass
class _PciIds:
    vendors: dict[int, str] = field(default_factory=dict)
    devices: dict[tuple[int, int], str] = field(default_factory=dict)
    classes: dict[int, str] = field(default_factory=dict)  # 0xBB or 0xBBSS


@cache
def _pci_ids() -> _PciIds:
    """Names from the pci.ids database (vendors, devices, classes); empty if absent."""
    ids = _PciIds()
    path = next((p for p in PCI_IDS if p.is_file()), None)
    if path is None:
        return ids
    vendor: int | None = None
    base: int | None = None
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ids
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("C "):
                base, vendor = int(line[2:4], 16), None
                ids.classes[base] = line[4:].strip()
            elif line.startswith("\t\t"):
                continue  # subsystems and programming interfaces
            elif line.startswith("\t"):
                if base is not None:
                    ids.classes[base << 8 | int(line[1:3], 16)] = line[3:].strip()
                elif vendor is not None:
                    ids.devices[(vendor, int(line[1:5], 16))] = line[5:].strip()
            else:
                vendor, base = int(line[:4], 16), None
                ids.vendors[vendor] = line[4:].strip()
        except ValueError:
            continue  # a line this parser does not know; names are a nicety
    return ids


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    """The last component of a symlink's target (a driver or group name), or None."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


class HostPci:
    """The PCI functions under ``sysfs`` (see the module docstring)."""

    def __init__(self, sysfs: Path = SYSFS, procfs: Path = PROCFS, devfs: Path = DEVFS) -> None:
        self.sysfs = sysfs
        self.procfs = procfs
        self.devfs = devfs

    # -- discovery ----------------------------------------------------------------------

    def _enumerate(self) -> list[tuple[str, Path]]:
        """(BDF, sysfs path) of every PCI function, in address order."""
        if self.sysfs == SYSFS:
            import pyudev  # type: ignore[import-untyped]

            context = pyudev.Context()
            found = [
                (str(d.sys_name), Path(d.sys_path)) for d in context.list_devices(subsystem="pci")
            ]
        else:  # a fake tree in a test: the same layout, listed by hand
            root = self.sysfs / "bus" / "pci" / "devices"
            found = [(p.name, p.resolve()) for p in root.iterdir()] if root.is_dir() else []
        return sorted(found)

    def devices(self) -> list[PciHostDevice]:
        return [self._describe(bdf, path) for bdf, path in self._enumerate()]

    def device(self, bdf: str) -> PciHostDevice:
        """The function at ``bdf`` (normalised), or DeviceNotFoundError."""
        try:
            bdf = normalize_bdf(bdf)
        except ValueError as e:
            raise DeviceNotFoundError(bdf, str(e)) from e
        path = self.sysfs / "bus" / "pci" / "devices" / bdf
        if not path.exists():
            raise DeviceNotFoundError(
                bdf, "no such PCI device on this host; `iovirt host pci` lists them"
            )
        return self._describe(bdf, path.resolve())

    def _describe(self, bdf: str, path: Path) -> PciHostDevice:
        def number(name: str) -> int:
            text = _read(path / name)
            try:
                return int(text, 16) if text else 0
            except ValueError:
                return 0

        group_text = _link_name(path / "iommu_group")
        group = int(group_text) if group_text and group_text.isdigit() else None
        members: tuple[str, ...] = ()
        if group is not None:
            members = tuple(self._group_members(group))
        override = _read(path / "driver_override")
        return PciHostDevice(
            bdf=bdf,
            vendor=number("vendor"),
            device=number("device"),
            class_code=number("class"),
            driver=_link_name(path / "driver"),
            iommu_group=group,
            group_members=members,
            sys_path=path,
            driver_override=None if override in (None, "", "(null)") else override,
        )

    def _group_members(self, group: int) -> list[str]:
        folder = self.sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
        try:
            return sorted(p.name for p in folder.iterdir())
        except OSError:
            return []

    # -- the IOMMU ----------------------------------------------------------------------

    def iommu_enabled(self) -> bool:
        """Whether the kernel runs with an IOMMU (it then puts devices in groups)."""
        groups = self.sysfs / "kernel" / "iommu_groups"
        try:
            return any(groups.iterdir())
        except OSError:
            return False

    def vfio_interface(self) -> str:
        """Which VFIO interface passthrough uses here: iommufd with the VFIO device cdev
        where the kernel has both (Linux 6.6+ built with them), else the type1 container
        with groups; or none without an IOMMU."""
        if not self.iommu_enabled():
            return INTERFACE_NONE
        if iommufd_available(self.sysfs, self.devfs):
            return INTERFACE_IOMMUFD
        return INTERFACE_TYPE1

    def group_offenders(self, group: int) -> list[tuple[str, str]]:
        """Members of ``group`` bound to a driver that makes the group non-viable."""
        offenders = []
        for bdf in self._group_members(group):
            driver = _link_name(self.sysfs / "bus" / "pci" / "devices" / bdf / "driver")
            if driver is not None and driver not in VIABLE_DRIVERS and not is_vfio_driver(driver):
                offenders.append((bdf, driver))
        return offenders

    # -- what the host uses -------------------------------------------------------------

    def in_use(self, device: PciHostDevice) -> list[str]:
        """Why the host still needs ``device`` (empty if nothing found)."""
        reasons: list[str] = []
        mounts = self._mounted_devnums()
        swaps = self._swap_names()
        routes = self._default_route_ifaces()
        for kind, node in self._class_devices(device.sys_path):
            name = node.name
            if kind == "block":
                dev = _read(node / "dev")
                if dev is not None and dev in mounts:
                    reasons.append(f"/dev/{name} is mounted on {mounts[dev]}")
                if name in swaps:
                    reasons.append(f"/dev/{name} is in use as swap")
                try:
                    holders = sorted(p.name for p in (node / "holders").iterdir())
                except OSError:
                    holders = []
                if holders:
                    reasons.append(f"/dev/{name} is held by {', '.join(holders)}")
            elif kind == "net" and name in routes:
                reasons.append(f"network interface {name} carries the default route")
        return reasons

    def _class_devices(self, root: Path) -> Iterator[tuple[str, Path]]:
        """Block and net class devices below a PCI function's sysfs folder."""
        for dirpath, dirnames, _ in os.walk(root, followlinks=False):
            # Another PCI function below (a bridge's children) is still "this device".
            kind = _link_name(Path(dirpath) / "subsystem")
            if kind in ("block", "net") and Path(dirpath) != root:
                yield kind, Path(dirpath)
            dirnames[:] = [d for d in dirnames if d not in ("subsystem", "driver", "power")]

    def _mounted_devnums(self) -> dict[str, str]:
        """``major:minor`` -> mount point, from /proc/self/mountinfo."""
        mounts: dict[str, str] = {}
        text = _read(self.procfs / "self" / "mountinfo") or ""
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 4:
                mounts.setdefault(fields[2], fields[4])
        return mounts

    def _swap_names(self) -> set[str]:
        text = _read(self.procfs / "swaps") or ""
        names = set()
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 2 and fields[1] == "partition":
                names.add(os.path.basename(fields[0]))
        return names

    def _default_route_ifaces(self) -> set[str]:
        ifaces = set()
        for line in (_read(self.procfs / "net" / "route") or "").splitlines()[1:]:
            fields = line.split()
            # Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
                ifaces.add(fields[0])
        for line in (_read(self.procfs / "net" / "ipv6_route") or "").splitlines():
            fields = line.split()
            # dest prefix_len src src_len next_hop metric refcnt use flags iface
            default = len(fields) >= 10 and fields[0] == "0" * 32 and fields[1] == "00"
            if default and fields[9] != "lo":
                ifaces.add(fields[9])
        return ifaces

    # -- passthrough checks ---------------------------------------------------------------

    def check_passthrough(self, bdf: str) -> PciHostDevice:
        """Everything that can be checked before opening VFIO: the device exists, sits in
        an IOMMU group, is bound to vfio-pci, its group is viable and the VFIO nodes can be
        opened by this user. Raises the matching one-line error."""
        device = self.device(bdf)
        if device.iommu_group is None:
            raise NoIommuError(
                device.bdf,
                "the device is in no IOMMU group, so the host kernel runs without an "
                "IOMMU; enable VT-d/AMD-Vi in the firmware and boot the host with "
                "intel_iommu=on (or amd_iommu=on)",
            )
        if not is_vfio_driver(device.driver):
            bound = f"bound to {device.driver}" if device.driver else "bound to no driver"
            raise NotBoundError(
                device.bdf, f"{bound}, not vfio-pci; run `iovirt host bind {device.bdf}`"
            )
        offenders = self.group_offenders(device.iommu_group)
        if offenders:
            raise GroupNotViableError(device.bdf, device.iommu_group, offenders)
        nodes = [self.devfs / "vfio" / "vfio", self.devfs / "vfio" / str(device.iommu_group)]
        if self.vfio_interface() == INTERFACE_IOMMUFD:
            cdev = vfio_cdev_name(device.sys_path)
            if cdev is not None:
                nodes = [self.devfs / "iommu", self.devfs / "vfio" / "devices" / cdev]
        for node in nodes:
            if not node.exists():
                raise PassthroughError(
                    device.bdf, f"{node} does not exist; is the vfio-pci module loaded?"
                )
            if not os.access(node, os.R_OK | os.W_OK):
                raise PermissionDeniedError(
                    device.bdf,
                    f"no permission to open {node}; run as root or give this user "
                    "read-write access to it (e.g. a udev rule)",
                )
        return device

    # -- bind / unbind ------------------------------------------------------------------

    def bind(self, bdf: str, force: bool = False) -> BindResult:
        """Move ``bdf`` to vfio-pci (see the module docstring for what is refused)."""
        device = self.device(bdf)
        if device.iommu_group is None:
            raise NoIommuError(
                device.bdf,
                "the device is in no IOMMU group, so vfio-pci cannot take it (left with "
                f"{device.driver or 'no driver'}); boot the host with intel_iommu=on "
                "(or amd_iommu=on)",
            )
        previous = device.driver
        if not is_vfio_driver(previous):
            reasons = self.in_use(device)
            if reasons and not force:
                raise DeviceInUseError(
                    device.bdf,
                    f"the host uses it: {'; '.join(reasons)}; stop using it first, or pass --force",
                )
            self._load_vfio_pci()
            self._write(device, device.sys_path / "driver_override", VFIO_PCI_DRIVER)
            if previous is not None:
                self._write(device, device.sys_path / "driver" / "unbind", device.bdf)
            self._write(device, self.sysfs / "bus" / "pci" / "drivers_probe", device.bdf)
            device = self.device(device.bdf)
            if not is_vfio_driver(device.driver):
                # Give the device back to the host rather than leave it driverless.
                self._write(device, device.sys_path / "driver_override", "\n")
                with contextlib.suppress(PassthroughError):
                    self._write(device, self.sysfs / "bus" / "pci" / "drivers_probe", device.bdf)
                raise PassthroughError(
                    device.bdf,
                    "vfio-pci did not take the device (see the kernel log: dmesg); it "
                    f"was given back to {self.device(device.bdf).driver or 'no driver'}",
                )
        assert device.iommu_group is not None
        unbound = tuple(
            (member, _link_name(self.sysfs / "bus" / "pci" / "devices" / member / "driver"))
            for member in device.group_members
            if member != device.bdf
            and not is_vfio_driver(
                _link_name(self.sysfs / "bus" / "pci" / "devices" / member / "driver")
            )
        )
        return BindResult(device, previous, unbound)

    def unbind(self, bdf: str) -> PciHostDevice:
        """Take ``bdf`` from vfio-pci and let the host's own driver probe it again."""
        device = self.device(bdf)
        if device.driver is not None and not is_vfio_driver(device.driver):
            raise NotBoundError(
                device.bdf, f"bound to {device.driver}, not vfio-pci; nothing to give back"
            )
        if device.driver is not None:
            self._write(device, device.sys_path / "driver" / "unbind", device.bdf)
        self._write(device, device.sys_path / "driver_override", "\n")
        self._write(device, self.sysfs / "bus" / "pci" / "drivers_probe", device.bdf)
        return self.device(device.bdf)

    def _load_vfio_pci(self) -> None:
        if (self.sysfs / "bus" / "pci" / "drivers" / VFIO_PCI_DRIVER).is_dir():
            return
        try:
            proc = subprocess.run(
                ["modprobe", VFIO_PCI_DRIVER], capture_output=True, text=True, check=False
            )
        except FileNotFoundError as e:
            raise ResourceError("modprobe", "not found; load vfio-pci by hand") from e
        if proc.returncode != 0:
            detail = proc.stderr.strip().splitlines()[-1:] or ["failed"]
            raise ResourceError("vfio-pci", f"modprobe vfio-pci: {detail[0]}")

    def _write(self, device: PciHostDevice, path: Path, text: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(text)
        except PermissionError as e:
            raise PermissionDeniedError(
                device.bdf, f"no permission to write {path}; run as root"
            ) from e
        except OSError as e:
            raise PassthroughError(device.bdf, f"writing {path}: {e.strerror}") from e


def iommufd_available(sysfs: Path = SYSFS, devfs: Path = DEVFS) -> bool:
    """Whether the kernel offers iommufd (/dev/iommu) and the VFIO device cdev
    (/dev/vfio/devices, Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV)."""
    return (devfs / "iommu").exists() and (devfs / "vfio" / "devices").is_dir()


def vfio_cdev_name(sys_path: Path) -> str | None:
    """The ``vfioN`` cdev of a device bound to vfio-pci (``<dev>/vfio-dev/vfioN``), if any."""
    try:
        names = sorted(p.name for p in (sys_path / "vfio-dev").iterdir())
    except OSError:
        return None
    return names[0] if names else None
