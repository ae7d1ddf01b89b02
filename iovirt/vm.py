"""The ``Vm``: one KVM virtual machine with its RAM, buses, devices, vCPU threads and the
host I/O loop, and the one place that decides how and why it stops.

Threads: each vCPU runs KVM_RUN in its own thread (the GIL is released inside the call)
and dispatches port-I/O and MMIO exits to the buses. The thread that calls :meth:`Vm.run`
runs an asyncio loop (uvloop when available) for host I/O: char backends, later VNC and
vhost-user sockets, and SIGINT/SIGTERM. Whatever ends the VM (guest power-off, a fatal
vCPU exit, a signal, a timeout) goes through :meth:`Vm.stop`: the first reason wins, every
vCPU is kicked out of KVM_RUN and joined, backends are closed, and :meth:`Vm.run` returns
a :class:`VmExit` saying what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import signal
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iovirt.bus import Bus
from iovirt.errors import GuestError, IovirtError, KvmError, UserError
from iovirt.kvm import Kvm, KvmVcpu, KvmVm
from iovirt.kvm._ioctl import lib
from iovirt.kvm.vcpu import install_kick_handler
from iovirt.memory import PAGE_SIZE, GuestMemory
from iovirt.timer import TimerThread

if TYPE_CHECKING:
    from iovirt.backends.char import CharBackend
    from iovirt.bus.pci import PciRoot

log = logging.getLogger(__name__)

PIO_LIMIT = 0x1_0000
MMIO_LIMIT = 1 << 52

# RAM above this goes above 4 GiB, leaving the 32-bit hole for PCI BARs, the IOAPIC,
# the LAPIC and the firmware ROM.
LOW_RAM_LIMIT = 0xC000_0000
HIGH_RAM_BASE = 1 << 32

# The x86 reset vector is 16 bytes below 4 GiB; firmware is mapped to end there.
FIRMWARE_TOP = 1 << 32
# The legacy BIOS area just below 1 MiB, where firmware runs in real mode (shadowed in RAM).
LEGACY_BIOS_TOP = 0x10_0000
LEGACY_BIOS_MAX = 128 * 1024
FIRMWARE_MAX = 16 * 1024 * 1024

MIN_MEMORY = 1 * 1024 * 1024

# How often vCPUs are asked whether the guest has halted for good (seconds).
HALT_POLL_INTERVAL = 0.5
RFLAGS_IF = 1 << 9

# Exit payloads as they sit in the kvm_run page (struct kvm_run's io and mmio members).
_EXIT_REASON = struct.Struct("<I")
_EXIT_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_EXIT_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write

# How many device exceptions are logged in full before the log goes quiet.
_MAX_DEVICE_ERRORS_LOGGED = 16


class VmExitReason(enum.Enum):
    """Why :meth:`Vm.run` returned."""

    POWEROFF = "poweroff"  # the guest powered off (ACPI, system event, ...)
    RESET = "reset"  # the guest asked for a reset; iovirt ends the VM like kvmtool does
    HALT = "halt"  # every vCPU halted for good (interrupts off): halt, or power-off w/o ACPI
    GUEST_EXIT = "guest-exit"  # the guest wrote its verdict to the debug-exit port
    SIGNAL = "signal"  # SIGINT/SIGTERM on the host
    STOPPED = "stopped"  # Vm.stop() called by the host side (tests, control socket)
    TIMEOUT = "timeout"  # run(timeout=...) expired
    ERROR = "error"  # a vCPU stopped in a way it cannot go on from


@dataclass(frozen=True)
class VmExit:
    """What ended a run. ``code`` is the guest's verdict (GUEST_EXIT) or the signal number."""

    reason: VmExitReason
    code: int = 0
    error: IovirtError | None = None

    @property
    def exit_status(self) -> int:
        """The process exit status ``iovirt run`` uses for this outcome."""
        if self.reason is VmExitReason.GUEST_EXIT:
            return self.code
        if self.reason in (VmExitReason.ERROR, VmExitReason.TIMEOUT):
            return 1
        return 0


class KvmIrqLine:
    """An :class:`~iovirt.interrupt.Interrupt` that drives a GSI of the in-kernel irqchip."""

    def __init__(self, vm: KvmVm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        self._vm.irq_line(self.gsi, level)


class _NoIrqLine:
    """The line of a VM built without an in-kernel irqchip: there is nothing to drive."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        pass


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Guest RAM regions for ``size`` bytes: below the 32-bit hole, the rest above 4 GiB."""
    low = min(size, LOW_RAM_LIMIT)
    layout = [(0, low)]
    if size > low:
        layout.append((HIGH_RAM_BASE, size - low))
    return layout


class Vm:
    """A KVM VM. Build it, attach devices to :attr:`pio` / :attr:`mmio`, then :meth:`run`."""

    def __init__(
        self, memory: int, vcpus: int = 1, irqchip: bool = True, kvm_path: str = "/dev/kvm"
    ) -> None:
        if memory < MIN_MEMORY or memory % PAGE_SIZE:
            raise UserError(f"memory: {memory} bytes is not a page-aligned size of at least 1 MiB")
        if vcpus < 1:
            raise UserError(f"vcpus: {vcpus}: a VM needs at least one vCPU")
        self._closers: list[Callable[[], None]] = []
        self.kvm = Kvm(kvm_path)
        self._closers.append(self.kvm.close)
        try:
            max_vcpus = self.kvm.check_extension(lib.KVM_CAP_MAX_VCPUS) or 255
            if vcpus > max_vcpus:
                raise UserError(f"vcpus: {vcpus} is more than this KVM allows ({max_vcpus})")
            self.kvm_vm = KvmVm(self.kvm)
            self._closers.append(self.kvm_vm.close)
            if irqchip:
                self.kvm_vm.create_irqchip()
                self.kvm_vm.create_pit()
            self.memory = GuestMemory(ram_layout(memory))
            self._closers.append(self.memory.close)
            for region in self.memory.regions:
                self.kvm_vm.add_memory_slot(region.gpa, region.size, region.host_addr)
            self.pio = Bus("pio", PIO_LIMIT)
            self.mmio = Bus("mmio", MMIO_LIMIT)
            cpuid = self.kvm.supported_cpuid()
            self.vcpus: list[KvmVcpu] = []
            for i in range(vcpus):
                vcpu = self.kvm_vm.create_vcpu(i)
                self._closers.append(vcpu.close)
                vcpu.set_cpuid(cpuid)
                self.vcpus.append(vcpu)
        except BaseException:
            self.close()
            raise
        # Deadlines for device models (interrupt moderation); stopped before RAM goes.
        self.timers = TimerThread()
        self._closers.append(self.timers.close)
        self._char_backends: list[tuple[CharBackend, Callable[[bytes], object]]] = []
        self._services: list[
            tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]
        ] = []
        self._exit: VmExit | None = None
        self._exit_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped_event: asyncio.Event | None = None
        self._threads: list[threading.Thread] = []
        self._halted = 0
        self._stopped_polls: dict[int, int] = {}
        self.device_errors = 0
        self.pci: PciRoot | None = None  # set by the board wiring when it adds PCI
        # fd -> callback run on the host I/O loop when the fd is readable (see watch()).
        self._watches: dict[int, Callable[[], None]] = {}
        self._watch_lock = threading.Lock()

    # -- building ---------------------------------------------------------------------------

    def irq(self, gsi: int) -> KvmIrqLine | _NoIrqLine:
        """The interrupt line for an ISA/IOAPIC GSI."""
        if self.kvm_vm.has_irqchip:
            return KvmIrqLine(self.kvm_vm, gsi)
        return _NoIrqLine(gsi)

    def add_char_backend(self, backend: CharBackend, on_input: Callable[[bytes], object]) -> None:
        """Open ``backend`` on the host I/O loop when the VM runs; input goes to ``on_input``."""
        self._char_backends.append((backend, on_input))

    def add_service(
        self, start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``start()`` on the host I/O loop before the vCPUs start (a failure, e.g. a
        VNC port in use, ends :meth:`run` with that error before the guest runs) and
        ``stop()`` after they stopped. For host-side servers such as VNC."""
        self._services.append((start, stop))

    def add_closer(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` on :meth:`close`, before guest RAM is unmapped (closers run in
        reverse order of registration), so device workers stop while RAM is still there."""
        self._closers.append(closer)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the host I/O loop whenever ``fd`` is readable; the callback
        drains the fd. Thread-safe (device transports call it from vCPU threads); a watch
        added before :meth:`run` starts with the loop."""
        with self._watch_lock:
            self._watches[fd] = callback
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._add_reader, loop, fd)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (thread-safe; unknown fds are ignored)."""
        with self._watch_lock:
            known = self._watches.pop(fd, None) is not None
            loop = self._loop
        if known and loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.remove_reader, fd)

    def _add_reader(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        with self._watch_lock:
            callback = self._watches.get(fd)
        if callback is not None:  # not unwatched before the loop got to it
            loop.add_reader(fd, self._run_watch, loop, fd, callback)

    def _run_watch(
        self, loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[], None]
    ) -> None:
        with self._watch_lock:
            current = self._watches.get(fd)
        if current is not callback:
            # Unwatched (and maybe closed, its number reused) before the loop removed the
            # reader: never run a stale callback on whatever the fd number is now.
            loop.remove_reader(fd)
            return
        try:
            callback()
        except Exception:
            # A device callback failing must not take the host I/O loop down with it.
            self.device_errors += 1
            if self.device_errors <= _MAX_DEVICE_ERRORS_LOGGED:
                log.exception("device fd callback %r failed", callback)

    def load_firmware(self, image: bytes) -> None:
        """Map ``image`` read-only so that it ends at 4 GiB (the reset vector is its last
        16 bytes) and copy its last 128 KiB below 1 MiB, the legacy BIOS area real-mode
        firmware jumps to. vCPUs start at the reset vector, as after a hardware reset."""
        size = len(image)
        if size == 0 or size > FIRMWARE_MAX or size % PAGE_SIZE:
            raise UserError(
                f"firmware: {size} bytes; a firmware image must be a non-empty multiple of "
                f"4 KiB, at most {FIRMWARE_MAX >> 20} MiB"
            )
        rom = GuestMemory([(FIRMWARE_TOP - size, size)], name="iovirt-firmware")
        self._closers.append(rom.close)
        rom.write(FIRMWARE_TOP - size, image)
        region = rom.regions[0]
        self.kvm_vm.add_memory_slot(region.gpa, region.size, region.host_addr, readonly=True)
        shadow = image[-LEGACY_BIOS_MAX:]
        self.memory.write(LEGACY_BIOS_TOP - len(shadow), shadow)

    # -- running ----------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> VmExit:
        """Run the guest until something ends it; returns why. Call once."""
        install_kick_handler()
        loop = _new_event_loop()
        self._loop = loop
        try:
            return loop.run_until_complete(self._main(timeout))
        finally:
            self._loop = None
            loop.close()

    async def _main(self, timeout: float | None) -> VmExit:
        loop = asyncio.get_running_loop()
        self._stopped_event = asyncio.Event()
        opened: list[CharBackend] = []
        started: list[Callable[[], Awaitable[None]]] = []
        signals: list[int] = []
        try:
            for backend, on_input in self._char_backends:
                backend.open(loop, on_input)
                opened.append(backend)
            for start, stop in self._services:
                await start()
                started.append(stop)
            with self._watch_lock:
                watched = list(self._watches)
            for fd in watched:
                self._add_reader(loop, fd)
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self._on_signal, int(sig))
                    signals.append(int(sig))
            for vcpu in self.vcpus:
                t = threading.Thread(
                    target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.index}"
                )
                self._threads.append(t)
                t.start()
            if self._exit is not None:  # a vCPU may have stopped before we got here
                self._stopped_event.set()
            if self.kvm_vm.has_irqchip:
                loop.call_later(HALT_POLL_INTERVAL, self._poll_halted, loop)
            try:
                await asyncio.wait_for(self._stopped_event.wait(), timeout)
            except TimeoutError:
                self.stop(VmExitReason.TIMEOUT)
        finally:
            if self._exit is None:  # cancelled or failed while starting: still stop cleanly
                self.stop(VmExitReason.STOPPED)
            self._kick_all()
            for t in self._threads:
                await asyncio.to_thread(t.join)
            for signo in signals:
                loop.remove_signal_handler(signo)
            with self._watch_lock:
                watched = list(self._watches)
            for fd in watched:
                loop.remove_reader(fd)
            for stop in reversed(started):
                try:
                    await stop()
                except Exception:
                    log.exception("stopping service %r failed", stop)
            for backend in reversed(opened):
                try:
                    backend.close()
                except Exception:
                    log.exception("closing char backend %r failed", backend)
        assert self._exit is not None
        return self._exit

    def _poll_halted(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ask every vCPU to look at its own state (see :meth:`_check_halted`).

        With the in-kernel irqchip a halted vCPU sleeps inside KVM_RUN and never exits to
        us, so a guest that halts for good (Linux's ``poweroff`` and ``halt`` without ACPI
        end that way) would leave the VM hanging. A kick every HALT_POLL_INTERVAL costs one
        exit per vCPU and lets each thread check whether it can ever run again."""
        if self._exit is not None:
            return
        for vcpu in self.vcpus:
            vcpu.poll_requested = True
            vcpu.kick()
        loop.call_later(HALT_POLL_INTERVAL, self._poll_halted, loop)

    def _check_halted(self, vcpu: KvmVcpu) -> None:
        """Record whether ``vcpu`` is stopped for good; end the VM when all of them are.

        Stopped for good: halted with interrupts disabled (only an NMI, INIT or SMI could
        wake it, and nothing in this VM sends those once every vCPU is stopped), or an AP
        still waiting for its INIT/SIPI. Required on two polls in a row, so that a vCPU
        woken by another between two checks is never mistaken for a dead one."""
        state = vcpu.get_mp_state()
        stopped = state in (lib.KVM_MP_STATE_INIT_RECEIVED, lib.KVM_MP_STATE_UNINITIALIZED) or (
            state == lib.KVM_MP_STATE_HALTED and not vcpu.get_regs().rflags & RFLAGS_IF
        )
        with self._exit_lock:
            count = self._stopped_polls.get(vcpu.index, 0)
            self._stopped_polls[vcpu.index] = count + 1 if stopped else 0
            dead = all(n >= 2 for n in self._stopped_polls.values()) and len(
                self._stopped_polls
            ) == len(self.vcpus)
        if dead:
            log.info("every vCPU has halted with interrupts off; the guest has ended")
            self.stop(VmExitReason.HALT)

    def _on_signal(self, signo: int) -> None:
        log.info("terminating on signal %d", signo)
        self.stop(VmExitReason.SIGNAL, signo)

    def stop(self, reason: VmExitReason, code: int = 0, error: IovirtError | None = None) -> None:
        """End the run (thread-safe; the first call decides the reason)."""
        with self._exit_lock:
            if self._exit is not None:
                return
            self._exit = VmExit(reason, code, error)
        self._kick_all()
        loop, event = self._loop, self._stopped_event
        if loop is not None and event is not None:
            # RuntimeError: the loop is already closed, run() has returned
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()

    # -- the vCPU thread ----------------------------------------------------------------------

    def _vcpu_thread(self, vcpu: KvmVcpu) -> None:
        vcpu.thread_ident = threading.get_ident()
        try:
            self._vcpu_loop(vcpu)
        except IovirtError as e:
            self.stop(VmExitReason.ERROR, error=e)
        except BaseException as e:  # a bug in iovirt: still end the VM instead of hanging
            log.exception("vCPU %d thread failed", vcpu.index)
            self.stop(VmExitReason.ERROR, error=IovirtError(f"vCPU {vcpu.index}: {e!r}"))
        finally:
            vcpu.thread_ident = None

    def _vcpu_loop(self, vcpu: KvmVcpu) -> None:
        # The hot path: every port-I/O and MMIO exit passes here. The exit fields are read
        # with struct from the kvm_run page (offsets from cffi, i.e. from <linux/kvm.h>)
        # rather than through cffi attributes, and single byte-wide accesses, the common
        # case, skip the general loop; see docs/performance.md for what each step costs.
        page = vcpu.run_page
        reason_at, io_at, mmio_at = vcpu.exit_reason_offset, vcpu.io_offset, vcpu.mmio_offset
        unpack_reason = _EXIT_REASON.unpack_from
        unpack_io = _EXIT_IO.unpack_from
        unpack_mmio = _EXIT_MMIO.unpack_from
        kvm_run, fd = lib.iovirt_kvm_run, vcpu.fd
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        exit_io, exit_mmio = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO
        io_out = lib.KVM_EXIT_IO_OUT
        mmio_data_at = mmio_at + 8
        eintr, eagain = -errno.EINTR, -errno.EAGAIN
        while self._exit is None:
            ret = kvm_run(fd)
            if ret < 0:
                if ret not in (eintr, eagain):
                    raise KvmError("KVM_RUN", -ret, f"vCPU {vcpu.index}")
                # A kick. Clear immediate_exit before looking at _exit: a stop() that
                # comes after this line sets it again, so its kick cannot be lost.
                vcpu.run_struct.immediate_exit = 0
                if self._exit is None and vcpu.poll_requested:
                    vcpu.poll_requested = False
                    self._check_halted(vcpu)
                continue
            (reason,) = unpack_reason(page, reason_at)
            if reason == exit_io:
                direction, size, port, count, off = unpack_io(page, io_at)
                try:
                    if count == 1 and size == 1:
                        if direction == io_out:
                            pio_write(port, 1, page[off])
                        else:
                            page[off] = pio_read(port, 1)
                    elif direction == io_out:
                        for _ in range(count):
                            pio_write(port, size, int.from_bytes(page[off : off + size], "little"))
                            off += size
                    else:
                        for _ in range(count):
                            page[off : off + size] = pio_read(port, size).to_bytes(size, "little")
                            off += size
                except Exception:
                    self._device_error("port", port)
            elif reason == exit_mmio:
                addr, data, length, is_write = unpack_mmio(page, mmio_at)
                length = min(length, 8)  # the payload has room for 8 bytes, whatever len says
                try:
                    if is_write:
                        mmio_write(addr, length, int.from_bytes(data[:length], "little"))
                    else:
                        value = mmio_read(addr, length)
                        page[mmio_data_at : mmio_data_at + length] = value.to_bytes(
                            length, "little"
                        )
                except Exception:
                    self._device_error("MMIO", addr)
            else:
                self._other_exit(vcpu, reason)

    def _device_error(self, space: str, addr: int) -> None:
        """A device model raised: a bug in iovirt, never the guest's fault. Keep the VM
        running (the access is dropped), count it, and log the first few in full."""
        self.device_errors += 1
        if self.device_errors <= _MAX_DEVICE_ERRORS_LOGGED:
            log.exception("device model failed on %s access at %#x", space, addr)

    def _other_exit(self, vcpu: KvmVcpu, reason: int) -> None:
        """Every exit that is not device I/O: either stops the VM or is a no-op."""
        if reason == lib.KVM_EXIT_INTR:
            return
        if reason == lib.KVM_EXIT_HLT:
            # Only seen without an in-kernel irqchip, where nothing can wake the vCPU.
            with self._exit_lock:
                self._halted += 1
                all_halted = self._halted == len(self.vcpus)
            if all_halted:
                self.stop(VmExitReason.HALT)
            else:
                while self._exit is None:
                    time.sleep(0.01)
            return
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = vcpu.system_event.type
            if kind == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                self.stop(VmExitReason.POWEROFF)
            elif kind == lib.KVM_SYSTEM_EVENT_RESET:
                self.stop(VmExitReason.RESET)
            else:
                self.stop(
                    VmExitReason.ERROR,
                    error=GuestError(vcpu.index, f"guest crashed (system event {kind})"),
                )
            return
        if reason == lib.KVM_EXIT_SHUTDOWN:
            raise GuestError(vcpu.index, "triple fault (KVM_EXIT_SHUTDOWN); " + _cpu_state(vcpu))
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            sub = vcpu.internal.suberror
            what = {
                lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
                lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
            }.get(sub, f"internal error, suberror {sub}")
            raise GuestError(vcpu.index, f"KVM {what}; " + _cpu_state(vcpu))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            hw = vcpu.fail_entry.hardware_entry_failure_reason
            raise GuestError(
                vcpu.index, f"VM entry failed (hardware reason {hw:#x}); " + _cpu_state(vcpu)
            )
        raise GuestError(vcpu.index, f"unhandled KVM exit reason {reason}; " + _cpu_state(vcpu))

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release every KVM and memory resource (after run() or instead of it). Idempotent."""
        if any(t.is_alive() for t in self._threads):
            self.stop(VmExitReason.STOPPED)
            for t in self._threads:
                t.join()
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:
                log.exception("closing %r failed", closer)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cpu_state(vcpu: KvmVcpu) -> str:
    """The registers that locate a failure, for error messages."""
    try:
        regs: Any = vcpu.get_regs()
        sregs: Any = vcpu.get_sregs()
    except KvmError:
        return "registers unavailable"
    return (
        f"cs={sregs.cs.selector:#x} (base {sregs.cs.base:#x}) rip={regs.rip:#x} "
        f"rsp={regs.rsp:#x} rflags={regs.rflags:#x} cr0={sregs.cr0:#x}"
    )


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
