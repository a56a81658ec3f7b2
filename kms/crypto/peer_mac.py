"""MAC keys between adjacent KMEs (DECISIONS.md D-35): derived from an ML-KEM shared secret, used
for HMAC-SHA256 over a message's exact bytes.

The sender encapsulates to the neighbour's ML-KEM key and sends the ciphertext in an ML-DSA-signed
message; both ends derive the key with HKDF-SHA256 bound to both KME IDs and the key's ID, so a key
is good for one direction of one pair only. A request's tag and a reply's tag are computed under
different labels, so neither can be passed off as the other.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
INFO = b"qkms/peer-mac/v1"
REQUEST, REPLY = b"qkms/peer-mac/request|", b"qkms/peer-mac/reply|"


def derive_mac_key(shared_secret: bytes, sender: str, recipient: str, key_id: str) -> bytes:
    """The MAC key for messages from ``sender`` to ``recipient`` (and their replies)."""
    info = b"|".join((INFO, sender.encode(), recipient.encode(), key_id.encode()))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared_secret)


def mac_tag(key: bytes, raw: bytes, reply: bool) -> bytes:
    return hmac.new(key, (REPLY if reply else REQUEST) + raw, hashlib.sha256).digest()


def tag_matches(key: bytes, raw: bytes, reply: bool, tag: bytes) -> bool:
    return hmac.compare_digest(mac_tag(key, raw, reply), tag)
