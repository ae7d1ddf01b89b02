"""An xHCI 1.1 USB host controller with USB 2.0 root hub ports, as Linux's ``xhci_hcd`` drives
it (it binds by class code 0x0C0330; the IDs are QEMU's ``qemu-xhci``, 1b36:000d).

Facts come from the *eXtensible Host Controller Interface for Universal Serial Bus (xHCI)*
specification, revisions 1.1/1.2: registers (chapter 5), data structures and TRBs (chapter 6),
the command, transfer and event ring rules (4.6, 4.9-4.11) and the root hub port state
machine (4.19); the sequences are the ones Linux's ``drivers/usb/host/xhci*.c`` uses.

The function has:

* BAR0, 16 KiB of 64-bit memory: capability registers at 0 (with two xHCI extended
  capabilities, Supported Protocol "USB 2.0" at 0x20 and "USB 3.0" at 0x30), operational
  registers at CAPLENGTH (0x40, port register sets at 0x440), runtime registers at RTSOFF
  (0x1000, one interrupter), the doorbell array at DBOFF (0x2000), the MSI-X table at 0x3000
  and its PBA at 0x3800;
* an MSI-X capability with one vector (interrupter 0), and INTA# when MSI-X is off;
* config bytes 0x60 (SBRN, 0x30) and 0x61 (FLADJ) as xHCI 5.2 defines them.

Devices are attached at construction, ``devices[n]`` to USB 2.0 root hub port ``n + 1``
(full speed); they show as connected (CCS, CSC) after every controller reset, and are enabled
by a port reset (PR), which completes at once: PED, PLS = U0, PRC and a Port Status Change
Event. After the USB 2.0 ports come :data:`USB3_PORTS` USB 3.0 ports with nothing connected:
until recently Linux's xhci-pci always registered a USB 3 root hub, and the kernels that
first accepted a controller without SuperSpeed ports failed to register its USB 2 root hub,
so empty SuperSpeed ports keep every kernel on its well-trodden path. Device Slots
(:data:`MAX_SLOTS`) use 32-byte contexts; streams, isochronous endpoints, scratchpads and LPM
are not offered (the capability registers say so).

Commands: No Op, Enable Slot, Disable Slot, Address Device (with BSR), Configure Endpoint
(with DC), Evaluate Context, Reset Endpoint, Stop Endpoint, Set TR Dequeue Pointer and
Reset Device; any other TRB type on the command ring completes with TRB Error. Command Ring
Stop/Abort through CRCR give a Command Ring Stopped completion.

Transfers: control transfers (Setup/Data/Status stages, Normal TRBs chained to a Data
Stage, Immediate Data) on endpoint 0; Normal TRBs on interrupt and bulk endpoints; Event Data
TRBs, transfer No Op TRBs, IOC, ISP, BEI, Link TRBs with Toggle Cycle. An IN transfer the
device NAKs stays at the head of the ring until the device has data (it calls back, see
:meth:`UsbDevice.attach`); one IN transfer (TD) takes one packet, so a TD longer than the
report completes with Short Packet. Transfer rings are walked from the doorbell, or from the
device's callback on the host I/O loop.

The guest is hostile, and every fault gets the answer the spec assigns, counted and logged
(rate-limited) in :attr:`Xhci.guest_errors`:

* a bad TRB (unknown or misplaced type, bad length, Setup without Immediate Data, a data
  buffer outside guest RAM, too many chained TRBs or link TRBs in a row) completes with TRB
  Error and halts its endpoint (on the command ring: a TRB Error completion, and the ring
  stays where it is);
* command parameters: bad Slot ID (0 or above MaxSlots) is TRB Error, a disabled slot Slot
  Not Enabled Error, a command in the wrong slot or endpoint state Context State Error, an
  Endpoint ID of 0 TRB Error, a non-zero Stream ID Invalid Stream ID Error, an Input Context
  Pointer or new TR Dequeue Pointer outside guest RAM TRB Error, bad values inside an input
  context (flags, port number, endpoint type, max packet size, dequeue pointer) Parameter
  Error, an isochronous endpoint Resource Error, no free slot No Slots Available Error, a
  port without an enabled device USB Transaction Error;
* memory the controller finds by itself that is not guest RAM (a command or transfer ring, an
  event ring segment, the ERST, the DCBAA or an output device context) is a bus error: Host
  System Error (USBSTS.HSE) and the controller halts; a malformed event ring (bad ERST size,
  segment size outside 16..4096, ERDP outside the ring) is a Host Controller Error
  (USBSTS.HCE), also halting. Software recovers with HCRST.

No guest input ends in an exception into the vCPU loop (a model bug is caught and counted in
:attr:`Xhci.internal_errors`) or in an unbounded loop: commands per doorbell, TDs per
endpoint kick, TRBs per TD, OUT bytes per TD and consecutive link TRBs are all bounded.

Interrupter moderation. IMOD is honoured when the board supplies a ``timer``: the controller
asserts an interrupt no sooner than IMODI x 250 ns after the previous one, and when an
interrupt must wait it calls ``timer(when)`` (``when`` on ``clock``'s scale); the board must
then call :meth:`Xhci.poll` at or after ``when``. Without a timer there is nothing to wake the
device later, so IMOD is only stored and interrupts are asserted at once (which is also
Linux's default moderation of 40 us rounded to "now"). Event Handler Busy is always honoured:
no new interrupt is asserted while ERDP.EHB is set, and clearing EHB with events still
unconsumed asserts a new one. Under MSI-X, IMAN.IP clears itself when the message is sent
(xHCI 5.5.2.1); with INTx the line follows IP and IE and USBCMD.INTE.

Threads and locking. vCPU threads call :meth:`read`/:meth:`write` (BAR0) and config space;
the host I/O loop calls the devices' ``key_event``/``pointer_event``, which call back into the
controller. Everything takes the function's re-entrant lock (:attr:`PciFunction.lock`), which
the devices use as their own (:meth:`UsbDevice.attach`), so there is one lock and no lock
order to get wrong. The device model starts no thread and holds no timer of its own.

Not modelled: bus mastering (DMA happens whatever COMMAND.MASTER says), MFINDEX Wrap and
Device Notification events, save/restore state (CSS/CRS complete at once with nothing
saved), and hot plug.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from iovirt.bus.msix import MsixCapability
from iovirt.bus.pci import PCI_INTERRUPT_LINE_UNKNOWN, BarKind, GuestAccessLog, PciFunction
from iovirt.devices.usb import (
    USB_DIR_OUT,
    USB_RECIP_DEVICE,
    USB_REQ_SET_ADDRESS,
    Handshake,
    SetupPacket,
    UsbDevice,
    UsbSpeed,
)
from iovirt.errors import GuestMemoryError
from iovirt.interrupt import Interrupt
from iovirt.memory import GuestMemory
from iovirt.platform import Platform

log = logging.getLogger(__name__)

# --- PCI identity (QEMU's qemu-xhci; Linux binds xhci_hcd by class code).
XHCI_VENDOR_ID = 0x1B36
XHCI_DEVICE_ID = 0x000D
XHCI_CLASS = 0x0C0330  # serial bus, USB, xHCI
XHCI_REVISION = 0x01
XHCI_SUBSYSTEM_VENDOR_ID = 0x1AF4
XHCI_SUBSYSTEM_ID = 0x1100

# Config space registers of an xHCI function (xHCI 5.2).
PCI_XHCI_SBRN = 0x60  # Serial Bus Release Number
PCI_XHCI_FLADJ = 0x61  # Frame Length Adjustment
XHCI_SBRN_USB30 = 0x30
XHCI_FLADJ_DEFAULT = 0x20
XHCI_FLADJ_MASK = 0x3F

# --- BAR0 layout.
XHCI_BAR = 0
XHCI_BAR_SIZE = 0x4000
CAP_LENGTH = 0x40  # operational registers start here
XECP_OFFSET = 0x20  # the first extended capability
RUNTIME_OFFSET = 0x1000
DOORBELL_OFFSET = 0x2000
MSIX_TABLE_OFFSET = 0x3000
MSIX_PBA_OFFSET = 0x3800

# --- Implementation limits.
MAX_SLOTS = 16
MAX_INTERRUPTERS = 1
DEFAULT_PORTS = 4  # USB 2 ports, at least
MAX_PORTS = 15  # USB 2 ports, at most
USB3_PORTS = 4  # empty SuperSpeed ports after the USB 2 ones (see the module docstring)
ERST_MAX_EXPONENT = 4  # HCSPARAMS2.ERST Max: up to 2^4 = 16 event ring segments
ERST_ENTRY_SIZE = 16
EVENT_SEGMENT_MIN = 16  # TRBs per event ring segment (6.5)
EVENT_SEGMENT_MAX = 4096
COMMAND_BUDGET = 1024  # commands per doorbell
TD_BUDGET = 256  # TDs per endpoint kick
TD_TRB_LIMIT = 256  # TRBs in one TD (a control transfer counts all its stages)
LINK_LIMIT = 32  # consecutive Link TRBs before the ring counts as a loop
MAX_TRB_LENGTH = 0x10000  # TRB Transfer Length may not exceed 64 KiB
IDT_MAX = 8  # Immediate Data holds at most 8 bytes
MAX_OUT_TD_BYTES = 0x10000  # OUT data handed to a device per TD (control: wLength at most)

# --- Capability registers (5.3).
XHCI_CAPLENGTH = 0x00  # 8 bits; HCIVERSION is the 16 bits at 0x02
XHCI_HCSPARAMS1 = 0x04
XHCI_HCSPARAMS2 = 0x08
XHCI_HCSPARAMS3 = 0x0C
XHCI_HCCPARAMS1 = 0x10
XHCI_DBOFF = 0x14
XHCI_RTSOFF = 0x18
XHCI_HCCPARAMS2 = 0x1C
XHCI_HCIVERSION_VALUE = 0x0110

HCSPARAMS1_MAX_SLOTS_SHIFT = 0
HCSPARAMS1_MAX_INTRS_SHIFT = 8
HCSPARAMS1_MAX_PORTS_SHIFT = 24
HCSPARAMS2_ERST_MAX_SHIFT = 4
HCCPARAMS1_AC64 = 1 << 0  # 64-bit addressing
HCCPARAMS1_NSS = 1 << 7  # no secondary stream IDs
HCCPARAMS1_XECP_SHIFT = 16  # in dwords from the capability base

# Extended capability: Supported Protocol (7.2).
XHCI_EXT_CAPS_PROTOCOL = 2
SUPPORTED_PROTOCOL_NAME_USB = 0x2042_5355  # "USB "
SUPPORTED_PROTOCOL_USB2 = 0x0200  # major.minor in BCD: USB 2.0
SUPPORTED_PROTOCOL_USB3 = 0x0300  # USB 3.0
SUPPORTED_PROTOCOL_SIZE = 16  # bytes; the USB 3 capability follows the USB 2 one
XECP_NEXT_SHIFT = 8  # Next Capability Pointer, in dwords
SUPPORTED_PROTOCOL_SLOT_TYPE = 0  # the Slot Type Enable Slot must ask for

# --- Operational registers (5.4), offsets from CAP_LENGTH.
XHCI_USBCMD = 0x00
XHCI_USBSTS = 0x04
XHCI_PAGESIZE = 0x08
XHCI_DNCTRL = 0x14
XHCI_CRCR = 0x18  # 64 bits
XHCI_DCBAAP = 0x30  # 64 bits
XHCI_CONFIG = 0x38
XHCI_PORT_BASE = 0x400
XHCI_PORT_STRIDE = 0x10
XHCI_PORTSC = 0x0
XHCI_PORTPMSC = 0x4
XHCI_PORTLI = 0x8
XHCI_PORTHLPMC = 0xC

# USBCMD bits.
USBCMD_RS = 1 << 0
USBCMD_HCRST = 1 << 1
USBCMD_INTE = 1 << 2
USBCMD_HSEE = 1 << 3
USBCMD_LHCRST = 1 << 7
USBCMD_CSS = 1 << 8
USBCMD_CRS = 1 << 9
USBCMD_EWE = 1 << 10
USBCMD_EU3S = 1 << 11
USBCMD_STORED = USBCMD_RS | USBCMD_INTE | USBCMD_HSEE | USBCMD_EWE | USBCMD_EU3S

# USBSTS bits.
USBSTS_HCH = 1 << 0
USBSTS_HSE = 1 << 2
USBSTS_EINT = 1 << 3
USBSTS_PCD = 1 << 4
USBSTS_SSS = 1 << 8
USBSTS_RSS = 1 << 9
USBSTS_SRE = 1 << 10
USBSTS_CNR = 1 << 11
USBSTS_HCE = 1 << 12
USBSTS_RW1C = USBSTS_HSE | USBSTS_EINT | USBSTS_PCD | USBSTS_SRE

PAGESIZE_4K = 0x1
DNCTRL_MASK = 0xFFFF

# CRCR bits.
CRCR_RCS = 1 << 0
CRCR_CS = 1 << 1
CRCR_CA = 1 << 2
CRCR_CRR = 1 << 3
CRCR_POINTER_MASK = ~0x3F & 0xFFFF_FFFF_FFFF_FFFF

DCBAAP_MASK = ~0x3F & 0xFFFF_FFFF_FFFF_FFFF
CONFIG_MAX_SLOTS_EN_MASK = 0xFF

# PORTSC bits (5.4.8).
PORTSC_CCS = 1 << 0
PORTSC_PED = 1 << 1
PORTSC_OCA = 1 << 3
PORTSC_PR = 1 << 4
PORTSC_PLS_SHIFT = 5
PORTSC_PLS_MASK = 0xF << 5
PORTSC_PP = 1 << 9
PORTSC_SPEED_SHIFT = 10
PORTSC_SPEED_MASK = 0xF << 10
PORTSC_PIC_MASK = 0x3 << 14
PORTSC_LWS = 1 << 16
PORTSC_CSC = 1 << 17
PORTSC_PEC = 1 << 18
PORTSC_WRC = 1 << 19
PORTSC_OCC = 1 << 20
PORTSC_PRC = 1 << 21
PORTSC_PLC = 1 << 22
PORTSC_CEC = 1 << 23
PORTSC_CAS = 1 << 24
PORTSC_WCE = 1 << 25
PORTSC_WDE = 1 << 26
PORTSC_WOE = 1 << 27
PORTSC_DR = 1 << 30
PORTSC_WPR = 1 << 31
PORTSC_CHANGE = (
    PORTSC_CSC | PORTSC_PEC | PORTSC_WRC | PORTSC_OCC | PORTSC_PRC | PORTSC_PLC | PORTSC_CEC
)
PORTSC_WAKE = PORTSC_WCE | PORTSC_WDE | PORTSC_WOE

# Port Link State values.
PLS_U0 = 0
PLS_U3 = 3
PLS_DISABLED = 4
PLS_RXDETECT = 5
PLS_POLLING = 7
PLS_RESUME = 15

# Protocol Speed IDs of the default USB 2.0 mapping (7.2.2.1.1).
SPEED_ID = {UsbSpeed.FULL: 1, UsbSpeed.LOW: 2, UsbSpeed.HIGH: 3}

# --- Runtime registers (5.5).
XHCI_MFINDEX = 0x00
XHCI_IR0 = 0x20
XHCI_IR_STRIDE = 0x20
XHCI_IMAN = 0x00
XHCI_IMOD = 0x04
XHCI_ERSTSZ = 0x08
XHCI_ERSTBA = 0x10  # 64 bits
XHCI_ERDP = 0x18  # 64 bits
MFINDEX_MASK = 0x3FFF
MICROFRAMES_PER_SECOND = 8000

IMAN_IP = 1 << 0
IMAN_IE = 1 << 1
IMOD_INTERVAL_MASK = 0xFFFF
IMOD_COUNTER_SHIFT = 16
IMOD_UNIT = 250e-9  # IMODI counts 250 ns
ERSTSZ_MASK = 0xFFFF
ERSTBA_MASK = ~0x3F & 0xFFFF_FFFF_FFFF_FFFF
ERDP_DESI_MASK = 0x7
ERDP_EHB = 1 << 3
ERDP_POINTER_MASK = ~0xF & 0xFFFF_FFFF_FFFF_FFFF

# --- Doorbells (5.6).
DB_TARGET_MASK = 0xFF
DB_STREAM_SHIFT = 16
DB_TARGET_HOST_COMMAND = 0

# --- TRBs (6.4): parameter (64), status (32), control (32).
TRB_SIZE = 16
_TRB = struct.Struct("<QII")
TRB_POINTER_MASK = ~0xF & 0xFFFF_FFFF_FFFF_FFFF

TRB_CYCLE = 1 << 0
TRB_TC = 1 << 1  # Link TRB: toggle cycle
TRB_ENT = 1 << 1  # transfer TRBs: evaluate next TRB
TRB_ISP = 1 << 2
TRB_NS = 1 << 3
TRB_CH = 1 << 4
TRB_IOC = 1 << 5
TRB_IDT = 1 << 6
TRB_BEI = 1 << 9
TRB_BSR = 1 << 9  # Address Device: block set address request
TRB_DC = 1 << 9  # Configure Endpoint: deconfigure
TRB_TYPE_SHIFT = 10
TRB_TYPE_MASK = 0x3F
TRB_DIR_IN = 1 << 16  # Data and Status Stage TRBs
TRB_SLOT_SHIFT = 24
TRB_EP_SHIFT = 16
TRB_EP_MASK = 0x1F
TRB_SLOT_TYPE_SHIFT = 16
TRB_SLOT_TYPE_MASK = 0x1F
TRB_STREAM_SHIFT = 16  # Set TR Dequeue Pointer: Stream ID in the status dword
TRB_LENGTH_MASK = 0x1_FFFF
TRB_INTR_TARGET_SHIFT = 22
EVENT_TRB_ED = 1 << 2  # Transfer Event: the parameter is Event Data
SET_DEQ_DCS = 1 << 0
SET_DEQ_SCT_MASK = 0x7 << 1


class TrbType(enum.IntEnum):
    """TRB Type field values (6.4.6)."""

    NORMAL = 1
    SETUP_STAGE = 2
    DATA_STAGE = 3
    STATUS_STAGE = 4
    ISOCH = 5
    LINK = 6
    EVENT_DATA = 7
    NOOP = 8
    ENABLE_SLOT = 9
    DISABLE_SLOT = 10
    ADDRESS_DEVICE = 11
    CONFIGURE_ENDPOINT = 12
    EVALUATE_CONTEXT = 13
    RESET_ENDPOINT = 14
    STOP_ENDPOINT = 15
    SET_TR_DEQUEUE = 16
    RESET_DEVICE = 17
    FORCE_EVENT = 18
    NEGOTIATE_BANDWIDTH = 19
    SET_LATENCY_TOLERANCE = 20
    GET_PORT_BANDWIDTH = 21
    FORCE_HEADER = 22
    NOOP_COMMAND = 23
    TRANSFER_EVENT = 32
    COMMAND_COMPLETION = 33
    PORT_STATUS_CHANGE = 34
    BANDWIDTH_REQUEST = 35
    DOORBELL_EVENT = 36
    HOST_CONTROLLER_EVENT = 37
    DEVICE_NOTIFICATION = 38
    MFINDEX_WRAP = 39


class CompletionCode(enum.IntEnum):
    """Completion Code values (6.4.5)."""

    INVALID = 0
    SUCCESS = 1
    DATA_BUFFER_ERROR = 2
    BABBLE_DETECTED = 3
    USB_TRANSACTION_ERROR = 4
    TRB_ERROR = 5
    STALL_ERROR = 6
    RESOURCE_ERROR = 7
    BANDWIDTH_ERROR = 8
    NO_SLOTS_AVAILABLE = 9
    INVALID_STREAM_TYPE = 10
    SLOT_NOT_ENABLED = 11
    ENDPOINT_NOT_ENABLED = 12
    SHORT_PACKET = 13
    RING_UNDERRUN = 14
    RING_OVERRUN = 15
    VF_EVENT_RING_FULL = 16
    PARAMETER_ERROR = 17
    BANDWIDTH_OVERRUN = 18
    CONTEXT_STATE_ERROR = 19
    NO_PING_RESPONSE = 20
    EVENT_RING_FULL = 21
    INCOMPATIBLE_DEVICE = 22
    MISSED_SERVICE = 23
    COMMAND_RING_STOPPED = 24
    COMMAND_ABORTED = 25
    STOPPED = 26
    STOPPED_LENGTH_INVALID = 27
    STOPPED_SHORT_PACKET = 28
    MAX_EXIT_LATENCY_TOO_LARGE = 29
    ISOCH_BUFFER_OVERRUN = 31
    EVENT_LOST = 32
    UNDEFINED = 33
    INVALID_STREAM_ID = 34
    SECONDARY_BANDWIDTH = 35
    SPLIT_TRANSACTION = 36


EVENT_CC_SHIFT = 24

# --- Contexts (6.2), 32 bytes each (HCCPARAMS1.CSZ = 0).
CONTEXT_SIZE = 32
CONTEXT_DWORDS = 8
DEVICE_CONTEXT_SIZE = 32 * CONTEXT_SIZE  # slot context and 31 endpoint contexts
INPUT_CONTEXT_SIZE = 33 * CONTEXT_SIZE  # input control context first
MAX_DCI = 31

# Slot Context fields.
SLOT_CTX_ROUTE_MASK = 0xF_FFFF  # DW0
SLOT_CTX_ENTRIES_SHIFT = 27  # DW0
SLOT_CTX_ENTRIES_MASK = 0x1F << 27
SLOT_CTX_MEL_MASK = 0xFFFF  # DW1: Max Exit Latency
SLOT_CTX_PORT_SHIFT = 16  # DW1: Root Hub Port Number
SLOT_CTX_INTR_TARGET_MASK = 0x3FF << 22  # DW2
SLOT_CTX_ADDRESS_MASK = 0xFF  # DW3: USB Device Address
SLOT_CTX_STATE_SHIFT = 27  # DW3: Slot State

# Endpoint Context fields.
EP_CTX_STATE_MASK = 0x7  # DW0
EP_CTX_MAX_PSTREAMS_SHIFT = 10  # DW0
EP_CTX_MAX_PSTREAMS_MASK = 0x1F << 10
EP_CTX_LSA = 1 << 15
EP_CTX_TYPE_SHIFT = 3  # DW1
EP_CTX_TYPE_MASK = 0x7 << 3
EP_CTX_MAX_PACKET_SHIFT = 16  # DW1
EP_CTX_MAX_PACKET_MASK = 0xFFFF << 16
EP_CTX_DCS = 1 << 0  # DW2
EP_CTX_DEQUEUE_RSVD = 0xE  # DW2 bits 3:1 must be zero without streams

# Input Control Context: DW0 Drop flags, DW1 Add flags.
ADD_SLOT = 1 << 0  # A0
ADD_EP0 = 1 << 1  # A1


class SlotState(enum.IntEnum):
    """Slot State as the Slot Context reports it; DISABLED is internal (it reads as 0,
    like ENABLED, but a disabled slot has no context to read)."""

    DISABLED = -1
    ENABLED = 0
    DEFAULT = 1
    ADDRESSED = 2
    CONFIGURED = 3


class EpState(enum.IntEnum):
    """Endpoint State (6.2.3)."""

    DISABLED = 0
    RUNNING = 1
    HALTED = 2
    STOPPED = 3
    ERROR = 4


class EpType(enum.IntEnum):
    """Endpoint Type (6.2.3, Table 6-9)."""

    NOT_VALID = 0
    ISOCH_OUT = 1
    BULK_OUT = 2
    INTERRUPT_OUT = 3
    CONTROL = 4
    ISOCH_IN = 5
    BULK_IN = 6
    INTERRUPT_IN = 7


_IN_TYPES = frozenset((EpType.CONTROL, EpType.ISOCH_IN, EpType.BULK_IN, EpType.INTERRUPT_IN))
_OUT_TYPES = frozenset((EpType.ISOCH_OUT, EpType.BULK_OUT, EpType.INTERRUPT_OUT))
_ISOCH_TYPES = frozenset((EpType.ISOCH_IN, EpType.ISOCH_OUT))


@dataclass(frozen=True)
class Trb:
    """One TRB as read from a ring, with the address it was read at."""

    address: int
    parameter: int
    status: int
    control: int

    @property
    def type(self) -> int:
        return (self.control >> TRB_TYPE_SHIFT) & TRB_TYPE_MASK

    @property
    def cycle(self) -> int:
        return self.control & TRB_CYCLE

    @property
    def length(self) -> int:
        return self.status & TRB_LENGTH_MASK

    @property
    def slot_id(self) -> int:
        return self.control >> TRB_SLOT_SHIFT

    @property
    def endpoint_id(self) -> int:
        return (self.control >> TRB_EP_SHIFT) & TRB_EP_MASK

    def flag(self, bit: int) -> bool:
        return bool(self.control & bit)


@dataclass
class XhciCounters:
    """Host-side counters for tests and metrics."""

    commands: int = 0
    transfer_tds: int = 0
    events: int = 0
    events_lost: int = 0  # dropped for a full event ring
    interrupts: int = 0  # interrupts asserted (MSI-X messages or INTx assertions)


@dataclass
class _Ring:
    """A ring the controller consumes: where it reads next, and the cycle it expects."""

    dequeue: int = 0
    cycle: int = 1


@dataclass
class _Endpoint:
    dci: int
    type: EpType
    max_packet: int
    ring: _Ring
    context: list[int]  # the output Endpoint Context as the controller keeps it
    state: EpState = EpState.RUNNING
    waiting: bool = False  # the TD at the dequeue pointer was NAKed: retry on data

    @property
    def number(self) -> int:
        return self.dci // 2

    @property
    def is_in(self) -> bool:
        return self.type in _IN_TYPES and self.type is not EpType.CONTROL


@dataclass
class _Slot:
    state: SlotState = SlotState.DISABLED
    port: int = 0  # Root Hub Port Number, once addressed
    context: int = 0  # output Device Context address (from the DCBAA)
    slot_context: list[int] = field(default_factory=lambda: [0] * CONTEXT_DWORDS)
    endpoints: dict[int, _Endpoint] = field(default_factory=dict)


@dataclass
class _Port:
    number: int
    device: UsbDevice | None
    portsc: int = 0
    usb3: bool = False  # a SuperSpeed port (always empty here)


@dataclass
class _Interrupter:
    iman: int = 0
    imod: int = 0  # IMODI in bits 15:0 (the counter is computed)
    erstsz: int = 0
    erstba: int = 0
    erdp: int = 0  # pointer and DESI; EHB is kept in ehb
    ehb: bool = False
    segments: list[tuple[int, int]] = field(default_factory=list)  # (base, TRBs)
    ring_fault: str = ""  # why the event ring cannot be used (HCE/HSE on the next event)
    ring_fault_is_bus_error: bool = False  # the ERST or a segment is not guest RAM: HSE
    enqueue: int = 0  # flat index into the segments
    pcs: int = 1
    pending: bool = False  # an interrupt is owed
    ready_at: float = 0.0  # IMOD: no interrupt before this time
    armed_for: float | None = None  # the timer request outstanding

    @property
    def total(self) -> int:
        return sum(size for _, size in self.segments)


class _HostSystemError(Exception):
    """Guest memory the controller itself located is not RAM: HSE, halt."""


class _HostControllerError(Exception):
    """A controller data structure is malformed: HCE, halt."""


class _CommandFailed(Exception):
    def __init__(self, code: CompletionCode, why: str) -> None:
        super().__init__(why)
        self.code = code


class _TdFault(Exception):
    """A TD cannot be executed: complete ``trb`` with ``code`` and halt the endpoint."""

    def __init__(self, trb: Trb, code: CompletionCode, why: str, residual: int = 0) -> None:
        super().__init__(why)
        self.trb = trb
        self.code = code
        self.residual = residual


@dataclass
class _Td:
    trbs: list[Trb]
    next_dequeue: int
    next_cycle: int


def _set_bits(value: int, mask: int, bits: int) -> int:
    return (value & ~mask) | (bits & mask)


class Xhci(PciFunction):
    """The xHCI controller; see the module docstring.

    ``devices[n]`` sits on root hub port ``n + 1``; the controller has
    ``max(DEFAULT_PORTS, len(devices))`` USB 2 ports (at most :data:`MAX_PORTS`), then
    :data:`USB3_PORTS` empty USB 3 ports. ``intx`` is the
    line INTA# drives (None: no INTx pin, the guest must use MSI-X). ``clock`` (seconds) and
    ``timer`` serve MFINDEX and interrupter moderation; see the module docstring. The
    function is the bus device of BAR0; put it on the bus with :meth:`PciRoot.add`.
    """

    def __init__(
        self,
        platform: Platform,
        devices: Sequence[UsbDevice],
        *,
        intx: Interrupt | None = None,
        interrupt_line: int = PCI_INTERRUPT_LINE_UNKNOWN,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[float], None] | None = None,
        name: str = "xhci",
    ) -> None:
        if len(devices) > MAX_PORTS:
            raise ValueError(f"{name}: {len(devices)} devices; at most {MAX_PORTS} ports")
        for device in devices:
            if device.speed not in SPEED_ID:
                raise ValueError(f"{name}: {device.name} runs at an unsupported speed")
        super().__init__(
            XHCI_VENDOR_ID,
            XHCI_DEVICE_ID,
            XHCI_CLASS,
            revision=XHCI_REVISION,
            subsystem_vendor=XHCI_SUBSYSTEM_VENDOR_ID,
            subsystem_id=XHCI_SUBSYSTEM_ID,
            intx=intx,
            interrupt_line=interrupt_line,
            name=name,
        )
        self.platform = platform
        self.memory: GuestMemory = platform.memory
        self.clock = clock
        self.timer = timer
        self.counters = XhciCounters()
        # Odd register accesses; hostile ring and context contents; anything unexpected
        # inside the model (caught so it never reaches the vCPU loop).
        self.bad_accesses = GuestAccessLog(name, log)
        self.guest_errors = GuestAccessLog(name, log, what="guest errors")
        self.internal_errors = GuestAccessLog(name, log, what="internal errors")

        self.num_usb2_ports = max(DEFAULT_PORTS, len(devices))
        self.num_ports = self.num_usb2_ports + USB3_PORTS
        self._ports = [
            _Port(n + 1, devices[n] if n < len(devices) else None, usb3=n >= self.num_usb2_ports)
            for n in range(self.num_ports)
        ]
        self.config.data[PCI_XHCI_SBRN] = XHCI_SBRN_USB30
        self.config.data[PCI_XHCI_FLADJ] = XHCI_FLADJ_DEFAULT
        self.config.writable[PCI_XHCI_FLADJ] = XHCI_FLADJ_MASK

        self.msix = MsixCapability(
            platform,
            MAX_INTERRUPTERS,
            bar=XHCI_BAR,
            table_offset=MSIX_TABLE_OFFSET,
            pba_offset=MSIX_PBA_OFFSET,
            on_control_change=self._msix_control_changed,
            name=f"{name} msix",
        )
        self.add_bar(XHCI_BAR, XHCI_BAR_SIZE, BarKind.MEM64, self)
        self.msix.install(self)

        # Register state; set properly by _reset_controller.
        self._usbcmd = 0
        self._usbsts = USBSTS_HCH
        self._dnctrl = 0
        self._crcr_low = 0  # the low dword written last (acted on with the high dword)
        self._crr = False
        self._cmd_ring = _Ring()
        self._dcbaap = 0
        self._config = 0
        self._slots = [_Slot() for _ in range(MAX_SLOTS + 1)]  # index 0 unused
        self._intr = [_Interrupter() for _ in range(MAX_INTERRUPTERS)]
        self._mfindex_base = clock()
        self._mfindex_frozen = 0
        self._kicking: set[tuple[int, int]] = set()
        self._rekick: set[tuple[int, int]] = set()
        self._closed = False

        for port in self._ports:
            if port.device is not None:
                port.device.attach(self.lock, self._data_callback(port.number))
        with self.lock:
            self._reset_controller()

    # -- public entry points ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A guest read of BAR0."""
        with self.lock:
            try:
                return self._read_access(offset, size)
            except Exception as e:  # a model bug must not end the vCPU loop
                self._internal_error(f"read {offset:#x}/{size}", e)
                return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of BAR0."""
        with self.lock:
            try:
                self._write_access(offset, size, value & ((1 << (8 * size)) - 1))
            except (_HostSystemError, _HostControllerError) as e:
                self._fatal(e)  # e.g. a port change event with no usable event ring
            except Exception as e:
                self._internal_error(f"write {offset:#x}/{size}", e)

    def poll(self) -> None:
        """The board's timer fired (see ``timer``): assert interrupts IMOD held back."""
        with self.lock:
            try:
                for index in range(MAX_INTERRUPTERS):
                    intr = self._intr[index]
                    intr.armed_for = None
                    self._try_assert(index)
            except Exception as e:
                self._internal_error("poll", e)

    def reset(self) -> None:
        """Reset the controller as HCRST does (the board calls this on a VM reset)."""
        with self.lock:
            try:
                self._reset_controller()
            except Exception as e:
                self._internal_error("reset", e)

    def close(self) -> None:
        """VM teardown: release the MSI-X vector."""
        with self.lock:
            if not self._closed:
                self._closed = True
                self.msix.close()

    @property
    def devices(self) -> list[UsbDevice | None]:
        """What sits on each port (index 0 is port 1)."""
        return [port.device for port in self._ports]

    def _data_callback(self, port_number: int) -> Callable[[int], None]:
        """What a device calls (lock held, usually on the host I/O loop) when an IN endpoint
        has data; nothing raises back into the caller."""

        def data_ready(endpoint: int) -> None:
            try:
                self._device_data(port_number, endpoint)
            except Exception as e:
                self._internal_error(f"port {port_number} data ready", e)

        return data_ready

    def _internal_error(self, what: str, e: Exception) -> None:
        log.debug("%s: %s failed", self.name, what, exc_info=True)
        self.internal_errors(f"{what}: {e!r}")

    # -- register dispatch -----------------------------------------------------------------

    def _read_access(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset % size:
            self.bad_accesses(f"{size}-byte read at {offset:#x}")
            return 0
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_bytes:
            return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + self.msix.pba_bytes:
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        if offset < CAP_LENGTH:
            # Capability registers take any naturally aligned width (CAPLENGTH is a byte).
            dword = self._cap_read(offset & ~3)
            if size == 8:
                return dword | self._cap_read(offset + 4) << 32
            return (dword >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)
        if size < 4:
            self.bad_accesses(f"{size}-byte read at {offset:#x}")
            return 0
        value = self._read_dword(offset)
        if size == 8:
            value |= self._read_dword(offset + 4) << 32
        return value

    def _write_access(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size:
            self.bad_accesses(f"{size}-byte write at {offset:#x}")
            return
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_bytes:
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)
            return
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + self.msix.pba_bytes:
            self.msix.pba_write(offset - MSIX_PBA_OFFSET, size, value)
            return
        # A 64-bit write is the low dword then the high dword, as software that cannot
        # write 64 bits at once would do it (and as the 64-bit registers expect).
        self._write_dword(offset, value & 0xFFFF_FFFF)
        if size == 8:
            self._write_dword(offset + 4, value >> 32)

    def _read_dword(self, offset: int) -> int:
        if offset < CAP_LENGTH:
            return self._cap_read(offset)
        oper_end = CAP_LENGTH + XHCI_PORT_BASE + XHCI_PORT_STRIDE * self.num_ports
        if CAP_LENGTH <= offset < oper_end:
            return self._oper_read(offset - CAP_LENGTH)
        runtime_end = RUNTIME_OFFSET + XHCI_IR0 + XHCI_IR_STRIDE * MAX_INTERRUPTERS
        if RUNTIME_OFFSET <= offset < runtime_end:
            return self._runtime_read(offset - RUNTIME_OFFSET)
        if DOORBELL_OFFSET <= offset < DOORBELL_OFFSET + 4 * (MAX_SLOTS + 1):
            return 0  # doorbells read as 0
        self.bad_accesses(f"read of unknown register {offset:#x}")
        return 0

    def _write_dword(self, offset: int, value: int) -> None:
        oper_end = CAP_LENGTH + XHCI_PORT_BASE + XHCI_PORT_STRIDE * self.num_ports
        runtime_end = RUNTIME_OFFSET + XHCI_IR0 + XHCI_IR_STRIDE * MAX_INTERRUPTERS
        if CAP_LENGTH <= offset < oper_end:
            self._oper_write(offset - CAP_LENGTH, value)
        elif RUNTIME_OFFSET <= offset < runtime_end:
            self._runtime_write(offset - RUNTIME_OFFSET, value)
        elif DOORBELL_OFFSET <= offset < DOORBELL_OFFSET + 4 * (MAX_SLOTS + 1):
            self._doorbell((offset - DOORBELL_OFFSET) // 4, value)
        else:
            self.bad_accesses(f"write of {value:#x} to read-only or unknown {offset:#x}")

    # -- capability registers --------------------------------------------------------------

    def _cap_read(self, offset: int) -> int:
        if offset == XHCI_CAPLENGTH:
            return CAP_LENGTH | XHCI_HCIVERSION_VALUE << 16
        if offset == XHCI_HCSPARAMS1:
            return (
                MAX_SLOTS << HCSPARAMS1_MAX_SLOTS_SHIFT
                | MAX_INTERRUPTERS << HCSPARAMS1_MAX_INTRS_SHIFT
                | self.num_ports << HCSPARAMS1_MAX_PORTS_SHIFT
            )
        if offset == XHCI_HCSPARAMS2:
            return ERST_MAX_EXPONENT << HCSPARAMS2_ERST_MAX_SHIFT  # no scratchpads, IST 0
        if offset == XHCI_HCSPARAMS3:
            return 0  # no U1/U2 exit latency: no USB 3 ports
        if offset == XHCI_HCCPARAMS1:
            xecp = XECP_OFFSET // 4
            return HCCPARAMS1_AC64 | HCCPARAMS1_NSS | xecp << HCCPARAMS1_XECP_SHIFT
        if offset == XHCI_DBOFF:
            return DOORBELL_OFFSET
        if offset == XHCI_RTSOFF:
            return RUNTIME_OFFSET
        if offset == XHCI_HCCPARAMS2:
            return 0
        # Two Supported Protocol capabilities (ID, next, revision; name; port range with no
        # protocol speed IDs and no LPM; slot type): USB 2.0, then USB 3.0.
        usb3_cap = XECP_OFFSET + SUPPORTED_PROTOCOL_SIZE
        if offset == XECP_OFFSET:
            next_cap = (SUPPORTED_PROTOCOL_SIZE // 4) << XECP_NEXT_SHIFT
            return XHCI_EXT_CAPS_PROTOCOL | next_cap | SUPPORTED_PROTOCOL_USB2 << 16
        if offset == usb3_cap:
            return XHCI_EXT_CAPS_PROTOCOL | SUPPORTED_PROTOCOL_USB3 << 16
        if offset in (XECP_OFFSET + 4, usb3_cap + 4):
            return SUPPORTED_PROTOCOL_NAME_USB
        if offset == XECP_OFFSET + 8:
            return 1 | self.num_usb2_ports << 8
        if offset == usb3_cap + 8:
            return (self.num_usb2_ports + 1) | USB3_PORTS << 8
        return 0  # the Protocol Slot Types (offsets 12) are 0

    # -- operational registers -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return not self._usbsts & USBSTS_HCH

    def _oper_read(self, offset: int) -> int:
        if offset >= XHCI_PORT_BASE:
            port = self._ports[(offset - XHCI_PORT_BASE) // XHCI_PORT_STRIDE]
            if (offset - XHCI_PORT_BASE) % XHCI_PORT_STRIDE == XHCI_PORTSC:
                return port.portsc
            return 0  # PORTPMSC, PORTLI, PORTHLPMC: no LPM, no link error counting
        if offset == XHCI_USBCMD:
            return self._usbcmd
        if offset == XHCI_USBSTS:
            return self._usbsts
        if offset == XHCI_PAGESIZE:
            return PAGESIZE_4K
        if offset == XHCI_DNCTRL:
            return self._dnctrl
        if offset == XHCI_CRCR:
            return CRCR_CRR if self._crr else 0  # the pointer reads as 0 (5.4.5)
        if offset == XHCI_CRCR + 4:
            return 0
        if offset == XHCI_DCBAAP:
            return self._dcbaap & 0xFFFF_FFFF
        if offset == XHCI_DCBAAP + 4:
            return self._dcbaap >> 32
        if offset == XHCI_CONFIG:
            return self._config
        return 0

    def _oper_write(self, offset: int, value: int) -> None:
        if offset >= XHCI_PORT_BASE:
            port = self._ports[(offset - XHCI_PORT_BASE) // XHCI_PORT_STRIDE]
            reg = (offset - XHCI_PORT_BASE) % XHCI_PORT_STRIDE
            if reg == XHCI_PORTSC:
                self._write_portsc(port, value)
            elif reg == XHCI_PORTLI:
                self.bad_accesses(f"write to read-only PORTLI of port {port.number}")
            # PORTPMSC/PORTHLPMC: USB 2 LPM is not offered (HLC = 0); writes are ignored.
            return
        if offset == XHCI_USBCMD:
            self._write_usbcmd(value)
        elif offset == XHCI_USBSTS:
            self._usbsts &= ~(value & USBSTS_RW1C)
            self._update_interrupt_lines()
        elif offset == XHCI_DNCTRL:
            self._dnctrl = value & DNCTRL_MASK
        elif offset == XHCI_CRCR:
            self._crcr_low = value
        elif offset == XHCI_CRCR + 4:
            self._write_crcr(value)
        elif offset == XHCI_DCBAAP:
            self._dcbaap = _set_bits(self._dcbaap, 0xFFFF_FFFF, value) & DCBAAP_MASK
        elif offset == XHCI_DCBAAP + 4:
            self._dcbaap = _set_bits(self._dcbaap, 0xFFFF_FFFF << 32, value << 32)
        elif offset == XHCI_CONFIG:
            if self.running:
                self.bad_accesses("CONFIG written while running")
                return
            self._config = min(value & CONFIG_MAX_SLOTS_EN_MASK, MAX_SLOTS)
        elif offset == XHCI_PAGESIZE:
            self.bad_accesses("write to read-only PAGESIZE")
        else:
            self.bad_accesses(f"write to reserved operational register {offset:#x}")

    def _write_usbcmd(self, value: int) -> None:
        if value & USBCMD_HCRST:
            self._reset_controller()  # HCRST completes at once: it reads back 0, CNR 0
            return
        if value & USBCMD_LHCRST:
            self.bad_accesses("light HC reset is not supported (LHRC = 0)")
        was_running = bool(self._usbcmd & USBCMD_RS)
        self._usbcmd = value & USBCMD_STORED
        if value & USBCMD_RS and not was_running:
            if self._usbsts & (USBSTS_HSE | USBSTS_HCE):
                # A controller that hit an error stays halted until HCRST.
                self._usbcmd &= ~USBCMD_RS
                self.guest_errors("R/S set after a host system/controller error")
            else:
                self._usbsts &= ~USBSTS_HCH
                self._mfindex_base = self.clock() - self._mfindex_frozen / MICROFRAMES_PER_SECOND
        elif not value & USBCMD_RS and was_running:
            self._halt()
        # CSS and CRS (save/restore state) complete at once: nothing is lost while the VM
        # runs, so SSS and RSS never show and SRE is never set.
        self._update_interrupt_lines()

    def _halt(self) -> None:
        self._usbcmd &= ~USBCMD_RS
        if self.running:
            self._mfindex_frozen = self._mfindex()
        self._usbsts |= USBSTS_HCH
        self._crr = False

    def _write_crcr(self, high: int) -> None:
        """The high dword completes a CRCR write (software writes low, then high)."""
        low = self._crcr_low
        if self._crr:
            # While the ring runs only Command Stop/Abort mean anything (5.4.5). Commands
            # execute synchronously, so there is never one in flight to abort.
            if low & (CRCR_CS | CRCR_CA):
                self._crr = False
                self._post_command_completion(
                    self._cmd_ring.dequeue, CompletionCode.COMMAND_RING_STOPPED, 0
                )
            return
        self._cmd_ring.dequeue = (high << 32 | low) & CRCR_POINTER_MASK
        self._cmd_ring.cycle = low & CRCR_RCS

    def _mfindex(self) -> int:
        if not self.running:
            return self._mfindex_frozen
        elapsed = self.clock() - self._mfindex_base
        return int(elapsed * MICROFRAMES_PER_SECOND) & MFINDEX_MASK

    # -- reset -----------------------------------------------------------------------------

    def _reset_controller(self) -> None:
        self._usbcmd = 0
        self._usbsts = USBSTS_HCH
        self._dnctrl = 0
        self._crcr_low = 0
        self._crr = False
        self._cmd_ring = _Ring()
        self._dcbaap = 0
        self._config = 0
        self._slots = [_Slot() for _ in range(MAX_SLOTS + 1)]
        self._intr = [_Interrupter() for _ in range(MAX_INTERRUPTERS)]
        self._mfindex_frozen = 0
        self._kicking.clear()
        self._rekick.clear()
        for port in self._ports:
            port.portsc = PORTSC_PP
            if port.device is not None:
                port.device.reset()
                speed = SPEED_ID[port.device.speed] << PORTSC_SPEED_SHIFT
                # Connected but not enabled: a USB 2 port waits in Polling for a reset.
                port.portsc |= PORTSC_CCS | PORTSC_CSC | speed | PLS_POLLING << PORTSC_PLS_SHIFT
            else:
                port.portsc |= PLS_RXDETECT << PORTSC_PLS_SHIFT
        self._update_interrupt_lines()

    # -- ports -----------------------------------------------------------------------------

    def _pls(self, port: _Port) -> int:
        return (port.portsc & PORTSC_PLS_MASK) >> PORTSC_PLS_SHIFT

    def _set_pls(self, port: _Port, pls: int) -> None:
        port.portsc = _set_bits(port.portsc, PORTSC_PLS_MASK, pls << PORTSC_PLS_SHIFT)

    def _write_portsc(self, port: _Port, value: int) -> None:
        # Change bits are write-1-to-clear.
        port.portsc &= ~(value & PORTSC_CHANGE)
        port.portsc = _set_bits(port.portsc, PORTSC_WAKE, value)
        if value & PORTSC_PED and port.portsc & PORTSC_PED:
            # Writing 1 to PED disables the port; PEC is only for hardware-caused changes.
            port.portsc &= ~PORTSC_PED
            if port.portsc & PORTSC_CCS:
                self._set_pls(port, PLS_POLLING)
        if value & PORTSC_WPR and not port.usb3:
            self.bad_accesses(f"warm reset of USB 2 port {port.number}")  # nothing to reset
        if value & PORTSC_PR:
            self._port_reset(port)
        elif value & PORTSC_LWS:
            self._link_state_write(port, (value & PORTSC_PLS_MASK) >> PORTSC_PLS_SHIFT)

    def _port_reset(self, port: _Port) -> None:
        if port.device is None or not port.portsc & PORTSC_CCS:
            return  # nothing to reset on an empty port: PR never shows
        port.device.reset()
        port.portsc |= PORTSC_PED
        self._set_pls(port, PLS_U0)
        self._port_change(port, PORTSC_PRC)

    def _link_state_write(self, port: _Port, pls: int) -> None:
        current = self._pls(port)
        if not port.portsc & PORTSC_PED:
            self.bad_accesses(f"link state write on disabled port {port.number}")
            return
        if pls == PLS_U3 and current == PLS_U0:
            self._set_pls(port, PLS_U3)  # software-initiated suspend: no PLC
        elif pls == PLS_RESUME and current == PLS_U3:
            self._set_pls(port, PLS_RESUME)
        elif pls == PLS_U0 and current in (PLS_U3, PLS_RESUME):
            self._set_pls(port, PLS_U0)
            self._port_change(port, PORTSC_PLC)
            self._resume_port(port.number)
        elif pls != current:
            self.bad_accesses(f"port {port.number}: link state {current} -> {pls} refused")

    def _port_change(self, port: _Port, bits: int) -> None:
        """Set change ``bits``; a bit that goes 0 -> 1 is a Port Status Change Event."""
        new = bits & ~port.portsc
        port.portsc |= bits
        if not new:
            return
        self._usbsts |= USBSTS_PCD
        if self.running:
            self._post_event(
                port.number << 24,
                CompletionCode.SUCCESS << EVENT_CC_SHIFT,
                TrbType.PORT_STATUS_CHANGE << TRB_TYPE_SHIFT,
            )

    def _port_ready(self, number: int) -> bool:
        if not 1 <= number <= self.num_ports:
            return False
        port = self._ports[number - 1]
        return port.device is not None and bool(port.portsc & PORTSC_PED)

    # -- doorbells -------------------------------------------------------------------------

    def _doorbell(self, index: int, value: int) -> None:
        if not self.running:
            self.bad_accesses(f"doorbell {index} rung while halted")
            return
        target = value & DB_TARGET_MASK
        stream = value >> DB_STREAM_SHIFT
        if index == 0:
            if target != DB_TARGET_HOST_COMMAND or stream:
                self.bad_accesses(f"command doorbell written with {value:#x}")
                return
            self._process_commands()
            return
        slot = self._slots[index]
        if slot.state is SlotState.DISABLED:
            self.guest_errors(f"doorbell of disabled slot {index}")
            return  # the xHC may ignore doorbells of disabled slots (4.7)
        if not 1 <= target <= MAX_DCI or stream:
            self.guest_errors(f"slot {index} doorbell with target {target}, stream {stream}")
            return
        endpoint = slot.endpoints.get(target)
        if endpoint is None:
            # 4.7: a Transfer Event with Endpoint Not Enabled, no TRB pointer.
            self.guest_errors(f"doorbell of disabled endpoint {target} of slot {index}")
            self._post_transfer_event(index, target, 0, CompletionCode.ENDPOINT_NOT_ENABLED, 0)
            return
        if endpoint.state is EpState.STOPPED:
            self._set_ep_state(index, endpoint, EpState.RUNNING)
        self._kick(index, target)

    # -- guest memory ----------------------------------------------------------------------

    def _read_trb(self, address: int) -> Trb:
        try:
            parameter, status, control = _TRB.unpack(self.memory.read(address, TRB_SIZE))
        except GuestMemoryError as e:
            raise _HostSystemError(f"ring TRB at {address:#x} is not guest RAM") from e
        return Trb(address, parameter, status, control)

    def _read_dwords(self, address: int, count: int) -> list[int]:
        raw = self.memory.read(address, 4 * count)
        return list(struct.unpack(f"<{count}I", raw))

    def _write_context(self, address: int, dwords: list[int]) -> None:
        try:
            self.memory.write(address, struct.pack(f"<{len(dwords)}I", *dwords))
        except GuestMemoryError as e:
            raise _HostSystemError(f"output context at {address:#x} is not guest RAM") from e

    def _fatal(self, e: Exception) -> None:
        if isinstance(e, _HostControllerError):
            self._usbsts |= USBSTS_HCE
            self.guest_errors(f"host controller error: {e}")
        else:
            self._usbsts |= USBSTS_HSE
            self.guest_errors(f"host system error: {e}")
        self._halt()

    # -- events and interrupts -------------------------------------------------------------

    def _post_command_completion(self, trb_address: int, code: int, slot_id: int) -> None:
        self._post_event(
            trb_address,
            code << EVENT_CC_SHIFT,
            TrbType.COMMAND_COMPLETION << TRB_TYPE_SHIFT | slot_id << TRB_SLOT_SHIFT,
        )

    def _post_transfer_event(
        self,
        slot_id: int,
        dci: int,
        pointer: int,
        code: int,
        residual: int,
        *,
        event_data: bool = False,
        interrupt: bool = True,
    ) -> None:
        control = (
            TrbType.TRANSFER_EVENT << TRB_TYPE_SHIFT
            | slot_id << TRB_SLOT_SHIFT
            | dci << TRB_EP_SHIFT
            | (EVENT_TRB_ED if event_data else 0)
        )
        status = code << EVENT_CC_SHIFT | (residual & 0xFF_FFFF)
        self._post_event(pointer, status, control, interrupt=interrupt)

    def _post_event(
        self, parameter: int, status: int, control: int, *, interrupt: bool = True
    ) -> None:
        """Write one event TRB on interrupter 0's event ring and owe an interrupt."""
        index = 0  # one interrupter: every Interrupter Target lands here
        intr = self._intr[index]
        if intr.ring_fault:
            if intr.ring_fault_is_bus_error:
                raise _HostSystemError(intr.ring_fault)
            raise _HostControllerError(intr.ring_fault)
        if not intr.segments:
            raise _HostControllerError("event ring not set up (ERSTSZ/ERSTBA)")
        total = intr.total
        dequeue = self._erdp_index(intr)
        free = (dequeue - intr.enqueue - 1) % total
        if free == 0:
            self.counters.events_lost += 1
            self.guest_errors("event ring full: event lost")
            return
        if free == 1:
            # The last free slot takes an Event Ring Full Error (4.9.4); this event is lost.
            self.counters.events_lost += 1
            self.guest_errors("event ring full")
            parameter, status = 0, CompletionCode.EVENT_RING_FULL << EVENT_CC_SHIFT
            control = TrbType.HOST_CONTROLLER_EVENT << TRB_TYPE_SHIFT
        address = self._event_address(intr, intr.enqueue)
        try:
            # Parameter and status first, then the dword with the cycle bit, so the
            # consumer never sees a valid cycle over stale contents.
            self.memory.write(address, struct.pack("<QI", parameter, status))
            self.memory.write_u32(address + 12, control | intr.pcs)
        except GuestMemoryError as e:
            raise _HostSystemError(f"event ring segment at {address:#x} is not RAM") from e
        self.counters.events += 1
        intr.enqueue += 1
        if intr.enqueue == total:
            intr.enqueue = 0
            intr.pcs ^= 1
        if interrupt:
            intr.pending = True
            self._try_assert(index)

    def _event_address(self, intr: _Interrupter, flat: int) -> int:
        for base, size in intr.segments:
            if flat < size:
                return base + TRB_SIZE * flat
            flat -= size
        raise _HostControllerError("event ring index outside the segments")

    def _erdp_index(self, intr: _Interrupter) -> int:
        pointer = intr.erdp & ERDP_POINTER_MASK
        flat = 0
        for base, size in intr.segments:
            if base <= pointer < base + TRB_SIZE * size:
                return flat + (pointer - base) // TRB_SIZE
            flat += size
        raise _HostControllerError(f"ERDP {pointer:#x} is outside the event ring")

    def _try_assert(self, index: int) -> None:
        """Assert interrupter ``index`` if an interrupt is owed and allowed now."""
        intr = self._intr[index]
        if not intr.pending or intr.ehb:
            return
        now = self.clock()
        if self.timer is not None and now < intr.ready_at:
            if intr.armed_for != intr.ready_at:
                intr.armed_for = intr.ready_at
                self.timer(intr.ready_at)
            return
        intr.pending = False
        intr.ehb = True
        intr.iman |= IMAN_IP
        self._usbsts |= USBSTS_EINT
        intr.ready_at = now + (intr.imod & IMOD_INTERVAL_MASK) * IMOD_UNIT
        self._update_interrupt_lines()

    def _update_interrupt_lines(self) -> None:
        """MSI-X: send the message for a pending, enabled interrupter (IP then clears).
        INTx: the line follows IP && IE && USBCMD.INTE."""
        intr = self._intr[0]
        active = bool(intr.iman & IMAN_IP and intr.iman & IMAN_IE and self._usbcmd & USBCMD_INTE)
        if self.msix.enabled:
            self.set_intx(False)
            if active and not self._closed:
                self.counters.interrupts += 1
                self.msix.signal(0)
                intr.iman &= ~IMAN_IP
            return
        if active and not self._intx_asserted:
            self.counters.interrupts += 1
        self.set_intx(active)

    def _msix_control_changed(self) -> None:
        with self.lock:
            self._update_interrupt_lines()

    # -- runtime registers -----------------------------------------------------------------

    def _runtime_read(self, offset: int) -> int:
        if offset == XHCI_MFINDEX:
            return self._mfindex()
        if offset < XHCI_IR0:
            return 0
        intr = self._intr[(offset - XHCI_IR0) // XHCI_IR_STRIDE]
        reg = (offset - XHCI_IR0) % XHCI_IR_STRIDE
        if reg == XHCI_IMAN:
            return intr.iman
        if reg == XHCI_IMOD:
            interval = intr.imod & IMOD_INTERVAL_MASK
            left = max(0.0, intr.ready_at - self.clock())
            counter = min(int(left / IMOD_UNIT), IMOD_INTERVAL_MASK)
            return interval | counter << IMOD_COUNTER_SHIFT
        if reg == XHCI_ERSTSZ:
            return intr.erstsz
        if reg == XHCI_ERSTBA:
            return intr.erstba & 0xFFFF_FFFF
        if reg == XHCI_ERSTBA + 4:
            return intr.erstba >> 32
        if reg == XHCI_ERDP:
            return (intr.erdp & 0xFFFF_FFFF) | (ERDP_EHB if intr.ehb else 0)
        if reg == XHCI_ERDP + 4:
            return intr.erdp >> 32
        return 0

    def _runtime_write(self, offset: int, value: int) -> None:
        if offset < XHCI_IR0:
            self.bad_accesses(f"write to read-only runtime register {offset:#x}")
            return
        index = (offset - XHCI_IR0) // XHCI_IR_STRIDE
        intr = self._intr[index]
        reg = (offset - XHCI_IR0) % XHCI_IR_STRIDE
        if reg == XHCI_IMAN:
            if value & IMAN_IP:
                intr.iman &= ~IMAN_IP
            intr.iman = _set_bits(intr.iman, IMAN_IE, value)
            self._update_interrupt_lines()
        elif reg == XHCI_IMOD:
            intr.imod = value & IMOD_INTERVAL_MASK
            counter = value >> IMOD_COUNTER_SHIFT
            intr.ready_at = self.clock() + counter * IMOD_UNIT
            self._try_assert(index)
        elif reg == XHCI_ERSTSZ:
            intr.erstsz = value & ERSTSZ_MASK
        elif reg == XHCI_ERSTBA:
            intr.erstba = _set_bits(intr.erstba, 0xFFFF_FFFF, value) & ERSTBA_MASK
        elif reg == XHCI_ERSTBA + 4:
            intr.erstba = _set_bits(intr.erstba, 0xFFFF_FFFF << 32, value << 32)
            self._load_erst(intr)
        elif reg == XHCI_ERDP:
            intr.erdp = _set_bits(intr.erdp, 0xFFFF_FFFF, value & ~ERDP_EHB)
            if value & ERDP_EHB:
                self._clear_ehb(index)
        elif reg == XHCI_ERDP + 4:
            intr.erdp = _set_bits(intr.erdp, 0xFFFF_FFFF << 32, value << 32)
        else:
            self.bad_accesses(f"write to reserved interrupter register {reg:#x}")

    def _clear_ehb(self, index: int) -> None:
        """Software finished a batch; if events remain unconsumed, interrupt again."""
        intr = self._intr[index]
        intr.ehb = False
        if not intr.segments or intr.ring_fault:
            return
        try:
            unconsumed = self._erdp_index(intr) != intr.enqueue
        except _HostControllerError:
            self.guest_errors("ERDP written outside the event ring")
            return  # the fault shows when the next event is written
        if unconsumed:
            intr.pending = True
        self._try_assert(index)

    def _load_erst(self, intr: _Interrupter) -> None:
        """ERSTBA written: read the segment table and restart the event ring (4.9.4)."""
        intr.segments = []
        intr.enqueue = 0
        intr.pcs = 1
        intr.ring_fault = ""
        intr.ring_fault_is_bus_error = False
        size = intr.erstsz
        if not 1 <= size <= 1 << ERST_MAX_EXPONENT:
            intr.ring_fault = f"ERSTSZ {size} is not 1..{1 << ERST_MAX_EXPONENT}"
            return
        try:
            raw = self.memory.read(intr.erstba, ERST_ENTRY_SIZE * size)
        except GuestMemoryError:
            intr.ring_fault = f"ERST at {intr.erstba:#x} is not guest RAM"
            intr.ring_fault_is_bus_error = True
            return
        for i in range(size):
            base, trbs, _ = struct.unpack_from("<QII", raw, ERST_ENTRY_SIZE * i)
            base &= ERSTBA_MASK  # segment bases are 64-byte aligned
            trbs &= 0xFFFF
            if not EVENT_SEGMENT_MIN <= trbs <= EVENT_SEGMENT_MAX:
                intr.ring_fault = f"event ring segment {i} has {trbs} TRBs"
                return
            if not self.memory.contains(base, TRB_SIZE * trbs):
                intr.ring_fault = f"event ring segment {i} at {base:#x} is not guest RAM"
                intr.ring_fault_is_bus_error = True
                return
            intr.segments.append((base, trbs))

    # -- the command ring ------------------------------------------------------------------

    def _process_commands(self) -> None:
        self._crr = True
        ring = self._cmd_ring
        try:
            for _ in range(COMMAND_BUDGET):
                if not self.running or not self._crr:
                    return
                trb = self._fetch_command(ring)
                if trb is None:
                    return
                self.counters.commands += 1
                code, slot_id = self._execute_command(trb)
                ring.dequeue = trb.address + TRB_SIZE
                self._post_command_completion(trb.address, code, slot_id)
            self.guest_errors(f"more than {COMMAND_BUDGET} commands for one doorbell")
        except (_HostSystemError, _HostControllerError) as e:
            self._fatal(e)

    def _fetch_command(self, ring: _Ring) -> Trb | None:
        """The next command TRB (Link TRBs followed), or None when the ring is empty."""
        for _ in range(LINK_LIMIT + 1):
            trb = self._read_trb(ring.dequeue)
            if trb.cycle != ring.cycle:
                return None
            if trb.type != TrbType.LINK:
                return trb
            ring.dequeue = trb.parameter & TRB_POINTER_MASK
            if trb.flag(TRB_TC):
                ring.cycle ^= 1
        # A chain of links that never reaches a command: report it on the last link and stay
        # there (the next doorbell finds the same loop, and stops the same way).
        self.guest_errors(f"command ring: more than {LINK_LIMIT} Link TRBs in a row")
        self._post_command_completion(trb.address, CompletionCode.TRB_ERROR, 0)
        return None

    def _execute_command(self, trb: Trb) -> tuple[int, int]:
        """Run one command; returns (completion code, Slot ID for the event)."""
        kind = trb.type
        handlers: dict[int, Callable[[Trb], int]] = {
            TrbType.DISABLE_SLOT: self._cmd_disable_slot,
            TrbType.ADDRESS_DEVICE: self._cmd_address_device,
            TrbType.CONFIGURE_ENDPOINT: self._cmd_configure_endpoint,
            TrbType.EVALUATE_CONTEXT: self._cmd_evaluate_context,
            TrbType.RESET_ENDPOINT: self._cmd_reset_endpoint,
            TrbType.STOP_ENDPOINT: self._cmd_stop_endpoint,
            TrbType.SET_TR_DEQUEUE: self._cmd_set_tr_dequeue,
            TrbType.RESET_DEVICE: self._cmd_reset_device,
        }
        try:
            if kind == TrbType.NOOP_COMMAND:
                return CompletionCode.SUCCESS, 0
            if kind == TrbType.ENABLE_SLOT:
                return self._cmd_enable_slot(trb)
            handler = handlers.get(kind)
            if handler is None:
                raise _CommandFailed(CompletionCode.TRB_ERROR, f"TRB type {kind} on command ring")
            return handler(trb), trb.slot_id
        except _CommandFailed as e:
            self.guest_errors(f"command {kind} at {trb.address:#x}: {e}")
            slot_id = 0 if kind == TrbType.ENABLE_SLOT else trb.slot_id
            return e.code, slot_id

    def _slot(self, trb: Trb) -> _Slot:
        slot_id = trb.slot_id
        if not 1 <= slot_id <= MAX_SLOTS:
            raise _CommandFailed(CompletionCode.TRB_ERROR, f"Slot ID {slot_id}")
        slot = self._slots[slot_id]
        if slot.state is SlotState.DISABLED:
            raise _CommandFailed(CompletionCode.SLOT_NOT_ENABLED, f"slot {slot_id} disabled")
        return slot

    def _need_state(self, slot: _Slot, *states: SlotState) -> None:
        if slot.state not in states:
            raise _CommandFailed(CompletionCode.CONTEXT_STATE_ERROR, f"slot is {slot.state.name}")

    def _endpoint(self, slot: _Slot, trb: Trb) -> _Endpoint:
        dci = trb.endpoint_id
        if dci == 0:
            raise _CommandFailed(CompletionCode.TRB_ERROR, "Endpoint ID 0")
        endpoint = slot.endpoints.get(dci)
        if endpoint is None:
            raise _CommandFailed(CompletionCode.CONTEXT_STATE_ERROR, f"endpoint {dci} disabled")
        return endpoint

    def _read_input(self, trb: Trb) -> tuple[int, list[int]]:
        """The Input Context the TRB points at, checked, and its control context."""
        address = trb.parameter & TRB_POINTER_MASK
        if not self.memory.contains(address, INPUT_CONTEXT_SIZE):
            raise _CommandFailed(CompletionCode.TRB_ERROR, f"input context {address:#x}")
        return address, self._read_dwords(address, 2)

    def _input_context(self, address: int, index: int) -> list[int]:
        """Context ``index`` of an input context (0: slot, 1..31: endpoints by DCI)."""
        return self._read_dwords(address + CONTEXT_SIZE * (index + 1), CONTEXT_DWORDS)

    def _output_context(self, slot_id: int) -> int:
        """The output Device Context the DCBAA names for ``slot_id``, checked."""
        try:
            address = self.memory.read_u64(self._dcbaap + 8 * slot_id) & ~0x3F
        except GuestMemoryError as e:
            raise _HostSystemError(f"DCBAA entry {slot_id} is not guest RAM") from e
        if not self.memory.contains(address, DEVICE_CONTEXT_SIZE):
            raise _HostSystemError(f"device context {address:#x} of slot {slot_id}")
        return address

    def _check_dequeue(self, value: int, what: str) -> int:
        pointer = value & TRB_POINTER_MASK
        if value & EP_CTX_DEQUEUE_RSVD or not self.memory.contains(pointer, TRB_SIZE):
            raise _CommandFailed(CompletionCode.PARAMETER_ERROR, f"{what} dequeue {value:#x}")
        return pointer

    def _new_endpoint(self, dci: int, ctx: list[int], what: str) -> _Endpoint:
        """An endpoint from an input Endpoint Context, after checking it."""
        ep_type = EpType((ctx[1] & EP_CTX_TYPE_MASK) >> EP_CTX_TYPE_SHIFT)  # 3 bits: all named
        max_packet = (ctx[1] & EP_CTX_MAX_PACKET_MASK) >> EP_CTX_MAX_PACKET_SHIFT
        # DCI 1 is the default control endpoint; odd DCIs are IN (or control), even OUT.
        allowed = (EpType.CONTROL,) if dci == 1 else (_IN_TYPES if dci % 2 else _OUT_TYPES)
        if ep_type not in allowed:
            raise _CommandFailed(CompletionCode.PARAMETER_ERROR, f"{what}: type {ep_type.name}")
        if ep_type in _ISOCH_TYPES or (dci > 1 and ep_type is EpType.CONTROL):
            # Isochronous and extra control endpoints are not offered: no resources for them.
            raise _CommandFailed(CompletionCode.RESOURCE_ERROR, f"{what}: {ep_type.name}")
        if max_packet == 0:
            raise _CommandFailed(CompletionCode.PARAMETER_ERROR, f"{what}: max packet size 0")
        if ctx[0] & (EP_CTX_MAX_PSTREAMS_MASK | EP_CTX_LSA):
            raise _CommandFailed(CompletionCode.PARAMETER_ERROR, f"{what}: streams")
        dequeue = self._check_dequeue(ctx[2] | ctx[3] << 32, what)
        context = list(ctx)
        context[0] = _set_bits(context[0], EP_CTX_STATE_MASK, EpState.RUNNING)
        ring = _Ring(dequeue, ctx[2] & EP_CTX_DCS)
        return _Endpoint(dci, ep_type, max_packet, ring, context)

    def _cmd_enable_slot(self, trb: Trb) -> tuple[int, int]:
        slot_type = (trb.control >> TRB_SLOT_TYPE_SHIFT) & TRB_SLOT_TYPE_MASK
        if slot_type != SUPPORTED_PROTOCOL_SLOT_TYPE:
            raise _CommandFailed(CompletionCode.TRB_ERROR, f"slot type {slot_type}")
        for slot_id in range(1, self._config + 1):
            if self._slots[slot_id].state is SlotState.DISABLED:
                self._slots[slot_id] = _Slot(state=SlotState.ENABLED)
                return CompletionCode.SUCCESS, slot_id
        raise _CommandFailed(CompletionCode.NO_SLOTS_AVAILABLE, "all enabled slots in use")

    def _cmd_disable_slot(self, trb: Trb) -> int:
        self._slot(trb)
        # The device context belongs to software again; nothing is written to it.
        self._slots[trb.slot_id] = _Slot()
        return CompletionCode.SUCCESS

    def _cmd_address_device(self, trb: Trb) -> int:
        slot_id = trb.slot_id
        slot = self._slot(trb)
        bsr = trb.flag(TRB_BSR)
        if bsr:
            self._need_state(slot, SlotState.ENABLED)
        else:
            self._need_state(slot, SlotState.ENABLED, SlotState.DEFAULT)
        address, (_, add) = self._read_input(trb)
        if add & (ADD_SLOT | ADD_EP0) != ADD_SLOT | ADD_EP0:
            raise _CommandFailed(CompletionCode.PARAMETER_ERROR, f"add flags {add:#x}")
        slot_ctx = self._input_context(address, 0)
        ep0_ctx = self._input_context(address, 1)
        port_number = (slot_ctx[1] >> SLOT_CTX_PORT_SHIFT) & 0xFF
        if not 1 <= port_number <= self.num_ports:
            raise _CommandFailed(CompletionCode.PARAMETER_ERROR, f"root hub port {port_number}")
        ep0 = self._new_endpoint(1, ep0_ctx, "EP0")
        output = self._output_context(slot_id)
        port = self._ports[port_number - 1]
        if slot_ctx[0] & SLOT_CTX_ROUTE_MASK or not self._port_ready(port_number):
            raise _CommandFailed(
                CompletionCode.USB_TRANSACTION_ERROR, f"no enabled device at port {port_number}"
            )
        for other_id, other in enumerate(self._slots):
            if other_id != slot_id and other.port == port_number:
                raise _CommandFailed(
                    CompletionCode.TRB_ERROR, f"port {port_number} belongs to slot {other_id}"
                )
        assert port.device is not None
        usb_address = 0
        if not bsr:
            usb_address = slot_id
            setup = SetupPacket(USB_DIR_OUT | USB_RECIP_DEVICE, USB_REQ_SET_ADDRESS, slot_id, 0, 0)
            if isinstance(port.device.control(setup), Handshake):
                raise _CommandFailed(CompletionCode.USB_TRANSACTION_ERROR, "SET_ADDRESS refused")
        state = SlotState.DEFAULT if bsr else SlotState.ADDRESSED
        slot.state = state
        slot.port = port_number
        slot.context = output
        slot.slot_context = list(slot_ctx)
        slot.slot_context[3] = usb_address | state << SLOT_CTX_STATE_SHIFT
        slot.endpoints = {1: ep0}
        self._write_context(output, slot.slot_context)
        self._write_context(output + CONTEXT_SIZE, ep0.context)
        return CompletionCode.SUCCESS

    def _cmd_configure_endpoint(self, trb: Trb) -> int:
        slot = self._slot(trb)
        self._need_state(slot, SlotState.ADDRESSED, SlotState.CONFIGURED)
        if trb.flag(TRB_DC):
            for dci in [d for d in slot.endpoints if d > 1]:
                self._drop_endpoint(slot, dci)
            self._set_slot_state(slot, SlotState.ADDRESSED)
            return CompletionCode.SUCCESS
        address, (drop, add) = self._read_input(trb)
        drop &= ~(ADD_SLOT | ADD_EP0)  # D0 and D1 are reserved
        added: dict[int, _Endpoint] = {}
        for dci in range(2, MAX_DCI + 1):
            if add & 1 << dci:
                ctx = self._input_context(address, dci)
                added[dci] = self._new_endpoint(dci, ctx, f"endpoint {dci}")
        slot_ctx = self._input_context(address, 0) if add & ADD_SLOT else None
        # Everything checked: apply drops, then adds (a drop and add of one DCI replaces it).
        for dci in range(2, MAX_DCI + 1):
            if drop & 1 << dci and dci in slot.endpoints:
                self._drop_endpoint(slot, dci)
        for dci, endpoint in added.items():
            slot.endpoints[dci] = endpoint
            self._write_context(slot.context + CONTEXT_SIZE * dci, endpoint.context)
        if slot_ctx is not None:
            slot.slot_context[0] = _set_bits(
                slot.slot_context[0], SLOT_CTX_ENTRIES_MASK, slot_ctx[0]
            )
        configured = any(dci > 1 for dci in slot.endpoints)
        self._set_slot_state(slot, SlotState.CONFIGURED if configured else SlotState.ADDRESSED)
        return CompletionCode.SUCCESS

    def _drop_endpoint(self, slot: _Slot, dci: int) -> None:
        endpoint = slot.endpoints.pop(dci)
        endpoint.context[0] = _set_bits(endpoint.context[0], EP_CTX_STATE_MASK, EpState.DISABLED)
        self._write_context(slot.context + CONTEXT_SIZE * dci, endpoint.context)

    def _set_slot_state(self, slot: _Slot, state: SlotState) -> None:
        slot.state = state
        slot.slot_context[3] = _set_bits(
            slot.slot_context[3], 0x1F << SLOT_CTX_STATE_SHIFT, state << SLOT_CTX_STATE_SHIFT
        )
        self._write_context(slot.context, slot.slot_context)

    def _cmd_evaluate_context(self, trb: Trb) -> int:
        slot = self._slot(trb)
        self._need_state(slot, SlotState.DEFAULT, SlotState.ADDRESSED, SlotState.CONFIGURED)
        address, (_, add) = self._read_input(trb)
        # Only A0 and A1 are evaluated; other flags are ignored.
        max_packet = None
        if add & ADD_EP0:
            ep0_ctx = self._input_context(address, 1)
            max_packet = (ep0_ctx[1] & EP_CTX_MAX_PACKET_MASK) >> EP_CTX_MAX_PACKET_SHIFT
            if max_packet == 0:
                raise _CommandFailed(CompletionCode.PARAMETER_ERROR, "EP0 max packet size 0")
        if add & ADD_SLOT:
            slot_ctx = self._input_context(address, 0)
            ctx = slot.slot_context
            ctx[1] = _set_bits(ctx[1], SLOT_CTX_MEL_MASK, slot_ctx[1])
            ctx[2] = _set_bits(ctx[2], SLOT_CTX_INTR_TARGET_MASK, slot_ctx[2])
            self._write_context(slot.context, ctx)
        if max_packet is not None:
            ep0 = slot.endpoints[1]
            ep0.max_packet = max_packet
            ep0.context[1] = _set_bits(
                ep0.context[1], EP_CTX_MAX_PACKET_MASK, max_packet << EP_CTX_MAX_PACKET_SHIFT
            )
            self._write_context(slot.context + CONTEXT_SIZE, ep0.context)
        return CompletionCode.SUCCESS

    def _cmd_reset_endpoint(self, trb: Trb) -> int:
        slot = self._slot(trb)
        endpoint = self._endpoint(slot, trb)
        if endpoint.state is not EpState.HALTED:
            raise _CommandFailed(
                CompletionCode.CONTEXT_STATE_ERROR, f"endpoint is {endpoint.state.name}"
            )
        self._set_ep_state(trb.slot_id, endpoint, EpState.STOPPED)
        return CompletionCode.SUCCESS

    def _cmd_stop_endpoint(self, trb: Trb) -> int:
        slot = self._slot(trb)
        endpoint = self._endpoint(slot, trb)
        if endpoint.state is not EpState.RUNNING:
            raise _CommandFailed(
                CompletionCode.CONTEXT_STATE_ERROR, f"endpoint is {endpoint.state.name}"
            )
        if endpoint.waiting:
            # The TD at the dequeue pointer was in progress (being polled): it stops with
            # nothing transferred, and software sees where (4.6.9).
            try:
                head = self._read_trb(endpoint.ring.dequeue)
            except _HostSystemError:
                head = Trb(endpoint.ring.dequeue, 0, 0, 0)
            self._post_transfer_event(
                trb.slot_id, endpoint.dci, head.address, CompletionCode.STOPPED, head.length
            )
            endpoint.waiting = False
        self._set_ep_state(trb.slot_id, endpoint, EpState.STOPPED)
        return CompletionCode.SUCCESS

    def _cmd_set_tr_dequeue(self, trb: Trb) -> int:
        slot = self._slot(trb)
        endpoint = self._endpoint(slot, trb)
        stream = trb.status >> TRB_STREAM_SHIFT
        if stream:
            raise _CommandFailed(CompletionCode.INVALID_STREAM_ID, f"stream {stream}")
        if endpoint.state not in (EpState.STOPPED, EpState.ERROR):
            raise _CommandFailed(
                CompletionCode.CONTEXT_STATE_ERROR, f"endpoint is {endpoint.state.name}"
            )
        pointer = trb.parameter & TRB_POINTER_MASK
        if trb.parameter & SET_DEQ_SCT_MASK or not self.memory.contains(pointer, TRB_SIZE):
            raise _CommandFailed(CompletionCode.TRB_ERROR, f"dequeue {trb.parameter:#x}")
        endpoint.ring = _Ring(pointer, trb.parameter & SET_DEQ_DCS)
        endpoint.waiting = False
        self._set_ep_state(trb.slot_id, endpoint, EpState.STOPPED)
        return CompletionCode.SUCCESS

    def _cmd_reset_device(self, trb: Trb) -> int:
        slot = self._slot(trb)
        self._need_state(slot, SlotState.ADDRESSED, SlotState.CONFIGURED)
        for dci in [d for d in slot.endpoints if d > 1]:
            self._drop_endpoint(slot, dci)
        ctx = slot.slot_context
        ctx[0] = _set_bits(ctx[0], SLOT_CTX_ENTRIES_MASK, 1 << SLOT_CTX_ENTRIES_SHIFT)
        ctx[3] = _set_bits(ctx[3], SLOT_CTX_ADDRESS_MASK, 0)
        self._set_slot_state(slot, SlotState.DEFAULT)
        return CompletionCode.SUCCESS

    def _set_ep_state(self, slot_id: int, endpoint: _Endpoint, state: EpState) -> None:
        """Change an endpoint's state and publish it, with the dequeue pointer, in the
        output context (what software reads after a stop or a halt)."""
        endpoint.state = state
        ctx = endpoint.context
        ctx[0] = _set_bits(ctx[0], EP_CTX_STATE_MASK, state)
        ring = endpoint.ring
        ctx[2] = (ring.dequeue & 0xFFFF_FFF0) | ring.cycle
        ctx[3] = ring.dequeue >> 32
        slot = self._slots[slot_id]
        self._write_context(slot.context + CONTEXT_SIZE * endpoint.dci, ctx)

    # -- transfer rings --------------------------------------------------------------------

    def _device_data(self, port_number: int, endpoint_number: int) -> None:
        """A device's IN endpoint has data (called with the lock held)."""
        try:
            port = self._ports[port_number - 1]
            if self._pls(port) == PLS_U3:
                device = port.device
                if device is not None and device.wants_remote_wakeup():
                    self._set_pls(port, PLS_RESUME)  # remote wakeup signalling
                    self._port_change(port, PORTSC_PLC)
                return
            self._resume_port(port_number, endpoint_number * 2 + 1)
        except (_HostSystemError, _HostControllerError) as e:
            self._fatal(e)

    def _resume_port(self, port_number: int, only_dci: int | None = None) -> None:
        """Retry NAKed IN transfers of the device on ``port_number``."""
        if not self.running:
            return
        for slot_id, slot in enumerate(self._slots):
            if slot.port != port_number or slot.state is SlotState.DISABLED:
                continue
            for dci, endpoint in list(slot.endpoints.items()):
                if only_dci is not None and dci != only_dci:
                    continue
                if endpoint.waiting and endpoint.state is EpState.RUNNING:
                    self._kick(slot_id, dci)

    def _kick(self, slot_id: int, dci: int) -> None:
        """Run the TDs on an endpoint's ring until it is empty, NAKed, halted or the budget
        is spent."""
        key = (slot_id, dci)
        if key in self._kicking:
            self._rekick.add(key)  # a device called back from inside a transfer
            return
        self._kicking.add(key)
        try:
            for _ in range(TD_BUDGET):
                self._rekick.discard(key)
                if not self._run_one_td(slot_id, dci) and key not in self._rekick:
                    return
            self.guest_errors(f"slot {slot_id} endpoint {dci}: TD budget spent")
        except (_HostSystemError, _HostControllerError) as e:
            self._fatal(e)
        finally:
            self._kicking.discard(key)

    def _run_one_td(self, slot_id: int, dci: int) -> bool:
        """Execute the TD at the dequeue pointer; True if the ring moved on."""
        if not self.running:
            return False
        slot = self._slots[slot_id]
        endpoint = slot.endpoints.get(dci)
        if endpoint is None or endpoint.state is not EpState.RUNNING:
            return False
        if self._pls(self._ports[slot.port - 1]) in (PLS_U3, PLS_RESUME):
            endpoint.waiting = True  # a suspended port moves nothing until resumed
            return False
        try:
            td = self._gather_td(endpoint)
            if td is None:
                endpoint.waiting = False
                return False
            if endpoint.type is EpType.CONTROL:
                done = self._control_td(slot_id, slot, endpoint, td)
            else:
                done = self._data_td(slot_id, slot, endpoint, td)
        except _TdFault as fault:
            self.guest_errors(f"slot {slot_id} endpoint {dci}: {fault}")
            self._halt_endpoint(slot_id, endpoint, fault.trb, fault.code, fault.residual)
            return False
        if not done:
            endpoint.waiting = True
            return False
        endpoint.waiting = False
        endpoint.ring.dequeue = td.next_dequeue
        endpoint.ring.cycle = td.next_cycle
        self.counters.transfer_tds += 1
        return True

    def _halt_endpoint(
        self, slot_id: int, endpoint: _Endpoint, trb: Trb, code: CompletionCode, residual: int
    ) -> None:
        """An error ends the TD at ``trb``: report it and halt, dequeue on that TRB."""
        endpoint.waiting = False
        self._post_transfer_event(slot_id, endpoint.dci, trb.address, code, residual)
        endpoint.ring = _Ring(trb.address, trb.cycle)
        self._set_ep_state(slot_id, endpoint, EpState.HALTED)

    def _gather_td(self, endpoint: _Endpoint) -> _Td | None:
        """The TD at the dequeue pointer, without consuming it; None while it is not all
        there (the producer has not flipped every cycle bit yet)."""
        address, cycle = endpoint.ring.dequeue, endpoint.ring.cycle
        trbs: list[Trb] = []
        links = 0
        control = endpoint.type is EpType.CONTROL
        while True:
            trb = self._read_trb(address)
            if trb.cycle != cycle:
                return None
            if trb.type == TrbType.LINK:
                links += 1
                if links > LINK_LIMIT:
                    raise _TdFault(trb, CompletionCode.TRB_ERROR, "Link TRB loop")
                address = trb.parameter & TRB_POINTER_MASK
                if trb.flag(TRB_TC):
                    cycle ^= 1
                continue
            links = 0
            trbs.append(trb)
            address += TRB_SIZE
            if len(trbs) > TD_TRB_LIMIT:
                raise _TdFault(trbs[0], CompletionCode.TRB_ERROR, "TD longer than the limit")
            if self._td_ends(trbs, control):
                return _Td(trbs, address, cycle)

    @staticmethod
    def _td_ends(trbs: list[Trb], control: bool) -> bool:
        last = trbs[-1]
        if last.flag(TRB_CH):
            return False
        if not control or trbs[0].type != TrbType.SETUP_STAGE:
            return True
        # A control transfer runs from its Setup Stage to its Status Stage (and an Event
        # Data TRB chained after it); a stray Setup in the middle ends it, to be refused.
        if len(trbs) > 1 and last.type == TrbType.SETUP_STAGE:
            return True
        return any(t.type == TrbType.STATUS_STAGE for t in trbs)

    def _check_buffer(self, trb: Trb, is_in: bool) -> None:
        """The checks every data-carrying TRB gets before anything moves."""
        length = trb.length
        if length > MAX_TRB_LENGTH:
            raise _TdFault(trb, CompletionCode.TRB_ERROR, f"TRB length {length:#x}")
        if trb.flag(TRB_IDT):
            if is_in or length > IDT_MAX:
                raise _TdFault(trb, CompletionCode.TRB_ERROR, "bad Immediate Data TRB")
            return
        if length and not self.memory.contains(trb.parameter, length):
            raise _TdFault(
                trb, CompletionCode.TRB_ERROR, f"buffer {trb.parameter:#x}+{length:#x}", length
            )

    def _gather_out(self, trbs: list[Trb], limit: int) -> bytes:
        """The OUT data of a TD, at most ``limit`` bytes (a guest can chain far more)."""
        data = bytearray()
        for trb in trbs:
            room = limit - len(data)
            if trb.type not in (TrbType.NORMAL, TrbType.DATA_STAGE) or room <= 0:
                continue
            length = min(trb.length, room)
            if trb.flag(TRB_IDT):
                data += trb.parameter.to_bytes(8, "little")[:length]
            elif length:
                data += self.memory.read(trb.parameter, length)
        return bytes(data)

    def _deliver(self, slot_id: int, dci: int, trbs: list[Trb], data: bytes | None) -> None:
        """Move a TD's data and post its events (4.10.1). ``data`` is what the device sent
        for an IN TD (written into the buffers), None for OUT (all of it was taken)."""
        is_in = data is not None
        payload = data or b""
        offset = 0  # bytes moved so far in this TD
        edtla = 0  # Event Data Transfer Length Accumulator
        total = sum(t.length for t in trbs if t.type in (TrbType.NORMAL, TrbType.DATA_STAGE))
        short = False
        owed = False  # a short packet whose TRB asked for no event: report at the next IOC
        for trb in trbs:
            interrupt = not trb.flag(TRB_BEI)
            kind = trb.type
            if kind == TrbType.EVENT_DATA:
                if trb.flag(TRB_IOC):
                    code = CompletionCode.SHORT_PACKET if short else CompletionCode.SUCCESS
                    self._post_transfer_event(
                        slot_id,
                        dci,
                        trb.parameter,
                        code,
                        edtla,
                        event_data=True,
                        interrupt=interrupt,
                    )
                    owed = False
                edtla = 0
                continue
            if kind == TrbType.NOOP:
                if trb.flag(TRB_IOC) and not short:
                    self._post_transfer_event(
                        slot_id, dci, trb.address, CompletionCode.SUCCESS, 0, interrupt=interrupt
                    )
                continue
            if short:
                # After a short packet the rest of the TD moves nothing (4.10.1.1).
                if owed and trb.flag(TRB_IOC):
                    residual = total - offset
                    self._post_transfer_event(
                        slot_id,
                        dci,
                        trb.address,
                        CompletionCode.SHORT_PACKET,
                        residual,
                        interrupt=interrupt,
                    )
                    owed = False
                continue
            length = trb.length
            moved = min(length, len(payload) - offset) if is_in else length
            if is_in and moved:
                self.memory.write(trb.parameter, payload[offset : offset + moved])
            offset += moved
            edtla += moved
            if moved < length:
                short = True
                if trb.flag(TRB_ISP) or trb.flag(TRB_IOC):
                    self._post_transfer_event(
                        slot_id,
                        dci,
                        trb.address,
                        CompletionCode.SHORT_PACKET,
                        length - moved,
                        interrupt=interrupt,
                    )
                else:
                    owed = True
            elif trb.flag(TRB_IOC):
                self._post_transfer_event(
                    slot_id, dci, trb.address, CompletionCode.SUCCESS, 0, interrupt=interrupt
                )

    def _data_td(self, slot_id: int, slot: _Slot, endpoint: _Endpoint, td: _Td) -> bool:
        """A TD on an interrupt or bulk endpoint; False when the device NAKed."""
        is_in = endpoint.is_in
        normals = []
        for trb in td.trbs:
            if trb.type == TrbType.NORMAL:
                self._check_buffer(trb, is_in)
                normals.append(trb)
            elif trb.type not in (TrbType.EVENT_DATA, TrbType.NOOP):
                raise _TdFault(trb, CompletionCode.TRB_ERROR, f"TRB type {trb.type} on a data ring")
        if not normals:
            self._deliver(slot_id, endpoint.dci, td.trbs, b"" if is_in else None)
            return True
        if not self._port_ready(slot.port):
            raise _TdFault(normals[0], CompletionCode.USB_TRANSACTION_ERROR, "port not enabled")
        device = self._ports[slot.port - 1].device
        assert device is not None
        total = sum(t.length for t in normals)
        result: bytes | Handshake | None
        if is_in:
            result = device.transfer_in(endpoint.number, total)
        else:
            result = device.transfer_out(
                endpoint.number, self._gather_out(normals, MAX_OUT_TD_BYTES)
            )
        if result is Handshake.NAK:
            return False
        if result is Handshake.STALL:
            raise _TdFault(normals[0], CompletionCode.STALL_ERROR, "STALL", normals[0].length)
        if isinstance(result, bytes) and len(result) > total:
            raise _TdFault(normals[0], CompletionCode.BABBLE_DETECTED, "babble", normals[0].length)
        self._deliver(slot_id, endpoint.dci, td.trbs, result if isinstance(result, bytes) else None)
        return True

    def _control_td(self, slot_id: int, slot: _Slot, endpoint: _Endpoint, td: _Td) -> bool:
        """A control transfer (or a stray No Op / Event Data TD) on endpoint 0."""
        trbs = td.trbs
        first = trbs[0]
        if first.type != TrbType.SETUP_STAGE:
            for trb in trbs:
                if trb.type not in (TrbType.NOOP, TrbType.EVENT_DATA):
                    raise _TdFault(trb, CompletionCode.TRB_ERROR, f"TRB type {trb.type} on EP0")
            self._deliver(slot_id, endpoint.dci, trbs, b"")
            return True
        if not first.flag(TRB_IDT) or first.length != 8:
            raise _TdFault(first, CompletionCode.TRB_ERROR, "Setup Stage without 8 bytes of IDT")
        setup = SetupPacket.from_int(first.parameter)
        data_trbs: list[Trb] = []
        status: Trb | None = None
        for trb in trbs[1:]:
            kind = trb.type
            if status is not None:
                if kind != TrbType.EVENT_DATA:
                    raise _TdFault(trb, CompletionCode.TRB_ERROR, "TRB after the Status Stage")
            elif kind == TrbType.DATA_STAGE and not data_trbs:
                if trb.flag(TRB_DIR_IN) != setup.direction_in:
                    raise _TdFault(trb, CompletionCode.TRB_ERROR, "Data Stage direction")
                data_trbs.append(trb)
            elif kind in (TrbType.NORMAL, TrbType.EVENT_DATA) and data_trbs:
                data_trbs.append(trb)
            elif kind == TrbType.STATUS_STAGE:
                # The status stage runs opposite to the data stage, IN when there is none.
                status_in = not setup.direction_in if data_trbs else True
                if trb.flag(TRB_DIR_IN) != status_in:
                    raise _TdFault(trb, CompletionCode.TRB_ERROR, "Status Stage direction")
                status = trb
            else:
                raise _TdFault(trb, CompletionCode.TRB_ERROR, f"TRB type {kind} in a control TD")
        if status is None:
            raise _TdFault(trbs[-1], CompletionCode.TRB_ERROR, "control TD without Status Stage")
        for trb in data_trbs:
            if trb.type != TrbType.EVENT_DATA:
                self._check_buffer(trb, setup.direction_in)
        if not self._port_ready(slot.port):
            raise _TdFault(first, CompletionCode.USB_TRANSACTION_ERROR, "port not enabled")
        device = self._ports[slot.port - 1].device
        assert device is not None
        out_data = b"" if setup.direction_in else self._gather_out(data_trbs, setup.length)
        result = device.control(setup, out_data)
        if isinstance(result, Handshake):
            # A device stalls in the data stage if there is one, else in the status stage.
            where = next((t for t in data_trbs if t.type != TrbType.EVENT_DATA), status)
            raise _TdFault(where, CompletionCode.STALL_ERROR, "STALL", where.length)
        self._deliver(slot_id, endpoint.dci, data_trbs, result if setup.direction_in else None)
        tail = trbs[trbs.index(status) :]
        if status.flag(TRB_IOC):
            self._post_transfer_event(
                slot_id,
                endpoint.dci,
                status.address,
                CompletionCode.SUCCESS,
                0,
                interrupt=not status.flag(TRB_BEI),
            )
        self._deliver(slot_id, endpoint.dci, [t for t in tail if t is not status], b"")
        return True
