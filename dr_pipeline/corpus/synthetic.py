"""Deterministic synthetic image-text corpus: procedurally drawn shape scenes.

Every image holds 1-3 shapes (shape, colour, size, position) on a textured background,
and its caption names exactly those attributes, so the labels double as zero-shot
targets. The same seed gives byte-identical shards; each sample draws from its own RNG
keyed by (seed, shard, idx), so shards can be generated independently and in any order.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "pentagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "purple": (130, 40, 170), "orange": (245, 140, 20),
    "white": (250, 250, 250), "black": (15, 15, 15), "pink": (245, 140, 190),
    "brown": (120, 70, 30), "gray": (128, 128, 128), "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "dotted")

# Shape centre as a fraction of (width, height), and the caption phrase per position.
_CENTRES = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22),
            "bottom": (0.5, 0.78), "center": (0.5, 0.5)}
_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
            "bottom": "at the bottom", "center": "in the center"}
_RADIUS = {"small": 0.09, "large": 0.17}  # fraction of min(width, height)

TAR_FORMAT = tarfile.USTAR_FORMAT


@dataclass(frozen=True)
class ShapeAttrs:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class SceneAttrs:
    objects: tuple[ShapeAttrs, ...]
    background_colour: str
    background: str  # one of BACKGROUNDS

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects],
                "background_colour": self.background_colour, "background": self.background}


def caption_for(attrs: SceneAttrs) -> str:
    parts = [f"a {o.size} {o.colour} {o.shape} {_PHRASES[o.position]}" for o in attrs.objects]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = attrs.background_colour
    bg = f"plain {bg}" if attrs.background == "plain" else f"{bg} {attrs.background}"
    return f"{things}, on a {bg} background"


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    """Blend towards white (f > 0) or black (f < 0)."""
    target = 255 if f > 0 else 0
    return tuple(int(round(c + (target - c) * abs(f))) for c in rgb)  # type: ignore[return-value]


def _background(kind: str, rgb: tuple[int, int, int], w: int, h: int,
                rng: np.random.Generator) -> Image.Image:
    base = np.array(rgb, dtype=np.float32)
    alt = np.array(_shade(rgb, 0.35 if sum(rgb) < 384 else -0.35), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "plain":
        mix = np.zeros((h, w), np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        mix = ((t - t.min()) / max(float(np.ptp(t)), 1.0)).astype(np.float32)
    elif kind == "striped":
        period = int(rng.integers(8, 24))
        coord = xx if rng.random() < 0.5 else yy
        mix = ((coord // (period // 2)) % 2).astype(np.float32)
    elif kind == "checkered":
        cell = int(rng.integers(8, 24))
        mix = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    elif kind == "dotted":
        step = int(rng.integers(10, 20))
        d = np.hypot(xx % step - step / 2, yy % step - step / 2)
        mix = (d < step / 5).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}")
    pixels = base + mix[..., None] * (alt - base)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _polygon(cx: float, cy: float, r: float, n: int, rot: float = -math.pi / 2,
             inner: float | None = None) -> list[tuple[float, float]]:
    """Regular n-gon (or n-pointed star when `inner` is the inner radius ratio)."""
    pts = []
    steps = 2 * n if inner else n
    for i in range(steps):
        rr = r * (inner if inner and i % 2 else 1.0)
        a = rot + 2 * math.pi * i / steps
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, inner=0.45), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot=0.0), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(rng: np.random.Generator, width: int, height: int
                 ) -> tuple[Image.Image, str, SceneAttrs]:
    """Draw one scene; returns (RGB image, caption, attributes)."""
    colours = list(COLOURS)
    bg_colour = colours[int(rng.integers(len(colours)))]
    bg_kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    n = int(rng.integers(1, 4))
    # Distinct positions keep the caption unambiguous; shape colours differ from the background.
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    fg = [c for c in colours if c != bg_colour]
    objects = tuple(
        ShapeAttrs(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                   colour=fg[int(rng.integers(len(fg)))],
                   size=SIZES[int(rng.integers(len(SIZES)))],
                   position=POSITIONS[int(p)])
        for p in positions)
    attrs = SceneAttrs(objects=objects, background_colour=bg_colour, background=bg_kind)

    img = _background(bg_kind, COLOURS[bg_colour], width, height, rng)
    draw = ImageDraw.Draw(img)
    m = min(width, height)
    for o in objects:
        fx, fy = _CENTRES[o.position]
        jx, jy = rng.uniform(-0.04, 0.04, size=2)
        _draw_shape(draw, o.shape, (fx + jx) * width, (fy + jy) * height,
                    _RADIUS[o.size] * m, COLOURS[o.colour])
    return img, caption_for(attrs), attrs


def sample_key(shard: int, idx: int) -> str:
    return f"{shard:05d}{idx:04d}"  # img2dataset style


def sample_uid(seed: int, key: str) -> str:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=16).hexdigest()


def make_sample(seed: int, shard: int, idx: int) -> dict:
    """One sample as a dict (key, uid, url, caption, jpg bytes, width, height, label)."""
    rng = np.random.default_rng([seed, shard, idx])
    width, height = (int(v) for v in rng.integers(96, 321, size=2))
    img, caption, attrs = render_scene(rng, width, height)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    key = sample_key(shard, idx)
    uid = sample_uid(seed, key)
    return {"key": key, "uid": uid, "url": f"https://synthetic.example/{uid}.jpg",
            "caption": caption, "jpg": buf.getvalue(), "width": width, "height": height,
            "label": attrs.to_dict()}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata -> byte-identical tars
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_tar(f, samples: list[dict]) -> None:
    with tarfile.open(fileobj=f, mode="w", format=TAR_FORMAT) as tar:
        for s in samples:
            k = s["key"]
            meta = {"key": k, "uid": s["uid"], "caption": s["caption"],
                    "width": s["width"], "height": s["height"], "label": s["label"]}
            _add_member(tar, f"{k}.jpg", s["jpg"])
            _add_member(tar, f"{k}.txt", s["caption"].encode("utf-8"))
            _add_member(tar, f"{k}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            _add_member(tar, f"{k}.url.txt", s["url"].encode("utf-8"))


PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("url", pa.string()),
    ("caption", pa.string()), ("jpg", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()),
])


def _write_parquet(f, samples: list[dict]) -> None:
    cols = {name: [s[name] for s in samples] for name in PARQUET_SCHEMA.names}
    pq.write_table(pa.table(cols, schema=PARQUET_SCHEMA), f, compression="zstd")


def make_corpus(out_dir: str, n_shards: int = 4, per_shard: int = 32, seed: int = 0,
                formats: Sequence[str] = ("tar", "parquet"),
                storage_options: dict | None = None) -> list[str]:
    """Write `{out_dir}/tar/shard-XXXXX.tar` and/or `{out_dir}/parquet/shard-XXXXX.parquet`.

    `out_dir` is any fsspec URL. Both formats hold the same samples and JPEG bytes.
    Returns the written shard URLs (tar shards first, then parquet, in shard order).
    """
    unknown = set(formats) - {"tar", "parquet"}
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; expected 'tar' and/or 'parquet'")
    so = storage_options or {}
    out = out_dir.rstrip("/")
    written: dict[str, list[str]] = {fmt: [] for fmt in formats}
    for shard in range(n_shards):
        samples = [make_sample(seed, shard, i) for i in range(per_shard)]
        for fmt in formats:
            url = f"{out}/{fmt}/shard-{shard:05d}.{fmt}"
            with fsspec.open(url, "wb", **so) as f:
                (_write_tar if fmt == "tar" else _write_parquet)(f, samples)
            written[fmt].append(url)
    return [u for fmt in formats for u in written[fmt]]
