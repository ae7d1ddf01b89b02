"""iovirt: device models (emulated, virtio, VFIO passthrough) on a KVM-backed VMM core."""

__version__ = "0.1.0"
