"""``iovirt`` command line: ``run`` a VM from a config file, ``check`` a config, take a
``screenshot`` of a running VM, list and bind ``host`` PCI devices for passthrough.

User mistakes (a bad config, a missing /dev/kvm, a permission) end with one line on stderr
that names the key or resource and what to do, and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from iovirt import __version__
from iovirt.backends import vhost_user_cli
from iovirt.boot.linux import kernel_release
from iovirt.config import (
    FileBlock,
    FileChar,
    SocketChar,
    VhostUserBackend,
    VmConfig,
    load_config,
)
from iovirt.errors import ConfigError, IovirtError, ResourceError, UserError
from iovirt.fuzz import cli as fuzz_cli
from iovirt.kvm.system import kvm_flavour
from iovirt.machine import build_vm, check_boot_files
from iovirt.vfio import cli as host_cli
from iovirt.vfio.board import check_passthrough
from iovirt.vm import VmExitReason

# How long `iovirt run` lets a lab run without --timeout: a stock guest that boots and
# ends takes about a minute there; one that waits for input would hang CI forever.
LAB_DEFAULT_TIMEOUT = 1800.0
log = logging.getLogger("iovirt")


def _cmd_screenshot(args: argparse.Namespace) -> int:
    from iovirt.backends.vnc import capture_png, parse_vnc_address

    host, port = parse_vnc_address(args.vnc)
    width, height = asyncio.run(
        capture_png(host, port, args.output, password=args.password, timeout=args.timeout)
    )
    print(f"{args.output}: {width}x{height}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_boot_files(config)
    check_passthrough(config.passthrough)
    print(f"{args.config}: ok")
    return 0


# Paths the lab does not share with the host (it mounts its own tmpfs or kernel fs there).
_LAB_PRIVATE = ("/run", "/dev", "/proc", "/sys")


def lab_reason(config: VmConfig) -> str | None:
    """Why this host's KVM cannot run ``config`` directly, or None if it can."""
    if config.vm.kernel is None:
        return None  # firmware and small guest programs run on any KVM, PVM included
    flavour = kvm_flavour()
    if flavour == "pvm":
        return "this host's KVM is PVM, which cannot boot a stock Linux kernel"
    if flavour == "none":
        return "this host has no hardware KVM (no kvm_intel or kvm_amd)"
    return None


def _check_lab_paths(config_path: str, config: VmConfig) -> None:
    # What the guest writes to host files inside the lab stays in the lab's overlay and
    # is gone when it powers off: refuse rather than lose a console log silently.
    backend = config.serial.backend
    if config.serial.log is not None or isinstance(backend, FileChar | SocketChar):
        key = "serial.log" if config.serial.log is not None else "serial.backend"
        raise ConfigError(
            key,
            "files and sockets are not brought back from the lab yet; use the stdio "
            "backend (the lab hands its output back) or a host with VT-x/AMD-V",
        )
    files = {
        "config": Path(config_path),
        "vm.kernel": config.vm.kernel,
        "vm.initrd": config.vm.initrd,
    }
    sockets = [
        f"disk.{i}" for i, d in enumerate(config.disk) if isinstance(d.backend, VhostUserBackend)
    ]
    sockets += [
        f"nic.{i}" for i, n in enumerate(config.nic) if isinstance(n.backend, VhostUserBackend)
    ]
    if sockets:
        raise ConfigError(
            f"{sockets[0]}.backend",
            "a vhost-user socket on this host cannot be reached from the lab; run the "
            "back-end and iovirt on a host with VT-x/AMD-V",
        )
    for i, disk in enumerate(config.disk):
        if isinstance(disk.backend, FileBlock):
            files[f"disk.{i}.backend.path"] = disk.backend.path
    for key, path in files.items():
        if path is None:
            continue
        absolute = Path(os.path.abspath(path))
        for private in _LAB_PRIVATE:
            if absolute.is_relative_to(private):
                raise ConfigError(
                    key,
                    f"{path} is under {private}, which the lab does not "
                    "share with the host; put it in another folder",
                )


def _disk_folders(config: VmConfig) -> list[Path]:
    """The folders of read-write disk images: the lab mounts them writable at the same
    path, so that what the guest writes (and flushes) is on the host's disk."""
    folders: list[Path] = []
    for disk in config.disk:
        if not isinstance(disk.backend, FileBlock):
            continue
        folder = Path(os.path.abspath(disk.backend.path)).parent
        if not disk.backend.readonly and folder not in folders:
            folders.append(folder)
    return folders


def _run_in_lab(args: argparse.Namespace, reason: str, config: VmConfig) -> int:
    from iovirt.lab import Lab, LabError

    _check_lab_paths(args.config, config)
    print(
        f"iovirt: {reason}; running the guest nested in an emulated lab (slower)",
        file=sys.stderr,
        flush=True,
    )
    inner = [sys.executable, "-m", "iovirt.cli", *(["-v"] * args.verbose), "run", "--no-lab"]
    if args.timeout is not None:
        inner += ["--timeout", str(args.timeout)]
    inner.append(os.path.abspath(args.config))
    # The lab's own boot and Python start-up come on top of the guest's time.
    lab_timeout = LAB_DEFAULT_TIMEOUT if args.timeout is None else args.timeout + 120
    # SIGTERM would kill us without unwinding, leaving the lab's QEMU running: turn it
    # into an exception so Lab.run's clean-up kills QEMU and removes its scratch folder.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = Lab().run(
            inner, cwd=os.getcwd(), timeout=lab_timeout, shares=_disk_folders(config)
        )
    except _Terminated:
        print("iovirt: terminating on signal 15; stopped the lab", file=sys.stderr)
        return 0
    except LabError as e:
        log.debug("lab console:\n%s", e.console)
        raise IovirtError(f"lab: {e.problem} (run with -vv for the lab console)") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


class _Terminated(Exception):
    """SIGTERM arrived while the lab ran."""


def _terminate(signo: int, frame: object) -> None:
    raise _Terminated


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    kernel = check_boot_files(config)  # parsed once, reused by build_vm below
    # Every passthrough mistake (no IOMMU, not bound to vfio-pci, a group that is not
    # viable, no permission) ends here, before a VM or the lab starts.
    check_passthrough(config.passthrough)
    reason = lab_reason(config)
    if args.lab or reason is not None:
        if config.passthrough:
            raise ConfigError(
                "passthrough",
                f"{reason or '--lab given'}, and the lab cannot reach this host's PCI "
                "devices; run on a host whose KVM is VT-x/AMD-V",
            )
        if args.no_lab:
            raise UserError(
                f"{reason}; drop --no-lab to run the guest nested in the lab, "
                "or use a host with VT-x/AMD-V"
            )
        return _run_in_lab(args, reason or "--lab given", config)
    with build_vm(config, kernel) as vm:
        result = vm.run(timeout=args.timeout)
    if result.error is not None:
        print(f"iovirt: {result.error}", file=sys.stderr)
    elif result.reason is VmExitReason.TIMEOUT:
        print(f"iovirt: guest still running after {args.timeout} s; stopped it", file=sys.stderr)
    else:
        log.info("guest ended: %s (status %d)", result.reason.value, result.exit_status)
    return result.exit_status


def _cmd_initramfs(args: argparse.Namespace) -> int:
    from iovirt.boot.initramfs import guest_test_initramfs

    kver = args.kver
    if kver is None:
        kernel = Path(args.kernel)
        try:
            kver = kernel_release(kernel.read_bytes())
        except OSError as e:
            raise ResourceError(str(kernel), f"cannot read: {e.strerror}") from e
        if kver is None:
            raise UserError(f"{kernel}: no release string in the kernel; pass --kver")
    if args.script is not None:
        try:
            script = Path(args.script).read_text()
        except OSError as e:
            raise ResourceError(args.script, f"cannot read: {e.strerror}") from e
    else:
        script = args.command or DEFAULT_GUEST_SCRIPT
    image = guest_test_initramfs(
        kver, args.module, script, timeout=args.guest_timeout, end=args.end
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(image)
    print(f"{out}: {len(image)} bytes, kernel {kver}, modules: {', '.join(args.module) or 'none'}")
    return 0


DEFAULT_GUEST_SCRIPT = """\
echo "Hello from Linux $(uname -r) on iovirt"
echo "cpus: $(grep -c ^processor /proc/cpuinfo)"
echo "memory: $(grep MemTotal /proc/meminfo)"
echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "pci:" $(ls /sys/bus/pci/devices)
for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    echo "disk: ${d##*/}, $(($(cat $d/size) / 2048)) MiB, serial $(cat $d/serial)"
done
"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iovirt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"iovirt {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a VM from a config file")
    run.add_argument("config", help="TOML config file")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop the guest after this many seconds (exit status 1)",
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--lab",
        action="store_true",
        help="run nested in the emulated lab even if this host's KVM could run the guest",
    )
    where.add_argument(
        "--no-lab",
        action="store_true",
        help="never fall back to the lab; fail if this host's KVM cannot boot the guest",
    )
    run.set_defaults(func=_cmd_run)

    image = sub.add_parser(
        "initramfs",
        help="build a busybox guest initramfs that runs a script and reboots",
        description="Build an initramfs from Debian's busybox-static and kernel modules. Its "
        "init runs a shell script between IOVIRT-TEST-BEGIN and IOVIRT-TEST-END rc=N lines on "
        "the console, then reboots or powers off (boot it with reboot=k panic=-1).",
    )
    image.add_argument("-o", "--output", required=True, help="where to write the initramfs")
    image.add_argument(
        "--kernel", default="/vmlinuz", help="kernel whose modules to use (default /vmlinuz)"
    )
    image.add_argument("--kver", help="module release (default: read from --kernel)")
    image.add_argument(
        "-m",
        "--module",
        action="append",
        default=[],
        help="kernel module to load, with its dependencies (repeatable)",
    )
    what = image.add_mutually_exclusive_group()
    what.add_argument("--script", help="shell script file to run in the guest")
    what.add_argument("--command", help="shell text to run in the guest")
    image.add_argument(
        "--guest-timeout", type=int, default=None, help="kill the script after this many seconds"
    )
    image.add_argument(
        "--end",
        choices=("reboot", "poweroff"),
        default="reboot",
        help="how the guest ends after the script (default reboot)",
    )
    image.set_defaults(func=_cmd_initramfs)

    shot = sub.add_parser(
        "screenshot",
        help="write a PNG of a running VM's screen (through its VNC server)",
        description="Connect to the VNC server of a running VM ([display] vnc in its config) "
        "and write one full frame as a PNG.",
    )
    shot.add_argument("vnc", help="the VNC address: host:port, host::port or :N")
    shot.add_argument("output", help="the PNG file to write")
    shot.add_argument("--password", default=None, help="the VNC password, if it has one")
    shot.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    shot.set_defaults(func=_cmd_screenshot)

    host_cli.register(sub)
    vhost_user_cli.register(sub)
    fuzz_cli.register(sub)

    check = sub.add_parser("check", help="validate a config file without running it")
    check.add_argument("config", help="TOML config file")
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="iovirt: %(name)s: %(message)s")
    try:
        status: int = args.func(args)
    except UserError as e:
        print(f"iovirt: {e}", file=sys.stderr)
        return 1
    except IovirtError as e:
        # Not the user's fault, but still one line; -vv shows the traceback.
        log.debug("details", exc_info=True)
        print(f"iovirt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
