"""Seeded, resolution-independent, replayable augmentation.

One augmentation = RandomResizedCrop (torchvision ``get_params`` semantics) + optional
horizontal flip + RandAugment (torchvision's op list and magnitude table).

Sampling is counter based: the params of (seed, key, index) come from a Philox generator
keyed by ``sha256(f"{seed}|{key}|{index}")``, so they are a pure function of
(spec, seed, key, index, source width, source height) -- independent of call order, batch
size, worker, process or retry.

Params are stored resolution independent: the crop as fractions of the *source* image
(uint16, 1/65535 steps), each op as (op index, magnitude bin, sign). ``replay`` turns the
magnitude bin into a value at the *output* size (a translate is the same fraction of the
image at 224 and 256 px), so a 256-px student sees the geometry the 224-px teachers saw,
and replay at the generation size reproduces the original view bit for bit.

Packed layout, ``PARAM_WIDTH`` = 8 uint16 values (16 bytes) per augmentation::

    [0] top     crop top    / source height * 65535 (rounded)
    [1] left    crop left   / source width  * 65535
    [2] height  crop height / source height * 65535 (bottom - top, so top + height <= 65535)
    [3] width   crop width  / source width  * 65535
    [4] flags   bit 0 = horizontal flip; other bits 0
    [5..7] op slots, applied in order: (op_index << 8) | (sign << 7) | magnitude_bin,
           op_index into ``OPS``, sign 0 = +, 1 = - (always 0 for unsigned ops),
           bin 0..127; an empty slot is 0xFFFF and empty slots are trailing.

Crop boxes are relative to the image as stored (not an EXIF-rotated view).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dr_pipeline.config import AugSpec

OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)  # torchvision RandAugment order
SIGNED_OPS = frozenset(range(1, 10))  # ShearX .. Sharpness: torchvision flips their sign with p=0.5
NO_MAGNITUDE_OPS = frozenset({0, 12, 13})  # Identity, AutoContrast, Equalize
PARAM_WIDTH = 8
MAX_OPS = 3
Q = 65535  # crop quantization: fractions in 1/65535 steps
EMPTY = 0xFFFF


@dataclass(frozen=True)
class AugParams:
    crop: tuple[int, int, int, int]  # (top, left, height, width) as fractions of source H/W, in 1/65535
    flip: bool
    ops: tuple[tuple[int, int, int], ...]  # (op index into OPS, magnitude bin, sign 0=+ / 1=-), applied in order

    def __post_init__(self) -> None:
        top, left, h, w = self.crop
        if not all(isinstance(v, (int, np.integer)) for v in self.crop):
            raise ValueError(f"crop values must be integers, got {self.crop}")
        if min(top, left) < 0 or h < 1 or w < 1 or top + h > Q or left + w > Q:
            raise ValueError(f"crop {self.crop} is not a non-empty box inside [0, {Q}]")
        if len(self.ops) > MAX_OPS:
            raise ValueError(f"at most {MAX_OPS} ops can be stored, got {len(self.ops)}")
        for op in self.ops:
            if len(op) != 3:
                raise ValueError(f"op {op} must be (op index, bin, sign)")
            idx, b, sign = op
            if not 0 <= idx < len(OPS):
                raise ValueError(f"op index {idx} out of range 0..{len(OPS) - 1}")
            if not 0 <= b < 128:
                raise ValueError(f"magnitude bin {b} out of range 0..127")
            if sign not in (0, 1) or (sign and idx not in SIGNED_OPS):
                raise ValueError(f"invalid sign {sign} for op {OPS[idx]}")


# --------------------------------------------------------------------------- sampling


def _rng(seed: int, key: str, index: int) -> np.random.Generator:
    # seed and index are ints (no '|'), so the string is unambiguous whatever the key holds.
    digest = hashlib.sha256(f"{int(seed)}|{key}|{int(index)}".encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def _rrc_pixels(rng: np.random.Generator, spec: AugSpec, width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with a numpy generator: (i, j, h, w) in pixels."""
    area = height * width
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(spec.scale[0], spec.scale[1])
        ar = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    # Fallback: central crop, aspect ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < min(spec.ratio):
        w, h = width, int(round(width / min(spec.ratio)))
    elif in_ratio > max(spec.ratio):
        h, w = height, int(round(height * max(spec.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _quantize(start: int, extent: int, dim: int) -> tuple[int, int]:
    """Pixel span -> (start, extent) in 1/65535 of dim. Both ends are rounded, so start + extent <= Q."""
    a = round(start / dim * Q)
    b = round((start + extent) / dim * Q)
    b = min(Q, max(b, a + 1))  # never empty, even for huge images
    return min(a, b - 1), b - min(a, b - 1)


def _pixels(start: int, extent: int, dim: int) -> tuple[int, int]:
    """Inverse of ``_quantize``: exact for sampled boxes while dim < 65535."""
    a = min(round(start / Q * dim), dim - 1)
    b = max(round((start + extent) / Q * dim), a + 1)
    return a, b - a


def _crop_fractions(i: int, j: int, h: int, w: int, width: int, height: int) -> tuple[int, int, int, int]:
    top, qh = _quantize(i, h, height)
    left, qw = _quantize(j, w, width)
    return top, left, qh, qw


def sample_params(spec: AugSpec, seed: int, key: str, index: int, width: int, height: int) -> AugParams:
    """Params of augmentation ``index`` of sample ``key``; a pure function of its arguments."""
    if width < 1 or height < 1:
        raise ValueError(f"source size must be positive, got {width}x{height}")
    rng = _rng(seed, key, index)
    # Fixed-count draws first (ops, flip), so they do not depend on the image size.
    ops = []
    for _ in range(spec.randaug_ops):
        op = int(rng.integers(0, len(OPS)))
        sign = int(rng.integers(0, 2))
        ops.append((op, spec.randaug_magnitude, sign if op in SIGNED_OPS else 0))
    flip = bool(rng.uniform() < 0.5) and spec.flip
    crop = _crop_fractions(*_rrc_pixels(rng, spec, width, height), width, height)
    return AugParams(crop=crop, flip=flip, ops=tuple(ops))


def sample_all(spec: AugSpec, seed: int, key: str, width: int, height: int) -> list[AugParams]:
    return [sample_params(spec, seed, key, i, width, height) for i in range(spec.n_aug)]


# --------------------------------------------------------------------------- packing


def pack(params: Sequence[AugParams]) -> np.ndarray:
    """-> uint16 [N, PARAM_WIDTH] (layout in the module docstring)."""
    out = np.full((len(params), PARAM_WIDTH), EMPTY, dtype=np.uint16)
    for n, p in enumerate(params):
        out[n, :4] = p.crop
        out[n, 4] = int(p.flip)
        for k, (op, b, sign) in enumerate(p.ops):
            out[n, 5 + k] = (op << 8) | (sign << 7) | b
    return out


def unpack(arr: np.ndarray) -> list[AugParams]:
    """Inverse of ``pack``; accepts [N, 8] or flat [N*8]. Raises ValueError on anything ``pack`` cannot produce."""
    a = np.asarray(arr)
    if a.dtype.kind not in "iu":
        raise ValueError(f"packed params must be integers, got dtype {a.dtype}")
    if a.ndim == 1:
        if a.size % PARAM_WIDTH:
            raise ValueError(f"flat packed params need a multiple of {PARAM_WIDTH} values, got {a.size}")
        a = a.reshape(-1, PARAM_WIDTH)
    if a.ndim != 2 or a.shape[1] != PARAM_WIDTH:
        raise ValueError(f"packed params must be [N, {PARAM_WIDTH}] or flat, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > EMPTY):
        raise ValueError("packed params must be uint16 values")
    out = []
    for row in a.tolist():
        if row[4] & ~1:
            raise ValueError(f"unknown flag bits in {row[4]:#x}")
        slots = row[5:]
        n_ops = slots.index(EMPTY) if EMPTY in slots else MAX_OPS
        if any(s != EMPTY for s in slots[n_ops:]):
            raise ValueError(f"op slots {slots}: an op follows an empty slot")
        ops = tuple((s >> 8, s & 0x7F, (s >> 7) & 1) for s in slots[:n_ops])
        out.append(AugParams(crop=tuple(row[:4]), flip=bool(row[4] & 1), ops=ops))  # validates
    return out


# --------------------------------------------------------------------------- replay


def crop_box(p: AugParams, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in source pixels (floats), for ``Image.resize(box=...)``."""
    top, left, h, w = p.crop
    return left / Q * width, top / Q * height, (left + w) / Q * width, (top + h) / Q * height


@functools.lru_cache(maxsize=256)
def _magnitudes(op: int, bins: int, size: int) -> tuple[float, ...]:
    """torchvision ``RandAugment._augmentation_space(bins, (size, size))`` for one op (float32 values)."""
    name = OPS[op]
    if op in NO_MAGNITUDE_OPS:
        return (0.0,) * bins
    if name in ("ShearX", "ShearY"):
        t = torch.linspace(0.0, 0.3, bins)
    elif name in ("TranslateX", "TranslateY"):
        t = torch.linspace(0.0, 150.0 / 331.0 * size, bins)
    elif name == "Rotate":
        t = torch.linspace(0.0, 30.0, bins)
    elif name == "Posterize":  # max(.., 1): torchvision divides by zero for bins == 1
        t = (8 - (torch.arange(bins) / (max(bins - 1, 1) / 4))).round().int()
    elif name == "Solarize":
        t = torch.linspace(255.0, 0.0, bins)
    else:  # Brightness, Color, Contrast, Sharpness
        t = torch.linspace(0.0, 0.9, bins)
    return tuple(float(v) for v in t.tolist())


def magnitude(op: int, b: int, sign: int, size: int, bins: int) -> float:
    """Signed magnitude torchvision's RandAugment uses for (op, bin, sign) on a size x size image."""
    if not 0 <= b < bins:
        raise ValueError(f"magnitude bin {b} out of range for {bins} bins")
    v = _magnitudes(op, bins, size)[b]
    return -v if sign else v


def _torchvision_op(img: torch.Tensor, name: str, mag: float) -> torch.Tensor:
    """torchvision's RandAugment op on a uint8 CHW tensor (nearest interpolation, fill 0): the
    definition of every op; ``_apply_op`` computes the same pixels faster."""
    nearest = InterpolationMode.NEAREST
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(mag))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return F.affine(
            img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, fill=None, center=[0, 0]
        )
    if name in ("TranslateX", "TranslateY"):
        t = [int(mag), 0] if name == "TranslateX" else [0, int(mag)]  # torchvision truncates to pixels
        return F.affine(img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=nearest, fill=None)
    if name == "Rotate":
        return F.rotate(img, angle=mag, interpolation=nearest, fill=None)
    if name == "Brightness":
        return F.adjust_brightness(img, 1.0 + mag)
    if name == "Color":
        return F.adjust_saturation(img, 1.0 + mag)
    if name == "Contrast":
        return F.adjust_contrast(img, 1.0 + mag)
    if name == "Sharpness":
        return F.adjust_sharpness(img, 1.0 + mag)
    if name == "Posterize":
        return F.posterize(img, int(mag))
    if name == "Solarize":
        return F.solarize(img, mag)
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    raise ValueError(f"unknown op {name}")


GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_MAX_GATHER_PIXELS = 255 << 16  # index codes: 2 bytes + (high byte + 1) in the third channel


@functools.lru_cache(maxsize=32)
def _source_index(name: str, mag: float, height: int, width: int) -> np.ndarray:
    """A nearest-neighbour geometric op as a gather: for every output pixel the flat index of
    the source pixel it copies (``height * width``: outside the image, fill 0). Found by running
    torchvision's op itself on a uint8 image whose pixels spell their own index (low byte,
    high byte, 1 + top byte): the same code path and coordinates, so the gather is bit exact."""
    n = height * width
    idx = torch.arange(n, dtype=torch.int64)
    code = torch.stack([idx & 255, (idx >> 8) & 255, (idx >> 16) + 1]).to(torch.uint8).view(3, height, width)
    out = _torchvision_op(code, name, mag).reshape(3, n).to(torch.int64)
    src = out[0] | (out[1] << 8) | ((out[2] - 1) << 16)
    return torch.where(out[2] == 0, n, src).to(torch.int32).numpy()


def _gather(img: torch.Tensor, src: np.ndarray) -> torch.Tensor:
    c, h, w = img.shape
    flat = np.zeros((c, h * w + 1), dtype=np.uint8)  # the last pixel is the fill
    flat[:, :-1] = img.reshape(c, h * w).numpy()
    return torch.from_numpy(flat.take(src, axis=1).reshape(c, h, w))


@functools.lru_cache(maxsize=64)
def _value_table(name: str, mag: float) -> np.ndarray:
    """A per-value op (output pixel = f(input value)) as a 256-entry table, by torchvision's op."""
    return _torchvision_op(torch.arange(256, dtype=torch.uint8).view(1, 1, 256), name, mag).reshape(256).numpy()


def _lookup(img: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """``table[v]`` for every value; a [C, 256] table maps channel c through row c."""
    x = img.numpy()
    if table.ndim == 1:
        return torch.from_numpy(table.take(x))
    out = np.empty_like(x)
    for k in range(x.shape[0]):
        np.take(table[k], x[k], out=out[k])
    return torch.from_numpy(out)


def _equalize(img: torch.Tensor) -> torch.Tensor:
    """torchvision's (PIL's) equalize in integer arithmetic: per channel, the table
    ``lut[v] = clamp((cum_hist[v - 1] + step // 2) // step, 0, 255)``, ``lut[0] = 0``, with
    ``step = (pixels not of the channel's top value) // 255``; a channel with step 0 is kept."""
    c = img.shape[0]
    x = img.reshape(c, -1)
    table = np.empty((c, 256), dtype=np.uint8)
    for k in range(c):
        hist = torch.bincount(x[k], minlength=256).numpy()
        cum = np.cumsum(hist)
        step = (x.shape[1] - int(hist[int(np.argmax(cum))])) // 255
        if step == 0:
            table[k] = np.arange(256, dtype=np.uint8)
        else:
            table[k, 0] = 0
            table[k, 1:] = np.clip((cum[:-1] + step // 2) // step, 0, 255)
    return _lookup(img, table)


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's ``adjust_sharpness`` on uint8 with its float32 3x3 blur + round replaced
    by integer arithmetic (its grouped conv is ~5 ms at 224 px on one core): the blur of an
    interior pixel is (8 neighbours + 5 x centre) / 13, and such a fraction is never within
    1/26 of a half-integer, far beyond float32's error on 9 terms, so rounding the exact
    fraction gives the conv's integers. The blend, clamp and cast are torchvision's ops."""
    c, h, w = img.shape
    if h <= 2 or w <= 2:
        return img
    x = img.to(torch.int16)  # 2 x (13 x 255) + 13 fits
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # separable 3x3 box sum
    s = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * x[:, 1:-1, 1:-1]
    blurred = torch.from_numpy((2 * s.numpy() + 13) // 26).to(torch.float32)  # numpy: torch's int div is slow
    output = img.to(dtype=torch.float32, copy=True)
    view = output[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=(1.0 - factor))
    return output.clamp_(0, 255).to(img.dtype)


def _apply_op(img: torch.Tensor, name: str, mag: float) -> torch.Tensor:
    """``_torchvision_op``, bit for bit, on a uint8 CHW tensor; geometric ops run as a cached
    gather, Solarize, Brightness and Equalize as table lookups (per-value ops; Brightness is
    one multiply, so the same for any tensor length), Sharpness as ``_sharpness`` (the rest
    is torchvision's code)."""
    if name in GEOMETRIC_OPS:
        if img.shape[-2] * img.shape[-1] < _MAX_GATHER_PIXELS:
            return _gather(img, _source_index(name, mag, img.shape[-2], img.shape[-1]))
    elif name in ("Solarize", "Brightness"):
        return _lookup(img, _value_table(name, mag))
    elif name == "Sharpness":
        return _sharpness(img, 1.0 + mag)
    elif name == "Equalize":
        return _equalize(img)
    return _torchvision_op(img, name, mag)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def replay(image: Image.Image, p: AugParams, size: int, spec: AugSpec) -> torch.Tensor:
    """The augmented view as uint8 [3, size, size]; deterministic, same geometry at any size."""
    img = _rgb(image)
    # PIL takes a float box, so the crop is exact at every output size (no integer snapping).
    view = img.resize((size, size), resample=Image.BICUBIC, box=crop_box(p, *img.size))
    x = torch.from_numpy(np.asarray(view).transpose(2, 0, 1).copy())  # F.pil_to_tensor, one copy fewer
    if p.flip:
        x = F.horizontal_flip(x)
    for op, b, sign in p.ops:
        x = _apply_op(x, OPS[op], magnitude(op, b, sign, size, spec.randaug_bins))
    return x.contiguous()


def center_view(image: Image.Image, size: int) -> torch.Tensor:
    """open_clip eval preprocess without normalization: shortest side -> size (bicubic), center crop."""
    img = F.resize(_rgb(image), [size], interpolation=InterpolationMode.BICUBIC)
    return F.pil_to_tensor(F.center_crop(img, [size, size])).contiguous()


# --------------------------------------------------------------------------- DataCompDR interop


def to_datacompdr(p: AugParams, width: int, height: int, spec: AugSpec) -> list:
    """-> ``[[i, j, h, w], [[op, magnitude], ...]]``: crop in source pixels, magnitudes at ``spec.size``."""
    if p.flip:
        raise ValueError("the DataCompDR paug layout has no flip; export needs aug.flip = false")
    top, left, qh, qw = p.crop
    i, h = _pixels(top, qh, height)
    j, w = _pixels(left, qw, width)
    ops = []
    for op, b, sign in p.ops:
        m = magnitude(op, b, sign, spec.size, spec.randaug_bins)
        ops.append([op, int(m) if OPS[op] == "Posterize" else m])
    return [[i, j, h, w], ops]


def from_datacompdr(entry: list, width: int, height: int, spec: AugSpec) -> AugParams:
    """Inverse of ``to_datacompdr``: nearest magnitude bin, sign from the value's sign."""
    try:
        (i, j, h, w), raw_ops = entry
        i, j, h, w = (int(v) for v in (i, j, h, w))
        raw_ops = [(int(op), float(m)) for op, m in raw_ops]
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a DataCompDR paug entry: {entry!r} ({e})") from None
    if min(i, j) < 0 or h < 1 or w < 1 or i + h > height or j + w > width:
        raise ValueError(f"crop {[i, j, h, w]} is outside the {width}x{height} source image")
    ops = []
    for op, m in raw_ops:
        if not 0 <= op < len(OPS):
            raise ValueError(f"op index {op} out of range 0..{len(OPS) - 1}")
        if op in NO_MAGNITUDE_OPS:
            ops.append((op, spec.randaug_magnitude, 0))
            continue
        table = _magnitudes(op, spec.randaug_bins, spec.size)
        dist = [abs(abs(m) - v) for v in table]
        best = min(dist)
        # Several bins can share a value (Posterize): prefer the spec's bin, else the lowest.
        b = spec.randaug_magnitude if dist[spec.randaug_magnitude] == best else dist.index(best)
        ops.append((op, b, int(m < 0) if op in SIGNED_OPS else 0))
    return AugParams(crop=_crop_fractions(i, j, h, w, width, height), flip=False, ops=tuple(ops))
