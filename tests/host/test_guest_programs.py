"""Tiny real-mode guest programs, started from the reset vector, on this host's KVM."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from iovirt.errors import GuestError
from iovirt.kvm.system import kvm_flavour
from iovirt.vm import VmExitReason

pytestmark = pytest.mark.hostkvm

# End the VM with a verdict through the debug-exit port.
EXIT = """
    mov $0x501, %dx
    mov ${code}, %al
    out %al, %dx
"""


def exit_with(code: int) -> str:
    return EXIT.format(code=code)


@pytest.mark.parametrize("irqchip", [False, True], ids=["userspace-hlt", "in-kernel-irqchip"])
def test_hello_through_uart_then_halt(make_guest: Any, irqchip: bool) -> None:
    # Without an in-kernel irqchip HLT exits to us; with it the vCPU sleeps in KVM and the
    # VM's halt poll finds it halted with interrupts off. Either way the guest has ended.
    guest = make_guest(
        """
        mov $0x3f8, %dx
        mov $msg, %si
    1:  cs lodsb
        test %al, %al
        jz 2f
        out %al, %dx
        jmp 1b
    2:  cli
        hlt
    msg: .asciz "hello"
        """,
        irqchip=irqchip,
    )
    result = guest.vm.run(timeout=20)
    assert result.reason is VmExitReason.HALT
    assert result.exit_status == 0
    assert bytes(guest.console.output) == b"hello"


def test_halt_with_interrupts_on_is_not_the_end(make_guest: Any) -> None:
    # HLT with IF=1 waits for an interrupt (here: none comes), so the VM must keep running
    # until the timeout, several halt polls later.
    guest = make_guest("sti\n 1: hlt\n jmp 1b")
    result = guest.vm.run(timeout=2.0)
    assert result.reason is VmExitReason.TIMEOUT


def test_two_vcpus_end_when_the_bsp_halts_and_the_ap_never_started(make_guest: Any) -> None:
    guest = make_guest("cli\n hlt", vcpus=2)
    result = guest.vm.run(timeout=20)
    assert result.reason is VmExitReason.HALT


def test_guest_reads_back_uart_registers(make_guest: Any) -> None:
    guest = make_guest(
        """
        xor %ax, %ax
        mov %ax, %es
        mov $0x500, %di
        mov $0x3fb, %dx; mov $0x83, %al; out %al, %dx   /* LCR: DLAB */
        mov $0x3f8, %dx; mov $0x0c, %al; out %al, %dx   /* DLL = 12 */
        mov $0x3f9, %dx; xor %al, %al;  out %al, %dx    /* DLM = 0 */
        mov $0x3f8, %dx; in %dx, %al; stosb             /* [0] DLL */
        mov $0x3fb, %dx; mov $0x03, %al; out %al, %dx   /* LCR: 8N1 */
        mov $0x3ff, %dx; mov $0x5a, %al; out %al, %dx   /* SCR */
        mov $0x3fc, %dx; mov $0x0b, %al; out %al, %dx   /* MCR: DTR RTS OUT2 */
        mov $0x3f9, %dx; mov $0x02, %al; out %al, %dx   /* IER: ETBEI */
        mov $0x3fb, %dx; in %dx, %al; stosb             /* [1] LCR */
        mov $0x3ff, %dx; in %dx, %al; stosb             /* [2] SCR */
        mov $0x3fa, %dx; in %dx, %al; stosb             /* [3] IIR: THRE pending */
        mov $0x3fa, %dx; in %dx, %al; stosb             /* [4] IIR: cleared by the read */
        mov $0x3fd, %dx; in %dx, %al; stosb             /* [5] LSR */
        mov $0x3fe, %dx; in %dx, %al; stosb             /* [6] MSR */
        mov $0x3f9, %dx; in %dx, %al; stosb             /* [7] IER */
        mov $0x3fc, %dx; in %dx, %al; stosb             /* [8] MCR */
        """
        + exit_with(0)
    )
    result = guest.vm.run(timeout=20)
    assert result.reason is VmExitReason.GUEST_EXIT and result.code == 0
    dll, lcr, scr, iir, iir_after, lsr, msr, ier, mcr = guest.vm.memory.read(0x500, 9)
    assert dll == 0x0C
    assert lcr == 0x03
    assert scr == 0x5A
    assert iir == 0x02  # THR empty, FIFOs off
    assert iir_after == 0x01  # reading IIR cleared the THRE indication
    assert lsr == 0x60  # THRE | TEMT
    assert msr == 0xB0  # DCD | DSR | CTS: a connected line
    assert ier == 0x02
    assert mcr == 0x0B
    assert guest.serial.baud_rate == 9600


def test_unclaimed_mmio_reads_all_ones_and_the_vm_goes_on(make_guest: Any) -> None:
    # 1 MiB of RAM: 0xffff:0x0110 is linear 0x100100, just past the end of RAM.
    guest = make_guest(
        """
        mov $0xffff, %ax
        mov %ax, %es
        mov %es:0x110, %eax
        movb $0x42, %es:0x120
        xor %bx, %bx
        mov %bx, %es
        mov %eax, %es:0x600
        """
        + exit_with(7),
        memory=1 << 20,
    )
    result = guest.vm.run(timeout=20)
    assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 7)
    assert guest.vm.memory.read_u32(0x600) == 0xFFFF_FFFF
    assert guest.vm.mmio.unclaimed_reads == 1
    assert guest.vm.mmio.unclaimed_writes == 1


class _Register:
    """An MMIO device with one 32-bit register, recording accesses."""

    def __init__(self) -> None:
        self.value = 0xCAFE_BABE
        self.accesses: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size, self.value))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))
        self.value = value


def test_claimed_mmio_reaches_the_device_at_its_offset(make_guest: Any) -> None:
    guest = make_guest(
        """
        mov $0xffff, %ax
        mov %ax, %es
        mov %es:0x20, %eax              /* linear 0x100010: device offset 0x10 */
        movl $0x12345678, %es:0x20
        xor %bx, %bx
        mov %bx, %es
        mov %eax, %es:0x600
        """
        + exit_with(0),
        memory=1 << 20,
    )
    device = _Register()
    guest.vm.mmio.register(0x10_0000, 0x1000, device, "register")
    result = guest.vm.run(timeout=20)
    assert result.reason is VmExitReason.GUEST_EXIT
    assert device.accesses == [("r", 0x10, 4, 0xCAFE_BABE), ("w", 0x10, 4, 0x1234_5678)]
    assert guest.vm.memory.read_u32(0x600) == 0xCAFE_BABE


def test_guest_ram_pattern_is_visible_to_the_host(make_guest: Any) -> None:
    guest = make_guest(
        """
        mov $0x2000, %ax
        mov %ax, %es
        xor %di, %di
        xor %cx, %cx
    1:  mov %cl, %al
        mov $7, %bl
        mul %bl
        add $3, %al
        stosb
        inc %cx
        cmp $4096, %cx
        jne 1b
        """
        + exit_with(0)
    )
    result = guest.vm.run(timeout=30)
    assert result.reason is VmExitReason.GUEST_EXIT
    expected = bytes((i * 7 + 3) & 0xFF for i in range(4096))
    assert guest.vm.memory.read(0x20000, 4096) == expected
    assert guest.vm.memory.read(0x20000 + 4096, 16) == bytes(16)


def test_serial_input_reaches_the_guest(make_guest: Any) -> None:
    # The guest polls LSR.DR, reads four bytes and echoes them upper-cased.
    guest = make_guest(
        """
        mov $4, %cx
    1:  mov $0x3fd, %dx
    2:  in %dx, %al
        test $0x01, %al
        jz 2b
        mov $0x3f8, %dx
        in %dx, %al
        sub $0x20, %al
        out %al, %dx
        loop 1b
        """
        + exit_with(0)
    )
    assert guest.serial.receive(b"ping") == 4
    result = guest.vm.run(timeout=20)
    assert result.reason is VmExitReason.GUEST_EXIT
    assert bytes(guest.console.output) == b"PING"


def test_uart_interrupt_reaches_the_guest_through_the_in_kernel_pic(make_guest: Any) -> None:
    # Program the master 8259 (vector base 8, only IRQ4 unmasked), point vector 0x0c at a
    # handler, enable the THR-empty interrupt with OUT2, then sleep in HLT. Only a real
    # interrupt through KVM_IRQ_LINE and the in-kernel PIC can reach the handler.
    guest = make_guest(
        """
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %ss
        mov $0x7000, %sp
        movw $isr, 0x30
        movw $0xf000, 0x32
        mov $0x11, %al; out %al, $0x20      /* ICW1: edge, cascade, ICW4 follows */
        mov $0x08, %al; out %al, $0x21      /* ICW2: vectors 0x08-0x0f */
        mov $0x04, %al; out %al, $0x21      /* ICW3: slave on IRQ2 */
        mov $0x01, %al; out %al, $0x21      /* ICW4: 8086 mode */
        mov $0xef, %al; out %al, $0x21      /* OCW1: only IRQ4 */
        mov $0xff, %al; out %al, $0xa1      /* slave: all masked */
        mov $0x3fc, %dx; mov $0x08, %al; out %al, %dx   /* MCR: OUT2 gates the IRQ */
        mov $0x3f9, %dx; mov $0x02, %al; out %al, %dx   /* IER: ETBEI */
        sti
    1:  hlt
        jmp 1b
    isr:
        mov $0x3fa, %dx
        in %dx, %al
        mov %al, 0x700
        mov $0x20, %al
        out %al, $0x20                      /* EOI */
        """
        + exit_with(0x33)
    )
    result = guest.vm.run(timeout=20)
    assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 0x33)
    assert guest.vm.memory.read_u8(0x700) == 0x02  # the handler saw IIR = THR empty


def test_triple_fault_ends_the_run_with_a_clear_error(make_guest: Any) -> None:
    # Protected mode with an empty IDT: #DE cannot be delivered -> #DF -> shutdown.
    guest = make_guest(
        """
        lgdtl %cs:gdtr
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $0x08, $0xf0000 + pm
        .code32
    pm: mov $0x10, %ax
        mov %ax, %ds
        lidt 0xf0000 + idt0
        xor %eax, %eax
        div %eax
        jmp .
        .code16
        .p2align 3
    gdt: .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
    gdtr: .word gdtr - gdt - 1
        .long 0xf0000 + gdt
    idt0: .word 0
        .long 0
        """
    )
    result = guest.vm.run(timeout=20)
    assert result.reason is VmExitReason.ERROR
    assert result.exit_status == 1
    assert isinstance(result.error, GuestError)
    assert "triple fault" in str(result.error)
    assert "rip=" in str(result.error)


@pytest.mark.skipif(
    kvm_flavour() != "pvm",
    reason="xrstor in real mode fails emulation only on PVM; VT-x/AMD-V raise #UD instead",
)
def test_emulation_failure_ends_the_run_with_a_clear_error(make_guest: Any) -> None:
    guest = make_guest("xor %bx, %bx\n xrstor (%bx)\n jmp .")
    result = guest.vm.run(timeout=20)
    assert result.reason is VmExitReason.ERROR
    assert isinstance(result.error, GuestError)
    assert "emulation failed" in str(result.error)


def test_timeout_stops_a_spinning_guest_and_joins_its_threads(make_guest: Any) -> None:
    guest = make_guest("jmp .")
    result = guest.vm.run(timeout=0.5)
    assert result.reason is VmExitReason.TIMEOUT
    assert result.exit_status == 1
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("vcpu"))


def test_kvm_run_releases_the_gil(make_guest: Any) -> None:
    # The guest spins without exits; a Python thread must keep running meanwhile.
    guest = make_guest("jmp .")
    counter = [0]
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            counter[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        result = guest.vm.run(timeout=1.0)
    finally:
        done.set()
        t.join()
    assert result.reason is VmExitReason.TIMEOUT
    assert counter[0] > 100_000


def test_two_vcpus_run_and_stop_cleanly(make_guest: Any) -> None:
    # The AP waits for INIT/SIPI inside KVM_RUN; stopping must kick it out too.
    guest = make_guest(
        """
        mov $0x3f8, %dx
        mov $'A', %al
        out %al, %dx
        """
        + exit_with(5),
        vcpus=2,
    )
    result = guest.vm.run(timeout=20)
    assert (result.reason, result.code) == (VmExitReason.GUEST_EXIT, 5)
    assert bytes(guest.console.output) == b"A"
    assert not any(t.name.startswith("vcpu") for t in threading.enumerate())
