"""Build a :class:`~iovirt.vm.Vm` from a validated config: the board wiring.

This is where config names become objects: the serial port at COM1 with the char backend
the config names, the debug-exit port when asked for, the firmware image. Device models
and backends know nothing of the config; only this module does.
"""

from __future__ import annotations

from pathlib import Path

from iovirt.backends.char import (
    CharBackend,
    FileBackend,
    PtyBackend,
    StdioBackend,
    UnixSocketBackend,
)
from iovirt.boot import layout
from iovirt.boot.linux import LinuxImage, load_linux, parse_bzimage, plan_linux
from iovirt.boot.mptable import build_mptable
from iovirt.bus.pci import CONFIG_ADDRESS_PORT, CONFIG_PORTS, PciRoot
from iovirt.config import CharBackendConfig, FileChar, PtyChar, SocketChar, StdioChar, VmConfig
from iovirt.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from iovirt.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from iovirt.devices.rtc import RTC_INDEX_PORT, RTC_PORTS, CmosRtc
from iovirt.devices.serial import Serial16550A
from iovirt.errors import ConfigError
from iovirt.vm import Vm, VmExitReason, ram_layout

COM1_PORT = 0x3F8
COM1_PORTS = 8
COM1_IRQ = 4
I8042_IRQ = 1
POST_PORT = 0x80  # firmware/kernel "I/O delay" writes; claimed so they are not logged


class _Sink:
    """A port that ignores writes and reads as zero (port 0x80, the POST/delay port)."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


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


def build_vm(config: VmConfig, kernel: LinuxImage | None = None) -> Vm:
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
        # The PC board every guest gets: PCI bus 0 behind 0xCF8, the i8042 reset line.
        vm.pci = PciRoot()
        vm.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, vm.pci, "pci-root")
        i8042 = I8042(lambda: vm.stop(VmExitReason.RESET), vm.irq(I8042_IRQ))
        vm.pio.register(I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 1, i8042, "i8042")
        vm.pio.register(POST_PORT, 1, _Sink(), "post")
        vm.pio.register(RTC_INDEX_PORT, RTC_PORTS, CmosRtc(), "rtc")
        if config.vm.kernel is not None:
            _load_kernel(vm, config, kernel)
        elif config.vm.firmware is not None:
            vm.load_firmware(_read("vm.firmware", config.vm.firmware))
        else:
            raise ConfigError("vm.kernel", "nothing to boot: give vm.kernel or vm.firmware")
    except BaseException:
        vm.close()
        raise
    return vm


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"{path}: {e.strerror}") from e


def check_boot_files(config: VmConfig) -> LinuxImage | None:
    """Everything about the kernel and initrd that can be checked without a VM: that the
    kernel is a bzImage iovirt boots, and that it, its command line and the initrd fit in
    vm.memory. Runs before the lab is started, so such mistakes never cost a lab boot."""
    if config.vm.kernel is None:
        return None
    image = parse_bzimage(str(config.vm.kernel), _read("vm.kernel", config.vm.kernel))
    initrd_size = None
    if config.vm.initrd is not None:
        try:
            initrd_size = config.vm.initrd.stat().st_size
        except OSError as e:
            raise ConfigError("vm.initrd", f"{config.vm.initrd}: {e.strerror}") from e
    plan_linux(
        image,
        ram_layout(config.vm.memory)[0][1],
        config.vm.cmdline,
        initrd_size,
        str(config.vm.initrd or ""),
    )
    return image


def _load_kernel(vm: Vm, config: VmConfig, image: LinuxImage | None) -> None:
    """Linux direct boot: bzImage, initrd, command line, MP table."""
    assert config.vm.kernel is not None
    kernel_path = str(config.vm.kernel)
    if image is None:  # not already parsed by check_boot_files
        image = parse_bzimage(kernel_path, _read("vm.kernel", config.vm.kernel))
    initrd = None if config.vm.initrd is None else _read("vm.initrd", config.vm.initrd)
    vm.memory.write(layout.EBDA_START, build_mptable(len(vm.vcpus)))
    load_linux(
        vm.memory, vm.vcpus[0], image, config.vm.cmdline, initrd, str(config.vm.initrd or "")
    )
