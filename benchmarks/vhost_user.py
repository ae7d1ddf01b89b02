"""vhost-user back-ends side by side: iovirt's against qemu-storage-daemon's and DPDK's.

Same front-end load, same run, back-ends swapped:

- **blk**: a C virtio-blk driver (``vhost_user_load.c``, built here with gcc) keeps a split
  ring of 256 busy through iovirt's vhost-user front-end (``VhostUserBlk``: memory table,
  rings, eventfds), against ``iovirt vhost-user blk`` and against qemu-storage-daemon's
  ``vhost-user-blk`` export of the same raw image in tmpfs (/dev/shm). 4k random reads at
  queue depth 32 (IOPS) and 128k sequential reads at queue depth 8 (MB/s).
- **net**: ``dpdk-testpmd`` with a ``net_virtio_user`` port in ``txonly`` mode (64- and
  1500-byte frames) against ``iovirt vhost-user net`` (frames go to a tap in a network
  namespace created here) and against a second testpmd with DPDK's ``net_vhost`` back-end
  in ``rxonly`` mode. Packets per second are the front-end's transmitted rate: virtio-user
  can only send what the back-end takes off the ring.

Each case runs ``--repeat`` times, variants interleaved; the median and the ratio
(iovirt / peer) are printed. ``--json FILE`` saves everything.

    .venv/bin/python benchmarks/vhost_user.py [--seconds 5] [--repeat 3] [--only blk|net]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from iovirt.memory import GuestMemory  # noqa: E402
from iovirt.virtio.device import VIRTIO_F_EVENT_IDX, Activation, QueueConfig  # noqa: E402
from iovirt.virtio.vhost_user import VhostUserBlk  # noqa: E402

MIB = 1 << 20
RING = 256
DESC, AVAIL, USED, BUFS = 0x10000, 0x11000, 0x12000, 0x100000
RAM = 64 * MIB
IMAGE_MIB = 512
BLK_CASES = {  # name: (random, block size, queue depth)
    "4k random read IOPS": (1, 4096, 32),
    "128k sequential read MB/s": (0, 128 * 1024, 8),
}
NETNS = f"iovirt-vubench-{os.getpid()}"
TAP = "vubench0"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- blk --------------------------------------------------------------------------------


def build_load(tmp: Path) -> ctypes.CDLL:
    out = tmp / "vhost_user_load.so"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-shared",
            "-fPIC",
            "-o",
            str(out),
            str(REPO / "benchmarks/vhost_user_load.c"),
        ],
        check=True,
    )
    lib = ctypes.CDLL(str(out))
    lib.blk_load.restype = ctypes.c_int64
    lib.blk_load.argtypes = [
        ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint16,
        ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
        ctypes.c_uint32, ctypes.c_uint64, ctypes.c_double,
    ]  # fmt: skip
    return lib


@contextlib.contextmanager
def process(cmd: list[str], ready: Callable[[], bool]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if ready():
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{cmd[0]} did not come up")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def blk_backend(kind: str, sock: Path, image: Path) -> list[str]:
    if kind == "iovirt":
        return [sys.executable, "-m", "iovirt.backends.vhost_user_cli", "blk",
                "--socket", str(sock), "--file", str(image)]  # fmt: skip
    return [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock}",
    ]  # fmt: skip


def blk_run(lib: ctypes.CDLL, sock: Path, random: int, bs: int, qd: int, seconds: float) -> float:
    """One timed run through our front-end; requests (or bytes) per second."""
    memory = GuestMemory([(0, RAM)])
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dev = VhostUserBlk(str(sock), queue_size=RING)
    try:
        features = dev.device_features() & ~(1 << VIRTIO_F_EVENT_IDX)
        queue = QueueConfig(RING, DESC, AVAIL, USED, True)
        dev.activate(Activation(memory, features, [queue], [kick], [call]))
        start = time.perf_counter()
        done = lib.blk_load(
            memory.regions[0].host_addr, DESC, AVAIL, USED, RING, BUFS, kick, call, random,
            bs, qd, IMAGE_MIB * MIB, seconds,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        if done < 0:
            raise RuntimeError(f"the load generator failed ({done})")
        return done / elapsed if random else done * bs / elapsed / 1e6
    finally:
        dev.close()
        os.close(kick)
        os.close(call)
        memory.close()


def bench_blk(seconds: float, repeat: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {c: {"iovirt": [], "qsd": []} for c in BLK_CASES}
    with (
        tempfile.TemporaryDirectory() as tmpdir,
        tempfile.TemporaryDirectory(dir="/dev/shm") as shm,
    ):
        tmp = Path(tmpdir)
        lib = build_load(tmp)
        image = Path(shm) / "bench.img"
        with image.open("wb") as f:
            for _ in range(IMAGE_MIB):
                f.write(os.urandom(MIB))
        for rep in range(repeat):
            for kind in ("iovirt", "qsd"):
                sock = tmp / f"{kind}.sock"
                with process(blk_backend(kind, sock, image), sock.exists):
                    for case, (random, bs, qd) in BLK_CASES.items():
                        value = blk_run(lib, sock, random, bs, qd, seconds)
                        results[case][kind].append(value)
                        log(f"blk {case} run {rep + 1} {kind}: {value:,.0f}")
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
    return results


# ---- net --------------------------------------------------------------------------------

DPDK_EAL = ["--no-pci", "--in-memory", "--single-file-segments", "--iova-mode=va", "-m", "256"]
HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def net_setup() -> Iterator[None]:
    from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

    from iovirt.backends.tap import run_in_netns

    def make_tap() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname=TAP, kind="tuntap", mode="tap",
                     ifr={"no_pi": True, "vnet_hdr": True})  # fmt: skip
            ipr.link("set", index=ipr.link_lookup(ifname=TAP)[0], state="up")

    before = int(HUGEPAGES.read_text())
    HUGEPAGES.write_text(str(max(before, 512)))
    netns.create(NETNS)
    try:
        run_in_netns(NETNS, make_tap)
        yield
    finally:
        netns.remove(NETNS)
        HUGEPAGES.write_text(str(before))


def front_end_pps(sock: Path, frame: int, seconds: float, prefix: str) -> float:
    """dpdk-testpmd virtio-user txonly: the median of its per-second Tx-pps samples."""
    cmd = [
        "dpdk-testpmd", "-l", "0-1", "--main-lcore", "0", *DPDK_EAL, "--file-prefix", prefix,
        f"--vdev=net_virtio_user0,path={sock},queues=1,queue_size=1024",
        "--", "--forward-mode=txonly", f"--txpkts={frame}", "--auto-start", "--nb-cores=1",
        "--total-num-mbufs=16384", "--stats-period", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    samples: list[int] = []
    seen: list[str] = []
    deadline = time.monotonic() + seconds + 60  # start-up is slow on a loaded host
    try:
        # One sample a second once forwarding runs; the first two include start-up.
        while len(samples) < int(seconds) + 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"Tx-pps:\s+(\d+)", line)
            if m:
                samples.append(int(m.group(1)))
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.write("\n")
            proc.stdin.flush()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    useful = samples[2:]
    if not useful:
        raise RuntimeError(f"testpmd gave no Tx-pps samples:\n{''.join(seen)[-3000:]}")
    return float(statistics.median(useful))


def net_backend(kind: str, sock: Path) -> list[str]:
    if kind == "iovirt":
        return [sys.executable, "-m", "iovirt.backends.vhost_user_cli", "net",
                "--socket", str(sock), "--tap", TAP, "--netns", NETNS]  # fmt: skip
    return [
        "dpdk-testpmd", "-l", "0-1", "--main-lcore", "1", *DPDK_EAL, "--file-prefix", "vubench-be",
        f"--vdev=net_vhost0,iface={sock},queues=1",
        "--", "--forward-mode=rxonly", "--auto-start", "--nb-cores=1",
        "--total-num-mbufs=16384", "--stats-period", "100",
    ]  # fmt: skip


def bench_net(seconds: float, repeat: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        f"{n}-byte frames pps": {"iovirt": [], "dpdk": []} for n in (64, 1500)
    }
    with tempfile.TemporaryDirectory() as tmpdir, net_setup():
        tmp = Path(tmpdir)
        for rep in range(repeat):
            for frame in (64, 1500):
                for kind in ("iovirt", "dpdk"):
                    sock = tmp / f"{kind}.sock"
                    with process(net_backend(kind, sock), sock.exists):
                        pps = front_end_pps(sock, frame, seconds, f"vubench-fe{rep}")
                    with contextlib.suppress(FileNotFoundError):
                        sock.unlink()
                    results[f"{frame}-byte frames pps"][kind].append(pps)
                    log(f"net {frame}B run {rep + 1} {kind}: {pps:,.0f} pps")
    return results


def report(title: str, peer: str, results: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    print(f"\n{title}")
    print(f"| case | iovirt (median) | {peer} (median) | iovirt / {peer} | all runs |")
    print("|---|---|---|---|---|")
    ratios = {}
    for case, by in results.items():
        ours, theirs = statistics.median(by["iovirt"]), statistics.median(by[peer])
        ratios[case] = ours / theirs
        runs = "; ".join(f"{k}: " + ", ".join(f"{v:,.0f}" for v in vals) for k, vals in by.items())
        print(f"| {case} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x | {runs} |")
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant")
    parser.add_argument("--only", choices=("blk", "net"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args()
    everything: dict[str, object] = {}
    if args.only in (None, "blk"):
        blk = bench_blk(args.seconds, args.repeat)
        everything["blk"] = blk
        everything["blk_ratios"] = report("vhost-user-blk: iovirt vs qemu-storage-daemon",
                                          "qsd", blk)  # fmt: skip
    if args.only in (None, "net"):
        net = bench_net(args.seconds, args.repeat)
        everything["net"] = net
        everything["net_ratios"] = report("vhost-user-net: iovirt vs DPDK net_vhost", "dpdk", net)
    if args.json is not None:
        args.json.write_text(json.dumps(everything, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
