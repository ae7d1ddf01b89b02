"""virtio-net on a multi-queue tap, driven by the stock guest's virtio_net driver, in one lab
boot.

Inside the lab, :file:`_net_scenario.py` (run as root) makes a network namespace with a
persistent multi-queue vnet_hdr tap (10.0.2.1/24), servers listening in it, and runs
``iovirt run --no-lab`` with a 2-vCPU guest whose ``[[nic]]`` (virtio-net over PCI,
``queues = 2``, MAC 52:54:00:aa:bb:01) is that tap. The guest (10.0.2.15/24):

- prints its MAC and the queues the kernel made (``/sys/class/net/eth0/queues``);
- pings the namespace, and is pinged from it while it is transferring;
- sends 64 MiB of random data to a sink (``nc`` pinned to CPU 0) and receives 64 MiB of
  seeded random data from a source; both sides hash what they saw;
- sends 16 MiB more from CPU 1, so the driver's second transmit queue carries traffic
  (virtio_net maps each CPU to its own queue pair, and the tap answers a flow on the queue
  it came from);
- prints its virtio interrupt counts per queue.

Every result comes back as JSON through the lab's /out share; the tests here judge it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.lab import Lab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _net_scenario import guest_script

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).resolve().with_name("_net_scenario.py")
KERNEL = Path("/vmlinuz")
MIB = 1 << 20
TRANSFER_MIB = 64
SECOND_SENDER_MIB = 16
GUEST_MAC = "52:54:00:aa:bb:01"  # as _net_scenario.GUEST_MAC
HOST_ADDR = "10.0.2.1"
GUEST_ADDR = "10.0.2.15"
GUEST_SCRIPT_TIMEOUT = 240  # below the VMM's --timeout 300, so the guest reports first
LAB_TIMEOUT = 540.0

GUEST_SCRIPT = guest_script(TRANSFER_MIB, SECOND_SENDER_MIB, virtio=True)


@pytest.fixture(scope="module")
def scenario(lab: Lab) -> dict[str, Any]:
    """One lab boot running _net_scenario.py; its JSON report plus the guest's lines."""
    work = REPO / "build" / "lab-tests" / "virtio-net"
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / "guest.img"
    initrd.write_bytes(
        guest_test_initramfs(
            kver,
            ["virtio_net", "virtio_pci"],
            GUEST_SCRIPT,
            timeout=GUEST_SCRIPT_TIMEOUT,
            end="poweroff",
        )
    )
    result = lab.run(
        [
            sys.executable,
            str(SCENARIO),
            "--initrd",
            str(initrd),
            "--out",
            "/out",
            "--mib",
            str(TRANSFER_MIB),
            "--mib2",
            str(SECOND_SENDER_MIB),
        ],
        cwd=REPO,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        timeout=LAB_TIMEOUT,
        out_dir=out,
    )
    report_file = out / "net-scenario.json"
    assert report_file.is_file(), f"no report; scenario stderr:\n{result.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(report_file.read_text())
    assert "scenario_error" not in report, report.get("scenario_error")
    assert result.returncode == 0, result.stderr[-4000:]
    rc, output = parse_guest_test_output(report["vm"]["stdout"])
    report["guest_rc"] = rc
    report["guest_output"] = output
    report["guest"] = dict(
        line.split("=", 1) for line in output.splitlines() if "=" in line and ": " not in line
    )
    return report


def _vm_failure(report: dict[str, Any]) -> str:
    vm = report["vm"]
    return f"console:\n{vm['stdout'][-3000:]}\nstderr:\n{vm['stderr'][-3000:]}"


def _irq_counts(output: str) -> dict[str, int]:
    """'irq: 25:  10  3  PCI-MSIX-0000:00:02.0  1-edge  virtio0-input.0' -> name: total."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        if not line.startswith("irq: "):
            continue
        tokens = line[len("irq: ") :].split()
        total = 0
        for token in tokens[1:]:
            if not token.isdigit():
                break
            total += int(token)
        counts[tokens[-1]] = counts.get(tokens[-1], 0) + total
    return counts


def _queue_irqs(report: dict[str, Any], queue: str) -> int:
    """Interrupts of virtio queue ``queue`` ("input.1", ...) over every virtio device."""
    counts = _irq_counts(report["guest_output"])
    return sum(n for name, n in counts.items() if name.endswith(f"-{queue}"))


def test_vm_runs_the_guest_to_a_clean_poweroff(scenario: dict[str, Any]) -> None:
    vm = scenario["vm"]
    assert vm["returncode"] == 0, _vm_failure(scenario)
    assert "Traceback" not in vm["stderr"]
    assert "guest ended: poweroff (status 0)" in vm["stderr"]
    assert scenario["guest_rc"] == 0, _vm_failure(scenario)


def test_guest_nic_has_the_configured_mac(scenario: dict[str, Any]) -> None:
    assert scenario["guest"].get("mac") == GUEST_MAC, _vm_failure(scenario)


def test_guest_sees_two_rx_and_two_tx_queues(scenario: dict[str, Any]) -> None:
    queues = set(scenario["guest"].get("queues", "").split())
    assert queues == {"rx-0", "rx-1", "tx-0", "tx-1"}, _vm_failure(scenario)


def test_guest_pings_the_netns(scenario: dict[str, Any]) -> None:
    assert scenario["guest"].get("ping") == "ok", _vm_failure(scenario)
    assert "3 packets transmitted, 3 packets received" in scenario["guest_output"]


def test_netns_pings_the_guest(scenario: dict[str, Any]) -> None:
    ping = scenario["netns_ping"]
    assert ping["returncode"] == 0, ping["output"]
    assert "3 packets transmitted, 3 packets received" in ping["output"]
    assert scenario["servers"]["done"].get("ping_finished") is True


def test_guest_to_netns_64_mib_arrive_intact(scenario: dict[str, Any]) -> None:
    sink = scenario["servers"]["sink"]
    assert "error" not in sink, sink
    assert sink["bytes"] == TRANSFER_MIB * MIB
    assert sink["sha256"] == scenario["guest"]["tx.sha256"]
    assert scenario["guest"].get("tx.nc") == "ok"


def test_netns_to_guest_64_mib_arrive_intact(scenario: dict[str, Any]) -> None:
    source = scenario["servers"]["source"]
    assert "error" not in source, source
    assert source["bytes"] == TRANSFER_MIB * MIB
    assert int(scenario["guest"]["rx.bytes"].strip()) == TRANSFER_MIB * MIB
    assert scenario["guest"]["rx.sha256"] == scenario["source_sha256"]
    assert scenario["guest"].get("rx.nc") == "ok"


def test_sender_on_the_second_cpu_arrives_intact(scenario: dict[str, Any]) -> None:
    sink2 = scenario["servers"]["sink2"]
    assert "error" not in sink2, sink2
    assert sink2["bytes"] == SECOND_SENDER_MIB * MIB
    assert sink2["sha256"] == scenario["guest"]["tx2.sha256"]


def test_both_queue_pairs_carry_traffic(scenario: dict[str, Any]) -> None:
    counts = _irq_counts(scenario["guest_output"])
    assert _queue_irqs(scenario, "input.0") > 0, counts
    # The CPU-1 sender's segments leave on tx queue 1 and its ACKs come back on rx queue 1.
    assert _queue_irqs(scenario, "input.1") > 0 or _queue_irqs(scenario, "output.1") > 0, counts
