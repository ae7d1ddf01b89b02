"""Port-I/O exit round trips per second: iovirt's VMM core against bare KVM_RUN loops.

Every variant runs the same guest: a firmware loop of N ``outb %al, $0x80`` followed by
one write to the debug-exit port (0x501). Each ``out`` leaves the guest, goes to
userspace and comes back: one port-I/O exit round trip. The variants differ only in
what userspace does with an exit:

iovirt
    The full VMM: a :class:`~iovirt.vm.Vm` with the firmware, a write-counting device on
    port 0x80 and :class:`~iovirt.devices.debug_exit.DebugExit` on 0x501. Timed from
    ``Vm.run()`` to its return (vCPU thread start and join included).
bare-python
    The same KVM set-up (in-kernel irqchip and PIT, CPUID, RAM slot, firmware ROM slot
    ending at 4 GiB plus its shadow below 1 MiB) built from iovirt's KVM wrappers, then a
    ``while`` loop calling KVM_RUN through the same cffi helper and checking the exit
    reason, direction and port: no bus, no device objects.
bare-c
    The same set-up, then the loop of ``bare_pio_loop.c`` (compiled with gcc into a temp
    dir, called through ctypes): the cost of an exit with no Python at all.
floor
    Not a peer but a reference: port 0x80 is bound to an ioeventfd, so KVM completes
    each ``out`` in the kernel and userspace sees one exit in total. What is left is the
    guest's own time (real-mode code is emulated on PVM) plus KVM's exit handling.

Each variant checks that it saw exactly N writes to port 0x80 (the iovirt device
counter, the bare loops' counters, the eventfd's count) and the guest's exit code.

Run from the repository root::

    .venv/bin/python benchmarks/pio_exits.py [--exits N] [--repeat R] [--no-c]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from iovirt.bus import Bus
from iovirt.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from iovirt.kvm import Kvm, KvmVcpu, KvmVm
from iovirt.kvm._ioctl import ffi, lib
from iovirt.memory import GuestMemory
from iovirt.testing.asm import firmware
from iovirt.vm import FIRMWARE_TOP, LEGACY_BIOS_MAX, LEGACY_BIOS_TOP, Vm, VmExitReason

BENCH_PORT = 0x80  # the POST-code port: nothing in the kernel claims it
GUEST_EXIT_CODE = 0x5A  # what the guest writes to the debug-exit port when its loop is done
MEMORY = 16 * 1024 * 1024
WARMUP_EXITS = 20_000

C_SOURCE = Path(__file__).with_name("bare_pio_loop.c")

# KVM_RUN results that mean "run again", as in Vm's vCPU loop. EINTR does come here
# without any kick: a thread that has run a uvloop event loop (Vm.run() does) gets one
# from its next KVM_RUN a few ms after the loop closed. No signal is generated (the
# signal tracepoints stay silent), and asyncio's own event loop does not cause it.
_RETRY = (-errno.EINTR, -errno.EAGAIN)

# bare_pio_loop()'s results besides 0 (done) and -errno, as in bare_pio_loop.c.
_BARE_UNEXPECTED_EXIT = 1
_BARE_UNEXPECTED_PORT = 2


class BenchmarkError(Exception):
    """A variant did not see the guest program run as expected."""


def guest_firmware(exits: int) -> bytes:
    """The guest program every variant runs: ``exits`` port writes, then the verdict."""
    if not 0 < exits < 1 << 32:
        raise ValueError(f"--exits {exits}: must be between 1 and 2**32 - 1")
    return firmware(
        f"""
    movl ${exits}, %ecx
    movb $0x42, %al
1:  outb %al, ${BENCH_PORT:#x}
    decl %ecx
    jnz 1b
    movb ${GUEST_EXIT_CODE:#x}, %al
    movw ${DEBUG_EXIT_PORT:#x}, %dx
    outb %al, %dx
2:  hlt
    jmp 2b
"""
    )


class WriteCounter:
    """A bus device that does nothing but count the writes that reach it."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


def _check(variant: str, writes: int, code: int, exits: int) -> None:
    if writes != exits or code != GUEST_EXIT_CODE:
        raise BenchmarkError(
            f"{variant}: saw {writes} writes to port {BENCH_PORT:#x} and exit code {code:#x}; "
            f"expected {exits} and {GUEST_EXIT_CODE:#x}"
        )


# -- iovirt -------------------------------------------------------------------------------


def run_iovirt(image: bytes, exits: int) -> float:
    """Seconds for the guest program under the full VMM."""
    with Vm(MEMORY) as vm:
        counter = WriteCounter()
        vm.pio.register(BENCH_PORT, 1, counter, "bench")
        vm.pio.register(
            DEBUG_EXIT_PORT,
            1,
            DebugExit(lambda value: vm.stop(VmExitReason.GUEST_EXIT, value)),
            "debug-exit",
        )
        vm.load_firmware(image)
        start = time.perf_counter()
        result = vm.run(timeout=600)
        elapsed = time.perf_counter() - start
        if result.reason is not VmExitReason.GUEST_EXIT:
            raise BenchmarkError(f"iovirt: the VM ended with {result}")
        _check("iovirt", counter.writes, result.code, exits)
    return elapsed


# -- the bare set-up shared by bare-python, bare-c and floor ------------------------------


class BareVm:
    """The KVM set-up ``Vm`` makes (irqchip, PIT, CPUID, RAM, firmware ROM and shadow),
    with nothing on top: no buses, no threads, no event loop."""

    def __init__(self, image: bytes) -> None:
        self.kvm = Kvm()
        self.vm = KvmVm(self.kvm)
        self.vm.create_irqchip()
        self.vm.create_pit()
        self.ram = GuestMemory([(0, MEMORY)])
        self.vm.add_memory_slot(0, MEMORY, self.ram.regions[0].host_addr)
        rom_base = FIRMWARE_TOP - len(image)
        self.rom = GuestMemory([(rom_base, len(image))], name="bench-firmware")
        self.rom.write(rom_base, image)
        self.vm.add_memory_slot(rom_base, len(image), self.rom.regions[0].host_addr, True)
        shadow = image[-LEGACY_BIOS_MAX:]
        self.ram.write(LEGACY_BIOS_TOP - len(shadow), shadow)
        self.vcpu: KvmVcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(self.kvm.supported_cpuid())

    def close(self) -> None:
        self.vcpu.close()
        self.rom.close()
        self.ram.close()
        self.vm.close()
        self.kvm.close()

    def __enter__(self) -> BareVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_bare_python(image: bytes, exits: int) -> float:
    """Seconds for the guest program under a bare Python KVM_RUN loop."""
    with BareVm(image) as bare:
        kvm_run = lib.iovirt_kvm_run
        fd = bare.vcpu.fd
        run = bare.vcpu.run_struct
        io = bare.vcpu.io
        page = bare.vcpu.run_page
        exit_io, io_out = lib.KVM_EXIT_IO, lib.KVM_EXIT_IO_OUT
        writes = 0
        start = time.perf_counter()
        while True:
            ret = kvm_run(fd)
            if ret < 0:
                if ret in _RETRY:
                    continue
                raise OSError(-ret, f"KVM_RUN: {os.strerror(-ret)}")
            if run.exit_reason != exit_io or io.direction != io_out:
                raise BenchmarkError(f"bare-python: unexpected exit {run.exit_reason}")
            port = io.port
            if port == BENCH_PORT:
                writes += 1
            elif port == DEBUG_EXIT_PORT:
                code = page[io.data_offset]
                break
            else:
                raise BenchmarkError(f"bare-python: unexpected port {port:#x}")
        elapsed = time.perf_counter() - start
    _check("bare-python", writes, code, exits)
    return elapsed


def build_bare_c(tmp: Path) -> Callable[[bytes, int], float]:
    """Compile ``bare_pio_loop.c`` into ``tmp`` and return the bare-c variant."""
    so = tmp / "bare_pio_loop.so"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", str(so), str(C_SOURCE)],
        check=True,
    )
    loop = ctypes.CDLL(str(so)).bare_pio_loop
    loop.restype = ctypes.c_int
    loop.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_uint32),
    ]

    def run_bare_c(image: bytes, exits: int) -> float:
        with BareVm(image) as bare:
            run_addr = int(ffi.cast("uintptr_t", bare.vcpu.run_struct))
            count, detail = ctypes.c_uint64(), ctypes.c_uint32()
            start = time.perf_counter()
            ret = loop(
                bare.vcpu.fd,
                run_addr,
                BENCH_PORT,
                DEBUG_EXIT_PORT,
                ctypes.byref(count),
                ctypes.byref(detail),
            )
            elapsed = time.perf_counter() - start
        if ret < 0:
            raise OSError(-ret, f"KVM_RUN: {os.strerror(-ret)}")
        if ret == _BARE_UNEXPECTED_EXIT:
            raise BenchmarkError(f"bare-c: unexpected exit {detail.value}")
        if ret == _BARE_UNEXPECTED_PORT:
            raise BenchmarkError(f"bare-c: unexpected port {detail.value:#x}")
        _check("bare-c", count.value, detail.value, exits)
        return elapsed

    return run_bare_c


def run_floor(image: bytes, exits: int) -> float:
    """Seconds for the guest program when KVM completes port 0x80 writes in the kernel."""
    with BareVm(image) as bare:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            bare.vm.ioeventfd(efd, BENCH_PORT, 1, pio=True)
            start = time.perf_counter()
            ret = bare.vcpu.run()
            while ret in _RETRY:
                ret = bare.vcpu.run()
            elapsed = time.perf_counter() - start
            if ret < 0:
                raise OSError(-ret, f"KVM_RUN: {os.strerror(-ret)}")
            io = bare.vcpu.io
            if bare.vcpu.exit_reason != lib.KVM_EXIT_IO or io.port != DEBUG_EXIT_PORT:
                raise BenchmarkError(f"floor: unexpected exit {bare.vcpu.exit_reason}")
            code = bare.vcpu.run_page[io.data_offset]
            writes = os.eventfd_read(efd)
            bare.vm.ioeventfd(efd, BENCH_PORT, 1, pio=True, remove=True)
        finally:
            os.close(efd)
    _check("floor", writes, code, exits)
    return elapsed


# -- reporting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """The timed runs of one variant."""

    name: str
    exits: int
    seconds: list[float]

    @property
    def rate(self) -> float:
        """Median exits per second."""
        return self.exits / statistics.median(self.seconds)

    @property
    def us_per_exit(self) -> float:
        return 1e6 * statistics.median(self.seconds) / self.exits

    @property
    def best_us_per_exit(self) -> float:
        return 1e6 * min(self.seconds) / self.exits

    @property
    def spread(self) -> str:
        """Fastest and slowest run, in µs per exit."""
        lo, hi = (1e6 * s / self.exits for s in (min(self.seconds), max(self.seconds)))
        return f"{lo:.2f}-{hi:.2f}"


def compare(a: Result, b: Result) -> str:
    """``a``'s exit rate as a multiple of ``b``'s, on medians and on best runs (the best
    run is the one least disturbed by other load on the host)."""
    median = b.us_per_exit / a.us_per_exit
    best = b.best_us_per_exit / a.best_us_per_exit
    label = f"{a.name} / {b.name}:"
    return (
        f"{label:<21} {median:.2f}x the exit rate, {a.us_per_exit - b.us_per_exit:+.2f} µs "
        f"per exit (median runs); {best:.2f}x, "
        f"{a.best_us_per_exit - b.best_us_per_exit:+.2f} µs (best runs)"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages: how busy the host was besides this benchmark."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bus_dispatch_us(rounds: int = 200_000) -> float:
    """µs for one ``Bus.write`` to a counting device: the dispatch part of an iovirt exit,
    measured without KVM (a bus with the same two registrations as the iovirt variant)."""
    bus = Bus("pio", 0x1_0000)
    bus.register(BENCH_PORT, 1, WriteCounter(), "bench")
    bus.register(DEBUG_EXIT_PORT, 1, DebugExit(lambda value: None), "debug-exit")
    best = min(
        timeit.repeat(
            "write(port, 1, 0x42)",
            globals={"write": bus.write, "port": BENCH_PORT},
            number=rounds,
            repeat=5,
        )
    )
    return 1e6 * best / rounds


def print_table(results: list[Result]) -> None:
    """The results as a Markdown table (readable as is, pasteable into docs/)."""
    header = ("variant", "exits/s (median)", "µs/exit (median)", "µs/exit (min-max)", "runs")
    rows = [
        (r.name, f"{r.rate:,.0f}", f"{r.us_per_exit:.2f}", r.spread, str(len(r.seconds)))
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = (
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    print(line(header))
    print("|" + "|".join(("-" * (w + 1) + (":" if i else "-")) for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(line(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=200_000, help="port writes per run")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--no-c", action="store_true", help="skip the bare-c variant")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    image = guest_firmware(args.exits)
    warmup_image = guest_firmware(min(args.exits, WARMUP_EXITS))
    with tempfile.TemporaryDirectory(prefix="iovirt-bench-") as tmp:
        variants: dict[str, Callable[[bytes, int], float]] = {
            "iovirt": run_iovirt,
            "bare-python": run_bare_python,
        }
        if not args.no_c:
            variants["bare-c"] = build_bare_c(Path(tmp))
        variants["floor (ioeventfd)"] = run_floor

        print(
            f"guest: {args.exits:,} x outb to port {BENCH_PORT:#x}, then debug-exit; "
            f"{args.repeat} timed runs per variant, interleaved, after one warm-up each"
        )
        print(
            f"host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}; load average {load_average()}"
        )
        for variant in variants.values():
            variant(warmup_image, min(args.exits, WARMUP_EXITS))
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.repeat):
            for name, variant in variants.items():
                seconds[name].append(variant(image, args.exits))
            print(
                f"run {i + 1}/{args.repeat}: "
                + ", ".join(f"{n} {1e6 * s[-1] / args.exits:.2f} µs" for n, s in seconds.items()),
                flush=True,
            )

    results = {name: Result(name, args.exits, s) for name, s in seconds.items()}
    print()
    print_table(list(results.values()))
    print()
    pairs = [("iovirt", "bare-python"), ("iovirt", "bare-c"), ("bare-python", "bare-c")]
    for a, b in pairs:
        if a in results and b in results:
            print(compare(results[a], results[b]))
    print(f"Bus.write to the counting device alone (no KVM): {bus_dispatch_us():.2f} µs")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
