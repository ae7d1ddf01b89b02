"""Input events as device models take them, and as front-ends (VNC) deliver them.

Keys travel as Linux input event codes (``KEY_*`` from linux/input-event-codes.h): a
neutral numbering that every keyboard model maps to its own wire format (the AT
keyboard to scancode set 2, the USB keyboard to HID usages). Pointer events carry the
absolute position on the screen and the screen's size, as RFB delivers them; a relative
device (PS/2 mouse) turns them into motion itself, an absolute one (USB tablet) scales
them to its logical range.
"""

from __future__ import annotations

from typing import Protocol

# RFB PointerEvent button-mask bits (RFC 6143 7.5.5), used as-is by pointer_event.
BUTTON_LEFT = 0x01
BUTTON_MIDDLE = 0x02
BUTTON_RIGHT = 0x04
BUTTON_WHEEL_UP = 0x08
BUTTON_WHEEL_DOWN = 0x10


class InputSink(Protocol):
    """One input device that can take events from a front-end. Thread-safe: the VNC
    server calls it from the host I/O loop while vCPU threads talk to the device."""

    def key_event(self, keycode: int, down: bool) -> None:
        """A key (Linux ``KEY_*`` code) went down or up. Unknown codes are ignored.
        A device that is not a keyboard ignores keys."""
        ...

    def pointer_event(self, x: int, y: int, buttons: int, width: int, height: int) -> None:
        """The pointer is at (x, y) on a ``width`` x ``height`` screen with ``buttons``
        (the ``BUTTON_*`` bits) held. Wheel bits are momentary: set in one event, clear in
        the next, as RFB clients send them. A device that is not a pointer ignores it."""
        ...
