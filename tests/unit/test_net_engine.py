"""Tests of the C virtio-net data path (csrc/net.c over csrc/virtqueue.c) via NetEngine.

The synthetic driver (:mod:`iovirt.testing.virtio_driver`) plays the guest: one driver for
the receiveq, one for the transmitq, each in its own RAM region (a driver takes its data
buffers from the rest of the region holding its rings). The backend is a
:class:`~iovirt.backends.net.SocketPairNetBackend`: the test holds the peer end of the
SOCK_SEQPACKET pair and plays the tap. Most tests run the pair on the test's thread
(``process_pair``); the worker tests kick it through eventfds and wait on the call and
error eventfds.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from iovirt.backends.net import VNET_HDR_LEN, SocketPairNetBackend
from iovirt.memory import GuestMemory
from iovirt.testing.virtio_driver import PackedDriver, SplitDriver, make_driver
from iovirt.virtio.cengine import (
    NetEngine,
    NetEngineConfig,
    NetEngineError,
    NetFilter,
)
from iovirt.virtio.queue import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtQueueError,
)

Driver = SplitDriver | PackedDriver

# Two RAM regions: the receiveq's rings and buffers in one, the transmitq's in the other.
RX_REGION = (0, 2 << 20)
TX_REGION = (4 << 20, 2 << 20)
RAM = [RX_REGION, TX_REGION]
RX_BASE = RX_REGION[0] + 0x1000
TX_BASE = TX_REGION[0] + 0x1000
OUTSIDE_RAM = 0x1_0000_0000
WAIT_S = 5.0  # generous: a worker normally answers in microseconds

MAX_PACKET = 65536 + 14  # IOV_NET_MAX_PACKET: a 64 KiB GSO frame plus an Ethernet header
ETH_HLEN = 14
NUM_BUFFERS_OFF = 10  # le16 num_buffers in struct virtio_net_hdr_v1

OWN_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("525400abcdef")
FOREIGN_MAC = bytes.fromhex("525400999999")
BROADCAST = b"\xff" * 6
MCAST_LISTED = bytes.fromhex("01005e000001")
MCAST_OTHER = bytes.fromhex("333300000001")


def vnet_hdr(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    num_buffers: int = 0,
) -> bytes:
    """struct virtio_net_hdr_v1 (virtio 1.2, 5.1.6)."""
    return struct.pack(
        "<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
    )


def frame(dst: bytes = OWN_MAC, payload: bytes = b"", size: int = 0) -> bytes:
    """An Ethernet frame to ``dst``; ``size`` pads the payload with a pattern."""
    body = payload + bytes(i & 0xFF for i in range(max(0, size - ETH_HLEN - len(payload))))
    return dst + PEER_MAC + b"\x08\x00" + body


def packet(fr: bytes, **hdr: int) -> bytes:
    return vnet_hdr(**hdr) + fr


def with_num_buffers(pkt: bytes, n: int) -> bytes:
    """What the guest must see: the packet with num_buffers set by the device."""
    return pkt[:NUM_BUFFERS_OFF] + struct.pack("<H", n) + pkt[NUM_BUFFERS_OFF + 2 :]


@dataclass
class Rig:
    """Guest RAM, a receiveq and a transmitq driver, a socket-pair backend, an engine."""

    memory: GuestMemory
    rx: Driver
    tx: Driver
    engine: NetEngine
    backend: SocketPairNetBackend
    rx_kick: int
    tx_kick: int
    rx_call: int
    tx_call: int
    fds: list[int] = field(default_factory=list)

    @property
    def peer(self) -> int:
        return self.backend.peer_fds[0]

    def send(self, data: bytes) -> None:
        """The tap side sends one packet towards the guest."""
        assert os.write(self.peer, data) == len(data)

    def recv(self, timeout: float = 0.0) -> bytes | None:
        """One packet the guest sent, or None if none came within ``timeout``."""
        if not wait_readable(self.peer, timeout):
            return None
        return os.read(self.peer, 2 * MAX_PACKET)

    def rx_chain(self, *lengths: int) -> tuple[int, list[tuple[int, int]]]:
        """Post one receive chain of writable buffers; returns (head, its buffers)."""
        head = self.rx.add_chain([], list(lengths))
        return head, self.rx.writable_buffers(head)

    def read_bufs(self, bufs: list[tuple[int, int]], length: int) -> bytes:
        """The first ``length`` bytes written across ``bufs``."""
        raw = b"".join(self.memory.read(gpa, n) for gpa, n in bufs)
        return raw[:length]


def make_rig(
    *,
    packed: bool = False,
    event_idx: bool = False,
    size: int = 16,
    mrg_rxbuf: bool = True,
) -> Rig:
    memory = GuestMemory(RAM)
    rx = make_driver(memory, size, RX_BASE, packed=packed, event_idx=event_idx)
    tx = make_driver(memory, size, TX_BASE, packed=packed, event_idx=event_idx)
    backend = SocketPairNetBackend(1)
    os.set_blocking(backend.peer_fds[0], False)
    engine = NetEngine(memory, NetEngineConfig(hdr_len=VNET_HDR_LEN, mrg_rxbuf=mrg_rxbuf), 1)
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    rx_kick, tx_kick, rx_call, tx_call = fds
    for q, drv, kick, call in ((0, rx, rx_kick, rx_call), (1, tx, tx_kick, tx_call)):
        engine.setup_queue(
            q, size, drv.flags, drv.desc_gpa, drv.driver_gpa, drv.device_gpa, kick, call
        )
    engine.set_backend(0, backend.fds[0])
    return Rig(memory, rx, tx, engine, backend, rx_kick, tx_kick, rx_call, tx_call, fds)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    """Every rig a test makes gets torn down (engine first: its workers use the fds)."""
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.engine.close()
        rig.backend.close()
        for fd in rig.fds:
            os.close(fd)
        rig.memory.close()


@pytest.fixture(params=["split", "packed"])
def layout(request: pytest.FixtureRequest) -> bool:
    """Run the test on both ring layouts (the value is ``packed``)."""
    return bool(request.param == "packed")


@pytest.fixture
def new_rig(rigs: list[Rig], layout: bool) -> Any:
    def make(**kwargs: Any) -> Rig:
        kwargs.setdefault("packed", layout)
        rig = make_rig(**kwargs)
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


def assert_worker_idle(seconds: float = 0.2) -> None:
    """The process (a worker included) burns almost no CPU while nothing happens: a
    worker that spun on a poll() that never blocks would use all of ``seconds``."""
    start = time.process_time()
    time.sleep(seconds)
    assert time.process_time() - start < seconds / 2


def hang_up(rig: Rig) -> None:
    """The tap side goes away (shutdown: the backend still owns and closes the fd)."""
    socket.socket(fileno=os.dup(rig.peer)).shutdown(socket.SHUT_RDWR)


# -- transmit -----------------------------------------------------------------------------


def test_tx_one_frame_reaches_the_peer_as_written(new_rig: Any) -> None:
    rig = new_rig()
    pkt = packet(frame(FOREIGN_MAC, b"hello"), flags=1, csum_start=34, csum_offset=6)
    head = rig.tx.add_chain([pkt], [])
    assert rig.engine.process_pair(0) == 1
    assert rig.recv() == pkt  # header and frame, byte for byte
    assert rig.recv() is None
    assert rig.tx.used() == [(head, 0)]
    assert eventfd_value(rig.tx_call) == 1
    stats = rig.engine.stats()
    assert stats["tx_packets"] == 1 and stats["tx_bytes"] == len(pkt) - VNET_HDR_LEN
    assert stats["tx_errors"] == 0


@pytest.mark.parametrize("indirect", [False, True])
def test_tx_gathers_a_packet_from_several_descriptors(new_rig: Any, indirect: bool) -> None:
    rig = new_rig()
    pkt = packet(frame(BROADCAST, size=1500))
    cuts = [0, 5, 15, 16, 700, len(pkt)]
    pieces = [pkt[a:b] for a, b in itertools.pairwise(cuts)]
    head = rig.tx.add_chain(pieces, [], indirect=indirect)
    assert rig.engine.process_pair(0) == 1
    assert rig.recv() == pkt
    assert rig.tx.used() == [(head, 0)]


def test_tx_of_several_chains_in_one_pass_keeps_their_order(new_rig: Any) -> None:
    rig = new_rig()
    pkts = [packet(frame(payload=bytes([i]) * (i + 1))) for i in range(10)]
    heads = [rig.tx.add_chain([p], []) for p in pkts]
    assert rig.engine.process_pair(0) == 10
    assert [rig.recv() for _ in pkts] == pkts
    assert [h for h, _ in rig.tx.used()] == heads
    assert eventfd_value(rig.tx_call) == 1  # one interrupt for the batch


@pytest.mark.parametrize(
    ("readable", "writable"),
    [
        ([vnet_hdr()[:8]], []),  # shorter than the header
        ([vnet_hdr()], []),  # a header and no frame
        ([vnet_hdr() + frame()[:13]], []),  # less than an Ethernet header
        ([vnet_hdr() + frame(size=MAX_PACKET + 1)], []),  # longer than any packet
        ([packet(frame())], [64]),  # a device-writable descriptor
        ([], [64]),  # nothing readable at all
    ],
    ids=["short-header", "header-only", "short-frame", "too-long", "writable", "rx-shaped"],
)
def test_tx_malformed_chain_is_completed_empty_and_counted(
    new_rig: Any, readable: list[bytes], writable: list[int]
) -> None:
    rig = new_rig()
    bad = rig.tx.add_chain(readable, writable)
    assert rig.engine.process_pair(0) == 0
    assert rig.tx.used() == [(bad, 0)]
    assert rig.recv() is None
    stats = rig.engine.stats()
    assert stats["tx_errors"] == 1 and stats["tx_packets"] == 0
    # The queue is not broken: the next frame goes out.
    good = packet(frame())
    head = rig.tx.add_chain([good], [])
    assert rig.engine.process_pair(0) == 1
    assert rig.recv() == good
    assert rig.tx.used() == [(head, 0)]
    assert rig.engine.queue_error(1) == 0


def test_tx_largest_packet_goes_out(new_rig: Any) -> None:
    rig = new_rig()
    pkt = packet(frame(size=MAX_PACKET))
    rig.tx.add_chain([pkt], [])
    assert rig.engine.process_pair(0) == 1
    assert rig.recv() == pkt


def test_tx_waits_for_the_backend_instead_of_dropping(new_rig: Any) -> None:
    """The socket fills up (EAGAIN): the chain in hand is kept and sent later, in order."""
    rig = new_rig()
    pkts = [packet(frame(payload=bytes([i]), size=60000)) for i in range(12)]
    heads = [rig.tx.add_chain([p], []) for p in pkts]
    first = rig.engine.process_pair(0)
    assert 0 < first < len(pkts)  # a socket buffer holds a few of these, not twelve
    assert len(rig.tx.used()) == first
    got: list[bytes] = []
    while (p := rig.recv()) is not None:
        got.append(p)
    assert rig.engine.process_pair(0) > 0
    for _ in range(len(pkts)):
        while (p := rig.recv()) is not None:
            got.append(p)
        if len(got) == len(pkts):
            break
        rig.engine.process_pair(0)
    assert got == pkts
    assert [h for h, _ in rig.tx.used()] == heads[first:]
    stats = rig.engine.stats()
    assert stats["tx_packets"] == len(pkts) and stats["tx_errors"] == 0


def test_tx_to_a_hung_up_peer_completes_with_errors(new_rig: Any) -> None:
    rig = new_rig()
    hang_up(rig)
    head = rig.tx.add_chain([packet(frame())], [])
    assert rig.engine.process_pair(0) == 0
    assert rig.tx.used() == [(head, 0)]
    assert rig.engine.stats()["tx_errors"] == 1


# -- receive ------------------------------------------------------------------------------


def test_rx_without_mrg_fills_one_buffer_and_sets_num_buffers(new_rig: Any) -> None:
    rig = new_rig(mrg_rxbuf=False)
    head, bufs = rig.rx_chain(2048)
    # A tap leaves num_buffers as it was; the device must set it to 1 (virtio 1.2, 5.1.6.4).
    pkt = packet(frame(size=300), flags=2, gso_type=0, num_buffers=0x5555)
    rig.send(pkt)
    assert rig.engine.process_pair(0) == 1
    assert rig.rx.used() == [(head, len(pkt))]
    assert rig.read_bufs(bufs, len(pkt)) == with_num_buffers(pkt, 1)
    assert eventfd_value(rig.rx_call) == 1
    stats = rig.engine.stats()
    assert stats["rx_packets"] == 1 and stats["rx_bytes"] == 300


def test_rx_without_mrg_scatters_over_the_chain_s_descriptors(new_rig: Any) -> None:
    rig = new_rig(mrg_rxbuf=False)
    head, bufs = rig.rx_chain(12, 100, 1000)
    pkt = packet(frame(size=500))
    rig.send(pkt)
    assert rig.engine.process_pair(0) == 1
    assert rig.rx.used() == [(head, len(pkt))]
    assert rig.read_bufs(bufs, len(pkt)) == with_num_buffers(pkt, 1)


def test_rx_without_mrg_drops_a_packet_too_big_for_the_buffer(new_rig: Any) -> None:
    rig = new_rig(mrg_rxbuf=False)
    small, _ = rig.rx_chain(100)
    big, bufs = rig.rx_chain(2048)
    rig.send(packet(frame(size=200)))
    rig.send(packet(frame(size=60)))
    assert rig.engine.process_pair(0) == 1
    # The first chain comes back empty (never half a packet); the next packet fits the next.
    used = rig.rx.used()
    assert used == [(small, 0), (big, VNET_HDR_LEN + 60)]
    assert rig.read_bufs(bufs, VNET_HDR_LEN + 60) == with_num_buffers(packet(frame(size=60)), 1)
    assert rig.engine.stats()["rx_dropped_nobuf_or_short"] == 1


@pytest.mark.parametrize(
    "chain_lengths",
    [
        [[100], [100], [100], [100], [100]],
        [[8], [50, 50], [2000]],  # the header (and num_buffers) straddles two chains
        [[11], [1], [500]],  # num_buffers' two bytes land in two different chains
    ],
    ids=["equal", "tiny-first", "split-num-buffers"],
)
def test_rx_mrg_spreads_a_packet_over_several_chains(
    new_rig: Any, chain_lengths: list[list[int]]
) -> None:
    rig = new_rig()
    posted = [rig.rx_chain(*lengths) for lengths in chain_lengths]
    pkt = packet(frame(size=300), num_buffers=0x7777)
    rig.send(pkt)
    assert rig.engine.process_pair(0) == 1
    used = rig.rx.used()
    # Chains are filled in order, each as full as it goes, until the packet is in.
    expected = []
    left = len(pkt)
    for head, bufs in posted:
        if left == 0:
            break
        n = min(left, sum(length for _, length in bufs))
        expected.append((head, n))
        left -= n
    assert used == expected
    data = b"".join(rig.read_bufs(bufs, n) for (_, bufs), (_, n) in zip(posted, used, strict=False))
    assert data == with_num_buffers(pkt, len(used))
    assert rig.engine.stats()["rx_packets"] == 1


def test_rx_mrg_packet_in_one_chain_has_num_buffers_1(new_rig: Any) -> None:
    rig = new_rig()
    head, bufs = rig.rx_chain(4096)
    pkt = packet(frame(size=1514))
    rig.send(pkt)
    assert rig.engine.process_pair(0) == 1
    assert rig.rx.used() == [(head, len(pkt))]
    assert rig.read_bufs(bufs, len(pkt)) == with_num_buffers(pkt, 1)


@pytest.mark.parametrize("event_idx", [False, True])
def test_rx_mrg_ring_running_dry_mid_packet_resumes_on_more_buffers(
    new_rig: Any, event_idx: bool
) -> None:
    rig = new_rig(event_idx=event_idx)
    first = [rig.rx_chain(100) for _ in range(2)]
    rig.rx.device_wants_kicks()  # (reset the driver's kick bookkeeping)
    pkt = packet(frame(size=300))
    rig.send(pkt)
    assert rig.engine.process_pair(0) == 0
    assert rig.rx.used() == []  # held, not returned: the packet is not complete
    assert eventfd_value(rig.rx_call) == 0
    more = [rig.rx_chain(100) for _ in range(3)]
    assert rig.rx.device_wants_kicks()  # the device asked to hear about new buffers
    assert rig.engine.process_pair(0) == 1
    posted = first + more
    used = rig.rx.used()
    assert used == [(posted[i][0], n) for i, n in enumerate([100, 100, 100, 12])]
    data = b"".join(rig.read_bufs(posted[i][1], n) for i, (_, n) in enumerate(used))
    assert data == with_num_buffers(pkt, 4)
    assert eventfd_value(rig.rx_call) == 1
    stats = rig.engine.stats()
    assert stats["rx_packets"] == 1 and stats["rx_dropped_nobuf_or_short"] == 0


def test_rx_mrg_packet_larger_than_the_whole_ring_is_dropped(new_rig: Any) -> None:
    rig = new_rig(size=4)
    posted = [rig.rx_chain(32) for _ in range(4)]
    rig.send(packet(frame(size=500)))  # 4 x 32 bytes can never hold it
    assert rig.engine.process_pair(0) == 0
    assert rig.rx.used() == [(head, 0) for head, _ in posted]
    assert rig.engine.stats()["rx_dropped_nobuf_or_short"] == 1
    # The ring works on: a packet that fits goes into fresh chains.
    head, bufs = rig.rx_chain(200)
    pkt = packet(frame(size=100))
    rig.send(pkt)
    assert rig.engine.process_pair(0) == 1
    assert rig.rx.used() == [(head, len(pkt))]
    assert rig.read_bufs(bufs, len(pkt)) == with_num_buffers(pkt, 1)


@pytest.mark.parametrize("mrg_rxbuf", [False, True])
def test_rx_with_no_buffers_waits_and_loses_nothing(new_rig: Any, mrg_rxbuf: bool) -> None:
    rig = new_rig(mrg_rxbuf=mrg_rxbuf)
    pkts = [packet(frame(payload=bytes([i]), size=80)) for i in range(3)]
    for p in pkts:
        rig.send(p)
    rig.rx.device_wants_kicks()
    assert rig.engine.process_pair(0) == 0
    assert rig.rx.used() == []
    posted = [rig.rx_chain(2048) for _ in range(3)]
    assert rig.rx.device_wants_kicks()  # out of buffers: the device wants the kick
    assert rig.engine.process_pair(0) == 3
    used = rig.rx.used()
    assert used == [(head, len(p)) for (head, _), p in zip(posted, pkts, strict=True)]
    for (_, bufs), p in zip(posted, pkts, strict=True):
        assert rig.read_bufs(bufs, len(p)) == with_num_buffers(p, 1)
    stats = rig.engine.stats()
    assert stats["rx_packets"] == 3 and stats["rx_dropped_nobuf_or_short"] == 0


def test_rx_while_buffers_last_the_guest_need_not_kick(new_rig: Any) -> None:
    rig = new_rig()
    rig.rx_chain(2048)
    rig.rx_chain(2048)
    rig.send(packet(frame()))
    assert rig.engine.process_pair(0) == 1
    rig.rx.device_wants_kicks()
    rig.rx_chain(2048)
    assert not rig.rx.device_wants_kicks()


@pytest.mark.parametrize(
    "data",
    [b"", vnet_hdr(), packet(frame()[:13]), packet(frame(size=MAX_PACKET + 1))],
    ids=["empty", "header-only", "short-frame", "too-long"],
)
def test_rx_malformed_packet_is_dropped_without_using_a_buffer(new_rig: Any, data: bytes) -> None:
    rig = new_rig()
    head, bufs = rig.rx_chain(2048)
    rig.send(data)
    good = packet(frame(size=64))
    rig.send(good)
    assert rig.engine.process_pair(0) == 1
    assert rig.rx.used() == [(head, len(good))]  # the same chain took the next packet
    assert rig.read_bufs(bufs, len(good)) == with_num_buffers(good, 1)
    stats = rig.engine.stats()
    assert stats["rx_dropped_nobuf_or_short"] == 1 and stats["rx_packets"] == 1


def test_rx_largest_packet_with_mrg(new_rig: Any) -> None:
    rig = new_rig(size=32)
    posted = [rig.rx_chain(4096) for _ in range(17)]
    pkt = packet(frame(size=MAX_PACKET))
    rig.send(pkt)
    assert rig.engine.process_pair(0) == 1
    used = rig.rx.used()
    assert len(used) == 17 and sum(n for _, n in used) == len(pkt)
    data = b"".join(rig.read_bufs(posted[i][1], n) for i, (_, n) in enumerate(used))
    assert data == with_num_buffers(pkt, 17)


def test_rx_respects_no_interrupt(new_rig: Any) -> None:
    rig = new_rig()
    rig.rx.set_no_interrupt(True)
    rig.rx_chain(2048)
    rig.send(packet(frame()))
    assert rig.engine.process_pair(0) == 1
    assert eventfd_value(rig.rx_call) == 0
    assert len(rig.rx.used()) == 1


def test_rx_from_a_hung_up_peer_stops_reading(new_rig: Any) -> None:
    rig = new_rig()
    head, _ = rig.rx_chain(2048)
    pkt = packet(frame())
    rig.send(pkt)
    hang_up(rig)
    assert rig.engine.process_pair(0) == 1  # what was sent before the hang-up arrives
    assert rig.rx.used() == [(head, len(pkt))]
    rig.rx_chain(2048)
    assert rig.engine.process_pair(0) == 0
    assert rig.engine.stats()["rx_dropped_nobuf_or_short"] == 0


# -- receive filter -----------------------------------------------------------------------

FILTER_CASES: list[tuple[str, NetFilter, bytes, bool]] = [
    ("promisc-foreign", NetFilter(promisc=True), FOREIGN_MAC, True),
    ("own-mac", NetFilter(promisc=False, unicast=[OWN_MAC]), OWN_MAC, True),
    ("foreign-unicast", NetFilter(promisc=False, unicast=[OWN_MAC]), FOREIGN_MAC, False),
    ("second-unicast", NetFilter(promisc=False, unicast=[OWN_MAC, FOREIGN_MAC]), FOREIGN_MAC, True),
    ("alluni", NetFilter(promisc=False, alluni=True), FOREIGN_MAC, True),
    ("nouni", NetFilter(promisc=False, nouni=True, unicast=[OWN_MAC]), OWN_MAC, False),
    ("broadcast", NetFilter(promisc=False, unicast=[OWN_MAC]), BROADCAST, True),
    ("nobcast", NetFilter(promisc=False, nobcast=True), BROADCAST, False),
    ("mcast-listed", NetFilter(promisc=False, multicast=[MCAST_LISTED]), MCAST_LISTED, True),
    ("mcast-unlisted", NetFilter(promisc=False, multicast=[MCAST_LISTED]), MCAST_OTHER, False),
    ("allmulti", NetFilter(promisc=False, allmulti=True), MCAST_OTHER, True),
    ("nomulti", NetFilter(promisc=False, nomulti=True, allmulti=True), MCAST_LISTED, False),
    ("promisc-beats-no", NetFilter(promisc=True, nouni=True, nobcast=True), BROADCAST, True),
]


@pytest.mark.parametrize(
    ("flt", "dst", "delivered"),
    [case[1:] for case in FILTER_CASES],
    ids=[case[0] for case in FILTER_CASES],
)
def test_rx_filter(new_rig: Any, flt: NetFilter, dst: bytes, delivered: bool) -> None:
    rig = new_rig()
    rig.engine.set_filter(flt)
    head, bufs = rig.rx_chain(2048)
    pkt = packet(frame(dst, size=100))
    rig.send(pkt)
    assert rig.engine.process_pair(0) == int(delivered)
    stats = rig.engine.stats()
    if delivered:
        assert rig.rx.used() == [(head, len(pkt))]
        assert rig.read_bufs(bufs, len(pkt)) == with_num_buffers(pkt, 1)
        assert stats["rx_dropped_filter"] == 0
    else:
        assert rig.rx.used() == []  # dropped before it took a buffer
        assert stats["rx_dropped_filter"] == 1


def test_rx_filter_starts_promiscuous_and_changes_take_effect(new_rig: Any) -> None:
    rig = new_rig()
    for _ in range(3):
        rig.rx_chain(2048)
    rig.send(packet(frame(FOREIGN_MAC)))
    assert rig.engine.process_pair(0) == 1
    rig.engine.set_filter(NetFilter(promisc=False, unicast=[OWN_MAC]))
    rig.send(packet(frame(FOREIGN_MAC)))
    rig.send(packet(frame(OWN_MAC)))
    assert rig.engine.process_pair(0) == 1
    rig.engine.set_filter(NetFilter())
    rig.send(packet(frame(FOREIGN_MAC)))
    assert rig.engine.process_pair(0) == 1
    assert rig.engine.stats()["rx_dropped_filter"] == 1


def test_set_filter_checks_the_mac_lists(new_rig: Any) -> None:
    rig = new_rig()
    with pytest.raises(ValueError):
        rig.engine.set_filter(NetFilter(unicast=[b"\x01" * 7]))
    with pytest.raises(ValueError):
        rig.engine.set_filter(NetFilter(multicast=[bytes([1, 0, 0, 0, 0, i]) for i in range(65)]))
    full = [bytes([2, 0, 0, 0, 0, i]) for i in range(64)]
    rig.engine.set_filter(NetFilter(promisc=False, unicast=full))
    head, _ = rig.rx_chain(2048)
    rig.send(packet(frame(full[-1])))
    assert rig.engine.process_pair(0) == 1
    assert [h for h, _ in rig.rx.used()] == [head]


# -- broken queues ------------------------------------------------------------------------


def test_tx_descriptor_outside_ram_breaks_the_queue(new_rig: Any) -> None:
    rig = new_rig()
    good = packet(frame())
    head = rig.tx.add_chain([good], [])
    rig.tx.add_descriptors([(OUTSIDE_RAM, 64, 0, 0)])
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_pair(0)
    assert info.value.errno == errno.EFAULT
    assert rig.recv() == good  # what came before the bad chain went out
    assert rig.tx.used() == [(head, 0)]
    assert rig.engine.queue_error(1) == -errno.EFAULT
    assert rig.engine.queue_error(0) == 0
    assert eventfd_value(rig.engine.error_fd) == 1
    # Sticky, and the whole pair stops: no RX either, and no second signal.
    rig.rx_chain(2048)
    rig.send(packet(frame()))
    with pytest.raises(VirtQueueError):
        rig.engine.process_pair(0)
    assert rig.rx.used() == []
    assert eventfd_value(rig.engine.error_fd) == 0


def test_rx_descriptor_outside_ram_breaks_the_queue(new_rig: Any) -> None:
    rig = new_rig()
    rig.rx.add_descriptors([(OUTSIDE_RAM, 2048, VIRTQ_DESC_F_WRITE, 0)])
    rig.send(packet(frame()))
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_pair(0)
    assert info.value.errno == errno.EFAULT
    assert rig.engine.queue_error(0) == -errno.EFAULT
    assert eventfd_value(rig.engine.error_fd) == 1


def test_tx_looping_chain_breaks_the_queue(rigs: list[Rig]) -> None:
    rig = make_rig()
    rigs.append(rig)
    buf = rig.tx.alloc(64)
    n = VIRTQ_DESC_F_NEXT
    rig.tx.add_descriptors([(buf, 64, n, 1), (buf, 64, n, 0)])
    with pytest.raises(VirtQueueError) as info:
        rig.engine.process_pair(0)
    assert info.value.errno == errno.ELOOP


def test_setup_again_repairs_a_broken_pair(new_rig: Any) -> None:
    rig = new_rig()
    rig.tx.add_descriptors([(OUTSIDE_RAM, 64, 0, 0)])
    with pytest.raises(VirtQueueError):
        rig.engine.process_pair(0)
    # A device reset: fresh transmit rings in the same memory.
    tx = make_driver(rig.memory, 16, TX_BASE, packed=isinstance(rig.tx, PackedDriver))
    rig.engine.setup_queue(
        1, 16, tx.flags, tx.desc_gpa, tx.driver_gpa, tx.device_gpa, rig.tx_kick, rig.tx_call
    )
    assert rig.engine.queue_error(1) == 0
    pkt = packet(frame())
    tx.add_chain([pkt], [])
    assert rig.engine.process_pair(0) == 1
    assert rig.recv() == pkt


# -- configuration and lifecycle ----------------------------------------------------------


def test_engine_rejects_a_bad_config() -> None:
    with GuestMemory(RAM) as memory:
        for cfg in (
            NetEngineConfig(hdr_len=9),
            NetEngineConfig(hdr_len=10, mrg_rxbuf=True),  # no room for num_buffers
            NetEngineConfig(hdr_len=1 << 20),
            NetEngineConfig(hdr_len=-1),
        ):
            with pytest.raises(NetEngineError) as info:
                NetEngine(memory, cfg, 1)
            assert info.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            NetEngine(memory, NetEngineConfig(), 0)
        with pytest.raises(ValueError):
            NetEngine(memory, NetEngineConfig(), 17)
        with NetEngine(memory, NetEngineConfig(hdr_len=10, mrg_rxbuf=False), 1) as engine:
            with pytest.raises(NetEngineError) as info:
                engine.process_pair(0)  # nothing set up
            assert info.value.errno == errno.EINVAL
            with pytest.raises(NetEngineError):
                engine.start_pair(0)
            with pytest.raises(NetEngineError):
                engine.set_backend(0, -1)
            with pytest.raises(ValueError):
                engine.queue_error(2)


def test_second_pair_uses_queues_2_and_3(rigs: list[Rig]) -> None:
    rig = make_rig()
    rigs.append(rig)
    memory = rig.memory
    engine = NetEngine(memory, NetEngineConfig(), 2)
    backend = SocketPairNetBackend(2)
    try:
        # Pair 1 reuses the rig's rings (pair 0 of this engine stays unconfigured).
        for q, drv in ((2, rig.rx), (3, rig.tx)):
            engine.setup_queue(
                q, drv.size, drv.flags, drv.desc_gpa, drv.driver_gpa, drv.device_gpa, -1, -1
            )
        engine.set_backend(1, backend.fds[1])
        pkt = packet(frame())
        rig.tx.add_chain([pkt], [])
        head, _ = rig.rx_chain(2048)
        os.write(backend.peer_fds[1], pkt)
        assert engine.process_pair(1) == 2
        assert os.read(backend.peer_fds[1], 4096) == pkt
        assert rig.rx.used() == [(head, len(pkt))]
        with pytest.raises(NetEngineError):
            engine.process_pair(0)
    finally:
        engine.close()
        backend.close()


# -- worker threads -----------------------------------------------------------------------


def test_worker_transmits_on_a_kick_and_receives_from_the_peer(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_pair(0)
    pkt = packet(frame(FOREIGN_MAC, b"from the guest"))
    head = rig.tx.add_chain([pkt], [])
    os.eventfd_write(rig.tx_kick, 1)
    assert rig.recv(WAIT_S) == pkt
    assert wait_readable(rig.tx_call), "the worker did not signal the TX call eventfd"
    assert rig.tx.used() == [(head, 0)]
    # Receive: buffers first, then the peer sends; the interrupt comes on the RX call fd.
    rx_head, bufs = rig.rx_chain(2048)
    os.eventfd_write(rig.rx_kick, 1)
    incoming = packet(frame(OWN_MAC, b"to the guest"))
    rig.send(incoming)
    assert wait_readable(rig.rx_call), "the worker did not signal the RX call eventfd"
    assert rig.rx.used() == [(rx_head, len(incoming))]
    assert rig.read_bufs(bufs, len(incoming)) == with_num_buffers(incoming, 1)
    with pytest.raises(NetEngineError) as info:
        rig.engine.process_pair(0)  # a worker owns the pair
    assert info.value.errno == errno.EBUSY


def test_worker_waits_for_rx_buffers_then_delivers_on_the_kick(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_pair(0)
    pkts = [packet(frame(payload=bytes([i]), size=100)) for i in range(3)]
    for p in pkts:
        rig.send(p)
    assert not wait_readable(rig.rx_call, 0.05)  # nowhere to put them
    assert_worker_idle()  # and no polling of the fd meanwhile
    posted = [rig.rx_chain(2048) for _ in pkts]
    assert rig.rx.device_wants_kicks()
    os.eventfd_write(rig.rx_kick, 1)
    assert wait_readable(rig.rx_call)
    used: list[tuple[int, int]] = []
    for _ in range(100):
        used += rig.rx.used()
        if len(used) == len(pkts) or not wait_readable(rig.rx_call, 0.05):
            break
        eventfd_value(rig.rx_call)
    assert used == [(head, len(p)) for (head, _), p in zip(posted, pkts, strict=True)]
    for (_, bufs), p in zip(posted, pkts, strict=True):
        assert rig.read_bufs(bufs, len(p)) == with_num_buffers(p, 1)


def test_worker_retries_a_full_backend_when_it_drains(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_pair(0)
    pkts = [packet(frame(payload=bytes([i]), size=60000)) for i in range(12)]
    for p in pkts:
        rig.tx.add_chain([p], [])
    os.eventfd_write(rig.tx_kick, 1)
    got: list[bytes] = []
    while len(got) < len(pkts):
        p = rig.recv(WAIT_S)
        assert p is not None, f"only {len(got)} of {len(pkts)} packets came"
        got.append(p)
    assert got == pkts
    assert rig.engine.stats()["tx_errors"] == 0


def test_worker_reports_a_broken_queue_on_the_error_fd(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_pair(0)
    rig.tx.add_descriptors([(OUTSIDE_RAM, 64, 0, 0)])
    os.eventfd_write(rig.tx_kick, 1)
    assert wait_readable(rig.engine.error_fd), "the worker did not report the broken queue"
    assert rig.engine.queue_error(1) == -errno.EFAULT
    # The pair idles until stopped: later traffic goes nowhere.
    rig.rx_chain(2048)
    rig.send(packet(frame()))
    os.eventfd_write(rig.rx_kick, 1)
    rig.engine.stop()
    assert rig.rx.used() == []
    with pytest.raises(VirtQueueError):
        rig.engine.process_pair(0)


def test_worker_survives_a_hung_up_peer(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_pair(0)
    hang_up(rig)
    head = rig.tx.add_chain([packet(frame())], [])
    os.eventfd_write(rig.tx_kick, 1)
    assert wait_readable(rig.tx_call)
    assert rig.tx.used() == [(head, 0)]
    assert rig.engine.stats()["tx_errors"] == 1
    assert_worker_idle()  # the hang-up does not make poll() spin
    rig.engine.stop()


def test_stop_restart_and_close_with_workers_running(new_rig: Any) -> None:
    rig = new_rig()
    rig.engine.start_pair(0)
    with pytest.raises(NetEngineError) as info:
        rig.engine.start_pair(0)
    assert info.value.errno == errno.EBUSY
    rig.engine.stop()
    rig.engine.stop()  # idempotent
    # Stopped: the pair is the caller's again and keeps its state.
    pkt = packet(frame())
    rig.tx.add_chain([pkt], [])
    assert rig.engine.process_pair(0) == 1
    assert rig.recv() == pkt
    rig.engine.start_pair(0)
    rig.tx.add_chain([pkt], [])
    os.eventfd_write(rig.tx_kick, 1)
    assert rig.recv(WAIT_S) == pkt
    rig.engine.close()
    rig.engine.close()
    with pytest.raises(NetEngineError):
        rig.engine.process_pair(0)


# -- many packets, wrapping indices -------------------------------------------------------


def test_split_tx_indices_wrap_past_65535(rigs: list[Rig]) -> None:
    """More than 2**16 packets through a 4-entry ring with event idx. The driver's Python
    bookkeeping is too slow for that, so the ring is driven by hand: four chains are made
    available again and again."""
    size = 4
    rig = make_rig(size=size, event_idx=True)
    rigs.append(rig)
    d, mem = rig.tx, rig.memory
    assert isinstance(d, SplitDriver)
    pkts = [packet(frame(payload=bytes([i]), size=60)) for i in range(size)]
    heads = []
    for p in pkts:
        gpa = d.alloc(len(p))
        mem.write(gpa, p)
        heads.append(d.add_descriptors([(gpa, len(p), 0, 0)], publish=False))
    avail_ring, avail_idx = d.driver_gpa + 4, d.driver_gpa + 2
    for i, head in enumerate(heads):
        mem.write_u16(avail_ring + 2 * i, head)
    d.set_used_event(0xFFFF)  # one interrupt as the used idx passes 65535
    total = (1 << 16) + 2 * size
    idx = 0
    interrupts = 0
    for _ in range(total // size):
        idx = (idx + size) & 0xFFFF
        mem.write_u16(avail_idx, idx)
        assert rig.engine.process_pair(0) == size
        for p in pkts:
            assert os.read(rig.peer, 256) == p
        interrupts += eventfd_value(rig.tx_call)
    assert mem.read_u16(d.device_gpa + 2) == total & 0xFFFF
    assert d.avail_event() == total & 0xFFFF
    assert interrupts == 2  # the first one (always sent) and the one at the wrap
    assert rig.engine.stats()["tx_packets"] == total


@pytest.mark.parametrize("mrg_rxbuf", [False, True])
def test_many_packets_both_ways_through_a_small_ring(new_rig: Any, mrg_rxbuf: bool) -> None:
    """Hundreds of packets through 4-entry rings: the packed wrap counters flip many
    times; with merged buffers every other packet spans two chains."""
    rig = new_rig(size=4, mrg_rxbuf=mrg_rxbuf)
    chain_len = 160 if mrg_rxbuf else 2048
    for i in range(300):
        size = 100 + (i % 2) * 150
        out = packet(frame(payload=i.to_bytes(2, "little"), size=size))
        incoming = packet(frame(payload=i.to_bytes(2, "big"), size=size))
        nbuf = -(-len(incoming) // chain_len)
        rig.tx.add_chain([out], [])
        posted = [rig.rx_chain(chain_len) for _ in range(nbuf)]
        rig.send(incoming)
        assert rig.engine.process_pair(0) == 2
        assert rig.recv() == out
        assert len(rig.tx.used()) == 1
        used = rig.rx.used()
        assert [h for h, _ in used] == [h for h, _ in posted]
        data = b"".join(rig.read_bufs(posted[k][1], n) for k, (_, n) in enumerate(used))
        assert data == with_num_buffers(incoming, nbuf)
    stats = rig.engine.stats()
    assert stats["tx_packets"] == 300 and stats["rx_packets"] == 300
