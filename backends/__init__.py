"""Host-side backends (char, block, net, display): what the host provides to a device model."""
