"""Tests of the xHCI controller model at its registers, rings and contexts.

The guest is :class:`iovirt.testing.xhci_driver.XhciDriver`, which lays rings and contexts out
in a small :class:`GuestMemory` and talks to BAR0 at its offsets, as Linux's xhci_hcd would;
the VMM is a :class:`SimulatedPlatform` (MSI-X deliveries are recorded per vector) and INTA#
is a :class:`RecordingInterrupt`. The devices on the ports are the real USB HID keyboard and
tablet models. Expected values (register layouts, completion codes, context fields) are
written here from the xHCI specification, not read back from the model's tables.
"""

from __future__ import annotations

import random
import struct
import threading
from collections.abc import Iterator

import pytest

from iovirt.bus.pci import (
    PCI_BASE_ADDRESS_0,
    PCI_CLASS_DEVICE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_PIN,
    PCI_VENDOR_ID,
)
from iovirt.devices.usb import (
    Endpoint,
    Handshake,
    SetupPacket,
    UsbDevice,
    UsbSpeed,
    configuration_descriptor,
    device_descriptor,
    endpoint_descriptor,
    interface_descriptor,
)
from iovirt.devices.usb_hid import UsbKeyboard, UsbTablet
from iovirt.devices.xhci import Xhci
from iovirt.interrupt import RecordingInterrupt
from iovirt.memory import GuestMemory
from iovirt.testing.platform import SimulatedPlatform
from iovirt.testing.xhci_driver import Event, ProducerRing, XhciDriver, trb_control

RAM = 1 << 20
OUTSIDE_RAM = 0x1_0000_0000

# Completion codes (xHCI 6.4.5, Table 6-90).
CC_SUCCESS = 1
CC_USB_TRANSACTION_ERROR = 4
CC_TRB_ERROR = 5
CC_STALL_ERROR = 6
CC_RESOURCE_ERROR = 7
CC_NO_SLOTS = 9
CC_SLOT_NOT_ENABLED = 11
CC_EP_NOT_ENABLED = 12
CC_SHORT_PACKET = 13
CC_PARAMETER_ERROR = 17
CC_CONTEXT_STATE_ERROR = 19
CC_EVENT_RING_FULL = 21
CC_COMMAND_RING_STOPPED = 24
CC_STOPPED = 26
CC_INVALID_STREAM_ID = 34
CC_BABBLE = 3

# TRB types (6.4.6).
NORMAL, SETUP, DATA, STATUS, LINK, EVENT_DATA, NOOP = 1, 2, 3, 4, 6, 7, 8
ENABLE_SLOT, ADDRESS_DEVICE, CONFIGURE_ENDPOINT, EVALUATE_CONTEXT = 9, 11, 12, 13
STOP_ENDPOINT, SET_TR_DEQUEUE, FORCE_EVENT, NOOP_COMMAND = 15, 16, 18, 23
TRANSFER_EVENT, COMMAND_COMPLETION, PORT_STATUS_CHANGE, HOST_CONTROLLER_EVENT = 32, 33, 34, 37

# TRB control bits.
C, TC, ISP, CH, IOC, IDT, DIR_IN = 1, 2, 4, 16, 32, 64, 1 << 16

# Slot and endpoint states, endpoint types (6.2.2, 6.2.3).
SLOT_ENABLED, SLOT_DEFAULT, SLOT_ADDRESSED, SLOT_CONFIGURED = 0, 1, 2, 3
EP_DISABLED, EP_RUNNING, EP_HALTED, EP_STOPPED = 0, 1, 2, 3
EP_BULK_OUT, EP_ISOCH_IN, EP_INTERRUPT_IN, EP_CONTROL = 2, 5, 7, 4

# Register offsets.
OP = 0x40
USBCMD, USBSTS, PAGESIZE, CRCR, CONFIG = 0x00, 0x04, 0x08, 0x18, 0x38
RUNTIME = 0x1000  # MFINDEX; interrupter registers below are relative to interrupter 0
IMAN, IMOD, ERSTSZ, ERSTBA, ERDP = 0x00, 0x04, 0x08, 0x10, 0x18
HCH, HSE, EINT, PCD, CNR, HCE = 1, 4, 8, 16, 1 << 11, 1 << 12
RS, INTE = 1, 4
CRR = 8
CCS, PED, PR, PP, CSC, PRC, PLC, LWS = 1, 2, 16, 1 << 9, 1 << 17, 1 << 21, 1 << 22, 1 << 16

GET_STATUS = SetupPacket(0x80, 0x00, 0, 0, 2)
GET_DEVICE_DESCRIPTOR = SetupPacket(0x80, 0x06, 0x0100, 0, 64)


def pls(portsc: int) -> int:
    return (portsc >> 5) & 0xF


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


@pytest.fixture
def platform(memory: GuestMemory) -> SimulatedPlatform:
    return SimulatedPlatform(memory)


@pytest.fixture
def keyboard() -> UsbKeyboard:
    return UsbKeyboard()


@pytest.fixture
def xhci(platform: SimulatedPlatform, keyboard: UsbKeyboard) -> Iterator[Xhci]:
    controller = Xhci(platform, [keyboard, UsbTablet()], intx=RecordingInterrupt())
    yield controller
    controller.close()


@pytest.fixture
def driver(xhci: Xhci, memory: GuestMemory) -> XhciDriver:
    d = XhciDriver(xhci, memory)
    d.start()
    return d


def deliveries(platform: SimulatedPlatform) -> int:
    platform.poll()
    return len(platform.vectors[0].delivered)


def addressed_slot(d: XhciDriver, port: int = 1) -> int:
    d.reset_port(port)
    d.port_events()
    slot = d.enable_slot().slot_id
    assert d.address_device(slot, port).code == CC_SUCCESS
    return slot


def raw_slot_command(
    d: XhciDriver, kind: int, slot: int, parameter: int = 0, flags: int = 0
) -> Event:
    event = d.command(parameter, 0, trb_control(kind, flags) | slot << 24)
    assert event is not None
    return event


# -- PCI function and capability registers -------------------------------------------------


def test_pci_identity_bar_and_capabilities(xhci: Xhci) -> None:
    assert xhci.config_read(PCI_VENDOR_ID, 2) == 0x1B36
    assert xhci.config_read(PCI_DEVICE_ID, 2) == 0x000D
    assert xhci.config_read(PCI_CLASS_DEVICE, 2) == 0x0C03  # serial bus, USB
    assert xhci.config_read(PCI_CLASS_PROG, 1) == 0x30  # xHCI
    assert xhci.config_read(PCI_INTERRUPT_PIN, 1) == 1  # INTA#
    assert xhci.config_read(0x60, 1) == 0x30  # SBRN: USB 3.0 (the xHCI register set)
    # BAR0 is a 64-bit memory BAR of 16 KiB: sizing reads back the mask.
    assert xhci.config_read(PCI_BASE_ADDRESS_0, 4) & 0x7 == 0x4
    xhci.config_write(PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert xhci.config_read(PCI_BASE_ADDRESS_0, 4) & ~0xF == 0xFFFF_C000
    d = XhciDriver(xhci, xhci.memory)
    cap = d.find_capability(0x11)  # MSI-X
    assert xhci.config_read(cap + 2, 2) & 0x7FF == 0  # one vector
    assert xhci.config_read(cap + 4, 4) == 0x3000  # table at BAR0 + 0x3000
    assert xhci.config_read(cap + 8, 4) == 0x3800  # PBA at BAR0 + 0x3800


def test_capability_registers(xhci: Xhci) -> None:
    assert xhci.read(0x00, 1) == 0x40  # CAPLENGTH
    assert xhci.read(0x02, 2) == 0x0110  # HCIVERSION 1.1
    hcsparams1 = xhci.read(0x04, 4)
    assert hcsparams1 & 0xFF == 16  # MaxSlots
    assert (hcsparams1 >> 8) & 0x7FF == 1  # MaxIntrs
    assert hcsparams1 >> 24 == 8  # MaxPorts: 4 USB 2 and 4 USB 3
    hcsparams2 = xhci.read(0x08, 4)
    assert (hcsparams2 >> 4) & 0xF == 4  # ERST Max: 16 segments
    assert hcsparams2 >> 21 == 0  # no scratchpad buffers
    hccparams1 = xhci.read(0x10, 4)
    assert hccparams1 & 1  # AC64
    assert not hccparams1 & 4  # CSZ: 32-byte contexts
    assert (hccparams1 >> 12) & 0xF == 0  # MaxPSASize: no streams
    assert xhci.read(0x14, 4) == 0x2000  # DBOFF
    assert xhci.read(0x18, 4) == 0x1000  # RTSOFF
    assert xhci.read(OP + PAGESIZE, 4) == 1  # 4 KiB pages
    # Walk the extended capability list: Supported Protocol USB 2.0, then USB 3.0.
    offset = (hccparams1 >> 16) * 4
    protocols = []
    while True:
        header = xhci.read(offset, 4)
        assert header & 0xFF == 2  # Supported Protocol
        assert xhci.read(offset + 4, 4).to_bytes(4, "little") == b"USB "
        ports = xhci.read(offset + 8, 4)
        assert ports >> 28 == 0  # PSIC: the default speed IDs
        assert xhci.read(offset + 12, 4) & 0x1F == 0  # Protocol Slot Type 0
        protocols.append((header >> 16, ports & 0xFF, (ports >> 8) & 0xFF))
        if not (header >> 8) & 0xFF:
            break
        offset += ((header >> 8) & 0xFF) * 4
    assert protocols == [(0x0200, 1, 4), (0x0300, 5, 4)]  # revision, first port, count


def test_reset_shows_connected_ports(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory)
    d.reset()
    assert d.usbsts() & HCH and not d.usbsts() & CNR
    assert d.op_read(USBCMD) == 0
    for port in (1, 2):  # keyboard, tablet
        portsc = d.portsc(port)
        assert portsc & (CCS | CSC | PP) == CCS | CSC | PP
        assert not portsc & PED
        assert (portsc >> 10) & 0xF == 1  # full speed
        assert pls(portsc) == 7  # Polling: connected, waiting for a reset
    for port in (3, 4, 5, 6, 7, 8):  # empty USB 2 and USB 3 ports
        portsc = d.portsc(port)
        assert portsc == PP | 5 << 5  # powered, RxDetect, nothing connected
    assert d.op_read(CRCR) == 0


def test_run_stop_and_mfindex(platform: SimulatedPlatform, memory: GuestMemory) -> None:
    clock = FakeClock()
    xhci = Xhci(platform, [UsbKeyboard()], clock=clock)
    d = XhciDriver(xhci, memory)
    d.setup()
    assert xhci.read(RUNTIME, 4) == 0
    d.run()
    assert not d.usbsts() & HCH
    clock.now += 0.125  # 125 ms = 1000 microframes
    assert xhci.read(RUNTIME, 4) == 1000
    d.op_write(CONFIG, 3)  # MaxSlotsEn may not change while running
    assert d.op_read(CONFIG) == 16
    d.op_write(USBCMD, 0)
    assert d.usbsts() & HCH
    clock.now += 1.0
    assert xhci.read(RUNTIME, 4) == 1000  # frozen while halted
    xhci.close()


# -- the command ring ----------------------------------------------------------------------


def test_command_with_stale_cycle_bit_is_not_executed(driver: XhciDriver) -> None:
    ring = driver.command_ring
    assert ring is not None
    address = ring.enqueue
    # A No Op written with the wrong cycle bit is not the driver's yet.
    ring.write_trb(address, 0, 0, trb_control(NOOP_COMMAND) | (ring.cycle ^ 1))
    driver.doorbell(0)
    assert driver.collect() == []
    ring.write_trb(address, 0, 0, trb_control(NOOP_COMMAND) | ring.cycle)
    driver.doorbell(0)
    (event,) = driver.collect()
    assert (event.type, event.code, event.parameter) == (COMMAND_COMPLETION, CC_SUCCESS, address)


def test_command_ring_wraps_through_link_trb_with_toggle(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory, command_ring_trbs=4)  # 3 commands and a Link TRB
    d.start()
    ring = d.command_ring
    assert ring is not None
    seen = []
    for _ in range(10):
        cycle_before = ring.cycle
        event = d.noop()
        assert event.code == CC_SUCCESS
        seen.append((event.parameter - ring.base) // 16)
        assert memory.read_u32(event.parameter + 12) & 1 == cycle_before
    assert seen == [0, 1, 2] * 3 + [0]
    # Three commands queued before one doorbell complete in order.
    addresses = [ring.push_raw(0, 0, trb_control(NOOP_COMMAND)) for _ in range(3)]
    d.doorbell(0)
    events = d.collect()
    assert [e.parameter for e in events] == addresses
    assert all(e.code == CC_SUCCESS for e in events)


def test_command_ring_of_two_segments(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory)
    d.setup()
    first = d.arena.alloc(4 * 16)
    second = d.arena.alloc(4 * 16)
    a = ProducerRing(memory, first, 4)
    b = ProducerRing(memory, second, 4)
    # Segment A: two commands and a Link (no toggle) to B; B: one command, Link back, toggle.
    a.write_trb(first, 0, 0, trb_control(NOOP_COMMAND) | C)
    a.write_trb(first + 16, 0, 0, trb_control(NOOP_COMMAND) | C)
    a.write_trb(first + 32, second, 0, trb_control(LINK) | C)
    b.write_trb(second, 0, 0, trb_control(NOOP_COMMAND) | C)
    b.write_trb(second + 16, first, 0, trb_control(LINK, TC) | C)
    d.op_write64(CRCR, first | 1)
    d.run()
    d.doorbell(0)
    events = d.collect()
    assert [e.parameter for e in events] == [first, first + 16, second]
    # After the toggle, a command written with cycle 0 at the start of A runs.
    a.write_trb(first, 0, 0, trb_control(NOOP_COMMAND))
    d.doorbell(0)
    assert [e.parameter for e in d.collect()] == [first]


def test_command_ring_stop_and_new_pointer(driver: XhciDriver, memory: GuestMemory) -> None:
    driver.noop()
    assert driver.op_read(CRCR) & CRR  # the ring ran: CRR reads 1
    driver.op_write64(CRCR, 2)  # CS
    (event,) = driver.collect()
    ring = driver.command_ring
    assert ring is not None
    assert (event.code, event.parameter) == (CC_COMMAND_RING_STOPPED, ring.enqueue)
    assert not driver.op_read(CRCR) & CRR
    # Stopped, the ring takes a new dequeue pointer.
    base = driver.arena.alloc(8 * 16)
    new = ProducerRing(memory, base, 8)
    driver.command_ring = new
    driver.op_write64(CRCR, base | 1)
    event2 = driver.noop()
    assert (event2.code, event2.parameter) == (CC_SUCCESS, base)


@pytest.mark.parametrize("kind", [0, NORMAL, FORCE_EVENT, 19, 21, 40, 63])
def test_unknown_command_types_are_trb_errors(driver: XhciDriver, kind: int) -> None:
    event = driver.command(0, 0, trb_control(kind))
    assert event is not None and event.code == CC_TRB_ERROR
    assert driver.noop().code == CC_SUCCESS  # the ring goes on


# -- the event ring ------------------------------------------------------------------------


def test_event_ring_wraps_one_segment(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory, command_ring_trbs=64)
    d.start(event_segments=(16,))
    base = d.segments[0][0]
    seen = []
    for i in range(40):
        event = d.noop()
        seen.append(((event.address - base) // 16, memory.read_u32(event.address + 12) & 1))
        assert event.code == CC_SUCCESS, i
    # Slots 0..15 with cycle 1, then 0..15 with cycle 0, then cycle 1 again.
    assert seen == [(i % 16, 1 - (i // 16) % 2) for i in range(40)]


def test_event_ring_of_two_segments(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory, command_ring_trbs=64)
    d.start(event_segments=(16, 32))
    (a, _), (b, _) = d.segments
    where = []
    for _ in range(50):
        event = d.noop()
        segment = "a" if a <= event.address < a + 16 * 16 else "b"
        base = a if segment == "a" else b
        where.append(
            (segment, (event.address - base) // 16, memory.read_u32(event.address + 12) & 1)
        )
    expected = [("a", i, 1) for i in range(16)] + [("b", i, 1) for i in range(32)]
    expected += [("a", 0, 0), ("a", 1, 0)]
    assert where == expected


def test_event_ring_full(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory, command_ring_trbs=64)
    d.start(event_segments=(16,))
    ring = d.command_ring
    assert ring is not None
    for _ in range(20):
        ring.push_raw(0, 0, trb_control(NOOP_COMMAND))
    d.doorbell(0)  # 20 completions, the consumer reads none of them
    events = d.events()
    # 14 completions fit, the 15th slot holds Event Ring Full, the 16th stays empty.
    assert [e.type for e in events[:14]] == [COMMAND_COMPLETION] * 14
    assert (events[14].type, events[14].code) == (HOST_CONTROLLER_EVENT, CC_EVENT_RING_FULL)
    assert len(events) == 15
    assert xhci.counters.events_lost == 6
    # Consumed (ERDP moved), the ring takes events again.
    assert d.noop().code == CC_SUCCESS


def test_ehb_holds_interrupts_and_clearing_it_with_events_left_reasserts(
    driver: XhciDriver, platform: SimulatedPlatform
) -> None:
    ring = driver.command_ring
    assert ring is not None
    assert deliveries(platform) == 0
    ring.push_raw(0, 0, trb_control(NOOP_COMMAND))
    driver.doorbell(0)
    assert deliveries(platform) == 1
    assert driver.ir_read(ERDP) & 8  # EHB set by the interrupt
    ring.push_raw(0, 0, trb_control(NOOP_COMMAND))
    driver.doorbell(0)
    assert deliveries(platform) == 1  # EHB still set: no new interrupt
    # The handler consumes only the first event and clears EHB: one is left, so interrupt.
    driver.events(limit=1)
    assert deliveries(platform) == 2
    driver.events()  # consumes the rest and clears EHB: nothing left, no interrupt
    assert deliveries(platform) == 2
    assert not driver.ir_read(ERDP) & 8


def _ring_fault(d: XhciDriver) -> int:
    ring = d.command_ring
    assert ring is not None
    ring.push_raw(0, 0, trb_control(NOOP_COMMAND))
    d.doorbell(0)
    return d.usbsts()


@pytest.mark.parametrize(
    "erstsz, entry, error",
    [
        (0, None, HCE),  # no segments
        (17, None, HCE),  # more than ERST Max allows
        (1, (0x8000, 0), HCE),  # a zero-length segment
        (1, (0x8000, 8), HCE),  # shorter than 16 TRBs
        (1, (0x8000, 5000), HCE),  # longer than 4096 TRBs
        (1, (OUTSIDE_RAM, 16), HSE),  # segment outside guest RAM: a bus error
    ],
)
def test_bad_event_ring_halts_the_controller(
    xhci: Xhci, memory: GuestMemory, erstsz: int, entry: tuple[int, int] | None, error: int
) -> None:
    d = XhciDriver(xhci, memory)
    d.setup()
    erst = d.arena.alloc(64)
    if entry is not None:
        memory.write(erst, struct.pack("<QII", entry[0], entry[1], 0))
    d.ir_write(ERSTSZ, erstsz)
    d.ir_write64(ERSTBA, erst)
    d.run()
    status = _ring_fault(d)
    assert status & error and status & HCH
    assert not status & (HCE | HSE) & ~error
    assert not d.op_read(USBCMD) & RS
    # HCRST recovers the controller.
    d.start()
    assert d.noop().code == CC_SUCCESS


def test_erdp_outside_event_ring_is_host_controller_error(driver: XhciDriver) -> None:
    driver.ir_write64(ERDP, 0x8000)
    status = _ring_fault(driver)
    assert status & HCE and status & HCH


def test_erst_outside_ram_is_host_system_error(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory)
    d.setup()
    d.ir_write(ERSTSZ, 1)
    d.ir_write64(ERSTBA, OUTSIDE_RAM)
    d.run()
    status = _ring_fault(d)
    assert status & HSE and not status & HCE


# -- interrupts ----------------------------------------------------------------------------


def test_msix_message_and_pending_bit(driver: XhciDriver, platform: SimulatedPlatform) -> None:
    driver.noop()
    platform.poll()
    assert platform.vectors[0].delivered == [(0xFEE0_0000, 0x4041)]
    assert not driver.ir_read(IMAN) & 1  # IP clears itself under MSI-X
    assert driver.usbsts() & EINT
    driver.op_write(USBSTS, EINT)  # RW1C
    assert not driver.usbsts() & EINT
    # A masked entry turns the next interrupt into a pending bit.
    driver.xhci.write(0x3000 + 12, 4, 1)
    driver.noop()
    platform.poll()
    assert len(platform.vectors[0].delivered) == 1
    assert driver.xhci.read(0x3800, 8) & 1


def test_intx_fallback(platform: SimulatedPlatform, memory: GuestMemory) -> None:
    intx = RecordingInterrupt()
    xhci = Xhci(platform, [UsbKeyboard()], intx=intx)
    d = XhciDriver(xhci, memory)
    d.start(msix=False)
    assert not intx.level
    d.noop()
    assert intx.level  # IP, IE and INTE all set
    assert d.ir_read(IMAN) & 1
    d.ir_write(IMAN, 2 | 1)  # RW1C IP, keep IE
    assert not intx.level
    d.noop()
    assert intx.level
    d.op_write(USBCMD, RS)  # INTE off: the line drops, IP stays
    assert not intx.level and d.ir_read(IMAN) & 1
    d.op_write(USBCMD, RS | INTE)
    assert intx.level
    command = xhci.config_read(PCI_COMMAND, 2)
    xhci.config_write(PCI_COMMAND, 2, command | PCI_COMMAND_INTX_DISABLE)
    assert not intx.level  # the PCI Interrupt Disable bit gates the pin
    assert platform.vectors[0].delivered == []
    xhci.close()


def test_interrupt_moderation_with_timer(platform: SimulatedPlatform, memory: GuestMemory) -> None:
    clock = FakeClock()
    requests: list[float] = []
    xhci = Xhci(platform, [UsbKeyboard()], clock=clock, timer=requests.append)
    d = XhciDriver(xhci, memory)
    d.start(imod=4000)  # 4000 x 250 ns = 1 ms between interrupts
    assert d.ir_read(IMOD) & 0xFFFF == 4000
    d.noop()
    assert deliveries(platform) == 1  # the first one goes at once
    assert requests == []
    clock.now += 0.0002
    d.noop()  # consumed and EHB cleared by the driver, but only 0.2 ms later
    assert deliveries(platform) == 1
    assert requests == [pytest.approx(1000.001)]
    assert (d.ir_read(IMOD) >> 16) == pytest.approx(3200, abs=2)  # IMODC counts down
    xhci.poll()  # too early: nothing
    assert deliveries(platform) == 1
    clock.now = requests[0]
    xhci.poll()
    assert deliveries(platform) == 2
    xhci.close()


def test_interrupt_moderation_without_timer_is_stored_only(
    platform: SimulatedPlatform, memory: GuestMemory
) -> None:
    clock = FakeClock()
    xhci = Xhci(platform, [UsbKeyboard()], clock=clock)
    d = XhciDriver(xhci, memory)
    d.start(imod=4000)
    d.noop()
    assert deliveries(platform) == 1
    d.noop()  # no time passed: delivered anyway, nothing could wake the device later
    assert deliveries(platform) == 2
    assert d.ir_read(IMOD) & 0xFFFF == 4000
    xhci.close()


# -- slot commands -------------------------------------------------------------------------


def test_enable_slot_until_no_slots(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory)
    d.start(max_slots=2)
    assert [d.enable_slot().slot_id for _ in range(2)] == [1, 2]
    event = d.enable_slot()
    assert (event.code, event.slot_id) == (CC_NO_SLOTS, 0)
    assert d.disable_slot(1).code == CC_SUCCESS
    assert d.enable_slot().slot_id == 1
    # Slot Type 1 does not match the Supported Protocol's slot type (0).
    event = d.command(0, 0, trb_control(ENABLE_SLOT) | 1 << 16)
    assert event is not None and event.code == CC_TRB_ERROR


def test_disable_slot_codes(driver: XhciDriver) -> None:
    slot = driver.enable_slot().slot_id
    assert driver.disable_slot(slot).code == CC_SUCCESS
    assert driver.disable_slot(slot).code == CC_SLOT_NOT_ENABLED
    for bad in (0, 17, 255):
        assert raw_slot_command(driver, 10, bad).code == CC_TRB_ERROR


def test_address_device(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    slot = addressed_slot(driver)
    slot_ctx = driver.output_slot(slot)
    assert slot_ctx[3] >> 27 == SLOT_ADDRESSED
    assert slot_ctx[3] & 0xFF == slot  # the USB address the controller chose
    assert (slot_ctx[1] >> 16) & 0xFF == 1  # root hub port
    assert keyboard.address == slot
    ep0 = driver.output_endpoint(slot, 1)
    assert ep0[0] & 7 == EP_RUNNING
    assert (ep0[1] >> 3) & 7 == EP_CONTROL and ep0[1] >> 16 == 64
    assert driver.control(slot, GET_STATUS).code == CC_SUCCESS


def test_address_device_with_bsr_then_without(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    driver.reset_port(1)
    slot = driver.enable_slot().slot_id
    assert driver.address_device(slot, 1, bsr=True).code == CC_SUCCESS
    assert driver.slot_state(slot) == SLOT_DEFAULT
    assert driver.output_slot(slot)[3] & 0xFF == 0 and keyboard.address == 0
    # In the Default state EP0 works, at address 0.
    result = driver.control(slot, GET_DEVICE_DESCRIPTOR)
    assert result.data[:2] == bytes([18, 1])
    assert driver.address_device(slot, 1, bsr=True).code == CC_CONTEXT_STATE_ERROR
    assert driver.address_device(slot, 1).code == CC_SUCCESS
    assert driver.slot_state(slot) == SLOT_ADDRESSED and keyboard.address == slot
    assert driver.address_device(slot, 1).code == CC_CONTEXT_STATE_ERROR


def _address_with(
    d: XhciDriver,
    slot: int,
    *,
    add: int = 3,
    port: int = 1,
    ep0: list[int] | None = None,
    route: int = 0,
) -> Event:
    ring = d.slots[slot].rings.get(1) or d.new_ring(slot, 1)
    slot_ctx = d.slot_context(port)
    slot_ctx[0] |= route
    ep0 = ep0 or d.endpoint_context(EP_CONTROL, 64, ring.enqueue)
    address = d.write_input(slot, add=add, contexts={0: slot_ctx, 1: ep0})
    return raw_slot_command(d, ADDRESS_DEVICE, slot, address)


def test_address_device_errors(driver: XhciDriver, memory: GuestMemory) -> None:
    driver.reset_port(1)
    slot = driver.enable_slot().slot_id
    ring = driver.new_ring(slot, 1)
    assert _address_with(driver, slot, add=1).code == CC_PARAMETER_ERROR  # A1 missing
    assert _address_with(driver, slot, port=0).code == CC_PARAMETER_ERROR
    assert _address_with(driver, slot, port=9).code == CC_PARAMETER_ERROR
    bulk = driver.endpoint_context(EP_BULK_OUT, 64, ring.base)
    assert _address_with(driver, slot, ep0=bulk).code == CC_PARAMETER_ERROR
    no_packet = driver.endpoint_context(EP_CONTROL, 0, ring.base)
    assert _address_with(driver, slot, ep0=no_packet).code == CC_PARAMETER_ERROR
    nowhere = driver.endpoint_context(EP_CONTROL, 64, OUTSIDE_RAM)
    assert _address_with(driver, slot, ep0=nowhere).code == CC_PARAMETER_ERROR
    # An Input Context Pointer outside guest RAM is a TRB Error.
    assert raw_slot_command(driver, ADDRESS_DEVICE, slot, OUTSIDE_RAM).code == CC_TRB_ERROR
    assert raw_slot_command(driver, ADDRESS_DEVICE, slot, RAM - 512).code == CC_TRB_ERROR
    # No device (ports 3, 5), behind a hub (route string), a port not reset (port 2).
    assert _address_with(driver, slot, port=3).code == CC_USB_TRANSACTION_ERROR
    assert _address_with(driver, slot, port=5).code == CC_USB_TRANSACTION_ERROR
    assert _address_with(driver, slot, route=0x1).code == CC_USB_TRANSACTION_ERROR
    assert _address_with(driver, slot, port=2).code == CC_USB_TRANSACTION_ERROR
    # Disabled slot, bad Slot ID.
    assert raw_slot_command(driver, ADDRESS_DEVICE, 9, driver.slots[slot].input).code == (
        CC_SLOT_NOT_ENABLED
    )
    assert (
        raw_slot_command(driver, ADDRESS_DEVICE, 0, driver.slots[slot].input).code == CC_TRB_ERROR
    )
    # None of that changed the slot: it still addresses.
    assert driver.slot_state(slot) == SLOT_ENABLED
    assert driver.address_device(slot, 1).code == CC_SUCCESS
    # A second slot cannot take the same port.
    other = driver.enable_slot().slot_id
    assert driver.address_device(other, 1).code == CC_TRB_ERROR


def test_output_context_outside_ram_is_host_system_error(
    driver: XhciDriver, memory: GuestMemory
) -> None:
    driver.reset_port(1)
    driver.port_events()
    slot = driver.enable_slot().slot_id
    memory.write_u64(driver.dcbaa + 8 * slot, OUTSIDE_RAM)  # the DCBAA names no RAM
    ring = driver.new_ring(slot, 1)
    address = driver.write_input(
        slot,
        add=3,
        contexts={0: driver.slot_context(1), 1: driver.endpoint_context(EP_CONTROL, 64, ring.base)},
    )
    assert driver.command(address, 0, trb_control(ADDRESS_DEVICE) | slot << 24) is None
    status = driver.usbsts()
    assert status & HSE and status & HCH
    driver.doorbell(0)  # a halted controller ignores doorbells
    assert driver.collect() == []
    driver.start()
    assert driver.noop().code == CC_SUCCESS


def test_configure_endpoint(driver: XhciDriver) -> None:
    slot = addressed_slot(driver)
    assert driver.configure_endpoint(slot, {3: (EP_INTERRUPT_IN, 8)}).code == CC_SUCCESS
    assert driver.slot_state(slot) == SLOT_CONFIGURED
    assert driver.output_slot(slot)[0] >> 27 == 3  # Context Entries
    ep = driver.output_endpoint(slot, 3)
    assert ep[0] & 7 == EP_RUNNING and (ep[1] >> 3) & 7 == EP_INTERRUPT_IN
    # Drop it: disabled, and with no endpoint left the slot is back to Addressed.
    assert driver.configure_endpoint(slot, drop=1 << 3).code == CC_SUCCESS
    assert driver.endpoint_state(slot, 3) == EP_DISABLED
    assert driver.slot_state(slot) == SLOT_ADDRESSED
    # Deconfigure.
    assert driver.configure_endpoint(slot, {3: (EP_INTERRUPT_IN, 8)}).code == CC_SUCCESS
    assert driver.configure_endpoint(slot, deconfigure=True).code == CC_SUCCESS
    assert driver.slot_state(slot) == SLOT_ADDRESSED
    assert driver.endpoint_state(slot, 3) == EP_DISABLED


def test_configure_endpoint_errors(driver: XhciDriver) -> None:
    enabled = driver.enable_slot().slot_id
    assert driver.configure_endpoint(enabled, deconfigure=True).code == CC_CONTEXT_STATE_ERROR
    slot = addressed_slot(driver)
    assert driver.configure_endpoint(slot, {3: (EP_INTERRUPT_IN, 8)}).code == CC_SUCCESS
    # An OUT type at an IN DCI, no max packet size, isochronous: refused, nothing changes.
    assert driver.configure_endpoint(slot, {5: (EP_BULK_OUT, 64)}).code == CC_PARAMETER_ERROR
    assert driver.configure_endpoint(slot, {4: (EP_INTERRUPT_IN, 8)}).code == CC_PARAMETER_ERROR
    assert driver.configure_endpoint(slot, {5: (EP_INTERRUPT_IN, 0)}).code == CC_PARAMETER_ERROR
    assert driver.configure_endpoint(slot, {5: (0, 8)}).code == CC_PARAMETER_ERROR
    assert driver.configure_endpoint(slot, {5: (EP_ISOCH_IN, 8)}).code == CC_RESOURCE_ERROR
    # One bad endpoint fails the command as a whole (the good one is not added either).
    event = driver.configure_endpoint(slot, {5: (EP_INTERRUPT_IN, 8), 7: (EP_INTERRUPT_IN, 0)})
    assert event.code == CC_PARAMETER_ERROR
    driver.doorbell(slot, 5)
    (not_enabled,) = driver.transfer_events()
    assert (not_enabled.code, not_enabled.endpoint_id) == (CC_EP_NOT_ENABLED, 5)
    assert driver.endpoint_state(slot, 3) == EP_RUNNING
    # Streams (MaxPStreams) and a dequeue pointer outside RAM.
    ring = driver.new_ring(slot, 5)
    streams = driver.endpoint_context(EP_INTERRUPT_IN, 8, ring.base)
    streams[0] |= 1 << 10
    address = driver.write_input(
        slot, add=1 | 1 << 5, contexts={0: driver.slot_context(1), 5: streams}
    )
    assert raw_slot_command(driver, CONFIGURE_ENDPOINT, slot, address).code == CC_PARAMETER_ERROR
    outside = driver.endpoint_context(EP_INTERRUPT_IN, 8, OUTSIDE_RAM)
    address = driver.write_input(
        slot, add=1 | 1 << 5, contexts={0: driver.slot_context(1), 5: outside}
    )
    assert raw_slot_command(driver, CONFIGURE_ENDPOINT, slot, address).code == CC_PARAMETER_ERROR
    assert raw_slot_command(driver, CONFIGURE_ENDPOINT, slot, OUTSIDE_RAM).code == CC_TRB_ERROR
    assert driver.endpoint_state(slot, 3) == EP_RUNNING


def test_evaluate_context(driver: XhciDriver) -> None:
    enabled = driver.enable_slot().slot_id
    driver.new_ring(enabled, 1)
    assert driver.evaluate_context(enabled, max_packet=8).code == CC_CONTEXT_STATE_ERROR
    slot = addressed_slot(driver)
    assert driver.evaluate_context(slot, max_packet=8).code == CC_SUCCESS
    assert driver.output_endpoint(slot, 1)[1] >> 16 == 8
    assert driver.evaluate_context(slot, max_packet=0).code == CC_PARAMETER_ERROR
    assert driver.output_endpoint(slot, 1)[1] >> 16 == 8
    assert driver.control(slot, GET_STATUS).code == CC_SUCCESS


def test_stop_endpoint_and_restart(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    slot = driver.enumerate(1)
    # Idle endpoint: stops, no Transfer Event.
    assert driver.stop_endpoint(slot, 1).code == CC_SUCCESS
    assert driver.endpoint_state(slot, 1) == EP_STOPPED
    assert driver.transfer_events() == []
    assert driver.stop_endpoint(slot, 1).code == CC_CONTEXT_STATE_ERROR
    # A doorbell restarts it.
    assert driver.control(slot, GET_STATUS).code == CC_SUCCESS
    assert driver.endpoint_state(slot, 1) == EP_RUNNING
    # An interrupt IN TD being polled is stopped with nothing transferred.
    trb, _ = driver.queue_normal(slot, 3, 8)
    assert driver.transfer_events() == []
    event = driver.stop_endpoint(slot, 3)
    (stopped,) = driver.transfer_events()
    assert (stopped.code, stopped.parameter, stopped.length) == (CC_STOPPED, trb, 8)
    assert event.code == CC_SUCCESS
    ctx = driver.output_endpoint(slot, 3)
    assert ctx[0] & 7 == EP_STOPPED and (ctx[2] & ~0xF) | ctx[3] << 32 == trb
    # Endpoint ID 0 and a disabled endpoint.
    assert driver.stop_endpoint(slot, 0).code == CC_TRB_ERROR
    assert driver.stop_endpoint(slot, 5).code == CC_CONTEXT_STATE_ERROR
    # Data that arrives while stopped waits for the restart.
    keyboard.key_event(30, True)
    assert driver.transfer_events() == []
    driver.doorbell(slot, 3)
    (done,) = driver.transfer_events()
    assert (done.code, done.parameter) == (CC_SUCCESS, trb)


def test_stall_halts_ep0_reset_endpoint_and_set_dequeue(driver: XhciDriver) -> None:
    slot = driver.enumerate(1)
    assert driver.reset_endpoint(slot, 1).code == CC_CONTEXT_STATE_ERROR  # not halted
    qualifier = SetupPacket(0x80, 0x06, 0x0600, 0, 10)  # a full-speed-only device stalls it
    result = driver.control(slot, qualifier)
    (stall,) = result.events
    assert stall.code == CC_STALL_ERROR and stall.length == 10
    assert driver.endpoint_state(slot, 1) == EP_HALTED
    # While halted, a doorbell moves nothing.
    pending = driver.control(slot, GET_STATUS, ring_doorbell=False)
    assert pending.events == []
    driver.doorbell(slot, 1)
    assert driver.transfer_events() == []
    assert driver.set_tr_dequeue(slot, 1, 0x20000, 1).code == CC_CONTEXT_STATE_ERROR
    assert driver.reset_endpoint(slot, 1).code == CC_SUCCESS
    assert driver.endpoint_state(slot, 1) == EP_STOPPED
    # Skip to the enqueue pointer (past the stalled TD and the one queued meanwhile).
    assert driver.skip_to_enqueue(slot, 1).code == CC_SUCCESS
    ring = driver.slots[slot].rings[1]
    ctx = driver.output_endpoint(slot, 1)
    assert ctx[2] == (ring.enqueue | ring.cycle) and ctx[0] & 7 == EP_STOPPED
    assert driver.control(slot, GET_STATUS).code == CC_SUCCESS


def test_set_tr_dequeue_errors(driver: XhciDriver) -> None:
    slot = driver.enumerate(1)
    ring = driver.slots[slot].rings[3]
    assert driver.set_tr_dequeue(slot, 3, ring.base, 1).code == CC_CONTEXT_STATE_ERROR  # running
    assert driver.stop_endpoint(slot, 3).code == CC_SUCCESS
    assert driver.set_tr_dequeue(slot, 3, OUTSIDE_RAM, 1).code == CC_TRB_ERROR
    assert driver.set_tr_dequeue(slot, 3, ring.base, 1, stream=1).code == CC_INVALID_STREAM_ID
    assert driver.set_tr_dequeue(slot, 0, ring.base, 1).code == CC_TRB_ERROR
    assert driver.set_tr_dequeue(slot, 7, ring.base, 1).code == CC_CONTEXT_STATE_ERROR
    assert driver.set_tr_dequeue(17, 3, ring.base, 1).code == CC_TRB_ERROR
    assert driver.set_tr_dequeue(9, 3, ring.base, 1).code == CC_SLOT_NOT_ENABLED
    assert driver.set_tr_dequeue(slot, 3, ring.base, 1).code == CC_SUCCESS


def test_reset_device(driver: XhciDriver) -> None:
    slot = driver.enumerate(1)
    assert driver.reset_device(slot).code == CC_SUCCESS
    ctx = driver.output_slot(slot)
    assert ctx[3] >> 27 == SLOT_DEFAULT and ctx[3] & 0xFF == 0 and ctx[0] >> 27 == 1
    assert driver.endpoint_state(slot, 3) == EP_DISABLED
    assert driver.reset_device(slot).code == CC_CONTEXT_STATE_ERROR
    # The device is addressed again after a port reset, as Linux does it.
    driver.reset_port(1)
    assert driver.address_device(slot, 1).code == CC_SUCCESS


# -- transfers -----------------------------------------------------------------------------


def test_control_transfers_wrap_the_ep0_ring(xhci: Xhci, memory: GuestMemory) -> None:
    d = XhciDriver(xhci, memory, transfer_ring_trbs=8)  # 7 TRBs: two transfers and a bit
    d.start()
    slot = addressed_slot(d)
    ring = d.slots[slot].rings[1]
    cycles = []
    for _ in range(7):
        result = d.control(slot, GET_STATUS)
        assert result.code == CC_SUCCESS and result.data == b"\0\0"
        cycles.append(ring.cycle)
    assert 0 in cycles and 1 in cycles  # the ring went around through its Link TRB


def test_short_packet_event_data_and_chained_normal(
    driver: XhciDriver, memory: GuestMemory, keyboard: UsbKeyboard
) -> None:
    slot = addressed_slot(driver)
    ring = driver.slots[slot].rings[1]
    first = driver.arena.alloc(16)
    second = driver.arena.alloc(64)
    setup = SetupPacket(0x80, 0x06, 0x0100, 0, 80)
    trbs = [
        (int.from_bytes(setup.pack(), "little"), 8, trb_control(SETUP, IDT | 3 << 16)),
        (first, 16, trb_control(DATA, DIR_IN | CH)),
        (second, 64, trb_control(NORMAL, ISP | CH)),
        (0xCAFE, 0, trb_control(EVENT_DATA, IOC | CH)),
        (0, 0, trb_control(STATUS, IOC)),
    ]
    addresses = ring.push_td(trbs)
    driver.doorbell(slot, 1)
    events = driver.transfer_events()
    # 18 bytes: 16 in the Data Stage TRB, 2 in the Normal TRB (short: 62 left).
    assert [(e.parameter, e.code, e.length, e.event_data) for e in events] == [
        (addresses[2], CC_SHORT_PACKET, 62, False),
        (0xCAFE, CC_SHORT_PACKET, 18, True),  # EDTLA: what moved since the TD began
        (addresses[4], CC_SUCCESS, 0, False),
    ]
    assert memory.read(first, 16) + memory.read(second, 2) == keyboard.device_desc


def test_immediate_data_out_and_noop_trb(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    slot = driver.enumerate(1)
    set_report = SetupPacket(0x21, 0x09, 0x0200, 0, 1)  # SET_REPORT(Output): the LEDs
    assert driver.control(slot, set_report, b"\x03").code == CC_SUCCESS
    assert keyboard.leds == 3
    ring = driver.slots[slot].rings[1]
    (noop,) = ring.push_td([(0, 0, trb_control(NOOP, IOC))])
    driver.doorbell(slot, 1)
    (event,) = driver.transfer_events()
    assert (event.parameter, event.code) == (noop, CC_SUCCESS)


class EchoDevice(UsbDevice):
    """A vendor-class device with a bulk OUT endpoint (0x02) and a bulk IN endpoint (0x81)
    that records what it is sent and sends back what a test gives it."""

    def __init__(self) -> None:
        endpoints = (Endpoint(0x02, 2, 64, 0), Endpoint(0x81, 2, 64, 0))
        body = interface_descriptor(
            number=0, endpoints=2, interface_class=0xFF, subclass=0, protocol=0
        ) + b"".join(endpoint_descriptor(ep) for ep in endpoints)
        super().__init__(
            name="echo",
            speed=UsbSpeed.FULL,
            device=device_descriptor(
                bcd_usb=0x0110,
                device_class=0xFF,
                subclass=0,
                protocol=0,
                max_packet0=64,
                vendor=0x1209,
                product=0x0003,
                bcd_device=0x0100,
                manufacturer=0,
                product_string=0,
                serial=0,
            ),
            configuration=configuration_descriptor(
                value=1, interfaces=1, attributes=0, max_power_ma=100, body=body
            ),
            endpoints=endpoints,
        )
        self.received: list[bytes] = []
        self.to_send: list[bytes] = []

    def class_request(self, setup: SetupPacket, data: bytes) -> bytes | Handshake:
        if setup.request_type == 0x40:  # vendor, OUT, device
            self.received.append(data)
            return b""
        return Handshake.STALL

    def transfer_out(self, endpoint: int, data: bytes) -> Handshake | None:
        if endpoint != 2:
            return Handshake.STALL
        self.received.append(data)
        return None

    def transfer_in(self, endpoint: int, max_length: int) -> bytes | Handshake:
        if endpoint != 1:
            return Handshake.STALL
        return self.to_send.pop(0) if self.to_send else Handshake.NAK


def test_out_transfers_and_their_bounds(platform: SimulatedPlatform, memory: GuestMemory) -> None:
    echo = EchoDevice()
    xhci = Xhci(platform, [echo])
    d = XhciDriver(xhci, memory)
    d.start()
    slot = addressed_slot(d)
    # A control OUT whose Data Stage offers more than wLength: the device gets wLength.
    ring = d.slots[slot].rings[1]
    buffer = d.arena.alloc(100)
    memory.write(buffer, bytes(range(100)))
    setup = int.from_bytes(SetupPacket(0x40, 0x01, 0, 0, 10).pack(), "little")
    ring.push_td(
        [
            (setup, 8, trb_control(SETUP, IDT | 2 << 16)),
            (buffer, 60, trb_control(DATA, CH)),
            (buffer + 60, 40, trb_control(NORMAL)),
            (0, 0, trb_control(STATUS, DIR_IN | IOC)),
        ]
    )
    d.doorbell(slot, 1)
    assert [e.code for e in d.transfer_events()] == [CC_SUCCESS]
    assert echo.received == [bytes(range(10))]
    # Bulk OUT: a TD of two 64 KiB TRBs hands the device 64 KiB, and both TRBs complete.
    assert d.configure_endpoint(slot, {4: (EP_BULK_OUT, 64), 3: (6, 64)}).code == CC_SUCCESS
    echo.received.clear()
    big = d.arena.alloc(0x10000)
    memory.write(big, b"\xab" * 0x10000)
    out = d.slots[slot].rings[4]
    _, second = out.push_td(
        [(big, 0x10000, trb_control(NORMAL, CH)), (big, 0x10000, trb_control(NORMAL, IOC))]
    )
    d.doorbell(slot, 4)
    (event,) = d.transfer_events()
    assert (event.code, event.parameter) == (CC_SUCCESS, second)
    assert echo.received == [b"\xab" * 0x10000]
    # Bulk IN with a chained Event Data TRB: NAK until data, then the event carries EDTLA.
    inbound = d.slots[slot].rings[3]
    target = d.arena.alloc(64)
    inbound.push_td(
        [(target, 64, trb_control(NORMAL, CH)), (0x1234, 0, trb_control(EVENT_DATA, IOC))]
    )
    d.doorbell(slot, 3)
    assert d.transfer_events() == []
    echo.to_send.append(b"hello")
    echo.notify(1)
    (event,) = d.transfer_events()
    assert (event.code, event.parameter, event.length, event.event_data) == (
        CC_SHORT_PACKET,
        0x1234,
        5,
        True,
    )
    assert memory.read(target, 5) == b"hello"
    xhci.close()


def test_doorbells_for_nothing(driver: XhciDriver, xhci: Xhci) -> None:
    slot = driver.enumerate(1)
    # A disabled endpoint: Endpoint Not Enabled, no TRB pointer (4.7).
    driver.doorbell(slot, 5)
    (event,) = driver.transfer_events()
    assert (event.code, event.parameter, event.endpoint_id) == (CC_EP_NOT_ENABLED, 0, 5)
    before = xhci.guest_errors.count + xhci.bad_accesses.count
    driver.doorbell(slot, 0)  # target 0 is reserved for slots
    driver.doorbell(slot, 32)
    driver.doorbell(slot, 3 | 1 << 16)  # a stream ID on an endpoint without streams
    driver.doorbell(9, 1)  # a disabled slot
    driver.doorbell(0, 5)  # the command doorbell takes only 0
    xhci.write(0x2000 + 4 * 17, 4, 1)  # past the doorbell array
    assert driver.collect() == []
    assert xhci.guest_errors.count + xhci.bad_accesses.count == before + 6


# -- hostile TRBs --------------------------------------------------------------------------


def test_normal_trb_buffer_outside_ram_halts_with_trb_error(driver: XhciDriver) -> None:
    slot = driver.enumerate(1)
    ring = driver.slots[slot].rings[3]
    (trb,) = ring.push_td([(RAM - 4, 8, trb_control(NORMAL, ISP | IOC))])
    driver.doorbell(slot, 3)
    (event,) = driver.transfer_events()
    assert (event.code, event.parameter) == (CC_TRB_ERROR, trb)
    assert driver.endpoint_state(slot, 3) == EP_HALTED


@pytest.mark.parametrize(
    "trb",
    [
        (0x8000, 0x10001, trb_control(NORMAL, IOC)),  # longer than 64 KiB
        (0x8000, 8, trb_control(NORMAL, IOC | IDT)),  # Immediate Data on an IN endpoint
        (0x8000, 8, trb_control(SETUP, IOC | IDT)),  # a Setup Stage on an interrupt endpoint
        (0x8000, 8, trb_control(5, IOC)),  # isochronous
        (0x8000, 8, trb_control(ENABLE_SLOT, IOC)),  # a command TRB
        (0x8000, 8, trb_control(0, IOC)),  # reserved type 0
    ],
)
def test_bad_transfer_trbs_halt_with_trb_error(
    driver: XhciDriver, trb: tuple[int, int, int]
) -> None:
    slot = driver.enumerate(1)
    (address,) = driver.slots[slot].rings[3].push_td([trb])
    driver.doorbell(slot, 3)
    (event,) = driver.transfer_events()
    assert (event.code, event.parameter) == (CC_TRB_ERROR, address)
    assert driver.endpoint_state(slot, 3) == EP_HALTED
    # Recoverable as the spec intends: Reset Endpoint, Set TR Dequeue Pointer.
    assert driver.reset_endpoint(slot, 3).code == CC_SUCCESS
    assert driver.skip_to_enqueue(slot, 3).code == CC_SUCCESS


@pytest.mark.parametrize(
    "setup_trb",
    [
        (0, 8, trb_control(SETUP)),  # no Immediate Data
        (0, 7, trb_control(SETUP, IDT)),  # not 8 bytes
    ],
)
def test_bad_setup_stage(driver: XhciDriver, setup_trb: tuple[int, int, int]) -> None:
    slot = addressed_slot(driver)
    ring = driver.slots[slot].rings[1]
    addresses = ring.push_td([setup_trb, (0, 0, trb_control(STATUS, DIR_IN | IOC))])
    driver.doorbell(slot, 1)
    (event,) = driver.transfer_events()
    assert (event.code, event.parameter) == (CC_TRB_ERROR, addresses[0])
    assert driver.endpoint_state(slot, 1) == EP_HALTED


def test_data_stage_in_wrong_direction(driver: XhciDriver) -> None:
    slot = addressed_slot(driver)
    ring = driver.slots[slot].rings[1]
    buffer = driver.arena.alloc(64)
    setup = int.from_bytes(GET_DEVICE_DESCRIPTOR.pack(), "little")
    addresses = ring.push_td(
        [
            (setup, 8, trb_control(SETUP, IDT | 3 << 16)),
            (buffer, 64, trb_control(DATA)),  # OUT data for an IN request
            (0, 0, trb_control(STATUS, IOC)),
        ]
    )
    driver.doorbell(slot, 1)
    (event,) = driver.transfer_events()
    assert (event.code, event.parameter) == (CC_TRB_ERROR, addresses[1])


def test_transfer_ring_link_loop(driver: XhciDriver) -> None:
    slot = driver.enumerate(1)
    ring = driver.slots[slot].rings[3]
    here = ring.enqueue
    ring.write_trb(here, here, 0, trb_control(LINK) | ring.cycle)  # a Link to itself
    driver.doorbell(slot, 3)
    (event,) = driver.transfer_events()
    assert (event.code, event.parameter) == (CC_TRB_ERROR, here)
    assert driver.endpoint_state(slot, 3) == EP_HALTED


def test_command_ring_link_loop(driver: XhciDriver) -> None:
    ring = driver.command_ring
    assert ring is not None
    here = ring.enqueue
    ring.write_trb(here, here, 0, trb_control(LINK) | ring.cycle)
    driver.doorbell(0)
    (event,) = driver.collect()
    assert (event.code, event.parameter) == (CC_TRB_ERROR, here)
    assert not driver.usbsts() & HCH  # the controller keeps running
    driver.doorbell(0)  # the loop is still there: same answer, still no hang
    assert [e.code for e in driver.collect()] == [CC_TRB_ERROR]


def test_command_ring_outside_ram_is_host_system_error(driver: XhciDriver) -> None:
    driver.op_write(USBCMD, 0)  # stop so CRCR takes a pointer
    driver.op_write64(CRCR, OUTSIDE_RAM | 1)
    driver.run()
    driver.doorbell(0)
    status = driver.usbsts()
    assert status & HSE and status & HCH
    driver.run()  # R/S does not restart a controller after HSE; HCRST does
    assert driver.usbsts() & HCH


def test_transfer_ring_link_outside_ram_is_host_system_error(driver: XhciDriver) -> None:
    slot = driver.enumerate(1)
    ring = driver.slots[slot].rings[3]
    ring.write_trb(ring.enqueue, OUTSIDE_RAM, 0, trb_control(LINK) | ring.cycle)
    driver.doorbell(slot, 3)
    assert driver.usbsts() & HSE


def test_babble(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    slot = driver.enumerate(1)
    trb, _ = driver.queue_normal(slot, 3, 4)  # room for 4 bytes; the report has 8
    keyboard.key_event(30, True)
    (event,) = driver.transfer_events()
    assert (event.code, event.parameter) == (CC_BABBLE, trb)
    assert driver.endpoint_state(slot, 3) == EP_HALTED


def test_random_garbage_never_raises(
    xhci: Xhci, memory: GuestMemory, keyboard: UsbKeyboard
) -> None:
    rng = random.Random(1234)
    d = XhciDriver(xhci, memory)
    for round_ in range(30):
        d = XhciDriver(xhci, memory)
        d.start()
        slot = d.enumerate(1) if round_ % 2 else 0
        # Garbage TRBs in the command ring and on the endpoints, garbage registers.
        ring = d.command_ring
        assert ring is not None
        for _ in range(8):
            ring.push_raw(rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(32))
        d.doorbell(0)
        if slot:
            for dci in (1, 3):
                tr = d.slots[slot].rings[dci]
                for _ in range(5):
                    tr.push_raw(rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(32))
                d.doorbell(slot, dci)
            keyboard.key_event(rng.randrange(256), rng.random() < 0.5)
        for _ in range(100):
            offset = rng.randrange(0x4000) & ~3
            if offset == OP + USBCMD:
                continue  # keep the controller running more often than not
            xhci.write(offset, 4, rng.getrandbits(32))
            xhci.read(rng.randrange(0x4000) & ~3, 4)
        for _ in range(4):
            d.doorbell(rng.randrange(17), rng.getrandbits(32))
    assert xhci.internal_errors.count == 0


# -- ports ---------------------------------------------------------------------------------


def test_port_reset_and_change_bits(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    keyboard.address = 5  # a bus reset puts the device back to address 0
    assert driver.portsc(1) & CSC
    driver.write_portsc(1, PP | CSC)  # acknowledge the connect change
    assert not driver.portsc(1) & CSC
    driver.write_portsc(1, PP | PR)
    after = driver.portsc(1)
    assert after & (PED | PRC | CCS) == PED | PRC | CCS
    assert not after & PR and pls(after) == 0  # U0
    assert keyboard.address == 0
    (event,) = driver.port_events()
    assert (event.port_id, event.code) == (1, CC_SUCCESS)
    assert driver.usbsts() & PCD
    driver.write_portsc(1, PP | PRC)
    assert not driver.portsc(1) & PRC
    # A second change while PRC is still set is no new event, a cleared one is.
    driver.write_portsc(1, PP | PR)
    assert len(driver.port_events()) == 1
    driver.write_portsc(1, PP | PR)
    assert driver.port_events() == []
    # Writing 1 to PED disables the port; transfers then fail.
    driver.write_portsc(1, PP | PED)
    assert not driver.portsc(1) & PED
    # Resetting an empty port does nothing.
    driver.write_portsc(3, PP | PR)
    assert driver.portsc(3) & (PED | PRC) == 0


def test_port_without_enable_fails_transfers(driver: XhciDriver) -> None:
    slot = driver.enumerate(1)
    driver.write_portsc(1, PP | PED)  # disable the port
    (event,) = driver.control(slot, GET_STATUS).events
    assert event.code == CC_USB_TRANSACTION_ERROR


def test_suspend_resume_and_remote_wakeup(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    slot = driver.enumerate(1)
    set_wakeup = SetupPacket(0x00, 0x03, 1, 0, 0)  # SET_FEATURE(DEVICE_REMOTE_WAKEUP)
    assert driver.control(slot, set_wakeup).code == CC_SUCCESS
    driver.port_events()
    driver.write_portsc(1, PP | LWS | 3 << 5)  # suspend: U3
    assert pls(driver.portsc(1)) == 3
    trb, buffer = driver.queue_normal(slot, 3, 8)
    keyboard.key_event(30, True)  # a key press wakes the bus
    assert driver.transfer_events() == []
    portsc = driver.portsc(1)
    assert pls(portsc) == 15 and portsc & PLC  # Resume, link state change
    (event,) = driver.port_events()
    assert event.port_id == 1
    driver.write_portsc(1, PP | PLC)
    driver.write_portsc(1, PP | LWS)  # software finishes the resume: U0
    assert pls(driver.portsc(1)) == 0
    driver.port_events()
    (done,) = driver.transfer_events()
    assert (done.code, done.parameter) == (CC_SUCCESS, trb)
    assert driver.memory.read(buffer, 8) == bytes([0, 0, 0x04, 0, 0, 0, 0, 0])


def test_key_events_from_another_thread(driver: XhciDriver, keyboard: UsbKeyboard) -> None:
    slot = driver.enumerate(1)
    buffers = []
    presses = [(code, down) for code in range(30, 40) for down in (True, False)]

    def typist() -> None:
        for code, down in presses:
            keyboard.key_event(code, down)

    thread = threading.Thread(target=typist)
    thread.start()
    for _ in range(len(presses)):
        buffers.append(driver.queue_normal(slot, 3, 8)[1])
    thread.join(timeout=10)
    assert not thread.is_alive()
    events = driver.transfer_events()
    reports = [driver.memory.read(b, 8) for b in buffers[: len(events)]]
    # Every report delivered is a real keyboard state, in order, ending with all keys up
    # once every TD is completed (the queue keeps what the guest has not asked for yet).
    assert all(e.code == CC_SUCCESS for e in events)
    while len(events) < len(presses) and keyboard.pending_reports:
        buffers.append(driver.queue_normal(slot, 3, 8)[1])
        events += driver.transfer_events()
    delivered = [driver.memory.read(b, 8) for b in buffers[: len(events)]]
    assert delivered[: len(reports)] == reports
    assert delivered[-1] == bytes(8)
    # Keys went down and up one at a time: every report shows at most one key.
    for report in delivered:
        assert report[:2] == b"\0\0" and report[3:] == bytes(5)
        assert report[2] in (0, *range(0x04, 0x28))
