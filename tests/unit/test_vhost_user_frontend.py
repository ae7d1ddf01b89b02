"""iovirt's vhost-user front-end devices against iovirt's vhost-user back-end.

The VMM side (:class:`~iovirt.virtio.vhost_user.VhostUserBlk` / ``VhostUserNet``) is
activated as a transport would on DRIVER_OK, with guest RAM in a memfd and eventfds for
kick and call; the back-end (:class:`~iovirt.backends.vhost_user_server.VhostUserServer`)
runs on a thread over a real UNIX socket, its C workers serving the rings. The synthetic
driver plays the guest. Also: a back-end restart with requests in flight loses none
(the inflight region), and a ring the driver breaks is reported on its error eventfd.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iovirt.backends.block import FileBlockBackend
from iovirt.backends.net import VNET_HDR_LEN, SocketPairNetBackend
from iovirt.backends.vhost_user_server import (
    VhostUserBlkDevice,
    VhostUserNetDevice,
    VhostUserServer,
    inflight_queue_bytes,
    serve_in_thread,
)
from iovirt.memory import GuestMemory
from iovirt.testing.virtio_driver import SplitDriver
from iovirt.virtio.blk import VIRTIO_BLK_F_FLUSH, BlkOptions
from iovirt.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    Activation,
    QueueConfig,
)
from iovirt.virtio.net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF
from iovirt.virtio.vhost_user import VhostUserBlk, VhostUserNet

SECTOR = 512
DISK_SECTORS = 512
RAM = [(0, 8 << 20)]
RING = 0x10000
WAIT_S = 5.0
T_IN, T_OUT = 0, 1


def _wait(fd: int) -> None:
    ready, _, _ = select.select([fd], [], [], WAIT_S)
    assert ready, "no notification within the timeout"
    os.eventfd_read(fd)


def _blk_header(req_type: int, sector: int) -> bytes:
    return struct.pack("<IIQ", req_type, 0, sector)


class Rig:
    """Guest RAM, one or two rings, the eventfds a transport would hand over."""

    def __init__(self, nqueues: int, size: int = 64) -> None:
        self.memory = GuestMemory(RAM)
        self.drivers = [
            SplitDriver(self.memory, size, RING + q * 0x40000, event_idx=False)
            for q in range(nqueues)
        ]
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nqueues)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nqueues)]
        self.resets = 0

    def activation(self, features: int) -> Activation:
        # The synthetic driver does not maintain used_event: no event idx.
        features &= ~(1 << VIRTIO_F_EVENT_IDX)
        queues = [
            QueueConfig(d.size, d.desc_gpa, d.driver_gpa, d.device_gpa, True) for d in self.drivers
        ]

        def needs_reset() -> None:
            self.resets += 1

        return Activation(self.memory, features, queues, self.kicks, self.calls, needs_reset)

    def kick(self, q: int) -> None:
        os.eventfd_write(self.kicks[q], 1)

    def close(self) -> None:
        for fd in (*self.kicks, *self.calls):
            os.close(fd)
        self.memory.close()


@pytest.fixture
def disk(tmp_path: Path) -> bytes:
    data = b"".join(bytes([s & 0xFF]) * 16 + os.urandom(SECTOR - 16) for s in range(DISK_SECTORS))
    (tmp_path / "disk.img").write_bytes(data)
    return data


@pytest.fixture
def blk_server(tmp_path: Path, disk: bytes) -> Iterator[str]:
    backend = FileBlockBackend(tmp_path / "disk.img")
    device = VhostUserBlkDevice(backend, BlkOptions(serial=b"vu-serial", queue_size=64))
    path = str(tmp_path / "blk.sock")
    server = VhostUserServer(path, device)
    thread = serve_in_thread(server)
    yield path
    server.stop()
    thread.join(WAIT_S)
    server.close()
    backend.close()


def test_blk_features_and_config_come_from_the_back_end(blk_server: str) -> None:
    dev = VhostUserBlk(blk_server, queue_size=64)
    try:
        assert dev.capacity == DISK_SECTORS
        features = dev.device_features()
        assert features >> VIRTIO_F_VERSION_1 & 1
        assert features >> VIRTIO_BLK_F_FLUSH & 1
        assert not features >> VIRTIO_F_RING_PACKED & 1
        assert not features >> 30 & 1  # VHOST_USER_F_PROTOCOL_FEATURES stays between us
        assert dev.config_read(0, 8) == DISK_SECTORS
        assert dev.config_read(4096, 4) == 0
    finally:
        dev.close()


def _read_sectors(rig: Rig, q: int, sector: int, count: int) -> tuple[int, bytes]:
    d = rig.drivers[q]
    head = d.add_chain([_blk_header(T_IN, sector)], [count * SECTOR, 1])
    bufs = d.writable_buffers(head)
    rig.kick(q)
    _wait(rig.calls[q])
    used = d.used()
    assert [h for h, _ in used] == [head]
    data = rig.memory.read(*bufs[0])
    status = rig.memory.read(*bufs[1])[0]
    return status, data


def _write_sectors(rig: Rig, q: int, sector: int, data: bytes) -> int:
    d = rig.drivers[q]
    head = d.add_chain([_blk_header(T_OUT, sector), data], [1])
    bufs = d.writable_buffers(head)
    rig.kick(q)
    _wait(rig.calls[q])
    assert [h for h, _ in d.used()] == [head]
    return rig.memory.read(*bufs[0])[0]


def test_blk_reads_and_writes_through_the_back_end(
    blk_server: str, disk: bytes, tmp_path: Path
) -> None:
    rig = Rig(1)
    dev = VhostUserBlk(blk_server, queue_size=64)
    try:
        dev.activate(rig.activation(dev.device_features()))
        status, data = _read_sectors(rig, 0, 3, 4)
        assert status == 0
        assert data == disk[3 * SECTOR : 7 * SECTOR]
        new = os.urandom(2 * SECTOR)
        assert _write_sectors(rig, 0, 10, new) == 0
        with open(tmp_path / "disk.img", "rb") as f:
            f.seek(10 * SECTOR)
            assert f.read(2 * SECTOR) == new
        # Reset and activate again: a fresh ring, the back-end starts over at 0.
        dev.reset()
        rig2 = Rig(1)
        dev.activate(rig2.activation(dev.device_features()))
        status, data = _read_sectors(rig2, 0, 10, 2)
        assert (status, data) == (0, new)
        rig2.close()
    finally:
        dev.close()
        rig.close()


def test_blk_ring_broken_by_the_driver_is_reported(blk_server: str) -> None:
    rig = Rig(1)
    dev = VhostUserBlk(blk_server, queue_size=64)
    errors: list[int] = []

    class Watcher:
        def watch(self, fd: int, callback: object) -> None:
            errors.append(fd)

        def unwatch(self, fd: int) -> None:
            pass

    dev.attach(Watcher())  # type: ignore[arg-type]
    try:
        dev.activate(rig.activation(dev.device_features()))
        assert len(errors) == 1
        # A descriptor pointing outside guest RAM breaks the ring.
        rig.drivers[0].add_descriptors([(0xFFFF_0000_0000, 16, 0, 0)])
        rig.kick(0)
        ready, _, _ = select.select([errors[0]], [], [], WAIT_S)
        assert ready, "the back-end did not signal the ring's error eventfd"
    finally:
        dev.close()
        rig.close()


def test_blk_backend_restart_resubmits_requests_in_flight(tmp_path: Path, disk: bytes) -> None:
    """Requests a dead back-end had taken (recorded in the inflight region the front-end
    keeps) are served by the next back-end, in order; none is lost or run twice."""
    backend = FileBlockBackend(tmp_path / "disk.img")
    device = VhostUserBlkDevice(backend, BlkOptions(queue_size=64))
    path = str(tmp_path / "blk.sock")
    server = VhostUserServer(path, device)
    thread = serve_in_thread(server)
    rig = Rig(1)
    dev = VhostUserBlk(path, queue_size=64)
    try:
        dev.activate(rig.activation(dev.device_features()))
        assert dev._inflight is not None
        desc, fd = dev._inflight
        assert desc.mmap_size >= inflight_queue_bytes(64)
        # One request completes normally.
        assert _read_sectors(rig, 0, 0, 1)[0] == 0
        dev.reset()  # the back-end stops the ring; base 1
        # Three requests the "old back-end" took but never completed: published on the
        # avail ring and marked in flight (as a back-end does when it pops them).
        d = rig.drivers[0]
        heads = [d.add_chain([_blk_header(T_IN, s)], [SECTOR, 1]) for s in (5, 6, 7)]
        region = memoryview(bytearray(os.pread(fd, desc.mmap_size, 0)))
        assert struct.unpack_from("<H", region, 8)[0] == 1  # version written by the back-end
        for n, head in enumerate(heads):
            struct.pack_into("<BxxxxxHQ", region, 16 + 16 * head, 1, 0, 100 + n)
        os.pwrite(fd, bytes(region), 0)
        # The next activation hands the region back; the back-end resubmits the three.
        # Its avail index starts at used_idx + 3, so nothing is served twice.
        dev.activate(rig.activation(dev.device_features()))
        used = []
        while len(used) < 3:
            _wait(rig.calls[0])
            used += d.used()
        assert [h for h, _ in used] == heads
        for head, sector in zip(heads, (5, 6, 7), strict=True):
            data_buf, status_buf = d.writable_buffers(head)
            assert rig.memory.read(*status_buf)[0] == 0
            assert rig.memory.read(*data_buf) == disk[sector * SECTOR : (sector + 1) * SECTOR]
        # And the ring goes on normally afterwards.
        assert _read_sectors(rig, 0, 9, 1) == (0, disk[9 * SECTOR : 10 * SECTOR])
        after = os.pread(fd, 16 + 16 * 64, 0)
        assert all(after[16 + 16 * h] == 0 for h in heads)  # no longer in flight
    finally:
        dev.close()
        rig.close()
        server.stop()
        thread.join(WAIT_S)
        server.close()
        backend.close()


def test_net_moves_packets_both_ways(tmp_path: Path) -> None:
    backend = SocketPairNetBackend(1)
    device = VhostUserNetDevice(backend)
    path = str(tmp_path / "net.sock")
    server = VhostUserServer(path, device)
    thread = serve_in_thread(server)
    rig = Rig(2)
    mac = bytes.fromhex("525400abcdef")
    dev = VhostUserNet(path, mac)
    peer = socket.socket(fileno=os.dup(backend.peer_fds[0]))
    try:
        features = dev.device_features()
        assert features >> VIRTIO_NET_F_MAC & 1
        assert dev.config_read(0, 6) == int.from_bytes(mac, "little")
        dev.activate(rig.activation(features))
        mrg = features >> VIRTIO_NET_F_MRG_RXBUF & 1
        assert mrg
        # Guest -> backend: a TX chain (header + frame) comes out of the peer socket.
        frame = bytes.fromhex("ffffffffffff") + mac + b"\x08\x00" + os.urandom(100)
        tx = rig.drivers[1]
        head = tx.add_chain([bytes(VNET_HDR_LEN) + frame], [])
        rig.kick(1)
        peer.settimeout(WAIT_S)
        assert peer.recv(4096) == bytes(VNET_HDR_LEN) + frame
        _wait(rig.calls[1])
        assert [h for h, _ in tx.used()] == [head]
        # Backend -> guest: a packet sent by the peer lands in an RX buffer.
        rx = rig.drivers[0]
        rx_head = rx.add_chain([], [2048])
        rig.kick(0)
        reply = mac + bytes.fromhex("525400000001") + b"\x08\x00" + os.urandom(200)
        peer.send(bytes(VNET_HDR_LEN) + reply)
        _wait(rig.calls[0])
        used = rx.used()
        assert used == [(rx_head, VNET_HDR_LEN + len(reply))]
        (buf,) = rx.writable_buffers(rx_head)
        got = rig.memory.read(buf[0], VNET_HDR_LEN + len(reply))
        assert got[VNET_HDR_LEN:] == reply
        assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers
    finally:
        peer.close()
        dev.close()
        rig.close()
        server.stop()
        thread.join(WAIT_S)
        server.close()
        backend.close()


def test_event_idx_is_passed_through(blk_server: str) -> None:
    dev = VhostUserBlk(blk_server, queue_size=64)
    try:
        assert dev.device_features() >> VIRTIO_F_EVENT_IDX & 1
    finally:
        dev.close()


def test_frontend_survives_a_backend_that_goes_away(tmp_path: Path, disk: bytes) -> None:
    backend = FileBlockBackend(tmp_path / "disk.img")
    path = str(tmp_path / "blk.sock")
    server = VhostUserServer(path, VhostUserBlkDevice(backend, BlkOptions(queue_size=64)))
    thread = serve_in_thread(server)
    dev = VhostUserBlk(path, queue_size=64)
    server.stop()
    thread.join(WAIT_S)
    server.close()
    backend.close()
    rig = Rig(1)
    try:
        # The back-end is gone: activation fails with a project error (the transport
        # then sets DEVICE_NEEDS_RESET); reset and close do not raise.
        from iovirt.errors import IovirtError

        with pytest.raises(IovirtError):
            dev.activate(rig.activation(dev.device_features()))
        dev.reset()
    finally:
        dev.close()
        rig.close()


_ = threading  # the server runs on threads started by serve_in_thread
