"""Port-I/O and MMIO buses: map guest accesses to device models by address range."""

from iovirt.bus.bus import Bus, BusDevice, BusRange

__all__ = ["Bus", "BusDevice", "BusRange"]
