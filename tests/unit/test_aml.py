"""The AML encoder: encodings checked byte for byte, and against what iasl compiles from the
same ASL (iasl comes from Debian's acpica-tools, which install.sh installs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from iovirt.boot import aml
from iovirt.boot.aml import (
    Term,
    buffer,
    device,
    dword_memory,
    eisa_id,
    encode,
    extended_interrupt,
    integer,
    io_port,
    irq_no_flags,
    memory32_fixed,
    name,
    name_seg,
    name_string,
    package,
    pkg_length,
    resource_template,
    scope,
    string,
    word_bus_number,
    word_io,
)

SDT_HEADER_SIZE = 36


def iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        pytest.fail(
            "iasl not found: install the Debian package acpica-tools "
            "(install.sh lists it; the ACPI tests check the tables with it)"
        )
    return path


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(the encoded length, bytes the encoding takes), per ACPI 20.2.4."""
    lead = data[0]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


# -- names ---------------------------------------------------------------------------


def test_name_segments_are_padded_with_underscores() -> None:
    assert name_seg("_HID") == b"_HID"
    assert name_seg("KBD") == b"KBD_"
    assert name_seg("A") == b"A___"


@pytest.mark.parametrize("bad", ["", "1ABC", "ABCDE", "ab", "A-B", "É"])
def test_name_segments_outside_the_grammar_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        name_seg(bad)


def test_name_strings_use_root_parent_dual_and_multi_prefixes() -> None:
    assert name_string("_SB") == b"_SB_"
    assert name_string("\\_SB") == b"\\_SB_"
    assert name_string("^^FOO") == b"^^FOO_"
    assert name_string("_SB.PCI0") == b"\x2e_SB_PCI0"
    assert name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert name_string("\\") == b"\\\x00"


# -- PkgLength -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "width"),
    [(0, 1), (62, 1), (63, 2), (0xFFD, 2), (0xFFE, 3), (0xFFFFC, 3), (0xFFFFD, 4)],
)
def test_pkg_length_grows_at_each_boundary_and_counts_itself(body: int, width: int) -> None:
    encoded = pkg_length(body)
    assert len(encoded) == width
    value, used = decode_pkg_length(encoded)
    assert used == width
    assert value == body + width


def test_pkg_length_past_28_bits_is_refused() -> None:
    pkg_length(0xFFF_FFFB)  # the largest body that fits (total 0xFFFFFFF)
    with pytest.raises(ValueError):
        pkg_length(0xFFF_FFFC)


# -- data objects --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (2, "0a02"),
        (0xFF, "0aff"),
        (0x100, "0b0001"),
        (0xFFFF, "0bffff"),
        (0x1_0000, "0c00000100"),
        (0xFFFF_FFFF, "0cffffffff"),
        (1 << 32, "0e0000000001000000"),
        ((1 << 64) - 1, "0effffffffffffffff"),
    ],
)
def test_integers_take_the_shortest_encoding(value: int, encoded: str) -> None:
    assert integer(value).hex() == encoded


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_integers_outside_64_bits_are_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        integer(bad)


def test_strings_are_nul_terminated_ascii() -> None:
    assert string("LNRO0005") == b"\x0dLNRO0005\x00"
    with pytest.raises(ValueError):
        string("a\0b")
    with pytest.raises(UnicodeEncodeError):
        string("é")


def test_eisa_ids_pack_letters_and_product_like_iasl() -> None:
    assert eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"  # the integer 0x030AD041
    assert int.from_bytes(eisa_id("PNP0501")[1:], "little") == 0x0105_D041
    for bad in ("PNP0A0", "pnp0a03", "PN10A03", "PNP0A0G"):
        with pytest.raises(ValueError):
            eisa_id(bad)


def test_encode_passes_terms_through_and_refuses_bool() -> None:
    assert encode(Term(b"\x01")) == b"\x01"
    assert encode(5) == b"\x0a\x05"
    assert encode("A") == b"\x0dA\x00"
    with pytest.raises(TypeError):
        encode(True)


def test_package_buffer_device_and_scope_encodings() -> None:
    assert package(1, 2) == bytes.fromhex("12 05 02 01 0a02")
    assert buffer(b"\x01\x02") == bytes.fromhex("11 05 0a02 0102")
    assert name("_UID", 0) == b"\x08_UID\x00"
    dev = device("COM1", name("_UID", 1))
    assert dev == b"\x5b\x82\x0b" + b"COM1" + b"\x08_UID\x01"
    assert scope("\\_SB", dev) == b"\x10\x13\\_SB_" + dev
    with pytest.raises(ValueError):
        package(*range(256))


def test_resource_template_ends_with_an_end_tag() -> None:
    template = resource_template(irq_no_flags(4))
    assert template == bytes.fromhex("11 08 0a05 221000 7900")


@pytest.mark.parametrize(
    "call",
    [
        lambda: irq_no_flags(16),
        lambda: io_port(0x1_0000, 0, 1, 1),
        lambda: io_port(0, 0, 1, 0x100),
        lambda: memory32_fixed(1 << 32, 1),
        lambda: extended_interrupt(),
        lambda: word_io(0x10, 0x0F),
        lambda: word_io(0, 0xFFFF),  # the length, 0x10000, does not fit a word
        lambda: dword_memory(0, 0xFFFF_FFFF),
    ],
)
def test_descriptor_fields_that_do_not_fit_are_refused(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


# -- against iasl --------------------------------------------------------------------

REFERENCE_ASL = """
DefinitionBlock ("", "SSDT", 2, "IOVIRT", "AMLTEST", 1)
{
    Name (INTS, Package () { 0, 1, 2, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF,
                             0x100000000, 0x123456789ABCDEF0 })
    Name (STR0, "LNRO0005")
    Name (EIS0, EisaId ("PNP0A03"))
    Name (BUF0, Buffer () { 1, 2, 3 })
    Name (RT00, ResourceTemplate () {
        IO (Decode16, 0x3F8, 0x3F8, 0x01, 0x08)
        IRQNoFlags () {4}
        IRQNoFlags () {1, 12}
        Memory32Fixed (ReadWrite, 0xFC000000, 0x200)
        Memory32Fixed (ReadOnly, 0x1000, 0x10)
        Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) {5}
        Interrupt (ResourceConsumer, Edge, ActiveLow, Shared) {16, 17}
        WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0xFF, 0, 0x100)
        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                0, 0xD00, 0xFFFF, 0, 0xF300)
        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                     0, 0xC0000000, 0xFBFFFFFF, 0, 0x3C000000)
        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
                     0, 0x1000, 0x1FFF, 0, 0x1000)
    })
    Scope (\\_SB)
    {
        Device (DEV0)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, 7)
        }
    }
    Device (\\_SB.DEV1)
    {
        Name (_ADR, 0x00010000)
    }
    Name (\\_SB.DEV0.NEST, 1)
    Name (BIGP, Package () {
        0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000,
        0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000, 0x10000 })
}
"""


def reference_terms() -> bytes:
    """The AML of REFERENCE_ASL, built with the encoder."""
    terms = [
        name(
            "INTS",
            package(
                0, 1, 2, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 1 << 32, 0x1234_5678_9ABC_DEF0
            ),
        ),
        name("STR0", "LNRO0005"),
        name("EIS0", eisa_id("PNP0A03")),
        name("BUF0", buffer(b"\x01\x02\x03")),
        name(
            "RT00",
            resource_template(
                io_port(0x3F8, 0x3F8, 1, 8),
                irq_no_flags(4),
                irq_no_flags(1, 12),
                memory32_fixed(0xFC00_0000, 0x200),
                memory32_fixed(0x1000, 0x10, writeable=False),
                extended_interrupt(5),
                extended_interrupt(16, 17, edge=True, active_low=True, shared=True),
                word_bus_number(0, 0xFF),
                word_io(0xD00, 0xFFFF),
                dword_memory(0xC000_0000, 0xFBFF_FFFF),
                dword_memory(0x1000, 0x1FFF, cacheable=True),
            ),
        ),
        scope("\\_SB", device("DEV0", name("_HID", eisa_id("PNP0501")), name("_UID", 7))),
        device("\\_SB.DEV1", name("_ADR", 0x0001_0000)),
        name("\\_SB.DEV0.NEST", 1),
        name("BIGP", package(*[0x1_0000] * 16)),  # 82 bytes: a two-byte PkgLength
    ]
    return b"".join(terms)


def test_encoder_output_matches_what_iasl_compiles(tmp_path: Path) -> None:
    source = tmp_path / "ref.asl"
    source.write_text(REFERENCE_ASL)
    result = subprocess.run(
        [iasl(), "-vs", "-p", str(tmp_path / "ref"), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = (tmp_path / "ref.aml").read_bytes()
    ours = reference_terms()
    assert compiled[SDT_HEADER_SIZE:].hex(" ") == ours.hex(" ")


def test_module_constants_name_the_spec_opcodes() -> None:
    # A few spot checks against ACPI 6.x, 20.2: the encoder's opcodes are the spec's.
    assert (aml.NAME_OP, aml.SCOPE_OP, aml.BUFFER_OP, aml.PACKAGE_OP) == (0x08, 0x10, 0x11, 0x12)
    assert (aml.EXT_OP_PREFIX, aml.DEVICE_OP) == (0x5B, 0x82)
