"""Typed, frozen configs of the student trainer (``jobs/configs/train-*.yaml``).

Loaded with :func:`dr_pipeline.config.load_yaml`: unknown keys are an error. Every field
is documented here; ``jobs/configs/train-tiny.yaml`` and ``train-mci0-dfndr.yaml`` are
worked examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dr_pipeline.config import AugSpec, ConfigError, load_yaml

ARCHS = ("tiny", "mci0", "mci1", "mci2", "mci3", "mci4")
AUGMENTATIONS = ("stored", "fresh", "center")  # data.augmentation


@dataclass(frozen=True)
class StudentConfig:
    """Which student to train. ``None`` fields take the architecture's default (students.ARCHS).

    ``arch``: one of ``ARCHS`` (MCi0-4 from timm + open_clip text tower, ``tiny`` for tests) or
    any open_clip model name (``ViT-B-16``, ``MobileCLIP-B``, ``MobileCLIP2-S0``, a config
    registered with ``open_clip.add_model_config``), built with random weights; its image size
    and context length come from the open_clip config unless set here.
    """

    arch: str = "mci0"
    image_size: int | None = None  # 256 for MCi, 64 for tiny
    context_length: int | None = None  # 77 for MCi, 32 for tiny
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # MobileCLIP2 students: no normalization
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    init_logit_scale: float = 1 / 0.07  # learned; stored as its log; clamped to max_logit_scale
    max_logit_scale: float = 100.0
    grad_checkpointing: bool = False  # recompute activations in backward (timm / open_clip towers)
    # start from another model's weights: the tensors of ``init_from`` (a safetensors file or an
    # open_clip checkpoint of the same layout) whose names ``re.match`` ``init_keys`` and whose
    # shapes match, e.g. a CoCa's image trunk from a trained CLIP (``dr bootstrap``); fresh runs only
    init_from: str | None = None
    init_keys: str = ".*"

    def __post_init__(self) -> None:
        try:
            re.compile(self.init_keys)
        except re.error as e:
            raise ConfigError(f"student.init_keys {self.init_keys!r} is not a regular expression: {e}") from None
        if self.arch not in ARCHS and not _is_open_clip_model(self.arch):
            raise ConfigError(
                f"student.arch must be one of {', '.join(ARCHS)} or an open_clip model name (got {self.arch!r})"
            )
        if self.image_size is not None and self.image_size < 32:
            raise ConfigError(f"student.image_size must be >= 32 (got {self.image_size})")
        if not (0 < self.init_logit_scale <= self.max_logit_scale):
            raise ConfigError("student: need 0 < init_logit_scale <= max_logit_scale")


def _is_open_clip_model(name: str) -> bool:
    import open_clip

    return name in open_clip.list_models()


@dataclass(frozen=True)
class SourceConfig:
    """One more training source beside ``data.reinforced`` (``data.extra_sources``). Fields as
    in DataConfig; ``None`` takes DataConfig's value. ``upsampling_factor``: how often its shards
    are visited relative to a factor-1 source (per epoch: ``floor(f)`` visits plus one more with
    probability ``f - floor(f)``; with ``resampled``, the shard draw weight)."""

    reinforced: str | tuple[str, ...]
    base: str | tuple[str, ...] | None = None
    storage_options: dict[str, Any] | None = None
    join_key: str | None = None
    exclude_shards: tuple[str, ...] = ()
    upsampling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.join_key not in (None, "key", "uid"):
            raise ConfigError(f"data.extra_sources: join_key must be 'key' or 'uid' (got {self.join_key!r})")
        if not self.upsampling_factor > 0:
            raise ConfigError("data.extra_sources: upsampling_factor must be > 0")


@dataclass(frozen=True)
class ForeignTeacher:
    """A teacher inside DataCompDR-layout tars, where teachers are concatenated along D."""

    id: str
    dim: int
    logit_scale: float = 100.0


@dataclass(frozen=True)
class DataConfig:
    """Where the reinforced data and the base corpus are, and how to read them.

    ``reinforced``: a dataset directory written by ``dr reinforce`` (Parquet shards + markers;
    only committed shards are read), Parquet shard URLs, or DataCompDR-layout tars (this
    project's ``dr export`` or released DataCompDR / DFNDR shards; brace patterns and globs
    work). ``base``: the base corpus (webdataset tars or img2dataset Parquet); default: the
    dataset's ``job.yaml`` ``input.urls``. Shards are joined by shard name, samples by
    ``join_key`` (``key``: the base ``__key__``; ``uid``: the base json's uid, as released
    DataCompDR keys are uids). ``extra_sources``: more (reinforced, base) sources trained on
    together, each with its ``upsampling_factor`` (this one's is ``upsampling_factor``); they
    must hold the selected teachers with the same dims.

    Apple's trainer options (ml-mobileclip's ``preprocess_dr``): ``syn_key_regex`` keeps only
    the synthetic-caption keys (DataCompDR ``syn.json`` keys, Parquet captioner ids) that
    ``re.match`` it, on top of ``captioners`` (e.g. ``^syn_text_dfn_mscoco38k$``);
    ``sample_sequential``: the v-th visit of a sample takes augmentation ``v % N_aug`` and
    synthetic caption ``v % k`` (of a key drawn uniformly) instead of uniform draws (v = the
    epoch, times the copies per epoch of an upsampled source, plus the copy);
    ``mix_synthetic_ratio``: each sample trains on one caption, the synthetic one with this
    probability and else the GT one (the synthetic-caption loss term is then dropped, as
    Apple's "no double loss": ``loss.syn_weight`` is ignored).

    ``augmentation``: ``stored`` (default) replays one of the N augmentations stored per sample
    (the view the teachers embedded); ``fresh`` draws new RandomResizedCrop + RandAugment params
    on every visit of a sample, with the dataset's augmentation spec and the reinforcement's
    sampler (``augment.sample_params``), deterministically from (seed, epoch, visit, key) --
    the online augmentation of standard CLIP training, for baselines. Fresh views have no
    teacher embeddings: the batches carry none and ``loss.lam`` must be 0; synthetic captions
    can still be used. ``center``: no augmentation, every visit the centre view at the
    student's resolution (shortest side resized, centre crop: open_clip's eval preprocess, the
    view ``dr reinforce`` gives a captioner); no teacher embeddings either.

    ``reinforced: null`` trains on the base corpus alone (``base`` required; GT captions, no
    teachers, no synthetic captions; ``augmentation`` fresh or center; no ``extra_sources``):
    plain CLIP training, e.g. of the synthetic domain's own teachers (``dr bootstrap``).
    Records are read in shard order and batches are cut from the stream of shuffled shards, so
    shards of a multiple of g records keep consecutive groups of g (minimal pairs) in one
    batch when ``batch_size`` is a multiple of g.
    """

    reinforced: str | tuple[str, ...] | None
    base: str | tuple[str, ...] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    teachers: tuple[str, ...] | None = None  # teacher ids to distill from (None: every teacher in the data)
    captioners: tuple[str, ...] | None = None  # synthetic-caption sources (None: all)
    foreign_teachers: tuple[ForeignTeacher, ...] = ()  # DataCompDR tars: teacher ids + dims in concat order
    # DataCompDR magnitudes are at foreign_aug.size; with reinforced: null, fresh views use this spec
    foreign_aug: AugSpec = field(default_factory=AugSpec)
    exclude_shards: tuple[str, ...] = ()  # shard names held out (e.g. for evaluation)
    join_key: str = "key"
    verify_sha256: bool = True  # Parquet rows: base image bytes must hash to image_sha256
    resampled: bool = False  # draw shards with replacement (long runs, many ranks)
    shuffle_shards: bool = True  # per-epoch shard order from (seed, epoch)
    num_workers: int = 2  # DataLoader workers per rank
    # consecutive samples a worker decodes and ships together; batches are cut from them. Each
    # chunk costs the training process a fixed bit of CPU to receive (unpickling, a socket round
    # trip for the image tensor's file descriptor): 16-sample chunks took 8 ms of its CPU per
    # 32-sample batch, 64-sample ones 2.6 ms (CPU-only, where it shares the workers' cores)
    worker_chunk: int = 64
    upsampling_factor: float = 1.0  # of this source, relative to extra_sources' factors
    extra_sources: tuple[SourceConfig, ...] = ()
    syn_key_regex: str | None = None  # synthetic-caption keys to use: re.match (Apple's option)
    sample_sequential: bool = False  # visit v: aug v % N, caption v % k (Apple's option)
    mix_synthetic_ratio: float | None = None  # one caption per sample: synthetic w.p. ratio (Apple's)
    cache_images: bool = False  # decode each base image once, keep it in memory (small sets)
    augmentation: str = "stored"  # stored: replay the stored views | fresh: new params every visit

    def __post_init__(self) -> None:
        if self.join_key not in ("key", "uid"):
            raise ConfigError(f"data.join_key must be 'key' or 'uid' (got {self.join_key!r})")
        if not self.upsampling_factor > 0:
            raise ConfigError("data.upsampling_factor must be > 0")
        if self.mix_synthetic_ratio is not None and not 0.0 <= self.mix_synthetic_ratio <= 1.0:
            raise ConfigError(f"data.mix_synthetic_ratio must be in [0, 1] or null (got {self.mix_synthetic_ratio})")
        if self.syn_key_regex is not None:
            try:
                re.compile(self.syn_key_regex)
            except re.error as e:
                raise ConfigError(
                    f"data.syn_key_regex {self.syn_key_regex!r} is not a regular expression: {e}"
                ) from None
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(
                f"data.augmentation must be one of {', '.join(AUGMENTATIONS)} (got {self.augmentation!r})"
            )
        if self.reinforced is None:
            if self.base is None:
                raise ConfigError("data: reinforced: null trains on the base corpus alone, so data.base is required")
            if self.augmentation == "stored":
                raise ConfigError("data: a base corpus alone has no stored views: set augmentation: fresh or center")
            if self.extra_sources or self.teachers or self.foreign_teachers or self.captioners:
                raise ConfigError("data: reinforced: null has no teachers, captioners or extra sources to select")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if self.worker_chunk < 1:
            raise ConfigError("data.worker_chunk must be >= 1")
        if self.teachers is not None and not self.teachers:
            raise ConfigError("data.teachers: give at least one teacher id, or leave it out for all")
        dims = [t.id for t in self.foreign_teachers]
        if len(set(dims)) != len(dims):
            raise ConfigError(f"data.foreign_teachers: duplicate ids {dims}")


@dataclass(frozen=True)
class LossConfig:
    """L = Σ_c w_c [(1−λ)·L_CLIP^c + λ·L_Distill^c] over caption kinds c ∈ {gt, syn} (docs/reference.md#loss)."""

    lam: float = 1.0  # λ: distillation weight; the CLIP loss gets 1 − λ
    gt_weight: float = 1.0  # ground-truth caption terms
    syn_weight: float = 1.0  # synthetic caption terms
    teacher_logit_scales: dict[str, float] = field(default_factory=dict)  # override the shards' scales
    local_loss: bool = False  # rows of the local batch only (same value/gradients, less memory)
    kd_form: str = "summed"  # summed: Σ_k KL (paper) | apple: CE with the averaged teacher softmax
    # CoCa students: + caption_weight × the captioning cross-entropy of the GT caption (open_clip
    # CoCa's caption loss). ``caption_vocab``: the token ids the captions use (None: all); the
    # decoder's projection columns of every other token start at zero and are held there, so
    # their logits are exactly 0 and the loss lumps them into one class of logit log(n_other):
    # the full-vocabulary cross-entropy's value and gradients at a fraction of the cost (train/coca.py)
    caption_weight: float = 0.0
    caption_vocab: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.caption_weight < 0:
            raise ConfigError("loss.caption_weight must be >= 0")
        if self.caption_vocab is not None and (not self.caption_vocab or min(self.caption_vocab) < 1):
            raise ConfigError("loss.caption_vocab: give token ids >= 1 (0 is padding), or null for all")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"loss.lam must be in [0, 1] (got {self.lam})")
        if self.kd_form not in ("summed", "apple"):
            raise ConfigError(f"loss.kd_form must be 'summed' or 'apple' (got {self.kd_form!r})")
        if self.gt_weight < 0 or self.syn_weight < 0 or self.gt_weight + self.syn_weight == 0:
            raise ConfigError("loss: gt_weight and syn_weight must be >= 0 and not both 0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 10_000
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # e.g. 0.9995 (MobileCLIP2-S0); None: no EMA

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("optim: need lr > 0 and 0 <= min_lr <= lr")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("optim.ema_decay must be in (0, 1) or null")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("optim.grad_clip must be > 0 or null")


@dataclass(frozen=True)
class EvalConfig:
    """Zero-shot evaluation during training (``dr eval``'s code) on a labelled image folder
    (``DATA/<class>/*.jpg``) or base shards with synthetic-corpus labels, every ``every`` steps
    and at the end; results go to metrics.jsonl (``eval/<task>/top1``) and TensorBoard.
    ``data`` may list several paths (e.g. a labelled folder and a held-out shard for retrieval)."""

    data: str | tuple[str, ...]
    every: int = 1000
    limit: int | None = None  # at most this many samples of shard data

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError("eval.every must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str  # checkpoints/, metrics.jsonl, curve.png, train_config.yaml
    data: DataConfig
    steps: int
    batch_size: int  # per rank and micro-batch; global = batch_size × accum_steps × world
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # augmentation / caption choice and model init
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 0  # keep the newest N step checkpoints (0: keep all)
    log_every: int = 10
    accum_steps: int = 1  # micro-batches per step; the loss sees all of them (open_clip accum_freq)
    tensorboard: bool = False  # event files in <out_dir>/tensorboard (needs the tensorboard package)
    wandb_project: str | None = None  # also log to Weights & Biases (needs wandb)
    eval: EvalConfig | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")
        if self.accum_steps < 1:
            raise ConfigError("accum_steps must be >= 1")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (contrastive targets need other samples)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32 (got {self.precision!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda (got {self.device!r})")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.keep_checkpoints < 0:
            raise ConfigError("checkpoint_every and log_every must be >= 1, keep_checkpoints >= 0")
        if (self.data.augmentation != "stored" or self.data.reinforced is None) and self.loss.lam > 0:
            raise ConfigError(
                f"data.augmentation: {self.data.augmentation} views have no teacher embeddings, so "
                f"distillation is impossible: set loss.lam: 0 (got {self.loss.lam}) or use augmentation: stored"
            )
        if self.loss.caption_weight > 0 and self.accum_steps > 1:
            raise ConfigError("loss.caption_weight with accum_steps > 1 is not supported")


def load_train_config(path: str | Path) -> TrainConfig:
    """Relative paths inside the file resolve against the working directory (like job configs)."""
    return load_yaml(TrainConfig, Path(path))
