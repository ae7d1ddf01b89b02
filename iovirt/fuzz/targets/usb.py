"""The fuzz target of the xHCI controller with its USB HID keyboard and tablet."""

from __future__ import annotations

import select
import struct
from typing import Any

from iovirt.fuzz import ops as fops
from iovirt.fuzz.harness import RAM_SIZE, FuzzMemory, Region, Target
from iovirt.fuzz.ops import Op
from iovirt.fuzz.targets.common import (
    PciBoard,
    check_line,
)
from iovirt.interrupt import RecordingInterrupt
from iovirt.memory import GuestMemory


class _RecordingXhci:
    """Stands in for the controller when the synthetic xHCI driver builds a seed: forwards
    every access to the real controller and writes it down as a fuzz operation."""

    def __init__(self, xhci: Any, ops: list[Op]) -> None:
        self._xhci = xhci
        self._ops = ops

    def read(self, offset: int, size: int) -> int:
        self._ops.append(fops.read(0, offset, size))
        return int(self._xhci.read(offset, size))

    def write(self, offset: int, size: int, value: int) -> None:
        self._ops.append(fops.write(0, offset, size, value))
        self._xhci.write(offset, size, value)

    def config_read(self, offset: int, size: int) -> int:
        self._ops.append(fops.config_read(offset, size))
        return int(self._xhci.config_read(offset, size))

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._ops.append(fops.config_write(offset, size, value))
        self._xhci.config_write(offset, size, value)


class _RecordingRam:
    """Guest RAM as the synthetic driver sees it while building a seed: its writes become
    MEM_WRITE operations (in order, between the register accesses)."""

    def __init__(self, memory: GuestMemory, ops: list[Op]) -> None:
        self._memory = memory
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        return getattr(self._memory, name)

    def write(self, gpa: int, data: bytes) -> None:
        self._memory.write(gpa, data)
        self._ops.append(fops.mem_write(gpa, bytes(data)))

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        self._memory.fill(gpa, length, value)
        for at in range(0, length, fops.MAX_PAYLOAD):
            chunk = min(fops.MAX_PAYLOAD, length - at)
            self._ops.append(fops.mem_write(gpa + at, bytes([value]) * chunk))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value & 0xFFFF_FFFF))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF))


# Control requests a driver makes of a HID device (bmRequestType, bRequest, wValue, wIndex,
# wLength, OUT data): chapter 9 and HID 1.11 class requests, a few of them invalid on purpose.
_USB_SEED_REQUESTS: tuple[tuple[int, int, int, int, int, bytes], ...] = (
    (0x80, 0x06, 0x0100, 0, 18, b""),  # GET_DESCRIPTOR device
    (0x80, 0x06, 0x0200, 0, 64, b""),  # configuration
    (0x80, 0x06, 0x0300, 0, 4, b""),  # string 0: languages
    (0x80, 0x06, 0x0302, 0x0409, 64, b""),  # product string
    (0x80, 0x06, 0x0600, 0, 10, b""),  # device qualifier: STALL on a full-speed device
    (0x81, 0x06, 0x2100, 0, 9, b""),  # HID descriptor
    (0x81, 0x06, 0x2200, 0, 128, b""),  # report descriptor
    (0x00, 0x09, 1, 0, 0, b""),  # SET_CONFIGURATION 1
    (0x80, 0x08, 0, 0, 1, b""),  # GET_CONFIGURATION
    (0x80, 0x00, 0, 0, 2, b""),  # GET_STATUS device
    (0x81, 0x00, 0, 0, 2, b""),  # ... interface
    (0x82, 0x00, 0, 0x81, 2, b""),  # ... endpoint 1 IN
    (0x00, 0x03, 1, 0, 0, b""),  # SET_FEATURE remote wakeup
    (0x00, 0x01, 1, 0, 0, b""),  # CLEAR_FEATURE remote wakeup
    (0x02, 0x03, 0, 0x81, 0, b""),  # SET_FEATURE endpoint halt
    (0x02, 0x01, 0, 0x81, 0, b""),  # CLEAR_FEATURE endpoint halt
    (0x81, 0x0A, 0, 0, 1, b""),  # GET_INTERFACE
    (0x01, 0x0B, 0, 0, 0, b""),  # SET_INTERFACE 0
    (0x21, 0x0A, 0x0400, 0, 0, b""),  # HID SET_IDLE
    (0xA1, 0x02, 0, 0, 1, b""),  # HID GET_IDLE
    (0x21, 0x0B, 0, 0, 0, b""),  # HID SET_PROTOCOL boot
    (0xA1, 0x03, 0, 0, 1, b""),  # HID GET_PROTOCOL
    (0x21, 0x09, 0x0200, 0, 1, b"\x07"),  # HID SET_REPORT output: LEDs
    (0xA1, 0x01, 0x0100, 0, 8, b""),  # HID GET_REPORT input
    (0x21, 0x0B, 1, 0, 0, b""),  # HID SET_PROTOCOL report
    (0x40, 0x42, 0, 0, 0, b""),  # a vendor request: STALL
)


class XhciTarget(Target):
    name = "xhci"
    summary = "xHCI controller (MSI-X/INTx, IMOD) with a USB keyboard and a USB tablet"
    modules = ("iovirt.devices.xhci", "iovirt.devices.usb", "iovirt.devices.usb_hid")
    support_modules = ("iovirt.bus.pci", "iovirt.bus.msix")
    host_events = ("key", "pointer", "tick", "reset")

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.devices import usb_hid, xhci
        from iovirt.testing.platform import SimulatedPlatform

        self.mod = xhci
        self.hid = usb_hid
        self._platform_cls = SimulatedPlatform
        self.layout = [("bar0-mmio", xhci.XHCI_BAR_SIZE)]

    def _build(self, platform: Any) -> Any:
        self.keyboard = self.hid.UsbKeyboard()
        self.tablet = self.hid.UsbTablet()
        self.irq = RecordingInterrupt()
        self.now = 0.0
        self.wake_at: float | None = None
        return self.mod.Xhci(
            platform,
            [self.keyboard, self.tablet],
            intx=self.irq,
            clock=lambda: self.now,
            timer=self._timer,
        )

    def _timer(self, when: float) -> None:
        if self.wake_at is None or when < self.wake_at:
            self.wake_at = when

    def begin(self) -> list[Region]:
        self.platform = self._platform_cls(self.memory)
        self.internal: BaseException | None = None
        self.xhci = self._build(self.platform)
        setattr(self.xhci, "_internal_error", self._internal_error)  # noqa: B010
        self.board = PciBoard(self.xhci)
        return self.board.regions()

    def _internal_error(self, what: str, e: Exception) -> None:
        if self.internal is None:
            self.internal = e

    def config_read(self, offset: int, size: int) -> int:
        return int(self.xhci.config_read(offset, size))

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.xhci.config_write(offset, size, value)

    def host(self, event: int, data: bytes) -> None:
        raw = data.ljust(9, b"\0")
        if event == 0:
            self.keyboard.key_event(int.from_bytes(raw[0:2], "little"), bool(raw[2] & 1))
        elif event == 1:
            x, y, width, height = struct.unpack_from("<hhHH", raw, 0)
            self.tablet.pointer_event(x, y, raw[8], width, height)
        elif event == 2:
            # Time moves (up to about 16 ms); the board's timer fires when it is due.
            self.now += int.from_bytes(raw[0:2], "little") * 250e-9
            if self.wake_at is not None and self.now >= self.wake_at:
                self.wake_at = None
                self.xhci.poll()
        else:
            self.xhci.reset()

    def after_op(self) -> None:
        platform = self.platform
        fds = [v.eventfd for v in platform.vectors if not v.closed]
        if fds and select.select(fds, [], [], 0)[0]:
            platform.poll()

    def check(self) -> None:
        if self.internal is not None:
            exc, self.internal = self.internal, None
            raise exc
        x = self.xhci
        m = self.mod
        iman = x._intr[0].iman
        active = bool(iman & m.IMAN_IP and iman & m.IMAN_IE and x._usbcmd & m.USBCMD_INTE)
        expected = active and not x.msix.enabled and self.board.intx_allowed()
        check_line("xhci", self.irq, expected)

    def end(self) -> None:
        self.xhci.close()

    def seeds(self) -> list[list[Op]]:
        from iovirt.devices.usb import SetupPacket
        from iovirt.testing.platform import SimulatedPlatform
        from iovirt.testing.xhci_driver import XhciDriver

        plans = (
            (True, (1,), _USB_SEED_REQUESTS[:13], True),
            (False, (2,), _USB_SEED_REQUESTS[13:], True),
            (True, (1, 2), _USB_SEED_REQUESTS[:2], False),
        )
        out = []
        for msix, ports, requests, interrupt_in in plans:
            ops: list[Op] = []
            with GuestMemory([(0, RAM_SIZE)], name="iovirt-fuzz-seed") as scratch:
                platform = SimulatedPlatform(scratch)
                xhci = self._build(platform)
                PciBoard(xhci)
                driver = XhciDriver(
                    _RecordingXhci(xhci, ops),  # type: ignore[arg-type]
                    _RecordingRam(scratch, ops),  # type: ignore[arg-type]
                )
                try:
                    driver.start(msix=msix, imod=0 if msix else 160)
                    slots = []
                    for port in ports:
                        driver.reset_port(port)
                        slot = driver.enable_slot().slot_id
                        slots.append(slot)
                        driver.address_device(slot, port)
                        for request in requests:
                            result = driver.control(slot, SetupPacket(*request[:5]), request[5])
                            if result.code != self.mod.CompletionCode.SUCCESS:
                                # A STALL halts endpoint 0: recover as xhci_hcd does.
                                driver.reset_endpoint(slot, 1)
                                driver.skip_to_enqueue(slot, 1)
                        if interrupt_in:
                            driver.configure_endpoint(slot, {3: (7, 8)})  # interrupt IN
                            driver.queue_normal(slot, 3, 8)
                    ops.append(fops.host(0, bytes([30, 0, 1])))
                    ops.append(fops.host(1, struct.pack("<hhHHB", 100, 200, 640, 480, 1)))
                    ops.append(fops.host(2, b"\xff\xff"))
                    driver.events()
                    if not interrupt_in:
                        driver.configure_endpoint(slots[0], {3: (7, 8)})
                        driver.stop_endpoint(slots[0], 3)
                        driver.skip_to_enqueue(slots[0], 3)
                        driver.evaluate_context(slots[0], max_packet=8)
                        driver.reset_device(slots[-1])
                        driver.disable_slot(slots[-1])
                finally:
                    xhci.close()
            out.append(ops)
        return out
