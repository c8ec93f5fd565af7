"""Deterministic synthetic image-text corpus: procedurally drawn shape scenes.

Every image holds 1-3 shapes (shape, colour, size, position) on a textured background,
and its caption names exactly those attributes, so the labels double as zero-shot
targets. The same seed gives byte-identical shards; each sample draws from its own RNG
keyed by (seed, shard, idx), so shards can be generated independently and in any order.
"""

from __future__ import annotations

import dataclasses
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
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (245, 140, 190),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "dotted")

# Shape centre as a fraction of (width, height), and the caption phrase per position.
_CENTRES = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "center": (0.5, 0.5)}
_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
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
        return {
            "objects": [asdict(o) for o in self.objects],
            "background_colour": self.background_colour,
            "background": self.background,
        }


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


def _background(kind: str, rgb: tuple[int, int, int], w: int, h: int, rng: np.random.Generator) -> Image.Image:
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
    elif kind == "noise":  # split corpora only (SPLIT_BACKGROUNDS): a grainy texture
        mix = rng.random((h, w), dtype=np.float32) * 0.6
    else:
        raise ValueError(f"unknown background {kind!r}")
    pixels = base + mix[..., None] * (alt - base)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _polygon(
    cx: float, cy: float, r: float, n: int, rot: float = -math.pi / 2, inner: float | None = None
) -> list[tuple[float, float]]:
    """Regular n-gon (or n-pointed star when `inner` is the inner radius ratio)."""
    pts = []
    steps = 2 * n if inner else n
    for i in range(steps):
        rr = r * (inner if inner and i % 2 else 1.0)
        a = rot + 2 * math.pi * i / steps
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
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


def render_scene(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, SceneAttrs]:
    """Draw one scene; returns (RGB image, caption, attributes)."""
    colours = list(COLOURS)
    bg_colour = colours[int(rng.integers(len(colours)))]
    bg_kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    n = int(rng.integers(1, 4))
    # Distinct positions keep the caption unambiguous; shape colours differ from the background.
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    fg = [c for c in colours if c != bg_colour]
    objects = tuple(
        ShapeAttrs(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=fg[int(rng.integers(len(fg)))],
            size=SIZES[int(rng.integers(len(SIZES)))],
            position=POSITIONS[int(p)],
        )
        for p in positions
    )
    attrs = SceneAttrs(objects=objects, background_colour=bg_colour, background=bg_kind)

    img = _background(bg_kind, COLOURS[bg_colour], width, height, rng)
    draw = ImageDraw.Draw(img)
    m = min(width, height)
    for o in objects:
        fx, fy = _CENTRES[o.position]
        jx, jy = rng.uniform(-0.04, 0.04, size=2)
        _draw_shape(draw, o.shape, (fx + jx) * width, (fy + jy) * height, _RADIUS[o.size] * m, COLOURS[o.colour])
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
    return {
        "key": key,
        "uid": uid,
        "url": f"https://synthetic.example/{uid}.jpg",
        "caption": caption,
        "jpg": buf.getvalue(),
        "width": width,
        "height": height,
        "label": attrs.to_dict(),
    }


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
            meta = {
                "key": k,
                "uid": s["uid"],
                "caption": s["caption"],
                "width": s["width"],
                "height": s["height"],
                "label": s["label"],
            }
            _add_member(tar, f"{k}.jpg", s["jpg"])
            _add_member(tar, f"{k}.txt", s["caption"].encode("utf-8"))
            _add_member(tar, f"{k}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            _add_member(tar, f"{k}.url.txt", s["url"].encode("utf-8"))


PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def _write_parquet(f, samples: list[dict]) -> None:
    cols = {name: [s[name] for s in samples] for name in PARQUET_SCHEMA.names}
    pq.write_table(pa.table(cols, schema=PARQUET_SCHEMA), f, compression="zstd")


def make_corpus(
    out_dir: str,
    n_shards: int = 4,
    per_shard: int = 32,
    seed: int = 0,
    formats: Sequence[str] = ("tar", "parquet"),
    storage_options: dict | None = None,
) -> list[str]:
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


# =========================================================================== splits
# The splits of the learning-efficiency experiment (`dr make-corpus --split clean|web|test`):
#
#   clean  accurate compositional captions: what the teachers and the captioner learn from
#          (stands in for DFN-2B / MSCOCO-38k);
#   web    the base corpus to reinforce: other images, captions corrupted like alt-text by
#          ``WebNoise`` (attributes missing, wrong or replaced by unrelated words, objects
#          left out, boilerplate added, some captions unrelated to the image);
#   test   held out: single-object images in a ``zeroshot/<colour>_<shape>/`` folder for
#          zero-shot classification (12 colours x 5 shapes = 60 classes; `dr eval` reads the layout) plus shards of
#          multi-object scenes with clean captions for retrieval.
#
# Every split draws from its own RNG stream (seed, split, shard, idx), so no image repeats
# across splits and ``make_corpus`` above is untouched. Split images are square-ish
# (128-176 px, aspect 0.9-1.1) so a centre crop keeps every object, objects are a little
# larger than in the demo corpus, backgrounds add a noise texture, and JPEG quality varies.

SPLITS = ("clean", "web", "test")
_STREAM = {"clean": 101, "web": 102, "test": 103, "zeroshot": 104}
_NOISE_STREAM = 7
_CAPTION_STREAM = 11
CLEAN_GROUP = 2  # clean-split scenes per minimal group (make_split_sample)
SPLIT_SIDE = (128, 176)
SPLIT_ASPECT = (0.9, 1.1)
SPLIT_BACKGROUNDS = BACKGROUNDS + ("noise",)
# Shapes of the splits: the five that stay distinct at 48-64 px (a 13-px hexagon, pentagon and
# circle, or a diamond and a square, are hard to tell apart even for a person).
SPLIT_SHAPES = ("circle", "square", "triangle", "star", "cross")
SPLIT_RADIUS = {"small": 0.13, "large": 0.2}
SPLIT_JPEG_QUALITY = {"clean": (80, 95), "web": (50, 90), "test": (80, 95), "zeroshot": (80, 95)}
ZEROSHOT_DIR = "zeroshot"
ZEROSHOT_LABELS = "zeroshot.jsonl"
# Prompts for zero-shot classification in the domain's own caption language (the captions
# name objects as "a [size] <colour> <shape> [position]"); `dr eval` on the folder uses
# generic photo templates instead.
ZEROSHOT_TEMPLATES = ("a {}", "a small {}", "a large {}", "a {} in the center")

# Alt-text boilerplate. None of these words is a colour, shape, size or position word, so a
# caption's attribute words always come from the scene (or from a designed "wrong" draw).
JUNK_CAPTIONS = (
    "click here to download",
    "free shipping on all orders",
    "home page banner",
    "untitled design",
    "our team at the annual meeting",
    "view from the hotel room",
    "best deals of the week",
    "wedding invitation card",
    "a man riding a bike on the street",
    "sunset over the ocean",
    "cute dog playing in the park",
    "fresh vegetables at the market",
    "new collection now available",
    "photo by the author",
    "a cup of coffee on a table",
    "map of the city",
    "image not available",
    "summer sale up to fifty percent off",
    "family vacation photos",
    "screenshot of the app",
)
JUNK_WORDS = (
    "vector",
    "stock",
    "icon",
    "logo",
    "clipart",
    "hd",
    "wallpaper",
    "png",
    "design",
    "art",
    "image",
    "free",
    "template",
    "abstract",
    "illustration",
    "sticker",
)
GENERIC_NOUNS = ("shape", "object", "thing", "figure")
AFFIXES = (
    "stock illustration",
    "free vector",
    "hd wallpaper",
    "clip art",
    "icon set",
    "royalty free image",
    "download png",
    "graphic design element",
    "img 2041",
    "photo 17",
)
AFFIX_SEP = " - "


@dataclass(frozen=True)
class AttrNoise:
    """How one attribute of an object phrase is corrupted: left out, replaced by another value
    of the same kind (wrong), or replaced by an unrelated word (junk); correct otherwise."""

    missing: float = 0.0
    wrong: float = 0.0
    junk: float = 0.0

    @property
    def correct(self) -> float:
        return 1.0 - self.missing - self.wrong - self.junk

    def __post_init__(self) -> None:
        if min(self.missing, self.wrong, self.junk) < 0 or self.correct < -1e-12:
            raise ValueError(f"noise rates must be >= 0 and sum to <= 1: {self}")


@dataclass(frozen=True)
class WebNoise:
    """The web split's caption noise. ``unrelated``: the caption is boilerplate about something
    else. Otherwise every object after the first is left out with ``drop_object``, and each of
    its attributes is corrupted per its ``AttrNoise`` (a missing shape becomes a generic noun,
    "shape"/"thing"); the background phrase is left out (``background.missing``) or names a
    wrong colour; ``affix`` adds alt-text boilerplate before or after the caption."""

    unrelated: float = 0.2  # (clean captions never name the background; alt-text may, rightly or not)
    drop_object: float = 0.3
    colour: AttrNoise = AttrNoise(missing=0.2, wrong=0.1, junk=0.05)
    shape: AttrNoise = AttrNoise(missing=0.15, wrong=0.1, junk=0.05)
    size: AttrNoise = AttrNoise(missing=0.5, wrong=0.1)
    position: AttrNoise = AttrNoise(missing=0.5, wrong=0.1)
    background: AttrNoise = AttrNoise(missing=0.6, wrong=0.1)
    affix: float = 0.4


DEFAULT_WEB_NOISE = WebNoise()


def _noisy(
    rng: np.random.Generator, noise: AttrNoise, value: str, choices: Sequence[str], junk: Sequence[str]
) -> tuple[str, str | None]:
    """(outcome, word): outcome in correct/missing/wrong/junk. Always two draws (fixed stream use)."""
    r, pick = rng.random(), rng.random()
    if r < noise.missing:
        return "missing", None
    if r < noise.missing + noise.wrong:
        others = [c for c in choices if c != value]
        return "wrong", others[int(pick * len(others))]
    if r < noise.missing + noise.wrong + noise.junk:
        return "junk", junk[int(pick * len(junk))]
    return "correct", value


def web_caption(attrs: SceneAttrs, rng: np.random.Generator, noise: WebNoise = DEFAULT_WEB_NOISE) -> str:
    """A noisy alt-text-like caption of the scene (see ``WebNoise``)."""
    if rng.random() < noise.unrelated:
        return JUNK_CAPTIONS[int(rng.integers(len(JUNK_CAPTIONS)))]
    phrases = []
    for i, o in enumerate(attrs.objects):
        if i > 0 and rng.random() < noise.drop_object:
            continue
        _, size = _noisy(rng, noise.size, o.size, SIZES, JUNK_WORDS)
        _, colour = _noisy(rng, noise.colour, o.colour, list(COLOURS), JUNK_WORDS)
        kind, shape = _noisy(rng, noise.shape, o.shape, SPLIT_SHAPES, JUNK_WORDS)
        if kind == "missing":
            shape = GENERIC_NOUNS[int(rng.integers(len(GENERIC_NOUNS)))]
        _, pos = _noisy(rng, noise.position, o.position, POSITIONS, ())
        words = ["a"] + [w for w in (size, colour, shape) if w] + ([_PHRASES[pos]] if pos else [])
        phrases.append(" ".join(words))
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    _, bg = _noisy(rng, noise.background, attrs.background_colour, list(COLOURS), ())
    if bg:
        text += (
            f", on a plain {bg} background"
            if attrs.background == "plain"
            else f", on a {bg} {attrs.background} background"
        )
    if rng.random() < noise.affix:
        affix = AFFIXES[int(rng.integers(len(AFFIXES)))]
        text = f"{affix}{AFFIX_SEP}{text}" if rng.random() < 0.5 else f"{text}{AFFIX_SEP}{affix}"
    return text


def render_split_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    force: tuple[str, str] | None = None,
    reshape: np.random.Generator | None = None,
) -> tuple[Image.Image, SceneAttrs, list[dict]]:
    """One split scene: (image, attributes, per-object geometry {cx, cy, r} in pixels).

    ``force=(colour, shape)`` draws a single object of that colour and shape (zero-shot test
    images); otherwise 1-3 objects at distinct positions. Object colours differ from the
    background colour, so the object is always visible. ``reshape``: draw the *twin* of the
    scene ``rng`` gives: identical in everything (draws from ``rng`` unchanged) except that
    each object's shape is replaced by another with probability 1/2, at least one of them.
    """
    colours = list(COLOURS)
    if force is not None:
        f_colour, f_shape = force
        bgs = [c for c in colours if c != f_colour]
        bg_colour = bgs[int(rng.integers(len(bgs)))]
    else:
        bg_colour = colours[int(rng.integers(len(colours)))]
    bg_kind = SPLIT_BACKGROUNDS[int(rng.integers(len(SPLIT_BACKGROUNDS)))]
    n = 1 if force is not None else int(rng.integers(1, 4))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    fg = [c for c in colours if c != bg_colour]
    objects = []
    for p in positions:
        shape = SPLIT_SHAPES[int(rng.integers(len(SPLIT_SHAPES)))]
        colour = fg[int(rng.integers(len(fg)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        if force is not None:
            colour, shape = force
        objects.append(ShapeAttrs(shape=shape, colour=colour, size=size, position=POSITIONS[int(p)]))
    if reshape is not None:
        change = reshape.random(len(objects)) < 0.5
        change[int(reshape.integers(len(objects)))] = True
        objects = [
            dataclasses.replace(
                o, shape=[s for s in SPLIT_SHAPES if s != o.shape][int(reshape.integers(len(SPLIT_SHAPES) - 1))]
            )
            if c
            else o
            for o, c in zip(objects, change)
        ]
    attrs = SceneAttrs(objects=tuple(objects), background_colour=bg_colour, background=bg_kind)
    img = _background(bg_kind, COLOURS[bg_colour], width, height, rng)
    draw = ImageDraw.Draw(img)
    m = min(width, height)
    geometry = []
    for o in objects:
        fx, fy = _CENTRES[o.position]
        jx, jy = rng.uniform(-0.04, 0.04, size=2)
        cx, cy, r = (fx + jx) * width, (fy + jy) * height, SPLIT_RADIUS[o.size] * m
        _draw_shape(draw, o.shape, cx, cy, r, COLOURS[o.colour])
        geometry.append({"cx": round(float(cx), 3), "cy": round(float(cy), 3), "r": round(float(r), 3)})
    return img, attrs, geometry


def _split_size(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.integers(SPLIT_SIDE[0], SPLIT_SIDE[1] + 1))
    aspect = float(rng.uniform(*SPLIT_ASPECT))
    return side, int(np.clip(round(side * aspect), SPLIT_SIDE[0], SPLIT_SIDE[1]))


def _jpeg(img: Image.Image, rng: np.random.Generator, stream: str) -> bytes:
    lo, hi = SPLIT_JPEG_QUALITY[stream]
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(lo, hi + 1)))
    return buf.getvalue()


def split_caption(attrs: SceneAttrs, rng: np.random.Generator | None = None) -> str:
    """The clean caption of a split scene: every object, compositionally; no background phrase.

    Backgrounds (colour, texture) stay visual nuisance: naming them would put the background's
    colour word next to the objects' colour words, and a small text tower then matches "a red
    circle" to any image with red in it, background or not. With ``rng`` (the clean split) each
    object's size and position are named with probability 1/2 each: still accurate, and a text
    tower that has seen "a red circle" alone does not tie shapes to positions."""
    parts = []
    for o in attrs.objects:
        size, pos = (True, True) if rng is None else tuple(rng.random(2) < 0.5)
        parts.append(
            " ".join(["a"] + ([o.size] if size else []) + [o.colour, o.shape] + ([_PHRASES[o.position]] if pos else []))
        )
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_split_sample(
    split: str, seed: int, shard: int, idx: int, noise: WebNoise = DEFAULT_WEB_NOISE, group: int | None = None
) -> dict:
    """One sample of a split, same fields as ``make_sample``. The label (json) always holds the
    true attributes and geometry; only a web sample's caption is noisy (its clean caption is in
    ``label["clean_caption"]``). Captions use a noise RNG of their own, so a web image does not
    depend on the noise rates.

    The clean split comes in *minimal groups* of ``group`` (default ``CLEAN_GROUP``), like a
    curated set with hard negatives: index ``idx`` with ``idx % group != 0`` is a twin of the
    group's first scene (same colours, sizes, positions, background, texture, jitter; other
    shapes for some objects), so captions cannot be told apart by colour alone and a model
    trained on whole groups in one batch must learn shapes."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    group = CLEAN_GROUP if group is None else group
    if group < 1:
        raise ValueError(f"group must be >= 1 (got {group})")
    twin = idx % group if split == "clean" else 0
    rng = np.random.default_rng([seed, _STREAM[split], shard, idx - twin])
    width, height = _split_size(rng)
    reshape = np.random.default_rng([seed, _STREAM[split], shard, idx, _NOISE_STREAM]) if twin else None
    img, attrs, geometry = render_split_scene(rng, width, height, reshape=reshape)
    clean = split_caption(attrs)
    caption = clean
    if split == "clean":  # twins share the caption draws, so their captions differ in shapes only
        caption = split_caption(
            attrs, np.random.default_rng([seed, _STREAM[split], shard, idx - twin, _CAPTION_STREAM])
        )
    if split == "web":
        caption = web_caption(attrs, np.random.default_rng([seed, _STREAM[split], shard, idx, _NOISE_STREAM]), noise)
    key = sample_key(shard, idx)
    uid = sample_uid(seed, f"{split}:{key}")
    label = {**attrs.to_dict(), "geometry": geometry, "split": split, "clean_caption": clean}
    return {
        "key": key,
        "uid": uid,
        "url": f"https://synthetic.example/{split}/{uid}.jpg",
        "caption": caption,
        "jpg": _jpeg(img, rng, split),
        "width": width,
        "height": height,
        "label": label,
    }


def zeroshot_classes() -> list[tuple[str, str]]:
    """The 60 (colour, shape) classes of the zero-shot test set, in folder-name order."""
    return sorted(((c, s) for c in COLOURS for s in SPLIT_SHAPES), key=lambda cs: f"{cs[0]}_{cs[1]}")


def make_zeroshot_sample(seed: int, cls: int, j: int) -> dict:
    """Image ``j`` of zero-shot class ``cls``: one object of that colour and shape, everything
    else (size, position, background, image size) random."""
    colour, shape = zeroshot_classes()[cls]
    rng = np.random.default_rng([seed, _STREAM["zeroshot"], cls, j])
    width, height = _split_size(rng)
    img, attrs, geometry = render_split_scene(rng, width, height, force=(colour, shape))
    key = f"zs{cls:03d}{j:04d}"
    return {
        "key": key,
        "class": f"{colour}_{shape}",
        "jpg": _jpeg(img, rng, "zeroshot"),
        "width": width,
        "height": height,
        "caption": split_caption(attrs),
        "label": {**attrs.to_dict(), "geometry": geometry},
    }


def make_split(
    split: str,
    out_dir: str,
    n_shards: int = 4,
    per_shard: int = 256,
    seed: int = 0,
    formats: Sequence[str] = ("tar", "parquet"),
    per_class: int = 4,
    noise: WebNoise = DEFAULT_WEB_NOISE,
    storage_options: dict | None = None,
    group: int | None = None,
) -> list[str]:
    """Write a split: shards under ``{out_dir}/{tar,parquet}/`` as ``make_corpus`` lays them out;
    for ``test`` also ``{out_dir}/zeroshot/<colour>_<shape>/<key>.jpg`` (``per_class`` images per
    class, all 60 classes) and ``{out_dir}/zeroshot.jsonl`` (key, class, label, geometry).
    ``group``: the clean split's minimal-group size (``make_split_sample``).
    Returns the written shard URLs (tar first, then parquet)."""
    unknown = set(formats) - {"tar", "parquet"}
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; expected 'tar' and/or 'parquet'")
    so = storage_options or {}
    out = out_dir.rstrip("/")
    written: dict[str, list[str]] = {fmt: [] for fmt in formats}
    for shard in range(n_shards):
        samples = [make_split_sample(split, seed, shard, i, noise, group) for i in range(per_shard)]
        for fmt in formats:
            url = f"{out}/{fmt}/shard-{shard:05d}.{fmt}"
            with fsspec.open(url, "wb", **so) as f:
                (_write_tar if fmt == "tar" else _write_parquet)(f, samples)
            written[fmt].append(url)
    if split == "test" and per_class > 0:
        lines = []
        for cls, (_colour, _shape) in enumerate(zeroshot_classes()):
            for j in range(per_class):
                s = make_zeroshot_sample(seed, cls, j)
                with fsspec.open(f"{out}/{ZEROSHOT_DIR}/{s['class']}/{s['key']}.jpg", "wb", **so) as f:
                    f.write(s["jpg"])
                lines.append(
                    json.dumps(
                        {
                            "key": s["key"],
                            "class": s["class"],
                            "width": s["width"],
                            "height": s["height"],
                            "caption": s["caption"],
                            "label": s["label"],
                        },
                        sort_keys=True,
                    )
                )
        with fsspec.open(f"{out}/{ZEROSHOT_LABELS}", "w", **so) as f:
            f.write("\n".join(lines) + "\n")
    return [u for fmt in formats for u in written[fmt]]
