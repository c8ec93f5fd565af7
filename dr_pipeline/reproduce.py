"""``dr reproduce`` / ``make reproduce``: does a reinforced dataset train a student faster?

The experiment of the MobileCLIP papers at laptop scale, on the synthetic domain:

1. ``web`` split (noisy alt-text-like captions) and ``test`` split (zero-shot folder of 60
   colour x shape classes + clean-caption pairs for retrieval), from ``dr make-corpus``'s code;
2. ``dr reinforce`` of the web split with the real synthetic teachers (``teachers/synthetic.yaml``,
   made by ``dr bootstrap``): N seeded augmentations, 2 CLIP teachers, k CoCa captions;
3. the same tiny MCi student trained for the same steps and batch size, per seed, as
     plain    CLIP loss on the GT captions, nothing from the teachers (λ = 0, no synthetic
              captions), fresh RandomResizedCrop + RandAugment every visit
              (``data.augmentation: fresh``), as standard CLIP training;
     full     the paper's recipe: λ = 1 distillation from the ensemble, GT + synthetic caption
              terms;
   and, as ablations, ``kd`` (λ = 1, GT captions only) and ``syn`` (λ = 0: CLIP loss on GT +
   synthetic captions); the reinforced variants replay the N stored augmentations (the views
   the teachers embedded), the plain one draws new ones from the same spec and sampler;
4. zero-shot accuracy and retrieval every ``eval_every`` steps; ``accuracy_vs_steps.png``,
   ``results.json``, ``results.md`` and the **steps-to-accuracy ratio**: the steps the
   reinforced student needs to reach the plain student's final zero-shot accuracy, as a
   fraction of the plain student's steps (linear interpolation between evaluations; every
   accuracy a trailing mean over ``smooth_evals`` evaluations, see ``smoothed``), per
   seed, then mean ± std over seeds.

Every run is ``dr train``: a ``TrainConfig`` (``_train_config``; the trainer writes it to the run
directory as ``train_config.yaml``) and ``Trainer.run()`` of ``dr_pipeline/train/loop.py``: the product's loader
(``TrainStream`` over the reinforced dataset, ``data.cache_images`` so each base image is
decoded once), its learning-rate schedule, ``train_step`` and checkpoints. The curves are the
trainer's periodic evaluation (``eval: {data: [zero-shot folder, held-out shard], every}``,
``dr eval``'s ``evaluate_model``), plus one evaluation before the first step. Runs train in
parallel processes, one thread each, so each run is a deterministic function of its seed on
a given machine.

What the trainer's loader does not have, and the experiment therefore does not do: a
sample-level shuffle (records of a shard are read in order, so the corpus is cut into shards
smaller than a batch, see ``jobs/configs/reproduce.yaml``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    augmentation: str = "stored"  # the run's data.augmentation: stored (replayed) | fresh (online)

    def __post_init__(self) -> None:
        if self.augmentation not in ("stored", "fresh"):
            raise ConfigError(f"variant {self.name}: augmentation must be stored or fresh (got {self.augmentation!r})")
        if self.augmentation == "fresh" and self.lam > 0:
            raise ConfigError(f"variant {self.name}: fresh augmentation has no teacher embeddings; it needs lam: 0")


DEFAULT_VARIANTS = (
    Variant("plain", "plain: CLIP on GT captions, fresh augmentation", lam=0.0, augmentation="fresh"),
    Variant("kd", "KD only: lambda=1, GT captions", lam=1.0),
    Variant("syn", "synthetic captions only: lambda=0, GT + syn captions", lam=0.0, syn_weight=1.0),
    Variant("full", "reinforced: lambda=1, GT + syn captions", lam=1.0, syn_weight=1.0),
)


@dataclass(frozen=True)
class TrainRuns:
    steps: int = 350
    batch_size: int = 64
    eval_every: int = 25
    seeds: tuple[int, ...] = (0, 1, 2)  # baseline and target variants
    ablation_seeds: tuple[int, ...] = (0,)  # the other variants
    jobs: int = 2  # runs in parallel processes, 1 thread each, longest first
    long_factor: int = 3  # one more baseline run (first seed) of long_factor x steps: plain's plateau; 0: none
    student: StudentConfig = field(default_factory=lambda: StudentConfig(arch="tiny", image_size=64, context_length=32))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=2e-3, min_lr=1e-5, warmup_steps=20, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0
        )
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.eval_every < 1 or self.jobs < 1 or not self.seeds:
            raise ConfigError("train: need steps >= 1, batch_size >= 2, eval_every >= 1, jobs >= 1, seeds")
        if self.long_factor < 0 or self.long_factor == 1:
            raise ConfigError(f"train.long_factor must be 0 (no long run) or >= 2 (got {self.long_factor})")


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


def is_long(run: dict, cfg: ReproduceConfig) -> bool:
    """Whether ``run`` is the long baseline run (``train.long_factor``), not one of the equal-step runs."""
    return run.get("steps", cfg.train.steps) != cfg.train.steps


def run_name(v: Variant, seed: int, steps: int, cfg: ReproduceConfig) -> str:
    return f"{v.name}-s{seed}" if steps == cfg.train.steps else f"{v.name}-{steps}steps-s{seed}"


def reinforce_core_seconds(lay: Layout) -> float:
    """The reinforcement's cost however many runs it took (resumes included): the sum of its
    shards' wall seconds from their markers, each shard processed by a one-thread actor."""
    from dr_pipeline.shards.dataset import ReinforcedDataset

    return round(sum(m.seconds for m in ReinforcedDataset(str(lay.dataset)).markers().values()), 1)


def _train_config(cfg: ReproduceConfig, lay: Layout, v: Variant, seed: int, steps: int | None = None):
    """The run's ``dr train`` config: the reinforced web split, ``v``'s loss, periodic eval."""
    from dr_pipeline.train.config import DataConfig, EvalConfig, LossConfig, TrainConfig

    t = cfg.train
    steps = steps or t.steps
    return TrainConfig(
        out_dir=str(lay.runs / run_name(v, seed, steps, cfg)),
        data=DataConfig(reinforced=str(lay.dataset), num_workers=0, cache_images=True, augmentation=v.augmentation),
        steps=steps,
        batch_size=t.batch_size,
        student=t.student,
        loss=LossConfig(lam=v.lam, gt_weight=v.gt_weight, syn_weight=v.syn_weight),
        optim=t.optim,
        seed=seed,
        precision="fp32",
        device="cpu",
        checkpoint_every=steps,
        keep_checkpoints=1,
        log_every=t.eval_every,
        eval=EvalConfig(data=(str(lay.zeroshot), str(lay.test / "tar")), every=t.eval_every),
    )


# The curve's names for the trainer's eval rows (zero-shot folder + held-out retrieval).
CURVE_KEYS = {
    "eval/folder/top1": "top1",
    "eval/folder/colour": "colour",
    "eval/folder/shape": "shape",
    "eval/retrieval/image_to_text_R@1": "i2t_R@1",
    "eval/retrieval/text_to_image_R@1": "t2i_R@1",
    "eval/retrieval/image_to_text_R@5": "i2t_R@5",
    "eval/retrieval/text_to_image_R@5": "t2i_R@5",
}


def curve_rows(evals: list[dict], losses: list[float], window: int) -> list[dict]:
    """The trainer's eval rows as the curve: ``CURVE_KEYS`` + the mean training loss of the
    ``window`` steps before each evaluation (``losses``: per step, from step 1)."""
    out = []
    for row in evals:
        r = {"step": row["step"], **{name: row[k] for k, name in CURVE_KEYS.items()}}
        if row["step"] > 0:
            r["loss"] = float(np.mean(losses[max(0, row["step"] - window) : row["step"]]))
        out.append(r)
    return out


def run_one(args: tuple) -> dict:
    """Train one (variant, seed) with ``dr train``'s Trainer (process entry)."""
    cfg, lay, v, seed, steps = args
    torch.set_num_threads(1)
    from dr_pipeline.train.distributed import setup, teardown
    from dr_pipeline.train.loop import Trainer

    t0 = time.time()
    tcfg = _train_config(cfg, lay, v, seed, steps)
    shutil.rmtree(tcfg.out_dir, ignore_errors=True)  # a fresh run, not a resume
    env = setup("cpu")
    try:
        trainer = Trainer(tcfg, env)
        trainer.evaluate()  # the untrained student: the curve starts at step 0
        t1, c1 = time.time(), time.process_time()
        res = trainer.run()
        t_train, c_train = time.time() - t1, time.process_time() - c1
    finally:
        teardown(env)
    curve = curve_rows(trainer.evals, res.losses, cfg.train.eval_every)
    last = curve[-1]
    print(
        f"[{run_name(v, seed, steps, cfg)}] step {last['step']}/{tcfg.steps} zero-shot top1 {last['top1']:.3f} "
        f"(colour {last['colour']:.3f} shape {last['shape']:.3f}) i2t R@1 {last['i2t_R@1']:.3f} "
        f"in {time.time() - t0:.0f}s",
        file=sys.stderr,
        flush=True,
    )
    return {
        "variant": v.name,
        "seed": seed,
        "steps": steps,
        "curve": curve,
        "checkpoint": res.checkpoint,
        "skipped": res.skipped,
        "seconds": round(time.time() - t0, 1),
        "train_seconds": round(t_train, 1),  # the trainer's run(), evaluations included
        # its CPU time: core-seconds on one thread, whatever else shares the cores (train.jobs)
        "train_cpu_seconds": round(c_train, 1),
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


def analyse(cfg: ReproduceConfig, runs: list[dict], reinforce_core_s: float | None = None) -> dict:
    """Per variant: final accuracies and the steps-to-accuracy ratio against the baseline of the
    same seed and steps; headline: that ratio for the target, plus (with a long baseline run)
    the ratio against the baseline's best accuracy, and the costs in core-seconds
    (``reinforce_core_s``: the one-time reinforcement; runs train on one thread each)."""
    steps = cfg.train.steps
    smooth = [{**r, "curve": smoothed(r["curve"], cfg.smooth_evals)} for r in runs]
    by = {(r["variant"], r["seed"]): r for r in smooth if not is_long(r, cfg)}
    long = next((r for r in smooth if is_long(r, cfg) and r["variant"] == cfg.baseline), None)
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
            "augmentation": v.augmentation,
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
    targets = [by[(cfg.target, s)] for s in sorted(s for (n, s) in by if n == cfg.target)]
    if long is not None:
        headline["vs_best"] = versus_best(long, targets)
    headline["cost"] = costs(
        [by[k] for k in by if k[0] == cfg.baseline], targets, headline.get("ratio_per_seed") or [], reinforce_core_s
    )
    return {"variants": rows, "headline": headline}


def versus_best(long: dict, targets: list[dict]) -> dict:
    """The long baseline run's best (smoothed) top-1 and where it got it, how much its last half
    added (a plateau: about 0), and the steps each target run needs to reach that best, as a
    fraction of the steps the baseline needed (None: never reached in its steps)."""
    curve = long["curve"]
    best = max(curve, key=lambda r: r["top1"])
    half = min(curve, key=lambda r: abs(r["step"] - long["steps"] / 2))
    reach = [steps_to_reach(t["curve"], best["top1"]) for t in targets]
    ratios = [r / best["step"] for r in reach if r is not None and best["step"] > 0]
    per_step = _seconds_per_step([long])
    return {
        "plain_to_best_core_s": round(per_step * best["step"], 1) if per_step else None,
        "plain_steps": long["steps"],
        "plain_seed": long["seed"],
        "plain_best_top1": best["top1"],
        "plain_best_step": best["step"],
        "plain_final_top1": curve[-1]["top1"],
        "plain_last_half_gain": curve[-1]["top1"] - half["top1"],
        "target_best_top1": _stats([max(r["top1"] for r in t["curve"]) for t in targets]) if targets else None,
        "target_steps_to_plain_best": reach,
        "ratio_per_seed": ratios,
        "ratio": _stats(ratios) if ratios else None,
        "not_reached": sum(r is None for r in reach),
    }


def _seconds_per_step(runs: list[dict]) -> float | None:
    """Mean training core-seconds per step (evaluations included) of the runs that were timed:
    their CPU time on one thread (``train_cpu_seconds``), which more runs than cores at a time
    (``train.jobs``) do not inflate as they do the wall clock."""
    timed = [r["train_cpu_seconds"] / r["steps"] for r in runs if r.get("train_cpu_seconds")]
    return float(np.mean(timed)) if timed else None


def costs(plain: list[dict], targets: list[dict], ratios: list[float], reinforce_core_s: float | None) -> dict:
    """Core-seconds to the baseline's final accuracy: the baseline's whole run against the
    target's run up to the step it reaches it, with and without the one-time reinforcement."""
    p, t = _seconds_per_step(plain), _seconds_per_step(targets)
    out: dict[str, Any] = {"reinforce_core_s": reinforce_core_s, "plain_s_per_step": p, "target_s_per_step": t}
    if p and t and ratios:
        steps = plain[0]["steps"]
        out["plain_to_final_core_s"] = round(p * steps, 1)
        out["target_to_plain_final_core_s"] = round(t * steps * float(np.mean(ratios)), 1)
        if reinforce_core_s is not None:
            out["target_incl_reinforce_core_s"] = round(out["target_to_plain_final_core_s"] + reinforce_core_s, 1)
    return out


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
        for r in runs:
            if r["variant"] == cfg.baseline and is_long(r, cfg):
                steps = [row["step"] for row in r["curve"]]
                ax.plot(
                    steps,
                    [row[metric] for row in r["curve"]],
                    color="tab:gray",
                    linestyle=":",
                    linewidth=1.4,
                    label=f"{r['variant']}, {r['steps']} steps (seed {r['seed']})",
                )
        for v in cfg.variants:
            rs = [r for r in runs if r["variant"] == v.name and not is_long(r, cfg)]
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
            base = [
                smoothed(r["curve"], cfg.smooth_evals)[-1]["top1"]
                for r in runs
                if r["variant"] == cfg.baseline and not is_long(r, cfg)
            ]
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
        "| variant | λ | GT / syn caption weights | augmentation | seeds | final zero-shot top-1 | colour | "
        "shape | i2t R@1 | t2i R@1 | steps to plain's final (fraction) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = _pm(r["ratio"]) if r["ratio"] else "not reached" if r["not_reached"] else "n/a (no plain run)"
        if r["not_reached"] and r["ratio"]:
            ratio += f" ({r['not_reached']} not reached)"
        lines.append(
            f"| {name} | {r['lam']:g} | {r['gt_weight']:g} / {r['syn_weight']:g} | "
            f"{r.get('augmentation', 'stored')} | {len(r['seeds'])} | "
            f"{_pm(r['final_top1'])} | {_pm(r['final_colour'])} | {_pm(r['final_shape'])} | "
            f"{_pm(r['final_i2t_R@1'])} | {_pm(r['final_t2i_R@1'])} | {ratio} |"
        )
    lines += _long_and_cost_lines(h)
    t = res["timings"]
    lines += [
        "",
        f"Timings: corpora {t['corpora_s']:.0f}s, reinforcement {t['reinforce_s']:.0f}s, "
        f"{t['n_runs']} training runs (`dr train`'s Trainer, {res['config']['train']['jobs']} at a time) "
        f"{t['train_s']:.0f}s, total {t['total_s']:.0f}s ({t['cpus']} CPUs).",
    ]
    return "\n".join(lines)


def _long_and_cost_lines(h: dict) -> list[str]:
    out = []
    vb = h.get("vs_best")
    if vb:
        reach = (
            f"the reinforced student reaches it at **{_pm(vb['ratio'])}** of those steps (per seed "
            + ", ".join("not reached" if r is None else f"{r:.0f}" for r in vb["target_steps_to_plain_best"])
            + " steps)"
            if vb["ratio"]
            else "the reinforced student does not reach it in its steps"
        )
        out += [
            "",
            f"Against plain's best: a plain run of {vb['plain_steps']} steps (seed {vb['plain_seed']}) peaks at "
            f"zero-shot top-1 **{vb['plain_best_top1']:.3f}** at step {vb['plain_best_step']} (final "
            f"{vb['plain_final_top1']:.3f}; its last half added {vb['plain_last_half_gain']:+.3f}); {reach}. "
            f"Best reinforced top-1 in its steps: {_pm(vb['target_best_top1'])}.",
        ]
    c = h.get("cost") or {}
    if c.get("target_to_plain_final_core_s") is not None:
        line = (
            f"Cost in core-seconds (one thread per run and per reinforcement actor): plain to its final accuracy "
            f"{c['plain_to_final_core_s']:.0f}s; reinforced to the same accuracy {c['target_to_plain_final_core_s']:.0f}s "
            f"of training"
        )
        if c.get("reinforce_core_s") is not None:
            line += (
                f" + {c['reinforce_core_s']:.0f}s one-time reinforcement = {c['target_incl_reinforce_core_s']:.0f}s "
                "(the reinforcement is paid once for every student trained on the dataset)"
            )
        if vb and vb.get("plain_to_best_core_s") is not None:
            line += f"; plain to its best {vb['plain_to_best_core_s']:.0f}s"
        out += ["", line + "."]
    return out


# --------------------------------------------------------------------------- driver


def reproduce(cfg: ReproduceConfig, only: list[str] | None = None) -> dict:
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
    rep["core_s"] = reinforce_core_seconds(lay)

    tasks = []
    for v in cfg.variants:
        if only and v.name not in only:
            continue
        seeds = cfg.train.seeds if v.name in (cfg.baseline, cfg.target) else cfg.train.ablation_seeds
        tasks += [(cfg, lay, v, s, cfg.train.steps) for s in seeds]
        if v.name == cfg.baseline and cfg.train.long_factor:
            tasks.append((cfg, lay, v, cfg.train.seeds[0], cfg.train.long_factor * cfg.train.steps))
    # Longest first, so that the last runs to start are short ones (no core idles long at the end):
    # by steps, then the variants that are not the baseline (their steps embed a second caption
    # and distil: ~10 % more work than plain's).
    tasks.sort(key=lambda t: (-t[4], t[2].name == cfg.baseline))
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
        "analysis": analyse(cfg, runs, rep["core_s"]),
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
