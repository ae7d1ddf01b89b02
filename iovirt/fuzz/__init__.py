"""Coverage-guided fuzzing of device models without a VM (``iovirt fuzz``).

A fuzz input is decoded (:mod:`iovirt.fuzz.ops`) into a sequence of guest operations:
port/MMIO reads and writes of the device's regions, PCI config space accesses, guest RAM
contents (descriptor tables, rings, PRDTs, frames) and host-side events (a packet from the
network, serial input, a queue kick). :mod:`iovirt.fuzz.harness` runs them against a
device built with its real backends pointed at throwaway resources and checks oracles
beyond "no exception"; :mod:`iovirt.fuzz.targets` holds one target per device model;
:mod:`iovirt.fuzz.worker` is the per-target fuzzing process (atheris / libFuzzer) and
:mod:`iovirt.fuzz.cli` the ``iovirt fuzz`` command that drives it.
"""
