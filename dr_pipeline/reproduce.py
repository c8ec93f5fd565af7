"""``dr reproduce`` / ``make reproduce``: does a reinforced dataset train a student faster?

The experiment of the MobileCLIP papers at laptop scale, on the synthetic domain:

1. ``web`` split (noisy alt-text-like captions) and ``test`` split (zero-shot folder of 60
   colour x shape classes + clean-caption pairs for retrieval), from ``dr make-corpus``'s code;
2. ``dr reinforce`` of the web split with the real synthetic teachers (``teachers/synthetic.yaml``,
   made by ``dr bootstrap``): N seeded augmentations, 2 CLIP teachers, k CoCa captions;
3. the same tiny MCi student trained for the same steps and batch size, per seed, as
     plain    CLIP loss on the GT captions, fresh online RRC + RandAugment every epoch;
     full     the paper's recipe: λ = 1 distillation from the ensemble, GT + synthetic caption
              terms, the stored augmentations replayed;
   and, as ablations, ``kd`` (λ = 1, GT captions only) and ``syn`` (λ = 0: CLIP loss on GT +
   synthetic captions), both on the replayed augmentations;
4. zero-shot accuracy and retrieval every ``eval_every`` steps; ``accuracy_vs_steps.png``,
   ``results.json``, ``results.md`` and the **steps-to-accuracy ratio**: the steps the
   reinforced student needs to reach the plain student's final zero-shot accuracy, as a
   fraction of the plain student's steps (linear interpolation between evaluations; every
   accuracy a trailing mean over ``smooth_evals`` evaluations, see ``smoothed``), per
   seed, then mean ± std over seeds.

How the trainer is used. Each run builds the project's ``Trainer`` (``dr_pipeline/train/loop.py``:
student, optimizer, ``DistillClipLoss`` with the run's λ and caption weights, and its
``train_step``: forward, loss, clipping, logit-scale clamp) and the trainer's learning-rate
schedule; the per-sample choices of the reinforced runs (which stored augmentation, which
synthetic caption, the teachers' embeddings of exactly those) come from the trainer's own
``sources.load_index``. Only the data path is an adapter: the replayed views are rendered
once per (sample, augmentation) and kept in memory (the trainer's loader re-decodes every
sample every step, too slow for 8 runs on 2 CPUs), batches are drawn from a seeded global
permutation per epoch, and the plain runs draw fresh augmentation params per (seed, epoch,
sample) with the same sampler and replay code (``augment.sample_params`` / ``replay``) —
an online mode the trainer does not have. Runs train in parallel processes, one thread each,
so each run is a deterministic function of its seed on a given machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dr_pipeline.config import ConfigError, from_dict, load_yaml, to_dict
from dr_pipeline.process_pool import pool_map
from dr_pipeline.train.config import OptimConfig, StudentConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CorpusConfig:
    web_shards: int = 8
    web_per_shard: int = 256
    test_shards: int = 1  # clean-caption pairs for retrieval
    test_per_shard: int = 256
    zeroshot_per_class: int = 8  # x 60 colour x shape classes


@dataclass(frozen=True)
class ReinforceConfig:
    teachers: str = "teachers/synthetic.yaml"
    n_aug: int = 10
    k: int = 5
    aug_size: int = 64  # generation size of the stored params (magnitudes scale with it)
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (plain runs use the same)
    executor: str = "ray"  # ray | local
    batch_size: int = 32
    num_cpus: int = 2

    def __post_init__(self) -> None:
        if self.executor not in ("ray", "local"):
            raise ConfigError(f"reinforce.executor must be ray or local (got {self.executor!r})")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    lam: float
    gt_weight: float = 1.0
    syn_weight: float = 0.0
    online_aug: bool = False  # True: fresh RRC + RandAugment params per epoch (plain)


DEFAULT_VARIANTS = (
    Variant("plain", "plain: CLIP on GT captions, online augmentation", lam=0.0, online_aug=True),
    Variant("kd", "KD only: lambda=1, GT captions, replayed augs", lam=1.0),
    Variant("syn", "synthetic captions only: lambda=0, GT + syn captions, replayed augs", lam=0.0, syn_weight=1.0),
    Variant("full", "reinforced: lambda=1, GT + syn captions, replayed augs", lam=1.0, syn_weight=1.0),
)


@dataclass(frozen=True)
class TrainRuns:
    steps: int = 400
    batch_size: int = 64
    eval_every: int = 25
    seeds: tuple[int, ...] = (0, 1, 2)  # baseline and target variants
    ablation_seeds: tuple[int, ...] = (0,)  # the other variants
    jobs: int = 2  # runs in parallel processes, 1 thread each
    student: StudentConfig = field(default_factory=lambda: StudentConfig(arch="tiny", image_size=64, context_length=32))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=2e-3, min_lr=1e-5, warmup_steps=20, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0
        )
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.eval_every < 1 or self.jobs < 1 or not self.seeds:
            raise ConfigError("train: need steps >= 1, batch_size >= 2, eval_every >= 1, jobs >= 1, seeds")


@dataclass(frozen=True)
class ReproduceConfig:
    out_dir: str = "out/reproduce"  # corpora, reinforced dataset, runs (regenerable)
    results_dir: str = "reproduce"  # results.json, results.md, accuracy_vs_steps.png
    seed: int = 0  # corpus + reinforcement seed
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    reinforce: ReinforceConfig = field(default_factory=ReinforceConfig)
    train: TrainRuns = field(default_factory=TrainRuns)
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    baseline: str = "plain"
    target: str = "full"
    smooth_evals: int = 3  # accuracy = trailing mean over this many evaluations

    def __post_init__(self) -> None:
        if self.smooth_evals < 1:
            raise ConfigError(f"smooth_evals must be >= 1 (got {self.smooth_evals})")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or self.baseline not in names or self.target not in names:
            raise ConfigError(
                f"variants: unique names including baseline {self.baseline!r} and target {self.target!r} (got {names})"
            )


def load_reproduce_config(path: str | Path) -> ReproduceConfig:
    return load_yaml(ReproduceConfig, Path(path))


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def web(self) -> Path:
        return self.root / "web"

    @property
    def test(self) -> Path:
        return self.root / "test"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def zeroshot(self) -> Path:
        return self.test / "zeroshot"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def views(self, size: int) -> Path:
        return self.root / f"views{size}.npy"


def _web_urls(cfg: ReproduceConfig, lay: Layout) -> str:
    n = cfg.corpus.web_shards
    return f"{lay.web}/tar/shard-{{00000..{n - 1:05d}}}.tar" if n > 1 else f"{lay.web}/tar/shard-00000.tar"


# --------------------------------------------------------------------------- stages


def make_corpora(cfg: ReproduceConfig, lay: Layout) -> None:
    from dr_pipeline.corpus.synthetic import make_split

    c = cfg.corpus
    make_split("web", str(lay.web), c.web_shards, c.web_per_shard, cfg.seed, formats=("tar",))
    make_split(
        "test",
        str(lay.test),
        c.test_shards,
        c.test_per_shard,
        cfg.seed,
        formats=("tar",),
        per_class=c.zeroshot_per_class,
    )


def job_config(cfg: ReproduceConfig, lay: Layout):
    from dr_pipeline.config import JobConfig

    r = cfg.reinforce
    data = {
        "input": {"urls": _web_urls(cfg, lay)},
        "output": {"path": str(lay.dataset)},
        "teachers": str(Path(r.teachers).resolve()),
        "seed": cfg.seed,
        "aug": {"n_aug": r.n_aug, "size": r.aug_size, "scale": list(r.rrc_scale)},
        "captions": {"k": r.k},
        "execution": {
            "num_cpus": r.num_cpus,
            "min_actors": 1,
            "max_actors": r.num_cpus,
            "cpus_per_actor": 1,
            "batch_size": r.batch_size,
            "device": "cpu",
            "decode_threads": 1,
        },
    }
    return from_dict(JobConfig, data, "reproduce job")


def reinforce(cfg: ReproduceConfig, lay: Layout) -> dict:
    """``dr reinforce`` of the web split (resumes: committed shards of the same config are kept)."""
    import yaml

    from dr_pipeline.execute.runner import resolve_ensemble, run_job

    job = job_config(cfg, lay)
    lay.root.mkdir(parents=True, exist_ok=True)
    (lay.root / "reinforce.yaml").write_text(yaml.safe_dump(to_dict(job), sort_keys=False))
    report = run_job(job, resolve_ensemble(job), force=True, executor=cfg.reinforce.executor)
    if report.failed:
        raise RuntimeError(f"reinforcement failed for {len(report.failed)} shard(s): {report.failed}")
    return {"seconds": round(report.seconds, 1), "committed": len(report.committed), "skipped": len(report.skipped)}


def _train_config(cfg: ReproduceConfig, lay: Layout, v: Variant, seed: int):
    from dr_pipeline.train.config import DataConfig, LossConfig, TrainConfig

    t = cfg.train
    return TrainConfig(
        out_dir=str(lay.runs / f"{v.name}-s{seed}"),
        data=DataConfig(reinforced=str(lay.dataset), num_workers=0),
        steps=t.steps,
        batch_size=t.batch_size,
        student=t.student,
        loss=LossConfig(lam=v.lam, gt_weight=v.gt_weight, syn_weight=v.syn_weight),
        optim=t.optim,
        seed=seed,
        precision="fp32",
        device="cpu",
        checkpoint_every=t.steps,
        keep_checkpoints=1,
        log_every=t.eval_every,
    )


def _base_images(plan) -> dict[str, Any]:
    """key -> decoded base image (RGB PIL), for every pair of the plan."""
    from dr_pipeline.corpus.readers import Sample, iter_shard
    from dr_pipeline.images import decode_image

    out = {}
    for pair in plan.pairs:
        for s in iter_shard(pair.base_url):
            if isinstance(s, Sample) and s.image is not None:
                out[s.key] = (decode_image(s.image), hashlib.sha256(s.image).hexdigest(), s.caption)
    return out


def _render_shard(args: tuple) -> tuple[list[str], np.ndarray]:
    """Every stored augmentation of one shard replayed at ``size`` (the views the student sees)."""
    pair_base, pair_reinf, size, aug = args
    import pyarrow.parquet as pq

    from dr_pipeline import augment
    from dr_pipeline.corpus.readers import Sample, iter_shard
    from dr_pipeline.images import decode_image
    from dr_pipeline.shards import bf16

    torch.set_num_threads(1)
    imgs = {s.key: decode_image(s.image) for s in iter_shard(pair_base) if isinstance(s, Sample) and s.image}
    t = pq.read_table(pair_reinf, columns=["key", "aug_params"])
    keys = t.column("key").to_pylist()
    params = bf16.fsl_to_numpy(t.column("aug_params")).reshape(len(keys), -1, 8)
    views = np.empty((len(keys), params.shape[1], 3, size, size), np.uint8)
    for i, k in enumerate(keys):
        for j, p in enumerate(augment.unpack(params[i])):
            views[i, j] = augment.replay(imgs[k], p, size, aug).numpy()
    return keys, views


def render_views(cfg: ReproduceConfig, lay: Layout, plan, size: int) -> dict:
    """Render every (sample, stored augmentation) view once: ``views{size}.npy`` + its keys."""
    path = lay.views(size)
    meta_path = path.with_suffix(".json")
    stamp = {"dataset": json.loads((lay.dataset / "dataset.json").read_text())["config_hash"], "size": size}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("stamp") == stamp:
        return {"seconds": 0.0, "cached": True}
    t0 = time.time()
    tasks = [(p.base_url, p.reinf_url, size, plan.aug) for p in plan.pairs]
    results = pool_map(_render_shard, tasks, cfg.train.jobs)
    keys = [k for ks, _ in results for k in ks]
    np.save(path, np.concatenate([v for _, v in results]), allow_pickle=False)
    meta_path.write_text(json.dumps({"stamp": stamp, "keys": keys}))
    return {
        "seconds": round(time.time() - t0, 1),
        "cached": False,
        "views": int(sum(v.shape[0] * v.shape[1] for _, v in results)),
    }


# --------------------------------------------------------------------------- evaluation


class EvalSet:
    """Zero-shot folder (60 colour x shape classes) + retrieval pairs, decoded once."""

    def __init__(self, lay: Layout, image_size: int):
        from dr_pipeline.augment import center_view
        from dr_pipeline.train.evaluate import TEMPLATES, load_eval_data

        def _decode(b: bytes, size: int) -> torch.Tensor:
            return center_view(Image.open(io.BytesIO(b)), size)

        zs = load_eval_data(str(lay.zeroshot)).tasks["folder"]
        images, self.labels, self.classes = zs
        self.views = torch.stack([_decode(b, image_size) for b in images])
        pairs = load_eval_data(str(lay.test / "tar")).pairs
        self.pair_views = torch.stack([_decode(b, image_size) for b, _ in pairs])
        self.pair_texts = [c for _, c in pairs]
        self.templates = TEMPLATES["folder"]

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        from dr_pipeline.train.evaluate import embed_texts, retrieval_metrics

        was_training = model.training
        model.eval()
        try:
            img = torch.cat([model.encode_image(self.views[i : i + 256]) for i in range(0, len(self.views), 256)])
            cls = embed_texts(model, [t.format(c) for c in self.classes for t in self.templates])
            cls = F.normalize(cls.view(len(self.classes), len(self.templates), -1).mean(1), dim=-1)
            pred = (img @ cls.T).argmax(1).tolist()
            pc = [self.classes[p].split() for p in pred]
            yc = [self.classes[y].split() for y in self.labels]
            pimg = torch.cat(
                [model.encode_image(self.pair_views[i : i + 256]) for i in range(0, len(self.pair_views), 256)]
            )
            ret = retrieval_metrics(pimg, embed_texts(model, self.pair_texts))
        finally:
            model.train(was_training)
        return {
            "top1": float(np.mean([p == y for p, y in zip(pred, self.labels)])),
            "colour": float(np.mean([a[0] == b[0] for a, b in zip(pc, yc)])),
            "shape": float(np.mean([a[1] == b[1] for a, b in zip(pc, yc)])),
            "i2t_R@1": ret["image_to_text_R@1"],
            "t2i_R@1": ret["text_to_image_R@1"],
            "i2t_R@5": ret["image_to_text_R@5"],
            "t2i_R@5": ret["text_to_image_R@5"],
        }


# --------------------------------------------------------------------------- one run


class _Batches:
    """The adapter data path: batches in the trainer's collate format, epoch by epoch."""

    def __init__(self, trainer, v: Variant, seed: int, lay: Layout, size: int):
        from dr_pipeline.train.sources import load_index

        self.trainer, self.v, self.seed, self.size = trainer, v, seed, size
        self.plan = trainer.plan
        self.ctx = trainer.spec.context_length
        self.base = _base_images(self.plan)
        self.keys = sorted(self.base)
        self._tok: dict[str, torch.Tensor] = {}
        self._load_index = load_index
        if not v.online_aug:
            meta = json.loads(lay.views(size).with_suffix(".json").read_text())
            self.views = np.load(lay.views(size), mmap_mode="r", allow_pickle=False)
            self.row = {k: i for i, k in enumerate(meta["keys"])}

    def _tokens(self, text: str) -> torch.Tensor:
        from dr_pipeline.train.students import tokenize

        t = self._tok.get(text)
        if t is None:
            t = self._tok[text] = tokenize([text], self.ctx)[0]
        return t

    def _epoch(self, epoch: int) -> list[dict]:
        from dr_pipeline import augment

        rng = np.random.default_rng([self.seed, epoch, 0xB47C])
        order = [self.keys[i] for i in rng.permutation(len(self.keys))]
        items = []
        if self.v.online_aug:
            aug_seed = int.from_bytes(hashlib.sha256(f"online|{self.seed}|{epoch}".encode()).digest()[:8], "big") >> 1
            for k in order:
                img, _, cap = self.base[k]
                p = augment.sample_params(self.plan.aug, aug_seed, k, 0, img.width, img.height)
                items.append(
                    {
                        "key": k,
                        "image": augment.replay(img, p, self.size, self.plan.aug),
                        "caption": cap,
                        "syn": cap,
                        "teachers": {},
                    }
                )
            return items
        entries = {}
        for pair in self.plan.pairs:
            idx = self._load_index(pair, self.plan, self.seed, epoch, "key")
            if idx.error:
                raise RuntimeError(f"{pair.reinf_url}: {idx.error}")
            entries.update(idx.entries)
        for k in order:
            e = entries[k]
            img, sha, cap = self.base[k]
            if e.error or e.sha256 != sha or e.caption != cap:
                raise RuntimeError(f"{k}: reinforcement row does not match its base sample ({e.error})")
            items.append(
                {
                    "key": k,
                    "image": torch.from_numpy(np.array(self.views[self.row[k], e.aug_index])),
                    "caption": cap,
                    "syn": e.syn_caption if e.syn_caption is not None else cap,
                    "teachers": {t: torch.from_numpy(x) for t, x in e.emb.items()},
                }
            )
        return items

    def __iter__(self):
        b = self.trainer.cfg.batch_size
        epoch = 0
        while True:
            items = self._epoch(epoch)
            for i in range(0, len(items) - b + 1, b):
                chunk = items[i : i + b]
                yield {
                    "image": torch.stack([it["image"] for it in chunk]),
                    "tokens": torch.stack(
                        [torch.stack([self._tokens(it["caption"]), self._tokens(it["syn"])]) for it in chunk]
                    ),
                    "teachers": {t: torch.stack([it["teachers"][t] for it in chunk]) for t in chunk[0]["teachers"]},
                }
            epoch += 1


def run_one(args: tuple) -> dict:
    """Train one (variant, seed) and evaluate it every ``eval_every`` steps (process entry)."""
    cfg, lay, v, seed = args
    torch.set_num_threads(1)
    from dr_pipeline.train.data import StreamState
    from dr_pipeline.train.distributed import setup, teardown
    from dr_pipeline.train.loop import Trainer, lr_at

    t0 = time.time()
    tcfg = _train_config(cfg, lay, v, seed)
    env = setup("cpu")
    try:
        trainer = Trainer(tcfg, env)
        evalset = EvalSet(lay, trainer.spec.image_size)
        batches = iter(_Batches(trainer, v, seed, lay, trainer.spec.image_size))
        curve = [{"step": 0, **evalset(trainer.student)}]
        t_train = 0.0
        losses = []
        for step in range(tcfg.steps):
            batch = next(batches)
            t1 = time.time()
            lr = lr_at(step, tcfg.optim, tcfg.steps)
            for g in trainer.optimizer.param_groups:
                g["lr"] = lr
            parts = trainer.train_step(batch)
            trainer.step += 1
            t_train += time.time() - t1
            losses.append(float(parts["loss"].detach()))
            if trainer.step % cfg.train.eval_every == 0 or trainer.step == tcfg.steps:
                row = {
                    "step": trainer.step,
                    **evalset(trainer.student),
                    "loss": float(np.mean(losses[-cfg.train.eval_every :])),
                }
                curve.append(row)
                print(
                    f"[{v.name}-s{seed}] step {row['step']}/{tcfg.steps} zero-shot top1 {row['top1']:.3f} "
                    f"(colour {row['colour']:.3f} shape {row['shape']:.3f}) i2t R@1 {row['i2t_R@1']:.3f} "
                    f"loss {row['loss']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
        ckpt = trainer.save(StreamState())
    finally:
        teardown(env)
    return {
        "variant": v.name,
        "seed": seed,
        "curve": curve,
        "checkpoint": ckpt,
        "seconds": round(time.time() - t0, 1),
        "train_seconds": round(t_train, 1),
    }


# --------------------------------------------------------------------------- analysis


def steps_to_reach(curve: list[dict], target: float, metric: str = "top1") -> float | None:
    """First step at which ``curve`` reaches ``target`` (linear interpolation between evaluations)."""
    prev = None
    for row in curve:
        if row[metric] >= target:
            if prev is None or row[metric] == prev[metric]:
                return float(row["step"])
            f = (target - prev[metric]) / (row[metric] - prev[metric])
            return float(prev["step"] + f * (row["step"] - prev["step"]))
        prev = row
    return None


def smoothed(curve: list[dict], window: int) -> list[dict]:
    """``curve`` with every metric replaced by its trailing mean over ``window`` evaluations.

    One evaluation of 480 images is noisy (about ±0.01 at these accuracies): a student's
    *final* accuracy is the trailing mean at its last evaluation, and the reinforced student
    *reaches* the plain one's when its own trailing mean does (the lag makes this conservative)."""
    out = []
    for i, row in enumerate(curve):
        win = curve[max(0, i - window + 1) : i + 1]
        out.append({k: (v if k == "step" else float(np.mean([r[k] for r in win if k in r]))) for k, v in row.items()})
    return out


def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
    }


def analyse(cfg: ReproduceConfig, runs: list[dict]) -> dict:
    by = {(r["variant"], r["seed"]): {**r, "curve": smoothed(r["curve"], cfg.smooth_evals)} for r in runs}
    steps = cfg.train.steps
    base = cfg.baseline
    rows = {}
    for v in cfg.variants:
        seeds = sorted(s for (n, s) in by if n == v.name)
        if not seeds:
            continue
        final = [by[(v.name, s)]["curve"][-1] for s in seeds]
        ratios, unreached = [], 0
        for s in seeds:
            if (base, s) not in by:
                continue
            target = by[(base, s)]["curve"][-1]["top1"]
            reach = steps_to_reach(by[(v.name, s)]["curve"], target)
            if reach is None:
                unreached += 1
            else:
                ratios.append(reach / steps)
        rows[v.name] = {
            "label": v.label,
            "seeds": seeds,
            "lam": v.lam,
            "gt_weight": v.gt_weight,
            "syn_weight": v.syn_weight,
            "online_aug": v.online_aug,
            "final_top1": _stats([f["top1"] for f in final]),
            "final_colour": _stats([f["colour"] for f in final]),
            "final_shape": _stats([f["shape"] for f in final]),
            "final_i2t_R@1": _stats([f["i2t_R@1"] for f in final]),
            "final_t2i_R@1": _stats([f["t2i_R@1"] for f in final]),
            "ratio": _stats(ratios) if ratios else None,
            "ratio_per_seed": ratios,
            "not_reached": unreached,
        }
    tgt = rows.get(cfg.target, {})
    ratio = tgt.get("ratio")
    headline = {
        "metric": "zero-shot colour x shape top-1 (60 classes)",
        "ratio_mean": ratio["mean"] if ratio else None,
        "ratio_std": ratio["std"] if ratio else None,
        "ratio_per_seed": tgt.get("ratio_per_seed"),
        "not_reached": tgt.get("not_reached"),
        "efficiency": (1 / ratio["mean"]) if ratio and ratio["mean"] > 0 else None,
        "target_met": bool(ratio and not tgt.get("not_reached") and ratio["mean"] <= 1 / 3),
    }
    return {"variants": rows, "headline": headline}


def plot(cfg: ReproduceConfig, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"plain": "tab:gray", "kd": "tab:blue", "syn": "tab:green", "full": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, metric, title in (
        (axes[0], "top1", "zero-shot colour x shape top-1 (60 classes)"),
        (axes[1], "i2t_R@1", "image->text retrieval R@1 (held-out clean captions)"),
    ):
        for v in cfg.variants:
            rs = [r for r in runs if r["variant"] == v.name]
            if not rs:
                continue
            steps = [row["step"] for row in rs[0]["curve"]]
            ys = np.array([[row[metric] for row in r["curve"]] for r in rs])
            c = colours.get(v.name)
            lw = 2.2 if v.name in (cfg.baseline, cfg.target) else 1.2
            ax.plot(steps, ys.mean(0), color=c, linewidth=lw, label=f"{v.name} ({len(rs)} seed{'s' * (len(rs) > 1)})")
            if len(rs) > 1:
                ax.fill_between(steps, ys.min(0), ys.max(0), color=c, alpha=0.15)
        if metric == "top1":
            base = [smoothed(r["curve"], cfg.smooth_evals)[-1]["top1"] for r in runs if r["variant"] == cfg.baseline]
            if base:
                ax.axhline(
                    float(np.mean(base)),
                    color="tab:gray",
                    linestyle="--",
                    linewidth=1,
                    label=f"plain final (trailing mean of {cfg.smooth_evals} evals)",
                )
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(s: dict | None, digits: int = 3) -> str:
    if not s:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def format_markdown(res: dict) -> str:
    h = res["analysis"]["headline"]
    rows = res["analysis"]["variants"]
    cfg = res["config"]
    lines = [
        f"Steps-to-accuracy ratio (reinforced steps to reach the plain student's final zero-shot top-1, "
        f"as a fraction of {cfg['train']['steps']} steps; accuracies are trailing means over "
        f"{cfg['smooth_evals']} evaluations): "
        + (
            f"**{h['ratio_mean']:.3f} ± {h['ratio_std']:.3f}** (mean ± std over seeds; per seed "
            + ", ".join(f"{r:.3f}" for r in h["ratio_per_seed"])
            + ") = **"
            + (f"{h['efficiency']:.1f}x" if h["efficiency"] else "unbounded")
            + "** learning efficiency"
            if h["ratio_mean"] is not None
            else "not reached"
            if h.get("not_reached")
            else "n/a (no plain and reinforced runs of one seed)"
        )
        + (f"; {h['not_reached']} seed(s) never reached it" if h.get("not_reached") else "")
        + ".",
        "",
        "| variant | λ | GT / syn caption weights | augmentation | seeds | final zero-shot top-1 | colour | shape | "
        "i2t R@1 | t2i R@1 | steps to plain's final (fraction) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = _pm(r["ratio"]) if r["ratio"] else "not reached" if r["not_reached"] else "n/a (no plain run)"
        if r["not_reached"] and r["ratio"]:
            ratio += f" ({r['not_reached']} not reached)"
        lines.append(
            f"| {name} | {r['lam']:g} | {r['gt_weight']:g} / {r['syn_weight']:g} | "
            f"{'online RRC+RandAugment' if r['online_aug'] else 'replayed (stored)'} | {len(r['seeds'])} | "
            f"{_pm(r['final_top1'])} | {_pm(r['final_colour'])} | {_pm(r['final_shape'])} | "
            f"{_pm(r['final_i2t_R@1'])} | {_pm(r['final_t2i_R@1'])} | {ratio} |"
        )
    t = res["timings"]
    lines += [
        "",
        f"Timings: corpora {t['corpora_s']:.0f}s, reinforcement {t['reinforce_s']:.0f}s, view rendering "
        f"{t['views_s']:.0f}s, {t['n_runs']} training runs {t['train_s']:.0f}s, total {t['total_s']:.0f}s "
        f"({t['cpus']} CPUs).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def reproduce(cfg: ReproduceConfig, only: list[str] | None = None) -> dict:
    from dr_pipeline.train.config import DataConfig
    from dr_pipeline.train.sources import plan_data

    t_all = time.time()
    lay = Layout(Path(cfg.out_dir))
    lay.root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {"cpus": os.cpu_count()}
    t0 = time.time()
    make_corpora(cfg, lay)
    timings["corpora_s"] = round(time.time() - t0, 1)
    print(f"reproduce: corpora in {timings['corpora_s']}s", file=sys.stderr, flush=True)
    rep = reinforce(cfg, lay)
    timings["reinforce_s"] = rep["seconds"]
    plan = plan_data(DataConfig(reinforced=str(lay.dataset), num_workers=0))
    size = cfg.train.student.image_size or 64
    vr = render_views(cfg, lay, plan, size)
    timings["views_s"] = vr["seconds"]
    print(f"reproduce: views {vr}", file=sys.stderr, flush=True)

    tasks = []
    for v in cfg.variants:
        if only and v.name not in only:
            continue
        seeds = cfg.train.seeds if v.name in (cfg.baseline, cfg.target) else cfg.train.ablation_seeds
        tasks += [(cfg, lay, v, s) for s in seeds]
    # Longest first (the plain runs also render their augmentations online).
    tasks.sort(key=lambda t: (not t[2].online_aug, t[3]))
    t0 = time.time()
    runs = pool_map(run_one, tasks, cfg.train.jobs)
    timings["train_s"] = round(time.time() - t0, 1)
    timings["n_runs"] = len(runs)
    timings["total_s"] = round(time.time() - t_all, 1)
    res = {
        "config": to_dict(cfg),
        "timings": timings,
        "reinforce": rep,
        "runs": runs,
        "analysis": analyse(cfg, runs),
        "torch": torch.__version__,
    }
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(cfg, runs, out / "accuracy_vs_steps.png")
    (out / "results.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    md = format_markdown(res)
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"\nplot: {out / 'accuracy_vs_steps.png'}  results: {out / 'results.json'}")
    return res


__all__ = ["ReproduceConfig", "load_reproduce_config", "reproduce", "steps_to_reach", "analyse"]
