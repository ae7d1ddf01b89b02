"""USB HID devices fed by the VNC server: a boot-protocol keyboard and an absolute tablet.

Facts come from the *Device Class Definition for HID 1.11* (class descriptors 7.1, class
requests 7.2, boot keyboard report in appendix B.1) and the *HID Usage Tables* (Generic
Desktop page 0x01, Keyboard/Keypad page 0x07, LED page 0x08, Button page 0x09). The key
translation starts from Linux ``KEY_*`` codes (what :class:`~iovirt.input.InputSink`
carries) and is the inverse of the table Linux's HID layer uses to go the other way, so a key
pressed in the VNC viewer arrives in a Linux guest as the same ``KEY_*`` code.

Both devices are full-speed (USB 1.1) devices with one configuration, one HID interface and one
interrupt IN endpoint (0x81, 8 bytes, polled every 10 ms as far as the guest's scheduling goes).

* :class:`UsbKeyboard`: interface subclass 1 (boot), protocol 1 (keyboard); its report
  descriptor describes exactly the 8-byte boot report (modifier byte, reserved byte, six key
  slots), so report protocol and boot protocol send the same bytes. More than six keys held
  puts ErrorRollOver (0x01) in every slot (HID 1.11 appendix C). LEDs arrive as an Output
  report through SET_REPORT on the control pipe (there is no interrupt OUT endpoint).
* :class:`UsbTablet`: a pointer with three buttons, absolute X and Y in 0..0x7FFF and a
  relative wheel; a VNC pointer position maps 1:1 (no acceleration) because the guest scales
  the logical range back to its screen. RFB's wheel "buttons" are momentary: each 0->1
  transition of the wheel-up/down bit is one wheel step.

Reports are made only when the state changes (the device's idle rate is only stored: with
no timer in a device model, a non-zero SET_IDLE rate is reported back by GET_IDLE but
reports are still sent on change only, which is what idle rate 0 means and what Linux asks
for). A report waits in a bounded queue (:data:`REPORT_QUEUE_LENGTH`, oldest dropped and
counted) until the guest has an interrupt IN transfer queued; the device then calls the
controller's ``notify`` callback, and the controller writes the report into guest memory and
posts the Transfer Event. Reports are only queued while the device is configured.
"""

from __future__ import annotations

import collections
import struct

from iovirt.devices.usb import (
    USB_CONFIG_ATT_WAKEUP,
    USB_DIR_IN,
    USB_DT_DEVICE_QUALIFIER,
    USB_ENDPOINT_DIR_IN,
    USB_ENDPOINT_XFER_INT,
    USB_RECIP_INTERFACE,
    USB_TYPE_CLASS,
    USB_TYPE_MASK,
    USB_TYPE_STANDARD,
    Endpoint,
    Handshake,
    SetupPacket,
    UsbDevice,
    UsbSpeed,
    configuration_descriptor,
    device_descriptor,
    endpoint_descriptor,
    interface_descriptor,
)
from iovirt.input import (
    BUTTON_LEFT,
    BUTTON_MIDDLE,
    BUTTON_RIGHT,
    BUTTON_WHEEL_DOWN,
    BUTTON_WHEEL_UP,
)

# --- HID class (HID 1.11 4.1-4.3, 7.1).
USB_CLASS_HID = 0x03
HID_SUBCLASS_NONE = 0
HID_SUBCLASS_BOOT = 1
HID_PROTOCOL_NONE = 0
HID_PROTOCOL_KEYBOARD = 1

HID_DT_HID = 0x21
HID_DT_REPORT = 0x22
HID_DESCRIPTOR_SIZE = 9
HID_BCD = 0x0111

# --- HID class requests (7.2), bRequest values.
HID_REQ_GET_REPORT = 0x01
HID_REQ_GET_IDLE = 0x02
HID_REQ_GET_PROTOCOL = 0x03
HID_REQ_SET_REPORT = 0x09
HID_REQ_SET_IDLE = 0x0A
HID_REQ_SET_PROTOCOL = 0x0B

# Report types (high byte of wValue in GET/SET_REPORT).
HID_REPORT_INPUT = 1
HID_REPORT_OUTPUT = 2
HID_REPORT_FEATURE = 3

HID_PROTOCOL_BOOT = 0
HID_PROTOCOL_REPORT = 1

# Idle rates after reset (7.2.4): 500 ms for keyboards (in 4 ms units), infinite for mice.
KEYBOARD_DEFAULT_IDLE = 125
POINTER_DEFAULT_IDLE = 0

# --- Identity. pid.codes' test vendor and test product IDs: these are not products anyone
# ships, and the guest binds the generic HID driver by interface class anyway.
HID_VENDOR_ID = 0x1209
KEYBOARD_PRODUCT_ID = 0x0001
TABLET_PRODUCT_ID = 0x0002
HID_BCD_DEVICE = 0x0100
# USB 1.1, as full-speed-only keyboards and mice are: the host asks for no BOS descriptor
# (>= 0x0201) and no DEVICE_QUALIFIER (a full-speed 2.0 device under a high-speed hub).
USB_BCD_11 = 0x0110
MAX_PACKET0 = 64
STRING_MANUFACTURER = 1
STRING_PRODUCT = 2
STRING_SERIAL = 3

INTERRUPT_ENDPOINT = 1  # endpoint number of the interrupt IN endpoint (address 0x81)
INTERRUPT_MAX_PACKET = 8
INTERRUPT_INTERVAL_MS = 10

# Enough for a typed burst: VNC clients send a whole pasted or typed line at once, each
# key is two reports (down, up), and a slow guest takes one report per interrupt transfer.
# Dropping a keyboard report loses a key or leaves one stuck (seen with 16 in the lab).
REPORT_QUEUE_LENGTH = 256

# --- Keyboard report (HID 1.11 appendix B.1).
KEYBOARD_REPORT_SIZE = 8
KEYBOARD_KEY_SLOTS = 6
HID_USAGE_ERROR_ROLLOVER = 0x01
HID_USAGE_LEFT_CONTROL = 0xE0  # modifiers are usages 0xE0-0xE7, bit n of byte 0
HID_USAGE_RIGHT_GUI = 0xE7
LED_MASK = 0x1F  # Num Lock, Caps Lock, Scroll Lock, Compose, Kana

# --- Tablet report: buttons byte, X (16 bits), Y (16 bits), wheel (signed byte).
TABLET_REPORT_SIZE = 6
TABLET_AXIS_MAX = 0x7FFF
HID_BUTTON_PRIMARY = 0x01  # Button 1: left
HID_BUTTON_SECONDARY = 0x02  # Button 2: right
HID_BUTTON_TERTIARY = 0x04  # Button 3: middle


# --- Report descriptor items (HID 1.11 6.2.2). A short item is a prefix byte (tag, type,
# size code) and 0, 1, 2 or 4 data bytes.
_ITEM_MAIN = 0
_ITEM_GLOBAL = 1
_ITEM_LOCAL = 2


def _item(tag: int, kind: int, value: int | None = None, *, signed: bool = False) -> bytes:
    """One short item with the smallest data size that holds ``value``; ``signed`` items
    (logical and physical extents) are read back as two's complement, so 255 needs two
    bytes there."""
    if value is None:
        return bytes([tag << 4 | kind << 2])
    for size, code in ((1, 1), (2, 2), (4, 3)):
        bits = 8 * size
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if low <= value <= high:
            data = (value & ((1 << bits) - 1)).to_bytes(size, "little")
            return bytes([tag << 4 | kind << 2 | code]) + data
    raise ValueError(f"item value {value} does not fit 4 bytes")


def usage_page(page: int) -> bytes:
    return _item(0x0, _ITEM_GLOBAL, page)


def usage(value: int) -> bytes:
    return _item(0x0, _ITEM_LOCAL, value)


def usage_minimum(value: int) -> bytes:
    return _item(0x1, _ITEM_LOCAL, value)


def usage_maximum(value: int) -> bytes:
    return _item(0x2, _ITEM_LOCAL, value)


def logical_minimum(value: int) -> bytes:
    return _item(0x1, _ITEM_GLOBAL, value, signed=True)


def logical_maximum(value: int) -> bytes:
    return _item(0x2, _ITEM_GLOBAL, value, signed=True)


def physical_minimum(value: int) -> bytes:
    return _item(0x3, _ITEM_GLOBAL, value, signed=True)


def physical_maximum(value: int) -> bytes:
    return _item(0x4, _ITEM_GLOBAL, value, signed=True)


def report_size(bits: int) -> bytes:
    return _item(0x7, _ITEM_GLOBAL, bits)


def report_count(count: int) -> bytes:
    return _item(0x9, _ITEM_GLOBAL, count)


# Main item data bits.
MAIN_CONSTANT = 0x01
MAIN_VARIABLE = 0x02
MAIN_RELATIVE = 0x04


def input_item(flags: int) -> bytes:
    return _item(0x8, _ITEM_MAIN, flags)


def output_item(flags: int) -> bytes:
    return _item(0x9, _ITEM_MAIN, flags)


def collection(kind: int) -> bytes:
    return _item(0xA, _ITEM_MAIN, kind)


def end_collection() -> bytes:
    return _item(0xC, _ITEM_MAIN)


COLLECTION_PHYSICAL = 0x00
COLLECTION_APPLICATION = 0x01

PAGE_GENERIC_DESKTOP = 0x01
PAGE_KEYBOARD = 0x07
PAGE_LED = 0x08
PAGE_BUTTON = 0x09
USAGE_POINTER = 0x01
USAGE_MOUSE = 0x02
USAGE_KEYBOARD = 0x06
USAGE_X = 0x30
USAGE_Y = 0x31
USAGE_WHEEL = 0x38


def keyboard_report_descriptor() -> bytes:
    """The boot keyboard layout: 8 modifier bits, a constant byte, 5 LED output bits and 3
    padding bits, then 6 key usages (0-255)."""
    return b"".join(
        (
            usage_page(PAGE_GENERIC_DESKTOP),
            usage(USAGE_KEYBOARD),
            collection(COLLECTION_APPLICATION),
            usage_page(PAGE_KEYBOARD),
            usage_minimum(HID_USAGE_LEFT_CONTROL),
            usage_maximum(HID_USAGE_RIGHT_GUI),
            logical_minimum(0),
            logical_maximum(1),
            report_size(1),
            report_count(8),
            input_item(MAIN_VARIABLE),
            report_count(1),
            report_size(8),
            input_item(MAIN_CONSTANT),
            report_count(5),
            report_size(1),
            usage_page(PAGE_LED),
            usage_minimum(1),
            usage_maximum(5),
            output_item(MAIN_VARIABLE),
            report_count(1),
            report_size(3),
            output_item(MAIN_CONSTANT),
            report_count(KEYBOARD_KEY_SLOTS),
            report_size(8),
            logical_minimum(0),
            logical_maximum(0xFF),
            usage_page(PAGE_KEYBOARD),
            usage_minimum(0),
            usage_maximum(0xFF),
            input_item(0),  # data, array
            end_collection(),
        )
    )


def tablet_report_descriptor() -> bytes:
    """Three buttons and 5 padding bits, X and Y absolute in 0..0x7FFF (16 bits each), and
    a relative wheel byte."""
    return b"".join(
        (
            usage_page(PAGE_GENERIC_DESKTOP),
            usage(USAGE_MOUSE),
            collection(COLLECTION_APPLICATION),
            usage(USAGE_POINTER),
            collection(COLLECTION_PHYSICAL),
            usage_page(PAGE_BUTTON),
            usage_minimum(1),
            usage_maximum(3),
            logical_minimum(0),
            logical_maximum(1),
            report_count(3),
            report_size(1),
            input_item(MAIN_VARIABLE),
            report_count(1),
            report_size(5),
            input_item(MAIN_CONSTANT),
            usage_page(PAGE_GENERIC_DESKTOP),
            usage(USAGE_X),
            usage(USAGE_Y),
            logical_minimum(0),
            logical_maximum(TABLET_AXIS_MAX),
            physical_minimum(0),
            physical_maximum(TABLET_AXIS_MAX),
            report_size(16),
            report_count(2),
            input_item(MAIN_VARIABLE),
            usage(USAGE_WHEEL),
            logical_minimum(-127),
            logical_maximum(127),
            physical_minimum(0),
            physical_maximum(0),
            report_size(8),
            report_count(1),
            input_item(MAIN_VARIABLE | MAIN_RELATIVE),
            end_collection(),
            end_collection(),
        )
    )


# --- Linux KEY_* code -> HID usage (Keyboard/Keypad page). Where Linux maps two usages to one
# code (0x31 and 0x32 are both KEY_BACKSLASH; 0x4C, 0x9C, 0xD8 are all KEY_DELETE), the
# usage a US keyboard sends wins.
_KEYCODE_TO_USAGE: dict[int, int] = {
    30: 0x04,  # KEY_A
    48: 0x05,  # KEY_B
    46: 0x06,  # KEY_C
    32: 0x07,  # KEY_D
    18: 0x08,  # KEY_E
    33: 0x09,  # KEY_F
    34: 0x0A,  # KEY_G
    35: 0x0B,  # KEY_H
    23: 0x0C,  # KEY_I
    36: 0x0D,  # KEY_J
    37: 0x0E,  # KEY_K
    38: 0x0F,  # KEY_L
    50: 0x10,  # KEY_M
    49: 0x11,  # KEY_N
    24: 0x12,  # KEY_O
    25: 0x13,  # KEY_P
    16: 0x14,  # KEY_Q
    19: 0x15,  # KEY_R
    31: 0x16,  # KEY_S
    20: 0x17,  # KEY_T
    22: 0x18,  # KEY_U
    47: 0x19,  # KEY_V
    17: 0x1A,  # KEY_W
    45: 0x1B,  # KEY_X
    21: 0x1C,  # KEY_Y
    44: 0x1D,  # KEY_Z
    2: 0x1E,  # KEY_1
    3: 0x1F,  # KEY_2
    4: 0x20,  # KEY_3
    5: 0x21,  # KEY_4
    6: 0x22,  # KEY_5
    7: 0x23,  # KEY_6
    8: 0x24,  # KEY_7
    9: 0x25,  # KEY_8
    10: 0x26,  # KEY_9
    11: 0x27,  # KEY_0
    28: 0x28,  # KEY_ENTER
    1: 0x29,  # KEY_ESC
    14: 0x2A,  # KEY_BACKSPACE
    15: 0x2B,  # KEY_TAB
    57: 0x2C,  # KEY_SPACE
    12: 0x2D,  # KEY_MINUS
    13: 0x2E,  # KEY_EQUAL
    26: 0x2F,  # KEY_LEFTBRACE
    27: 0x30,  # KEY_RIGHTBRACE
    43: 0x31,  # KEY_BACKSLASH
    39: 0x33,  # KEY_SEMICOLON
    40: 0x34,  # KEY_APOSTROPHE
    41: 0x35,  # KEY_GRAVE
    51: 0x36,  # KEY_COMMA
    52: 0x37,  # KEY_DOT
    53: 0x38,  # KEY_SLASH
    58: 0x39,  # KEY_CAPSLOCK
    59: 0x3A,  # KEY_F1
    60: 0x3B,  # KEY_F2
    61: 0x3C,  # KEY_F3
    62: 0x3D,  # KEY_F4
    63: 0x3E,  # KEY_F5
    64: 0x3F,  # KEY_F6
    65: 0x40,  # KEY_F7
    66: 0x41,  # KEY_F8
    67: 0x42,  # KEY_F9
    68: 0x43,  # KEY_F10
    87: 0x44,  # KEY_F11
    88: 0x45,  # KEY_F12
    99: 0x46,  # KEY_SYSRQ (Print Screen)
    70: 0x47,  # KEY_SCROLLLOCK
    119: 0x48,  # KEY_PAUSE
    110: 0x49,  # KEY_INSERT
    102: 0x4A,  # KEY_HOME
    104: 0x4B,  # KEY_PAGEUP
    111: 0x4C,  # KEY_DELETE
    107: 0x4D,  # KEY_END
    109: 0x4E,  # KEY_PAGEDOWN
    106: 0x4F,  # KEY_RIGHT
    105: 0x50,  # KEY_LEFT
    108: 0x51,  # KEY_DOWN
    103: 0x52,  # KEY_UP
    69: 0x53,  # KEY_NUMLOCK
    98: 0x54,  # KEY_KPSLASH
    55: 0x55,  # KEY_KPASTERISK
    74: 0x56,  # KEY_KPMINUS
    78: 0x57,  # KEY_KPPLUS
    96: 0x58,  # KEY_KPENTER
    79: 0x59,  # KEY_KP1
    80: 0x5A,  # KEY_KP2
    81: 0x5B,  # KEY_KP3
    75: 0x5C,  # KEY_KP4
    76: 0x5D,  # KEY_KP5
    77: 0x5E,  # KEY_KP6
    71: 0x5F,  # KEY_KP7
    72: 0x60,  # KEY_KP8
    73: 0x61,  # KEY_KP9
    82: 0x62,  # KEY_KP0
    83: 0x63,  # KEY_KPDOT
    86: 0x64,  # KEY_102ND (Non-US backslash)
    127: 0x65,  # KEY_COMPOSE (Application)
    116: 0x66,  # KEY_POWER
    117: 0x67,  # KEY_KPEQUAL
    183: 0x68,  # KEY_F13
    184: 0x69,  # KEY_F14
    185: 0x6A,  # KEY_F15
    186: 0x6B,  # KEY_F16
    187: 0x6C,  # KEY_F17
    188: 0x6D,  # KEY_F18
    189: 0x6E,  # KEY_F19
    190: 0x6F,  # KEY_F20
    191: 0x70,  # KEY_F21
    192: 0x71,  # KEY_F22
    193: 0x72,  # KEY_F23
    194: 0x73,  # KEY_F24
    134: 0x74,  # KEY_OPEN (Execute)
    138: 0x75,  # KEY_HELP
    130: 0x76,  # KEY_PROPS (Menu)
    132: 0x77,  # KEY_FRONT (Select)
    128: 0x78,  # KEY_STOP
    129: 0x79,  # KEY_AGAIN
    131: 0x7A,  # KEY_UNDO
    137: 0x7B,  # KEY_CUT
    133: 0x7C,  # KEY_COPY
    135: 0x7D,  # KEY_PASTE
    136: 0x7E,  # KEY_FIND
    113: 0x7F,  # KEY_MUTE
    115: 0x80,  # KEY_VOLUMEUP
    114: 0x81,  # KEY_VOLUMEDOWN
    121: 0x85,  # KEY_KPCOMMA
    89: 0x87,  # KEY_RO (International1)
    93: 0x88,  # KEY_KATAKANAHIRAGANA (International2)
    124: 0x89,  # KEY_YEN (International3)
    92: 0x8A,  # KEY_HENKAN (International4)
    94: 0x8B,  # KEY_MUHENKAN (International5)
    95: 0x8C,  # KEY_KPJPCOMMA (International6)
    122: 0x90,  # KEY_HANGEUL (LANG1)
    123: 0x91,  # KEY_HANJA (LANG2)
    90: 0x92,  # KEY_KATAKANA (LANG3)
    91: 0x93,  # KEY_HIRAGANA (LANG4)
    85: 0x94,  # KEY_ZENKAKUHANKAKU (LANG5)
    179: 0xB6,  # KEY_KPLEFTPAREN
    180: 0xB7,  # KEY_KPRIGHTPAREN
    29: 0xE0,  # KEY_LEFTCTRL
    42: 0xE1,  # KEY_LEFTSHIFT
    56: 0xE2,  # KEY_LEFTALT
    125: 0xE3,  # KEY_LEFTMETA
    97: 0xE4,  # KEY_RIGHTCTRL
    54: 0xE5,  # KEY_RIGHTSHIFT
    100: 0xE6,  # KEY_RIGHTALT
    126: 0xE7,  # KEY_RIGHTMETA
}


def keycode_to_usage(keycode: int) -> int | None:
    """The Keyboard-page usage for Linux ``KEY_*`` code ``keycode``, or None."""
    return _KEYCODE_TO_USAGE.get(keycode)


def scale_axis(position: int, extent: int) -> int:
    """Pixel ``position`` on a screen ``extent`` pixels wide, as a tablet coordinate in
    0..0x7FFF: pixel 0 is 0 and the last pixel is 0x7FFF, rounded to nearest, so a guest
    that scales back with ``v * (extent - 1) / 0x7FFF`` and rounds lands on the same pixel."""
    if extent <= 1:
        return 0
    position = min(max(position, 0), extent - 1)
    return (position * TABLET_AXIS_MAX + (extent - 1) // 2) // (extent - 1)


class UsbHidDevice(UsbDevice):
    """What the keyboard and the tablet share: the HID interface, its class requests, the
    interrupt IN endpoint and the bounded report queue."""

    def __init__(
        self,
        *,
        name: str,
        product_id: int,
        product: str,
        subclass: int,
        protocol: int,
        report_descriptor: bytes,
        report_size: int,
        default_idle: int,
    ) -> None:
        self.report_descriptor = report_descriptor
        self.report_size = report_size
        endpoint = Endpoint(
            USB_ENDPOINT_DIR_IN | INTERRUPT_ENDPOINT,
            USB_ENDPOINT_XFER_INT,
            INTERRUPT_MAX_PACKET,
            INTERRUPT_INTERVAL_MS,
        )
        self.hid_descriptor = struct.pack(
            "<BBHBBBH",
            HID_DESCRIPTOR_SIZE,
            HID_DT_HID,
            HID_BCD,
            0,  # country code: not localized
            1,  # one class descriptor follows: the report descriptor
            HID_DT_REPORT,
            len(report_descriptor),
        )
        body = (
            interface_descriptor(
                number=0,
                endpoints=1,
                interface_class=USB_CLASS_HID,
                subclass=subclass,
                protocol=protocol,
            )
            + self.hid_descriptor
            + endpoint_descriptor(endpoint)
        )
        super().__init__(
            name=name,
            speed=UsbSpeed.FULL,
            device=device_descriptor(
                bcd_usb=USB_BCD_11,
                device_class=0,  # class is given per interface
                subclass=0,
                protocol=0,
                max_packet0=MAX_PACKET0,
                vendor=HID_VENDOR_ID,
                product=product_id,
                bcd_device=HID_BCD_DEVICE,
                manufacturer=STRING_MANUFACTURER,
                product_string=STRING_PRODUCT,
                serial=STRING_SERIAL,
            ),
            configuration=configuration_descriptor(
                value=1,
                interfaces=1,
                attributes=USB_CONFIG_ATT_WAKEUP,
                max_power_ma=100,
                body=body,
            ),
            strings={
                STRING_MANUFACTURER: "iovirt",
                STRING_PRODUCT: product,
                STRING_SERIAL: "1",
            },
            endpoints=(endpoint,),
            remote_wakeup_capable=True,
        )
        self._default_idle = default_idle
        self.idle = default_idle
        self.protocol = HID_PROTOCOL_REPORT
        self._queue: collections.deque[bytes] = collections.deque()
        self._last_queued: bytes | None = None  # the newest report made (queued or sent)
        self.dropped_reports = 0

    # -- reports ---------------------------------------------------------------------------

    def current_report(self) -> bytes:
        """The input report describing the state now (what GET_REPORT answers)."""
        raise NotImplementedError

    def output_report(self, data: bytes) -> None:
        """An Output report from the host (SET_REPORT); devices without one ignore it."""

    def _report_changed(self, report: bytes) -> None:
        """Queue ``report`` if it says something new; tell the controller. Lock held."""
        if not self.configuration or report == self._last_queued:
            return
        self._last_queued = report
        if len(self._queue) >= REPORT_QUEUE_LENGTH:
            self._queue.popleft()
            self.dropped_reports += 1
        self._queue.append(report)
        self.notify(INTERRUPT_ENDPOINT)

    @property
    def pending_reports(self) -> int:
        return len(self._queue)

    def transfer_in(self, endpoint: int, max_length: int) -> bytes | Handshake:
        with self.lock:
            address = USB_ENDPOINT_DIR_IN | endpoint
            if endpoint != INTERRUPT_ENDPOINT or not self.configuration or self.halted(address):
                return Handshake.STALL
            if not self._queue:
                return Handshake.NAK
            return self._queue.popleft()

    def wants_remote_wakeup(self) -> bool:
        return self.remote_wakeup and bool(self._queue)

    def _on_reset(self) -> None:
        self._queue.clear()
        self._last_queued = None
        self.idle = self._default_idle
        self.protocol = HID_PROTOCOL_REPORT

    def _on_configured(self) -> None:
        # A fresh configuration starts a fresh report stream: the first report the host
        # reads after it is the state at the next change.
        self._queue.clear()
        self._last_queued = self.current_report() if self.configuration else None

    # -- descriptors and class requests ----------------------------------------------------

    def class_descriptor(self, setup: SetupPacket) -> bytes | None:
        kind, index = setup.value >> 8, setup.value & 0xFF
        if setup.kind != USB_TYPE_STANDARD or setup.recipient != USB_RECIP_INTERFACE:
            return None
        if setup.index != 0 or index != 0 or kind == USB_DT_DEVICE_QUALIFIER:
            return None
        if kind == HID_DT_REPORT:
            return self.report_descriptor
        if kind == HID_DT_HID:
            return self.hid_descriptor
        return None

    def class_request(self, setup: SetupPacket, data: bytes) -> bytes | Handshake:
        if (
            setup.request_type & USB_TYPE_MASK != USB_TYPE_CLASS
            or setup.recipient != USB_RECIP_INTERFACE
            or setup.index != 0
        ):
            return Handshake.STALL
        request = setup.request
        report_type, report_id = setup.value >> 8, setup.value & 0xFF
        direction_in = bool(setup.request_type & USB_DIR_IN)
        if request == HID_REQ_GET_REPORT and direction_in:
            if report_id != 0 or report_type != HID_REPORT_INPUT:
                return Handshake.STALL
            return self.current_report()
        if request == HID_REQ_SET_REPORT and not direction_in:
            if report_id != 0 or report_type != HID_REPORT_OUTPUT:
                return Handshake.STALL
            self.output_report(data)
            return b""
        if request == HID_REQ_GET_IDLE and direction_in:
            return bytes([self.idle]) if report_id == 0 else Handshake.STALL
        if request == HID_REQ_SET_IDLE and not direction_in:
            if report_id != 0:
                return Handshake.STALL
            self.idle = setup.value >> 8  # see the module docstring: reports on change only
            return b""
        if request == HID_REQ_GET_PROTOCOL and direction_in:
            return bytes([self.protocol])
        if request == HID_REQ_SET_PROTOCOL and not direction_in:
            if setup.value not in (HID_PROTOCOL_BOOT, HID_PROTOCOL_REPORT):
                return Handshake.STALL
            self.protocol = setup.value
            return b""
        return Handshake.STALL


class UsbKeyboard(UsbHidDevice):
    """A boot keyboard; an :class:`~iovirt.input.InputSink` for keys (pointer ignored)."""

    def __init__(self, name: str = "usb-keyboard") -> None:
        super().__init__(
            name=name,
            product_id=KEYBOARD_PRODUCT_ID,
            product="USB Keyboard",
            subclass=HID_SUBCLASS_BOOT,
            protocol=HID_PROTOCOL_KEYBOARD,
            report_descriptor=keyboard_report_descriptor(),
            report_size=KEYBOARD_REPORT_SIZE,
            default_idle=KEYBOARD_DEFAULT_IDLE,
        )
        self._modifiers = 0
        self._keys: list[int] = []  # non-modifier usages held, in the order pressed
        self.leds = 0

    def current_report(self) -> bytes:
        if len(self._keys) > KEYBOARD_KEY_SLOTS:
            slots = [HID_USAGE_ERROR_ROLLOVER] * KEYBOARD_KEY_SLOTS
        else:
            slots = self._keys + [0] * (KEYBOARD_KEY_SLOTS - len(self._keys))
        return bytes([self._modifiers, 0, *slots])

    def key_event(self, keycode: int, down: bool) -> None:
        """A key went down or up (Linux ``KEY_*`` code); unknown codes are ignored."""
        usage_id = keycode_to_usage(keycode)
        if usage_id is None:
            return
        with self.lock:
            if HID_USAGE_LEFT_CONTROL <= usage_id <= HID_USAGE_RIGHT_GUI:
                bit = 1 << (usage_id - HID_USAGE_LEFT_CONTROL)
                self._modifiers = self._modifiers | bit if down else self._modifiers & ~bit
            elif down and usage_id not in self._keys:
                self._keys.append(usage_id)
            elif not down and usage_id in self._keys:
                self._keys.remove(usage_id)
            self._report_changed(self.current_report())

    def pointer_event(self, x: int, y: int, buttons: int, width: int, height: int) -> None:
        """Not a pointer: ignored."""

    def output_report(self, data: bytes) -> None:
        if data:
            self.leds = data[0] & LED_MASK


class UsbTablet(UsbHidDevice):
    """An absolute pointer; an :class:`~iovirt.input.InputSink` for the pointer (keys
    ignored)."""

    def __init__(self, name: str = "usb-tablet") -> None:
        super().__init__(
            name=name,
            product_id=TABLET_PRODUCT_ID,
            product="USB Tablet",
            subclass=HID_SUBCLASS_NONE,
            protocol=HID_PROTOCOL_NONE,
            report_descriptor=tablet_report_descriptor(),
            report_size=TABLET_REPORT_SIZE,
            default_idle=POINTER_DEFAULT_IDLE,
        )
        self._x = 0
        self._y = 0
        self._buttons = 0  # HID button bits
        self._rfb_buttons = 0  # the last RFB mask, to see wheel bits rise

    def current_report(self) -> bytes:
        return struct.pack("<BHHb", self._buttons, self._x, self._y, 0)

    def key_event(self, keycode: int, down: bool) -> None:
        """Not a keyboard: ignored."""

    def pointer_event(self, x: int, y: int, buttons: int, width: int, height: int) -> None:
        """The pointer is at (x, y) on a ``width`` x ``height`` screen with RFB
        ``buttons`` held."""
        if width <= 0 or height <= 0:
            return
        with self.lock:
            rising = buttons & ~self._rfb_buttons
            self._rfb_buttons = buttons
            wheel = 0
            if rising & BUTTON_WHEEL_UP:
                wheel += 1
            if rising & BUTTON_WHEEL_DOWN:
                wheel -= 1
            hid_buttons = 0
            if buttons & BUTTON_LEFT:
                hid_buttons |= HID_BUTTON_PRIMARY
            if buttons & BUTTON_RIGHT:
                hid_buttons |= HID_BUTTON_SECONDARY
            if buttons & BUTTON_MIDDLE:
                hid_buttons |= HID_BUTTON_TERTIARY
            new_x, new_y = scale_axis(x, width), scale_axis(y, height)
            if (new_x, new_y, hid_buttons) == (self._x, self._y, self._buttons) and not wheel:
                return
            self._x, self._y, self._buttons = new_x, new_y, hid_buttons
            report = struct.pack("<BHHb", hid_buttons, new_x, new_y, wheel)
            if wheel:
                # A wheel step is an event, not a state: never suppress it as "no change",
                # and let the next plain report count as a change again.
                self._last_queued = None
            self._report_changed(report)
            if wheel:
                self._last_queued = self.current_report()
