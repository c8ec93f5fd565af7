"""``Folder``: one fsspec folder (local path or ``s3://``...) with retried, counted calls.

Every file the project reads or writes outside a base corpus goes through a ``Folder``:
datasets, training runs, exports. Promises:

- writes are atomic: on a local disk ``write_bytes`` writes a hidden temporary file, fsyncs it
  and renames it into place; on an object store it is one PUT (visible whole or not at all);
- every call is retried on transient errors with backoff + jitter (``retry.py``); permanent
  errors (403/404, read-only, full disk) raise ``PermanentError`` naming the operation and the
  redacted URL at once;
- one retry budget: s3fs's and botocore's own retries are switched off unless the caller set
  them, so a failing PUT is tried ``io_attempts`` times, not ``io_attempts x 5 x 5``;
- ``calls`` counts storage round trips by operation (the driver-at-scale benchmark reports it).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dr_pipeline.storage.retry import RetryPolicy, redact_url, retry_call

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One listing entry: the base name, the size in bytes, whether it is a folder."""

    name: str
    size: int
    is_dir: bool = False


def file_digest(path: str) -> tuple[int, str]:
    """(size, hex sha256) of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def single_retry_budget(url: str, storage_options: dict | None) -> dict:
    """``storage_options`` with the object store client's own retries off, unless set by the user:
    ``retry.py`` is the one retry layer (s3fs retries 5x and botocore again underneath)."""
    so = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        ck = so.get("config_kwargs")
        if ck is None or isinstance(ck, dict):
            ck = dict(ck or {})
            ck.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
            so["config_kwargs"] = ck
    return so


class Folder:
    """A folder at ``root`` (any fsspec URL); paths given to methods are relative to it ("a/b.json")."""

    def __init__(self, root: str, storage_options: dict | None = None, retry: RetryPolicy | None = None):
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.retry = retry
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **single_retry_budget(self.root, storage_options))
        if hasattr(self.fs, "retries") and "retries" not in self.storage_options:
            self.fs.retries = 1  # s3fs's own retry loop (a class attribute, 5 by default)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.calls: Counter = Counter()

    def __repr__(self) -> str:
        return f"Folder({redact_url(self.root)!r})"

    # ---------------------------------------------------------------- paths
    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def path_of(self, rel: str = "") -> str:
        """The file system path of ``rel`` (for ``fs`` calls and, when local, ``open``)."""
        return "/".join([self.path.rstrip("/"), rel]) if rel else self.path.rstrip("/")

    def sub(self, rel: str) -> Folder:
        """The folder ``rel`` below this one, on the same file system and retry policy."""
        out = Folder.__new__(Folder)
        out.root, out.storage_options, out.retry = self.url(rel), self.storage_options, self.retry
        out.fs, out.path, out.local, out.calls = self.fs, self.path_of(rel), self.local, self.calls
        return out

    def _fresh(self, rel: str) -> str:
        """The path of ``rel`` with this instance's cached listings of it dropped: object-store
        file systems cache listings (and answer "not found" from a cached parent listing),
        while other processes write here."""
        path = self.path_of(rel)
        if not self.local:
            self.fs.invalidate_cache(path)
        return path

    def _io(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """One storage call with retries; errors name the operation and the (redacted) URL."""
        self.calls[what] += 1
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

    def read_many(self, rels: Iterable[str], threads: int = 32) -> dict[str, bytes | None]:
        """Several files at once: one concurrent batch on object stores (``fs.cat`` of all paths),
        a thread pool on local disks; the few that failed are retried one by one. A file that
        does not exist maps to None."""
        rels = list(rels)
        if not rels:
            return {}
        if self.local:
            with ThreadPoolExecutor(min(threads, len(rels))) as pool:
                return dict(zip(rels, pool.map(self.read_bytes, rels)))
        paths = [self.path_of(r) for r in rels]
        for p in {posixpath.dirname(p) for p in paths}:
            self.fs.invalidate_cache(p)
        self.calls["read"] += len(rels)
        got = retry_call(
            lambda: self.fs.cat(paths, on_error="return"),
            f"read {len(rels)} files in {redact_url(self.root)}",
            self.retry,
        )
        out: dict[str, bytes | None] = {}
        for r, p in zip(rels, paths):
            data = got.get(p) if isinstance(got, dict) else None
            if isinstance(data, FileNotFoundError):
                out[r] = None
            elif data is None or isinstance(data, BaseException):
                out[r] = self.read_bytes(r)
            else:
                out[r] = data
        return out

    def list(self, rel: str = "") -> list[Entry]:
        """The entries of folder ``rel`` with sizes, fresh; [] if it does not exist. One call
        (one paginated LIST on object stores) whatever the number of files."""

        def ls():
            try:
                return self.fs.ls(self._fresh(rel), detail=True)
            except FileNotFoundError:
                return []

        return [
            Entry(posixpath.basename(e["name"].rstrip("/")), int(e.get("size") or 0), e.get("type") == "directory")
            for e in self._io("list", rel, ls)
        ]

    def open_local(self, rel: str, mode: str = "rb"):
        """Open ``rel`` with the builtin ``open`` (local folders only: appends, streaming reads)."""
        if not self.local:
            raise ValueError(f"{self!r} is not on a local disk")
        return open(self.path_of(rel), mode)

    # ---------------------------------------------------------------- writing
    def makedirs(self, rel: str = "") -> None:
        self._io("mkdir", rel, lambda: self.fs.makedirs(self.path_of(rel), exist_ok=True))

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:  # tmp + fsync + rename: readers never see a half-written file

            def write():
                target = Path(self.path_of(rel))
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
        else:  # one PUT: object stores make it visible whole or not at all

            def write():
                self.fs.pipe_file(self.path_of(rel), data)

        self._io("write", rel, write)

    def write_json(self, rel: str, obj: object, indent: int | None = 1) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=indent, sort_keys=True).encode())

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def put_file(self, local_file: str, rel: str) -> None:
        """Move (local folder) or upload (object store) a finished local file to ``rel``."""
        if self.local:

            def place():
                target = Path(self.path_of(rel))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(local_file, target)
        else:

            def place():
                self.fs.put_file(local_file, self.path_of(rel))

        self._io("upload", rel, place)

    def remove(self, rel: str) -> None:
        """Remove a file; a missing file is fine."""

        def rm():
            try:
                self.fs.rm_file(self.path_of(rel))
            except FileNotFoundError:
                pass

        self._io("remove", rel, rm)

    def remove_many(self, rels: Iterable[str]) -> None:
        """Remove several files: bulk deletes on object stores (s3fs sends 1,000 keys per request)."""
        rels = list(rels)
        if self.local or len(rels) < 2:
            for r in rels:
                self.remove(r)
            return
        paths = [self.path_of(r) for r in rels]
        self.calls["remove"] += -(-len(paths) // 1000)
        retry_call(lambda: self.fs.rm(paths), f"remove {len(paths)} files in {redact_url(self.root)}", self.retry)


__all__ = ["Entry", "Folder", "file_digest", "single_retry_budget"]
