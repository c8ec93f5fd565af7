"""``dr bootstrap``: train the synthetic domain's own *real* tiny teachers and captioner.

No pretrained weights can be downloaded here, and random-init teachers caption noise. So the
project makes its own: two CLIP teachers of different architectures (ViTs of different patch size,
resolution, width and embedding width, ``teachers/models/dr-syn-*.json``) and one CoCa captioner, trained on the
*clean* split of the synthetic domain (``dr make-corpus --split clean``: accurate compositional
captions, the stand-in for DFN-2B / MSCOCO-38k). The checkpoints load through the normal
teacher path (``teachers/synthetic.yaml`` -> ``load_teacher`` / ``load_captioner``).

Training, per model, with ``dr train``'s ``Trainer`` (``train_config`` is its config)
  data     the clean split written as webdataset tars of ``per_shard`` scenes, read by the
           trainer's loader as a base corpus alone (``data.reinforced: null``), each image as
           its *centre view* at the model's resolution (``augmentation: center``: what ``dr
           reinforce`` shows a captioner; teachers see the seeded crops of the web split at
           reinforcement time). Shards hold whole minimal groups and the batch size is a
           multiple of the group, so a batch holds whole groups;
  CLIP     the trainer's loss, ``DistillClipLoss`` with λ = 0 (plain CLIP loss, GT captions);
  CoCa     CLIP loss + 2 x captioning cross-entropy (``loss.caption_weight``) over the domain's
           vocabulary (every token of every clean caption, ~60 ids: ``loss.caption_vocab``,
           exact, train/coca.py), the image trunk initialised from ``syn-vit-a``
           (``student.init_from``);
  optim    AdamW (β 0.9/0.98, wd 0.1 on weights only), warmup + cosine (the trainer's
           ``lr_at``), grad clip 1, logit scale clamped to 100.

Determinism: every model trains in one thread, from its seed ``model_seed(seed, id)`` (model
init and the loader's shard order), so a run is a pure function of (config, seed) on a given
machine (float results can differ across CPU types and thread counts). ``jobs`` models train
in parallel processes: the teachers, then the captioner.
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
from dr_pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
REPORT = "bootstrap.json"
ZS_TEMPLATES = synthetic.ZEROSHOT_TEMPLATES


@dataclass(frozen=True)
class BootstrapConfig:
    seed: int = 0
    n_train: int = 12_000  # clean-split images
    per_shard: int = 32  # clean-split shard size: batches are cut from shuffled shards, so small ones vary them
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
        if self.per_shard % self.group or self.n_train % self.per_shard:
            raise ConfigError(
                "bootstrap: per_shard must be a multiple of group (groups do not span shards) and divide n_train"
            )
        if min(self.clip_steps, self.coca_steps) < 1 or self.jobs < 1 or self.per_shard < 1:
            raise ConfigError("bootstrap: steps, jobs and per_shard must be >= 1")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"bootstrap.dtype must be float16 or float32 (got {self.dtype!r})")


# --------------------------------------------------------------------------- data


def write_clean_corpus(cfg: BootstrapConfig, out_dir: str) -> str:
    """The clean split the models train on, as webdataset tars of ``per_shard`` scenes
    (``dr make-corpus --split clean``); returns the shards' glob."""
    synthetic.make_split(
        "clean", out_dir, cfg.n_train // cfg.per_shard, cfg.per_shard, cfg.seed, ("tar",), per_class=0, group=cfg.group
    )
    return f"{out_dir}/tar/*.tar"


def centre_views(jpgs: Sequence[bytes], size: int) -> np.ndarray:
    """uint8 [N, 3, S, S]: the centre view ``dr reinforce`` gives a captioner (augment.center_view)."""
    from dr_pipeline.augment import center_view

    out = np.empty((len(jpgs), 3, size, size), np.uint8)
    for i, b in enumerate(jpgs):
        img = Image.open(io.BytesIO(b))
        img.load()
        out[i] = center_view(img.convert("RGB"), size).numpy()
    return out


def model_seed(seed: int, entry_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"dr-bootstrap:{seed}:{entry_id}".encode()).digest()[:8], "big") >> 1


# --------------------------------------------------------------------------- training

# The ViT trunk a captioner's image tower takes from a trained teacher (patch embedding,
# class / position embeddings, blocks); its pooling and projection stay fresh (a CoCa pools
# with attention).
TRUNK_KEYS = r"visual\.(conv1\.|class_embedding$|positional_embedding$|ln_pre\.|transformer\.)"


def context_length(spec: TeacherSpec | CaptionerSpec) -> int:
    import open_clip

    return getattr(spec, "context_length", None) or open_clip.get_model_config(spec.model)["text_cfg"].get(
        "context_length", 77
    )


def train_config(
    kind: str,
    spec: TeacherSpec | CaptionerSpec,
    cfg: BootstrapConfig,
    corpus: str,
    out_dir: str,
    init: str | None = None,
    vocab: tuple[int, ...] | None = None,
) -> TrainConfig:
    """The ``dr train`` config of one model: the clean corpus alone, centre views, GT captions,
    the CLIP loss (+ the CoCa caption loss over ``vocab`` for a captioner), on the CPU."""
    from dr_pipeline.train.config import DataConfig, LossConfig, OptimConfig, StudentConfig

    steps = cfg.clip_steps if kind == "teacher" else cfg.coca_steps
    captioner = kind == "captioner"
    return TrainConfig(
        out_dir=out_dir,
        data=DataConfig(reinforced=None, base=corpus, augmentation="center", cache_images=True, num_workers=0),
        steps=steps,
        batch_size=cfg.batch_size,
        student=StudentConfig(
            arch=spec.model,
            image_size=spec.image_size,
            context_length=context_length(spec),
            mean=tuple(spec.mean),
            std=tuple(spec.std),
            max_logit_scale=cfg.max_logit_scale,
            init_from=init,
            init_keys=TRUNK_KEYS,
        ),
        loss=LossConfig(
            lam=0.0,
            gt_weight=cfg.clip_loss_weight,
            syn_weight=0.0,
            caption_weight=cfg.caption_loss_weight if captioner else 0.0,
            caption_vocab=vocab if captioner else None,
        ),
        optim=OptimConfig(
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            betas=(0.9, 0.98),
            grad_clip=1.0,
        ),
        seed=model_seed(cfg.seed, spec.id),
        precision="fp32",
        device="cpu",
        checkpoint_every=steps,
        keep_checkpoints=1,
        log_every=50,
    )


def train_model(kind: str, spec, ensemble: EnsembleSpec, tcfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Train one model with ``dr train``'s ``Trainer``; returns (open_clip state dict, stats)."""
    from dr_pipeline.models.teachers import register_model_configs
    from dr_pipeline.train import checkpoint as ckpt
    from dr_pipeline.train.loop import train
    from dr_pipeline.train.metrics import METRICS

    register_model_configs(ensemble)
    t0, c0 = time.time(), time.process_time()
    res = train(tcfg)
    if res.skipped:
        raise RuntimeError(f"bootstrap {spec.id}: the loader skipped clean-split samples {res.skipped}")
    model = ckpt.load_checkpoint(res.checkpoint)["model"]
    state = {k.removeprefix("clip."): v.contiguous() for k, v in model.items()}
    rows = [json.loads(line) for line in (Path(tcfg.out_dir) / METRICS).read_text().splitlines() if line.strip()]
    keep = ("step", "loss", "contrastive_loss", "caption_loss", "lr", "logit_scale", "samples_per_s")
    stats = {
        "id": spec.id,
        "model": spec.model,
        "kind": kind,
        "steps": res.step,
        "seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "logit_scale": float(state["logit_scale"].exp()),
        "loss_history": [{k: r[k] for k in keep if k in r} for r in rows],
        "params": int(sum(v.numel() for k, v in state.items() if v.is_floating_point() and k != "attn_mask")),
        "samples": res.samples,
    }
    if kind == "captioner":
        stats["domain_vocab_size"] = len(tcfg.loss.caption_vocab or ())
        init = tcfg.student.init_from
        stats["image_tower_init"] = {"from": Path(init).name, "keys": TRUNK_KEYS} if init else None
    return state, stats


def _worker(args: tuple) -> tuple[str, dict]:
    """Process entry: train one model on ``threads`` threads, save it to ``path``; returns (path, stats)."""
    kind, spec, ensemble, tcfg, cfg, path, threads = args
    torch.set_num_threads(threads)
    state, stats = train_model(kind, spec, ensemble, tcfg)
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


def caption_vocab(corpus: str, ctx: int) -> tuple[int, ...]:
    """The token ids of every caption of the corpus (the captioner's ``loss.caption_vocab``)."""
    from dr_pipeline.corpus.readers import Sample, expand_urls, iter_shard
    from dr_pipeline.train.coca import domain_vocab
    from dr_pipeline.train.students import tokenize

    captions = sorted({r.caption for u in expand_urls(corpus) for r in iter_shard(u) if isinstance(r, Sample)})
    return domain_vocab(tokenize(captions, ctx))


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

    register_model_configs(ens)  # the students' configs and context lengths come from the model JSONs
    work = tempfile.mkdtemp(prefix="dr-bootstrap-")
    try:
        t0 = time.time()
        corpus = write_clean_corpus(cfg, os.path.join(work, "clean"))
        print(
            f"bootstrap: wrote {cfg.n_train} clean-split scenes in {time.time() - t0:.1f}s", file=sys.stderr, flush=True
        )
        tasks = []
        for kind, spec in entries:
            init, vocab = None, None
            if kind == "captioner":
                vocab = caption_vocab(corpus, context_length(spec))
                if cfg.captioner_backbone:
                    init = ens.resolve(ens.teacher(cfg.captioner_backbone).pretrained)
                    if cfg.captioner_backbone not in {s.id for _, s in entries} and not Path(init).is_file():
                        raise ConfigError(
                            f"bootstrap: the captioner starts from teacher {cfg.captioner_backbone!r}, "
                            f"whose checkpoint {init} does not exist yet (train it too)"
                        )
            tcfg = train_config(kind, spec, cfg, corpus, os.path.join(work, "runs", spec.id), init, vocab)
            tasks.append((kind, spec, ens, tcfg, cfg, ens.resolve(spec.pretrained)))
        # Two phases: the teachers, then the captioner (its image tower starts from a trained teacher's).
        phases = [[t for t in tasks if t[0] == "teacher"], [t for t in tasks if t[0] == "captioner"]]
        print(f"bootstrap: training {len(tasks)} model(s), {cfg.jobs} at a time", file=sys.stderr, flush=True)
        # One thread per model, as the committed checkpoints were trained: the thread count is
        # part of the run's identity (float sums); bootstrap.json records it. (The captioner alone
        # would gain from the idle core: 0.39 s a step on two threads against 0.46 on one.)
        threads = {t[1].id: 1 for t in tasks}
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
