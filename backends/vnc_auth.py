"""VNC Authentication (RFC 6143 7.2.2): DES of a 16-byte challenge under the password.

The server sends 16 random bytes; the client encrypts them as two DES-ECB blocks with a key
made from the first 8 bytes of the password (shorter passwords padded with NULs) and sends
the 16-byte result back. The historical twist every VNC implementation follows: each key
byte has its bit order reversed before it goes into DES, because the original code fed
bytes to a DES routine that numbered bits from the other end.

DES is implemented here in pure Python (FIPS 46-3): the handshake encrypts two blocks per
connection, so speed does not matter, and it saves a dependency on a crypto library for a
cipher that nothing else in iovirt should use. This is not security: single DES with an
8-character password is weak, which is why the VNC server binds to loopback by default.
"""

from __future__ import annotations

import hmac
import os

CHALLENGE_SIZE = 16
DES_BLOCK_SIZE = 8
# RFB passwords are truncated to the DES key size.
PASSWORD_MAX_BYTES = 8

# --- DES tables (FIPS 46-3). Bit positions count from 1 at the most significant bit. ---

# Initial permutation IP; the final permutation is its inverse.
_IP = (
    58, 50, 42, 34, 26, 18, 10, 2,
    60, 52, 44, 36, 28, 20, 12, 4,
    62, 54, 46, 38, 30, 22, 14, 6,
    64, 56, 48, 40, 32, 24, 16, 8,
    57, 49, 41, 33, 25, 17, 9, 1,
    59, 51, 43, 35, 27, 19, 11, 3,
    61, 53, 45, 37, 29, 21, 13, 5,
    63, 55, 47, 39, 31, 23, 15, 7,
)  # fmt: skip
_FP = tuple(_IP.index(i) + 1 for i in range(1, 65))

# Expansion E: the 32-bit half block to 48 bits.
_E = (
    32, 1, 2, 3, 4, 5,
    4, 5, 6, 7, 8, 9,
    8, 9, 10, 11, 12, 13,
    12, 13, 14, 15, 16, 17,
    16, 17, 18, 19, 20, 21,
    20, 21, 22, 23, 24, 25,
    24, 25, 26, 27, 28, 29,
    28, 29, 30, 31, 32, 1,
)  # fmt: skip

# Permutation P applied to the S-box output.
_P = (
    16, 7, 20, 21, 29, 12, 28, 17,
    1, 15, 23, 26, 5, 18, 31, 10,
    2, 8, 24, 14, 32, 27, 3, 9,
    19, 13, 30, 6, 22, 11, 4, 25,
)  # fmt: skip

# Permuted choice 1: 64-bit key (parity bits dropped) to C0 || D0, 56 bits.
_PC1 = (
    57, 49, 41, 33, 25, 17, 9,
    1, 58, 50, 42, 34, 26, 18,
    10, 2, 59, 51, 43, 35, 27,
    19, 11, 3, 60, 52, 44, 36,
    63, 55, 47, 39, 31, 23, 15,
    7, 62, 54, 46, 38, 30, 22,
    14, 6, 61, 53, 45, 37, 29,
    21, 13, 5, 28, 20, 12, 4,
)  # fmt: skip

# Permuted choice 2: Cn || Dn (56 bits) to the 48-bit round key Kn.
_PC2 = (
    14, 17, 11, 24, 1, 5,
    3, 28, 15, 6, 21, 10,
    23, 19, 12, 4, 26, 8,
    16, 7, 27, 20, 13, 2,
    41, 52, 31, 37, 47, 55,
    30, 40, 51, 45, 33, 48,
    44, 49, 39, 56, 34, 53,
    46, 42, 50, 36, 29, 32,
)  # fmt: skip

# Left rotations of C and D before each of the 16 rounds.
_ROTATIONS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)

# S-boxes S1..S8, each 4 rows of 16; row = outer bits, column = inner four bits.
_SBOXES = (
    (
        14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7,
        0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
        4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0,
        15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13,
    ),
    (
        15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10,
        3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
        0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15,
        13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9,
    ),
    (
        10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8,
        13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
        13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7,
        1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12,
    ),
    (
        7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15,
        13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
        10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4,
        3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14,
    ),
    (
        2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9,
        14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
        4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14,
        11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3,
    ),
    (
        12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11,
        10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
        9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6,
        4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13,
    ),
    (
        4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1,
        13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
        1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2,
        6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12,
    ),
    (
        13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7,
        1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
        7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8,
        2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11,
    ),
)  # fmt: skip

_MASK28 = (1 << 28) - 1


def _permute(value: int, table: tuple[int, ...], width: int) -> int:
    """Bit ``i`` of the result (counting from the MSB, from 1) is bit ``table[i]`` of
    ``value``, a ``width``-bit number counted the same way."""
    out = 0
    for position in table:
        out = (out << 1) | ((value >> (width - position)) & 1)
    return out


def _round_keys(key: bytes) -> list[int]:
    """The sixteen 48-bit round keys K1..K16 of an 8-byte DES key."""
    if len(key) != DES_BLOCK_SIZE:
        raise ValueError(f"a DES key is {DES_BLOCK_SIZE} bytes, not {len(key)}")
    cd = _permute(int.from_bytes(key, "big"), _PC1, 64)
    c, d = cd >> 28, cd & _MASK28
    keys = []
    for rotation in _ROTATIONS:
        c = ((c << rotation) | (c >> (28 - rotation))) & _MASK28
        d = ((d << rotation) | (d >> (28 - rotation))) & _MASK28
        keys.append(_permute((c << 28) | d, _PC2, 56))
    return keys


def _feistel(half: int, round_key: int) -> int:
    """The DES round function f(R, K)."""
    x = _permute(half, _E, 32) ^ round_key
    out = 0
    for box in range(8):
        six = (x >> (42 - 6 * box)) & 0x3F
        row = ((six >> 4) & 0b10) | (six & 1)
        column = (six >> 1) & 0xF
        out = (out << 4) | _SBOXES[box][row * 16 + column]
    return _permute(out, _P, 32)


def _des_block(key: bytes, block: bytes, decrypt: bool) -> bytes:
    if len(block) != DES_BLOCK_SIZE:
        raise ValueError(f"a DES block is {DES_BLOCK_SIZE} bytes, not {len(block)}")
    keys = _round_keys(key)
    if decrypt:
        keys.reverse()
    lr = _permute(int.from_bytes(block, "big"), _IP, 64)
    left, right = lr >> 32, lr & 0xFFFF_FFFF
    for round_key in keys:
        left, right = right, left ^ _feistel(right, round_key)
    # The halves are swapped once more after the last round (R16 || L16).
    return _permute((right << 32) | left, _FP, 64).to_bytes(DES_BLOCK_SIZE, "big")


def des_encrypt_block(key: bytes, block: bytes) -> bytes:
    """DES-encrypt one 8-byte block under an 8-byte key (parity bits ignored)."""
    return _des_block(key, block, decrypt=False)


def des_decrypt_block(key: bytes, block: bytes) -> bytes:
    """DES-decrypt one 8-byte block under an 8-byte key."""
    return _des_block(key, block, decrypt=True)


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


_BIT_REVERSED = bytes(_reverse_bits(b) for b in range(256))


def password_key(password: str) -> bytes:
    """The DES key RFB derives from ``password``: its first 8 bytes (Latin-1, NUL padded)
    with the bits of each byte reversed. Characters outside Latin-1 become '?', as a
    client that cannot type them would send."""
    raw = password.encode("latin-1", errors="replace")[:PASSWORD_MAX_BYTES]
    return raw.ljust(PASSWORD_MAX_BYTES, b"\0").translate(_BIT_REVERSED)


def auth_response(password: str, challenge: bytes) -> bytes:
    """What a client answers to ``challenge`` (16 bytes) when it knows ``password``."""
    if len(challenge) != CHALLENGE_SIZE:
        raise ValueError(f"a VNC challenge is {CHALLENGE_SIZE} bytes, not {len(challenge)}")
    key = password_key(password)
    return b"".join(
        des_encrypt_block(key, challenge[i : i + DES_BLOCK_SIZE])
        for i in range(0, CHALLENGE_SIZE, DES_BLOCK_SIZE)
    )


def new_challenge() -> bytes:
    """A fresh random challenge; never reused, so a recorded answer cannot be replayed."""
    return os.urandom(CHALLENGE_SIZE)


def check_response(password: str, challenge: bytes, response: bytes) -> bool:
    """Whether ``response`` proves knowledge of ``password`` (compared in constant time)."""
    return hmac.compare_digest(auth_response(password, challenge), response)
