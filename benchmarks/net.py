"""virtio-net throughput: iovirt against QEMU with vhost off and on, all nested in one lab run.

Optionally also iovirt's emulated e1000 on the same backend, to set emulation against
paravirtualisation.

The guest, a stock kernel with the same initramfs under every VMM, runs ``netbench``
(:file:`netbench.c`, built here with gcc, static) as a TCP client of a ``netbench server``
on the other end of its NIC, for ``--seconds`` per direction:

guest->netns
    the guest sends, the server in the network namespace receives and reports what
    arrived;
netns->guest
    the server sends, the guest receives and counts.

Every VMM's NIC is the same tap, ``nbtap0``: a persistent single-queue tap with
IFF_VNET_HDR that the benchmark creates (pyroute2) in a network namespace of its own,
``iovirt-netbench``, inside the lab, with 10.0.2.1/24 on it; the server listens there. The
guest takes 10.0.2.15/24. Every variant boots ``/vmlinuz`` with the same initramfs
(modules virtio_net, virtio_pci, and e1000 when the e1000 variant runs; ``/netbench``), the
same command line (``console=ttyS0 panic=-1 reboot=k quiet``), 256 MiB and one vCPU.
``--only`` picks the variants (default: iovirt, qemu-vhost-off, qemu-vhost-on):

iovirt
    ``.venv/bin/iovirt run --no-lab build/bench/net/vm-*.toml`` with one ``[[nic]]``
    (``virtio-net``, ``transport = "pci"``, one queue pair, tap backend in the namespace).
qemu-vhost-off, qemu-vhost-on
    ``qemu-system-x86_64 -enable-kvm -cpu host -machine pc -m 256 -smp 1 -nodefaults
    -no-reboot -display none -serial stdio -kernel /vmlinuz -initrd ... -append ...
    -netdev tap,id=n0,fd=N,vhost=off|on -device virtio-net-pci,netdev=n0,mac=...``. The
    tap fd is opened inside the namespace with iovirt's ``TapBackend`` and handed to QEMU
    (``pass_fds``); with ``vhost=on`` QEMU opens ``/dev/vhost-net`` itself (the lab loads
    ``vhost_net`` first), so the kernel's vhost worker moves the packets.
iovirt-e1000
    iovirt with ``model = "e1000"`` on the same tap backend: the guest sees iovirt's
    emulated Intel 82540EM (a Python model: every register access is an MMIO exit to
    Python), which Linux's ``e1000`` driver binds; the interface is still ``eth0``. Not
    run by default; the table adds the ratio iovirt-e1000 / iovirt (no goal).

Each VMM first boots once with both directions at 1 s (a warm-up, not counted: the first
boots of a lab run also pay for the lab's cold caches); then the variants alternate order
over ``--runs`` boots each (default 2). Every boot must end with ``IOVIRT-TEST-END rc=0``
and print both results, or the benchmark fails. The table shows the median Mbit/s (10^6
bits per second) per direction and VMM, and the ratios iovirt / QEMU vhost=off (goal: at
least 1.2) and iovirt / QEMU vhost=on (goal: at least 0.8). Raw results:
``build/bench/net-results.json``; every run's console and stderr: ``build/bench/net/out/``.

Run from the repository root (needs the lab: QEMU, busybox-static, linux-image-amd64, gcc)::

    .venv/bin/python benchmarks/net.py [--seconds N] [--runs N] [--only VARIANT[,VARIANT...]]
    .venv/bin/python benchmarks/net.py --only iovirt,iovirt-e1000   # emulated vs virtio
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "build" / "bench"  # the lab sees the host's build/, not its /tmp
WORK_DIR = BENCH_DIR / "net"
OUT_DIR = WORK_DIR / "out"  # mounted at /out in the lab
RESULTS = BENCH_DIR / "net-results.json"
TOOL_SOURCE = REPO / "benchmarks" / "netbench.c"
TOOL = BENCH_DIR / "netbench"
BENCH_SCRIPT = str(Path(__file__).resolve().relative_to(REPO))
KERNEL = Path("/vmlinuz")

MEMORY_MIB = 256
CMDLINE = "console=ttyS0 panic=-1 reboot=k quiet"
MODULES = ("virtio_net", "virtio_pci")
E1000_MODULES = ("e1000",)  # only when an e1000 variant runs
# Inside the lab only: the namespace, the tap and the addresses on either side of it.
NETNS = "iovirt-netbench"
TAP = "nbtap0"
HOST_ADDR = "10.0.2.1"
GUEST_ADDR = "10.0.2.15"
PREFIX_LEN = 24
PORT = 5201
GUEST_MAC = "52:54:00:12:34:56"
LAB_MODULES_NEEDED = ("tun", "vhost_net")

VARIANTS = ("iovirt", "qemu-vhost-off", "qemu-vhost-on", "iovirt-e1000")
DEFAULT_VARIANTS = ("iovirt", "qemu-vhost-off", "qemu-vhost-on")
IOVIRT_MODELS = {"iovirt": "virtio-net", "iovirt-e1000": "e1000"}  # variant -> [[nic]] model
DIRECTIONS = (("send", "guest->netns"), ("recv", "netns->guest"))  # netbench DIR, label
GOALS = {"qemu-vhost-off": 1.2, "qemu-vhost-on": 0.8}  # iovirt / peer throughput
# Ratios shown without a goal: variant / baseline (emulated NIC against virtio-net).
COMPARISONS = (("iovirt-e1000", "iovirt"),)

DEFAULT_SECONDS = 5.0
DEFAULT_RUNS = 2
WARMUP_SECONDS = 1.0
BOOT_ALLOWANCE = 180.0  # one VMM's boot and power-off in the lab, generously

RESULT_RE = re.compile(
    r"^netbench (?P<dir>send|recv) bytes=(?P<bytes>\d+) seconds=(?P<seconds>[\d.]+) "
    r"Mbps=(?P<Mbps>[\d.]+)$"
)
INFO_PREFIX = "netinfo "
# virtio feature bits worth showing: the VMMs offer different sets.
FEATURE_BITS = {
    "CSUM": 0,
    "GUEST_CSUM": 1,
    "MTU": 3,
    "GUEST_TSO4": 7,
    "GUEST_TSO6": 8,
    "HOST_TSO4": 11,
    "HOST_TSO6": 12,
    "MRG_RXBUF": 15,
    "CTRL_VQ": 17,
    "MQ": 22,
    "INDIRECT_DESC": 28,
    "EVENT_IDX": 29,
    "RING_PACKED": 34,
}


@dataclass(frozen=True)
class Step:
    """One VMM boot that the runner in the lab starts."""

    id: str
    variant: str
    run: int
    argv: tuple[str, ...]  # for QEMU, "{TAPFD}" stands for the tap fd number


# -- what the guest runs -----------------------------------------------------------------------


def guest_script(seconds: float) -> str:
    """Configure eth0, wait until the netns side answers, describe the NIC, then measure."""
    return f"""\
ip link set lo up
ip addr add {GUEST_ADDR}/{PREFIX_LEN} dev eth0
ip link set eth0 up
n=/sys/class/net/eth0
echo "{INFO_PREFIX}mac=$(cat $n/address)"
echo "{INFO_PREFIX}mtu=$(cat $n/mtu)"
echo "{INFO_PREFIX}queues=$(ls $n/queues | tr '\\n' ' ')"
echo "{INFO_PREFIX}driver=$(basename "$(readlink $n/device/driver)")"
# virtio only: an e1000 has no feature bits (and the script runs under sh -e).
[ ! -e $n/device/features ] || echo "{INFO_PREFIX}features=$(cat $n/device/features)"
i=0
until ping -c 1 -W 1 {HOST_ADDR} >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -ge 30 ]; then echo "no answer from {HOST_ADDR}"; exit 1; fi
done
echo "{INFO_PREFIX}pings_before_answer=$i"
/netbench client {HOST_ADDR} {PORT} send {seconds:g}
/netbench client {HOST_ADDR} {PORT} recv {seconds:g}
"""


def build_tool() -> bytes:
    TOOL.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-static", "-o", str(TOOL), str(TOOL_SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"net.py: building netbench failed:\n{done.stderr}")
    return TOOL.read_bytes()


# -- the plan ----------------------------------------------------------------------------------


def vm_config(initrd: Path, model: str = "virtio-net") -> str:
    # transport is a virtio key; the e1000 is always a PCI function.
    transport = 'transport = "pci"\n' if model == "virtio-net" else ""
    return (
        "[vm]\n"
        f'memory = "{MEMORY_MIB}M"\n'
        "vcpus = 1\n"
        f'kernel = "{KERNEL}"\n'
        f'initrd = "{initrd.relative_to(REPO)}"\n'
        f'cmdline = "{CMDLINE}"\n'
        "\n[serial]\n"
        'backend = { kind = "stdio", input = false }\n'
        "\n[[nic]]\n"
        f'model = "{model}"\n'
        f"{transport}"
        f'mac = "{GUEST_MAC}"\n'
        f'backend = {{ kind = "tap", ifname = "{TAP}", netns = "{NETNS}" }}\n'
    )


def qemu_argv(initrd: Path, vhost: bool) -> tuple[str, ...]:
    return (
        "qemu-system-x86_64",
        "-enable-kvm",
        "-cpu",
        "host",
        "-machine",
        "pc",
        "-m",
        str(MEMORY_MIB),
        "-smp",
        "1",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(KERNEL),
        "-initrd",
        str(initrd.relative_to(REPO)),
        "-append",
        CMDLINE,
        "-netdev",
        f"tap,id=n0,fd={{TAPFD}},vhost={'on' if vhost else 'off'}",
        "-device",
        f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
    )


def make_plan(
    runs: int, variants: Sequence[str], seconds: float, warmup: bool = True
) -> list[Step]:
    """Write the guests' initramfs and iovirt's configs under WORK_DIR; return the boots.

    Run 0 (with ``warmup``) boots each VMM once with both directions at WARMUP_SECONDS,
    not counted: the first boots of a lab run also pay for the lab's cold caches.
    """
    from iovirt.boot.initramfs import guest_test_initramfs
    from iovirt.boot.linux import kernel_release

    kver = kernel_release(KERNEL.read_bytes())
    if kver is None:
        raise SystemExit(f"net.py: {KERNEL} carries no kernel release string")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    tool = build_tool()
    # One initramfs for every variant of the run: e1000 comes in only when its variant
    # runs, so the default run boots what it always has.
    e1000 = any(IOVIRT_MODELS.get(v) == "e1000" for v in variants)
    modules = MODULES + E1000_MODULES if e1000 else MODULES

    def boots(name: str, secs: float) -> dict[str, tuple[str, ...]]:
        initrd = WORK_DIR / f"initrd-{name}.img"
        # A generous limit for the script, so a stuck transfer ends the guest, not the lab.
        script_timeout = int(90 + len(DIRECTIONS) * (secs + 60))
        initrd.write_bytes(
            guest_test_initramfs(
                kver,
                modules,
                guest_script(secs),
                timeout=script_timeout,
                extra_files={"/netbench": tool},
            )
        )
        argvs = {
            "qemu-vhost-off": qemu_argv(initrd, vhost=False),
            "qemu-vhost-on": qemu_argv(initrd, vhost=True),
        }
        for variant, model in IOVIRT_MODELS.items():
            suffix = "" if variant == "iovirt" else variant.removeprefix("iovirt")
            config = WORK_DIR / f"vm-{name}{suffix}.toml"
            config.write_text(vm_config(initrd, model))
            argvs[variant] = (".venv/bin/iovirt", "run", "--no-lab", str(config.relative_to(REPO)))
        return argvs

    timed = boots("timed", seconds)
    steps = []
    if warmup:
        warm = boots("warmup", WARMUP_SECONDS)
        steps += [Step(f"warmup-{name}", name, 0, warm[name]) for name in variants]
    for i in range(runs):
        # Alternate the order so that drift in the lab (caches, load) favours no one.
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            steps.append(Step(f"run{i + 1}-{name}", name, i + 1, timed[name]))
    return steps


# -- inside the lab: the namespace, the tap, the server and the runner -------------------------


def _in_netns(fn: Callable[[], Any]) -> Any:
    from iovirt.backends.tap import run_in_netns

    return run_in_netns(NETNS, fn)


def _make_tap() -> None:
    """The persistent tap every VMM attaches to, addressed and up, inside NETNS."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        # vnet_hdr: every VMM here puts a virtio-net header in front of each frame.
        ipr.link(
            "add",
            ifname=TAP,
            kind="tuntap",
            mode="tap",
            ifr={"no_pi": True, "vnet_hdr": True, "multi_queue": False},
        )
        index = ipr.link_lookup(ifname=TAP)[0]
        ipr.addr("add", index=index, address=HOST_ADDR, prefixlen=PREFIX_LEN)
        ipr.link("set", index=index, state="up")


def _remove_tap() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=TAP):
            ipr.link("del", index=index)


@contextlib.contextmanager
def bench_network() -> Iterator[None]:
    """NETNS with the tap in it for the duration; removed afterwards whatever happens."""
    from pyroute2 import netns

    from iovirt.backends.tap import netns_exists

    if netns_exists(NETNS):
        netns.remove(NETNS)
    netns.create(NETNS)
    try:
        _in_netns(_make_tap)
        yield
    finally:
        with contextlib.suppress(Exception):
            _in_netns(_remove_tap)
        netns.remove(NETNS)


@contextlib.contextmanager
def netbench_server(log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``netbench server`` in NETNS (through nsenter), serving every boot in turn."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{NETNS}", str(TOOL), "server", str(PORT)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while b"listening" not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"netbench server did not start: {log.read_text()}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.kill()
            proc.wait()


def _stacks(pid: int) -> str:
    """Where each thread of ``pid`` is waiting (kernel stack and state), for a hung VMM."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            comm = (task / "comm").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            stack = (task / "stack").read_text()
        except OSError as e:
            lines.append(f"thread {task.name}: {e}")
            continue
        lines.append(f"thread {task.name} ({comm}) state {state}:\n{stack}")
    return "\n".join(lines)


def _wait(proc: subprocess.Popen[bytes], timeout: float, stderr: Path) -> int:
    """The VMM's exit status; past ``timeout`` its threads' stacks go to its stderr file
    and it is killed (status -9)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with stderr.open("a") as f:
            f.write(f"\nnet.py: timeout after {timeout:g} s; thread stacks:\n")
            f.write(_stacks(proc.pid))
        proc.kill()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with stderr.open("a") as f:
                f.write("\nnet.py: still there 30 s after SIGKILL:\n" + _stacks(proc.pid))
            raise
        return -9


def run_step(argv: Sequence[str], timeout: float, out: Path) -> dict[str, Any]:
    """Run one VMM to the end; its stdout is the guest's console. Console and stderr are
    written to ``out``.console / ``out``.stderr as they come (the out share shows them on
    the host during the run). QEMU gets the tap as an fd opened inside NETNS by iovirt's
    TapBackend (attaching to the persistent tap)."""
    from iovirt.backends.tap import TapBackend

    start = time.monotonic()
    tap: TapBackend | None = None
    pass_fds: tuple[int, ...] = ()
    if any("{TAPFD}" in a for a in argv):
        tap = TapBackend(TAP, netns=NETNS, queues=1)
        fd = tap.fds[0]
        argv = [a.replace("{TAPFD}", str(fd)) for a in argv]
        pass_fds = (fd,)
    console = out.with_suffix(".console")
    stderr = out.with_suffix(".stderr")
    try:
        with console.open("wb") as console_file, stderr.open("wb") as stderr_file:
            proc = subprocess.Popen(
                list(argv),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=console_file,
                stderr=stderr_file,
                pass_fds=pass_fds,
            )
        returncode = _wait(proc, timeout, stderr)
    finally:
        if tap is not None:
            tap.close()
    return {
        "argv": list(argv),
        "returncode": returncode,
        "wall": time.monotonic() - start,
        "console": console.read_text(errors="replace"),
        "stderr": stderr.read_text(errors="replace")[-20000:],
    }


def _modprobe(names: Sequence[str]) -> None:
    for name in names:
        done = subprocess.run(["modprobe", name], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"modprobe {name} failed: {done.stderr.strip()}")


def run_inside(plan_path: Path, out: Path) -> int:
    plan = json.loads(plan_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    _modprobe(LAB_MODULES_NEEDED)
    print(f"/dev/vhost-net: {'present' if Path('/dev/vhost-net').exists() else 'MISSING'}")
    with bench_network(), netbench_server(out / "server.log"):
        for step in plan["steps"]:
            runner = run_step(step["argv"], plan["step_timeout"], out / step["id"])
            result = {**step, **runner}
            (out / f"{step['id']}.json").write_text(json.dumps(result))
            print(f"{step['id']}: rc={result['returncode']} {result['wall']:.1f} s", flush=True)
    return 0


# -- on the host: reading the results ----------------------------------------------------------


def parse_run(d: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """One boot's results and info; the second item says why it does not count ('' if it does)."""
    from iovirt.boot.initramfs import parse_guest_test_output

    rc, output = parse_guest_test_output(d["console"])
    results: dict[str, dict[str, float]] = {}
    info: dict[str, str] = {}
    for line in output.splitlines():
        line = line.strip()
        if match := RESULT_RE.match(line):
            g = match.groupdict()
            results[g["dir"]] = {
                "bytes": int(g["bytes"]),
                "seconds": float(g["seconds"]),
                "Mbps": float(g["Mbps"]),
            }
        elif line.startswith(INFO_PREFIX):
            key, _, value = line[len(INFO_PREFIX) :].partition("=")
            info[key] = value.strip()
    run = {
        "id": d["id"],
        "variant": d["variant"],
        "run": d["run"],
        "returncode": d["returncode"],
        "guest_rc": rc,
        "wall": d["wall"],
        "info": info,
        "features": decode_features(info.get("features", "")),
        "results": results,
    }
    why = ""
    if d["returncode"] != 0:
        why = f"VMM exit status {d['returncode']}"
    elif rc != 0:
        why = "no IOVIRT-TEST-END line" if rc is None else f"guest script rc={rc}"
    elif sorted(results) != sorted(k for k, _ in DIRECTIONS):
        why = "not every direction printed its result"
    return run, why


def decode_features(bits: str) -> list[str]:
    # sysfs prints the negotiated feature bits as '0'/'1' characters, bit 0 first.
    return [name for name, bit in FEATURE_BITS.items() if bit < len(bits) and bits[bit] == "1"]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for key, label in DIRECTIONS:
        row: dict[str, Any] = {"direction": label}
        for v in variants:
            mine = [run["results"][key]["Mbps"] for run in runs if run["variant"] == v]
            row[v] = {"Mbps_median": median(mine), "Mbps_best": max(mine), "Mbps_all": mine}
        if "iovirt" in variants:
            for peer in GOALS:
                if peer in variants:
                    ours, theirs = row["iovirt"], row[peer]
                    row[f"iovirt/{peer}"] = ours["Mbps_median"] / theirs["Mbps_median"]
                    row[f"iovirt/{peer} best"] = ours["Mbps_best"] / theirs["Mbps_best"]
        for variant, base in COMPARISONS:
            if variant in variants and base in variants:
                ours, theirs = row[variant], row[base]
                row[f"{variant}/{base}"] = ours["Mbps_median"] / theirs["Mbps_median"]
        rows.append(row)
    return rows


def print_table(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> None:
    ratios = [peer for peer in GOALS if f"iovirt/{peer}" in rows[0]]
    compared = [f"{v}/{b}" for v, b in COMPARISONS if f"{v}/{b}" in rows[0]]
    head = ["direction"]
    for v in variants:
        head += [f"{v} Mbit/s", f"{v} all runs"]
    head += [f"iovirt / {peer} (goal >= {GOALS[peer]})" for peer in ratios]
    head += [key.replace("/", " / ") for key in compared]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "--:|" * (len(head) - 1))
    for row in rows:
        cells = [row["direction"]]
        for v in variants:
            r = row[v]
            cells += [f"{r['Mbps_median']:.1f}", ", ".join(f"{x:.1f}" for x in r["Mbps_all"])]
        cells += [f"{row[f'iovirt/{peer}']:.2f}x" for peer in ratios]
        cells += [f"{row[key]:.3f}x" for key in compared]
        print("| " + " | ".join(cells) + " |")


def source_state() -> str:
    """The commit measured, and whether the VMM's sources differ from it (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "iovirt", "backends", "csrc"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout
    except OSError:
        return "unknown"
    return f"{head} with uncommitted changes" if changed.strip() else head


def _report_failures(failed: Sequence[tuple[str, str]]) -> None:
    for step_id, why in failed:
        d = json.loads((OUT_DIR / f"{step_id}.json").read_text())
        print(f"\nFAILED {step_id}: {why}", file=sys.stderr)
        print("--- console (last 30 lines) ---", file=sys.stderr)
        print("\n".join(d["console"].splitlines()[-30:]), file=sys.stderr)
        print("--- stderr (last 30 lines) ---", file=sys.stderr)
        print("\n".join(d["stderr"].splitlines()[-30:]), file=sys.stderr)


def host_main(args: argparse.Namespace) -> int:
    from iovirt.errors import IovirtError
    from iovirt.lab import Lab

    chosen = DEFAULT_VARIANTS if args.only is None else args.only
    variants = [v for v in VARIANTS if v in chosen]
    steps = make_plan(args.runs, variants, args.seconds, not args.no_warmup)
    step_timeout = BOOT_ALLOWANCE + len(DIRECTIONS) * (args.seconds + 60)
    plan = WORK_DIR / "plan.json"
    plan.write_text(
        json.dumps({"steps": [asdict(s) for s in steps], "step_timeout": step_timeout}, indent=1)
    )
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    print(
        f"guest: {KERNEL} -> {KERNEL.resolve().name}, {MEMORY_MIB} MiB, 1 vCPU, "
        f"cmdline {CMDLINE!r}; NIC on tap {TAP} in netns {NETNS} (inside the lab); "
        f"{args.seconds:g} s per direction; variants {', '.join(variants)}, "
        f"{args.runs} boot(s) each, alternating order"
    )
    print(
        f"host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
        f"iovirt at {source_state()}",
        flush=True,
    )
    runner = shlex.join([".venv/bin/python", BENCH_SCRIPT, "--inside", str(plan.relative_to(REPO))])
    timeout = args.timeout or 300 + len(steps) * step_timeout
    try:
        result = Lab().run(
            f"{runner} --out /out",
            cwd=REPO,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
            timeout=timeout,
            out_dir=OUT_DIR,
        )
    except IovirtError as exc:
        print(f"net.py: {exc}", file=sys.stderr)
        return 1
    print(result.stdout, end="")
    if result.returncode != 0:
        print(f"net.py: the runner in the lab failed (status {result.returncode})")
        print(result.stderr, file=sys.stderr)
        return 1

    runs, failed = [], []
    for step in steps:
        path = OUT_DIR / f"{step.id}.json"
        if not path.is_file():
            failed.append((step.id, "the runner wrote no result"))
            continue
        run, why = parse_run(json.loads(path.read_text()))
        runs.append(run)
        if why:
            failed.append((step.id, why))
    _report_failures([(i, w) for i, w in failed if (OUT_DIR / f"{i}.json").is_file()])

    bad = {i for i, _ in failed}
    good = [r for r in runs if r["id"] not in bad]
    timed = [r for r in good if r["run"] > 0]
    counted = [v for v in variants if any(r["variant"] == v for r in timed)]
    rows = summarize(timed, counted) if counted else []
    RESULTS.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "iovirt": source_state(),
                "seconds": args.seconds,
                "lab_seconds": result.duration,
                "failed": [{"id": i, "why": w} for i, w in failed],
                "summary": rows,
                "runs": runs,
                "server_log": (OUT_DIR / "server.log").read_text(errors="replace")
                if (OUT_DIR / "server.log").is_file()
                else "",
            },
            indent=1,
        )
    )
    print()
    for v in variants:
        seen = next((r for r in good if r["variant"] == v), None)
        if seen is not None:
            info = seen["info"]
            print(
                f"{v}: guest eth0 ({info.get('driver')}) {info.get('mac')} mtu "
                f"{info.get('mtu')}, queues {info.get('queues')}; "
                f"features {' '.join(seen['features']) or '-'}"
            )
    if rows:
        print()
        print_table(rows, counted)
        for peer, goal in GOALS.items():
            key = f"iovirt/{peer}"
            if key in rows[0]:
                met = all(row[key] >= goal for row in rows)
                ratios = ", ".join(f"{row[key]:.2f}" for row in rows)
                best = ", ".join(f"{row[key + ' best']:.2f}" for row in rows)
                print(
                    f"goal iovirt >= {goal}x {peer} in both directions: "
                    f"{'met' if met else 'NOT met'} (ratios of medians: {ratios}; "
                    f"of best runs: {best})"
                )
    print(f"lab: {result.duration:.1f} s in all; raw results in {RESULTS}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per direction")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="boots per VMM")
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        help=f"comma-separated variants to run (default {','.join(DEFAULT_VARIANTS)}; "
        f"known: {', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the uncounted first boot of each VMM"
    )
    parser.add_argument("--timeout", type=float, default=0, help="seconds for the lab run")
    parser.add_argument("--inside", type=Path, help=argparse.SUPPRESS)  # the runner, in the lab
    parser.add_argument("--out", type=Path, default=Path("/out"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside is not None:
        return run_inside(args.inside, args.out)
    if args.runs < 1 or not 0 < args.seconds <= 600:
        parser.error("--runs must be positive and --seconds between 0 and 600")
    if args.only is not None:
        unknown = [v for v in args.only if v not in VARIANTS]
        if unknown or not args.only:
            parser.error(f"--only takes variants among {', '.join(VARIANTS)}")
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
