"""16550A UART: the PC's COM port, as a port-I/O bus device.

The model follows the National Semiconductor / TI PC16550D datasheet at the register level.
It sits on the port-I/O bus (COM1 is at 0x3f8, eight ports) and so only ever sees offsets 0..7.
Guest output goes to a char backend; host input arrives through :meth:`Serial16550A.receive`,
called from the host I/O thread.

There is no baud-rate clock. Transmission is instant: a byte written to THR reaches the backend
during the write, so LSR.THRE and LSR.TEMT are set again by the time the guest can look. The
receive FIFO (16 bytes, or a 1-byte holding register with FIFOs off) is refilled from a bounded
host-side backlog each time the guest reads RBR, so pasted text is not lost to overruns; that
backlog stands for characters still "on the wire".

Choices where the datasheet leaves room, or where having no clock forces one:

* Power-on values are the datasheet's: IER=0, IIR=0x01, FCR=0, LCR=0, MCR=0, LSR=0x60, SCR=0.
  MCR is 0 (not QEMU's 0x08): OUT2 starts low, so the IRQ line stays quiet until the guest
  sets OUT2, as on real hardware. The datasheet leaves the divisor latch undefined; we use 12
  (9600 baud from the 1.8432 MHz PC clock), which is what PC firmware programs.
* Outside loopback the modem lines read as a connected cable: DCD, DSR and CTS set, RI clear.
* Character timeout (IIR=0x0C) cannot be timed, so it is reported whenever FIFOs are enabled,
  ERBFI is set and the receive FIFO holds data below the trigger level. A guest that waits for
  the timeout therefore gets it at once, which is the earliest a real UART could give it.
* Loopback disconnects the receiver from the host line as the datasheet says: host input keeps
  arriving into the backlog but reaches the FIFO only after loopback ends.
* The IRQ line is ``(an interrupt is pending) and MCR.OUT2``, the PC's OUT2 gate, also in
  loopback (a real PC's OUT2 pin is forced inactive there; keeping the gate on the MCR bit lets
  loopback self-tests see interrupts and costs guests nothing).
* Reading an empty RBR returns 0 (a real chip returns a stale byte; 0 keeps fuzzing runs
  deterministic). Writes to LSR and MSR (factory-test only on the real chip) are ignored.
* Accesses wider than a byte are served as byte accesses (low byte of a write, zero-extended
  read); they and other odd accesses are counted in ``bad_accesses`` and logged, rate-limited.
* :meth:`Serial16550A.reset` also empties the host backlog: a rebooting guest should not be
  handed keystrokes typed at its previous life.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from typing import Protocol

from iovirt.interrupt import Interrupt

log = logging.getLogger(__name__)

# --- Register offsets from the base port. DLAB (LCR bit 7) turns offsets 0 and 1 into the
# --- divisor latch.
UART_RBR = 0  # receiver buffer register (read, DLAB=0)
UART_THR = 0  # transmitter holding register (write, DLAB=0)
UART_DLL = 0  # divisor latch, low byte (DLAB=1)
UART_IER = 1  # interrupt enable register (DLAB=0)
UART_DLM = 1  # divisor latch, high byte (DLAB=1)
UART_IIR = 2  # interrupt identification register (read)
UART_FCR = 2  # FIFO control register (write)
UART_LCR = 3  # line control register
UART_MCR = 4  # modem control register
UART_LSR = 5  # line status register
UART_MSR = 6  # modem status register
UART_SCR = 7  # scratch register
UART_NUM_PORTS = 8

# --- IER: interrupt enable
UART_IER_ERBFI = 0x01  # received data available (and character timeout)
UART_IER_ETBEI = 0x02  # transmitter holding register empty
UART_IER_ELSI = 0x04  # receiver line status
UART_IER_EDSSI = 0x08  # modem status
UART_IER_MASK = 0x0F  # bits 4-7 always read 0 on a 16550A (Linux probes this)

# --- IIR: interrupt identification (bits 0-3), in priority order, highest first
UART_IIR_NO_INT = 0x01  # bit 0 set: no interrupt pending
UART_IIR_RLS = 0x06  # receiver line status (OE/PE/FE/BI); cleared by reading LSR
UART_IIR_RDA = 0x04  # received data available; cleared when the FIFO drops below trigger
UART_IIR_CTI = 0x0C  # character timeout; cleared by reading RBR
UART_IIR_THRE = 0x02  # THR empty; cleared by reading IIR (if the source) or writing THR
UART_IIR_MS = 0x00  # modem status; cleared by reading MSR
UART_IIR_FIFO_ENABLED = 0xC0  # bits 6-7: both set when FCR.FIFOE is set

# --- FCR: FIFO control (write-only)
UART_FCR_FIFOE = 0x01  # enable FIFOs; the other bits are programmed only while this is set
UART_FCR_RFIFOR = 0x02  # receiver FIFO reset (self-clearing)
UART_FCR_XFIFOR = 0x04  # transmitter FIFO reset (self-clearing)
UART_FCR_DMA_MODE = 0x08  # RXRDY/TXRDY pin mode; no pins here, only remembered
UART_FCR_TRIGGER_MASK = 0xC0  # receiver trigger level
UART_FCR_TRIGGER_1 = 0x00
UART_FCR_TRIGGER_4 = 0x40
UART_FCR_TRIGGER_8 = 0x80
UART_FCR_TRIGGER_14 = 0xC0

# --- LCR: line control
UART_LCR_WLS_MASK = 0x03  # word length select
UART_LCR_STB = 0x04  # number of stop bits
UART_LCR_PEN = 0x08  # parity enable
UART_LCR_EPS = 0x10  # even parity select
UART_LCR_STICK = 0x20  # stick parity
UART_LCR_SBC = 0x40  # set break (no line to break: ignored)
UART_LCR_DLAB = 0x80  # divisor latch access bit

# --- MCR: modem control
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08  # on a PC, gates the UART's interrupt onto the ISA IRQ line
UART_MCR_LOOP = 0x10
UART_MCR_MASK = 0x1F  # bits 5-7 always read 0 on a 16550A

# --- LSR: line status
UART_LSR_DR = 0x01  # data ready
UART_LSR_OE = 0x02  # overrun error; cleared by reading LSR
UART_LSR_PE = 0x04  # parity error (never set: no line noise here)
UART_LSR_FE = 0x08  # framing error (never set)
UART_LSR_BI = 0x10  # break interrupt (never set)
UART_LSR_THRE = 0x20  # transmitter holding register empty
UART_LSR_TEMT = 0x40  # transmitter empty (THR and shift register)
UART_LSR_RXFE = 0x80  # error in receiver FIFO (never set: PE/FE/BI never are)

# --- MSR: modem status. The low nibble holds deltas (cleared by reading MSR), the high
# --- nibble the current line states.
UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04  # trailing edge of RI: RI went from on to off
UART_MSR_DDCD = 0x08
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
UART_MSR_DELTA_MASK = 0x0F

# What the modem lines read outside loopback: a cable with the far end present.
UART_MSR_CONNECTED = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS

UART_FIFO_SIZE = 16
UART_DEFAULT_DIVISOR = 12  # 115200 / 12 = 9600 baud
UART_BASE_BAUD = 115200  # 1.8432 MHz clock / 16

# Trigger level per FCR bits 6-7.
_TRIGGER_LEVELS = {
    UART_FCR_TRIGGER_1: 1,
    UART_FCR_TRIGGER_4: 4,
    UART_FCR_TRIGGER_8: 8,
    UART_FCR_TRIGGER_14: 14,
}

# Host input beyond the FIFO waits here; a paste bigger than this is cut (and counted).
RX_BACKLOG_LIMIT = 64 * 1024

# Odd guest accesses get this many log lines per device before we go quiet.
_MAX_BAD_ACCESSES_LOGGED = 8


class CharOutput(Protocol):
    """The part of a char backend the UART uses: guest output.

    Every :class:`iovirt.backends.char.CharBackend` satisfies it; opening and closing the
    backend belongs to whoever wires the device up, not to the device.
    """

    def write(self, data: bytes) -> None:
        """Send guest output to the host; never blocks without bound."""
        ...


@dataclasses.dataclass
class UartRegisters:
    """Guest-visible register state. The defaults are the power-on values."""

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    fcr: int = 0  # FIFOE, DMA mode and trigger bits as last programmed
    scr: int = 0
    divisor: int = UART_DEFAULT_DIVISOR
    overrun: bool = False  # LSR.OE, sticky until LSR is read
    thre_pending: bool = False  # the THRE interrupt is latched (see _write_ier)
    msr_lines: int = UART_MSR_CONNECTED  # MSR bits 4-7
    msr_delta: int = 0  # MSR bits 0-3


class Serial16550A:
    """A 16550A UART with a 16-byte receive FIFO, driving one interrupt line.

    ``backend`` receives guest output (``None``: the line is unplugged and output is
    discarded). Feed host input with :meth:`receive`. ``read``, ``write``, ``receive`` and
    ``reset`` may be called from any thread.
    """

    def __init__(self, irq: Interrupt, backend: CharOutput | None = None) -> None:
        self._irq = irq
        self._backend = backend
        # One lock for all state: vCPU threads do register accesses while the host I/O thread
        # delivers input. The IRQ line and the backend are driven under it too, so the line
        # level and output order always match the register state that produced them.
        self._lock = threading.Lock()
        self._regs = UartRegisters()
        self._rx_fifo: deque[int] = deque()
        self._rx_backlog: deque[int] = deque()

        self.tx_bytes = 0  # bytes the guest transmitted (to the backend or into loopback)
        self.rx_bytes = 0  # host bytes accepted by receive()
        self.rx_dropped = 0  # host bytes dropped because the backlog was full
        self.overruns = 0  # characters lost to a full receiver (LSR.OE events)
        self.tx_errors = 0  # backend writes that raised OSError
        self.bad_accesses = 0  # odd-sized accesses, writes to read-only registers

        with self._lock:
            self._update_irq()

    # ------------------------------------------------------------------ host side

    def reset(self) -> None:
        """Return to the power-on state (see the module docstring for the values)."""
        with self._lock:
            self._regs = UartRegisters()
            self._rx_fifo.clear()
            self._rx_backlog.clear()
            self._update_irq()

    def receive(self, data: bytes) -> int:
        """Host input arriving on the line. Returns how many bytes were kept (the rest
        overflowed the backlog and is counted in ``rx_dropped``)."""
        with self._lock:
            rest = data
            if not self._rx_backlog and not self._loopback:
                # Nothing queued ahead of us: the FIFO's free room takes bytes directly.
                room = self._fifo_capacity - len(self._rx_fifo)
                self._rx_fifo.extend(rest[:room])
                rest = rest[room:]
            room = RX_BACKLOG_LIMIT - len(self._rx_backlog)
            self._rx_backlog.extend(rest[:room])
            dropped = max(len(rest) - room, 0)
            kept = len(data) - dropped
            self.rx_bytes += kept
            self.rx_dropped += dropped
            self._update_irq()
        if dropped:
            log.debug("serial: receive backlog full, dropped %d bytes", dropped)
        return kept

    @property
    def baud_rate(self) -> int:
        """The baud rate the guest programmed (0 while the divisor is 0)."""
        divisor = self._regs.divisor
        return UART_BASE_BAUD // divisor if divisor else 0

    @property
    def registers(self) -> UartRegisters:
        """A copy of the register state, for tests and debugging."""
        with self._lock:
            return dataclasses.replace(self._regs)

    # ------------------------------------------------------------------ bus device

    def read(self, offset: int, size: int) -> int:
        """A guest read at ``offset`` (0..7). Wider reads are served as byte reads."""
        with self._lock:
            if size != 1:
                self._bad_access(f"{size}-byte read at offset {offset}")
            return self._read_byte(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write at ``offset`` (0..7). Wider writes use the low byte."""
        with self._lock:
            if size != 1:
                self._bad_access(f"{size}-byte write at offset {offset}")
            self._write_byte(offset, value & 0xFF)

    # ------------------------------------------------------------------ registers

    def _read_byte(self, offset: int) -> int:
        regs = self._regs
        dlab = bool(regs.lcr & UART_LCR_DLAB)
        if offset == UART_RBR:
            # DLL or RBR
            if dlab:
                return regs.divisor & 0xFF
            return self._read_rbr()
        if offset == UART_IER:
            # DLM or IER
            if dlab:
                return (regs.divisor >> 8) & 0xFF
            return regs.ier
        if offset == UART_IIR:
            return self._read_iir()
        if offset == UART_LCR:
            return regs.lcr
        if offset == UART_MCR:
            return regs.mcr
        if offset == UART_LSR:
            return self._read_lsr()
        if offset == UART_MSR:
            return self._read_msr()
        if offset == UART_SCR:
            return regs.scr
        # Only reachable if the device is registered with a range wider than 8 ports.
        self._bad_access(f"read at offset {offset} outside the UART")
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        regs = self._regs
        dlab = bool(regs.lcr & UART_LCR_DLAB)
        if offset == UART_THR:
            # DLL or THR
            if dlab:
                regs.divisor = (regs.divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif offset == UART_IER:
            # DLM or IER
            if dlab:
                regs.divisor = (regs.divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == UART_FCR:
            self._write_fcr(value)
        elif offset == UART_LCR:
            # Only DLAB matters to the model; the framing bits and break are remembered for
            # the guest to read back (there is no wire to apply them to).
            regs.lcr = value
        elif offset == UART_MCR:
            self._write_mcr(value)
        elif offset == UART_LSR:
            # LSR writes exist only for factory testing on the real chip.
            self._bad_access(f"write {value:#04x} to read-only LSR")
        elif offset == UART_MSR:
            self._bad_access(f"write {value:#04x} to read-only MSR")
        elif offset == UART_SCR:
            regs.scr = value
        else:
            self._bad_access(f"write at offset {offset} outside the UART")

    def _read_rbr(self) -> int:
        # RBR: taking a byte makes room for the next one from the host backlog.
        value = self._rx_fifo.popleft() if self._rx_fifo else 0
        self._refill_rx()
        self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        # THR: writing clears a pending THRE interrupt. The line is driven low before the
        # byte goes out and high again once THR is empty, so an edge-triggered PIC sees a
        # fresh edge for every byte, as it would from a real UART.
        regs = self._regs
        regs.thre_pending = False
        self._update_irq()
        self.tx_bytes += 1
        if regs.mcr & UART_MCR_LOOP:
            self._loopback_receive(value)
        elif self._backend is not None:
            try:
                self._backend.write(bytes((value,)))
            except OSError as err:
                self.tx_errors += 1
                if self.tx_errors == 1:
                    log.warning("serial: backend write failed: %s (further errors counted)", err)
        # Transmission is instant: THR and the shift register are empty again already.
        regs.thre_pending = bool(regs.ier & UART_IER_ETBEI)
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        # IER. Enabling ETBEI while THR is empty raises THRE at once: Linux's 8250 driver
        # starts transmission that way and its startup test checks that a second enable
        # re-raises it. Disabling ETBEI forgets a pending THRE.
        regs = self._regs
        old = regs.ier
        regs.ier = value & UART_IER_MASK
        if not regs.ier & UART_IER_ETBEI:
            regs.thre_pending = False
        elif not old & UART_IER_ETBEI:
            regs.thre_pending = True  # THR is always empty between accesses
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        # FCR. Switching FIFOs on or off empties them; the other bits count only when the
        # same write sets FIFOE (datasheet: FCR0 must be 1 for them to be programmed).
        regs = self._regs
        was_enabled = bool(regs.fcr & UART_FCR_FIFOE)
        if not value & UART_FCR_FIFOE:
            if was_enabled:
                self._rx_fifo.clear()
            regs.fcr = 0
        else:
            if not was_enabled or value & UART_FCR_RFIFOR:
                self._rx_fifo.clear()
            # XFIFOR: transmission is instant, the transmit FIFO is always empty.
            regs.fcr = value & (UART_FCR_FIFOE | UART_FCR_DMA_MODE | UART_FCR_TRIGGER_MASK)
        self._refill_rx()
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        # MCR. In loopback the modem inputs are wired to our own outputs, so changing
        # LOOP or the outputs changes what MSR sees, with deltas as for a real line change.
        regs = self._regs
        regs.mcr = value & UART_MCR_MASK
        self._set_msr_lines(self._current_msr_lines())
        self._refill_rx()  # leaving loopback reconnects the receiver to the host line
        self._update_irq()

    def _read_iir(self) -> int:
        # IIR. Reading it acknowledges THRE when THRE is what it reports.
        source = self._pending_source()
        if source == UART_IIR_THRE:
            self._regs.thre_pending = False
            self._update_irq()
        return source | (UART_IIR_FIFO_ENABLED if self._fifo_enabled else 0)

    def _read_lsr(self) -> int:
        # LSR. Reading clears OE and with it the receiver line status interrupt.
        regs = self._regs
        value = UART_LSR_THRE | UART_LSR_TEMT
        if self._rx_fifo:
            value |= UART_LSR_DR
        if regs.overrun:
            value |= UART_LSR_OE
            regs.overrun = False
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        # MSR. Reading clears the deltas and with them the modem status interrupt.
        regs = self._regs
        value = regs.msr_lines | regs.msr_delta
        if regs.msr_delta:
            regs.msr_delta = 0
            self._update_irq()
        return value

    # ------------------------------------------------------------------ internals

    @property
    def _fifo_enabled(self) -> bool:
        return bool(self._regs.fcr & UART_FCR_FIFOE)

    @property
    def _fifo_capacity(self) -> int:
        return UART_FIFO_SIZE if self._fifo_enabled else 1

    @property
    def _loopback(self) -> bool:
        return bool(self._regs.mcr & UART_MCR_LOOP)

    @property
    def _trigger_level(self) -> int:
        return _TRIGGER_LEVELS[self._regs.fcr & UART_FCR_TRIGGER_MASK]

    def _current_msr_lines(self) -> int:
        mcr = self._regs.mcr
        if not mcr & UART_MCR_LOOP:
            return UART_MSR_CONNECTED
        lines = 0
        if mcr & UART_MCR_RTS:
            lines |= UART_MSR_CTS
        if mcr & UART_MCR_DTR:
            lines |= UART_MSR_DSR
        if mcr & UART_MCR_OUT1:
            lines |= UART_MSR_RI
        if mcr & UART_MCR_OUT2:
            lines |= UART_MSR_DCD
        return lines

    def _set_msr_lines(self, lines: int) -> None:
        regs = self._regs
        changed = regs.msr_lines ^ lines
        if changed & UART_MSR_CTS:
            regs.msr_delta |= UART_MSR_DCTS
        if changed & UART_MSR_DSR:
            regs.msr_delta |= UART_MSR_DDSR
        if changed & UART_MSR_DCD:
            regs.msr_delta |= UART_MSR_DDCD
        if regs.msr_lines & UART_MSR_RI and not lines & UART_MSR_RI:
            regs.msr_delta |= UART_MSR_TERI
        regs.msr_lines = lines

    def _loopback_receive(self, value: int) -> None:
        # A character reaching a full receiver is an overrun. With FIFOs on, the FIFO keeps
        # its contents and the new character is lost; in 16450 mode it overwrites RBR.
        if len(self._rx_fifo) < self._fifo_capacity:
            self._rx_fifo.append(value)
            return
        if not self._fifo_enabled:
            self._rx_fifo[-1] = value
        self._regs.overrun = True
        self.overruns += 1

    def _refill_rx(self) -> None:
        if self._loopback:
            return
        room = self._fifo_capacity - len(self._rx_fifo)
        while room > 0 and self._rx_backlog:
            self._rx_fifo.append(self._rx_backlog.popleft())
            room -= 1

    def _pending_source(self) -> int:
        """The highest-priority interrupt source, as IIR bits 0-3."""
        regs = self._regs
        ier = regs.ier
        if ier & UART_IER_ELSI and regs.overrun:
            return UART_IIR_RLS
        if ier & UART_IER_ERBFI and self._rx_fifo:
            if not self._fifo_enabled or len(self._rx_fifo) >= self._trigger_level:
                return UART_IIR_RDA
            return UART_IIR_CTI
        if ier & UART_IER_ETBEI and regs.thre_pending:
            return UART_IIR_THRE
        if ier & UART_IER_EDSSI and regs.msr_delta:
            return UART_IIR_MS
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        # PC boards route the UART's INTRPT pin through a buffer enabled by OUT2; Linux
        # sets OUT2 to open the gate and firmware that polls leaves it shut.
        pending = self._pending_source() != UART_IIR_NO_INT
        self._irq.set_level(pending and bool(self._regs.mcr & UART_MCR_OUT2))

    def _bad_access(self, what: str) -> None:
        self.bad_accesses += 1
        if self.bad_accesses <= _MAX_BAD_ACCESSES_LOGGED:
            log.warning("serial: guest %s", what)
            if self.bad_accesses == _MAX_BAD_ACCESSES_LOGGED:
                log.warning(
                    "serial: %d odd guest accesses; counting silently from now on",
                    self.bad_accesses,
                )
