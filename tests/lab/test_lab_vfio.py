"""VFIO passthrough of a real (emulated) PCI device, end to end, in one lab boot.

The lab is a q35 machine with an emulated VT-d (intel-iommu, interrupt remapping) and an
emulated NVMe whose disk is an image file here on the host. Inside the lab,
tests/lab/_vfio_scenario.py lists the host's PCI devices, binds the NVMe to vfio-pci (after
a refused attempt while the lab uses it as swap), and passes it through with iovirt to a
nested stock Linux guest. The guest's nvme driver finds the namespace over MSI-X, writes a
random pattern and reads back the one written here before boot. Then the guest unbinds its
driver and programs the controller itself: an Identify whose data buffer is the host-physical
address of a canary page the lab side pinned (outside guest RAM) must end in an IOMMU fault
in the lab kernel's log and leave the canary as it was, while the same command aimed at
guest RAM delivers its data.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
MIB = 1 << 20
IMAGE_MIB = 64
PATTERN_MIB = 8  # the scenario's PATTERN_MIB
GUEST_AT = 0  # MiB: the guest's pattern
HOST_AT = 32  # MiB: the pattern written here
NVME_SERIAL = "IOVIRT-NVME-1"
QEMU_NVME_VENDOR = "1b36"

# Where the guest puts the NVMe admin queues and buffers when it drives the controller by
# hand: e820-reserved low memory (so /dev/mem may reach it) that is still guest RAM for
# the VMM, hence mapped for the device's DMA.
ASQ, ACQ, BUF = 0xA0000, 0xA1000, 0xA2000

GUEST_SCRIPT = f"""\
for i in $(seq 200); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ] || {{ echo "no nvme0n1"; exit 1; }}
BDF=$(basename "$(readlink -f /sys/class/nvme/nvme0/device)")
echo "bdf=$BDF"
echo "size=$(cat /sys/block/nvme0n1/size)"
echo "serial=$(cat /sys/class/nvme/nvme0/serial)"
dd if=/dev/urandom of=/tmp/pattern bs=1M count={PATTERN_MIB} status=none
echo "guest_pattern=$(sha256sum </tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/nvme0n1 bs=1M seek={GUEST_AT} oflag=direct conv=fsync status=none
sum=$(dd if=/dev/nvme0n1 bs=1M skip={HOST_AT} count={PATTERN_MIB} iflag=direct status=none \\
    | sha256sum)
echo "host_pattern=${{sum%% *}}"
modes=""
for f in /sys/bus/pci/devices/$BDF/msi_irqs/*; do modes="$modes $(cat "$f")"; done
echo "msi_modes=$modes"
grep nvme /proc/interrupts | sed 's/^/interrupts: /'
echo "nvme_interrupts=$(awk '/nvme/ {{ s += $2 }} END {{ print s + 0 }}' /proc/interrupts)"

# -- DMA isolation: drive the controller by hand ------------------------------------------
T=
for x in $(cat /proc/cmdline); do case "$x" in iovirt.dma_target=*) T=${{x#*=}};; esac; done
echo "dma_target=$T"
echo "$BDF" >/sys/bus/pci/drivers/nvme/unbind
R=$(( $(head -1 /sys/bus/pci/devices/$BDF/resource | cut -d' ' -f1) ))
# Memory decoding and bus mastering back on (the driver's unbind turned mastering off).
printf '\\006\\000' | dd of=/sys/bus/pci/devices/$BDF/config bs=1 seek=4 count=2 \\
    conv=notrunc status=none
rd() {{ echo $(( $(devmem "$1" 32) )); }}
wr() {{ devmem "$1" 32 "$2"; }}
zero() {{ i=0; while [ $i -lt "$2" ]; do wr $(( $1 + 4 * i )) 0; i=$((i + 1)); done; }}
sqe() {{  # address, command id, PRP1: Identify Controller
    zero "$1" 16
    wr "$1" $(( 0x06 | ($2 << 16) ))
    wr $(( $1 + 24 )) $(( $3 & 0xffffffff ))
    wr $(( $1 + 28 )) $(( $3 >> 32 ))
    wr $(( $1 + 40 )) 1
}}
waitcsts() {{  # until CSTS.RDY == $1
    n=0
    while [ $(( $(rd $((R + 0x1c))) & 1 )) -ne "$1" ]; do
        n=$((n + 1)); [ $n -lt 2000 ] || {{ echo "csts=$(rd $((R + 0x1c))) (stuck)"; return 1; }}
    done
}}
completion() {{  # CQ entry $1: the status field once its phase bit is set
    n=0
    while :; do
        dw3=$(rd $(( {ACQ:#x} + 16 * $1 + 12 )))
        [ $(( dw3 >> 16 & 1 )) -eq 1 ] && {{ echo $(( dw3 >> 17 & 0x7fff )); return 0; }}
        n=$((n + 1)); [ $n -lt 2000 ] || {{ echo "timeout(csts=$(rd $((R + 0x1c))))"; return 0; }}
    done
}}
wr $((R + 0x14)) 0
waitcsts 0
zero {ACQ:#x} 64
zero {BUF:#x} 4
sqe {ASQ:#x} 1 "$T"
wr $((R + 0x24)) 0x000f000f
wr $((R + 0x28)) {ASQ:#x}; wr $((R + 0x2c)) 0
wr $((R + 0x30)) {ACQ:#x}; wr $((R + 0x34)) 0
wr $((R + 0x14)) 0x00460001
waitcsts 1
wr $((R + 0x1000)) 1
echo "outside_status=$(completion 0)"
sqe $(( {ASQ:#x} + 64 )) 2 {BUF:#x}
wr $((R + 0x1000)) 2
echo "inside_status=$(completion 1)"
echo "identify_vid=$(printf '%04x' $(( $(rd {BUF:#x}) & 0xffff )))"
"""


@pytest.fixture(scope="module")
def scenario(lab: Lab) -> dict[str, Any]:
    work = REPO / "build" / "lab-tests" / "vfio"
    work.mkdir(parents=True, exist_ok=True)
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / "guest.img"
    initrd.write_bytes(guest_test_initramfs(kver, ["nvme"], GUEST_SCRIPT, timeout=200))
    image = work / "nvme.img"
    host_pattern = random.Random("vfio").randbytes(PATTERN_MIB * MIB)
    with image.open("wb") as f:
        f.truncate(IMAGE_MIB * MIB)
        f.seek(HOST_AT * MIB)
        f.write(host_pattern)
    # The lab fixture's class (it retries a frozen lab once), with the passthrough machine.
    passthrough_lab = type(lab)(
        machine="q35,kernel-irqchip=split",
        qemu_args=[
            "-device",
            "intel-iommu,intremap=on,caching-mode=on",
            "-drive",
            f"file={image},if=none,id=nvm,format=raw",
            "-device",
            f"nvme,drive=nvm,serial={NVME_SERIAL}",
        ],
        cmdline="intel_iommu=on",
    )
    command = shlex.join(
        [sys.executable, "tests/lab/_vfio_scenario.py", "--initrd", str(initrd), "--out", "/out"]
    )
    start = time.monotonic()
    result = passthrough_lab.run(command, cwd=REPO, timeout=600)
    wall = time.monotonic() - start
    print(f"lab run: {wall:.1f} s wall, QEMU {result.duration:.1f} s", file=sys.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.files["vfio-scenario.json"])
    console = result.files.get("guest-console.txt", b"").decode(errors="replace")
    rc, output = parse_guest_test_output(console)
    report["guest_rc"] = rc
    report["guest_console"] = console
    report["guest"] = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    report["vmm_log"] = result.files.get("vmm.log", b"").decode(errors="replace")
    report["image"] = image
    report["host_pattern_sum"] = hashlib.sha256(host_pattern).hexdigest()
    report["wall_s"] = wall
    # Kept for a look after a failure (the lab's own scratch folder is gone by then).
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def step(report: dict[str, Any], name: str) -> dict[str, Any]:
    values: dict[str, Any] = report["steps"].get(name, {})
    assert "error" not in values, values.get("traceback", values.get("error"))
    return values


def test_host_pci_lists_the_nvme_with_its_group(scenario: dict[str, Any]) -> None:
    found = step(scenario, "host_pci")
    bdf, group = found["nvme"], found["group"]
    assert isinstance(group, int)
    assert found["driver"] == "nvme"  # the lab's own driver had it first
    text = found["text"]["stdout"]
    assert "VFIO interface: type1 container + groups" in text  # no iommufd in 6.1
    row = next(line for line in text.splitlines() if line.startswith(bdf)).split()
    assert row[1:6] == ["1b36:0010", "010802", "nvme", str(group), bdf]
    listed = {d["bdf"]: d for d in found["json"]["devices"]}
    assert listed[bdf]["iommu_group"] == group
    assert listed[bdf]["group_members"] == [bdf]


def test_bind_refuses_a_device_the_host_uses(scenario: dict[str, Any]) -> None:
    attempt = step(scenario, "bind_in_use")
    assert attempt["swapon"]["rc"] == 0, attempt["swapon"]
    assert attempt["bind"]["rc"] == 1
    assert "/dev/nvme0n1 is in use as swap" in attempt["bind"]["stderr"]
    assert attempt["bind"]["stderr"].count("\n") == 1  # one line


def test_bind_moves_the_nvme_to_vfio_pci(scenario: dict[str, Any]) -> None:
    bound = step(scenario, "bind")
    assert bound["result"]["rc"] == 0, bound["result"]
    assert "nvme -> vfio-pci" in bound["result"]["stdout"]
    assert bound["driver"] == "vfio-pci"
    assert bound["vfio_node_exists"]


def test_the_vmm_passed_the_device_through(scenario: dict[str, Any]) -> None:
    vm = step(scenario, "vm")
    assert vm["exit_reason"] == "reset", vm  # the guest's reboot -f after its script
    assert vm["exit_error"] is None
    assert vm["reset_method"] == "function reset"
    assert vm["bars"] == {"0": ["mem64", 0x4000]}
    # The NVMe's registers and doorbells (BAR0 pages 0-1) are a KVM memory slot; the
    # MSI-X table and PBA pages trap.
    assert len(vm["mapped_ranges"]) == 1 and vm["mapped_ranges"][0][1] == 0x2000
    assert "VFIO: using type1 container + groups" in scenario["vmm_log"]
    assert scenario["guest_rc"] == 0, scenario["guest_console"][-4000:]


def test_guest_nvme_driver_finds_the_namespace(scenario: dict[str, Any]) -> None:
    guest = scenario["guest"]
    assert guest["size"] == str(IMAGE_MIB * MIB // 512)
    assert guest["serial"].strip() == NVME_SERIAL


def test_guest_uses_msix_interrupts(scenario: dict[str, Any]) -> None:
    guest, vm = scenario["guest"], step(scenario, "vm")
    modes = guest["msi_modes"].split()
    assert modes and set(modes) == {"msix"}, guest["msi_modes"]
    assert int(guest["nvme_interrupts"]) > 0
    assert "interrupts:" in scenario["guest_console"]
    assert vm["msix_table_bad_accesses"] == 0
    # After the guest's unbind the driver has freed its vectors: MSI-X is off again.
    assert vm["msix_vfio_enabled"] is False


def test_guest_pattern_is_in_the_image_file(scenario: dict[str, Any]) -> None:
    guest = scenario["guest"]
    with Path(scenario["image"]).open("rb") as f:
        f.seek(GUEST_AT * MIB)
        written = hashlib.sha256(f.read(PATTERN_MIB * MIB)).hexdigest()
    assert written == guest["guest_pattern"]
    # The lab's own nvme driver read the same bytes once the device was given back.
    back = step(scenario, "unbind")
    assert back["result"]["rc"] == 0, back["result"]
    assert back["driver"] == "nvme"
    assert back["lab_reads_guest_pattern"] == guest["guest_pattern"]


def test_host_pattern_reads_back_in_the_guest(scenario: dict[str, Any]) -> None:
    assert scenario["guest"]["host_pattern"] == scenario["host_pattern_sum"]


def test_dma_outside_guest_ram_faults_in_the_iommu(scenario: dict[str, Any]) -> None:
    guest, canary = scenario["guest"], step(scenario, "canary")
    target = canary["phys"]
    assert int(guest["dma_target"], 16) == target
    # QEMU's NVMe completes a command whose data DMA failed without an error status (it
    # only checks the residual count), so the completion just has to arrive: the
    # controller got the command from guest RAM and went on working.
    assert guest["outside_status"].isdigit(), guest
    # The same command with its buffer in guest RAM works: the fault is the IOMMU's doing.
    assert guest["inside_status"] == "0"
    assert guest["identify_vid"] == QEMU_NVME_VENDOR
    dmesg = step(scenario, "dmesg")["text"]
    bdf = step(scenario, "host_pci")["nvme"]
    short = bdf.split(":", 1)[1]  # "00:04.0"
    faults = [
        line
        for line in dmesg.splitlines()
        if "DMAR" in line or re.search(rf"\[{re.escape(short)}\].*fault addr", line)
    ]
    assert any(f"[{short}]" in line and f"fault addr {target:#x}" in line for line in faults), (
        "\n".join(faults[-20:])
    )


def test_nothing_of_the_host_changed(scenario: dict[str, Any]) -> None:
    canary = step(scenario, "canary")
    assert canary["same_page"]  # the page never moved, so it was the DMA's target
    assert canary["unchanged"]
