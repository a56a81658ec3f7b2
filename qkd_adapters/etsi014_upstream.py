"""ETSI GS QKD 014 upstream: the KME as an SAE of a vendor's QKD device.

Commercial QKD systems (ID Quantique, Toshiba and others) expose their keys through ETSI GS QKD 014
themselves: each device is a "KME" in the vendor's sense, and our KME is one of its SAEs, with its
own mutual-TLS credentials issued by the vendor's CA. The device hands a key to one end first
(``enc_keys``) and lets the other end fetch the same key by key_ID (``dec_keys``), so the two ends of
a link play different roles:

- :class:`Etsi014Master` (a ``KeySource``) at the near end: each ``pull`` calls Get status and then
  Get key for ``keys_per_pull`` keys of ``key_size`` bits, and concatenates them into one
  :class:`KeyBlock`. Its block ID is a UUIDv5 over the key_IDs (both ends compute the same one), and
  its ``sync`` metadata, ``{"key_IDs": [...], "key_size": bits}``, is what the far end needs. The KMS
  announces the block to the far KME over the KME-to-KME protocol with that metadata; key_IDs are
  not secret.
- :class:`Etsi014Follower` (a ``FollowerKeySource``) at the far end: ``fetch_announced`` calls Get key
  with key IDs for the announced key_IDs and returns the identical block, or a ``LinkAlarm`` when what
  the device returns does not match the announcement.

What this adapter trusts: the device's TLS certificate (checked against ``ca_cert``, hostname
included unless ``verify_hostname = false``), and the device's word that its keys are QKD keys
(``is_qkd`` defaults to True for a real device; set it False for anything else). It does not trust
the device's answers to be well formed: sizes, key_IDs and base64 are checked, and a mismatch is an
alarm, never a silently shortened block.

A device that is down, slow or out of keys (503) does not crash the KMS: ``pull`` logs the condition
(no material, ever) and returns ``[]``, backing off up to ``max_backoff_s``. Pulls are rate-limited to
one device round trip per ``poll_interval_s``.

Why one module: the master and the follower are the two ends of one link and must agree on all that
crosses between the KMEs (the block ID derived from the key_IDs, the ``sync`` metadata, the checks on
a device's Key container and on an announcement); reading both roles beside those helpers is how that
agreement is reviewed, and what the roles share of the device connection is one small base class.
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from qkd_adapters.keyblock import KeyBlock, KeySourceError, LinkAlarm, LinkEvent, Provenance

ADAPTER = "etsi014-upstream"
# Namespace of block IDs: uuid5(BLOCK_NAMESPACE, "\n".join(key_IDs)).
BLOCK_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:qkms:etsi014-upstream:block")
MAX_KEYS_PER_BLOCK = 4096

log = logging.getLogger(__name__)

Role = Literal["master", "follower"]


def block_id_for(key_ids: Sequence[str]) -> str:
    """The block ID both ends derive from a block's key_IDs (in order)."""
    return str(uuid.uuid5(BLOCK_NAMESPACE, "\n".join(key_ids)))


class DeviceError(Exception):
    """A device answer we cannot use. ``status`` is the HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _DeviceClient:
    """The mTLS connection to one device's ETSI 014 API and what both roles share."""

    def __init__(
        self,
        link_id: str,
        url: str,
        peer_sae_id: str,
        *,
        ca_cert: str | Path,
        client_cert: str | Path,
        client_key: str | Path,
        timeout_s: float = 5.0,
        verify_hostname: bool = True,
        is_qkd: bool = True,
        protocol: str = "vendor-qkd",
        simulated: bool = False,
        distance_km: float | None = None,
        device_name: str | None = None,
    ) -> None:
        if not link_id:
            raise ValueError("link_id must not be empty")
        if not peer_sae_id:
            raise ValueError("peer_sae_id must not be empty")
        if not str(url).startswith("https://"):
            raise ValueError("the device URL must be https:// (ETSI GS QKD 014 runs over mutual TLS)")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if not isinstance(is_qkd, bool) or not isinstance(simulated, bool):
            raise ValueError("is_qkd and simulated must be booleans")
        self._link_id = link_id
        self.url = str(url).rstrip("/")
        self.peer_sae_id = peer_sae_id
        self.is_qkd = is_qkd
        self.protocol = str(protocol)
        self.simulated = simulated
        self.distance_km = None if distance_km is None else float(distance_km)
        self.device_name = device_name
        try:
            ctx = ssl.create_default_context(cafile=str(ca_cert))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = bool(verify_hostname)
            ctx.load_cert_chain(str(client_cert), str(client_key))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the device TLS credentials: {type(exc).__name__}: {exc}") from exc
        self._http = httpx.Client(base_url=self.url, verify=ctx, timeout=timeout_s)
        self._closed = threading.Event()

    @property
    def link_id(self) -> str:
        return self._link_id

    def _describe(self, role: Role) -> dict[str, Any]:
        return {
            "adapter": ADAPTER,
            "role": role,
            "url": self.url,
            "peer_sae_id": self.peer_sae_id,
            "protocol": self.protocol,
            "is_qkd": self.is_qkd,
            "simulated": self.simulated,
            "device_name": self.device_name,
        }

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One request; the parsed JSON of a 200, else ``DeviceError`` (message without material)."""
        if self._closed.is_set():
            raise DeviceError("adapter is closed")
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise DeviceError(f"device timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise DeviceError(f"device unreachable ({type(exc).__name__})") from exc
        if resp.status_code != 200:
            raise DeviceError(
                f"device answered {resp.status_code}: {_error_message(resp)}", status=resp.status_code
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise DeviceError("device answered 200 with a body that is not JSON", status=200) from exc

    def _path(self, sae_id: str, endpoint: str) -> str:
        return f"/api/v1/keys/{quote(sae_id, safe='')}/{endpoint}"

    def _provenance(self, details: Mapping[str, Any], simulated: bool) -> Provenance:
        return Provenance(
            protocol=self.protocol,
            is_qkd=self.is_qkd,
            adapter=ADAPTER,
            distance_km=self.distance_km,
            simulated=simulated,
            details=details,
        )

    def close(self) -> None:
        self._closed.set()
        self._http.close()


class Etsi014Master(_DeviceClient):
    """The near end: pulls keys with Get key and makes one block of them per pull.

    ``peer_sae_id`` is the far KME's SAE ID at the far device (the slave of every Get key call).
    """

    def __init__(
        self,
        link_id: str,
        url: str,
        peer_sae_id: str,
        *,
        keys_per_pull: int = 64,
        key_size: int = 256,
        poll_interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        if not 1 <= keys_per_pull <= MAX_KEYS_PER_BLOCK:
            raise ValueError(f"keys_per_pull must be between 1 and {MAX_KEYS_PER_BLOCK}")
        if key_size <= 0 or key_size % 8:
            raise ValueError("key_size must be a positive multiple of 8 bits")
        if poll_interval_s < 0 or max_backoff_s < 0:
            raise ValueError("poll_interval_s and max_backoff_s must not be negative")
        super().__init__(link_id, url, peer_sae_id, **kwargs)
        self.keys_per_pull = int(keys_per_pull)
        self.key_size = int(key_size)
        self.poll_interval_s = float(poll_interval_s)
        self.max_backoff_s = float(max_backoff_s)
        self._lock = threading.Lock()
        self._next_call = 0.0
        self._failures = 0
        self._refused: str | None = None  # the last 400/401 condition already raised as an alarm

    def describe(self) -> Mapping[str, Any]:
        return {
            **self._describe("master"),
            "keys_per_pull": self.keys_per_pull,
            "key_size": self.key_size,
            "poll_interval_s": self.poll_interval_s,
        }

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> Sequence[LinkEvent]:
        """At most one block per call, and at most one device round trip per ``poll_interval_s``."""
        if max_events <= 0 or self._closed.is_set():
            return []
        with self._lock:
            wait = self._next_call - time.monotonic()
            if wait > 0 and (timeout <= 0 or wait > timeout or self._closed.wait(wait)):
                return []
            try:
                event = self._pull_block()
            except DeviceError as exc:
                return self._failed(exc)
            self._failures = 0
            self._refused = None
            self._next_call = time.monotonic() + self.poll_interval_s
            return [] if event is None else [event]

    def _failed(self, exc: DeviceError) -> list[LinkEvent]:
        """Back off; raise one alarm per new refusal (400/401 mean configuration, not load)."""
        self._failures += 1
        backoff = min(self.max_backoff_s, max(self.poll_interval_s, 0.5) * 2 ** min(self._failures - 1, 10))
        self._next_call = time.monotonic() + backoff
        if exc.status in (400, 401):
            log.error("etsi014 device refused: link=%s %s", self._link_id, exc)
            if self._refused != str(exc):
                self._refused = str(exc)
                return [
                    LinkAlarm(
                        link_id=self._link_id,
                        block_id=None,
                        reason=f"etsi014-device-refused: {exc}",
                        severity="warning",
                        details={"code": "etsi014-device-refused", "status": exc.status, "url": self.url},
                    )
                ]
        else:
            log.warning(
                "etsi014 device unavailable: link=%s %s (retry in %.1fs)", self._link_id, exc, backoff
            )
        return []

    def _pull_block(self) -> LinkEvent | None:
        status = self._call("GET", self._path(self.peer_sae_id, "status"))
        if not isinstance(status, dict):
            raise DeviceError("device status is not a JSON object", status=200)
        number = min(self.keys_per_pull, _int_field(status, "max_key_per_request", self.keys_per_pull))
        stored = _int_field(status, "stored_key_count", number)
        if stored < number:
            log.debug("etsi014 device has %d keys, waiting for %d: link=%s", stored, number, self._link_id)
            return None
        lo, hi = _int_field(status, "min_key_size", 0), _int_field(status, "max_key_size", 1 << 30)
        if not lo <= self.key_size <= hi:
            raise DeviceError(f"device serves keys of {lo}..{hi} bits, not key_size {self.key_size}", 400)
        container = self._call(
            "POST", self._path(self.peer_sae_id, "enc_keys"), {"number": number, "size": self.key_size}
        )
        extension = status.get("status_extension")
        device_says_simulated = isinstance(extension, dict) and extension.get("simulated") is True
        details: dict[str, Any] = {
            "role": "master",
            "device_url": self.url,
            "source_KME_ID": status.get("source_KME_ID"),
            "target_KME_ID": status.get("target_KME_ID"),
            "master_SAE_ID": status.get("master_SAE_ID"),
            "slave_SAE_ID": self.peer_sae_id,
            "keys": number,
            "key_size": self.key_size,
        }
        if isinstance(extension, dict):
            details["device_status_extension"] = extension
        try:
            key_ids, material = _unpack_keys(container, self.key_size, expect_ids=None)
        except DeviceError as exc:
            # Keys the device has handed out are gone at its end: report, never use a partial block.
            log.error("etsi014 device sent unusable keys: link=%s %s", self._link_id, exc)
            return LinkAlarm(
                link_id=self._link_id,
                block_id=None,
                reason=f"etsi014-bad-response: {exc}",
                details={"code": "etsi014-bad-response", **details},
            )
        if len(key_ids) != number:
            return LinkAlarm(
                link_id=self._link_id,
                block_id=None,
                reason=f"etsi014-bad-response: asked for {number} keys, device returned {len(key_ids)}",
                details={"code": "etsi014-bad-response", **details},
            )
        block_id = block_id_for(key_ids)
        return KeyBlock(
            link_id=self._link_id,
            block_id=block_id,
            material=material,
            bit_length=len(key_ids) * self.key_size,
            provenance=self._provenance(details, self.simulated or device_says_simulated),
            sync={"key_IDs": key_ids, "key_size": self.key_size},
        )


class Etsi014Follower(_DeviceClient):
    """The far end: fetches each announced block's keys by key_ID from this end's device.

    ``peer_sae_id`` is the near KME's SAE ID at the near device (the master of the announced keys).
    ``pull`` returns nothing, so a pool filler can hold this object harmlessly; blocks come only
    through ``fetch_announced``.

    Provenance is ``simulated`` when the option says so or when this end's device says so in its Get
    status ``status_extension``, as at the master; the device is asked once, before the first fetch.
    """

    _extension: dict[str, Any] | None = None  # the device's status_extension, once asked ({}: none)

    def describe(self) -> Mapping[str, Any]:
        return self._describe("follower")

    def _status_extension(self) -> dict[str, Any]:
        """The device's Get status ``status_extension``; ``DeviceError`` if it does not answer (the
        keys are then left at the device for the next announcement)."""
        if self._extension is None:
            try:
                status = self._call("GET", self._path(self.peer_sae_id, "status"))
            except DeviceError as exc:
                if exc.status in (None, 503):
                    raise
                status = None  # it refuses Get status in this direction (400, 401): no claim
            extension = status.get("status_extension") if isinstance(status, dict) else None
            self._extension = dict(extension) if isinstance(extension, dict) else {}
        return self._extension

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> Sequence[LinkEvent]:
        return []

    def fetch_announced(
        self, block_id: str, bit_length: int, sync: Mapping[str, Any]
    ) -> KeyBlock | LinkAlarm:
        """This end's copy of an announced block; ``KeySourceError`` if the device cannot deliver it."""
        key_ids = sync.get("key_IDs")
        key_size = sync.get("key_size")
        details: dict[str, Any] = {
            "role": "follower",
            "device_url": self.url,
            "master_SAE_ID": self.peer_sae_id,
        }
        problem = _check_announcement(block_id, bit_length, key_ids, key_size)
        if problem is not None:
            return self._alarm(block_id, f"announcement does not match its sync metadata: {problem}", details)
        assert isinstance(key_ids, list) and isinstance(key_size, int)
        try:
            extension = self._status_extension()
            container = self._call(
                "POST",
                self._path(self.peer_sae_id, "dec_keys"),
                {"key_IDs": [{"key_ID": k} for k in key_ids]},
            )
        except DeviceError as exc:
            log.warning("etsi014 device could not deliver block %s: link=%s %s", block_id, self._link_id, exc)
            raise KeySourceError(f"link {self._link_id}: block {block_id}: {exc}") from exc
        try:
            got_ids, material = _unpack_keys(container, key_size, expect_ids=key_ids)
        except DeviceError as exc:
            return self._alarm(block_id, str(exc), details)
        details.update({"keys": len(got_ids), "key_size": key_size})
        if extension:
            details["device_status_extension"] = extension
        return KeyBlock(
            link_id=self._link_id,
            block_id=block_id,
            material=material,
            bit_length=bit_length,
            provenance=self._provenance(details, self.simulated or extension.get("simulated") is True),
            sync={"key_IDs": list(key_ids), "key_size": key_size},
        )

    def _alarm(self, block_id: str, reason: str, details: Mapping[str, Any]) -> LinkAlarm:
        log.error("etsi014 follower block mismatch: link=%s block=%s %s", self._link_id, block_id, reason)
        return LinkAlarm(
            link_id=self._link_id,
            block_id=block_id,
            reason=f"etsi014-sync-mismatch: {reason}",
            details={"code": "etsi014-sync-mismatch", **details},
        )


def _check_announcement(block_id: str, bit_length: int, key_ids: Any, key_size: Any) -> str | None:
    if not isinstance(key_ids, list) or not key_ids or not all(isinstance(k, str) and k for k in key_ids):
        return "key_IDs must be a non-empty list of strings"
    if len(key_ids) > MAX_KEYS_PER_BLOCK:
        return f"more than {MAX_KEYS_PER_BLOCK} key_IDs"
    if len(set(key_ids)) != len(key_ids):
        return "key_IDs repeat"
    if not isinstance(key_size, int) or isinstance(key_size, bool) or key_size <= 0 or key_size % 8:
        return "key_size must be a positive multiple of 8"
    if bit_length != len(key_ids) * key_size:
        return f"bit_length {bit_length} is not {len(key_ids)} keys of {key_size} bits"
    if block_id != block_id_for(key_ids):
        return "block ID is not the one derived from the key_IDs"
    return None


def _unpack_keys(container: Any, key_size: int, expect_ids: Sequence[str] | None) -> tuple[list[str], bytes]:
    """The key_IDs and the concatenated material of a Key container, in ``expect_ids`` order if given."""
    keys = container.get("keys") if isinstance(container, dict) else None
    if not isinstance(keys, list) or not keys:
        raise DeviceError("key container has no keys")
    by_id: dict[str, bytes] = {}
    order: list[str] = []
    for item in keys:
        kid = item.get("key_ID") if isinstance(item, dict) else None
        encoded = item.get("key") if isinstance(item, dict) else None
        if not isinstance(kid, str) or not kid or not isinstance(encoded, str):
            raise DeviceError("key container entry lacks key_ID or key")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise DeviceError(f"key {kid} is not valid base64") from None
        if len(raw) * 8 != key_size:
            raise DeviceError(f"key {kid} has {len(raw) * 8} bits, expected {key_size}")
        if kid in by_id:
            raise DeviceError(f"key {kid} appears twice")
        by_id[kid] = raw
        order.append(kid)
    if expect_ids is not None:
        if set(by_id) != set(expect_ids) or len(by_id) != len(expect_ids):
            raise DeviceError(
                f"device returned {len(by_id)} keys whose IDs differ from the {len(expect_ids)} announced"
            )
        order = list(expect_ids)
    material = b"".join(by_id[k] for k in order)
    return order, material


def _int_field(doc: Mapping[str, Any], name: str, default: int) -> int:
    value = doc.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _error_message(resp: httpx.Response) -> str:
    """The ETSI Error body's message (trimmed), or a note that there was none."""
    try:
        body = resp.json()
    except ValueError:
        return "(no ETSI Error body)"
    message = body.get("message") if isinstance(body, dict) else None
    return str(message)[:200] if message else "(no message)"


def upstream_source(link_id: str, role: Role = "master", **options: Any) -> Etsi014Master | Etsi014Follower:
    """Build the role's adapter from config options (``url``, ``peer_sae_id``, TLS paths, ...)."""
    if role == "master":
        return Etsi014Master(link_id, **options)
    if role == "follower":
        return Etsi014Follower(link_id, **options)
    raise ValueError("role must be 'master' or 'follower'")
