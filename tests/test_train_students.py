"""MCi students: published sizes, re-parameterization, open_clip compatibility."""
from __future__ import annotations

import pytest
import torch

from dr_pipeline.train.config import StudentConfig
from dr_pipeline.train.students import build_student, image_param_count, resolve_spec, tokenize

# REFERENCE.md "MCi students": image-encoder parameters (millions)
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
        fused = reparameterize_model(tower)        # a copy, as Student.reparameterize does
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
        torch.testing.assert_close(student.encode_image(images),
                                   reference.encode_image(images.float() / 255.0, normalize=True))
        torch.testing.assert_close(student.encode_text(tokens), reference.encode_text(tokens, normalize=True))
