"""``dr bootstrap``: train the synthetic domain's own *real* tiny teachers and captioner.

No pretrained weights can be downloaded here, and random-init teachers caption noise. So the
project makes its own: two CLIP teachers of different architectures (ViTs of different patch size,
resolution, width and embedding width, ``teachers/models/dr-syn-*.json``) and one CoCa captioner, trained on the
*clean* split of the synthetic domain (``dr make-corpus --split clean``: accurate compositional
captions, the stand-in for DFN-2B / MSCOCO-38k). The checkpoints load through the normal
teacher path (``teachers/synthetic.yaml`` -> ``load_teacher`` / ``load_captioner``).

Training, per model
  data     clean-split sample i = (shard i // per_shard, index i % per_shard), the same bytes
           ``dr make-corpus --split clean`` writes; each image as the *centre view* at the
           model's resolution (what ``dr reinforce`` shows a captioner; teachers see the seeded
           crops of the web split at reinforcement time);
  CLIP     the project's loss module, ``DistillClipLoss`` with λ = 0 (plain CLIP loss, GT captions);
  CoCa     CLIP loss + 2 x captioning cross-entropy. The cross-entropy runs over the domain's
           vocabulary only (every token of every clean caption, ~60 ids) plus one "everything
           else" class with logit log(n_other): the decoder's projection columns of the other
           49k tokens are zero and stay zero (their gradient is zero), so their logits are
           exactly 0 and this *is* the full-vocabulary cross-entropy, at 1/800 of the cost;
  optim    AdamW (β 0.9/0.98, wd 0.1 on weights only), warmup + cosine (the trainer's
           ``lr_at``), grad clip 1, logit scale clamped to 100.

Determinism: every model trains in a fixed number of threads (``jobs`` // the models of its
phase: the teachers one each, the captioner alone all of them), from
``torch.manual_seed(hash(seed, id))`` with a seeded batch order, so a run is a pure function
of (config, seed) on a given machine (float results can differ across CPU types and thread
counts). ``jobs`` models train in parallel processes.
Checkpoints are stored as float16 safetensors (open_clip casts on load) to keep the committed
set under 20 MB; ``SHA256SUMS`` beside them is ``sha256sum -c`` compatible, and
``bootstrap.json`` records the config, losses, timings, the teachers' zero-shot accuracy and
the captioner's caption accuracy on held-out images, all measured on the saved checkpoints
loaded through the normal path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from dr_pipeline.config import (
    CaptionerSpec,
    ConfigError,
    EnsembleSpec,
    TeacherSpec,
    load_ensemble,
    to_dict,
)
from dr_pipeline.corpus import synthetic
from dr_pipeline.process_pool import pool_map

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
REPORT = "bootstrap.json"
ZS_TEMPLATES = synthetic.ZEROSHOT_TEMPLATES


@dataclass(frozen=True)
class BootstrapConfig:
    seed: int = 0
    n_train: int = 12_000  # clean-split images
    per_shard: int = 1000  # clean-split layout (sample i -> shard i // per_shard)
    clip_steps: int = 6000  # per CLIP teacher (3000: shape 0.31 zero-shot; 6000: 0.44, docs/reproduce.md)
    coca_steps: int = 3000
    batch_size: int = 64  # whole minimal groups of the clean split
    group: int = synthetic.CLEAN_GROUP  # scenes per minimal group (twins with other shapes)
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    caption_loss_weight: float = 2.0
    clip_loss_weight: float = 1.0
    max_logit_scale: float = 100.0
    n_eval: int = 200  # held-out test-split scenes for caption accuracy
    eval_captions: int = 5  # captions per held-out image (the reinforce job's k)
    zeroshot_per_class: int = 4  # held-out zero-shot images per (colour, shape) class
    jobs: int = 2  # models trained in parallel processes (1 thread each)
    captioner_backbone: str | None = "syn-vit-a"  # init the captioner's image tower from this teacher
    dtype: str = "float16"  # checkpoint storage: float16 | float32

    def __post_init__(self) -> None:
        if self.group < 1 or self.n_train < self.batch_size or self.batch_size < 2 or self.batch_size % self.group:
            raise ConfigError("bootstrap: need n_train >= batch_size >= 2, batch_size a multiple of group >= 1")
        if self.per_shard % self.group:
            raise ConfigError("bootstrap: per_shard must be a multiple of group (groups do not span shards)")
        if min(self.clip_steps, self.coca_steps) < 1 or self.jobs < 1 or self.per_shard < 1:
            raise ConfigError("bootstrap: steps, jobs and per_shard must be >= 1")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"bootstrap.dtype must be float16 or float32 (got {self.dtype!r})")


# --------------------------------------------------------------------------- data


def clean_samples(cfg: BootstrapConfig) -> list[dict]:
    return [
        synthetic.make_split_sample("clean", cfg.seed, i // cfg.per_shard, i % cfg.per_shard, group=cfg.group)
        for i in range(cfg.n_train)
    ]


def centre_views(jpgs: Sequence[bytes], size: int) -> np.ndarray:
    """uint8 [N, 3, S, S]: the centre view ``dr reinforce`` gives a captioner (augment.center_view)."""
    from dr_pipeline.augment import center_view

    out = np.empty((len(jpgs), 3, size, size), np.uint8)
    for i, b in enumerate(jpgs):
        img = Image.open(io.BytesIO(b))
        img.load()
        out[i] = center_view(img.convert("RGB"), size).numpy()
    return out


def tokenizer_for(spec: TeacherSpec | CaptionerSpec):
    import open_clip

    ctx = getattr(spec, "context_length", None)
    return open_clip.get_tokenizer(spec.model, **({"context_length": ctx} if ctx else {}))


def model_seed(seed: int, entry_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"dr-bootstrap:{seed}:{entry_id}".encode()).digest()[:8], "big") >> 1


# --------------------------------------------------------------------------- training


def _init_decoder(model: torch.nn.Module, vocab: torch.Tensor) -> None:
    """What open_clip's (broken) ``MultimodalTransformer.init_parameters`` means to do, and the
    decoder projection's columns outside the domain vocabulary set to zero."""
    dec = model.text_decoder
    w = dec.width
    proj_std, attn_std, fc_std = (w**-0.5) * ((2 * dec.layers) ** -0.5), w**-0.5, (2 * w) ** -0.5
    with torch.no_grad():
        for block in [*dec.resblocks, *dec.cross_attn]:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        keep = torch.zeros(dec.text_projection.shape[1], dtype=torch.bool)
        keep[vocab] = True
        torch.nn.init.normal_(dec.text_projection, std=w**-0.5)
        dec.text_projection[:, ~keep] = 0.0


def decoder_hidden(model: torch.nn.Module, image_embs: torch.Tensor, token_embs: torch.Tensor) -> torch.Tensor:
    """``MultimodalTransformer.forward`` without the final vocabulary projection."""
    dec = model.text_decoder
    t = token_embs.shape[1]
    x = token_embs
    for block, cross in zip(dec.resblocks, dec.cross_attn):
        x = block(x, attn_mask=dec.attn_mask[:t, :t])
        x = cross(x, k_x=image_embs, v_x=image_embs)
    return dec.ln_final(x)


def caption_loss(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab: torch.Tensor, remap: torch.Tensor
) -> torch.Tensor:
    """Full-vocabulary cross-entropy, computed over the domain vocabulary + one lumped class.

    Columns outside ``vocab`` are zero, so each of the n_other other tokens has logit 0 and
    together they weigh n_other·e⁰: one extra logit log(n_other). Pad (0) is ignored."""
    proj = model.text_decoder.text_projection
    logits = hidden @ proj[:, vocab]  # [B, L, |V|]
    n_other = proj.shape[1] - vocab.numel()
    lump = torch.full_like(logits[..., :1], math.log(n_other))
    logits = torch.cat([logits, lump], dim=-1)
    return F.cross_entropy(logits.flatten(0, 1), remap[labels].flatten(), ignore_index=-100)


def domain_vocab(token_rows: torch.Tensor, n_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted domain token ids, map full id -> index in them; pad -> -100; others -> lump index)."""
    ids = torch.unique(token_rows)
    vocab = ids[ids != 0]
    remap = torch.full((n_vocab,), vocab.numel(), dtype=torch.long)  # unseen tokens -> the lump
    remap[vocab] = torch.arange(vocab.numel())
    remap[0] = -100
    return vocab, remap


def init_image_tower(model: torch.nn.Module, teacher_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a trained CLIP teacher's ViT trunk (patch embedding, class/position embeddings,
    blocks) into the captioner's image tower; returns the copied keys. The pooling and
    projection stay fresh (a CoCa pools with attention)."""
    own = model.visual.state_dict()
    trunk = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "transformer.")
    copied = {
        k: teacher_state[f"visual.{k}"].float()
        for k in own
        if k.startswith(trunk) and f"visual.{k}" in teacher_state and teacher_state[f"visual.{k}"].shape == own[k].shape
    }
    model.visual.load_state_dict(copied, strict=False)
    return sorted(copied)


def epoch_order(cfg: BootstrapConfig, entry_id: str, epoch: int, n: int) -> np.ndarray:
    """The epoch's sample order: a seeded permutation of the minimal groups (``cfg.group``
    consecutive scenes), each group kept together, so a batch (a multiple of the group size)
    holds whole groups."""
    g = cfg.group
    groups = np.random.default_rng([cfg.seed, model_seed(0, entry_id) & 0xFFFFFFFF, epoch]).permutation(n // g)
    return (g * groups[:, None] + np.arange(g)).reshape(-1)


def train_model(
    kind: str,
    spec: TeacherSpec | CaptionerSpec,
    ensemble: EnsembleSpec,
    views: np.ndarray,
    tokens: np.ndarray,
    cfg: BootstrapConfig,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train one model (from scratch; a captioner's image tower from ``init``, a teacher's state);
    returns (state dict, stats). Runs in one thread."""
    import open_clip

    from dr_pipeline.models.teachers import register_model_configs
    from dr_pipeline.train.config import OptimConfig
    from dr_pipeline.train.loop import lr_at, make_optimizer
    from dr_pipeline.train.loss import DistillClipLoss

    register_model_configs(ensemble)
    steps = cfg.clip_steps if kind == "teacher" else cfg.coca_steps
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(cfg.seed, spec.id))
        model = open_clip.create_model(spec.model, pretrained=None)
        tok = torch.from_numpy(tokens).long()
        if kind == "captioner":
            vocab, remap = domain_vocab(tok, model.text_decoder.text_projection.shape[1])
            _init_decoder(model, vocab)
    copied = init_image_tower(model, init) if init is not None else []
    model.train()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    imgs = torch.from_numpy(views)
    clip_loss = DistillClipLoss({}, lam=0.0, gt_weight=1.0, syn_weight=0.0)
    optim = OptimConfig(
        lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )
    opt = make_optimizer(model, optim)
    b = cfg.batch_size
    n = len(imgs) // cfg.group * cfg.group
    per_epoch = n // b
    order: np.ndarray | None = None
    hist: list[dict] = []
    max_log = math.log(cfg.max_logit_scale)
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            order = epoch_order(cfg, spec.id, epoch, n)
        idx = torch.from_numpy(order[j * b : (j + 1) * b])
        x = (imgs[idx].float() / 255.0 - mean) / std
        t = tok[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, optim, steps)
        if kind == "teacher":
            img_f, txt_f = model.encode_image(x), model.encode_text(t)
            parts = clip_loss(img_f, {"gt": txt_f}, model.logit_scale.exp())
            loss, row = parts["loss"], {"clip": float(parts["loss"].detach())}
        else:
            img_latent, image_embs = model._encode_image(x)
            txt_latent, token_embs = model._encode_text(t)
            parts = clip_loss(img_latent, {"gt": txt_latent}, model.logit_scale.exp())
            cap = caption_loss(model, decoder_hidden(model, image_embs, token_embs[:, :-1]), t[:, 1:], vocab, remap)
            loss = cfg.clip_loss_weight * parts["loss"] + cfg.caption_loss_weight * cap
            row = {"clip": float(parts["loss"].detach()), "caption": float(cap.detach())}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log)
        if step % 50 == 0 or step == steps - 1:
            row.update(
                step=step + 1,
                lr=opt.param_groups[0]["lr"],
                logit_scale=float(model.logit_scale.detach().exp()),
                seconds=round(time.time() - t0, 1),
            )
            hist.append(row)
            print(
                f"[{spec.id}] step {step + 1}/{steps} "
                + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step",)),
                file=sys.stderr,
                flush=True,
            )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    stats = {
        "id": spec.id,
        "model": spec.model,
        "kind": kind,
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "loss_history": hist,
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    if kind == "captioner":
        stats["domain_vocab_size"] = int(vocab.numel())
        stats["image_tower_init"] = {"from": cfg.captioner_backbone, "tensors": len(copied)} if copied else None
    return state, stats


def _worker(args: tuple) -> tuple[str, dict]:
    """Process entry: train one model on ``threads`` threads, save it to ``path``; returns (path, stats)."""
    kind, spec, ensemble, views_path, tokens_path, cfg, path, init_path, threads = args
    torch.set_num_threads(threads)
    views = np.load(views_path, mmap_mode="r", allow_pickle=False)
    tokens = np.load(tokens_path, allow_pickle=False)
    init = None
    if init_path:
        from safetensors.torch import load_file

        init = load_file(init_path)
    state, stats = train_model(kind, spec, ensemble, np.array(views), tokens, cfg, init)
    save_checkpoint(state, path, cfg, spec)
    return path, stats


def save_checkpoint(state: dict[str, torch.Tensor], path: str, cfg: BootstrapConfig, spec) -> None:
    from safetensors.torch import save_file

    dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    # One metadata key: safetensors writes a metadata map in arbitrary order.
    save_file(out, tmp, metadata={"dr_bootstrap": f"id={spec.id} model={spec.model} seed={cfg.seed}"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sums(folder: str | Path) -> dict[str, str]:
    """``SHA256SUMS`` (``sha256sum`` format) -> {file name: hex digest}."""
    p = Path(folder) / SUMS
    out = {}
    for line in p.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


# --------------------------------------------------------------------------- evaluation

_BG = re.compile(r",?\s*on an? (?:plain )?(\w+)(?: \w+)? background\s*$")


def parse_caption(text: str) -> dict:
    """A compositional caption -> {"objects": [(colour|None, shape|None)], "background": colour|None}."""
    text = text.lower().strip()
    bg = None
    m = _BG.search(text)
    if m:
        bg = m.group(1) if m.group(1) in synthetic.COLOURS else None
        text = text[: m.start()]
    objects = []
    for phrase in re.split(r",\s*|\s+and\s+", text):
        words = phrase.split()
        if not words:
            continue
        colour = next((w for w in words if w in synthetic.COLOURS), None)
        shape = next((w for w in words if w in synthetic.SHAPES), None)
        if colour or shape:
            objects.append((colour, shape))
    return {"objects": objects, "background": bg}


def caption_accuracy(captions: Sequence[Sequence[str]], labels: Sequence[dict]) -> dict:
    """Colour / shape word accuracy of captions against the scenes' labels.

    Per named object (a phrase with a colour or shape word): ``colour`` = its colour word is the
    colour of some object of the scene, ``shape`` likewise, ``pair`` = the scene has an object
    with both; ``recall`` = fraction of the scene's objects named with the right colour and
    shape; ``exact`` = the caption names exactly the scene's (colour, shape) pairs;
    ``background`` = the background colour is right (when named)."""
    n = {
        k: 0
        for k in (
            "colour",
            "shape",
            "pair",
            "colour_n",
            "shape_n",
            "pair_n",
            "recall",
            "recall_n",
            "exact",
            "captions",
            "background",
            "background_n",
        )
    }
    for caps, label in zip(captions, labels):
        objs = [(o["colour"], o["shape"]) for o in label["objects"]]
        colours, shapes = {c for c, _ in objs}, {s for _, s in objs}
        for cap in caps:
            p = parse_caption(cap)
            n["captions"] += 1
            named = set()
            for c, s in p["objects"]:
                if c:
                    n["colour_n"] += 1
                    n["colour"] += c in colours
                if s:
                    n["shape_n"] += 1
                    n["shape"] += s in shapes
                if c and s:
                    n["pair_n"] += 1
                    n["pair"] += (c, s) in objs
                    named.add((c, s))
            n["recall"] += len(named & set(objs))
            n["recall_n"] += len(set(objs))
            n["exact"] += named == set(objs) and len(p["objects"]) == len(named)
            if p["background"]:
                n["background_n"] += 1
                n["background"] += p["background"] == label["background_colour"]
    div = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    return {
        "colour_word_accuracy": div(n["colour"], n["colour_n"]),
        "shape_word_accuracy": div(n["shape"], n["shape_n"]),
        "pair_accuracy": div(n["pair"], n["pair_n"]),
        "object_recall": div(n["recall"], n["recall_n"]),
        "exact_match": div(n["exact"], n["captions"]),
        "background_colour_accuracy": div(n["background"], n["background_n"]),
        "captions": n["captions"],
        "named_objects": n["colour_n"],
    }


def heldout_scenes(cfg: BootstrapConfig) -> list[dict]:
    """Held-out multi-object scenes: the test split's first shard (never in the clean split)."""
    return [synthetic.make_split_sample("test", cfg.seed, 0, i) for i in range(cfg.n_eval)]


def zeroshot_set(cfg: BootstrapConfig) -> tuple[list[bytes], list[int], list[str]]:
    classes = synthetic.zeroshot_classes()
    images, labels = [], []
    for c in range(len(classes)):
        for j in range(cfg.zeroshot_per_class):
            images.append(synthetic.make_zeroshot_sample(cfg.seed, c, j)["jpg"])
            labels.append(c)
    return images, labels, [f"{c} {s}" for c, s in classes]


@torch.no_grad()
def teacher_zeroshot(teacher, images: Sequence[bytes], labels: Sequence[int], classes: Sequence[str]) -> dict:
    """Zero-shot top-1 of a loaded ``Teacher`` (colour x shape, and colour / shape alone): its
    centre views and the domain's prompts through ``dr eval``'s ``zero_shot_metrics``."""
    from dr_pipeline.train.evaluate import zero_shot_metrics

    views = torch.from_numpy(centre_views(images, teacher.image_size))
    img = torch.cat([teacher.encode_images(views[i : i + 256]) for i in range(0, len(views), 256)])
    return zero_shot_metrics(teacher.encode_texts, img, labels, classes, ZS_TEMPLATES, factors=("colour", "shape"))


def evaluate_ensemble(
    ensemble_path: str, cfg: BootstrapConfig, captioner_k: int | None = None, only: Sequence[str] | None = None
) -> dict:
    """Load every entry (or those in ``only``) through the normal path and measure it on held-out data."""
    from dr_pipeline.models.captioner import load_captioner
    from dr_pipeline.models.teachers import load_teacher

    ens = load_ensemble(ensemble_path)
    out: dict = {"teachers": {}, "captioners": {}}
    images, labels, classes = zeroshot_set(cfg)
    for spec in ens.teachers:
        if not only or spec.id in only:
            out["teachers"][spec.id] = {"zeroshot": teacher_zeroshot(load_teacher(spec, ens), images, labels, classes)}
    scenes = heldout_scenes(cfg)
    for spec in ens.captioners:
        if only and spec.id not in only:
            continue
        cap = load_captioner(spec, ens)
        views = torch.from_numpy(centre_views([s["jpg"] for s in scenes], cap.image_size))
        k = captioner_k or cfg.eval_captions
        caps: list[list[str]] = []
        for i in range(0, len(scenes), 32):
            caps += cap.caption(views[i : i + 32], [s["key"] for s in scenes[i : i + 32]], cfg.seed, k).captions
        acc = caption_accuracy(caps, [s["label"] for s in scenes])
        greedy = cap.caption(views[:64], [s["key"] for s in scenes[:64]], cfg.seed, 1, greedy=True).captions
        out["captioners"][spec.id] = {
            "sampled": acc,
            "greedy": caption_accuracy(greedy, [s["label"] for s in scenes[:64]]),
            "sampling": to_dict(spec.sampling),
            "images": len(scenes),
            "k": k,
            "examples": [
                {"caption": c[0] if c else "", "truth": s["label"]["clean_caption"]}
                for c, s in list(zip(caps, scenes))[:6]
            ],
        }
    return out


# --------------------------------------------------------------------------- driver


def _entries(ens: EnsembleSpec, only: Sequence[str] | None) -> list[tuple[str, TeacherSpec | CaptionerSpec]]:
    entries = [("teacher", t) for t in ens.teachers] + [("captioner", c) for c in ens.captioners]
    if only:
        unknown = set(only) - {s.id for _, s in entries}
        if unknown:
            raise ConfigError(f"bootstrap: no entry {sorted(unknown)} in {ens.name} (has {[s.id for _, s in entries]})")
        entries = [(k, s) for k, s in entries if s.id in only]
    for _kind, spec in entries:
        from dr_pipeline.models.teachers import is_local_path, is_tiny

        if not is_local_path(spec.pretrained) or not is_tiny(spec.model, ens):
            raise ConfigError(
                f"bootstrap: '{spec.id}' must be a model of the ensemble's model_configs folder "
                "with a local checkpoint path (pretrained: a .safetensors file)"
            )
    return entries


def relocate(ensemble_path: str, out_dir: str) -> str:
    """A copy of the ensemble file in ``out_dir`` whose checkpoints are ``out_dir/<file name>`` and
    whose model_configs is absolute (for test runs and trial budgets; the real file is untouched)."""
    ens = load_ensemble(ensemble_path)
    from dr_pipeline.models.teachers import model_configs_dir

    with open(ensemble_path) as f:
        data = yaml.safe_load(f)
    data["model_configs"] = str(model_configs_dir(ens).resolve())
    for group in ("teachers", "captioners"):
        for e in data.get(group, []):
            e["pretrained"] = Path(e["pretrained"]).name
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    dst = Path(out_dir) / Path(ensemble_path).name
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(dst)


def bootstrap(
    ensemble_path: str,
    cfg: BootstrapConfig,
    out_dir: str | None = None,
    only: Sequence[str] | None = None,
    evaluate: bool = True,
) -> dict:
    """Train the ensemble's models on the clean split and write their checkpoints, ``SHA256SUMS``
    and ``bootstrap.json``. ``out_dir``: write there instead (plus a relocated ensemble file)."""
    t_all = time.time()
    if out_dir is not None:
        ensemble_path = relocate(ensemble_path, out_dir)
    ens = load_ensemble(ensemble_path)
    entries = _entries(ens, only)
    from dr_pipeline.models.teachers import register_model_configs

    register_model_configs(ens)  # the tokenizers read the context length from the model JSONs
    t0 = time.time()
    samples = clean_samples(cfg)
    jpgs = [s["jpg"] for s in samples]
    print(
        f"bootstrap: rendered {len(samples)} clean-split images in {time.time() - t0:.1f}s", file=sys.stderr, flush=True
    )
    work = tempfile.mkdtemp(prefix="dr-bootstrap-")
    try:
        tasks = []
        views_cache: dict[int, str] = {}
        for kind, spec in entries:
            if spec.image_size not in views_cache:
                p = os.path.join(work, f"views{spec.image_size}.npy")
                np.save(p, centre_views(jpgs, spec.image_size), allow_pickle=False)
                views_cache[spec.image_size] = p
            tp = os.path.join(work, f"tokens-{spec.id}.npy")
            np.save(tp, tokenizer_for(spec)([s["caption"] for s in samples]).numpy(), allow_pickle=False)
            init = None
            if kind == "captioner" and cfg.captioner_backbone:
                init = ens.resolve(ens.teacher(cfg.captioner_backbone).pretrained)
                if cfg.captioner_backbone not in {s.id for _, s in entries} and not Path(init).is_file():
                    raise ConfigError(
                        f"bootstrap: the captioner starts from teacher {cfg.captioner_backbone!r}, "
                        f"whose checkpoint {init} does not exist yet (train it too)"
                    )
            tasks.append((kind, spec, ens, views_cache[spec.image_size], tp, cfg, ens.resolve(spec.pretrained), init))
        # Two phases: the teachers, then the captioner (its image tower starts from a trained teacher's).
        phases = [[t for t in tasks if t[0] == "teacher"], [t for t in tasks if t[0] == "captioner"]]
        print(f"bootstrap: training {len(tasks)} model(s), {cfg.jobs} at a time", file=sys.stderr, flush=True)
        # A phase of fewer models than jobs gives each model the spare cores (its thread count is
        # part of the run's identity: bootstrap.json records it).
        threads = {t[1].id: max(1, cfg.jobs // len(phase)) for phase in phases for t in phase}
        results = [
            r for phase in phases if phase for r in pool_map(_worker, [(*t, threads[t[1].id]) for t in phase], cfg.jobs)
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    folder = Path(ens.resolve(entries[0][1].pretrained)).parent
    sums = read_sums(folder) if (folder / SUMS).is_file() else {}
    for path, _ in results:
        sums[Path(path).name] = sha256_file(path)
    (folder / SUMS).write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    report = {
        "config": dataclasses.asdict(cfg),
        "ensemble": str(ensemble_path),
        "command": "dr bootstrap " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bootstrap"] else None,
        "models": {
            stats["id"]: {
                **stats,
                "file": Path(path).name,
                "sha256": sums[Path(path).name],
                "bytes": os.path.getsize(path),
            }
            for path, stats in results
        },
        "train_seconds": round(time.time() - t_all, 1),
        "threads_per_model": threads,
        "torch": torch.__version__,
    }
    if evaluate:
        t1 = time.time()
        report["eval"] = evaluate_ensemble(ensemble_path, cfg, only=only)
        report["eval_seconds"] = round(time.time() - t1, 1)
        for tid, _r in report["eval"]["teachers"].items():
            spec = ens.teacher(tid)
            learned = report["models"].get(tid, {}).get("logit_scale")
            if learned and abs(learned - spec.logit_scale) > 0.1 * learned:
                print(
                    f"note: teacher {tid} learned logit scale {learned:.1f}; the ensemble file says "
                    f"{spec.logit_scale} (update it)",
                    file=sys.stderr,
                )
    report["total_seconds"] = round(time.time() - t_all, 1)
    prev = {}
    if (folder / REPORT).is_file() and only:
        prev = json.loads((folder / REPORT).read_text()).get("models", {})
    report["models"] = {**prev, **report["models"]}
    (folder / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def format_report(rep: dict) -> str:
    lines = []
    for mid, m in rep["models"].items():
        lines.append(
            f"{mid:<10} {m['model']:<14} {m['params'] / 1e6:5.2f}M params  {m['bytes'] / 1e6:5.2f} MB  "
            f"{m['steps']} steps in {m['seconds']:.0f}s  logit scale {m['logit_scale']:.1f}"
        )
    ev = rep.get("eval") or {}
    for tid, r in ev.get("teachers", {}).items():
        z = r["zeroshot"]
        lines.append(
            f"{tid:<10} zero-shot colour x shape top-1 {z['top1']:.3f} (colour {z['colour']:.3f}, "
            f"shape {z['shape']:.3f}; chance {z['chance']:.3f}, n={z['n']})"
        )
    for cid, r in ev.get("captioners", {}).items():
        for mode in ("sampled", "greedy"):
            a = r[mode]
            lines.append(
                f"{cid:<10} {mode:<8} captions: colour words {a['colour_word_accuracy']}, shape words "
                f"{a['shape_word_accuracy']}, colour+shape {a['pair_accuracy']}, object recall "
                f"{a['object_recall']}, exact {a['exact_match']} ({a['captions']} captions)"
            )
        for ex in r["examples"][:3]:
            lines.append(f"    {ex['caption']!r}  <- truth: {ex['truth']!r}")
    lines.append(f"total {rep['total_seconds']:.0f}s")
    return "\n".join(lines)


def verify(ensemble_path: str) -> list[str]:
    """Problems with the committed checkpoints of ``ensemble_path`` (empty: all match SHA256SUMS)."""
    ens = load_ensemble(ensemble_path)
    problems = []
    paths = [Path(ens.resolve(e.pretrained) or "") for e in (*ens.teachers, *ens.captioners)]
    folder = paths[0].parent
    if not (folder / SUMS).is_file():
        return [f"{folder / SUMS} is missing"]
    sums = read_sums(folder)
    for p in paths:
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.name not in sums:
            problems.append(f"{p.name} is not listed in {folder / SUMS}")
        elif sha256_file(p) != sums[p.name]:
            problems.append(f"{p.name}: sha256 differs from {folder / SUMS}")
    return problems
