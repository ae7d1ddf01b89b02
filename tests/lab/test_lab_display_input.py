"""The screen and the input devices, proven with stock Linux drivers and a real VNC client.

One lab boot runs :file:`_display_scenario.py` once per input set: a guest with a bochs
display (Linux's ``bochs`` DRM driver, fbcon on top), iovirt's VNC server with a password,
and either the PS/2 keyboard and mouse (``atkbd``, ``psmouse``) or the USB keyboard and
tablet behind the xHCI controller (``xhci_hcd``, ``usbhid``). In the guest a script draws
a colour marker into /dev/fb0 and a line of text on tty1, reads a line from tty1 and
records the raw events of every /dev/input/event* device. Outside, ``vncdo`` (vncdotool)
takes a screenshot, types a line and moves and clicks the pointer.
"""

from __future__ import annotations

import json
import shlex
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.devices.usb_hid import scale_axis
from iovirt.lab import Lab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _display_scenario import MOVES, TYPED

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).resolve().with_name("_display_scenario.py")
KERNEL = Path("/vmlinuz")
# The input sets, each one VM: the name, its [[input]] models.
SETS = {"ps2": ["ps2"], "usb": ["usb-keyboard", "usb-tablet"]}
MODULES = ["bochs", "psmouse", "evdev", "xhci_pci", "usbhid", "hid_generic"]
MARKER_ROWS = 64
# The marker's eight stripes, as the guest writes them (x8r8g8b8: bytes B, G, R, X) and as
# a screenshot shows them (R, G, B).
STRIPES = [
    (0xFF, 0x00, 0x00),
    (0x00, 0xFF, 0x00),
    (0x00, 0x00, 0xFF),
    (0xFF, 0xFF, 0xFF),
    (0xFF, 0xFF, 0x00),
    (0xFF, 0x00, 0xFF),
    (0x00, 0xFF, 0xFF),
    (0x80, 0x40, 0x20),
]

EV_SYN, EV_KEY, EV_REL, EV_ABS = 0, 1, 2, 3
REL_X, REL_Y = 0, 1
ABS_X, ABS_Y = 0, 1
BTN_LEFT = 0x110
KEY_ENTER = 28
# Linux key codes of the characters typed over VNC (TYPED, then "done").
KEY_OF = {"h": 35, "e": 18, "l": 38, "o": 24, " ": 57, "i": 23, "v": 47, "r": 19, "t": 20}
KEY_OF |= {"4": 5, "2": 3, "d": 32, "n": 49}


def guest_script() -> str:
    pixel = "".join(f"\\{b:03o}\\{g:03o}\\{r:03o}\\000" for r, g, b in STRIPES)
    return f"""\
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
# With an xHCI controller, wait (up to 30 s) for both USB HID devices to enumerate.
if [ -n "$(ls /sys/bus/pci/drivers/xhci_hcd 2>/dev/null | grep :)" ]; then
  i=0
  while [ $(ls -d /sys/bus/usb/devices/1-*:1.0/input 2>/dev/null | wc -l) -lt 2 ] \
      && [ $i -lt 300 ]; do
    sleep 0.1; i=$((i+1))
  done
fi
g=/sys/class/graphics/fb0
size=$(cat $g/virtual_size)
w=${{size%,*}}
h=${{size#*,}}
stride=$(cat $g/stride)
echo "fb.name=$(cat $g/name)"
echo "fb.size=$size"
echo "fb.bpp=$(cat $g/bits_per_pixel)"
echo "fb.stride=$stride"
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor):$(cat $d/device)" = "0x1234:0x1111" ]; then
    echo "bochs.driver=$(basename $(readlink $d/driver))"
  fi
done
for d in /sys/bus/usb/devices/*; do
  [ -e $d/idVendor ] || continue
  echo "usb.dev=${{d##*/}}|$(cat $d/idVendor):$(cat $d/idProduct)|$(cat $d/product 2>/dev/null)"
done
for d in /sys/bus/usb/devices/*:*; do
  [ -e $d/bInterfaceClass ] || continue
  drv=$(basename "$(readlink $d/driver 2>/dev/null)")
  echo "usb.if=${{d##*/}}|$(cat $d/bInterfaceClass)|$drv"
done
for e in /sys/class/input/event*; do
  echo "input=${{e##*/}}|$(cat $e/device/name)"
done
echo 0 > /sys/class/graphics/fbcon/cursor_blink || true
{{
  printf '\\033[2J\\033[HIOVIRT SCREEN TEST\\n\\n'
  echo "# uname -a"; uname -a
  echo "# PCI functions (vendor:device class driver)"
  for d in /sys/bus/pci/devices/*; do
    drv=$(basename "$(readlink $d/driver 2>/dev/null)")
    echo "${{d##*/}} $(cat $d/vendor):$(cat $d/device) $(cat $d/class) $drv"
  done
  echo "# input devices"
  for e in /sys/class/input/event*; do echo "${{e##*/}}: $(cat $e/device/name)"; done
  echo "# type here:"
}} > /dev/tty1
# The marker: {MARKER_ROWS} rows at the bottom, eight stripes of w/8 pixels each.
stripe=$((w / 8))
n=0
for c in 1 2 3 4 5 6 7 8; do
  printf "$(echo '{pixel}' | cut -c$(( (c - 1) * 16 + 1 ))-$(( c * 16 )))" > /tmp/p
  k=1
  while [ $k -lt $stripe ]; do cat /tmp/p /tmp/p > /tmp/q; mv /tmp/q /tmp/p; k=$((k * 2)); done
  head -c $((stripe * 4)) /tmp/p > /tmp/s$c
done
cat /tmp/s1 /tmp/s2 /tmp/s3 /tmp/s4 /tmp/s5 /tmp/s6 /tmp/s7 /tmp/s8 > /tmp/row
head -c $((stride - stripe * 32)) /dev/zero >> /tmp/row
cp /tmp/row /tmp/marker
k=1
while [ $k -lt {MARKER_ROWS} ]; do
  cat /tmp/marker /tmp/marker > /tmp/q; mv /tmp/q /tmp/marker; k=$((k * 2))
done
# One write() for all {MARKER_ROWS} rows: Debian 6.1's DRM fbdev emulation computes an empty
# damage rectangle for a write() of exactly one scanline (x2 = end % line_length = 0), so
# row-by-row writes would stay in its shadow buffer and never reach the framebuffer.
top=$(( (h / {MARKER_ROWS} - 1) * {MARKER_ROWS} ))
echo "marker.top=$top"
block=$((stride * {MARKER_ROWS}))
dd if=/tmp/marker of=/dev/fb0 bs=$block seek=$((top / {MARKER_ROWS})) conv=notrunc
pids=""
for e in /dev/input/event*; do cat $e > /tmp/${{e##*/}}.bin & pids="$pids $!"; done
echo "marker=drawn"
if read -t 120 line < /dev/tty1; then echo "typed=$line"; else echo "typed=(timeout)"; fi
read -t 120 done < /dev/tty1 || true
sleep 1
kill $pids 2>/dev/null || true
for f in /tmp/event*.bin; do
  e=${{f##*/}}
  echo "events=${{e%.bin}}|$(od -An -tx1 -v $f | tr -d ' \\n')"
done
grep -i xhci /proc/interrupts | tr -s ' ' | sed 's/^/irq=/' || true
"""


def parse_events(hex_text: str) -> list[tuple[int, int, int]]:
    """(type, code, value) of each struct input_event (x86-64: 24 bytes)."""
    data = bytes.fromhex(hex_text)
    return [struct.unpack_from("<HHi", data, off + 16) for off in range(0, len(data) - 23, 24)]


@pytest.fixture(scope="module")
def scenarios(lab: Lab) -> dict[str, dict[str, Any]]:
    work = REPO / "build" / "lab-tests" / "display"
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.rglob("*"):
        if old.is_file():
            old.unlink()
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = work / "guest.img"
    initrd.write_bytes(
        guest_test_initramfs(kver, MODULES, guest_script(), timeout=200, end="poweroff")
    )
    commands = []
    for name, inputs in SETS.items():
        argv = [sys.executable, str(SCENARIO), "--initrd", str(initrd)]
        argv += ["--out", f"/out/{name}", "--inputs", ",".join(inputs)]
        commands.append(shlex.join(argv))
    result = lab.run(
        "\n".join(commands),
        cwd=REPO,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        timeout=900,
        out_dir=out,
    )
    reports: dict[str, dict[str, Any]] = {}
    for name in SETS:
        report_file = out / name / "display-scenario.json"
        assert report_file.is_file(), f"{name}: no report; lab stderr:\n{result.stderr[-4000:]}"
        report: dict[str, Any] = json.loads(report_file.read_text())
        assert "scenario_error" not in report, report.get("scenario_error")
        rc, output = parse_guest_test_output(report.get("stdout", ""))
        report["guest_rc"] = rc
        lines = [line for line in output.splitlines() if "=" in line]
        report["guest"] = {k: v for k, v in (line.split("=", 1) for line in lines)}
        report["guest_lines"] = lines
        report["screen"] = out / name / "screen.png"
        reports[name] = report
    return reports


def _failure(report: dict[str, Any]) -> str:
    return (
        f"console:\n{report.get('stdout', '')[-3000:]}\nstderr:\n{report.get('stderr', '')[-3000:]}"
        f"\nvncdo: {report.get('vncdo')}"
    )


def _values(report: dict[str, Any], key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in report["guest_lines"] if line.startswith(key + "=")]


def _events_of(report: dict[str, Any], name_part: str) -> list[tuple[int, int, int]]:
    """The events the guest recorded on the input device whose name contains name_part."""
    names = dict(v.split("|", 1) for v in _values(report, "input"))
    events: list[tuple[int, int, int]] = []
    for value in _values(report, "events"):
        dev, hex_text = value.split("|", 1)
        if name_part.lower() in names.get(dev, "").lower():
            events += parse_events(hex_text)
    return events


@pytest.mark.parametrize("name", list(SETS))
def test_vm_runs_to_a_clean_poweroff(scenarios: dict[str, dict[str, Any]], name: str) -> None:
    report = scenarios[name]
    assert report["returncode"] == 0, _failure(report)
    assert "Traceback" not in report["stderr"], _failure(report)
    assert report["guest_rc"] == 0, _failure(report)


@pytest.mark.parametrize("name", list(SETS))
def test_bochs_driver_binds_and_fbcon_draws(
    scenarios: dict[str, dict[str, Any]], name: str
) -> None:
    guest = scenarios[name]["guest"]
    assert guest.get("bochs.driver") == "bochs-drm", _failure(scenarios[name])
    assert guest.get("fb.name") == "bochs-drmdrmfb", guest
    assert guest.get("fb.bpp") == "32"
    assert scenarios[name]["marker_seen"]


@pytest.mark.parametrize("name", list(SETS))
def test_vncdotool_screenshot_shows_the_guest_screen(
    scenarios: dict[str, dict[str, Any]], name: str
) -> None:
    from PIL import Image

    report = scenarios[name]
    capture = report["vncdo"][0]
    assert capture["returncode"] == 0, capture
    image = Image.open(report["screen"]).convert("RGB")
    width, height = (int(v) for v in report["guest"]["fb.size"].split(","))
    assert image.size == (width, height)
    stripe = width // 8
    top = int(report["guest"]["marker.top"])
    assert top + MARKER_ROWS <= height
    for row in (top, top + MARKER_ROWS - 1):
        for i, colour in enumerate(STRIPES):
            for x in (i * stripe + 2, i * stripe + stripe // 2, (i + 1) * stripe - 3):
                assert image.getpixel((x, row)) == colour, (x, row, i)
    # fbcon's text (light grey on black) in the top text line, nowhere near the marker.
    top = image.crop((0, 0, 8 * 18, 16))
    pixels = top.tobytes()
    assert sum(1 for i in range(0, len(pixels), 3) if any(pixels[i : i + 3])) > 100


@pytest.mark.parametrize("name", list(SETS))
def test_typed_line_reaches_the_guest_shell(
    scenarios: dict[str, dict[str, Any]], name: str
) -> None:
    report = scenarios[name]
    assert report["vncdo"][1]["returncode"] == 0, report["vncdo"][1]
    assert report["guest"].get("typed") == TYPED, _failure(report)


def _check_keys(events: list[tuple[int, int, int]]) -> None:
    """Key events of the typed text: Enter went down and up, and every key pressed is one
    of the typed characters'. (The guest's evdev reader is a background ``cat`` that may
    start reading after the first keys overflowed evdev's 64-event client buffer, so the
    early part of a burst can be missing; the typed line itself is checked whole.)"""
    pressed = {code for kind, code, value in events if kind == EV_KEY and value == 1}
    assert KEY_ENTER in pressed, events
    assert (EV_KEY, KEY_ENTER, 0) in events
    assert pressed <= set(KEY_OF.values()) | {KEY_ENTER}, pressed


def test_ps2_keyboard_and_mouse_events(scenarios: dict[str, dict[str, Any]]) -> None:
    report = scenarios["ps2"]
    _check_keys(_events_of(report, "AT Translated Set 2 keyboard"))
    mouse = _events_of(report, "PS/2")
    dx = sum(v for t, c, v in mouse if t == EV_REL and c == REL_X)
    dy = sum(v for t, c, v in mouse if t == EV_REL and c == REL_Y)
    # From the first position the mouse saw to the last move. PS/2 counts Y upwards and
    # psmouse flips it back, so evdev's REL_Y grows downwards like the screen.
    (x0, y0), (x1, y1) = MOVES[0], MOVES[-1]
    assert (dx, dy) == (x1 - x0, y1 - y0), mouse
    assert (EV_KEY, BTN_LEFT, 1) in mouse and (EV_KEY, BTN_LEFT, 0) in mouse


def test_usb_devices_enumerate_with_hid_bound(scenarios: dict[str, dict[str, Any]]) -> None:
    report = scenarios["usb"]
    devices = {v.split("|")[1] for v in _values(report, "usb.dev")}
    assert {"1209:0001", "1209:0002"} <= devices, _values(report, "usb.dev")
    hid = [v for v in _values(report, "usb.if") if v.split("|")[1] == "03"]
    assert len(hid) == 2 and all(v.endswith("|usbhid") for v in hid), hid
    # xhci_hcd runs on MSI-X: its vector counted interrupts.
    irqs = [v for v in _values(report, "irq") if "xhci_hcd" in v]
    assert irqs and int(irqs[0].split()[1]) > 0, irqs


def test_usb_keyboard_and_tablet_events(scenarios: dict[str, dict[str, Any]]) -> None:
    report = scenarios["usb"]
    _check_keys(_events_of(report, "USB Keyboard"))
    tablet = _events_of(report, "USB Tablet")
    width, height = (int(v) for v in report["guest"]["fb.size"].split(","))
    xs = [v for t, c, v in tablet if t == EV_ABS and c == ABS_X]
    ys = [v for t, c, v in tablet if t == EV_ABS and c == ABS_Y]
    # Absolute: each VNC position arrives as itself, scaled to the tablet's 0..0x7FFF.
    assert xs == [scale_axis(x, width) for x, _ in MOVES], tablet
    assert ys == [scale_axis(y, height) for _, y in MOVES], tablet
    assert (EV_KEY, BTN_LEFT, 1) in tablet and (EV_KEY, BTN_LEFT, 0) in tablet
