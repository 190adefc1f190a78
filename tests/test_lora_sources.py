"""LoraSources: URLs through SafeFetcher against a local server, the LRU disk cache, local names,
hub names (a fake hub, and the real client in offline mode). No internet, a few seconds."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from runners.config import FetchSettings, LoraSettings
from runners.fetch import HostPolicy, SafeFetcher
from runners.lora.sources import LoraFile, LoraSourceError, LoraSources
from tests.conftest import QuietHTTPServer

MiB = 1024 * 1024
FILES = {f"/{name}.safetensors": bytes([i]) * 400_000 for i, name in enumerate("abc")}  # two fit 1 MiB, three do not
FILES["/small.safetensors"] = b"small lora bytes" * 10
FILES["/big.safetensors"] = b"x" * 5000
FETCH = FetchSettings(connect_timeout_s=1, read_timeout_s=1, total_timeout_s=5)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = urlsplit(self.path).path
        self.server.gets[path] += 1
        if path == "/slow.safetensors":
            time.sleep(0.3)  # long enough for every concurrent resolve to join the one download
        body = FILES.get(path, FILES["/small.safetensors"] if path == "/slow.safetensors" else None)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def server():
    httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
    httpd.gets = Counter()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server) -> str:
    server.gets.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


def sources(cache: Path, allow=("127.0.0.1",), hub_download=None, hub_list=None, **settings) -> LoraSources:
    settings = {"max_file_bytes": 1 * MiB, "cache_max_bytes": 1 * MiB, **settings}
    return LoraSources(
        LoraSettings(**settings),
        SafeFetcher(HostPolicy(list(allow)), FETCH),
        cache,
        hub_download=hub_download,
        hub_list=hub_list,
    )


def run(coro):
    return asyncio.run(coro)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refused(src: LoraSources, path: str, match: str) -> LoraSourceError:
    with pytest.raises(LoraSourceError, match=match) as caught:
        run(src.resolve(path))
    return caught.value


# --- URLs ----------------------------------------------------------------------------------------


def test_url_downloads_once_then_hits(tmp_path, server, base):
    src = sources(tmp_path)
    first = run(src.resolve(f"{base}/small.safetensors?token=secret"))
    data = FILES["/small.safetensors"]
    assert first.sha256 == sha(data) and first.path.read_bytes() == data
    assert first.path == tmp_path / "loras" / f"{sha(data)}.safetensors"
    assert first.source == f"{base}/small.safetensors"  # no query string
    assert run(src.resolve(f"{base}/small.safetensors?token=secret")) == first
    assert server.gets["/small.safetensors"] == 1
    assert src.stats == {"hits": 1, "misses": 1, "downloads": 1, "download_bytes": len(data)}
    first.path.unlink()  # deleted behind its back: downloaded again, not a stale hit
    assert run(src.resolve(f"{base}/small.safetensors?token=secret")).path.read_bytes() == data
    assert server.gets["/small.safetensors"] == 2


def test_concurrent_resolves_share_one_download(tmp_path, server, base):
    src = sources(tmp_path)

    async def many():
        return await asyncio.gather(*(src.resolve(f"{base}/slow.safetensors") for _ in range(10)))

    results = run(many())
    assert server.gets["/slow.safetensors"] == 1
    assert len(set(results)) == 1 and isinstance(results[0], LoraFile)
    assert src.stats["downloads"] == 1 and src.stats["misses"] == 1


def test_cancelled_waiter_does_not_cancel_the_download(tmp_path, server, base):
    src = sources(tmp_path)

    async def one_gives_up():
        impatient = asyncio.ensure_future(src.resolve(f"{base}/slow.safetensors"))
        patient = asyncio.ensure_future(src.resolve(f"{base}/slow.safetensors"))
        await asyncio.sleep(0.05)
        impatient.cancel()
        return await patient

    assert run(one_gives_up()).path.read_bytes() == FILES["/small.safetensors"]
    assert server.gets["/slow.safetensors"] == 1


def test_failed_download_shared_by_waiters_and_not_cached(tmp_path, server, base):
    src = sources(tmp_path)

    async def many():
        return await asyncio.gather(
            *(src.resolve(f"{base}/missing.safetensors?sig=secret") for _ in range(5)), return_exceptions=True
        )

    errors = run(many())
    assert all(isinstance(e, LoraSourceError) for e in errors)
    assert "HTTP 404" in str(errors[0]) and all("secret" not in str(e) for e in errors)
    assert server.gets["/missing.safetensors"] == 1
    refused(src, f"{base}/missing.safetensors?sig=secret", "could not download .*HTTP 404")
    assert server.gets["/missing.safetensors"] == 2  # tried again


def test_private_host_refused_by_default_policy(tmp_path, server, base):
    error = refused(
        sources(tmp_path, allow=()), f"{base}/small.safetensors?token=secret", "LoRA URL refused: .*loopback"
    )
    assert "secret" not in str(error) and server.gets["/small.safetensors"] == 0


def test_url_over_max_file_bytes_refused(tmp_path, base):
    src = sources(tmp_path, max_file_bytes=4096)
    error = refused(src, f"{base}/big.safetensors?token=secret", "over the limit of 4096 bytes")
    assert "secret" not in str(error)
    assert not list((tmp_path / "loras").iterdir())


# --- the disk cache ------------------------------------------------------------------------------


def test_lru_eviction_and_restart(tmp_path, base):
    src = sources(tmp_path)  # 1 MiB budget: two 400 kB files fit, three do not
    a = run(src.resolve(f"{base}/a.safetensors"))
    b = run(src.resolve(f"{base}/b.safetensors"))
    run(src.resolve(f"{base}/a.safetensors"))  # A is now more recent than B
    c = run(src.resolve(f"{base}/c.safetensors"))
    assert a.path.exists() and c.path.exists() and not b.path.exists()
    assert src.cache_bytes == 800_000
    (tmp_path / "loras" / ".tmp-leftover").write_bytes(b"half a download")

    again = sources(tmp_path)
    assert again.cache_bytes == 800_000 and set(again._files) == {a.sha256, c.sha256}
    assert not (tmp_path / "loras" / ".tmp-leftover").exists()
    # The URL index is not persisted: a URL is fetched again, but its file is not stored twice.
    assert run(again.resolve(f"{base}/a.safetensors")) == a
    assert again.cache_bytes == 800_000 and again.stats["downloads"] == 1
    # Recency survives the restart through mtimes: A was used last, so C goes first now.
    run(again.resolve(f"{base}/b.safetensors"))
    assert a.path.exists() and b.path.exists() and not c.path.exists()


def test_file_over_cache_budget_refused(tmp_path, base):
    src = sources(tmp_path, max_file_bytes=2 * MiB, cache_max_bytes=MiB)
    FILES["/huge.safetensors"] = b"h" * (MiB + 1)
    try:
        refused(src, f"{base}/huge.safetensors", "over the limit")
    finally:
        del FILES["/huge.safetensors"]


# --- local names ---------------------------------------------------------------------------------


@pytest.fixture
def lora_dir(tmp_path) -> Path:
    root = tmp_path / "loras-local"
    (root / "styles").mkdir(parents=True)
    (root / "styles" / "x.safetensors").write_bytes(b"local lora")
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    (root / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (root / "inner.safetensors").symlink_to(root / "styles" / "x.safetensors")
    return root


def test_local_name_resolves(tmp_path, lora_dir):
    src = sources(tmp_path / "cache", dir=lora_dir)
    found = run(src.resolve("styles/x.safetensors"))
    assert found == LoraFile(lora_dir.resolve() / "styles/x.safetensors", sha(b"local lora"), "styles/x.safetensors")
    assert run(src.resolve("inner.safetensors")).sha256 == found.sha256  # a symlink that stays inside
    (lora_dir / "styles" / "x.safetensors").write_bytes(b"changed lora!")  # new size and mtime: rehashed
    assert run(src.resolve("styles/x.safetensors")).sha256 == sha(b"changed lora!")


@pytest.mark.parametrize(
    "name,match",
    [
        ("../x.safetensors", "escapes the LoRA directory"),
        ("/etc/passwd", "escapes the LoRA directory"),
        ("a/../../x.safetensors", "escapes the LoRA directory"),
        ("sub\\x.safetensors", "escapes the LoRA directory"),
        ("x\0.safetensors", "control characters"),
        ("link.safetensors", "escapes the LoRA directory"),
        ("styles/missing.safetensors", "LoRA 'styles/missing.safetensors' not found in the local LoRA directory"),
        ("styles", "only .safetensors files"),
    ],
)
def test_local_names_refused(tmp_path, lora_dir, name, match):
    refused(sources(tmp_path / "cache", dir=lora_dir), name, match)


def test_local_names_need_a_lora_dir(tmp_path):
    refused(sources(tmp_path), "x.safetensors", "no FLUX_LORA_DIR is set")
    refused(sources(tmp_path), "my lora", "not an accepted form")


def test_local_file_over_max_file_bytes(tmp_path, lora_dir):
    (lora_dir / "big.safetensors").write_bytes(b"b" * 2048)
    refused(sources(tmp_path / "cache", dir=lora_dir, max_file_bytes=1024), "big.safetensors", "over the limit of 1024")


# --- hub names -----------------------------------------------------------------------------------


def test_hub_name_with_fake_download(tmp_path):
    blob = tmp_path / "hub-blob"
    blob.write_bytes(b"hub lora")
    calls = []

    def download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(blob)

    src = sources(
        tmp_path / "cache",
        hub_download=download,
        hub_list=lambda repo: ["README.md", "lora.safetensors", "sub/other.safetensors"],
    )
    found = run(src.resolve("owner/repo/sub/file.safetensors"))
    assert found.sha256 == sha(b"hub lora") and found.source == "owner/repo/sub/file.safetensors"
    assert found.path.parent == tmp_path / "cache" / "loras" and found.path.read_bytes() == b"hub lora"
    assert run(src.resolve("owner/repo")).sha256 == found.sha256  # the one top-level file
    assert run(src.resolve("owner/repo")) == LoraFile(found.path, found.sha256, "owner/repo")  # a hit
    assert calls == [("owner/repo", "sub/file.safetensors"), ("owner/repo", "lora.safetensors")]


def test_local_file_wins_over_hub(tmp_path, lora_dir):
    (lora_dir / "owner" / "repo").mkdir(parents=True)
    (lora_dir / "owner" / "repo" / "f.safetensors").write_bytes(b"local one")
    src = sources(tmp_path / "cache", dir=lora_dir, hub_download=lambda *a: pytest.fail("hub used"))
    assert run(src.resolve("owner/repo/f.safetensors")).sha256 == sha(b"local one")


def test_hub_repo_with_several_files(tmp_path):
    src = sources(
        tmp_path,
        hub_download=lambda *a: pytest.fail("nothing to download"),
        hub_list=lambda repo: ["a.safetensors", "b.safetensors", "x/c.safetensors"],
    )
    refused(src, "owner/repo", r"2 .safetensors files at its top level \(a.safetensors, b.safetensors\)")
    src.hub_list = lambda repo: ["README.md"]
    refused(src, "owner/repo", "no .safetensors file")


def test_hub_failure_is_not_reachable(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest turns it on for the suite

    def broken(repo_id, filename):
        raise ConnectionError("no route to host")

    refused(
        sources(tmp_path, hub_download=broken),
        "owner/repo/f.safetensors",
        r"model hub is not reachable from this server \(ConnectionError: no route to host\)",
    )


@pytest.mark.parametrize("name", ["owner/repo/f.safetensors", "owner/repo"])
def test_real_hub_client_offline(tmp_path, monkeypatch, name):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import; make sure
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    lookups = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: lookups.append(a[0]) or real(*a, **k))
    start = time.monotonic()
    refused(sources(tmp_path / "cache"), name, r"model hub is not reachable from this server \(HF_HUB_OFFLINE is set\)")
    assert time.monotonic() - start < 5 and lookups == []


# --- malformed paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,match",
    [
        ("", "empty LoRA path"),
        ("ftp://x", "scheme ftp: is not accepted"),
        ("file:///etc/passwd", "scheme file: is not accepted"),
        ("javascript:x", "scheme javascript: is not accepted"),
        ("FILE:/etc/passwd", "scheme file: is not accepted"),
    ],
)
def test_malformed_paths(tmp_path, path, match):
    refused(sources(tmp_path, dir=tmp_path), path, match)
