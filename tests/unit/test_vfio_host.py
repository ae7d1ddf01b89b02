"""Host discovery, passthrough checks and bind/unbind refusals (iovirt.vfio.host and the
``iovirt host`` CLI), on fake sysfs trees and, read-only, on this machine's /sys."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from iovirt.vfio import cli
from iovirt.vfio.errors import (
    DeviceInUseError,
    DeviceNotFoundError,
    GroupNotViableError,
    NoIommuError,
    NotBoundError,
    PassthroughError,
)
from iovirt.vfio.host import INTERFACE_NONE, INTERFACE_TYPE1, HostPci, normalize_bdf
from iovirt.vfio.simulator import FakeHostTree

NVME = "0000:00:04.0"
SIBLING = "0000:00:04.1"


@pytest.fixture
def tree(tmp_path: Path) -> FakeHostTree:
    return FakeHostTree(tmp_path)


def host_of(tree: FakeHostTree) -> HostPci:
    return HostPci(sysfs=tree.sysfs, procfs=tree.procfs, devfs=tree.devfs)


def test_normalize_bdf() -> None:
    assert normalize_bdf("00:04.0") == "0000:00:04.0"
    assert normalize_bdf(" 0000:0A:1f.7 ") == "0000:0a:1f.7"
    for bad in ("00:04", "0000:00:20.0", "00:04.8", "nvme0", ""):
        with pytest.raises(ValueError):
            normalize_bdf(bad)


def test_listing_reads_ids_driver_and_group(tree: FakeHostTree) -> None:
    tree.add_device(NVME, driver="nvme", group=5)
    tree.add_device(SIBLING, vendor=0x8086, device=0x10D3, class_code=0x020000, group=5)
    tree.add_device("0000:00:02.0", driver="virtio-pci", class_code=0x018000)
    devices = {d.bdf: d for d in host_of(tree).devices()}
    assert list(devices) == ["0000:00:02.0", NVME, SIBLING]
    nvme = devices[NVME]
    assert (nvme.vendor, nvme.device, nvme.class_code) == (0x1B36, 0x0010, 0x010802)
    assert nvme.driver == "nvme"
    assert nvme.iommu_group == 5
    assert nvme.group_members == (NVME, SIBLING)
    assert devices[SIBLING].driver is None
    assert devices["0000:00:02.0"].iommu_group is None
    assert host_of(tree).vfio_interface() == INTERFACE_TYPE1


def test_check_passthrough_without_an_iommu_is_one_no_iommu_line(tree: FakeHostTree) -> None:
    tree.add_device(NVME, driver="vfio-pci")
    with pytest.raises(NoIommuError) as err:
        host_of(tree).check_passthrough(NVME)
    message = str(err.value)
    assert message.startswith(f"no IOMMU: {NVME}: ")
    assert "intel_iommu=on" in message and "\n" not in message
    assert host_of(tree).vfio_interface() == INTERFACE_NONE


def test_check_passthrough_wants_vfio_pci(tree: FakeHostTree) -> None:
    tree.add_device(NVME, driver="nvme", group=5)
    with pytest.raises(
        NotBoundError, match=f"bound to nvme, not vfio-pci; run `iovirt host bind {NVME}`"
    ):
        host_of(tree).check_passthrough(NVME)


def test_check_passthrough_names_whatever_makes_the_group_not_viable(
    tree: FakeHostTree,
) -> None:
    tree.add_device(NVME, driver="vfio-pci", group=5)
    tree.add_device(SIBLING, driver="e1000e", group=5)
    tree.add_device("0000:00:04.2", driver="pcieport", group=5)  # harmless: no DMA of its own
    with pytest.raises(GroupNotViableError) as err:
        host_of(tree).check_passthrough(NVME)
    assert err.value.offenders == [(SIBLING, "e1000e")]
    assert f"{SIBLING} (driver e1000e)" in str(err.value)


def test_check_passthrough_of_a_ready_device(tree: FakeHostTree) -> None:
    tree.add_device(NVME, driver="vfio-pci", group=5)
    tree.add_device(SIBLING, group=5)  # no driver: fine
    assert host_of(tree).check_passthrough("00:04.0").bdf == NVME


def test_check_passthrough_of_an_unknown_device(tree: FakeHostTree) -> None:
    with pytest.raises(DeviceNotFoundError, match="no such PCI device on this host"):
        host_of(tree).check_passthrough("0000:00:09.0")


def test_check_passthrough_wants_the_vfio_nodes(tree: FakeHostTree) -> None:
    tree.add_device(NVME, driver="vfio-pci", group=5)
    (tree.devfs / "vfio" / "5").unlink()
    with pytest.raises(PassthroughError, match=r"/dev/vfio/5 does not exist"):
        host_of(tree).check_passthrough(NVME)


# -- what the host uses ---------------------------------------------------------------------


def test_in_use_finds_mounts_swap_holders_and_default_routes(tree: FakeHostTree) -> None:
    disk = tree.add_device(NVME, driver="nvme", group=5)
    ns = tree.add_class_device(disk / "nvme" / "nvme0", "block", "nvme0n1", "259:0")
    part = tree.add_class_device(ns, "block", "nvme0n1p1", "259:1")
    tree.add_class_device(ns, "block", "nvme0n1p2", "259:2")
    held = tree.add_class_device(ns, "block", "nvme0n1p3", "259:3")
    (held / "holders" / "dm-0").mkdir()
    nic = tree.add_device("0000:00:03.0", driver="virtio-pci", group=3)
    tree.add_class_device(nic / "virtio0", "net", "eth0")
    tree.add_class_device(nic / "virtio1", "net", "eth1")
    tree.mount("259:1", "/srv")
    tree.swap("nvme0n1p2")
    tree.default_route("eth0")
    tree.default_route("eth1", ipv6=True)
    host = host_of(tree)
    assert part.name == "nvme0n1p1"
    assert sorted(host.in_use(host.device(NVME))) == [
        "/dev/nvme0n1p1 is mounted on /srv",
        "/dev/nvme0n1p2 is in use as swap",
        "/dev/nvme0n1p3 is held by dm-0",
    ]
    assert sorted(host.in_use(host.device("0000:00:03.0"))) == [
        "network interface eth0 carries the default route",
        "network interface eth1 carries the default route",
    ]


def test_an_idle_device_is_not_in_use(tree: FakeHostTree) -> None:
    disk = tree.add_device(NVME, driver="nvme", group=5)
    tree.add_class_device(disk / "nvme" / "nvme0", "block", "nvme0n1", "259:0")
    tree.mount("8:1", "/")  # another disk's
    host = host_of(tree)
    assert host.in_use(host.device(NVME)) == []


def test_bind_refuses_a_device_in_use_and_touches_nothing(tree: FakeHostTree) -> None:
    disk = tree.add_device(NVME, driver="nvme", group=5)
    tree.add_class_device(disk / "nvme" / "nvme0", "block", "nvme0n1", "259:0")
    tree.mount("259:0", "/data")
    with pytest.raises(DeviceInUseError, match=r"/dev/nvme0n1 is mounted on /data.*--force"):
        host_of(tree).bind(NVME)
    assert (disk / "driver_override").read_text() == "(null)\n"
    assert (tree.sysfs / "bus" / "pci" / "drivers" / "nvme" / "unbind").read_text() == ""
    assert (tree.sysfs / "bus" / "pci" / "drivers_probe").read_text() == ""


def test_bind_refuses_a_device_without_an_iommu_group_before_touching_it(
    tree: FakeHostTree,
) -> None:
    disk = tree.add_device(NVME, driver="nvme")
    with pytest.raises(NoIommuError, match="vfio-pci cannot take it"):
        host_of(tree).bind(NVME, force=True)
    assert (disk / "driver_override").read_text() == "(null)\n"
    assert (tree.sysfs / "bus" / "pci" / "drivers" / "nvme" / "unbind").read_text() == ""


def test_forced_bind_goes_through_driver_override(tree: FakeHostTree) -> None:
    # A fake tree has no kernel to rebind anything, so the device stays on nvme: bind
    # must notice, give the device back (clear the override, probe again) and say so.
    disk = tree.add_device(NVME, driver="nvme", group=5)
    tree.add_driver("vfio-pci")
    tree.add_class_device(disk / "nvme" / "nvme0", "block", "nvme0n1", "259:0")
    tree.mount("259:0", "/data")
    with pytest.raises(PassthroughError, match="vfio-pci did not take the device"):
        host_of(tree).bind(NVME, force=True)
    assert (tree.sysfs / "bus" / "pci" / "drivers" / "nvme" / "unbind").read_text() == NVME
    assert (tree.sysfs / "bus" / "pci" / "drivers_probe").read_text() == NVME
    assert (disk / "driver_override").read_text() == "\n"  # the override is undone


def test_unbind_refuses_a_device_on_a_host_driver(tree: FakeHostTree) -> None:
    tree.add_device(NVME, driver="nvme", group=5)
    with pytest.raises(NotBoundError, match="nothing to give back"):
        host_of(tree).unbind(NVME)


def test_unbind_clears_the_override_and_reprobes(tree: FakeHostTree) -> None:
    disk = tree.add_device(NVME, driver="vfio-pci", group=5)
    (disk / "driver_override").write_text("vfio-pci\n")
    host_of(tree).unbind(NVME)
    assert (tree.sysfs / "bus" / "pci" / "drivers" / "vfio-pci" / "unbind").read_text() == NVME
    assert (disk / "driver_override").read_text() == "\n"
    assert (tree.sysfs / "bus" / "pci" / "drivers_probe").read_text() == NVME


# -- the CLI --------------------------------------------------------------------------------


def run_cli(argv: list[str], host: HostPci | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iovirt")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func is cli.main
    return cli.main(args, host)


def test_cli_lists_devices_with_groups(
    tree: FakeHostTree, capsys: pytest.CaptureFixture[str]
) -> None:
    tree.add_device(NVME, driver="nvme", group=5)
    tree.add_device(SIBLING, group=5)
    assert run_cli(["host", "pci"], host_of(tree)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"VFIO interface: {INTERFACE_TYPE1}"
    row = next(line for line in out if line.startswith(NVME)).split()
    assert row[1:6] == ["1b36:0010", "010802", "nvme", "5", f"{NVME},{SIBLING}"]


def test_cli_bind_refusal_is_a_user_error(tree: FakeHostTree) -> None:
    disk = tree.add_device(NVME, driver="nvme", group=5)
    tree.add_class_device(disk / "nvme" / "nvme0", "block", "nvme0n1", "259:0")
    tree.swap("nvme0n1")
    with pytest.raises(DeviceInUseError, match="in use as swap"):
        run_cli(["host", "bind", NVME], host_of(tree))


def test_this_hosts_listing_matches_its_sysfs(capsys: pytest.CaptureFixture[str]) -> None:
    # Read-only, on this machine: pyudev's enumeration against the sysfs folders.
    assert cli._standalone(["host", "pci", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    sysfs = Path("/sys/bus/pci/devices")
    assert [d["bdf"] for d in listing["devices"]] == sorted(os.listdir(sysfs))
    for d in listing["devices"]:
        assert int(d["vendor"], 16) == int((sysfs / d["bdf"] / "vendor").read_text(), 16)
        link = sysfs / d["bdf"] / "iommu_group"
        expected = int(os.path.basename(os.readlink(link))) if link.exists() else None
        assert d["iommu_group"] == expected
    has_groups = any(Path("/sys/kernel/iommu_groups").glob("*"))
    assert (listing["vfio_interface"] == INTERFACE_NONE) == (not has_groups)


def test_cli_rejects_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._standalone(["host", "unbind", "not-a-bdf"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == "iovirt: passthrough not-a-bdf: 'not-a-bdf' is not a PCI address like 0000:00:04.0"
    )


def test_passthrough_of_a_device_outside_any_iommu_group_here_says_no_iommu() -> None:
    # Read-only, on this machine: every PCI function without an iommu_group link (all of
    # them on a host without an IOMMU, as ENVIRONMENT.md describes these machines) must be
    # refused with the one "no IOMMU:" line, before anything is opened.
    host = HostPci()
    checked = 0
    for device in host.devices():
        if device.iommu_group is not None:
            continue
        with pytest.raises(NoIommuError) as err:
            host.check_passthrough(device.bdf)
        assert str(err.value).startswith(f"no IOMMU: {device.bdf}: ")
        assert "\n" not in str(err.value)
        checked += 1
    assert checked == sum(
        1 for p in Path("/sys/bus/pci/devices").iterdir() if not (p / "iommu_group").exists()
    )
