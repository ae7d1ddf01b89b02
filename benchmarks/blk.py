"""virtio-blk throughput: iovirt's virtio-blk against QEMU's, both nested in one lab run.

The guest, a stock kernel with the same initramfs in every VMM, runs ``blkbench``
(:file:`blkbench.c`, built here with gcc, static) on its one disk: O_DIRECT, a
fixed queue depth through Linux native AIO, for ``--seconds`` per workload:

seqread, seqwrite
    128 KiB requests, queue depth 4 (``--seq-bs``, ``--seq-qd``), walking the disk.
randread, randwrite
    4 KiB requests at random 4 KiB-aligned offsets (a fixed-seed sequence), queue depth
    16 (``--rand-bs``, ``--qd``).

Writes end with fdatasync inside the measured time. Every variant boots ``/vmlinuz`` with
the same initramfs (modules virtio_blk, virtio_pci, and ahci, sd_mod when an AHCI variant
runs; ``/blkbench``), the same command line (``console=ttyS0 panic=-1 reboot=k quiet``),
256 MiB and one vCPU, and gets the same raw image file. ``--variants`` picks them (default
``iovirt,qemu``):

iovirt
    ``.venv/bin/iovirt run --no-lab build/bench/blk/vm-timed.toml`` with one ``[[disk]]``
    (``virtio-blk``, ``transport = "pci"``, file backend, ``direct = false``).
iovirt-ahci
    the same with ``model = "ahci"``: the disk is a port of iovirt's emulated AHCI
    controller (a Python model: every command costs MMIO exits to Python), which Linux's
    ``ahci`` driver binds; the guest sees ``sda`` instead of ``vda``.
qemu
    ``qemu-system-x86_64 -enable-kvm -cpu host -machine pc -m 256 -smp 1 -nodefaults
    -no-reboot -display none -serial stdio -kernel /vmlinuz -initrd ... -append ...
    -drive file=IMG,format=raw,if=none,id=d0,aio=threads,cache=writeback
    -device virtio-blk-pci,drive=d0,serial=bench``.

Both go through the lab's page cache the same way (QEMU ``cache=writeback``, iovirt
``direct = false``): O_DIRECT cannot open files on the lab's tmpfs and overlay. The image
(``--image-mib``, filled with data so that reads hit real blocks, never holes) lives by
default in the lab's own tmpfs (``/dev/shm``), created there before the first run, so a
request costs the VMM's work and a memory copy. ``--image share`` puts it in
``build/bench/blk/image/`` on the host instead, mounted writable in the lab over 9p
(uncached): then every request also makes a 9p round trip to the host.

Each variant first boots once with every workload at 1 s (a warm-up, not counted: the
first boots of a lab run also pay for the lab's cold caches); then the variants
alternate order over ``--runs`` boots each (default 2). Every boot must end
with ``IOVIRT-TEST-END rc=0`` and print all four lines, or the benchmark fails. The table
shows the median MB/s (10^6 bytes per second) per workload and variant, each other
variant's median over the first variant's, and iovirt/QEMU when both run (goal: at least
1.2). Raw results: ``build/bench/blk-results.json``; every run's console and stderr:
``build/bench/blk/out/``.

Run from the repository root (needs the lab: QEMU, busybox-static, linux-image-amd64, gcc)::

    .venv/bin/python benchmarks/blk.py [--seconds N] [--qd N] [--runs N]
        [--variants iovirt,iovirt-ahci | --only qemu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "build" / "bench"  # the lab sees the host's build/, not its /tmp
WORK_DIR = BENCH_DIR / "blk"
OUT_DIR = WORK_DIR / "out"  # mounted at /out in the lab
SHARE_DIR = WORK_DIR / "image"  # --image share: mounted writable at the same path
RESULTS = BENCH_DIR / "blk-results.json"
TOOL_SOURCE = REPO / "benchmarks" / "blkbench.c"
TOOL = BENCH_DIR / "blkbench"
BENCH_SCRIPT = str(Path(__file__).resolve().relative_to(REPO))
KERNEL = Path("/vmlinuz")
TMPFS_IMAGE = Path("/dev/shm/iovirt-blkbench.img")  # inside the lab

MEMORY_MIB = 256
CMDLINE = "console=ttyS0 panic=-1 reboot=k quiet"
MODULES = ("virtio_blk", "virtio_pci")
AHCI_MODULES = ("ahci", "sd_mod")  # only when an AHCI variant runs
SERIAL = "bench"  # the disk's serial: the guest finds its disk by it
VARIANTS = ("iovirt", "qemu", "iovirt-ahci")
DEFAULT_VARIANTS = ("iovirt", "qemu")
# Each iovirt variant's [[disk]] model; a variant not named here is QEMU.
IOVIRT_MODELS = {"iovirt": "virtio-blk", "iovirt-ahci": "ahci"}
GOAL = 1.2  # iovirt / QEMU throughput
MIB = 1 << 20

DEFAULT_SECONDS = 5.0
DEFAULT_RUNS = 2
DEFAULT_IMAGE_MIB = 1024
DEFAULT_SEQ_BS = 128 * 1024
DEFAULT_SEQ_QD = 4
DEFAULT_RAND_BS = 4096
DEFAULT_RAND_QD = 16
WARMUP_SECONDS = 1.0
BOOT_ALLOWANCE = 180.0  # one VMM's boot and power-off in the lab, generously
KILL_GRACE = 30.0  # seconds a killed VMM gets to go

RESULT_RE = re.compile(
    r"^blkbench (?P<mode>\w+) bs=(?P<bs>\d+) qd=(?P<qd>\d+) ios=(?P<ios>\d+) "
    r"bytes=(?P<bytes>\d+) seconds=(?P<seconds>[\d.]+) MBps=(?P<MBps>[\d.]+) "
    r"iops=(?P<iops>[\d.]+)$"
)
INFO_PREFIX = "blkinfo "
# virtio feature bits worth showing: the two VMMs may offer different ones.
FEATURE_BITS = {
    "VIRTIO_BLK_F_SEG_MAX": 2,
    "VIRTIO_BLK_F_FLUSH": 9,
    "VIRTIO_BLK_F_MQ": 12,
    "VIRTIO_BLK_F_DISCARD": 13,
    "VIRTIO_F_INDIRECT_DESC": 28,
    "VIRTIO_F_EVENT_IDX": 29,
    "VIRTIO_F_RING_PACKED": 34,
}


@dataclass(frozen=True)
class Workload:
    mode: str  # blkbench's MODE
    bs: int
    qd: int

    @property
    def label(self) -> str:
        size = f"{self.bs // 1024}k" if self.bs % 1024 == 0 else str(self.bs)
        return f"{self.mode} bs={size} qd={self.qd}"


@dataclass(frozen=True)
class Step:
    """One VMM boot that the runner in the lab starts."""

    id: str
    variant: str
    run: int
    argv: tuple[str, ...]


# -- what the guest runs -----------------------------------------------------------------------


def guest_script(workloads: Sequence[Workload], seconds: float) -> str:
    """Find the disk by its serial, describe it, then run each workload once.

    A virtio disk shows its serial in ``/sys/block/vdX/serial``; a SATA disk behind
    libata shows IDENTIFY's serial (space-padded) in the SCSI VPD page 0x80,
    ``/sys/block/sdX/device/vpd_pg80``, after a 4-byte header. If no disk carries the
    serial but exactly one disk exists, that one is used (said in the ``found_by`` line).
    """
    lines = [
        "d=; n=0; only=; by=serial",
        "for b in /sys/block/vd* /sys/block/sd*; do",
        '    [ -e "$b" ] || continue',
        "    n=$((n + 1)); only=${b##*/}; s=",
        '    if [ -e "$b/serial" ]; then s=$(cat "$b/serial")',
        '    elif [ -e "$b/device/vpd_pg80" ]; then',
        "        s=$(tail -c +5 \"$b/device/vpd_pg80\" | tr -d '\\000 ')",
        "    fi",
        f'    if [ "$s" = {SERIAL} ]; then d=${{b##*/}}; fi',
        "done",
        'if [ -z "$d" ] && [ "$n" = 1 ]; then d=$only; by=only-disk; fi',
        f'[ -n "$d" ] || {{ echo "no disk with serial {SERIAL} among $n"; exit 1; }}',
        "q=/sys/block/$d/queue",
        "dev=/sys/block/$d/device",
        f'echo "{INFO_PREFIX}disk=$d"',
        f'echo "{INFO_PREFIX}found_by=$by"',
        f'echo "{INFO_PREFIX}sectors=$(cat /sys/block/$d/size)"',
        f'echo "{INFO_PREFIX}hw_queues=$(ls /sys/block/$d/mq | wc -l)"',
        f'echo "{INFO_PREFIX}scheduler=$(cat $q/scheduler)"',
        f'echo "{INFO_PREFIX}max_sectors_kb=$(cat $q/max_sectors_kb)"',
        f'echo "{INFO_PREFIX}max_segments=$(cat $q/max_segments)"',
        f'echo "{INFO_PREFIX}nr_requests=$(cat $q/nr_requests)"',
        # Only one of each pair exists: virtio's feature bits, or a SCSI disk's model and
        # its queue depth (1 without NCQ).
        f'[ ! -e $dev/features ] || echo "{INFO_PREFIX}features=$(cat $dev/features)"',
        f'[ ! -e $dev/model ] || echo "{INFO_PREFIX}model=$(cat $dev/model)"',
        f'[ ! -e $dev/queue_depth ] || echo "{INFO_PREFIX}queue_depth=$(cat $dev/queue_depth)"',
    ]
    for w in workloads:
        lines.append(f"/blkbench /dev/$d {w.mode} {w.bs} {w.qd} {seconds:g}")
    return "\n".join(lines) + "\n"


def build_tool() -> bytes:
    TOOL.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-static", "-o", str(TOOL), str(TOOL_SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"blk.py: building blkbench failed:\n{done.stderr}")
    return TOOL.read_bytes()


def fill_image(path: Path, mib: int) -> None:
    """Write ``mib`` MiB of data (no holes), each MiB different, seeded so it repeats."""
    block = bytearray(random.Random(1).randbytes(MIB))
    with path.open("wb") as f:
        for i in range(mib):
            block[:8] = i.to_bytes(8, "little")  # so that no two MiB are alike
            f.write(block)


# -- the plan ----------------------------------------------------------------------------------


def vm_config(initrd: Path, image: Path, model: str = "virtio-blk") -> str:
    # transport is a virtio key; an AHCI disk is always a port of the one AHCI controller.
    transport = 'transport = "pci"\n' if model == "virtio-blk" else ""
    return (
        "[vm]\n"
        f'memory = "{MEMORY_MIB}M"\n'
        "vcpus = 1\n"
        f'kernel = "{KERNEL}"\n'
        f'initrd = "{initrd.relative_to(REPO)}"\n'
        f'cmdline = "{CMDLINE}"\n'
        "\n[serial]\n"
        'backend = { kind = "stdio", input = false }\n'
        "\n[[disk]]\n"
        f'model = "{model}"\n'
        f"{transport}"
        f'serial = "{SERIAL}"\n'
        f'backend = {{ kind = "file", path = "{image}", direct = false }}\n'
    )


def qemu_argv(initrd: Path, image: Path) -> tuple[str, ...]:
    drive = f"file={image},format=raw,if=none,id=d0,aio=threads,cache=writeback"
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
        "-drive",
        drive,
        "-device",
        f"virtio-blk-pci,drive=d0,serial={SERIAL}",
    )


def make_plan(
    runs: int,
    variants: Sequence[str],
    workloads: Sequence[Workload],
    seconds: float,
    image: Path,
    warmup: bool = True,
) -> list[Step]:
    """Write the guests' initramfs and iovirt's configs under WORK_DIR; return the boots.

    Run 0 (with ``warmup``) boots each VMM once with every workload at WARMUP_SECONDS,
    not counted: the first boots of a lab run also pay for the lab's cold caches (its
    memory, the files QEMU and Python read over 9p, TCG's translations of their code).
    """
    from iovirt.boot.initramfs import guest_test_initramfs
    from iovirt.boot.linux import kernel_release

    kver = kernel_release(KERNEL.read_bytes())
    if kver is None:
        raise SystemExit(f"blk.py: {KERNEL} carries no kernel release string")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    tool = build_tool()
    # One initramfs for every variant of the run: the AHCI modules come in only when an
    # AHCI variant runs, so the default run boots what it always has.
    ahci = any(IOVIRT_MODELS.get(v) == "ahci" for v in variants)
    modules = MODULES + AHCI_MODULES if ahci else MODULES

    def boots(name: str, secs: float) -> dict[str, tuple[str, ...]]:
        initrd = WORK_DIR / f"initrd-{name}.img"
        # A generous limit for the script, so a hung request ends the guest, not the lab run.
        script_timeout = int(30 + len(workloads) * (secs + 30))
        script = guest_script(workloads, secs)
        initrd.write_bytes(
            guest_test_initramfs(
                kver, modules, script, timeout=script_timeout, extra_files={"/blkbench": tool}
            )
        )
        argvs = {"qemu": qemu_argv(initrd, image)}
        for variant, model in IOVIRT_MODELS.items():
            suffix = "" if variant == "iovirt" else variant.removeprefix("iovirt")
            config = WORK_DIR / f"vm-{name}{suffix}.toml"
            config.write_text(vm_config(initrd, image, model))
            argvs[variant] = (".venv/bin/iovirt", "run", "--no-lab", str(config.relative_to(REPO)))
        return argvs

    timed = boots("timed", seconds)
    steps = []
    if warmup:
        warm = boots("warmup", WARMUP_SECONDS)
        steps += [Step(f"warmup-{name}", name, 0, warm[name]) for name in variants]
    for i in range(runs):
        # Alternate the order so that drift in the lab (caches, host load) favours no one.
        order = variants if i % 2 == 0 else list(reversed(variants))
        for name in order:
            steps.append(Step(f"run{i + 1}-{name}", name, i + 1, timed[name]))
    return steps


# -- inside the lab: the runner ----------------------------------------------------------------


def run_step(argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run one VMM to the end; its stdout is the guest's console.

    Output goes to files, not pipes, so that a VMM killed at the timeout cannot leave
    the runner waiting on a pipe; one that does not even die then is left behind.
    """
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(argv), cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        note = b""
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            note = f"\nblk.py: killed after {timeout:g} s".encode()
            try:
                proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                note += b" (and still not gone: left behind)"
            returncode = -9
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read() + note
    return {
        "returncode": returncode,
        "wall": time.monotonic() - start,
        "console": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace")[-20000:],
    }


VMSTAT_KEYS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall")
MEMINFO_KEYS = ("MemFree", "Cached", "Shmem", "AnonHugePages")


def lab_memory() -> dict[str, int]:
    """The lab kernel's counters that say whether a VMM's RAM can get huge pages."""
    found: dict[str, int] = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key in VMSTAT_KEYS:
            found[key] = int(value)
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in MEMINFO_KEYS:
            found[f"{key}_kB"] = int(value.split()[0])
    return found


def run_inside(plan_path: Path, out: Path) -> int:
    plan = json.loads(plan_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if plan["fill_image"]:
        image = Path(plan["image"])
        started = time.monotonic()
        fill_image(image, plan["image_mib"])
        took = time.monotonic() - started
        print(f"image {image}: {plan['image_mib']} MiB written in {took:.1f} s", flush=True)
    for step in plan["steps"]:
        before = lab_memory()
        result = {**step, **run_step(step["argv"], plan["step_timeout"])}
        result["lab_memory"] = {"before": before, "after": lab_memory()}
        (out / f"{step['id']}.json").write_text(json.dumps(result))
        after = result["lab_memory"]["after"]
        thp = ", ".join(f"{k} +{after[k] - before[k]}" for k in VMSTAT_KEYS if k in before)
        print(
            f"{step['id']}: rc={result['returncode']} {result['wall']:.1f} s; lab: "
            f"MemFree {before.get('MemFree_kB', 0) // 1024} MiB before, {thp}",
            flush=True,
        )
    return 0


# -- on the host: reading the results ----------------------------------------------------------


def parse_run(d: dict[str, Any], workloads: Sequence[Workload]) -> tuple[dict[str, Any], str]:
    """One boot's results and info; the second item says why it does not count ('' if it does)."""
    from iovirt.boot.initramfs import parse_guest_test_output

    rc, output = parse_guest_test_output(d["console"])
    results: list[dict[str, Any]] = []
    info: dict[str, str] = {}
    for line in output.splitlines():
        line = line.strip()
        if match := RESULT_RE.match(line):
            g = match.groupdict()
            results.append(
                {
                    "mode": g["mode"],
                    "bs": int(g["bs"]),
                    "qd": int(g["qd"]),
                    "ios": int(g["ios"]),
                    "bytes": int(g["bytes"]),
                    "seconds": float(g["seconds"]),
                    "MBps": float(g["MBps"]),
                    "iops": float(g["iops"]),
                }
            )
        elif line.startswith(INFO_PREFIX):
            key, _, value = line[len(INFO_PREFIX) :].partition("=")
            info[key] = value
    run = {
        "id": d["id"],
        "variant": d["variant"],
        "run": d["run"],
        "returncode": d["returncode"],
        "guest_rc": rc,
        "wall": d["wall"],
        "info": info,
        "features": decode_features(info.get("features", "")),
        "lab_memory": d.get("lab_memory"),
        "results": results,
    }
    why = ""
    if d["returncode"] != 0:
        why = f"VMM exit status {d['returncode']}"
    elif rc != 0:
        why = "no IOVIRT-TEST-END line" if rc is None else f"guest script rc={rc}"
    elif [(r["mode"], r["bs"], r["qd"]) for r in results] != [
        (w.mode, w.bs, w.qd) for w in workloads
    ]:
        why = "not every workload printed its result"
    return run, why


def decode_features(bits: str) -> list[str]:
    # sysfs prints the negotiated feature bits as '0'/'1' characters, bit 0 first.
    return [name for name, bit in FEATURE_BITS.items() if bit < len(bits) and bits[bit] == "1"]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(
    runs: Sequence[dict[str, Any]], workloads: Sequence[Workload], variants: Sequence[str]
) -> list[dict[str, Any]]:
    rows = []
    for w in workloads:
        row: dict[str, Any] = {"workload": w.label, **asdict(w)}
        for v in variants:
            mine = [
                r
                for run in runs
                if run["variant"] == v
                for r in run["results"]
                if (r["mode"], r["bs"], r["qd"]) == (w.mode, w.bs, w.qd)
            ]
            row[v] = {
                "MBps_median": median([r["MBps"] for r in mine]),
                "MBps_all": [r["MBps"] for r in mine],
                "iops_median": median([r["iops"] for r in mine]),
            }
        # Every other variant's median over the first variant's.
        first = row[variants[0]]["MBps_median"]
        row["vs_first"] = {
            v: (row[v]["MBps_median"] / first if first else float("nan")) for v in variants[1:]
        }
        if "iovirt" in variants and "qemu" in variants:
            row["ratio"] = row["iovirt"]["MBps_median"] / row["qemu"]["MBps_median"]
        rows.append(row)
    return rows


def print_table(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> None:
    both = "ratio" in rows[0]
    # The iovirt/QEMU column already says what "qemu / iovirt" would.
    others = [v for v in variants[1:] if not (both and {variants[0], v} == {"iovirt", "qemu"})]
    head = ["workload"]
    for v in variants:
        head += [f"{v} MB/s", f"{v} IOPS", f"{v} MB/s, all runs"]
    head += [f"{v} / {variants[0]}" for v in others]
    if both:
        head.append(f"iovirt / QEMU (goal >= {GOAL})")
    print("| " + " | ".join(head) + " |")
    print("|---|" + "--:|" * (len(head) - 1))
    for row in rows:
        cells = [row["workload"]]
        for v in variants:
            r = row[v]
            cells += [
                f"{r['MBps_median']:.1f}",
                f"{r['iops_median']:.0f}",
                ", ".join(f"{x:.1f}" for x in r["MBps_all"]),
            ]
        cells += [f"{row['vs_first'][v]:.3g}x" for v in others]
        if both:
            cells.append(f"{row['ratio']:.2f}x")
        print("| " + " | ".join(cells) + " |")


def host_load() -> str:
    """The load average and how many QEMU processes (other labs) run on this host now."""
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    qemus = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            qemus += comm.read_text().startswith("qemu-system")
        except OSError:
            continue  # the process ended meanwhile
    return f"load average {load}, {qemus} QEMU process(es) running"


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


def host_main(args: argparse.Namespace) -> int:
    from iovirt.errors import IovirtError
    from iovirt.lab import Lab

    variants = list(args.variants) if args.only is None else [args.only]
    workloads = [
        Workload("seqread", args.seq_bs, args.seq_qd),
        Workload("seqwrite", args.seq_bs, args.seq_qd),
        Workload("randread", args.rand_bs, args.qd),
        Workload("randwrite", args.rand_bs, args.qd),
    ]
    shares: list[Path] = []
    if args.image == "share":
        shutil.rmtree(SHARE_DIR, ignore_errors=True)
        SHARE_DIR.mkdir(parents=True)
        image = SHARE_DIR / "disk.img"
        fill_image(image, args.image_mib)
        shares.append(SHARE_DIR)
    else:
        image = TMPFS_IMAGE
    steps = make_plan(args.runs, variants, workloads, args.seconds, image, not args.no_warmup)
    step_timeout = BOOT_ALLOWANCE + len(workloads) * (args.seconds + 30)
    plan = WORK_DIR / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "steps": [asdict(s) for s in steps],
                "image": str(image),
                "image_mib": args.image_mib,
                "fill_image": args.image == "tmpfs",
                "step_timeout": step_timeout,
            },
            indent=1,
        )
    )
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    print(
        f"guest: {KERNEL} -> {KERNEL.resolve().name}, {MEMORY_MIB} MiB, 1 vCPU, "
        f"cmdline {CMDLINE!r}; image {image} ({args.image_mib} MiB, filled, {args.image}); "
        f"{args.seconds:g} s per workload; variants {', '.join(variants)}, "
        f"{args.runs} boot(s) each, alternating order"
    )
    print(
        f"host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
        f"iovirt at {source_state()}; {host_load()}",
        flush=True,
    )
    timer = shlex.join([".venv/bin/python", BENCH_SCRIPT, "--inside", str(plan.relative_to(REPO))])
    timeout = args.timeout or 300 + len(steps) * step_timeout
    try:
        result = Lab().run(
            f"{timer} --out /out",
            cwd=REPO,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
            timeout=timeout,
            out_dir=OUT_DIR,
            shares=shares,
        )
    except IovirtError as exc:
        print(f"blk.py: {exc}", file=sys.stderr)
        return 1
    print(result.stdout, end="")
    if result.returncode != 0:
        print(f"blk.py: the runner in the lab failed (status {result.returncode})")
        print(result.stderr, file=sys.stderr)
        return 1

    runs, failed = [], []
    for step in steps:
        run, why = parse_run(json.loads((OUT_DIR / f"{step.id}.json").read_text()), workloads)
        runs.append(run)
        if why:
            failed.append((step.id, why))
    for step_id, why in failed:
        d = json.loads((OUT_DIR / f"{step_id}.json").read_text())
        print(f"\nFAILED {step_id}: {why}", file=sys.stderr)
        print("--- console (last 30 lines) ---", file=sys.stderr)
        print("\n".join(d["console"].splitlines()[-30:]), file=sys.stderr)
        print("--- stderr (last 30 lines) ---", file=sys.stderr)
        print("\n".join(d["stderr"].splitlines()[-30:]), file=sys.stderr)

    good = [r for r in runs if r["id"] not in dict(failed)]
    rows = summarize([r for r in good if r["run"] > 0], workloads, variants)
    RESULTS.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "iovirt": source_state(),
                "seconds": args.seconds,
                "variants": variants,
                "image": {"path": str(image), "mib": args.image_mib, "where": args.image},
                "lab_seconds": result.duration,
                "host_at_end": host_load(),
                "failed": [{"id": i, "why": w} for i, w in failed],
                "summary": rows,
                "runs": runs,
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
                f"{v}: guest disk {info.get('disk')} ({int(info.get('sectors', 0)) // 2048} MiB), "
                f"{info.get('hw_queues')} queue(s), scheduler {info.get('scheduler')}, "
                f"max_sectors_kb {info.get('max_sectors_kb')}, max_segments "
                f"{info.get('max_segments')}, nr_requests {info.get('nr_requests')}; "
                + (
                    f"features {' '.join(seen['features'])}"
                    if "features" in info
                    else f"model {info.get('model', '?').strip()!r}, "
                    f"queue_depth {info.get('queue_depth')}"
                )
                + (
                    ""
                    if info.get("found_by") == "serial"
                    else f" (found as {info.get('found_by')})"
                )
            )
    print()
    print_table(rows, variants)
    if "ratio" in rows[0]:
        met = all(row["ratio"] >= GOAL for row in rows)
        ratios = ", ".join(f"{row['ratio']:.2f}" for row in rows)
        print(
            f"\ngoal iovirt >= {GOAL}x QEMU in every workload: {'met' if met else 'NOT met'} "
            f"(ratios of medians: {ratios})"
        )
    print(f"lab: {result.duration:.1f} s in all; at the end: {host_load()}")
    print(f"raw results in {RESULTS}")
    return 1 if failed else 0


def parse_variants(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in VARIANTS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give distinct names from {', '.join(VARIANTS)}, comma-separated"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per workload")
    parser.add_argument("--qd", type=int, default=DEFAULT_RAND_QD, help="random-I/O queue depth")
    parser.add_argument("--seq-qd", type=int, default=DEFAULT_SEQ_QD, help="sequential QD")
    parser.add_argument("--rand-bs", type=int, default=DEFAULT_RAND_BS, help="random request size")
    parser.add_argument("--seq-bs", type=int, default=DEFAULT_SEQ_BS, help="sequential req. size")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="boots per VMM")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument(
        "--variants",
        type=parse_variants,
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, the first is the ratios' base (default "
        f"{','.join(DEFAULT_VARIANTS)}; known: {', '.join(VARIANTS)})",
    )
    chosen.add_argument("--only", choices=VARIANTS, help="run one variant only")
    parser.add_argument("--image-mib", type=int, default=DEFAULT_IMAGE_MIB, help="disk size")
    parser.add_argument(
        "--image",
        choices=("tmpfs", "share"),
        default="tmpfs",
        help="where the image lives: the lab's tmpfs (default) or a host folder over 9p",
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
    if args.runs < 1 or args.seconds <= 0 or args.image_mib < 1:
        parser.error("--runs, --seconds and --image-mib must be positive")
    for name in ("qd", "seq_qd"):
        if not 1 <= getattr(args, name) <= 256:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 256")
    for name in ("rand_bs", "seq_bs"):
        value = getattr(args, name)
        if value < 512 or value % 512 or value > args.image_mib * MIB:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of 512 within the image")
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
