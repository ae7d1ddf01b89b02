"""i8042 PS/2 controller with an MF2 AT keyboard and a PS/2 (IntelliMouse) mouse.

Ports (registered at 0x60 with length 5, so the device sees offsets): 0x60 (offset 0) is
the data port, 0x64 (offset 4) is the status register (read) and the command register
(write). Offsets 1-3 (0x61-0x63) belong to the registration but not to the 8042: reads
give 0xFF, writes are ignored, both are counted as odd accesses.

The model follows the 8042 as PC firmware and operating systems drive it (the IBM AT/PS/2
technical references, and the sequences Linux's ``i8042``/``atkbd``/``psmouse`` drivers
and SeaBIOS's ``ps2port.c`` issue):

* **One output buffer, three sources.** Bytes reach port 0x60 through a single output
  buffer register (status OBF). It is loaded, whenever it is empty, from (in this order)
  the controller's own answers (command results, 0xD2/0xD3 bytes), the keyboard, and the
  mouse. A device whose interface is disabled in the command byte (bits 4/5) keeps its
  bytes, as a real device whose clock line is held low does. Status AUXB says the byte in
  the buffer came from the mouse (0xD3 bytes included: Linux's AUX probe relies on it).
* **Translation.** With command-byte bit 6 (XLATE) set, keyboard bytes are translated from
  scancode set 2 to set 1 as they enter the output buffer, through the 8042's fixed table,
  and a set-2 break prefix 0xF0 is folded into bit 7 of the byte that follows. All
  keyboard bytes go through it, replies included: with XLATE the keyboard ID reads
  ``AB 41`` and the "current scancode set" answer for set 2 reads 0x41, which is what
  Linux and QEMU expect.
* **Interrupts.** ISA IRQ1 and IRQ12 are edge-triggered at the IOAPIC while
  :class:`~iovirt.interrupt.Interrupt` has level semantics; a raise after a lower is the
  edge. A line is high while the output buffer holds a byte of its side and the matching
  interrupt-enable bit (command byte bit 0 for the keyboard side, bit 1 for the mouse) is
  set. Reading port 0x60 lowers both lines before the next byte is loaded, so every byte
  delivered with its interrupt enabled is its own edge (QEMU does the same).
* **Devices answer ahead of their data.** A keyboard or mouse reply (ACK 0xFA and what
  follows) goes out before scancodes or packets still buffered in the device, and a new
  byte from the host discards a reply the guest never read (as QEMU's ``ps2.c`` does): a
  driver always finds its ACK first, and a guest that never reads cannot grow a queue.
* **Bounded buffers.** The keyboard buffers up to :data:`KBD_BUFFER_SIZE` bytes of
  scancodes; when a key's bytes do not fit it drops that key and queues the overrun code
  (0x00 in set 2, 0xFF in set 1/translated) once, as keyboards do. The mouse buffers up to
  :data:`AUX_BUFFER_SIZE` bytes and drops whole packets beyond. The controller's answer
  queue holds :data:`CTRL_QUEUE_SIZE` bytes. Input status IBF is always 0: the controller
  takes every byte at once.
* **Reset line and A20.** Command 0xFE (and every 0xF0-0xFF pulse with bit 0 clear) or an
  output-port write (0xD1) with bit 0 clear pulses the CPU reset line: ``on_reset`` is
  called, outside the lock. A20 is kept in output-port bit 1 (0xD1, 0xDD, 0xDF) and
  reported by :attr:`I8042.a20`; iovirt never masks A20 in guest memory.

Power-on state. iovirt starts guests without BIOS POST (Linux boot protocol), so the
controller starts the way firmware leaves a PC: self-test passed (SYS), translation on,
A20 on, keyboard scanning, mouse in stream mode with reporting off. Both interfaces start
disabled with their interrupts off (command byte 0x74) until the guest enables them:
keys typed before a driver runs then wait in the keyboard instead of piling up behind the
output buffer, where Linux's i8042 probe, which gives up on a controller whose buffer
does not drain within 16 reads, would take the whole controller for absent.

Choices and limits:

* Scancode sets 1 and 2 are supported (set 1 is what XLATE produces); selecting set 3 is
  answered with RESEND (0xFE). The set-3-only commands 0xF7-0xFD are unknown (0xFE).
* The keyboard makes no autorepeat of its own: front-ends (VNC clients) send a key's
  repeats as further key-down events, which come out as repeated make codes, exactly what
  typematic repeat looks like on the wire. The typematic byte (0xF3) is only stored.
* Pause and Print Screen send their plain sequences; the variants real keyboards send
  with Ctrl (Break) or Alt (SysRq) held are not modelled.
* Writing a byte to a device (port 0x60, or 0xD4 then 0x60) enables that device's
  interface, since the controller must release the device's clock line to send to it
  (QEMU's pckbd does the same).
* The mouse's motion comes from absolute pointer positions (VNC): the difference from the
  previous position, in pixels as counts, with no motion for the first event after a
  reset. Large moves are split into several packets that each fit the 9-bit range (so
  stream packets never need the overflow bits); remote-mode reads (0xEB) report the
  accumulated motion clamped to that range with the overflow bits set when it did not fit.
  Resolution and sample rate are stored and reported, not applied.
* The Explorer knock (rates 200, 200, 80) works only once the mouse is in IntelliMouse
  mode (ID 3), as on Microsoft's mice and as Linux probes it. Buttons 4/5 of the Explorer
  packet are always 0: RFB has no such buttons.
* Reading port 0x60 with nothing waiting returns the last byte read again (the register
  keeps its contents) and changes nothing. Accesses wider than a byte are served as byte
  accesses; they, offsets 1-3, unknown controller commands and answers dropped because the
  controller queue was full are counted in ``bad_accesses`` and logged, rate-limited.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from iovirt.bus.pci import GuestAccessLog
from iovirt.input import (
    BUTTON_LEFT,
    BUTTON_MIDDLE,
    BUTTON_RIGHT,
    BUTTON_WHEEL_DOWN,
    BUTTON_WHEEL_UP,
)
from iovirt.interrupt import Interrupt

log = logging.getLogger(__name__)

# --- Ports. The device is registered at I8042_DATA_PORT with I8042_NUM_PORTS ports.
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_NUM_PORTS = I8042_COMMAND_PORT - I8042_DATA_PORT + 1
DATA_OFFSET = 0  # 0x60: output buffer (read), input buffer for data (write)
STATUS_OFFSET = I8042_COMMAND_PORT - I8042_DATA_PORT  # 0x64 read: status register
COMMAND_OFFSET = STATUS_OFFSET  # 0x64 write: command register

# --- Status register (port 0x64, read).
STATUS_OBF = 0x01  # output buffer full: a byte waits at 0x60
STATUS_IBF = 0x02  # input buffer full: never set, every byte is taken at once
STATUS_SYS = 0x04  # system flag: self-test passed (and command-byte bit 2)
STATUS_CMD = 0x08  # A2: the last byte written went to 0x64 (command), not 0x60 (data)
STATUS_KEYLOCK = 0x10  # keyboard not inhibited by the key lock (there is no key lock)
STATUS_AUXB = 0x20  # the byte in the output buffer came from the mouse side
STATUS_TIMEOUT = 0x40  # transmit/receive timeout: never set
STATUS_PARITY = 0x80  # parity error: never set

# --- Controller command byte (RAM byte 0; read with 0x20, written with 0x60).
CTR_KBD_INT = 0x01  # IRQ1 when a keyboard-side byte is in the output buffer
CTR_AUX_INT = 0x02  # IRQ12 when a mouse-side byte is in the output buffer
CTR_SYS = 0x04  # system flag, copied to STATUS_SYS when written
CTR_IGNORE_KEYLOCK = 0x08  # (AT) ignore the key lock switch; stored only
CTR_KBD_DISABLE = 0x10  # keyboard interface disabled: keyboard bytes wait
CTR_AUX_DISABLE = 0x20  # mouse interface disabled: mouse bytes wait
CTR_XLATE = 0x40  # translate keyboard bytes from scancode set 2 to set 1
# Power-on value, see the module docstring: translation on, system flag set, both
# interfaces disabled, no interrupts.
CTR_DEFAULT = CTR_XLATE | CTR_AUX_DISABLE | CTR_KBD_DISABLE | CTR_SYS  # 0x74

CTRL_RAM_SIZE = 32  # 0x20-0x3F read and 0x60-0x7F write RAM bytes 0-31

# --- Output port (0xD0 read, 0xD1 write).
OUTPORT_RESET = 0x01  # CPU reset line, active low: 0 puts the CPU in reset
OUTPORT_A20 = 0x02  # A20 gate
OUTPORT_AUX_DATA = 0x04  # mouse data line (PS/2 controllers); idle high
OUTPORT_AUX_CLOCK = 0x08  # mouse clock line; idle high
OUTPORT_KBD_OBF = 0x10  # output buffer full with a keyboard-side byte (the IRQ1 pin)
OUTPORT_AUX_OBF = 0x20  # output buffer full with a mouse-side byte (the IRQ12 pin)
OUTPORT_KBD_CLOCK = 0x40  # keyboard clock line; idle high
OUTPORT_KBD_DATA = 0x80  # keyboard data line; idle high
OUTPORT_DEFAULT = (
    OUTPORT_RESET
    | OUTPORT_A20
    | OUTPORT_AUX_DATA
    | OUTPORT_AUX_CLOCK
    | OUTPORT_KBD_CLOCK
    | OUTPORT_KBD_DATA
)  # 0xCF

# --- Input port (0xC0 read).
INPORT_KBD_NOT_INHIBITED = 0x80  # bit 7: the key lock does not inhibit the keyboard
INPORT_VALUE = INPORT_KBD_NOT_INHIBITED

# --- Controller commands (port 0x64, write).
CMD_READ_RAM = 0x20  # 0x20-0x3F: read RAM byte (command & 0x1F) into the output buffer
CMD_READ_CTR = 0x20  # RAM byte 0 is the command byte
CMD_WRITE_RAM = 0x60  # 0x60-0x7F: the next data byte goes to RAM byte (command & 0x1F)
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7  # set CTR_AUX_DISABLE
CMD_ENABLE_AUX = 0xA8  # clear CTR_AUX_DISABLE
CMD_TEST_AUX = 0xA9  # mouse interface test: 0x00 = no error
CMD_SELF_TEST = 0xAA  # controller self-test: 0x55 = passed
CMD_TEST_KBD = 0xAB  # keyboard interface test: 0x00 = no error
CMD_DISABLE_KBD = 0xAD  # set CTR_KBD_DISABLE
CMD_ENABLE_KBD = 0xAE  # clear CTR_KBD_DISABLE
CMD_READ_INPUT_PORT = 0xC0
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1  # next data byte goes to the output port
CMD_WRITE_KBD_OUTPUT = 0xD2  # next data byte appears in the output buffer as from the keyboard
CMD_WRITE_AUX_OUTPUT = 0xD3  # ... as from the mouse (Linux's AUX loopback test)
CMD_WRITE_AUX = 0xD4  # next data byte is sent to the mouse
CMD_A20_OFF = 0xDD
CMD_A20_ON = 0xDF
CMD_PULSE = 0xF0  # 0xF0-0xFF: pulse output-port bits 0-3 whose command bit is 0
CMD_PULSE_RESET = 0xFE  # pulse bit 0 only: the CPU reset line
CMD_PULSE_NONE = 0xFF  # pulse nothing

SELF_TEST_OK = 0x55
PORT_TEST_OK = 0x00

CTRL_QUEUE_SIZE = 16  # controller answers not yet read

# --- Replies common to both devices.
REPLY_ACK = 0xFA  # command or argument accepted
REPLY_RESEND = 0xFE  # byte not understood: send it again
REPLY_BAT_OK = 0xAA  # basic assurance test passed, after a reset
KBD_RESEND = REPLY_RESEND

# --- Keyboard commands (data port, to the keyboard).
KBD_CMD_SET_LEDS = 0xED  # + LED byte
KBD_CMD_ECHO = 0xEE  # answered with 0xEE, no ACK
KBD_CMD_SCANCODE_SET = 0xF0  # + 0 (query) or 1/2/3 (select)
KBD_CMD_GET_ID = 0xF2
KBD_CMD_SET_TYPEMATIC = 0xF3  # + rate/delay byte (bit 7 clear)
KBD_CMD_ENABLE = 0xF4  # clear the buffer, start scanning
KBD_CMD_DISABLE = 0xF5  # defaults, clear the buffer, stop scanning
KBD_CMD_SET_DEFAULTS = 0xF6  # defaults, clear the buffer, keep scanning
KBD_CMD_RESEND = 0xFE  # send the last byte again
KBD_CMD_RESET = 0xFF  # defaults, LEDs off, BAT: answers FA AA
KBD_FIRST_COMMAND = 0xED  # bytes from here up are commands, below are arguments

KBD_REPLY_ECHO = 0xEE
KBD_ID = (0xAB, 0x83)  # MF2 keyboard
KBD_OVERRUN_SET2 = 0x00  # key detection error / buffer overrun, sets 2 and 3
KBD_OVERRUN_SET1 = 0xFF  # the same in set 1 (and what set 2's 0x00 translates to)
KBD_TYPEMATIC_DEFAULT = 0x2B  # 10.9 characters/s after 500 ms
KBD_LED_SCROLL_LOCK = 0x01
KBD_LED_NUM_LOCK = 0x02
KBD_LED_CAPS_LOCK = 0x04
KBD_BUFFER_SIZE = 256

# --- Mouse commands (0xD4, then the data port).
AUX_CMD_SET_SCALING_1_1 = 0xE6
AUX_CMD_SET_SCALING_2_1 = 0xE7
AUX_CMD_SET_RESOLUTION = 0xE8  # + 0..3 (1, 2, 4, 8 counts/mm)
AUX_CMD_STATUS_REQUEST = 0xE9  # FA + status, resolution, sample rate
AUX_CMD_SET_STREAM = 0xEA
AUX_CMD_READ_DATA = 0xEB  # FA + one packet (remote mode's only report)
AUX_CMD_RESET_WRAP = 0xEC
AUX_CMD_SET_WRAP = 0xEE  # echo every byte except 0xEC and 0xFF
AUX_CMD_SET_REMOTE = 0xF0
AUX_CMD_GET_ID = 0xF2
AUX_CMD_SET_SAMPLE_RATE = 0xF3  # + rate
AUX_CMD_ENABLE = 0xF4  # enable data reporting
AUX_CMD_DISABLE = 0xF5  # disable data reporting
AUX_CMD_SET_DEFAULTS = 0xF6
AUX_CMD_RESET = 0xFF  # answers FA AA 00

AUX_ID_PS2 = 0x00  # standard 3-byte packets
AUX_ID_IMPS2 = 0x03  # IntelliMouse: 4th byte is the wheel
AUX_ID_IMEX = 0x04  # IntelliMouse Explorer: 4th byte is wheel and buttons 4/5
AUX_KNOCK_IMPS2 = (200, 100, 80)  # sample rates that turn ID 0 into ID 3
AUX_KNOCK_IMEX = (200, 200, 80)  # ... and ID 3 into ID 4
AUX_SAMPLE_RATES = frozenset({10, 20, 40, 60, 80, 100, 200})
AUX_SAMPLE_RATE_DEFAULT = 100
AUX_RESOLUTION_MAX = 3
AUX_RESOLUTION_DEFAULT = 2  # 4 counts/mm

# Status request, first byte.
AUX_STATUS_RIGHT = 0x01
AUX_STATUS_MIDDLE = 0x02
AUX_STATUS_LEFT = 0x04
AUX_STATUS_SCALING_2_1 = 0x10
AUX_STATUS_ENABLED = 0x20
AUX_STATUS_REMOTE = 0x40

# Movement packet, first byte.
AUX_PACKET_LEFT = 0x01
AUX_PACKET_RIGHT = 0x02
AUX_PACKET_MIDDLE = 0x04
AUX_PACKET_ALWAYS_1 = 0x08
AUX_PACKET_X_SIGN = 0x10
AUX_PACKET_Y_SIGN = 0x20
AUX_PACKET_X_OVERFLOW = 0x40
AUX_PACKET_Y_OVERFLOW = 0x80
AUX_MOVE_MIN, AUX_MOVE_MAX = -256, 255  # 9-bit two's complement counts
AUX_WHEEL_MIN, AUX_WHEEL_MAX = -8, 7  # 4-bit two's complement wheel counts

AUX_BUFFER_SIZE = 256
# Remote-mode counters and pointer coordinates are clamped to these, so a stray host value
# cannot make a motion that takes unbounded work to packetise.
AUX_ACCUMULATOR_LIMIT = 0xFFFF
POINTER_COORD_MAX = 0xFFFF

# --- Linux input event codes (linux/input-event-codes.h) and their scancode set 2 make
# codes: (name, code, make bytes). Break codes put 0xF0 before the last byte. Print Screen
# (KEY_SYSRQ, which is what Linux reports for it) and Pause have their own sequences below.
_KEYS: tuple[tuple[str, int, bytes], ...] = (
    ("KEY_ESC", 1, b"\x76"),
    ("KEY_1", 2, b"\x16"),
    ("KEY_2", 3, b"\x1e"),
    ("KEY_3", 4, b"\x26"),
    ("KEY_4", 5, b"\x25"),
    ("KEY_5", 6, b"\x2e"),
    ("KEY_6", 7, b"\x36"),
    ("KEY_7", 8, b"\x3d"),
    ("KEY_8", 9, b"\x3e"),
    ("KEY_9", 10, b"\x46"),
    ("KEY_0", 11, b"\x45"),
    ("KEY_MINUS", 12, b"\x4e"),
    ("KEY_EQUAL", 13, b"\x55"),
    ("KEY_BACKSPACE", 14, b"\x66"),
    ("KEY_TAB", 15, b"\x0d"),
    ("KEY_Q", 16, b"\x15"),
    ("KEY_W", 17, b"\x1d"),
    ("KEY_E", 18, b"\x24"),
    ("KEY_R", 19, b"\x2d"),
    ("KEY_T", 20, b"\x2c"),
    ("KEY_Y", 21, b"\x35"),
    ("KEY_U", 22, b"\x3c"),
    ("KEY_I", 23, b"\x43"),
    ("KEY_O", 24, b"\x44"),
    ("KEY_P", 25, b"\x4d"),
    ("KEY_LEFTBRACE", 26, b"\x54"),
    ("KEY_RIGHTBRACE", 27, b"\x5b"),
    ("KEY_ENTER", 28, b"\x5a"),
    ("KEY_LEFTCTRL", 29, b"\x14"),
    ("KEY_A", 30, b"\x1c"),
    ("KEY_S", 31, b"\x1b"),
    ("KEY_D", 32, b"\x23"),
    ("KEY_F", 33, b"\x2b"),
    ("KEY_G", 34, b"\x34"),
    ("KEY_H", 35, b"\x33"),
    ("KEY_J", 36, b"\x3b"),
    ("KEY_K", 37, b"\x42"),
    ("KEY_L", 38, b"\x4b"),
    ("KEY_SEMICOLON", 39, b"\x4c"),
    ("KEY_APOSTROPHE", 40, b"\x52"),
    ("KEY_GRAVE", 41, b"\x0e"),
    ("KEY_LEFTSHIFT", 42, b"\x12"),
    ("KEY_BACKSLASH", 43, b"\x5d"),
    ("KEY_Z", 44, b"\x1a"),
    ("KEY_X", 45, b"\x22"),
    ("KEY_C", 46, b"\x21"),
    ("KEY_V", 47, b"\x2a"),
    ("KEY_B", 48, b"\x32"),
    ("KEY_N", 49, b"\x31"),
    ("KEY_M", 50, b"\x3a"),
    ("KEY_COMMA", 51, b"\x41"),
    ("KEY_DOT", 52, b"\x49"),
    ("KEY_SLASH", 53, b"\x4a"),
    ("KEY_RIGHTSHIFT", 54, b"\x59"),
    ("KEY_KPASTERISK", 55, b"\x7c"),
    ("KEY_LEFTALT", 56, b"\x11"),
    ("KEY_SPACE", 57, b"\x29"),
    ("KEY_CAPSLOCK", 58, b"\x58"),
    ("KEY_F1", 59, b"\x05"),
    ("KEY_F2", 60, b"\x06"),
    ("KEY_F3", 61, b"\x04"),
    ("KEY_F4", 62, b"\x0c"),
    ("KEY_F5", 63, b"\x03"),
    ("KEY_F6", 64, b"\x0b"),
    ("KEY_F7", 65, b"\x83"),
    ("KEY_F8", 66, b"\x0a"),
    ("KEY_F9", 67, b"\x01"),
    ("KEY_F10", 68, b"\x09"),
    ("KEY_NUMLOCK", 69, b"\x77"),
    ("KEY_SCROLLLOCK", 70, b"\x7e"),
    ("KEY_KP7", 71, b"\x6c"),
    ("KEY_KP8", 72, b"\x75"),
    ("KEY_KP9", 73, b"\x7d"),
    ("KEY_KPMINUS", 74, b"\x7b"),
    ("KEY_KP4", 75, b"\x6b"),
    ("KEY_KP5", 76, b"\x73"),
    ("KEY_KP6", 77, b"\x74"),
    ("KEY_KPPLUS", 78, b"\x79"),
    ("KEY_KP1", 79, b"\x69"),
    ("KEY_KP2", 80, b"\x72"),
    ("KEY_KP3", 81, b"\x7a"),
    ("KEY_KP0", 82, b"\x70"),
    ("KEY_KPDOT", 83, b"\x71"),
    ("KEY_102ND", 86, b"\x61"),
    ("KEY_F11", 87, b"\x78"),
    ("KEY_F12", 88, b"\x07"),
    ("KEY_RO", 89, b"\x51"),
    ("KEY_HENKAN", 92, b"\x64"),
    ("KEY_KATAKANAHIRAGANA", 93, b"\x13"),
    ("KEY_MUHENKAN", 94, b"\x67"),
    ("KEY_KPENTER", 96, b"\xe0\x5a"),
    ("KEY_RIGHTCTRL", 97, b"\xe0\x14"),
    ("KEY_KPSLASH", 98, b"\xe0\x4a"),
    ("KEY_RIGHTALT", 100, b"\xe0\x11"),
    ("KEY_HOME", 102, b"\xe0\x6c"),
    ("KEY_UP", 103, b"\xe0\x75"),
    ("KEY_PAGEUP", 104, b"\xe0\x7d"),
    ("KEY_LEFT", 105, b"\xe0\x6b"),
    ("KEY_RIGHT", 106, b"\xe0\x74"),
    ("KEY_END", 107, b"\xe0\x69"),
    ("KEY_DOWN", 108, b"\xe0\x72"),
    ("KEY_PAGEDOWN", 109, b"\xe0\x7a"),
    ("KEY_INSERT", 110, b"\xe0\x70"),
    ("KEY_DELETE", 111, b"\xe0\x71"),
    ("KEY_MUTE", 113, b"\xe0\x23"),
    ("KEY_VOLUMEDOWN", 114, b"\xe0\x21"),
    ("KEY_VOLUMEUP", 115, b"\xe0\x32"),
    ("KEY_POWER", 116, b"\xe0\x37"),
    ("KEY_KPEQUAL", 117, b"\x0f"),
    ("KEY_KPCOMMA", 121, b"\x6d"),
    ("KEY_YEN", 124, b"\x6a"),
    ("KEY_LEFTMETA", 125, b"\xe0\x1f"),
    ("KEY_RIGHTMETA", 126, b"\xe0\x27"),
    ("KEY_COMPOSE", 127, b"\xe0\x2f"),
    ("KEY_SLEEP", 142, b"\xe0\x3f"),
    ("KEY_WAKEUP", 143, b"\xe0\x5e"),
)
KEY_SYSRQ = 99  # Print Screen / SysRq
KEY_PAUSE = 119

#: Linux ``KEY_*`` name -> code, for every key this keyboard has (Print Screen and Pause
#: included): the numbering other keyboard models (USB HID) can map from too.
KEY_CODES: dict[str, int] = {name: code for name, code, _ in _KEYS} | {
    "KEY_SYSRQ": KEY_SYSRQ,
    "KEY_PAUSE": KEY_PAUSE,
}
#: Linux key code -> scancode set 2 make code (E0-prefixed for the extended keys).
SET2_SCANCODES: dict[int, bytes] = {code: make for _, code, make in _KEYS}
SET2_PRINT_SCREEN_MAKE = b"\xe0\x12\xe0\x7c"  # fake left shift down, then the key
SET2_PRINT_SCREEN_BREAK = b"\xe0\xf0\x7c\xe0\xf0\x12"
SET2_PAUSE_MAKE = b"\xe1\x14\x77\xe1\xf0\x14\xf0\x77"  # make and break at once; no break
SET2_BREAK_PREFIX = 0xF0
SET2_EXTENDED_PREFIX = 0xE0

#: The 8042's translation table: scancode set 2 byte -> set 1 byte. Bytes 0x80 and up pass
#: unchanged except 0x83 (F7) and 0x84 (Alt+SysRq); 0xF0 never reaches the table (it sets
#: bit 7 of the next byte instead).
SET2_TO_SET1: bytes = (
    bytes.fromhex(
        "ff 43 41 3f 3d 3b 3c 58 64 44 42 40 3e 0f 29 59"
        "65 38 2a 70 1d 10 02 5a 66 71 2c 1f 1e 11 03 5b"
        "67 2e 2d 20 12 05 04 5c 68 39 2f 21 14 13 06 5d"
        "69 31 30 23 22 15 07 5e 6a 72 32 24 16 08 09 5f"
        "6b 33 25 17 18 0b 0a 60 6c 34 35 26 27 19 0c 61"
        "6d 73 28 74 1a 0d 62 6e 3a 36 1c 1b 75 2b 63 76"
        "55 56 77 78 79 7a 0e 7b 7c 4f 7d 4b 47 7e 7f 6f"
        "52 53 50 4c 4d 48 01 45 57 4e 51 4a 37 49 46 54"
    )
    + bytes([0x80, 0x81, 0x82, 0x41, 0x54])
    + bytes(range(0x85, 0x100))
)
SET1_BREAK_BIT = 0x80


def set2_sequence(keycode: int, down: bool) -> bytes:
    """The scancode set 2 bytes a key sends when pressed (``down``) or released; empty for
    a key this keyboard does not have (and for releasing Pause, which sends nothing)."""
    if keycode == KEY_PAUSE:
        return SET2_PAUSE_MAKE if down else b""
    if keycode == KEY_SYSRQ:
        return SET2_PRINT_SCREEN_MAKE if down else SET2_PRINT_SCREEN_BREAK
    make = SET2_SCANCODES.get(keycode)
    if make is None:
        return b""
    if down:
        return make
    return make[:-1] + bytes([SET2_BREAK_PREFIX]) + make[-1:]


def translate_set2_to_set1(data: bytes) -> bytes:
    """Run whole scancode sequences through the 8042 translation (0xF0 folds into bit 7)."""
    out = bytearray()
    release = False
    for byte in data:
        if byte == SET2_BREAK_PREFIX:
            release = True
            continue
        out.append(SET2_TO_SET1[byte] | (SET1_BREAK_BIT if release else 0))
        release = False
    return bytes(out)


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


class QueueLengths(NamedTuple):
    """Bytes waiting behind the output buffer, per source (for tests and fuzz oracles)."""

    controller: int
    keyboard: int
    mouse: int


class AtKeyboard:
    """The MF2 keyboard on the controller's first port; an :class:`~iovirt.input.InputSink`.

    Shares the controller's lock: methods starting with ``_`` are the controller's side
    and run with that lock held.
    """

    def __init__(self, lock: threading.Lock, on_output: Callable[[], None]) -> None:
        self._lock = lock
        self._on_output = on_output  # the controller loads its output buffer (lock held)
        self._reply: deque[int] = deque()  # answer to the last byte from the host
        self._buffer: deque[int] = deque()  # scancodes, at most KBD_BUFFER_SIZE
        self._awaiting: int | None = None  # command waiting for its argument byte
        self._last_sent = REPLY_BAT_OK  # for RESEND; the BAT result is the first byte sent
        self._scanning = True
        self._scancode_set = 2
        self._leds = 0
        self._typematic = KBD_TYPEMATIC_DEFAULT
        self.keys_dropped = 0  # key events lost to a full buffer

    # ------------------------------------------------------------------ host side

    def key_event(self, keycode: int, down: bool) -> None:
        """A key went down or up (Linux ``KEY_*`` code); unknown keys are ignored."""
        sequence = set2_sequence(keycode, down)
        if not sequence:
            return
        with self._lock:
            if not self._scanning:
                return  # a keyboard that is not scanning sends nothing
            if self._scancode_set == 1:
                sequence = translate_set2_to_set1(sequence)
            self._queue_scancodes(sequence)
            self._on_output()

    def pointer_event(self, x: int, y: int, buttons: int, width: int, height: int) -> None:
        """A keyboard has no pointer."""

    @property
    def leds(self) -> int:
        """The LED byte the guest last set (``KBD_LED_*`` bits)."""
        with self._lock:
            return self._leds

    @property
    def typematic(self) -> int:
        """The typematic rate/delay byte the guest last set (stored, not applied)."""
        with self._lock:
            return self._typematic

    @property
    def scancode_set(self) -> int:
        with self._lock:
            return self._scancode_set

    @property
    def scanning(self) -> bool:
        with self._lock:
            return self._scanning

    # ------------------------------------------------------------------ controller side

    def _has_output(self) -> bool:
        return bool(self._reply or self._buffer)

    def _take_output(self) -> int:
        byte = self._reply.popleft() if self._reply else self._buffer.popleft()
        self._last_sent = byte
        return byte

    def _queued(self) -> int:
        return len(self._reply) + len(self._buffer)

    def _queue_scancodes(self, sequence: bytes) -> None:
        # One byte is always kept free for the overrun code, and a key goes in whole or not
        # at all: half a sequence would leave the guest's decoder in a wrong state.
        if len(self._buffer) + len(sequence) < KBD_BUFFER_SIZE:
            self._buffer.extend(sequence)
            return
        self.keys_dropped += 1
        overrun = KBD_OVERRUN_SET1 if self._scancode_set == 1 else KBD_OVERRUN_SET2
        if len(self._buffer) < KBD_BUFFER_SIZE and (
            not self._buffer or self._buffer[-1] != overrun
        ):
            self._buffer.append(overrun)

    def _defaults(self) -> None:
        self._scancode_set = 2
        self._typematic = KBD_TYPEMATIC_DEFAULT
        self._buffer.clear()

    def _receive(self, byte: int) -> None:
        """A byte from the host: a command, or the argument of the previous one."""
        self._reply.clear()  # an answer the guest never read is dropped for the new one
        awaiting, self._awaiting = self._awaiting, None
        if awaiting is not None and byte < KBD_FIRST_COMMAND:
            self._argument(awaiting, byte)
        else:
            # A command byte where an argument was due aborts the old command.
            self._command(byte)

    def _argument(self, command: int, arg: int) -> None:
        if command == KBD_CMD_SET_LEDS:
            self._leds = arg & (KBD_LED_SCROLL_LOCK | KBD_LED_NUM_LOCK | KBD_LED_CAPS_LOCK)
            self._reply.append(REPLY_ACK)
        elif command == KBD_CMD_SET_TYPEMATIC:
            if arg & 0x80:
                self._reply.append(REPLY_RESEND)
            else:
                self._typematic = arg
                self._reply.append(REPLY_ACK)
        elif command == KBD_CMD_SCANCODE_SET:
            if arg == 0:
                self._reply.extend((REPLY_ACK, self._scancode_set))
            elif arg in (1, 2):
                if arg != self._scancode_set:
                    self._buffer.clear()  # codes of the old set mean nothing any more
                self._scancode_set = arg
                self._reply.append(REPLY_ACK)
            else:
                self._reply.append(REPLY_RESEND)  # set 3 (or nonsense): not supported

    def _command(self, command: int) -> None:
        if command in (KBD_CMD_SET_LEDS, KBD_CMD_SET_TYPEMATIC, KBD_CMD_SCANCODE_SET):
            self._awaiting = command
            self._reply.append(REPLY_ACK)
        elif command == KBD_CMD_ECHO:
            self._reply.append(KBD_REPLY_ECHO)
        elif command == KBD_CMD_GET_ID:
            self._reply.extend((REPLY_ACK, *KBD_ID))
        elif command == KBD_CMD_ENABLE:
            self._buffer.clear()
            self._scanning = True
            self._reply.append(REPLY_ACK)
        elif command in (KBD_CMD_DISABLE, KBD_CMD_SET_DEFAULTS):
            self._defaults()
            self._scanning = command == KBD_CMD_SET_DEFAULTS
            self._reply.append(REPLY_ACK)
        elif command == KBD_CMD_RESEND:
            self._reply.append(self._last_sent)
        elif command == KBD_CMD_RESET:
            self._defaults()
            self._leds = 0
            self._scanning = True
            self._reply.extend((REPLY_ACK, REPLY_BAT_OK))
        else:
            self._reply.append(REPLY_RESEND)


class Ps2Mouse:
    """The PS/2 mouse on the controller's second port, with the IntelliMouse wheel; an
    :class:`~iovirt.input.InputSink` fed with absolute pointer positions.

    Shares the controller's lock: methods starting with ``_`` are the controller's side
    and run with that lock held.
    """

    def __init__(self, lock: threading.Lock, on_output: Callable[[], None]) -> None:
        self._lock = lock
        self._on_output = on_output
        self._reply: deque[int] = deque()
        self._buffer: deque[int] = deque()  # movement packets, at most AUX_BUFFER_SIZE
        self._awaiting: int | None = None
        self._rates: deque[int] = deque(maxlen=len(AUX_KNOCK_IMPS2))  # last sample rates set
        self._id = AUX_ID_PS2
        self._wrap = False
        self._rfb_buttons = 0
        self._buttons = 0  # AUX_PACKET_LEFT/RIGHT/MIDDLE held now
        self._last_position: tuple[int, int] | None = None
        self.packets_dropped = 0  # stream packets lost to a full buffer
        # Set by _set_defaults: sample rate, resolution, scaling, mode, reporting, and the
        # motion counters remote mode accumulates.
        self._rate = AUX_SAMPLE_RATE_DEFAULT
        self._resolution = AUX_RESOLUTION_DEFAULT
        self._scaling_2_1 = False
        self._remote = False
        self._reporting = False
        self._dx = self._dy = self._dz = 0
        self._set_defaults()

    # ------------------------------------------------------------------ host side

    def key_event(self, keycode: int, down: bool) -> None:
        """A mouse has no keys."""

    def pointer_event(self, x: int, y: int, buttons: int, width: int, height: int) -> None:
        """The pointer is at (``x``, ``y``) with ``buttons`` (RFB bits) held. Motion is the
        difference from the previous event (none for the first after a reset); the wheel
        turns one notch per wheel bit that is set now and was clear in the previous event.
        ``width`` and ``height`` do not matter to a relative device."""
        x = _clamp(x, 0, POINTER_COORD_MAX)
        y = _clamp(y, 0, POINTER_COORD_MAX)
        with self._lock:
            if self._last_position is None:
                dx = dy = 0
            else:
                dx = x - self._last_position[0]
                dy = self._last_position[1] - y  # PS/2 Y grows upwards, screen Y downwards
            self._last_position = (x, y)
            pressed = buttons & ~self._rfb_buttons
            self._rfb_buttons = buttons
            dz = (1 if pressed & BUTTON_WHEEL_DOWN else 0) - (1 if pressed & BUTTON_WHEEL_UP else 0)
            new_buttons = (
                (AUX_PACKET_LEFT if buttons & BUTTON_LEFT else 0)
                | (AUX_PACKET_RIGHT if buttons & BUTTON_RIGHT else 0)
                | (AUX_PACKET_MIDDLE if buttons & BUTTON_MIDDLE else 0)
            )
            changed = new_buttons != self._buttons
            self._buttons = new_buttons
            if self._id == AUX_ID_PS2:
                dz = 0  # no wheel until the IntelliMouse knock
            if self._wrap:
                return  # wrap mode reports nothing
            if self._remote:
                limit = AUX_ACCUMULATOR_LIMIT
                self._dx = _clamp(self._dx + dx, -limit, limit)
                self._dy = _clamp(self._dy + dy, -limit, limit)
                self._dz = _clamp(self._dz + dz, -limit, limit)
                return
            if not self._reporting or not (dx or dy or dz or changed):
                return
            self._stream(dx, dy, dz)
            self._on_output()

    @property
    def device_id(self) -> int:
        """What GET ID answers: 0 (PS/2), 3 (IntelliMouse) or 4 (Explorer)."""
        with self._lock:
            return self._id

    @property
    def reporting(self) -> bool:
        with self._lock:
            return self._reporting

    @property
    def sample_rate(self) -> int:
        with self._lock:
            return self._rate

    @property
    def resolution(self) -> int:
        with self._lock:
            return self._resolution

    # ------------------------------------------------------------------ controller side

    def _has_output(self) -> bool:
        return bool(self._reply or self._buffer)

    def _take_output(self) -> int:
        return self._reply.popleft() if self._reply else self._buffer.popleft()

    def _queued(self) -> int:
        return len(self._reply) + len(self._buffer)

    def _set_defaults(self) -> None:
        self._rate = AUX_SAMPLE_RATE_DEFAULT
        self._resolution = AUX_RESOLUTION_DEFAULT
        self._scaling_2_1 = False
        self._remote = False
        self._reporting = False
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._dx = self._dy = self._dz = 0

    def _reset(self) -> None:
        self._set_defaults()
        self._id = AUX_ID_PS2
        self._wrap = False
        self._rates.clear()
        self._buffer.clear()
        self._last_position = None

    def _packet(self, dx: int, dy: int, dz: int, x_over: bool, y_over: bool) -> bytes:
        first = (
            AUX_PACKET_ALWAYS_1
            | self._buttons
            | (AUX_PACKET_X_SIGN if dx < 0 else 0)
            | (AUX_PACKET_Y_SIGN if dy < 0 else 0)
            | (AUX_PACKET_X_OVERFLOW if x_over else 0)
            | (AUX_PACKET_Y_OVERFLOW if y_over else 0)
        )
        packet = bytes((first, dx & 0xFF, dy & 0xFF))
        if self._id == AUX_ID_IMPS2:
            return packet + bytes((dz & 0xFF,))
        if self._id == AUX_ID_IMEX:
            # Bits 0-3 wheel, bits 4/5 buttons 4/5 (never pressed: RFB has none), 6/7 zero.
            return packet + bytes((dz & 0x0F,))
        return packet

    @staticmethod
    def _scale_2_1(n: int) -> int:
        # The 2:1 scaling curve applied to stream reports: 0 1 1 3 6 9, then doubling.
        magnitude = abs(n)
        scaled = (0, 1, 1, 3, 6, 9)[magnitude] if magnitude < 6 else 2 * magnitude
        return -scaled if n < 0 else scaled

    def _stream(self, dx: int, dy: int, dz: int) -> None:
        """Queue stream packets for one motion, split so that every count fits."""
        low, high = AUX_MOVE_MIN, AUX_MOVE_MAX
        if self._scaling_2_1:
            low, high = low // 2, high // 2  # after doubling the value still fits
        first = True
        while first or dx or dy or dz:
            step_x, step_y = _clamp(dx, low, high), _clamp(dy, low, high)
            step_z = _clamp(dz, AUX_WHEEL_MIN, AUX_WHEEL_MAX)
            out_x, out_y = step_x, step_y
            if self._scaling_2_1:
                out_x, out_y = self._scale_2_1(step_x), self._scale_2_1(step_y)
            packet = self._packet(out_x, out_y, step_z, False, False)
            if len(self._buffer) + len(packet) > AUX_BUFFER_SIZE:
                self.packets_dropped += 1
                return
            self._buffer.extend(packet)
            dx, dy, dz = dx - step_x, dy - step_y, dz - step_z
            first = False

    def _read_data_packet(self) -> bytes:
        dx = _clamp(self._dx, AUX_MOVE_MIN, AUX_MOVE_MAX)
        dy = _clamp(self._dy, AUX_MOVE_MIN, AUX_MOVE_MAX)
        dz = _clamp(self._dz, AUX_WHEEL_MIN, AUX_WHEEL_MAX)
        packet = self._packet(dx, dy, dz, dx != self._dx, dy != self._dy)
        self._reset_counters()
        return packet

    def _status(self) -> int:
        return (
            (AUX_STATUS_REMOTE if self._remote else 0)
            | (AUX_STATUS_ENABLED if self._reporting else 0)
            | (AUX_STATUS_SCALING_2_1 if self._scaling_2_1 else 0)
            | (AUX_STATUS_LEFT if self._buttons & AUX_PACKET_LEFT else 0)
            | (AUX_STATUS_MIDDLE if self._buttons & AUX_PACKET_MIDDLE else 0)
            | (AUX_STATUS_RIGHT if self._buttons & AUX_PACKET_RIGHT else 0)
        )

    def _receive(self, byte: int) -> None:
        """A byte from the host (through 0xD4): a command, or an argument."""
        self._reply.clear()
        awaiting, self._awaiting = self._awaiting, None
        if awaiting is not None:
            self._argument(awaiting, byte)
        elif self._wrap and byte not in (AUX_CMD_RESET_WRAP, AUX_CMD_RESET):
            self._reply.append(byte)  # wrap mode echoes
        else:
            self._command(byte)

    def _argument(self, command: int, arg: int) -> None:
        # An invalid argument is answered with RESEND and ends the command: a driver that
        # retries sends it as a command next, which is refused the same way.
        if command == AUX_CMD_SET_RESOLUTION:
            if arg > AUX_RESOLUTION_MAX:
                self._reply.append(REPLY_RESEND)
                return
            self._resolution = arg
        else:  # AUX_CMD_SET_SAMPLE_RATE
            if arg not in AUX_SAMPLE_RATES:
                self._reply.append(REPLY_RESEND)
                return
            self._rate = arg
            self._rates.append(arg)
            rates = tuple(self._rates)
            if self._id == AUX_ID_PS2 and rates == AUX_KNOCK_IMPS2:
                self._id = AUX_ID_IMPS2
            elif self._id == AUX_ID_IMPS2 and rates == AUX_KNOCK_IMEX:
                self._id = AUX_ID_IMEX
        self._reply.append(REPLY_ACK)

    def _command(self, command: int) -> None:
        ack = True
        if command == AUX_CMD_SET_SCALING_1_1:
            self._scaling_2_1 = False
        elif command == AUX_CMD_SET_SCALING_2_1:
            self._scaling_2_1 = True
        elif command in (AUX_CMD_SET_RESOLUTION, AUX_CMD_SET_SAMPLE_RATE):
            self._awaiting = command
        elif command == AUX_CMD_STATUS_REQUEST:
            self._reply.extend((REPLY_ACK, self._status(), self._resolution, self._rate))
            ack = False
        elif command == AUX_CMD_SET_STREAM:
            self._remote = False
            self._reset_counters()
            self._buffer.clear()
        elif command == AUX_CMD_READ_DATA:
            self._reply.append(REPLY_ACK)
            self._reply.extend(self._read_data_packet())
            ack = False
        elif command == AUX_CMD_RESET_WRAP:
            self._wrap = False
            self._reset_counters()
        elif command == AUX_CMD_SET_WRAP:
            self._wrap = True
            self._reset_counters()
            self._buffer.clear()
        elif command == AUX_CMD_SET_REMOTE:
            self._remote = True
            self._reset_counters()
            self._buffer.clear()
        elif command == AUX_CMD_GET_ID:
            self._reply.extend((REPLY_ACK, self._id))
            self._reset_counters()
            ack = False
        elif command == AUX_CMD_ENABLE:
            self._reporting = True
            self._reset_counters()
        elif command == AUX_CMD_DISABLE:
            self._reporting = False
            self._reset_counters()
            self._buffer.clear()
        elif command == AUX_CMD_SET_DEFAULTS:
            self._set_defaults()
            self._buffer.clear()
        elif command == AUX_CMD_RESET:
            self._reset()
            self._reply.extend((REPLY_ACK, REPLY_BAT_OK, AUX_ID_PS2))
            ack = False
        else:
            self._reply.append(REPLY_RESEND)
            ack = False
        if ack:
            self._reply.append(REPLY_ACK)


class I8042:
    """The controller. ``on_reset`` is called (outside the lock) when the guest pulses the
    CPU reset line; ``kbd_irq`` is ISA IRQ1 and ``aux_irq`` ISA IRQ12 (``None``: not
    wired). :attr:`keyboard` and :attr:`mouse` are the input sinks front-ends feed.
    ``read`` and ``write`` (vCPU threads) and the sinks (host I/O loop) may run in any
    thread: one lock covers the controller and both devices.
    """

    def __init__(
        self,
        on_reset: Callable[[], None],
        kbd_irq: Interrupt | None = None,
        aux_irq: Interrupt | None = None,
    ) -> None:
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._lock = threading.Lock()
        self.keyboard = AtKeyboard(self._lock, self._fill_output_buffer)
        self.mouse = Ps2Mouse(self._lock, self._fill_output_buffer)
        self.bad_accesses = GuestAccessLog("i8042", log)

        self._ram = bytearray(CTRL_RAM_SIZE)
        self._ram[0] = CTR_DEFAULT
        self._status = STATUS_SYS  # the SYS and CMD bits; the rest is computed
        self._outport = OUTPORT_DEFAULT
        self._pending: int | None = None  # command waiting for its data byte
        self._ctrl_queue: deque[tuple[int, bool]] = deque()  # (byte, from the mouse side)
        self._output: int | None = None  # the output buffer register; None: empty
        self._output_aux = False
        self._last_output = 0  # what an empty output buffer reads as
        self._xlate_release = False  # a set-2 0xF0 was swallowed by the translation
        self._kbd_level = False
        self._aux_level = False

    # ------------------------------------------------------------------ state for tests

    @property
    def a20(self) -> bool:
        """Whether the guest has the A20 gate on (output-port bit 1)."""
        with self._lock:
            return bool(self._outport & OUTPORT_A20)

    @property
    def command_byte(self) -> int:
        with self._lock:
            return self._ram[0]

    def queue_lengths(self) -> QueueLengths:
        with self._lock:
            return QueueLengths(
                len(self._ctrl_queue), self.keyboard._queued(), self.mouse._queued()
            )

    # ------------------------------------------------------------------ bus device

    def read(self, offset: int, size: int) -> int:
        """A guest read: offset 0 is port 0x60, offset 4 port 0x64."""
        with self._lock:
            if size != 1:
                self.bad_accesses(f"{size}-byte read at offset {offset}")
            if offset == STATUS_OFFSET:
                return self._status_register()
            if offset == DATA_OFFSET:
                return self._read_data()
            self.bad_accesses(f"read at offset {offset} (port {I8042_DATA_PORT + offset:#x})")
            return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write: a data byte at offset 0 (0x60), a command at offset 4 (0x64)."""
        reset = False
        with self._lock:
            if size != 1:
                self.bad_accesses(f"{size}-byte write at offset {offset}")
            value &= 0xFF
            if offset == COMMAND_OFFSET:
                self._status |= STATUS_CMD
                reset = self._command(value)
            elif offset == DATA_OFFSET:
                self._status &= ~STATUS_CMD
                reset = self._data(value)
            else:
                self.bad_accesses(
                    f"write {value:#04x} at offset {offset} (port {I8042_DATA_PORT + offset:#x})"
                )
            self._fill_output_buffer()
        if reset:
            self._on_reset()

    # ------------------------------------------------------------------ registers

    def _status_register(self) -> int:
        status = self._status | STATUS_KEYLOCK
        if self._output is not None:
            status |= STATUS_OBF | (STATUS_AUXB if self._output_aux else 0)
        return status

    def _read_data(self) -> int:
        if self._output is None:
            return self._last_output
        value, self._output = self._output, None
        self._last_output = value
        # Drop both lines before the next byte is loaded: its raise is a new edge.
        self._set_lines(False, False)
        self._fill_output_buffer()
        return value

    def _answer(self, byte: int, aux: bool = False) -> None:
        if len(self._ctrl_queue) >= CTRL_QUEUE_SIZE:
            self.bad_accesses(f"controller answer {byte:#04x} dropped: {CTRL_QUEUE_SIZE} unread")
            return
        self._ctrl_queue.append((byte, aux))

    def _command(self, cmd: int) -> bool:
        """A byte written to 0x64. Returns whether it pulsed the reset line."""
        self._pending = None  # a command cancels a data byte still expected
        if CMD_READ_RAM <= cmd < CMD_READ_RAM + CTRL_RAM_SIZE:
            self._answer(self._ram[cmd - CMD_READ_RAM])
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + CTRL_RAM_SIZE or cmd in (
            CMD_WRITE_OUTPUT_PORT,
            CMD_WRITE_KBD_OUTPUT,
            CMD_WRITE_AUX_OUTPUT,
            CMD_WRITE_AUX,
        ):
            self._pending = cmd
        elif cmd == CMD_DISABLE_AUX:
            self._set_command_byte(self._ram[0] | CTR_AUX_DISABLE)
        elif cmd == CMD_ENABLE_AUX:
            self._set_command_byte(self._ram[0] & ~CTR_AUX_DISABLE)
        elif cmd == CMD_DISABLE_KBD:
            self._set_command_byte(self._ram[0] | CTR_KBD_DISABLE)
        elif cmd == CMD_ENABLE_KBD:
            self._set_command_byte(self._ram[0] & ~CTR_KBD_DISABLE)
        elif cmd in (CMD_TEST_AUX, CMD_TEST_KBD):
            self._answer(PORT_TEST_OK)
        elif cmd == CMD_SELF_TEST:
            self._status |= STATUS_SYS
            self._answer(SELF_TEST_OK)
        elif cmd == CMD_READ_INPUT_PORT:
            self._answer(INPORT_VALUE)
        elif cmd == CMD_READ_OUTPUT_PORT:
            outport = self._outport & ~(OUTPORT_KBD_OBF | OUTPORT_AUX_OBF)
            if self._output is not None:
                outport |= OUTPORT_AUX_OBF if self._output_aux else OUTPORT_KBD_OBF
            self._answer(outport)
        elif cmd == CMD_A20_OFF:
            self._outport &= ~OUTPORT_A20
        elif cmd == CMD_A20_ON:
            self._outport |= OUTPORT_A20
        elif cmd >= CMD_PULSE:
            # Bits 0-3 name the output-port lines to pulse low; only bit 0, the CPU reset
            # line, has an effect here.
            return not cmd & OUTPORT_RESET
        else:
            self.bad_accesses(f"unknown controller command {cmd:#04x}")
        return False

    def _data(self, value: int) -> bool:
        """A byte written to 0x60. Returns whether it pulsed the reset line."""
        pending, self._pending = self._pending, None
        if pending is None:
            # To the keyboard. Sending to it releases its clock line, which enables its
            # interface; its answer then goes out ahead of the scancodes it held.
            self.keyboard._receive(value)
            self._set_command_byte(self._ram[0] & ~CTR_KBD_DISABLE)
        elif pending == CMD_WRITE_AUX:
            self.mouse._receive(value)
            self._set_command_byte(self._ram[0] & ~CTR_AUX_DISABLE)
        elif pending == CMD_WRITE_KBD_OUTPUT:
            self._answer(value)
        elif pending == CMD_WRITE_AUX_OUTPUT:
            self._answer(value, aux=True)
        elif pending == CMD_WRITE_OUTPUT_PORT:
            # The reset pulse ends at once; the line reads back as released.
            self._outport = value | OUTPORT_RESET
            return not value & OUTPORT_RESET
        else:  # CMD_WRITE_RAM + index
            index = pending - CMD_WRITE_RAM
            if index == 0:
                self._set_command_byte(value)
                self._status = (self._status & ~STATUS_SYS) | (value & CTR_SYS)
            else:
                self._ram[index] = value
        return False

    def _set_command_byte(self, value: int) -> None:
        if not value & CTR_XLATE:
            self._xlate_release = False
        self._ram[0] = value & 0xFF
        # An interface just enabled may have bytes to load; an interrupt just enabled (or
        # disabled) changes its line for the byte already waiting.
        self._fill_output_buffer()

    # ------------------------------------------------------------------ output buffer

    def _fill_output_buffer(self) -> None:
        """Load the output buffer if it is empty, then drive the IRQ lines (lock held)."""
        ctr = self._ram[0]
        while self._output is None:
            if self._ctrl_queue:
                self._output, self._output_aux = self._ctrl_queue.popleft()
            elif not ctr & CTR_KBD_DISABLE and self.keyboard._has_output():
                byte = self.keyboard._take_output()
                if ctr & CTR_XLATE:
                    if byte == SET2_BREAK_PREFIX:
                        self._xlate_release = True
                        continue  # swallowed: it becomes bit 7 of the next byte
                    byte = SET2_TO_SET1[byte] | (SET1_BREAK_BIT if self._xlate_release else 0)
                    self._xlate_release = False
                self._output, self._output_aux = byte, False
            elif not ctr & CTR_AUX_DISABLE and self.mouse._has_output():
                self._output, self._output_aux = self.mouse._take_output(), True
            else:
                break
        full = self._output is not None
        self._set_lines(
            full and not self._output_aux and bool(ctr & CTR_KBD_INT),
            full and self._output_aux and bool(ctr & CTR_AUX_INT),
        )

    def _set_lines(self, kbd: bool, aux: bool) -> None:
        if kbd != self._kbd_level:
            self._kbd_level = kbd
            if self._kbd_irq is not None:
                self._kbd_irq.set_level(kbd)
        if aux != self._aux_level:
            self._aux_level = aux
            if self._aux_irq is not None:
                self._aux_irq.set_level(aux)
