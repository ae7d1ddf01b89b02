"""iovirt's VMM on a vhost-user disk that qemu-storage-daemon serves, in one lab boot.

Inside the lab, next to iovirt (a UNIX socket does not cross the lab's 9p share):
qemu-storage-daemon exports a raw image (in a writable share, so the host checks the very
file) as a vhost-user-blk back-end; ``iovirt run`` boots the stock guest with a
``[[disk]]`` whose backend is ``{ kind = "vhost-user", socket = ... }`` and nothing else
of the disk changed. The guest's virtio_blk driver sees the capacity the daemon reports,
writes a random pattern with O_DIRECT and fsync, and reads back one the host wrote.
"""

from __future__ import annotations

import hashlib
import random
import shlex
import sys
from pathlib import Path

import pytest

from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
MIB = 1 << 20
DISK_MIB = 64
GUEST_AT, HOST_AT, PATTERN_MIB = 0, 32, 8
SOCKET = "/tmp/iovirt-qsd.sock"

GUEST_SCRIPT = f"""\
d=vda
echo "size=$(cat /sys/block/$d/size)"
echo "driver=$(basename $(readlink /sys/block/$d/device/driver))"
dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MIB} status=none
echo "guest_pattern=$(sha256sum </tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/$d bs=1M seek={GUEST_AT} oflag=direct conv=fsync status=none
rm /tmp/pattern
h=$(dd if=/dev/$d bs=1M skip={HOST_AT} count={PATTERN_MIB} iflag=direct status=none | sha256sum)
echo "host_pattern=${{h%% *}}"
"""

# The lab side: the daemon, then the VM, then the daemon stopped (which flushes).
LAB_SCRIPT = """\
set -u
rm -f {socket}
addr=addr.type=unix,addr.path={socket}
qemu-storage-daemon \\
  --blockdev driver=file,node-name=file0,filename={image},cache.direct=off \\
  --blockdev driver=raw,node-name=disk0,file=file0 \\
  --export type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,$addr \\
  >{out}/qsd.log 2>&1 &
qsd=$!
i=0
while [ ! -S {socket} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
{python} -m iovirt.cli -v run --no-lab --timeout 240 {config} >{out}/console.log 2>{out}/vm.err
echo $? >{out}/vm.rc
kill $qsd
wait $qsd
echo $? >{out}/qsd.rc
"""


def _vm_config(initrd: Path) -> str:
    return f"""\
[vm]
memory = "256M"
kernel = "{KERNEL}"
initrd = "{initrd}"
cmdline = "console=ttyS0 panic=-1 reboot=k quiet"

[serial]
backend = {{ kind = "stdio", input = false }}

[[disk]]
model = "virtio-blk"
backend = {{ kind = "vhost-user", socket = "{SOCKET}" }}
"""


@pytest.fixture(scope="module")
def run(lab: Lab) -> dict[str, object]:
    work = REPO / "build" / "lab-tests" / "vhost-user"
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    image = out / "disk.img"
    host_pattern = random.Random(11).randbytes(PATTERN_MIB * MIB)
    with open(image, "wb") as f:
        f.truncate(DISK_MIB * MIB)
        f.seek(HOST_AT * MIB)
        f.write(host_pattern)
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / "guest.img"
    initrd.write_bytes(
        guest_test_initramfs(kver, ["virtio_blk", "virtio_pci"], GUEST_SCRIPT, timeout=180)
    )
    config = work / "vm.toml"
    config.write_text(_vm_config(initrd))
    script = LAB_SCRIPT.format(
        socket=SOCKET,
        image="/out/disk.img",
        out="/out",
        python=shlex.quote(sys.executable),
        config=shlex.quote(str(config)),
    )
    result = lab.run(
        script, cwd=REPO, env={"PYTHONDONTWRITEBYTECODE": "1"}, timeout=600, out_dir=out
    )
    console = (
        (out / "console.log").read_text(errors="replace") if (out / "console.log").exists() else ""
    )
    rc, output = parse_guest_test_output(console)
    return {
        "lab_stderr": result.stderr,
        "vm_rc": (out / "vm.rc").read_text().strip() if (out / "vm.rc").exists() else None,
        "vm_err": (out / "vm.err").read_text(errors="replace") if (out / "vm.err").exists() else "",
        "qsd_log": (out / "qsd.log").read_text(errors="replace")
        if (out / "qsd.log").exists()
        else "",
        "console": console,
        "guest_rc": rc,
        "guest": dict(line.split("=", 1) for line in output.splitlines() if "=" in line),
        "image": image.read_bytes(),
        "host_pattern": hashlib.sha256(host_pattern).hexdigest(),
    }


def _failure(run: dict[str, object]) -> str:
    return (
        f"vm rc {run['vm_rc']}\nconsole:\n{str(run['console'])[-2000:]}\n"
        f"vm stderr:\n{str(run['vm_err'])[-2000:]}\nqsd:\n{run['qsd_log']}\n"
        f"lab:\n{str(run['lab_stderr'])[-2000:]}"
    )


def test_vm_on_qsd_export_ends_cleanly(run: dict[str, object]) -> None:
    assert run["vm_rc"] == "0", _failure(run)
    assert run["guest_rc"] == 0, _failure(run)
    assert "Traceback" not in str(run["vm_err"])


def test_guest_sees_the_daemons_disk(run: dict[str, object]) -> None:
    guest = run["guest"]
    assert isinstance(guest, dict)
    assert guest.get("size") == str(DISK_MIB * MIB // 512), _failure(run)
    assert guest.get("driver") == "virtio_blk"


def test_guest_pattern_is_in_the_image_file(run: dict[str, object]) -> None:
    guest = run["guest"]
    assert isinstance(guest, dict) and isinstance(run["image"], bytes)
    written = run["image"][GUEST_AT * MIB : (GUEST_AT + PATTERN_MIB) * MIB]
    assert hashlib.sha256(written).hexdigest() == guest.get("guest_pattern"), _failure(run)


def test_host_pattern_reads_back_in_the_guest(run: dict[str, object]) -> None:
    guest = run["guest"]
    assert isinstance(guest, dict)
    assert guest.get("host_pattern") == run["host_pattern"], _failure(run)
