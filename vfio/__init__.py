"""VFIO passthrough of host PCI devices: a host device handed to the guest, with the
host IOMMU remapping its DMA to guest RAM and its interrupts routed by eventfds to KVM.

* :mod:`~iovirt.vfio.host` -- the host's PCI devices (pyudev + sysfs), IOMMU groups,
  ``iovirt host bind``/``unbind`` through ``driver_override``;
* :mod:`~iovirt.vfio.container` -- the type1 container + groups, or iommufd + the VFIO
  cdev where the kernel has it; guest RAM mapped for DMA at IOVA = guest address;
* :mod:`~iovirt.vfio.device` -- the passed-through function as a
  :class:`~iovirt.bus.pci.PciFunction`: config-space virtualisation, BARs mapped into the
  guest, reset on start and exit; :mod:`~iovirt.vfio.regions` and
  :mod:`~iovirt.vfio.interrupts` (MSI-X table/PBA, MSI, INTx with resampling) serve it;
* :mod:`~iovirt.vfio.board` -- ``[[passthrough]]`` wiring (:func:`check_passthrough`,
  :func:`add_passthrough`); :mod:`~iovirt.vfio.cli` -- ``iovirt host ...``;
* :mod:`~iovirt.vfio.kernel` -- the system-call boundary; :mod:`~iovirt.vfio.simulator`
  simulates the kernel there for unit tests; :mod:`~iovirt.vfio.uapi` -- the kernel's
  ioctl numbers and structs.
"""
