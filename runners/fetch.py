"""The one way this server reaches out to a URL a user gave it: image URLs, LoRA files, webhooks.

A URL from a request is an SSRF vector (BentoML CVE-2025-54381, TorchServe "ShellTorch", vLLM
CVE-2025-6242): it can point at cloud metadata (169.254.169.254), at localhost admin ports, or at
a public host that redirects or re-resolves to either. So every hop is checked the same way
(docs/security.md, "Fetching URLs"):

- http/https only, a host, no ``user:pass@``;
- the host is resolved once and *every* address must be public (or explicitly allowed);
- the connection goes to the checked address itself, never to a second DNS answer (rebinding);
- redirects are followed by hand, a few at most, each hop re-checked;
- time limits per connect/read and for the whole fetch, and a byte cap while streaming.

Messages never carry query strings (signed URLs put their tokens there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable

import anyio
import httpx

from runners.config import FetchSettings, Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_REDIRECTS = {301, 302, 303, 307, 308}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_][a-z0-9_-]{0,62})*$")


class UrlRefused(Exception):
    """The policy refuses this URL (scheme, host or address); the user must change the URL."""


class FetchFailed(Exception):
    """The URL was allowed but fetching it failed (network, timeout, HTTP status, size)."""


def _normalise(addr: IPAddress) -> IPAddress:
    """The IPv4 address hidden in an IPv6 one, so ``::ffff:127.0.0.1`` is judged as 127.0.0.1."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr in _NAT64:
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if addr.sixtofour is not None:
            return addr.sixtofour
    return addr


def _kind(addr: IPAddress) -> str:
    """Why an address is not public, in words a user understands."""
    if addr in _CGNAT:  # is_private does not cover 100.64/10, but is_global excludes it
        return "a carrier-grade NAT address"
    for attr, words in (
        ("unspecified", "an unspecified"),
        ("loopback", "a loopback"),
        ("link_local", "a link-local"),
        ("multicast", "a multicast"),
        ("private", "a private"),
        ("reserved", "a reserved"),
    ):
        if getattr(addr, f"is_{attr}"):
            return f"{words} address"
    return "not a globally routable address"


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def safe_url(url: httpx.URL | str) -> str:
    """scheme://host[:port]/path of a URL: enough to recognise it, without tokens in the query."""
    try:
        u = httpx.URL(url) if isinstance(url, str) else url
        return f"{u.scheme}://{u.netloc.decode('ascii', 'replace')}{u.path}"
    except Exception:
        return "<invalid URL>"


class HostPolicy:
    """Which hosts may be fetched: public addresses, plus an explicit allow-list for development."""

    def __init__(self, allow_private_hosts: list[str]):
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.names: set[str] = set()
        for entry in allow_private_hosts:
            text = entry.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
            try:
                self.networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            if not _HOSTNAME.match(text):
                raise ValueError(f"allow_private_hosts: {entry!r} is neither a host name, an IP address nor a CIDR")
            self.names.add(text)

    def check(self, host: str, addresses: list[IPAddress]) -> None:
        """Raise UrlRefused unless every address of ``host`` may be reached.

        Every address, not any: a host answering one public and one private address would let
        the connection land on the private one."""
        if not addresses:
            raise UrlRefused(f"host {host} resolves to no address")
        if host.lower().rstrip(".") in self.names:
            return
        for addr in addresses:
            plain = _normalise(addr)
            if any(a in net for net in self.networks for a in (addr, plain)):
                continue
            if plain.is_global and not plain.is_multicast:
                continue
            shown = str(addr) if plain == addr else f"{addr} (that is {plain})"
            subject = f"address {shown} is" if _parse_ip(host) == addr else f"host {host} resolves to {shown},"
            raise UrlRefused(
                f"{subject} {_kind(plain)}; this server only fetches public addresses "
                "(FLUX_ALLOW_PRIVATE_HOSTS opens private ones for development)"
            )


async def _system_resolve(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # dict keeps the first-seen order while dropping the duplicates getaddrinfo returns per protocol.
    found = {ipaddress.ip_address(str(info[4][0]).split("%")[0]): None for info in infos}
    return list(found)


class SafeFetcher:
    """Fetches bytes from (and posts JSON to) user-given URLs under a HostPolicy."""

    def __init__(self, policy: HostPolicy, settings: FetchSettings, resolver: Resolver | None = None):
        self.policy = policy
        self.settings = settings
        self.resolver = resolver or _system_resolve

    @classmethod
    def for_settings(cls, settings: Settings) -> SafeFetcher:
        """The fetcher a process's settings describe: ``FLUX_ALLOW_PRIVATE_HOSTS`` and ``FLUX_FETCH_*``."""
        return cls(HostPolicy(settings.server.allow_private_hosts), settings.fetch)

    async def _pin(self, url: httpx.URL) -> tuple[httpx.URL, dict[str, str], dict]:
        """Check one hop and return (URL aimed at the checked IP, headers, request extensions)."""
        if url.scheme not in ("http", "https"):
            raise UrlRefused(f"scheme {url.scheme or '(none)'}: is not allowed; use an http or https URL")
        if url.userinfo:
            raise UrlRefused("URLs with credentials (user:password@) are not allowed")
        host = url.raw_host.decode("ascii")  # IDNA-encoded: what DNS, SNI and certificates use
        if not host:
            raise UrlRefused(f"{safe_url(url)} has no host")
        port = url.port or (443 if url.scheme == "https" else 80)
        literal = _parse_ip(host)  # a literal address needs no lookup
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = await self.resolver(host, port)
            except OSError as exc:
                raise FetchFailed(f"could not resolve host {host}: {exc.strerror or exc}") from None
            if not addresses:
                raise FetchFailed(f"could not resolve host {host}: no address")
        self.policy.check(host, addresses)
        # Connect to the address we checked, not to whatever a second lookup would answer. The
        # Host header keeps virtual hosting working; for https, httpcore uses the request
        # extension "sni_hostname" as server_hostname in start_tls, so SNI and certificate
        # verification are still done against the real name.
        pinned = url.copy_with(host=str(addresses[0]))
        headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"}
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        return pinned, headers, extensions

    async def check(self, url: str) -> None:
        """Raise ``UrlRefused`` now for a URL the policy would refuse later (e.g. a webhook, which is
        only called once the work is done). A host that does not resolve yet is not refused here."""
        with contextlib.suppress(FetchFailed):
            await self._pin(_parse(url))

    def _client(self) -> httpx.AsyncClient:
        # trust_env=False: an HTTP(S)_PROXY from the environment would otherwise carry the
        # request past our pinning. One client per hop: a pooled connection made for one
        # host name (TLS with its SNI) must never be reused for another name on the same IP.
        s = self.settings
        timeout = httpx.Timeout(
            connect=s.connect_timeout_s, read=s.read_timeout_s, write=s.read_timeout_s, pool=s.connect_timeout_s
        )
        return httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout)

    async def fetch(self, url: str, max_bytes: int) -> bytes:
        """GET ``url`` following checked redirects; the body, at most ``max_bytes`` long."""
        current = _parse(url)
        with _failures(url, self.settings.total_timeout_s):
            for hop in range(self.settings.max_redirects + 1):
                try:
                    pinned, headers, extensions = await self._pin(current)
                except UrlRefused as exc:
                    if not hop:
                        raise
                    # Say it was a redirect: the URL the user gave looked fine to them.
                    raise UrlRefused(f"{safe_url(url)} redirected to {safe_url(current)}: {exc}") from None
                async with self._client() as client:
                    request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
                    async with _send(client, request, current) as response:
                        if response.status_code not in _REDIRECTS:
                            return await _read(response, current, max_bytes)
                        location = response.headers.get("location")
                        if not location:
                            raise FetchFailed(f"{safe_url(current)} redirected without a Location")
                        # Relative to the URL the user sees (named host), not the pinned one.
                        current = _parse(str(current.join(location)))
            raise FetchFailed(f"{safe_url(url)}: more than {self.settings.max_redirects} redirects")

    async def post_json(self, url: str, payload: dict, timeout_s: float) -> int:
        """POST ``payload`` as JSON (webhooks); the HTTP status. Redirects are not followed: a
        webhook receiver has no reason to redirect, and a POST should not wander."""
        target = _parse(url)
        with _failures(url, timeout_s):
            pinned, headers, extensions = await self._pin(target)
            async with self._client() as client:
                request = client.build_request("POST", pinned, json=payload, headers=headers, extensions=extensions)
                async with _send(client, request, target) as response:
                    return response.status_code  # the receiver's body is of no interest: not read


@contextlib.contextmanager
def _failures(url: str, seconds: float):
    """Bound everything inside by ``seconds`` and turn httpx's errors into FetchFailed."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise FetchFailed(f"{safe_url(url)} timed out after {seconds:g} s") from None
    except httpx.TimeoutException as exc:  # ConnectTimeout, ReadTimeout, ...: the phase that stalled
        raise FetchFailed(f"{safe_url(url)} timed out ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:  # e.g. a broken response; its text may hold the pinned URL
        raise FetchFailed(f"could not fetch {safe_url(url)}: {type(exc).__name__}") from None


def _parse(url: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise UrlRefused("not a valid URL") from None


@contextlib.asynccontextmanager
async def _send(client: httpx.AsyncClient, request: httpx.Request, shown: httpx.URL):
    """The streamed response (headers only so far), closed on exit."""
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException:
        raise
    except httpx.TransportError as exc:
        # Name the URL the user gave, not the pinned one; the transport's words (errno) help.
        raise FetchFailed(f"could not connect to {safe_url(shown)}: {exc or type(exc).__name__}") from None
    try:
        yield response
    finally:
        await response.aclose()


async def _read(response: httpx.Response, shown: httpx.URL, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise FetchFailed(f"{safe_url(shown)} answered HTTP {response.status_code}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchFailed(f"{safe_url(shown)} is {int(declared)} bytes, over the limit of {max_bytes} bytes")
    # We asked for identity encoding: a compressed answer could inflate one chunk far past the cap
    # before we count it (a zip bomb), so it is refused rather than decoded.
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchFailed(f"{safe_url(shown)} answered with {encoding}-compressed content; send it uncompressed")
    # Count while streaming: Content-Length may be absent or wrong.
    chunks, total = [], 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > max_bytes:
            raise FetchFailed(f"{safe_url(shown)} is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
