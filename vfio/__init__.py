"""VFIO passthrough of host PCI devices (container/group, regions, interrupts, DMA maps).

Not built yet: see the VFIO issue. The package exists so the layout and import name are fixed."""
