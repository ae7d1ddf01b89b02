"""A synthetic xHCI driver: lays the controller's data structures out in guest RAM and plays
the guest's side of the rings, for tests of :mod:`iovirt.devices.xhci` and its USB devices,
and for the fuzzer.

Like :mod:`iovirt.testing.virtio_driver`, it writes TRBs, contexts and the segment table
straight into a :class:`~iovirt.memory.GuestMemory` and talks to the controller at its BAR0
offsets (:meth:`Xhci.read` / :meth:`Xhci.write`) and through config space, so the controller
under test reads exactly what a real driver would have written. It follows the sequences
Linux's ``xhci_hcd`` uses, in small pieces a test can stop between:

- :meth:`XhciDriver.start`: DCBAA, command ring, event ring (ERST of any number of segments),
  MSI-X or INTx, Run/Stop;
- :meth:`XhciDriver.command` and the named commands (:meth:`enable_slot`,
  :meth:`address_device`, ...) build the TRB (and input context), ring doorbell 0 and return
  the Command Completion Event;
- :meth:`XhciDriver.control` runs a control transfer on endpoint 0 and
  :meth:`XhciDriver.queue_normal` queues a Normal TRB on any endpoint;
- :meth:`XhciDriver.events` consumes the event ring by its cycle bit and moves ERDP (clearing
  EHB), as an interrupt handler does;
- :class:`ProducerRing` is a ring the driver produces (command or transfer), one segment
  closed by a Link TRB with Toggle Cycle; :meth:`ProducerRing.push_raw` writes any TRB for
  hostile tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from iovirt.bus.msix import PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE
from iovirt.bus.pci import (
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
)
from iovirt.devices.usb import SetupPacket
from iovirt.devices.xhci import (
    ADD_EP0,
    ADD_SLOT,
    CAP_LENGTH,
    CONTEXT_SIZE,
    DEVICE_CONTEXT_SIZE,
    DOORBELL_OFFSET,
    EP_CTX_MAX_PACKET_SHIFT,
    EP_CTX_TYPE_SHIFT,
    ERDP_EHB,
    EVENT_CC_SHIFT,
    EVENT_TRB_ED,
    IMAN_IE,
    INPUT_CONTEXT_SIZE,
    MAX_SLOTS,
    MSIX_TABLE_OFFSET,
    PORTSC_CHANGE,
    PORTSC_PED,
    PORTSC_PR,
    PORTSC_SPEED_MASK,
    PORTSC_SPEED_SHIFT,
    RUNTIME_OFFSET,
    SLOT_CTX_ENTRIES_SHIFT,
    SLOT_CTX_PORT_SHIFT,
    TRB_BSR,
    TRB_CYCLE,
    TRB_DC,
    TRB_DIR_IN,
    TRB_EP_MASK,
    TRB_EP_SHIFT,
    TRB_IDT,
    TRB_IOC,
    TRB_ISP,
    TRB_SIZE,
    TRB_SLOT_SHIFT,
    TRB_TC,
    TRB_TYPE_MASK,
    TRB_TYPE_SHIFT,
    USBCMD_HCRST,
    USBCMD_INTE,
    USBCMD_RS,
    XHCI_CONFIG,
    XHCI_CRCR,
    XHCI_DCBAAP,
    XHCI_ERDP,
    XHCI_ERSTBA,
    XHCI_ERSTSZ,
    XHCI_IMAN,
    XHCI_IMOD,
    XHCI_IR0,
    XHCI_PORT_BASE,
    XHCI_PORT_STRIDE,
    XHCI_USBCMD,
    XHCI_USBSTS,
    CompletionCode,
    EpType,
    TrbType,
    Xhci,
)
from iovirt.memory import GuestMemory

_TRB = struct.Struct("<QII")

# Where the driver points MSI-X vector 0 (the message is only recorded in tests).
MSI_ADDRESS = 0xFEE0_0000
MSI_DATA = 0x4041

# Setup Stage TRB Transfer Type (TRT) values.
TRT_NO_DATA = 0
TRT_OUT = 2
TRT_IN = 3
TRT_SHIFT = 16


def trb_control(kind: int, flags: int = 0) -> int:
    """A TRB's control dword without the cycle bit."""
    return kind << TRB_TYPE_SHIFT | flags


@dataclass(frozen=True)
class Event:
    """One event TRB the controller wrote."""

    address: int  # where in the event ring
    parameter: int
    status: int
    control: int

    @property
    def type(self) -> int:
        return (self.control >> TRB_TYPE_SHIFT) & TRB_TYPE_MASK

    @property
    def code(self) -> int:
        return self.status >> EVENT_CC_SHIFT

    @property
    def length(self) -> int:
        """TRB Transfer Length (residual) of a Transfer Event."""
        return self.status & 0xFF_FFFF

    @property
    def slot_id(self) -> int:
        return self.control >> TRB_SLOT_SHIFT

    @property
    def endpoint_id(self) -> int:
        return (self.control >> TRB_EP_SHIFT) & TRB_EP_MASK

    @property
    def event_data(self) -> bool:
        return bool(self.control & EVENT_TRB_ED)

    @property
    def port_id(self) -> int:
        return (self.parameter >> 24) & 0xFF

    def __repr__(self) -> str:
        try:
            kind = TrbType(self.type).name
        except ValueError:
            kind = str(self.type)
        try:
            code = CompletionCode(self.code).name
        except ValueError:
            code = str(self.code)
        return (
            f"Event({kind}, {code}, ptr={self.parameter:#x}, len={self.length}, "
            f"slot={self.slot_id}, ep={self.endpoint_id})"
        )


class Arena:
    """A bump allocator over guest addresses ``[start, end)``."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, length: int, align: int = 64) -> int:
        address = (self.next + align - 1) // align * align
        if address + length > self.end:
            raise MemoryError(f"driver arena has no {length} free bytes")
        self.next = address + length
        return address


class ProducerRing:
    """A ring the driver produces: ``size`` TRBs, the last a Link TRB back to the start
    with Toggle Cycle."""

    def __init__(self, memory: GuestMemory, base: int, size: int) -> None:
        if size < 2:
            raise ValueError("a ring needs room for a TRB and its Link TRB")
        self.memory = memory
        self.base = base
        self.size = size
        self.index = 0
        self.cycle = 1
        memory.fill(base, size * TRB_SIZE, 0)

    @property
    def enqueue(self) -> int:
        return self.base + self.index * TRB_SIZE

    def write_trb(self, address: int, parameter: int, status: int, control: int) -> None:
        """Write a TRB, the dword with the cycle bit last."""
        self.memory.write(address, struct.pack("<QI", parameter, status))
        self.memory.write_u32(address + 12, control)

    def push_raw(self, parameter: int, status: int, control: int) -> int:
        """Write a TRB with the producer's cycle bit at the enqueue pointer; returns its
        address. Wraps through the Link TRB (written with the current cycle) when full."""
        address = self.enqueue
        self.write_trb(address, parameter, status, (control & ~TRB_CYCLE) | self.cycle)
        self.index += 1
        if self.index == self.size - 1:
            link = trb_control(TrbType.LINK, TRB_TC) | self.cycle
            self.write_trb(self.enqueue, self.base, 0, link)
            self.index = 0
            self.cycle ^= 1
        return address

    def push_td(self, trbs: list[tuple[int, int, int]]) -> list[int]:
        """Queue a TD so the controller sees it whole: every TRB is written, and the first
        one's cycle bit is flipped to valid last (what Linux does)."""
        addresses = []
        first: tuple[int, int, int, int] | None = None
        for parameter, status, control in trbs:
            cycle = self.cycle
            address = self.push_raw(parameter, status, control)
            if first is None:
                # Hide the head until the rest is written.
                first = (address, parameter, status, (control & ~TRB_CYCLE) | cycle)
                self.write_trb(address, parameter, status, first[3] ^ TRB_CYCLE)
            addresses.append(address)
        if first is not None:
            self.write_trb(*first)
        return addresses


@dataclass
class ControlResult:
    """What a control transfer returned."""

    events: list[Event]
    data: bytes  # IN data the device delivered (the buffer up to what was transferred)

    @property
    def code(self) -> int:
        """The completion code of the last event (the Status Stage's, if all went well)."""
        return self.events[-1].code if self.events else CompletionCode.INVALID


@dataclass
class SlotInfo:
    output: int  # output device context
    input: int  # the input context the driver reuses for this slot
    rings: dict[int, ProducerRing] = field(default_factory=dict)  # by DCI


class XhciDriver:
    """The guest's side of an :class:`Xhci`; see the module docstring.

    Guest RAM ``[base, base + size)`` is the driver's to allocate from.
    """

    def __init__(
        self,
        xhci: Xhci,
        memory: GuestMemory,
        *,
        base: int = 0x10000,
        size: int = 0x70000,
        command_ring_trbs: int = 16,
        transfer_ring_trbs: int = 16,
    ) -> None:
        self.xhci = xhci
        self.memory = memory
        self.arena = Arena(base, base + size)
        self.command_ring_trbs = command_ring_trbs
        self.transfer_ring_trbs = transfer_ring_trbs
        self.command_ring: ProducerRing | None = None
        self.dcbaa = 0
        self.segments: list[tuple[int, int]] = []
        self.erst = 0
        self.dequeue = 0  # flat index of the next event to read
        self.cycle = 1  # the consumer cycle state
        self.slots: dict[int, SlotInfo] = {}
        self.backlog: list[Event] = []  # events read but not yet claimed by a caller

    # -- registers -------------------------------------------------------------------------

    def op_read(self, offset: int) -> int:
        return self.xhci.read(CAP_LENGTH + offset, 4)

    def op_write(self, offset: int, value: int) -> None:
        self.xhci.write(CAP_LENGTH + offset, 4, value)

    def op_write64(self, offset: int, value: int) -> None:
        """Low dword, then high dword, as Linux's xhci_write_64 does."""
        self.op_write(offset, value & 0xFFFF_FFFF)
        self.op_write(offset + 4, value >> 32)

    def ir_read(self, register: int, interrupter: int = 0) -> int:
        return self.xhci.read(RUNTIME_OFFSET + XHCI_IR0 + 0x20 * interrupter + register, 4)

    def ir_write(self, register: int, value: int, interrupter: int = 0) -> None:
        self.xhci.write(RUNTIME_OFFSET + XHCI_IR0 + 0x20 * interrupter + register, 4, value)

    def ir_write64(self, register: int, value: int) -> None:
        self.ir_write(register, value & 0xFFFF_FFFF)
        self.ir_write(register + 4, value >> 32)

    def doorbell(self, index: int, value: int = 0) -> None:
        self.xhci.write(DOORBELL_OFFSET + 4 * index, 4, value)

    def portsc(self, port: int) -> int:
        return self.op_read(XHCI_PORT_BASE + XHCI_PORT_STRIDE * (port - 1))

    def write_portsc(self, port: int, value: int) -> None:
        self.op_write(XHCI_PORT_BASE + XHCI_PORT_STRIDE * (port - 1), value)

    def config_enable(self, *, msix: bool) -> None:
        """Memory decoding and bus mastering on; MSI-X vector 0 programmed and enabled, or
        INTx left on."""
        command = self.xhci.config_read(PCI_COMMAND, 2)
        command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        command &= ~PCI_COMMAND_INTX_DISABLE
        self.xhci.config_write(PCI_COMMAND, 2, command)
        if not msix:
            return
        self.xhci.write(MSIX_TABLE_OFFSET, 4, MSI_ADDRESS)
        self.xhci.write(MSIX_TABLE_OFFSET + 4, 4, 0)
        self.xhci.write(MSIX_TABLE_OFFSET + 8, 4, MSI_DATA)
        self.xhci.write(MSIX_TABLE_OFFSET + 12, 4, 0)  # unmasked
        cap = self.find_capability(PCI_CAP_ID_MSIX)
        control = self.xhci.config_read(cap + PCI_MSIX_FLAGS, 2)
        self.xhci.config_write(cap + PCI_MSIX_FLAGS, 2, control | PCI_MSIX_FLAGS_ENABLE)

    def find_capability(self, cap_id: int) -> int:
        offset = self.xhci.config_read(PCI_CAPABILITY_LIST, 1)
        for _ in range(48):
            if offset == 0:
                break
            if self.xhci.config_read(offset, 1) == cap_id:
                return offset
            offset = self.xhci.config_read(offset + 1, 1)
        raise LookupError(f"no capability {cap_id:#x}")

    # -- bring-up --------------------------------------------------------------------------

    def reset(self) -> None:
        """Halt and HCRST, as xhci_halt and xhci_reset do."""
        self.op_write(XHCI_USBCMD, 0)
        self.op_write(XHCI_USBCMD, USBCMD_HCRST)
        self.slots.clear()
        self.backlog.clear()

    def setup(
        self,
        *,
        event_segments: tuple[int, ...] = (16,),
        msix: bool = True,
        imod: int = 0,
        max_slots: int = MAX_SLOTS,
    ) -> None:
        """Everything before Run/Stop: DCBAA, command ring, event ring, interrupter."""
        self.config_enable(msix=msix)
        self.reset()
        self.op_write(XHCI_CONFIG, max_slots)
        self.dcbaa = self.arena.alloc(8 * (MAX_SLOTS + 1))
        self.memory.fill(self.dcbaa, 8 * (MAX_SLOTS + 1), 0)
        self.op_write64(XHCI_DCBAAP, self.dcbaa)
        ring_base = self.arena.alloc(self.command_ring_trbs * TRB_SIZE)
        self.command_ring = ProducerRing(self.memory, ring_base, self.command_ring_trbs)
        self.op_write64(XHCI_CRCR, ring_base | 1)
        self.segments = []
        for trbs in event_segments:
            base = self.arena.alloc(trbs * TRB_SIZE)
            self.memory.fill(base, trbs * TRB_SIZE, 0)
            self.segments.append((base, trbs))
        self.erst = self.arena.alloc(16 * len(self.segments))
        for i, (base, trbs) in enumerate(self.segments):
            self.memory.write(self.erst + 16 * i, struct.pack("<QII", base, trbs, 0))
        self.dequeue = 0
        self.cycle = 1
        self.ir_write(XHCI_ERSTSZ, len(self.segments))
        self.ir_write64(XHCI_ERSTBA, self.erst)
        self.ir_write64(XHCI_ERDP, self.segments[0][0])
        self.ir_write(XHCI_IMOD, imod)
        self.ir_write(XHCI_IMAN, IMAN_IE)

    def run(self) -> None:
        self.op_write(XHCI_USBCMD, USBCMD_RS | USBCMD_INTE)

    def start(
        self,
        *,
        event_segments: tuple[int, ...] = (16,),
        msix: bool = True,
        imod: int = 0,
        max_slots: int = MAX_SLOTS,
    ) -> None:
        """:meth:`setup` then :meth:`run`."""
        self.setup(event_segments=event_segments, msix=msix, imod=imod, max_slots=max_slots)
        self.run()

    # -- the event ring --------------------------------------------------------------------

    def _event_address(self, flat: int) -> int:
        for base, trbs in self.segments:
            if flat < trbs:
                return base + TRB_SIZE * flat
            flat -= trbs
        raise IndexError(flat)

    @property
    def event_ring_size(self) -> int:
        return sum(trbs for _, trbs in self.segments)

    def events(self, *, update_erdp: bool = True, limit: int | None = None) -> list[Event]:
        """Read every new event (cycle bit matching), then write ERDP with EHB cleared."""
        found: list[Event] = []
        while limit is None or len(found) < limit:
            address = self._event_address(self.dequeue)
            parameter, status, control = _TRB.unpack(self.memory.read(address, TRB_SIZE))
            if control & TRB_CYCLE != self.cycle:
                break
            found.append(Event(address, parameter, status, control))
            self.dequeue += 1
            if self.dequeue == self.event_ring_size:
                self.dequeue = 0
                self.cycle ^= 1
        if update_erdp:
            self.write_erdp()
        return found

    def write_erdp(self) -> None:
        self.ir_write64(XHCI_ERDP, self._event_address(self.dequeue) | ERDP_EHB)

    def collect(self) -> list[Event]:
        """Everything read so far and not claimed, plus anything new."""
        found = self.backlog + self.events()
        self.backlog = []
        return found

    def claim(self, predicate: object) -> list[Event]:
        """New events matching ``predicate`` (a callable on Event); the rest stay in the
        backlog for a later :meth:`collect`."""
        assert callable(predicate)
        everything = self.backlog + self.events()
        mine = [e for e in everything if predicate(e)]
        self.backlog = [e for e in everything if not predicate(e)]
        return mine

    # -- commands --------------------------------------------------------------------------

    def command(self, parameter: int, status: int, control: int) -> Event | None:
        """Queue one command, ring doorbell 0 and return its Command Completion Event
        (None if the controller wrote none)."""
        assert self.command_ring is not None
        address = self.command_ring.push_raw(parameter, status, control)
        self.doorbell(0, 0)
        found = self.claim(
            lambda e: e.type == TrbType.COMMAND_COMPLETION and e.parameter == address
        )
        return found[0] if found else None

    def _slot_command(self, kind: int, slot: int, parameter: int = 0, flags: int = 0) -> Event:
        event = self.command(parameter, 0, trb_control(kind, flags) | slot << TRB_SLOT_SHIFT)
        assert event is not None, f"no completion for command {kind}"
        return event

    def noop(self) -> Event:
        event = self.command(0, 0, trb_control(TrbType.NOOP_COMMAND))
        assert event is not None
        return event

    def enable_slot(self) -> Event:
        event = self.command(0, 0, trb_control(TrbType.ENABLE_SLOT))
        assert event is not None
        if event.code == CompletionCode.SUCCESS:
            output = self.arena.alloc(DEVICE_CONTEXT_SIZE)
            self.memory.fill(output, DEVICE_CONTEXT_SIZE, 0)
            input_ctx = self.arena.alloc(INPUT_CONTEXT_SIZE)
            self.slots[event.slot_id] = SlotInfo(output, input_ctx)
            self.memory.write_u64(self.dcbaa + 8 * event.slot_id, output)
        return event

    def disable_slot(self, slot: int) -> Event:
        event = self._slot_command(TrbType.DISABLE_SLOT, slot)
        if event.code == CompletionCode.SUCCESS:
            self.slots.pop(slot, None)
        return event

    def new_ring(self, slot: int, dci: int) -> ProducerRing:
        base = self.arena.alloc(self.transfer_ring_trbs * TRB_SIZE)
        ring = ProducerRing(self.memory, base, self.transfer_ring_trbs)
        self.slots[slot].rings[dci] = ring
        return ring

    def write_input(
        self, slot: int, *, drop: int = 0, add: int = 0, contexts: dict[int, list[int]]
    ) -> int:
        """Fill the slot's input context: control flags and contexts by index (0 = slot,
        n = endpoint DCI n); returns its address."""
        address = self.slots[slot].input
        self.memory.fill(address, INPUT_CONTEXT_SIZE, 0)
        self.memory.write(address, struct.pack("<II", drop, add))
        for index, dwords in contexts.items():
            padded = list(dwords) + [0] * (8 - len(dwords))
            self.memory.write(address + CONTEXT_SIZE * (index + 1), struct.pack("<8I", *padded))
        return address

    @staticmethod
    def slot_context(port: int, *, entries: int = 1, speed: int = 1) -> list[int]:
        return [entries << SLOT_CTX_ENTRIES_SHIFT | speed << 20, port << SLOT_CTX_PORT_SHIFT, 0, 0]

    @staticmethod
    def endpoint_context(ep_type: int, max_packet: int, dequeue: int, cycle: int = 1) -> list[int]:
        cerr = 3 << 1
        return [
            0,
            max_packet << EP_CTX_MAX_PACKET_SHIFT | ep_type << EP_CTX_TYPE_SHIFT | cerr,
            (dequeue & 0xFFFF_FFF0) | cycle,
            dequeue >> 32,
            8,  # average TRB length
        ]

    def address_device(
        self, slot: int, port: int, *, bsr: bool = False, max_packet: int = 64
    ) -> Event:
        """Address Device for ``slot`` behind root hub ``port``, with a new EP0 ring."""
        ring = self.slots[slot].rings.get(1) or self.new_ring(slot, 1)
        speed = (self.portsc(port) & PORTSC_SPEED_MASK) >> PORTSC_SPEED_SHIFT
        address = self.write_input(
            slot,
            add=ADD_SLOT | ADD_EP0,
            contexts={
                0: self.slot_context(port, speed=speed),
                1: self.endpoint_context(EpType.CONTROL, max_packet, ring.enqueue, ring.cycle),
            },
        )
        return self._slot_command(TrbType.ADDRESS_DEVICE, slot, address, TRB_BSR if bsr else 0)

    def configure_endpoint(
        self,
        slot: int,
        endpoints: dict[int, tuple[int, int]] | None = None,
        *,
        drop: int = 0,
        deconfigure: bool = False,
    ) -> Event:
        """Configure Endpoint adding ``endpoints`` ({DCI: (EpType, max packet)}, each with
        a new ring) and dropping the DCIs in the ``drop`` mask."""
        if deconfigure:
            return self._slot_command(TrbType.CONFIGURE_ENDPOINT, slot, 0, TRB_DC)
        endpoints = endpoints or {}
        contexts: dict[int, list[int]] = {}
        add = ADD_SLOT
        for dci, (ep_type, max_packet) in endpoints.items():
            ring = self.new_ring(slot, dci)
            contexts[dci] = self.endpoint_context(ep_type, max_packet, ring.enqueue, ring.cycle)
            add |= 1 << dci
        last = max([1, *endpoints])
        port = self.output_slot(slot)[1] >> SLOT_CTX_PORT_SHIFT & 0xFF
        contexts[0] = self.slot_context(port, entries=last)
        address = self.write_input(slot, drop=drop, add=add, contexts=contexts)
        return self._slot_command(TrbType.CONFIGURE_ENDPOINT, slot, address)

    def evaluate_context(self, slot: int, *, max_packet: int) -> Event:
        ring = self.slots[slot].rings[1]
        address = self.write_input(
            slot,
            add=ADD_EP0,
            contexts={1: self.endpoint_context(EpType.CONTROL, max_packet, ring.base)},
        )
        return self._slot_command(TrbType.EVALUATE_CONTEXT, slot, address)

    def reset_endpoint(self, slot: int, dci: int) -> Event:
        return self._slot_command(TrbType.RESET_ENDPOINT, slot, 0, dci << TRB_EP_SHIFT)

    def stop_endpoint(self, slot: int, dci: int) -> Event:
        return self._slot_command(TrbType.STOP_ENDPOINT, slot, 0, dci << TRB_EP_SHIFT)

    def set_tr_dequeue(
        self, slot: int, dci: int, pointer: int, cycle: int, stream: int = 0
    ) -> Event:
        event = self.command(
            pointer | cycle,
            stream << 16,
            trb_control(TrbType.SET_TR_DEQUEUE, dci << TRB_EP_SHIFT) | slot << TRB_SLOT_SHIFT,
        )
        assert event is not None
        return event

    def skip_to_enqueue(self, slot: int, dci: int) -> Event:
        """Set TR Dequeue Pointer to where the driver will enqueue next (after a halt)."""
        ring = self.slots[slot].rings[dci]
        return self.set_tr_dequeue(slot, dci, ring.enqueue, ring.cycle)

    def reset_device(self, slot: int) -> Event:
        return self._slot_command(TrbType.RESET_DEVICE, slot)

    # -- contexts --------------------------------------------------------------------------

    def output_slot(self, slot: int) -> list[int]:
        return list(struct.unpack("<8I", self.memory.read(self.slots[slot].output, 32)))

    def output_endpoint(self, slot: int, dci: int) -> list[int]:
        address = self.slots[slot].output + CONTEXT_SIZE * dci
        return list(struct.unpack("<8I", self.memory.read(address, 32)))

    def slot_state(self, slot: int) -> int:
        return self.output_slot(slot)[3] >> 27

    def endpoint_state(self, slot: int, dci: int) -> int:
        return self.output_endpoint(slot, dci)[0] & 0x7

    # -- ports -----------------------------------------------------------------------------

    def reset_port(self, port: int) -> int:
        """Port reset (PR), as Linux's hub driver asks it; returns PORTSC after, with the
        change bits acknowledged."""
        value = self.portsc(port)
        neutral = value & ~(PORTSC_CHANGE | PORTSC_PED)
        self.write_portsc(port, neutral | PORTSC_PR)
        after = self.portsc(port)
        self.write_portsc(port, (after & ~PORTSC_PED) | (after & PORTSC_CHANGE))
        return after

    # -- transfers -------------------------------------------------------------------------

    def control(
        self,
        slot: int,
        setup: SetupPacket,
        data: bytes = b"",
        *,
        ring_doorbell: bool = True,
    ) -> ControlResult:
        """A control transfer on endpoint 0: Setup (IDT), Data (ISP for IN; Immediate Data
        for OUT of up to 8 bytes), Status (IOC). Returns the Transfer Events and IN data."""
        ring = self.slots[slot].rings[1]
        trbs: list[tuple[int, int, int]] = []
        length = setup.length
        trt = TRT_NO_DATA if length == 0 else TRT_IN if setup.direction_in else TRT_OUT
        setup_value = int.from_bytes(setup.pack(), "little")
        trbs.append((setup_value, 8, trb_control(TrbType.SETUP_STAGE, TRB_IDT | trt << TRT_SHIFT)))
        buffer = 0
        if length:
            if setup.direction_in:
                buffer = self.arena.alloc(length, 8)
                self.memory.fill(buffer, length, 0)
                trbs.append((buffer, length, trb_control(TrbType.DATA_STAGE, TRB_DIR_IN | TRB_ISP)))
            elif len(data) <= 8:
                immediate = int.from_bytes(data.ljust(8, b"\0"), "little")
                trbs.append((immediate, len(data), trb_control(TrbType.DATA_STAGE, TRB_IDT)))
            else:
                buffer = self.arena.alloc(len(data), 8)
                self.memory.write(buffer, data)
                trbs.append((buffer, len(data), trb_control(TrbType.DATA_STAGE)))
        status_dir = 0 if length and setup.direction_in else TRB_DIR_IN
        trbs.append((0, 0, trb_control(TrbType.STATUS_STAGE, status_dir | TRB_IOC)))
        addresses = ring.push_td(trbs)
        if not ring_doorbell:
            return ControlResult([], b"")
        self.doorbell(slot, 1)
        events = self.claim(lambda e: e.type == TrbType.TRANSFER_EVENT and e.parameter in addresses)
        received = b""
        if length and setup.direction_in:
            data_event = next((e for e in events if e.parameter == addresses[1]), None)
            if data_event is not None:
                short = data_event.code == CompletionCode.SHORT_PACKET
                residual = data_event.length if short else length
            elif events and events[-1].code == CompletionCode.SUCCESS:
                residual = 0
            else:
                residual = length
            received = self.memory.read(buffer, length - residual)
        return ControlResult(events, received)

    def queue_normal(
        self,
        slot: int,
        dci: int,
        length: int,
        *,
        data: bytes | None = None,
        flags: int = TRB_ISP | TRB_IOC,
        ring_doorbell: bool = True,
    ) -> tuple[int, int]:
        """Queue one Normal TRB (a buffer of ``length`` bytes, filled with ``data`` for
        OUT) and ring the endpoint's doorbell; returns (TRB address, buffer address)."""
        ring = self.slots[slot].rings[dci]
        buffer = self.arena.alloc(max(length, 1), 8)
        self.memory.fill(buffer, max(length, 1), 0)
        if data is not None:
            self.memory.write(buffer, data)
        (address,) = ring.push_td([(buffer, length, trb_control(TrbType.NORMAL, flags))])
        if ring_doorbell:
            self.doorbell(slot, dci)
        return address, buffer

    def transfer_events(self, slot: int | None = None) -> list[Event]:
        return self.claim(
            lambda e: e.type == TrbType.TRANSFER_EVENT and (slot is None or e.slot_id == slot)
        )

    def port_events(self) -> list[Event]:
        return self.claim(lambda e: e.type == TrbType.PORT_STATUS_CHANGE)

    # -- whole sequences -------------------------------------------------------------------

    def enumerate(self, port: int, *, bsr_first: bool = False) -> int:
        """Port reset, Enable Slot, Address Device (optionally BSR first, as Linux's new
        enumeration scheme does) and SET_CONFIGURATION(1) with the device's first interrupt
        IN endpoint configured at DCI 3; returns the Slot ID."""
        after = self.reset_port(port)
        assert after & PORTSC_PED, f"port {port} did not enable: {after:#x}"
        self.port_events()
        event = self.enable_slot()
        assert event.code == CompletionCode.SUCCESS, event
        slot = event.slot_id
        if bsr_first:
            event = self.address_device(slot, port, bsr=True)
            assert event.code == CompletionCode.SUCCESS, event
        event = self.address_device(slot, port)
        assert event.code == CompletionCode.SUCCESS, event
        event = self.configure_endpoint(slot, {3: (EpType.INTERRUPT_IN, 8)})
        assert event.code == CompletionCode.SUCCESS, event
        result = self.control(slot, SetupPacket(0x00, 0x09, 1, 0, 0))
        assert result.code == CompletionCode.SUCCESS, result.events
        return slot

    def usbsts(self) -> int:
        return self.op_read(XHCI_USBSTS)
