"""Tests of the port-I/O/MMIO bus: registration, overlap refusal, dispatch at offsets,
unclaimed accesses (all-ones, counted, logged once per address up to a cap) and lookup.

Devices here are ``RecordingDevice``: they answer reads with a fixed value and record
every access as ``(op, offset, size, value)``, so each test sees exactly what a device
model would have seen.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.bus import Bus, BusDevice, BusRange
from iovirt.errors import BusError, IovirtError

LOGGER = "iovirt.bus.bus"
PIO_LIMIT = 0x1_0000
CAP = 64  # distinct unclaimed addresses logged per bus


class RecordingDevice:
    """A bus device that records every access and answers reads with ``read_value``."""

    def __init__(self, read_value: int = 0) -> None:
        self.read_value = read_value
        self.accesses: list[tuple[str, int, int, int | None]] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("read", offset, size, None))
        return self.read_value

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("write", offset, size, value))


def all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


@pytest.fixture
def bus() -> Bus:
    return Bus("pio", PIO_LIMIT)


def test_recording_device_is_a_bus_device() -> None:
    device: BusDevice = RecordingDevice()  # checked by mypy against the Protocol
    assert device.read(0, 1) == 0


# -- registration and dispatch -----------------------------------------------------------


def test_register_returns_the_range(bus: Bus) -> None:
    dev = RecordingDevice()
    r = bus.register(0x3F8, 8, dev, "serial0")
    assert (r.base, r.size, r.end, r.device, r.name) == (0x3F8, 8, 0x400, dev, "serial0")
    assert bus.ranges == (r,)
    assert bus.find(0x3F8) is r


def test_dispatch_passes_offset_relative_to_base(bus: Bus) -> None:
    dev = RecordingDevice(read_value=0x42)
    bus.register(0x3F8, 8, dev, "serial0")
    assert bus.read(0x3F8, 1) == 0x42
    assert bus.read(0x3FF, 1) == 0x42
    bus.write(0x3FA, 1, 0x05)
    bus.write(0x3FC, 2, 0x1234)
    assert dev.accesses == [
        ("read", 0, 1, None),
        ("read", 7, 1, None),
        ("write", 2, 1, 0x05),
        ("write", 4, 2, 0x1234),
    ]
    assert bus.unclaimed_reads == bus.unclaimed_writes == 0


def test_dispatch_at_the_first_and_last_access_that_fits(bus: Bus) -> None:
    dev = RecordingDevice(read_value=0x1122_3344)
    bus.register(0x100, 0x10, dev, "dev")
    assert bus.read(0x100, 4) == 0x1122_3344
    assert bus.read(0x10C, 4) == 0x1122_3344
    bus.write(0x108, 8, 0x0102_0304_0506_0708)
    assert dev.accesses == [
        ("read", 0x0, 4, None),
        ("read", 0xC, 4, None),
        ("write", 0x8, 8, 0x0102_0304_0506_0708),
    ]


def test_accesses_just_outside_a_range_do_not_reach_it(bus: Bus) -> None:
    dev = RecordingDevice(read_value=0)
    bus.register(0x100, 0x10, dev, "dev")
    assert bus.read(0xFF, 1) == 0xFF
    assert bus.read(0x110, 1) == 0xFF
    bus.write(0xFF, 1, 0)
    bus.write(0x110, 1, 0)
    assert dev.accesses == []
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (2, 2)


def test_mmio_bus_with_addresses_above_4g() -> None:
    mmio = Bus("mmio", 1 << 64)
    dev = RecordingDevice(read_value=0xDEAD_BEEF)
    mmio.register(0xFE00_0000_0000, 0x1000, dev, "bar0")
    assert mmio.read(0xFE00_0000_0FFC, 4) == 0xDEAD_BEEF
    mmio.write(0xFE00_0000_0010, 4, 1)
    assert dev.accesses == [("read", 0xFFC, 4, None), ("write", 0x10, 4, 1)]
    assert mmio.find(0xFDFF_FFFF_FFFF) is None


# -- overlap detection ---------------------------------------------------------------------

# The existing range is [0x100, 0x110), named "first".
OVERLAPS = {
    "same_range": (0x100, 0x10),
    "same_base_shorter": (0x100, 0x1),
    "same_base_longer": (0x100, 0x20),
    "partial_left": (0xF8, 0x10),  # [0xF8, 0x108)
    "partial_left_by_one_byte": (0xF0, 0x11),  # [0xF0, 0x101)
    "partial_right": (0x108, 0x10),  # [0x108, 0x118)
    "partial_right_by_one_byte": (0x10F, 0x10),  # [0x10F, 0x11F)
    "contained": (0x104, 0x4),
    "contained_last_byte": (0x10F, 0x1),
    "containing": (0xF0, 0x40),
}


@pytest.mark.parametrize(("base", "size"), OVERLAPS.values(), ids=OVERLAPS.keys())
def test_overlap_is_refused_naming_both_devices(bus: Bus, base: int, size: int) -> None:
    first = bus.register(0x100, 0x10, RecordingDevice(), "first")
    with pytest.raises(BusError) as err:
        bus.register(base, size, RecordingDevice(), "second")
    assert isinstance(err.value, IovirtError)
    assert "first" in str(err.value)
    assert "second" in str(err.value)
    # The refused registration left nothing behind.
    assert bus.ranges == (first,)
    for addr in range(0xE0, 0x140):
        assert bus.find(addr) is (first if 0x100 <= addr < 0x110 else None)


@pytest.mark.parametrize(("base", "size"), OVERLAPS.values(), ids=OVERLAPS.keys())
def test_overlap_is_refused_among_many_ranges(bus: Bus, base: int, size: int) -> None:
    # The same overlaps with neighbours on both sides, registered in an awkward order.
    bus.register(0x200, 0x10, RecordingDevice(), "right")
    bus.register(0x100, 0x10, RecordingDevice(), "first")
    bus.register(0x0, 0x10, RecordingDevice(), "left")
    with pytest.raises(BusError, match="second") as err:
        bus.register(base, size, RecordingDevice(), "second")
    assert "first" in str(err.value)
    assert [r.name for r in bus.ranges] == ["left", "first", "right"]


def test_range_covering_several_ranges_is_refused(bus: Bus) -> None:
    for base in (0x100, 0x200, 0x300):
        bus.register(base, 0x10, RecordingDevice(), f"dev{base:x}")
    with pytest.raises(BusError, match="big"):
        bus.register(0x80, 0x400, RecordingDevice(), "big")
    with pytest.raises(BusError, match="big"):
        bus.register(0x108, 0x1F8, RecordingDevice(), "big")
    assert len(bus.ranges) == 3


def test_adjacent_ranges_are_allowed(bus: Bus) -> None:
    middle, left, right = RecordingDevice(1), RecordingDevice(2), RecordingDevice(3)
    bus.register(0x100, 0x10, middle, "middle")
    bus.register(0x110, 0x10, right, "right")  # starts at middle's end
    bus.register(0xF0, 0x10, left, "left")  # ends at middle's base
    assert [r.name for r in bus.ranges] == ["left", "middle", "right"]
    assert bus.read(0xFF, 1) == 2
    assert bus.read(0x100, 1) == 1
    assert bus.read(0x10F, 1) == 1
    assert bus.read(0x110, 1) == 3
    assert left.accesses == [("read", 0xF, 1, None)]
    assert middle.accesses == [("read", 0x0, 1, None), ("read", 0xF, 1, None)]
    assert right.accesses == [("read", 0x0, 1, None)]


@pytest.mark.parametrize("size", [0, -1, -0x10])
def test_empty_range_is_refused(bus: Bus, size: int) -> None:
    with pytest.raises(BusError, match="empty"):
        bus.register(0x100, size, RecordingDevice(), "nothing")
    assert bus.ranges == ()


@pytest.mark.parametrize(
    ("base", "size"),
    [
        pytest.param(-1, 2, id="negative_base"),
        pytest.param(-0x10, 0x8, id="entirely_negative"),
        pytest.param(PIO_LIMIT - 1, 2, id="one_past_limit"),
        pytest.param(PIO_LIMIT, 1, id="starting_at_limit"),
        pytest.param(0, PIO_LIMIT + 1, id="longer_than_bus"),
    ],
)
def test_range_outside_the_bus_is_refused(bus: Bus, base: int, size: int) -> None:
    with pytest.raises(BusError, match="outside"):
        bus.register(base, size, RecordingDevice(), "stray")
    assert bus.ranges == ()


def test_ranges_at_both_ends_of_the_bus_are_allowed(bus: Bus) -> None:
    low, high = RecordingDevice(1), RecordingDevice(2)
    bus.register(0, 1, low, "low")
    bus.register(PIO_LIMIT - 8, 8, high, "high")
    assert bus.read(0, 1) == 1
    assert bus.read(PIO_LIMIT - 1, 1) == 2
    assert high.accesses == [("read", 7, 1, None)]


def test_whole_bus_range_is_allowed(bus: Bus) -> None:
    dev = RecordingDevice()
    bus.register(0, PIO_LIMIT, dev, "everything")
    bus.write(PIO_LIMIT - 4, 4, 9)
    assert dev.accesses == [("write", PIO_LIMIT - 4, 4, 9)]


# -- unclaimed and partial accesses --------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unclaimed_read_is_all_ones(bus: Bus, size: int) -> None:
    bus.register(0x100, 0x10, RecordingDevice(read_value=0), "dev")
    assert bus.read(0x80, size) == all_ones(size)  # before every range
    assert bus.read(0x200, size) == all_ones(size)  # after every range
    assert Bus("empty", PIO_LIMIT).read(0x60, size) == all_ones(size)
    assert bus.unclaimed_reads == 2


@pytest.mark.parametrize(("size", "addr"), [(2, 0x10F), (4, 0x10D), (8, 0x109), (8, 0x10F)])
def test_access_running_past_the_end_of_a_range_is_unclaimed(
    bus: Bus, size: int, addr: int
) -> None:
    dev = RecordingDevice(read_value=0)
    bus.register(0x100, 0x10, dev, "dev")
    assert bus.read(addr, size) == all_ones(size)
    bus.write(addr, size, 0)
    assert dev.accesses == []
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (1, 1)


def test_access_running_into_the_next_range_is_unclaimed(bus: Bus) -> None:
    # Both bytes are claimed, by different devices: no single device owns the access.
    a, b = RecordingDevice(read_value=0), RecordingDevice(read_value=0)
    bus.register(0x100, 0x10, a, "a")
    bus.register(0x110, 0x10, b, "b")
    assert bus.read(0x10F, 2) == 0xFFFF
    bus.write(0x10E, 4, 0)
    assert a.accesses == b.accesses == []
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (1, 1)


def test_access_starting_before_a_range_is_unclaimed(bus: Bus) -> None:
    dev = RecordingDevice(read_value=0)
    bus.register(0x100, 0x10, dev, "dev")
    assert bus.read(0xFF, 2) == 0xFFFF
    bus.write(0xFC, 8, 0)
    assert dev.accesses == []


@pytest.mark.parametrize(
    ("size", "value", "masked"),
    [
        (1, 0x1234, 0x34),
        (2, 0x12_3456, 0x3456),
        (4, 0x12_3456_789A, 0x3456_789A),
        (8, (0xAB << 64) | 0x0102_0304_0506_0708, 0x0102_0304_0506_0708),
        (1, -1, 0xFF),
        (2, -2, 0xFFFE),
        (4, -1, 0xFFFF_FFFF),
        (8, -1, 0xFFFF_FFFF_FFFF_FFFF),
        (4, 0x7FFF_FFFF, 0x7FFF_FFFF),  # already in range: unchanged
    ],
)
def test_write_value_is_masked_to_access_size(bus: Bus, size: int, value: int, masked: int) -> None:
    dev = RecordingDevice()
    bus.register(0x100, 0x10, dev, "dev")
    bus.write(0x100, size, value)
    assert dev.accesses == [("write", 0, size, masked)]


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_read_value_is_masked_to_access_size(bus: Bus, size: int) -> None:
    # A sloppy device returning more bits than asked for must not leak them to the guest.
    bus.register(
        0x100, 0x10, RecordingDevice(read_value=(0xFFAB << 64) | 0x0102_0304_0506_0708), "d"
    )
    assert bus.read(0x100, size) == 0x0102_0304_0506_0708 & all_ones(size)


# -- unregister ----------------------------------------------------------------------------


def test_unregister_frees_the_range_for_reregistration(bus: Bus) -> None:
    old, new = RecordingDevice(read_value=1), RecordingDevice(read_value=2)
    keep = bus.register(0x200, 0x10, RecordingDevice(), "keep")
    r = bus.register(0x100, 0x10, old, "old")
    with pytest.raises(BusError):
        bus.register(0x100, 0x10, new, "new")
    bus.unregister(r)
    assert bus.ranges == (keep,)
    assert bus.find(0x100) is None
    assert bus.read(0x100, 1) == 0xFF
    assert bus.unclaimed_reads == 1
    r2 = bus.register(0x108, 0x10, new, "new")  # overlaps where "old" was
    assert bus.read(0x108, 1) == 2
    assert old.accesses == []
    assert new.accesses == [("read", 0, 1, None)]
    assert list(bus.ranges) == [r2, keep]


def test_unregister_removes_only_its_own_range(bus: Bus) -> None:
    regs = [bus.register(base, 0x10, RecordingDevice(), f"d{base:x}") for base in (0x0, 0x10, 0x20)]
    bus.unregister(regs[1])
    assert bus.ranges == (regs[0], regs[2])
    assert bus.find(0x0F) is regs[0]
    assert bus.find(0x10) is None
    assert bus.find(0x1F) is None
    assert bus.find(0x20) is regs[2]


# -- counters and rate-limited logging -----------------------------------------------------


def test_unclaimed_accesses_are_counted_by_kind(bus: Bus) -> None:
    bus.register(0x100, 0x10, RecordingDevice(), "dev")
    for _ in range(3):
        bus.read(0x80, 1)  # the same address counts every time
    bus.read(0x81, 2)
    bus.write(0x80, 1, 0)
    bus.read(0x100, 1)  # claimed: not counted
    bus.write(0x100, 1, 0)
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (4, 1)


def unclaimed_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_unclaimed_access_is_logged_once_per_address(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(5):
        assert bus.read(0x80, 1) == 0xFF
    for _ in range(5):
        bus.write(0x90, 2, 0)
    records = unclaimed_records(caplog)
    assert [r.getMessage() for r in records] == [
        "pio: unclaimed 1-byte read at 0x80",
        "pio: unclaimed 2-byte write at 0x90",
    ]
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (5, 5)


def test_unclaimed_logging_stops_after_the_cap(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    for addr in range(0x1000, 0x1000 + 3 * CAP):
        bus.read(addr, 1)
        bus.read(addr, 1)
    bus.read(0x1000, 1)  # a logged address again
    bus.write(0x9000, 4, 0)  # a new address after the cap
    messages = [r.getMessage() for r in unclaimed_records(caplog)]
    assert messages[:CAP] == [
        f"pio: unclaimed 1-byte read at {addr:#x}" for addr in range(0x1000, 0x1000 + CAP)
    ]
    assert messages[CAP:] == [f"pio: {CAP} unclaimed addresses seen; not logging more"]
    # Logging is capped, counting is not.
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (6 * CAP + 1, 1)


def test_logging_cap_is_per_bus(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pio, mmio = Bus("pio", PIO_LIMIT), Bus("mmio", 1 << 64)
    for addr in range(CAP + 10):
        pio.read(addr, 1)
    mmio.read(0xFEE0_0000, 4)
    messages = [r.getMessage() for r in unclaimed_records(caplog)]
    assert messages[-1] == "mmio: unclaimed 4-byte read at 0xfee00000"
    assert len(messages) == CAP + 2


# -- lookup --------------------------------------------------------------------------------


def test_find_with_many_ranges_registered_in_random_order() -> None:
    rng = random.Random(0x10F1)
    bus = Bus("mmio", 1 << 32)
    expected: list[tuple[int, int, RecordingDevice]] = []
    addr = rng.randrange(0, 8)
    for _ in range(100):
        size = rng.randrange(1, 24)
        expected.append((addr, size, RecordingDevice()))
        addr += size + rng.choice([0, 0, 1, rng.randrange(1, 16)])  # some adjacent
    span_end = addr + 8
    order = list(range(100))
    rng.shuffle(order)
    regs = {}
    for i in order:
        base, size, dev = expected[i]
        regs[i] = bus.register(base, size, dev, f"dev{i}")

    assert [r.base for r in bus.ranges] == [base for base, _, _ in expected]
    for a in range(span_end):
        owner = next(
            (i for i, (base, size, _) in enumerate(expected) if base <= a < base + size), None
        )
        found = bus.find(a)
        if owner is None:
            assert found is None, f"{a:#x} should be unclaimed"
        else:
            assert found is regs[owner], f"{a:#x} should belong to dev{owner}"
            assert found.device is expected[owner][2]
        # And dispatch agrees with find(), at the right offset.
        bus.write(a, 1, a & 0xFF)
        if owner is not None:
            base, _, dev = expected[owner]
            assert dev.accesses[-1] == ("write", a - base, 1, a & 0xFF)
    assert sum(len(dev.accesses) for _, _, dev in expected) == sum(s for _, s, _ in expected)
    assert bus.unclaimed_writes == span_end - sum(s for _, s, _ in expected)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 0x200), st.integers(1, 0x40)),
        min_size=1,
        max_size=40,
    )
)
def test_register_accepts_exactly_the_non_overlapping_ranges(
    requests: list[tuple[int, int]],
) -> None:
    bus = Bus("pio", 0x1000)
    accepted: list[tuple[int, int]] = []
    for n, (base, size) in enumerate(requests):
        overlaps = any(b < base + size and base < b + s for b, s in accepted)
        if overlaps:
            with pytest.raises(BusError):
                bus.register(base, size, RecordingDevice(), f"d{n}")
        else:
            bus.register(base, size, RecordingDevice(), f"d{n}")
            accepted.append((base, size))
    assert [(r.base, r.size) for r in bus.ranges] == sorted(accepted)
    for a in range(0x250):
        owner = next(((b, s) for b, s in accepted if b <= a < b + s), None)
        r = bus.find(a)
        assert (None if r is None else (r.base, r.size)) == owner


# -- concurrency ---------------------------------------------------------------------------


def test_find_never_sees_a_half_done_registration() -> None:
    """vCPU threads look ranges up while another thread moves a range (a PCI BAR being
    reprogrammed). Every lookup must see the bus either before or after a registration
    change: never a range that does not contain the address, never an exception."""
    bus = Bus("mmio", 1 << 32)
    fixed = bus.register(0x1000, 0x100, RecordingDevice(), "fixed")
    moving = RecordingDevice()
    problems: list[str] = []
    stop = threading.Event()

    def vcpu() -> None:
        while not stop.is_set():
            try:
                for addr in (0x0, 0x80, 0x1000, 0x10FF):
                    r = bus.find(addr)
                    ok = r is fixed if addr >= 0x1000 else r is None or r.device is moving
                    if not ok:
                        problems.append(f"find({addr:#x}) -> {r}")
            except Exception as exc:  # an IndexError here is the failure being tested
                problems.append(f"find raised {exc!r}")
            if len(problems) >= 5:
                return

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=vcpu)
    thread.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not problems:
            r = bus.register(0x0, 0x100, moving, "moving")
            bus.unregister(r)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert problems == []


def test_bus_range_is_immutable() -> None:
    r = BusRange(0, 1, RecordingDevice(), "x")
    with pytest.raises(AttributeError):
        r.base = 5  # type: ignore[misc]
