"""Tests of :class:`iovirt.backends.tap.TapBackend`: a real tap, in a network namespace.

Every test creates its own network namespace (``iovirt-t-<pid>-<n>``) and removes it in a
fixture finalizer, so taps, bridges, addresses and traffic never reach the host's own
interfaces. These tests need root and /dev/net/tun (this machine and CI have both); they
do not skip.

Covered: what TUNSETIFF made (name, flags, header size, read back from the kernel), a
kernel-picked name, link up, MTU, bridge membership, frames both ways with the 12-byte
virtio-net header (an ARP request the kernel emits into the tap; a UDP datagram written
into the tap that reaches a socket in the namespace), the checksum offload as the kernel
applies it, multiqueue attach/detach, every refusal as one ResourceError line (missing
netns, missing bridge, a non-bridge, a non-tap, EBUSY, a multi_queue mismatch, EPERM
without CAP_NET_ADMIN, no /dev/net/tun, bad names), and close: a created tap goes away,
a pre-existing one stays and gets its settings back.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as pyroute2_netns

from iovirt.backends import tap as tap_module
from iovirt.backends.net import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN, NetBackend
from iovirt.backends.tap import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUNGETIFF,
    TUNGETVNETHDRSZ,
    TapBackend,
    netns_exists,
    run_in_netns,
)
from iovirt.errors import ResourceError

_netns_numbers = itertools.count()

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ARP_REQUEST = 1
IPPROTO_UDP = 17
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
NUD_PERMANENT = 0x80
CAP_NET_ADMIN = 12
LINUX_CAPABILITY_VERSION_3 = 0x20080522

TAP_ADDR = "10.99.0.1"  # the tap's address, inside the test's namespace only
PEER_ADDR = "10.99.0.2"  # "the guest" on the other side of the tap
PEER_MAC = bytes.fromhex("020000000002")

VNET_HDR = struct.Struct("<BBHHHHH")  # virtio_net_hdr_v1: flags, gso_type, hdr_len, ...


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, removed at teardown even when the test failed."""
    name = f"iovirt-t-{os.getpid()}-{next(_netns_numbers)}"
    assert not os.path.exists(f"/run/netns/{name}")
    pyroute2_netns.create(name)
    try:
        yield name
    finally:
        pyroute2_netns.remove(name)


@pytest.fixture
def open_tap(netns: str) -> Iterator[Callable[..., TapBackend]]:
    """Opens TapBackends in the test's namespace; closes them before it is removed."""
    opened: list[TapBackend] = []

    def factory(ifname: str | None, **kwargs: Any) -> TapBackend:
        backend = TapBackend(ifname, netns=netns, **kwargs)
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        backend.close()


def get_link(netns: str, ifname: str) -> Any | None:
    """The RTM_NEWLINK message of ``ifname`` in ``netns``, or None."""
    with NetNS(netns, flags=0) as ipr:
        indices = ipr.link_lookup(ifname=ifname)
        return ipr.get_links(indices[0])[0] if indices else None


def tun_data(link: Any) -> dict[str, Any]:
    """IFLA_TUN_* attributes of a tap's link message."""
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return {name: value for name, value in data["attrs"]}


def link_mac(link: Any) -> bytes:
    return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


def add_address(netns: str, ifname: str) -> None:
    with NetNS(netns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=TAP_ADDR, prefixlen=24)


def udp_socket_in(netns: str, bind: tuple[str, int] | None = None) -> socket.socket:
    """A UDP socket that lives in ``netns`` (opened on a thread inside it)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if bind is not None:
            sock.bind(bind)
        return sock

    return run_in_netns(netns, make)


def read_frame(fd: int, match: Callable[[bytes], bool], timeout: float = 2.0) -> bytes:
    """The first frame (vnet header included) read from ``fd`` that ``match`` accepts;
    frames the kernel sends on its own (IPv6 router solicitations, MLD) are skipped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            frame = os.read(fd, 65536)
            if match(frame):
                return frame
    raise AssertionError("no matching frame came out of the tap")


def ethertype(frame: bytes) -> int:
    return int.from_bytes(frame[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14], "big")


def is_udp_to(port: int) -> Callable[[bytes], bool]:
    def match(frame: bytes) -> bool:
        ip = frame[VNET_HDR_LEN + 14 :]
        return (
            ethertype(frame) == ETH_P_IP
            and ip[9] == IPPROTO_UDP
            and int.from_bytes(ip[22:24], "big") == port
        )

    return match


def ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """vnet header + Ethernet + IPv4 + UDP from PEER_ADDR to TAP_ADDR (UDP checksum 0)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0,
        64,
        IPPROTO_UDP,
        0,
        socket.inet_aton(PEER_ADDR),
        socket.inet_aton(TAP_ADDR),
    )
    ip = ip[:10] + struct.pack("!H", ipv4_checksum(ip)) + ip[12:]
    eth = dst_mac + PEER_MAC + struct.pack("!H", ETH_P_IP)
    return bytes(VNET_HDR_LEN) + eth + ip + udp


def tun_get_iff(fd: int) -> tuple[str, int]:
    """TUNGETIFF done here, independently of the backend's own helper."""
    buf = bytearray(40)
    fcntl.ioctl(fd, TUNGETIFF, buf)
    return buf[:16].split(b"\0", 1)[0].decode(), struct.unpack_from("H", buf, 16)[0]


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on its own thread; return its result or the exception it raised."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(fn())
        except Exception as e:
            out.append(e)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    return out[0]


def drop_cap_net_admin() -> None:
    """Clear CAP_NET_ADMIN from the *calling thread's* effective set (capset(2) acts on
    one thread; threads it starts inherit the reduced set)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}
    assert libc.capget(header, data) == 0, os.strerror(ctypes.get_errno())
    data[0] &= ~(1 << CAP_NET_ADMIN)
    assert libc.capset(header, data) == 0, os.strerror(ctypes.get_errno())


# --- what TUNSETIFF made -------------------------------------------------------------------


def test_creates_a_tap_in_the_netns_with_vnet_hdr(
    netns: str, open_tap: Callable[..., TapBackend]
) -> None:
    name = f"ivt{os.getpid()}"
    tap = open_tap(name)
    backend: NetBackend = tap  # satisfies the protocol the NIC models take
    assert len(backend.fds) == 1
    assert tap.ifname == name and tap.created
    assert tun_get_iff(tap.fds[0]) == (name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    hdr_sz = bytearray(4)
    fcntl.ioctl(tap.fds[0], TUNGETVNETHDRSZ, hdr_sz)
    assert struct.unpack("i", hdr_sz)[0] == VNET_HDR_LEN
    link = get_link(netns, name)
    assert link is not None
    info = tun_data(link)
    assert info["IFLA_TUN_TYPE"] == 2 and info["IFLA_TUN_VNET_HDR"] == 1
    assert info["IFLA_TUN_PERSIST"] == 0 and info["IFLA_TUN_MULTI_QUEUE"] == 0
    with IPRoute() as host:  # only read: the tap must not be in the host's namespace
        assert host.link_lookup(ifname=name) == []


def test_kernel_picks_a_name_when_none_given(
    netns: str, open_tap: Callable[..., TapBackend]
) -> None:
    tap = open_tap(None)
    assert tap.ifname.startswith("tap") and tap.ifname[3:].isdigit()
    assert tun_get_iff(tap.fds[0])[0] == tap.ifname
    assert get_link(netns, tap.ifname) is not None


def test_link_up_and_mtu(netns: str, open_tap: Callable[..., TapBackend]) -> None:
    open_tap("tt0", mtu=1400)
    open_tap("tt1", up=False)
    up = get_link(netns, "tt0")
    assert up is not None and up["flags"] & 1 and up.get_attr("IFLA_MTU") == 1400
    down = get_link(netns, "tt1")
    assert down is not None and not down["flags"] & 1 and down.get_attr("IFLA_MTU") == 1500


def test_bad_mtu_is_one_line_and_leaves_nothing(
    netns: str, open_tap: Callable[..., TapBackend]
) -> None:
    with pytest.raises(ResourceError, match=r"^tap tt0: MTU 20 refused .*68\.\.65535$"):
        open_tap("tt0", mtu=20)
    assert get_link(netns, "tt0") is None


def test_joins_a_bridge_in_the_netns(netns: str, open_tap: Callable[..., TapBackend]) -> None:
    with NetNS(netns, flags=0) as ipr:
        ipr.link("add", ifname="br0", kind="bridge")
        bridge = ipr.link_lookup(ifname="br0")[0]
    open_tap("tt0", bridge="br0")
    link = get_link(netns, "tt0")
    assert link is not None and link.get_attr("IFLA_MASTER") == bridge


# --- frames both ways ----------------------------------------------------------------------


def test_kernel_arp_request_comes_out_with_a_vnet_header(
    netns: str, open_tap: Callable[..., TapBackend]
) -> None:
    tap = open_tap("tt0")
    add_address(netns, "tt0")
    link = get_link(netns, "tt0")
    assert link is not None
    mac = link_mac(link)
    with udp_socket_in(netns) as sock:
        # PEER_ADDR is on the tap's subnet but unknown: the kernel must ARP for it.
        sock.sendto(b"ping", (PEER_ADDR, 9))
        frame = read_frame(tap.fds[0], lambda f: ethertype(f) == ETH_P_ARP)
    flags, gso_type, *_ = VNET_HDR.unpack(frame[:VNET_HDR_LEN])
    assert (flags, gso_type) == (0, VIRTIO_NET_HDR_GSO_NONE)
    eth = frame[VNET_HDR_LEN:]
    assert eth[0:6] == b"\xff" * 6 and eth[6:12] == mac
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", eth[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, ETH_P_IP, 6, 4, ARP_REQUEST)
    assert eth[22:28] == mac
    assert socket.inet_ntoa(eth[28:32]) == TAP_ADDR
    assert socket.inet_ntoa(eth[38:42]) == PEER_ADDR


def test_frame_written_to_the_tap_reaches_a_socket_in_the_netns(
    netns: str, open_tap: Callable[..., TapBackend]
) -> None:
    tap = open_tap("tt0")
    add_address(netns, "tt0")
    link = get_link(netns, "tt0")
    assert link is not None
    with udp_socket_in(netns, bind=(TAP_ADDR, 5555)) as sock:
        sock.settimeout(2.0)
        frame = udp_frame(link_mac(link), 4444, 5555, b"from the guest")
        assert os.write(tap.fds[0], frame) == len(frame)
        data, sender = sock.recvfrom(100)
    assert data == b"from the guest"
    assert sender == (PEER_ADDR, 4444)


# --- offloads ------------------------------------------------------------------------------


def test_csum_offload_changes_what_the_kernel_hands_over(
    netns: str, open_tap: Callable[..., TapBackend]
) -> None:
    tap = open_tap("tt0")
    add_address(netns, "tt0")
    with NetNS(netns, flags=0) as ipr:
        index = ipr.link_lookup(ifname="tt0")[0]
        ipr.neigh(
            "add", dst=PEER_ADDR, lladdr=PEER_MAC.hex(":"), ifindex=index, state=NUD_PERMANENT
        )
    supported = tap.supported_offloads()
    assert supported & (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) == (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    )
    with udp_socket_in(netns) as sock:
        # The probe put the offloads back to none: the kernel checksums the datagram itself.
        sock.sendto(b"a", (PEER_ADDR, 7001))
        frame = read_frame(tap.fds[0], is_udp_to(7001))
        flags, gso_type, *_ = VNET_HDR.unpack(frame[:VNET_HDR_LEN])
        assert (flags, gso_type) == (0, VIRTIO_NET_HDR_GSO_NONE)

        tap.set_offloads(TUN_F_CSUM)
        sock.sendto(b"b", (PEER_ADDR, 7002))
        frame = read_frame(tap.fds[0], is_udp_to(7002))
        flags, gso_type, _, _, csum_start, csum_offset, _ = VNET_HDR.unpack(frame[:VNET_HDR_LEN])
        assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM and gso_type == VIRTIO_NET_HDR_GSO_NONE
        assert (csum_start, csum_offset) == (14 + 20, 6)  # the UDP checksum field

        tap.set_offloads(0)
        sock.sendto(b"c", (PEER_ADDR, 7003))
        frame = read_frame(tap.fds[0], is_udp_to(7003))
        assert VNET_HDR.unpack(frame[:VNET_HDR_LEN])[0] == 0
    with pytest.raises(ValueError, match="unknown TUN_F_"):
        tap.set_offloads(0x8000)


# --- multiqueue ----------------------------------------------------------------------------


def test_multiqueue_detach_and_attach(netns: str, open_tap: Callable[..., TapBackend]) -> None:
    tap = open_tap("tt0", queues=2)
    assert len(tap.fds) == 2
    for fd in tap.fds:
        assert tun_get_iff(fd) == ("tt0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)

    def queues() -> tuple[int, int]:
        link = get_link(netns, "tt0")
        assert link is not None
        info = tun_data(link)
        return info["IFLA_TUN_NUM_QUEUES"], info["IFLA_TUN_NUM_DISABLED_QUEUES"]

    assert queues() == (2, 0)
    tap.set_active_pairs(1)
    assert queues() == (1, 1)
    tap.set_active_pairs(1)  # already so: no TUNSETQUEUE (a second detach is EINVAL)
    tap.set_offloads(TUN_F_CSUM)  # skips the detached queue
    tap.set_active_pairs(2)
    assert queues() == (2, 0)
    for bad in (0, 3):
        with pytest.raises(ValueError):
            tap.set_active_pairs(bad)


# --- refusals ------------------------------------------------------------------------------


def test_missing_netns() -> None:
    name = f"iovirt-t-{os.getpid()}-missing"
    assert not netns_exists(name)
    with pytest.raises(ResourceError) as info:
        TapBackend("tt0", netns=name)
    assert str(info.value) == (
        f"netns {name}: no such network namespace; create it with `ip netns add {name}`"
    )
    assert not os.path.exists(f"/run/netns/{name}")  # not created on the way


def test_netns_exists(netns: str) -> None:
    assert netns_exists(netns)
    with pytest.raises(ResourceError, match="invalid network namespace name"):
        TapBackend("tt0", netns="../../proc/1/ns/net")


def test_missing_bridge_leaves_no_tap(netns: str) -> None:
    with pytest.raises(ResourceError) as info:
        TapBackend("tt0", netns=netns, bridge="nobr0")
    assert str(info.value) == (
        f"bridge nobr0: no such bridge in netns {netns}; "
        f"create it with `ip -n {netns} link add nobr0 type bridge`"
    )
    assert get_link(netns, "tt0") is None


def test_bridge_that_is_not_a_bridge(netns: str) -> None:
    with pytest.raises(ResourceError, match=r"^bridge lo: is not a bridge"):
        TapBackend("tt0", netns=netns, bridge="lo")
    assert get_link(netns, "tt0") is None


def test_name_of_a_link_that_is_not_a_tap(netns: str) -> None:
    with pytest.raises(ResourceError, match=r"^tap lo: exists and is not a tap"):
        TapBackend("lo", netns=netns)


def test_second_single_queue_open_is_busy(netns: str, open_tap: Callable[..., TapBackend]) -> None:
    first = open_tap("tt0")
    with pytest.raises(ResourceError) as info:
        TapBackend("tt0", netns=netns)
    assert str(info.value).startswith("tap tt0: in use by another process")
    assert "\n" not in str(info.value)
    assert tun_get_iff(first.fds[0])[0] == "tt0"  # the first user keeps its tap


def test_multi_queue_mismatch(netns: str, open_tap: Callable[..., TapBackend]) -> None:
    open_tap("tt0", queues=2)
    with pytest.raises(ResourceError) as info:
        TapBackend("tt0", netns=netns, queues=1)
    assert str(info.value) == (
        "tap tt0: exists with other flags (multi_queue=on, queues=1 needs off); "
        "delete it or use another name"
    )


def test_not_permitted_without_cap_net_admin(netns: str) -> None:
    def attempt() -> TapBackend:
        drop_cap_net_admin()  # this thread only; the test's own thread keeps it
        return TapBackend("tt0", netns=netns)

    err = in_thread(attempt)
    assert isinstance(err, ResourceError), err
    assert str(err) == "tap tt0: not permitted: needs CAP_NET_ADMIN (run as root)"
    assert get_link(netns, "tt0") is None


def test_missing_tun_device(netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap_module, "TUN_DEVICE", str(tmp_path / "tun"))
    with pytest.raises(ResourceError, match=r"missing; load the tun module"):
        TapBackend("tt0", netns=netns)


def test_bad_arguments() -> None:
    with pytest.raises(ResourceError, match="invalid interface name"):
        TapBackend("x" * 16)
    with pytest.raises(ResourceError, match="invalid interface name"):
        TapBackend("a/b")
    with pytest.raises(ValueError):
        TapBackend("tt0", queues=0)


# --- close ---------------------------------------------------------------------------------


def test_close_removes_a_created_tap_and_is_idempotent(netns: str) -> None:
    tap = TapBackend("tt0", netns=netns, queues=2)
    fds = tap.fds
    assert get_link(netns, "tt0") is not None
    tap.close()
    assert get_link(netns, "tt0") is None
    assert tap.fds == []
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    tap.close()
    with pytest.raises(ValueError, match="closed"):
        tap.set_offloads(0)


def test_pre_existing_tap_is_left_as_it_was(netns: str) -> None:
    with NetNS(netns, flags=0) as ipr:
        ipr.link("add", ifname="br0", kind="bridge")
        ipr.link("add", ifname="pt0", kind="tuntap", mode="tap")
        bridge = ipr.link_lookup(ifname="br0")[0]
    before = get_link(netns, "pt0")
    assert before is not None and tun_data(before)["IFLA_TUN_PERSIST"] == 1

    tap = TapBackend("pt0", netns=netns, bridge="br0", mtu=1400)
    assert not tap.created
    during = get_link(netns, "pt0")
    assert during is not None
    assert during["flags"] & 1 and during.get_attr("IFLA_MTU") == 1400
    assert during.get_attr("IFLA_MASTER") == bridge
    tap.close()

    after = get_link(netns, "pt0")
    assert after is not None and after["index"] == before["index"]
    assert tun_data(after)["IFLA_TUN_PERSIST"] == 1
    assert not after["flags"] & 1
    assert after.get_attr("IFLA_MTU") == before.get_attr("IFLA_MTU")
    assert not after.get_attr("IFLA_MASTER")
