"""Register-level tests of the 16550A UART model, at the port offsets the guest uses.

Each test drives the device the way a guest driver would and checks the interrupt line
(``RecordingInterrupt``), the bytes that reach the host (``BufferBackend``) and the counters.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.backends.char import BufferBackend
from iovirt.devices.serial import (
    RX_BACKLOG_LIMIT,
    UART_DLL,
    UART_DLM,
    UART_FCR,
    UART_FCR_FIFOE,
    UART_FCR_RFIFOR,
    UART_FCR_TRIGGER_1,
    UART_FCR_TRIGGER_4,
    UART_FCR_TRIGGER_8,
    UART_FCR_TRIGGER_14,
    UART_FCR_XFIFOR,
    UART_IER,
    UART_IER_EDSSI,
    UART_IER_ELSI,
    UART_IER_ERBFI,
    UART_IER_ETBEI,
    UART_IIR,
    UART_LCR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_OE,
    UART_LSR_TEMT,
    UART_LSR_THRE,
    UART_MCR,
    UART_MCR_DTR,
    UART_MCR_LOOP,
    UART_MCR_OUT1,
    UART_MCR_OUT2,
    UART_MCR_RTS,
    UART_MSR,
    UART_MSR_CTS,
    UART_MSR_DCD,
    UART_MSR_DCTS,
    UART_MSR_DDCD,
    UART_MSR_DDSR,
    UART_MSR_DSR,
    UART_MSR_RI,
    UART_MSR_TERI,
    UART_RBR,
    UART_SCR,
    UART_THR,
    Serial16550A,
)
from iovirt.interrupt import RecordingInterrupt

IIR_NONE = 0x01
IIR_MS = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_CTI = 0x0C
IIR_FIFO = 0xC0


class Rig:
    """A UART with a recording IRQ line and a buffer backend, plus byte-access helpers."""

    def __init__(self) -> None:
        self.irq = RecordingInterrupt()
        self.backend = BufferBackend()
        self.uart = Serial16550A(self.irq, self.backend)

    def rd(self, offset: int) -> int:
        return self.uart.read(offset, 1)

    def wr(self, offset: int, value: int) -> None:
        self.uart.write(offset, 1, value)

    def send(self, data: bytes) -> None:
        for b in data:
            self.wr(UART_THR, b)

    def drain(self) -> bytes:
        out = bytearray()
        while self.rd(UART_LSR) & UART_LSR_DR:
            out.append(self.rd(UART_RBR))
        return bytes(out)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def all_registers(r: Rig) -> dict[str, int]:
    regs = {
        "RBR": r.rd(UART_RBR),
        "IER": r.rd(UART_IER),
        "IIR": r.rd(UART_IIR),
        "LCR": r.rd(UART_LCR),
        "MCR": r.rd(UART_MCR),
        "LSR": r.rd(UART_LSR),
        "MSR": r.rd(UART_MSR),
        "SCR": r.rd(UART_SCR),
    }
    lcr = regs["LCR"]
    r.wr(UART_LCR, lcr | UART_LCR_DLAB)
    regs["DLL"] = r.rd(UART_DLL)
    regs["DLM"] = r.rd(UART_DLM)
    r.wr(UART_LCR, lcr)
    return regs


POWER_ON = {
    "RBR": 0x00,
    "IER": 0x00,
    "IIR": 0x01,
    "LCR": 0x00,
    "MCR": 0x00,
    "LSR": 0x60,
    "MSR": 0xB0,  # DCD|DSR|CTS: a connected line
    "SCR": 0x00,
    "DLL": 12,  # 9600 baud
    "DLM": 0,
}


def test_power_on_values_of_every_register(rig: Rig) -> None:
    assert all_registers(rig) == POWER_ON
    assert rig.irq.level is False
    assert rig.uart.baud_rate == 9600


def test_reset_returns_every_register_to_power_on(rig: Rig) -> None:
    rig.wr(UART_LCR, UART_LCR_DLAB)
    rig.wr(UART_DLL, 1)
    rig.wr(UART_LCR, 0x1B)
    rig.wr(UART_IER, 0x0F)
    rig.wr(UART_FCR, UART_FCR_FIFOE | UART_FCR_TRIGGER_14)
    rig.wr(UART_MCR, UART_MCR_OUT2 | UART_MCR_LOOP | UART_MCR_DTR)
    rig.wr(UART_SCR, 0x77)
    rig.send(b"xyz")  # into the receiver through loopback
    rig.uart.receive(b"host input waiting in the backlog")
    assert rig.irq.level is True

    rig.uart.reset()

    assert rig.irq.level is False
    assert all_registers(rig) == POWER_ON
    rig.wr(UART_MCR, 0)
    assert not rig.rd(UART_LSR) & UART_LSR_DR  # FIFO and backlog are both gone


def test_divisor_latch_does_not_disturb_ier_or_thr(rig: Rig) -> None:
    rig.wr(UART_IER, UART_IER_ERBFI | UART_IER_ELSI)
    rig.wr(UART_LCR, UART_LCR_DLAB | 0x03)
    rig.wr(UART_DLL, 0x01)
    rig.wr(UART_DLM, 0x02)
    assert rig.rd(UART_DLL) == 0x01
    assert rig.rd(UART_DLM) == 0x02
    assert rig.backend.getvalue() == b""  # the DLL write transmitted nothing
    rig.wr(UART_LCR, 0x03)
    assert rig.rd(UART_IER) == UART_IER_ERBFI | UART_IER_ELSI
    assert rig.rd(UART_LCR) == 0x03
    assert rig.uart.baud_rate == 115200 // 0x0201
    rig.wr(UART_THR, ord("A"))
    assert rig.backend.getvalue() == b"A"


def test_thr_write_reaches_backend_and_counts(rig: Rig) -> None:
    rig.send(b"hello\r\n")
    assert rig.backend.getvalue() == b"hello\r\n"
    assert rig.uart.tx_bytes == 7


def test_without_backend_output_is_discarded_quietly() -> None:
    uart = Serial16550A(RecordingInterrupt())
    uart.write(UART_THR, 1, 0x41)
    assert uart.tx_bytes == 1
    assert uart.read(UART_LSR, 1) & UART_LSR_TEMT


def test_backend_oserror_is_counted_not_raised() -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError(5, "Input/output error")

    uart = Serial16550A(RecordingInterrupt(), Broken())
    uart.write(UART_THR, 1, 0x41)
    uart.write(UART_THR, 1, 0x42)
    assert uart.tx_errors == 2
    assert uart.read(UART_LSR, 1) & UART_LSR_THRE


def test_lsr_thre_and_temt_set_after_write(rig: Rig) -> None:
    assert rig.rd(UART_LSR) & (UART_LSR_THRE | UART_LSR_TEMT) == UART_LSR_THRE | UART_LSR_TEMT
    rig.wr(UART_THR, 0x55)
    assert rig.rd(UART_LSR) == UART_LSR_THRE | UART_LSR_TEMT


def test_thre_interrupt_raised_on_enable_and_cleared_by_iir_read(rig: Rig) -> None:
    rig.wr(UART_MCR, UART_MCR_OUT2)
    assert rig.irq.level is False
    rig.wr(UART_IER, UART_IER_ETBEI)
    assert rig.irq.level is True
    assert rig.rd(UART_IIR) == IIR_THRE
    assert rig.irq.level is False
    assert rig.rd(UART_IIR) == IIR_NONE
    # Rewriting IER with ETBEI still set does not re-raise it...
    rig.wr(UART_IER, UART_IER_ETBEI)
    assert rig.rd(UART_IIR) == IIR_NONE
    # ...but disabling and enabling again does (Linux's serial8250_do_startup THRE test).
    rig.wr(UART_IER, 0)
    rig.wr(UART_IER, UART_IER_ETBEI)
    assert rig.rd(UART_IIR) == IIR_THRE


def test_thre_interrupt_cleared_by_thr_write_and_reraised_with_an_edge(rig: Rig) -> None:
    rig.wr(UART_MCR, UART_MCR_OUT2)
    rig.wr(UART_IER, UART_IER_ETBEI)
    assert rig.irq.transitions == [True]
    rig.wr(UART_THR, ord("x"))
    # Low while the byte goes out, high again once THR is empty: a new edge per byte.
    assert rig.irq.transitions == [True, False, True]
    assert rig.rd(UART_IIR) == IIR_THRE
    rig.wr(UART_IER, 0)
    assert rig.irq.level is False


def test_thre_not_pending_after_iir_ack_when_disabled(rig: Rig) -> None:
    rig.wr(UART_MCR, UART_MCR_OUT2)
    rig.send(b"abc")  # ETBEI off: no THRE interrupt from transmitting
    assert rig.irq.transitions == []
    assert rig.rd(UART_IIR) == IIR_NONE


@pytest.mark.parametrize(
    ("trigger_bits", "level"),
    [
        (UART_FCR_TRIGGER_1, 1),
        (UART_FCR_TRIGGER_4, 4),
        (UART_FCR_TRIGGER_8, 8),
        (UART_FCR_TRIGGER_14, 14),
    ],
)
def test_rda_interrupt_at_fifo_trigger_level(rig: Rig, trigger_bits: int, level: int) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE | trigger_bits)
    rig.wr(UART_MCR, UART_MCR_OUT2)
    rig.wr(UART_IER, UART_IER_ERBFI)
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_NONE
    rig.uart.receive(b"x" * (level - 1))
    if level > 1:
        # Below the trigger with data present: the character timeout indication.
        assert rig.rd(UART_IIR) == IIR_FIFO | IIR_CTI
        assert rig.irq.level is True
    else:
        assert rig.irq.level is False
    rig.uart.receive(b"y")
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_RDA
    assert rig.irq.level is True
    rig.rd(UART_RBR)  # one below the trigger again
    expected = IIR_FIFO | (IIR_CTI if level > 1 else IIR_NONE)
    assert rig.rd(UART_IIR) == expected
    rig.drain()
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_NONE
    assert rig.irq.level is False


def test_rda_and_timeout_need_erbfi(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE | UART_FCR_TRIGGER_4)
    rig.wr(UART_MCR, UART_MCR_OUT2)
    rig.uart.receive(b"ab")
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_NONE
    rig.uart.receive(b"cd")
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_NONE
    assert rig.irq.level is False
    assert rig.rd(UART_LSR) & UART_LSR_DR


def test_rda_in_16450_mode_on_any_byte(rig: Rig) -> None:
    rig.wr(UART_MCR, UART_MCR_OUT2)
    rig.wr(UART_IER, UART_IER_ERBFI)
    rig.uart.receive(b"q")
    assert rig.rd(UART_IIR) == IIR_RDA  # no FIFO bits, no timeout
    assert rig.rd(UART_RBR) == ord("q")
    assert rig.rd(UART_IIR) == IIR_NONE


def test_fifo_holds_16_bytes_then_overrun_sets_oe_and_counts(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.wr(UART_MCR, UART_MCR_LOOP)
    rig.send(bytes(range(16)))
    assert rig.rd(UART_LSR) == UART_LSR_DR | UART_LSR_THRE | UART_LSR_TEMT
    assert rig.uart.overruns == 0
    rig.wr(UART_THR, 0xEE)  # the 17th character finds the FIFO full
    assert rig.uart.overruns == 1
    assert rig.rd(UART_LSR) & UART_LSR_OE
    assert not rig.rd(UART_LSR) & UART_LSR_OE  # cleared by the previous read
    assert rig.drain() == bytes(range(16))  # FIFO contents kept, the 17th lost


def test_overrun_in_16450_mode_overwrites_rbr(rig: Rig) -> None:
    rig.wr(UART_MCR, UART_MCR_LOOP)
    rig.send(b"ab")
    assert rig.uart.overruns == 1
    assert rig.rd(UART_LSR) & UART_LSR_OE
    assert rig.rd(UART_RBR) == ord("b")
    assert not rig.rd(UART_LSR) & UART_LSR_DR


def test_overrun_raises_line_status_interrupt_until_lsr_read(rig: Rig) -> None:
    rig.wr(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2)
    rig.wr(UART_IER, UART_IER_ELSI)
    rig.send(b"ab")
    assert rig.irq.level is True
    assert rig.rd(UART_IIR) == IIR_RLS
    rig.rd(UART_LSR)
    assert rig.rd(UART_IIR) == IIR_NONE
    assert rig.irq.level is False


def test_host_input_never_overruns(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    assert rig.uart.receive(b"z" * 40) == 40
    assert not rig.rd(UART_LSR) & UART_LSR_OE
    assert rig.uart.overruns == 0


@pytest.mark.parametrize("fifo", [True, False], ids=["fifo", "16450"])
def test_backlog_refills_fifo_as_guest_reads(rig: Rig, fifo: bool) -> None:
    if fifo:
        rig.wr(UART_FCR, UART_FCR_FIFOE)
    data = bytes((i * 7) & 0xFF for i in range(100))
    assert rig.uart.receive(data) == 100
    assert rig.drain() == data
    assert rig.uart.rx_bytes == 100
    assert rig.uart.rx_dropped == 0


def test_backlog_is_bounded_and_drops_are_counted(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    total = RX_BACKLOG_LIMIT + 1000
    kept = rig.uart.receive(b"p" * total)
    assert kept == RX_BACKLOG_LIMIT + 16  # the FIFO plus a full backlog
    assert rig.uart.rx_dropped == total - kept
    assert rig.uart.receive(b"more") == 0
    assert rig.uart.rx_dropped == total - kept + 4


def test_iir_priority_line_status_over_rda_over_thre_over_modem(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.wr(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2)  # CTS, DSR drop: MSR deltas
    rig.wr(UART_IER, UART_IER_ERBFI | UART_IER_ETBEI | UART_IER_ELSI | UART_IER_EDSSI)
    rig.send(bytes(17))  # full FIFO (RDA), overrun (RLS), THR empty (THRE)
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_RLS
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_RLS  # IIR reads do not clear line status
    rig.rd(UART_LSR)
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_RDA
    rig.drain()
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_THRE  # this read acknowledges THRE
    assert rig.irq.level is True  # modem status still pending
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_MS
    assert rig.rd(UART_MSR) == UART_MSR_DCD | UART_MSR_DCTS | UART_MSR_DDSR
    assert rig.rd(UART_IIR) == IIR_FIFO | IIR_NONE
    assert rig.irq.level is False


def test_out2_gates_the_irq_line(rig: Rig) -> None:
    rig.wr(UART_IER, UART_IER_ETBEI)  # THRE pending at once
    assert rig.irq.level is False  # ...but OUT2 is low
    rig.wr(UART_MCR, UART_MCR_OUT2)
    assert rig.irq.level is True
    rig.wr(UART_MCR, UART_MCR_DTR | UART_MCR_RTS)
    assert rig.irq.level is False
    assert rig.rd(UART_IIR) == IIR_THRE  # the interrupt was pending all along
    assert rig.irq.transitions == [True, False]


def test_loopback_round_trip_bypasses_backend(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.wr(UART_MCR, UART_MCR_LOOP)
    rig.send(b"ping")
    assert rig.backend.getvalue() == b""
    assert rig.drain() == b"ping"
    rig.wr(UART_MCR, 0)
    rig.send(b"out")
    assert rig.backend.getvalue() == b"out"
    assert not rig.rd(UART_LSR) & UART_LSR_DR


def test_loopback_disconnects_receiver_from_host_input(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.wr(UART_MCR, UART_MCR_LOOP)
    rig.uart.receive(b"host")
    assert not rig.rd(UART_LSR) & UART_LSR_DR
    rig.wr(UART_MCR, 0)
    assert rig.drain() == b"host"


@pytest.mark.parametrize(
    ("mcr", "msr_lines"),
    [
        (0, 0),
        (UART_MCR_RTS, UART_MSR_CTS),
        (UART_MCR_DTR, UART_MSR_DSR),
        (UART_MCR_OUT1, UART_MSR_RI),
        (UART_MCR_OUT2, UART_MSR_DCD),
        (0x0F, UART_MSR_CTS | UART_MSR_DSR | UART_MSR_RI | UART_MSR_DCD),
    ],
)
def test_loopback_msr_mirrors_mcr(rig: Rig, mcr: int, msr_lines: int) -> None:
    rig.wr(UART_MCR, UART_MCR_LOOP | mcr)
    assert rig.rd(UART_MSR) & 0xF0 == msr_lines


def test_msr_deltas_set_on_change_and_cleared_on_read(rig: Rig) -> None:
    assert rig.rd(UART_MSR) == 0xB0  # no deltas at power-on
    rig.wr(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT1 | UART_MCR_OUT2)
    # CTS and DSR went off, DCD stayed on, RI came on (a leading edge: no TERI).
    assert rig.rd(UART_MSR) == UART_MSR_DCD | UART_MSR_RI | UART_MSR_DCTS | UART_MSR_DDSR
    assert rig.rd(UART_MSR) == UART_MSR_DCD | UART_MSR_RI
    rig.wr(UART_MCR, UART_MCR_LOOP)  # RI off (trailing edge), DCD off
    assert rig.rd(UART_MSR) == UART_MSR_TERI | UART_MSR_DDCD
    rig.wr(UART_MCR, 0)  # back to the connected line
    assert rig.rd(UART_MSR) == 0xB0 | UART_MSR_DCTS | UART_MSR_DDSR | UART_MSR_DDCD
    assert rig.rd(UART_MSR) == 0xB0


def test_modem_status_interrupt(rig: Rig) -> None:
    rig.wr(UART_IER, UART_IER_EDSSI)
    rig.wr(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2 | UART_MCR_RTS)  # DSR drops
    assert rig.irq.level is True
    assert rig.rd(UART_IIR) == IIR_MS
    rig.rd(UART_MSR)
    assert rig.rd(UART_IIR) == IIR_NONE
    assert rig.irq.level is False


def test_fcr_rx_clear_empties_fifo(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.uart.receive(b"stale")
    assert rig.rd(UART_LSR) & UART_LSR_DR
    rig.wr(UART_FCR, UART_FCR_FIFOE | UART_FCR_RFIFOR | UART_FCR_XFIFOR)
    assert not rig.rd(UART_LSR) & UART_LSR_DR
    assert rig.rd(UART_IIR) & IIR_FIFO == IIR_FIFO  # the reset bits leave FIFOs enabled


def test_fcr_disabling_fifo_empties_it_and_ignores_other_bits(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.uart.receive(b"abc")
    rig.wr(UART_FCR, UART_FCR_TRIGGER_14)  # FIFOE clear: trigger bits are not programmed
    assert rig.rd(UART_IIR) == IIR_NONE
    assert not rig.rd(UART_LSR) & UART_LSR_DR


def test_scratch_register(rig: Rig) -> None:
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        rig.wr(UART_SCR, value)
        assert rig.rd(UART_SCR) == value


def test_wide_and_odd_accesses_are_served_as_bytes_and_counted(rig: Rig) -> None:
    rig.uart.write(UART_SCR, 2, 0x1234)
    assert rig.uart.read(UART_SCR, 4) == 0x34
    rig.wr(UART_LSR, 0x00)  # read-only: ignored
    rig.wr(UART_MSR, 0x00)
    assert rig.rd(UART_LSR) == UART_LSR_THRE | UART_LSR_TEMT
    assert rig.rd(UART_MSR) == 0xB0
    assert rig.uart.read(9, 1) == 0xFF
    rig.uart.write(9, 1, 0)
    assert rig.uart.bad_accesses == 6


def test_linux_8250_autoconfig_probe_finds_a_16550a(rig: Rig) -> None:
    """The register dance of drivers/tty/serial/8250/8250_port.c autoconfig()."""
    # Existence test through IER.
    scratch = rig.rd(UART_IER)
    rig.wr(UART_IER, 0)
    scratch2 = rig.rd(UART_IER) & 0x0F
    rig.wr(UART_IER, 0x0F)
    scratch3 = rig.rd(UART_IER) & 0x0F
    rig.wr(UART_IER, scratch)
    assert (scratch2, scratch3) == (0x00, 0x0F)

    # LCR and SCR read back what was written.
    for value in (0xBF, 0x03, 0x00):
        rig.wr(UART_LCR, value)
        assert rig.rd(UART_LCR) == value
    for value in (0x55, 0xAA):
        rig.wr(UART_SCR, value)
        assert rig.rd(UART_SCR) == value

    # Loopback test: MCR = LOOP | OUT2 | RTS must show DCD | CTS in MSR.
    save_mcr = rig.rd(UART_MCR)
    rig.wr(UART_MCR, 0x1A)
    status1 = rig.rd(UART_MSR) & 0xF0
    rig.wr(UART_MCR, save_mcr)
    assert status1 == 0x90

    # No EFR behind LCR=0xBF; with FIFOs on, IIR bits 6-7 read 3: a 16550A.
    rig.wr(UART_LCR, 0xBF)
    rig.wr(2, 0)  # EFR on a 16650; FCR here
    rig.wr(UART_LCR, 0)
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    assert rig.rd(UART_IIR) >> 6 == 3

    # autoconfig_16550a(): not an ST16C650V1 (offset 2 reads non-zero under DLAB)...
    rig.wr(UART_LCR, 0x80)
    assert rig.rd(2) != 0
    # ...not a TI16750 (IIR bit 5 never reports a 64-byte FIFO)...
    rig.wr(UART_FCR, UART_FCR_FIFOE | 0x20)
    status1 = rig.rd(UART_IIR) >> 5
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.wr(UART_LCR, 0)
    rig.wr(UART_FCR, UART_FCR_FIFOE | 0x20)
    status2 = rig.rd(UART_IIR) >> 5
    assert (status1, status2) == (6, 6)
    # ...and not an XScale (IER bit 6, UUE, does not stick).
    rig.wr(UART_IER, 0x40)
    assert rig.rd(UART_IER) == 0
    assert rig.uart.bad_accesses == 0


def test_linux_startup_sequence_sees_a_sane_uart(rig: Rig) -> None:
    """serial8250_do_startup(): clear FIFOs, read the status registers, THRE retest."""
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    rig.wr(UART_FCR, UART_FCR_FIFOE | UART_FCR_RFIFOR | UART_FCR_XFIFOR)
    rig.wr(UART_FCR, 0)
    assert rig.rd(UART_LSR) != 0xFF
    rig.rd(UART_RBR)
    rig.rd(UART_IIR)
    rig.rd(UART_MSR)
    rig.wr(UART_LCR, 0x03)
    rig.wr(UART_MCR, UART_MCR_OUT2 | UART_MCR_RTS | UART_MCR_DTR)
    lsr = rig.rd(UART_LSR)
    rig.wr(UART_IER, UART_IER_ETBEI)
    iir1 = rig.rd(UART_IIR)
    rig.wr(UART_IER, 0)
    rig.wr(UART_IER, UART_IER_ETBEI)
    iir = rig.rd(UART_IIR)
    rig.wr(UART_IER, 0)
    # The kernel flags UART_BUG_THRE if THRE is not re-asserted.
    assert lsr & UART_LSR_TEMT
    assert not iir1 & IIR_NONE
    assert not iir & IIR_NONE


def test_receive_from_another_thread_keeps_order(rig: Rig) -> None:
    rig.wr(UART_FCR, UART_FCR_FIFOE)
    chunks = [bytes([i]) * 50 for i in range(40)]
    expected = b"".join(chunks)

    def host() -> None:
        for chunk in chunks:
            rig.uart.receive(chunk)

    thread = threading.Thread(target=host)
    thread.start()
    got = bytearray()
    while len(got) < len(expected):
        if rig.rd(UART_LSR) & UART_LSR_DR:
            got.append(rig.rd(UART_RBR))
    thread.join()
    assert bytes(got) == expected


def test_registers_snapshot_is_a_copy(rig: Rig) -> None:
    rig.wr(UART_SCR, 9)
    snap = rig.uart.registers
    snap.scr = 1
    assert rig.rd(UART_SCR) == 9


# One guest or host action: (kind, offset, size, value, host bytes).
GuestOp = tuple[str, int, int, int, bytes]

sizes = st.sampled_from([1, 2, 4])
guest_ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(0, 7), sizes, st.just(0), st.just(b"")),
        st.tuples(
            st.just("write"), st.integers(0, 7), sizes, st.integers(0, 2**32 - 1), st.just(b"")
        ),
        st.tuples(st.just("receive"), st.just(0), st.just(1), st.just(0), st.binary(max_size=40)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(guest_ops)
def test_arbitrary_accesses_never_raise_and_irq_matches_iir(ops: list[GuestOp]) -> None:
    rig = Rig()
    for kind, offset, size, value, data in ops:
        if kind == "read":
            assert 0 <= rig.uart.read(offset, size) <= 0xFF
        elif kind == "write":
            rig.uart.write(offset, size, value)
        else:
            rig.uart.receive(data)
        # The line is high exactly when IIR reports a source and OUT2 opens the gate.
        level = rig.irq.level
        iir = rig.rd(UART_IIR)
        assert level == (not iir & IIR_NONE and bool(rig.rd(UART_MCR) & UART_MCR_OUT2))
        assert rig.rd(UART_LSR) & UART_LSR_TEMT
