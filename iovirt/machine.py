"""Build a :class:`~iovirt.vm.Vm` from a validated config: the board wiring.

This is where config names become objects: the serial port at COM1 with the char backend
the config names, the debug-exit port when asked for, the firmware image. Device models
and backends know nothing of the config; only this module does.
"""

from __future__ import annotations

from pathlib import Path

from iovirt.backends.block import FileBlockBackend
from iovirt.backends.char import (
    CharBackend,
    FileBackend,
    PtyBackend,
    StdioBackend,
    UnixSocketBackend,
)
from iovirt.backends.net import NetBackend
from iovirt.backends.tap import TapBackend
from iovirt.backends.vnc import VncServer, parse_vnc_address
from iovirt.boot import layout
from iovirt.boot.acpi import build_acpi_tables
from iovirt.boot.linux import LinuxImage, load_linux, parse_bzimage, plan_linux
from iovirt.boot.mptable import build_mptable
from iovirt.bus.pci import CONFIG_ADDRESS_PORT, CONFIG_PORTS, PciRoot
from iovirt.config import (
    CharBackendConfig,
    DiskSection,
    FileChar,
    NicSection,
    PtyChar,
    SocketChar,
    StdioChar,
    VhostUserBackend,
    VmConfig,
)
from iovirt.devices.acpi_pm import AcpiSleepRegisters
from iovirt.devices.ahci import Ahci
from iovirt.devices.bochs_display import BochsDisplay
from iovirt.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from iovirt.devices.e1000 import E1000
from iovirt.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from iovirt.devices.rtc import RTC_INDEX_PORT, RTC_PORTS, CmosRtc
from iovirt.devices.serial import Serial16550A
from iovirt.devices.usb import UsbDevice
from iovirt.devices.usb_hid import UsbKeyboard, UsbTablet
from iovirt.devices.xhci import Xhci
from iovirt.errors import ConfigError
from iovirt.input import InputSink
from iovirt.kvm.platform import KvmPlatform
from iovirt.vfio.board import add_passthrough
from iovirt.virtio.blk import BlkOptions, VirtioBlk
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.mmio import VirtioMmioTransport
from iovirt.virtio.net import NetOptions, VirtioNet, parse_mac
from iovirt.virtio.pci import VirtioPciTransport
from iovirt.virtio.vhost_user import VhostUserBlk, VhostUserNet
from iovirt.vm import Vm, VmExitReason, ram_layout

COM1_PORT = 0x3F8
COM1_PORTS = 8
COM1_IRQ = 4
I8042_IRQ = 1
I8042_AUX_IRQ = 12  # the PS/2 mouse
POST_PORT = 0x80  # firmware/kernel "I/O delay" writes; claimed so they are not logged

# The 32-bit hole: PCI BARs get PCI_MMIO_WINDOW [start, end); virtio-mmio devices sit
# above that, one page each, below the IOAPIC (0xFEC00000).
PCI_MMIO_WINDOW = (0xC000_0000, 0xFC00_0000)
VIRTIO_MMIO_BASE = 0xFC00_0000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_SIZE = 0x200
# ISA IRQs no device on this board uses, for virtio-mmio interrupt lines (level-triggered,
# described in the DSDT). GSIs 16-23 stay for PCI INTx (the DSDT's _PRT swizzle).
VIRTIO_MMIO_GSIS = (5, 6, 7, 10, 11, 14, 15)
# PCI INTx pin A of slot s goes to GSI 16 + s % 8 (the _PRT and MP table say the same).
PCI_INTX_GSI_BASE = 16
# The hardware-reduced ACPI sleep registers (FADT SLEEP_CONTROL_REG / SLEEP_STATUS_REG).
ACPI_SLEEP_PORT = 0x600
AHCI_PORTS = 6  # one ICH9-like controller for every `model = "ahci"` disk
# NICs without a configured MAC get this one plus their index (QEMU's default too).
DEFAULT_MAC = bytes.fromhex("525400123456")
ACPI_TABLES_ADDR = 0xE_0000  # in the reserved BIOS area, where Linux scans for the RSDP


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
        vm.pci = PciRoot(mmio=vm.mmio, pio=vm.pio, mem_window=PCI_MMIO_WINDOW)
        vm.pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS, vm.pci, "pci-root")
        i8042 = I8042(lambda: vm.stop(VmExitReason.RESET), vm.irq(I8042_IRQ), vm.irq(I8042_AUX_IRQ))
        vm.pio.register(I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 1, i8042, "i8042")
        vm.pio.register(POST_PORT, 1, _Sink(), "post")
        vm.pio.register(RTC_INDEX_PORT, RTC_PORTS, CmosRtc(), "rtc")
        vm.pio.register(
            ACPI_SLEEP_PORT,
            2,
            AcpiSleepRegisters(lambda: vm.stop(VmExitReason.POWEROFF)),
            "acpi-sleep",
        )
        platform = KvmPlatform(vm)
        mmio_devices: list[tuple[int, int, int]] = []
        _add_disks(vm, platform, config.disk, mmio_devices)
        _add_nics(vm, platform, config.nic, mmio_devices)
        _add_display_and_inputs(vm, platform, config, i8042)
        add_passthrough(vm, platform, config.passthrough)
        if config.vm.kernel is not None:
            _load_kernel(vm, config, kernel, mmio_devices)
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


def _add_display_and_inputs(vm: Vm, platform: KvmPlatform, config: VmConfig, i8042: I8042) -> None:
    """The ``[display]`` (a bochs display on PCI) and its VNC server, whose keyboard and
    pointer events go to every ``[[input]]`` device, in config order."""
    if config.display is None:
        if config.input:
            raise ConfigError("input", "input devices are fed from VNC: add a [display] with vnc")
        return
    assert vm.pci is not None
    display = BochsDisplay(platform, config.display.vram)
    vm.pci.add(display, _free_slot(vm, "display"))
    vm.add_closer(display.close)
    sinks: list[InputSink] = []
    usb: list[UsbDevice] = []
    for entry in config.input:
        if entry.model == "ps2":
            sinks += [i8042.keyboard, i8042.mouse]
        else:
            device = UsbKeyboard() if entry.model == "usb-keyboard" else UsbTablet()
            usb.append(device)  # on root port len(usb), in config order
            sinks.append(device)
    if usb:
        slot = _free_slot(vm, "input")
        gsi = PCI_INTX_GSI_BASE + slot % 8
        xhci: Xhci | None = None

        def schedule_poll(when: float) -> None:
            # Interrupter moderation: the controller asks to be polled at ``when``.
            if xhci is not None:
                vm.timers.call_at(when, xhci.poll)

        xhci = Xhci(platform, usb, intx=vm.irq(gsi), interrupt_line=gsi, timer=schedule_poll)
        vm.pci.add(xhci, slot)
        vm.add_closer(xhci.close)
    if config.display.vnc is None:
        return
    host, port = parse_vnc_address(config.display.vnc)
    server = VncServer(display, sinks, host, port, password=config.display.password)
    vm.add_service(server.start, server.close)


def _add_disks(
    vm: Vm,
    platform: KvmPlatform,
    disks: list[DiskSection],
    mmio_devices: list[tuple[int, int, int]],
) -> None:
    """Plug in every ``[[disk]]``; virtio-mmio windows (base, size, gsi) are appended to
    ``mmio_devices`` for the ACPI tables. AHCI disks share one controller (an ICH9 has six
    ports), in config order."""
    ahci_disks: list[tuple[FileBlockBackend, str]] = []
    for i, disk in enumerate(disks):
        key = f"disk.{i}"
        if isinstance(disk.backend, VhostUserBackend):
            if disk.model != "virtio-blk":
                raise ConfigError(f"{key}.backend", "vhost-user serves virtio-blk only")
            vu_blk = VhostUserBlk(
                str(disk.backend.socket), num_queues=disk.queues, queue_size=disk.queue_size
            )
            vu_blk.attach(platform)
            vm.add_closer(vu_blk.close)
            _add_virtio(vm, platform, vu_blk, disk.transport, key, mmio_devices)
            continue
        backend = FileBlockBackend(
            disk.backend.path, readonly=disk.backend.readonly, direct=disk.backend.direct
        )
        if disk.model == "ahci":
            vm.add_closer(backend.close)
            if len(ahci_disks) == AHCI_PORTS:
                raise ConfigError(key, f"at most {AHCI_PORTS} AHCI disks (one controller)")
            ahci_disks.append((backend, disk.serial or f"IOVIRT-AHCI-{len(ahci_disks)}"))
            continue
        try:
            options = BlkOptions(
                serial=disk.serial.encode(),
                num_queues=disk.queues,
                queue_size=disk.queue_size,
                blk_size=disk.block_size,
                discard=disk.discard,
                packed=disk.packed,
            )
            device = VirtioBlk(backend, options)
        except BaseException:
            backend.close()
            raise
        device.attach(platform)
        vm.add_closer(device.close)
        _add_virtio(vm, platform, device, disk.transport, key, mmio_devices)
    if ahci_disks:
        assert vm.pci is not None
        slot = _free_slot(vm, "disk")
        gsi = PCI_INTX_GSI_BASE + slot % 8
        ahci = Ahci(
            vm.memory,
            [backend for backend, _ in ahci_disks],
            intx=vm.irq(gsi),
            interrupt_line=gsi,
            serials=[serial for _, serial in ahci_disks],
        )
        vm.pci.add(ahci, slot)


def _free_slot(vm: Vm, key: str) -> int:
    assert vm.pci is not None
    slot = vm.pci.free_slot()
    if slot is None:
        raise ConfigError(key, "no free PCI slot left on bus 0 (31 devices at most)")
    return slot


def _add_nics(
    vm: Vm,
    platform: KvmPlatform,
    nics: list[NicSection],
    mmio_devices: list[tuple[int, int, int]],
) -> None:
    """Plug in every ``[[nic]]`` (see :func:`_add_disks`)."""
    for i, nic in enumerate(nics):
        key = f"nic.{i}"
        mac = DEFAULT_MAC[:5] + bytes([(DEFAULT_MAC[5] + i) & 0xFF])
        if nic.mac is not None:
            mac = parse_mac(nic.mac)
        if isinstance(nic.backend, VhostUserBackend):
            if nic.model != "virtio-net" or nic.queues != 1:
                raise ConfigError(
                    f"{key}.backend", "vhost-user serves virtio-net with queues = 1 only"
                )
            vu_net = VhostUserNet(str(nic.backend.socket), mac, queue_size=nic.queue_size)
            vu_net.attach(platform)
            vm.add_closer(vu_net.close)
            _add_virtio(vm, platform, vu_net, nic.transport, key, mmio_devices)
            continue
        tap = nic.backend
        pairs = nic.queues if nic.model == "virtio-net" else 1
        backend = TapBackend(tap.ifname, netns=tap.netns, bridge=tap.bridge, queues=pairs)
        if nic.model == "e1000":
            # Registered first so that it runs last: the fd is unwatched before it closes.
            vm.add_closer(backend.close)
            _add_e1000(vm, platform, backend, mac, key)
            continue
        try:
            options = NetOptions(
                mac=mac,
                queue_pairs=nic.queues,
                queue_size=nic.queue_size,
                mtu=nic.mtu,
                packed=nic.packed,
            )
            device = VirtioNet(backend, options)
        except BaseException:
            backend.close()
            raise
        device.attach(platform)
        vm.add_closer(device.close)
        _add_virtio(vm, platform, device, nic.transport, key, mmio_devices)


def _add_e1000(vm: Vm, platform: KvmPlatform, backend: NetBackend, mac: bytes, key: str) -> None:
    """An emulated 82540EM on INTx; it reads the tap on the host I/O loop, and stops
    watching it while its receive ring is full (the packets wait in the tap's queue)."""
    assert vm.pci is not None
    slot = _free_slot(vm, key)
    gsi = PCI_INTX_GSI_BASE + slot % 8
    fd = backend.fds[0]

    def rx_interest(on: bool) -> None:
        if on:
            platform.watch(fd, nic.rx_ready)
        else:
            platform.unwatch(fd)

    nic = E1000(
        vm.memory,
        backend,
        mac,
        intx=vm.irq(gsi),
        interrupt_line=gsi,
        rx_interest=rx_interest,
        timers=vm.timers,
    )
    vm.pci.add(nic, slot)
    if nic.rx_interested:
        platform.watch(fd, nic.rx_ready)
    vm.add_closer(lambda: platform.unwatch(fd))


def _add_virtio(
    vm: Vm,
    platform: KvmPlatform,
    device: VirtioDevice,
    transport: str,
    key: str,
    mmio_devices: list[tuple[int, int, int]],
) -> None:
    """Put ``device`` on the transport the config names."""
    assert vm.pci is not None
    if transport == "pci":
        slot = _free_slot(vm, key)
        pci = VirtioPciTransport(device, platform, intx_gsi=PCI_INTX_GSI_BASE + slot % 8)
        vm.pci.add(pci, slot)
        vm.add_closer(pci.close)
        return
    n = len(mmio_devices)
    if n >= len(VIRTIO_MMIO_GSIS):
        raise ConfigError(key, f"at most {len(VIRTIO_MMIO_GSIS)} virtio-mmio devices")
    base, gsi = VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_GSIS[n]
    mmio = VirtioMmioTransport(device, platform, base, gsi)
    vm.mmio.register(base, VIRTIO_MMIO_SIZE, mmio, f"virtio-mmio{n} ({key})")
    vm.add_closer(mmio.close)
    mmio_devices.append((base, VIRTIO_MMIO_SIZE, gsi))


def _load_kernel(
    vm: Vm, config: VmConfig, image: LinuxImage | None, mmio_devices: list[tuple[int, int, int]]
) -> None:
    """Linux direct boot: bzImage, initrd, command line, ACPI tables and MP table."""
    assert config.vm.kernel is not None
    kernel_path = str(config.vm.kernel)
    if image is None:  # not already parsed by check_boot_files
        image = parse_bzimage(kernel_path, _read("vm.kernel", config.vm.kernel))
    initrd = None if config.vm.initrd is None else _read("vm.initrd", config.vm.initrd)
    # ACPI describes the board (CPUs, IOAPIC, PCI root, virtio-mmio devices, power-off);
    # the MP table stays for guests booted with acpi=off.
    vm.memory.write(layout.EBDA_START, build_mptable(len(vm.vcpus)))
    tables = build_acpi_tables(
        ACPI_TABLES_ADDR,
        cpus=len(vm.vcpus),
        mmio_devices=mmio_devices,
        pci_window=PCI_MMIO_WINDOW,
        sleep_port=ACPI_SLEEP_PORT,
    )
    vm.memory.write(ACPI_TABLES_ADDR, tables.blob)
    load_linux(
        vm.memory, vm.vcpus[0], image, config.vm.cmdline, initrd, str(config.vm.initrd or "")
    )
