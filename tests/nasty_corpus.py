"""A deliberately dirty base corpus: every way a web-scale image-text shard goes wrong.

``make_nasty_corpus(out_dir)`` writes a handful of small shards (tar and Parquet) and
returns a ``NastyCorpus`` that says, for every sample, what must happen to it: ``written``
or the rejection reason (the reasons are listed in docs/bad-data.md). Tests run it through
``dr reinforce`` and compare the committed markers with these expectations exactly.

Shards (file name -> what it holds):

``images.tar``        image zoo: corrupt / cut / zero-byte JPEG, 1x1 PNG, RGBA, palette with
                      transparency, 16-bit and 8-bit grayscale, LA, CMYK JPEG, a decompression
                      bomb (1-bit PNG declaring 30000x30000, ~110 KB), an EXIF-rotated JPEG,
                      PostScript bytes named .jpg, a key shared with ``captions.tar``
``captions.tar``      caption and member zoo: non-UTF-8, missing, empty, blank and 50 KB
                      captions, caption only in the JSON, a duplicate key inside the shard,
                      caption without image, unknown extensions, member names with ``../`` or an
                      absolute path, a symlink, pickle payloads in ``.pyd``/``.pth``/``.npy``
                      members, the key shared with ``images.tar``
``truncated.tar``     cut in the middle of its last sample's image
``empty.tar``         a valid tar without members;  ``zero-bytes.tar``: a 0-byte file
``rows.parquet``      img2dataset-style Parquet with a null key, a null image, a duplicate
                      key, corrupt bytes, a non-UTF-8 (binary) caption, a null caption, a 4x4 image
``wrong-schema.parquet``  image column of type string: the shard fails, permanently
``does-not-exist.tar``    listed in the job, never written: the shard fails, permanently

The expectations assume the job defaults ``min_image_side: 8`` and
``dr_pipeline.images.MAX_IMAGE_PIXELS``. The pickle payloads, if ever executed, create the
file ``NastyCorpus.sentinel``; tests assert it never exists. This module lives in ``tests/``,
not in the package: it builds hostile *input* (pickle payloads included), and nothing the
package writes or reads is ever pickled.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

WRITTEN = "written"
LONG_CAPTION_BYTES = 50_000


@dataclass(frozen=True)
class Case:
    key: str
    what: str
    outcome: str  # WRITTEN or the rejection reason


@dataclass
class NastyShard:
    name: str  # shard name (output shard of the same name)
    url: str
    cases: list[Case] = field(default_factory=list)
    error: str | None = None  # the whole shard fails: a substring of its error

    @property
    def n_read(self) -> int:
        return len(self.cases)

    @property
    def written(self) -> list[str]:
        return [c.key for c in self.cases if c.outcome == WRITTEN]

    @property
    def rejected(self) -> list[tuple[str, str]]:
        """(key, reason) in shard order."""
        return [(c.key, c.outcome) for c in self.cases if c.outcome != WRITTEN]

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r for _, r in self.rejected).items()))


@dataclass
class NastyCorpus:
    root: str
    shards: list[NastyShard]
    sentinel: str  # created only if a pickle payload ever runs

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    def shard(self, name: str) -> NastyShard:
        return next(s for s in self.shards if s.name == name)


# --------------------------------------------------------------------------- payloads


class _OpenPayload:
    """Unpickling this calls ``open(path, "w")``: a visible side effect, no shell needed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_payload(sentinel: str) -> bytes:
    """Plain pickle bytes whose loading creates ``sentinel``."""
    return pickle.dumps(_OpenPayload(sentinel))


def torch_payload(sentinel: str) -> bytes:
    """A ``torch.save`` file whose ``torch.load(weights_only=False)`` creates ``sentinel``."""
    import torch

    buf = io.BytesIO()
    torch.save({"image_emb": _OpenPayload(sentinel)}, buf)
    return buf.getvalue()


def npz_payload(sentinel: str) -> bytes:
    """An ``.npz`` whose object array unpickles (``allow_pickle=True``) into the payload."""
    buf = io.BytesIO()
    arr = np.empty(1, dtype=object)
    arr[0] = _OpenPayload(sentinel)
    np.savez(buf, image_emb=arr)
    return buf.getvalue()


def npy_payload(sentinel: str) -> bytes:
    buf = io.BytesIO()
    arr = np.empty(1, dtype=object)
    arr[0] = _OpenPayload(sentinel)
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def write_malicious_datacompdr_tar(path: str, sentinel: str) -> str:
    """A DataCompDR-layout tar whose ``pth.gz`` (sample a) and ``npz`` (sample b) carry payloads."""
    members = [
        ("a.url.txt", b"http://x/a"),
        ("a.syn.json", json.dumps({"syn_text": ["a"]}).encode()),
        ("a.pth.gz", gzip.compress(torch_payload(sentinel))),
        ("b.url.txt", b"http://x/b"),
        ("b.npz", npz_payload(sentinel)),
    ]
    with open(path, "wb") as f:
        _write_tar(f, members)
    return path


# --------------------------------------------------------------------------- images


def _pixels(w: int, h: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx * 255 // max(w - 1, 1)) ^ (yy * 255 // max(h - 1, 1))).astype(np.uint8)
    noise = rng.integers(0, 40, size=(h, w, channels), dtype=np.uint8)
    return (base[..., None] // 2 + noise).astype(np.uint8) if channels > 1 else base


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(w: int = 48, h: int = 40, seed: int = 0, **kw) -> bytes:
    return _encode(Image.fromarray(_pixels(w, h, seed), "RGB"), "JPEG", quality=90, **kw)


def exif_rotated_jpeg(w: int = 48, h: int = 32, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(w, h, seed=5, exif=exif.tobytes())


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A real decompression bomb: a 1-bit PNG of zeros declaring width x height (~width*height/8
    bytes once decoded by PIL as mode "1", 1 byte per pixel) in a file of ~1/1000 that size."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = 1 + (width + 7) // 8  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = bytes(row * 256)
    out = []
    for start in range(0, height, 256):
        out.append(comp.compress(block[: row * min(256, height - start)]))
    out.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(out)) + chunk(b"IEND", b"")


def image_zoo() -> list[tuple[str, str, bytes, str]]:
    """(key, what, image bytes, outcome) for every image case of ``images.tar``."""
    rgba = np.dstack([_pixels(40, 36, 1), np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (36, 1))])
    pal = Image.fromarray(_pixels(40, 36, 2), "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    gray16 = (np.arange(36 * 40, dtype=np.uint32).reshape(36, 40) * 45).astype(np.uint16)
    la = np.dstack([_pixels(40, 36, 3, 1), np.full((36, 40), 128, np.uint8)])
    good = jpeg(48, 40, seed=0)
    return [
        ("good-rgb", "plain RGB JPEG", good, WRITTEN),
        ("corrupt-jpeg", "JPEG magic followed by garbage", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "undecodable"),
        ("cut-jpeg", "the first half of a valid JPEG", good[: len(good) // 2], "undecodable"),
        ("zero-byte", "0-byte image member", b"", "empty_image"),
        ("one-pixel", "1x1 PNG", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "too_small"),
        (
            "png-rgba",
            "RGBA PNG, alpha ramp (composited on white)",
            _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
            WRITTEN,
        ),
        ("png-palette", "palette PNG with a transparent index", _encode(pal, "PNG", transparency=0), WRITTEN),
        ("png-16bit", "16-bit grayscale PNG (I;16, scaled to 8 bit)", _encode(Image.fromarray(gray16), "PNG"), WRITTEN),
        ("png-gray", "8-bit grayscale PNG", _encode(Image.fromarray(_pixels(40, 36, 4, 1), "L"), "PNG"), WRITTEN),
        ("png-la", "grayscale + alpha PNG", _encode(Image.fromarray(la, "LA"), "PNG"), WRITTEN),
        (
            "jpeg-cmyk",
            "CMYK JPEG",
            _encode(Image.fromarray(_pixels(40, 36, 6), "RGB").convert("CMYK"), "JPEG"),
            WRITTEN,
        ),
        ("bomb", "1-bit PNG declaring 30000x30000 pixels", bomb_png(), "too_large"),
        ("exif-rotated", "JPEG 48x32 with EXIF orientation 6 (kept as stored)", exif_rotated_jpeg(), WRITTEN),
        (
            "postscript",
            "EPS bytes named .jpg (PIL's Ghostscript plugin must not run)",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\nnewpath 0 0 moveto showpage\n",
            "undecodable",
        ),
    ]


# --------------------------------------------------------------------------- writing


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def _write_tar(f, members: list) -> None:
    """members: (name, bytes) for files, or a ready TarInfo (links)."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                name, data = m
                tar.addfile(_info(name, len(data)), io.BytesIO(data))


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 0
    return info


def _images_shard(path: str) -> list[Case]:
    members, cases = [], []
    for key, what, data, outcome in image_zoo():
        members += [
            (f"{key}.jpg" if key != "one-pixel" else f"{key}.png", data),
            (f"{key}.txt", f"a picture: {what}".encode()),
        ]
        cases.append(Case(key, what, outcome))
    members += [("dup-across.jpg", jpeg(44, 40, seed=7)), ("dup-across.txt", b"the same key is in captions.tar")]
    cases.append(Case("dup-across", "key also used in captions.tar (written in both shards)", WRITTEN))
    with open(path, "wb") as f:
        _write_tar(f, members)
    return cases


def _captions_shard(path: str, sentinel: str) -> list[Case]:
    img = jpeg(40, 40, seed=11)
    long_caption = ("a very long caption " * (LONG_CAPTION_BYTES // 20 + 1))[:LONG_CAPTION_BYTES].encode()
    cases = [
        (
            "non-utf8",
            [("non-utf8.jpg", img), ("non-utf8.txt", b"caf\xe9 au lait \xff\xfe")],
            "caption with invalid UTF-8 (decoded with U+FFFD)",
            WRITTEN,
        ),
        ("no-caption", [("no-caption.jpg", img)], "image without any caption", "no_caption"),
        ("empty-caption", [("empty-caption.jpg", img), ("empty-caption.txt", b"")], "0-byte caption", "no_caption"),
        (
            "blank-caption",
            [("blank-caption.jpg", img), ("blank-caption.txt", b" \n\t ")],
            "whitespace caption",
            "no_caption",
        ),
        (
            "long-caption",
            [("long-caption.jpg", img), ("long-caption.txt", long_caption)],
            "50 KB caption (stored cut to MAX_CAPTION_CHARS)",
            WRITTEN,
        ),
        (
            "json-caption",
            [("json-caption.jpg", img), ("json-caption.json", json.dumps({"caption": "from json"}).encode())],
            "caption only inside the .json (img2dataset)",
            WRITTEN,
        ),
        (
            "dup-inside",
            [("dup-inside.jpg", img), ("dup-inside.txt", b"first of two")],
            "first of a duplicated key",
            WRITTEN,
        ),
        ("caption-only", [("caption-only.txt", b"an orphan caption")], "caption but no image", "no_image"),
        (
            "unknown-ext",
            [
                ("unknown-ext.jpg", img),
                ("unknown-ext.txt", b"with extras"),
                ("unknown-ext.xyz", b"?"),
                ("unknown-ext.cls", b"7"),
            ],
            "unknown extra members (ignored)",
            WRITTEN,
        ),
        ("only-unknown", [("only-unknown.xyz", b"?")], "a key with only an unknown member", "no_image"),
        (
            "../escape",
            [("../escape.jpg", img), ("../escape.txt", b"path traversal")],
            "member names with ../",
            "bad_member_name",
        ),
        (
            "/tmp/dr-nasty-absolute",
            [("/tmp/dr-nasty-absolute.jpg", img), ("/tmp/dr-nasty-absolute.txt", b"absolute")],
            "absolute member names",
            "bad_member_name",
        ),
        (
            "a/../../nested",
            [("a/../../nested.jpg", img), ("a/../../nested.txt", b"nested traversal")],
            "../ inside the path",
            "bad_member_name",
        ),
        (
            "symlink",
            [_symlink("symlink.jpg", "/etc/passwd"), ("symlink.txt", b"a link")],
            "symlink member",
            "bad_member_name",
        ),
        (
            "pickled",
            [
                ("pickled.jpg", img),
                ("pickled.txt", b"carries payloads"),
                ("pickled.pyd", pickle_payload(sentinel)),
                ("pickled.pth", torch_payload(sentinel)),
                ("pickled.npy", npy_payload(sentinel)),
            ],
            "pickle payloads in .pyd/.pth/.npy members (never loaded)",
            WRITTEN,
        ),
        (
            "dup-inside",
            [("dup-inside.jpg", img), ("dup-inside.txt", b"second of two")],
            "second of a duplicated key",
            "duplicate_key",
        ),
        (
            "dup-across",
            [("dup-across.jpg", jpeg(44, 40, seed=8)), ("dup-across.txt", b"also in images.tar")],
            "key also used in images.tar",
            WRITTEN,
        ),
    ]
    with open(path, "wb") as f:
        _write_tar(f, [m for _, ms, _, _ in cases for m in ms])
    return [Case(key, what, outcome) for key, _, what, outcome in cases]


def _truncated_shard(path: str) -> list[Case]:
    keys = [f"t{i}" for i in range(4)]
    buf = io.BytesIO()
    _write_tar(
        buf,
        [
            m
            for i, k in enumerate(keys)
            for m in ((f"{k}.txt", f"sample {k}".encode()), (f"{k}.jpg", jpeg(40, 40, seed=20 + i)))
        ],
    )
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        last = t.getmember("t3.jpg")
    with open(path, "wb") as f:
        f.write(raw[: last.offset_data + last.size // 2])  # cut mid-member
    return [Case(k, "complete sample before the cut", WRITTEN) for k in keys[:3]] + [
        Case("t3", "image member cut in half", "truncated")
    ]


def _rows_parquet(path: str) -> list[Case]:
    img = jpeg(40, 40, seed=30)
    rows = [
        ("p-good", img, b"a fine row", WRITTEN, "good row"),
        (None, img, b"no key", "no_key", "null key"),
        ("p-null-image", None, b"no image", "no_image", "null image"),
        ("p-good", img, b"again", "duplicate_key", "duplicate key"),
        ("p-corrupt", b"\x89PNG\r\n\x1a\nnot really", b"corrupt", "undecodable", "corrupt PNG bytes"),
        ("p-non-utf8", img, b"na\xefve caption", WRITTEN, "non-UTF-8 bytes in a binary caption column"),
        ("p-null-caption", img, None, "no_caption", "null caption"),
        ("p-tiny", _encode(Image.new("RGB", (4, 4)), "PNG"), b"tiny", "too_small", "4x4 image"),
    ]
    table = pa.table(
        {
            "key": pa.array([r[0] for r in rows], pa.string()),
            "jpg": pa.array([r[1] for r in rows], pa.binary()),
            "caption": pa.array([r[2] for r in rows], pa.binary()),
            "url": pa.array([f"http://example.invalid/{i}" for i in range(len(rows))], pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=3)
    return [Case(r[0] if r[0] is not None else f"<row {i}>", r[4], r[3]) for i, r in enumerate(rows)]


def make_nasty_corpus(out_dir: str) -> NastyCorpus:
    """Write the nasty shards under local folder ``out_dir``; returns them with expectations."""
    os.makedirs(out_dir, exist_ok=True)
    root = os.path.abspath(out_dir)
    sentinel = os.path.join(root, "PAYLOAD_EXECUTED")

    def p(name: str) -> str:
        return os.path.join(root, name)

    shards = [
        NastyShard("images", p("images.tar"), _images_shard(p("images.tar"))),
        NastyShard("captions", p("captions.tar"), _captions_shard(p("captions.tar"), sentinel)),
        NastyShard("truncated", p("truncated.tar"), _truncated_shard(p("truncated.tar"))),
    ]
    with open(p("empty.tar"), "wb") as f:
        _write_tar(f, [])
    with open(p("zero-bytes.tar"), "wb"):
        pass
    shards += [
        NastyShard("empty", p("empty.tar")),
        NastyShard("zero-bytes", p("zero-bytes.tar")),
        NastyShard("rows", p("rows.parquet"), _rows_parquet(p("rows.parquet"))),
    ]
    pq.write_table(
        pa.table({"key": ["w0", "w1"], "image": ["not", "bytes"], "caption": ["a", "b"]}), p("wrong-schema.parquet")
    )
    shards += [
        NastyShard("wrong-schema", p("wrong-schema.parquet"), error="has type string, expected binary"),
        NastyShard("does-not-exist", p("does-not-exist.tar"), error="file not found"),
    ]
    return NastyCorpus(root, shards, sentinel)


__all__ = [
    "make_nasty_corpus",
    "NastyCorpus",
    "NastyShard",
    "Case",
    "WRITTEN",
    "bomb_png",
    "image_zoo",
    "pickle_payload",
    "torch_payload",
    "npz_payload",
    "write_malicious_datacompdr_tar",
]
