"""Tests of the USB device layer and the HID keyboard and tablet, alone and behind the xHCI
controller.

Descriptor fields, request codes and usage IDs are written here from the USB 2.0 spec
(chapter 9), HID 1.11 and the HID Usage Tables; report descriptors are checked with a small
item parser written here, and the key map against usage IDs from the Usage Tables and
``KEY_*`` values from linux/input-event-codes.h. The end-to-end tests enumerate the devices
the way Linux's usbcore and usbhid do, through the synthetic xHCI driver.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from iovirt.devices.usb import Handshake, SetupPacket, UsbDevice, UsbState
from iovirt.devices.usb_hid import (
    REPORT_QUEUE_LENGTH,
    UsbHidDevice,
    UsbKeyboard,
    UsbTablet,
    keycode_to_usage,
    scale_axis,
)
from iovirt.devices.xhci import Xhci
from iovirt.input import (
    BUTTON_LEFT,
    BUTTON_MIDDLE,
    BUTTON_RIGHT,
    BUTTON_WHEEL_DOWN,
    BUTTON_WHEEL_UP,
)
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedPlatform
from iovirt.testing.xhci_driver import XhciDriver

# Linux KEY_* codes (linux/input-event-codes.h).
KEY_ESC, KEY_1, KEY_0, KEY_A, KEY_S, KEY_D, KEY_F, KEY_G, KEY_H, KEY_J = (
    1,
    2,
    11,
    30,
    31,
    32,
    33,
    34,
    35,
    36,
)
KEY_Z, KEY_ENTER, KEY_SPACE, KEY_F1, KEY_F12, KEY_LEFTSHIFT, KEY_LEFTCTRL = (
    44,
    28,
    57,
    59,
    88,
    42,
    29,
)
KEY_RIGHTMETA, KEY_RIGHT, KEY_UP, KEY_KP0, KEY_KPENTER, KEY_102ND, KEY_F24 = (
    126,
    106,
    103,
    82,
    96,
    86,
    194,
)
KEY_BACKSLASH, KEY_DELETE, KEY_UNKNOWN = 43, 111, 240

# Completion codes.
CC_SUCCESS, CC_SHORT_PACKET = 1, 13

# Standard requests.
GET_STATUS, CLEAR_FEATURE, SET_FEATURE, SET_ADDRESS, GET_DESCRIPTOR = 0, 1, 3, 5, 6
GET_CONFIGURATION, SET_CONFIGURATION, GET_INTERFACE, SET_INTERFACE = 8, 9, 10, 11
# HID class requests.
GET_REPORT, GET_IDLE, GET_PROTOCOL, SET_REPORT, SET_IDLE, SET_PROTOCOL = 1, 2, 3, 9, 10, 11
# bmRequestType values.
DEV_IN, DEV_OUT, IFACE_IN, IFACE_OUT, EP_IN, EP_OUT = 0x80, 0x00, 0x81, 0x01, 0x82, 0x02
CLASS_IFACE_IN, CLASS_IFACE_OUT = 0xA1, 0x21

EP_INTERRUPT_IN = 7


def request(
    request_type: int, req: int, value: int = 0, index: int = 0, length: int = 0
) -> SetupPacket:
    return SetupPacket(request_type, req, value, index, length)


def configure(device: UsbDevice) -> None:
    """Take a device from reset to Configured, as the host does."""
    device.reset()
    assert device.control(request(DEV_OUT, SET_ADDRESS, 7)) == b""
    assert device.control(request(DEV_OUT, SET_CONFIGURATION, 1)) == b""


def descriptors(config: bytes) -> list[bytes]:
    """Split a configuration descriptor set into its descriptors."""
    found = []
    offset = 0
    while offset < len(config):
        length = config[offset]
        assert length >= 2
        found.append(config[offset : offset + length])
        offset += length
    assert offset == len(config)
    return found


def parse_report_descriptor(data: bytes) -> dict[str, object]:
    """A minimal HID report descriptor parser (HID 1.11 6.2.2): input/output report sizes in
    bits, the usages and logical extents seen, and whether collections balance."""
    size = count = 0
    logical_min: int | None = None
    logical_max: int | None = None
    page = 0
    usages: list[tuple[int, int]] = []
    ranges: list[tuple[int, int, int]] = []
    usage_min = 0
    input_bits = output_bits = depth = 0
    extents: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
    offset = 0
    while offset < len(data):
        prefix = data[offset]
        n = {0: 0, 1: 1, 2: 2, 3: 4}[prefix & 3]
        raw = data[offset + 1 : offset + 1 + n]
        unsigned = int.from_bytes(raw, "little")
        signed = int.from_bytes(raw, "little", signed=True) if n else 0
        tag, kind = prefix >> 4, (prefix >> 2) & 3
        offset += 1 + n
        if kind == 1:  # global
            if tag == 0:
                page = unsigned
            elif tag == 1:
                logical_min = signed
            elif tag == 2:
                logical_max = signed
            elif tag == 7:
                size = unsigned
            elif tag == 9:
                count = unsigned
        elif kind == 2:  # local
            if tag == 0:
                usages.append((page, unsigned))
            elif tag == 1:
                usage_min = unsigned
            elif tag == 2:
                ranges.append((page, usage_min, unsigned))
        elif kind == 0:  # main
            if tag == 8:
                input_bits += size * count
                assert logical_min is not None and logical_max is not None
                extents.append((logical_min, logical_max, tuple(usages)))
            elif tag == 9:
                output_bits += size * count
            elif tag == 0xA:
                depth += 1
            elif tag == 0xC:
                depth -= 1
            if tag in (8, 9):
                usages = []
    assert offset == len(data)
    return {
        "input_bits": input_bits,
        "output_bits": output_bits,
        "balanced": depth == 0,
        "ranges": ranges,
        "extents": extents,
    }


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, 1 << 20)])
    yield mem
    mem.close()


# -- descriptors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, product, subclass, protocol",
    [(UsbKeyboard(), 0x0001, 1, 1), (UsbTablet(), 0x0002, 0, 0)],
)
def test_descriptors(device: UsbHidDevice, product: int, subclass: int, protocol: int) -> None:
    dd = device.device_desc
    assert (dd[0], dd[1]) == (18, 1)
    bcd_usb, _, _, _, max_packet0, vendor, product_id = struct.unpack_from("<HBBBBHH", dd, 2)
    assert bcd_usb == 0x0110 and max_packet0 == 64  # a full-speed USB 1.1 device
    assert (vendor, product_id) == (0x1209, product)
    assert (dd[14], dd[15], dd[16], dd[17]) == (1, 2, 3, 1)  # strings, one configuration
    config = device.config_desc
    assert struct.unpack_from("<H", config, 2)[0] == len(config)  # wTotalLength
    header, interface, hid, endpoint = descriptors(config)
    assert (header[1], header[4], header[5]) == (2, 1, 1)  # one interface, value 1
    assert header[7] & 0xA0 == 0xA0  # bus powered, remote wakeup
    assert (interface[1], interface[4], interface[5:8]) == (4, 1, bytes([3, subclass, protocol]))
    assert (hid[1], struct.unpack_from("<H", hid, 2)[0]) == (0x21, 0x0111)
    assert (hid[6], struct.unpack_from("<H", hid, 7)[0]) == (0x22, len(device.report_descriptor))
    assert endpoint[1:] == bytes([5, 0x81, 3, 8, 0, 10])  # interrupt IN, 8 bytes, 10 ms


def test_report_descriptors_describe_the_reports() -> None:
    keyboard = parse_report_descriptor(UsbKeyboard().report_descriptor)
    assert keyboard["balanced"]
    assert keyboard["input_bits"] == 64  # modifiers, reserved byte, 6 keys
    assert keyboard["output_bits"] == 8  # 5 LEDs and padding
    assert (7, 0xE0, 0xE7) in keyboard["ranges"]  # type: ignore[operator]
    tablet = parse_report_descriptor(UsbTablet().report_descriptor)
    assert tablet["balanced"]
    assert tablet["input_bits"] == 48  # buttons byte, X, Y, wheel
    extents = tablet["extents"]
    assert (0, 0x7FFF, ((1, 0x30), (1, 0x31))) in extents  # type: ignore[operator]
    assert (-127, 127, ((1, 0x38),)) in extents  # type: ignore[operator]


# -- standard requests ---------------------------------------------------------------------


def test_standard_requests() -> None:
    device = UsbKeyboard()
    device.reset()
    assert device.state is UsbState.DEFAULT
    assert device.control(request(DEV_IN, GET_DESCRIPTOR, 0x0100, 0, 8)) == device.device_desc[:8]
    # SET_CONFIGURATION is not allowed before an address is set.
    assert device.control(request(DEV_OUT, SET_CONFIGURATION, 1)) is Handshake.STALL
    assert device.control(request(DEV_OUT, SET_ADDRESS, 5)) == b""
    assert (device.address, device.state) == (5, UsbState.ADDRESS)
    assert device.control(request(DEV_OUT, SET_CONFIGURATION, 2)) is Handshake.STALL
    assert device.control(request(DEV_OUT, SET_CONFIGURATION, 1)) == b""
    assert device.state is UsbState.CONFIGURED
    assert device.control(request(DEV_IN, GET_CONFIGURATION, 0, 0, 1)) == b"\x01"
    assert device.control(request(DEV_IN, GET_STATUS, 0, 0, 2)) == b"\0\0"
    assert device.control(request(DEV_OUT, SET_FEATURE, 1)) == b""  # remote wakeup
    assert device.control(request(DEV_IN, GET_STATUS, 0, 0, 2)) == b"\x02\0"
    # ENDPOINT_HALT on 0x81: it then stalls until cleared.
    assert device.control(request(EP_IN, GET_STATUS, 0, 0x81, 2)) == b"\0\0"
    assert device.control(request(EP_OUT, SET_FEATURE, 0, 0x81)) == b""
    assert device.control(request(EP_IN, GET_STATUS, 0, 0x81, 2)) == b"\x01\0"
    assert device.transfer_in(1, 8) is Handshake.STALL
    assert device.control(request(EP_OUT, CLEAR_FEATURE, 0, 0x81)) == b""
    assert device.transfer_in(1, 8) is Handshake.NAK
    assert device.control(request(EP_OUT, SET_FEATURE, 0, 0x82)) is Handshake.STALL  # no such EP
    assert device.control(request(IFACE_IN, GET_INTERFACE, 0, 0, 1)) == b"\0"
    assert device.control(request(IFACE_OUT, SET_INTERFACE, 0, 0)) == b""
    assert device.control(request(IFACE_OUT, SET_INTERFACE, 1, 0)) is Handshake.STALL
    # Strings: the language list, then UTF-16LE text.
    assert device.control(request(DEV_IN, GET_DESCRIPTOR, 0x0300, 0, 255)) == b"\x04\x03\x09\x04"
    product = device.control(request(DEV_IN, GET_DESCRIPTOR, 0x0302, 0x0409, 255))
    assert isinstance(product, bytes) and product[1] == 3
    assert product[2:].decode("utf-16-le") == "USB Keyboard"  # Linux names it "iovirt USB Keyboard"
    assert device.control(request(DEV_IN, GET_DESCRIPTOR, 0x0309, 0x0409, 255)) is Handshake.STALL
    # A full-speed-only device stalls DEVICE_QUALIFIER; unknown requests stall.
    assert device.control(request(DEV_IN, GET_DESCRIPTOR, 0x0600, 0, 10)) is Handshake.STALL
    stalls = device.bad_requests
    assert device.control(request(DEV_IN, 0x42, 0, 0, 4)) is Handshake.STALL
    assert device.bad_requests == stalls + 1
    # A bus reset forgets address and configuration.
    device.reset()
    assert (device.address, device.configuration, device.remote_wakeup) == (0, 0, False)


def test_hid_class_requests() -> None:
    keyboard = UsbKeyboard()
    configure(keyboard)
    report_desc = keyboard.control(request(IFACE_IN, GET_DESCRIPTOR, 0x2200, 0, 512))
    assert report_desc == keyboard.report_descriptor
    hid_desc = keyboard.control(request(IFACE_IN, GET_DESCRIPTOR, 0x2100, 0, 9))
    assert hid_desc == keyboard.config_desc[18:27]
    assert keyboard.control(request(CLASS_IFACE_IN, GET_IDLE, 0, 0, 1)) == bytes([125])  # 500 ms
    assert keyboard.control(request(CLASS_IFACE_OUT, SET_IDLE, 0, 0)) == b""
    assert keyboard.control(request(CLASS_IFACE_IN, GET_IDLE, 0, 0, 1)) == b"\0"
    assert keyboard.control(request(CLASS_IFACE_IN, GET_PROTOCOL, 0, 0, 1)) == b"\x01"  # report
    assert keyboard.control(request(CLASS_IFACE_OUT, SET_PROTOCOL, 0, 0)) == b""  # boot
    assert keyboard.control(request(CLASS_IFACE_IN, GET_PROTOCOL, 0, 0, 1)) == b"\0"
    assert keyboard.control(request(CLASS_IFACE_OUT, SET_PROTOCOL, 2, 0)) is Handshake.STALL
    keyboard.key_event(KEY_A, True)
    assert keyboard.control(request(CLASS_IFACE_IN, GET_REPORT, 0x0100, 0, 8)) == bytes(
        [0, 0, 0x04, 0, 0, 0, 0, 0]
    )
    assert keyboard.control(request(CLASS_IFACE_IN, GET_REPORT, 0x0300, 0, 8)) is Handshake.STALL
    assert keyboard.control(request(CLASS_IFACE_OUT, SET_REPORT, 0x0200, 0, 1), b"\x05") == b""
    assert keyboard.leds == 5
    assert keyboard.control(request(0xA2, GET_IDLE, 0, 0, 1)) is Handshake.STALL  # to an endpoint
    assert (
        keyboard.control(request(CLASS_IFACE_IN, GET_IDLE, 0, 1, 1)) is Handshake.STALL
    )  # iface 1
    # A bus reset brings back report protocol and the default idle rate.
    configure(keyboard)
    assert keyboard.control(request(CLASS_IFACE_IN, GET_PROTOCOL, 0, 0, 1)) == b"\x01"
    assert keyboard.control(request(CLASS_IFACE_IN, GET_IDLE, 0, 0, 1)) == bytes([125])
    tablet = UsbTablet()
    configure(tablet)
    assert tablet.control(request(CLASS_IFACE_IN, GET_IDLE, 0, 0, 1)) == b"\0"


# -- the keyboard --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keycode, usage",
    [
        (KEY_A, 0x04),
        (KEY_Z, 0x1D),
        (KEY_1, 0x1E),
        (KEY_0, 0x27),
        (KEY_ENTER, 0x28),
        (KEY_ESC, 0x29),
        (KEY_SPACE, 0x2C),
        (KEY_BACKSLASH, 0x31),  # not Non-US # (0x32), which Linux maps to the same code
        (KEY_F1, 0x3A),
        (KEY_F12, 0x45),
        (KEY_DELETE, 0x4C),
        (KEY_RIGHT, 0x4F),
        (KEY_UP, 0x52),
        (KEY_KPENTER, 0x58),
        (KEY_KP0, 0x62),
        (KEY_102ND, 0x64),
        (KEY_F24, 0x73),
        (KEY_LEFTCTRL, 0xE0),
        (KEY_RIGHTMETA, 0xE7),
    ],
)
def test_keycode_to_usage(keycode: int, usage: int) -> None:
    assert keycode_to_usage(keycode) == usage


def test_key_map_is_one_to_one() -> None:
    mapped = {code: keycode_to_usage(code) for code in range(256)}
    usages = [u for u in mapped.values() if u is not None]
    assert len(usages) == len(set(usages)) > 130
    assert all(0x04 <= u <= 0xE7 for u in usages)
    assert keycode_to_usage(KEY_UNKNOWN) is None
    assert keycode_to_usage(0x2FF) is None


def test_keyboard_reports() -> None:
    keyboard = UsbKeyboard()
    configure(keyboard)
    keyboard.key_event(KEY_A, True)
    keyboard.key_event(KEY_A, True)  # autorepeat: no change, no report
    keyboard.key_event(KEY_LEFTSHIFT, True)
    keyboard.key_event(KEY_RIGHTMETA, True)
    keyboard.key_event(KEY_A, False)
    keyboard.key_event(KEY_UNKNOWN, True)  # ignored
    keyboard.pointer_event(1, 1, BUTTON_LEFT, 10, 10)  # not a pointer: ignored
    reports = [keyboard.transfer_in(1, 8) for _ in range(5)]
    assert reports == [
        bytes([0x00, 0, 0x04, 0, 0, 0, 0, 0]),
        bytes([0x02, 0, 0x04, 0, 0, 0, 0, 0]),  # Left Shift: bit 1
        bytes([0x82, 0, 0x04, 0, 0, 0, 0, 0]),  # Right GUI: bit 7
        bytes([0x82, 0, 0x00, 0, 0, 0, 0, 0]),
        Handshake.NAK,
    ]


def test_keyboard_rollover() -> None:
    keyboard = UsbKeyboard()
    configure(keyboard)
    keys = [KEY_A, KEY_S, KEY_D, KEY_F, KEY_G, KEY_H, KEY_J]
    for key in keys:
        keyboard.key_event(key, True)
    keyboard.key_event(KEY_LEFTCTRL, True)
    assert keyboard.current_report() == bytes([0x01, 0] + [0x01] * 6)  # ErrorRollOver
    keyboard.key_event(KEY_S, False)
    usages = [keycode_to_usage(k) for k in keys if k != KEY_S]
    assert keyboard.current_report() == bytes([0x01, 0, *usages])  # in the order pressed


def test_reports_only_while_configured_and_bounded() -> None:
    keyboard = UsbKeyboard()
    keyboard.reset()
    keyboard.key_event(KEY_A, True)
    assert keyboard.pending_reports == 0  # not configured: nothing queued
    configure(keyboard)  # the key is still held: the first report is at the next change
    notified: list[int] = []
    keyboard.attach(keyboard.lock, notified.append)
    with pytest.raises(ValueError):
        keyboard.attach(keyboard.lock, notified.append)  # one device, one port
    rounds = REPORT_QUEUE_LENGTH // 2 + 2  # two reports a round: 4 more than fit
    for i in range(rounds):
        keyboard.key_event(KEY_S, i % 2 == 0)
        keyboard.key_event(KEY_D, i % 2 == 0)
    assert keyboard.pending_reports == REPORT_QUEUE_LENGTH
    assert keyboard.dropped_reports == 4
    assert notified == [1] * (2 * rounds)
    queued = [keyboard.transfer_in(1, 8) for _ in range(REPORT_QUEUE_LENGTH)]
    assert queued[-1] == keyboard.current_report() == bytes([0, 0, 0x04, 0, 0, 0, 0, 0])


# -- the tablet ----------------------------------------------------------------------------


@pytest.mark.parametrize("extent", [2, 3, 640, 800, 1024, 1080, 1280, 1920, 2560, 3840])
def test_tablet_axis_maps_one_to_one(extent: int) -> None:
    assert scale_axis(0, extent) == 0
    assert scale_axis(extent - 1, extent) == 0x7FFF
    for pixel in range(extent):
        value = scale_axis(pixel, extent)
        # The guest maps the logical range back onto its screen and lands on the pixel.
        assert round(value * (extent - 1) / 0x7FFF) == pixel
    assert scale_axis(-5, extent) == 0 and scale_axis(extent + 7, extent) == 0x7FFF
    assert scale_axis(3, 1) == 0


def test_tablet_reports() -> None:
    tablet = UsbTablet()
    configure(tablet)
    tablet.pointer_event(0, 0, 0, 1024, 768)  # the position it already has: no report
    tablet.pointer_event(1023, 767, 0, 1024, 768)
    tablet.pointer_event(1023, 767, BUTTON_LEFT, 1024, 768)
    tablet.pointer_event(1023, 767, BUTTON_LEFT | BUTTON_RIGHT | BUTTON_MIDDLE, 1024, 768)
    tablet.pointer_event(1023, 767, BUTTON_WHEEL_UP, 1024, 768)  # buttons up, one step up
    tablet.pointer_event(1023, 767, BUTTON_WHEEL_UP, 1024, 768)  # still held: no step
    tablet.pointer_event(1023, 767, 0, 1024, 768)  # released: nothing changes
    tablet.pointer_event(1023, 767, BUTTON_WHEEL_DOWN, 1024, 768)
    tablet.pointer_event(512, 0, 0, 1024, 768)
    tablet.key_event(KEY_A, True)  # not a keyboard: ignored
    tablet.pointer_event(5, 5, 0, 0, 768)  # no screen: ignored
    reports = []
    while (report := tablet.transfer_in(1, 8)) is not Handshake.NAK:
        assert isinstance(report, bytes)
        reports.append(struct.unpack("<BHHb", report))
    assert reports == [
        (0, 0x7FFF, 0x7FFF, 0),
        (0x01, 0x7FFF, 0x7FFF, 0),  # left is button 1
        (0x07, 0x7FFF, 0x7FFF, 0),  # right is button 2, middle button 3
        (0x00, 0x7FFF, 0x7FFF, 1),
        (0x00, 0x7FFF, 0x7FFF, -1),
        (0x00, scale_axis(512, 1024), 0, 0),
    ]


# -- behind the controller -----------------------------------------------------------------


@pytest.fixture
def rig(
    memory: GuestMemory,
) -> Iterator[tuple[XhciDriver, UsbKeyboard, UsbTablet, SimulatedPlatform]]:
    platform = SimulatedPlatform(memory)
    keyboard, tablet = UsbKeyboard(), UsbTablet()
    xhci = Xhci(platform, [keyboard, tablet])
    driver = XhciDriver(xhci, memory)
    driver.start()
    yield driver, keyboard, tablet, platform
    xhci.close()


def test_keyboard_enumeration_and_input_end_to_end(
    rig: tuple[XhciDriver, UsbKeyboard, UsbTablet, SimulatedPlatform],
) -> None:
    d, keyboard, _, platform = rig
    assert d.portsc(1) & 1  # connected
    d.reset_port(1)
    d.port_events()
    slot = d.enable_slot().slot_id
    # Linux's scheme for xHCI: Address Device with BSR, 64 bytes of device descriptor at
    # address 0, a second port reset, then Address Device for real.
    assert d.address_device(slot, 1, bsr=True).code == CC_SUCCESS
    first = d.control(slot, request(DEV_IN, GET_DESCRIPTOR, 0x0100, 0, 64))
    assert [e.code for e in first.events] == [CC_SHORT_PACKET, CC_SUCCESS]
    assert first.events[0].length == 64 - 18
    assert first.data == keyboard.device_desc
    d.reset_port(1)
    d.port_events()
    assert d.address_device(slot, 1).code == CC_SUCCESS
    assert keyboard.address == slot
    header = d.control(slot, request(DEV_IN, GET_DESCRIPTOR, 0x0200, 0, 9)).data
    total = struct.unpack_from("<H", header, 2)[0]
    config = d.control(slot, request(DEV_IN, GET_DESCRIPTOR, 0x0200, 0, total)).data
    assert config == keyboard.config_desc
    langs = d.control(slot, request(DEV_IN, GET_DESCRIPTOR, 0x0300, 0, 255)).data
    assert langs == b"\x04\x03\x09\x04"
    # Configure Endpoint before SET_CONFIGURATION, as usb_set_configuration does.
    assert d.configure_endpoint(slot, {3: (EP_INTERRUPT_IN, 8)}).code == CC_SUCCESS
    assert d.control(slot, request(DEV_OUT, SET_CONFIGURATION, 1)).code == CC_SUCCESS
    assert keyboard.state is UsbState.CONFIGURED
    # usbhid: SET_IDLE(0), the report descriptor, SET_PROTOCOL(report).
    assert d.control(slot, request(CLASS_IFACE_OUT, SET_IDLE, 0, 0)).code == CC_SUCCESS
    report_length = struct.unpack_from("<H", config, 9 + 9 + 7)[0]  # from the HID descriptor
    report_desc = d.control(slot, request(IFACE_IN, GET_DESCRIPTOR, 0x2200, 0, report_length)).data
    assert report_desc == keyboard.report_descriptor
    assert d.control(slot, request(CLASS_IFACE_OUT, SET_PROTOCOL, 1, 0)).code == CC_SUCCESS
    # The interrupt IN transfer waits (NAK) until a key is pressed.
    before = len(platform.vectors[0].delivered)
    trb, buffer = d.queue_normal(slot, 3, 8)
    assert d.transfer_events() == []
    keyboard.key_event(KEY_A, True)
    (event,) = d.transfer_events()
    assert (event.code, event.parameter, event.length, event.endpoint_id) == (CC_SUCCESS, trb, 0, 3)
    assert d.memory.read(buffer, 8) == bytes([0, 0, 0x04, 0, 0, 0, 0, 0])
    platform.poll()
    assert len(platform.vectors[0].delivered) == before + 1  # MSI-X message sent
    # With no transfer queued, the report waits in the device until the guest asks.
    keyboard.key_event(KEY_A, False)
    assert keyboard.pending_reports == 1
    trb2, buffer2 = d.queue_normal(slot, 3, 8)
    (event,) = d.transfer_events()
    assert (event.code, event.parameter) == (CC_SUCCESS, trb2)
    assert d.memory.read(buffer2, 8) == bytes(8)
    # LEDs arrive as SET_REPORT(Output) with one byte of Immediate Data.
    leds = d.control(slot, request(CLASS_IFACE_OUT, SET_REPORT, 0x0200, 0, 1), b"\x02")
    assert leds.code == CC_SUCCESS and keyboard.leds == 2


def test_tablet_end_to_end(
    rig: tuple[XhciDriver, UsbKeyboard, UsbTablet, SimulatedPlatform],
) -> None:
    d, _, tablet, _ = rig
    slot = d.enumerate(2, bsr_first=True)
    report_desc = d.control(slot, request(IFACE_IN, GET_DESCRIPTOR, 0x2200, 0, 255)).data
    assert report_desc == tablet.report_descriptor
    trb, buffer = d.queue_normal(slot, 3, 6)
    tablet.pointer_event(400, 300, BUTTON_LEFT, 800, 600)
    (event,) = d.transfer_events()
    assert (event.code, event.parameter) == (CC_SUCCESS, trb)
    buttons, x, y, wheel = struct.unpack("<BHHb", d.memory.read(buffer, 6))
    assert (buttons, wheel) == (1, 0)
    assert (x, y) == (scale_axis(400, 800), scale_axis(300, 600))
    assert round(x * 799 / 0x7FFF) == 400 and round(y * 599 / 0x7FFF) == 300
    # A larger buffer than the report completes short, with the residual.
    trb, _ = d.queue_normal(slot, 3, 8)
    tablet.pointer_event(0, 0, 0, 800, 600)
    (event,) = d.transfer_events()
    assert (event.code, event.parameter, event.length) == (CC_SHORT_PACKET, trb, 2)
