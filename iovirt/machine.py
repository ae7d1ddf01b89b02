"""Build a :class:`~iovirt.vm.Vm` from a validated config: the board wiring.

This is where config names become objects: the serial port at COM1 with the char backend
the config names, the debug-exit port when asked for, the firmware image. Device models
and backends know nothing of the config; only this module does.
"""

from __future__ import annotations

from iovirt.backends.char import (
    CharBackend,
    FileBackend,
    PtyBackend,
    StdioBackend,
    UnixSocketBackend,
)
from iovirt.config import CharBackendConfig, FileChar, PtyChar, SocketChar, StdioChar, VmConfig
from iovirt.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from iovirt.devices.serial import Serial16550A
from iovirt.errors import ConfigError
from iovirt.vm import Vm, VmExitReason

COM1_PORT = 0x3F8
COM1_PORTS = 8
COM1_IRQ = 4


class _TeeOutput:
    """Guest console output to the configured backend and to the console log file."""

    def __init__(self, *outputs: CharBackend) -> None:
        self._outputs = outputs

    def write(self, data: bytes) -> None:
        for out in self._outputs:
            out.write(data)


def _ignore_input(data: bytes) -> None:
    """Input from an output-only sink (the console log) goes nowhere."""


def char_backend(config: CharBackendConfig, vm: Vm) -> CharBackend | None:
    """The host backend a ``backend = { kind = ... }`` table asks for (None for 'null')."""
    if isinstance(config, StdioChar):
        return StdioBackend(input=config.input, on_quit=lambda: vm.stop(VmExitReason.STOPPED))
    if isinstance(config, FileChar):
        return FileBackend(str(config.path), append=config.append)
    if isinstance(config, SocketChar):
        return UnixSocketBackend(str(config.path))
    if isinstance(config, PtyChar):
        return PtyBackend()
    return None


def build_vm(config: VmConfig) -> Vm:
    """A ready-to-run Vm for ``config`` (the caller runs and closes it)."""
    vm = Vm(config.vm.memory, vcpus=config.vm.vcpus)
    try:
        backend = char_backend(config.serial.backend, vm)
        outputs: list[CharBackend] = [] if backend is None else [backend]
        if config.serial.log is not None:
            log_backend = FileBackend(str(config.serial.log))
            vm.add_char_backend(log_backend, _ignore_input)
            outputs.append(log_backend)
        serial = Serial16550A(vm.irq(COM1_IRQ), _TeeOutput(*outputs))
        vm.pio.register(COM1_PORT, COM1_PORTS, serial, "serial0 (COM1)")
        if backend is not None:
            vm.add_char_backend(backend, serial.receive)
        if config.vm.debug_exit:
            debug_exit = DebugExit(lambda code: vm.stop(VmExitReason.GUEST_EXIT, code))
            vm.pio.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, debug_exit, "debug-exit")
        if config.vm.firmware is not None:
            try:
                image = config.vm.firmware.read_bytes()
            except OSError as e:
                raise ConfigError("vm.firmware", f"{config.vm.firmware}: {e.strerror}") from e
            vm.load_firmware(image)
        else:
            raise ConfigError("vm.firmware", "nothing to boot: give a firmware image")
    except BaseException:
        vm.close()
        raise
    return vm
