"""Tests of :class:`iovirt.kvm.platform.KvmPlatform` and :meth:`Vm.watch` on this
machine's /dev/kvm.

MSI vectors: GSIs handed out and taken back, routes KVM accepts, the irqfd bound exactly
while the vector can deliver (observed through KVM itself: a second KVM_IRQFD on an eventfd
that already is an irqfd fails with EBUSY), the pending bit while masked, and a real guest
receiving the pending interrupt when it unmasks. ioeventfds on MMIO, counted for a real
guest's writes. fd watches on the host I/O loop during ``vm.run``, and never a stale one.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from iovirt.errors import KvmError, ResourceError
from iovirt.kvm.platform import FIRST_MSI_GSI, MAX_MSI_GSI, KvmMsiVector, KvmPlatform
from iovirt.vm import Vm, VmExitReason

pytestmark = pytest.mark.hostkvm

MSI_ADDRESS = 0xFEE0_0000  # destination APIC ID 0, physical mode
MSI_VECTOR = 0x40
SPARE_GSI = 30  # an MSI-range GSI the platform has not handed out in these tests
EXIT = "mov $0x501, %dx\n mov ${code}, %al\n out %al, %dx\n"
READY_PORT = 0x610

# Both 8259s fully masked (the IOAPIC's pins start masked, the LAPIC timer is off), then
# sleep with interrupts on: the vCPU waits in KVM_RUN and nothing can wake it.
SLEEP_FOREVER = """
    mov $0xff, %al; out %al, $0x21; out %al, $0xa1
    sti
1:  hlt
    jmp 1b
"""

# Real mode with a stack; the LAPIC relocated to 0x100000 (0xffff:0x0010, just past 1 MiB
# of RAM) and software-enabled with the handler for MSI_VECTOR at label `isr`.
MSI_GUEST = f"""
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    mov $0x1b, %ecx
    rdmsr
    and $0xfff, %eax
    or $0x100000, %eax
    xor %edx, %edx
    wrmsr
    mov $0xffff, %ax
    mov %ax, %es
    movl $0x1ff, %es:0x100
    movw $isr, {4 * MSI_VECTOR}
    movw $0xf000, {4 * MSI_VECTOR + 2}
    sti
    mov ${READY_PORT}, %dx
    out %al, %dx
1:  hlt
    jmp 1b
isr:
    movl $0, %es:0xc0
""" + EXIT.format(code=0x66)


class _Port:
    """A port whose write runs ``action`` on the vCPU thread."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.action()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def vm() -> Iterator[Vm]:
    machine = Vm(2 << 20)
    yield machine
    machine.close()


@pytest.fixture
def platform(vm: Vm) -> Iterator[KvmPlatform]:
    platform = KvmPlatform(vm)
    vectors: list[KvmMsiVector] = []
    real_msi_vector = platform.msi_vector

    def tracked() -> KvmMsiVector:
        vector = real_msi_vector()
        vectors.append(vector)
        return vector

    platform.msi_vector = tracked  # type: ignore[method-assign]
    yield platform
    for vector in vectors:  # before the VM goes, so routes and irqfds are released
        vector.close()


def is_bound(vm: Vm, fd: int) -> bool:
    """Whether ``fd`` is an irqfd of ``vm``: KVM refuses a second one with EBUSY."""
    try:
        vm.kvm_vm.irqfd(fd, SPARE_GSI)
    except KvmError as e:
        assert e.errno == errno.EBUSY, e
        return True
    vm.kvm_vm.irqfd_remove(fd, SPARE_GSI)
    return False


# -- MSI vectors ----------------------------------------------------------------------------


def test_vectors_get_distinct_gsis_past_the_ioapic(platform: KvmPlatform) -> None:
    vectors = [platform.msi_vector() for _ in range(5)]
    gsis = [v.gsi for v in vectors]
    assert len(set(gsis)) == 5
    assert all(FIRST_MSI_GSI <= gsi < MAX_MSI_GSI for gsi in gsis)
    assert FIRST_MSI_GSI == 24  # GSIs 0-23 stay the IOAPIC's
    assert len({v.eventfd for v in vectors}) == 5


def test_close_gives_the_gsi_and_the_eventfd_back(platform: KvmPlatform) -> None:
    kept = platform.msi_vector()
    vector = platform.msi_vector()
    gsi, fd = vector.gsi, vector.eventfd
    vector.set_message(MSI_ADDRESS, MSI_VECTOR)
    vector.set_masked(False)
    vector.close()
    vector.close()  # idempotent
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    again = platform.msi_vector()
    assert again.gsi == gsi  # reused, not leaked
    assert again.gsi != kept.gsi
    # The new vector starts clean: masked, unbound, nothing pending.
    assert not is_bound(platform.vm, again.eventfd)
    assert not again.pending


def test_gsis_are_not_exhausted_by_reuse(platform: KvmPlatform) -> None:
    for _ in range(2 * (MAX_MSI_GSI - FIRST_MSI_GSI)):
        platform.msi_vector().close()
    assert FIRST_MSI_GSI <= platform.msi_vector().gsi < MAX_MSI_GSI


def test_every_gsi_can_be_handed_out_once_then_a_resource_error(platform: KvmPlatform) -> None:
    count = MAX_MSI_GSI - FIRST_MSI_GSI
    vectors = [platform.msi_vector() for _ in range(count)]
    assert sorted(v.gsi for v in vectors) == list(range(FIRST_MSI_GSI, MAX_MSI_GSI))
    with pytest.raises(ResourceError) as info:
        platform.msi_vector()
    assert "MSI vectors" in str(info.value)
    vectors[7].close()
    assert platform.msi_vector().gsi == vectors[7].gsi


def test_a_vector_that_fails_to_build_gives_its_gsi_back(
    platform: KvmPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_more_fds(*args: Any) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "eventfd", no_more_fds)
    with pytest.raises(OSError):
        platform.msi_vector()
    monkeypatch.undo()
    gsis = {platform.msi_vector().gsi for _ in range(MAX_MSI_GSI - FIRST_MSI_GSI)}
    assert len(gsis) == MAX_MSI_GSI - FIRST_MSI_GSI  # none lost to the failure


def test_set_message_installs_a_route_kvm_accepts(platform: KvmPlatform) -> None:
    vectors = [platform.msi_vector() for _ in range(3)]
    for i, vector in enumerate(vectors):
        vector.set_message(MSI_ADDRESS, MSI_VECTOR + i)  # KVM_SET_GSI_ROUTING must succeed
    vectors[1].set_message(MSI_ADDRESS | 0x1000, MSI_VECTOR)  # reprogrammed
    vectors[1].close()  # and its route removed again
    vectors[0].set_message(MSI_ADDRESS, MSI_VECTOR + 7)


def test_irqfd_is_bound_only_while_the_vector_can_deliver(platform: KvmPlatform) -> None:
    vm = platform.vm
    vector = platform.msi_vector()
    assert not is_bound(vm, vector.eventfd)  # new: masked, no message
    vector.set_masked(False)
    assert not is_bound(vm, vector.eventfd)  # unmasked but no message to send
    vector.set_message(MSI_ADDRESS, MSI_VECTOR)
    assert is_bound(vm, vector.eventfd)  # now KVM delivers without us
    vector.set_message(MSI_ADDRESS, MSI_VECTOR + 1)
    assert is_bound(vm, vector.eventfd)  # a new message keeps the irqfd
    vector.set_masked(True)
    assert not is_bound(vm, vector.eventfd)
    vector.set_masked(False)
    assert is_bound(vm, vector.eventfd)


def test_signal_while_masked_is_pending_until_unmask(platform: KvmPlatform) -> None:
    vector = platform.msi_vector()
    vector.set_message(MSI_ADDRESS, MSI_VECTOR)
    assert not vector.pending
    os.eventfd_write(vector.eventfd, 1)
    assert vector.pending
    assert vector.pending  # reading the bit does not clear it
    vector.set_masked(False)
    assert not vector.pending  # handed to KVM on unmask
    assert is_bound(platform.vm, vector.eventfd)
    vector.set_masked(True)
    assert not vector.pending
    os.eventfd_write(vector.eventfd, 1)
    assert vector.pending


def test_unmask_without_message_keeps_it_pending(platform: KvmPlatform) -> None:
    vector = platform.msi_vector()
    os.eventfd_write(vector.eventfd, 1)
    vector.set_masked(False)
    assert vector.pending  # nowhere to deliver yet
    vector.set_message(MSI_ADDRESS, MSI_VECTOR)
    assert not vector.pending


def test_guest_gets_the_interrupt_that_was_pending_when_it_unmasks(
    make_guest: Any,
) -> None:
    guest = make_guest(MSI_GUEST, memory=1 << 20)
    vm: Vm = guest.vm
    platform = KvmPlatform(vm)
    vector = platform.msi_vector()
    try:
        vector.set_message(MSI_ADDRESS, MSI_VECTOR)
        os.eventfd_write(vector.eventfd, 1)  # a device signals while masked
        states: list[bool] = []

        def guest_ready() -> None:
            states.append(vector.pending)
            vector.set_masked(False)  # the guest unmasks its MSI-X entry
            states.append(vector.pending)

        vm.pio.register(READY_PORT, 1, _Port(guest_ready), "ready")
        result = vm.run(timeout=20)
        assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x66), result
        assert states == [True, False]
    finally:
        vector.close()


def test_signal_on_an_unmasked_vector_reaches_the_guest(make_guest: Any) -> None:
    guest = make_guest(MSI_GUEST, memory=1 << 20)
    vm: Vm = guest.vm
    vector = KvmPlatform(vm).msi_vector()
    try:
        vector.set_message(MSI_ADDRESS, MSI_VECTOR)
        vector.set_masked(False)
        # What a C worker does: one write(2), no Python in between.
        vm.pio.register(READY_PORT, 1, _Port(lambda: os.eventfd_write(vector.eventfd, 1)), "r")
        result = vm.run(timeout=20)
        assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x66), result
        assert not vector.pending
    finally:
        vector.close()


# -- ioeventfds -------------------------------------------------------------------------------


MMIO_NOTIFY = 0x10_0010  # past 1 MiB of RAM: MMIO, reachable from real mode as 0xffff:0x20


def test_add_and_remove_ioeventfd(platform: KvmPlatform) -> None:
    fd = _eventfd()
    try:
        platform.add_ioeventfd(fd, 0xD000_0000, 2, None)
        platform.add_ioeventfd(fd, 0xD000_0004, 4, 7)
        with pytest.raises(KvmError) as info:  # the same registration twice
            platform.add_ioeventfd(fd, 0xD000_0000, 2, None)
        assert info.value.errno == errno.EEXIST
        platform.remove_ioeventfd(fd, 0xD000_0000, 2, None)
        platform.remove_ioeventfd(fd, 0xD000_0004, 4, 7)
        with pytest.raises(KvmError):  # gone
            platform.remove_ioeventfd(fd, 0xD000_0000, 2, None)
        platform.add_ioeventfd(fd, 0xD000_0000, 2, None)  # and can come back
        platform.remove_ioeventfd(fd, 0xD000_0000, 2, None)
    finally:
        os.close(fd)


def test_ioeventfd_counts_guest_mmio_writes(make_guest: Any) -> None:
    guest = make_guest(
        """
        mov $0xffff, %ax
        mov %ax, %es
        mov $6, %cx
    1:  movw $1, %es:0x20
        loop 1b
        """
        + EXIT.format(code=0),
        memory=1 << 20,
    )
    vm: Vm = guest.vm
    platform = KvmPlatform(vm)
    fd = _eventfd()
    try:
        platform.add_ioeventfd(fd, MMIO_NOTIFY, 2, None)
        result = vm.run(timeout=20)
        assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0), result
        assert _drain(fd) == 6
        assert vm.mmio.unclaimed_writes == 0  # none came out to Python
        platform.remove_ioeventfd(fd, MMIO_NOTIFY, 2, None)
    finally:
        os.close(fd)


# -- Vm.watch -----------------------------------------------------------------------------


@pytest.fixture
def sleeper(make_guest: Any) -> Vm:
    vm: Vm = make_guest(SLEEP_FOREVER).vm
    return vm


def _later(action: Callable[[], None], delay: float = 0.05) -> threading.Timer:
    timer = threading.Timer(delay, action)
    timer.start()
    return timer


def test_watch_added_before_run_fires_on_the_loop(sleeper: Vm) -> None:
    fd = _eventfd()
    calls: list[tuple[int, bool]] = []

    def readable() -> None:
        calls.append((_drain(fd), threading.current_thread() is threading.main_thread()))
        sleeper.stop(VmExitReason.STOPPED)

    try:
        sleeper.watch(fd, readable)
        os.eventfd_write(fd, 3)
        result = sleeper.run(timeout=5)
        assert result.reason is VmExitReason.STOPPED
        assert calls == [(3, True)]  # on the thread running the loop, the fd drained
    finally:
        sleeper.unwatch(fd)
        os.close(fd)


def test_watch_added_from_another_thread_during_run(sleeper: Vm) -> None:
    fd = _eventfd()
    calls: list[int] = []

    def readable() -> None:
        calls.append(_drain(fd))
        if len(calls) == 2:
            sleeper.stop(VmExitReason.STOPPED)

    def from_a_vcpu_like_thread() -> None:
        sleeper.watch(fd, readable)
        os.eventfd_write(fd, 1)
        _later(lambda: os.eventfd_write(fd, 1))  # a second signal, after the first drain

    timer = _later(from_a_vcpu_like_thread)
    try:
        result = sleeper.run(timeout=5)
        assert result.reason is VmExitReason.STOPPED
        assert calls == [1, 1]
    finally:
        timer.join()
        sleeper.unwatch(fd)
        os.close(fd)


def test_unwatched_fd_is_not_called(sleeper: Vm) -> None:
    fd = _eventfd()
    calls: list[str] = []
    try:
        sleeper.watch(fd, lambda: calls.append("stale"))

        def unwatch_then_signal() -> None:
            sleeper.unwatch(fd)
            os.eventfd_write(fd, 1)

        timer = _later(unwatch_then_signal)
        result = sleeper.run(timeout=0.3)
        timer.join()
        assert result.reason is VmExitReason.TIMEOUT
        assert calls == []
        assert _drain(fd) == 1  # nobody drained it
    finally:
        os.close(fd)


def test_new_watch_on_a_reused_fd_number_replaces_the_old(sleeper: Vm) -> None:
    """A device closes its fd and another opens one with the same number: only the new
    callback may run."""
    first = _eventfd()
    calls: list[str] = []
    second = -1

    def stale() -> None:
        calls.append("stale")

    def fresh() -> None:
        calls.append(f"fresh {_drain(second)}")
        sleeper.stop(VmExitReason.STOPPED)

    def swap() -> None:
        nonlocal second
        sleeper.unwatch(first)
        os.close(first)
        second = _eventfd()
        sleeper.watch(second, fresh)
        os.eventfd_write(second, 1)

    sleeper.watch(first, stale)
    timer = _later(swap)
    try:
        result = sleeper.run(timeout=5)
        timer.join()
        assert result.reason is VmExitReason.STOPPED
        assert calls == ["fresh 1"]
    finally:
        if second >= 0:
            sleeper.unwatch(second)
            os.close(second)


def test_watch_unwatched_in_the_same_loop_pass_is_not_called(sleeper: Vm) -> None:
    """Two fds readable at once, each callback unwatching the other: the loop already has
    both readers due, and the second must see that it is stale."""
    fds = [_eventfd(), _eventfd()]
    calls: list[int] = []

    def callback(i: int) -> Callable[[], None]:
        def readable() -> None:
            calls.append(i)
            _drain(fds[i])
            sleeper.unwatch(fds[1 - i])
            sleeper.stop(VmExitReason.STOPPED)

        return readable

    try:
        for i, fd in enumerate(fds):
            sleeper.watch(fd, callback(i))
            os.eventfd_write(fd, 1)
        result = sleeper.run(timeout=5)
        assert result.reason is VmExitReason.STOPPED
        assert len(calls) == 1, calls
        assert _drain(fds[1 - calls[0]]) == 1  # the other one was never run
    finally:
        for fd in fds:
            sleeper.unwatch(fd)
            os.close(fd)


def test_a_failing_callback_does_not_end_the_loop(sleeper: Vm) -> None:
    bad, good = _eventfd(), _eventfd()

    def failing() -> None:
        _drain(bad)
        raise RuntimeError("device bug")

    def stop() -> None:
        _drain(good)
        sleeper.stop(VmExitReason.STOPPED)

    try:
        sleeper.watch(bad, failing)
        os.eventfd_write(bad, 1)

        def watch_good() -> None:
            sleeper.watch(good, stop)
            os.eventfd_write(good, 1)

        _later(watch_good)
        result = sleeper.run(timeout=5)
        assert result.reason is VmExitReason.STOPPED
        assert sleeper.device_errors == 1
    finally:
        for fd in (bad, good):
            sleeper.unwatch(fd)
            os.close(fd)
