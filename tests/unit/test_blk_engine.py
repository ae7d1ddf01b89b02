"""Tests of the C virtio-blk data path (csrc/blk.c over csrc/virtqueue.c) via BlkEngine.

The synthetic driver (:mod:`iovirt.testing.virtio_driver`) plays the guest: it lays out a
split or packed ring in guest RAM and builds request chains; the disk is a real file in
``tmp_path``. Most tests run the queue on the test's thread (``process_queue``); the worker
thread tests kick it through an eventfd and wait on the call / error eventfds.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from iovirt.memory import GuestMemory
from iovirt.testing.virtio_driver import (
    PackedDriver,
    SplitDriver,
    make_driver,
)
from iovirt.virtio.cengine import BlkEngine, BlkEngineConfig, BlkEngineError
from iovirt.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueFlags,
    VirtQueueError,
)

# virtio 1.2, 5.2.6: request types and status values.
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
FLAG_UNMAP = 1

SECTOR = 512
DISK_SECTORS = 256  # a 128 KiB disk
RAM = [(0, 4 << 20)]
RING_BASE = 0x1000
SERIAL = b"iovirt-serial-0001"
WAIT_S = 5.0  # generous: a worker normally answers in microseconds

Driver = SplitDriver | PackedDriver


def header(req_type: int, sector: int = 0) -> bytes:
    """struct virtio_blk_req's header: le32 type, le32 reserved, le64 sector."""
    return struct.pack("<IIQ", req_type, 0, sector)


def dwz_segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """struct virtio_blk_discard_write_zeroes."""
    return struct.pack("<QII", sector, num_sectors, flags)


def disk_pattern() -> bytes:
    """Distinct bytes per sector, so a read from the wrong offset shows."""
    return b"".join(bytes([s & 0xFF]) * 8 + os.urandom(SECTOR - 8) for s in range(DISK_SECTORS))


@dataclass
class Completion:
    status: int | None  # the status byte, None if the chain had no writable byte
    used_len: int
    data: bytes  # the writable bytes before the status byte


@dataclass
class Rig:
    """A guest RAM, a driver, a disk file and an engine with one queue set up."""

    memory: GuestMemory
    driver: Driver
    engine: BlkEngine
    disk: Path
    fd: int
    kick: int
    call: int
    contents: bytes
    fds: list[int] = field(default_factory=list)

    def submit(
        self, readable: list[bytes], writable: list[int], *, indirect: bool = False
    ) -> Completion:
        """Make one chain available, process the queue, collect the completion."""
        head = self.driver.add_chain(readable, writable, indirect=indirect)
        bufs = self.driver.writable_buffers(head)
        assert self.engine.process_queue(0) == 1
        used = self.driver.used()
        assert [h for h, _ in used] == [head]
        raw = b"".join(self.memory.read(gpa, n) for gpa, n in bufs)
        status = raw[-1] if raw else None
        return Completion(status, used[0][1], raw[:-1])

    def request(
        self, req_type: int, sector: int = 0, payload: bytes = b"", in_len: int = 0
    ) -> Completion:
        """The usual layout: header | payload (readable), data | status (writable)."""
        readable = [header(req_type, sector)] + ([payload] if payload else [])
        writable = ([in_len] if in_len else []) + [1]
        return self.submit(readable, writable)

    def file_bytes(self, offset: int = 0, length: int = DISK_SECTORS * SECTOR) -> bytes:
        return os.pread(self.fd, length, offset)


def make_rig(
    tmp_path: Path,
    *,
    packed: bool = False,
    event_idx: bool = False,
    size: int = 16,
    readonly: bool = False,
    **config: Any,
) -> Rig:
    memory = GuestMemory(RAM)
    disk = tmp_path / "disk.img"
    contents = disk_pattern()
    disk.write_bytes(contents)
    fd = os.open(disk, os.O_RDONLY if readonly else os.O_RDWR)
    defaults: dict[str, Any] = {
        "discard": True,
        "write_zeroes": True,
        "max_discard_sectors": DISK_SECTORS,
        "max_discard_seg": 4,
        "max_write_zeroes_sectors": DISK_SECTORS,
        "max_write_zeroes_seg": 4,
        "serial": SERIAL,
    }
    defaults.update(config)
    cfg = BlkEngineConfig(fd=fd, capacity=DISK_SECTORS, readonly=readonly, **defaults)
    driver = make_driver(memory, size, RING_BASE, packed=packed, event_idx=event_idx)
    engine = BlkEngine(memory, cfg, 1)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    engine.setup_queue(
        0, size, driver.flags, driver.desc_gpa, driver.driver_gpa, driver.device_gpa, kick, call
    )
    return Rig(memory, driver, engine, disk, fd, kick, call, contents, [fd, kick, call])


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[Rig]]:
    """Every rig a test makes gets torn down (engine first: its workers use the fds)."""
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.engine.close()
        for fd in rig.fds:
            os.close(fd)
        rig.memory.close()


@pytest.fixture(params=["split", "packed"])
def layout(request: pytest.FixtureRequest) -> bool:
    """Run the test on both ring layouts (the value is ``packed``)."""
    return bool(request.param == "packed")


@pytest.fixture
def new_rig(tmp_path: Path, rigs: list[Rig], layout: bool) -> Any:
    def make(**kwargs: Any) -> Rig:
        kwargs.setdefault("packed", layout)
        sub = tmp_path / str(len(rigs))
        sub.mkdir()
        rig = make_rig(sub, **kwargs)
        rigs.append(rig)
        return rig

    return make


def eventfd_value(fd: int) -> int:
    """Read (and reset) an eventfd's counter; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_readable(fd: int, timeout: float = WAIT_S) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


# -- reads and writes ---------------------------------------------------------------------


def test_read_returns_the_sectors_asked_for(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.request(T_IN, sector=3, in_len=2 * SECTOR)
    assert done.status == S_OK
    assert done.data == rig.contents[3 * SECTOR : 5 * SECTOR]
    assert done.used_len == 2 * SECTOR + 1  # data plus the status byte
    stats = rig.engine.stats()
    assert stats["requests"] == 1 and stats["read_bytes"] == 2 * SECTOR


def test_read_of_the_last_sector(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.request(T_IN, sector=DISK_SECTORS - 1, in_len=SECTOR)
    assert done.status == S_OK
    assert done.data == rig.contents[-SECTOR:]


def test_write_lands_in_the_file(new_rig: Any) -> None:
    rig = new_rig()
    payload = os.urandom(3 * SECTOR)
    done = rig.request(T_OUT, sector=10, payload=payload)
    assert done.status == S_OK
    assert done.used_len == 1  # only the status byte was written
    assert rig.file_bytes(10 * SECTOR, 3 * SECTOR) == payload
    # Nothing around it changed.
    assert rig.file_bytes(0, 10 * SECTOR) == rig.contents[: 10 * SECTOR]
    assert rig.file_bytes(13 * SECTOR) == rig.contents[13 * SECTOR :]
    assert rig.engine.stats()["write_bytes"] == 3 * SECTOR


def test_write_without_flush_feature_is_write_through(new_rig: Any) -> None:
    """Without VIRTIO_BLK_F_FLUSH every write is fdatasync'ed; the data must still land."""
    rig = new_rig(flush=False)
    payload = os.urandom(SECTOR)
    assert rig.request(T_OUT, sector=0, payload=payload).status == S_OK
    assert rig.file_bytes(0, SECTOR) == payload


def test_scattered_read_and_write_segments(new_rig: Any) -> None:
    """Data spread over several descriptors of odd sizes goes to/from the right bytes."""
    rig = new_rig()
    payload = os.urandom(4 * SECTOR)
    cuts = [0, 100, 612, 1500, 4 * SECTOR]
    pieces = [payload[a:b] for a, b in itertools.pairwise(cuts)]
    done = rig.submit([header(T_OUT, 20), *pieces], [1])
    assert done.status == S_OK
    assert rig.file_bytes(20 * SECTOR, 4 * SECTOR) == payload
    done = rig.submit([header(T_IN, 20)], [7, 1000, 1041, 1])
    assert done.status == S_OK
    assert done.data == payload


def test_flush(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.request(T_FLUSH)
    assert done.status == S_OK and done.used_len == 1
    assert rig.engine.stats()["flushes"] == 1


def test_get_id_returns_the_serial(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.request(T_GET_ID, in_len=20)
    assert done.status == S_OK
    assert done.data == SERIAL.ljust(20, b"\0")
    assert done.used_len == 21


def test_get_id_into_a_short_buffer_truncates(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.request(T_GET_ID, in_len=6)
    assert done.status == S_OK
    assert done.data == SERIAL[:6]
    assert done.used_len == 7


# -- discard and write zeroes ----------------------------------------------------------


def test_discard_deallocates_and_reads_zero(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.request(T_DISCARD, payload=dwz_segment(8, 16))
    assert done.status == S_OK
    assert rig.file_bytes(8 * SECTOR, 16 * SECTOR) == bytes(16 * SECTOR)
    assert rig.file_bytes(0, 8 * SECTOR) == rig.contents[: 8 * SECTOR]
    assert rig.file_bytes(24 * SECTOR) == rig.contents[24 * SECTOR :]
    assert os.fstat(rig.fd).st_size == DISK_SECTORS * SECTOR  # KEEP_SIZE
    # A real hole (ext4 and tmpfs punch them): sectors 8..23 are bytes 4096..12287.
    assert os.lseek(rig.fd, 0, os.SEEK_HOLE) == 4096
    assert os.lseek(rig.fd, 4096, os.SEEK_DATA) == 12288
    assert rig.engine.stats()["discards"] == 1


def test_discard_several_segments(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.request(T_DISCARD, payload=dwz_segment(0, 1) + dwz_segment(100, 2))
    assert done.status == S_OK
    assert rig.file_bytes(0, SECTOR) == bytes(SECTOR)
    assert rig.file_bytes(SECTOR, SECTOR) == rig.contents[SECTOR : 2 * SECTOR]
    assert rig.file_bytes(100 * SECTOR, 2 * SECTOR) == bytes(2 * SECTOR)


@pytest.mark.parametrize("flags", [0, FLAG_UNMAP])
def test_write_zeroes(new_rig: Any, flags: int) -> None:
    rig = new_rig()
    done = rig.request(T_WRITE_ZEROES, payload=dwz_segment(30, 5, flags))
    assert done.status == S_OK
    assert rig.file_bytes(30 * SECTOR, 5 * SECTOR) == bytes(5 * SECTOR)
    assert rig.file_bytes(29 * SECTOR, SECTOR) == rig.contents[29 * SECTOR : 30 * SECTOR]
    assert rig.file_bytes(35 * SECTOR, SECTOR) == rig.contents[35 * SECTOR : 36 * SECTOR]
    assert rig.engine.stats()["write_zeroes"] == 1


@pytest.mark.parametrize(
    ("req_type", "payload", "status"),
    [
        (T_DISCARD, dwz_segment(0, 1, FLAG_UNMAP), S_UNSUPP),  # unmap is for write zeroes
        (T_DISCARD, dwz_segment(0, 1, 0x2), S_UNSUPP),  # unknown flag
        (T_WRITE_ZEROES, dwz_segment(0, 1, 0x80), S_UNSUPP),
        (T_DISCARD, dwz_segment(DISK_SECTORS - 1, 2), S_IOERR),  # past the end
        (T_DISCARD, dwz_segment(2**64 - 1, 2), S_IOERR),  # sector + count wraps
        (T_WRITE_ZEROES, dwz_segment(0, DISK_SECTORS + 1), S_IOERR),
        (T_DISCARD, dwz_segment(0, 1) * 5, S_IOERR),  # more than max_discard_seg (4)
        (T_DISCARD, b"", S_IOERR),  # no segment at all
        (T_DISCARD, dwz_segment(0, 1)[:12], S_IOERR),  # not a whole segment
    ],
)
def test_discard_and_write_zeroes_are_checked(
    new_rig: Any, req_type: int, payload: bytes, status: int
) -> None:
    rig = new_rig()
    assert rig.request(req_type, payload=payload).status == status
    assert rig.file_bytes() == rig.contents


def test_discard_checks_every_segment_before_touching_the_file(new_rig: Any) -> None:
    rig = new_rig()
    payload = dwz_segment(0, 1) + dwz_segment(DISK_SECTORS, 1)
    assert rig.request(T_DISCARD, payload=payload).status == S_IOERR
    assert rig.file_bytes(0, SECTOR) == rig.contents[:SECTOR]


def test_discard_over_max_sectors_is_ioerr(new_rig: Any) -> None:
    rig = new_rig(max_discard_sectors=8)
    assert rig.request(T_DISCARD, payload=dwz_segment(0, 9)).status == S_IOERR
    assert rig.request(T_DISCARD, payload=dwz_segment(0, 8)).status == S_OK


@pytest.mark.parametrize("req_type", [T_DISCARD, T_WRITE_ZEROES])
def test_discard_and_write_zeroes_not_negotiated_are_unsupp(new_rig: Any, req_type: int) -> None:
    rig = new_rig(discard=False, write_zeroes=False)
    assert rig.request(req_type, payload=dwz_segment(0, 1)).status == S_UNSUPP
    assert rig.file_bytes() == rig.contents
    assert rig.engine.stats()["unsupp"] == 1


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req_type", "payload"),
    [
        (T_OUT, b"x" * SECTOR),
        (T_DISCARD, dwz_segment(0, 1)),
        (T_WRITE_ZEROES, dwz_segment(0, 1)),
    ],
)
def test_readonly_refuses_changes(new_rig: Any, req_type: int, payload: bytes) -> None:
    rig = new_rig(readonly=True)
    assert rig.request(req_type, payload=payload).status == S_IOERR
    assert rig.file_bytes() == rig.contents
    assert rig.engine.stats()["ioerr"] == 1
    # Reads still work.
    assert rig.request(T_IN, sector=0, in_len=SECTOR).data == rig.contents[:SECTOR]


@pytest.mark.parametrize(
    ("req_type", "sector", "nsectors"),
    [
        (T_IN, DISK_SECTORS, 1),  # starts at the end
        (T_IN, DISK_SECTORS - 1, 2),  # crosses the end
        (T_OUT, DISK_SECTORS - 1, 2),
        (T_IN, 2**64 - 1, 1),  # sector * 512 overflows
        (T_OUT, 2**55, 1),  # so does sector * 512 in 64-bit offsets
    ],
)
def test_out_of_capacity_is_ioerr(new_rig: Any, req_type: int, sector: int, nsectors: int) -> None:
    rig = new_rig()
    if req_type == T_IN:
        done = rig.request(T_IN, sector=sector, in_len=nsectors * SECTOR)
    else:
        done = rig.request(T_OUT, sector=sector, payload=b"y" * nsectors * SECTOR)
    assert done.status == S_IOERR
    assert done.used_len == 1
    assert rig.file_bytes() == rig.contents
    assert os.fstat(rig.fd).st_size == DISK_SECTORS * SECTOR


def test_partial_sector_is_ioerr(new_rig: Any) -> None:
    rig = new_rig()
    assert rig.request(T_IN, sector=0, in_len=SECTOR + 1).status == S_IOERR
    assert rig.request(T_OUT, sector=0, payload=b"z" * 100).status == S_IOERR
    assert rig.file_bytes() == rig.contents


def test_short_read_at_end_of_file_is_ioerr(new_rig: Any) -> None:
    """A capacity larger than the file: the read hits EOF and must not report success."""
    rig = new_rig()
    os.ftruncate(rig.fd, (DISK_SECTORS - 1) * SECTOR)  # the last sector is gone
    done = rig.request(T_IN, sector=DISK_SECTORS - 2, in_len=2 * SECTOR)
    assert done.status == S_IOERR


@pytest.mark.parametrize("req_type", [2, 3, 10, 14, 0xFFFF_FFFF])
def test_unknown_type_is_unsupp(new_rig: Any, req_type: int) -> None:
    rig = new_rig()
    done = rig.request(req_type, in_len=SECTOR)
    assert done.status == S_UNSUPP
    assert done.used_len == 1
    assert rig.engine.stats()["unsupp"] == 1


# -- request framing ----------------------------------------------------------------------


def test_header_split_across_descriptors(new_rig: Any) -> None:
    rig = new_rig()
    hdr = header(T_IN, 7)
    done = rig.submit([hdr[:3], hdr[3:4], hdr[4:11], hdr[11:]], [SECTOR, 1])
    assert done.status == S_OK
    assert done.data == rig.contents[7 * SECTOR : 8 * SECTOR]


def test_header_and_payload_in_one_descriptor(new_rig: Any) -> None:
    rig = new_rig()
    payload = os.urandom(SECTOR)
    assert rig.submit([header(T_OUT, 5) + payload], [1]).status == S_OK
    assert rig.file_bytes(5 * SECTOR, SECTOR) == payload


def test_status_byte_as_tail_of_the_data_descriptor(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.submit([header(T_IN, 2)], [SECTOR + 1])
    assert done.status == S_OK
    assert done.data == rig.contents[2 * SECTOR : 3 * SECTOR]
    assert done.used_len == SECTOR + 1


def test_status_byte_in_its_own_descriptor(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.submit([header(T_IN, 2)], [SECTOR, 1])
    assert done.status == S_OK
    assert done.data == rig.contents[2 * SECTOR : 3 * SECTOR]


def test_zero_length_descriptors_are_skipped(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.submit([b"", header(T_IN, 1), b""], [0, SECTOR, 0, 1])
    assert done.status == S_OK
    assert done.data == rig.contents[SECTOR : 2 * SECTOR]


def test_chain_too_short_for_a_header(new_rig: Any) -> None:
    rig = new_rig()
    done = rig.submit([header(T_IN)[:15]], [SECTOR, 1])
    assert done.status == S_IOERR
    assert done.used_len == 0
    assert rig.engine.stats()["ioerr"] == 1


def test_chain_without_writable_byte(new_rig: Any) -> None:
    rig = new_rig()
    payload = os.urandom(SECTOR)
    done = rig.submit([header(T_OUT, 0), payload], [])
    assert done.status is None and done.used_len == 0
    assert rig.file_bytes() == rig.contents  # not executed: no way to report the outcome
    assert rig.engine.stats()["ioerr"] == 1


def test_seg_max_is_enforced(new_rig: Any) -> None:
    rig = new_rig(seg_max=2)
    assert rig.submit([header(T_IN, 0)], [SECTOR, SECTOR, 1]).status == S_OK
    assert rig.submit([header(T_IN, 0)], [SECTOR, SECTOR, SECTOR, 1]).status == S_IOERR
    # The status tail of the last descriptor does not count as a data segment.
    assert rig.submit([header(T_IN, 0)], [SECTOR, SECTOR + 1]).status == S_OK
    pieces = [b"a" * SECTOR] * 3
    assert rig.submit([header(T_OUT, 0), *pieces], [1]).status == S_IOERR
    assert rig.file_bytes() == rig.contents


def test_size_max_is_enforced(new_rig: Any) -> None:
    rig = new_rig(size_max=1024)
    assert rig.submit([header(T_IN, 0)], [1024, 1024, 1]).status == S_OK
    assert rig.submit([header(T_IN, 0)], [2048, 1]).status == S_IOERR
    assert rig.submit([header(T_OUT, 0), b"b" * 2048], [1]).status == S_IOERR
    assert rig.file_bytes() == rig.contents


def test_indirect_chain(new_rig: Any) -> None:
    rig = new_rig()
    payload = os.urandom(2 * SECTOR)
    hdr = header(T_OUT, 40)
    done = rig.submit([hdr[:8], hdr[8:], payload[:700], payload[700:]], [1], indirect=True)
    assert done.status == S_OK
    assert rig.file_bytes(40 * SECTOR, 2 * SECTOR) == payload
    done = rig.submit([header(T_IN, 40)], [SECTOR, SECTOR, 1], indirect=True)
    assert done.status == S_OK and done.data == payload


def test_many_requests_in_one_pass(new_rig: Any) -> None:
    rig = new_rig()
    heads = [rig.driver.add_chain([header(T_IN, s)], [SECTOR, 1]) for s in range(5)]
    bufs = {h: rig.driver.writable_buffers(h) for h in heads}
    assert rig.engine.process_queue(0) == 5
    used = rig.driver.used()
    assert [h for h, _ in used] == heads
    for s, h in enumerate(heads):
        data_gpa, _ = bufs[h][0]
        assert rig.memory.read(data_gpa, SECTOR) == rig.contents[s * SECTOR : (s + 1) * SECTOR]
    assert eventfd_value(rig.call) == 1  # one interrupt for the whole batch


def test_no_interrupt_suppresses_the_call(new_rig: Any) -> None:
    rig = new_rig()
    rig.driver.set_no_interrupt(True)
    assert rig.request(T_FLUSH).status == S_OK
    assert eventfd_value(rig.call) == 0
    rig.driver.set_no_interrupt(False)
    assert rig.request(T_FLUSH).status == S_OK
    assert eventfd_value(rig.call) == 1


def test_empty_ring_completes_nothing(new_rig: Any) -> None:
    rig = new_rig()
    assert rig.engine.process_queue(0) == 0
    assert eventfd_value(rig.call) == 0
    assert rig.engine.stats()["requests"] == 0


# -- broken queues ------------------------------------------------------------------------

OUTSIDE_RAM = 0x1_0000_0000


def _malformed(rig: Rig, case: str, base: int = 0) -> int:
    """Publish a malformed chain whose descriptors land in slots ``base``, ``base + 1``
    (split links are slot numbers); returns the errno the engine must report."""
    d = rig.driver
    hdr_gpa = d.alloc(16)
    status_gpa = d.alloc(1)
    w, n, ind = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT
    if case == "outside_ram":
        d.add_descriptors([(OUTSIDE_RAM, 16, n, base + 1), (status_gpa, 1, w, 0)])
        return errno.EFAULT
    if case == "straddles_ram_end":
        d.add_descriptors([(RAM[0][1] - 8, 16, n, base + 1), (status_gpa, 1, w, 0)])
        return errno.EFAULT
    if case == "readable_after_writable":
        d.add_descriptors([(status_gpa, 1, w | n, base + 1), (hdr_gpa, 16, 0, 0)])
        return errno.EINVAL
    if case == "indirect_with_next":
        table, tlen = d.indirect_table([(hdr_gpa, 16, 0, 0)])
        d.add_descriptors([(table, tlen, ind | n, base + 1), (status_gpa, 1, w, 0)])
        return errno.EINVAL
    if case == "nested_indirect":
        inner, ilen = d.indirect_table([(hdr_gpa, 16, 0, 0)])
        outer, olen = d.indirect_table([(inner, ilen, ind, 0)])
        d.add_descriptors([(outer, olen, ind, 0)])
        return errno.EINVAL
    if case == "indirect_bad_length":
        table, _ = d.indirect_table([(hdr_gpa, 16, 0, 0), (status_gpa, 1, w, 0)])
        d.add_descriptors([(table, 24, ind, 0)])
        return errno.EINVAL
    if case == "indirect_outside_ram":
        d.add_descriptors([(OUTSIDE_RAM, 32, ind, 0)])
        return errno.EFAULT
    if case == "loop":  # split only: base -> base + 1 -> base -> ...
        d.add_descriptors([(hdr_gpa, 16, n, base + 1), (hdr_gpa, 16, n, base)])
        return errno.ELOOP
    if case == "indirect_loop":  # split only: a table entry pointing back at itself
        table, tlen = d.indirect_table([(hdr_gpa, 16, n, 1), (status_gpa, 1, n | w, 1)])
        d.add_descriptors([(table, tlen, ind, 0)])
        return errno.ELOOP
    if case == "next_out_of_range":  # split only
        d.add_descriptors([(hdr_gpa, 16, n, rig.driver.size), (status_gpa, 1, w, 0)])
        return errno.EINVAL
    raise AssertionError(case)


COMMON_CASES = [
    "outside_ram",
    "straddles_ram_end",
    "readable_after_writable",
    "indirect_with_next",
    "nested_indirect",
    "indirect_bad_length",
    "indirect_outside_ram",
]
SPLIT_CASES = ["loop", "indirect_loop", "next_out_of_range"]


@pytest.mark.parametrize(
    ("packed", "case"),
    [(False, c) for c in COMMON_CASES + SPLIT_CASES] + [(True, c) for c in COMMON_CASES],
)
def test_malformed_chain_breaks_the_queue(
    tmp_path: Path, rigs: list[Rig], packed: bool, case: str
) -> None:
    rig = make_rig(tmp_path, packed=packed)
    rigs.append(rig)
    # A good request first: it must still complete before the bad one breaks the queue.
    good = rig.driver.add_chain([header(T_FLUSH)], [1])  # split: slots 0 and 1
    expected = _malformed(rig, case, base=2)
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_queue(0)
    assert info.value.errno == expected
    assert [h for h, _ in rig.driver.used()] == [good]
    assert rig.engine.queue_error(0) == -expected
    assert eventfd_value(rig.engine.error_fd) == 1
    # Sticky: the queue stays broken with its first error, and no new signal.
    rig.driver.add_chain([header(T_FLUSH)], [1])
    with pytest.raises(VirtQueueError) as again:
        rig.engine.process_queue(0)
    assert again.value.errno == expected
    assert rig.driver.used() == []
    assert eventfd_value(rig.engine.error_fd) == 0


def test_split_avail_idx_too_far_ahead_breaks_the_queue(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = make_rig(tmp_path)
    rigs.append(rig)
    d = rig.driver
    assert isinstance(d, SplitDriver)
    rig.memory.write_u16(d.driver_gpa + 2, d.size + 1)  # avail->idx
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_queue(0)
    assert info.value.errno == errno.EINVAL


def test_split_head_out_of_range_breaks_the_queue(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = make_rig(tmp_path)
    rigs.append(rig)
    d = rig.driver
    assert isinstance(d, SplitDriver)
    rig.memory.write_u16(d.driver_gpa + 4, d.size)  # avail->ring[0]
    rig.memory.write_u16(d.driver_gpa + 2, 1)
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_queue(0)
    assert info.value.errno == errno.EINVAL


def test_indirect_refused_when_not_negotiated(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = make_rig(tmp_path)
    rigs.append(rig)
    d = rig.driver
    # Set the queue up again without INDIRECT.
    flags = d.flags & ~QueueFlags.INDIRECT
    rig.engine.setup_queue(
        0, d.size, flags, d.desc_gpa, d.driver_gpa, d.device_gpa, rig.kick, rig.call
    )
    d.add_chain([header(T_FLUSH)], [1], indirect=True)
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_queue(0)
    assert info.value.errno == errno.EINVAL


def test_setup_again_repairs_a_broken_queue(new_rig: Any) -> None:
    rig = new_rig()
    _malformed(rig, "outside_ram")
    with pytest.raises(VirtQueueError):
        rig.engine.process_queue(0)
    # A device reset: fresh rings, the same memory.
    d = make_driver(rig.memory, 16, 0x10000, packed=isinstance(rig.driver, PackedDriver))
    rig.engine.setup_queue(
        0, 16, d.flags, d.desc_gpa, d.driver_gpa, d.device_gpa, rig.kick, rig.call
    )
    assert rig.engine.queue_error(0) == 0
    d.add_chain([header(T_FLUSH)], [1])
    assert rig.engine.process_queue(0) == 1


@pytest.mark.parametrize(
    ("size", "desc", "driver", "device", "code"),
    [
        (0, 0x1000, 0x2000, 0x3000, errno.EINVAL),
        (16, 0x1008, 0x2000, 0x3000, errno.EINVAL),  # descriptor area not 16-aligned
        (16, 0x1000, 0x2000, 0x3002, errno.EINVAL),  # device area not 4-aligned
        (16, OUTSIDE_RAM, 0x2000, 0x3000, errno.EFAULT),
        (16, RAM[0][1] - 15 * 16, 0x2000, 0x3000, errno.EFAULT),  # last descriptor outside
    ],
)
def test_setup_checks_the_ring_layout(
    new_rig: Any, size: int, desc: int, driver: int, device: int, code: int
) -> None:
    rig = new_rig()
    flags = rig.driver.flags
    with pytest.raises(VirtQueueError) as info:
        rig.engine.setup_queue(0, size, flags, desc, driver, device, rig.kick, rig.call)
    assert info.value.errno == code


def test_split_event_fields_must_be_in_ram(tmp_path: Path, rigs: list[Rig]) -> None:
    """The used ring fits but its trailing avail_event does not: refused."""
    rig = make_rig(tmp_path, event_idx=True)
    rigs.append(rig)
    d = rig.driver
    device = RAM[0][1] - (4 + 8 * 16)
    with pytest.raises(VirtQueueError) as info:
        rig.engine.setup_queue(0, 16, d.flags, 0x10000, 0x20000, device, rig.kick, rig.call)
    assert info.value.errno == errno.EFAULT
    rig.engine.setup_queue(0, 16, d.flags, 0x10000, 0x20000, device - 4, rig.kick, rig.call)


def test_split_size_must_be_a_power_of_two(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = make_rig(tmp_path)
    rigs.append(rig)
    d = rig.driver
    with pytest.raises(VirtQueueError) as info:
        rig.engine.setup_queue(0, 12, d.flags, 0x10000, 0x20000, 0x30000, rig.kick, rig.call)
    assert info.value.errno == errno.EINVAL


def test_engine_rejects_a_bad_config(tmp_path: Path) -> None:
    with GuestMemory(RAM) as memory:
        with pytest.raises(BlkEngineError) as info:
            BlkEngine(memory, BlkEngineConfig(fd=0, capacity=8, blk_size=1000), 1)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(BlkEngineError):
            BlkEngine(memory, BlkEngineConfig(fd=-1, capacity=8), 1)
        with pytest.raises(BlkEngineError):  # 2**64 sectors do not fit a file offset
            BlkEngine(memory, BlkEngineConfig(fd=0, capacity=2**64 - 1), 1)
        with pytest.raises(BlkEngineError) as info:
            BlkEngine(memory, BlkEngineConfig(fd=0, capacity=-1), 1)
        assert info.value.errno == errno.EINVAL


# -- worker threads -----------------------------------------------------------------------


def test_worker_serves_a_kick_and_signals_the_call_fd(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_queue(0)
    head = rig.driver.add_chain([header(T_IN, 9)], [SECTOR, 1])
    data_gpa, _ = rig.driver.writable_buffers(head)[0]
    os.eventfd_write(rig.kick, 1)
    assert wait_readable(rig.call), "the worker did not signal the call eventfd"
    assert eventfd_value(rig.call) >= 1
    assert rig.driver.used() == [(head, SECTOR + 1)]
    assert rig.memory.read(data_gpa, SECTOR) == rig.contents[9 * SECTOR : 10 * SECTOR]
    # Several kicks in a row.
    for sector in range(3):
        payload = bytes([sector + 1]) * SECTOR
        rig.driver.add_chain([header(T_OUT, sector), payload], [1])
        os.eventfd_write(rig.kick, 1)
        assert wait_readable(rig.call)
        eventfd_value(rig.call)
        assert len(rig.driver.used()) == 1
        assert rig.file_bytes(sector * SECTOR, SECTOR) == payload
    with pytest.raises(BlkEngineError) as info:
        rig.engine.process_queue(0)  # a worker owns the queue
    assert info.value.errno == errno.EBUSY
    rig.engine.stop()
    rig.engine.stop()  # idempotent
    # Stopped: the queue is the caller's again and keeps its state.
    rig.driver.add_chain([header(T_FLUSH)], [1])
    assert rig.engine.process_queue(0) == 1


def test_worker_restarts_after_stop(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_queue(0)
    rig.engine.stop()
    rig.engine.start_queue(0)
    rig.driver.add_chain([header(T_FLUSH)], [1])
    os.eventfd_write(rig.kick, 1)
    assert wait_readable(rig.call)
    assert len(rig.driver.used()) == 1


def test_worker_reports_a_broken_queue_on_the_error_fd(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_queue(0)
    _malformed(rig, "outside_ram")
    os.eventfd_write(rig.kick, 1)
    assert wait_readable(rig.engine.error_fd), "the worker did not report the broken queue"
    assert rig.engine.queue_error(0) == -errno.EFAULT
    # The worker stays idle until stopped; later kicks change nothing.
    rig.driver.add_chain([header(T_FLUSH)], [1])
    os.eventfd_write(rig.kick, 1)
    rig.engine.stop()
    assert rig.driver.used() == []
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_queue(0)
    assert info.value.errno == errno.EFAULT


def test_close_with_running_workers(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_queue(0)
    rig.engine.close()
    rig.engine.close()
    with pytest.raises(BlkEngineError):
        rig.engine.process_queue(0)


# -- index wrap-around --------------------------------------------------------------------


def test_split_indices_wrap_past_65535(tmp_path: Path, rigs: list[Rig]) -> None:
    """More than 2**16 requests through a 4-entry ring: avail/used indices wrap, the
    used ring stays in step, and event idx notifications follow the wrapped arithmetic.

    The driver's Python bookkeeping is too slow for 65 K chains, so the ring is driven by
    hand: four indirect chains (FLUSH header + status) are made available again and again.
    """
    size = 4
    rig = make_rig(tmp_path, size=size, event_idx=True, flush=True)
    rigs.append(rig)
    d, mem = rig.driver, rig.memory
    assert isinstance(d, SplitDriver)
    status = [d.alloc(1) for _ in range(size)]
    tables = []
    for i in range(size):
        hdr = d.alloc(16)
        mem.write(hdr, header(T_GET_ID))
        tables.append(
            d.indirect_table(
                [(hdr, 16, VIRTQ_DESC_F_NEXT, 1), (status[i], 1, VIRTQ_DESC_F_WRITE, 0)]
            )
        )
    heads = [
        d.add_descriptors([(gpa, n, VIRTQ_DESC_F_INDIRECT, 0)], publish=False) for gpa, n in tables
    ]
    # One interrupt when used idx passes 2: once at the very start (the first is always
    # sent) and once more after the 16-bit wrap.
    d.set_used_event(2)
    avail_ring, avail_idx = d.driver_gpa + 4, d.driver_gpa + 2
    used_idx = d.device_gpa + 2
    for i, head in enumerate(heads):
        mem.write_u16(avail_ring + 2 * i, head)  # the same heads in the same slots forever
    total = (1 << 16) + 2 * size
    idx = 0
    notified = 0
    for _ in range(total // size):
        idx = (idx + size) & 0xFFFF
        mem.write_u16(avail_idx, idx)
        assert rig.engine.process_queue(0) == size
        notified += eventfd_value(rig.call)
        if idx < size * 4:
            assert mem.read_u16(used_idx) == idx
    assert mem.read_u16(used_idx) == total & 0xFFFF
    assert d.avail_event() == total & 0xFFFF
    for i in range(size):
        elem = d.device_gpa + 4 + 8 * i
        assert (mem.read_u32(elem), mem.read_u32(elem + 4)) == (heads[i], 1)
        assert mem.read_u8(status[i]) == S_OK
    stats = rig.engine.stats()
    assert stats["requests"] == total and stats["ioerr"] == stats["unsupp"] == 0
    assert notified == 2


def test_packed_ring_wraps_many_times(tmp_path: Path, rigs: list[Rig]) -> None:
    """A 4-slot packed ring with chains of 1-3 descriptors: the wrap counters flip many
    times, on both sides, in the middle of chains too."""
    rig = make_rig(tmp_path, packed=True, size=4)
    rigs.append(rig)
    for i in range(200):
        sector = i % DISK_SECTORS
        nseg = 1 + i % 3
        if nseg == 1:
            done = rig.submit([header(T_IN, sector)], [SECTOR + 1])
        elif nseg == 2:
            done = rig.submit([header(T_IN, sector)], [SECTOR, 1])
        else:
            hdr = header(T_IN, sector)
            done = rig.submit([hdr[:8], hdr[8:]], [SECTOR + 1])
        assert done.status == S_OK
        assert done.data == rig.contents[sector * SECTOR : (sector + 1) * SECTOR]


def test_packed_event_idx_asks_for_interrupts_at_the_event(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = make_rig(tmp_path, packed=True, event_idx=True, size=8)
    rigs.append(rig)
    d = rig.driver
    assert isinstance(d, PackedDriver)
    # Indirect chains: one ring slot each, so slot positions count requests.
    rig.submit([header(T_FLUSH)], [1], indirect=True)  # the first always interrupts
    assert eventfd_value(rig.call) == 1
    for i in range(1, 40):
        # Ask for an interrupt only when the slot of every fifth request is used.
        d.set_used_event(i - i % 5 + 5 if i % 5 else i)
        assert rig.submit([header(T_FLUSH)], [1], indirect=True).status == S_OK
        assert eventfd_value(rig.call) == (1 if i % 5 == 0 else 0), i
