"""Content-addressed export artifacts: a folder named by the hash of exactly what changes the graph
or its weights, written atomically, with a manifest saying what each file is and how it was made.

A server never loads an artifact whose name does not match its own configuration (stale), whose
manifest describes another configuration (foreign), or whose files do not match the digests in the
manifest (corrupt): it refuses with a message naming the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runners.config import Settings

log = logging.getLogger(__name__)
EXPORT_FORMAT_VERSION = 1  # bump when the exported graphs' contract changes
MANIFEST = "manifest.json"
REBUILD = "run `python -m export` with the server's settings to build it"
NETWORKS = ("transformer", "vae_encoder", "vae_decoder")


class ArtifactError(Exception):
    """A missing, stale, foreign or corrupt artifact; the message says how to rebuild it."""


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_identity(source: str | Path, cache_dir: Path) -> str:
    """A hash of the model's weight and config files' contents (what the graph is built from).
    Hashing tens of GB takes a while, so digests are remembered by (path, size, mtime)."""
    root = Path(source)
    memo_path = cache_dir / "file-digests.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    digest = hashlib.sha256()
    known = len(memo)
    for path in sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".model", ".txt")
    ):
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(path)
        digest.update(f"{path.relative_to(root)}={memo[key]}\n".encode())
    if len(memo) != known:  # only a new digest is worth a write
        write_atomic(memo_path, json.dumps(memo).encode())
    return digest.hexdigest()


def artifact_key(fields: dict[str, Any]) -> str:
    """The folder name's hash: canonical JSON of exactly the fields that change the artifact."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def write_atomic(path: Path, data) -> Path:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to a temporary file next to ``path``,
    fsync it, then ``os.replace`` it into place: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(memoryview(data))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return path


@dataclass
class Artifact:
    """One finished artifact folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / self.manifest["files"][name]["file"]


class ArtifactStore:
    """Artifacts of one kind ("onnx" or "tensorrt") under ``root/<kind>-<key>``."""

    def __init__(self, root: Path, kind: str):
        self.root, self.kind = Path(root), kind

    def folder(self, key: str) -> Path:
        return self.root / f"{self.kind}-{key}"

    def build(
        self,
        fields: dict[str, Any],
        make_files,
        rebuild_hint: str,
        *,
        prepare=None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[Artifact, bool]:
        """The artifact for ``fields``: found and verified (a cache hit), or made by
        ``make_files(temp_dir) -> {name: {"file": ..., **details}}`` and moved into place atomically.
        Returns (artifact, hit). A corrupt one is removed, then rebuilt. ``prepare()`` runs on a miss
        before anything is written (e.g. a disk check that may refuse); ``extra`` is merged into the
        manifest after ``make_files`` ran (so it can fill it in)."""
        key = artifact_key(fields)
        try:
            return self.load(fields, rebuild_hint), True
        except ArtifactError as exc:
            if self.folder(key).exists():
                log.warning("%s artifact %s is unusable (%s); rebuilding it", self.kind, key, exc)
                shutil.rmtree(self.folder(key))  # useless as it is, and its space may be needed
        if prepare is not None:
            prepare()
        self.root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{self.kind}-{key}."))
        try:
            files = make_files(temp)
            for entry in files.values():
                path = temp / entry["file"]
                entry.update(sha256=file_sha256(path), bytes=path.stat().st_size)
                for extra_file in entry.pop("extra_files", []):  # e.g. ONNX external data
                    entry.setdefault("data_files", {})[extra_file] = file_sha256(temp / extra_file)
                    entry["data_bytes"] = entry.get("data_bytes", 0) + (temp / extra_file).stat().st_size
            manifest = {
                "kind": self.kind,
                "key": key,
                "fields": fields,
                "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(extra or {}),
            }
            write_atomic(temp / MANIFEST, json.dumps(manifest, indent=2).encode())
            target = self.folder(key)
            if target.exists():
                shutil.rmtree(target)
            os.replace(temp, target)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return Artifact(self.folder(key), manifest), False

    def load(self, fields: dict[str, Any], rebuild_hint: str, verify: bool = True) -> Artifact:
        """The verified artifact for exactly ``fields``, or ArtifactError saying why not."""
        key = artifact_key(fields)
        folder = self.folder(key)
        manifest_path = folder / MANIFEST
        if not manifest_path.exists():
            raise ArtifactError(f"no {self.kind} artifact for this model and configuration (key {key}); {rebuild_hint}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            raise ArtifactError(f"{manifest_path} is not valid JSON (corrupt); {rebuild_hint}") from None
        if manifest.get("fields") != fields or manifest.get("key") != key:
            raise ArtifactError(f"{folder} was made for another configuration (foreign); {rebuild_hint}")
        if verify:
            for name, entry in manifest["files"].items():
                path = folder / entry["file"]
                if not path.exists() or file_sha256(path) != entry["sha256"]:
                    raise ArtifactError(
                        f"{name} ({path.name}) does not match its manifest digest (corrupt); {rebuild_hint}"
                    )
                for extra, digest in entry.get("data_files", {}).items():
                    if not (folder / extra).exists() or file_sha256(folder / extra) != digest:
                        raise ArtifactError(f"{extra} does not match its manifest digest (corrupt); {rebuild_hint}")
        return Artifact(folder, manifest)


# What the server looks for, and what `python -m export` names (export/build.py): one definition of each key.


def engine_root(settings: Settings) -> Path:
    return Path(settings.backend.engine_dir or Path(settings.model.cache_dir) / "engines")


def model_digest(source: str, cache_dir: Path) -> str:
    """What identifies the model's weights: its files' contents, or, for ``random:<architecture>``
    (built in code from a fixed seed, runners/pipeline/random_model.py), its name."""
    if source.startswith("random:"):
        return hashlib.sha256(f"built:{source}".encode()).hexdigest()
    return model_identity(model_folder(source), cache_dir)


def model_folder(source: str) -> Path:
    """The folder holding the model's files (a hub id resolves to its local snapshot)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, local_files_only=True))


def onnx_fields(model, settings: Settings) -> dict[str, Any]:
    """Exactly what changes the ONNX graphs or their weights."""
    import onnx
    import torch

    return {
        "model": model_digest(model.source, Path(settings.model.cache_dir)),
        "fused_loras": [[sha, scale] for sha, scale in model.fused_loras],
        "text_tokens": model.max_sequence_length,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "format": EXPORT_FORMAT_VERSION,
    }


def tensorrt_fields(onnx_artifact: Artifact, settings: Settings, tensorrt_version: str) -> dict[str, Any]:
    """Exactly what changes the engines: the graphs, precision, profiles and TensorRT's version."""
    backend = settings.backend
    return {
        "onnx": onnx_artifact.manifest["key"],
        "precision": backend.export_precision,
        "sizes": backend.export_sizes,
        "batch_sizes": backend.export_batch_sizes,
        "tensorrt": tensorrt_version,
        "refittable": True,
    }


def find_onnx(model, settings: Settings) -> Artifact:
    """The exported ONNX graphs for ``model`` under ``settings``, verified; ``ArtifactError`` if absent or stale."""
    return ArtifactStore(engine_root(settings), "onnx").load(onnx_fields(model, settings), REBUILD)


def find_tensorrt(model, settings: Settings, onnx: Artifact) -> Artifact:
    """The TensorRT engines built from ``onnx`` under ``settings``; raises where TensorRT cannot run."""
    from runners.backends.tensorrt_engine import tensorrt_available

    available, detail = tensorrt_available()
    if not available:
        raise RuntimeError(f"TensorRT engines cannot be built or run here: {detail}")
    return ArtifactStore(engine_root(settings), "tensorrt").load(
        tensorrt_fields(onnx, settings, detail), REBUILD + " --tensorrt"
    )
