"""The tap NIC backend: a Linux tap device as a :class:`~iovirt.backends.net.NetBackend`.

A tap is opened through ``/dev/net/tun``: every open file plus ``TUNSETIFF`` is one queue
of the device, and every read or write on it is one Ethernet frame. We always ask for
IFF_VNET_HDR with a 12-byte header (``TUNSETVNETHDRSZ``), which is the virtio-net header
the NIC models put in front of every frame, so the data path passes frames through as is.
With more than one queue pair the tap is IFF_MULTI_QUEUE and each pair gets its own fd.

TUNSETIFF attaches to an existing tap of that name or creates one. A tap we create is not
persistent: it disappears when the last of our fds closes, so a crash leaves nothing
behind. A tap that existed before is left in place; what we changed on it (MTU, bridge,
up) is put back on :meth:`TapBackend.close`.

Network namespaces: ``TUNSETIFF`` creates the tap in the network namespace of the calling
*thread*, and a netlink socket talks to the namespace it was opened in. So everything that
touches a namespace runs on a short-lived worker thread that ``setns()``s into
``/run/netns/<name>`` (:func:`run_in_netns`); the caller's namespace never changes. The
worker is also what keeps pyroute2's private event loop away from a caller that is itself
running an asyncio loop.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from iovirt.backends.net import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    VNET_HDR_LEN,
)
from iovirt.errors import ResourceError, one_line

log = logging.getLogger(__name__)

T = TypeVar("T")

TUN_DEVICE = "/dev/net/tun"
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add` (and pyroute2.netns) bind namespaces

# ioctls (<linux/if_tun.h>; _IOW/_IOR('T', nr, int) on x86-64).
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0  # the TUN_F_* bits are the argument itself, not a pointer
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

# ifr_flags (<linux/if_tun.h>).
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

MAX_TAP_QUEUES = 256  # the kernel's MAX_TAP_QUEUES (DEFAULT_MAX_NUM_RSS_QUEUES)
IFLA_TUN_TYPE_TAP = 2  # IFLA_TUN_TYPE: 1 is IFF_TUN, 2 is IFF_TAP

IFNAMSIZ = 16
# struct ifreq: the name, then a 24-byte union of which TUN ioctls use ifr_flags (a short).
IFREQ = struct.Struct("16sH22x")

CLONE_NEWNET = 0x40000000  # setns() nstype
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): what kind of namespace an nsfs file is

KNOWN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO


# --- network namespaces --------------------------------------------------------------------


def netns_path(name: str) -> str:
    """``/run/netns/<name>``; refuses names that would point elsewhere."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ResourceError(one_line(f"netns {name!r}"), "invalid network namespace name")
    return os.path.join(NETNS_RUN_DIR, name)


def netns_exists(name: str) -> bool:
    """Whether ``name`` is a network namespace bound under /run/netns.

    A leftover plain file (a half-removed namespace) does not count: the file must be
    an nsfs file of a network namespace.
    """
    try:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _setns(fd: int) -> None:
    """Move the calling thread (only it) into the network namespace ``fd``."""
    os_setns: Callable[[int, int], None] | None = getattr(os, "setns", None)  # Python >= 3.12
    if os_setns is not None:
        os_setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _enter_netns(name: str) -> None:
    what = one_line(f"netns {name}")
    try:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise ResourceError(
            what, f"no such network namespace; create it with `ip netns add {name}`"
        ) from e
    except OSError as e:
        raise ResourceError(what, f"cannot open {NETNS_RUN_DIR}/{name}: {e.strerror}") from e
    try:
        _setns(fd)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise ResourceError(
                what, f"is not a network namespace; remove it with `ip netns del {name}`"
            ) from e
        if e.errno == errno.EPERM:
            raise ResourceError(what, "not permitted: needs CAP_SYS_ADMIN (run as root)") from e
        raise ResourceError(what, f"setns failed: {e.strerror}") from e
    finally:
        os.close(fd)


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread inside network namespace ``netns`` and return
    its result (or raise its exception). ``None`` runs it in the caller's namespace.

    Sockets and taps that ``fn`` opens stay in that namespace after the thread is gone.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            if netns is not None:
                _enter_netns(netns)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    worker = threading.Thread(target=body, name=f"iovirt-netns-{netns or '-'}", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


# --- the tap -------------------------------------------------------------------------------


def _check_ifname(name: str, what: str) -> None:
    """The kernel's dev_valid_name(), so that a bad name fails with a clear line."""
    raw = os.fsencode(name)
    if (
        not raw
        or len(raw) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in name)
    ):
        raise ResourceError(
            one_line(f"{what} {name!r}"),
            f"invalid interface name: 1 to {IFNAMSIZ - 1} bytes, no '/', ':' or whitespace",
        )


def tun_get_iff(fd: int) -> tuple[str, int]:
    """``TUNGETIFF``: the interface name and ifr_flags of the tap that ``fd`` is a queue of."""
    buf = bytearray(IFREQ.size)
    fcntl.ioctl(fd, TUNGETIFF, buf)
    raw_name, flags = IFREQ.unpack(bytes(buf))
    return os.fsdecode(raw_name.split(b"\0", 1)[0]), flags


@dataclass(frozen=True)
class _LinkSettings:
    """What a tap that existed before looked like, to put it back on close."""

    index: int
    mtu: int
    master: int  # 0: in no bridge
    up: bool


def _netlink_strerror(e: Exception) -> str:
    code = getattr(e, "code", None) or getattr(e, "errno", None)
    return os.strerror(code) if isinstance(code, int) and code > 0 else str(e)


def _link_info(link: Any) -> tuple[str | None, Any]:
    """(IFLA_INFO_KIND, IFLA_INFO_DATA) of an RTM_NEWLINK message."""
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return None, None
    return info.get_attr("IFLA_INFO_KIND"), info.get_attr("IFLA_INFO_DATA")


class TapBackend:
    """A tap device (one fd per queue pair) in the caller's or a named network namespace.

    ``ifname`` None lets the kernel pick a free ``tapN``; :attr:`ifname` holds the name
    either way. ``netns`` is a namespace under /run/netns that must exist; ``bridge`` a
    bridge in that same namespace that the tap joins; ``mtu`` and ``up`` set the link.
    Every failure is a one-line :class:`~iovirt.errors.ResourceError` and leaves nothing
    behind.
    """

    def __init__(
        self,
        ifname: str | None,
        *,
        netns: str | None = None,
        bridge: str | None = None,
        queues: int = 1,
        mtu: int | None = None,
        up: bool = True,
    ) -> None:
        if not 1 <= queues <= MAX_TAP_QUEUES:
            raise ValueError(f"a tap has 1 to {MAX_TAP_QUEUES} queues, not {queues}")
        if ifname is not None:
            _check_ifname(ifname, "tap")
        if bridge is not None:
            _check_ifname(bridge, "bridge")
        if netns is not None:
            netns_path(netns)  # validates the name before a thread is started for it
        self.netns = netns
        self.bridge = bridge
        self.queues = queues
        self.ifname = ifname or ""
        self.created = False  # True: the tap is ours and goes away with our fds
        self._fds: list[int] = []
        self._attached: list[bool] = []
        self._offloads = 0
        self._supported: int | None = None
        self._prior: _LinkSettings | None = None
        self._restore: dict[str, Any] = {}  # pyroute2 link("set") arguments that undo ours
        self._closed = False
        run_in_netns(netns, lambda: self._open(ifname, mtu, up))

    # -- NetBackend --

    @property
    def fds(self) -> list[int]:
        return list(self._fds)

    @property
    def multi_queue(self) -> bool:
        return self.queues > 1

    def supported_offloads(self) -> int:
        """Probe TUNSETOFFLOAD once (then restore the current offloads), as QEMU does:
        the kernel refuses a bit it does not know with EINVAL."""
        self._check_open()
        if self._supported is None:
            fd = self._fds[0]  # queue 0 is never detached
            supported = 0
            for bits in (
                TUN_F_CSUM,
                TUN_F_CSUM | TUN_F_TSO4,
                TUN_F_CSUM | TUN_F_TSO6,
                TUN_F_CSUM | TUN_F_UFO,
            ):
                if self._offload_accepted(fd, bits):
                    supported |= bits
            # TSO_ECN is only meaningful (and only accepted) together with a TSO bit.
            tso = supported & (TUN_F_TSO4 | TUN_F_TSO6)
            if tso and self._offload_accepted(fd, TUN_F_CSUM | tso | TUN_F_TSO_ECN):
                supported |= TUN_F_TSO_ECN
            self._ioctl_offload(fd, self._offloads)
            self._supported = supported
        return self._supported

    def set_offloads(self, offloads: int) -> None:
        """TUNSETOFFLOAD on every attached queue (a detached one answers EBADFD; the
        setting belongs to the device, so a queue attached later has it too)."""
        self._check_open()
        if offloads & ~KNOWN_OFFLOADS:
            raise ValueError(f"unknown TUN_F_* bits {offloads & ~KNOWN_OFFLOADS:#x}")
        for fd, attached in zip(self._fds, self._attached, strict=True):
            if not attached:
                continue
            try:
                self._ioctl_offload(fd, offloads)
            except OSError as e:
                raise ResourceError(
                    self._what(), f"offloads {offloads:#x} refused ({e.strerror})"
                ) from e
        self._offloads = offloads

    def set_active_pairs(self, pairs: int) -> None:
        """Attach queues below ``pairs`` and detach the rest (TUNSETQUEUE), so the kernel
        spreads traffic over the active queues only."""
        self._check_open()
        if not 1 <= pairs <= len(self._fds):
            raise ValueError(f"{pairs} active pairs, the tap has {len(self._fds)}")
        for index, fd in enumerate(self._fds):
            want = index < pairs
            if want == self._attached[index]:
                continue
            flags = IFF_ATTACH_QUEUE if want else IFF_DETACH_QUEUE
            try:
                fcntl.ioctl(fd, TUNSETQUEUE, IFREQ.pack(b"", flags))
            except OSError as e:
                verb = "attach" if want else "detach"
                raise ResourceError(
                    self._what(), f"cannot {verb} queue {index}: {e.strerror}"
                ) from e
            self._attached[index] = want

    def close(self) -> None:
        """Close our fds (which removes a tap we created) and undo what we changed on a
        tap that existed before. Idempotent; never raises (a failed undo is logged)."""
        if self._closed:
            return
        self._closed = True
        if self._restore:
            try:
                run_in_netns(self.netns, self._undo_changes)
            except Exception as e:
                log.warning("%s: could not restore its settings: %s", self._what(), e)
        self._close_fds()

    def __enter__(self) -> TapBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening (runs on the namespace worker thread) --

    def _open(self, ifname: str | None, mtu: int | None, up: bool) -> None:
        with IPRoute() as ipr:
            prior = self._existing_tap(ipr, ifname) if ifname is not None else None
            master = self._bridge_index(ipr) if self.bridge is not None else None
            try:
                for _ in range(self.queues):
                    self._fds.append(self._open_queue())
                    self._attached.append(True)
                self.created = prior is None
                self._prior = prior
                index = prior.index if prior is not None else self._index(ipr)
                self._configure(ipr, index, mtu, master, up)
            except BaseException:
                if self._restore:
                    try:
                        self._undo_changes(ipr)
                    except Exception as e:
                        log.warning("%s: could not restore its settings: %s", self._what(), e)
                self._close_fds()
                raise

    def _existing_tap(self, ipr: Any, ifname: str) -> _LinkSettings | None:
        """The settings of link ``ifname`` if it exists; refuses a link TUNSETIFF would
        refuse with a bare EINVAL, saying why."""
        indices = ipr.link_lookup(ifname=ifname)
        if not indices:
            return None
        link = ipr.get_links(indices[0])[0]
        what = one_line(f"tap {ifname}")
        kind, data = _link_info(link)
        if kind != "tun":
            raise ResourceError(
                what, f"exists and is not a tap (kind {kind or 'unknown'}); use another name"
            )
        if data is not None:
            if data.get_attr("IFLA_TUN_TYPE") not in (None, IFLA_TUN_TYPE_TAP):
                raise ResourceError(
                    what, "exists as a tun (layer 3) device; delete it or use another name"
                )
            theirs = data.get_attr("IFLA_TUN_MULTI_QUEUE")
            if theirs is not None and bool(theirs) != self.multi_queue:
                raise ResourceError(
                    what,
                    f"exists with other flags (multi_queue={'on' if theirs else 'off'}, "
                    f"queues={self.queues} needs {'on' if self.multi_queue else 'off'}); "
                    "delete it or use another name",
                )
        return _LinkSettings(
            index=int(link["index"]),
            mtu=int(link.get_attr("IFLA_MTU") or 0),
            master=int(link.get_attr("IFLA_MASTER") or 0),
            up=bool(link["flags"] & 1),  # IFF_UP
        )

    def _bridge_index(self, ipr: Any) -> int:
        assert self.bridge is not None
        what = one_line(f"bridge {self.bridge}")
        indices = ipr.link_lookup(ifname=self.bridge)
        if not indices:
            where = f" in netns {self.netns}" if self.netns else ""
            ip = f"ip -n {self.netns}" if self.netns else "ip"
            raise ResourceError(
                what,
                f"no such bridge{where}; create it with `{ip} link add {self.bridge} type bridge`",
            )
        kind, _ = _link_info(ipr.get_links(indices[0])[0])
        if kind != "bridge":
            raise ResourceError(what, f"is not a bridge (kind {kind or 'unknown'})")
        return int(indices[0])

    def _open_queue(self) -> int:
        """One more queue: open /dev/net/tun and TUNSETIFF it onto the tap."""
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                raise ResourceError(
                    TUN_DEVICE, "missing; load the tun module (`modprobe tun`)"
                ) from e
            if e.errno in (errno.EACCES, errno.EPERM):
                raise ResourceError(
                    TUN_DEVICE, "permission denied; needs read-write access (run as root)"
                ) from e
            raise ResourceError(TUN_DEVICE, f"cannot open: {e.strerror}") from e
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            if self.multi_queue:
                flags |= IFF_MULTI_QUEUE
            ifr = bytearray(IFREQ.pack(os.fsencode(self.ifname), flags))
            try:
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as e:
                raise self._tunsetiff_error(e) from e
            if not self.ifname:  # the kernel picked it (tapN); later queues attach to it
                self.ifname = os.fsdecode(IFREQ.unpack(bytes(ifr))[0].split(b"\0", 1)[0])
            # A multiqueue tap that another process has open keeps the flags its first
            # opener gave it (TUNSETIFF then ignores ours), so ask what the tap really does.
            if not tun_get_iff(fd)[1] & IFF_VNET_HDR:
                raise ResourceError(
                    self._what(),
                    "in use by another process without vnet_hdr; stop it or use another name",
                )
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            except OSError as e:
                raise ResourceError(self._what(), f"TUNSETVNETHDRSZ: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _tunsetiff_error(self, e: OSError) -> ResourceError:
        what = self._what()
        if e.errno == errno.EPERM:
            return ResourceError(what, "not permitted: needs CAP_NET_ADMIN (run as root)")
        if e.errno == errno.EBUSY:
            return ResourceError(
                what, "in use by another process; stop it there or use another name"
            )
        if e.errno == errno.EINVAL:
            return ResourceError(
                what,
                "exists with other flags (multi_queue/vnet_hdr); delete it or use another name",
            )
        return ResourceError(what, f"TUNSETIFF failed: {e.strerror}")

    def _index(self, ipr: Any) -> int:
        indices = ipr.link_lookup(ifname=self.ifname)
        if not indices:
            raise ResourceError(self._what(), "vanished right after it was opened")
        return int(indices[0])

    def _configure(
        self, ipr: Any, index: int, mtu: int | None, master: int | None, up: bool
    ) -> None:
        """MTU, then bridge, then up; on a tap that existed before, remember how to undo."""
        prior = self._prior
        if mtu is not None and (prior is None or prior.mtu != mtu):
            try:
                ipr.link("set", index=index, mtu=mtu)
            except NetlinkError as e:
                raise ResourceError(
                    self._what(), f"MTU {mtu} refused ({_netlink_strerror(e)}); taps take 68..65535"
                ) from e
            if prior is not None:
                self._restore["mtu"] = prior.mtu
        if master is not None and (prior is None or prior.master != master):
            try:
                ipr.link("set", index=index, master=master)
            except NetlinkError as e:
                raise ResourceError(
                    one_line(f"bridge {self.bridge}"),
                    f"cannot add tap {self.ifname}: {_netlink_strerror(e)}",
                ) from e
            if prior is not None:
                self._restore["master"] = prior.master
        if up and (prior is None or not prior.up):
            try:
                ipr.link("set", index=index, state="up")
            except NetlinkError as e:
                raise ResourceError(
                    self._what(), f"cannot bring it up: {_netlink_strerror(e)}"
                ) from e
            if prior is not None:
                self._restore["state"] = "down"

    # -- closing --

    def _undo_changes(self, ipr: Any = None) -> None:
        """Put a pre-existing tap's MTU, bridge and state back (same namespace as ``ipr``,
        or the worker's when called through :func:`run_in_netns`)."""
        prior, changes = self._prior, self._restore
        self._restore = {}
        if prior is None or not changes:
            return
        if ipr is None:
            with IPRoute() as own:
                self._undo_changes_with(own, prior, changes)
        else:
            self._undo_changes_with(ipr, prior, changes)

    def _undo_changes_with(self, ipr: Any, prior: _LinkSettings, changes: dict[str, Any]) -> None:
        # The index may have been reused by another link if someone deleted the tap.
        if prior.index not in ipr.link_lookup(ifname=self.ifname):
            return
        ipr.link("set", index=prior.index, **changes)

    def _close_fds(self) -> None:
        fds, self._fds, self._attached = self._fds, [], []
        for fd in fds:
            os.close(fd)

    # -- helpers --

    def _what(self) -> str:
        return one_line(f"tap {self.ifname}") if self.ifname else "tap"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._what()} is closed")

    @staticmethod
    def _ioctl_offload(fd: int, offloads: int) -> None:
        fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)

    def _offload_accepted(self, fd: int, offloads: int) -> bool:
        try:
            self._ioctl_offload(fd, offloads)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise ResourceError(self._what(), f"TUNSETOFFLOAD: {e.strerror}") from e
        return True
