"""Running fuzz inputs against a device: guest RAM, the run loop, budgets and oracles.

One input is one short guest session against a freshly built device (:class:`Target`):
the decoded operations (:mod:`iovirt.fuzz.ops`) run in order, the device's invariants are
checked after every operation, and the device is torn down at the end. The oracles, beyond
"no exception escapes the device":

* **guest RAM only** — devices reach RAM through :class:`FuzzMemory`, a
  :class:`~iovirt.memory.GuestMemory` that raises outside RAM like the real one; an escaping
  :class:`~iovirt.errors.GuestMemoryError` is a crash like any exception;
* **bounded work** — at most :data:`~iovirt.fuzz.ops.MAX_OPS` operations per input, at most
  :data:`MAX_RAM_ACCESSES` guest RAM accesses, and (when replaying) a wall-clock deadline;
  libFuzzer's ``-timeout`` catches a device that never returns while fuzzing;
* **device invariants** — each target's :meth:`Target.check` (interrupt line consistent
  with the registers that drive it, ring and FIFO indices in bounds, ...);
* **backend integrity** — each target's :meth:`Target.end` compares its throwaway backend
  with what the guest could have addressed (disk sectors outside the commands' LBA ranges
  unchanged, no frame the host kernel would misread);
* **no resource growth** — the number of open file descriptors is the same after every
  input (the device and its transport must release what they opened); the fuzzing worker
  also watches its resident memory over the whole run.

A violated oracle raises :class:`OracleViolation`; the fuzzing worker treats it as a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import ClassVar

from iovirt.fuzz import ops as fops
from iovirt.fuzz.ops import Op, OpKind
from iovirt.memory import GuestMemory

# Guest RAM of every target: small, so random addresses often land in it, and cheap to
# clear between inputs.
RAM_BASE = 0
RAM_SIZE = 1 << 20
# Bytes of DMA pattern the device may pull into untouched RAM per input.
DMA_FILL_BUDGET = 64 * 1024
# Guest RAM accesses (calls) one input may cause; a device past this loops on guest data.
MAX_RAM_ACCESSES = 200_000
# Addresses the guest wrote into device registers that MEM_WRITE may refer back to.
RECENT_ADDRESSES = 16
# Wall-clock limit of one input when replaying (fuzzing uses libFuzzer's -timeout).
REPLAY_DEADLINE_S = 20.0

_ONES = b"\x01" * RAM_SIZE
_ZEROS = bytes(RAM_SIZE)


class OracleViolation(Exception):
    """An oracle other than "no exception" failed. ``kind`` names the oracle (it is the
    crash signature); ``detail`` says what was seen."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class _Stop(BaseException):
    """Carries a violation out of device code: device models catch ``Exception`` around
    their handlers (a model bug must not end the vCPU loop), which must not swallow it."""

    def __init__(self, violation: OracleViolation) -> None:
        super().__init__(str(violation))
        self.violation = violation


class FuzzMemory(GuestMemory):
    """Guest RAM for fuzzing: one region at :data:`RAM_BASE`, access counting, and DMA fill.

    DMA fill (as QEMU's generic-fuzz does): when a device reads RAM that neither the guest
    (a MEM_WRITE operation) nor the device wrote during this input, those bytes are first
    filled from the input's DMA patterns. Devices that chase pointers (descriptor rings,
    command tables, PRDTs) then see fuzzer-chosen data wherever they look, without the
    fuzzer having to guess the addresses it programmed. Only Python device models go
    through these hooks; the C data path reads RAM directly (see :meth:`prefill`).
    """

    def __init__(self, size: int = RAM_SIZE) -> None:
        super().__init__([(RAM_BASE, size)], name="iovirt-fuzz-ram")
        self.touched = bytearray(size)
        self.patterns: list[bytes] = []
        self._next_pattern = 0
        self.fill_left = DMA_FILL_BUDGET
        self.accesses = 0
        self.filled = 0

    # -- per input -------------------------------------------------------------------------

    def reset(self) -> None:
        """Zero RAM and forget what was touched, the patterns and the counters."""
        mapping = self.regions[0].mapping
        mapping[:] = _ZEROS[: self.size]
        self.touched[:] = _ZEROS[: self.size]
        self.patterns.clear()
        self._next_pattern = 0
        self.fill_left = DMA_FILL_BUDGET
        self.accesses = 0
        self.filled = 0

    def raw_read(self, gpa: int, length: int) -> bytes:
        """Read without filling or counting (for oracles)."""
        return super().read(gpa, length)

    def guest_write(self, gpa: int, data: bytes) -> None:
        """The guest itself writes its RAM (a MEM_WRITE operation)."""
        super().write(gpa, data)
        self._mark(gpa, len(data))

    def prefill(self, gpa: int, length: int) -> None:
        """Fill the untouched part of a range as a device read would (used before the C
        data path reads ring areas it found in the transport's registers)."""
        if self.contains(gpa, length):
            self._fill(gpa, length)
            self._mark(gpa, length)

    # -- hooks -----------------------------------------------------------------------------

    def _mark(self, gpa: int, length: int) -> None:
        start = gpa - RAM_BASE
        if start >= 0 and length > 0 and start + length <= self.size:
            self.touched[start : start + length] = _ONES[:length]

    def _fill(self, gpa: int, length: int) -> None:
        if not self.patterns or self.fill_left <= 0 or length <= 0:
            return
        start = gpa - RAM_BASE
        end = start + length
        if start < 0 or end > self.size:
            return
        touched = self.touched
        mapping = self.regions[0].mapping
        i = touched.find(0, start, end)
        while i != -1 and self.fill_left > 0:
            j = touched.find(1, i, end)
            if j == -1:
                j = end
            n = min(j - i, self.fill_left)
            pattern = self.patterns[self._next_pattern % len(self.patterns)]
            self._next_pattern += 1
            mapping[i : i + n] = (pattern * (n // len(pattern) + 1))[:n]
            touched[i : i + n] = _ONES[:n]
            self.fill_left -= n
            self.filled += n
            i = touched.find(0, j, end)

    def _count(self) -> None:
        self.accesses += 1
        if self.accesses > MAX_RAM_ACCESSES:
            raise _Stop(
                OracleViolation(
                    "budget", f"more than {MAX_RAM_ACCESSES} guest RAM accesses in one input"
                )
            )

    def _device_read(self, gpa: int, length: int) -> None:
        self._count()
        self._fill(gpa, length)

    def _device_write(self, gpa: int, length: int) -> None:
        self._count()
        self._mark(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        self._device_read(gpa, length)
        return super().read(gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        # A view may be read or written: fill first, then count it as written.
        self._device_read(gpa, length)
        result = super().view(gpa, length)
        self._mark(gpa, length)
        return result

    def read_u8(self, gpa: int) -> int:
        self._device_read(gpa, 1)
        return super().read_u8(gpa)

    def read_u16(self, gpa: int) -> int:
        self._device_read(gpa, 2)
        return super().read_u16(gpa)

    def read_u32(self, gpa: int) -> int:
        self._device_read(gpa, 4)
        return super().read_u32(gpa)

    def read_u64(self, gpa: int) -> int:
        self._device_read(gpa, 8)
        return super().read_u64(gpa)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        super().write(gpa, data)
        self._device_write(gpa, memoryview(data).nbytes)

    def write_u8(self, gpa: int, value: int) -> None:
        super().write_u8(gpa, value)
        self._device_write(gpa, 1)

    def write_u16(self, gpa: int, value: int) -> None:
        super().write_u16(gpa, value)
        self._device_write(gpa, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        super().write_u32(gpa, value)
        self._device_write(gpa, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        super().write_u64(gpa, value)
        self._device_write(gpa, 8)

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        super().fill(gpa, length, value)
        self._device_write(gpa, length)


@dataclass
class Region:
    """One guest-visible region of a device (a BAR, a port range): what READ and WRITE
    operations with this region index reach, at offsets inside ``size``."""

    name: str
    size: int
    read: Callable[[int, int], int]
    write: Callable[[int, int, int], None]


class Target:
    """A device under fuzzing: how to build it, reach it and check it.

    The constructor makes the per-process resources (RAM is given; temp files, sockets);
    :meth:`begin` builds a fresh device for one input and returns its regions (matching
    :attr:`layout`); :meth:`end` tears it down and runs end-of-input oracles; :meth:`close`
    releases the per-process resources.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    # Modules whose line coverage this target is measured by (the device model files).
    modules: ClassVar[tuple[str, ...]]
    # Other modules worth coverage feedback while fuzzing (not measured).
    support_modules: ClassVar[tuple[str, ...]] = ()
    # Names of the HOST events this target understands (HOST's event byte modulo this).
    host_events: ClassVar[tuple[str, ...]] = ()

    def __init__(self, memory: FuzzMemory) -> None:
        self.memory = memory
        self.layout: list[tuple[str, int]] = []  # (name, size) of each region

    def begin(self) -> list[Region]:
        """Build a fresh device for one input; its regions, in :attr:`layout` order."""
        raise NotImplementedError

    def config_read(self, offset: int, size: int) -> int:
        """A PCI configuration read (targets without config space read all-ones)."""
        return (1 << (8 * size)) - 1

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A PCI configuration write (ignored by targets without config space)."""

    def host(self, event: int, data: bytes) -> None:
        """Host-side event ``event`` (an index into :attr:`host_events`)."""

    def after_op(self) -> None:
        """Run what the host side would after a guest access (the I/O loop, a worker)."""

    def check(self) -> None:
        """Device invariants; raise :class:`OracleViolation` when one fails."""

    def end(self) -> None:
        """Tear the device down; end-of-input oracles (backend integrity)."""

    def close(self) -> None:
        """Release the per-process resources."""

    def seeds(self) -> list[list[Op]]:
        """Hand-written starting programs (a driver's init sequence and a request)."""
        return []


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


class Runner:
    """Runs inputs against one target, with the oracles above.

    ``deadline_s`` (replay only; fuzzing leaves it to libFuzzer) arms SIGALRM around each
    input. The fd count is taken after a first, empty input, so lazily opened resources
    of the target do not count as a leak.
    """

    def __init__(self, target: Target, *, deadline_s: float | None = None) -> None:
        self.target = target
        self.memory = target.memory
        self.deadline_s = deadline_s
        self.sizes = [size for _, size in target.layout]
        self.recent: list[int] = []
        self.inputs = 0
        self.run(b"")
        self.fd_baseline = open_fds()

    def decode(self, data: bytes) -> list[Op]:
        return fops.decode(data, self.sizes)

    def run(self, data: bytes) -> None:
        """Run one input; raises whatever the device raised or :class:`OracleViolation`."""
        self.run_ops(self.decode(data))

    def run_ops(self, program: Sequence[Op]) -> None:
        self.inputs += 1
        try:
            with self._deadline():
                self._run(program)
        except _Stop as stop:
            raise stop.violation from None
        if self.inputs > 1:
            fds = open_fds()
            if fds > self.fd_baseline:
                detail = f"{fds} open fds after the input, {self.fd_baseline} before"
                self.fd_baseline = fds  # report a leak once, not on every later input
                raise OracleViolation("fd-leak", detail)
            # Fewer: something unrelated (an earlier target, garbage) was closed meanwhile.
            self.fd_baseline = fds

    @contextlib.contextmanager
    def _deadline(self) -> Iterator[None]:
        if self.deadline_s is None:
            yield
            return

        def expired(signum: int, frame: FrameType | None) -> None:
            raise _Stop(
                OracleViolation("timeout", f"one input ran longer than {self.deadline_s} s")
            )

        old = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, self.deadline_s)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def _run(self, program: Sequence[Op]) -> None:
        target = self.target
        memory = self.memory
        memory.reset()
        self.recent.clear()
        regions = target.begin()
        try:
            if [(r.name, r.size) for r in regions] != target.layout:
                raise RuntimeError(f"{target.name}: regions differ from the declared layout")
            target.check()
            for op in program:
                self._execute(op, regions)
                target.after_op()
                target.check()
        finally:
            target.end()

    def _execute(self, op: Op, regions: list[Region]) -> None:
        kind = op.kind
        if kind is OpKind.READ:
            regions[op.region].read(op.offset, op.size)
        elif kind is OpKind.WRITE:
            self._remember(op.value, op.size)
            regions[op.region].write(op.offset, op.size, op.value)
        elif kind is OpKind.CONFIG_READ:
            self.target.config_read(op.offset, op.size)
        elif kind is OpKind.CONFIG_WRITE:
            self._remember(op.value, op.size)
            self.target.config_write(op.offset, op.size, op.value)
        elif kind is OpKind.MEM_WRITE:
            gpa = self._mem_address(op)
            room = RAM_BASE + self.memory.size - gpa
            if op.data and room > 0:
                self.memory.guest_write(gpa, op.data[:room])
        elif kind is OpKind.DMA_PATTERN:
            if op.data:
                self.memory.patterns.append(op.data)
        elif self.target.host_events:
            self.target.host(op.mode % len(self.target.host_events), op.data)

    def _remember(self, value: int, size: int) -> None:
        """Values the guest writes that look like RAM addresses: MEM_WRITE may use them."""
        if size < 4:
            return
        for candidate in (value & 0xFFFF_FFFF, value):
            if RAM_BASE <= candidate < RAM_BASE + self.memory.size:
                if candidate in self.recent:
                    self.recent.remove(candidate)
                self.recent.append(candidate)
                del self.recent[:-RECENT_ADDRESSES]
                return

    def _mem_address(self, op: Op) -> int:
        if op.mode & 1 and self.recent:
            base = self.recent[(op.mode >> 1) % len(self.recent)]
            return min(base + (op.offset & 0xFFFF), RAM_BASE + self.memory.size - 1)
        return RAM_BASE + op.offset % self.memory.size


def crash_signature(exc: BaseException) -> str:
    """A short, stable name for a crash: the oracle's kind, or the exception type and the
    innermost iovirt frame (file:function) it came from."""
    if isinstance(exc, OracleViolation):
        return f"oracle-{exc.kind}"
    where = "unknown"
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/iovirt/" in frame.filename and "/iovirt/fuzz/" not in frame.filename:
            where = f"{os.path.basename(frame.filename)}:{frame.name}"
            break
    return f"{type(exc).__name__}@{where}"


def format_crash(exc: BaseException) -> str:
    """The traceback text stored next to a reproducer."""
    return "".join(traceback.format_exception(exc))
