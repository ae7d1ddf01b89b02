"""Host-KVM tier: tiny guest programs on this machine's /dev/kvm.

There is no skip here: a machine without a usable /dev/kvm fails these tests with the
one-line resource error iovirt gives users, so CI cannot pass with the tier missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from iovirt.backends.char import BufferBackend
from iovirt.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from iovirt.devices.serial import Serial16550A
from iovirt.testing.asm import firmware
from iovirt.vm import Vm, VmExitReason

COM1 = 0x3F8


@dataclass
class Guest:
    """A Vm wired like the default board: COM1 into a BufferBackend, debug-exit port."""

    vm: Vm
    console: BufferBackend
    serial: Serial16550A


@pytest.fixture
def make_guest() -> Iterator[object]:
    made: list[Vm] = []

    def make(body: str, memory: int = 2 << 20, irqchip: bool = True, vcpus: int = 1) -> Guest:
        vm = Vm(memory, vcpus=vcpus, irqchip=irqchip)
        made.append(vm)
        console = BufferBackend()
        serial = Serial16550A(vm.irq(4), console)
        vm.pio.register(COM1, 8, serial, "serial0")
        vm.add_char_backend(console, serial.receive)
        exit_port = DebugExit(lambda code: vm.stop(VmExitReason.GUEST_EXIT, code))
        vm.pio.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, exit_port, "debug-exit")
        vm.load_firmware(firmware(body))
        return Guest(vm, console, serial)

    yield make
    for vm in made:
        vm.close()
