"""Who the client is: its address behind trusted proxies, and its hashed identity.

The client's IP is the direct peer, or, when that peer is one of
``security.trusted_proxies``, the rightmost address of ``X-Forwarded-For`` that is
not a trusted proxy (everything left of it was written by the client and proves
nothing): :class:`TrustedProxies`.

The client's identity, which the rate limiter and the idempotency keys are scoped
by, is its API key, else its ``X-User-ID``, else its IP address. ``X-User-ID`` is
the client's own claim: it counts only while no API keys are configured (with keys,
a request without a valid key is limited by its IP). Identities are hashed
(:func:`digest_id`), so that neither a key's digest nor a user id is kept in the
bucket table or the store. The guard (:mod:`._guard`) stores the outcome of one
request in ``g.client``, a :class:`Client`; :func:`client_of` and
:func:`alias_scope` read it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from quart import g, request

from ..errors import ConfigError

__all__ = ["Client", "TrustedProxies", "alias_scope", "client_of", "digest_id"]

_IdentityKind = Literal["key", "user", "ip"]
_IDENTITY_SALT = b"xintu-client\0"


def digest_id(kind: _IdentityKind, value: bytes) -> str:
    """``kind:`` and 40 hex of a salted SHA-256: fits the store's 64-character scope."""
    digest = hashlib.sha256(_IDENTITY_SALT + value).hexdigest()
    return f"{kind}:{digest[:40]}"


@dataclass(frozen=True, slots=True)
class Client:
    """The client of one request, as far as the guard could tell.

    ``key_id`` names the matching API key without revealing it (a hash of its
    digest); ``identity`` is the hashed key the rate limiter and idempotency keys
    are scoped by.
    """

    ip: str
    identity: str
    key_id: str | None = None
    admin: bool = False


def client_of(user_id: str | None = None) -> Client:
    """``g.client`` as set by the guard; without a guard, one built from the request."""
    client = g.get("client")
    if isinstance(client, Client):
        return client
    ip = request.remote_addr or "unknown"
    uid = user_id if user_id is not None else request.headers.get("X-User-ID")
    if uid:
        return Client(ip=ip, identity=digest_id("user", uid.encode("latin-1", "replace")))
    return Client(ip=ip, identity=digest_id("ip", ip.encode()))


def alias_scope(user_id: str | None = None, client: Client | None = None) -> str:
    """The scope a client's aliases live in (DESIGN §2, client-named photos): its API
    key when keys are configured, else its user id (*user_id*, from the header or the
    body), else its address; hashed like every identity. *client* is the guard's
    outcome for the request, ``g.client`` unless given."""
    if client is None:
        client = client_of(user_id)
    if client.key_id is not None:
        return client.identity
    if user_id:
        return digest_id("user", user_id.encode("utf-8", "replace"))
    return client.identity


# Bound on TrustedProxies' memo of peer addresses.
_PEER_MEMO = 4096

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_address(text: str) -> _Address | None:
    """An address from a peer or ``X-Forwarded-For`` entry (ports and brackets allowed)."""
    value = text.strip().strip('"')
    if value.startswith("["):  # [v6]:port
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # v4:port
        value = value.partition(":")[0]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The configured proxies; :meth:`client_ip` applies them to one request."""

    def __init__(self, entries: Iterable[str]) -> None:
        networks: list[_Network] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    "security.trusted_proxies", f"not an IP address or network: {entry!r}"
                ) from None
        self._networks = tuple(networks)
        # peer -> its address as text, when no proxy is configured (the same few
        # peers again and again; cleared when it reaches _PEER_MEMO entries).
        self._peers: dict[str, str] = {}

    def __bool__(self) -> bool:
        """Whether any proxy is configured (``X-Forwarded-For`` is read only then)."""
        return bool(self._networks)

    def trusted(self, addr: _Address) -> bool:
        return any(addr in net for net in self._networks)

    def client_ip(self, peer: str | None, forwarded_for: Sequence[str]) -> str:
        """The client's address: *peer*, unless *peer* is a trusted proxy; then the
        rightmost ``X-Forwarded-For`` hop that is not one (the leftmost if all are).
        A malformed hop stops the walk at the last good address."""
        if not self._networks and peer:
            known = self._peers.get(peer)
            if known is None:
                addr = _parse_address(peer)
                known = peer if addr is None else str(addr)
                if len(self._peers) >= _PEER_MEMO:
                    self._peers.clear()
                self._peers[peer] = known
            return known
        peer_addr = _parse_address(peer or "")
        if peer_addr is None:
            return peer or "unknown"
        if not self._networks or not self.trusted(peer_addr):
            return str(peer_addr)
        hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
        current = peer_addr
        for hop in reversed(hops):
            addr = _parse_address(hop)
            if addr is None:
                break
            current = addr
            if not self.trusted(addr):
                break
        return str(current)
