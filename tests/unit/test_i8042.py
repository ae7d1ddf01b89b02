"""Register-level tests of the reduced i8042 controller, at the offsets of its registration.

The controller is registered at 0x60 with 5 ports, so offset 0 is the data port (0x60) and
offset 4 is status (read) / command (write) at 0x64; offsets 1-3 (0x61-0x63) belong to it
but mean nothing. ``on_reset`` is a counter, so each test sees how often the guest pulsed
the CPU reset line.
"""

from __future__ import annotations

import pytest

from iovirt.devices.i8042 import (
    CMD_PULSE_RESET,
    CMD_READ_CTR,
    CMD_SELF_TEST,
    CMD_TEST_AUX,
    CMD_TEST_KBD,
    CMD_WRITE_CTR,
    CTR_DEFAULT,
    I8042,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    KBD_RESEND,
    PORT_TEST_NO_DEVICE,
    SELF_TEST_OK,
    STATUS_KEYLOCK,
    STATUS_OBF,
    STATUS_SYS,
)
from iovirt.interrupt import RecordingInterrupt

DATA = 0
STATUS = COMMAND = I8042_COMMAND_PORT - I8042_DATA_PORT  # 4


class Controller:
    """An I8042 with a reset counter and helpers named after the guest's port I/O."""

    def __init__(self) -> None:
        self.resets = 0
        self.dev = I8042(self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.dev.read(STATUS, 1)

    def command(self, cmd: int) -> None:
        self.dev.write(COMMAND, 1, cmd)

    def read_data(self) -> int:
        return self.dev.read(DATA, 1)

    def write_data(self, value: int) -> None:
        self.dev.write(DATA, 1, value)


@pytest.fixture
def c() -> Controller:
    return Controller()


def test_status_has_sys_flag_and_no_obf_when_idle(c: Controller) -> None:
    assert STATUS == 4
    assert c.status() == STATUS_SYS | STATUS_KEYLOCK
    assert c.status() & STATUS_OBF == 0


def test_status_sets_obf_only_while_a_byte_waits(c: Controller) -> None:
    c.command(CMD_SELF_TEST)
    assert c.status() == STATUS_SYS | STATUS_KEYLOCK | STATUS_OBF
    # reading status does not consume the byte
    assert c.status() == STATUS_SYS | STATUS_KEYLOCK | STATUS_OBF
    c.read_data()
    assert c.status() == STATUS_SYS | STATUS_KEYLOCK


def test_self_test_answers_0x55_at_the_data_port(c: Controller) -> None:
    c.command(CMD_SELF_TEST)
    assert c.read_data() == SELF_TEST_OK == 0x55


def test_read_ctr_returns_the_default(c: Controller) -> None:
    c.command(CMD_READ_CTR)
    assert c.status() & STATUS_OBF
    assert c.read_data() == CTR_DEFAULT


def test_write_ctr_then_data_changes_the_ctr(c: Controller) -> None:
    c.command(CMD_WRITE_CTR)
    assert c.status() & STATUS_OBF == 0  # the write itself answers nothing
    c.write_data(0x47)
    c.command(CMD_READ_CTR)
    assert c.read_data() == 0x47
    # Only the byte right after 0x60 is the CTR; a later data write goes to the
    # (absent) keyboard, which answers RESEND.
    c.write_data(0x00)
    assert c.read_data() == KBD_RESEND
    c.command(CMD_READ_CTR)
    assert c.read_data() == 0x47


def test_command_between_write_ctr_and_its_data_cancels_the_write(c: Controller) -> None:
    c.command(CMD_WRITE_CTR)
    c.command(CMD_SELF_TEST)
    assert c.read_data() == SELF_TEST_OK
    c.write_data(0x00)
    assert c.read_data() == KBD_RESEND
    c.command(CMD_READ_CTR)
    assert c.read_data() == CTR_DEFAULT


@pytest.mark.parametrize("cmd", [CMD_TEST_KBD, CMD_TEST_AUX])
def test_port_tests_answer_no_device(c: Controller, cmd: int) -> None:
    assert cmd in (0xAB, 0xA9)
    c.command(cmd)
    assert c.status() & STATUS_OBF
    assert c.read_data() == PORT_TEST_NO_DEVICE
    assert PORT_TEST_NO_DEVICE != 0x00  # 0x00 would mean "port test passed"


def test_pulse_reset_calls_on_reset_exactly_once(c: Controller) -> None:
    assert c.resets == 0
    c.command(CMD_PULSE_RESET)
    assert c.resets == 1


def test_no_other_command_or_data_write_calls_on_reset(c: Controller) -> None:
    for cmd in range(0x100):
        if cmd != CMD_PULSE_RESET:
            c.command(cmd)
            c.write_data(0xFE)  # a CTR value after 0x60, ignored otherwise
    for offset in (1, 2, 3):
        c.dev.write(offset, 1, CMD_PULSE_RESET)
    c.write_data(CMD_PULSE_RESET)
    for offset in range(5):
        c.dev.read(offset, 1)
    assert c.resets == 0


def test_reading_data_with_nothing_queued_returns_0_and_obf_stays_clear(c: Controller) -> None:
    assert c.read_data() == 0
    assert c.status() & STATUS_OBF == 0
    c.command(CMD_READ_CTR)
    assert c.read_data() == CTR_DEFAULT
    assert c.status() & STATUS_OBF == 0  # the one waiting byte was consumed
    assert c.read_data() == 0
    assert c.status() & STATUS_OBF == 0


def test_bytes_come_out_in_order(c: Controller) -> None:
    c.command(CMD_SELF_TEST)
    c.command(CMD_READ_CTR)
    c.command(CMD_TEST_KBD)
    assert [c.read_data(), c.read_data(), c.read_data()] == [
        SELF_TEST_OK,
        CTR_DEFAULT,
        PORT_TEST_NO_DEVICE,
    ]
    assert c.status() & STATUS_OBF == 0


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_offsets_between_data_and_status_read_0xff(c: Controller, offset: int) -> None:
    assert c.dev.read(offset, 1) == 0xFF
    c.command(CMD_SELF_TEST)
    assert c.dev.read(offset, 1) == 0xFF  # and do not consume the waiting byte
    assert c.read_data() == SELF_TEST_OK


def test_keyboard_byte_is_answered_with_resend_on_irq1_when_enabled() -> None:
    irq = RecordingInterrupt()
    dev = I8042(lambda: None, irq)
    dev.write(0, 1, 0xF2)  # GET ID to the keyboard; interrupts still off in the CTR
    assert not irq.level
    assert dev.read(0, 1) == KBD_RESEND
    dev.write(4, 1, CMD_WRITE_CTR)
    dev.write(0, 1, CTR_DEFAULT | 0x01)  # keyboard interrupt on
    dev.write(0, 1, 0xF2)
    assert irq.level
    assert dev.read(0, 1) == KBD_RESEND
    assert not irq.level  # the output buffer is empty again
    assert irq.transitions == [True, False]
