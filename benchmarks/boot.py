"""Linux boot time: iovirt against QEMU, both booting Debian's kernel nested in the lab.

This machine's KVM (PVM) cannot boot a stock kernel, so both VMMs run inside the lab
(:mod:`iovirt.lab`, a QEMU TCG VM with a real nested ``/dev/kvm``), in ONE lab run. Every
variant boots the same kernel (``/vmlinuz``, a bzImage), the same initramfs and the same
command line (``console=ttyS0 panic=-1 reboot=k quiet``), with 256 MiB and one vCPU:

iovirt
    ``.venv/bin/iovirt run --no-lab build/bench/vm.toml``.
qemu-pc (the peer; other machine types with ``--qemu-machines``)
    ``qemu-system-x86_64 -enable-kvm -cpu host -machine pc -m 256 -smp 1 -nodefaults
    -no-reboot -display none -serial stdio -kernel /vmlinuz -initrd ... -append ...``.
    ``pc`` (i440FX) is the board closest to iovirt's: legacy PCI behind port 0xCF8,
    i8042, CMOS RTC, no PCIe. It also boots fastest here: ``q35`` adds PCIe and ICH9
    devices the kernel probes, and ``microvm`` has no i8042, so ``reboot=k`` spins in the
    kernel's keyboard-controller wait loops for a minute and more before it gives up.

The initramfs (``guest_test_initramfs``) prints ``IOVIRT-TEST-BEGIN`` from its /init,
runs a two-line script (the guest's uptime, and the kvm-clock offset from the kernel
log), prints ``IOVIRT-TEST-END rc=0`` and reboots, which ends both VMMs. A timer inside
the lab (this file, ``--inside``) starts each VMM, reads its stdout line by line and
records the monotonic time of every line: a run's results are the time from starting
the process to the marker line and to the process's exit. Every run must show
``IOVIRT-TEST-END rc=0`` and exit with 0, or the benchmark fails.

Order inside the lab: one *trace* boot per variant first (the same quiet boot, whose
guest then prints the whole kernel log with ``dmesg``; these also warm the lab's caches
of the kernel, QEMU and the venv), one *phases* boot of iovirt (``iovirt run`` with time
stamps between its start-up steps and a count of the guest's exits by port), three
``python -c pass`` probes, then ``--runs`` timed boots per variant in alternating order.
The trace boots' kernel timestamps give the largest gaps in iovirt's boot next to the
same phases in QEMU's.

Run from the repository root (needs the lab: QEMU, busybox-static, linux-image-amd64)::

    .venv/bin/python benchmarks/boot.py [--runs N] [--qemu-machines pc,q35,microvm]
                                        [--append 'pci=noearly'] [--shmem-thp]

Raw results (one JSON file per process, with every console line and its time) stay in
``build/bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "build" / "bench"  # the lab sees the host's build/, not its /tmp
RESULTS_DIR = BENCH_DIR / "results"  # mounted at /out in the lab
BENCH_SCRIPT = str(Path(__file__).resolve().relative_to(REPO))
KERNEL = Path("/vmlinuz")
MEMORY_MIB = 256

MARKER = "IOVIRT-TEST-BEGIN"
END_OK = "IOVIRT-TEST-END rc=0"
CMDLINE = "console=ttyS0 panic=-1 reboot=k quiet"
# The guest's work once init runs: its uptime (how far the kernel's clock had got), and
# the kernel's note of how old the VM was when that clock started (vm_age_at_clock_start).
GUEST_SCRIPT = (
    'echo "guest-uptime $(cut -d" " -f1 /proc/uptime)"\n'
    'dmesg | grep -m1 "kvm-clock: using sched offset" || true\n'
)
# The trace boots run the same quiet kernel and then print the whole kernel log (dmesg),
# every message with its timestamp. Printing the messages as they happen (no "quiet")
# would show the same phases, but the console output itself then costs more than most
# phases (two port exits per character) and moves every gap.
TRACE_CMDLINE = f"{CMDLINE} printk.time=1"
TRACE_SCRIPT = GUEST_SCRIPT + "dmesg\n"
UPTIME_RE = re.compile(r"guest-uptime (\d+\.\d+)")
PRINTK_RE = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")

# `python -c` this, so that the first stamp comes before anything but the interpreter.
PHASES_LAUNCHER = (
    "import sys, time; t = time.monotonic(); sys.path.insert(0, 'benchmarks'); "
    "import boot; sys.exit(boot.run_phases(sys.argv[1], t))"
)

DEFAULT_RUNS = 3
DEFAULT_QEMU_MACHINES = ("pc",)
DEFAULT_BOOT_TIMEOUT = 600.0  # one boot, inside the lab
DEFAULT_LAB_TIMEOUT = 2400.0  # the whole lab run: a loaded host makes nested boots slow
PROBE_RUNS = 3
TOP_GAPS = 12
TOP_EXITS = 10


# -- the plan: what runs inside the lab -------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One process the timer inside the lab starts and times."""

    id: str
    variant: str
    kind: str  # "trace" | "phases" | "probe" | "timed"
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "variant": self.variant, "kind": self.kind, "argv": self.argv}


def vm_config(initrd: Path, cmdline: str) -> str:
    return (
        "[vm]\n"
        f'memory = "{MEMORY_MIB}M"\n'
        f'kernel = "{KERNEL}"\n'
        f'initrd = "{initrd.relative_to(REPO)}"\n'
        f'cmdline = "{cmdline}"\n'
        "[serial]\n"
        'backend = { kind = "stdio", input = false }\n'
    )


def iovirt_argv(config: Path) -> tuple[str, ...]:
    return (".venv/bin/iovirt", "run", "--no-lab", str(config.relative_to(REPO)))


def qemu_argv(machine: str, initrd: Path, cmdline: str) -> tuple[str, ...]:
    return (
        "qemu-system-x86_64",
        "-enable-kvm",
        "-cpu",
        "host",
        "-machine",
        machine,
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
        cmdline,
    )


def make_plan(
    runs: int, machines: Sequence[str], append: str = "", bench_dir: Path = BENCH_DIR
) -> list[Step]:
    """Write the guest's initramfs and configs under ``bench_dir`` and return the steps.

    ``append`` goes at the end of every variant's kernel command line (what-if runs:
    ``pci=noearly`` skips the AGP aperture scans, for instance).
    """
    from iovirt.boot.initramfs import guest_test_initramfs
    from iovirt.boot.linux import kernel_release

    cmdline = f"{CMDLINE} {append}".strip()
    trace_cmdline = f"{TRACE_CMDLINE} {append}".strip()
    kver = kernel_release(KERNEL.read_bytes())
    if kver is None:
        raise SystemExit(f"boot.py: {KERNEL} carries no kernel release string")
    bench_dir.mkdir(parents=True, exist_ok=True)
    initrd = bench_dir / "initrd.img"
    initrd.write_bytes(guest_test_initramfs(kver, [], GUEST_SCRIPT))
    trace_initrd = bench_dir / "initrd-trace.img"
    trace_initrd.write_bytes(guest_test_initramfs(kver, [], TRACE_SCRIPT))
    config = bench_dir / "vm.toml"
    config.write_text(vm_config(initrd, cmdline))
    trace_config = bench_dir / "vm-trace.toml"
    trace_config.write_text(vm_config(trace_initrd, trace_cmdline))

    boots: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
        "iovirt": (iovirt_argv(config), iovirt_argv(trace_config))
    }
    for machine in machines:
        boots[f"qemu-{machine}"] = (
            qemu_argv(machine, initrd, cmdline),
            qemu_argv(machine, trace_initrd, trace_cmdline),
        )

    steps = [Step(f"trace-{name}", name, "trace", trace) for name, (_, trace) in boots.items()]
    phases = (".venv/bin/python", "-c", PHASES_LAUNCHER, str(config.relative_to(REPO)))
    steps.append(Step("phases-iovirt", "iovirt", "phases", phases))
    for i in range(PROBE_RUNS):
        python = (".venv/bin/python", "-c", "pass")
        steps.append(Step(f"probe-python-{i + 1}", "python -c pass", "probe", python))
    names = list(boots)
    for i in range(runs):
        # Alternate the order so that a slow drift (the lab's caches, other load on the
        # host) does not always favour the same variant.
        for name in names if i % 2 == 0 else reversed(names):
            steps.append(Step(f"timed-{i + 1}-{name}", name, "timed", boots[name][0]))
    return steps


SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def lab_script(plan: Path, boot_timeout: float, shmem_thp: bool = False) -> str:
    """The shell script the lab runs: the lab's uptime around the timer, for its overhead.

    ``shmem_thp`` lets the lab's kernel back shared memory (iovirt's memfd guest RAM)
    with transparent huge pages, as it does QEMU's anonymous guest RAM by default.
    """
    timer = shlex.join(
        [
            ".venv/bin/python",
            BENCH_SCRIPT,
            "--inside",
            str(plan.relative_to(REPO)),
            "--boot-timeout",
            str(boot_timeout),
        ]
    )
    return (
        "#!/bin/sh\n"
        "# Written by benchmarks/boot.py; runs inside the lab, in the repository root.\n"
        "cut -d' ' -f1 /proc/uptime >/out/lab-uptime-start\n"
        + (f"echo always >{SHMEM_THP}\n" if shmem_thp else "")
        + f"{timer} --out /out\n"
        + "rc=$?\n"
        "cut -d' ' -f1 /proc/uptime >/out/lab-uptime-end\n"
        'exit "$rc"\n'
    )


# -- inside the lab: the timer ----------------------------------------------------------------


def time_process(argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Start ``argv``, timestamp each stdout line, and return the times and the output.

    Times are seconds from just before the fork. stderr goes to a file, so that log lines
    do not mix with the console and the pipe carries nothing but the guest's output.
    """
    lines: list[tuple[float, str]] = []
    marker: float | None = None
    with open(os.devnull, "rb") as devnull, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            list(argv), cwd=REPO, stdin=devnull, stdout=subprocess.PIPE, stderr=err
        )
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                now = time.monotonic() - start
                text = raw.decode(errors="replace").rstrip("\r\n")
                lines.append((now, text))
                if marker is None and MARKER in text:
                    marker = now
            returncode = proc.wait()
            exited = time.monotonic() - start
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return {
        "start": start,  # CLOCK_MONOTONIC is system-wide: the child's stamps compare
        "returncode": returncode,
        "timed_out": exited >= timeout,
        "marker": marker,
        "exit": exited,
        "lines": lines,
        "stderr": stderr[-20000:],
    }


def run_inside(plan_path: Path, out: Path, timeout: float) -> int:
    plan = json.loads(plan_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    for step in plan["steps"]:
        result = {**step, **time_process(step["argv"], timeout)}
        (out / f"{step['id']}.json").write_text(json.dumps(result))
        marker = "-" if result["marker"] is None else f"{result['marker']:.2f}"
        print(
            f"{step['id']}: rc={result['returncode']} marker={marker} exit={result['exit']:.2f}",
            flush=True,
        )
    return 0


PHASE_PREFIX = "IOVIRT-PHASE"
EXITS_PREFIX = "IOVIRT-EXITS"


def _stamp(name: str, at: float | None = None) -> None:
    at = time.monotonic() if at is None else at
    print(f"{PHASE_PREFIX} {at:.6f} {name}", file=sys.stderr, flush=True)


def _wrap(owner: object, attr: str, before: str | None, after: str | None) -> None:
    """Stamp the time around ``owner.attr(...)``; skip quietly if it does not exist."""
    original = getattr(owner, attr, None)
    if original is None:
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _stamp(before)
        result = original(*args, **kwargs)
        if after:
            _stamp(after)
        return result

    setattr(owner, attr, wrapper)


def _count_accesses(bus: Any, kind: str, counts: dict[str, int]) -> None:
    """Count every guest access that reaches ``bus`` (one exit each), by kind and address.

    The vCPU loop looks up ``bus.read``/``bus.write`` when it starts, so instance
    attributes set before then take the place of the methods. About a microsecond per
    exit, against the hundreds an exit costs in the lab.
    """
    read, write = bus.read, bus.write

    def counted_read(addr: int, size: int) -> int:
        key = f"{kind} {addr:#x}"
        counts[key] = counts.get(key, 0) + 1
        return int(read(addr, size))

    def counted_write(addr: int, size: int, value: int) -> None:
        key = f"{kind} {addr:#x}"
        counts[key] = counts.get(key, 0) + 1
        write(addr, size, value)

    bus.read, bus.write = counted_read, counted_write


def run_phases(config: str, started: float) -> int:
    """``iovirt run --no-lab CONFIG`` with time stamps on stderr between its start-up phases.

    The same code path as the command (``iovirt.cli.main``); only the stamps and a count
    of the guest's port-I/O and MMIO exits are added, around functions looked up by name,
    so a renamed one just loses its stamp. ``started`` is when the interpreter first ran
    Python code; importing this helper is a step of its own that ``iovirt run`` lacks.
    """
    _stamp("interpreter up", started)
    _stamp("benchmark helper imported")
    import iovirt.cli as cli
    import iovirt.machine as machine
    import iovirt.vm as vm

    _stamp("iovirt imported")
    _wrap(cli, "load_config", None, "config loaded")
    _wrap(cli, "check_boot_files", None, "boot files checked")
    _wrap(machine, "_load_kernel", "KVM VM and devices created", "kernel and initrd loaded")
    counts: dict[str, int] = {}
    vm_run = vm.Vm.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        _count_accesses(self.pio, "pio", counts)
        _count_accesses(self.mmio, "mmio", counts)
        _stamp("Vm.run() called")
        try:
            return vm_run(self, *args, **kwargs)
        finally:
            _stamp("Vm.run() returned")
            print(f"{EXITS_PREFIX} {json.dumps(counts)}", file=sys.stderr, flush=True)

    # Not `vm.Vm.run = run`: mypy rejects assigning to a method.
    setattr(vm.Vm, "run", run)  # noqa: B010
    return cli.main(["run", "--no-lab", config])


# -- on the host: running the lab and reading the results ------------------------------------


@dataclass
class Boot:
    """One timed process, read back from its JSON file."""

    id: str
    variant: str
    kind: str
    returncode: int
    marker: float | None
    exit: float
    lines: list[tuple[float, str]]
    stderr: str
    start: float

    @classmethod
    def load(cls, path: Path) -> Boot:
        d = json.loads(path.read_text())
        return cls(
            d["id"],
            d["variant"],
            d["kind"],
            d["returncode"],
            d["marker"],
            d["exit"],
            [(t, s) for t, s in d["lines"]],
            d["stderr"],
            d["start"],
        )

    @property
    def console(self) -> str:
        return "\n".join(text for _, text in self.lines)

    def problem(self) -> str | None:
        """Why this run does not count, or None."""
        if self.returncode != 0:
            return f"exit status {self.returncode}"
        if self.kind == "probe":
            return None
        if self.marker is None:
            return f"no {MARKER} line on the console"
        if END_OK not in self.console:
            return f"no '{END_OK}' line on the console"
        return None

    def phases(self) -> list[tuple[float, str]]:
        """The ``--phases`` stamps: (seconds since the process started, phase)."""
        out = []
        for line in self.stderr.splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0] == PHASE_PREFIX:
                out.append((float(parts[1]) - self.start, parts[2]))
        return out

    def exit_counts(self) -> dict[str, int]:
        """The ``--phases`` boot's guest accesses by bus and address (one exit each)."""
        for line in self.stderr.splitlines():
            if line.startswith(EXITS_PREFIX + " "):
                counts: dict[str, int] = json.loads(line[len(EXITS_PREFIX) + 1 :])
                return counts
        return {}

    def guest_uptime(self) -> float | None:
        match = UPTIME_RE.search(self.console)
        return float(match.group(1)) if match else None


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def print_timed_table(boots: Sequence[Boot], variants: Sequence[str]) -> None:
    header = (
        "| variant | to marker, s (median) | min-max | to exit, s (median) | min-max "
        "| guest uptime at init script, s | marker - uptime, s | runs |"
    )
    print(header)
    print("|" + "|".join("---" if i == 0 else "--:" for i in range(8)) + "|")
    for name in variants:
        mine = [b for b in boots if b.variant == name and b.kind == "timed"]
        markers = [b.marker for b in mine if b.marker is not None]
        exits = [b.exit for b in mine]
        uptimes = [u for b in mine if (u := b.guest_uptime()) is not None]
        pre = [b.marker - u for b in mine if b.marker is not None and (u := b.guest_uptime())]
        print(
            f"| {name} | {median(markers):.2f} | {spread(markers)} | {median(exits):.2f} "
            f"| {spread(exits)} | {median(uptimes):.2f} | {median(pre):.2f} | {len(mine)} |"
        )


def print_ratios(boots: Sequence[Boot], variants: Sequence[str]) -> None:
    def med(name: str, attr: str) -> float:
        return median([getattr(b, attr) for b in boots if b.variant == name and b.kind == "timed"])

    for peer in variants:
        if peer == "iovirt":
            continue
        to_marker = med("iovirt", "marker") / med(peer, "marker")
        to_exit = med("iovirt", "exit") / med(peer, "exit")
        print(
            f"iovirt / {peer}: {to_marker:.2f}x the time to the init marker, "
            f"{to_exit:.2f}x the time to exit (medians; goal: at most 0.50x)"
        )


def print_probes(boots: Sequence[Boot]) -> None:
    for name in sorted({b.variant for b in boots if b.kind == "probe"}):
        times = [b.exit for b in boots if b.variant == name and b.kind == "probe"]
        print(f"start-up probe `{name}`: median {median(times):.2f} s ({spread(times)} s)")


# -- trace analysis ---------------------------------------------------------------------------


@dataclass
class KernelLine:
    host: float  # seconds since the VMM process started, when the line reached the timer
    stamp: float  # the kernel's printk timestamp
    text: str


def kernel_lines(boot: Boot) -> list[KernelLine]:
    """The kernel log the trace boot's guest printed with dmesg (between the test markers)."""
    out = []
    inside = False
    for host, text in boot.lines:
        if MARKER in text:
            inside = True
        elif "IOVIRT-TEST-END" in text:
            break
        elif inside and (match := PRINTK_RE.match(text)):
            out.append(KernelLine(host, float(match.group(1)), match.group(2)))
    return out


def _phase_key(text: str) -> str:
    # The same message in two boots differs in addresses, sizes and counts.
    return re.sub(r"0x[0-9a-fA-F]+|[0-9a-fA-F]{6,}|\d+", "#", text)[:60]


def gaps(lines: Sequence[KernelLine]) -> list[tuple[float, int]]:
    """(seconds until the next message, index) for each message, largest first."""
    found = [(lines[i + 1].stamp - lines[i].stamp, i) for i in range(len(lines) - 1)]
    return sorted(found, reverse=True)


SCHED_OFFSET_RE = re.compile(r"kvm-clock: using sched offset of (\d+) cycles")


def vm_age_at_clock_start(boot: Boot) -> float | None:
    """Seconds from KVM_CREATE_VM to the kernel's clock origin, as the guest reports them.

    kvm-clock counts from the VM's creation; the kernel prints that count (in ns,
    labelled "cycles") when it makes kvm-clock its sched_clock, whose 0 is the origin of
    every later printk timestamp.
    """
    match = SCHED_OFFSET_RE.search(boot.console)
    return int(match.group(1)) / 1e9 if match else None


def print_breakdown(boots: Sequence[Boot], variants: Sequence[str]) -> None:
    """Where each variant's time to the marker goes (medians over its timed boots).

    The guest's uptime when its init script runs splits the time to the marker into the
    kernel's own part and what came before the kernel's clock started; the kvm-clock
    offset the guest logged splits the latter at KVM_CREATE_VM.
    """
    print(
        "| variant | process start -> KVM VM created, s | VM created -> kernel clock starts "
        "(firmware, decompressor, early setup), s | kernel clock -> init script "
        "(guest uptime), s | to marker, s | marker -> exit, s |"
    )
    print("|---|--:|--:|--:|--:|--:|")
    for name in variants:
        before, ages, uptimes, markers, tails = [], [], [], [], []
        for b in boots:
            if b.variant != name or b.kind != "timed" or b.marker is None:
                continue
            uptime, age = b.guest_uptime(), vm_age_at_clock_start(b)
            markers.append(b.marker)
            tails.append(b.exit - b.marker)
            if uptime is not None:
                uptimes.append(uptime)
                if age is not None:
                    ages.append(age)
                    before.append(b.marker - uptime - age)
        print(
            f"| {name} | {median(before):.2f} | {median(ages):.2f} | {median(uptimes):.2f} "
            f"| {median(markers):.2f} | {median(tails):.2f} |"
        )


def print_trace_summary(traces: dict[str, Boot]) -> None:
    print(
        "| trace boot | to marker, s | to exit (dmesg printed), s | VM created -> kernel clock "
        "starts, s | 'Run /init' at kernel time, s | guest uptime at init script, s "
        "| kernel messages |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, boot in traces.items():
        lines = kernel_lines(boot)
        age = vm_age_at_clock_start(boot)
        init = next((k.stamp for k in lines if k.text.startswith("Run /init")), None)
        print(
            f"| {name} | {_num(boot.marker)} | {boot.exit:.2f} | {_num(age)} | {_num(init)} "
            f"| {_num(boot.guest_uptime())} | {len(lines)} |"
        )


def print_exit_counts(boot: Boot) -> None:
    counts = boot.exit_counts()
    if not counts:
        return
    total = sum(counts.values())
    top = sorted(counts.items(), key=lambda item: -item[1])[:TOP_EXITS]
    shown = ", ".join(f"{key} {n:,}" for key, n in top)
    print(f"guest accesses that reached iovirt's buses in that boot: {total:,} ({shown})")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _loose_key(text: str) -> str:
    # Fallback when the wording differs ("Console: colour dummy device" / "colour *CGA").
    return " ".join(text.split()[:2])


def same_phase(ours: Sequence[KernelLine], i: int, theirs: Sequence[KernelLine]) -> float | None:
    """Seconds, in another boot's trace, between the messages that bound our gap ``i``.

    Messages match by their text with numbers masked, else by their first two words. One
    that occurs more than once (the two AGP scans' "No AGP bridge found") is matched by
    its ordinal: our second one is their second one.
    """
    for key in (_phase_key, _loose_key):
        first = key(ours[i].text)
        nth = sum(1 for k in ours[:i] if key(k.text) == first)
        keys = [key(k.text) for k in theirs]
        starts = [j for j, text in enumerate(keys) if text == first]
        if nth >= len(starts):
            continue
        j = starts[nth]
        try:
            k = keys.index(key(ours[i + 1].text), j + 1)
        except ValueError:
            continue
        return theirs[k].stamp - theirs[j].stamp
    return None


def print_gap_table(traces: dict[str, Boot], peer: str | None) -> None:
    ours = kernel_lines(traces["iovirt"])
    theirs = kernel_lines(traces[peer]) if peer in traces else []
    print(f"| gap, s (iovirt) | same phase, s ({peer}) | from the message | to the message |")
    print("|--:|--:|---|---|")
    for gap, i in gaps(ours)[:TOP_GAPS]:
        same = same_phase(ours, i, theirs)
        print(
            f"| {gap:.3f} | {'-' if same is None else f'{same:.3f}'} "
            f"| `{ours[i].text[:64]}` | `{ours[i + 1].text[:44]}` |"
        )


def print_phases(boot: Boot) -> None:
    stamps = [*boot.phases()]
    if boot.marker is not None:
        stamps.append((boot.marker, "init marker on the console"))
    stamps.append((boot.exit, "process exited"))
    print("| iovirt phase (one quiet boot) | s since process start | step, s |")
    print("|---|--:|--:|")
    previous = 0.0
    for at, name in stamps:
        print(f"| {name} | {at:.2f} | {at - previous:.2f} |")
        previous = at


# -- main -------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


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
        ).stdout.split("\n")
    except OSError:
        return "unknown"
    edits = [line[3:] for line in changed if line.strip()]
    return f"{head} with uncommitted changes to {', '.join(edits)}" if edits else head


def host_main(args: argparse.Namespace) -> int:
    from iovirt.errors import IovirtError
    from iovirt.lab import Lab

    machines = [m for m in args.qemu_machines.split(",") if m]
    steps = make_plan(args.runs, machines, args.append)
    variants = list(dict.fromkeys(s.variant for s in steps if s.kind == "timed"))
    plan = BENCH_DIR / "plan.json"
    plan.write_text(json.dumps({"steps": [s.to_json() for s in steps]}, indent=1))
    script = BENCH_DIR / "run.sh"
    script.write_text(lab_script(plan, args.boot_timeout, args.shmem_thp))
    shutil.rmtree(RESULTS_DIR, ignore_errors=True)
    RESULTS_DIR.mkdir(parents=True)

    cmdline = f"{CMDLINE} {args.append}".strip()
    print(
        f"guest: {KERNEL} -> {KERNEL.resolve().name}, {MEMORY_MIB} MiB, 1 vCPU, "
        f"cmdline {cmdline!r}; variants: {', '.join(variants)}; {args.runs} timed boots "
        "each (alternating order) after one trace boot each"
        + ("; lab shmem THP on (--shmem-thp)" if args.shmem_thp else "")
    )
    print(
        f"host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
        f"load average {load_average()}; iovirt at {source_state()}",
        flush=True,
    )
    lab = Lab()
    command = f"sh {shlex.quote(str(script.relative_to(REPO)))}"
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = lab.run(command, cwd=REPO, env=env, timeout=args.timeout, out_dir=RESULTS_DIR)
    except IovirtError as exc:
        print(f"boot.py: {exc}", file=sys.stderr)
        return 1
    if result.returncode != 0:
        print(f"boot.py: the timer in the lab failed (status {result.returncode})")
        print(result.stdout + result.stderr, file=sys.stderr)
        return 1

    boots = [Boot.load(RESULTS_DIR / f"{s.id}.json") for s in steps]
    failed = [(b, p) for b in boots if (p := b.problem()) is not None]
    for boot, why in failed:
        print(f"\nFAILED {boot.id}: {why}", file=sys.stderr)
        print("--- console (last 30 lines) ---", file=sys.stderr)
        print("\n".join(boot.console.splitlines()[-30:]), file=sys.stderr)
        print("--- stderr (last 20 lines) ---", file=sys.stderr)
        print("\n".join(boot.stderr.splitlines()[-20:]), file=sys.stderr)
    if failed:
        print(f"\nboot.py: {len(failed)} run(s) failed; raw results in {RESULTS_DIR}")
        return 1

    uptime_start = float((RESULTS_DIR / "lab-uptime-start").read_text())
    uptime_end = float((RESULTS_DIR / "lab-uptime-end").read_text())
    inside = uptime_end - uptime_start
    print()
    for boot in boots:
        marker = "-" if boot.marker is None else f"{boot.marker:.2f}"
        print(f"{boot.id}: marker {marker} s, exit {boot.exit:.2f} s")
    print()
    print_timed_table(boots, variants)
    print()
    print_ratios(boots, variants)
    print_probes(boots)
    print(
        f"lab: {result.duration:.1f} s in all; the lab kernel booted to the command in "
        f"{uptime_start:.1f} s (lab uptime), the benchmark ran {inside:.1f} s inside it; "
        f"lab overhead (QEMU start, lab boot, power-off) {result.duration - inside:.1f} s"
    )
    print()
    traces = {b.variant: b for b in boots if b.kind == "trace"}
    peer = next((v for v in variants if v != "iovirt"), None)
    print_breakdown(boots, variants)
    print()
    for boot in boots:
        if boot.kind == "phases":
            print_phases(boot)
            print()
            print_exit_counts(boot)
            print()
    print_trace_summary(traces)
    if "iovirt" in traces:
        print()
        print(f"largest gaps between consecutive kernel messages, iovirt's trace boot (vs {peer}):")
        print()
        print_gap_table(traces, peer)
    print()
    print(f"load average at the end: {load_average()}; raw results in {RESULTS_DIR}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed boots per variant")
    parser.add_argument(
        "--qemu-machines",
        default=",".join(DEFAULT_QEMU_MACHINES),
        help="QEMU -machine values to compare, comma-separated (default: pc)",
    )
    parser.add_argument(
        "--append",
        default="",
        help="added to every variant's kernel command line (e.g. pci=noearly), for what-ifs",
    )
    parser.add_argument(
        "--shmem-thp",
        action="store_true",
        help="what-if: let the lab back shared memory (iovirt's memfd RAM) with huge pages",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_LAB_TIMEOUT, help="seconds for the lab run"
    )
    parser.add_argument(
        "--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT, help="seconds per boot"
    )
    parser.add_argument("--inside", type=Path, help=argparse.SUPPRESS)  # the timer, in the lab
    parser.add_argument("--out", type=Path, default=Path("/out"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside is not None:
        return run_inside(args.inside, args.out, args.boot_timeout)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
