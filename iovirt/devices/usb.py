"""A small USB device layer: descriptors, the standard control requests, and endpoints, as a
host controller model (:mod:`iovirt.devices.xhci`) drives them.

Facts come from the USB 2.0 specification, chapter 9 ("USB Device Framework"): the setup
packet (9.3), the standard requests (9.4) and the standard descriptors (9.6).

A :class:`UsbDevice` is what sits behind a root hub port. The controller talks to it in USB
terms, never in xHCI terms:

* :meth:`UsbDevice.reset` is a bus reset (port reset): back to the Default state, address 0,
  not configured;
* :meth:`UsbDevice.control` runs a whole control transfer on endpoint 0 (setup, data, status)
  and returns the IN data, ``b""`` for an OUT/no-data request that succeeded, or
  :attr:`Handshake.STALL`;
* :meth:`UsbDevice.transfer_in` / :meth:`UsbDevice.transfer_out` move one packet on a
  non-control endpoint; IN answers :attr:`Handshake.NAK` when the device has nothing to send
  (the controller keeps the transfer pending and retries when the device calls the
  ``notify`` callback it installed with :meth:`UsbDevice.attach`).

Standard requests (GET_DESCRIPTOR, SET_ADDRESS, SET_CONFIGURATION, GET_CONFIGURATION,
GET_STATUS, SET/CLEAR_FEATURE, GET/SET_INTERFACE) are answered here from the descriptors a
subclass provides; class and vendor requests and class descriptors go to
:meth:`UsbDevice.class_request` and :meth:`UsbDevice.class_descriptor`. Anything the device
does not understand is answered with a STALL, as chapter 9 says a device must ("Request
Error").

Threads and locking. The device's state is guarded by :attr:`UsbDevice.lock`. A device starts
with its own lock; the controller replaces it with its own (re-entrant) lock in
:meth:`UsbDevice.attach`, so a host-side event (a key press from the VNC server, on the host I/O
loop) and the vCPU threads that drive the controller are serialized by one lock, and the
``notify`` callback the device calls with that lock held cannot deadlock against it.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

# --- bmRequestType (9.3.1).
USB_DIR_OUT = 0x00
USB_DIR_IN = 0x80
USB_TYPE_MASK = 0x60
USB_TYPE_STANDARD = 0x00
USB_TYPE_CLASS = 0x20
USB_TYPE_VENDOR = 0x40
USB_RECIP_MASK = 0x1F
USB_RECIP_DEVICE = 0x00
USB_RECIP_INTERFACE = 0x01
USB_RECIP_ENDPOINT = 0x02

# --- bRequest, standard requests (Table 9-4).
USB_REQ_GET_STATUS = 0x00
USB_REQ_CLEAR_FEATURE = 0x01
USB_REQ_SET_FEATURE = 0x03
USB_REQ_SET_ADDRESS = 0x05
USB_REQ_GET_DESCRIPTOR = 0x06
USB_REQ_SET_DESCRIPTOR = 0x07
USB_REQ_GET_CONFIGURATION = 0x08
USB_REQ_SET_CONFIGURATION = 0x09
USB_REQ_GET_INTERFACE = 0x0A
USB_REQ_SET_INTERFACE = 0x0B

# --- Descriptor types (Table 9-5).
USB_DT_DEVICE = 0x01
USB_DT_CONFIG = 0x02
USB_DT_STRING = 0x03
USB_DT_INTERFACE = 0x04
USB_DT_ENDPOINT = 0x05
USB_DT_DEVICE_QUALIFIER = 0x06

USB_DT_DEVICE_SIZE = 18
USB_DT_CONFIG_SIZE = 9
USB_DT_INTERFACE_SIZE = 9
USB_DT_ENDPOINT_SIZE = 7

# --- Feature selectors (Table 9-6).
USB_ENDPOINT_HALT = 0
USB_DEVICE_REMOTE_WAKEUP = 1

# GET_STATUS bits (Figure 9-4, 9-6).
USB_STATUS_SELF_POWERED = 0x01
USB_STATUS_REMOTE_WAKEUP = 0x02
USB_STATUS_HALT = 0x01

# --- Configuration bmAttributes (9.6.3).
USB_CONFIG_ATT_ONE = 0x80  # reserved, always set
USB_CONFIG_ATT_SELFPOWER = 0x40
USB_CONFIG_ATT_WAKEUP = 0x20

# --- Endpoint descriptor bEndpointAddress / bmAttributes (9.6.6).
USB_ENDPOINT_NUMBER_MASK = 0x0F
USB_ENDPOINT_DIR_IN = 0x80
USB_ENDPOINT_XFER_CONTROL = 0
USB_ENDPOINT_XFER_ISOC = 1
USB_ENDPOINT_XFER_BULK = 2
USB_ENDPOINT_XFER_INT = 3

# The language ID list every string-capable device returns as string 0: US English.
USB_LANGID_EN_US = 0x0409

USB_MAX_ADDRESS = 127
USB_MAX_STRING_CHARS = 126  # a string descriptor is at most 255 bytes: 2 + 2 * 126

SETUP_PACKET = struct.Struct("<BBHHH")


class UsbSpeed(enum.Enum):
    """The bus speed a device runs at on its port."""

    LOW = "low"
    FULL = "full"
    HIGH = "high"


class Handshake(enum.Enum):
    """A transfer that moved no data: NAK (not now, ask again) or STALL (refused)."""

    NAK = "nak"
    STALL = "stall"


class UsbState(enum.Enum):
    """Visible device states (9.1.1); Attached/Powered/Suspended are the port's business."""

    DEFAULT = "default"
    ADDRESS = "address"
    CONFIGURED = "configured"


@dataclass(frozen=True)
class SetupPacket:
    """The 8-byte SETUP packet of a control transfer (9.3)."""

    request_type: int
    request: int
    value: int
    index: int
    length: int

    @classmethod
    def parse(cls, raw: bytes) -> SetupPacket:
        """From the 8 bytes on the wire (little-endian fields)."""
        return cls(*SETUP_PACKET.unpack(bytes(raw[:8]).ljust(8, b"\0")))

    @classmethod
    def from_int(cls, value: int) -> SetupPacket:
        """From a 64-bit little-endian integer (an xHCI Setup Stage TRB's parameter)."""
        return cls.parse((value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    def pack(self) -> bytes:
        return SETUP_PACKET.pack(
            self.request_type & 0xFF,
            self.request & 0xFF,
            self.value & 0xFFFF,
            self.index & 0xFFFF,
            self.length & 0xFFFF,
        )

    @property
    def direction_in(self) -> bool:
        return bool(self.request_type & USB_DIR_IN)

    @property
    def kind(self) -> int:
        """USB_TYPE_STANDARD, USB_TYPE_CLASS or USB_TYPE_VENDOR."""
        return self.request_type & USB_TYPE_MASK

    @property
    def recipient(self) -> int:
        return self.request_type & USB_RECIP_MASK


@dataclass(frozen=True)
class Endpoint:
    """A non-control endpoint as its descriptor declares it."""

    address: int  # bEndpointAddress: number, and USB_ENDPOINT_DIR_IN for IN
    transfer_type: int  # USB_ENDPOINT_XFER_*
    max_packet: int
    interval: int  # bInterval

    @property
    def number(self) -> int:
        return self.address & USB_ENDPOINT_NUMBER_MASK

    @property
    def is_in(self) -> bool:
        return bool(self.address & USB_ENDPOINT_DIR_IN)


# --- Descriptor builders (9.6). Devices compose their descriptors from these.


def device_descriptor(
    *,
    bcd_usb: int,
    device_class: int,
    subclass: int,
    protocol: int,
    max_packet0: int,
    vendor: int,
    product: int,
    bcd_device: int,
    manufacturer: int,
    product_string: int,
    serial: int,
    configurations: int = 1,
) -> bytes:
    """The 18-byte DEVICE descriptor; string arguments are string descriptor indexes."""
    return struct.pack(
        "<BBHBBBBHHHBBBB",
        USB_DT_DEVICE_SIZE,
        USB_DT_DEVICE,
        bcd_usb,
        device_class,
        subclass,
        protocol,
        max_packet0,
        vendor,
        product,
        bcd_device,
        manufacturer,
        product_string,
        serial,
        configurations,
    )


def interface_descriptor(
    *, number: int, endpoints: int, interface_class: int, subclass: int, protocol: int
) -> bytes:
    """A 9-byte INTERFACE descriptor (alternate setting 0, no string)."""
    return struct.pack(
        "<BBBBBBBBB",
        USB_DT_INTERFACE_SIZE,
        USB_DT_INTERFACE,
        number,
        0,
        endpoints,
        interface_class,
        subclass,
        protocol,
        0,
    )


def endpoint_descriptor(endpoint: Endpoint) -> bytes:
    """The 7-byte ENDPOINT descriptor of ``endpoint``."""
    return struct.pack(
        "<BBBBHB",
        USB_DT_ENDPOINT_SIZE,
        USB_DT_ENDPOINT,
        endpoint.address,
        endpoint.transfer_type,
        endpoint.max_packet,
        endpoint.interval,
    )


def configuration_descriptor(
    *, value: int, interfaces: int, attributes: int, max_power_ma: int, body: bytes
) -> bytes:
    """A CONFIGURATION descriptor followed by ``body`` (interfaces, class and endpoint
    descriptors), with wTotalLength covering all of it."""
    header = struct.pack(
        "<BBHBBBBB",
        USB_DT_CONFIG_SIZE,
        USB_DT_CONFIG,
        USB_DT_CONFIG_SIZE + len(body),
        interfaces,
        value,
        0,
        attributes | USB_CONFIG_ATT_ONE,
        max_power_ma // 2,  # in 2 mA units
    )
    return header + body


def string_descriptor(text: str) -> bytes:
    """A STRING descriptor holding ``text`` as UTF-16LE (truncated to what fits)."""
    data = text[:USB_MAX_STRING_CHARS].encode("utf-16-le")
    return bytes([2 + len(data), USB_DT_STRING]) + data


def language_descriptor(*langids: int) -> bytes:
    """String descriptor 0: the LANGID codes the device's strings come in."""
    body = b"".join(struct.pack("<H", langid) for langid in langids)
    return bytes([2 + len(body), USB_DT_STRING]) + body


class UsbDevice:
    """A USB device with one configuration; see the module docstring.

    Subclasses pass their descriptors to ``__init__`` and override :meth:`class_request`,
    :meth:`class_descriptor`, :meth:`transfer_in`, :meth:`transfer_out` and
    :meth:`_on_reset` / :meth:`_on_configured` as they need.
    """

    def __init__(
        self,
        *,
        name: str,
        speed: UsbSpeed,
        device: bytes,
        configuration: bytes,
        strings: dict[int, str] | None = None,
        endpoints: tuple[Endpoint, ...] = (),
        remote_wakeup_capable: bool = False,
    ) -> None:
        if len(device) != USB_DT_DEVICE_SIZE or device[1] != USB_DT_DEVICE:
            raise ValueError(f"{name}: not a device descriptor")
        if len(configuration) < USB_DT_CONFIG_SIZE or configuration[1] != USB_DT_CONFIG:
            raise ValueError(f"{name}: not a configuration descriptor")
        self.name = name
        self.speed = speed
        self.device_desc = device
        self.config_desc = configuration
        self.strings = dict(strings or {})
        self.endpoints = {ep.address: ep for ep in endpoints}
        self.remote_wakeup_capable = remote_wakeup_capable
        self.lock: threading.RLock = threading.RLock()
        self._notify: Callable[[int], None] = lambda endpoint: None
        self._attached = False
        self.address = 0
        self.configuration = 0
        self.remote_wakeup = False
        self._halted: set[int] = set()  # endpoint addresses with ENDPOINT_HALT set
        self.bad_requests = 0  # requests answered with a STALL because they made no sense

    # -- wiring ----------------------------------------------------------------------------

    @property
    def config_value(self) -> int:
        """bConfigurationValue of the one configuration."""
        return self.config_desc[5]

    @property
    def max_packet0(self) -> int:
        """bMaxPacketSize0: the largest packet on endpoint 0."""
        return self.device_desc[7]

    def attach(self, lock: threading.RLock, notify: Callable[[int], None]) -> None:
        """The controller takes the device: from now on the device's state is guarded by
        ``lock`` (the controller's), and the device calls ``notify(endpoint number)`` with
        the lock held when an IN endpoint has data to send. A device sits on one port."""
        with self.lock:
            if self._attached:
                raise ValueError(f"{self.name} is already attached to a controller")
            self._attached = True
            self.lock = lock
            self._notify = notify

    @property
    def state(self) -> UsbState:
        if self.configuration:
            return UsbState.CONFIGURED
        return UsbState.ADDRESS if self.address else UsbState.DEFAULT

    def reset(self) -> None:
        """USB bus reset: Default state, address 0, unconfigured, halts cleared."""
        with self.lock:
            self.address = 0
            self.configuration = 0
            self.remote_wakeup = False
            self._halted.clear()
            self._on_reset()

    def _on_reset(self) -> None:
        """Subclass hook: forget what a bus reset forgets (queued reports, idle rate)."""

    def _on_configured(self) -> None:
        """Subclass hook: SET_CONFIGURATION selected (or deselected, value 0) a config."""

    def wants_remote_wakeup(self) -> bool:
        """Whether the device would signal resume now (has data and is allowed to)."""
        return False

    # -- control transfers (endpoint 0) ----------------------------------------------------

    def control(self, setup: SetupPacket, data: bytes = b"") -> bytes | Handshake:
        """Run one control transfer. ``data`` is the OUT data stage (empty for IN or
        no-data requests). Returns the IN data (at most ``setup.length`` bytes), ``b""``
        for an OUT or no-data request that succeeded, or :attr:`Handshake.STALL`."""
        with self.lock:
            if setup.kind == USB_TYPE_STANDARD:
                result = self._standard_request(setup, data)
            else:
                result = self.class_request(setup, data)
            if isinstance(result, Handshake):
                self.bad_requests += 1
                return Handshake.STALL
            if setup.direction_in:
                return bytes(result[: setup.length])
            return b""

    def class_request(self, setup: SetupPacket, data: bytes) -> bytes | Handshake:
        """A class or vendor request; the base device has none."""
        return Handshake.STALL

    def class_descriptor(self, setup: SetupPacket) -> bytes | None:
        """A GET_DESCRIPTOR for a type this layer does not know (e.g. a HID report
        descriptor, asked of an interface); None stalls."""
        return None

    def _standard_request(self, setup: SetupPacket, data: bytes) -> bytes | Handshake:
        request = setup.request
        if request == USB_REQ_GET_DESCRIPTOR and setup.direction_in:
            return self._get_descriptor(setup)
        if request == USB_REQ_SET_ADDRESS and setup.recipient == USB_RECIP_DEVICE:
            return self._set_address(setup.value)
        if request == USB_REQ_GET_STATUS and setup.direction_in:
            return self._get_status(setup)
        if request in (USB_REQ_SET_FEATURE, USB_REQ_CLEAR_FEATURE) and not setup.direction_in:
            return self._feature(setup, request == USB_REQ_SET_FEATURE)
        if request == USB_REQ_GET_CONFIGURATION and setup.direction_in:
            return bytes([self.configuration])
        if request == USB_REQ_SET_CONFIGURATION and not setup.direction_in:
            return self._set_configuration(setup.value & 0xFF)
        if request == USB_REQ_GET_INTERFACE and setup.direction_in:
            if self.configuration and setup.index < self._num_interfaces():
                return b"\0"  # only alternate setting 0 exists
            return Handshake.STALL
        if request == USB_REQ_SET_INTERFACE and not setup.direction_in:
            ok = self.configuration and setup.value == 0
            return b"" if ok and setup.index < self._num_interfaces() else Handshake.STALL
        return Handshake.STALL

    def _num_interfaces(self) -> int:
        return self.config_desc[4]

    def _get_descriptor(self, setup: SetupPacket) -> bytes | Handshake:
        kind, index = setup.value >> 8, setup.value & 0xFF
        found: bytes | None = None
        if setup.recipient == USB_RECIP_DEVICE and kind == USB_DT_DEVICE and index == 0:
            found = self.device_desc
        elif setup.recipient == USB_RECIP_DEVICE and kind == USB_DT_CONFIG and index == 0:
            found = self.config_desc
        elif setup.recipient == USB_RECIP_DEVICE and kind == USB_DT_STRING:
            found = self._string(index, setup.index)
        else:
            # A full-speed-only device stalls DEVICE_QUALIFIER (9.6.2): that is how the host
            # learns there is no high-speed mode to switch to.
            found = self.class_descriptor(setup)
        return Handshake.STALL if found is None else found

    def _string(self, index: int, langid: int) -> bytes | None:
        if not self.strings:
            return None
        if index == 0:
            return language_descriptor(USB_LANGID_EN_US)
        text = self.strings.get(index)
        if text is None or langid not in (USB_LANGID_EN_US, 0):
            return None
        return string_descriptor(text)

    def _set_address(self, address: int) -> bytes | Handshake:
        # Only from Default or Address state; a configured device's behaviour is
        # unspecified, and refusing is the least surprising answer (9.4.6).
        if address > USB_MAX_ADDRESS or self.configuration:
            return Handshake.STALL
        self.address = address
        return b""

    def _set_configuration(self, value: int) -> bytes | Handshake:
        if self.address == 0 or value not in (0, self.config_value):
            return Handshake.STALL  # not allowed in the Default state (9.4.7)
        self.configuration = value
        self._halted.clear()  # selecting a configuration resets data toggles and halts
        self._on_configured()
        return b""

    def _get_status(self, setup: SetupPacket) -> bytes | Handshake:
        recipient = setup.recipient
        if recipient == USB_RECIP_DEVICE:
            attributes = self.config_desc[7]
            status = USB_STATUS_SELF_POWERED if attributes & USB_CONFIG_ATT_SELFPOWER else 0
            if self.remote_wakeup:
                status |= USB_STATUS_REMOTE_WAKEUP
            return struct.pack("<H", status)
        if recipient == USB_RECIP_INTERFACE:
            if self.configuration and setup.index < self._num_interfaces():
                return b"\0\0"
            return Handshake.STALL
        if recipient == USB_RECIP_ENDPOINT:
            address = setup.index & 0xFF
            if address & USB_ENDPOINT_NUMBER_MASK == 0:
                return b"\0\0"
            if not self.configuration or address not in self.endpoints:
                return Handshake.STALL
            return struct.pack("<H", USB_STATUS_HALT if address in self._halted else 0)
        return Handshake.STALL

    def _feature(self, setup: SetupPacket, on: bool) -> bytes | Handshake:
        if setup.recipient == USB_RECIP_DEVICE and setup.value == USB_DEVICE_REMOTE_WAKEUP:
            if not self.remote_wakeup_capable:
                return Handshake.STALL
            self.remote_wakeup = on
            return b""
        if setup.recipient == USB_RECIP_ENDPOINT and setup.value == USB_ENDPOINT_HALT:
            address = setup.index & 0xFF
            if address & USB_ENDPOINT_NUMBER_MASK == 0:
                return b""  # endpoint 0 never stays halted
            if not self.configuration or address not in self.endpoints:
                return Handshake.STALL
            if on:
                self._halted.add(address)
            else:
                self._halted.discard(address)
            return b""
        return Handshake.STALL

    # -- other endpoints -------------------------------------------------------------------

    def halted(self, address: int) -> bool:
        """Whether endpoint ``address`` has ENDPOINT_HALT set (it then STALLs)."""
        return address in self._halted

    def transfer_in(self, endpoint: int, max_length: int) -> bytes | Handshake:
        """One IN packet from endpoint number ``endpoint`` (at most the endpoint's max
        packet size; ``max_length`` is the room the host offers). NAK when there is
        nothing to send, STALL when the endpoint does not exist or is halted."""
        return Handshake.STALL

    def transfer_out(self, endpoint: int, data: bytes) -> Handshake | None:
        """One OUT transfer to endpoint number ``endpoint``: None when accepted."""
        return Handshake.STALL

    def notify(self, endpoint: int) -> None:
        """Tell the controller that IN endpoint ``endpoint`` has data (lock held)."""
        self._notify(endpoint)
