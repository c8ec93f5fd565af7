"""KV-cached CoCa decoding and unpadded teacher text towers: the fast paths compute what the
reference paths compute (open_clip ``generate``, the full-prefix step, the full-context text tower).

Tiny random CoCas of two sizes (teachers/models/dr-tiny-coca{,-wide}.json), CPU, one thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from dr_pipeline.config import TeacherSpec, load_ensemble
from dr_pipeline.models import captioner as capmod
from dr_pipeline.models.captioner import (
    Captioner,
    kv_cache_unsupported,
    pick_tokens,
    row_uniforms,
)
from dr_pipeline.models.teachers import (
    Teacher,
    _text_tower,
    encode_text_unpadded,
    pooled_positions,
    register_model_configs,
)
from dr_pipeline.models.tiny import init_uninitialized
from tests.test_models import _boosted_captioner, _generate, _views

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["dr-tiny-coca", "dr-tiny-coca-wide"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def tiny_configs():
    register_model_configs(load_ensemble(ROOT / "teachers" / "tiny.yaml"))


@pytest.fixture(scope="module", params=SIZES)
def cap(request) -> Captioner:
    """Stops at varied steps (boosted end-of-text and pad logits), so compaction really happens."""
    return _boosted_captioner(request.param, boost=3.0, max_len=16, min_len=4)


def _uniforms(n: int, max_len: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.stack([row_uniforms(seed, "k", i, 0, max_len) for i in range(n)]))


# --------------------------------------------------------------------------- cached == generate / reference


def test_cached_greedy_equals_open_clip_generate(cap):
    assert cap.use_cache and kv_cache_unsupported(cap.model) is None
    views = _views(8, cap.image_size, seed=1)
    emb = cap.encode_images(views)
    want = _generate(cap, views)
    lengths = (want != 0).sum(dim=1)
    assert lengths.min() < 16 == lengths.max()  # some rows stop early, some run out
    assert torch.equal(cap.decode(emb, None), want)
    # k rows per image (the captioner's layout): each row is its image's generate output
    rows = torch.arange(8).repeat_interleave(3)
    assert torch.equal(cap.decode(emb, None, rows=rows), want[rows])


def test_cached_step_logits_equal_full_prefix_recompute(cap):
    """Teacher-forced prefix: the cached step's logits at every position == next_logits on the prefix."""
    views = _views(3, cap.image_size, seed=2)
    emb = cap.encode_images(views)
    rows = torch.tensor([0, 2, 1, 2, 0])  # unsorted, repeated images
    n, max_len = len(rows), 12
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 49406, (n, max_len), generator=gen)
    tokens[:, 0] = cap.sot
    text, dec = cap.model.text, cap.model.text_decoder
    with torch.inference_mode():
        used, img = torch.unique(rows, return_inverse=True)
        cross = cap.cross_kv(emb[used])
        groups = capmod._Groups(img, cross.shape[2])
        tc = cap._new_cache(text.transformer.resblocks, n, max_len, torch.float32)
        dc = cap._new_cache(dec.resblocks, n, max_len, torch.float32)
        for t in range(1, max_len):
            cached = cap._step(tokens[:, t - 1], t - 1, tc, dc, cross, groups)
            full = cap.next_logits(emb[rows], tokens[:, :t])
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_cached_and_uncached_sampled_captions_are_identical(cap):
    """Same uniforms -> same tokens, with rows in scrambled image order and rows dropping out."""
    views = _views(6, cap.image_size, seed=3)
    emb = cap.encode_images(views)
    rows = torch.tensor([5, 0, 0, 3, 1, 5, 2, 4, 4, 0, 1, 3, 2, 5, 0])
    u = _uniforms(len(rows), cap.spec.sampling.max_len)
    cached = cap.decode(emb, u, rows=rows)
    assert torch.equal(cached, cap.decode(emb, u, rows=rows, cache=False))
    lengths = (cached != 0).sum(dim=1)
    assert lengths.min() < lengths.max()


def test_cached_rows_do_not_depend_on_the_batch(cap):
    views = _views(5, cap.image_size, seed=4)
    emb = cap.encode_images(views)
    rows = torch.arange(5).repeat_interleave(4)
    u = _uniforms(len(rows), cap.spec.sampling.max_len, seed=9)
    whole = cap.decode(emb, u, rows=rows)
    for pick in ([7], [3, 19, 0], list(range(19, -1, -2))):
        part = cap.decode(emb, u[pick], rows=rows[pick])
        assert torch.equal(part, whole[pick][:, : part.shape[1]])
        assert (whole[pick][:, part.shape[1] :] == cap.pad).all()


def test_compaction_drops_finished_rows_and_changes_nothing(cap, monkeypatch):
    views = _views(6, cap.image_size, seed=5)
    emb = cap.encode_images(views)
    rows = torch.arange(6).repeat_interleave(5)
    u = _uniforms(len(rows), cap.spec.sampling.max_len, seed=1)
    sizes: list[int] = []
    step = Captioner._step

    def spy(self, tok, *a, **k):
        sizes.append(tok.numel())
        return step(self, tok, *a, **k)

    monkeypatch.setattr(Captioner, "_step", spy)

    monkeypatch.setattr(cap, "compact_every", 10**6)
    monkeypatch.setattr(cap, "compact_fraction", 2.0)  # never compact
    never = cap.decode(emb, u, rows=rows)
    assert set(sizes) == {30}
    sizes.clear()
    monkeypatch.setattr(cap, "compact_every", 1)  # compact as soon as a row finishes
    always = cap.decode(emb, u, rows=rows)
    assert torch.equal(always, never)
    alive = [
        (never[:, 1 : t + 1] != cap.eot).all(1) & (never[:, 1 : t + 1] != cap.pad).all(1) for t in range(len(sizes))
    ]
    assert sizes == [30] + [int(a.sum()) for a in alive[1:]]  # exactly the unfinished rows run
    assert sizes[-1] < 30


def test_cross_attention_kv_is_computed_once_per_image(cap, monkeypatch):
    calls: list[int] = []
    cross_kv = Captioner.cross_kv

    def spy(self, image_embs):
        calls.append(image_embs.shape[0])
        return cross_kv(self, image_embs)

    monkeypatch.setattr(Captioner, "cross_kv", spy)
    views = _views(4, cap.image_size, seed=6)
    out = cap.caption(views, ["a", "b", "c", "d"], seed=0, k=5)
    assert calls and calls[0] == 4  # 4 images, 20 caption rows
    monkeypatch.setattr(cap, "use_cache", False)
    assert cap.caption(views, ["a", "b", "c", "d"], seed=0, k=5).captions == out.captions


def test_unsupported_architecture_falls_back_to_reference(cap, monkeypatch):
    monkeypatch.setattr(cap.model.text, "use_pad_mask", True)
    assert kv_cache_unsupported(cap.model) == "text tower is not causal"
    c = Captioner(cap.spec, cap.model, cap.tokenizer)
    assert not c.use_cache
    with pytest.raises(ValueError, match="no KV-cached decoding"):
        c.decode(c.encode_images(_views(1, c.image_size)), None, cache=True)


# --------------------------------------------------------------------------- sampling candidates


@pytest.mark.parametrize(
    "scale, temperature, top_k, top_p",
    [
        (8.0, 1.0, 0, 0.9),
        (2.0, 1.0, 0, 0.9),
        (0.3, 1.0, 0, 0.9),  # peaked, medium, flat
        (4.0, 0.7, 0, 0.5),
        (4.0, 1.3, 50, 0.95),
        (4.0, 1.0, 10, 1.0),
        (4.0, 1.0, 0, 1.0),
    ],
)
def test_pick_tokens_candidate_paths_equal_the_full_vocabulary(scale, temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(int(scale * 10) + top_k)
    logits = torch.randn(64, 49408, generator=gen) * scale
    logits[:8] = logits[:8].round()  # ties at the cut-offs
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    fast = pick_tokens(logits, u, temperature, top_k, top_p)
    full = pick_tokens(logits, u, temperature, top_k, top_p, prefilter=49408)
    assert torch.equal(fast, full)
    for i in (0, 9, 63):  # and each row alone
        assert pick_tokens(logits[i : i + 1], u[i : i + 1], temperature, top_k, top_p).item() == full[i].item()


# --------------------------------------------------------------------------- unpadded teacher text towers


def _teacher(name: str, **cfg_changes) -> Teacher:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, **cfg_changes).eval().requires_grad_(False)
    init_uninitialized(model)
    cfg = open_clip.get_model_config(name)
    spec = TeacherSpec(
        id=name, model=name, pretrained="x.safetensors", logit_scale=100.0, image_size=cfg["vision_cfg"]["image_size"]
    )
    return Teacher(spec, model, open_clip.get_tokenizer(name, context_length=cfg["text_cfg"]["context_length"]))


@pytest.mark.parametrize("name", ["dr-tiny-vit-a", "dr-tiny-vit-b"])
def test_unpadded_text_tower_equals_full_context(name, monkeypatch):
    t = _teacher(name)
    assert t._unpadded is not None
    texts = [
        "a dog",
        "two red circles on a blue square",
        "x",
        "a photo of " + "many things " * 20,
        "an image",
        "cat",
    ] * 3
    tokens = t.tokenizer(texts)
    with torch.inference_mode():
        want = F.normalize(t.model.encode_text(tokens), dim=-1)
    seen: list[int] = []
    forward = type(t._unpadded[2]).forward

    def spy(self, x, attn_mask=None):
        seen.append(x.shape[1])
        return forward(self, x, attn_mask=attn_mask)

    monkeypatch.setattr(type(t._unpadded[2]), "forward", spy)
    t.text_batch_size = 4  # length buckets of 4 captions
    got = t.encode_texts(texts)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    ctx = tokens.shape[1]
    assert max(seen) == ctx and min(seen) <= 4  # short buckets run short sequences
    lengths = sorted(int(p) + 1 for p in pooled_positions(tokens, "argmax", None))
    assert seen == [max(lengths[i : i + 4]) for i in range(0, len(lengths), 4)]


def test_unpadded_needs_a_causal_tower_pooled_at_a_token():
    t = _teacher("dr-tiny-vit-a")
    parts = _text_tower(t.model)
    tokens = t.tokenizer(["a dog on grass", "x"])
    with torch.inference_mode():
        torch.testing.assert_close(encode_text_unpadded(parts, tokens), t.model.encode_text(tokens), rtol=0, atol=2e-6)
    t.model.text_pool_type = "last"  # pooled at the last position: needs padding
    assert _text_tower(t.model) is None
    t.model.text_pool_type = "argmax"
    t.model.attn_mask = None  # bidirectional: later tokens matter
    assert _text_tower(t.model) is None
