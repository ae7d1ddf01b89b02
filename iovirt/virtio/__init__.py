"""Virtio: the device contract, the virtqueue engines, transports and device front halves."""
