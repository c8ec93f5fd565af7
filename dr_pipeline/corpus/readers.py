"""Read base-corpus shards (webdataset tar, img2dataset Parquet) from any fsspec URL.

`iter_shard` streams one shard and yields a `Sample` per good record and a `Rejected`
per bad one, so a caller can account for every record (read = written + rejected).
A shard that cannot be read at all raises `ShardReadError`; when retrying cannot help
(file not found, not a tar/Parquet file, wrong Parquet schema) it raises the subclass
`PermanentShardError`, which the runner does not retry. Nothing is ever extracted to disk:
tar members are read into memory one sample at a time, links and unsafe member names
(absolute, `..`) are never followed, and members larger than `MAX_MEMBER_BYTES` are skipped
unread. Captions are normalized here, once, for every consumer (reinforcement, trainer,
validate): decoded as UTF-8 (invalid bytes -> U+FFFD), stripped, capped at
`MAX_CAPTION_CHARS` characters.

Rejection reasons produced here: no_image, no_key, duplicate_key, truncated,
bad_member_name, too_large (docs/bad-data.md lists them all).
"""
from __future__ import annotations

import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand

from dr_pipeline.execute.retry import PermanentError

SHARD_EXTENSIONS = (".tar", ".parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tar member suffixes, in priority order
IMAGE_COLUMNS = ("jpg", "png", "webp", "image")    # parquet columns, in priority order
CAPTION_COLUMNS = ("caption", "txt")
PARQUET_BATCH = 256
MAX_CAPTION_CHARS = 2000            # longer captions are cut (a teacher's tokenizer sees far fewer)
MAX_MEMBER_BYTES = 64 << 20         # a bigger tar member / Parquet image cell -> too_large, unread


@dataclass
class Sample:
    key: str
    image: bytes | None = field(repr=False)  # raw encoded bytes as stored (not decoded)
    caption: str | None
    url: str | None
    uid: str | None
    meta: dict = field(default_factory=dict)


@dataclass
class Rejected:
    key: str
    reason: str  # snake_case: no_image, duplicate_key, truncated, bad_member_name, no_key, too_large
    detail: str = ""


class ShardReadError(RuntimeError):
    """The shard cannot be read at all; the message names the URL and the problem."""


class PermanentShardError(ShardReadError, PermanentError):
    """A ShardReadError that retrying cannot fix (missing file, not a tar/Parquet, wrong schema).

    Also a ``retry.PermanentError``, so storage retries and the runner never retry it."""


def clean_caption(text: str | None, meta: dict | None = None) -> str | None:
    """Strip and cap a caption (``MAX_CAPTION_CHARS``); notes a cut in ``meta``."""
    if text is None:
        return None
    text = text.strip()
    if len(text) > MAX_CAPTION_CHARS:
        if meta is not None:
            meta["_caption_truncated_from"] = len(text)
        text = text[:MAX_CAPTION_CHARS].rstrip()
    return text


# --------------------------------------------------------------------------- URLs

def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _fs(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise ShardReadError(f"{url}: cannot resolve filesystem ({e})") from e


def _to_url(fs: fsspec.AbstractFileSystem, original: str, path: str) -> str:
    # Keep the caller's style: a plain local path stays a plain path, a URL keeps its protocol.
    return fs.unstrip_protocol(path) if "://" in original else path


def _expand_one(pattern: str, so: dict | None) -> list[str]:
    if _has_glob(pattern):
        fs, path = _fs(pattern, so)
        found = fs.glob(path, detail=True)
        hits = [_to_url(fs, pattern, p) for p, info in found.items() if info.get("type") == "file"]
        if not hits:
            raise ShardReadError(f"{pattern}: pattern matches no files (fix input.urls)")
        return hits
    if pattern.endswith(SHARD_EXTENSIONS):
        # A concrete shard: existence is iter_shard's job (saves one request per URL).
        return [pattern if "://" in pattern else os.path.abspath(pattern)]
    fs, path = _fs(pattern, so)
    if fs.isdir(path):
        hits = [_to_url(fs, pattern, p) for p in fs.ls(path, detail=False)
                if p.endswith(SHARD_EXTENSIONS)]
        if not hits:
            raise ShardReadError(f"{pattern}: directory holds no .tar or .parquet shards (fix input.urls)")
        return hits
    if fs.isfile(path):
        return [_to_url(fs, pattern, path)]  # unusual extension: iter_shard will say so
    raise ShardReadError(f"{pattern}: no such file or directory (fix input.urls)")


def expand_urls(urls: str | Sequence[str], storage_options: dict | None = None) -> list[str]:
    """Expand brace patterns, globs and directories into a sorted, de-duplicated URL list.

    Local paths come back absolute. A glob or directory that matches nothing raises
    ShardReadError; brace-expanded concrete shard URLs are not checked for existence.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    out: set[str] = set()
    for item in items:
        for pattern in braceexpand(item):
            out.update(_expand_one(pattern, storage_options))
    return sorted(out)


def shard_name(url: str) -> str:
    """Basename without extension: 's3://b/x/shard-00003.tar' -> 'shard-00003'."""
    base = posixpath.basename(url.split("?", 1)[0].rstrip("/"))
    stem, _ = posixpath.splitext(base)
    return stem[: -len(".tar")] if stem.endswith(".tar") else stem  # x.tar.gz -> x


# --------------------------------------------------------------------------- dispatch

def iter_shard(url: str, storage_options: dict | None = None) -> Iterator[Sample | Rejected]:
    """Stream one shard's records. Raises ShardReadError if the shard is unreadable."""
    path = url.split("?", 1)[0].lower()
    if path.endswith((".tar", ".tar.gz", ".tgz")):
        return _iter_tar(url, storage_options)
    if path.endswith(".parquet"):
        return _iter_parquet(url, storage_options)
    raise PermanentShardError(f"{url}: unsupported shard extension (expected .tar or .parquet)")


def _open(url: str, storage_options: dict | None):
    """Open for reading; a missing file or bad URL becomes ShardReadError (never echoing
    storage_options, which may hold credentials)."""
    try:
        return fsspec.open(url, "rb", **(storage_options or {})).open()
    except FileNotFoundError as e:
        raise PermanentShardError(f"{url}: file not found") from e
    except (OSError, ValueError, ImportError) as e:
        raise ShardReadError(f"{url}: cannot open ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- tar

def _split_member(name: str) -> tuple[str, str] | None:
    """webdataset convention: key = path up to the first '.' of the basename."""
    d, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None  # no suffix, or a hidden file (e.g. macOS '._x'): not a sample member
    stem, suffix = base.split(".", 1)
    return (posixpath.join(d, stem) if d else stem), suffix.lower()


def _unsafe(name: str) -> bool:
    """Absolute, drive-letter, parent-directory or NUL-holding member names."""
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or ".." in parts or "\0" in name
            or (len(name) > 1 and name[1] == ":" and name[0].isalpha()))


def _member_kind(member: tarfile.TarInfo) -> str:
    return ("symlink" if member.issym() else "hard link" if member.islnk() else
            "device" if member.isdev() else "special member")


class _Group:
    """Members of one key collected so far."""

    def __init__(self, key: str):
        self.key = key
        self.image: bytes | None = None
        self.caption: bytes | None = None
        self.json: bytes | None = None
        self.url: bytes | None = None
        self.bad_name: str | None = None
        self.too_large: str | None = None

    def add(self, suffix: str, data: bytes) -> None:
        if suffix in IMAGE_EXTENSIONS:
            self.image = self.image if self.image is not None else data  # first wins
        elif suffix == "txt" and self.caption is None:
            self.caption = data
        elif suffix == "json" and self.json is None:
            self.json = data
        elif suffix == "url.txt" and self.url is None:
            self.url = data

    def wanted(self, suffix: str) -> bool:
        return suffix in IMAGE_EXTENSIONS or suffix in ("txt", "json", "url.txt")

    def finish(self) -> Sample | Rejected:
        if self.bad_name is not None:
            return Rejected(self.key, "bad_member_name", self.bad_name)
        if self.too_large is not None:
            return Rejected(self.key, "too_large", self.too_large)
        if self.image is None:
            return Rejected(self.key, "no_image")
        meta: dict = {}
        if self.json is not None:
            try:
                parsed = json.loads(self.json)
                if isinstance(parsed, dict):
                    meta = parsed
                else:
                    meta = {"_json_error": f"expected a JSON object, got {type(parsed).__name__}"}
            except (ValueError, UnicodeDecodeError) as e:
                meta = {"_json_error": str(e)[:200]}
        caption = None
        if self.caption is not None:
            try:
                caption = self.caption.decode("utf-8")
            except UnicodeDecodeError:
                caption = self.caption.decode("utf-8", errors="replace")
                meta["_caption_decode_error"] = True
        elif isinstance(meta.get("caption"), str):
            caption = meta["caption"]  # img2dataset also keeps the caption in the json
        caption = clean_caption(caption, meta)
        url = self.url.decode("utf-8", errors="replace").strip() if self.url is not None else None
        if url is None and isinstance(meta.get("url"), str):
            url = meta["url"]
        uid = meta.get("uid")
        return Sample(self.key, self.image, caption, url,
                      uid if isinstance(uid, str) else None, meta)


def _iter_tar(url: str, so: dict | None) -> Iterator[Sample | Rejected]:
    with _open(url, so) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*")
        except (tarfile.TarError, EOFError, zlib.error) as e:
            f.seek(0)
            if not f.read(1):
                return  # zero-byte file: an empty shard, not an error
            raise PermanentShardError(f"{url}: not a tar archive ({e})") from e
        with tar:
            seen: set[str] = set()
            group: _Group | None = None

            def flush() -> Sample | Rejected:
                assert group is not None
                rec = group.finish()
                if group.key in seen:
                    rec = Rejected(group.key, "duplicate_key")
                seen.add(group.key)
                return rec

            try:
                for member in tar:
                    if member.isdir():
                        continue
                    parts = _split_member(member.name)
                    if parts is None:
                        continue
                    key, suffix = parts
                    if group is None or key != group.key:
                        if group is not None:
                            yield flush()
                        group = _Group(key)
                    if _unsafe(member.name):
                        group.bad_name = member.name
                    elif not member.isfile():    # links, devices, fifos: never followed
                        group.bad_name = f"{member.name} ({_member_kind(member)})"
                    elif group.wanted(suffix):
                        if member.size > MAX_MEMBER_BYTES:
                            group.too_large = f"{member.name}: {member.size} bytes (limit {MAX_MEMBER_BYTES})"
                            continue        # never read: the stream skips its data
                        fobj = tar.extractfile(member)
                        assert fobj is not None
                        group.add(suffix, fobj.read())
            except (tarfile.TarError, EOFError, zlib.error) as e:
                # Cut mid-member (or a corrupt/compressed stream that ends early).
                if group is not None:
                    yield Rejected(group.key, "truncated", f"{type(e).__name__}: {e}")
                return
            except OSError as e:
                raise ShardReadError(f"{url}: I/O error while reading ({e})") from e
            if group is None:
                return
            # tarfile ends silently when a header is cut short or missing; it read a full
            # 512-byte (zero) block only at a real end-of-archive marker. Without one we
            # cannot know the last group is complete, so it is not trusted.
            if tar.fileobj.pos - tar.offset < tarfile.BLOCKSIZE:  # type: ignore[union-attr]
                yield Rejected(group.key, "truncated", "archive ends without end-of-archive marker")
            else:
                yield flush()


# --------------------------------------------------------------------------- parquet

def _image_column(schema: pa.Schema) -> str | None:
    return next((c for c in IMAGE_COLUMNS if c in schema.names), None)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _image_bytes(value: object) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face Image feature: struct<bytes, path>
        value = value.get("bytes")
    return value if isinstance(value, (bytes, type(None))) else None


def _iter_parquet(url: str, so: dict | None) -> Iterator[Sample | Rejected]:
    with _open(url, so) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise PermanentShardError(f"{url}: not a Parquet file ({e})") from e
        schema = pf.schema_arrow
        image_col = _image_column(schema)
        missing = [] if "key" in schema.names else ["key"]
        if image_col is None:
            missing.append("image (one of: " + ", ".join(IMAGE_COLUMNS) + ")")
        if missing:
            raise PermanentShardError(f"{url}: missing required column(s) {', '.join(missing)}; "
                                      f"has {schema.names}")
        t = schema.field(image_col).type
        if not (_is_bytes(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                                 and _is_bytes(t.field("bytes").type))):
            raise PermanentShardError(f"{url}: image column {image_col!r} has type {t}, expected binary")
        caption_col = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
        if caption_col is not None:
            ct = schema.field(caption_col).type
            if not (_is_bytes(ct) or pa.types.is_string(ct) or pa.types.is_large_string(ct)
                    or pa.types.is_null(ct)):
                raise PermanentShardError(f"{url}: caption column {caption_col!r} has type {ct}, expected string")
        known = {"key", image_col, caption_col, "url", "uid"}
        seen: set[str] = set()
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
                for rec in batch.to_pylist():
                    row += 1
                    key = rec.get("key")
                    if key is None:
                        yield Rejected(f"<row {row - 1}>", "no_key")
                        continue
                    key = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else str(key)
                    if key in seen:
                        yield Rejected(key, "duplicate_key")
                        continue
                    seen.add(key)
                    image = _image_bytes(rec[image_col])
                    if image is None:
                        yield Rejected(key, "no_image")
                        continue
                    if len(image) > MAX_MEMBER_BYTES:
                        yield Rejected(key, "too_large", f"{len(image)} bytes (limit {MAX_MEMBER_BYTES})")
                        continue
                    meta = {k: v for k, v in rec.items() if k not in known}
                    caption = rec.get(caption_col) if caption_col else None
                    if isinstance(caption, bytes):
                        try:
                            caption = caption.decode("utf-8")
                        except UnicodeDecodeError:
                            caption = caption.decode("utf-8", errors="replace")
                            meta["_caption_decode_error"] = True
                    caption = clean_caption(caption, meta)
                    url_, uid = rec.get("url"), rec.get("uid")
                    yield Sample(key, image, caption, url_ if isinstance(url_, str) else None,
                                 uid if isinstance(uid, str) else None, meta)
        except (pa.ArrowException, OSError) as e:
            raise ShardReadError(f"{url}: corrupt Parquet data after {row} rows ({e})") from e
