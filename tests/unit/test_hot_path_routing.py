"""Which requests the lean path (kms.api.hot_path) answers itself and which it passes on to FastAPI
untouched: a peer message is taken only when it is an ordinary JSON POST to the exact path, and what
it passes on arrives with its body intact (the FastAPI route then answers through the same
``PeerEndpoint.respond``, tests/peer/test_peer_protocol.py runs the protocol's checks through both)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.responses import Response

from kms.api.hot_path import HotPathMiddleware
from kms.peer.messages import MESSAGES_PATH as PEER_PATH


class Recorder:
    """The inner app and the peer handler: each records what reached it."""

    def __init__(self) -> None:
        self.app_bodies: list[bytes] = []
        self.peer_bodies: list[bytes] = []

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.app_bodies.append(body)
        await Response(b"framework")(scope, receive, send)

    async def peer(self, scope: Any, body: bytes) -> Response:
        self.peer_bodies.append(body)
        return Response(b"lean")


async def _unused(*_: Any) -> Response:
    raise AssertionError("not an enc_keys / dec_keys request")


def call(
    method: str, path: str, content_type: bytes | None, chunks: list[bytes], query: bytes = b""
) -> tuple[Recorder, bytes]:
    recorder = Recorder()
    middleware = HotPathMiddleware(recorder.app, _unused, _unused, peer=recorder.peer)
    headers = [(b"content-type", content_type)] if content_type else []
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": headers}
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return recorder, body


def test_a_json_peer_message_in_chunks_is_answered_by_the_lean_path_whole() -> None:
    recorder, answer = call("POST", PEER_PATH, b"application/json; charset=utf-8", [b'{"a":', b"1}"])
    assert answer == b"lean"
    assert recorder.peer_bodies == [b'{"a":1}']
    assert recorder.app_bodies == []


@pytest.mark.parametrize(
    ("method", "path", "content_type", "query"),
    [
        ("POST", PEER_PATH, b"text/plain", b""),
        ("POST", PEER_PATH, None, b""),
        ("POST", PEER_PATH, b"application/json", b"x=1"),
        ("PUT", PEER_PATH, b"application/json", b""),
        ("POST", PEER_PATH + "/", b"application/json", b""),
        ("POST", "/peer/v1/other", b"application/json", b""),
    ],
    ids=["text-plain", "no-content-type", "query-string", "put", "trailing-slash", "other-path"],
)
def test_anything_else_goes_to_the_framework_with_its_body(
    method: str, path: str, content_type: bytes | None, query: bytes
) -> None:
    recorder, answer = call(method, path, content_type, [b'{"a":', b"1}"], query)
    assert answer == b"framework"
    assert recorder.app_bodies == [b'{"a":1}']
    assert recorder.peer_bodies == []


def test_a_client_gone_mid_body_is_left_to_the_framework() -> None:
    """The lean path read part of the body, then the disconnect: FastAPI sees both, in order."""
    recorder = Recorder()
    middleware = HotPathMiddleware(recorder.app, _unused, _unused, peer=recorder.peer)
    scope = {
        "type": "http",
        "method": "POST",
        "path": PEER_PATH,
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    messages = [{"type": "http.request", "body": b'{"a":', "more_body": True}, {"type": "http.disconnect"}]
    seen: list[str] = []

    async def receive() -> dict[str, Any]:
        message = messages.pop(0)
        seen.append(message["type"])
        return message

    async def app(scope: Any, receive: Any, send: Any) -> None:
        first = await receive()
        recorder.app_bodies.append(first["body"])
        assert first["more_body"] is True

    async def send(_: dict[str, Any]) -> None:
        return None

    middleware.app = app
    asyncio.run(middleware(scope, receive, send))
    assert recorder.app_bodies == [b'{"a":']
    assert recorder.peer_bodies == []
