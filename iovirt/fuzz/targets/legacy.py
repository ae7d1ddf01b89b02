"""Fuzz targets of the PC's legacy port devices: 16550A UART, CMOS RTC, ACPI sleep registers,
debug-exit port, i8042 PS/2 controller.
"""

from __future__ import annotations

import struct

from iovirt.fuzz import ops as fops
from iovirt.fuzz.harness import FuzzMemory, OracleViolation, Region, Target
from iovirt.fuzz.ops import Op
from iovirt.fuzz.targets.common import (
    check_line,
)
from iovirt.interrupt import RecordingInterrupt


class _RecordingChar:
    """A char backend that keeps what the UART sent, and can be told to fail."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.failing = False

    def write(self, data: bytes) -> None:
        if self.failing:
            raise OSError(5, "fuzz: backend write failed")
        self.data += data


class SerialTarget(Target):
    name = "serial"
    summary = "16550A UART (ports 0-7), host input, a backend that can fail"
    modules = ("iovirt.devices.serial",)
    host_events = ("input", "backend-fail", "reset")

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import serial

        self.mod = serial
        self.layout = [("uart", serial.UART_NUM_PORTS)]

    def begin(self) -> list[Region]:
        self.irq = RecordingInterrupt()
        self.char = _RecordingChar()
        self.uart = self.mod.Serial16550A(self.irq, self.char)
        return [Region("uart", self.mod.UART_NUM_PORTS, self.uart.read, self.uart.write)]

    def host(self, event: int, data: bytes) -> None:
        if event == 0:
            kept = self.uart.receive(data)
            if not 0 <= kept <= len(data):
                raise OracleViolation("host-api", f"receive() kept {kept} of {len(data)} bytes")
        elif event == 1:
            self.char.failing = bool(data and data[0] & 1)
        else:
            self.uart.reset()

    def check(self) -> None:
        s = self.mod
        uart = self.uart
        regs = uart.registers
        fifo = len(uart._rx_fifo)
        capacity = s.UART_FIFO_SIZE if regs.fcr & s.UART_FCR_FIFOE else 1
        if fifo > capacity:
            raise OracleViolation("fifo-bounds", f"{fifo} bytes in a {capacity}-byte FIFO")
        if len(uart._rx_backlog) > s.RX_BACKLOG_LIMIT:
            raise OracleViolation("fifo-bounds", f"backlog of {len(uart._rx_backlog)} bytes")
        pending = (
            (regs.ier & s.UART_IER_ELSI and regs.overrun)
            or (regs.ier & s.UART_IER_ERBFI and fifo > 0)
            or (regs.ier & s.UART_IER_ETBEI and regs.thre_pending)
            or (regs.ier & s.UART_IER_EDSSI and regs.msr_delta)
        )
        check_line("serial", self.irq, bool(pending) and bool(regs.mcr & s.UART_MCR_OUT2))
        if len(self.char.data) > uart.tx_bytes:
            raise OracleViolation("backend", "the backend got more bytes than the guest sent")

    def seeds(self) -> list[list[Op]]:
        s = self.mod
        w = fops.write
        linux_init = [
            w(0, s.UART_LCR, 1, s.UART_LCR_DLAB),
            w(0, s.UART_DLL, 1, 1),
            w(0, s.UART_DLM, 1, 0),
            w(0, s.UART_LCR, 1, 0x03),
            w(0, s.UART_FCR, 1, 0xC7),
            w(0, s.UART_MCR, 1, s.UART_MCR_OUT2 | s.UART_MCR_RTS | s.UART_MCR_DTR),
            w(0, s.UART_IER, 1, s.UART_IER_MASK),
            fops.read(0, s.UART_IIR, 1),
            w(0, s.UART_THR, 1, ord("A")),
            fops.host(0, b"hello, world"),
            fops.read(0, s.UART_IIR, 1),
            fops.read(0, s.UART_LSR, 1),
            fops.read(0, s.UART_RBR, 1),
            fops.read(0, s.UART_MSR, 1),
        ]
        loopback = [
            w(0, s.UART_MCR, 1, s.UART_MCR_LOOP | 0x0F),
            w(0, s.UART_IER, 1, s.UART_IER_MASK),
            *[w(0, s.UART_THR, 1, c) for c in b"0123456789abcdefgh"],
            fops.read(0, s.UART_LSR, 1),
            fops.read(0, s.UART_RBR, 1),
            w(0, s.UART_MCR, 1, 0x08),
            fops.read(0, s.UART_MSR, 1),
            fops.host(1, b"\x01"),
            w(0, s.UART_THR, 1, 0x41),
            w(0, s.UART_SCR, 2, 0x55),
        ]
        return [linux_init, loopback]


class _FakeClock:
    """UNIX time that moves only when the fuzzer says (HOST "tick")."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class RtcTarget(Target):
    name = "rtc"
    summary = "MC146818 RTC and CMOS RAM (index/data ports) on a fake clock"
    modules = ("iovirt.devices.rtc",)
    host_events = ("tick",)

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import rtc

        self.mod = rtc
        self.layout = [("cmos", rtc.RTC_PORTS)]

    def begin(self) -> list[Region]:
        self.clock = _FakeClock()
        self.rtc = self.mod.CmosRtc(self.clock)
        return [Region("cmos", self.mod.RTC_PORTS, self.rtc.read, self.rtc.write)]

    def host(self, event: int, data: bytes) -> None:
        # Host time moves forward, by up to about 194 days a tick, and stays inside what a
        # host clock can show (before 2106): the guest's offset is the model's to handle.
        step = int.from_bytes(data[:3].ljust(3, b"\0"), "little")
        self.clock.now = min(self.clock.now + step, float(1 << 32))

    def check(self) -> None:
        if len(self.rtc.ram) != self.mod.CMOS_SIZE:
            raise OracleViolation("cmos-size", f"CMOS RAM is {len(self.rtc.ram)} bytes")

    def seeds(self) -> list[list[Op]]:
        r = self.mod
        w = fops.write

        def set_reg(index: int, value: int) -> list[Op]:
            return [w(0, 0, 1, index), w(0, 1, 1, value)]

        def get_reg(index: int) -> list[Op]:
            return [w(0, 0, 1, index), fops.read(0, 1, 1)]

        read_all = [op for i in (*r._TIME_REGS, r.RTC_REG_A, r.RTC_REG_C) for op in get_reg(i)]
        set_time = [
            *set_reg(r.RTC_REG_B, r.REG_B_SET | r.REG_B_24H),
            *set_reg(r.RTC_SECONDS, 0x30),
            *set_reg(r.RTC_HOURS, 0x12),
            *set_reg(r.RTC_YEAR, 0x24),
            *set_reg(r.RTC_CENTURY, 0x20),
            *set_reg(r.RTC_REG_B, r.REG_B_24H | r.REG_B_DM_BINARY),
            fops.host(0, (3600).to_bytes(4, "little")),
            *read_all,
            *set_reg(r.RTC_REG_B, 0),
            *read_all,
        ]
        return [read_all, set_time]


class AcpiPmTarget(Target):
    name = "acpi-pm"
    summary = "hardware-reduced ACPI sleep control/status registers"
    modules = ("iovirt.devices.acpi_pm",)

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import acpi_pm

        self.mod = acpi_pm
        self.layout = [("sleep", acpi_pm.ACPI_SLEEP_REGS_SIZE)]

    def begin(self) -> list[Region]:
        self.poweroffs = 0
        self.expected = 0
        self.regs = self.mod.AcpiSleepRegisters(self._poweroff)

        def write(offset: int, size: int, value: int) -> None:
            # Independently of the model: S5 with SLP_EN in the control byte powers off.
            for i in range(size):
                byte = value >> (8 * i) & 0xFF
                s5 = (byte >> self.mod.SLP_TYP_SHIFT) & 0x7 == self.mod.SLP_TYP_S5
                if offset + i == self.mod.SLEEP_CONTROL and byte & self.mod.SLP_EN and s5:
                    self.expected += 1
            self.regs.write(offset, size, value)

        return [Region("sleep", self.mod.ACPI_SLEEP_REGS_SIZE, self._read, write)]

    def _poweroff(self) -> None:
        self.poweroffs += 1

    def _read(self, offset: int, size: int) -> int:
        value = self.regs.read(offset, size)
        if value != 0:
            raise OracleViolation("register", f"SLEEP register read {value:#x}, expected 0")
        return value

    def check(self) -> None:
        if self.poweroffs != self.expected:
            raise OracleViolation(
                "poweroff", f"{self.poweroffs} power-off calls for {self.expected} S5 requests"
            )

    def seeds(self) -> list[list[Op]]:
        m = self.mod
        s5 = m.SLP_TYP_S5 << m.SLP_TYP_SHIFT | m.SLP_EN
        return [
            [fops.write(0, 1, 1, 0x80), fops.read(0, 1, 1), fops.write(0, 0, 1, s5)],
            [fops.write(0, 0, 2, 0x8000 | 3 << m.SLP_TYP_SHIFT | m.SLP_EN), fops.read(0, 0, 2)],
        ]


class DebugExitTarget(Target):
    name = "debug-exit"
    summary = "the one-byte debug-exit port"
    modules = ("iovirt.devices.debug_exit",)

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import debug_exit

        self.mod = debug_exit
        self.layout = [("port", debug_exit.DEBUG_EXIT_SIZE)]

    def begin(self) -> list[Region]:
        self.exits: list[int] = []
        self.port = self.mod.DebugExit(self.exits.append)

        def read(offset: int, size: int) -> int:
            value = self.port.read(offset, size)
            if value != 0:
                raise OracleViolation("register", f"debug-exit read {value:#x}, expected 0")
            return value

        def write(offset: int, size: int, value: int) -> None:
            before = len(self.exits)
            self.port.write(offset, size, value)
            if self.exits[before:] != [value & 0xFF]:
                raise OracleViolation(
                    "exit-value", f"write of {value:#x} reported {self.exits[before:]}"
                )

        return [Region("port", self.mod.DEBUG_EXIT_SIZE, read, write)]

    def seeds(self) -> list[list[Op]]:
        return [[fops.write(0, 0, 1, 0x31), fops.read(0, 0, 1), fops.write(0, 0, 4, 0x1234_5678)]]


class I8042Target(Target):
    name = "i8042"
    summary = "i8042 PS/2 controller with AT keyboard and PS/2 mouse, host key/pointer input"
    modules = ("iovirt.devices.i8042",)
    host_events = ("key", "pointer")

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import i8042

        self.mod = i8042
        self.layout = [("ports", 5)]

    def begin(self) -> list[Region]:
        self.kbd_irq = RecordingInterrupt()
        self.aux_irq = RecordingInterrupt()
        self.resets = 0
        self.ctl = self.mod.I8042(self._reset, self.kbd_irq, self.aux_irq)
        return [Region("ports", 5, self.ctl.read, self.ctl.write)]

    def _reset(self) -> None:
        self.resets += 1

    def host(self, event: int, data: bytes) -> None:
        raw = data.ljust(9, b"\0")
        if event == 0:
            # A Linux key code (any 16-bit value: unknown ones must be ignored) up or down.
            self.ctl.keyboard.key_event(int.from_bytes(raw[0:2], "little"), bool(raw[2] & 1))
        else:
            x, y, width, height = struct.unpack_from("<hhHH", raw, 0)
            self.ctl.mouse.pointer_event(x, y, raw[8], width, height)

    def check(self) -> None:
        m = self.mod
        ctl = self.ctl
        queues = ctl.queue_lengths()
        # Replies to a command are a few bytes on top of the bounded buffers.
        limits = (m.CTRL_QUEUE_SIZE, m.KBD_BUFFER_SIZE + 8, m.AUX_BUFFER_SIZE + 8)
        if any(n > limit for n, limit in zip(queues, limits, strict=True)):
            raise OracleViolation("queue-bounds", f"queues {queues} over their bounds {limits}")
        ctr = ctl.command_byte
        full = ctl._output is not None
        aux = ctl._output_aux
        check_line("i8042 IRQ1", self.kbd_irq, full and not aux and bool(ctr & m.CTR_KBD_INT))
        check_line("i8042 IRQ12", self.aux_irq, full and aux and bool(ctr & m.CTR_AUX_INT))

    def seeds(self) -> list[list[Op]]:
        m = self.mod
        w, r = fops.write, fops.read

        def cmd(value: int, *data: int) -> list[Op]:
            return [w(0, 4, 1, value), *[w(0, 0, 1, d) for d in data]]

        def drain(n: int) -> list[Op]:
            return [op for _ in range(n) for op in (r(0, 4, 1), r(0, 0, 1))]

        linux_probe = [
            *cmd(m.CMD_READ_CTR),
            *drain(2),
            *cmd(m.CMD_SELF_TEST),
            *drain(1),
            *cmd(m.CMD_WRITE_CTR, 0x47),
            *cmd(m.CMD_WRITE_AUX_OUTPUT, 0x5A),
            *drain(2),
            *cmd(m.CMD_ENABLE_AUX),
            *cmd(m.CMD_TEST_AUX),
            *cmd(m.CMD_TEST_KBD),
            *drain(3),
            w(0, 0, 1, m.KBD_CMD_RESET),
            *drain(2),
            w(0, 0, 1, m.KBD_CMD_GET_ID),
            *drain(3),
            w(0, 0, 1, m.KBD_CMD_SCANCODE_SET),
            w(0, 0, 1, 2),
            w(0, 0, 1, m.KBD_CMD_SET_LEDS),
            w(0, 0, 1, 0x07),
            w(0, 0, 1, m.KBD_CMD_ENABLE),
            *drain(4),
            fops.host(0, bytes([30, 0, 1])),
            fops.host(0, bytes([30, 0, 0])),
            fops.host(0, bytes([0x63, 0, 1])),
            *drain(6),
        ]
        mouse = [
            *cmd(m.CMD_WRITE_CTR, 0x47),
            *[
                op
                for b in (0xFF, 0xF3, 200, 0xF3, 100, 0xF3, 80, 0xF2, 0xE8, 3, 0xE9, 0xF4)
                for op in (*cmd(m.CMD_WRITE_AUX, b), *drain(1))
            ],
            fops.host(1, struct.pack("<hhHHB", 10, 10, 640, 480, 1)),
            fops.host(1, struct.pack("<hhHHB", 400, -300, 640, 480, 0)),
            *drain(8),
            *cmd(m.CMD_WRITE_AUX, 0xF0),
            *cmd(m.CMD_WRITE_AUX, 0xEB),
            *drain(5),
            *cmd(m.CMD_WRITE_OUTPUT_PORT, 0x03),
            *cmd(m.CMD_READ_OUTPUT_PORT),
            *drain(1),
            *cmd(m.CMD_PULSE_RESET),
        ]
        return [linux_probe, mouse]
