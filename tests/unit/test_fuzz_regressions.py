"""The fuzzing regression corpus and a smoke run of every fuzz target.

Every reproducer the fuzzer stored under tests/fuzz/regressions/<target>/ is replayed
through its target with all the oracles on: once the bug it found is fixed it must stay
fixed. Every Python target also runs its seed programs, mutations of them and random
inputs (a few hundred, from a fixed random seed, so a failure here replays the same way),
and every device model file in the tree must belong to some target.
"""

from __future__ import annotations

import logging
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from iovirt.fuzz import ops
from iovirt.fuzz.cli import build_c
from iovirt.fuzz.harness import REPLAY_DEADLINE_S, Runner, crash_signature, format_crash
from iovirt.fuzz.targets import C_TARGETS, PYTHON_TARGETS, make_target
from iovirt.fuzz.worker import CRASH_SUFFIX, NOTE_SUFFIX, input_files

REPO = Path(__file__).resolve().parents[2]
REGRESSIONS = REPO / "tests" / "fuzz" / "regressions"
RANDOM_INPUTS = 150
MUTANTS_PER_SEED = 40


@pytest.fixture(autouse=True)
def quiet_devices() -> Iterator[None]:
    # The inputs misbehave on purpose; the models log every odd access (rate-limited).
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def reproducers(target: str) -> list[Path]:
    return input_files([str(REGRESSIONS / target)])


def test_the_regression_folders_name_targets_and_explain_each_input() -> None:
    assert (REPO / "tests" / "fuzz" / "README.md").is_file()
    for folder in REGRESSIONS.iterdir():
        if folder.name.startswith("."):
            continue  # .gitkeep: git keeps no empty folder
        assert folder.is_dir() and folder.name in {*PYTHON_TARGETS, *C_TARGETS}, folder
        for path in reproducers(folder.name):
            assert path.suffix == CRASH_SUFFIX, path
            assert path.with_suffix(NOTE_SUFFIX).is_file(), f"{path} has no notes"


@pytest.mark.parametrize("name", list(PYTHON_TARGETS))
def test_stored_reproducers_no_longer_crash(name: str) -> None:
    target = make_target(name)
    failures = []
    try:
        runner = Runner(target, deadline_s=REPLAY_DEADLINE_S)
        for path in reproducers(name):
            try:
                runner.run(path.read_bytes())
            except Exception as e:
                failures.append(
                    f"{path.relative_to(REPO)}: {crash_signature(e)}\n{format_crash(e)}"
                )
    finally:
        target.close()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", list(C_TARGETS))
def test_stored_reproducers_of_the_c_engine_no_longer_crash(name: str) -> None:
    binary = build_c(C_TARGETS[name], REPO)
    inputs = reproducers(name)
    # Always run the binary, on an empty input when there is nothing stored yet, so a
    # binary that cannot even start fails here.
    args = [str(p) for p in inputs] or ["-runs=1"]
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """A few byte flips, cuts and splices, as libFuzzer's simplest mutators do."""
    out = bytearray(data)
    for _ in range(rnd.randrange(1, 6)):
        choice = rnd.randrange(4)
        if choice == 0 and out:
            out[rnd.randrange(len(out))] ^= 1 << rnd.randrange(8)
        elif choice == 1 and out:
            out[rnd.randrange(len(out))] = rnd.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif choice == 2 and len(out) > 8:
            start = rnd.randrange(len(out) - 4)
            del out[start : start + rnd.randrange(1, 4)]
        else:
            at = rnd.randrange(len(out) + 1)
            out[at:at] = rnd.randbytes(rnd.randrange(1, 16))
    return bytes(out)


@pytest.mark.parametrize("name", list(PYTHON_TARGETS))
def test_target_survives_its_seeds_mutants_and_random_inputs(name: str) -> None:
    rnd = random.Random(f"iovirt-fuzz-smoke-{name}")
    target = make_target(name)
    failures: dict[str, str] = {}
    try:
        runner = Runner(target, deadline_s=REPLAY_DEADLINE_S)
        seeds = [ops.encode(program) for program in target.seeds()]
        inputs = list(seeds)
        inputs += [mutate(rnd.choice(seeds), rnd) for _ in range(MUTANTS_PER_SEED * len(seeds))]
        inputs += [rnd.randbytes(rnd.randrange(400)) for _ in range(RANDOM_INPUTS)]
        for i, data in enumerate(inputs):
            try:
                runner.run(data)
            except Exception as e:
                failures.setdefault(
                    crash_signature(e), f"input {i} ({data.hex()}):\n{format_crash(e)}"
                )
    finally:
        target.close()
    assert not failures, "\n".join(failures.values())


def test_every_device_model_in_the_tree_has_a_target() -> None:
    covered = {module for cls in PYTHON_TARGETS.values() for module in cls.modules}
    models = {
        f"iovirt.devices.{p.stem}"
        for p in (REPO / "iovirt" / "devices").glob("*.py")
        if p.stem != "__init__"
    }
    models |= {f"iovirt.virtio.{m}" for m in ("blk", "net", "pci", "mmio")}
    assert sorted(models - covered) == []
    assert {t.source for t in C_TARGETS.values()} >= {"csrc/virtqueue.c", "csrc/blk.c"}
