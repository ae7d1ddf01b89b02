"""``iovirt host ...``: the host's PCI devices, and moving one to vfio-pci and back.

* ``iovirt host pci [--json]`` lists every PCI function with vendor:device, class, driver,
  IOMMU group and the group's members, and says which VFIO interface passthrough would use
  (groups show as "none" on a host without an IOMMU).
* ``iovirt host bind BDF [--force]`` moves a function to vfio-pci; it refuses a function
  the host still uses (a mounted disk, swap, the default route) unless forced.
* ``iovirt host unbind BDF`` gives it back to the host's driver.

:func:`register` adds the ``host`` command to the main parser; :func:`main` runs it. Also
runnable alone: ``python -m iovirt.vfio.cli host pci``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from iovirt.vfio.host import HostPci, PciHostDevice


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``host`` (with ``pci``, ``bind``, ``unbind``) to ``subparsers`` (the object
    ``ArgumentParser.add_subparsers`` returned). Sets ``func`` to :func:`main`."""
    host: argparse.ArgumentParser = subparsers.add_parser(
        "host",
        help="list host PCI devices, bind one to vfio-pci for passthrough",
        description="List the host's PCI devices with their IOMMU groups; move one to "
        "vfio-pci for passthrough and back.",
    )
    sub = host.add_subparsers(dest="host_command", required=True)
    pci = sub.add_parser("pci", help="list PCI devices with driver and IOMMU group")
    pci.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bind = sub.add_parser("bind", help="move a device to vfio-pci (driver_override)")
    bind.add_argument("bdf", help="PCI address, e.g. 0000:00:04.0")
    bind.add_argument(
        "--force", action="store_true", help="bind even if the host still uses the device"
    )
    unbind = sub.add_parser("unbind", help="give a device back to its host driver")
    unbind.add_argument("bdf", help="PCI address, e.g. 0000:00:04.0")
    host.set_defaults(func=main)
    return host


def _as_dict(device: PciHostDevice) -> dict[str, Any]:
    return {
        "bdf": device.bdf,
        "vendor": f"{device.vendor:04x}",
        "device": f"{device.device:04x}",
        "class": f"{device.class_code:06x}",
        "driver": device.driver,
        "iommu_group": device.iommu_group,
        "group_members": list(device.group_members),
        "description": device.description,
    }


def _print_table(host: HostPci, devices: list[PciHostDevice]) -> None:
    print(f"VFIO interface: {host.vfio_interface()}")
    rows = [("BDF", "ID", "CLASS", "DRIVER", "GROUP", "GROUP MEMBERS", "DESCRIPTION")]
    for d in devices:
        rows.append(
            (
                d.bdf,
                d.ids,
                f"{d.class_code:06x}",
                d.driver or "-",
                "none" if d.iommu_group is None else str(d.iommu_group),
                ",".join(d.group_members) or "-",
                d.description,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    if not host.iommu_enabled():
        print(
            "no IOMMU: no device is in an IOMMU group; passthrough needs VT-d/AMD-Vi on and "
            "the host booted with intel_iommu=on (or amd_iommu=on)"
        )


def main(args: argparse.Namespace, host: HostPci | None = None) -> int:
    """Run ``iovirt host <command>``; user errors propagate as UserError. ``host`` is the
    sysfs view to use (default: this machine's)."""
    host = host if host is not None else HostPci()
    if args.host_command == "pci":
        devices = host.devices()
        if args.json:
            print(
                json.dumps(
                    {
                        "vfio_interface": host.vfio_interface(),
                        "devices": [_as_dict(d) for d in devices],
                    },
                    indent=2,
                )
            )
        else:
            _print_table(host, devices)
        return 0
    if args.host_command == "bind":
        result = host.bind(args.bdf, force=args.force)
        device = result.device
        if result.previous_driver == device.driver:
            print(f"{device.bdf}: already bound to {device.driver}")
        else:
            print(
                f"{device.bdf}: {result.previous_driver or 'no driver'} -> {device.driver} "
                f"(IOMMU group {device.iommu_group})"
            )
        for member, driver in result.unbound_members:
            print(
                f"{device.bdf}: note: group member {member} is on "
                f"{driver or 'no driver'}; bind it too if it blocks the group"
            )
        return 0
    if args.host_command == "unbind":
        before = host.device(args.bdf)
        after = host.unbind(args.bdf)
        print(f"{after.bdf}: {before.driver or 'no driver'} -> {after.driver or 'no driver'}")
        return 0
    raise AssertionError(f"unknown host command {args.host_command!r}")


def _standalone(argv: list[str] | None = None) -> int:
    """``python -m iovirt.vfio.cli host ...`` with the main CLI's error handling."""
    from iovirt.errors import IovirtError, UserError

    parser = argparse.ArgumentParser(prog="iovirt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"iovirt: {e}", file=sys.stderr)
        return 1
    except IovirtError as e:
        print(f"iovirt: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_standalone())
