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
Rewriting a shard first removes its old marker, so readers never pair an old marker with
new (or half-uploaded) data. Every storage call is retried on transient errors with
exponential backoff + jitter (``retry.py``); 403/404-style errors fail at once.
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

from dr_pipeline.execute.retry import RetryPolicy, redact_url, retry_call

SHARDS, MARKERS, TMP = "shards", "_markers", "_tmp"


def file_digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class DatasetDir:
    def __init__(self, root: str, storage_options: dict | None = None, retry: RetryPolicy | None = None):
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.retry = retry
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

    def _fresh(self, rel: str) -> str:
        """The path of ``rel`` with this instance's cached listings of it dropped: object-store
        file systems cache listings (and answer "not found" from a cached parent listing),
        while other processes write here."""
        path = self._p(rel)
        if not self.local:
            self.fs.invalidate_cache(path)
        return path

    def _io(self, what: str, rel: str, fn):
        """Run one storage call with retries; errors name the operation and the (redacted) URL."""
        return retry_call(fn, f"{what} {redact_url(self.url(rel))}", self.retry)

    # ---------------------------------------------------------------- reading
    def exists(self, rel: str) -> bool:
        return self._io("stat", rel, lambda: self.fs.exists(self._fresh(rel)))

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        def read():
            try:
                return self.fs.cat_file(self._fresh(rel))
            except FileNotFoundError:
                return None
        return self._io("read", rel, read)

    def read_json(self, rel: str) -> dict | None:
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def _list(self, rel: str) -> list[dict]:
        """Entries of a folder, fresh (listings of object stores are cached per fs instance,
        and other processes write here); [] if the folder does not exist."""
        def ls():
            try:
                return self.fs.ls(self._fresh(rel), detail=True)
            except FileNotFoundError:
                return []
        return self._io("list", rel, ls)

    def markers(self) -> dict[str, dict]:
        """Committed shards: name -> stats (the marker's content). A data file without a
        marker is not committed and not listed here: readers must go through this."""
        names = sorted(_base(e["name"])[:-5] for e in self._list(MARKERS)
                       if e.get("type") != "directory" and _base(e["name"]).endswith(".json")
                       and not _base(e["name"]).startswith("."))
        if not names:
            return {}
        paths = [self._p(self.marker_rel(n)) for n in names]
        # one concurrent batch on object stores (a resume of 100k shards must not take 100k round trips)
        got = self._io("read", MARKERS, lambda: self.fs.cat(paths, on_error="return"))
        out = {}
        for n, p in zip(names, paths):
            data = got.get(p) if isinstance(got, dict) else None
            if data is None or isinstance(data, BaseException):   # the few that failed: one by one
                data = self.read_bytes(self.marker_rel(n))
            if data is not None:                  # removed since the listing: not committed
                out[n] = json.loads(data)
        return out

    def data_sizes(self) -> dict[str, int]:
        """name -> size of every data file in ``shards/`` (committed or not)."""
        return {_base(e["name"])[:-8]: int(e.get("size") or 0) for e in self._list(SHARDS)
                if _base(e["name"]).endswith(".parquet")}

    def data_files(self) -> list[str]:
        return sorted(self.data_sizes())

    # ---------------------------------------------------------------- writing
    def ensure(self) -> None:
        for d in (SHARDS, MARKERS):
            self._io("mkdir", d, lambda d=d: self.fs.makedirs(self._p(d), exist_ok=True))

    def new_tmp_file(self, name: str) -> str:
        """A local temporary path for a shard's data file (same file system as ROOT if local).
        The name carries the writing process's pid: a leftover file says who left it."""
        d = Path(self._p(TMP)) if self.local else Path(tempfile.gettempdir()) / "dr_pipeline"
        d.mkdir(parents=True, exist_ok=True)
        return str(d / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.parquet")

    def clean_tmp(self) -> int:
        """Remove temporary files left by killed writers (local datasets; call when no job runs)."""
        if not self.local:
            return 0
        d = Path(self._p(TMP))
        n = 0
        for f in d.glob("*.parquet") if d.is_dir() else []:
            f.unlink(missing_ok=True)
            n += 1
        return n

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:  # tmp + rename: readers never see a half-written file
            def write():
                target = Path(self._p(rel))
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
        else:           # one PUT: object stores make it visible whole or not at all
            def write():
                self.fs.pipe_file(self._p(rel), data)
        self._io("write", rel, write)

    def remove(self, rel: str) -> None:
        def rm():
            try:
                self.fs.rm_file(self._p(rel))
            except FileNotFoundError:
                pass
        self._io("remove", rel, rm)

    def commit(self, name: str, tmp_file: str, stats: dict) -> dict:
        """Commit a finished data file: drop any old marker, put the data in place, then write
        the marker (the commit point). A crash anywhere leaves at most an unmarked data file,
        which readers ignore and the shard's next attempt overwrites."""
        size, digest = file_digest(tmp_file)
        stats = {**stats, "bytes": size, "sha256": digest, "data_file": f"{SHARDS}/{name}.parquet"}
        rel = f"{SHARDS}/{name}.parquet"
        final = self._p(rel)
        self.uncommit(name)
        if self.local:
            def place():
                Path(final).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_file, final)
        else:
            def place():
                self.fs.put_file(tmp_file, final)
        self._io("upload", rel, place)
        if not self.local:
            os.unlink(tmp_file)
        self.write_json(self.marker_rel(name), stats)
        return stats

    def uncommit(self, name: str) -> None:
        """Remove a shard's marker (first step of rewriting a committed shard)."""
        self.remove(self.marker_rel(name))
