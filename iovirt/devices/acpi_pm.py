"""The hardware-reduced ACPI sleep registers: how a guest powers the VM off.

A hardware-reduced ACPI platform (ACPI 6.x, 4.1) has no PM1 blocks; the FADT points
instead at an 8-bit SLEEP_CONTROL_REG and SLEEP_STATUS_REG (4.8.3.7). To enter S5 the OS
looks up ``\\_S5``'s SLP_TYP value in the DSDT, clears WAK_STS in the status register, then
writes ``SLP_TYPx << 2 | SLP_EN`` to the control register (Linux: acpi_hw_extended_sleep).
This device answers the two ports: control at offset 0, status at offset 1, and calls
``on_poweroff`` when the guest asks for S5.

The status register reads 0: after a power-off request the OS spins reading it until
WAK_STS, which never comes, so the guest cannot run on past power-off while the VMM stops it.
Other sleep states are not offered in the DSDT; a request for one is counted and ignored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# Register offsets from the port base (the FADT's two GAS entries, 1 byte each).
SLEEP_CONTROL = 0
SLEEP_STATUS = 1
ACPI_SLEEP_REGS_SIZE = 2
DEFAULT_SLEEP_PORT = 0x600  # where the board puts them unless told otherwise

# SLEEP_CONTROL_REG bits (ACPI 6.x, 4.8.3.7.1).
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
# SLEEP_STATUS_REG bits (4.8.3.7.2).
WAK_STS = 1 << 7

# The SLP_TYP value of S5 (soft off); the DSDT's \_S5 package hands the OS the same number.
SLP_TYP_S5 = 5

_MAX_LOGGED = 8


class AcpiSleepRegisters:
    """SLEEP_CONTROL (offset 0) and SLEEP_STATUS (offset 1); see the module docstring."""

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._lock = threading.Lock()
        self.poweroff_requested = False
        self.ignored_requests = 0  # SLP_EN with a sleep type other than S5

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        # A wider access covers both registers, one byte each.
        for i in range(size):
            if offset + i == SLEEP_CONTROL:
                self._write_control(value >> (8 * i) & 0xFF)
            # SLEEP_STATUS: writing WAK_STS clears it; it is never set, so nothing to do.

    def _write_control(self, value: int) -> None:
        if not value & SLP_EN:
            return
        sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        with self._lock:
            if sleep_type != SLP_TYP_S5:
                self.ignored_requests += 1
                if self.ignored_requests <= _MAX_LOGGED:
                    log.warning("acpi: guest asked for sleep type %d; only S5 exists", sleep_type)
                return
            first = not self.poweroff_requested
            self.poweroff_requested = True
        if first:
            log.info("acpi: guest requested power-off (S5)")
        # Every request is passed on: stopping the VM twice is harmless, missing one is not.
        self._on_poweroff()
