"""What a display device model offers to a front-end (the VNC server, screenshots).

A display model (``iovirt.devices.bochs_display``) owns video memory and a mode; a
front-end (``iovirt.backends.vnc``) reads pixels through this protocol and never learns
about PCI, BARs or KVM dirty logs. Pixels are always handed out as the guest wrote them,
described by :class:`DisplayMode`; converting to what a client asked for is the
front-end's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class DisplayMode:
    """The scan-out the guest programmed.

    ``bpp`` is 8, 15, 16, 24 or 32. 32 and 24 bpp are little-endian x8r8g8b8 / r8g8b8
    (bytes B, G, R[, X] in memory), 16 is r5g6b5, 15 is x1r5g5b5, 8 is palette indexed
    (the front-end may show it as grey). ``offset`` is the byte offset of the top-left
    visible pixel inside video memory, ``stride`` the bytes from one row to the next.
    """

    width: int
    height: int
    bpp: int
    stride: int
    offset: int = 0

    @property
    def bytes_per_pixel(self) -> int:
        return (self.bpp + 7) // 8

    @property
    def size(self) -> int:
        """Bytes of video memory the visible picture spans."""
        return self.stride * (self.height - 1) + self.width * self.bytes_per_pixel


class Display(Protocol):
    """A display device as front-ends see it. Thread-safe: front-ends call it from the
    host I/O loop while vCPU threads program the device."""

    def mode(self) -> DisplayMode | None:
        """The current mode, or None while the display is disabled (blank screen)."""
        ...

    def vram(self) -> memoryview:
        """All of video memory (read-only use). A mode always lies inside it."""
        ...

    def dirty_rows(self) -> list[tuple[int, int]]:
        """Row ranges ``[first, last)`` of the current mode written since the previous
        call (merged, ascending). After a mode change the whole screen is dirty. Calling
        it consumes the dirty state."""
        ...
