"""CMOS RTC register semantics at the port offsets (index at 0, data at 1)."""

from __future__ import annotations

import calendar

from iovirt.devices.rtc import (
    REG_A_UIP,
    REG_B_24H,
    REG_B_DM_BINARY,
    REG_B_SET,
    REG_D_VRT,
    RTC_CENTURY,
    RTC_DAY_OF_MONTH,
    RTC_DAY_OF_WEEK,
    RTC_HOURS,
    RTC_MINUTES,
    RTC_MONTH,
    RTC_REG_A,
    RTC_REG_B,
    RTC_REG_C,
    RTC_REG_D,
    RTC_SECONDS,
    RTC_YEAR,
    CmosRtc,
)

# 2026-11-25 13:42:07 UTC, a Wednesday
NOW = calendar.timegm((2026, 11, 25, 13, 42, 7, 0, 0, 0))


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def reg(rtc: CmosRtc, index: int) -> int:
    rtc.write(0, 1, index)
    return rtc.read(1, 1)


def set_reg(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(0, 1, index)
    rtc.write(1, 1, value)


def test_time_reads_back_in_bcd_24h_by_default() -> None:
    rtc = CmosRtc(Clock(NOW))
    assert reg(rtc, RTC_REG_B) == REG_B_24H
    got = [
        reg(rtc, r)
        for r in (
            RTC_SECONDS,
            RTC_MINUTES,
            RTC_HOURS,
            RTC_DAY_OF_WEEK,
            RTC_DAY_OF_MONTH,
            RTC_MONTH,
            RTC_YEAR,
            RTC_CENTURY,
        )
    ]
    assert got == [0x07, 0x42, 0x13, 0x04, 0x25, 0x11, 0x26, 0x20]


def test_binary_and_12_hour_modes() -> None:
    rtc = CmosRtc(Clock(NOW))
    set_reg(rtc, RTC_REG_B, REG_B_DM_BINARY)  # binary, 12-hour
    assert reg(rtc, RTC_MINUTES) == 42
    assert reg(rtc, RTC_HOURS) == 0x80 | 1  # 1 PM


def test_status_registers() -> None:
    rtc = CmosRtc(Clock(NOW))
    assert reg(rtc, RTC_REG_A) & REG_A_UIP == 0  # never "update in progress"
    assert reg(rtc, RTC_REG_D) == REG_D_VRT
    assert reg(rtc, RTC_REG_C) == 0
    set_reg(rtc, RTC_REG_D, 0)
    assert reg(rtc, RTC_REG_D) == REG_D_VRT  # read-only
    set_reg(rtc, RTC_REG_A, 0xA6)
    assert reg(rtc, RTC_REG_A) == 0x26  # UIP cannot be written


def test_guest_setting_the_clock_moves_only_its_offset() -> None:
    clock = Clock(NOW)
    rtc = CmosRtc(clock)
    set_reg(rtc, RTC_REG_B, REG_B_24H | REG_B_SET)
    set_reg(rtc, RTC_HOURS, 0x01)  # 01:42:07, twelve hours earlier, same day
    set_reg(rtc, RTC_REG_B, REG_B_24H)
    assert reg(rtc, RTC_HOURS) == 0x01
    clock.t += 60
    assert reg(rtc, RTC_MINUTES) == 0x43  # and it keeps running


def test_nvram_bytes_and_index_nmi_bit() -> None:
    rtc = CmosRtc(Clock(NOW))
    rtc.write(0, 1, 0x80 | 0x40)  # NMI disabled, index 0x40
    rtc.write(1, 1, 0x5A)
    assert rtc.nmi_disabled
    assert reg(rtc, 0x40) == 0x5A
    assert rtc.read(0, 1) == 0xFF  # the index port reads nothing back
