"""VNC Authentication: our pure-Python DES against published test vectors, and the RFB
challenge response against vncdotool's (OpenSSL-backed) client implementation."""

from __future__ import annotations

import os
import warnings

import pytest

from iovirt.backends.vnc_auth import (
    CHALLENGE_SIZE,
    auth_response,
    check_response,
    des_decrypt_block,
    des_encrypt_block,
    new_challenge,
    password_key,
)

# (key, plaintext, ciphertext) from the DES literature: the FIPS 81 "Now is t" example,
# the all-zero and all-one blocks, and the worked example of J. Orlin Grabbe's
# "The DES Algorithm Illustrated".
DES_VECTORS = [
    ("0123456789ABCDEF", "4E6F772069732074", "3FA40E8A984D4815"),
    ("0000000000000000", "0000000000000000", "8CA64DE9C1B123A7"),
    ("FFFFFFFFFFFFFFFF", "FFFFFFFFFFFFFFFF", "7359B2163E4EDC58"),
    ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),
    ("0E329232EA6D0D73", "8787878787878787", "0000000000000000"),
]


@pytest.mark.parametrize(("key", "plain", "cipher"), DES_VECTORS)
def test_des_known_answers(key: str, plain: str, cipher: str) -> None:
    k, p, c = bytes.fromhex(key), bytes.fromhex(plain), bytes.fromhex(cipher)
    assert des_encrypt_block(k, p) == c
    assert des_decrypt_block(k, c) == p


def test_des_ignores_parity_bits() -> None:
    key = bytes.fromhex("133457799BBCDFF1")
    flipped = bytes(b ^ 1 for b in key)  # the low bit of each byte is parity
    block = b"iovirt!!"
    assert des_encrypt_block(flipped, block) == des_encrypt_block(key, block)


def test_des_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        des_encrypt_block(b"short", bytes(8))
    with pytest.raises(ValueError):
        des_encrypt_block(bytes(8), b"1234567")


def test_password_key_reverses_bits_and_pads() -> None:
    # 'a' = 0x61 = 0b01100001 -> 0b10000110 = 0x86; NUL padding stays 0.
    assert password_key("a") == bytes((0x86, 0, 0, 0, 0, 0, 0, 0))
    assert password_key("") == bytes(8)
    # Only the first 8 characters count.
    assert password_key("12345678") == password_key("12345678 and more")
    assert password_key("\x80\x01") == bytes((0x01, 0x80, 0, 0, 0, 0, 0, 0))


def _vncdotool_response(password: str, challenge: bytes) -> bytes:
    from vncdotool.rfb import _vnc_des, des_encrypt  # type: ignore[import-untyped]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography's TripleDES deprecation notice
        return bytes(des_encrypt(_vnc_des(password), challenge))


@pytest.mark.parametrize("password", ["", "a", "s3cret", "12345678", "Pa$$w0rd"])
def test_auth_response_matches_a_real_client(password: str) -> None:
    for _ in range(4):
        challenge = os.urandom(CHALLENGE_SIZE)
        assert auth_response(password, challenge) == _vncdotool_response(password, challenge)


def test_check_response() -> None:
    challenge = new_challenge()
    good = auth_response("s3cret", challenge)
    assert check_response("s3cret", challenge, good)
    assert not check_response("s3creT", challenge, good)
    assert not check_response("s3cret", new_challenge(), good)
    assert not check_response("s3cret", challenge, good[:15])
    assert not check_response("s3cret", challenge, bytes(16))


def test_challenges_are_fresh() -> None:
    challenges = {new_challenge() for _ in range(64)}
    assert len(challenges) == 64
    assert all(len(c) == CHALLENGE_SIZE for c in challenges)


def test_auth_response_rejects_a_short_challenge() -> None:
    with pytest.raises(ValueError):
        auth_response("x", bytes(8))
