"""SafeFetcher and HostPolicy against a real local HTTP server (no internet, a few seconds)."""

from __future__ import annotations

import asyncio
import functools
import gzip
import ipaddress
import json
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from runners import fetch as fetch_module
from runners.config import FetchSettings
from runners.fetch import FetchFailed, HostPolicy, SafeFetcher, UrlRefused
from tests.conftest import QuietHTTPServer

IMAGE = bytes(range(256)) * 40  # 10 KiB, every byte value
CAP = 64 * 1024
SETTINGS = FetchSettings(connect_timeout_s=1, read_timeout_s=0.5, total_timeout_s=3, max_redirects=3)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.seen.append(("GET", self.path, self.headers.get("Host"), None))
        parts = urlsplit(self.path)
        path = parts.path
        try:
            if path == "/image.png":
                self._answer(200, IMAGE, {"Content-Type": "image/png"})
            elif path == "/big":
                # Headers announce too much, then silence: a client that read the body would
                # hit its read timeout instead of refusing on Content-Length.
                self.send_response(200)
                self.send_header("Content-Length", str(CAP * 100))
                self.end_headers()
                self.wfile.flush()
                time.sleep(1.5)
            elif path == "/chunked-big":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"x" * 8192
                for _ in range(CAP * 4 // len(chunk)):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/slow":
                time.sleep(2)
                self._answer(200, b"late")
            elif path == "/drip":
                # Each byte comes within the read timeout; only the total limit can stop this.
                self.send_response(200)
                self.send_header("Content-Length", "20")
                self.end_headers()
                for _ in range(20):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif path == "/redirect":
                self._answer(302, headers={"Location": parse_qs(parts.query)["to"][0]})
            elif path == "/loop":
                self._answer(302, headers={"Location": "/loop"})
            elif path == "/gzip-bomb":
                # ~20 KB on the wire inflating to 20 MB, sent although we asked for identity.
                self._answer(200, GZIP_BOMB, {"Content-Encoding": "gzip"})
            else:
                self._answer(404, b"not here")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.startswith("/redirect"):
            return self._answer(302, headers={"Location": "/hook"})
        self.server.seen.append(("POST", self.path, self.headers.get("Host"), json.loads(body)))
        self._answer(200, b"ok")


GZIP_BOMB = gzip.compress(b"\0" * (20 * 1024 * 1024), compresslevel=9)


@pytest.fixture(scope="module")
def server():
    httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def run(coro):
    return asyncio.run(coro)


def fetcher(allow=("127.0.0.1",), resolver=None, settings=SETTINGS) -> SafeFetcher:
    return SafeFetcher(HostPolicy(list(allow)), settings, resolver=resolver)


def ips(*texts: str) -> list:
    return [ipaddress.ip_address(t) for t in texts]


class FakeResolver:
    """Answers from a table, or from a list of answers for successive calls; counts calls."""

    def __init__(self, table: dict[str, list[str]] | None = None, sequence: list[list[str]] | None = None):
        self.table, self.sequence, self.calls = table or {}, sequence or [], []

    async def __call__(self, host: str, port: int):
        self.calls.append((host, port))
        if self.sequence:
            return ips(*self.sequence[min(len(self.calls), len(self.sequence)) - 1])
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return ips(*self.table[host])


# --- allowed fetches ---------------------------------------------------------------------------


def test_allowed_fetch_returns_bytes_and_host_header(server, base):
    assert run(fetcher().fetch(f"{base}/image.png", CAP)) == IMAGE
    assert server.seen[-1][:3] == ("GET", "/image.png", f"127.0.0.1:{server.server_address[1]}")


def test_host_name_is_kept_in_host_header(server):
    port = server.server_address[1]
    resolver = FakeResolver({"files.test": ["127.0.0.1"]})
    assert run(fetcher(resolver=resolver).fetch(f"http://files.test:{port}/image.png", CAP)) == IMAGE
    assert server.seen[-1][2] == f"files.test:{port}"
    assert resolver.calls == [("files.test", port)]


def test_pinning_uses_checked_address_and_sni_for_https():
    resolver = FakeResolver({"files.test": ["::1"]})
    hop = fetcher(allow=["::1"], resolver=resolver)._pin(httpx.URL("https://files.test:8443/a.png?sig=x"))
    pinned, headers, extensions = run(hop)
    assert str(pinned) == "https://[::1]:8443/a.png?sig=x"
    assert headers["Host"] == "files.test:8443"
    assert extensions == {"sni_hostname": "files.test"}


def test_dns_rebinding_uses_the_checked_address(server):
    # First answer is allowed, every later one is private: a second lookup would be refused
    # (or worse, connected to). One hop, one lookup, and the connection used the first answer.
    port = server.server_address[1]
    resolver = FakeResolver(sequence=[["127.0.0.1"], ["10.0.0.1"]])
    assert run(fetcher(resolver=resolver).fetch(f"http://rebind.test:{port}/image.png", CAP)) == IMAGE
    assert len(resolver.calls) == 1
    # A redirect is a new hop: it is resolved again, and this time refused.
    resolver = FakeResolver(sequence=[["127.0.0.1"], ["10.0.0.1"]])
    with pytest.raises(UrlRefused, match="rebind.test resolves to 10.0.0.1, a private address"):
        run(fetcher(resolver=resolver).fetch(f"http://rebind.test:{port}/redirect?to=/image.png", CAP))
    assert len(resolver.calls) == 2


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server whose self-signed certificate names only files.test; records the SNI it sees."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=files.test",
            "-addext",
            "subjectAltName=DNS:files.test",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
    httpd.seen, httpd.sni = [], []
    context.sni_callback = lambda sock, name, ctx: httpd.sni.append(name)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, cert
    httpd.shutdown()
    httpd.server_close()


def test_https_pins_address_but_keeps_name_for_sni_and_certificate(tls_server, monkeypatch):
    httpd, cert = tls_server
    port = httpd.server_address[1]
    resolver = FakeResolver({"files.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    # With the system's CAs the self-signed certificate is refused, but the handshake went to
    # the pinned 127.0.0.1 and named files.test: SNI carries the real host name.
    with pytest.raises(FetchFailed, match=f"could not connect to https://files.test:{port}/image.png"):
        run(fetcher(resolver=resolver).fetch(f"https://files.test:{port}/image.png", CAP))
    assert httpd.sni[-1] == "files.test"
    # Trusting the test certificate: the fetch succeeds although the certificate names no IP,
    # so it was verified against files.test ...
    trusting = functools.partial(httpx.AsyncClient, verify=ssl.create_default_context(cafile=str(cert)))
    monkeypatch.setattr(fetch_module.httpx, "AsyncClient", trusting)
    assert run(fetcher(resolver=resolver).fetch(f"https://files.test:{port}/image.png?sig=x", CAP)) == IMAGE
    assert httpd.seen[-1][1:3] == ("/image.png?sig=x", f"files.test:{port}")
    # ... and verification is not skipped: the same address under another name is refused.
    with pytest.raises(FetchFailed, match="could not connect to https://other.test"):
        run(fetcher(resolver=resolver).fetch(f"https://other.test:{port}/image.png", CAP))
    assert httpd.sni[-1] == "other.test"


# --- policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/image.png", "http://localhost:{port}/image.png"])
def test_default_policy_refuses_local_before_connecting(server, url):
    before = len(server.seen)
    with pytest.raises(UrlRefused, match="loopback address; this server only fetches public addresses"):
        run(fetcher(allow=[]).fetch(url.format(port=server.server_address[1]), CAP))
    assert len(server.seen) == before


REFUSED = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "fe80::1",
    "fc00::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::7f00:1",
    "64:ff9b::a00:1",
    "2002:7f00:1::1",
    "::",
    "240.0.0.1",
    "ff02::1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_policy_refuses_non_public(address):
    with pytest.raises(UrlRefused, match="this server only fetches public addresses"):
        HostPolicy([]).check("some.host", ips(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_policy_accepts_public(address):
    HostPolicy([]).check("some.host", ips(address))


def test_policy_messages_name_the_reason():
    with pytest.raises(UrlRefused, match=r"host example.internal resolves to 10.0.0.5, a private address"):
        HostPolicy([]).check("example.internal", ips("10.0.0.5"))
    with pytest.raises(UrlRefused, match=r"169.254.169.254 is a link-local address"):
        HostPolicy([]).check("169.254.169.254", ips("169.254.169.254"))
    with pytest.raises(UrlRefused, match=r"address ::ffff:a00:1 \(that is 10.0.0.1\) is a private address"):
        HostPolicy([]).check("::ffff:10.0.0.1", ips("::ffff:10.0.0.1"))


def test_policy_refuses_mixed_public_and_private():
    with pytest.raises(UrlRefused, match="192.168.1.1"):
        HostPolicy([]).check("mixed.test", ips("8.8.8.8", "192.168.1.1"))


def test_allow_list_cidr_and_names():
    policy = HostPolicy(["10.0.0.0/8", "My-Dev-Box."])
    policy.check("x.test", ips("10.1.2.3"))
    policy.check("x.test", ips("::ffff:10.1.2.3"))
    with pytest.raises(UrlRefused):
        policy.check("x.test", ips("192.168.1.1"))
    policy.check("my-dev-box", ips("192.168.1.1", "127.0.0.1"))
    policy.check("MY-DEV-BOX.", ips("172.16.0.1"))


@pytest.mark.parametrize("entry", ["not a host/99", "10.0.0.0/33", "http://x", ""])
def test_invalid_allow_list_entry(entry):
    with pytest.raises(ValueError, match="allow_private_hosts"):
        HostPolicy([entry])


# --- redirects ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,reason",
    [
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.1/x", "private"),
        ("file:///etc/passwd", "scheme file"),
    ],
)
def test_redirect_to_private_refused(server, base, target, reason):
    before = len(server.seen)
    with pytest.raises(UrlRefused, match=f"/redirect redirected to .*{reason}"):
        run(fetcher().fetch(f"{base}/redirect?to={target}", CAP))
    assert len(server.seen) == before + 1  # only the first hop reached a server


def test_redirects_followed(server, base):
    assert run(fetcher().fetch(f"{base}/redirect?to={base}/image.png", CAP)) == IMAGE
    assert run(fetcher().fetch(f"{base}/redirect?to=image.png", CAP)) == IMAGE  # relative
    assert server.seen[-1][1] == "/image.png"


def test_too_many_redirects(base):
    chain = f"{base}/image.png"
    for hops in range(1, 5):  # nested redirects; 3 are fine, the 4th is one too many
        chain = str(httpx.URL(f"{base}/redirect", params={"to": chain}))
        if hops == 3:
            assert run(fetcher().fetch(chain, CAP)) == IMAGE
    with pytest.raises(FetchFailed, match="more than 3 redirects"):
        run(fetcher().fetch(chain, CAP))
    with pytest.raises(FetchFailed, match="more than 3 redirects"):
        run(fetcher().fetch(f"{base}/loop", CAP))


# --- schemes and URL shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,message",
    [
        ("file:///etc/passwd", "scheme file"),
        ("ftp://127.0.0.1/x", "scheme ftp"),
        ("gopher://127.0.0.1:70/_x", "scheme gopher"),
        ("data:image/png;base64,AAAA", "scheme data"),
        ("javascript:alert(1)", "scheme javascript"),
        ("/relative/path.png", "scheme"),
        ("http:///no-host.png", "has no host"),
        ("http://user:pass@127.0.0.1/", "credentials"),
    ],
)
def test_refused_urls(server, url, message):
    before = len(server.seen)
    with pytest.raises(UrlRefused, match=message):
        run(fetcher().fetch(url, CAP))
    assert len(server.seen) == before


# --- limits and failures -----------------------------------------------------------------------


def test_content_length_over_cap_refused_before_body(base):
    start = time.monotonic()
    with pytest.raises(FetchFailed, match=f"over the limit of {CAP} bytes"):
        run(fetcher().fetch(f"{base}/big", CAP))
    assert time.monotonic() - start < 0.5  # did not wait for the (never sent) body


def test_streamed_body_over_cap_stops(base):
    with pytest.raises(FetchFailed, match=f"over the limit of {CAP} bytes"):
        run(fetcher().fetch(f"{base}/chunked-big", CAP))
    assert len(run(fetcher().fetch(f"{base}/chunked-big", CAP * 4))) == CAP * 4


def test_compressed_answer_refused_not_inflated(base):
    with pytest.raises(FetchFailed, match="gzip-compressed"):
        run(fetcher().fetch(f"{base}/gzip-bomb", CAP))


def test_read_timeout(base):
    start = time.monotonic()
    with pytest.raises(FetchFailed, match=r"/slow timed out \(ReadTimeout\)"):
        run(fetcher().fetch(f"{base}/slow", CAP))
    assert time.monotonic() - start < 1.2


def test_total_timeout(base):
    settings = FetchSettings(connect_timeout_s=1, read_timeout_s=0.5, total_timeout_s=0.5, max_redirects=3)
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out after 0.5 s"):
        run(fetcher(settings=settings).fetch(f"{base}/drip", CAP))
    assert time.monotonic() - start < 1.2


def test_http_error_status(base):
    with pytest.raises(FetchFailed, match="answered HTTP 404"):
        run(fetcher().fetch(f"{base}/404", CAP))


def test_connection_refused_and_unknown_host():
    with pytest.raises(FetchFailed, match="could not connect to http://127.0.0.1:1/x"):
        run(fetcher().fetch("http://127.0.0.1:1/x", CAP))
    with pytest.raises(FetchFailed, match="could not resolve host nowhere.test"):
        run(fetcher(resolver=FakeResolver()).fetch("http://nowhere.test/x", CAP))


def test_messages_leave_out_query_strings(base):
    with pytest.raises(FetchFailed) as caught:
        run(fetcher().fetch(f"{base}/404?token=secret", CAP))
    assert "secret" not in str(caught.value) and "/404" in str(caught.value)
    with pytest.raises(UrlRefused) as caught:
        run(fetcher().fetch(f"{base}/redirect?to=http://10.0.0.1/x%3Ftoken%3Dsecret&sig=secret", CAP))
    assert "secret" not in str(caught.value)
    with pytest.raises(FetchFailed) as caught:
        run(fetcher().fetch(f"{base}/loop?token=secret", CAP))
    assert "secret" not in str(caught.value)


# --- webhooks ----------------------------------------------------------------------------------


def test_post_json_delivers(server, base):
    payload = {"request_id": "abc", "status": "OK", "payload": {"images": [1, 2]}}
    assert run(fetcher().post_json(f"{base}/hook", payload, timeout_s=2)) == 200
    assert server.seen[-1] == ("POST", "/hook", f"127.0.0.1:{server.server_address[1]}", payload)


def test_post_json_does_not_follow_redirects(server, base):
    assert run(fetcher().post_json(f"{base}/redirect?to=/hook", {"a": 1}, timeout_s=2)) == 302


def test_post_json_refuses_private_host(server, base):
    before = len(server.seen)
    with pytest.raises(UrlRefused, match="loopback"):
        run(fetcher(allow=[]).post_json(f"{base}/hook", {"a": 1}, timeout_s=2))
    assert len(server.seen) == before
