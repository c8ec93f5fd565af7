"""CoCa students in the trainer: the caption loss equals open_clip's, the restricted-vocabulary
form equals the full one, and ``student.init_from`` copies exactly the matching tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dr_pipeline.config import ConfigError, load_ensemble
from dr_pipeline.corpus.synthetic import make_split
from dr_pipeline.models.teachers import register_model_configs
from dr_pipeline.train.coca import CaptionLoss, domain_vocab, init_decoder
from dr_pipeline.train.config import DataConfig, LossConfig, OptimConfig, StudentConfig, TrainConfig
from dr_pipeline.train.students import build_student, init_from, resolve_spec, tokenize

ENSEMBLE = Path(__file__).resolve().parents[1] / "teachers" / "synthetic.yaml"
CAPTIONS = ["a red circle", "a small blue square on the left and a green star", "a gray cross at the top"]


@pytest.fixture(scope="module")
def coca():
    register_model_configs(load_ensemble(ENSEMBLE))
    spec = resolve_spec(StudentConfig(arch="dr-syn-coca"))
    return build_student(spec, seed=0)


def _batch(student, n=3):
    g = torch.Generator().manual_seed(1)
    size = student.spec.image_size
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images, tokenize(CAPTIONS[:n], student.spec.context_length)


def test_caption_loss_equals_open_clips_coca_loss(coca):
    images, tokens = _batch(coca)
    _, _, _, hidden = coca(images, tokens, caption_rows=len(tokens))
    ours = CaptionLoss(coca.clip.text_decoder.text_projection.shape[1], None)(coca.clip, hidden, tokens[:, 1:])
    out = coca.clip(coca.preprocess(images), tokens)  # open_clip CoCa.forward, teacher-forced
    ref = F.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=0)  # open_clip CoCaLoss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_restricted_vocabulary_is_the_full_cross_entropy(coca):
    """With the columns outside the vocabulary zero, the restricted form's value and its
    gradients of the hidden states and of the vocabulary's columns are the full form's; the
    other columns get none (they stay zero). An out-of-vocabulary target scores as the lump."""
    images, tokens = _batch(coca)
    vocab = domain_vocab(tokenize(CAPTIONS[1:], coca.spec.context_length))  # caption 0's "red", "circle" are out
    model = coca.clip
    init_decoder(model, torch.tensor(vocab))
    proj = model.text_decoder.text_projection
    keep = torch.zeros(proj.shape[1], dtype=torch.bool)
    keep[list(vocab)] = True
    assert torch.count_nonzero(proj[:, ~keep]) == 0 and torch.count_nonzero(proj[:, keep]) > 0
    _, _, _, hidden = coca(images, tokens, caption_rows=len(tokens))
    n = proj.shape[1]

    def run(loss_fn, rows):
        model.zero_grad()
        h = hidden[rows].detach().requires_grad_(True)
        loss = loss_fn(model, h, tokens[rows, 1:])
        loss.backward()
        return loss.detach(), h.grad, proj.grad.clone()

    (la, ha, pa), (lb, hb, pb) = run(CaptionLoss(n, vocab), slice(1, 3)), run(CaptionLoss(n, None), slice(1, 3))
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pa[:, keep], pb[:, keep], rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(pa[:, ~keep]) == 0  # frozen at zero in the restricted form
    # caption 0's out-of-vocabulary targets: log(n_other) cheaper each than in the full form
    (lc, _, _), (ld, _, _) = run(CaptionLoss(n, vocab), slice(0, 1)), run(CaptionLoss(n, None), slice(0, 1))
    assert lc < ld


def test_trainer_trains_a_coca_student_from_a_clip_trunk(tmp_path):
    """A CoCa student on a base corpus alone through ``Trainer``: the caption loss is logged, the
    image trunk starts as the CLIP checkpoint's and the rest as the seeded init."""
    from safetensors.torch import save_file

    from dr_pipeline.bootstrap import TRUNK_KEYS
    from dr_pipeline.train import checkpoint as ckpt
    from dr_pipeline.train.distributed import setup, teardown
    from dr_pipeline.train.loop import Trainer, train

    register_model_configs(load_ensemble(ENSEMBLE))
    make_split("clean", str(tmp_path / "clean"), 2, 8, seed=0, formats=("tar",), per_class=0)
    clip = build_student(resolve_spec(StudentConfig(arch="dr-syn-vit-a")), seed=5)
    g = torch.Generator().manual_seed(0)  # no tensor equals the CoCa's own init by chance (ones, constants)
    src = {k: (v + torch.rand(v.shape, generator=g)).contiguous() for k, v in clip.clip.state_dict().items()}
    save_file(src, str(tmp_path / "a.safetensors"))
    vocab = (1, 2, 3, 49406, 49407)  # most caption tokens fall in the lumped class: still trains
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"),
        data=DataConfig(reinforced=None, base=str(tmp_path / "clean/tar/*.tar"), augmentation="center", num_workers=0),
        steps=2,
        batch_size=8,
        student=StudentConfig(arch="dr-syn-coca", init_from=str(tmp_path / "a.safetensors"), init_keys=TRUNK_KEYS),
        loss=LossConfig(lam=0.0, syn_weight=0.0, caption_weight=2.0, caption_vocab=vocab),
        optim=OptimConfig(warmup_steps=1),
        device="cpu",
        log_every=1,
    )
    env = setup("cpu")
    try:
        t = Trainer(cfg, env)
        own = t.student.clip.state_dict()
        copied = [k for k in own if k in src and src[k].shape == own[k].shape and torch.equal(own[k], src[k])]
        assert copied and all(k.startswith("visual.") for k in copied)
        assert "visual.conv1.weight" in copied and "visual.transformer.resblocks.0.attn.in_proj_weight" in copied
        assert not any(k.startswith(("visual.attn_pool", "visual.proj")) for k in copied)
        proj = t.student.clip.text_decoder.text_projection
        assert int((proj.abs().sum(0) > 0).sum()) == len(vocab)
    finally:
        teardown(env)
    res = train(cfg)
    assert res.step == 2 and res.samples >= 16 and not res.skipped
    rows = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    assert len(rows) == 2 and all(r["caption_loss"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["contrastive_loss"] + 2.0 * rows[0]["caption_loss"], rel=1e-5)
    assert "model" in ckpt.load_checkpoint(res.checkpoint)


def test_init_from_and_caption_loss_are_checked(tmp_path, coca):
    from safetensors.torch import save_file

    save_file({"unrelated.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConfigError, match="no tensor matches init_keys"):
        init_from(coca, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConfigError, match="not a regular expression"):
        StudentConfig(arch="tiny", init_keys="(")
    with pytest.raises(ConfigError, match="caption_vocab"):
        LossConfig(caption_vocab=(0, 5))
    data = DataConfig(reinforced=None, base=str(tmp_path / "*.tar"), augmentation="center")
    with pytest.raises(ConfigError, match="accum_steps"):
        TrainConfig(
            out_dir="o", data=data, steps=1, batch_size=2, accum_steps=2, loss=LossConfig(lam=0.0, caption_weight=1.0)
        )
