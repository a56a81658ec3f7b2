"""How ``kms.peer.client.PeerClient`` classifies what its transport meets, against real TLS servers on
127.0.0.1 that misbehave on purpose. The class decides what happens to the key bits at stake
(``PeerUnavailable``: never sent, another route may be tried; ``PeerUncertain``: the peer may have
acted, a cancel follows; ``PeerRefused``: it did not act), so a change of HTTP client must keep it."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kms.config import KmsSettings
from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network
from kms.peer.client import PeerClient, PeerRefused, PeerUnavailable, PeerUncertain
from kms.peer.directory import Peer, PeerDirectory
from kms.runtime.assembly import Runtime, build_runtime

Behaviour = Callable[[ssl.SSLSocket], None]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KmsSettings]:
    root = tmp_path_factory.mktemp("peer-client")
    prepared = prepare_network(
        root,
        [SiteSpec("KME-A", ("SAE-A1",)), SiteSpec("KME-B", ("SAE-B1",))],
        [LinkSpec("link-ab", "KME-A", "KME-B", options={"block_bits": 65536})],
    )
    return {kme: KmsSettings.load(site.config_path) for kme, site in prepared.items()}


@pytest.fixture(scope="module")
def runtime_a(sites: dict[str, KmsSettings]) -> Iterator[Runtime]:
    rt = build_runtime(sites["KME-A"], sync_registry=False)
    try:
        yield rt
    finally:
        rt.close()


class MisbehavingPeer:
    """A TLS server with KME B's certificate that does ``behaviour`` with each connection."""

    def __init__(self, settings_b: KmsSettings, behaviour: Behaviour) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(settings_b.tls.server_cert), str(settings_b.tls.server_key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.behaviour = behaviour
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as conn:
                    self.behaviour(conn)
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(timeout=5)


def read_request(conn: ssl.SSLSocket) -> bytes:
    """The request's head and body (its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head


def client_to(url: str, sites: dict[str, KmsSettings], runtime_a: Runtime) -> PeerClient:
    """KME A's client, with B's entry pointing at ``url`` (its bundle unchanged), signing only."""
    settings_a = sites["KME-A"]
    bundle_b = PeerDirectory.from_settings(settings_a).get("KME-B")
    assert bundle_b is not None
    cfg = settings_a.peering.model_copy(update={"hop_macs": False, "timeout_seconds": 1.0})
    directory = PeerDirectory("KME-A", [Peer("KME-B", url, bundle_b.bundle)])
    return PeerClient("KME-A", cfg, directory, runtime_a.identity)


def answer(status: str, content_type: bytes, body: bytes) -> Behaviour:
    def behave(conn: ssl.SSLSocket) -> None:
        read_request(conn)
        conn.sendall(
            f"HTTP/1.1 {status}\r\n".encode()
            + b"content-type: "
            + content_type
            + b"\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    return behave


def drop_after_request(conn: ssl.SSLSocket) -> None:
    read_request(conn)


def never_answer(conn: ssl.SSLSocket) -> None:
    read_request(conn)
    conn.settimeout(5)
    try:
        conn.recv(1)  # until the client gives up and closes
    except OSError:
        return


CASES: list[tuple[str, Behaviour, type[Exception], str]] = [
    ("drops the connection after the request", drop_after_request, PeerUncertain, "mid-request"),
    ("never answers", never_answer, PeerUncertain, "no answer within 1 s"),
    (
        "answers 500",
        answer("500 Internal Server Error", b"text/plain", b"boom"),
        PeerUncertain,
        "answered 500",
    ),
    (
        "refuses with a plain-text 403",
        answer("403 Forbidden", b"text/plain", b"not you"),
        PeerRefused,
        "403: not you",
    ),
    (
        "refuses with an ETSI Error body",
        answer("401 Unauthorized", b"application/json", b'{"message": "bad signature"}'),
        PeerRefused,
        "401: bad signature",
    ),
    (
        "answers 200 unsigned",
        answer("200 OK", b"application/json", b"{}"),
        PeerUncertain,
        "reply was rejected",
    ),
]


@pytest.mark.parametrize(("name", "behaviour", "error", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_misbehaving_peer_is_classified(
    sites: dict[str, KmsSettings],
    runtime_a: Runtime,
    name: str,
    behaviour: Behaviour,
    error: type[Exception],
    reason: str,
) -> None:
    peer = MisbehavingPeer(sites["KME-B"], behaviour)
    client = client_to(peer.url, sites, runtime_a)
    try:
        with pytest.raises(error, match=reason) as raised:
            client.call("KME-B", "topology", {})
        if isinstance(raised.value, PeerUncertain):
            assert raised.value.sent is not None  # a cancel can name the request
            assert raised.value.sent.type == "topology"
        # Only a call the transport failed marks the peer down for routing; any answer means it is up.
        transport_failed = reason in ("mid-request", "no answer within 1 s")
        assert ("KME-B" in client.down_peers()) is transport_failed
        assert not client.recently_unreachable("KME-B")  # it was reached
    finally:
        client.close()
        peer.close()


def test_a_closed_port_is_unavailable_and_remembered(
    sites: dict[str, KmsSettings], runtime_a: Runtime
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    client = client_to(f"https://127.0.0.1:{port}", sites, runtime_a)
    try:
        with pytest.raises(PeerUnavailable, match="unreachable"):
            client.call("KME-B", "topology", {})
        assert client.recently_unreachable("KME-B")
        assert "KME-B" in client.down_peers()
    finally:
        client.close()


def test_a_peer_with_a_certificate_of_another_ca_is_unavailable(
    sites: dict[str, KmsSettings], runtime_a: Runtime, tmp_path: Path
) -> None:
    """A's own server certificate is not from B's CA: the handshake fails, nothing was sent."""
    other = MisbehavingPeer(sites["KME-A"], drop_after_request)
    client = client_to(other.url, sites, runtime_a)
    try:
        with pytest.raises(PeerUnavailable, match="unreachable"):
            client.call("KME-B", "topology", {})
    finally:
        client.close()
        other.close()
