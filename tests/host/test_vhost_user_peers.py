"""iovirt's vhost-user back-ends and front-end against real peers nobody here wrote.

- Debian's QEMU (TCG: no KVM needed) boots the stock Debian kernel with an initramfs;
  its disk is ``vhost-user-blk-pci`` on ``iovirt vhost-user blk`` and its NIC
  ``-netdev vhost-user`` on ``iovirt vhost-user net`` (a tap in a network namespace this
  test creates). The guest checksums what it reads from the disk and from a TCP stream
  the namespace sends it, writes a pattern to the disk, and pings the namespace; the host
  compares every checksum.
- DPDK's ``dpdk-testpmd`` with a ``net_virtio_user`` port (DPDK's own vhost-user
  front-end, polling, in macswap mode) on ``iovirt vhost-user net``: frames injected on
  the tap reach testpmd through our RX ring and come back through our TX ring with the
  MACs swapped, payloads intact.
- ``qemu-storage-daemon``'s vhost-user-blk export as the back-end of iovirt's front-end
  (:class:`~iovirt.virtio.vhost_user.VhostUserBlk`): GET_CONFIG shows the image's size
  and a virtio-blk read through the rings returns the image's bytes.

Each peer runs once, bounded by timeouts; everything started is stopped, the namespace
removed, the hugepage setting restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

from iovirt.backends.tap import netns_exists, run_in_netns
from iovirt.boot.initramfs import guest_test_initramfs, parse_guest_test_output
from iovirt.boot.linux import kernel_release
from iovirt.memory import GuestMemory
from iovirt.testing.virtio_driver import SplitDriver
from iovirt.virtio.device import VIRTIO_F_EVENT_IDX, Activation, QueueConfig
from iovirt.virtio.vhost_user import VhostUserBlk

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
NETNS = f"iovirt-vu-{os.getpid()}"
TAP = "vutap0"
HOST_ADDR, GUEST_ADDR, PREFIX = "10.77.0.1", "10.77.0.2", 24
GUEST_MAC = "52:54:00:77:00:02"
MIB = 1 << 20
DISK_MIB = 16
GUEST_WRITE_AT_MIB = 8
NET_MIB = 4
SOURCE_PORT = 5000
QEMU_TIMEOUT = 240
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")

pytestmark = pytest.mark.timeout(600)


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    assert not missing, f"missing on this machine: {missing} (install.sh installs them)"


@contextlib.contextmanager
def _backend(kind: str, sock: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``iovirt vhost-user KIND`` as a separate process, until the block ends."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iovirt.backends.vhost_user_cli",
            kind,
            "--socket",
            str(sock),
            *args,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening" in line, f"back-end did not start: {line!r} {proc.stderr.read()}"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _make_tap() -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link(
            "add",
            ifname=TAP,
            kind="tuntap",
            mode="tap",
            ifr={"no_pi": True, "vnet_hdr": True, "multi_queue": False},
        )
        index = ipr.link_lookup(ifname=TAP)[0]
        ipr.addr("add", index=index, address=HOST_ADDR, prefixlen=PREFIX)
        ipr.link("set", index=index, state="up")


@pytest.fixture
def namespace() -> Iterator[str]:
    if netns_exists(NETNS):
        netns.remove(NETNS)
    netns.create(NETNS)
    try:
        run_in_netns(NETNS, _make_tap)
        yield NETNS
    finally:
        netns.remove(NETNS)


def _tcp_source(data: bytes) -> tuple[socket.socket, threading.Thread]:
    """A listener in the namespace that sends ``data`` to the first client and closes."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST_ADDR, SOURCE_PORT))
        s.listen(1)
        return s

    listener = run_in_netns(NETNS, make)
    listener.settimeout(QEMU_TIMEOUT)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


GUEST_SCRIPT = f"""
echo "disk.size=$(cat /sys/block/vda/size)"
echo "disk.read=$(dd if=/dev/vda bs=1M count={GUEST_WRITE_AT_MIB} iflag=direct status=none \
| sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/p bs=1M count=4 status=none
echo "disk.wrote=$(sha256sum </tmp/p | cut -d' ' -f1)"
dd if=/tmp/p of=/dev/vda bs=1M seek={GUEST_WRITE_AT_MIB} oflag=direct conv=fsync status=none
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_ADDR}/{PREFIX} dev eth0
echo "net.mac=$(cat /sys/class/net/eth0/address)"
ping -c 3 -W 5 {HOST_ADDR} >/tmp/ping && echo "net.ping=ok" || echo "net.ping=failed"
cat /tmp/ping
echo "net.received=$(nc {HOST_ADDR} {SOURCE_PORT} | sha256sum | cut -d' ' -f1)"
"""


def test_qemu_boots_a_stock_guest_on_our_blk_and_net_backends(
    tmp_path: Path, namespace: str
) -> None:
    _need("qemu-system-x86_64")
    kver = kernel_release(KERNEL.read_bytes())
    assert kver is not None
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(
        guest_test_initramfs(
            kver,
            ["virtio_pci", "virtio_blk", "virtio_net"],
            GUEST_SCRIPT,
            end="poweroff",
            timeout=120,
        )
    )
    rng = random.Random(11)
    disk = tmp_path / "disk.img"
    disk.write_bytes(rng.randbytes(DISK_MIB * MIB))
    disk_read = hashlib.sha256(disk.read_bytes()[: GUEST_WRITE_AT_MIB * MIB]).hexdigest()
    payload = rng.randbytes(NET_MIB * MIB)
    listener, source = _tcp_source(payload)
    blk_sock, net_sock = tmp_path / "blk.sock", tmp_path / "net.sock"
    with (
        _backend("blk", blk_sock, "--file", str(disk)),
        _backend("net", net_sock, "--tap", TAP, "--netns", namespace),
    ):
        qemu = subprocess.run(
            [
                "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                "-numa", "node,memdev=mem",
                "-kernel", str(KERNEL), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1 reboot=k quiet",
                "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                "-chardev", f"socket,id=blk0,path={blk_sock}",
                "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1",
                "-chardev", f"socket,id=net0,path={net_sock}",
                "-netdev", "vhost-user,id=n0,chardev=net0",
                # vectors=0 (INTx): Debian's QEMU 7.2 under TCG segfaults in
                # msix_set_vector_notifiers when vhost-user-net starts on MSI-X
                # (backtrace: vhost_net_start -> virtio_pci_set_guest_notifiers).
                "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},vectors=0",
            ],
            capture_output=True,
            text=True,
            timeout=QEMU_TIMEOUT,
        )  # fmt: skip
    listener.close()
    source.join(10)
    console = ANSI.sub("", qemu.stdout)
    rc, output = parse_guest_test_output(console)
    report = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    failure = f"console:\n{console[-3000:]}\nstderr:\n{qemu.stderr[-2000:]}"
    assert qemu.returncode == 0, failure
    assert rc == 0, failure
    assert report.get("disk.size") == str(DISK_MIB * MIB // 512), failure
    assert report.get("disk.read") == disk_read, failure
    written = disk.read_bytes()[GUEST_WRITE_AT_MIB * MIB : (GUEST_WRITE_AT_MIB + 4) * MIB]
    assert report.get("disk.wrote") == hashlib.sha256(written).hexdigest(), failure
    assert report.get("net.mac") == GUEST_MAC, failure
    assert report.get("net.ping") == "ok", failure
    assert "3 packets transmitted, 3 packets received" in output, failure
    assert report.get("net.received") == hashlib.sha256(payload).hexdigest(), failure


# ---- DPDK -------------------------------------------------------------------------------

HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
DPDK_HUGEPAGES = 256  # 512 MiB of 2 MiB pages
FRAMES = 64


@pytest.fixture
def hugepages() -> Iterator[None]:
    before = int(HUGEPAGES.read_text())
    if before < DPDK_HUGEPAGES:
        HUGEPAGES.write_text(str(DPDK_HUGEPAGES))
    try:
        yield
    finally:
        if before < DPDK_HUGEPAGES:
            HUGEPAGES.write_text(str(before))


def _packet_socket() -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        s.bind((TAP, 0))
        return s

    return run_in_netns(NETNS, make)


def test_dpdk_testpmd_virtio_user_exchanges_packets_with_our_net_backend(
    tmp_path: Path, namespace: str, hugepages: None
) -> None:
    """testpmd (macswap) bounces every frame we inject on the tap back through our
    back-end: tap -> our RX ring -> testpmd -> our TX ring -> tap."""
    _need("dpdk-testpmd")
    sock = tmp_path / "net.sock"
    with _backend("net", sock, "--tap", TAP, "--netns", namespace):
        pmd = subprocess.Popen(
            [
                # --in-memory: hugepages from memfd (no hugetlbfs mount here), shareable
                # with a vhost-user back-end, one fd per segment list (a memory table has 8
                # regions at most); IOVA as VA (no physical addresses needed).
                "dpdk-testpmd", "-l", "0-1", "-n", "1", "--no-pci", "--in-memory",
                "--single-file-segments",
                "--iova-mode=va", "-m", "256",
                f"--vdev=net_virtio_user0,path={sock},queues=1,queue_size=256",
                "--", "--forward-mode=macswap", "--auto-start", "--nb-cores=1",
                "--txq=1", "--rxq=1", "--total-num-mbufs=8192",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            out = _exchange_with_testpmd(pmd)
        finally:
            with contextlib.suppress(OSError):
                assert pmd.stdin is not None
                pmd.stdin.write("\n")
                pmd.stdin.flush()
            try:
                tail, _ = pmd.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                pmd.kill()
                tail, _ = pmd.communicate()
    sent, received, log_text = out
    assert len(received) == FRAMES, log_text + tail[-3000:]
    by_payload = {frame[14:]: frame for frame in received}
    for frame in sent:
        back = by_payload.get(frame[14:])
        assert back is not None, "a frame did not come back"
        # macswap: destination and source exchanged, payload (with its checksum) intact.
        assert back[:6] == frame[6:12] and back[6:12] == frame[:6]
        digest = back[-32:]
        assert hashlib.sha256(back[14:-32]).digest() == digest


def _exchange_with_testpmd(pmd: subprocess.Popen[str]) -> tuple[list[bytes], list[bytes], str]:
    # testpmd's stdout is a pipe (block-buffered): wait for its link instead of its log.
    time.sleep(8)
    if pmd.poll() is not None:
        return [], [], f"testpmd exited with {pmd.returncode}"
    tap = _packet_socket()
    tap.settimeout(2)
    ours = bytes.fromhex("020000000001")
    theirs = bytes.fromhex("020000000002")
    sent: list[bytes] = []
    received: list[bytes] = []
    try:
        for i in range(FRAMES):
            body = struct.pack("<I", i) + os.urandom(200 + i)
            frame = theirs + ours + b"\x88\xb5" + body + hashlib.sha256(body).digest()
            sent.append(frame)
            tap.send(frame)
        end = time.monotonic() + 15
        while len(received) < FRAMES and time.monotonic() < end:
            readable, _, _ = select.select([tap], [], [], 1)
            if readable:
                data = tap.recv(4096)
                if data[:6] == ours and data[12:14] == b"\x88\xb5":
                    received.append(data)
    finally:
        tap.close()
    return sent, received, ""


# ---- qemu-storage-daemon ----------------------------------------------------------------


def test_our_frontend_uses_qemu_storage_daemon_as_its_disk(tmp_path: Path) -> None:
    _need("qemu-storage-daemon")
    image = tmp_path / "qsd.img"
    content = random.Random(5).randbytes(4 * MIB)
    image.write_bytes(content)
    sock = tmp_path / "qsd.sock"
    qsd = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
            f"addr.path={sock},writable=on",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    memory = GuestMemory([(0, 8 * MIB)])
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dev = None
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        dev = VhostUserBlk(str(sock), queue_size=64)
        assert dev.capacity == len(content) // 512
        driver = SplitDriver(memory, 64, 0x10000)
        queue = QueueConfig(64, driver.desc_gpa, driver.driver_gpa, driver.device_gpa, True)
        features = dev.device_features() & ~(1 << VIRTIO_F_EVENT_IDX)
        dev.activate(Activation(memory, features, [queue], [kick], [call]))
        for sector, count in ((0, 8), (4097, 3), (len(content) // 512 - 1, 1)):
            head = driver.add_chain([struct.pack("<IIQ", 0, 0, sector)], [count * 512, 1])
            data_buf, status_buf = driver.writable_buffers(head)
            os.eventfd_write(kick, 1)
            used: list[tuple[int, int]] = []
            deadline = time.monotonic() + 10
            while not used and time.monotonic() < deadline:  # interrupts may be spurious
                ready, _, _ = select.select([call], [], [], 1)
                if ready:
                    os.eventfd_read(call)
                used = driver.used()
            assert [h for h, _ in used] == [head], "qemu-storage-daemon did not complete it"
            assert memory.read(*status_buf) == b"\x00"
            assert memory.read(*data_buf) == content[sector * 512 : (sector + count) * 512]
    finally:
        if dev is not None:
            dev.close()
        qsd.terminate()
        try:
            qsd.wait(10)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait()
        for fd in (kick, call):
            os.close(fd)
        memory.close()
