"""The vhost-user codec, and iovirt's back-end against malformed and hostile messages.

Each hostile test plays a front-end over a socketpair against
:func:`~iovirt.backends.vhost_user_server.serve_connection` on a thread. A message that
breaks the rules must be answered with a failed REPLY_ACK (when the front-end asked for
one) or end the connection cleanly; either way the server thread returns normally, no
fd it received is kept, and the same device then serves a well-behaved front-end.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iovirt.backends.block import FileBlockBackend
from iovirt.backends.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    HEADER,
    MAX_PAYLOAD,
    U64,
    VRING_NOFD_MASK,
    VRING_STATE,
    ConfigAccess,
    InflightDesc,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    Request,
    VhostUserDisconnected,
    VhostUserProtocolError,
    VringAddr,
    decode_memory_table,
    encode_memory_table,
    read_message,
    send_message,
)
from iovirt.backends.vhost_user_server import (
    VhostUserBlkDevice,
    VhostUserConnection,
    serve_connection,
)
from iovirt.virtio.blk import BlkOptions

WAIT_S = 5.0
PAGE = 4096


# ---- codec --------------------------------------------------------------------------------


def test_memory_table_round_trips() -> None:
    regions = [
        MemoryRegionDesc(0, 1 << 20, 0x7F00_0000_0000, 0),
        MemoryRegionDesc(1 << 32, 4096, 1, 8192),
    ]
    assert decode_memory_table(encode_memory_table(regions)) == regions


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # shorter than the header
        struct.pack("<II", 0, 0),  # no regions
        struct.pack("<II", 9, 0) + bytes(9 * 32),  # more than 8
        struct.pack("<II", 2, 0) + bytes(32),  # says 2, carries 1
    ],
)
def test_bad_memory_tables_are_refused(payload: bytes) -> None:
    with pytest.raises(VhostUserProtocolError):
        decode_memory_table(payload)


def test_config_access_checks_its_size() -> None:
    good = ConfigAccess(4, 8, 0, bytes(8))
    assert ConfigAccess.decode(Message(Request.GET_CONFIG, payload=good.encode())) == good
    for payload in (
        struct.pack("<III", 0, 300, 0) + bytes(300),  # larger than a config space
        struct.pack("<III", 0, 8, 0) + bytes(4),  # size and data disagree
        struct.pack("<III", 250, 8, 0) + bytes(8),  # window past the end
        b"\x00",
    ):
        with pytest.raises(VhostUserProtocolError):
            ConfigAccess.decode(Message(Request.GET_CONFIG, payload=payload))


def test_inflight_accepts_qemus_padded_layout() -> None:
    desc = InflightDesc(4096, 0, 1, 128)
    assert len(desc.encode()) == 24
    assert InflightDesc.decode(Message(Request.SET_INFLIGHT_FD, payload=desc.encode())) == desc
    assert InflightDesc.decode(Message(Request.SET_INFLIGHT_FD, payload=desc.encode()[:20])) == desc
    with pytest.raises(VhostUserProtocolError):
        InflightDesc.decode(Message(Request.SET_INFLIGHT_FD, payload=bytes(12)))


def test_messages_round_trip_with_their_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.eventfd(0)
    try:
        send_message(a, Message(Request.SET_VRING_KICK, FLAG_VERSION, U64.pack(3), [fd]))
        got = read_message(b)
        assert (got.request, got.u64(), len(got.fds)) == (Request.SET_VRING_KICK, 3, 1)
        os.eventfd_write(fd, 5)
        assert os.eventfd_read(got.fds[0]) == 5  # the same eventfd arrived
        got.close_fds()
        a.close()
        with pytest.raises(VhostUserDisconnected):
            read_message(b)
    finally:
        os.close(fd)
        b.close()


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (HEADER.pack(1, 0x2, 0), "version"),
        (HEADER.pack(1, FLAG_VERSION, MAX_PAYLOAD + 1), "size"),
        (HEADER.pack(1, FLAG_VERSION, 16) + bytes(4), "truncated"),
        (HEADER.pack(1, FLAG_VERSION, 8)[:6], "truncated header"),
    ],
)
def test_read_message_refuses_malformed_input(header: bytes, why: str) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.sendall(header)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(VhostUserProtocolError):
            read_message(b)
    finally:
        a.close()
        b.close()


def test_too_many_fds_are_refused_and_closed() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        a.sendmsg([HEADER.pack(Request.SET_MEM_TABLE, FLAG_VERSION, 0)], anc)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(VhostUserProtocolError):
            read_message(b)
        assert len(os.listdir("/proc/self/fd")) <= before  # nothing received was kept
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


# ---- the back-end against a hostile front-end --------------------------------------------


@pytest.fixture
def device(tmp_path: Path) -> Iterator[VhostUserBlkDevice]:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    backend = FileBlockBackend(tmp_path / "disk.img")
    yield VhostUserBlkDevice(backend, BlkOptions(queue_size=64))
    backend.close()


class Peer:
    """A front-end end of a socketpair, the server's end served on a thread."""

    def __init__(self, device: VhostUserBlkDevice) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT_S)
        self.result: list[VhostUserConnection] = []
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                with theirs:
                    self.result.append(serve_connection(theirs, device))
            except BaseException as e:  # the test fails on any escape
                self.errors.append(e)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def send(
        self, request: int, payload: bytes = b"", fds: list[int] | None = None, ack: bool = False
    ) -> None:
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if ack else 0)
        send_message(self.sock, Message(request, flags, payload, fds or []))

    def reply(self) -> Message:
        msg = read_message(self.sock)
        assert msg.flags & FLAG_REPLY
        return msg

    def ack(self) -> int:
        return self.reply().u64()

    def negotiate(self) -> None:
        """GET_FEATURES, protocol features with REPLY_ACK, SET_OWNER."""
        self.send(Request.GET_FEATURES)
        features = self.reply().u64()
        self.send(Request.GET_PROTOCOL_FEATURES)
        proto = self.reply().u64()
        assert proto >> ProtocolFeature.REPLY_ACK & 1
        self.send(Request.SET_PROTOCOL_FEATURES, U64.pack(proto))
        self.send(Request.SET_FEATURES, U64.pack(features), ack=True)
        assert self.ack() == 0
        self.send(Request.SET_OWNER, ack=True)
        assert self.ack() == 0

    def expect_disconnect(self) -> None:
        assert self.sock.recv(1) == b"", "the back-end should have closed the connection"
        self.finish()

    def finish(self) -> None:
        self.sock.close()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors
        assert len(self.result) == 1  # serve_connection returned normally


def _memfd(size: int) -> int:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _still_serves(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    peer.send(Request.GET_QUEUE_NUM)
    assert peer.reply().u64() == 1
    peer.finish()


def test_unknown_request_without_ack_disconnects(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.send(999)
    peer.expect_disconnect()
    _still_serves(device)


def test_unknown_request_with_ack_gets_an_error_reply(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    peer.send(999, ack=True)
    assert peer.ack() != 0
    peer.send(Request.GET_FEATURES)  # the connection goes on
    assert peer.reply().u64() != 0
    peer.finish()


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (Request.SET_FEATURES, b"\x01\x02\x03"),  # short u64
        (Request.SET_VRING_NUM, bytes(4)),  # short vring state
        (Request.SET_VRING_ADDR, bytes(39)),
        (Request.SET_VRING_NUM, VRING_STATE.pack(0, 100)),  # not a power of two
        (Request.SET_VRING_NUM, VRING_STATE.pack(7, 64)),  # no such ring
        (Request.SET_VRING_BASE, VRING_STATE.pack(0, 0x1_0000)),
        (Request.SET_FEATURES, U64.pack(1 << 63)),  # a bit never offered
        (Request.SET_LOG_BASE, bytes(16)),  # dirty logging is not offered
        (Request.SET_VRING_ADDR, VringAddr(0, 1, 0, 0, 0).encode()),  # VHOST_VRING_F_LOG
        (Request.SET_CONFIG, ConfigAccess(0, 8, 0, bytes(8)).encode()),  # read-only
    ],
)
def test_bad_messages_are_refused_with_an_error_reply(
    device: VhostUserBlkDevice, request_: int, payload: bytes
) -> None:
    peer = Peer(device)
    peer.negotiate()
    peer.send(request_, payload, ack=True)
    assert peer.ack() == 1
    peer.send(Request.GET_QUEUE_NUM)
    assert peer.reply().u64() == 1
    peer.finish()


def test_bad_message_without_ack_disconnects(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    peer.send(Request.SET_VRING_NUM, bytes(4))
    peer.expect_disconnect()
    _still_serves(device)


def _table(*regions: tuple[int, int, int, int]) -> bytes:
    return encode_memory_table([MemoryRegionDesc(*r) for r in regions])


@pytest.mark.parametrize(
    ("regions", "nfds", "why"),
    [
        ([(0, 1 << 20, 0x10_0000, 0), (0x8_0000, 1 << 20, 0x90_0000, 0)], 2, "overlap in gpa"),
        ([(0, 1 << 20, 0x10_0000, 0), (1 << 20, 1 << 20, 0x18_0000, 0)], 2, "overlap in uva"),
        ([(0, 4 << 20, 0x10_0000, 0)], 1, "past the end of the memfd"),
        ([(0, 1 << 20, 0x10_0000, 100)], 1, "unaligned offset"),
        ([(0, 1 << 20, 0x10_0000, 0)], 0, "fd missing"),
        ([(0, 1 << 20, 0x10_0000, 0)], 2, "one fd too many"),
        ([(0, 0, 0x10_0000, 0)], 1, "empty region"),
        ([(0xFFFF_FFFF_FFFF_F000, 1 << 20, 0x10_0000, 0)], 1, "wraps around"),
    ],
)
def test_hostile_memory_tables_are_refused(
    device: VhostUserBlkDevice, regions: list[tuple[int, int, int, int]], nfds: int, why: str
) -> None:
    peer = Peer(device)
    peer.negotiate()
    fds = [_memfd(2 << 20) for _ in range(nfds)]
    try:
        peer.send(Request.SET_MEM_TABLE, _table(*regions), fds, ack=True)
        assert peer.ack() == 1, why
    finally:
        for fd in fds:
            os.close(fd)
    peer.finish()


def test_memory_table_fd_that_is_not_memory_is_refused(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    r, w = os.pipe()
    try:
        peer.send(Request.SET_MEM_TABLE, _table((0, 1 << 20, 0x10_0000, 0)), [r], ack=True)
        assert peer.ack() == 1
    finally:
        os.close(r)
        os.close(w)
    peer.finish()


def _ring_setup(peer: Peer, memfd: int, desc_uva: int) -> None:
    peer.send(Request.SET_MEM_TABLE, _table((0, 2 << 20, 0x4000_0000, 0)), [memfd], ack=True)
    assert peer.ack() == 0
    peer.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, 64), ack=True)
    assert peer.ack() == 0
    addr = VringAddr(0, 0, desc_uva, 0x4000_2000, 0x4000_1000)
    peer.send(Request.SET_VRING_ADDR, addr.encode(), ack=True)
    assert peer.ack() == 0
    peer.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1), ack=True)
    assert peer.ack() == 0


def test_ring_pointing_outside_the_memory_table_is_refused(
    device: VhostUserBlkDevice,
) -> None:
    peer = Peer(device)
    peer.negotiate()
    memfd = _memfd(2 << 20)
    kick = os.eventfd(0)
    try:
        _ring_setup(peer, memfd, desc_uva=0x9999_0000)  # in no region
        peer.send(Request.SET_VRING_KICK, U64.pack(0), [kick], ack=True)
        assert peer.ack() == 1
    finally:
        os.close(memfd)
        os.close(kick)
    peer.finish()


def test_ring_straddling_the_end_of_memory_is_refused(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    memfd = _memfd(2 << 20)
    kick = os.eventfd(0)
    try:
        _ring_setup(peer, memfd, desc_uva=0x4000_0000 + (2 << 20) - 512)  # 1 KiB table
        peer.send(Request.SET_VRING_KICK, U64.pack(0), [kick], ack=True)
        assert peer.ack() == 1
    finally:
        os.close(memfd)
        os.close(kick)
    peer.finish()


def test_good_ring_starts_and_get_vring_base_stops_it(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    memfd = _memfd(2 << 20)
    kick = os.eventfd(0)
    try:
        _ring_setup(peer, memfd, desc_uva=0x4000_0000)
        peer.send(Request.SET_VRING_BASE, VRING_STATE.pack(0, 0), ack=True)
        assert peer.ack() == 0
        peer.send(Request.SET_VRING_KICK, U64.pack(0), [kick], ack=True)
        assert peer.ack() == 0
        peer.send(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0))
        assert VRING_STATE.unpack(peer.reply().payload) == (0, 0)
    finally:
        os.close(memfd)
        os.close(kick)
    peer.finish()


def test_vring_fd_messages_need_their_fd(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    peer.send(Request.SET_VRING_KICK, U64.pack(0), ack=True)  # no fd, "no fd" bit clear
    assert peer.ack() == 1
    fd = os.eventfd(0)
    try:
        peer.send(Request.SET_VRING_CALL, U64.pack(0 | VRING_NOFD_MASK), [fd], ack=True)
        assert peer.ack() == 1  # "no fd" set, yet an fd came
        peer.send(Request.SET_VRING_CALL, U64.pack(1 << 20), [fd], ack=True)
        assert peer.ack() == 1  # unknown bits
        peer.send(Request.SET_OWNER, b"", [fd], ack=True)  # an fd where none belongs
        assert peer.ack() == 1
    finally:
        os.close(fd)
    peer.finish()


@pytest.mark.parametrize(
    ("request_", "payload", "with_fd"),
    [
        (Request.GET_FEATURES, bytes(3), False),
        (Request.GET_FEATURES, b"", True),
        (Request.GET_VRING_BASE, VRING_STATE.pack(9, 0), False),
        (Request.GET_CONFIG, struct.pack("<III", 0, 512, 0), False),
    ],
)
def test_bad_request_that_has_a_reply_disconnects(
    device: VhostUserBlkDevice, request_: int, payload: bytes, with_fd: bool
) -> None:
    """A request answered by a message of its own cannot get a failed REPLY_ACK: the
    back-end hangs up instead, and serves the next front-end."""
    peer = Peer(device)
    peer.negotiate()
    fd = os.eventfd(0)
    try:
        peer.send(request_, payload, [fd] if with_fd else [], ack=True)
    finally:
        os.close(fd)
    peer.expect_disconnect()
    _still_serves(device)


def test_inflight_fd_needs_the_protocol_feature(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.send(Request.GET_FEATURES)
    peer.reply()
    peer.send(Request.GET_INFLIGHT_FD, InflightDesc(0, 0, 1, 64).encode())
    peer.expect_disconnect()  # refused, and a request with a reply cannot be nacked


def test_inflight_region_too_small_is_refused(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.negotiate()
    fd = _memfd(4096)
    try:
        desc = InflightDesc(4096, 0, 1, 1024)  # 1024 descriptors need 16 KiB and more
        peer.send(Request.SET_INFLIGHT_FD, desc.encode(), [fd], ack=True)
        assert peer.ack() == 1
    finally:
        os.close(fd)
    peer.finish()


def test_peer_hanging_up_mid_message_is_survived(device: VhostUserBlkDevice) -> None:
    peer = Peer(device)
    peer.sock.sendall(HEADER.pack(Request.SET_FEATURES, FLAG_VERSION, 8) + b"\x01")
    peer.sock.shutdown(socket.SHUT_WR)
    peer.expect_disconnect()
    _still_serves(device)
