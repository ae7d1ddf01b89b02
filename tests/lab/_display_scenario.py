"""The lab side of tests/lab/test_lab_display_input.py: run as root INSIDE the lab, not by pytest.

    .venv/bin/python tests/lab/_display_scenario.py --initrd GUEST.img --inputs ps2 --out /out/ps2

It boots a guest with a bochs display, iovirt's VNC server on 127.0.0.1 and the
``[[input]]`` devices given, and drives it from outside with ``vncdo`` (vncdotool, a VNC
client no one here wrote):

1. it waits for the guest's ``marker=drawn`` console line (the guest has drawn a colour
   marker into /dev/fb0 and a line of text through fbcon),
2. ``vncdo capture`` takes a screenshot (``screen.png``), with the VNC password,
3. ``vncdo type`` types :data:`TYPED` and Enter, which the guest's shell reads from tty1,
4. ``vncdo move``/``click`` moves the pointer, which the guest reads from its event device,
   then ``vncdo type done`` tells the guest the pointer work is over,
5. it waits for the VM to end and writes everything (console, stderr, the vncdo runs) to
   ``OUT/display-scenario.json``. It does not judge: the test does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
VNCDO = REPO / ".venv" / "bin" / "vncdo"
CMDLINE = "console=tty0 console=ttyS0 panic=-1 reboot=k quiet"
VNC_PORT = 5901
PASSWORD = "iovirt"
TYPED = "hello iovirt 42"
# Pointer moves: for a relative PS/2 mouse the guest sees the differences, for a tablet
# the positions.
MOVES = ((100, 100), (300, 250))
VM_TIMEOUT = 240
MARKER_TIMEOUT = 150


def vm_config(initrd: Path, inputs: list[str]) -> str:
    entries = "".join(f'\n[[input]]\nmodel = "{model}"\n' for model in inputs)
    return f"""\
[vm]
memory = "512M"
vcpus = 1
kernel = "{KERNEL}"
initrd = "{initrd}"
cmdline = "{CMDLINE}"

[serial]
backend = {{ kind = "stdio", input = false }}

[display]
model = "bochs-display"
vnc = "127.0.0.1:{VNC_PORT}"
password = "{PASSWORD}"
{entries}"""


def vncdo(*args: str, timeout: float = 60) -> dict[str, Any]:
    argv = [str(VNCDO), "-s", f"127.0.0.1::{VNC_PORT}", "-p", PASSWORD, *args]
    start = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        result: dict[str, Any] = {
            "returncode": done.returncode,
            "output": done.stdout + done.stderr,
        }
    except subprocess.TimeoutExpired:
        result = {"returncode": None, "output": f"timed out after {timeout} s"}
    result["argv"] = argv[1:]
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def scenario(initrd: Path, out: Path, inputs: list[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "vm.toml"
    config.write_text(vm_config(initrd, inputs))
    report: dict[str, Any] = {"inputs": inputs, "vncdo": []}
    cmd = [sys.executable, "-m", "iovirt.cli", "-v", "run", "--no-lab"]
    cmd += ["--timeout", str(VM_TIMEOUT), str(config)]
    vm = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    assert vm.stdout is not None and vm.stderr is not None
    console: list[str] = []
    stderr: list[str] = []
    drawn = threading.Event()

    def read_console() -> None:
        assert vm.stdout is not None
        for line in vm.stdout:
            console.append(line)
            if line.startswith("marker=drawn"):
                drawn.set()

    def read_stderr() -> None:
        assert vm.stderr is not None
        stderr.extend(vm.stderr)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_console, read_stderr)]
    for t in readers:
        t.start()
    report["marker_seen"] = drawn.wait(MARKER_TIMEOUT)
    if report["marker_seen"]:
        time.sleep(1)  # let fbcon finish the text line before the screenshot
        report["vncdo"].append(vncdo("capture", str(out / "screen.png")))
        report["vncdo"].append(vncdo("type", TYPED, "key", "enter"))
        steps: list[str] = []
        for x, y in MOVES:
            steps += ["move", str(x), str(y), "pause", "0.3"]
        report["vncdo"].append(vncdo(*steps, "click", "1"))
        # The guest reads this second line as "the pointer work is over".
        report["vncdo"].append(vncdo("type", "done", "key", "enter"))
    try:
        report["returncode"] = vm.wait(timeout=VM_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        vm.kill()
        report["returncode"] = vm.wait()
        report["killed"] = True
    for t in readers:
        t.join(timeout=10)
    report["stdout"] = "".join(console)
    report["stderr"] = "".join(stderr)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--initrd", type=Path, required=True, help="the guest's initramfs")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON and PNG go")
    parser.add_argument("--inputs", required=True, help="comma-separated [[input]] models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        report = scenario(args.initrd.resolve(), args.out, args.inputs.split(","))
    except Exception:
        report = {"scenario_error": traceback.format_exc()}
    (args.out / "display-scenario.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
