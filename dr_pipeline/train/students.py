"""MCi student models: a timm FastViT-MCi image tower + an open_clip text transformer.

The module layout and parameter names mirror open_clip's ``CustomTextCLIP`` with a timm
tower (``visual.trunk.*``, ``text.*``, ``logit_scale``), so a trained MCi0/2/3/4 student's
state dict loads into ``open_clip.create_model("MobileCLIP2-S0/S2/S3/S4")`` (MCi1:
``MobileCLIP-S1``) unchanged. Images go in as uint8 [B, 3, S, S]; the model converts and
normalizes them itself (mean/std in the spec), so loaders never ship floats.

``tiny`` is the same FastViT-MCi code (RepMixer stages, attention stage with conditional
positional encoding, re-parameterizable branches) at one block per stage and 16→128
channels, with a 2-layer text tower: it trains at 64 px on a CPU in milliseconds.

Any open_clip model name is a student too (``OpenClipStudent``: ``ViT-B-16``,
``MobileCLIP-B``, ``MobileCLIP2-S0``, configs registered with ``open_clip.add_model_config``),
built with random weights and the same interface (uint8 images in, normalized features
out); its ``clip`` attribute is the open_clip model itself (``student.clip.state_dict()``
loads into ``open_clip.create_model(name)``). ``set_grad_checkpointing`` recomputes the
towers' activations in backward (timm stages, open_clip transformers).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dr_pipeline.train.config import StudentConfig

_TEXT_BIG = dict(vocab_size=49408, no_causal_mask=True)


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild a student (stored as a plain dict in checkpoints)."""

    arch: str
    timm_model: str
    timm_kwargs: dict[str, Any]
    embed_dim: int
    image_size: int
    text_width: int
    text_heads: int
    text_layers: int
    context_length: int
    vocab_size: int = 49408
    no_causal_mask: bool = True
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    open_clip_model: str | None = None  # an open_clip model name: OpenClipStudent (timm_* unused)

    def to_dict(self) -> dict:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict) -> StudentSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown student spec keys {sorted(unknown)}")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# Published stage layouts (docs/reference.md#mci-students); the text towers are those of
# open_clip's MobileCLIP(2) configs. OpenCLIP model with the same layout in the comment.
ARCHS: dict[str, dict[str, Any]] = {
    "mci0": dict(
        timm_model="fastvit_mci0",
        embed_dim=512,
        text_width=512,
        text_heads=8,  # MobileCLIP2-S0
        text_layers=12,
        image_size=256,
        context_length=77,
    ),
    "mci1": dict(
        timm_model="fastvit_mci1",
        embed_dim=512,
        text_width=512,
        text_heads=8,  # MobileCLIP-S1
        text_layers=12,
        image_size=256,
        context_length=77,
    ),
    "mci2": dict(
        timm_model="fastvit_mci2",
        embed_dim=512,
        text_width=512,
        text_heads=8,  # MobileCLIP2-S2
        text_layers=12,
        image_size=256,
        context_length=77,
    ),
    "mci3": dict(
        timm_model="fastvit_mci3",
        embed_dim=768,
        text_width=768,
        text_heads=12,  # MobileCLIP2-S3
        text_layers=12,
        image_size=256,
        context_length=77,
    ),
    "mci4": dict(
        timm_model="fastvit_mci4",
        embed_dim=768,
        text_width=768,
        text_heads=12,  # MobileCLIP2-S4
        text_layers=12,
        image_size=256,
        context_length=77,
    ),
    "tiny": dict(
        timm_model="fastvit_mci0",
        embed_dim=32,
        text_width=64,
        text_heads=2,
        text_layers=2,
        image_size=64,
        context_length=32,
        timm_kwargs=dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 64, 128]),
    ),
}


def resolve_spec(cfg: StudentConfig) -> StudentSpec:
    if cfg.arch not in ARCHS:
        return _open_clip_spec(cfg)
    a = dict(ARCHS[cfg.arch])
    return StudentSpec(
        arch=cfg.arch,
        timm_model=a["timm_model"],
        timm_kwargs=a.get("timm_kwargs", {}),
        embed_dim=a["embed_dim"],
        image_size=cfg.image_size or a["image_size"],
        text_width=a["text_width"],
        text_heads=a["text_heads"],
        text_layers=a["text_layers"],
        context_length=cfg.context_length or a["context_length"],
        mean=cfg.mean,
        std=cfg.std,
        init_logit_scale=cfg.init_logit_scale,
        max_logit_scale=cfg.max_logit_scale,
        **_TEXT_BIG,
    )


def _open_clip_spec(cfg: StudentConfig) -> StudentSpec:
    import open_clip

    from dr_pipeline.config import ConfigError

    mc = open_clip.get_model_config(cfg.arch)
    if mc is None:
        raise ConfigError(f"student.arch {cfg.arch!r}: not an open_clip model (open_clip.list_models())")
    text = mc.get("text_cfg", {})
    if text.get("hf_tokenizer_name") or text.get("vocab_size", 49408) != 49408:
        raise ConfigError(
            f"student.arch {cfg.arch!r}: its text tower uses another tokenizer than CLIP's BPE, "
            "which the loader tokenizes with"
        )
    size = mc["vision_cfg"].get("image_size", 224)
    return StudentSpec(
        arch=cfg.arch,
        timm_model="",
        timm_kwargs={},
        embed_dim=int(mc["embed_dim"]),
        image_size=cfg.image_size or int(size if isinstance(size, int) else size[0]),
        text_width=int(text.get("width", 512)),
        text_heads=int(text.get("heads", 8)),
        text_layers=int(text.get("layers", 12)),
        context_length=cfg.context_length or int(text.get("context_length", 77)),
        no_causal_mask=bool(text.get("no_causal_mask", False)),
        mean=cfg.mean,
        std=cfg.std,
        init_logit_scale=cfg.init_logit_scale,
        max_logit_scale=cfg.max_logit_scale,
        open_clip_model=cfg.arch,
    )


class VisualTower(nn.Module):
    """open_clip ``TimmModel`` layout with ``proj=None``: the timm head is the projection."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        import timm

        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.timm_kwargs.items()}
        self.trunk = timm.create_model(
            spec.timm_model, pretrained=False, num_classes=spec.embed_dim, global_pool="avg", **kwargs
        )
        self.head = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Student(nn.Module):
    def __init__(self, spec: StudentSpec):
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        self.spec = spec
        self.visual = VisualTower(spec)
        self.text = _build_text_tower(
            spec.embed_dim,
            CLIPTextCfg(
                context_length=spec.context_length,
                vocab_size=spec.vocab_size,
                width=spec.text_width,
                heads=spec.text_heads,
                layers=spec.text_layers,
                no_causal_mask=spec.no_causal_mask,
            ),
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(spec.init_logit_scale)))
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] (or float in [0, 255]) -> normalized float."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual(self.preprocess(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One call for DDP: (image features, text features, logit scale = exp(log scale))."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.spec.max_logit_scale))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def reparameterize(self) -> Student:
        """An inference copy with every multi-branch block fused (same outputs, eval mode)."""
        from timm.utils import reparameterize_model

        m = copy.deepcopy(self).eval()
        m.visual = reparameterize_model(m.visual, inplace=True)
        return m


def _create_clip(spec: StudentSpec, device: str = "cpu") -> nn.Module:
    import open_clip

    size = open_clip.get_model_config(spec.open_clip_model)["vision_cfg"].get("image_size", 224)
    return open_clip.create_model(
        spec.open_clip_model,
        pretrained=None,
        device=device,
        force_image_size=spec.image_size if spec.image_size != size else None,
        force_context_length=spec.context_length,
    )


class OpenClipStudent(Student):
    """An open_clip model (random init) behind the Student interface; ``clip`` is the model."""

    def __init__(self, spec: StudentSpec):
        nn.Module.__init__(self)
        self.spec = spec
        self.clip = _create_clip(spec)
        with torch.no_grad():
            self.clip.logit_scale.fill_(math.log(spec.init_logit_scale))
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        return self.clip.logit_scale

    @property
    def visual(self) -> nn.Module:  # type: ignore[override]
        return self.clip.visual

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(self.preprocess(images), normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, caption_rows: int = 0):
        """As ``Student.forward``; with ``caption_rows`` > 0 (a CoCa) also the decoder's hidden
        states of the first ``caption_rows`` texts, teacher-forced on their images
        ([caption_rows, L - 1, width]; ``train/coca.py`` turns them into the caption loss)."""
        if not caption_rows:
            return super().forward(images, tokens)
        from dr_pipeline.train.coca import decoder_hidden

        img_latent, img_tokens = self.clip._encode_image(self.preprocess(images))
        txt_latent, token_embs = self.clip._encode_text(tokens)
        hidden = decoder_hidden(self.clip, img_tokens, token_embs[:caption_rows, :-1])
        return img_latent, txt_latent, self.logit_scale.exp(), hidden

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def reparameterize(self) -> OpenClipStudent:
        from timm.utils import reparameterize_model

        m = copy.deepcopy(self).eval()
        m.clip = reparameterize_model(m.clip, inplace=True)
        return m


def weights_of(student: Student) -> nn.Module:
    """The module whose state dict has open_clip's names (an open_clip student's model)."""
    return student.clip if isinstance(student, OpenClipStudent) else student


def init_from(student: Student, path: str, keys: str = ".*") -> list[str]:
    """Copy the tensors of checkpoint ``path`` (safetensors, or a torch state dict / open_clip
    checkpoint) whose names ``re.match(keys)`` and whose shapes match into the student
    (``student.init_from``); returns the copied names. None copied is an error."""
    import re

    from open_clip.factory import load_state_dict  # safetensors or torch; "state_dict", "module." handled

    from dr_pipeline.config import ConfigError

    src = {k: v for k, v in load_state_dict(path, weights_only=True).items() if isinstance(v, torch.Tensor)}
    target = weights_of(student)
    own = target.state_dict()
    copied = {
        k: v.to(own[k].dtype) for k, v in src.items() if re.match(keys, k) and k in own and v.shape == own[k].shape
    }
    if not copied:
        raise ConfigError(f"student.init_from {path}: no tensor matches init_keys {keys!r} by name and shape")
    target.load_state_dict(copied, strict=False)
    return sorted(copied)


def build_student(spec: StudentSpec, seed: int | None = None) -> Student:
    cls = OpenClipStudent if spec.open_clip_model else Student
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(spec)
    return cls(spec)


_MAX_WORDS = 1 << 18  # memoized words per tokenizer (a few tens of MB at most)


@lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)
    tok.word_ids = {}  # word -> its BPE ids (``tokenize``)
    return tok


def _clean(tok, text: str) -> str:
    """open_clip's default cleaning (ftfy, HTML unescape twice, whitespace, lower case). Printable
    ASCII without ``&`` is what ftfy and the unescaping leave as is (their fixes need non-ASCII
    characters, control characters or ``&``), so such text skips them (ftfy is ~0.2 ms a
    caption); ``tests/test_train_students.py`` checks this against open_clip's own cleaning."""
    if text.isascii() and text.isprintable() and "&" not in text:
        return " ".join(text.split()).lower()
    return tok.clean_fn(text)


def _encode(tok, text: str) -> list[int]:
    """open_clip ``SimpleTokenizer.encode``: the same cleaning, split and byte-level BPE, with each
    word's ids memoized (the loader's per-sample cost is mostly Python per word)."""
    words, ids = tok.word_ids, []
    for word in tok.pat.findall(_clean(tok, text)):
        got = words.get(word)
        if got is None:
            bpe = tok.bpe("".join(tok.byte_encoder[b] for b in word.encode("utf-8")))
            got = [tok.encoder[t] for t in bpe.split(" ")]
            if len(words) < _MAX_WORDS:
                words[word] = got
        ids += got
    return ids


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """CLIP BPE tokens [N, context_length] (truncated, end-of-text kept), exactly open_clip's
    ``SimpleTokenizer(texts, context_length)``."""
    tok = _tokenizer(context_length)
    rows = []
    for text in texts:
        ids = [tok.sot_token_id, *_encode(tok, text), tok.eot_token_id]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = tok.eot_token_id
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)


def image_param_count(spec: StudentSpec) -> int:
    """Parameters of the image tower, counted without allocating weights (meta device)."""
    with torch.device("meta"):
        tower = _create_clip(spec, "meta").visual if spec.open_clip_model else VisualTower(spec)
        return sum(p.numel() for p in tower.parameters())


__all__ = [
    "ARCHS",
    "StudentSpec",
    "Student",
    "OpenClipStudent",
    "resolve_spec",
    "build_student",
    "tokenize",
    "image_param_count",
]
