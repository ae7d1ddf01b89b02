"""ioeventfd, irqfd, GSI/MSI routing and resource cleanup, exercised by real guests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iovirt.vm import Vm, VmExitReason

pytestmark = pytest.mark.hostkvm

EXIT = "mov $0x501, %dx\n mov ${code}, %al\n out %al, %dx\n"

# Program the master 8259 for vectors 0x08-0x0f with only IRQ `irq` unmasked.
PIC_SETUP = """
    mov $0x11, %al; out %al, $0x20
    mov $0x08, %al; out %al, $0x21
    mov $0x04, %al; out %al, $0x21
    mov $0x01, %al; out %al, $0x21
    mov ${mask}, %al; out %al, $0x21
    mov $0xff, %al; out %al, $0xa1
"""

REAL_MODE_SETUP = """
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
"""

READY_PORT = 0x610

# Enable interrupts, tell the host (through READY_PORT) that the guest now waits, and
# sleep; the code that follows is the interrupt handler, at label `isr`.
WAIT_FOR_INTERRUPT = f"""
    sti
    mov ${READY_PORT}, %dx
    out %al, %dx
1:  hlt
    jmp 1b
isr:
"""


class _Signal:
    """A port whose write runs ``action`` (lets the guest say 'I am waiting now')."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.action()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def test_ioeventfd_counts_guest_writes_without_exits(make_guest: Any) -> None:
    guest = make_guest(
        """
        mov $0x600, %dx
        mov $10, %cx
    1:  out %ax, %dx
        loop 1b
        """
        + EXIT.format(code=0)
    )
    efd = _eventfd()
    try:
        guest.vm.kvm_vm.ioeventfd(efd, 0x600, 2, pio=True)
        result = guest.vm.run(timeout=20)
        assert result.reason is VmExitReason.GUEST_EXIT
        assert os.eventfd_read(efd) == 10
        assert guest.vm.pio.unclaimed_writes == 0  # KVM consumed the writes in-kernel
    finally:
        os.close(efd)


def test_ioeventfd_datamatch_only_fires_on_the_value(make_guest: Any) -> None:
    guest = make_guest(
        """
        mov $0x600, %dx
        mov $1, %ax; out %ax, %dx
        mov $2, %ax; out %ax, %dx
        mov $2, %ax; out %ax, %dx
        """
        + EXIT.format(code=0)
    )
    efd = _eventfd()
    try:
        guest.vm.kvm_vm.ioeventfd(efd, 0x600, 2, pio=True, datamatch=2)
        guest.vm.run(timeout=20)
        assert os.eventfd_read(efd) == 2
        assert guest.vm.pio.unclaimed_writes == 1  # the non-matching write came to us
    finally:
        os.close(efd)


def test_irqfd_injects_an_isa_interrupt(make_guest: Any) -> None:
    guest = make_guest(
        REAL_MODE_SETUP
        + """
        movw $isr, 0x34               /* vector 0x0d = IRQ5 */
        movw $0xf000, 0x36
        """
        + PIC_SETUP.format(mask=0xDF)
        + WAIT_FOR_INTERRUPT
        + EXIT.format(code=0x55)
    )
    efd = _eventfd()
    try:
        guest.vm.kvm_vm.irqfd(efd, 5)
        guest.vm.pio.register(READY_PORT, 1, _Signal(lambda: os.eventfd_write(efd, 1)), "ready")
        result = guest.vm.run(timeout=20)
        assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x55)
    finally:
        guest.vm.kvm_vm.irqfd_remove(efd, 5)
        os.close(efd)


# Relocate the LAPIC to 0x100000 (just past 1 MiB of RAM, reachable from real mode as
# 0xffff:0x0010) and software-enable it, so an MSI can be delivered to vector 0x40.
LAPIC_SETUP = """
    mov $0x1b, %ecx                  /* IA32_APIC_BASE */
    rdmsr
    and $0xfff, %eax
    or $0x100000, %eax
    xor %edx, %edx
    wrmsr
    mov $0xffff, %ax
    mov %ax, %es
    movl $0x1ff, %es:0x100           /* SVR (0xf0): APIC enabled, spurious vector 0xff */
    xor %ax, %ax
    mov %ax, %ds
    movw $isr, 0x100                 /* vector 0x40 */
    movw $0xf000, 0x102
"""

MSI_ADDRESS = 0xFEE0_0000  # destination APIC ID 0, physical mode
MSI_VECTOR = 0x40
MSI_GSI = 24  # the first GSI past the IOAPIC's pins


def _msi_guest(make_guest: Any) -> Any:
    return make_guest(
        REAL_MODE_SETUP
        + LAPIC_SETUP
        + WAIT_FOR_INTERRUPT
        + """
        movl $0, %es:0xc0            /* EOI (0xb0) */
        """
        + EXIT.format(code=0x66),
        memory=1 << 20,
    )


def test_msi_route_and_irqfd_deliver_to_the_lapic(make_guest: Any) -> None:
    guest = _msi_guest(make_guest)
    efd = _eventfd()
    try:
        guest.vm.kvm_vm.set_msi_route(MSI_GSI, MSI_ADDRESS, MSI_VECTOR)
        guest.vm.kvm_vm.irqfd(efd, MSI_GSI)
        guest.vm.pio.register(READY_PORT, 1, _Signal(lambda: os.eventfd_write(efd, 1)), "ready")
        result = guest.vm.run(timeout=20)
        assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x66)
    finally:
        os.close(efd)


def test_signal_msi_delivers_directly(make_guest: Any) -> None:
    guest = _msi_guest(make_guest)
    delivered: list[int] = []

    def fire() -> None:
        delivered.append(guest.vm.kvm_vm.signal_msi(MSI_ADDRESS, MSI_VECTOR))

    guest.vm.pio.register(READY_PORT, 1, _Signal(fire), "ready")
    result = guest.vm.run(timeout=20)
    assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x66)
    assert delivered == [1]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _iovirt_mappings() -> int:
    return Path("/proc/self/maps").read_text().count("memfd:iovirt")


def test_close_releases_every_fd_and_mapping() -> None:
    before = _open_fds()
    maps_before = _iovirt_mappings()
    vm = Vm(4 << 20, vcpus=2)
    assert _open_fds() != before
    vm.close()
    vm.close()  # idempotent
    assert _open_fds() == before
    assert _iovirt_mappings() == maps_before
