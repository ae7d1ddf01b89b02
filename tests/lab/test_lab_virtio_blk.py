"""virtio-blk driven by the stock guest's virtio_blk driver, over virtio-pci and
virtio-mmio, in one lab boot.

The VM is started with ``iovirt run`` as a user would; on a PVM host that goes through
the lab, which mounts the disk images' folder writable at the same path, so what the guest
writes and flushes is checked here, on the host, in the very files:

- disk ``pci-rw`` (virtio-pci, packed ring offered): the guest writes a 32 MiB random
  pattern with O_DIRECT and fsync, and reads back a 32 MiB pattern the host wrote;
  the host then compares checksums, and checks that a discarded range reads as zeros;
- disk ``mmio-rw`` (virtio-mmio, split ring only): the same round trip, 8 MiB;
- disk ``pci-ro`` (read-only): the guest's write fails and the file is unchanged.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
MIB = 1 << 20
CMDLINE = "console=ttyS0 panic=-1 reboot=k quiet"

# Offsets (MiB) inside the read-write images.
GUEST_PATTERN_AT = 0  # the guest writes its pattern here
HOST_PATTERN_AT = 64  # the host wrote its pattern here before boot
DISCARD_AT = 100  # filled with 0xAA by the host, discarded by the guest

GUEST_SCRIPT = (
    """\
disk() {  # the vdX whose serial is $1
    for d in /sys/block/vd*; do
        if [ "$(cat $d/serial)" = "$1" ]; then basename $d; return; fi
    done
    echo "no disk with serial $1" >&2; return 1
}
for serial in pci-rw mmio-rw pci-ro; do
    d=$(disk $serial)
    echo "$serial.size=$(cat /sys/block/$d/size)"
    echo "$serial.ro=$(cat /sys/block/$d/ro)"
    echo "$serial.path=$(readlink -f /sys/block/$d/device)"
done
roundtrip() {  # serial, MiB of pattern
    d=$(disk $1)
    dd if=/dev/urandom of=/tmp/pattern bs=1M count=$2 status=none
    echo "$1.guest_pattern=$(sha256sum </tmp/pattern | cut -d' ' -f1)"
    dd if=/tmp/pattern of=/dev/$d bs=1M seek=@GUEST_AT@ oflag=direct conv=fsync status=none
    rm /tmp/pattern
    sum=$(dd if=/dev/$d bs=1M skip=@HOST_AT@ count=$2 iflag=direct status=none | sha256sum)
    echo "$1.host_pattern=$(echo $sum | cut -d' ' -f1)"
}
roundtrip pci-rw 32
roundtrip mmio-rw 8
blkdiscard -o $((@DISCARD_AT@ * 1048576)) -l 1048576 /dev/$(disk pci-rw)
sync
if dd if=/dev/zero of=/dev/$(disk pci-ro) bs=4096 count=1 oflag=direct status=none 2>/dev/null
then echo "pci-ro.write=accepted"; else echo "pci-ro.write=refused"; fi
""".replace("@GUEST_AT@", str(GUEST_PATTERN_AT))
    .replace("@HOST_AT@", str(HOST_PATTERN_AT))
    .replace("@DISCARD_AT@", str(DISCARD_AT))
)


def _make_image(path: Path, size_mib: int, seed: int, pattern_mib: int) -> str:
    """A raw image with a random pattern at HOST_PATTERN_AT and 0xAA at DISCARD_AT;
    returns the pattern's sha256."""
    rng = random.Random(seed)
    pattern = rng.randbytes(pattern_mib * MIB)
    with path.open("wb") as f:
        f.truncate(size_mib * MIB)
        f.seek(HOST_PATTERN_AT * MIB)
        f.write(pattern)
        f.seek(DISCARD_AT * MIB)
        f.write(b"\xaa" * MIB)
    return hashlib.sha256(pattern).hexdigest()


def _sha256_of(path: Path, at_mib: int, mib: int) -> str:
    with path.open("rb") as f:
        f.seek(at_mib * MIB)
        return hashlib.sha256(f.read(mib * MIB)).hexdigest()


@pytest.fixture(scope="module")
def run(lab: Lab) -> dict[str, object]:
    work = REPO / "build" / "lab-tests" / "virtio-blk"
    work.mkdir(parents=True, exist_ok=True)
    images = {name: work / f"{name}.img" for name in ("pci-rw", "mmio-rw", "pci-ro")}
    host_sums = {
        "pci-rw": _make_image(images["pci-rw"], 128, 1, 32),
        "mmio-rw": _make_image(images["mmio-rw"], 112, 2, 8),
    }
    images["pci-ro"].write_bytes(random.Random(3).randbytes(8 * MIB))
    ro_sum_before = hashlib.sha256(images["pci-ro"].read_bytes()).hexdigest()
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / "guest.img"
    initrd.write_bytes(
        guest_test_initramfs(
            kver, ["virtio_blk", "virtio_pci", "virtio_mmio"], GUEST_SCRIPT, end="poweroff"
        )
    )
    cfg = work / "vm.toml"
    cfg.write_text(
        f"""\
[vm]
memory = "256M"
vcpus = 2
kernel = "{KERNEL}"
initrd = "{initrd}"
cmdline = "{CMDLINE}"

[serial]
backend = {{ kind = "stdio", input = false }}

[[disk]]
model = "virtio-blk"
transport = "pci"
serial = "pci-rw"
queues = 2
backend = {{ kind = "file", path = "{images["pci-rw"]}" }}

[[disk]]
model = "virtio-blk"
transport = "mmio"
serial = "mmio-rw"
packed = false
backend = {{ kind = "file", path = "{images["mmio-rw"]}" }}

[[disk]]
model = "virtio-blk"
transport = "pci"
serial = "pci-ro"
backend = {{ kind = "file", path = "{images["pci-ro"]}", readonly = true }}
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "iovirt.cli", "-v", "run", "--timeout", "600", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    rc, output = parse_guest_test_output(proc.stdout)
    assert rc == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return {
        "proc": proc,
        "report": report,
        "images": images,
        "host_sums": host_sums,
        "ro_sum_before": ro_sum_before,
    }


def test_guest_powers_off_through_acpi_and_the_vm_ends_cleanly(run: dict[str, object]) -> None:
    proc = run["proc"]
    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # poweroff -f went through the FADT's sleep control register (S5), not the halt poll
    assert "guest ended: poweroff (status 0)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_guest_sees_each_disk_with_its_size_and_transport(run: dict[str, object]) -> None:
    report = run["report"]
    assert isinstance(report, dict)
    assert report["pci-rw.size"] == str(128 * MIB // 512)
    assert report["mmio-rw.size"] == str(112 * MIB // 512)
    assert report["pci-ro.size"] == str(8 * MIB // 512)
    assert "/pci0000:00/" in report["pci-rw.path"]
    assert "/pci0000:00/" in report["pci-ro.path"]
    assert "virtio-mmio" in report["mmio-rw.path"] or "LNRO0005" in report["mmio-rw.path"]
    assert (report["pci-rw.ro"], report["mmio-rw.ro"], report["pci-ro.ro"]) == ("0", "0", "1")


@pytest.mark.parametrize("serial, mib", [("pci-rw", 32), ("mmio-rw", 8)])
def test_guest_written_pattern_is_in_the_host_file(
    run: dict[str, object], serial: str, mib: int
) -> None:
    report, images = run["report"], run["images"]
    assert isinstance(report, dict) and isinstance(images, dict)
    assert _sha256_of(images[serial], GUEST_PATTERN_AT, mib) == report[f"{serial}.guest_pattern"]


@pytest.mark.parametrize("serial", ["pci-rw", "mmio-rw"])
def test_host_written_pattern_reads_back_in_the_guest(run: dict[str, object], serial: str) -> None:
    report, host_sums = run["report"], run["host_sums"]
    assert isinstance(report, dict) and isinstance(host_sums, dict)
    assert report[f"{serial}.host_pattern"] == host_sums[serial]


def test_discarded_range_reads_as_zeros_on_the_host(run: dict[str, object]) -> None:
    images = run["images"]
    assert isinstance(images, dict)
    with images["pci-rw"].open("rb") as f:
        f.seek(DISCARD_AT * MIB)
        assert f.read(MIB) == bytes(MIB)


def test_read_only_disk_refuses_writes(run: dict[str, object]) -> None:
    report, images = run["report"], run["images"]
    assert isinstance(report, dict) and isinstance(images, dict)
    assert report["pci-ro.write"] == "refused"
    assert hashlib.sha256(images["pci-ro"].read_bytes()).hexdigest() == run["ro_sum_before"]
