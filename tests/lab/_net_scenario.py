"""The lab side of tests/lab/test_lab_virtio_net.py: run as root INSIDE the lab, not by pytest.

    .venv/bin/python tests/lab/_net_scenario.py --initrd GUEST.img --out /out

It builds the other end of the guest's NIC and runs the guest:

1. a network namespace (:data:`NETNS`, pyroute2) holding a persistent multi-queue tap
   with IFF_VNET_HDR (:data:`TAP`), 10.0.2.1/24 on it, up;
2. servers listening inside that namespace (their sockets are opened there through
   ``run_in_netns``; the threads serving them need not be): a sink on 5001 that reads
   exactly ``--mib`` MiB and hashes it, a source on 5002 that sends ``--mib`` MiB of
   seeded random bytes, a second sink on 5003 for the sender the guest pins to its other
   CPU, and a "done" port 5004 that answers only once the namespace has pinged the guest,
   so the guest stays up for that ping. Each server closes its connection after the
   exact byte count, which is what makes busybox ``nc`` in the guest exit;
3. the ping from the namespace to the guest (``nsenter ... busybox ping``), started when
   the guest connects to the first sink;
4. the VM: ``python -m iovirt.cli -v run --no-lab --timeout 300 vm.toml`` with 2 vCPUs,
   512M and a ``[[nic]]`` on that tap (``--model``, default virtio-net over PCI, and
   ``--queues`` pairs, default 2; the tap is multi-queue when that is more than one).

Everything (the VM's console and stderr, each server's byte count and sha256, the ping)
goes to ``OUT/net-scenario.json``. The script does not judge: the test does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

from iovirt.backends.tap import netns_exists, run_in_netns

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path("/vmlinuz")
CMDLINE = "console=ttyS0 panic=-1 reboot=k quiet"

NETNS = "iovirt-nettest"
TAP = "nettap0"
HOST_ADDR = "10.0.2.1"
GUEST_ADDR = "10.0.2.15"
PREFIX_LEN = 24
GUEST_MAC = "52:54:00:aa:bb:01"
QUEUE_PAIRS = 2

SINK_PORT = 5001
SOURCE_PORT = 5002
SINK2_PORT = 5003
DONE_PORT = 5004
SOURCE_SEED = 0x5EED
MIB = 1 << 20
CHUNK = 256 * 1024

VM_TIMEOUT = 300  # iovirt run --timeout
ACCEPT_TIMEOUT = 420.0  # a server waits this long for the guest to connect
IO_TIMEOUT = 120.0  # and this long for any one recv/send to make progress


def _make_tap(multi_queue: bool) -> None:
    """Inside NETNS: lo up, and the persistent vnet_hdr tap, addressed, up."""
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link(
            "add",
            ifname=TAP,
            kind="tuntap",
            mode="tap",
            ifr={"no_pi": True, "vnet_hdr": True, "multi_queue": multi_queue},
        )
        index = ipr.link_lookup(ifname=TAP)[0]
        ipr.addr("add", index=index, address=HOST_ADDR, prefixlen=PREFIX_LEN)
        ipr.link("set", index=index, state="up")


def _tap_info() -> dict[str, Any]:
    """What the kernel says about the tap (inside NETNS): flags and packet counters."""
    with IPRoute() as ipr:
        indices = ipr.link_lookup(ifname=TAP)
        if not indices:
            return {"present": False}
        link = ipr.get_links(indices[0])[0]
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        stats = link.get_attr("IFLA_STATS64") or {}
        return {
            "present": True,
            "multi_queue": data.get_attr("IFLA_TUN_MULTI_QUEUE"),
            "vnet_hdr": data.get_attr("IFLA_TUN_VNET_HDR"),
            "persist": data.get_attr("IFLA_TUN_PERSIST"),
            "rx_packets": stats.get("rx_packets"),
            "tx_packets": stats.get("tx_packets"),
            "rx_bytes": stats.get("rx_bytes"),
            "tx_bytes": stats.get("tx_bytes"),
        }


def _remove_tap() -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=TAP):
            ipr.link("del", index=index)


@contextlib.contextmanager
def namespace(multi_queue: bool) -> Iterator[None]:
    """NETNS with the tap in it; both removed afterwards, whatever happened."""
    if netns_exists(NETNS):
        netns.remove(NETNS)
    netns.create(NETNS)
    try:
        run_in_netns(NETNS, lambda: _make_tap(multi_queue))
        yield
    finally:
        with contextlib.suppress(Exception):
            run_in_netns(NETNS, _remove_tap)
        netns.remove(NETNS)


def listen_in_netns(port: int) -> socket.socket:
    """A TCP socket listening on ``port`` in NETNS (it stays there whichever thread uses it)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(1)
        return s

    return run_in_netns(NETNS, make)


class Server:
    """Serves one connection on a socket listening in NETNS, on a thread of its own.

    ``handler(conn, result)`` does the work and fills ``result``; an exception lands in
    ``result["error"]``. ``connected`` is set when the guest's connection arrives.
    """

    def __init__(
        self, name: str, port: int, handler: Callable[[socket.socket, dict[str, Any]], None]
    ) -> None:
        self.name = name
        self.port = port
        self.handler = handler
        self.result: dict[str, Any] = {"port": port, "connected": False}
        self.connected = threading.Event()
        self.listener = listen_in_netns(port)
        self.thread = threading.Thread(target=self._serve, name=f"server-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.listener.settimeout(ACCEPT_TIMEOUT)
            conn, peer = self.listener.accept()
            self.result.update(connected=True, peer=peer[0], accepted_at=time.monotonic())
            self.connected.set()
            with conn:
                conn.settimeout(IO_TIMEOUT)
                self.handler(conn, self.result)
        except Exception as e:
            self.result["error"] = f"{type(e).__name__}: {e}"
        finally:
            self.listener.close()
            self.result["finished_at"] = time.monotonic()

    def join(self, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.result.setdefault("error", "still running when the scenario ended")
        return self.result


def sink(size: int) -> Callable[[socket.socket, dict[str, Any]], None]:
    """Read exactly ``size`` bytes (fewer if the peer ends first), hash them, close."""

    def handle(conn: socket.socket, result: dict[str, Any]) -> None:
        digest = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        total = 0
        start = time.monotonic()
        while total < size:
            got = conn.recv_into(view[: min(CHUNK, size - total)])
            if got == 0:
                break
            digest.update(view[:got])
            total += got
        result.update(bytes=total, sha256=digest.hexdigest(), seconds=time.monotonic() - start)

    return handle


def source(data: bytes) -> Callable[[socket.socket, dict[str, Any]], None]:
    """Send ``data`` (already hashed by the caller) and close."""

    def handle(conn: socket.socket, result: dict[str, Any]) -> None:
        start = time.monotonic()
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        result.update(bytes=len(data), seconds=time.monotonic() - start)
        # Wait for the guest's end of stream, so that closing cannot reset the connection
        # while our last bytes are still on their way.
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass

    return handle


def netns_ping(result: dict[str, Any]) -> None:
    """Ping the guest from NETNS (busybox ping, entered with nsenter; no `ip`)."""
    cmd = ["nsenter", f"--net=/run/netns/{NETNS}", "busybox", "ping", "-c", "3", GUEST_ADDR]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        result.update(returncode=done.returncode, output=done.stdout + done.stderr)
    except Exception as e:
        result.update(returncode=None, output=f"{type(e).__name__}: {e}")


def vm_config(initrd: Path, model: str, queues: int) -> str:
    return f"""\
[vm]
memory = "512M"
vcpus = 2
kernel = "{KERNEL}"
initrd = "{initrd}"
cmdline = "{CMDLINE}"

[serial]
backend = {{ kind = "stdio", input = false }}

[[nic]]
model = "{model}"
mac = "{GUEST_MAC}"
queues = {queues}
backend = {{ kind = "tap", ifname = "{TAP}", netns = "{NETNS}" }}
"""


def guest_script(mib: int, mib2: int, virtio: bool) -> str:
    """The guest's half: configure eth0, ping, the three transfers, the interrupt counts.
    Its lines ``key=value`` are what the tests read; ``virtio`` adds the negotiated
    feature bits (a virtio device's sysfs ``features``)."""
    features = 'echo "features=$(cat $n/device/features)"\n' if virtio else ""
    return f"""\
n=/sys/class/net/eth0
echo "mac=$(cat $n/address)"
echo "queues=$(ls $n/queues | tr '\\n' ' ')"
{features}ip link set lo up
ip addr add {GUEST_ADDR}/24 dev eth0
ip link set eth0 up
i=0
until ping -c 1 -W 1 {HOST_ADDR} >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -ge 30 ]; then break; fi
done
if ping -c 3 {HOST_ADDR} >/tmp/ping 2>&1; then echo "ping=ok"; else echo "ping=failed"; fi
sed 's/^/ping: /' /tmp/ping
head -c {mib * MIB} /dev/urandom >/tmp/tx
echo "tx.sha256=$(sha256sum </tmp/tx | cut -d' ' -f1)"
if taskset -c 0 nc {HOST_ADDR} 5001 </tmp/tx; then echo "tx.nc=ok"; else echo "tx.nc=failed"; fi
rm /tmp/tx
if taskset -c 0 nc {HOST_ADDR} 5002 >/tmp/rx; then echo "rx.nc=ok"; else echo "rx.nc=failed"; fi
echo "rx.bytes=$(wc -c </tmp/rx)"
echo "rx.sha256=$(sha256sum </tmp/rx | cut -d' ' -f1)"
rm /tmp/rx
head -c {mib2 * MIB} /dev/urandom >/tmp/tx2
echo "tx2.sha256=$(sha256sum </tmp/tx2 | cut -d' ' -f1)"
if taskset -c 1 nc {HOST_ADDR} 5003 </tmp/tx2; then echo "tx2.nc=ok"; else echo "tx2.nc=failed"; fi
rm /tmp/tx2
echo "done=$(nc {HOST_ADDR} 5004 </dev/null)"
grep virtio /proc/interrupts | sed 's/^/irq: /'
"""


def run_scenario(
    initrd: Path, out: Path, mib: int, mib2: int, model: str, queues: int
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "netns": NETNS,
        "tap": TAP,
        "mib": mib,
        "mib2": mib2,
        "model": model,
        "queues": queues,
    }
    done = subprocess.run(["modprobe", "tun"], capture_output=True, text=True, check=False)
    report["modprobe_tun"] = done.returncode
    data = random.Random(SOURCE_SEED).randbytes(mib * MIB)
    report["source_sha256"] = hashlib.sha256(data).hexdigest()
    config = out / "vm.toml"
    config.write_text(vm_config(initrd, model, queues))
    with namespace(multi_queue=queues > 1):
        report["tap_before"] = run_in_netns(NETNS, _tap_info)
        ping: dict[str, Any] = {}
        ping_thread = threading.Thread(target=netns_ping, args=(ping,), daemon=True)

        def done_handler(conn: socket.socket, result: dict[str, Any]) -> None:
            # Hold the guest here until the namespace has pinged it.
            starter.join(90)
            if ping_thread.ident is not None:
                ping_thread.join(90)
            conn.sendall(b"done\n")
            result["ping_finished"] = not ping_thread.is_alive()

        servers = {
            "sink": Server("sink", SINK_PORT, sink(mib * MIB)),
            "source": Server("source", SOURCE_PORT, source(data)),
            "sink2": Server("sink2", SINK2_PORT, sink(mib2 * MIB)),
            "done": Server("done", DONE_PORT, done_handler),
        }

        def ping_when_connected() -> None:
            if servers["sink"].connected.wait(ACCEPT_TIMEOUT):
                ping_thread.start()

        starter = threading.Thread(target=ping_when_connected, daemon=True)
        starter.start()
        cmd = [
            sys.executable,
            "-m",
            "iovirt.cli",
            "-v",
            "run",
            "--no-lab",
            "--timeout",
            str(VM_TIMEOUT),
            str(config),
        ]
        start = time.monotonic()
        try:
            vm = subprocess.run(
                cmd,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=VM_TIMEOUT + 120,
                check=False,
            )
            report["vm"] = {
                "argv": cmd,
                "returncode": vm.returncode,
                "stdout": vm.stdout,
                "stderr": vm.stderr,
            }
        except subprocess.TimeoutExpired as e:
            report["vm"] = {
                "argv": cmd,
                "returncode": None,
                "stdout": (e.stdout or b"").decode(errors="replace"),
                "stderr": (e.stderr or b"").decode(errors="replace") + "\n(killed: timeout)",
            }
        report["vm"]["wall"] = time.monotonic() - start
        report["servers"] = {name: s.join(10) for name, s in servers.items()}
        if ping_thread.ident is not None:
            ping_thread.join(60)
        report["netns_ping"] = ping or {"returncode": None, "output": "never started"}
        report["tap_after"] = run_in_netns(NETNS, _tap_info)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--initrd", type=Path, required=True, help="the guest's initramfs")
    parser.add_argument("--out", type=Path, default=Path("/out"), help="where the JSON goes")
    parser.add_argument("--mib", type=int, default=64, help="MiB per direction")
    parser.add_argument("--mib2", type=int, default=16, help="MiB from the second sender")
    parser.add_argument("--model", default="virtio-net", help="the [[nic]] model")
    parser.add_argument("--queues", type=int, default=QUEUE_PAIRS, help="queue pairs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        report = run_scenario(
            args.initrd.resolve(), args.out, args.mib, args.mib2, args.model, args.queues
        )
    except Exception:
        report = {"scenario_error": traceback.format_exc()}
    (args.out / "net-scenario.json").write_text(json.dumps(report, indent=1))
    return 0 if "scenario_error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
