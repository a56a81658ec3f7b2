"""Console passwords hashed with scrypt (RFC 7914, pyca/cryptography): memory-hard, so a stolen
``console_accounts`` table is expensive to guess through, and every wrong password costs the
guesser the same time it costs the KME (DECISIONS.md D-36).

The stored form is ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``: parameters travel with each
hash, so raising them later leaves older hashes checkable.
"""

from __future__ import annotations

import base64
import hmac
import os

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

LOG2_N = 15  # n = 32768, r = 8: 32 MiB and ~0.1 s per attempt on one core
R = 8
P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_LENGTH = 12
MAX_LENGTH = 1024


class PasswordRejected(ValueError):
    """A password that may not be set; the message says why (and never repeats the password)."""


def check_strength(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise PasswordRejected(f"a console password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise PasswordRejected(f"a console password has at most {MAX_LENGTH} characters")


def _derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=HASH_BYTES, n=2**log2_n, r=r, p=p).derive(password.encode())


def hash_password(password: str) -> str:
    check_strength(password)
    salt = os.urandom(SALT_BYTES)
    digest = _derive(password, salt, LOG2_N, R, P)
    b64 = base64.b64encode
    return f"scrypt${LOG2_N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``; a malformed stored hash matches nothing."""
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or not 10 <= int(log2_n) <= 22:
            return False
        expected = base64.b64decode(digest, validate=True)
        given = _derive(
            password[:MAX_LENGTH], base64.b64decode(salt, validate=True), int(log2_n), int(r), int(p)
        )
    except ValueError:
        return False
    return hmac.compare_digest(given, expected)


# Checked against when the account does not exist, so an unknown name costs as long as a known one.
DUMMY_HASH = "scrypt$15$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
