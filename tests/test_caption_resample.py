"""Redraws inside the batched decode: same captions, counts and seeding as decoding every draw
in full passes, one image encode and one cross-attention K/V per image, whatever the batch."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dr_pipeline.config import load_ensemble
from dr_pipeline.models import captioner as capmod
from dr_pipeline.models.captioner import Captioner, DegenerationRule, clean_caption, is_degenerate
from dr_pipeline.models.teachers import register_model_configs
from tests.test_models import _boosted_captioner, _views

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cap() -> Captioner:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    register_model_configs(load_ensemble(ROOT / "teachers" / "tiny.yaml"))
    yield _boosted_captioner("dr-tiny-coca", boost=2.0, max_len=16, min_len=4)
    torch.set_num_threads(n)


def _run(cap, views, keys, k=4, **kw):
    out = cap.caption(views, keys, seed=3, k=k, **kw)
    return out.captions, out.rejected, out.attempts


def test_in_batch_redraws_equal_full_passes(cap, monkeypatch):
    views, keys = _views(6, cap.image_size, seed=2), [f"k{i}" for i in range(6)]
    calls = []
    cross_kv = Captioner.cross_kv
    monkeypatch.setattr(Captioner, "cross_kv", lambda self, e: calls.append(e.shape[0]) or cross_kv(self, e))
    one = cap.caption(views, keys, seed=3, k=4)
    assert one.resampled > 0 and one.attempts == 24 + one.resampled  # redraws did happen
    assert calls == [6]  # one K/V pass, 6 images
    assert one.row_steps > 0
    monkeypatch.setattr(cap, "use_cache", False)
    passes = cap.caption(views, keys, seed=3, k=4)
    assert (passes.captions, passes.rejected, passes.attempts) == (one.captions, one.rejected, one.attempts)


def test_redraws_do_not_depend_on_the_batch(cap, monkeypatch):
    views, keys = _views(5, cap.image_size, seed=4), [f"b{i}" for i in range(5)]
    whole = _run(cap, views, keys)
    monkeypatch.setattr(cap, "decode_batch", 8)  # chunks of 2 images
    assert _run(cap, views, keys) == whole
    monkeypatch.setattr(cap, "decode_batch", 0)
    alone = [_run(cap, views[i : i + 1], keys[i : i + 1]) for i in (3, 0)]
    assert [a[0][0] for a in alone] == [whole[0][3], whole[0][0]]


def test_default_rule_only_gives_up_on_draws_is_degenerate_rejects():
    rng = random.Random(0)
    pool = ["dog", "dog", "a", "2", "3", ",", ".", "cat", "x", "!!", "on"]
    rule = DegenerationRule()
    fired = 0
    for _ in range(3000):
        words = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        total = len(words)
        for cut in range(1, total):
            final = clean_caption(" ".join(words[:cut])).lower().split()[:-1]
            if rule.gives_up(final, total - cut + 1):
                fired += 1
                assert is_degenerate(clean_caption(" ".join(words))), words
                break
    assert fired > 20


@pytest.mark.parametrize("reject_all", [False, True])
def test_speculative_draws_change_no_caption_and_count_their_waste(cap, monkeypatch, reject_all):
    """Free slots start rows' next draws before the verdict on the current one: the captions,
    rejections and attempts are those of drawing one after the other, and every row-step beyond
    the sequential run's is a discarded speculative draw's (a draw's length is a function of its
    identity, so the difference is exact)."""
    if reject_all:
        monkeypatch.setattr(capmod, "is_degenerate", lambda text, min_words=2: True)
    views, keys = _views(6, cap.image_size, seed=5), [f"s{i}" for i in range(6)]
    monkeypatch.setattr(cap, "speculate_rows", 0)
    serial = cap.caption(views, keys, seed=3, k=4)
    monkeypatch.setattr(cap, "speculate_rows", 1 << 30)
    spec = cap.caption(views, keys, seed=3, k=4)
    assert serial.speculated == 0 and serial.wasted_row_steps == 0
    assert spec.speculated > 0
    assert (spec.captions, spec.rejected, spec.attempts, spec.resampled) == (
        serial.captions,
        serial.rejected,
        serial.attempts,
        serial.resampled,
    )
    assert spec.row_steps - spec.wasted_row_steps == serial.row_steps
    if reject_all:  # every draw is needed: nothing to waste
        assert spec.wasted_row_steps == 0 and spec.captions == [[]] * 6


def test_compiled_step_failure_falls_back_to_eager_once(cap, monkeypatch, caplog):
    """``caption_compile``: auto compiles on CUDA only; a compiled step that fails (a compiler
    missing or refusing a shape) logs once and the captions are the eager ones."""
    views, keys = _views(3, cap.image_size, seed=6), ["c0", "c1", "c2"]
    eager = cap.caption(views, keys, seed=3, k=2)
    assert cap._compiled is None  # auto on CPU: eager
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    c = Captioner(cap.spec, cap.model, cap.tokenizer, compile="always")
    assert c._compiled is broken
    with caplog.at_level("WARNING"):
        out = c.caption(views, keys, seed=3, k=2)
    assert (out.captions, out.rejected, out.attempts) == (eager.captions, eager.rejected, eager.attempts)
    assert len(calls) == 1 and c._compiled is None
    assert "decoding eagerly" in caplog.text


def test_give_up_rule_comes_from_the_sampling_config_and_old_hashes_hold(cap):
    """``sampling.give_up_*`` sets the in-decode rule; at their defaults they stay out of the
    output hash, so datasets made before the fields existed still resume."""
    import dataclasses
    import hashlib
    import json

    from dr_pipeline.config import SamplingSpec, stable_hash

    old = {"top_p": 0.9, "top_k": 0, "temperature": 1.0, "max_len": 30, "min_len": 5, "max_attempts": 3}
    ref = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert stable_hash(SamplingSpec()) == ref
    assert stable_hash(SamplingSpec(give_up_nonword_run=2)) != ref
    assert stable_hash(SamplingSpec(give_up_repeat=4)) != ref
    strict = dataclasses.replace(cap.spec.sampling, give_up_nonword_run=2, give_up_repeat=0)
    c = Captioner(dataclasses.replace(cap.spec, sampling=strict), cap.model, cap.tokenizer)
    assert c.rule == DegenerationRule(repeat=0, nonword_run=2)
    assert cap.rule == DegenerationRule()
