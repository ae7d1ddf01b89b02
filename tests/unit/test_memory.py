"""Tests of guest RAM: the bounds check at every edge, the memfd backing, layout validation.

Every accessor must refuse a range that is not entirely inside one RAM region with
``GuestMemoryError`` (carrying the gpa and length) before touching host memory, so the edge
cases below are generated from each layout's regions and run through every accessor. A
failed write is checked by comparing all of guest RAM before and after.
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.errors import GuestMemoryError, IovirtError
from iovirt.memory import PAGE_SIZE, GuestMemory

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TOP = 1 << 64  # one past the highest guest-physical address

Layout = list[tuple[int, int]]

LAYOUTS: dict[str, Layout] = {
    "one": [(0, MiB)],
    # RAM below and above a 32-bit PCI hole, as a real x86 guest gets it.
    "hole": [(0, MiB), (4 * GiB, MiB)],
    # A small hole, so that a write spanning it needs only a few hundred KiB of data.
    "small_hole": [(64 * KiB, 64 * KiB), (256 * KiB, 64 * KiB)],
    # RAM whose last byte is the last guest-physical address: the wrap check matters here.
    "top": [(TOP - MiB, MiB)],
}

# Filled into all of guest RAM before a write that must fail, to see that nothing changed.
PATTERN = 0xA5


@dataclass(frozen=True)
class Case:
    name: str
    gpa: int
    length: int
    ok: bool


def range_cases(layout: Layout) -> list[Case]:
    """Named ``(gpa, length)`` edge cases for ``layout``, each with the expected verdict."""
    regions = sorted(layout)
    cases = [
        Case("negative_gpa", -1, 1, False),
        # -1 + 2 ends at 1, inside RAM in most layouts: a signed check must still refuse it.
        Case("negative_gpa_ending_in_ram", -1, 2, False),
        Case("negative_gpa_zero_length", -1, 0, False),
        Case("wraps_past_2**64", TOP - 1, 2, False),
        Case("wraps_past_2**64_by_a_lot", TOP - 16, 32, False),
        Case("huge_length_from_gpa_1", 1, TOP, False),
        Case("at_2**64", TOP, 1, False),
    ]
    for n, (gpa, size) in enumerate(regions):
        end = gpa + size
        cases += [
            Case(f"r{n}_first_byte", gpa, 1, True),
            Case(f"r{n}_last_byte", end - 1, 1, True),
            Case(f"r{n}_up_to_end", end - 16, 16, True),
            Case(f"r{n}_whole_region", gpa, size, True),
            Case(f"r{n}_one_past_end", end - 16, 17, False),
            Case(f"r{n}_whole_region_plus_one", gpa, size + 1, False),
            Case(f"r{n}_starting_at_end", end, 1, False),
            Case(f"r{n}_straddling_end", end - 1, 2, False),
            Case(f"r{n}_negative_length", gpa, -1, False),
            Case(f"r{n}_negative_length_inside", gpa + 16, -16, False),
            Case(f"r{n}_zero_length_at_start", gpa, 0, True),
            Case(f"r{n}_zero_length_inside", gpa + 100, 0, True),
            Case(f"r{n}_zero_length_at_end", end, 0, True),
        ]
        if gpa > 0:
            cases += [
                Case(f"r{n}_byte_before_start", gpa - 1, 1, False),
                Case(f"r{n}_straddling_start", gpa - 1, 2, False),
                Case(f"r{n}_zero_length_before_start", gpa - 1, 0, False),
            ]
        if end < TOP:
            cases.append(Case(f"r{n}_zero_length_after_end", end + 1, 0, False))
    for n, ((a, asz), (b, bsz)) in enumerate(itertools.pairwise(regions)):
        hole, hole_end = a + asz, b
        mid = hole + (hole_end - hole) // 2
        cases += [
            Case(f"hole{n}_first_byte", hole, 1, False),
            Case(f"hole{n}_middle", mid, 8, False),
            Case(f"hole{n}_zero_length_middle", mid, 0, False),
            Case(f"hole{n}_last_byte", hole_end - 1, 1, False),
            # Both ends of the range are in RAM; the middle is not.
            Case(f"hole{n}_spanned_end_to_start", hole - 1, hole_end - hole + 2, False),
            Case(f"hole{n}_spanned_whole", a, b + bsz - a, False),
        ]
    return cases


def layout_cases() -> list[Any]:
    return [
        pytest.param(name, case, id=f"{name}-{case.name}")
        for name, layout in LAYOUTS.items()
        for case in range_cases(layout)
    ]


@pytest.fixture
def make_memory() -> Iterator[Callable[[Layout], GuestMemory]]:
    made: list[GuestMemory] = []

    def make(layout: Layout) -> GuestMemory:
        mem = GuestMemory(layout)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close()


@pytest.fixture
def one(make_memory: Callable[[Layout], GuestMemory]) -> GuestMemory:
    return make_memory(LAYOUTS["one"])


@pytest.fixture
def hole(make_memory: Callable[[Layout], GuestMemory]) -> GuestMemory:
    return make_memory(LAYOUTS["hole"])


def fill_pattern(mem: GuestMemory) -> None:
    for r in mem.regions:
        r.mapping[:] = bytes([PATTERN]) * r.size


def assert_all_pattern(mem: GuestMemory) -> None:
    for r in mem.regions:
        data = r.mapping[:]
        assert data.count(PATTERN) == r.size, f"region at {r.gpa:#x} was modified"


def expected_host_address(mem: GuestMemory, gpa: int) -> int:
    """Computed from the region list, independently of ``host_address()``."""
    for r in mem.regions:
        if r.gpa <= gpa <= r.end:
            return r.host_addr + (gpa - r.gpa)
    raise AssertionError(f"{gpa:#x} is in no region")


# -- the bounds check, every accessor that takes a length --------------------------------


@pytest.mark.parametrize(("layout", "case"), layout_cases())
def test_contains_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    assert mem.contains(case.gpa, case.length) is case.ok


@pytest.mark.parametrize(("layout", "case"), layout_cases())
def test_read_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    fill_pattern(mem)
    if case.ok:
        data = mem.read(case.gpa, case.length)
        assert data == bytes([PATTERN]) * case.length
    else:
        with pytest.raises(GuestMemoryError) as err:
            mem.read(case.gpa, case.length)
        assert (err.value.gpa, err.value.length) == (case.gpa, case.length)


@pytest.mark.parametrize(("layout", "case"), layout_cases())
def test_view_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    fill_pattern(mem)
    if case.ok:
        view = mem.view(case.gpa, case.length)
        try:
            assert view.nbytes == case.length
            assert view.tobytes() == bytes([PATTERN]) * case.length
        finally:
            view.release()
    else:
        with pytest.raises(GuestMemoryError) as err:
            mem.view(case.gpa, case.length)
        assert (err.value.gpa, err.value.length) == (case.gpa, case.length)


@pytest.mark.parametrize(("layout", "case"), layout_cases())
def test_host_address_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    if case.ok:
        assert mem.host_address(case.gpa, case.length) == expected_host_address(mem, case.gpa)
    else:
        with pytest.raises(GuestMemoryError) as err:
            mem.host_address(case.gpa, case.length)
        assert (err.value.gpa, err.value.length) == (case.gpa, case.length)


@pytest.mark.parametrize(("layout", "case"), layout_cases())
def test_fill_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    fill_pattern(mem)
    if case.ok:
        mem.fill(case.gpa, case.length, 0x3C)
        assert mem.read(case.gpa, case.length) == b"\x3c" * case.length
        assert_neighbours_untouched(mem, case.gpa, case.length)
    else:
        with pytest.raises(GuestMemoryError) as err:
            mem.fill(case.gpa, case.length, 0x3C)
        assert (err.value.gpa, err.value.length) == (case.gpa, case.length)
        assert_all_pattern(mem)


def write_cases() -> list[Any]:
    # write() takes its length from the data: a negative length cannot be expressed, and
    # a length of gigabytes would need gigabytes of data (the small_hole layout covers
    # spanning a hole with a write instead).
    return [p for p in layout_cases() if 0 <= p.values[1].length <= 4 * MiB]


@pytest.mark.parametrize(("layout", "case"), write_cases())
def test_write_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    fill_pattern(mem)
    data = (bytes(range(1, 256)) * (case.length // 255 + 1))[: case.length]
    if case.ok:
        mem.write(case.gpa, data)
        assert mem.read(case.gpa, case.length) == data
        assert_neighbours_untouched(mem, case.gpa, case.length)
    else:
        with pytest.raises(GuestMemoryError) as err:
            mem.write(case.gpa, data)
        assert (err.value.gpa, err.value.length) == (case.gpa, case.length)
        assert_all_pattern(mem)


def test_write_cases_include_a_write_spanning_a_hole() -> None:
    # Guards write_cases() against filtering away the case that matters most.
    names = {p.id for p in write_cases()}
    assert "small_hole-hole0_spanned_end_to_start" in names
    assert "small_hole-hole0_spanned_whole" in names
    assert "hole-wraps_past_2**64" in names


def assert_neighbours_untouched(mem: GuestMemory, gpa: int, length: int) -> None:
    """The byte before and the byte after ``[gpa, gpa + length)`` still hold PATTERN."""
    checked = 0
    for r in mem.regions:
        if r.gpa <= gpa - 1 < r.end:
            assert r.mapping[gpa - 1 - r.gpa] == PATTERN
            checked += 1
        if r.gpa <= gpa + length < r.end:
            assert r.mapping[gpa + length - r.gpa] == PATTERN
            checked += 1
    # Every accepted range here lies inside a region at least 64 KiB long, so at least
    # one neighbour is in RAM unless the range is the whole region.
    if not any(r.gpa == gpa and r.size == length for r in mem.regions):
        assert checked >= 1


# -- fixed-size accessors ----------------------------------------------------------------


def sized_cases(layout: Layout, n: int) -> list[Case]:
    regions = sorted(layout)
    cases = [
        Case("negative_gpa", -1, n, False),
        Case("top_of_address_space", TOP - n + 1, n, False),
        Case("at_2**64", TOP, n, False),
    ]
    for i, (gpa, size) in enumerate(regions):
        end = gpa + size
        cases += [
            Case(f"r{i}_first", gpa, n, True),
            Case(f"r{i}_last_full", end - n, n, True),
            Case(f"r{i}_at_end", end, n, False),
        ]
        if n > 1:
            cases.append(Case(f"r{i}_straddling_end", end - n + 1, n, False))
        if gpa > 0:
            cases.append(Case(f"r{i}_straddling_start", gpa - 1, n, False))
    for i, ((a, asz), (b, _)) in enumerate(itertools.pairwise(regions)):
        cases.append(Case(f"hole{i}_middle", a + asz + (b - a - asz) // 2, n, False))
    return cases


def sized_params() -> list[Any]:
    return [
        pytest.param(name, n, case, id=f"{name}-u{8 * n}-{case.name}")
        for name, layout in LAYOUTS.items()
        for n in (1, 2, 4, 8)
        for case in sized_cases(layout, n)
    ]


def read_un(mem: GuestMemory, n: int, gpa: int) -> int:
    return {1: mem.read_u8, 2: mem.read_u16, 4: mem.read_u32, 8: mem.read_u64}[n](gpa)


def write_un(mem: GuestMemory, n: int, gpa: int, value: int) -> None:
    {1: mem.write_u8, 2: mem.write_u16, 4: mem.write_u32, 8: mem.write_u64}[n](gpa, value)


@pytest.mark.parametrize(("layout", "n", "case"), sized_params())
def test_read_un_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, n: int, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    fill_pattern(mem)
    if case.ok:
        assert read_un(mem, n, case.gpa) == int.from_bytes(bytes([PATTERN]) * n, "little")
    else:
        with pytest.raises(GuestMemoryError) as err:
            read_un(mem, n, case.gpa)
        assert (err.value.gpa, err.value.length) == (case.gpa, n)


@pytest.mark.parametrize(("layout", "n", "case"), sized_params())
def test_write_un_at_edge(
    make_memory: Callable[[Layout], GuestMemory], layout: str, n: int, case: Case
) -> None:
    mem = make_memory(LAYOUTS[layout])
    fill_pattern(mem)
    value = int.from_bytes(bytes(range(0x11, 0x11 + n)), "little")
    if case.ok:
        write_un(mem, n, case.gpa, value)
        assert mem.read(case.gpa, n) == bytes(range(0x11, 0x11 + n))
        assert_neighbours_untouched(mem, case.gpa, n)
    else:
        with pytest.raises(GuestMemoryError) as err:
            write_un(mem, n, case.gpa, value)
        assert (err.value.gpa, err.value.length) == (case.gpa, n)
        assert_all_pattern(mem)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_un_is_little_endian(hole: GuestMemory, n: int) -> None:
    gpa = 4 * GiB + 0x123
    value = int.from_bytes(bytes(range(0xF1, 0xF1 - n, -1)), "big")
    write_un(hole, n, gpa, value)
    assert hole.read(gpa, n) == value.to_bytes(n, "little")
    assert read_un(hole, n, gpa) == value
    hole.write(0x40, bytes(range(1, n + 1)))
    assert read_un(hole, n, 0x40) == int.from_bytes(bytes(range(1, n + 1)), "little")


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_write_un_masks_to_its_size_and_touches_only_its_bytes(hole: GuestMemory, n: int) -> None:
    fill_pattern(hole)
    mask = (1 << (8 * n)) - 1
    write_un(hole, n, 0x100, (0x5A << (8 * n)) | 0x42)
    assert read_un(hole, n, 0x100) == 0x42
    write_un(hole, n, 0x200, -1)
    assert read_un(hole, n, 0x200) == mask
    assert hole.read(0x100 + n, 1) == hole.read(0x200 + n, 1) == bytes([PATTERN])
    assert hole.read(0xFF, 1) == hole.read(0x1FF, 1) == bytes([PATTERN])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_un_round_trips_every_byte_value(one: GuestMemory, n: int) -> None:
    for b in range(256):
        value = int.from_bytes(bytes([b, 255 - b, b ^ 0x5A, 7] * 2)[:n], "little")
        write_un(one, n, 0x1000 + b, value)
        assert read_un(one, n, 0x1000 + b) == value


# -- views, the memfd ---------------------------------------------------------------------


def test_view_is_writable_and_aliases_read(hole: GuestMemory) -> None:
    gpa = 4 * GiB + 0x80
    view = hole.view(gpa, 16)
    try:
        assert not view.readonly
        view[0] = 0x5A
        view[15] = 0x77
        assert hole.read(gpa, 1) == b"\x5a"
        assert hole.read(gpa + 15, 1) == b"\x77"
        hole.write(gpa + 4, b"abcd")
        assert view[4:8].tobytes() == b"abcd"
        assert hole.read(gpa, 16) == view.tobytes()
    finally:
        view.release()


def test_write_lands_in_the_memfd_at_the_region_offset(hole: GuestMemory) -> None:
    """A second, independent mapping of ``memory.fd`` sees guest writes, and the other way
    round: RAM is one shared memfd, which a vhost-user back-end and VFIO DMA rely on."""
    assert os.readlink(f"/proc/self/fd/{hole.fd}").startswith("/memfd:")
    assert stat.S_ISREG(os.fstat(hole.fd).st_mode)
    assert os.fstat(hole.fd).st_size == sum(size for _, size in LAYOUTS["hole"])
    high = next(r for r in hole.regions if r.gpa == 4 * GiB)
    assert high.fd == hole.fd
    assert high.fd_offset == MiB  # the second region follows the first in the file
    other = mmap.mmap(
        hole.fd, high.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
        offset=high.fd_offset,
    )  # fmt: skip
    try:
        hole.write(4 * GiB + 0x1234, b"through GuestMemory")
        assert other[0x1234 : 0x1234 + 19] == b"through GuestMemory"
        other[0x9000:0x9005] = b"hello"
        assert hole.read(4 * GiB + 0x9000, 5) == b"hello"
        # The low region is elsewhere in the file: it did not see either write.
        assert hole.read(0x1234, 19) == bytes(19)
        assert os.pread(hole.fd, 5, high.fd_offset + 0x9000) == b"hello"
    finally:
        other.close()


def test_write_accepts_any_bytes_like(one: GuestMemory) -> None:
    one.write(0x10, bytearray(b"ba"))
    one.write(0x12, memoryview(b"xyzw")[1:3])
    assert one.read(0x10, 4) == b"bayz"


def test_write_of_a_typed_memoryview_copies_all_its_bytes(one: GuestMemory) -> None:
    """``len()`` of a memoryview counts items, not bytes: an ``array('I')`` of two items is
    eight bytes, and all eight must land (and be bounds-checked)."""
    words = memoryview(array("I", [0x11223344, 0x55667788]))
    assert words.nbytes == 8
    one.write(0x20, words)
    assert one.read(0x20, 8) == words.tobytes()


def test_write_of_a_typed_memoryview_is_checked_by_its_byte_length(one: GuestMemory) -> None:
    words = memoryview(array("I", [1, 2]))
    fill_pattern(one)
    with pytest.raises(GuestMemoryError) as err:
        one.write(MiB - 4, words)  # 2 items, but 8 bytes: 4 of them past the end
    assert err.value.length == 8
    assert_all_pattern(one)


def test_error_names_the_range(hole: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError) as err:
        hole.read(2 * MiB, 16)
    assert isinstance(err.value, IovirtError)
    assert (err.value.gpa, err.value.length) == (2 * MiB, 16)
    assert "0x200000" in str(err.value)


def test_adjacent_regions_do_not_form_one_range(
    make_memory: Callable[[Layout], GuestMemory],
) -> None:
    # Each region is its own host mapping, so a range may not cross from one to the next
    # even when they touch in guest-physical space.
    mem = make_memory([(0, PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)])
    assert mem.contains(0, PAGE_SIZE)
    assert mem.contains(PAGE_SIZE, PAGE_SIZE)
    assert mem.contains(PAGE_SIZE, 0)
    assert not mem.contains(PAGE_SIZE - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.read(0, 2 * PAGE_SIZE)


# -- layout validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([], id="empty"),
        pytest.param([(1, PAGE_SIZE)], id="unaligned_gpa"),
        pytest.param([(PAGE_SIZE // 2, PAGE_SIZE)], id="half_page_gpa"),
        pytest.param([(0, PAGE_SIZE + 1)], id="unaligned_size"),
        pytest.param([(0, 0)], id="zero_size"),
        pytest.param([(0, 0), (PAGE_SIZE, PAGE_SIZE)], id="zero_size_beside_another"),
        pytest.param([(0, -PAGE_SIZE)], id="negative_size"),
        pytest.param([(-PAGE_SIZE, PAGE_SIZE)], id="negative_gpa"),
        pytest.param([(TOP - PAGE_SIZE, 2 * PAGE_SIZE)], id="past_2**64"),
        pytest.param([(0, PAGE_SIZE), (0, PAGE_SIZE)], id="same_region_twice"),
        pytest.param([(0, 2 * PAGE_SIZE), (PAGE_SIZE, 2 * PAGE_SIZE)], id="partial_overlap"),
        pytest.param([(PAGE_SIZE, 2 * PAGE_SIZE), (0, 2 * PAGE_SIZE)], id="overlap_unsorted"),
        pytest.param([(0, 4 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)], id="contained"),
        pytest.param(
            [(0, 8 * PAGE_SIZE), (2 * PAGE_SIZE, PAGE_SIZE), (6 * PAGE_SIZE, PAGE_SIZE)],
            id="containing_two",
        ),
        pytest.param([(0, PAGE_SIZE), (MiB, PAGE_SIZE), (3, PAGE_SIZE)], id="one_bad_of_three"),
    ],
)
def test_invalid_layout_is_refused(layout: Layout) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError):
        GuestMemory(layout)
    assert set(os.listdir("/proc/self/fd")) <= fds_before  # no memfd leaked


@pytest.mark.parametrize(
    "layout",
    [
        [(0, PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)],  # adjacent
        [(4 * GiB, MiB), (0, MiB)],  # unsorted
        [(TOP - PAGE_SIZE, PAGE_SIZE)],  # last page of the address space
    ],
)
def test_valid_layout_is_accepted(
    make_memory: Callable[[Layout], GuestMemory], layout: Layout
) -> None:
    mem = make_memory(layout)
    assert mem.size == sum(size for _, size in layout)
    assert [(r.gpa, r.size) for r in mem.regions] == sorted(layout)
    for gpa, size in layout:
        mem.write_u8(gpa + size - 1, 0x99)
        assert mem.read_u8(gpa + size - 1) == 0x99


# -- lifetime -----------------------------------------------------------------------------


def test_close_is_idempotent_and_releases_the_memfd() -> None:
    mem = GuestMemory(LAYOUTS["hole"])
    fd = mem.fd
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    mem.close()
    assert mem.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    mem.close()
    assert mem.fd == -1
    assert not mem.contains(0, 1)
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)


def test_context_manager_closes() -> None:
    with GuestMemory(LAYOUTS["one"]) as mem:
        mem.write_u32(0, 7)
        assert mem.fd >= 0
    assert mem.fd == -1
    assert not mem.contains(0, 4)


def test_close_with_a_live_view_still_releases_the_memfd() -> None:
    """``view()`` is documented as valid until :meth:`close`, so ``close()`` must work while
    a device still holds a view (a device being torn down with the VM, say): it must not
    raise and leave the memfd open and the object half-closed."""
    mem = GuestMemory(LAYOUTS["one"])
    view = mem.view(0, 16)
    try:
        mem.close()
        assert mem.fd == -1
        assert not mem.contains(0, 1)
    finally:
        view.release()
        mem.close()


# -- property: contains() and read() against an independent reference --------------------


def reference_contains(layout: Layout, gpa: int, length: int) -> bool:
    if gpa < 0 or length < 0:
        return False
    return any(start <= gpa and gpa + length <= start + size for start, size in layout)


def edges(layout: Layout) -> list[int]:
    points = [0, TOP]
    for gpa, size in layout:
        points += [gpa, gpa + size, gpa + size // 2]
    return points


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def shared_memory(request: pytest.FixtureRequest) -> Iterator[tuple[Layout, GuestMemory]]:
    layout = LAYOUTS[request.param]
    with GuestMemory(layout) as mem:
        yield layout, mem


@st.composite
def near_edges(draw: st.DrawFn, layout: Layout) -> tuple[int, int]:
    points = edges(layout)
    gpa = draw(st.sampled_from(points)) + draw(st.integers(-16, 16))
    length = draw(
        st.one_of(
            st.integers(-4, 64),
            # Lengths that reach another edge, give or take a few bytes.
            st.builds(lambda p, d: p - gpa + d, st.sampled_from(points), st.integers(-2, 2)),
        )
    )
    return gpa, length


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_contains_and_read_agree_with_reference(
    shared_memory: tuple[Layout, GuestMemory], data: st.DataObject
) -> None:
    layout, mem = shared_memory
    gpa, length = data.draw(near_edges(layout))
    expected = reference_contains(layout, gpa, length)
    assert mem.contains(gpa, length) is expected
    try:
        got = mem.read(gpa, length)
    except GuestMemoryError as err:
        assert not expected
        assert (err.gpa, err.length) == (gpa, length)
    else:
        assert expected
        assert len(got) == length
