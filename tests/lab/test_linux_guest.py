"""A stock Linux guest (Debian's kernel, its own drivers) booted by our VMM in the lab.

One boot serves every test here: ``iovirt run CONFIG`` is started on this host as a user
would start it. On a PVM host it must say in one line that it falls back to the lab,
then our VMM runs nested there and boots the kernel to our busybox init, which reports
what the guest sees and reboots (``reboot=k``: the i8042 reset line ends the VM).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.kvm.system import kvm_flavour
from iovirt.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
CMDLINE = "console=ttyS0 panic=-1 reboot=k iovirt.lab-test=1"

GUEST_SCRIPT = """\
echo "cmdline=$(cat /proc/cmdline)"
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
cd /sys/bus/pci/devices/0000:00:00.0
echo "pci=$(cat vendor):$(cat device)"
cd /
echo "serial=$(cat /proc/tty/driver/serial | grep -c 'uart:16550A')"
echo "rtc=$(cat /sys/class/rtc/rtc0/name)"
echo "mem=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
"""


def boot_guest(
    name: str, script: str, cmdline: str, vcpus: int, end: str
) -> subprocess.CompletedProcess[str]:
    """Build an initramfs running ``script``, write a config, and ``iovirt run`` it as a
    user would (so on this PVM host it goes through the lab fallback)."""
    # Files the lab must read live under build/, next to the checkout.
    work = REPO / "build" / "lab-tests"
    work.mkdir(parents=True, exist_ok=True)
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / f"{name}.img"
    initrd.write_bytes(guest_test_initramfs(kver, [], script, end=end))
    cfg = work / f"{name}.toml"
    cfg.write_text(
        "[vm]\n"
        'memory = "256M"\n'
        f"vcpus = {vcpus}\n"
        f'kernel = "{KERNEL}"\n'
        f'initrd = "{initrd}"\n'
        f'cmdline = "{cmdline}"\n'
        "\n[serial]\n"
        'backend = { kind = "stdio", input = false }\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "iovirt.cli", "-v", "run", "--timeout", "600", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )


@pytest.fixture(scope="module")
def boot(lab: Lab) -> subprocess.CompletedProcess[str]:
    return boot_guest("reboot", GUEST_SCRIPT, CMDLINE, vcpus=2, end="reboot")


def guest_report(boot: subprocess.CompletedProcess[str]) -> dict[str, str]:
    rc, output = parse_guest_test_output(boot.stdout)
    assert rc == 0, boot.stdout[-3000:] + boot.stderr[-2000:]
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_guest_boots_and_reboot_ends_the_vm_with_status_zero(
    boot: subprocess.CompletedProcess[str],
) -> None:
    assert boot.returncode == 0, boot.stderr[-2000:]
    assert "reboot: Restarting system" in boot.stdout


def test_lab_fallback_is_announced_in_one_line(boot: subprocess.CompletedProcess[str]) -> None:
    assert kvm_flavour() == "pvm", "this test documents the PVM fallback"
    lines = boot.stderr.splitlines()
    assert lines[0].startswith("iovirt: this host's KVM is PVM")
    assert lines[0].endswith("running the guest nested in an emulated lab (slower)")
    assert "Traceback" not in boot.stderr


def test_console_carries_the_kernels_boot_messages(boot: subprocess.CompletedProcess[str]) -> None:
    assert "Linux version 6." in boot.stdout
    assert f"Command line: {CMDLINE}" in boot.stdout
    # The board describes itself with ACPI; the RSDP is where the BIOS-area scan finds it.
    assert "ACPI: RSDP 0x00000000000E0000" in boot.stdout
    assert "Run /init as init process" in boot.stdout


def test_guest_sees_our_board(boot: subprocess.CompletedProcess[str]) -> None:
    report = guest_report(boot)
    assert report["cmdline"] == CMDLINE
    assert report["cpus"] == "2"  # the AP came up through the MADT and INIT/SIPI
    assert report["clocksource"] == "kvm-clock"
    assert report["pci"] == "0x8086:0x0d57"  # our host bridge, found through 0xCF8
    assert report["serial"] == "1"  # ttyS0 identified as a 16550A
    assert report["rtc"].split()[0] == "rtc_cmos"  # "<driver> <device>"
    assert 200_000 < int(report["mem"]) <= 256 * 1024


@pytest.fixture(scope="module")
def poweroff_boot(lab: Lab) -> subprocess.CompletedProcess[str]:
    """A second, quiet boot whose guest powers off instead of rebooting, with acpi=off:
    the MP table describes the board, and power-off is every CPU halting."""
    cmdline = "console=ttyS0 panic=-1 reboot=k acpi=off quiet"
    return boot_guest("poweroff", "echo powering-off", cmdline, vcpus=1, end="poweroff")


def test_guest_poweroff_ends_the_vm_with_status_zero(
    poweroff_boot: subprocess.CompletedProcess[str],
) -> None:
    rc, output = parse_guest_test_output(poweroff_boot.stdout)
    assert (rc, output) == (0, "powering-off\n"), poweroff_boot.stdout[-2000:]
    # No ACPI on this board: Linux halts every CPU, and the halt poll ends the VM.
    assert "reboot: System halted" in poweroff_boot.stdout
    assert "guest ended: halt (status 0)" in poweroff_boot.stderr
    assert poweroff_boot.returncode == 0


def _lab_qemus() -> set[int]:
    """PIDs of running QEMUs started by the lab harness (their shares live in iovirt-lab-*)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"qemu-system") and b"iovirt-lab-" in cmdline:
            pids.add(int(proc.name))
    return pids


def test_sigterm_during_a_lab_run_stops_qemu(lab: Lab) -> None:
    before = _lab_qemus()
    proc = subprocess.Popen(
        [sys.executable, "-m", "iovirt.cli", "run", "--lab", str(REPO / "examples" / "hello.toml")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _lab_qemus() - before:  # wait until the lab's QEMU is up
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the lab never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "terminating on signal 15; stopped the lab" in stderr
    assert "Traceback" not in stderr
    assert not _lab_qemus() - before
