"""Teachers, captioner and tiny checkpoints (dr_pipeline.models), on tiny random models, CPU only."""

from __future__ import annotations

import collections
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from dr_pipeline.config import CaptionerSpec, ConfigError, SamplingSpec, load_ensemble
from dr_pipeline.models import captioner as capmod
from dr_pipeline.models.captioner import (
    Captioner,
    clean_caption,
    is_degenerate,
    load_captioner,
    pick_tokens,
    row_uniforms,
)
from dr_pipeline.models.teachers import check_ensemble, load_teacher, register_model_configs
from dr_pipeline.models.tiny import init_uninitialized, make_tiny_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ROOT / "teachers"


def _copy_tiny(dst: Path) -> Path:
    """A private copy of teachers/tiny.yaml + models/, so no checkpoint lands in the repo."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TEACHERS / "models", dst / "models")
    shutil.copy(TEACHERS / "tiny.yaml", dst / "tiny.yaml")
    return dst / "tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 OpenMP threads, and on a busy 2-core box every op then
    waits on a thread barrier (~20x slower). One thread keeps this file fast and steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = _copy_tiny(tmp_path_factory.mktemp("tiny"))
    make_tiny_checkpoints(str(path))
    return path


@pytest.fixture(scope="module")
def ensemble(tiny_yaml):
    return load_ensemble(tiny_yaml)


@pytest.fixture(scope="module")
def teachers(ensemble):
    return [load_teacher(t, ensemble) for t in ensemble.teachers]


@pytest.fixture(scope="module")
def captioner(ensemble):
    return load_captioner(ensemble.captioners[0], ensemble)


def _views(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- tiny checkpoints


def test_make_tiny_checkpoints_deterministic(tiny_yaml, tmp_path):
    other = _copy_tiny(tmp_path / "again")
    written = make_tiny_checkpoints(str(other))
    assert [Path(p).name for p in written] == [
        "tiny-vit-a.safetensors",
        "tiny-vit-b.safetensors",
        "tiny-coca.safetensors",
    ]
    for p in written:  # same bytes as the fixture's run, in another folder and process state
        assert Path(p).read_bytes() == (tiny_yaml.parent / "checkpoints" / Path(p).name).read_bytes()
    assert make_tiny_checkpoints(str(other)) == []  # existing files are kept
    before = Path(written[0]).read_bytes()
    assert len(make_tiny_checkpoints(str(other), force=True)) == 3
    assert Path(written[0]).read_bytes() == before


def test_make_tiny_refuses_real_models(tmp_path):
    path = _copy_tiny(tmp_path)
    text = path.read_text().replace("model: dr-tiny-vit-b", "model: ViT-B-32", 1)
    path.write_text(text)
    with pytest.raises(ConfigError, match="tiny-vit-b.*refusing to write random weights for 'ViT-B-32'"):
        make_tiny_checkpoints(str(path))


def test_load_teacher_reads_the_checkpoint(ensemble, teachers):
    for spec, teacher in zip(ensemble.teachers, teachers):
        saved = load_file(ensemble.resolve(spec.pretrained))
        state = teacher.model.state_dict()
        assert saved.keys() == state.keys()
        assert all(torch.equal(saved[k], state[k]) for k in saved)


# --------------------------------------------------------------------------- check_ensemble


def test_check_ensemble_names_teacher_problem_and_fix(ensemble, tmp_path):
    check_ensemble(ensemble)
    a, b = ensemble.teachers
    bad = dataclasses.replace(ensemble, teachers=(dataclasses.replace(a, model="ViT-Q-99"), b))
    with pytest.raises(ConfigError) as e:
        check_ensemble(bad)
    msg = str(e.value)
    assert "teacher 'tiny-vit-a'" in msg and "unknown open_clip model 'ViT-Q-99'" in msg
    assert "open_clip.list_models()" in msg and "\n" not in msg

    missing = dataclasses.replace(
        ensemble, teachers=(a, dataclasses.replace(b, pretrained="checkpoints/nope.safetensors"))
    )
    with pytest.raises(ConfigError) as e:
        check_ensemble(missing)
    msg = str(e.value)
    assert "teacher 'tiny-vit-b'" in msg and "checkpoint not found" in msg
    assert str(Path(ensemble.source) / "checkpoints/nope.safetensors") in msg and "dr make-teachers" in msg


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(pretrained="hf-hub:org/repo"), "set model: hf-hub:org/repo"),
        (dict(model="hf-hub:not a repo", pretrained=None), "malformed hf-hub id"),
        (dict(model="ViT-B-32", pretrained="no_such_tag", image_size=224), "unknown pretrained tag 'no_such_tag'"),
        (dict(pretrained=None), "no pretrained weights"),
        (dict(context_length=77), "context_length 77 but 'dr-tiny-vit-a' has 16"),
        (dict(image_size=64), "image_size 64 but 'dr-tiny-vit-a' takes 32"),
    ],
)
def test_check_ensemble_rejects(ensemble, change, expected):
    t = dataclasses.replace(ensemble.teachers[0], **change)
    with pytest.raises(ConfigError, match="teacher 'tiny-vit-a'") as e:
        check_ensemble(dataclasses.replace(ensemble, teachers=(t,)))
    assert expected in str(e.value)


def test_check_ensemble_rejects_bad_sampling(ensemble):
    c = ensemble.captioners[0]
    bad = dataclasses.replace(c, sampling=dataclasses.replace(c.sampling, max_len=33))
    with pytest.raises(ConfigError, match="captioner 'tiny-coca'.*max_len <= 32"):
        check_ensemble(dataclasses.replace(ensemble, captioners=(bad,)))


@pytest.mark.parametrize("name", ["dfndr2b.yaml", "datacompdr.yaml"])
def test_real_ensembles_check_without_download(name, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("check_ensemble must not download")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_network)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", no_network)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    ens = load_ensemble(TEACHERS / name)
    check_ensemble(ens)
    assert [t.logit_scale for t in ens.teachers] == ([70.0, 60.0] if name == "dfndr2b.yaml" else [100.0, 100.0])
    assert all(t.model == "ViT-L-14" and t.image_size == 224 for t in ens.teachers)
    assert [c.model for c in ens.captioners] == ["coca_ViT-L-14"]


# --------------------------------------------------------------------------- teachers


def test_teachers_differ_and_encode_unit_float32(teachers):
    a, b = teachers
    assert (a.image_size, a.dim, a.logit_scale) == (32, 32, 70.0)
    assert (b.image_size, b.dim, b.logit_scale) == (48, 48, 60.0)
    for t in teachers:
        img = t.encode_images(_views(3, t.image_size))
        txt = t.encode_texts(["a red circle", "a blue square", "two dogs"])
        for z in (img, txt):
            assert z.dtype == torch.float32 and z.shape == (3, t.dim)
            torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
        with pytest.raises(ValueError, match="needs"):
            t.encode_images(_views(1, t.image_size + 16))
    assert a.encode_texts([]).shape == (0, a.dim)


def test_encode_images_matches_manual_normalization(teachers):
    for t in teachers:
        views = _views(4, t.image_size, seed=3)
        mean = torch.tensor(t.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(t.spec.std).view(1, 3, 1, 1)
        with torch.no_grad():
            want = t.model.encode_image((views.float() / 255 - mean) / std, normalize=True)
        torch.testing.assert_close(t.encode_images(views), want)


def test_long_captions_are_truncated(teachers):
    for t in teachers:
        ctx = t.spec.context_length
        long_a = "a photo of " + "many red circles " * 60 + "and a dog"
        long_b = "a photo of " + "many red circles " * 60 + "and a cat"
        z = t.encode_texts([long_a, long_b, "short"])
        assert z.shape == (3, t.dim)
        assert t.tokenizer([long_a]).shape == (1, ctx)
        torch.testing.assert_close(z[0], z[1])  # they differ only past the context length
        assert not torch.allclose(z[0], z[2])


def test_text_sub_batches_match_one_batch(teachers):
    t = teachers[1]
    texts = [f"caption number {i}" for i in range(7)]
    whole = t.encode_texts(texts)
    t.text_batch_size = 3
    try:
        torch.testing.assert_close(t.encode_texts(texts), whole)
    finally:
        t.text_batch_size = 256


# --------------------------------------------------------------------------- captions: hygiene


def test_clean_caption_and_is_degenerate():
    assert (
        clean_caption("<start_of_text>a red circle on the left . a blue one<end_of_text>!!!!")
        == "a red circle on the left"
    )
    assert clean_caption("a red circle on the left.") == "a red circle on the left"
    assert clean_caption("  a   dog ,  running  ") == "a dog, running"
    assert clean_caption("a 3.5 m wall") == "a 3.5 m wall"
    assert clean_caption("<start_of_text><end_of_text>") == ""
    assert is_degenerate("a 2 2 2 2")
    assert is_degenerate("dog")
    assert is_degenerate("the the")
    assert is_degenerate("a dog dog dog on grass")
    assert is_degenerate("red red red blue red")
    assert is_degenerate("1 , 2 ; 3 4")
    assert not is_degenerate("a red circle on the left")
    assert not is_degenerate("a man and a woman and a dog")


# --------------------------------------------------------------------------- captions: sampling


def test_row_uniforms_are_a_pure_function_of_the_row():
    u = row_uniforms(0, "k", 1, 0, 20)
    assert u.shape == (20,) and ((0 <= u) & (u < 1)).all()
    assert (u == row_uniforms(0, "k", 1, 0, 20)).all()
    for other in [(1, "k", 1, 0), (0, "j", 1, 0), (0, "k", 2, 0), (0, "k", 1, 1)]:
        assert not (u == row_uniforms(*other, 20)).all()
    assert (row_uniforms(0, "k", 1, 0, 5) == u[:5]).all()


def test_pick_tokens_filters_and_inverts_the_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)[:-1]
    rows = logits.expand(len(u), -1)
    counts = torch.bincount(pick_tokens(rows, u, 1.0, 0, 1.0), minlength=4).float() / len(u)
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.5, 0.15, 0.25]), atol=2e-3, rtol=0)
    # top_p 0.7 keeps {0.5, 0.25} (0.5 alone is short of 0.7), renormalised to 2/3, 1/3
    counts = torch.bincount(pick_tokens(rows, u, 1.0, 0, 0.7), minlength=4).float() / len(u)
    torch.testing.assert_close(counts, torch.tensor([0, 2 / 3, 0, 1 / 3]), atol=2e-3, rtol=0)
    assert set(pick_tokens(rows, u, 1.0, 1, 1.0).tolist()) == {1}  # top_k 1 = argmax
    assert set(pick_tokens(rows, u, 1.0, 0, 0.01).tolist()) == {1}  # tiny nucleus = argmax
    assert pick_tokens(logits, None, 1.0, 0, 0.9).item() == 1  # greedy
    assert pick_tokens(logits, torch.tensor([1 - 2**-53], dtype=torch.float64), 1.0, 0, 0.7).item() == 3


def test_captions_are_seeded_and_independent_of_the_batch(captioner):
    views = _views(3, captioner.image_size, seed=5)
    keys = ["key-a", "key-b", "key-c"]
    first = captioner.caption(views, keys, seed=7, k=3)
    assert len(first.captions) == 3 and all(1 <= len(c) <= 3 for c in first.captions)
    assert all(
        isinstance(s, str) and s == clean_caption(s) and not is_degenerate(s) for caps in first.captions for s in caps
    )
    assert isinstance(first.rejected, collections.Counter)
    assert captioner.caption(views, keys, seed=7, k=3).captions == first.captions
    assert captioner.caption(views, keys, seed=8, k=3).captions != first.captions
    # key-b alone, and in reversed order, gets exactly the same captions
    assert captioner.caption(views[1:2], keys[1:2], seed=7, k=3).captions[0] == first.captions[1]
    rev = captioner.caption(views.flip(0), keys[::-1], seed=7, k=3)
    assert rev.captions[::-1] == first.captions
    # fewer captions per image: a prefix of the same draws (caption index is part of the seed)
    two = captioner.caption(views, keys, seed=7, k=2).captions
    assert all(b == [c for c in a if c in b] for a, b in zip(first.captions, two))


def test_rejected_captions_are_resampled_then_counted(captioner, monkeypatch):
    views, keys = _views(2, captioner.image_size, seed=9), ["p", "q"]
    monkeypatch.setattr(capmod, "is_degenerate", lambda text, min_words=2: True)
    out = captioner.caption(views, keys, seed=1, k=2)
    assert out.captions == [[], []]
    assert out.rejected == collections.Counter(degenerate=2 * 2 * captioner.spec.sampling.max_attempts)

    seen: dict[str, int] = collections.Counter()

    def reject_first_draw(text: str, min_words: int = 2) -> bool:
        seen[text] += 1
        return len(seen) <= 2  # the first two distinct captions ever seen are rejected

    monkeypatch.setattr(capmod, "is_degenerate", reject_first_draw)
    out = captioner.caption(views, keys, seed=1, k=2)
    assert out.rejected["degenerate"] >= 2 and all(len(c) == 2 for c in out.captions)


# --------------------------------------------------------------------------- captions: greedy == generate


def _boosted_captioner(name: str, boost: float, max_len: int, min_len: int) -> Captioner:
    """Random CoCa whose end-of-text and pad logits are inflated, so rows stop at varied steps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name).eval()
        init_uninitialized(model)
    with torch.no_grad():
        model.text_decoder.text_projection[:, 49407] *= boost
        model.text_decoder.text_projection[:, 0] *= 0.8 * boost
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    spec = CaptionerSpec(
        id=name, model=name, image_size=size, sampling=SamplingSpec(max_len=max_len, min_len=min_len, top_p=0.9)
    )
    return Captioner(spec, model.requires_grad_(False), open_clip.get_tokenizer(name))


def _generate(c: Captioner, views: torch.Tensor) -> torch.Tensor:
    s = c.spec.sampling
    x = (views.float() / 255 - c.mean) / c.std
    return c.model.generate(x, generation_type="top_k", top_k=1, seq_len=s.max_len, min_seq_len=s.min_len)


def test_greedy_equals_open_clip_generate(captioner, ensemble):
    views = _views(4, captioner.image_size, seed=11)
    ours = captioner.decode(captioner.encode_images(views), None)
    assert torch.equal(ours, _generate(captioner, views))

    register_model_configs(ensemble)
    for name in ["dr-tiny-coca", "dr-tiny-coca-wide"]:
        c = _boosted_captioner(name, boost=3.0, max_len=16, min_len=4)
        views = _views(8, c.image_size, seed=1)
        ours = c.decode(c.encode_images(views), None)
        assert torch.equal(ours, _generate(c, views))
        lengths = (ours != 0).sum(dim=1)
        assert lengths.min() < 16 == lengths.max()  # some rows stopped early, some ran out


def test_sampling_respects_min_and_max_len(ensemble):
    register_model_configs(ensemble)
    c = _boosted_captioner("dr-tiny-coca", boost=3.0, max_len=12, min_len=6)
    n = 16
    u = torch.from_numpy(np.stack([row_uniforms(0, "k", i, 0, 12) for i in range(n)]))
    emb = c.encode_images(_views(1, c.image_size)).expand(n, -1, -1)
    tokens = c.decode(emb, u)
    assert tokens.shape[1] <= 12 and (tokens[:, 0] == c.sot).all()
    for row in tokens.tolist():
        stops = [i for i, t in enumerate(row) if t in (c.eot, c.pad)]
        assert stops, "every row ends with end-of-text or pad"
        if row[stops[0]] == c.eot:
            assert stops[0] >= 6  # end-of-text is suppressed while the prefix is shorter
