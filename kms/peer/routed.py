"""Signed control messages to any KME of the network, carried by the trusted nodes (``relay.forward``).

A master's KME whose relayed request failed must withdraw the keys at every KME of the route, and
the node that failed may be the one in the middle. The withdrawal is sealed by the master's KME for
the far KME itself (the ordinary peer envelope: signature, recipient, nonce, time) and handed hop by
hop along the current best route (``kms.peer.topology``), each hop in its own signed message. Only
the recipient opens it, checks the origin's signature with the origin's bundle, and acts on it:
a trusted node can drop it but not alter or forge it, and replay fails on the nonce as for any
message. Only the types in ``ROUTABLE`` travel this way: withdrawals, and an SAE's state from its
home KME (``sae_notices``, DECISIONS.md D-39).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from kms.config import PeeringSection
from kms.crypto.identity import KmeIdentity
from kms.peer.client import PeerClient, PeerError, PeerUnavailable
from kms.peer.directory import PeerDirectory
from kms.peer.messages import MessageRejected, PeerMessage, open_message

ROUTABLE = frozenset({"keys.cancel", "sae.state"})
MAX_HOPS = 64

Handler = Callable[[PeerMessage], dict[str, Any]]
RouteTo = Callable[[str, int, frozenset[str]], list[str] | None]


class RoutedMessages:
    def __init__(
        self,
        client: PeerClient,
        directory: PeerDirectory,
        identity: KmeIdentity,
        peering: PeeringSection,
        route_to: RouteTo,
        handle: Handler,
    ) -> None:
        self.kme_id = directory.kme_id
        self.client = client
        self.directory = directory
        self.identity = identity
        self.peering = peering
        self.route_to = route_to
        self.handle = handle

    def send(self, target: str, msg_type: str, body: dict[str, Any]) -> dict[str, Any]:
        """Deliver a ``ROUTABLE`` message to ``target``: directly when adjacent, else via the trusted
        nodes. Raises ``PeerError`` when no hop takes it."""
        peer = self.directory.get(target)
        if peer is not None and peer.url and target not in self.client.down_peers():
            return self.client.call(target, msg_type, body).body
        _, raw, header = self.client.sealer.seal(target, msg_type, body)
        envelope = {
            "to": target,
            "hops_left": MAX_HOPS,
            "message": base64.b64encode(raw).decode(),
            "header": header,
        }
        return self._forward(envelope)

    def on_forward(self, message: PeerMessage) -> dict[str, Any]:
        """``relay.forward``: open it if it is for this KME, else pass it one hop on."""
        body = message.body
        try:
            target, hops_left = str(body["to"]), int(body["hops_left"])
            raw, header = base64.b64decode(str(body["message"]), validate=True), str(body["header"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageRejected("a relay.forward names to, hops_left, message and header") from exc
        if target != self.kme_id:
            if hops_left <= 1:
                raise MessageRejected("the forwarded message ran out of hops")
            return self._forward({**body, "hops_left": hops_left - 1}, came_from=message.sender)
        inner = open_message(raw, header, self.directory, self.identity, self.peering.max_clock_skew_seconds)
        if inner.type not in ROUTABLE:
            raise MessageRejected(f"{inner.type} is not carried by relay.forward")
        return {"delivered": True, "reply": self.handle(inner)}

    def _forward(self, envelope: dict[str, Any], came_from: str | None = None) -> dict[str, Any]:
        target = str(envelope["to"])
        avoid = frozenset({came_from}) if came_from else frozenset()
        last = "no hop answered"
        for _ in range(3):
            route = self.route_to(target, 0, avoid)
            if route is None:
                raise MessageRejected(f"no route from {self.kme_id} to {target} for a forwarded message")
            try:
                return self.client.call(route[1], "relay.forward", envelope).body
            except PeerUnavailable as exc:  # the hop is down: try another way round
                avoid = avoid | {route[1]}
                last = exc.reason
            except PeerError as exc:  # the message reached it (or may have): do not send it twice
                raise MessageRejected(f"forwarding to {target} failed at {route[1]}: {exc.reason}") from exc
        raise MessageRejected(f"forwarding to {target} failed: {last}")
