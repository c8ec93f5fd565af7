"""The analytic caption FLOP counts (dr_pipeline.models.decode_cost) equal torch's FlopCounterMode
on real runs of both paths: open_clip ``generate`` (the public pattern) and our cached decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dr_pipeline.config import load_ensemble
from dr_pipeline.models import decode_cost as dc
from dr_pipeline.models.teachers import register_model_configs
from tests.test_models import _boosted_captioner, _views

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def tiny_configs():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    register_model_configs(load_ensemble(ROOT / "teachers" / "tiny.yaml"))
    yield
    torch.set_num_threads(n)


def _count(fn) -> int:
    dc.count_cpu_attention()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["dr-tiny-coca", "dr-tiny-coca-wide"])
def test_flop_formulas_match_flop_counter(name):
    c = _boosted_captioner(name, boost=0.0, max_len=10, min_len=4)  # boost 0: no row ever stops early
    views = _views(2, c.image_size, seed=1)
    x = (views.float() / 255 - c.mean) / c.std
    emb = c.encode_images(views)
    d = dc.coca_dims(c.model, emb.shape[1])
    img = dc.image_flops(c.model, x)
    assert img == _count(lambda: c.model._encode_image(x[:1]))
    seq = c.spec.sampling.max_len

    public = _count(
        lambda: c.model.generate(x, generation_type="top_p", top_p=0.9, seq_len=seq, fixed_output_length=True)
    )
    assert public == pytest.approx(2 * dc.public_flops(d, seq, img), rel=1e-9)  # 2 images, 1 caption each

    k = 3
    rows = torch.arange(2).repeat_interleave(k)
    enc = _count(lambda: c.encode_images(views))
    ours = _count(lambda: c.decode(emb, None, rows=rows))
    assert enc == 2 * img
    assert ours + enc == pytest.approx(2 * k * dc.cached_flops(d, seq, k, img), rel=1e-9)


def test_roof_runs_the_step_shapes():
    c = _boosted_captioner("dr-tiny-coca", boost=0.0, max_len=10, min_len=4)
    d = dc.coca_dims(c.model, 15)
    r = dc.matmul_roof(c.model, n=6, k=3, ctx=5, image_tokens=15, reps=1)
    assert r["step_flops"] == 6 * dc.cached_step_flops(d, 5)
    assert r["gflops"] > 0
