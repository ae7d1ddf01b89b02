"""The lab harness itself: one boot runs a probe command and the tests check what came back.

The probe checks what every later lab test relies on: /dev/kvm from kvm_amd on an
SVM-capable vCPU, the project's venv importing iovirt (C extension included), the working
directory and environment the harness promised, and stdout, stderr, the exit status and
/out files coming back byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iovirt.errors import UserError
from iovirt.lab import BOOT_DIR, Lab, LabError, LabResult, LabTimeoutError, extract_vmlinux
from iovirt.lab import main as lab_main

# A boot takes 8-20 s (more on a loaded machine); whichever test first uses the probe pays.
pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

# Exercises quoting: the harness passes env values through a generated shell script.
PROBE_ENV_VALUE = "a b'c\"$HOME\\"

PROBE = r"""
echo "cwd=$(pwd)"
echo "probe_env=$IOVIRT_PROBE"
echo "home=$HOME"
if [ -c /dev/kvm ]; then echo kvm=char-device; else echo kvm=missing; fi
if [ "$(grep -c -w svm /proc/cpuinfo)" -gt 0 ]; then echo svm=yes; else echo svm=no; fi
if grep -q '^kvm_amd ' /proc/modules; then echo kvm_amd=loaded; else echo kvm_amd=absent; fi
.venv/bin/python -c 'import iovirt, iovirt._native; print("iovirt=" + iovirt.__file__)'
echo "root_writable=$(touch /usr/lab-probe && echo yes || echo no)"
echo "tmp=$(stat -f -c %T /tmp)"
printf 'tab\there\nno newline at end'
printf 'to stderr\n' >&2
printf 'second line, no newline' >&2
printf 'result file\n' > /out/result.txt
mkdir -p /out/sub && printf 'nested' > /out/sub/deep.bin
exit 42
"""

EXPECTED_STDOUT = (
    f"cwd={REPO}\n"
    f"probe_env={PROBE_ENV_VALUE}\n"
    "home=/root\n"
    "kvm=char-device\n"
    "svm=yes\n"
    "kvm_amd=loaded\n"
    f"iovirt={REPO}/iovirt/__init__.py\n"
    "root_writable=yes\n"
    "tmp=overlayfs\n"
    "tab\there\nno newline at end"
)


@pytest.fixture(scope="module")
def probe(lab: Lab) -> LabResult:
    return lab.run(PROBE, cwd=REPO, env={"IOVIRT_PROBE": PROBE_ENV_VALUE}, timeout=240)


def test_kvm_is_ready_inside_the_lab(probe: LabResult) -> None:
    lines = probe.stdout.splitlines()
    assert "svm=yes" in lines, probe.console
    assert "kvm_amd=loaded" in lines, probe.console
    assert "kvm=char-device" in lines, probe.console


def test_project_venv_imports_iovirt(probe: LabResult) -> None:
    assert f"iovirt={REPO}/iovirt/__init__.py" in probe.stdout.splitlines(), probe.stderr


def test_cwd_env_and_writable_overlay_root(probe: LabResult) -> None:
    lines = probe.stdout.splitlines()
    assert f"cwd={REPO}" in lines
    assert f"probe_env={PROBE_ENV_VALUE}" in lines
    assert "home=/root" in lines
    assert "root_writable=yes" in lines
    assert "tmp=overlayfs" in lines
    # The overlay took the write: nothing reached the host's read-only share.
    assert not Path("/usr/lab-probe").exists()


def test_stdout_stderr_and_status_come_back_exactly(probe: LabResult) -> None:
    assert probe.returncode == 42
    assert probe.stdout == EXPECTED_STDOUT
    assert probe.stderr == "to stderr\nsecond line, no newline"


def test_out_share_files_come_back(probe: LabResult) -> None:
    assert probe.files == {"result.txt": b"result file\n", "sub/deep.bin": b"nested"}
    assert probe.scratch is None


def test_console_and_duration(probe: LabResult) -> None:
    assert "iovirt-lab: ready" in probe.console
    assert "reboot: Power down" in probe.console
    assert 0 < probe.duration < 240


# -- without a boot --------------------------------------------------------------------------


def test_bad_arguments_fail_before_booting(lab: Lab, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        lab.run("true", cwd=tmp_path / "missing")
    with pytest.raises(UserError, match="not valid"):
        lab.run("true", env={"BAD-NAME": "x"})


def test_initrd_is_cached(lab: Lab) -> None:
    first = lab.initrd()
    mtime = first.stat().st_mtime_ns
    assert lab.initrd() == first
    assert first.stat().st_mtime_ns == mtime
    assert first.name.startswith(f"initrd-{lab.kver}-")


def test_pvh_kernel_extracted_from_bzimage(lab: Lab) -> None:
    vmlinux = extract_vmlinux((BOOT_DIR / f"vmlinuz-{lab.kver}").read_bytes())
    assert vmlinux is not None, "Debian's kernel should be xz-compressed with a PVH note"
    assert vmlinux.startswith(b"\x7fELF")
    assert lab.boot_kernel().read_bytes() == vmlinux
    assert extract_vmlinux(b"not a kernel") is None


def child_pids() -> set[int]:
    """Direct children of this process, from /proc (no psutil needed)."""
    me = os.getpid()
    children = set()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == me:
            children.add(int(stat_file.parent.name))
    return children


def test_timeout_kills_qemu_and_reports_console(lab: Lab) -> None:
    before = child_pids()
    # The boot alone takes longer than this timeout.
    with pytest.raises(LabTimeoutError, match="timed out after 2 s") as err:
        lab.run("sleep 600", timeout=2)
    assert err.value.timeout == 2
    assert child_pids() <= before, "QEMU left running after the timeout"


def test_qemu_failure_is_a_lab_error_with_qemu_output(lab: Lab) -> None:
    broken = Lab(lab.kver, qemu_args=["-no-such-option"])
    with pytest.raises(LabError, match=r"QEMU exited with status 1 .*-no-such-option") as err:
        broken.run("true", timeout=60)
    assert "\n" not in err.value.problem


def test_command_line_entry_point(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[object, object]] = []

    def fake_run(self: Lab, command: object, **kwargs: object) -> LabResult:
        calls.append((command, kwargs["cwd"]))
        return LabResult(3, "out\n", "err\n", "console", 1.0)

    monkeypatch.setattr(Lab, "run", fake_run)
    assert lab_main(["--cwd", "/tmp", "--", "echo", "a b"]) == 3
    assert lab_main(["--", "echo $HOME"]) == 3
    assert calls == [(["echo", "a b"], "/tmp"), ("echo $HOME", None)]
    captured = capsys.readouterr()
    assert captured.out == "out\nout\n"
    assert captured.err == "err\nerr\n"
