"""Where a request's ``loras[i].path`` comes from: a local safetensors file the worker can load.

The HTTP front resolves every LoRA path before the request reaches the model worker (a separate
process on the same disk), so the worker only opens files under directories we control and never
touches the network. Accepted forms (docs/security.md, "Fetching URLs" and "LoRA files"):

- ``https://`` / ``http://`` URLs, fetched through ``SafeFetcher`` (address checks, redirects
  re-checked, byte cap) and stored by content hash as ``<cache_dir>/loras/<sha256>.safetensors``:
  a name from the URL is never trusted, and two URLs of one file share one copy;
- ``owner/repo[/sub/file.safetensors]``: a Hugging Face Hub file, copied into the same cache;
- a relative name under ``FLUX_LORA_DIR``, used in place (symlinks resolved, must stay inside).

The download cache has an LRU disk budget. Its URL -> sha256 index is in memory only: after a
restart a URL is downloaded again, but the file is found by its hash (no second copy), and files
stay until evicted. One instance owns its cache directory and is used from one event loop.
Content is not parsed here (the worker validates safetensors); sizes are capped everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import stat
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from runners.config import LoraSettings
from runners.fetch import FetchFailed, SafeFetcher, UrlRefused, safe_url

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"  # never matches _CACHED: a half-written file is never indexed
_CACHED = re.compile(r"[0-9a-f]{64}\.safetensors")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_SEG = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"  # starts alphanumeric, so never "." or ".."
_HUB = re.compile(rf"(?P<repo>{_SEG}/{_SEG})(?:/(?P<file>(?:{_SEG}/)*{_SEG}\.safetensors))?")
FORMS = "an https URL, a hub name 'owner/repo[/file.safetensors]', or a .safetensors file name under FLUX_LORA_DIR"

HubDownload = Callable[[str, str], str | Path]  # (repo_id, filename) -> local path; blocking
HubList = Callable[[str], list[str]]  # repo_id -> its file names; blocking


class LoraSourceError(Exception):
    """A LoRA path that cannot be used; the message is shown to the user (4xx)."""


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    source: str  # safe to log: local name, hub name, or scheme://host/path of a URL (no query)


def _default_hub_download(max_bytes: int) -> HubDownload:
    def download(repo_id: str, filename: str) -> str:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

        # hf_hub_download has no byte cap: ask the size first (offline, only the local cache is read).
        if not constants.is_offline_mode():
            size = get_hf_file_metadata(hf_hub_url(repo_id, filename)).size
            if size and size > max_bytes:
                raise LoraSourceError(f"{repo_id}/{filename} is {size} bytes, over the limit of {max_bytes} bytes")
        return hf_hub_download(repo_id, filename)

    return download


def _default_hub_list(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo_id)


def _hub_error(name: str, exc: Exception) -> LoraSourceError:
    """A missing repo or file is the user's to fix; anything else means we cannot reach the hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError

    text = re.sub(r"\?\S*", "", (str(exc).splitlines() or [""])[0])[:200]  # may hold URLs: no queries
    log.warning("LoRA %s: hub failed: %s: %s", name, type(exc).__name__, text)
    if isinstance(exc, RepositoryNotFoundError):
        return LoraSourceError(f"hub repository of '{name}' does not exist, or is private or gated")
    if isinstance(exc, RemoteEntryNotFoundError):
        return LoraSourceError(f"hub file '{name}' does not exist")
    offline = constants.is_offline_mode() or isinstance(exc, LocalEntryNotFoundError)
    why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return LoraSourceError(
        f"the model hub is not reachable from this server ({why}); use an https URL or a file in FLUX_LORA_DIR"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LoraSources:
    def __init__(
        self,
        settings: LoraSettings,
        fetcher: SafeFetcher,
        cache_dir: Path,
        hub_download: HubDownload | None = None,
        hub_list: HubList | None = None,
    ):
        self.settings, self.fetcher = settings, fetcher
        self.hub_download = hub_download or _default_hub_download(settings.max_file_bytes)
        self.hub_list = hub_list or _default_hub_list
        self.root = Path(settings.dir).resolve() if settings.dir else None  # resolved once: like with like
        self.stats = {"hits": 0, "misses": 0, "downloads": 0, "download_bytes": 0}
        self._index: dict[str, str] = {}  # "url:<url>" / "hub:<name>" -> sha256; memory only
        self._inflight: dict[str, asyncio.Task] = {}  # single flight: one download per key at a time
        self._local: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256
        self._files: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, least recently used first
        self.cache_bytes = 0
        self.dir = Path(cache_dir) / "loras"
        self.dir.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith(TEMP_PREFIX):  # a download cut short by a crash
                Path(entry.path).unlink(missing_ok=True)
            elif _CACHED.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime_ns, entry.name.removesuffix(SUFFIX), st.st_size))
        for _, sha, size in sorted(found):  # mtimes are the recency that survives restarts
            self._files[sha] = size
            self.cache_bytes += size
        self._evict(keep=None)  # the budget may have shrunk since the last run

    def _path(self, sha: str) -> Path:
        return self.dir / f"{sha}{SUFFIX}"

    async def resolve(self, path: str) -> LoraFile:
        if not isinstance(path, str) or not path:
            raise LoraSourceError(f"empty LoRA path; use {FORMS}")
        scheme = _SCHEME.match(path)
        if scheme and scheme[1].lower() in ("http", "https"):
            return await self._resolve_url(path)
        if scheme:
            raise LoraSourceError(f"scheme {scheme[1].lower()}: is not accepted; use {FORMS}")
        if len(path) > 1024 or any(ord(c) < 32 or ord(c) == 127 for c in path):
            raise LoraSourceError("LoRA path is too long or contains control characters")
        if path.startswith("/") or "\\" in path or ".." in path.split("/"):
            raise LoraSourceError(f"LoRA '{path}': path escapes the LoRA directory; use a relative name inside it")
        hub = _HUB.fullmatch(path)
        if hub and not hub["file"] and path.endswith(SUFFIX):
            hub = None  # 'styles/x.safetensors' names a file, never a repo called 'x.safetensors'
        # A local file of that name wins (lexists: a symlink pointing outside is refused, not skipped).
        if self.root is not None and (not hub or os.path.lexists(self.root / path)):
            return await self._resolve_local(path)
        if hub:
            return await self._resolve_hub(path, hub["repo"], hub["file"])
        raise LoraSourceError(f"LoRA '{path}' is not an accepted form (no FLUX_LORA_DIR is set); use {FORMS}")

    async def _resolve_local(self, name: str) -> LoraFile:
        if not name.endswith(SUFFIX):
            raise LoraSourceError(f"LoRA '{name}': only {SUFFIX} files are accepted")
        try:
            resolved = (self.root / name).resolve(strict=True)  # follows every symlink
            inside = resolved.is_relative_to(self.root)
            st = resolved.stat()
        except (OSError, RuntimeError):  # missing, dangling link, loop, unreadable
            raise LoraSourceError(f"LoRA '{name}' not found in the local LoRA directory") from None
        if not inside:
            raise LoraSourceError(f"LoRA '{name}': path escapes the LoRA directory")
        if not stat.S_ISREG(st.st_mode):
            raise LoraSourceError(f"LoRA '{name}' is not a regular file")
        self._check_size(name, st.st_size, cached=False)
        key = (str(resolved), st.st_size, st.st_mtime_ns)  # a rewritten file has a new mtime: rehashed
        if key not in self._local:
            self._local[key] = await anyio.to_thread.run_sync(_sha256_file, resolved)
        return LoraFile(resolved, self._local[key], name)

    def _check_size(self, shown: str, size: int, cached: bool = True) -> None:
        limit = self.settings.max_file_bytes
        if cached:  # a file over the whole cache budget could never stay in it
            limit = min(limit, self.settings.cache_max_bytes)
        if size > limit:
            raise LoraSourceError(f"LoRA '{shown}' is {size} bytes, over the limit of {limit} bytes")

    async def _resolve_url(self, url: str) -> LoraFile:
        shown = safe_url(url)

        async def produce() -> str:
            try:
                data = await self.fetcher.fetch(url, min(self.settings.max_file_bytes, self.settings.cache_max_bytes))
            except UrlRefused as exc:
                raise LoraSourceError(f"LoRA URL refused: {exc}") from None
            except FetchFailed as exc:
                raise LoraSourceError(f"could not download {shown}: {exc}") from None
            self.stats["downloads"] += 1
            self.stats["download_bytes"] += len(data)
            sha = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
            if not self._touch(sha):  # else these bytes are cached already (another URL, a restart)
                await anyio.to_thread.run_sync(self._write, sha, data)
            return sha

        return await self._cached(f"url:{url}", shown, produce)

    async def _resolve_hub(self, name: str, repo_id: str, filename: str | None) -> LoraFile:
        async def produce() -> str:
            try:
                file = filename or self._pick(repo_id, await anyio.to_thread.run_sync(self.hub_list, repo_id))
                local = Path(await anyio.to_thread.run_sync(self.hub_download, repo_id, file))
                size = local.stat().st_size
            except LoraSourceError:
                raise
            except Exception as exc:  # any failure of the hub client or the network
                error = _hub_error(name, exc)
                if self.root is not None:  # it was looked for there first
                    error.args = (f"{error} (and no file '{name}' is in the local LoRA directory)",)
                raise error from None
            self._check_size(name, size)
            sha = await anyio.to_thread.run_sync(_sha256_file, local)
            if not self._touch(sha):  # a copy, not a link: our eviction leaves the hub's cache intact
                await anyio.to_thread.run_sync(self._write, sha, local)
            return sha

        return await self._cached(f"hub:{name}", name, produce)

    @staticmethod
    def _pick(repo_id: str, files: list[str]) -> str:
        top = sorted(f for f in files if "/" not in f and f.endswith(SUFFIX))
        if len(top) != 1:
            found = (
                f"{len(top)} {SUFFIX} files at its top level ({', '.join(top[:20])})"
                if top
                else f"no {SUFFIX} file at its top level"
            )
            raise LoraSourceError(f"hub repository {repo_id} has {found}; name one as {repo_id}/<file>{SUFFIX}")
        return top[0]

    async def _cached(self, key: str, shown: str, produce: Callable[[], Awaitable[str]]) -> LoraFile:
        """The cached file of ``key``, or the outcome of the one ``produce`` running for it."""
        sha = self._index.get(key)
        if sha is not None and self._touch(sha):
            self.stats["hits"] += 1
            return LoraFile(self._path(sha), sha, shown)
        task = self._inflight.get(key)
        if task is None:
            self.stats["misses"] += 1
            task = self._inflight[key] = asyncio.ensure_future(self._admit(key, produce))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if none wait
        else:
            self.stats["hits"] += 1  # joins the download another request started
        # shield: one impatient client (cancelled) must not cancel the download others wait for.
        sha = await asyncio.shield(task)
        return LoraFile(self._path(sha), sha, shown)

    async def _admit(self, key: str, produce: Callable[[], Awaitable[str]]) -> str:
        try:
            sha = await produce()
        finally:  # done either way: an error is shared with those waiting, never cached
            del self._inflight[key]
        # No await from here on: the LRU knows the file before anything else can evict.
        if sha not in self._files:
            self._files[sha] = size = self._path(sha).stat().st_size
            self.cache_bytes += size
            log.info("LoRA cache: added %s (%d bytes), %d bytes in use", sha[:12], size, self.cache_bytes)
        self._touch(sha)
        self._index[key] = sha
        self._evict(keep=sha)
        return sha

    def _write(self, sha: str, content: bytes | Path) -> None:
        """Temp file then rename: a reader or a crash never sees half a LoRA under its final name."""
        temp = self.dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            temp.write_bytes(content) if isinstance(content, bytes) else shutil.copyfile(content, temp)
            os.replace(temp, self._path(sha))
        finally:
            temp.unlink(missing_ok=True)

    def _touch(self, sha: str) -> bool:
        """Mark ``sha`` most recently used, in memory and as mtime; False if its file is gone."""
        if sha not in self._files:
            return False
        try:
            os.utime(self._path(sha))
        except FileNotFoundError:  # deleted behind our back: forget it, it will be fetched again
            self.cache_bytes -= self._files.pop(sha)
            return False
        self._files.move_to_end(sha)
        return True

    def _evict(self, keep: str | None) -> None:
        """Delete least recently used files until within budget, never ``keep`` (just added).
        Resolving makes a file the most recent, so only a budget of a few LoRAs could evict one
        the worker is about to load; one it has opened survives the unlink (POSIX)."""
        for sha in list(self._files):
            if self.cache_bytes <= self.settings.cache_max_bytes:
                break
            if sha != keep:
                self._path(sha).unlink(missing_ok=True)
                self.cache_bytes -= self._files.pop(sha)
                self._index = {k: v for k, v in self._index.items() if v != sha}
                log.info("LoRA cache: evicted %s, %d bytes in use", sha[:12], self.cache_bytes)
