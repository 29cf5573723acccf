"""Fetching media a job names by URL, without becoming a proxy into the worker's network (SSRF).

A job's MEDIA may be ``{"url": ...}``. Whoever can submit a job chooses that URL, so by default a
worker fetches only ``https`` URLs on public addresses. The host is resolved once, every address it
resolves to is checked, and the connection goes to the checked address (with the original name for
``Host`` and TLS), so a DNS answer that changes between check and connect cannot reach an internal
host. Redirects are followed by hand, each hop checked the same way; size and time are capped, and a
job may fetch only so many URLs. Every failure that involved the network reads the same, so the
error text cannot be used to scan ports; the real reason goes to the worker's log.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from broker.errors import InvalidRequest

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: the one message for every fetch that failed on the network (see the module docstring)
UNREACHABLE = "could not fetch the URL"

Resolver = Callable[[str, int], list[str]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FetchPolicy:
    """What a worker may fetch. ``worker.*`` settings build one (``BROKER_WORKER__ALLOW_PRIVATE_URLS``)."""

    #: plain http as well as https
    allow_http: bool = False
    #: loopback, private, link-local and other non-public addresses (a worker on a private network)
    allow_private: bool = False
    max_bytes: int = 50 * MiB
    #: wall-clock seconds one fetch may take, redirects included
    timeout_s: float = 30.0
    max_redirects: int = 3
    #: URLs one job may name (context segments + audio + avatar); checked before the first fetch
    max_fetches: int = 18
    #: host names (lower case) fetched whatever they resolve to: the operator named them
    allow_hosts: frozenset[str] = frozenset()
    #: non-public networks that may be fetched from, each hop checked (narrower than allow_private)
    allow_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, cfg: Any, *, max_bytes: int | None = None) -> FetchPolicy:
        """The policy a ``MediaFetchSettings`` section describes (``[worker]``, ``[gateway.fetch]``)."""
        return cls(allow_http=cfg.allow_http_urls, allow_private=cfg.allow_private_urls,
                   max_bytes=min(cfg.fetch_max_bytes, max_bytes or cfg.fetch_max_bytes),
                   timeout_s=cfg.fetch_timeout_s, allow_hosts=frozenset(h.lower() for h in cfg.allow_hosts),
                   allow_networks=_networks(cfg.allow_networks))

    def allows(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.allow_private or _public(address) or host.lower() in self.allow_hosts:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.allow_networks)


def _networks(values: Iterable[Any]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(str(v), strict=False) for v in values)


class _Refused(Exception):
    """A fetch that must not or could not happen; the text is for the log only."""


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class MediaFetcher:
    """``fetch(url) -> bytes`` for one job (``broker.wire.decode_media`` calls it); counts the job's fetches."""

    def __init__(self, policy: FetchPolicy | None = None, *, resolver: Resolver | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.policy = policy or FetchPolicy()
        self._resolve = resolver or _system_resolver
        self._transport = transport
        self.fetches = 0

    def __call__(self, url: str) -> bytes:
        self.fetches += 1
        if self.fetches > self.policy.max_fetches:
            raise InvalidRequest("url", f"a job may name at most {self.policy.max_fetches} URLs")
        self._check_scheme(url)
        try:
            return self._fetch(url)
        except _Refused as exc:
            log.info("refused to fetch %s: %s", _for_log(url), exc)
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.info("could not fetch %s: %s", _for_log(url), type(exc).__name__)
        raise InvalidRequest("url", UNREACHABLE)

    def _check_scheme(self, url: str) -> None:
        """What the URL says by itself (no network involved): these errors may be specific."""
        parts = urlsplit(url)
        allowed = ("https", "http") if self.policy.allow_http else ("https",)
        if parts.scheme not in allowed:
            raise InvalidRequest("url", f"must be {' or '.join(allowed)} (this worker fetches no other URLs)")
        if parts.username is not None or parts.password is not None:
            raise InvalidRequest("url", "must not carry credentials")
        if not parts.hostname:
            raise InvalidRequest("url", "has no host")

    def _fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.policy.timeout_s
        with httpx.Client(transport=self._transport, follow_redirects=False, trust_env=False) as client:
            for hop in range(self.policy.max_redirects + 1):
                if hop:
                    try:
                        self._check_scheme(url)  # a redirect is checked like the URL the job named
                    except InvalidRequest as exc:
                        raise _Refused(f"redirect to {exc.reason}") from None
                request = self._pinned_request(client, url, deadline)
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise _Refused(f"HTTP {response.status_code}")
                    return self._read(response, deadline)
                finally:
                    response.close()
        raise _Refused("too many redirects")

    def _pinned_request(self, client: httpx.Client, url: str, deadline: float) -> httpx.Request:
        """A request to the address we checked, carrying the original host name for Host and TLS."""
        target = httpx.URL(url)
        host = target.host
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in self._resolve(host, port)]
            except OSError as exc:
                raise _Refused(f"DNS: {exc}") from None
        if not addresses:
            raise _Refused("DNS: no address")
        for address in addresses:  # every answer, not just the one we connect to
            if not self.policy.allows(host, address):
                raise _Refused(f"{host} resolves to the non-public address {address}")
        pinned = target.copy_with(host=str(addresses[0]))
        remaining = max(0.1, deadline - time.monotonic())
        headers = {"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"}
        extensions: dict[str, object] = {"timeout": httpx.Timeout(remaining).as_dict()}
        if target.scheme == "https":
            extensions["sni_hostname"] = host
        return client.build_request("GET", pinned, headers=headers, extensions=extensions)

    def _read(self, response: httpx.Response, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise _Refused(f"declares {declared} bytes")
        data = bytearray()
        for part in response.iter_raw():
            data += part
            if len(data) > self.policy.max_bytes:
                raise _Refused("over the size limit")
            if time.monotonic() > deadline:
                raise _Refused("over the time limit")
        return bytes(data)


def _for_log(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path[:80]}"
