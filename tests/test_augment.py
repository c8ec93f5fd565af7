"""Seeded, replayable augmentation: determinism, statistics, packing, replay geometry, interop."""

from __future__ import annotations

import collections
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dr_pipeline.augment import (
    OPS,
    PARAM_WIDTH,
    SIGNED_OPS,
    AugParams,
    Q,
    center_view,
    crop_box,
    from_datacompdr,
    magnitude,
    pack,
    replay,
    sample_all,
    sample_params,
    to_datacompdr,
    unpack,
)
from dr_pipeline.config import AugSpec

SPEC = AugSpec()
ROOT = Path(__file__).resolve().parents[1]
W, H = 400, 300


def scene(square: tuple[int, int] = (190, 140), side: int = 16) -> Image.Image:
    """Smooth colour field (values <= ~130) with one white square at (x, y)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    rgb = np.stack(
        [
            60 + 50 * np.sin(2 * np.pi * x / W),
            60 + 50 * np.cos(2 * np.pi * y / H),
            80 + 40 * np.sin(2 * np.pi * (x + y) / 500),
        ],
        axis=-1,
    )
    rgb[square[1] : square[1] + side, square[0] : square[0] + side] = 255
    return Image.fromarray(rgb.round().astype(np.uint8))


def noise_image(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def frac_crop(top: float, left: float, h: float, w: float) -> tuple[int, int, int, int]:
    return round(top * Q), round(left * Q), round(h * Q), round(w * Q)


def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- sampling


def test_sampling_is_a_pure_function_of_its_inputs():
    jobs = [(f"key{k}", i) for k in range(20) for i in range(4)]
    first = {j: sample_params(SPEC, 7, j[0], j[1], 640, 480) for j in jobs}
    shuffled = jobs[:]
    random.Random(1).shuffle(shuffled)
    again = {j: sample_params(SPEC, 7, j[0], j[1], 640, 480) for j in shuffled}
    assert first == again
    assert sample_all(SPEC, 7, "key3", 640, 480) == [first[("key3", i)] for i in range(4)]


def test_sampling_identical_in_a_fresh_process():
    script = (
        "import json, hashlib\n"
        "import torch\ntorch.set_num_threads(1)  # a Ray actor's thread count, unlike this process\n"
        "from PIL import Image\nimport numpy as np\n"
        "from dr_pipeline.augment import sample_all, pack, replay\n"
        "from dr_pipeline.config import AugSpec\n"
        "spec = AugSpec(flip=True, randaug_ops=3)\n"
        "img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))\n"
        "ps = [p for k in ('a', 'b', 'c') for p in sample_all(spec, 3, k, 320, 240)]\n"
        "views = [hashlib.sha256(replay(img, p, s, spec).numpy().tobytes()).hexdigest() for p in ps for s in (224, 256)]\n"
        "print(json.dumps({'packed': pack(ps).tolist(), 'views': views}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    spec = AugSpec(flip=True, randaug_ops=3)
    ps = [p for k in ("a", "b", "c") for p in sample_all(spec, 3, k, 320, 240)]
    img = noise_image()
    assert theirs["packed"] == pack(ps).tolist()
    assert theirs["views"] == [digest(replay(img, p, s, spec)) for p in ps for s in (224, 256)]


@pytest.mark.parametrize("vary", ["seed", "key", "index"])
def test_different_inputs_give_different_params(vary):
    def draw(n: int) -> AugParams:
        args = {"seed": 0, "key": "k", "index": 0, vary: n if vary != "key" else f"k{n}"}
        return sample_params(SPEC, args["seed"], args["key"], args["index"], 640, 480)

    draws = [draw(n) for n in range(200)]
    assert len({p.crop for p in draws}) > 0.95 * 200
    assert len(set(draws)) > 0.95 * 200


def test_crop_statistics_respect_scale_and_ratio():
    width, height = 640, 480
    areas, ratios = [], []
    for n in range(3000):
        p = sample_params(SPEC, 1, f"s{n}", 0, width, height)
        left, top, right, bottom = crop_box(p, width, height)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        cw, ch = right - left, bottom - top
        areas.append(cw * ch / (width * height))
        ratios.append(cw / ch)  # pixel space
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.08 * 0.98 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
    # Spread over the whole range, not stuck at one end.
    assert (areas < 0.2).mean() > 0.05 and (areas > 0.8).mean() > 0.02
    assert (ratios < 0.85).mean() > 0.1 and (ratios > 1.2).mean() > 0.1


def test_crop_fallback_is_central_and_clamped():
    # 2000x100: no crop of area >= 8% with ratio <= 4/3 fits, so every draw falls back.
    for n in range(20):
        p = sample_params(SPEC, 0, f"wide{n}", 0, 2000, 100)
        left, top, right, bottom = crop_box(p, 2000, 100)
        assert (right - left, bottom - top) == pytest.approx((133, 100), abs=0.05)
        assert (left + right) / 2 == pytest.approx(1000, abs=1)


def test_op_histogram_signs_and_flip():
    spec = AugSpec(flip=True, randaug_ops=2, randaug_magnitude=7)
    params = [sample_params(spec, 2, "h", i, 320, 240) for i in range(4000)]
    ops = [op for p in params for op in p.ops]
    assert all(len(p.ops) == 2 for p in params) and all(b == 7 for _, b, _ in ops)
    counts = collections.Counter(op for op, _, _ in ops)
    expected = len(ops) / len(OPS)
    assert set(counts) == set(range(len(OPS)))
    assert all(abs(c - expected) < 0.2 * expected for c in counts.values()), counts
    signed = [s for op, _, s in ops if op in SIGNED_OPS]
    assert 0.45 < np.mean(signed) < 0.55
    assert all(s == 0 for op, _, s in ops if op not in SIGNED_OPS)
    assert 0.45 < np.mean([p.flip for p in params]) < 0.55
    assert not any(sample_params(SPEC, 2, "h", i, 320, 240).flip for i in range(200))


# --------------------------------------------------------------------------- packing


def _many_params() -> list[AugParams]:
    out = []
    for k in range(4):
        spec = AugSpec(flip=True, randaug_ops=k, n_aug=8)
        out += sample_all(spec, k, f"pk{k}", 500 + 37 * k, 300 + 11 * k)
    out += [
        AugParams((0, 0, Q, Q), True, ((13, 127, 0), (9, 0, 1), (0, 30, 0))),
        AugParams((Q - 1, Q - 1, 1, 1), False, ()),
    ]
    return out


def test_pack_unpack_round_trip_is_exact():
    params = _many_params()
    arr = pack(params)
    assert arr.dtype == np.uint16 and arr.shape == (len(params), PARAM_WIDTH) and arr.nbytes == 16 * len(params)
    assert unpack(arr) == params
    assert unpack(arr.reshape(-1)) == params
    assert unpack(arr.astype(np.int64)) == params
    assert {len(p.ops) for p in params} == {0, 1, 2, 3} and {p.flip for p in params} == {True, False}
    assert unpack(np.zeros((0, PARAM_WIDTH), np.uint16)) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.__setitem__(5, (14 << 8) | 9),  # op index out of range
        lambda r: r.__setitem__(5, (12 << 8) | 0x80 | 9),  # sign on an unsigned op (AutoContrast)
        lambda r: r.__setitem__(6, 0xFFFF),  # empty slot followed by an op
        lambda r: r.__setitem__(4, 2),  # unknown flag bit
        lambda r: r.__setitem__(2, 0),  # empty crop
        lambda r: r.__setitem__(0, Q - 10),  # top + height > 1
        lambda r: r.__setitem__(1, Q),  # left + width > 1
    ],
)
def test_unpack_rejects_garbage(mutate):
    row = pack([AugParams((100, 200, 30000, 40000), False, ((3, 9, 1), (6, 9, 0), (11, 9, 0)))])[0].astype(np.int64)
    mutate(row)
    with pytest.raises(ValueError):
        unpack(row)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros(7, np.uint16),
        np.zeros((2, 7), np.uint16),
        np.zeros((1, 8), np.float32),
        np.array([[0, 0, 100, 100, 0, -1, 0xFFFF, 0xFFFF]]),
        np.array([[0, 0, 100, 100, 0, 70000, 0xFFFF, 0xFFFF]]),
    ],
)
def test_unpack_rejects_bad_shapes_and_types(arr):
    with pytest.raises(ValueError):
        unpack(arr)


# --------------------------------------------------------------------------- replay


def test_replay_is_deterministic_and_survives_packing():
    spec = AugSpec(flip=True, randaug_ops=3)
    img = noise_image()
    params = sample_all(spec, 5, "r", *img.size)
    for size in (224, 256):
        views = [replay(img, p, size, spec) for p in params]
        assert all(v.dtype == torch.uint8 and v.shape == (3, size, size) for v in views)
        assert [digest(v) for v in views] == [digest(replay(img, p, size, spec)) for p in params]
        assert [digest(v) for v in views] == [digest(replay(img, p, size, spec)) for p in unpack(pack(params))]
    assert len({digest(replay(img, p, 224, spec)) for p in params}) == len(params)


def test_replay_accepts_any_mode_and_checks_bins():
    img = noise_image()
    p = AugParams(frac_crop(0.1, 0.1, 0.5, 0.5), False, ((6, 9, 0),))
    for mode in ("L", "RGBA", "P", "CMYK"):
        x = replay(img.convert(mode), p, 64, SPEC)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert torch.equal(replay(img.convert("RGBA"), p, 64, SPEC), replay(img, p, 64, SPEC))
    with pytest.raises(ValueError):
        replay(img, AugParams(p.crop, False, ((6, 31, 0),)), 64, SPEC)


def _centroid(x: torch.Tensor) -> tuple[float, float]:
    mask = (x > 200).all(dim=0)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert len(xs) > 20, "bright square left the view"
    size = x.shape[-1]
    return (xs.double().mean().item() + 0.5) / size, (ys.double().mean().item() + 0.5) / size


def test_geometry_is_resolution_independent():
    img = scene()
    crop = frac_crop(0.1, 0.15, 0.8, 0.7)
    geo = AugParams(crop, False, ((3, 9, 1), (5, 9, 0), (1, 9, 0)))  # TranslateX -, Rotate +, ShearX +
    v224, v256 = replay(img, geo, 224, SPEC), replay(img, geo, 256, SPEC)
    c224, c256 = _centroid(v224), _centroid(v256)
    assert c224 == pytest.approx(c256, abs=0.01)
    # The ops moved the square: without them it sits elsewhere.
    plain = _centroid(replay(img, AugParams(crop, False, ()), 224, SPEC))
    assert abs(plain[0] - c224[0]) > 0.05

    def down(x: torch.Tensor) -> torch.Tensor:
        return F.resize(x.float()[None], [224, 224], antialias=True)[0]

    same = (down(v256) - v224.float()).abs().mean().item()
    other = AugParams(frac_crop(0.0, 0.0, 0.5, 0.5), False, geo.ops)
    different = (down(replay(img, other, 256, SPEC)) - v224.float()).abs().mean().item()
    assert same < 2.0 and different > 10 * same, (same, different)


def test_translate_is_a_fraction_of_the_output_size():
    m224, m256 = magnitude(3, 9, 0, 224, 31), magnitude(3, 9, 0, 256, 31)
    assert m224 == pytest.approx(150 / 331 * 224 * 9 / 30, rel=1e-6)
    assert m224 / 224 == pytest.approx(m256 / 256, rel=1e-6)
    assert magnitude(4, 9, 1, 256, 31) == -m256


def _base(img: Image.Image, p: AugParams, size: int) -> torch.Tensor:
    return F.pil_to_tensor(img.resize((size, size), Image.BICUBIC, box=crop_box(p, *img.size)))


def test_brightness_and_translate_match_torchvision():
    img = noise_image()
    crop = frac_crop(0.2, 0.1, 0.6, 0.7)
    bright = AugParams(crop, False, ((6, 9, 0),))
    want = F.adjust_brightness(_base(img, bright, 224), 1 + 0.9 * 9 / 30)
    assert torch.equal(replay(img, bright, 224, SPEC), want)
    shift = AugParams(crop, False, ((3, 9, 1),))
    want = F.affine(
        _base(img, shift, 256),
        angle=0.0,
        translate=[int(-150 / 331 * 256 * 9 / 30), 0],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.NEAREST,
    )
    assert torch.equal(replay(img, shift, 256, SPEC), want)


@pytest.mark.parametrize("size", [224, 256])
def test_every_op_matches_torchvision_randaugment(size):
    """Magnitudes equal torchvision's RandAugment table (v1, what DataCompDR stores); every op's
    output equals torchvision v2 RandAugment's own op code with its default nearest/fill."""
    img = noise_image()
    v1_space = T.RandAugment()._augmentation_space(31, (size, size))
    v2 = T2.RandAugment()
    assert list(v1_space) == list(OPS) == list(v2._AUGMENTATION_SPACE)
    for op, name in enumerate(OPS):
        mags, signed = v1_space[name]
        v2_mags_fn, v2_signed = v2._AUGMENTATION_SPACE[name]
        assert signed == v2_signed == (op in SIGNED_OPS)
        v2_mags = v2_mags_fn(31, size, size)
        for sign in (0, 1) if signed else (0,):
            p = AugParams(frac_crop(0.05, 0.1, 0.9, 0.8), False, ((op, 9, sign),))
            tv_mag = float(mags[9].item()) if mags.ndim > 0 else 0.0
            assert magnitude(op, 9, sign, size, 31) == (-tv_mag if sign else tv_mag)
            v2_mag = 0.0 if v2_mags is None else float(v2_mags[9]) * (-1 if sign else 1)
            want = v2._apply_image_or_video_transform(
                _base(img, p, size), name, v2_mag, interpolation=v2.interpolation, fill=v2._fill
            )
            assert torch.equal(replay(img, p, size, SPEC), want), name


def _op_test_images(h: int, w: int) -> list[torch.Tensor]:
    """Noise, a narrow value range, a constant and a half-saturated channel, all black, one dot."""
    rng = np.random.default_rng(h * 1000 + w)
    mixed = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    mixed[1], mixed[2, :, : w // 2] = 77, 255
    dot = np.zeros((3, h, w), np.uint8)
    dot[:, 0, 0] = 200
    arrays = [rng.integers(0, 256, (3, h, w), dtype=np.uint8), rng.integers(40, 90, (3, h, w), dtype=np.uint8)]
    return [torch.from_numpy(a) for a in (*arrays, mixed, np.zeros((3, h, w), np.uint8), dot)]


@pytest.mark.parametrize("hw", [(64, 64), (63, 63), (17, 31), (3, 3), (224, 161)])
def test_fast_ops_are_torchvision_ops_bit_for_bit(hw):
    """replay's gathers and table lookups give exactly torchvision's pixels (teachers and
    trainer share replay, so the stored params must keep meaning the same view)."""
    from dr_pipeline.augment import NO_MAGNITUDE_OPS, _apply_op, _torchvision_op

    for x in _op_test_images(*hw):
        for op, name in enumerate(OPS):
            for b in (9,) if op in NO_MAGNITUDE_OPS else (0, 1, 9, 30):
                for sign in (0, 1) if op in SIGNED_OPS else (0,):
                    m = magnitude(op, b, sign, max(hw), 31)
                    want, got = _torchvision_op(x, name, m), _apply_op(x, name, m)
                    assert got.dtype == want.dtype and torch.equal(got, want), (hw, name, b, sign)


def test_center_view_matches_open_clip_eval_preprocess():
    img = noise_image(300, 200)
    x = center_view(img, 128)
    assert x.shape == (3, 128, 128) and x.dtype == torch.uint8
    assert torch.equal(x, center_view(img, 128))
    ref = T.Compose([T.Resize(128, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(128), T.PILToTensor()])
    assert torch.equal(x, ref(img))
    assert center_view(img.convert("L"), 64).shape == (3, 64, 64)


# --------------------------------------------------------------------------- DataCompDR interop


def test_datacompdr_round_trip():
    for k in range(4):
        spec = AugSpec(randaug_ops=k, n_aug=16)
        for p in sample_all(spec, k, f"dc{k}", 640, 427):
            entry = to_datacompdr(p, 640, 427, spec)
            assert json.loads(json.dumps(entry)) == entry
            i, j, h, w = entry[0]
            assert all(isinstance(v, int) for v in entry[0]) and i + h <= 427 and j + w <= 640
            assert from_datacompdr(entry, 640, 427, spec) == p


def test_datacompdr_values():
    p = AugParams(frac_crop(0.1, 0.2, 0.5, 0.25), False, ((3, 9, 1), (10, 9, 0), (11, 9, 0)))
    (i, j, h, w), ops = to_datacompdr(p, 640, 480, SPEC)
    assert (i, j, h, w) == (48, 128, 240, 160)
    assert ops[0][0] == 3 and ops[0][1] == pytest.approx(-30.45, abs=0.01)
    assert ops[1] == [10, 7] and isinstance(ops[1][1], int)  # Posterize bits
    assert ops[2] == [11, pytest.approx(178.5)]  # Solarize threshold
    assert to_datacompdr(AugParams(p.crop, False, ((0, 9, 0), (12, 9, 0))), 640, 480, SPEC)[1] == [[0, 0.0], [12, 0.0]]
    # A released-style record with rounded magnitudes maps to the nearest bin.
    q = from_datacompdr([[10, 20, 100, 120], [[3, -30.45], [6, 0.27]]], 640, 480, SPEC)
    assert q.ops == ((3, 9, 1), (6, 9, 0)) and not q.flip
    assert crop_box(q, 640, 480) == pytest.approx((20, 10, 140, 110), abs=0.01)
    with pytest.raises(ValueError):
        to_datacompdr(AugParams(p.crop, True, ()), 640, 480, SPEC)
    with pytest.raises(ValueError):
        from_datacompdr([[400, 0, 100, 100], []], 640, 480, SPEC)  # outside the source
    with pytest.raises(ValueError):
        from_datacompdr([[0, 0, 100, 100], [[14, 0.0]]], 640, 480, SPEC)
    with pytest.raises(ValueError):
        from_datacompdr("[[0, 0, 1, 1], []]", 640, 480, SPEC)
