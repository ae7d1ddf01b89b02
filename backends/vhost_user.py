"""The vhost-user protocol: message codec, constants, and the front-end client.

vhost-user (QEMU's docs/interop/vhost-user.rst) moves a virtio device's data path into
another process: the *front-end* (the VMM: iovirt, QEMU, DPDK's virtio-user) owns guest
memory and the rings; the *back-end* (iovirt's ``vhost-user`` server,
qemu-storage-daemon, DPDK's vhost library) maps that memory from file descriptors the
front-end sends, and serves the rings. They talk over a UNIX stream socket in messages::

    u32 request | u32 flags (version 1, REPLY, NEED_REPLY) | u32 size | payload[size]

with file descriptors (memory, eventfds) passed alongside as SCM_RIGHTS.

This module holds what both ends share: request and feature numbers, the payload layouts,
:func:`read_message` / :func:`send_message` (which check sizes and file descriptor counts,
so nothing a peer sends can make us read past a payload or keep an fd we did not expect),
and :class:`VhostUserFrontend`, the client iovirt's VMM uses to drive any back-end.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from iovirt.errors import IovirtError, ResourceError, one_line

# ---- constants (vhost-user.rst) -------------------------------------------------------


class Request(IntEnum):
    """Front-end message types ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Header flags.
FLAG_VERSION_MASK = 0x3
FLAG_VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# Virtio feature bit 30: the back-end speaks the protocol-feature extension.
VHOST_USER_F_PROTOCOL_FEATURES = 30
# Virtio feature bit 26 (VHOST_F_LOG_ALL): dirty logging for migration (not offered).
VHOST_F_LOG_ALL = 26


class ProtocolFeature(IntEnum):
    """Protocol feature bits (VHOST_USER_PROTOCOL_F_*)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# SET_VRING_KICK/CALL/ERR payload: the ring index in bits 0-7, bit 8 "no fd" (polling).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# The memory table of SET_MEM_TABLE holds at most this many regions
# (VHOST_MEMORY_BASELINE_NREGIONS); it is also the most fds a message carries.
MAX_MEM_REGIONS = 8
MAX_FDS = MAX_MEM_REGIONS
# The largest payload any message we speak needs is GET_CONFIG's (12 + 256 bytes); a
# larger size field is a broken or hostile peer.
MAX_CONFIG_SIZE = 256
MAX_PAYLOAD = 4096

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
# struct VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size (QEMU sends it
# with its trailing padding, 24 bytes; the fields are 20).
INFLIGHT = struct.Struct("<QQHH")
INFLIGHT_PADDED_SIZE = 24


class VhostUserError(IovirtError):
    """A vhost-user exchange failed (the peer refused, hung up or broke the protocol)."""


class VhostUserProtocolError(VhostUserError):
    """The peer sent something the protocol does not allow (bad size, missing fd...)."""


class VhostUserDisconnected(VhostUserError):
    """The peer closed the connection."""


@dataclass
class Message:
    """One vhost-user message. ``fds`` are owned by whoever holds the message."""

    request: int
    flags: int = FLAG_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def u64(self) -> int:
        return int(_unpack_exact(U64, self)[0])

    def vring_state(self) -> tuple[int, int]:
        index, num = _unpack_exact(VRING_STATE, self)
        return int(index), int(num)


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _unpack_exact(layout: struct.Struct, msg: Message) -> tuple[int, ...]:
    if len(msg.payload) != layout.size:
        raise VhostUserProtocolError(
            f"{request_name(msg.request)}: payload is {len(msg.payload)} bytes, "
            f"expected {layout.size}"
        )
    return layout.unpack(msg.payload)


# ---- payload codecs -------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRegionDesc:
    """One region of a SET_MEM_TABLE message (the fd travels separately)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


def encode_memory_table(regions: Sequence[MemoryRegionDesc]) -> bytes:
    if not 1 <= len(regions) <= MAX_MEM_REGIONS:
        raise ValueError(f"a memory table has 1-{MAX_MEM_REGIONS} regions, not {len(regions)}")
    out = MEMORY_HEADER.pack(len(regions), 0)
    for r in regions:
        out += MEMORY_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return out


def decode_memory_table(payload: bytes) -> list[MemoryRegionDesc]:
    """The regions of a SET_MEM_TABLE payload; VhostUserProtocolError if malformed."""
    if len(payload) < MEMORY_HEADER.size:
        raise VhostUserProtocolError("SET_MEM_TABLE: payload shorter than its header")
    nregions, _ = MEMORY_HEADER.unpack_from(payload)
    if not 1 <= nregions <= MAX_MEM_REGIONS:
        raise VhostUserProtocolError(f"SET_MEM_TABLE: {nregions} regions (1-{MAX_MEM_REGIONS})")
    need = MEMORY_HEADER.size + nregions * MEMORY_REGION.size
    # Some front-ends send the whole 8-region array; the regions named must be there.
    if not need <= len(payload) <= MEMORY_HEADER.size + MAX_MEM_REGIONS * MEMORY_REGION.size:
        raise VhostUserProtocolError(
            f"SET_MEM_TABLE: {len(payload)} bytes for {nregions} regions (need {need})"
        )
    return [
        MemoryRegionDesc(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * 32))
        for i in range(nregions)
    ]


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR: the ring areas as *front-end user addresses*."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    def encode(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def decode(cls, msg: Message) -> VringAddr:
        return cls(*_unpack_exact(VRING_ADDR, msg))


@dataclass(frozen=True)
class ConfigAccess:
    """GET_CONFIG / SET_CONFIG: a window of the device config space."""

    offset: int
    size: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def decode(cls, msg: Message) -> ConfigAccess:
        if len(msg.payload) < CONFIG_HEADER.size:
            raise VhostUserProtocolError(f"{request_name(msg.request)}: payload too short")
        offset, size, flags = CONFIG_HEADER.unpack_from(msg.payload)
        data = msg.payload[CONFIG_HEADER.size :]
        if size > MAX_CONFIG_SIZE or len(data) != size:
            raise VhostUserProtocolError(
                f"{request_name(msg.request)}: size {size} with {len(data)} bytes of data "
                f"(at most {MAX_CONFIG_SIZE})"
            )
        if offset + size > MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(
                f"{request_name(msg.request)}: window [{offset}, +{size}) past the config space"
            )
        return cls(offset, size, flags, data)


@dataclass(frozen=True)
class InflightDesc:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def encode(self) -> bytes:
        return INFLIGHT.pack(
            self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size
        ) + bytes(INFLIGHT_PADDED_SIZE - INFLIGHT.size)

    @classmethod
    def decode(cls, msg: Message) -> InflightDesc:
        if not INFLIGHT.size <= len(msg.payload) <= INFLIGHT_PADDED_SIZE:
            raise VhostUserProtocolError(
                f"{request_name(msg.request)}: payload is {len(msg.payload)} bytes, "
                f"expected {INFLIGHT.size}-{INFLIGHT_PADDED_SIZE}"
            )
        return cls(*INFLIGHT.unpack_from(msg.payload))


# ---- reading and writing messages -----------------------------------------------------

_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def _take_fds(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            into.extend(fds)


def _recv_exact(sock: socket.socket, length: int, fds: list[int], *, at_start: bool) -> bytes:
    """``length`` bytes from ``sock``, collecting any fds that come with them."""
    buf = bytearray()
    while len(buf) < length:
        data, ancdata, msg_flags, _ = sock.recvmsg(
            length - len(buf), _FD_SPACE, socket.MSG_CMSG_CLOEXEC
        )
        _take_fds(ancdata, fds)
        if msg_flags & socket.MSG_CTRUNC:
            raise VhostUserProtocolError(f"more than {MAX_FDS} file descriptors in one message")
        if not data:
            if at_start and not buf:
                raise VhostUserDisconnected("the peer closed the connection")
            raise VhostUserProtocolError("the peer hung up in the middle of a message")
        buf += data
    return bytes(buf)


def read_message(sock: socket.socket) -> Message:
    """The next message. Raises VhostUserDisconnected at a clean end of stream, and
    VhostUserProtocolError (with every received fd closed) for anything malformed."""
    fds: list[int] = []
    try:
        header = _recv_exact(sock, HEADER.size, fds, at_start=True)
        request, flags, size = HEADER.unpack(header)
        if flags & FLAG_VERSION_MASK != FLAG_VERSION:
            raise VhostUserProtocolError(
                f"{request_name(request)}: protocol version {flags & FLAG_VERSION_MASK}, not 1"
            )
        if size > MAX_PAYLOAD:
            raise VhostUserProtocolError(
                f"{request_name(request)}: payload size {size} (at most {MAX_PAYLOAD})"
            )
        payload = _recv_exact(sock, size, fds, at_start=False) if size else b""
    except BaseException:
        Message(0, fds=fds).close_fds()
        raise
    return Message(request, flags, payload, fds)


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send ``msg`` (header and payload in one sendmsg, its fds attached)."""
    if len(msg.payload) > MAX_PAYLOAD or len(msg.fds) > MAX_FDS:
        raise ValueError("message too large for vhost-user")
    data = HEADER.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload
    anc = []
    if msg.fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


# ---- the front-end client -------------------------------------------------------------


def vring_fd_payload(index: int, fd: int | None) -> bytes:
    """SET_VRING_KICK/CALL/ERR payload: the index, and the no-fd bit when ``fd`` is None."""
    return U64.pack(index | (VRING_NOFD_MASK if fd is None else 0))


class VhostUserFrontend:
    """A connection to a vhost-user back-end, driven from the VMM side.

    Every call is synchronous with a timeout; a refusal (a non-zero REPLY_ACK) or a dead
    peer raises :class:`VhostUserError`. Once REPLY_ACK is negotiated every message that
    has no reply of its own asks for an acknowledgement, so errors surface where they
    happen. Not thread-safe: the caller serializes (the device model's lock).
    """

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        what = one_line(f"vhost-user socket {path}")
        try:
            sock.connect(path)
        except FileNotFoundError as e:
            sock.close()
            raise ResourceError(
                what, "no such socket; start the back-end first (e.g. `iovirt vhost-user blk`)"
            ) from e
        except ConnectionRefusedError as e:
            sock.close()
            raise ResourceError(what, "connection refused; is the back-end running?") from e
        except OSError as e:
            sock.close()
            raise ResourceError(what, e.strerror or str(e)) from e
        self.sock = sock
        self.protocol_features = 0

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    # -- plumbing --------------------------------------------------------------------

    def _exchange(
        self,
        request: Request,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        reply: bool = False,
    ) -> Message | None:
        ack = not reply and self.has_protocol(ProtocolFeature.REPLY_ACK)
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if ack else 0)
        try:
            send_message(self.sock, Message(request, flags, payload, list(fds)))
            if not (reply or ack):
                return None
            answer = read_message(self.sock)
        except VhostUserError as e:
            raise VhostUserError(f"vhost-user {self.path}: {request.name}: {e}") from e
        except OSError as e:
            raise VhostUserError(
                f"vhost-user {self.path}: {request.name}: {e.strerror or e}"
            ) from e
        if not reply:
            answer.close_fds()  # an acknowledgement carries nothing we keep
        if answer.request != request or not answer.flags & FLAG_REPLY:
            answer.close_fds()
            raise VhostUserProtocolError(
                f"vhost-user {self.path}: {request.name} answered with "
                f"{request_name(answer.request)}"
            )
        if ack:
            status = answer.u64()
            if status:
                raise VhostUserError(
                    f"vhost-user {self.path}: the back-end refused {request.name} (status {status})"
                )
            return None
        return answer

    def _get_u64(self, request: Request) -> int:
        answer = self._exchange(request, reply=True)
        assert answer is not None
        answer.close_fds()
        return answer.u64()

    # -- requests --------------------------------------------------------------------

    def get_features(self) -> int:
        return self._get_u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._exchange(Request.SET_FEATURES, U64.pack(features))

    def get_protocol_features(self) -> int:
        return self._get_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self._exchange(Request.SET_PROTOCOL_FEATURES, U64.pack(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self._exchange(Request.SET_OWNER)

    def reset_owner(self) -> None:
        self._exchange(Request.RESET_OWNER)

    def get_queue_num(self) -> int:
        return self._get_u64(Request.GET_QUEUE_NUM)

    def set_mem_table(self, regions: Sequence[MemoryRegionDesc], fds: Sequence[int]) -> None:
        if len(fds) != len(regions):
            raise ValueError("one fd per memory region")
        self._exchange(Request.SET_MEM_TABLE, encode_memory_table(regions), fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self._exchange(Request.SET_VRING_NUM, VRING_STATE.pack(index, num))

    def set_vring_addr(self, addr: VringAddr) -> None:
        self._exchange(Request.SET_VRING_ADDR, addr.encode())

    def set_vring_base(self, index: int, base: int) -> None:
        self._exchange(Request.SET_VRING_BASE, VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        answer = self._exchange(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0), reply=True)
        assert answer is not None
        answer.close_fds()
        got, base = answer.vring_state()
        if got != index:
            raise VhostUserProtocolError(f"GET_VRING_BASE for ring {index} answered for {got}")
        return base

    def _set_vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        self._exchange(request, vring_fd_payload(index, fd), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._exchange(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        access = ConfigAccess(offset, size, 0, bytes(size))
        answer = self._exchange(Request.GET_CONFIG, access.encode(), reply=True)
        assert answer is not None
        answer.close_fds()
        got = ConfigAccess.decode(answer)
        if got.size != size:
            raise VhostUserProtocolError(f"GET_CONFIG returned {got.size} bytes, not {size}")
        return got.data

    def set_config(self, offset: int, data: bytes) -> None:
        self._exchange(Request.SET_CONFIG, ConfigAccess(offset, len(data), 0, data).encode())

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[InflightDesc, int]:
        """The back-end's inflight region for these queues: its layout and its fd (ours)."""
        payload = InflightDesc(0, 0, num_queues, queue_size).encode()
        answer = self._exchange(Request.GET_INFLIGHT_FD, payload, reply=True)
        assert answer is not None
        if len(answer.fds) != 1:
            answer.close_fds()
            raise VhostUserProtocolError("GET_INFLIGHT_FD: the answer carries no fd")
        try:
            desc = InflightDesc.decode(answer)
        except VhostUserError:
            answer.close_fds()
            raise
        return desc, answer.fds[0]

    def set_inflight_fd(self, desc: InflightDesc, fd: int) -> None:
        self._exchange(Request.SET_INFLIGHT_FD, desc.encode(), [fd])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
