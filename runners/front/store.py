"""Where output images live when a request does not ask for ``sync_mode``.

fal answers with CDN URLs. The queue and the file route only see the ``OutputStore`` protocol, and
``make_store`` picks one of two (FLUX_STORE_URL, docs/storage.md):

* ``DirectoryStore`` (the default, below): a local directory, whose URLs are our own file route,
  ``GET /files/{name}``.
* ``S3Store`` (runners/front/s3_store.py): objects in an S3-compatible bucket, whose URLs are
  presigned GETs (or a public base URL), so any replica's outputs are reachable from anywhere.

``DirectoryStore`` keeps files in one flat directory:

* Names are the only access control (fal's URLs are unauthenticated too), so they are long random
  tokens, and ``open`` refuses anything that does not look like one before touching the disk: a
  client-chosen name can never walk out of the directory.
* A size budget and a time-to-live bound the disk a busy or abandoned server can fill. The
  running total is kept in memory (rebuilt by a scan at start) so ``put`` never lists the
  directory.
* Files are written to a temp file and renamed, so a reader or a crash never sees half an image.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from runners.config import StoreSettings
from runners.protocol.images import SUFFIX_CONTENT_TYPES

SUFFIXES = frozenset(SUFFIX_CONTENT_TYPES)
# token_urlsafe(24) is 32 characters of [A-Za-z0-9_-]; no dot, slash, backslash or NUL can pass.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{32}\.(?:" + "|".join(sorted(SUFFIXES)) + ")")
# Starts with a dot, so it can never match NAME_PATTERN and never be served.
TEMP_PREFIX = ".tmp-"


# runtime_checkable so wiring code and tests can assert a replacement store fits.
@runtime_checkable
class OutputStore(Protocol):
    def put(self, data: bytes, suffix: str) -> str:
        """Keep ``data``; return the new file's name. A bucket that cannot be reached raises
        ``StorageUnavailable`` (that request fails with 503)."""

    def url(self, name: str, base_url: str) -> str:
        """Where a client fetches the file ``put`` named; ``base_url`` is this server's."""

    def open(self, name: str) -> Path | None:
        """The file's path for ``GET /files/{name}``, or None if the name is unknown, expired,
        invalid, or not served by this server."""

    def sweep(self) -> int:
        """Delete expired files; return how many."""


def new_name(suffix: str) -> str:
    """A fresh, unguessable file name (the only access control of an output's URL)."""
    if suffix not in SUFFIXES:
        raise ValueError(f"suffix must be one of {sorted(SUFFIXES)}, not {suffix!r}")
    return f"{secrets.token_urlsafe(24)}.{suffix}"


class DirectoryStore:
    def __init__(self, directory: Path, max_bytes: int, ttl_s: int, clock: Callable[[], float] = time.time):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # name -> (mtime, size): the bookkeeping behind the budget; guarded by _lock.
        self._files: dict[str, tuple[float, int]] = {}
        self._total = 0
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Resolved once, so the containment check in open compares like with like even when the
        # configured path goes through a symlink (e.g. /tmp on macOS).
        self.directory = Path(directory).resolve()
        self._scan()
        # A restart may come with a smaller budget, or after files expired while we were down.
        with self._lock:
            self._evict_over_budget(keep=None)
        self.sweep()

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def _scan(self) -> None:
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue  # symlinks and folders are not ours: never served, never deleted
                if entry.name.startswith(TEMP_PREFIX):
                    # Left by a crash between write and rename: incomplete, nobody has its name.
                    Path(entry.path).unlink(missing_ok=True)
                elif NAME_PATTERN.fullmatch(entry.name):
                    st = entry.stat(follow_symlinks=False)
                    self._files[entry.name] = (st.st_mtime, st.st_size)
                    self._total += st.st_size

    def put(self, data: bytes, suffix: str) -> str:
        name = new_name(suffix)
        size = len(data)
        if size > self.max_bytes:
            # Checked before writing: evicting everything would still not make room.
            raise ValueError(f"output of {size} bytes exceeds the store budget of {self.max_bytes} bytes")
        now = self._clock()
        # The write happens outside the lock: only the bookkeeping below is serialised.
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # The mtime is the store's clock, so expiry after a restart (rebuilt from mtimes)
            # agrees with expiry before it, injected test clocks included.
            os.utime(tmp, (now, now))
            os.replace(tmp, self.directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._files[name] = (now, size)
            self._total += size
            self._evict_over_budget(keep=name)
        return name

    def url(self, name: str, base_url: str) -> str:
        return f"{base_url}files/{name}"

    def _evict_over_budget(self, keep: str | None) -> None:
        # Caller holds _lock. A linear min per eviction: a put usually evicts at most a file or
        # two, and even 10k files take well under a millisecond; cheaper than keeping a heap in
        # sync with deletions from open and sweep.
        while self._total > self.max_bytes:
            candidates = [(mtime, name) for name, (mtime, _) in self._files.items() if name != keep]
            if not candidates:
                return
            self._discard_locked(min(candidates)[1])

    def _discard_locked(self, name: str) -> None:
        entry = self._files.pop(name, None)
        if entry is not None:
            self._total -= entry[1]
        (self.directory / name).unlink(missing_ok=True)

    def open(self, name: str) -> Path | None:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            return None
        path = self.directory / name
        try:
            st = path.lstat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # we never write symlinks: one here points somewhere we did not put
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            return None
        if resolved.parent != self.directory:
            return None
        # mtime from disk, not the index: the file is the truth even if another process wrote it.
        if self._clock() - st.st_mtime > self.ttl_s:
            with self._lock:
                self._discard_locked(name)
            return None
        return resolved

    def sweep(self) -> int:
        cutoff = self._clock() - self.ttl_s
        with self._lock:
            expired = [name for name, (mtime, _) in self._files.items() if mtime < cutoff]
            for name in expired:
                self._discard_locked(name)
        return len(expired)


def make_store(settings: StoreSettings, cache_dir: Path) -> OutputStore:
    """The configured store: a bucket when FLUX_STORE_URL is set, else the local directory."""
    if settings.url:
        from runners.front.s3_store import S3Store

        return S3Store(settings)
    return DirectoryStore(settings.dir or Path(cache_dir) / "outputs", settings.max_bytes, settings.ttl_s)
