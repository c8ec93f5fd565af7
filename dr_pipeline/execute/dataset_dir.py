"""The on-disk layout of a reinforced dataset and its commit protocol.

```
ROOT/shards/{name}.parquet     data files (only Parquet here, so the folder opens as a dataset)
ROOT/_markers/{name}.json      shard stats = commit marker, written after the data file is complete
ROOT/_tmp/                     local temporary files (never read)
ROOT/job.yaml                  the job config that made the dataset (secrets redacted)
ROOT/ensemble.yaml             the teacher ensemble file as used
ROOT/manifest.json             every committed shard with counts, bytes, checksum (written last)
```
A shard exists for readers only once its marker exists. On a local file system the data
file is written under ``_tmp`` and renamed into place (atomic); on object stores, where
rename is not atomic, it is uploaded to its final name and the marker alone commits it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

SHARDS, MARKERS, TMP = "shards", "_markers", "_tmp"


def file_digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class DatasetDir:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    # ---------------------------------------------------------------- paths
    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _p(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def shard_url(self, name: str) -> str:
        return self.url(SHARDS, f"{name}.parquet")

    def marker_rel(self, name: str) -> str:
        return f"{MARKERS}/{name}.json"

    # ---------------------------------------------------------------- reading
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def read_json(self, rel: str) -> dict | None:
        try:
            with self.fs.open(self._p(rel), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> str | None:
        try:
            with self.fs.open(self._p(rel), "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def markers(self) -> dict[str, dict]:
        """Committed shards: name -> stats (the marker's content)."""
        out = {}
        try:
            names = self.fs.ls(self._p(MARKERS), detail=False)
        except FileNotFoundError:
            return out
        for n in sorted(names):
            base = n.rsplit("/", 1)[-1]
            if base.endswith(".json"):
                data = self.read_json(f"{MARKERS}/{base}")
                if data is not None:
                    out[base[:-5]] = data
        return out

    def data_files(self) -> list[str]:
        try:
            return sorted(p.rsplit("/", 1)[-1][:-8] for p in self.fs.ls(self._p(SHARDS), detail=False)
                          if p.endswith(".parquet"))
        except FileNotFoundError:
            return []

    # ---------------------------------------------------------------- writing
    def ensure(self) -> None:
        for d in (SHARDS, MARKERS):
            self.fs.makedirs(self._p(d), exist_ok=True)

    def new_tmp_file(self, name: str) -> str:
        """A local temporary path for a shard's data file (same file system as ROOT if local)."""
        if self.local:
            d = Path(self._p(TMP))
            d.mkdir(parents=True, exist_ok=True)
        else:
            d = Path(tempfile.mkdtemp(prefix="dr-"))
        return str(d / f"{name}.{uuid.uuid4().hex}.parquet")

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:  # tmp + rename: readers never see a half-written file
            target = Path(self._p(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            with self.fs.open(self._p(rel), "wb") as f:
                f.write(data)

    def commit(self, name: str, tmp_file: str, stats: dict) -> dict:
        """Move the finished data file into place, then write the marker (which commits)."""
        size, digest = file_digest(tmp_file)
        stats = {**stats, "bytes": size, "sha256": digest, "data_file": f"{SHARDS}/{name}.parquet"}
        final = self._p(SHARDS, f"{name}.parquet")
        if self.local:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_file, final)
        else:
            self.fs.put_file(tmp_file, final)
            os.unlink(tmp_file)
        self.write_json(self.marker_rel(name), stats)
        return stats

    def uncommit(self, name: str) -> None:
        """Remove a shard's marker (first step of rewriting a committed shard)."""
        try:
            self.fs.rm(self._p(self.marker_rel(name)))
        except FileNotFoundError:
            pass
