"""The lab side of tests/lab/test_lab_vfio.py: run as root INSIDE the lab, not by pytest.

    .venv/bin/python tests/lab/_vfio_scenario.py --initrd GUEST.img --out /out

The lab is a q35 machine with an emulated VT-d (intel-iommu) and an emulated NVMe backed by
an image file on the host. This script:

1. loads the lab's nvme driver, so that the NVMe starts out as a host disk;
2. runs ``iovirt host pci`` (text and JSON): the NVMe must be listed with its IOMMU group;
3. makes the NVMe's namespace the lab's swap and runs ``iovirt host bind``, which must
   refuse; then swapoff, and ``iovirt host bind`` again, which must move it to vfio-pci;
4. pins a canary buffer in this process and finds its host-physical address through
   /proc/self/pagemap (above the guest's RAM): the address the guest will aim a DMA at;
5. builds a VM with the iovirt API -- a stock kernel, the guest initramfs, 256 MiB -- and
   adds the NVMe with :func:`iovirt.vfio.board.add_passthrough` (the same call the board
   makes for ``[[passthrough]]``), runs it to its end and records what the VMM saw;
6. ``iovirt host unbind`` gives the NVMe back to the lab's nvme driver, which reads the
   guest's pattern back from the disk;
7. saves the lab kernel's log (the IOMMU fault must be in it) and checks the canary.

Everything goes to ``OUT/vfio-scenario.json`` as it happens (a failing step is recorded
with its error, and the rest still runs where it can). The script does not judge: the
test does.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import mmap
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iovirt.config import parse_config
from iovirt.kvm.platform import KvmPlatform
from iovirt.machine import build_vm
from iovirt.vfio.board import add_passthrough, check_passthrough
from iovirt.vfio.device import VfioPciDevice
from iovirt.vfio.host import HostPci

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
NVME_CLASS = 0x010802
PAGE = 4096
CANARY_PAGES = 256
CANARY_MIN_PHYS = 1 << 30  # well above the guest's 256 MiB of RAM (IOVA = guest address)
GUEST_MEMORY = "256M"
VM_TIMEOUT = 300
MIB = 1 << 20
PATTERN_MIB = 8


@dataclass
class Entry:
    """One ``[[passthrough]]`` table, as the config model will carry it."""

    host: str
    iommu: str = "auto"


class Report:
    """The JSON file the test reads, rewritten after every step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"steps": {}}

    def step(self, name: str, **values: Any) -> None:
        self.data["steps"].setdefault(name, {}).update(values)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def iovirt_host(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "iovirt.vfio.cli", "host", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def run(*argv: str) -> dict[str, Any]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def wait_for(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.1)
    return path.exists()


def pin_canary() -> tuple[mmap.mmap, bytes, int, int]:
    """(buffer, its contents, the chosen page's index, that page's physical address)."""
    buf = mmap.mmap(-1, CANARY_PAGES * PAGE)
    contents = hashlib.shake_256(b"iovirt canary").digest(CANARY_PAGES * PAGE)
    buf.write(contents)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(CANARY_PAGES * PAGE)) != 0:
        raise OSError(ctypes.get_errno(), "mlock of the canary failed")
    for index, phys in enumerate(page_frames(addr, CANARY_PAGES)):
        if phys >= CANARY_MIN_PHYS:
            return buf, contents, index, phys
    raise RuntimeError("no canary page above 1 GiB")


def page_frames(addr: int, pages: int) -> list[int]:
    """Physical addresses of the pages at virtual ``addr`` (0 where not present)."""
    out = []
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        raw = f.read(8 * pages)
    for i in range(pages):
        entry = int.from_bytes(raw[8 * i : 8 * i + 8], "little")
        present = entry >> 63 & 1
        out.append((entry & ((1 << 55) - 1)) * PAGE if present else 0)
    return out


def run_vm(report: Report, bdf: str, initrd: Path, out: Path, target: int) -> None:
    config = parse_config(
        {
            "vm": {
                "memory": GUEST_MEMORY,
                "vcpus": 1,
                "kernel": str(KERNEL),
                "initrd": str(initrd),
                "cmdline": (f"console=ttyS0 panic=-1 reboot=k quiet iovirt.dma_target={target:#x}"),
            },
            "serial": {"backend": {"kind": "file", "path": str(out / "guest-console.txt")}},
        }
    )
    entries = [Entry(bdf)]
    check_passthrough(entries)  # what `iovirt run` checks before anything starts
    start = time.monotonic()
    vm = build_vm(config)
    try:
        # The board's own KvmPlatform is not reachable from outside build_vm; a second one
        # is safe here because this board has no other MSI user (GSIs start free in both).
        platform = KvmPlatform(vm)
        functions: list[VfioPciDevice] = add_passthrough(vm, platform, entries)
        device = functions[0]
        report.step(
            "vm",
            guest_slot=next(devfn >> 3 for devfn, f in vm.pci.functions.items() if f is device)
            if vm.pci is not None
            else None,
            reset_method=device.reset_method,
            bars={i: [bar.kind.value, bar.size] for i, bar in device.bars.items()},
            built_s=round(time.monotonic() - start, 2),
        )
        result = vm.run(timeout=VM_TIMEOUT)
        msix = device.msix
        report.step(
            "vm",
            exit_reason=result.reason.value,
            exit_error=str(result.error) if result.error else None,
            run_s=round(time.monotonic() - start, 2),
            mapped_ranges=device.mapped_ranges(),
            msix_vfio_enabled=msix.vfio_enabled if msix else None,
            msix_unmasked=[i for i in range(msix.table_size) if not msix.masked(i)]
            if msix
            else None,
            msix_table_bad_accesses=msix.bad_accesses.count if msix else None,
            bar_bad_accesses=device.bad_accesses.count,
            device_errors=vm.device_errors,
        )
    finally:
        vm.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: Path = args.out
    logging.basicConfig(
        level=logging.INFO,
        filename=str(out / "vmm.log"),
        format="%(asctime)s %(name)s: %(message)s",
    )
    report = Report(out / "vfio-scenario.json")
    bdf: str | None = None

    def guarded(name: str, func: Any) -> Any:
        try:
            return func()
        except BaseException as e:
            report.step(name, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            return None

    def discover() -> str:
        report.step("modprobe", **run("modprobe", "nvme"))
        report.step("modprobe", disk=wait_for(Path("/dev/nvme0n1"), 20))
        report.step("host_pci", text=iovirt_host("pci"))
        listing = iovirt_host("pci", "--json")
        report.step("host_pci", json=json.loads(listing["stdout"]) if listing["rc"] == 0 else None)
        nvme = next(d for d in HostPci().devices() if d.class_code == NVME_CLASS)
        report.step("host_pci", nvme=nvme.bdf, group=nvme.iommu_group, driver=nvme.driver)
        return nvme.bdf

    bdf = guarded("host_pci", discover)
    if bdf is None:
        return 0

    def refuse_then_bind() -> None:
        report.step("bind_in_use", mkswap=run("mkswap", "/dev/nvme0n1"))
        report.step("bind_in_use", swapon=run("swapon", "/dev/nvme0n1"))
        report.step("bind_in_use", bind=iovirt_host("bind", bdf))
        report.step("bind_in_use", swapoff=run("swapoff", "/dev/nvme0n1"))
        report.step("bind", result=iovirt_host("bind", bdf))
        device = HostPci().device(bdf)
        report.step(
            "bind",
            driver=device.driver,
            vfio_node=f"/dev/vfio/{device.iommu_group}",
            vfio_node_exists=Path(f"/dev/vfio/{device.iommu_group}").exists(),
        )

    guarded("bind", refuse_then_bind)
    canary = guarded("canary", pin_canary)
    if canary is not None:
        buf, contents, index, phys = canary
        report.step("canary", page=index, phys=phys)
        started = time.monotonic()
        guarded("vm", lambda: run_vm(report, bdf, args.initrd, out, phys))
        report.step("vm", wall_s=round(time.monotonic() - started, 2))
        virt = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        report.step(
            "canary",
            unchanged=bytes(buf[:]) == contents,
            same_page=page_frames(virt, CANARY_PAGES)[index] == phys,
        )

    def give_back() -> None:
        report.step("unbind", result=iovirt_host("unbind", bdf))
        device = HostPci().device(bdf)
        report.step("unbind", driver=device.driver)
        disk = Path("/dev/nvme0n1")
        if wait_for(disk, 20):
            with disk.open("rb") as f:
                data = f.read(PATTERN_MIB * MIB)
            report.step("unbind", lab_reads_guest_pattern=hashlib.sha256(data).hexdigest())

    guarded("unbind", give_back)
    report.step("dmesg", text=run("dmesg")["stdout"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
