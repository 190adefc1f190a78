"""The output store: round trips, hostile names, the size budget, expiry, restarts, threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from runners.config import StoreSettings
from runners.front.store import NAME_PATTERN, TEMP_PREFIX, DirectoryStore, OutputStore, make_store


class FakeClock:
    """Advances by ``step`` on every call, so successive puts get distinct, ordered mtimes."""

    def __init__(self, start: float = 1_700_000_000.0, step: float = 1.0):
        self.now = start
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and not p.is_symlink())


def test_round_trip(tmp_path):
    store = DirectoryStore(tmp_path / "a" / "b", max_bytes=10**6, ttl_s=3600)
    assert isinstance(store, OutputStore)
    for suffix in ("jpg", "png"):
        data = os.urandom(100)
        name = store.put(data, suffix)
        assert name.endswith("." + suffix)
        path = store.open(name)
        assert path is not None and path.read_bytes() == data
        assert store.url(name, "http://host:3000/") == f"http://host:3000/files/{name}"  # the file route


def test_names_unique_and_unguessable(tmp_path):
    store = DirectoryStore(tmp_path, max_bytes=10**6, ttl_s=3600)
    names = {store.put(b"x", "png") for _ in range(1000)}
    assert len(names) == 1000
    for name in names:
        assert NAME_PATTERN.fullmatch(name)
        assert len(name.split(".")[0]) == 32  # 24 random bytes: 192 bits


@pytest.mark.parametrize("suffix", ["exe", "", "PNG", "png/../x", ".png", "jpeg"])
def test_bad_suffix(tmp_path, suffix):
    store = DirectoryStore(tmp_path, max_bytes=10**6, ttl_s=3600)
    with pytest.raises(ValueError):
        store.put(b"x", suffix)
    assert list(tmp_path.iterdir()) == []


def test_hostile_names(tmp_path):
    store_dir = tmp_path / "store"
    store = DirectoryStore(store_dir, max_bytes=10**6, ttl_s=3600)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    (store_dir / "sub").mkdir()
    valid = store.put(b"ok", "png")
    token = valid.split(".")[0]
    (store_dir / f"{token[:-1]}Z.exe").write_bytes(b"exe")
    link = f"{'L' * 32}.png"
    (store_dir / link).symlink_to(outside)
    (store_dir / f"{'D' * 32}.png").mkdir()  # a folder with a valid-looking name

    for name in [
        "../secret.png",
        "../x.png",
        "a/b.png",
        f"sub/{valid}",
        str(outside),
        str(store_dir / valid),  # absolute, even inside the directory
        f"{token[:-1]}Z.exe",
        "x.exe",
        f"{token}.png\x00",
        f"{token[:16]}\x00{token[16:]}.png",
        f"{token[:-1]}\\.png",
        link,  # symlink to a file outside
        f"{'D' * 32}.png",
        f"{'N' * 32}.png",  # never written
        "",
        ".",
        "..",
        f"{TEMP_PREFIX}abc",
    ]:
        assert store.open(name) is None, name
    assert store.open(valid) is not None
    assert outside.read_bytes() == b"secret"

    # The symlink is neither served nor counted (nor deleted) by a store started over it.
    again = DirectoryStore(store_dir, max_bytes=10**6, ttl_s=3600)
    assert again.open(link) is None
    assert again.total_bytes == 2
    assert (store_dir / link).is_symlink()


def test_budget_evicts_oldest(tmp_path):
    store = DirectoryStore(tmp_path, max_bytes=1000, ttl_s=3600, clock=FakeClock())
    names = [store.put(bytes([i]) * 300, "png") for i in range(4)]
    assert store.total_bytes == 900 == disk_bytes(tmp_path)
    assert store.open(names[0]) is None and not (tmp_path / names[0]).exists()
    for i, name in enumerate(names[1:], start=1):
        path = store.open(name)
        assert path is not None and path.read_bytes() == bytes([i]) * 300


def test_exactly_at_budget_is_kept(tmp_path):
    store = DirectoryStore(tmp_path, max_bytes=1000, ttl_s=3600, clock=FakeClock())
    names = [store.put(b"x" * 500, "png") for _ in range(2)]
    assert all(store.open(n) for n in names)
    big = store.put(b"y" * 1000, "png")  # fits alone: everything else goes
    assert store.open(big) is not None
    assert [store.open(n) for n in names] == [None, None]
    assert store.total_bytes == 1000 == disk_bytes(tmp_path)


def test_single_file_over_budget(tmp_path):
    store = DirectoryStore(tmp_path, max_bytes=1000, ttl_s=3600, clock=FakeClock())
    kept = store.put(b"k" * 100, "png")
    with pytest.raises(ValueError):
        store.put(b"x" * 1001, "png")
    assert [p.name for p in tmp_path.iterdir()] == [kept]  # no temp file, earlier file untouched
    assert store.total_bytes == 100


def test_ttl_expiry_on_open(tmp_path):
    clock = FakeClock(step=0)
    store = DirectoryStore(tmp_path, max_bytes=10**6, ttl_s=60, clock=clock)
    name = store.put(b"data", "jpg")
    clock.now += 60
    assert store.open(name) is not None  # exactly ttl old: still served
    clock.now += 1
    assert store.open(name) is None
    assert not (tmp_path / name).exists()
    assert store.total_bytes == 0


def test_sweep_counts(tmp_path):
    clock = FakeClock(step=0)
    store = DirectoryStore(tmp_path, max_bytes=10**6, ttl_s=60, clock=clock)
    old = [store.put(b"o" * 10, "png") for _ in range(3)]
    clock.now += 30
    new = [store.put(b"n" * 10, "png") for _ in range(2)]
    assert store.sweep() == 0
    clock.now += 31
    assert store.sweep() == 3
    assert store.sweep() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(new)
    assert all(store.open(n) is None for n in old)
    assert store.total_bytes == 20 == disk_bytes(tmp_path)


def test_restart_keeps_budget_expiry_and_removes_temp_files(tmp_path):
    clock = FakeClock()
    first = DirectoryStore(tmp_path, max_bytes=1000, ttl_s=3600, clock=clock)
    names = [first.put(b"a" * 300, "png") for _ in range(3)]
    leftover = tmp_path / f"{TEMP_PREFIX}crashed"
    leftover.write_bytes(b"half an image")
    foreign = tmp_path / "README"  # not ours: left alone
    foreign.write_bytes(b"hi")

    second = DirectoryStore(tmp_path, max_bytes=1000, ttl_s=3600, clock=clock)
    assert second.total_bytes == 900
    assert not leftover.exists()
    assert foreign.exists()
    newest = second.put(b"b" * 300, "png")
    assert second.open(names[0]) is None  # the oldest from before the restart went first
    assert all(second.open(n) for n in [*names[1:], newest])
    assert second.total_bytes == 900

    # A smaller budget at restart is enforced straight away; expiry uses the files' mtimes.
    third = DirectoryStore(tmp_path, max_bytes=600, ttl_s=3600, clock=clock)
    assert third.total_bytes == 600
    assert third.open(newest) is not None
    clock.now += 3600
    assert third.sweep() == 2
    assert third.total_bytes == 0


def test_restart_sweeps_expired(tmp_path):
    clock = FakeClock(step=0)
    DirectoryStore(tmp_path, max_bytes=10**6, ttl_s=60, clock=clock).put(b"x", "png")
    clock.now += 61
    store = DirectoryStore(tmp_path, max_bytes=10**6, ttl_s=60, clock=clock)
    assert store.total_bytes == 0
    assert list(tmp_path.iterdir()) == []


def test_concurrent_puts(tmp_path):
    store = DirectoryStore(tmp_path, max_bytes=10_000, ttl_s=3600)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for j in range(50):
                name = store.put(bytes([i]) * (100 + 7 * j), "png")
                assert NAME_PATTERN.fullmatch(name)
                assert store.total_bytes <= 10_000
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.total_bytes <= 10_000
    assert store.total_bytes == disk_bytes(tmp_path)
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())


def test_make_store(tmp_path):
    store = make_store(StoreSettings(), tmp_path)
    assert isinstance(store, DirectoryStore)
    assert store.directory == (tmp_path / "outputs").resolve()
    custom = make_store(StoreSettings(dir=tmp_path / "elsewhere", max_bytes=2 * 1024**2, ttl_s=120), tmp_path)
    assert custom.directory == (tmp_path / "elsewhere").resolve()
    assert custom.max_bytes == 2 * 1024**2 and custom.ttl_s == 120
