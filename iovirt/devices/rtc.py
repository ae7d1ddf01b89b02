"""MC146818 real-time clock and CMOS RAM, as on every PC (ports 0x70 index, 0x71 data).

The guest reads the host's wall clock (UTC) through the time registers; a guest that sets
the clock moves only its own offset. Without this chip Linux's rtc_cmos probe and
``hwclock`` spin on an all-ones "update in progress" flag until they time out.

Not modelled (yet): the periodic, alarm and update-ended interrupts on IRQ 8. Status
register C therefore never reports a pending flag, and alarm registers only store values.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable

RTC_INDEX_PORT = 0x70
RTC_DATA_PORT = 0x71
RTC_PORTS = 2

# Register indices.
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32  # the IBM PC/AT location Linux and firmware use
CMOS_SIZE = 128

# Register A: update in progress (never set: the time is computed at read), 32.768 kHz.
REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26
# Register B.
REG_B_SET = 0x80  # updates halted while the guest sets the time
REG_B_DM_BINARY = 0x04  # data mode: binary instead of BCD
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H
# Register D: valid RAM and time (battery good).
REG_D_VRT = 0x80

INDEX_MASK = 0x7F  # bit 7 of the index port is the NMI mask, not part of the index

_TIME_REGS = (
    RTC_SECONDS,
    RTC_MINUTES,
    RTC_HOURS,
    RTC_DAY_OF_WEEK,
    RTC_DAY_OF_MONTH,
    RTC_MONTH,
    RTC_YEAR,
    RTC_CENTURY,
)


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """The chip behind ports 0x70/0x71. ``clock`` returns UNIX time (tests pass a fake)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self.nmi_disabled = False
        self.ram = bytearray(CMOS_SIZE)
        self.ram[RTC_REG_A] = REG_A_DEFAULT
        self.ram[RTC_REG_B] = REG_B_DEFAULT
        self.ram[RTC_REG_D] = REG_D_VRT
        self._offset = 0.0  # guest time minus host time, after the guest sets the clock

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0:
                return 0xFF  # the index port is write-only
            return self._read_register(self._index)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0:
                self._index = value & INDEX_MASK
                self.nmi_disabled = bool(value & 0x80)
                return
            self._write_register(self._index, value & 0xFF)

    def _now(self) -> time.struct_time:
        return time.gmtime(self._clock() + self._offset)

    def _encode(self, value: int) -> int:
        return value if self.ram[RTC_REG_B] & REG_B_DM_BINARY else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.ram[RTC_REG_B] & REG_B_DM_BINARY else _from_bcd(value)

    def _read_register(self, index: int) -> int:
        if index in _TIME_REGS and not self.ram[RTC_REG_B] & REG_B_SET:
            self._latch_time()
        if index == RTC_REG_C:
            value = self.ram[RTC_REG_C]
            self.ram[RTC_REG_C] = 0  # flags clear on read
            return value
        return self.ram[index]

    def _latch_time(self) -> None:
        """Copy the current time into the time registers in the guest's chosen format."""
        t = self._now()
        hour = t.tm_hour
        if self.ram[RTC_REG_B] & REG_B_24H:
            hour_reg = self._encode(hour)
        else:  # 12-hour mode: 1-12 with bit 7 for PM
            hour_reg = self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        self.ram[RTC_SECONDS] = self._encode(t.tm_sec % 60)
        self.ram[RTC_MINUTES] = self._encode(t.tm_min)
        self.ram[RTC_HOURS] = hour_reg
        self.ram[RTC_DAY_OF_WEEK] = self._encode((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        self.ram[RTC_DAY_OF_MONTH] = self._encode(t.tm_mday)
        self.ram[RTC_MONTH] = self._encode(t.tm_mon)
        self.ram[RTC_YEAR] = self._encode(t.tm_year % 100)
        self.ram[RTC_CENTURY] = self._encode(t.tm_year // 100)

    def _write_register(self, index: int, value: int) -> None:
        if index == RTC_REG_A:
            self.ram[index] = value & ~REG_A_UIP  # UIP is read-only
        elif index == RTC_REG_B:
            was_set = self.ram[RTC_REG_B] & REG_B_SET
            if value & REG_B_SET and not was_set:
                self._latch_time()  # updates stop: the registers hold the time of now
            self.ram[index] = value
            if was_set and not value & REG_B_SET:
                self._commit_time()  # the guest finished setting the clock
        elif index in (RTC_REG_C, RTC_REG_D):
            pass  # read-only status registers
        else:
            self.ram[index] = value
            if index in _TIME_REGS and not self.ram[RTC_REG_B] & REG_B_SET:
                self._commit_time()

    def _commit_time(self) -> None:
        """The time registers were written: move the guest's offset from host time."""
        try:
            hour_reg = self.ram[RTC_HOURS]
            if self.ram[RTC_REG_B] & REG_B_24H:
                hour = self._decode(hour_reg)
            else:
                hour = self._decode(hour_reg & 0x7F) % 12 + (12 if hour_reg & 0x80 else 0)
            year = self._decode(self.ram[RTC_CENTURY]) * 100 + self._decode(self.ram[RTC_YEAR])
            when = calendar.timegm(
                (
                    year,
                    self._decode(self.ram[RTC_MONTH]),
                    self._decode(self.ram[RTC_DAY_OF_MONTH]),
                    hour,
                    self._decode(self.ram[RTC_MINUTES]),
                    self._decode(self.ram[RTC_SECONDS]),
                    0,
                    0,
                    0,
                )
            )
        except (ValueError, OverflowError):
            return  # an impossible date: keep the old offset, as the chip keeps counting
        self._offset = when - self._clock()
