"""``iovirt run`` / ``iovirt check`` as a user runs them: a real process, real files,
one-line errors, clean shutdown on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iovirt.testing.asm import firmware

pytestmark = pytest.mark.hostkvm

REPO = Path(__file__).resolve().parents[2]
IOVIRT = [sys.executable, "-m", "iovirt.cli"]


def iovirt(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IOVIRT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_config(
    tmp_path: Path, fw_body: str, serial: str = 'backend = { kind = "stdio" }'
) -> Path:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(firmware(fw_body))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        f'[vm]\nmemory = "4M"\nfirmware = "{fw}"\ndebug_exit = true\n\n[serial]\n{serial}\n'
    )
    return cfg


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_bundled_example_boots_and_exits_zero(tmp_path: Path) -> None:
    # The README's example, with its firmware built from examples/hello.S here.
    cfg = write_config(tmp_path, (REPO / "examples" / "hello.S").read_text())
    proc = iovirt("run", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "Hello from a guest on iovirt" in proc.stdout
    assert proc.stderr == ""


def test_guest_verdict_becomes_the_exit_status(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "mov $0x501, %dx\n mov $3, %al\n out %al, %dx\n jmp .")
    assert iovirt("run", str(cfg)).returncode == 3


def test_console_log_gets_a_copy_of_the_output(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    cfg = write_config(
        tmp_path,
        "mov $0x3f8, %dx\n mov $'Z', %al\n out %al, %dx\n"
        "mov $0x501, %dx\n xor %al, %al\n out %al, %dx\n jmp .",
        serial=f'backend = {{ kind = "stdio" }}\nlog = "{log}"',
    )
    proc = iovirt("run", str(cfg))
    assert proc.returncode == 0
    assert proc.stdout == "Z"
    assert log.read_bytes() == b"Z"


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "jmp .")
    proc = iovirt("check", str(cfg))
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"{cfg}: ok"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('[vm]\nmemory = "12Q"\n', ("vm.memory", "512M")),
        ('[vm]\nmemroy = "1G"\n', ("vm.memroy", "unknown key")),
        ('[vm]\nfirmware = "/no/such/fw.bin"\n', ("vm.firmware", "no such file")),
        ('[serial]\nbackend = { kind = "tcp" }\n', ("serial.backend", "unknown kind")),
        ('[serial]\nbackend = { kind = "file" }\n', ("serial.backend.path", "missing")),
        ("[vm\n", ("not valid TOML",)),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, text: str, needles: tuple[str, ...]
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    for command in ("check", "run"):
        assert_one_line_error(iovirt(command, str(cfg)), *needles)


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(iovirt("run", str(tmp_path / "nope.toml")), "no such config file")


def test_unwritable_console_log_is_one_line(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path, "jmp .", serial='backend = { kind = "null" }\nlog = "/no/such/dir/c.log"'
    )
    assert_one_line_error(iovirt("run", str(cfg)), "/no/such/dir/c.log")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_no_permission_on_dev_kvm_is_one_line(tmp_path: Path) -> None:
    # /dev/kvm is root-only here: run as 'nobody' to meet the permission error for real.
    # CAP_DAC_READ_SEARCH lets nobody read the checkout and the config wherever they are
    # (CI clones into a private folder) but grants no write, so /dev/kvm stays closed.
    cfg = write_config(tmp_path, "jmp .")
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is missing"
    proc = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--",
            *IOVIRT,
            "run",
            str(cfg),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert_one_line_error(proc, "/dev/kvm", "permission denied", "kvm")


def test_sigterm_stops_the_guest_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "console.out"
    cfg = write_config(
        tmp_path,
        "mov $0x3f8, %dx\n mov $'R', %al\n out %al, %dx\n jmp .",
        serial=f'backend = {{ kind = "file", path = "{out}" }}',
    )
    proc = subprocess.Popen(
        [*IOVIRT, "run", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_bytes() == b"R"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "guest never printed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in stderr
