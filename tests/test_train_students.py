"""MCi students: published sizes, re-parameterization, open_clip compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dr_pipeline.train.config import StudentConfig
from dr_pipeline.train.students import StudentSpec, build_student, image_param_count, resolve_spec, tokenize

# docs/reference.md#mci-students: image-encoder parameters (millions)
PUBLISHED = {"mci0": 11.4, "mci1": 21.5, "mci2": 35.7, "mci3": 125.1, "mci4": 321.6}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_image_towers_have_the_published_sizes(arch):
    n = image_param_count(resolve_spec(StudentConfig(arch=arch))) / 1e6
    assert n == pytest.approx(PUBLISHED[arch], rel=0.005)


def _perturb(module: torch.nn.Module, g: torch.Generator) -> None:
    """Move weights and BatchNorm statistics away from their init values (fusion must use them)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def test_reparameterized_student_matches_the_unfused_one():
    spec = resolve_spec(StudentConfig(arch="tiny", image_size=64))
    size = spec.image_size
    model = build_student(spec, seed=0)
    g = torch.Generator().manual_seed(0)
    _perturb(model.visual, g)
    model.eval()
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=g)
    tokens = tokenize(["a red circle", "a blue square", "a green star on the left"], spec.context_length)
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(tokens)
        fused = model.reparameterize()
        after = fused.encode_image(images), fused.encode_text(tokens)
    # branches really were fused, into a copy: the original keeps its training-time form
    assert sum(p.numel() for p in fused.visual.parameters()) < sum(p.numel() for p in model.visual.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_params and model.visual.training is False
    assert not fused.training
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_reparameterized_mci0_image_tower_matches_the_unfused_one():
    from timm.utils import reparameterize_model

    from dr_pipeline.train.students import VisualTower

    tower = VisualTower(resolve_spec(StudentConfig(arch="mci0")))
    g = torch.Generator().manual_seed(1)
    _perturb(tower, g)
    tower.eval()
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        before = tower(x)
        fused = reparameterize_model(tower)  # a copy, as Student.reparameterize does
        after = fused(x)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in tower.parameters())
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)


def test_mci0_student_state_dict_loads_into_open_clip_mobileclip2_s0():
    import open_clip

    student = build_student(resolve_spec(StudentConfig(arch="mci0")), seed=0)
    reference = open_clip.create_model("MobileCLIP2-S0")
    reference.load_state_dict(student.state_dict(), strict=True)
    reference.eval()
    student.eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = open_clip.get_tokenizer("MobileCLIP2-S0")(["a photo of a cat", "a red square"])
    with torch.no_grad():
        torch.testing.assert_close(
            student.encode_image(images), reference.encode_image(images.float() / 255.0, normalize=True)
        )
        torch.testing.assert_close(student.encode_text(tokens), reference.encode_text(tokens, normalize=True))


# --------------------------------------------------------------------------- open_clip students

TINY_CLIP = "dr-tiny-vit-a"  # teachers/models/: a 2-layer open_clip ViT at 32 px


@pytest.fixture(scope="module")
def tiny_clip_registered():
    import open_clip

    open_clip.add_model_config(Path(__file__).resolve().parents[1] / "teachers" / "models")
    return TINY_CLIP


@pytest.mark.parametrize(
    "name,image_size,mparams", [("ViT-B-16", 224, 86.19), ("MobileCLIP-B", 224, 86.35), ("MobileCLIP2-S0", 256, 11.41)]
)
def test_open_clip_model_names_resolve_as_students(name, image_size, mparams):
    spec = resolve_spec(StudentConfig(arch=name))
    assert (spec.open_clip_model, spec.image_size, spec.context_length) == (name, image_size, 77)
    assert image_param_count(spec) / 1e6 == pytest.approx(mparams, rel=0.005)  # built on the meta device
    assert StudentSpec.from_dict(spec.to_dict()) == spec


def test_unknown_student_arch_is_a_config_error():
    from dr_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="open_clip model name"):
        StudentConfig(arch="MobileCLIP-S9")


def test_open_clip_student_trains_on_uint8_images_and_loads_into_open_clip(tiny_clip_registered):
    import open_clip

    spec = resolve_spec(StudentConfig(arch=tiny_clip_registered, init_logit_scale=20.0))
    student = build_student(spec, seed=0)
    again = build_student(spec, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    assert student.logit_scale.exp().item() == pytest.approx(20.0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tokens = tokenize(["a red square", "a blue circle", "a cat", "a dog"], spec.context_length)
    img, txt, scale = student(images, tokens)
    assert img.shape == txt.shape == (4, 32) and torch.allclose(img.norm(dim=-1), torch.ones(4))
    (img @ txt.T * scale).logsumexp(1).mean().backward()
    assert student.clip.visual.conv1.weight.grad is not None and student.logit_scale.grad is not None
    ref = open_clip.create_model(tiny_clip_registered, pretrained=None)
    ref.load_state_dict(student.clip.state_dict())  # the very open_clip layout
    with torch.no_grad():
        want = ref.encode_image(student.preprocess(images), normalize=True)
        torch.testing.assert_close(student.eval().encode_image(images), want)
        torch.testing.assert_close(student.reparameterize().encode_image(images), want)


def _forward_counter(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1)
    )  # early-stopped recompute: no post hook
    return calls


@pytest.mark.parametrize("arch", ["tiny", TINY_CLIP])
def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients(arch, tiny_clip_registered):
    spec = resolve_spec(StudentConfig(arch=arch, image_size=32))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tokens = tokenize(["a red square", "a blue circle", "a cat", "a dog"], spec.context_length)
    grads, calls = [], []
    for ckpt in (False, True):
        student = build_student(spec, seed=0).eval()  # eval: BatchNorm statistics stay fixed
        student.set_grad_checkpointing(ckpt)
        block = student.text.transformer.resblocks[0] if arch == "tiny" else student.clip.transformer.resblocks[0]
        n = _forward_counter(block)
        img, txt, scale = student(images, tokens)
        (img @ txt.T * scale).logsumexp(1).mean().backward()
        calls.append(n[0])
        grads.append({k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # recomputed once in backward
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_tokenize_is_open_clip_simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    texts = [
        "",
        "a red circle",
        "A  Photo of   the CAT's toy &amp; <b>dog</b>",
        "naïve café – “quoted” 🐈 emoji",
        "x" * 300,
        "word " * 100,
        "日本語のキャプション",
        "tab\tnew\nline\r\nend; it's 1,234.5 m² — don't",
        "<start_of_text> hi <end_of_text>",
    ]
    for ctx in (77, 32, 4):
        want = SimpleTokenizer(context_length=ctx)(texts, ctx)
        assert torch.equal(tokenize(texts, ctx), want)
        assert torch.equal(tokenize(texts, ctx), want)  # words memoized now
    assert tokenize([], 77).shape == (0, 77)


def test_ascii_fast_cleaning_is_open_clips_cleaning():
    """The printable-ASCII shortcut of ``_clean`` skips ftfy and HTML unescaping: on random
    ASCII text (every printable character, spaces runs, entities, control characters that
    must take the full path) it gives exactly open_clip's ``_clean_lower``."""
    import random

    from open_clip.tokenizer import _clean_lower

    from dr_pipeline.train.students import _clean, _tokenizer

    tok = _tokenizer(77)
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + [" "] * 20 + ["\t", "\n", "\r", "\x1b", "\x00", "\x7f"]
    pieces = ["&amp;", "&lt;b&gt;", "&#39;", "''", "--", "..."]
    texts = []
    for _ in range(3000):
        parts = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.2:
            parts.insert(rng.randint(0, len(parts)), rng.choice(pieces))
        texts.append("".join(parts))
    fast = [t for t in texts if t.isascii() and t.isprintable() and "&" not in t]
    assert 1000 < len(fast) < len(texts)  # both paths are exercised
    for t in texts:
        assert _clean(tok, t) == _clean_lower(t), repr(t)
