"""Device models, one file per model. A model talks to the guest only through GuestMemory
and an Interrupt line, and to the host only through a backend protocol."""
