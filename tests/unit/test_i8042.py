"""Register-level tests of the i8042 controller, its AT keyboard and its PS/2 mouse.

The controller is registered at 0x60 with 5 ports, so offset 0 is the data port (0x60) and
offset 4 is status (read) / command (write) at 0x64. Both interrupt lines are
:class:`RecordingInterrupt`\\ s, so each test sees every edge the guest would get, and
``on_reset`` is a counter. The long sequences replay what Linux's i8042, atkbd and psmouse
drivers and SeaBIOS's ps2port.c send, byte for byte, with the answers they check.
"""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.devices.i8042 import (
    AUX_BUFFER_SIZE,
    CMD_A20_OFF,
    CMD_A20_ON,
    CMD_DISABLE_AUX,
    CMD_DISABLE_KBD,
    CMD_ENABLE_AUX,
    CMD_ENABLE_KBD,
    CMD_PULSE_RESET,
    CMD_READ_CTR,
    CMD_READ_INPUT_PORT,
    CMD_READ_OUTPUT_PORT,
    CMD_SELF_TEST,
    CMD_TEST_AUX,
    CMD_TEST_KBD,
    CMD_WRITE_AUX,
    CMD_WRITE_AUX_OUTPUT,
    CMD_WRITE_CTR,
    CMD_WRITE_KBD_OUTPUT,
    CMD_WRITE_OUTPUT_PORT,
    CTR_AUX_DISABLE,
    CTR_AUX_INT,
    CTR_DEFAULT,
    CTR_KBD_DISABLE,
    CTR_KBD_INT,
    CTR_SYS,
    CTR_XLATE,
    CTRL_QUEUE_SIZE,
    I8042,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    I8042_NUM_PORTS,
    KBD_BUFFER_SIZE,
    KBD_LED_CAPS_LOCK,
    KBD_LED_NUM_LOCK,
    KEY_CODES,
    KEY_PAUSE,
    KEY_SYSRQ,
    SET2_SCANCODES,
    STATUS_AUXB,
    STATUS_CMD,
    STATUS_KEYLOCK,
    STATUS_OBF,
    STATUS_SYS,
    set2_sequence,
    translate_set2_to_set1,
)
from iovirt.input import (
    BUTTON_LEFT,
    BUTTON_MIDDLE,
    BUTTON_RIGHT,
    BUTTON_WHEEL_DOWN,
    BUTTON_WHEEL_UP,
    InputSink,
)
from iovirt.interrupt import RecordingInterrupt

DATA = 0
STATUS = COMMAND = I8042_COMMAND_PORT - I8042_DATA_PORT  # 4

ACK, RESEND, BAT_OK = 0xFA, 0xFE, 0xAA
KEY_A, KEY_B, KEY_C = KEY_CODES["KEY_A"], KEY_CODES["KEY_B"], KEY_CODES["KEY_C"]
KEY_ENTER, KEY_RIGHTCTRL = KEY_CODES["KEY_ENTER"], KEY_CODES["KEY_RIGHTCTRL"]
# A command byte as Linux and SeaBIOS leave it once both ports are in use.
CTR_RUNNING = CTR_XLATE | CTR_SYS | CTR_AUX_INT | CTR_KBD_INT  # 0x47


class Rig:
    """An I8042 with recording IRQ lines, a reset counter and port-I/O helpers."""

    def __init__(self) -> None:
        self.resets = 0
        self.irq1 = RecordingInterrupt()
        self.irq12 = RecordingInterrupt()
        self.dev = I8042(self._reset, self.irq1, self.irq12)

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

    def read_ctr(self) -> int:
        self.command(CMD_READ_CTR)
        assert self.status() & (STATUS_OBF | STATUS_AUXB) == STATUS_OBF
        return self.read_data()

    def write_ctr(self, value: int) -> None:
        self.command(CMD_WRITE_CTR)
        self.write_data(value)

    def drain(self) -> list[tuple[int, bool]]:
        """Read while OBF is set, as i8042_flush does: (byte, came from the mouse side)."""
        got: list[tuple[int, bool]] = []
        for _ in range(10_000):
            status = self.status()
            if not status & STATUS_OBF:
                return got
            got.append((self.read_data(), bool(status & STATUS_AUXB)))
        raise AssertionError("output buffer never drained")

    def kbd_bytes(self) -> list[int]:
        got = self.drain()
        assert all(not aux for _, aux in got), got
        return [byte for byte, _ in got]

    def aux_bytes(self) -> list[int]:
        got = self.drain()
        assert all(aux for _, aux in got), got
        return [byte for byte, _ in got]

    def kbd(self, byte: int) -> list[int]:
        """Send a byte to the keyboard and collect its answer."""
        self.write_data(byte)
        return self.kbd_bytes()

    def aux(self, byte: int) -> list[int]:
        """Send a byte to the mouse (0xD4 first) and collect its answer."""
        self.command(CMD_WRITE_AUX)
        self.write_data(byte)
        return self.aux_bytes()

    def key(self, code: int, down: bool) -> list[int]:
        self.dev.keyboard.key_event(code, down)
        return self.kbd_bytes()

    def point(self, x: int, y: int, buttons: int = 0) -> list[int]:
        self.dev.mouse.pointer_event(x, y, buttons, 1024, 768)
        return self.aux_bytes()


def running_rig() -> Rig:
    """Both ports enabled with interrupts and translation, mouse reporting on."""
    rig = Rig()
    rig.write_ctr(CTR_RUNNING)
    assert rig.aux(0xF4) == [ACK]
    return rig


def decode_packets(data: list[int], size: int = 3) -> list[tuple[int, int, int]]:
    """(buttons, dx, dy) per packet, decoded the way psmouse_process_byte does."""
    assert len(data) % size == 0, data
    out = []
    for i in range(0, len(data), size):
        b0, b1, b2 = data[i : i + 3]
        assert b0 & 0x08, "bit 3 of the first byte is always set"
        dx = b1 - ((b0 << 4) & 0x100)
        dy = b2 - ((b0 << 3) & 0x100)
        out.append((b0 & 0x07, dx, dy))
    return out


@pytest.fixture
def rig() -> Rig:
    return Rig()


# ---------------------------------------------------------------------- controller registers


def test_power_on_state_is_what_firmware_leaves(rig: Rig) -> None:
    assert I8042_NUM_PORTS == 5 and STATUS == 4
    assert rig.status() == STATUS_SYS | STATUS_KEYLOCK
    assert CTR_DEFAULT == 0x74
    assert rig.read_ctr() == CTR_XLATE | CTR_AUX_DISABLE | CTR_KBD_DISABLE | CTR_SYS
    assert rig.dev.a20
    assert rig.dev.keyboard.scanning and rig.dev.keyboard.scancode_set == 2
    assert not rig.dev.mouse.reporting and rig.dev.mouse.device_id == 0
    assert rig.irq1.transitions == [] and rig.irq12.transitions == []
    sinks: list[InputSink] = [rig.dev.keyboard, rig.dev.mouse]  # what front-ends feed
    rig.dev.keyboard.pointer_event(1, 2, BUTTON_LEFT, 10, 10)  # each ignores the other's
    rig.dev.mouse.key_event(KEY_A, True)
    assert len(sinks) == 2 and rig.dev.queue_lengths() == (0, 0, 0)


def test_status_cmd_bit_says_where_the_last_write_went(rig: Rig) -> None:
    rig.command(CMD_READ_CTR)
    assert rig.status() & STATUS_CMD
    rig.read_data()
    rig.write_ctr(CTR_DEFAULT)  # command (0x64) then data (0x60)
    assert not rig.status() & STATUS_CMD


def test_obf_set_only_while_a_byte_waits_and_status_reads_do_not_consume(rig: Rig) -> None:
    rig.command(CMD_SELF_TEST)
    assert rig.status() & STATUS_OBF
    assert rig.status() & STATUS_OBF
    assert rig.read_data() == 0x55
    assert not rig.status() & STATUS_OBF
    # The register keeps its last byte: an empty read returns it again, consuming nothing.
    assert rig.read_data() == 0x55
    assert not rig.status() & STATUS_OBF


def test_self_test_sets_sys_and_the_ctr_sys_bit_is_copied_to_status(rig: Rig) -> None:
    rig.write_ctr(CTR_DEFAULT & ~CTR_SYS)
    assert not rig.status() & STATUS_SYS
    rig.command(CMD_SELF_TEST)
    assert rig.read_data() == 0x55
    assert rig.status() & STATUS_SYS
    rig.write_ctr(CTR_DEFAULT)
    assert rig.status() & STATUS_SYS


def test_controller_ram_reads_and_writes_and_byte_0_is_the_ctr(rig: Rig) -> None:
    for index in range(1, 32):
        rig.command(0x60 + index)
        rig.write_data(index * 7)
    for index in range(1, 32):
        rig.command(0x20 + index)
        assert rig.read_data() == index * 7
    assert rig.read_ctr() == CTR_DEFAULT  # RAM 1-31 are not the CTR
    rig.write_ctr(0x47)
    rig.command(0x20)
    assert rig.read_data() == 0x47


@pytest.mark.parametrize(
    ("cmd", "set_bits", "clear_bits"),
    [
        (CMD_DISABLE_AUX, CTR_AUX_DISABLE, 0),
        (CMD_ENABLE_AUX, 0, CTR_AUX_DISABLE),
        (CMD_DISABLE_KBD, CTR_KBD_DISABLE, 0),
        (CMD_ENABLE_KBD, 0, CTR_KBD_DISABLE),
    ],
)
def test_port_enable_disable_commands_change_the_ctr(
    rig: Rig, cmd: int, set_bits: int, clear_bits: int
) -> None:
    for start in (0x00, 0x30, 0x47, 0x74):
        rig.write_ctr(start)
        rig.command(cmd)
        assert rig.read_ctr() == (start | set_bits) & ~clear_bits


@pytest.mark.parametrize(("cmd", "answer"), [(CMD_TEST_AUX, 0x00), (CMD_TEST_KBD, 0x00)])
def test_interface_tests_pass(rig: Rig, cmd: int, answer: int) -> None:
    rig.command(cmd)
    assert rig.drain() == [(answer, False)]


def test_input_and_output_ports(rig: Rig) -> None:
    rig.command(CMD_READ_INPUT_PORT)
    assert rig.read_data() == 0x80  # keyboard not inhibited
    rig.command(CMD_READ_OUTPUT_PORT)
    assert rig.read_data() == 0xCF  # reset released, A20 on, lines idle, no OBF
    # Bits 4/5 show which side fills the output buffer.
    rig.command(CMD_WRITE_AUX_OUTPUT)
    rig.write_data(0x11)
    rig.command(CMD_READ_OUTPUT_PORT)
    assert rig.drain() == [(0x11, True), (0xCF | 0x20, False)]
    rig.command(CMD_WRITE_KBD_OUTPUT)
    rig.write_data(0x22)
    rig.command(CMD_READ_OUTPUT_PORT)
    assert rig.drain() == [(0x22, False), (0xCF | 0x10, False)]


def test_a20_commands_and_output_port_write(rig: Rig) -> None:
    rig.command(CMD_A20_OFF)
    assert not rig.dev.a20
    rig.command(CMD_READ_OUTPUT_PORT)
    assert rig.read_data() == 0xCD
    rig.command(CMD_A20_ON)
    assert rig.dev.a20
    rig.command(CMD_WRITE_OUTPUT_PORT)
    rig.write_data(0xDD)  # what DOS-era A20 code writes for "off"; bit 0 keeps the CPU
    assert not rig.dev.a20
    rig.command(CMD_WRITE_OUTPUT_PORT)
    rig.write_data(0xDF)  # arch/x86/boot/a20.c's "on"
    assert rig.dev.a20
    assert rig.resets == 0


def test_d2_and_d3_load_bytes_as_keyboard_and_mouse_data_with_their_irqs(rig: Rig) -> None:
    rig.write_ctr(CTR_RUNNING)
    rig.command(CMD_WRITE_KBD_OUTPUT)
    rig.write_data(0x1C)
    assert rig.irq1.level and not rig.irq12.level
    assert rig.status() & (STATUS_OBF | STATUS_AUXB) == STATUS_OBF
    assert rig.read_data() == 0x1C  # not translated: the controller wrote it itself
    assert not rig.irq1.level
    rig.command(CMD_WRITE_AUX_OUTPUT)
    rig.write_data(0x5A)
    assert rig.irq12.level and not rig.irq1.level
    assert rig.status() & (STATUS_OBF | STATUS_AUXB) == STATUS_OBF | STATUS_AUXB
    assert rig.read_data() == 0x5A
    assert rig.irq1.transitions == [True, False]
    assert rig.irq12.transitions == [True, False]


def test_a_command_cancels_the_data_byte_the_previous_one_waited_for(rig: Rig) -> None:
    rig.write_ctr(CTR_DEFAULT & ~CTR_KBD_DISABLE)
    rig.command(CMD_WRITE_CTR)
    rig.command(CMD_SELF_TEST)
    assert rig.read_data() == 0x55
    assert rig.kbd(0xEE) == [0xEE]  # the data byte went to the keyboard (echo)
    assert rig.read_ctr() == CTR_DEFAULT & ~CTR_KBD_DISABLE


def test_controller_answers_are_bounded_when_never_read(rig: Rig) -> None:
    for _ in range(100):
        rig.command(CMD_READ_CTR)
    assert rig.dev.queue_lengths().controller <= CTRL_QUEUE_SIZE
    assert rig.dev.bad_accesses.count > 0
    assert len(rig.drain()) <= CTRL_QUEUE_SIZE + 1  # the queue plus the output buffer


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_offsets_between_data_and_status_are_odd_and_inert(rig: Rig, offset: int) -> None:
    rig.command(CMD_SELF_TEST)
    assert rig.dev.read(offset, 1) == 0xFF
    rig.dev.write(offset, 1, CMD_PULSE_RESET)
    assert rig.read_data() == 0x55  # the waiting byte was not consumed
    assert rig.dev.bad_accesses.count == 2
    assert rig.resets == 0


def test_wide_accesses_are_served_as_byte_accesses_and_counted(rig: Rig) -> None:
    rig.dev.write(COMMAND, 2, 0x12AA)  # low byte: self-test
    assert rig.dev.read(DATA, 4) == 0x55
    assert rig.dev.bad_accesses.count == 2


# ---------------------------------------------------------------------- reset line


def test_command_0xfe_pulses_reset_once(rig: Rig) -> None:
    rig.command(CMD_PULSE_RESET)
    assert rig.resets == 1


@pytest.mark.parametrize("cmd", range(0xF0, 0x100))
def test_pulse_commands_reset_exactly_when_bit_0_is_pulsed(rig: Rig, cmd: int) -> None:
    rig.command(cmd)
    assert rig.resets == (0 if cmd & 1 else 1)


def test_output_port_write_with_bit_0_clear_resets(rig: Rig) -> None:
    rig.command(CMD_WRITE_OUTPUT_PORT)
    rig.write_data(0xDE)
    assert rig.resets == 1
    assert rig.dev.a20
    rig.command(CMD_READ_OUTPUT_PORT)
    assert rig.read_data() & 0x01  # the pulse is over: the line reads released


def test_no_other_command_or_data_pulses_reset(rig: Rig) -> None:
    for cmd in range(0x100):
        if cmd >= 0xF0 or cmd == CMD_WRITE_OUTPUT_PORT:
            continue
        rig.command(cmd)
        rig.write_data(0xFE)  # an argument, RAM value, device byte ... but never a pulse
        rig.drain()
    rig.write_data(CMD_PULSE_RESET)  # to the keyboard: RESEND, not a reset
    assert rig.resets == 0


def test_on_reset_is_called_outside_the_lock() -> None:
    seen: list[int] = []
    dev: I8042

    def on_reset() -> None:
        # Another thread must get in: a reset handler that stops vCPUs needs that.
        worker = threading.Thread(target=lambda: seen.append(dev.read(STATUS, 1)))
        worker.start()
        worker.join(timeout=5)

    dev = I8042(on_reset)
    dev.write(COMMAND, 1, CMD_PULSE_RESET)
    assert len(seen) == 1


# ---------------------------------------------------------------------- interrupt edges


def test_each_byte_is_its_own_edge_on_irq1(rig: Rig) -> None:
    rig.write_ctr(CTR_RUNNING)
    for key in (KEY_A, KEY_B, KEY_C):
        rig.dev.keyboard.key_event(key, True)
    assert rig.irq1.transitions == [True]
    got = []
    for _ in range(3):
        got.append(rig.read_data())
    assert got == [0x1E, 0x30, 0x2E]
    # Lowered at every read, raised again for the next byte: three edges for three bytes.
    assert rig.irq1.transitions == [True, False, True, False, True, False]
    assert rig.irq12.transitions == []


def test_enabling_the_interrupt_raises_for_a_waiting_byte_and_disabling_lowers(rig: Rig) -> None:
    rig.write_ctr(CTR_XLATE | CTR_SYS)  # ports on, interrupts off
    rig.dev.keyboard.key_event(KEY_A, True)
    assert rig.status() & STATUS_OBF and not rig.irq1.level
    rig.write_ctr(CTR_XLATE | CTR_SYS | CTR_KBD_INT)
    assert rig.irq1.level
    rig.write_ctr(CTR_XLATE | CTR_SYS)
    assert not rig.irq1.level
    assert rig.read_data() == 0x1E
    assert rig.irq1.transitions == [True, False]


def test_mouse_bytes_raise_irq12_only() -> None:
    rig = running_rig()
    rig.irq1.transitions.clear()
    rig.irq12.transitions.clear()
    rig.point(10, 10)
    rig.dev.mouse.pointer_event(20, 10, 0, 1024, 768)
    assert rig.irq12.level and not rig.irq1.level
    assert rig.aux_bytes() == [0x08, 10, 0]
    assert rig.irq12.transitions == [True, False] * 3
    assert rig.irq1.transitions == []


def test_interrupts_off_means_no_edges_but_data_still_flows(rig: Rig) -> None:
    rig.write_ctr(CTR_XLATE | CTR_SYS)
    assert rig.key(KEY_A, True) == [0x1E]
    assert rig.irq1.transitions == [] and rig.irq12.transitions == []


# ---------------------------------------------------------------------- Linux and SeaBIOS


def test_linux_i8042_probe_sequence(rig: Rig) -> None:
    # i8042_controller_check: the buffer drains within I8042_BUFFER_SIZE (16) reads.
    assert rig.drain() == []
    # i8042_controller_selftest.
    rig.command(CMD_SELF_TEST)
    assert rig.drain() == [(0x55, False)]
    # i8042_controller_init: two equal CTR reads, XLATE kept, kbd disabled, write back.
    ctr = rig.read_ctr()
    assert rig.read_ctr() == ctr and ctr & CTR_XLATE
    ctr = (ctr | CTR_KBD_DISABLE) & ~CTR_KBD_INT
    rig.write_ctr(ctr)
    assert rig.drain() == []
    # i8042_set_mux_mode: a plain loopback echoes 0xa4 too, so there is no MUX.
    for probe in (0xF0, 0x56, 0xA4):
        rig.command(CMD_WRITE_AUX_OUTPUT)
        rig.write_data(probe)
        assert rig.status() & STATUS_AUXB  # __i8042_command checks it for AUX_LOOP
        assert rig.read_data() == probe
    # i8042_check_aux: loopback, then the bit-assignment test.
    rig.command(CMD_WRITE_AUX_OUTPUT)
    rig.write_data(0x5A)
    assert rig.drain() == [(0x5A, True)]
    rig.command(CMD_DISABLE_AUX)
    assert rig.read_ctr() & CTR_AUX_DISABLE
    rig.command(CMD_ENABLE_AUX)
    assert not rig.read_ctr() & CTR_AUX_DISABLE
    # The AUX IRQ test: i8042_enable_aux_port, then a loopback byte must raise IRQ12.
    ctr = (rig.read_ctr() & ~CTR_AUX_DISABLE) | CTR_AUX_INT
    rig.write_ctr(ctr)
    assert not rig.irq12.level
    rig.command(CMD_WRITE_AUX_OUTPUT)
    rig.write_data(0xA5)
    assert rig.irq12.level and not rig.irq1.level
    status = rig.status()  # i8042_aux_test_irq
    assert status & STATUS_OBF and status & STATUS_AUXB
    assert rig.read_data() == 0xA5
    assert rig.irq12.transitions == [True, False]
    # The external AUX test Linux falls back to, and the keyboard port test.
    rig.command(CMD_TEST_AUX)
    assert rig.drain() == [(0x00, False)]
    rig.command(CMD_TEST_KBD)
    assert rig.drain() == [(0x00, False)]
    assert rig.irq1.transitions == []  # keyboard interrupts were off all along
    # i8042_enable_kbd_port. From now on controller answers raise IRQ1 too.
    rig.write_ctr((ctr & ~CTR_KBD_DISABLE) | CTR_KBD_INT)
    assert rig.read_ctr() == CTR_RUNNING
    assert rig.irq1.transitions == [True, False]
    assert rig.resets == 0


def test_atkbd_probe_with_translation(rig: Rig) -> None:
    rig.write_ctr(CTR_RUNNING)
    # atkbd_probe: GET ID. Translated, 0x83 arrives as 0x41 (0xab passes unchanged).
    assert rig.kbd(0xF2) == [ACK, 0xAB, 0x41]
    assert rig.irq1.transitions == [True, False] * 3
    assert rig.kbd(0xF5) == [ACK]  # atkbd_deactivate
    assert not rig.dev.keyboard.scanning
    assert rig.key(KEY_A, True) == []  # not scanning: the key is lost
    # atkbd_reset_state: LEDs off, fastest typematic.
    assert rig.kbd(0xED) == [ACK]
    assert rig.kbd(0x00) == [ACK]
    assert rig.kbd(0xF3) == [ACK]
    assert rig.kbd(0x00) == [ACK]
    assert rig.dev.keyboard.typematic == 0
    assert rig.kbd(0xF4) == [ACK]  # atkbd_activate
    assert rig.key(KEY_A, True) == [0x1E]
    assert rig.key(KEY_A, False) == [0x9E]
    # Caps Lock LED on, as atkbd_set_leds sends it.
    assert rig.kbd(0xED) == [ACK]
    assert rig.kbd(KBD_LED_CAPS_LOCK | KBD_LED_NUM_LOCK) == [ACK]
    assert rig.dev.keyboard.leds == KBD_LED_CAPS_LOCK | KBD_LED_NUM_LOCK
    assert rig.kbd(0xFF) == [ACK, BAT_OK]  # RESET_BAT
    assert rig.dev.keyboard.leds == 0 and rig.dev.keyboard.scanning


def test_keyboard_id_and_scancode_set_untranslated(rig: Rig) -> None:
    rig.write_ctr(CTR_SYS | CTR_KBD_INT)  # i8042.direct: no translation
    assert rig.kbd(0xF2) == [ACK, 0xAB, 0x83]
    assert rig.kbd(0xF0) == [ACK]
    assert rig.kbd(0x00) == [ACK, 0x02]
    rig.write_ctr(CTR_RUNNING)
    assert rig.kbd(0xF0) == [ACK]
    assert rig.kbd(0x00) == [ACK, 0x41]  # set 2, through the translation table


def test_psmouse_probe_and_intellimouse_knocks() -> None:
    rig = Rig()
    rig.write_ctr(CTR_RUNNING)
    assert rig.aux(0xF2) == [ACK, 0x00]  # psmouse_probe: a mouse answers 0
    assert rig.aux(0xF6) == [ACK]  # PSMOUSE_CMD_RESET_DIS
    assert rig.aux(0xFF) == [ACK, BAT_OK, 0x00]  # psmouse_reset
    # The Explorer knock alone does nothing: a mouse must be an IntelliMouse first.
    for rate in (200, 200, 80):
        assert rig.aux(0xF3) == [ACK]
        assert rig.aux(rate) == [ACK]
    assert rig.aux(0xF2) == [ACK, 0x00]
    for rate in (200, 100, 80):  # intellimouse_detect
        assert rig.aux(0xF3) == [ACK]
        assert rig.aux(rate) == [ACK]
    assert rig.aux(0xF2) == [ACK, 0x03]
    for rate in (200, 200, 80):  # im_explorer_detect
        assert rig.aux(0xF3) == [ACK]
        assert rig.aux(rate) == [ACK]
    assert rig.aux(0xF2) == [ACK, 0x04]
    # psmouse_initialize: 200 dpi, 100 samples/s, 1:1, then psmouse_activate.
    assert rig.aux(0xE8) == [ACK]
    assert rig.aux(0x03) == [ACK]
    assert rig.aux(0xF3) == [ACK]
    assert rig.aux(100) == [ACK]
    assert rig.aux(0xE6) == [ACK]
    assert rig.aux(0xF4) == [ACK]
    assert rig.dev.mouse.reporting and rig.dev.mouse.resolution == 3
    assert rig.dev.mouse.sample_rate == 100
    # A reset drops the wheel again.
    assert rig.aux(0xFF) == [ACK, BAT_OK, 0x00]
    assert rig.aux(0xF2) == [ACK, 0x00]
    assert rig.irq1.transitions == []


def test_synaptics_and_logitech_style_probes_find_a_plain_mouse(rig: Rig) -> None:
    rig.write_ctr(CTR_RUNNING)
    # synaptics_detect: four E8 slices of 0, then E9; byte 2 would be 0x47 on a TouchPad.
    for _ in range(4):
        assert rig.aux(0xE8) == [ACK]
        assert rig.aux(0x00) == [ACK]
    assert rig.aux(0xE9) == [ACK, 0x00, 0x00, 100]
    # ps2pp_detect: E8 0, E6 x3, E9; a Logitech mouse answers a non-zero second byte.
    assert rig.aux(0xE8) == [ACK]
    assert rig.aux(0x00) == [ACK]
    for _ in range(3):
        assert rig.aux(0xE6) == [ACK]
    assert rig.aux(0xE9)[2] == 0


def test_seabios_keyboard_setup_sequence(rig: Rig) -> None:
    def ps2_kbd_command(ps2ctr: int, command: int, answer_len: int) -> list[int]:
        # __ps2_command: ports and interrupts off, the target port on, send, poll, restore.
        newctr = (ps2ctr | CTR_AUX_DISABLE | CTR_KBD_DISABLE) & ~(CTR_KBD_INT | CTR_AUX_INT)
        rig.write_ctr(newctr)
        rig.write_ctr(newctr & ~CTR_KBD_DISABLE)
        got = rig.kbd(command)
        rig.write_ctr(ps2ctr)
        assert len(got) == answer_len
        return got

    assert rig.drain() == []  # i8042_flush
    rig.command(CMD_SELF_TEST)
    assert rig.drain() == [(0x55, False)]
    rig.command(CMD_TEST_KBD)
    assert rig.drain() == [(0x00, False)]
    ps2ctr = CTR_KBD_DISABLE | CTR_AUX_DISABLE
    assert ps2_kbd_command(ps2ctr, 0xFF, 2) == [ACK, BAT_OK]  # then no third byte
    assert ps2_kbd_command(ps2ctr, 0xF5, 1) == [ACK]
    assert ps2_kbd_command(ps2ctr, 0xF0, 1) == [ACK]
    assert ps2_kbd_command(ps2ctr, 0x02, 1) == [ACK]
    ps2ctr = CTR_AUX_DISABLE | CTR_XLATE | CTR_KBD_INT
    assert ps2_kbd_command(ps2ctr, 0xF4, 1) == [ACK]
    assert rig.irq1.transitions == []  # everything above was polled
    rig.dev.keyboard.key_event(KEY_A, True)
    assert rig.irq1.level  # handle_09
    assert rig.status() & (STATUS_OBF | STATUS_AUXB) == STATUS_OBF
    assert rig.read_data() == 0x1E
    rig.command(CMD_ENABLE_KBD)  # handle_09 re-enables the keyboard after every key
    assert rig.irq1.transitions == [True, False]


# ---------------------------------------------------------------------- keyboard protocol


@pytest.fixture
def kbd_rig() -> Rig:
    rig = Rig()
    rig.write_ctr(CTR_RUNNING)
    return rig


def test_echo_resend_and_unknown_commands(kbd_rig: Rig) -> None:
    assert kbd_rig.kbd(0xEE) == [0xEE]
    assert kbd_rig.kbd(0xFE) == [0xEE]  # resend the last byte sent
    assert kbd_rig.kbd(0xF2) == [ACK, 0xAB, 0x41]
    assert kbd_rig.kbd(0xFE) == [0x41]  # 0x83, translated again on its way out
    for unknown in (0x00, 0x05, 0xE0, 0xEC, 0xF1, 0xF7, 0xFA, 0xFD):
        assert kbd_rig.kbd(unknown) == [RESEND]


def test_every_argument_is_acknowledged_and_bad_ones_refused(kbd_rig: Rig) -> None:
    assert kbd_rig.kbd(0xF3) == [ACK]
    assert kbd_rig.kbd(0x80) == [RESEND]  # bit 7 must be clear
    assert kbd_rig.dev.keyboard.typematic == 0x2B
    assert kbd_rig.kbd(0xF3) == [ACK]
    assert kbd_rig.kbd(0x7F) == [ACK]
    assert kbd_rig.dev.keyboard.typematic == 0x7F
    assert kbd_rig.kbd(0xF0) == [ACK]
    assert kbd_rig.kbd(0x03) == [RESEND]  # set 3 is not offered
    assert kbd_rig.dev.keyboard.scancode_set == 2
    # A command where an argument was due aborts the old command.
    assert kbd_rig.kbd(0xED) == [ACK]
    assert kbd_rig.kbd(0xF2) == [ACK, 0xAB, 0x41]
    assert kbd_rig.kbd(0x01) == [RESEND]  # no longer an LED byte: an unknown command
    assert kbd_rig.dev.keyboard.leds == 0


def test_defaults_and_disable_restore_set_2_and_typematic(kbd_rig: Rig) -> None:
    kbd_rig.write_ctr(CTR_SYS | CTR_KBD_INT)
    assert kbd_rig.kbd(0xF0) == [ACK]
    assert kbd_rig.kbd(0x01) == [ACK]
    assert kbd_rig.kbd(0xF3) == [ACK]
    assert kbd_rig.kbd(0x00) == [ACK]
    assert kbd_rig.kbd(0xF6) == [ACK]
    assert kbd_rig.dev.keyboard.scancode_set == 2
    assert kbd_rig.dev.keyboard.typematic == 0x2B
    assert kbd_rig.dev.keyboard.scanning
    assert kbd_rig.key(KEY_A, True) == [0x1C]


def test_scancode_set_1_is_sent_raw_when_selected(kbd_rig: Rig) -> None:
    kbd_rig.write_ctr(CTR_SYS | CTR_KBD_INT)
    assert kbd_rig.kbd(0xF0) == [ACK]
    assert kbd_rig.kbd(0x01) == [ACK]
    assert kbd_rig.kbd(0xF0) == [ACK]
    assert kbd_rig.kbd(0x00) == [ACK, 0x01]
    assert kbd_rig.key(KEY_A, True) == [0x1E]
    assert kbd_rig.key(KEY_A, False) == [0x9E]
    assert kbd_rig.key(KEY_RIGHTCTRL, False) == [0xE0, 0x9D]


@pytest.mark.parametrize(
    ("name", "make2", "break2", "make1", "break1"),
    [
        ("KEY_A", [0x1C], [0xF0, 0x1C], [0x1E], [0x9E]),
        ("KEY_ENTER", [0x5A], [0xF0, 0x5A], [0x1C], [0x9C]),
        ("KEY_RIGHTCTRL", [0xE0, 0x14], [0xE0, 0xF0, 0x14], [0xE0, 0x1D], [0xE0, 0x9D]),
        ("KEY_UP", [0xE0, 0x75], [0xE0, 0xF0, 0x75], [0xE0, 0x48], [0xE0, 0xC8]),
        ("KEY_DOWN", [0xE0, 0x72], [0xE0, 0xF0, 0x72], [0xE0, 0x50], [0xE0, 0xD0]),
        ("KEY_LEFT", [0xE0, 0x6B], [0xE0, 0xF0, 0x6B], [0xE0, 0x4B], [0xE0, 0xCB]),
        ("KEY_RIGHT", [0xE0, 0x74], [0xE0, 0xF0, 0x74], [0xE0, 0x4D], [0xE0, 0xCD]),
        ("KEY_F7", [0x83], [0xF0, 0x83], [0x41], [0xC1]),
        ("KEY_LEFTMETA", [0xE0, 0x1F], [0xE0, 0xF0, 0x1F], [0xE0, 0x5B], [0xE0, 0xDB]),
        ("KEY_KPSLASH", [0xE0, 0x4A], [0xE0, 0xF0, 0x4A], [0xE0, 0x35], [0xE0, 0xB5]),
        (
            "KEY_SYSRQ",
            [0xE0, 0x12, 0xE0, 0x7C],
            [0xE0, 0xF0, 0x7C, 0xE0, 0xF0, 0x12],
            [0xE0, 0x2A, 0xE0, 0x37],
            [0xE0, 0xB7, 0xE0, 0xAA],
        ),
        (
            "KEY_PAUSE",
            [0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77],
            [],
            [0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5],
            [],
        ),
    ],
)
def test_keys_raw_set_2_and_translated_set_1(
    kbd_rig: Rig,
    name: str,
    make2: list[int],
    break2: list[int],
    make1: list[int],
    break1: list[int],
) -> None:
    code = KEY_CODES[name]
    assert kbd_rig.key(code, True) == make1
    assert kbd_rig.key(code, False) == break1
    kbd_rig.write_ctr(CTR_RUNNING & ~CTR_XLATE)
    assert kbd_rig.key(code, True) == make2
    assert kbd_rig.key(code, False) == break2


def test_table_covers_the_keys_a_pc_keyboard_needs() -> None:
    needed = [f"KEY_{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    needed += [
        *("KEY_MINUS", "KEY_EQUAL", "KEY_LEFTBRACE", "KEY_RIGHTBRACE", "KEY_SEMICOLON"),
        *("KEY_APOSTROPHE", "KEY_GRAVE", "KEY_BACKSLASH", "KEY_COMMA", "KEY_DOT"),
        *("KEY_SLASH", "KEY_ENTER", "KEY_ESC", "KEY_BACKSPACE", "KEY_TAB", "KEY_SPACE"),
        *("KEY_LEFTSHIFT", "KEY_RIGHTSHIFT", "KEY_LEFTCTRL", "KEY_RIGHTCTRL"),
        *("KEY_LEFTALT", "KEY_RIGHTALT", "KEY_LEFTMETA", "KEY_RIGHTMETA", "KEY_CAPSLOCK"),
        *(f"KEY_F{n}" for n in range(1, 13)),
        *("KEY_UP", "KEY_DOWN", "KEY_LEFT", "KEY_RIGHT", "KEY_HOME", "KEY_END"),
        *("KEY_PAGEUP", "KEY_PAGEDOWN", "KEY_INSERT", "KEY_DELETE", "KEY_NUMLOCK"),
        *(f"KEY_KP{n}" for n in range(10)),
        *("KEY_KPENTER", "KEY_KPPLUS", "KEY_KPMINUS", "KEY_KPASTERISK", "KEY_KPSLASH"),
        *("KEY_KPDOT", "KEY_SYSRQ", "KEY_PAUSE", "KEY_SCROLLLOCK"),
    ]
    for name in needed:
        assert set2_sequence(KEY_CODES[name], True), name
    # linux/input-event-codes.h numbering spot checks.
    assert (KEY_CODES["KEY_A"], KEY_CODES["KEY_ENTER"], KEY_CODES["KEY_F12"]) == (30, 28, 88)
    assert (KEY_CODES["KEY_UP"], KEY_CODES["KEY_DELETE"], KEY_SYSRQ, KEY_PAUSE) == (
        103,
        111,
        99,
        119,
    )


def test_translation_turns_set_2_into_the_linux_numbering_for_plain_keys() -> None:
    # Linux key codes 1-88 are the set 1 scancodes, so the 8042 table must map each plain
    # key's set 2 code onto its Linux code, and a break onto code | 0x80.
    checked = 0
    for code, make in SET2_SCANCODES.items():
        if len(make) == 1 and code <= 88:
            assert translate_set2_to_set1(set2_sequence(code, True)) == bytes([code])
            assert translate_set2_to_set1(set2_sequence(code, False)) == bytes([code | 0x80])
            checked += 1
        elif len(make) == 2:
            assert make[0] == 0xE0
            out = translate_set2_to_set1(set2_sequence(code, False))
            assert out[0] == 0xE0 and out[1] & 0x80
    assert checked >= 80
    assert set2_sequence(0x2FF, True) == b""  # unknown keys send nothing


def test_unknown_keycodes_are_ignored(kbd_rig: Rig) -> None:
    for code in (0, 84, 255, 1000, -1):
        assert kbd_rig.key(code, True) == []


def test_replies_go_ahead_of_buffered_scancodes(rig: Rig) -> None:
    rig.write_ctr(CTR_RUNNING | CTR_KBD_DISABLE)  # keys wait in the keyboard
    rig.dev.keyboard.key_event(KEY_A, True)
    assert not rig.status() & STATUS_OBF
    # Sending to the keyboard enables its interface; the answer comes first.
    assert rig.kbd(0xF2) == [ACK, 0xAB, 0x41, 0x1E]
    assert not rig.read_ctr() & CTR_KBD_DISABLE


def test_unread_replies_are_replaced_not_accumulated(kbd_rig: Rig) -> None:
    for _ in range(1000):
        kbd_rig.write_data(0xF2)
    assert kbd_rig.dev.queue_lengths().keyboard <= 3
    assert len(kbd_rig.drain()) <= 4


def test_keyboard_flood_is_bounded_and_ends_with_overrun(rig: Rig) -> None:
    rig.write_ctr(CTR_XLATE | CTR_SYS | CTR_KBD_DISABLE | CTR_AUX_DISABLE)
    for _ in range(1000):
        rig.dev.keyboard.key_event(KEY_A, True)
    assert rig.dev.queue_lengths().keyboard == KBD_BUFFER_SIZE
    assert rig.dev.keyboard.keys_dropped == 1000 - (KBD_BUFFER_SIZE - 1)
    rig.command(CMD_ENABLE_KBD)
    data = rig.kbd_bytes()
    assert data == [0x1E] * (KBD_BUFFER_SIZE - 1) + [0xFF]  # set 2 overrun 0x00, translated
    assert rig.key(KEY_A, False) == [0x9E]  # room again


def test_keyboard_overrun_code_untranslated_and_keys_stay_whole(rig: Rig) -> None:
    rig.write_ctr(CTR_SYS | CTR_KBD_DISABLE)
    for _ in range(200):
        rig.dev.keyboard.key_event(KEY_RIGHTCTRL, False)  # 3 bytes each
    rig.command(CMD_ENABLE_KBD)
    data = rig.kbd_bytes()
    assert data[-1] == 0x00
    body = data[:-1]
    assert len(body) % 3 == 0 and body == [0xE0, 0xF0, 0x14] * (len(body) // 3)


def test_keys_wait_while_the_interface_is_disabled(rig: Rig) -> None:
    rig.write_ctr(CTR_RUNNING | CTR_KBD_DISABLE)
    rig.dev.keyboard.key_event(KEY_ENTER, True)
    assert rig.drain() == [] and not rig.irq1.level
    rig.command(CMD_ENABLE_KBD)
    assert rig.irq1.level
    assert rig.kbd_bytes() == [0x1C]


def test_key_events_from_another_thread_arrive_whole_and_in_order(kbd_rig: Rig) -> None:
    presses = 50  # 150 raw bytes: the buffer never fills, so nothing may be lost

    def typist() -> None:
        for _ in range(presses):
            kbd_rig.dev.keyboard.key_event(KEY_A, True)
            kbd_rig.dev.keyboard.key_event(KEY_A, False)

    thread = threading.Thread(target=typist)
    thread.start()
    got: list[int] = []
    for _ in range(1_000_000):
        if len(got) == 2 * presses:
            break
        if kbd_rig.status() & STATUS_OBF:
            got.append(kbd_rig.read_data())
    thread.join(timeout=10)
    assert got == [0x1E, 0x9E] * presses


# ---------------------------------------------------------------------- mouse protocol


def test_first_event_has_no_motion_then_relative_packets() -> None:
    rig = running_rig()
    assert rig.point(500, 400) == []
    assert rig.point(510, 395) == [0x08, 10, 5]  # right 10, up 5 (PS/2 Y grows upwards)
    assert rig.point(500, 405) == [0x38, 0xF6, 0xF6]  # left 10, down 10: both sign bits
    assert decode_packets(rig.point(497, 407)) == [(0, -3, -2)]


def test_buttons_map_to_the_packet_bits_psmouse_reads() -> None:
    rig = running_rig()
    rig.point(0, 0)
    assert rig.point(0, 0, BUTTON_LEFT) == [0x09, 0, 0]
    assert rig.point(0, 0, BUTTON_LEFT | BUTTON_RIGHT) == [0x0B, 0, 0]
    assert rig.point(0, 0, BUTTON_MIDDLE) == [0x0C, 0, 0]
    assert rig.point(0, 0, BUTTON_MIDDLE) == []  # nothing changed: no packet
    assert rig.point(0, 0) == [0x08, 0, 0]


def test_large_moves_are_split_into_packets_that_fit_9_bits() -> None:
    rig = running_rig()
    rig.point(0, 1000)
    data = rig.point(600, 1000)
    packets = decode_packets(data)
    assert [dx for _, dx, _ in packets] == [255, 255, 90]
    assert all(b & 0xC0 == 0 for b in data[0::3])  # no overflow bits
    packets = decode_packets(rig.point(0, 1700))
    assert sum(dx for _, dx, _ in packets) == -600
    assert sum(dy for _, _, dy in packets) == -700
    assert all(-256 <= dx <= 255 and -256 <= dy <= 255 for _, dx, dy in packets)
    assert (0, -256, -256) in packets


def test_intellimouse_wheel_in_the_fourth_byte() -> None:
    rig = running_rig()
    for rate in (200, 100, 80):
        rig.aux(0xF3)
        rig.aux(rate)
    rig.point(10, 10)
    assert rig.point(10, 10, BUTTON_WHEEL_UP) == [0x08, 0, 0, 0xFF]  # psmouse: REL_WHEEL +1
    assert rig.point(10, 10) == []  # the wheel bit dropping is no event
    assert rig.point(12, 10, BUTTON_WHEEL_DOWN) == [0x08, 2, 0, 0x01]
    assert rig.point(12, 10, BUTTON_LEFT) == [0x09, 0, 0, 0x00]


def test_explorer_wheel_keeps_buttons_4_and_5_clear() -> None:
    rig = running_rig()
    for rate in (200, 100, 80, 200, 200, 80):
        rig.aux(0xF3)
        rig.aux(rate)
    assert rig.aux(0xF2) == [ACK, 0x04]
    rig.point(10, 10)
    assert rig.point(10, 10, BUTTON_WHEEL_UP) == [0x08, 0, 0, 0x0F]
    assert rig.point(10, 10, BUTTON_WHEEL_DOWN) == [0x08, 0, 0, 0x01]


def test_wheel_is_ignored_by_a_plain_ps2_mouse() -> None:
    rig = running_rig()
    rig.point(10, 10)
    assert rig.point(10, 10, BUTTON_WHEEL_UP) == []


def test_scaling_2_1_applies_to_stream_reports() -> None:
    rig = running_rig()
    assert rig.aux(0xE7) == [ACK]
    rig.point(0, 0)
    assert decode_packets(rig.point(3, 0)) == [(0, 3, 0)]
    assert decode_packets(rig.point(7, 0)) == [(0, 6, 0)]
    assert decode_packets(rig.point(17, 0)) == [(0, 20, 0)]
    assert [dx for _, dx, _ in decode_packets(rig.point(317, 0))] == [254, 254, 92]


def test_remote_mode_reads_accumulated_motion_with_overflow_bits() -> None:
    rig = running_rig()
    assert rig.aux(0xF0) == [ACK]
    rig.point(100, 100)
    assert rig.point(110, 100) == []  # remote mode: nothing until asked
    rig.point(120, 90)
    assert rig.aux(0xEB) == [ACK, 0x08, 20, 10]
    assert rig.aux(0xEB) == [ACK, 0x08, 0, 0]  # the counters reset after a read
    rig.point(1120, 1100)  # +1000 right, 1010 down
    data = rig.aux(0xEB)
    assert data[1:] == [0x08 | 0x20 | 0x40 | 0x80, 0xFF, 0x00]  # 255 and -256, both overflow
    assert rig.aux(0xEA) == [ACK]  # back to stream mode
    assert rig.point(1121, 1100) == [0x08, 1, 0]


def test_status_request_reports_mode_scaling_buttons_resolution_and_rate() -> None:
    rig = running_rig()
    rig.point(0, 0, BUTTON_LEFT)
    rig.aux(0xE7)
    rig.aux(0xE8)
    rig.aux(0x01)
    rig.aux(0xF3)
    rig.aux(40)
    assert rig.aux(0xE9) == [ACK, 0x20 | 0x10 | 0x04, 0x01, 40]
    rig.aux(0xF5)
    rig.aux(0xF0)
    assert rig.aux(0xE9) == [ACK, 0x40 | 0x10 | 0x04, 0x01, 40]
    rig.aux(0xF6)
    assert rig.aux(0xE9) == [ACK, 0x04, 0x02, 100]


def test_bad_arguments_are_refused_and_the_mouse_stays_usable() -> None:
    rig = running_rig()
    assert rig.aux(0xE8) == [ACK]
    assert rig.aux(0x04) == [RESEND]
    assert rig.aux(0xF3) == [ACK]
    assert rig.aux(55) == [RESEND]
    assert rig.aux(0xF2) == [ACK, 0x00]
    assert rig.dev.mouse.sample_rate == 100 and rig.dev.mouse.resolution == 2
    for unknown in (0x00, 0xE1, 0xED, 0xF1, 0xF7, 0xFE):
        assert rig.aux(unknown) == [RESEND]


def test_wrap_mode_echoes_until_reset_wrap() -> None:
    rig = running_rig()
    assert rig.aux(0xEE) == [ACK]
    assert rig.aux(0x12) == [0x12]
    assert rig.aux(0xF2) == [0xF2]  # echoed, not executed
    rig.point(5, 5)
    assert rig.point(50, 5) == []  # no reports in wrap mode
    assert rig.aux(0xEC) == [ACK]
    assert rig.aux(0xF2) == [ACK, 0x00]
    assert rig.aux(0xEE) == [ACK]
    assert rig.aux(0xFF) == [ACK, BAT_OK, 0x00]  # reset works from wrap mode too
    assert rig.aux(0x12) == [RESEND]


def test_motion_while_not_reporting_is_dropped_but_tracked() -> None:
    rig = Rig()
    rig.write_ctr(CTR_RUNNING)
    rig.point(0, 0)
    assert rig.point(300, 300) == []  # reporting is off after power-on
    assert rig.aux(0xF4) == [ACK]
    assert rig.point(310, 300) == [0x08, 10, 0]  # relative to 300, not to 0
    assert rig.aux(0xF5) == [ACK]
    assert rig.point(400, 300, BUTTON_LEFT) == []
    assert rig.aux(0xFF) == [ACK, BAT_OK, 0x00]
    assert rig.aux(0xF4) == [ACK]
    # First event after the reset: no motion, only the left button's release.
    assert rig.point(900, 900) == [0x08, 0, 0]


def test_mouse_bytes_wait_while_the_aux_interface_is_disabled() -> None:
    rig = running_rig()
    rig.point(0, 0)
    rig.command(CMD_DISABLE_AUX)
    rig.dev.mouse.pointer_event(5, 0, 0, 1024, 768)
    assert rig.drain() == []
    rig.command(CMD_ENABLE_AUX)
    assert rig.aux_bytes() == [0x08, 5, 0]


def test_mouse_flood_is_bounded_and_drops_whole_packets() -> None:
    rig = running_rig()
    rig.command(CMD_DISABLE_AUX)
    for i in range(2000):
        rig.dev.mouse.pointer_event((i * 997) % 4000, (i * 613) % 3000, i & 7, 4000, 3000)
    assert rig.dev.queue_lengths().mouse <= AUX_BUFFER_SIZE
    assert rig.dev.mouse.packets_dropped > 0
    rig.command(CMD_ENABLE_AUX)
    data = rig.aux_bytes()
    assert 0 < len(data) <= AUX_BUFFER_SIZE
    decode_packets(data)  # whole packets only: every third byte starts a packet


# ---------------------------------------------------------------------- hostile guests


def _check_invariants(rig: Rig) -> None:
    lengths = rig.dev.queue_lengths()
    assert lengths.controller <= CTRL_QUEUE_SIZE
    assert lengths.keyboard <= KBD_BUFFER_SIZE + 3  # scancodes + one reply (GET ID)
    assert lengths.mouse <= AUX_BUFFER_SIZE + 5  # packets + one reply (FA + 4-byte packet)
    status = rig.status()
    assert not (rig.irq1.level and rig.irq12.level)
    if rig.irq1.level:
        assert status & (STATUS_OBF | STATUS_AUXB) == STATUS_OBF
    if rig.irq12.level:
        assert status & (STATUS_OBF | STATUS_AUXB) == STATUS_OBF | STATUS_AUXB


def test_random_port_traffic_with_host_input_never_raises_and_stays_bounded() -> None:
    rng = random.Random(8042)
    rig = Rig()
    for _ in range(30_000):
        op = rng.randrange(8)
        if op == 0:
            rig.dev.write(COMMAND, rng.choice((1, 1, 1, 2, 4)), rng.randrange(-5, 0x1_0000))
        elif op in (1, 2):
            rig.dev.write(DATA, 1, rng.randrange(256))
        elif op == 3:
            rig.dev.read(rng.randrange(-2, 8), rng.choice((1, 2, 4)))
        elif op == 4:
            rig.read_data()
        elif op == 5:
            rig.dev.keyboard.key_event(rng.randrange(-3, 300), rng.random() < 0.5)
        elif op == 6:
            rig.dev.mouse.pointer_event(
                rng.randrange(-10, 70_000), rng.randrange(-10, 70_000), rng.randrange(256), 1, 1
            )
        else:
            rig.dev.write(rng.randrange(1, 4), 1, rng.randrange(256))
        _check_invariants(rig)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([DATA, COMMAND, -1]), st.integers(0, 255)), max_size=200))
def test_arbitrary_guest_byte_sequences_never_raise(ops: list[tuple[int, int]]) -> None:
    rig = Rig()
    rig.write_ctr(CTR_RUNNING)
    for offset, value in ops:
        if offset == -1:
            rig.read_data()
        else:
            rig.dev.write(offset, 1, value)
        rig.dev.keyboard.key_event(KEY_A, value & 1 == 0)
        rig.dev.mouse.pointer_event(value * 3, value * 5, value, 800, 600)
        _check_invariants(rig)
    assert len(rig.drain()) <= CTRL_QUEUE_SIZE + KBD_BUFFER_SIZE + AUX_BUFFER_SIZE + 16
