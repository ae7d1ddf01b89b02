"""virtio transports and device front halves (the virtqueue issue)."""
