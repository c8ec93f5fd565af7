"""Read base-corpus shards (webdataset tar, img2dataset Parquet) from any fsspec URL.

`iter_shard` streams one shard and yields a `Sample` per good record and a `Rejected`
per bad one, so a caller can account for every record (read = written + rejected), plus a
`Damaged` event for every run of tar bytes it had to skip (damaged framing: see the tar
section), so samples it could not reach are never lost without a trace. Sample keys are
escaped by one rule (`escape_key`) so every layout, DataCompDR tars included, can carry them.
A shard that cannot be read at all raises `ShardReadError`; when retrying cannot help
(file not found, not a tar/Parquet file, wrong Parquet schema) it raises the subclass
`PermanentShardError`, which the runner does not retry. Nothing is ever extracted to disk:
tar members are read into memory one sample at a time, links and unsafe member names
(absolute, `..`) are never followed, and members larger than `MAX_MEMBER_BYTES` are skipped
unread. Captions are normalized here, once, for every consumer (reinforcement, trainer,
validate): decoded as UTF-8 (invalid bytes -> U+FFFD), stripped, capped at
`MAX_CAPTION_CHARS` characters.

Rejection reasons produced here: no_image, no_key, duplicate_key, truncated, damaged,
bad_member_name, too_large (docs/bad-data.md lists them all).
"""

from __future__ import annotations

import bz2
import collections
import gzip
import json
import logging
import lzma
import os
import posixpath
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand

from dr_pipeline.storage.retry import PermanentError, redact_url

log = logging.getLogger(__name__)

SHARD_EXTENSIONS = (".tar", ".parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # tar member suffixes (any case)
IMAGE_COLUMNS = ("jpg", "png", "webp", "image")  # parquet columns, in priority order
CAPTION_COLUMNS = ("caption", "txt")
PARQUET_BATCH = 256
MAX_CAPTION_CHARS = 2000  # longer captions are cut (a teacher's tokenizer sees far fewer)
MAX_MEMBER_BYTES = 64 << 20  # a bigger tar member / Parquet image cell -> too_large, unread


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
    reason: str  # snake_case: no_image, duplicate_key, truncated, damaged, bad_member_name, no_key, too_large
    detail: str = ""


@dataclass
class Damaged:
    """Damaged tar framing: not a record (no key; ``n_read`` does not count it) but an event the
    shard's marker keeps, so nothing is lost without a trace.

    Bytes ``offset``..``end`` of the archive (``end`` None: to the end of the file) were skipped;
    ``members_skipped`` member headers lay in them (the damaged one plus any seen on the scan);
    ``samples_lost`` is 0 when nothing was lost (zero blocks followed by more members, as in two
    concatenated tars) and None when unknown (samples whose members lay wholly inside the skipped
    bytes have no record; ``dr validate`` compares ``n_read`` with the corpus index, if any).
    Samples partly read next to the damage are rejected with reason ``damaged``."""

    offset: int
    end: int | None
    members_skipped: int
    samples_lost: int | None
    detail: str

    def to_dict(self) -> dict:
        return {
            "offset": self.offset,
            "end": self.end,
            "members_skipped": self.members_skipped,
            "samples_lost": self.samples_lost,
            "detail": self.detail[:300],
        }


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
    except (ValueError, ImportError, TypeError, AttributeError) as e:
        # TypeError/AttributeError: options of the wrong shape (fsspec's message names keys, not values)
        raise ShardReadError(
            f"{url}: cannot resolve filesystem ({type(e).__name__}: {e}; check storage_options)"
        ) from e


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
        hits = [_to_url(fs, pattern, p) for p in fs.ls(path, detail=False) if p.endswith(SHARD_EXTENSIONS)]
        if not hits:
            raise ShardReadError(f"{pattern}: directory holds no .tar or .parquet shards (fix input.urls)")
        return hits
    if fs.isfile(path):
        return [_to_url(fs, pattern, path)]  # unusual extension: iter_shard will say so
    raise ShardReadError(f"{pattern}: no such file or directory (fix input.urls)")


IMG2DATASET_STATS = "_stats.json"  # img2dataset writes {shard}_stats.json beside every shard


def drop_img2dataset_sidecars(urls: set[str]) -> set[str]:
    """img2dataset's output folder as input: its ``{shard}_stats.json`` files and, in webdataset
    mode, the metadata ``{shard}.parquet`` written beside each ``{shard}.tar`` (no image column;
    it would also claim the tar's output name) are not shards. A ``.parquet`` without a ``.tar`` of
    the same name (img2dataset's parquet mode, images included) is kept."""
    tars = {u[: -len(".tar")] for u in urls if u.endswith(".tar")}
    return {
        u
        for u in urls
        if not u.endswith(IMG2DATASET_STATS) and not (u.endswith(".parquet") and u[: -len(".parquet")] in tars)
    }


def expand_urls(urls: str | Sequence[str], storage_options: dict | None = None) -> list[str]:
    """Expand brace patterns, globs and directories into a sorted, de-duplicated URL list.

    Local paths come back absolute. A glob or directory that matches nothing raises
    ShardReadError; brace-expanded concrete shard URLs are not checked for existence.
    img2dataset's sidecar files are left out (``drop_img2dataset_sidecars``).
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    out: set[str] = set()
    for item in items:
        for pattern in braceexpand(item):
            out.update(_expand_one(pattern, storage_options))
    return sorted(drop_img2dataset_sidecars(out))


def shard_name(url: str) -> str:
    """Basename without extension: 's3://b/x/shard-00003.tar' -> 'shard-00003'.

    Output files are named after it, and dataset readers (pyarrow, Spark, HF) skip files whose
    name starts with '.' or '_', so a leading '.', '_' or '%' is percent-escaped ('.hid' ->
    '%2Ehid', '_part-0' -> '%5Fpart-0', '%x' -> '%25x'): reversible (``unescape_shard_name``),
    and no two input names map to one output name. The marker keeps the input URL."""
    base = posixpath.basename(url.split("?", 1)[0].rstrip("/"))
    stem, _ = posixpath.splitext(base)
    stem = stem[: -len(".tar")] if stem.endswith(".tar") else stem  # x.tar.gz -> x
    return f"%{ord(stem[0]):02X}{stem[1:]}" if stem[:1] in (".", "_", "%") else stem


def unescape_shard_name(name: str) -> str:
    """The input shard's stem for an output shard name (inverse of the escape in ``shard_name``)."""
    return chr(int(name[1:3], 16)) + name[3:] if name[:1] == "%" else name


_KEY_ESCAPED = frozenset("%/.\\")


def escape_key(key: str) -> str:
    """The sample key as stored: one the DataCompDR layout can carry as ``{key}.{ext}``.

    '%', '/', '.', '\\', control characters and bytes that are not UTF-8 (tar names are read with
    surrogateescape) become ``%XX`` (their UTF-8 bytes, upper-case hex); every other character is
    kept, so common keys (``000000042``, uids) are unchanged. Reversible with
    ``urllib.parse.unquote`` (for valid UTF-8) and injective, so distinct keys stay distinct.
    Applied by the readers, so reinforcement, training, validate and export all see one key."""
    if key.isprintable() and not any(c in _KEY_ESCAPED for c in key):
        return key
    out = []
    for c in key:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # a non-UTF-8 byte of a tar member name
            out.append(f"%{o - 0xDC00:02X}")
        elif c in _KEY_ESCAPED or o < 0x20 or o == 0x7F or (0xD800 <= o <= 0xDFFF):
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")))
        else:
            out.append(c)
    return "".join(out)


# --------------------------------------------------------------------------- dispatch


def iter_shard(
    url: str, storage_options: dict | None = None, on_damage: Callable[[Damaged], None] | None = None
) -> Iterator[Sample | Rejected]:
    """Stream one shard's records (``Sample`` / ``Rejected``). Damaged tar framing (skipped bytes:
    no key, not a record) goes to ``on_damage`` (the reinforcement marker keeps it); without a
    callback it is logged. Raises ShardReadError if the shard is unreadable."""
    path = url.split("?", 1)[0].lower()
    if path.endswith((".tar", ".tar.gz", ".tgz")):
        return _without_damage(_iter_tar(url, storage_options), url, on_damage)
    if path.endswith(".parquet"):
        return _iter_parquet(url, storage_options)
    raise PermanentShardError(f"{url}: unsupported shard extension (expected .tar or .parquet)")


def _without_damage(items: Iterator, url: str, on_damage) -> Iterator[Sample | Rejected]:
    for item in items:
        if isinstance(item, Damaged):
            if on_damage is None:
                log.warning("%s: damaged tar framing: %s", redact_url(url), item.detail)
            else:
                on_damage(item)
        else:
            yield item


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
#
# A small streaming tar parser instead of ``tarfile``: tarfile ends silently at the first zero
# block or bad header, so every sample after a flipped bit, a concatenation or an impossible size
# vanished without a trace. Here every byte is accounted for: a header whose checksum fails, a
# member that declares more bytes than the file holds, or non-member bytes after the end marker
# are skipped by scanning forward, 512-byte block by block, for the next valid ustar/GNU header
# (checksum and magic), and each skip is reported as a ``Damaged`` item with its byte range. It
# reads ustar, GNU (long names) and pax (path, size) headers; gzip/bz2/xz streams are unpacked.

BLOCK = 512
_ZERO = bytes(BLOCK)
_SCAN_CHUNK = 128 * BLOCK
MAX_META_BYTES = 1 << 20  # a pax / GNU long-name header bigger than this is damage
LOOKBEHIND_GROUPS = 64  # members of one key up to this many samples apart still join
LOOKBEHIND_BYTES = 64 << 20  # ... while the samples held open total at most this many bytes
_REGULAR = (b"0", b"\0", b"7")
_META = (b"x", b"g", b"L", b"K")
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


class _Cut(Exception):
    """The stream ended inside a member or header."""


class _NotTar(Exception):
    """No valid tar header anywhere."""


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A tar number field: octal text, or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0xFF else n
    text = field.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def _checksum_ok(b: bytes) -> bool:
    try:
        stored = _number(b[148:156])
    except ValueError:
        return False
    rest = b[:148] + b[156:]
    unsigned = 256 + sum(rest)
    return stored == unsigned or stored == unsigned - 256 * sum(1 for x in rest if x > 127)


def _is_header(b: bytes, strict: bool = True) -> bool:
    """A valid header block; ``strict`` (when resyncing) also wants the ustar/GNU magic and a size."""
    if len(b) < BLOCK or b == _ZERO or not _checksum_ok(b):
        return False
    if not strict:
        return True
    try:
        return b[257:262] == b"ustar" and _number(b[124:136]) >= 0
    except ValueError:
        return False


def _legible_name(b: bytes) -> str | None:
    """The name field of a damaged header, if it still reads as a member name."""
    name = b[:100].split(b"\0", 1)[0]
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and text.isprintable() and _split_member(text) else None


def _pax(data: bytes) -> dict[str, str]:
    """pax extended header records ``"%d %s=%s\\n"``; malformed ones are dropped."""
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        try:
            n = int(data[pos:sp])
        except ValueError:
            break
        rec = data[sp + 1 : pos + n - 1]
        k, eq, v = rec.partition(b"=")
        if not eq or n <= 0:
            break
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += n
    return out


@dataclass
class _Member:
    name: str
    type: bytes
    size: int
    offset: int  # of its header
    lost: str | None = None  # its data is not readable; the detail
    cut: bool = False  # ... because the archive ends inside it (not damage)


class _TarScan:
    """Blocks of one archive; ``items()`` yields ``_Member`` and ``Damaged``. After a ``_Member``
    the caller may ``read(member)`` its data; otherwise it is skipped unread. ``ending`` says how
    the archive ended: "clean" (end-of-archive marker), "cut" (mid-header / no marker) or "lost"
    (damage without a valid header after it: the rest was reported as Damaged)."""

    def __init__(self, f, size: int | None):
        self.f, self.size = f, size
        self.pos = 0  # bytes consumed, relative to the archive start
        self._back = b""  # bytes read ahead by a scan, consumed first
        self._data_end = 0  # where the last yielded member's data (+ padding) ends
        self.ending = "cut"
        self.members = 0

    # -- raw stream
    def _read(self, n: int) -> bytes:
        out = self._back[:n]
        self._back = self._back[n:]
        if len(out) < n:
            while len(out) < n:
                chunk = self.f.read(n - len(out))
                if not chunk:
                    break
                out += chunk
        self.pos += len(out)
        return out

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self._back:
            k = min(n, len(self._back))
            self._back, self.pos, n = self._back[k:], self.pos + k, n - k
        if n and self.size is not None and getattr(self.f, "seekable", lambda: False)():
            self.f.seek(min(self.f.tell() + n, self.size))
            self.pos += n
            return
        while n > 0:
            got = len(self._read(min(n, 1 << 20)))
            if not got:
                return
            n -= got

    def read(self, m: _Member) -> bytes:
        data = self._read(m.size)
        if len(data) < m.size:
            raise _Cut(f"{m.name}: archive ends after {len(data)} of {m.size} bytes")
        return data

    def _lost_to_end(self, at: int, bad: int, what: str) -> Damaged:
        """No valid header after the damage at byte ``at``: the rest of the shard is lost."""
        self.ending = "lost"
        return Damaged(
            at,
            None,
            1 + bad,
            None,
            f"{what}; no valid header after it: the rest of the shard ({self.pos - at} bytes) is lost",
        )

    def _resync(self) -> tuple[int | None, bytes | None, int, bool]:
        """Scan forward from ``pos`` for the next valid header. Returns (its offset, the block,
        damaged headers seen on the way, whether any non-zero byte was skipped)."""
        bad_headers, nonzero = 0, False
        while True:
            chunk_at = self.pos
            chunk = self._read(_SCAN_CHUNK)
            if not chunk:
                return None, None, bad_headers, nonzero
            for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
                b = chunk[i : i + BLOCK]
                if b[257:262] == b"ustar":
                    if _is_header(b):
                        self._back = chunk[i + BLOCK :] + self._back
                        self.pos = chunk_at + i + BLOCK
                        return chunk_at + i, b, bad_headers, nonzero
                    bad_headers += 1
                nonzero = nonzero or b != _ZERO
            nonzero = nonzero or any(chunk[len(chunk) - len(chunk) % BLOCK :])

    def _after_zeros(self) -> tuple[int | None, bytes | None]:
        """Skip zero blocks; the offset and block of the first non-zero one (None at the end)."""
        while True:
            at = self.pos
            b = self._read(BLOCK)
            if not b:
                return None, None
            if b.count(0) != len(b):
                return at, b

    # -- members
    def items(self) -> Iterator[_Member | Damaged]:
        meta: dict[str, str] = {}
        pending: tuple[int, bytes] | None = None
        while True:
            self._skip(self._data_end - self.pos)
            if pending is not None:
                at, b = pending
                pending = None
            else:
                at, b = self.pos, self._read(BLOCK)
            if not b:
                return  # no end-of-archive marker: "cut"
            if len(b) < BLOCK:
                if b.count(0) == len(b) and self.members:  # short zero padding after the last member
                    return
                return  # cut mid-header
            if b == _ZERO:
                nxt_at, nxt = self._after_zeros()
                if nxt is None:
                    self.ending = "clean"
                    return
                if len(nxt) == BLOCK and _is_header(nxt, strict=False):
                    yield Damaged(
                        at,
                        nxt_at,
                        0,
                        0,
                        f"zero block(s) at bytes {at}..{nxt_at} followed by more "
                        "members (concatenated archives?); read on",
                    )
                    pending = (nxt_at, nxt)
                    continue
                self.pos, self._back = nxt_at, nxt + self._back
                found_at, found, bad, _ = self._resync()
                if found is None:
                    end = self.pos
                    yield Damaged(
                        nxt_at,
                        None,
                        bad,
                        None,
                        f"{end - nxt_at} byte(s) at {nxt_at}..{end} after the "
                        "end-of-archive marker are not tar members (trailing garbage)",
                    )
                    self.ending = "clean"
                    return
                yield Damaged(
                    nxt_at,
                    found_at,
                    max(1, bad),
                    None,
                    f"bytes {nxt_at}..{found_at} after zero block(s) "
                    f"at {at} are not tar members (a header overwritten?); resynced at byte {found_at}",
                )
                pending = (found_at, found)
                continue
            if not _is_header(b, strict=False):
                legible = _legible_name(b)
                found_at, found, bad, _ = self._resync()
                what = f"bad header checksum at byte {at}" + (f" (member {legible!r}?)" if legible else "")
                if found is None and not self.members:
                    raise _NotTar(f"no tar header found ({what})")
                if found is None:
                    yield self._lost_to_end(at, bad, what)
                    if legible:
                        yield _Member(legible, b"0", 0, at, lost=what)
                    return
                yield Damaged(
                    at, found_at, 1 + bad, None, f"{what}; bytes {at}..{found_at} skipped, resynced at byte {found_at}"
                )
                if legible:
                    yield _Member(legible, b"0", 0, at, lost=what)
                pending = (found_at, found)
                continue
            typ = b[156:157]
            try:
                size = _number(b[124:136])
            except ValueError:
                size = -1
            name = _nts(b[:100])
            if b[257:265] == b"ustar\x0000" and b[345] != 0:
                name = _nts(b[345:500]) + "/" + name
            name = meta.pop("path", name)
            if "size" in meta:
                try:
                    size = int(meta.pop("size"))
                except ValueError:
                    size = -1
            data_start = at + BLOCK
            remaining = None if self.size is None else self.size - data_start
            if size < 0 or (remaining is not None and size > remaining):
                what = f"member {name!r} at byte {at} declares {size} bytes" + (
                    f" but only {remaining} remain" if remaining is not None else ""
                )
                self.pos, self._data_end = data_start, data_start
                found_at, found, bad, nonzero = self._resync()
                if found is None and size >= 0:
                    self.ending = "cut"  # really cut mid-member: the truncated rule
                    self.members += 1
                    yield _Member(name, typ, size, at, lost=f"{what}: archive cut mid-member", cut=True)
                    return
                if found is None:
                    yield self._lost_to_end(at, bad, what)
                    yield _Member(name, b"0", 0, at, lost=what)
                    return
                yield Damaged(at, found_at, 1 + bad, None, f"{what}; resynced at byte {found_at}")
                yield _Member(name, b"0", 0, at, lost=what)
                pending = (found_at, found)
                continue
            self._data_end = data_start + -(-size // BLOCK) * BLOCK
            if typ in _META:
                if size > MAX_META_BYTES:
                    yield Damaged(
                        at,
                        self._data_end,
                        1,
                        None,
                        f"{typ.decode()} header at byte {at} declares {size} bytes (limit {MAX_META_BYTES}); skipped",
                    )
                    continue
                data = self._read(size)
                if len(data) < size:
                    return  # cut inside a header: "cut"
                if typ == b"x":
                    meta.update(_pax(data))
                elif typ == b"L":
                    meta["path"] = _nts(data)
                continue
            meta = {}
            self.members += 1
            yield _Member(name, typ, size, at)


def _open_archive(f, url: str):
    """The tar byte stream of ``f`` (unpacking gzip/bz2/xz) and its size when known."""
    head = f.read(6)
    f.seek(0)
    for magic, mod in _COMPRESSED:
        if head.startswith(magic):
            return (
                gzip.GzipFile(fileobj=f) if mod == "gzip" else bz2.BZ2File(f) if mod == "bz2" else lzma.LZMAFile(f)
            ), None
    size = getattr(f, "size", None)
    if not isinstance(size, int):
        try:
            size = f.seek(0, 2)
            f.seek(0)
        except (OSError, ValueError):
            size = None
    return f, size


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
    return (
        name.startswith(("/", "\\"))
        or ".." in parts
        or "\0" in name
        or (len(name) > 1 and name[1] == ":" and name[0].isalpha())
    )


def _member_kind(typ: bytes) -> str:
    return {b"2": "symlink", b"1": "hard link", b"3": "device", b"4": "device"}.get(typ, "special member")


def _slot(suffix: str) -> str:
    return "image" if suffix in IMAGE_EXTENSIONS else suffix


def _json_caption(meta: dict) -> str | None:
    for k in ("caption", "text"):
        v = meta.get(k)
        if isinstance(v, str) and v.strip():
            return v
    return None


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
        self.truncated: str | None = None
        self.damaged: str | None = None  # a member of it was lost in damaged framing
        self.suspect: str | None = None  # next to damaged framing: rejected if incomplete
        self.slots: set[str] = set()
        self.bytes = 0

    def add(self, suffix: str, data: bytes) -> None:
        self.bytes += len(data)
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
            return Rejected(self.key, "bad_member_name", self.bad_name)  # the raw name: never written
        key = escape_key(self.key)
        if self.damaged is not None:
            return Rejected(key, "damaged", self.damaged)
        if self.truncated is not None:
            return Rejected(key, "truncated", self.truncated)
        if self.too_large is not None:
            return Rejected(key, "too_large", self.too_large)
        if self.image is None:
            return Rejected(key, "damaged", self.suspect) if self.suspect else Rejected(key, "no_image")
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
        if not (caption or "").strip():
            caption = _json_caption(meta) or caption  # img2dataset also keeps the caption in the json
        caption = clean_caption(caption, meta)
        if not caption and self.suspect:
            return Rejected(key, "damaged", self.suspect)
        url = self.url.decode("utf-8", errors="replace").strip() if self.url is not None else None
        if url is None and isinstance(meta.get("url"), str):
            url = meta["url"]
        uid = meta.get("uid")
        return Sample(key, self.image, caption, url, uid if isinstance(uid, str) else None, meta)


class _Groups:
    """Samples being assembled, oldest first. A member joins the current sample when it has the
    same key (adjacent members), else the latest open sample of its key if that one lacks a member
    of its kind (non-adjacent members, within LOOKBEHIND_GROUPS / LOOKBEHIND_BYTES); else it starts
    a new sample (a second one of an existing key is a ``duplicate_key``). Samples are emitted in
    the order they started, so the output order does not depend on the window."""

    def __init__(self):
        self.open: collections.deque[_Group] = collections.deque()  # oldest first
        self.latest: dict[str, _Group] = {}  # key -> its newest open sample
        self.seen: set[str] = set()
        self.current: _Group | None = None
        self.bytes = 0
        self.suspect_next: str | None = None  # mark the next sample touched after damage
        self.lost_key: tuple[str, str] | None = None

    def get(self, key: str, slot: str) -> tuple[_Group, list[Sample | Rejected]]:
        g = self.current
        out: list[Sample | Rejected] = []
        if g is None or g.key != key:
            g = self.latest.get(key)
            if g is None or slot in g.slots:
                g = _Group(key)
                self.open.append(g)
                self.latest[key] = g
                self.current = g
                out = self._evict()
            self.current = g
        if self.suspect_next is not None:
            g.suspect = g.suspect or self.suspect_next
            self.suspect_next = None
        if self.lost_key is not None:
            if self.lost_key[0] == key:
                g.damaged = g.damaged or self.lost_key[1]
            self.lost_key = None
        g.slots.add(slot)
        return g, out

    def add(self, g: _Group, suffix: str, data: bytes) -> list[Sample | Rejected]:
        g.add(suffix, data)
        self.bytes += len(data)
        return self._evict()

    def damage(self, detail: str, lost_name: str | None) -> None:
        """Damaged framing here: the sample being read and the next one are suspect; a legible
        name of the lost member marks its sample (if it is the current or the next one)."""
        if self.current is not None:
            self.current.suspect = self.current.suspect or detail
        self.suspect_next = detail
        parts = _split_member(lost_name) if lost_name else None
        if parts is not None:
            if self.current is not None and self.current.key == parts[0]:
                self.current.damaged = self.current.damaged or detail
            else:
                self.lost_key = (parts[0], detail)

    def _emit(self, g: _Group) -> Sample | Rejected:
        self.bytes -= g.bytes
        if self.latest.get(g.key) is g:
            del self.latest[g.key]
        rec = g.finish()
        if rec.key in self.seen:
            rec = Rejected(rec.key, "duplicate_key")
        self.seen.add(rec.key)
        return rec

    def _evict(self) -> list[Sample | Rejected]:
        out = []
        while self.open and (len(self.open) > LOOKBEHIND_GROUPS or self.bytes > LOOKBEHIND_BYTES):
            if self.open[0] is self.current:
                break
            out.append(self._emit(self.open.popleft()))
        return out

    def flush(self) -> list[Sample | Rejected]:
        out = [self._emit(g) for g in self.open]
        self.open.clear()
        self.current = None
        return out


def _iter_tar(url: str, so: dict | None) -> Iterator[Sample | Rejected | Damaged]:
    with _open(url, so) as raw:
        try:
            stream, size = _open_archive(raw, url)
        except OSError as e:
            raise ShardReadError(f"{url}: I/O error while opening ({e})") from e
        scan = _TarScan(stream, size)
        groups = _Groups()
        try:
            for item in scan.items():
                if isinstance(item, Damaged):
                    if item.samples_lost != 0:
                        groups.damage(item.detail, None)
                    yield item
                    continue
                if item.lost is not None:
                    if item.cut:  # a real cut: its sample is truncated
                        parts = _split_member(item.name)
                        if parts is not None:
                            g, out = groups.get(parts[0], _slot(parts[1]))
                            yield from out
                            g.truncated = item.lost
                    else:
                        groups.damage(item.lost, item.name)
                    continue
                if item.type == b"5" or (item.type in _REGULAR and item.name.endswith("/")):
                    continue  # a directory
                parts = _split_member(item.name)
                if parts is None:
                    continue
                key, suffix = parts
                g, out = groups.get(key, _slot(suffix))
                yield from out
                if _unsafe(item.name):
                    g.bad_name = item.name
                elif item.type not in _REGULAR:  # links, devices, fifos: never followed
                    g.bad_name = f"{item.name} ({_member_kind(item.type)})"
                elif g.wanted(suffix):
                    if item.size > MAX_MEMBER_BYTES:
                        g.too_large = f"{item.name}: {item.size} bytes (limit {MAX_MEMBER_BYTES})"
                        continue  # never read: skipped
                    yield from groups.add(g, suffix, scan.read(item))
        except _Cut as e:
            if groups.current is not None:
                groups.current.truncated = f"archive ends mid-member ({e})"
            scan.ending = "lost"
        except _NotTar as e:
            raise PermanentShardError(f"{url}: not a tar archive ({e})") from e
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:
            if stream is raw:  # a plain file: a real I/O error (retried)
                raise ShardReadError(f"{url}: I/O error while reading ({e})") from e
            if scan.pos == 0:
                raise PermanentShardError(f"{url}: not a tar archive ({type(e).__name__}: {e})") from e
            if groups.current is not None:  # a corrupt compressed stream that ends early
                groups.current.truncated = f"{type(e).__name__}: {e}"
            scan.ending = "lost"
        if scan.pos == 0:
            return  # zero-byte file: an empty shard, not an error
        # Without an end-of-archive marker the last sample read cannot be known complete.
        if scan.ending == "cut" and groups.current is not None and groups.current.truncated is None:
            groups.current.truncated = "archive ends without end-of-archive marker"
        yield from groups.flush()


# --------------------------------------------------------------------------- corpus indexes


def _sibling(url: str, name: str) -> str:
    base, q = (url.split("?", 1) + [""])[:2]
    head = base.rsplit("/", 1)[0] if "/" in base else "."
    return f"{head}/{name}" + (f"?{q}" if q else "")


def shard_index_count(url: str, storage_options: dict | None = None) -> tuple[int, str] | None:
    """How many samples the base corpus's own index says shard ``url`` holds: img2dataset's
    ``{stem}_stats.json`` (``successes``), its sidecar ``{stem}.parquet`` beside a tar (rows with
    ``status == "success"``), or a DALI ``wds2idx`` ``{stem}.idx`` (one line per sample).
    Returns (count, which file) or None when there is no index. Never raises on a bad index."""
    base = url.split("?", 1)[0]
    stem = posixpath.basename(base)
    for ext in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    candidates = [f"{stem}_stats.json", f"{stem}.idx"] + ([f"{stem}.parquet"] if base.endswith(".tar") else [])
    for name in candidates:
        sib = _sibling(url, name)
        try:
            fs, path = fsspec.core.url_to_fs(sib, **(storage_options or {}))
            if not fs.isfile(path):
                continue
            if name.endswith("_stats.json"):
                n = json.loads(fs.cat_file(path)).get("successes")
                if isinstance(n, int) and not isinstance(n, bool):
                    return n, name
            elif name.endswith(".idx"):
                lines = [ln for ln in fs.cat_file(path).decode("utf-8", "replace").splitlines() if ln.strip()]
                head = lines[0].split() if lines else []
                if head and head[0].startswith("v") and len(head) > 1 and head[1].isdigit():
                    return int(head[1]), name
                return len(lines), name
            else:
                with fs.open(path, "rb") as f:
                    t = pq.read_table(f, columns=None)
                if "status" in t.column_names:
                    return sum(1 for v in t.column("status").to_pylist() if v == "success"), name
                return t.num_rows, name
        except Exception:  # noqa: BLE001 - a missing or unreadable index is no index
            continue
    return None


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
            raise PermanentShardError(f"{url}: missing required column(s) {', '.join(missing)}; has {schema.names}")
        t = schema.field(image_col).type
        if not (
            _is_bytes(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_bytes(t.field("bytes").type))
        ):
            raise PermanentShardError(f"{url}: image column {image_col!r} has type {t}, expected binary")
        caption_col = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
        if caption_col is not None:
            ct = schema.field(caption_col).type
            if not (_is_bytes(ct) or pa.types.is_string(ct) or pa.types.is_large_string(ct) or pa.types.is_null(ct)):
                raise PermanentShardError(f"{url}: caption column {caption_col!r} has type {ct}, expected string")
        known = {"key", image_col, caption_col, "url", "uid"}
        seen: set[str] = set()
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
                for rec in batch.to_pylist():
                    row += 1
                    key = rec.get("key")
                    if isinstance(key, bytes):
                        key = key.decode("utf-8", errors="replace")
                    if key is None or not str(key).strip():
                        yield Rejected(f"<row {row - 1}>", "no_key", "null key" if key is None else "empty key")
                        continue
                    key = escape_key(str(key))
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
                    yield Sample(
                        key,
                        image,
                        caption,
                        url_ if isinstance(url_, str) else None,
                        uid if isinstance(uid, str) else None,
                        meta,
                    )
        except (pa.ArrowException, OSError) as e:
            raise ShardReadError(f"{url}: corrupt Parquet data after {row} rows ({e})") from e
