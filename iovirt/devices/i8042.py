"""i8042 PS/2 controller, reduced for now to what a headless guest needs: the reset line.

Ports: 0x60 data, 0x64 status (read) / command (write). Linux reboots with ``reboot=k``
by pulsing the CPU reset line through command 0xFE; that ends the VM (iovirt treats a
guest reset as the end of the run, like kvmtool and Firecracker). The controller answers
the self-test (0xAA -> 0x55) and keeps a command byte so Linux's i8042 probe finds a
controller; a byte sent to the (absent) keyboard is answered with RESEND (0xFE) on IRQ 1,
so the guest's keyboard probe gives up at once instead of waiting out its timeouts. The
keyboard and mouse devices come with the display/input work; this file grows into the
full controller then.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from iovirt.interrupt import Interrupt

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64

# Status register bits.
STATUS_OBF = 0x01  # output buffer full: a byte waits at 0x60
STATUS_SYS = 0x04  # system flag: self-test passed
STATUS_KEYLOCK = 0x10  # set when the keyboard is NOT inhibited by the key lock

# Controller commands.
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
PORT_TEST_NO_DEVICE = 0x01  # "clock line stuck low": nothing plugged in

CTR_DEFAULT = 0x30  # both port clocks disabled, no interrupts: no devices yet
CTR_KBD_INT = 0x01  # raise IRQ 1 when a byte from the keyboard side waits

KBD_RESEND = 0xFE  # what a keyboard says to a byte it could not take


class I8042:
    """The controller. ``on_reset`` is called when the guest pulses the reset line."""

    def __init__(self, on_reset: Callable[[], None], irq: Interrupt | None = None) -> None:
        self._on_reset = on_reset
        self._irq = irq
        self._lock = threading.Lock()
        self._out: deque[int] = deque(maxlen=16)
        self._ctr = CTR_DEFAULT
        self._pending: int | None = None  # a command waiting for its data byte

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == I8042_COMMAND_PORT - I8042_DATA_PORT:
                return STATUS_SYS | STATUS_KEYLOCK | (STATUS_OBF if self._out else 0)
            if offset == 0:
                value = self._out.popleft() if self._out else 0
                self._update_irq()
                return value
            return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        reset = False
        with self._lock:
            if offset == I8042_COMMAND_PORT - I8042_DATA_PORT:
                reset = self._command(value)
            elif offset == 0 and self._pending == CMD_WRITE_CTR:
                self._ctr = value
                self._pending = None
                self._update_irq()
            elif offset == 0:
                # A byte for the keyboard, and no keyboard is plugged in yet.
                self._out.append(KBD_RESEND)
                self._update_irq()
        if reset:
            self._on_reset()

    def _command(self, cmd: int) -> bool:
        self._pending = None
        if cmd == CMD_PULSE_RESET:
            return True
        if cmd == CMD_READ_CTR:
            self._out.append(self._ctr)
        elif cmd == CMD_WRITE_CTR:
            self._pending = cmd
        elif cmd == CMD_SELF_TEST:
            self._out.append(SELF_TEST_OK)
        elif cmd in (CMD_TEST_KBD, CMD_TEST_AUX):
            self._out.append(PORT_TEST_NO_DEVICE)
        self._update_irq()
        return False

    def _update_irq(self) -> None:
        if self._irq is not None:
            self._irq.set_level(bool(self._out) and bool(self._ctr & CTR_KBD_INT))
