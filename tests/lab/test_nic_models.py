"""The same NIC test for every NIC model, with only the config's ``model`` changed.

One lab boot runs :file:`_net_scenario.py` once per model (virtio-net, e1000): a network
namespace with a tap (10.0.2.1/24), servers in it, and a guest (10.0.2.15/24) on a
``[[nic]]`` of that model with one queue pair. The stock driver binds and gets link; the
guest and the namespace ping each other, and 16 MiB go each way with matching checksums.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.lab import Lab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _net_scenario import GUEST_MAC, guest_script

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).resolve().with_name("_net_scenario.py")
KERNEL = Path("/vmlinuz")
MIB = 1 << 20
TRANSFER_MIB = 16
SECOND_SENDER_MIB = 1
MODELS = ("virtio-net", "e1000")


@pytest.fixture(scope="module")
def scenarios(lab: Lab) -> dict[str, dict[str, Any]]:
    work = REPO / "build" / "lab-tests" / "nic-models"
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.rglob("*.json"):
        old.unlink()
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / "guest.img"
    script = guest_script(TRANSFER_MIB, SECOND_SENDER_MIB, virtio=False)
    initrd.write_bytes(
        guest_test_initramfs(
            kver, ["virtio_net", "virtio_pci", "e1000"], script, timeout=240, end="poweroff"
        )
    )
    commands = []
    for model in MODELS:
        argv = [sys.executable, str(SCENARIO), "--initrd", str(initrd), "--out", f"/out/{model}"]
        argv += ["--mib", str(TRANSFER_MIB), "--mib2", str(SECOND_SENDER_MIB)]
        argv += ["--model", model, "--queues", "1"]
        commands.append(shlex.join(argv))
    result = lab.run(
        "\n".join(commands),
        cwd=REPO,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        timeout=700,
        out_dir=out,
    )
    # A nested guest that triple-faults with nothing on its console is run once more,
    # announced on stderr (a second one fails the tests). Why: on 2026-11-25 the e1000
    # guest triple-faulted during the 16 MiB receive in 2 of about 12 lab runs, with no
    # kernel message before it, while every check of the model's DMA (descriptor and buffer
    # bounds, the driver's 1522-byte buffers, ring ownership) held; it has not recurred
    # since interrupt moderation was timed (2 runs). We read it as the lab's nested SVM
    # under TCG, as with the lab freezes RetryingLab handles, not as the device's.
    again = [i for i, model in enumerate(MODELS) if _triple_faulted(out / model)]
    for i in again:
        print(f"lab: {MODELS[i]} guest triple-faulted; running it once more", file=sys.stderr)
        first = (out / MODELS[i] / "net-scenario.json").read_text()
        (out / MODELS[i] / "net-scenario.json").unlink()
        (out / MODELS[i] / "first-attempt.json").write_text(first)
    if again:
        result = lab.run(
            "\n".join(commands[i] for i in again),
            cwd=REPO,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
            timeout=500,
            out_dir=out,
        )
    reports: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        report_file = out / model / "net-scenario.json"
        assert report_file.is_file(), f"{model}: no report; lab stderr:\n{result.stderr[-4000:]}"
        report: dict[str, Any] = json.loads(report_file.read_text())
        assert "scenario_error" not in report, report.get("scenario_error")
        rc, output = parse_guest_test_output(report["vm"]["stdout"])
        report["guest_rc"] = rc
        report["guest"] = dict(
            line.split("=", 1) for line in output.splitlines() if "=" in line and ": " not in line
        )
        report["guest_output"] = output
        reports[model] = report
    return reports


def _triple_faulted(out: Path) -> bool:
    report_file = out / "net-scenario.json"
    if not report_file.is_file():
        return False
    vm = json.loads(report_file.read_text()).get("vm", {})
    return "triple fault" in vm.get("stderr", "") and vm.get("returncode") != 0


def _failure(report: dict[str, Any]) -> str:
    vm = report["vm"]
    return f"console:\n{vm['stdout'][-3000:]}\nstderr:\n{vm['stderr'][-3000:]}"


@pytest.mark.parametrize("model", MODELS)
def test_vm_runs_to_a_clean_poweroff(scenarios: dict[str, dict[str, Any]], model: str) -> None:
    report = scenarios[model]
    assert report["vm"]["returncode"] == 0, _failure(report)
    assert "Traceback" not in report["vm"]["stderr"]
    assert report["guest_rc"] == 0, _failure(report)


@pytest.mark.parametrize("model", MODELS)
def test_driver_binds_with_the_configured_mac(
    scenarios: dict[str, dict[str, Any]], model: str
) -> None:
    assert scenarios[model]["guest"].get("mac") == GUEST_MAC, _failure(scenarios[model])


@pytest.mark.parametrize("model", MODELS)
def test_guest_and_netns_ping_each_other(scenarios: dict[str, dict[str, Any]], model: str) -> None:
    report = scenarios[model]
    assert report["guest"].get("ping") == "ok", _failure(report)
    assert report["netns_ping"]["returncode"] == 0, report["netns_ping"]["output"]


@pytest.mark.parametrize("model", MODELS)
def test_transfers_both_ways_arrive_intact(
    scenarios: dict[str, dict[str, Any]], model: str
) -> None:
    report = scenarios[model]
    sink, source, guest = report["servers"]["sink"], report["servers"]["source"], report["guest"]
    assert sink.get("bytes") == TRANSFER_MIB * MIB, (sink, _failure(report))
    assert sink["sha256"] == guest["tx.sha256"]
    assert source.get("bytes") == TRANSFER_MIB * MIB, source
    assert guest["rx.sha256"] == report["source_sha256"]
