"""The same disk test for every disk model, with only the config's ``model`` changed.

One lab boot runs one VM per model (virtio-blk, ahci), each booting the stock kernel with
a 64 MiB raw image. The guest finds its one disk (vdX or sdX) and reports its size and
model string, writes a 16 MiB random pattern with O_DIRECT and fsync, and reads back a
16 MiB pattern the host wrote before boot; the host then checks the image file.
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

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
MIB = 1 << 20
IMAGE_MIB = 64
PATTERN_MIB = 16
GUEST_AT = 0  # MiB: the guest's pattern
HOST_AT = 32  # MiB: the host's pattern
MODELS = ("virtio-blk", "ahci")
MODULES = ["virtio_blk", "virtio_pci", "ahci", "sd_mod"]
AHCI_MODEL = "iovirt SATA disk"  # what iovirt's AHCI disk reports in IDENTIFY

GUEST_SCRIPT = f"""\
disk=
for d in /sys/block/vd* /sys/block/sd*; do [ -e "$d" ] && disk=${{d##*/}}; done
[ -n "$disk" ] || {{ echo "no disk"; exit 1; }}
echo "name=$disk"
echo "size=$(cat /sys/block/$disk/size)"
if [ -e /sys/block/$disk/device/model ]; then
    echo "model=$(cat /sys/block/$disk/device/model)"
fi
dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MIB} status=none
echo "guest_pattern=$(sha256sum </tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/$disk bs=1M seek={GUEST_AT} oflag=direct conv=fsync status=none
sum=$(dd if=/dev/$disk bs=1M skip={HOST_AT} count={PATTERN_MIB} iflag=direct status=none \\
    | sha256sum)
echo "host_pattern=${{sum%% *}}"
"""


def _config(model: str, image: Path, initrd: Path) -> str:
    return f"""\
[vm]
memory = "256M"
vcpus = 1
kernel = "{KERNEL}"
initrd = "{initrd}"
cmdline = "console=ttyS0 panic=-1 reboot=k quiet"

[serial]
backend = {{ kind = "stdio", input = false }}

[[disk]]
model = "{model}"
backend = {{ kind = "file", path = "{image}" }}
"""


@pytest.fixture(scope="module")
def runs(lab: Lab) -> dict[str, dict[str, object]]:
    work = REPO / "build" / "lab-tests" / "disk-models"
    work.mkdir(parents=True, exist_ok=True)
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / "guest.img"
    initrd.write_bytes(guest_test_initramfs(kver, MODULES, GUEST_SCRIPT))
    commands = []
    expected: dict[str, dict[str, object]] = {}
    for model in MODELS:
        image = work / f"{model}.img"
        pattern = random.Random(model).randbytes(PATTERN_MIB * MIB)
        with image.open("wb") as f:
            f.truncate(IMAGE_MIB * MIB)
            f.seek(HOST_AT * MIB)
            f.write(pattern)
        config = work / f"{model}.toml"
        config.write_text(_config(model, image, initrd))
        expected[model] = {"image": image, "host_sum": hashlib.sha256(pattern).hexdigest()}
        run = shlex.join(
            [sys.executable, "-m", "iovirt.cli", "run", "--no-lab", "--timeout", "300", str(config)]
        )
        commands.append(
            f"{run} >/out/{model}.stdout 2>/out/{model}.stderr; echo $? >/out/{model}.rc"
        )
    result = lab.run("\n".join(commands), cwd=REPO, timeout=500, shares=[work])
    assert result.returncode == 0, result.stderr
    for model in MODELS:
        stdout = result.files[f"{model}.stdout"].decode()
        rc, output = parse_guest_test_output(stdout)
        assert rc == 0, stdout[-3000:] + result.files[f"{model}.stderr"].decode()[-2000:]
        expected[model]["vm_rc"] = int(result.files[f"{model}.rc"])
        expected[model]["report"] = dict(
            line.split("=", 1) for line in output.splitlines() if "=" in line
        )
    return expected


@pytest.mark.parametrize("model", MODELS)
def test_vm_ends_with_status_zero(runs: dict[str, dict[str, object]], model: str) -> None:
    assert runs[model]["vm_rc"] == 0


@pytest.mark.parametrize("model", MODELS)
def test_guest_driver_sees_the_disk_with_its_size(
    runs: dict[str, dict[str, object]], model: str
) -> None:
    report = runs[model]["report"]
    assert isinstance(report, dict)
    assert report["size"] == str(IMAGE_MIB * MIB // 512)
    assert report["name"].startswith("vd" if model == "virtio-blk" else "sd")
    if model == "ahci":
        assert report["model"].strip() == AHCI_MODEL  # IDENTIFY's model string, via libata


@pytest.mark.parametrize("model", MODELS)
def test_guest_pattern_is_in_the_host_file(runs: dict[str, dict[str, object]], model: str) -> None:
    report, image = runs[model]["report"], runs[model]["image"]
    assert isinstance(report, dict) and isinstance(image, Path)
    with image.open("rb") as f:
        f.seek(GUEST_AT * MIB)
        assert hashlib.sha256(f.read(PATTERN_MIB * MIB)).hexdigest() == report["guest_pattern"]


@pytest.mark.parametrize("model", MODELS)
def test_host_pattern_reads_back_in_the_guest(
    runs: dict[str, dict[str, object]], model: str
) -> None:
    report = runs[model]["report"]
    assert isinstance(report, dict)
    assert report["host_pattern"] == runs[model]["host_sum"]
