"""Tests of the fuzzing harness (:mod:`iovirt.fuzz`): the input format, the fuzz RAM with
DMA fill, the run loop and each oracle (each shown failing on a device that misbehaves in
exactly that way), the target oracles of the real devices, the minimiser, coverage
measurement, and the ``iovirt fuzz`` command end to end (one short atheris run, one short
run of the C libFuzzer binary).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from iovirt.errors import GuestMemoryError
from iovirt.fuzz import cli, ops, worker
from iovirt.fuzz.harness import (
    DMA_FILL_BUDGET,
    MAX_RAM_ACCESSES,
    RAM_SIZE,
    FuzzMemory,
    OracleViolation,
    Region,
    Runner,
    Target,
    crash_signature,
)
from iovirt.fuzz.ops import MAX_OPS, Op, OpKind
from iovirt.fuzz.targets import (
    C_TARGETS,
    PYTHON_TARGETS,
    ata_write_range,
    check_vnet_frame,
    make_target,
)

REPO = Path(__file__).resolve().parents[2]


# -- the input format --------------------------------------------------------------------------


def test_every_kind_round_trips_through_encode_and_decode() -> None:
    program = [
        ops.read(1, 0x10, 4),
        ops.write(0, 0x7, 1, 0xAB),
        ops.write(1, 0x3, 8, 0x1122_3344_5566_7788),  # unaligned: kept
        ops.config_read(0x40, 2),
        ops.config_write(0x04, 2, 0x0007),
        ops.mem_write(0x1234, b"descriptor"),
        Op(OpKind.MEM_WRITE, offset=0x10, mode=3, data=b"relative"),
        ops.dma_pattern(b"\x01\x02\x03"),
        ops.host(2, b"packet"),
    ]
    data = ops.encode(program)
    assert ops.decode(data, [0x100, 0x40]) == program
    assert ops.encode(ops.decode(data, [0x100, 0x40])) == data


def test_decoding_reduces_numbers_into_range() -> None:
    # Region 5 of a 2-region device is region 1; offset 0x1005 of a 0x100 region is 0x05,
    # aligned down to 0x04 for a 4-byte access; the value is cut to the access size.
    raw = bytes([OpKind.WRITE, 5]) + (0x1005).to_bytes(4, "little") + bytes([2])
    raw += (0xFFFF_FFFF_1234_5678).to_bytes(8, "little")
    (op,) = ops.decode(raw, [0x10, 0x100])
    assert (op.region, op.offset, op.size, op.value) == (1, 0x04, 4, 0x1234_5678)
    # The opcode byte is taken modulo the number of kinds: 7 + 0 is READ again.
    raw = bytes([7, 0]) + (3).to_bytes(4, "little") + bytes([1 | 4])
    (op,) = ops.decode(raw, [0x10])
    assert (op.kind, op.offset, op.size) == (OpKind.READ, 3, 2)


def test_decoding_stops_at_a_truncated_operation_and_cuts_payloads() -> None:
    whole = ops.encode([ops.read(0, 0, 1)])
    assert ops.decode(whole + whole[:-1], [0x10]) == [ops.read(0, 0, 1)]
    # A MEM_WRITE announcing 100 bytes with 3 left gets those 3.
    raw = bytes([OpKind.MEM_WRITE, 0]) + (0x20).to_bytes(4, "little") + (100).to_bytes(2, "little")
    (op,) = ops.decode(raw + b"abc", [0x10])
    assert op.data == b"abc"


def test_the_operation_budget_caps_a_program() -> None:
    data = ops.encode([ops.read(0, 0, 1)] * (MAX_OPS + 50))
    assert len(ops.decode(data, [0x10])) == MAX_OPS


def test_describe_names_regions_and_host_events() -> None:
    assert ops.describe(ops.write(1, 0x18, 4, 5), ["bar0", "bar1"]) == "write bar1+0x18/4 = 0x5"
    assert "rx-packet" in ops.describe(ops.host(3, b"x"), host_events=["kick", "rx-packet"])


# -- fuzz RAM ---------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[FuzzMemory]:
    mem = FuzzMemory()
    yield mem
    mem.close()


def test_device_reads_of_untouched_ram_are_filled_from_the_patterns(memory: FuzzMemory) -> None:
    memory.reset()
    memory.patterns.append(b"\xaa\xbb")
    memory.guest_write(0x1002, b"\x11\x22")  # the guest wrote these: never filled over
    assert memory.read(0x1000, 6) == b"\xaa\xbb\x11\x22\xaa\xbb"
    # Filled once: a second read sees the same bytes, even with another pattern queued.
    memory.patterns.append(b"\xcc")
    assert memory.read(0x1000, 6) == b"\xaa\xbb\x11\x22\xaa\xbb"
    # Untouched ranges take the patterns in turn (two ranges were filled so far).
    assert memory.read_u8(0x2000) == 0xAA
    assert memory.read_u8(0x3000) == 0xCC
    # What the device writes is not filled over either.
    memory.write_u16(0x5000, 0x5555)
    assert memory.read(0x5000, 3) == b"\x55\x55\xaa"
    assert memory.raw_read(0x4000, 2) == b"\0\0"  # oracles read without filling


def test_dma_fill_stops_at_its_budget_and_reset_clears_everything(memory: FuzzMemory) -> None:
    memory.reset()
    memory.patterns.append(b"\x7f")
    memory.read(0, DMA_FILL_BUDGET + 100)
    assert memory.filled == DMA_FILL_BUDGET
    assert memory.raw_read(DMA_FILL_BUDGET, 100) == bytes(100)
    memory.reset()
    assert memory.raw_read(0, 16) == bytes(16) and memory.patterns == []
    assert memory.read(0, 4) == bytes(4)  # no pattern: untouched RAM reads as zeros


def test_fuzz_ram_still_refuses_addresses_outside_ram(memory: FuzzMemory) -> None:
    memory.reset()
    memory.patterns.append(b"\x01")
    with pytest.raises(GuestMemoryError):
        memory.read(RAM_SIZE - 2, 4)
    with pytest.raises(GuestMemoryError):
        memory.write_u64(RAM_SIZE, 1)


# -- the run loop and its oracles, on toy devices ----------------------------------------------


class ToyTarget(Target):
    """A one-register device whose misbehaviour each test picks."""

    name = "toy"
    summary = "test device"
    modules = ()
    host_events = ("poke",)

    def __init__(self, memory: FuzzMemory, behaviour: str = "ok") -> None:
        super().__init__(memory)
        self.layout = [("reg", 16)]
        self.behaviour = behaviour
        self.leaked: list[int] = []
        self.events: list[tuple[int, bytes]] = []
        self.writes: list[tuple[int, int, int]] = []

    def begin(self) -> list[Region]:
        self.value = 0
        return [Region("reg", 16, self._read, self._write)]

    def _read(self, offset: int, size: int) -> int:
        return self.value

    def _write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))
        b = self.behaviour
        if b == "raise" and value == 0xDEAD:
            raise ZeroDivisionError("toy bug")
        if b == "hang":
            while True:
                pass
        if b == "dma-loop":
            try:  # a device that swallows its errors must still be stopped
                while True:
                    self.memory.read_u32(0x100)
            except Exception:
                pass
        if b == "leak":
            self.leaked.append(os.eventfd(0))
        self.value = value

    def host(self, event: int, data: bytes) -> None:
        self.events.append((event, data))

    def check(self) -> None:
        if self.behaviour == "invariant" and self.value == 7:
            raise OracleViolation("toy-invariant", "value 7 is forbidden")

    def close(self) -> None:
        for fd in self.leaked:
            os.close(fd)


def toy_runner(memory: FuzzMemory, behaviour: str, **kwargs: float) -> tuple[ToyTarget, Runner]:
    target = ToyTarget(memory, behaviour)
    return target, Runner(target, **kwargs)


def test_a_clean_program_runs_every_operation_in_order(memory: FuzzMemory) -> None:
    target, runner = toy_runner(memory, "ok")
    runner.run(ops.encode([ops.write(0, 1, 1, 5), ops.host(3, b"hi"), ops.write(0, 2, 2, 6)]))
    assert target.writes == [(1, 1, 5), (2, 2, 6)]
    assert target.events == [(0, b"hi")]  # event 3 modulo the one event the toy has


def test_an_exception_from_the_device_escapes_with_its_signature(memory: FuzzMemory) -> None:
    _, runner = toy_runner(memory, "raise")
    with pytest.raises(ZeroDivisionError) as info:
        runner.run(ops.encode([ops.write(0, 0, 2, 0xDEAD)]))
    assert crash_signature(info.value).startswith("ZeroDivisionError@")


def test_a_broken_invariant_is_an_oracle_violation(memory: FuzzMemory) -> None:
    _, runner = toy_runner(memory, "invariant")
    runner.run(ops.encode([ops.write(0, 0, 1, 6)]))
    with pytest.raises(OracleViolation) as info:
        runner.run(ops.encode([ops.write(0, 0, 1, 7)]))
    assert crash_signature(info.value) == "oracle-toy-invariant"


def test_a_device_that_leaks_fds_is_caught(memory: FuzzMemory) -> None:
    target, runner = toy_runner(memory, "leak")
    with pytest.raises(OracleViolation) as info:
        runner.run(ops.encode([ops.write(0, 0, 1, 1)]))
    assert info.value.kind == "fd-leak"
    target.close()


def test_endless_ram_accesses_hit_the_budget_even_if_the_device_catches_errors(
    memory: FuzzMemory,
) -> None:
    _, runner = toy_runner(memory, "dma-loop")
    with pytest.raises(OracleViolation) as info:
        runner.run(ops.encode([ops.write(0, 0, 1, 1)]))
    assert info.value.kind == "budget"
    assert memory.accesses == MAX_RAM_ACCESSES + 1


def test_a_hang_hits_the_replay_deadline(memory: FuzzMemory) -> None:
    _, runner = toy_runner(memory, "hang", deadline_s=0.3)
    with pytest.raises(OracleViolation) as info:
        runner.run(ops.encode([ops.write(0, 0, 1, 1)]))
    assert info.value.kind == "timeout"


def test_mem_write_can_target_an_address_the_guest_programmed(memory: FuzzMemory) -> None:
    _, runner = toy_runner(memory, "ok")
    program = [
        ops.write(0, 0, 4, 0x8000),  # the guest tells the device about 0x8000
        Op(OpKind.MEM_WRITE, offset=0x10, mode=1, data=b"ring"),  # relative to it
        ops.mem_write(RAM_SIZE + 0x20, b"abs"),  # absolute: taken modulo the RAM size
    ]
    runner.run_ops(program)
    assert memory.raw_read(0x8010, 4) == b"ring"
    assert memory.raw_read(0x20, 3) == b"abs"


# -- oracles of the real targets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "problem"),
    [
        (b"\0" * 5, "without a header"),
        (bytes([0x01, 0, 0, 0, 0, 0, 50, 0, 8, 0, 0, 0]) + bytes(40), "outside"),
        (bytes([0x01, 1, 54, 0, 0, 0, 34, 0, 16, 0, 0, 0]) + bytes(100), "GSO"),
        (bytes([0x10]) + bytes(11) + bytes(60), "flags"),
    ],
)
def test_backend_frame_oracle_refuses_frames_a_tap_would_misread(
    packet: bytes, problem: str
) -> None:
    with pytest.raises(OracleViolation, match=problem):
        check_vnet_frame(packet, 0x10100)


def test_backend_frame_oracle_accepts_a_checksum_offloaded_frame() -> None:
    header = bytes([0x01, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0])  # csum at 34+16 of 60 bytes
    check_vnet_frame(header + bytes(60), 0x10100)


def test_ata_write_ranges_are_decoded_independently_of_the_model() -> None:
    fis = bytearray(20)
    fis[0], fis[1] = 0x27, 0x80
    fis[2], fis[4], fis[7], fis[12] = 0xCA, 9, 0x40, 0  # WRITE DMA, LBA 9, count 0 = 256
    assert ata_write_range(bytes(fis)) == (9, 256)
    fis[2], fis[8], fis[12], fis[13] = 0x35, 1, 2, 0  # WRITE DMA EXT: 48-bit LBA
    assert ata_write_range(bytes(fis)) == (9 | 1 << 24, 2)
    fis[2], fis[3], fis[11] = 0x61, 5, 0  # WRITE FPDMA QUEUED: the count is in features
    assert ata_write_range(bytes(fis)) == (9 | 1 << 24, 5)
    fis[2] = 0x25  # READ DMA EXT writes nothing
    assert ata_write_range(bytes(fis)) is None


@pytest.mark.parametrize("name", ["serial", "e1000", "ahci", "virtio-blk-pci", "virtio-net-mmio"])
def test_the_interrupt_oracle_notices_a_line_that_disagrees(name: str) -> None:
    target = make_target(name)
    try:
        target.begin()
        target.check()  # a fresh device is consistent
        line: object = getattr(target, "irq", None) or target.platform.irq(5)  # type: ignore[attr-defined]
        line.level = not line.level  # type: ignore[attr-defined]
        with pytest.raises(OracleViolation) as info:
            target.check()
        assert info.value.kind == "irq-state"
        line.level = not line.level  # type: ignore[attr-defined]
        target.end()
    finally:
        target.close()


def test_the_ahci_integrity_oracle_notices_a_sector_nobody_addressed() -> None:
    target = make_target("ahci")
    try:
        target.begin()
        disk = target.disk  # type: ignore[attr-defined]
        os.pwrite(disk.backend.fd, b"\xff" * 512, 7 * 512)
        with pytest.raises(OracleViolation) as info:
            target.end()
        assert info.value.kind == "backend-integrity"
        target.begin()  # restores the image
        os.pwrite(disk.backend.fd, b"\xff" * 512, 7 * 512)
        target.allowed.add(7)  # type: ignore[attr-defined]
        target.end()
    finally:
        target.close()


def test_the_virtio_blk_integrity_oracle_notices_writes_the_engine_did_not_make() -> None:
    target = make_target("virtio-blk-mmio")
    try:
        target.begin()
        os.pwrite(target.disk.backend.fd, b"\xff" * 2048, 0)  # type: ignore[attr-defined]
        with pytest.raises(OracleViolation) as info:
            target.end()
        assert info.value.kind == "backend-integrity"
    finally:
        target.close()


# -- minimiser, seeds, coverage ---------------------------------------------------------------


def test_the_minimiser_keeps_only_what_the_crash_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    class Crashy(ToyTarget):
        def __init__(self, memory: FuzzMemory) -> None:
            super().__init__(memory, "raise")

    monkeypatch.setitem(PYTHON_TARGETS, "toy", Crashy)
    noise = [ops.write(0, i % 16, 1, i) for i in range(40)]
    program = [*noise[:25], ops.write(0, 0, 2, 0xDEAD), *noise[25:], ops.host(0, b"x" * 300)]
    data = ops.encode(program)
    smaller = worker.minimize_input("toy", data, "ZeroDivisionError@unknown", budget_s=20)
    assert ops.decode(smaller, [16]) == [ops.write(0, 0, 2, 0xDEAD)]
    # An input that does not crash that way comes back unchanged.
    assert worker.minimize_input("toy", data, "other", budget_s=5) == data


def test_every_target_writes_seeds_that_decode_to_its_programs(tmp_path: Path) -> None:
    for name in PYTHON_TARGETS:
        target = make_target(name)
        try:
            count = worker.write_seeds(target, tmp_path / name)
            programs = target.seeds()
            assert count == len(programs) >= 1, name
            sizes = [size for _, size in target.layout]
            for i, program in enumerate(programs):
                data = (tmp_path / name / f"seed-{i:02d}").read_bytes()
                assert ops.decode(data, sizes) == program, name
        finally:
            target.close()


def test_coverage_is_measured_on_the_model_file(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    out = tmp_path / "cov.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for job in (["seeds", "debug-exit", str(seeds)], ["coverage", "debug-exit", str(seeds)]):
        extra = ["--json", str(out)] if job[0] == "coverage" else []
        subprocess.run(
            [sys.executable, "-m", "iovirt.fuzz.worker", *job, *extra],
            check=True,
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=120,
        )
    report = json.loads(out.read_text())["iovirt.devices.debug_exit"]
    assert report["file"].endswith("iovirt/devices/debug_exit.py")
    assert report["statements"] > 0 and report["percent"] == 100.0 and report["missing"] == []


# -- the command ------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="iovirt")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    return parser.parse_args(["fuzz", *argv])


def test_list_names_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(parse("--list")) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [*PYTHON_TARGETS, *C_TARGETS]
    assert {"virtqueue-c", "blk-c"} <= set(C_TARGETS)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(parse()) == 2
    assert cli.main(parse("no-such-device")) == 2
    assert "--list" in capsys.readouterr().err


def test_replay_reports_clean_and_crashing_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Crashy(ToyTarget):
        def __init__(self, memory: FuzzMemory) -> None:
            super().__init__(memory, "raise")

    monkeypatch.setitem(PYTHON_TARGETS, "toy", Crashy)
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "fine.bin").write_bytes(ops.encode([ops.write(0, 0, 2, 1)]))
    (folder / "fine.txt").write_text("notes are not inputs")
    assert cli.main(parse("--replay", str(folder))) == 0
    (folder / "bad.bin").write_bytes(ops.encode([ops.write(0, 0, 2, 0xDEAD)]))
    assert cli.main(parse("--replay", str(folder))) == 1
    out = capsys.readouterr().out
    assert "CRASH toy" in out and "ZeroDivisionError" in out and "fine.txt" not in out


def test_a_short_fuzzing_run_reports_progress_corpus_and_coverage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    args = parse(
        "debug-exit",
        "--time",
        "6",
        "--corpus",
        str(corpus),
        "--regressions",
        str(tmp_path / "regressions"),
        "--coverage-report",
    )
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "execs (" in out and "/s)" in out and "crashes 0" in out
    assert "coverage iovirt/devices/debug_exit.py" in out and "(100.0%)" in out
    assert any(corpus.iterdir())
    assert not (tmp_path / "regressions").exists()


CRASHY_TARGET = """
from iovirt.fuzz import ops
from iovirt.fuzz.harness import Region, Target


class CrashyTarget(Target):
    name = "crashy"
    summary = "a device with a bug: writing 0x42 to register 3 divides by zero"
    modules = ("crashy_fuzz_target",)

    def __init__(self, memory):
        super().__init__(memory)
        self.layout = [("reg", 16)]

    def begin(self):
        return [Region("reg", 16, lambda offset, size: 0, self.write)]

    def write(self, offset, size, value):
        if offset == 3 and value == 0x42:
            1 // 0

    def seeds(self):
        noise = [ops.write(0, i, 1, i) for i in range(12)]
        return [[*noise, ops.write(0, 3, 1, 0x42), *noise, ops.host(0, b"z" * 200)]]
"""


@pytest.fixture
def crashy_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A deliberately broken device registered through $IOVIRT_FUZZ_TARGETS, which the
    fuzzing workers inherit."""
    (tmp_path / "crashy_fuzz_target.py").write_text(CRASHY_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{REPO}")
    monkeypatch.setenv("IOVIRT_FUZZ_TARGETS", "crashy_fuzz_target:CrashyTarget")
    saved = dict(PYTHON_TARGETS)
    yield
    PYTHON_TARGETS.clear()
    PYTHON_TARGETS.update(saved)


def test_a_crash_is_minimised_stored_printed_and_fails_the_run(
    tmp_path: Path, crashy_target: None, capsys: pytest.CaptureFixture[str]
) -> None:
    regressions = tmp_path / "regressions"
    args = parse(
        "crashy",
        "--time",
        "5",
        "--corpus",
        str(tmp_path / "corpus"),
        "--regressions",
        str(regressions),
        "--minimize-time",
        "10",
    )
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    (stored,) = (regressions / "crashy").glob("*.bin")
    assert stored.name.startswith("ZeroDivisionError")
    # Minimised to the one write that matters.
    assert ops.decode(stored.read_bytes(), [16]) == [ops.write(0, 3, 1, 0x42)]
    note = stored.with_suffix(".txt").read_text()
    assert "write reg+0x3/1 = 0x42" in note and "ZeroDivisionError" in note
    assert f"reproducer: {stored}" in out and "1 // 0" in out and "crashes 1" in out
    # The stored reproducer replays as a crash until the device is fixed.
    assert cli.main(parse("--replay", str(regressions))) == 1
    # A second run finds the same bug and does not store it twice.
    assert cli.main(args) == 1
    assert len(list((regressions / "crashy").glob("*.bin"))) == 1
    assert "known, reproducer already at" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(C_TARGETS))
def test_the_c_targets_build_and_fuzz_under_sanitizers(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    args = parse(name, "--time", "3", "--corpus", str(corpus), "--coverage-report")
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    target = C_TARGETS[name]
    assert f"{name}:" in out and "crashes 0" in out
    assert f"coverage {target.source}" in out
    assert (REPO / target.binary).exists() and any(corpus.iterdir())


def test_the_c_seeds_are_inputs_the_engines_serve() -> None:
    # Replayed through the coverage build, every seed must reach request handling: the
    # seeds are what the C fuzzers start from.
    for name, target in C_TARGETS.items():
        binary = cli.build_c(target, REPO)
        seeds = target.seeds()
        assert seeds, name
        for data in seeds:
            path = REPO / "build" / "fuzz" / f"{name}.seed-check"
            path.write_bytes(data)
            proc = subprocess.run([str(binary), str(path)], capture_output=True, timeout=60)
            assert proc.returncode == 0, proc.stderr[-2000:]
