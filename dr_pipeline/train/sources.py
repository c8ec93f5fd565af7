"""Find the (base shard, reinforcement shard) pairs and read one reinforcement shard's index.

A reinforcement source is this project's dataset directory (Parquet shards, only those with
a commit marker), plain Parquet shard URLs, or DataCompDR-layout tars (``dr export`` output
or released DataCompDR / DFNDR shards, read without unpickling). Shards pair with base
shards by name.

``load_index`` reads one reinforcement shard and keeps, per sample, only what this epoch
trains on: the augmentation index drawn uniformly from (seed, epoch, key), its params, one
synthetic caption drawn uniformly, and each selected teacher's embeddings of exactly that
view, the GT caption and that synthetic caption. A row that cannot be used keeps a reason
(``Entry.error``) so the loader counts it instead of training on a misaligned pair.
Apple's trainer options change only these draws (``Chooser``): sequential indices instead of
uniform ones, one caption per sample mixed from GT and synthetic, a synthetic-key regex.

Several sources (``data.extra_sources``) each get their own pairs, kind, augmentation spec
and join key (``SourcePlan``); the teachers must be the same in all of them.

DataCompDR tars are read in either embedding layout: ``text_emb`` [1 + k, D] (GT, then the
captions of the first ``syn_text*`` key; v1) or ``text_emb`` [1, D] plus ``<syn key>_emb``
[k, D] per synthetic key (what Apple's generator writes and its v2 trainer reads, e.g.
``syn_text_emb``, ``syn_text_dfn_mscoco38k_emb``); ``syn_text_emb_<suffix>`` (this project's
export) is read too. The ``json`` member's ``sha256`` is the base image's: a base image with
other bytes is skipped (``mismatched_image``) when ``data.verify_sha256``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq

from dr_pipeline.config import AugSpec, ConfigError, JobConfig, from_dict
from dr_pipeline.corpus.readers import ShardReadError, expand_urls, shard_name
from dr_pipeline.shards import bf16
from dr_pipeline.shards.dataset import ReinforcedDataset, load_dataset_config
from dr_pipeline.shards.schema import image_col, layout_from_metadata, read_metadata, syn_col, syn_emb_col, text_col
from dr_pipeline.train.config import DataConfig

log = logging.getLogger(__name__)
PARQUET, DATACOMPDR, BASE = "parquet", "datacompdr", "base"  # BASE: data.reinforced null


@dataclass(frozen=True)
class ShardPair:
    name: str
    base_url: str
    reinf_url: str
    kind: str  # PARQUET | DATACOMPDR | BASE (no reinforcement shard: reinf_url "")
    source: int = 0  # index into DataPlan.sources (0: data.reinforced)
    visit: int = 0  # which copy of the shard within its epoch (upsampled sources)


@dataclass(frozen=True)
class TeacherInfo:
    id: str
    dim: int
    logit_scale: float


@dataclass(frozen=True)
class SourcePlan:
    """What one training source reads with (``data.reinforced`` or one of ``data.extra_sources``)."""

    kind: str
    aug: AugSpec
    join_key: str
    storage_options: dict
    captioners: tuple[str, ...] | None  # Parquet: resolved ids; DataCompDR: syn.json keys (None: all)
    upsampling_factor: float = 1.0

    @property
    def copies(self) -> int:
        """Copies per epoch at most (numbers the visits of ``sample_sequential``)."""
        return max(1, math.ceil(self.upsampling_factor))


@dataclass(frozen=True)
class DataPlan:
    pairs: tuple[ShardPair, ...]
    kind: str
    teachers: tuple[TeacherInfo, ...]  # selected, in data order
    all_teachers: tuple[TeacherInfo, ...]  # everything in the data (DataCompDR: concat order)
    captioners: tuple[str, ...] | None  # selected synthetic-caption sources (None: all)
    aug: AugSpec  # the spec the stored params were drawn with
    base_only: tuple[str, ...] = ()  # shard names without a reinforcement shard
    reinforced_only: tuple[str, ...] = ()  # reinforcement shards without a base shard
    sources: tuple[SourcePlan, ...] = ()  # per source (ShardPair.source); () : one, from the fields above
    syn_key_regex: str | None = None
    sample_sequential: bool = False
    mix_synthetic_ratio: float | None = None

    def source(self, pair: ShardPair) -> SourcePlan:
        if self.sources:
            return self.sources[pair.source]
        return SourcePlan(self.kind, self.aug, "key", {}, self.captioners)

    def selects_syn_key(self, name: str, captioners: tuple[str, ...] | None) -> bool:
        """Whether synthetic-caption key / captioner ``name`` is trained on."""
        return (captioners is None or name in captioners) and (
            self.syn_key_regex is None or re.match(self.syn_key_regex, name) is not None
        )


# --------------------------------------------------------------------------- planning


def _is_dataset_dir(url: str, so: dict) -> bool:
    if any(c in url for c in "*?[{"):
        return False
    try:
        fs, path = fsspec.core.url_to_fs(url, **so)
        return fs.isdir(path) and fs.exists(posixpath.join(path, "_markers"))
    except (ValueError, ImportError, OSError):
        return False


def _dataset_dir(url: str, so: dict) -> tuple[list[str], JobConfig | None]:
    """A dataset directory's committed shard URLs and the job that made it (None if not recorded)."""
    ds = ReinforcedDataset(url, so)
    li = ds.listing()
    committed = sorted(set(li.markers) & set(li.data))
    uncommitted = set(li.data) - set(committed)
    if uncommitted:
        log.warning("%s: %d shard file(s) without a commit marker are ignored", url, len(uncommitted))
    try:
        job, _ = load_dataset_config(ds)
    except ConfigError:
        job = None
    return [ds.shard_url(n) for n in committed], job


def _read_parquet_meta(url: str, so: dict) -> dict:
    with fsspec.open(url, "rb", **so) as f:
        return read_metadata(pq.ParquetFile(f).schema_arrow)


def _select(kind: str, have: list[str], want: tuple[str, ...] | None) -> tuple[str, ...]:
    if want is None:
        return tuple(have)
    unknown = [w for w in want if w not in have]
    if unknown:
        raise ConfigError(f"data: {kind} {unknown} not in the reinforced data (has {have})")
    return tuple(want)


def _by_name(urls: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for u in urls:
        n = shard_name(u)
        if n in out:
            raise ConfigError(f"{what}: two shards named {n!r} ({out[n]}, {u})")
        out[n] = u
    return out


def _source_pairs(cfg, so: dict) -> tuple[list[tuple[str, str, str]], str, tuple[str, ...], tuple[str, ...]]:
    """One source's (name, base url, reinforcement url) pairs, kind, base-only and reinforced-only
    names. ``cfg``: the DataConfig or a SourceConfig (reinforced, base, exclude_shards)."""
    job = None
    src = cfg.reinforced
    if src is None:  # the base corpus alone
        try:
            base_urls = expand_urls(cfg.base, so)
        except ShardReadError as e:
            raise ConfigError(f"data.base: {e}") from None
        b = _by_name(base_urls, "data.base")
        names = sorted(set(b) - set(cfg.exclude_shards))
        if not names:
            raise ConfigError(f"data.base: no shards left after exclude_shards ({len(b)} found)")
        return [(n, b[n], "") for n in names], BASE, (), ()
    if isinstance(src, str) and _is_dataset_dir(src, so):
        reinf_urls, job = _dataset_dir(src, so)
        if not reinf_urls:
            raise ConfigError(f"data.reinforced: {src} holds no committed shards yet")
    else:
        try:
            reinf_urls = expand_urls(src, so)
        except ShardReadError as e:
            raise ConfigError(f"data.reinforced: {e}") from None
    kinds = {PARQUET if u.endswith(".parquet") else DATACOMPDR for u in reinf_urls}
    if len(kinds) != 1:
        raise ConfigError("data.reinforced mixes Parquet and tar shards; use one kind per run")
    kind = kinds.pop()

    base = cfg.base
    base_so = so
    if base is None:
        if job is None:
            raise ConfigError("data.base is required unless data.reinforced is a dataset directory with job.yaml")
        base = job.input.urls
        # the job's options without its redacted secrets, under the caller's: the caller's credentials apply
        base_so = {**job.input.storage_options, **so}
    try:
        base_urls = expand_urls(base, base_so)
    except ShardReadError as e:
        raise ConfigError(f"data.base: {e}") from None

    b, r = _by_name(base_urls, "data.base"), _by_name(reinf_urls, "data.reinforced")
    names = sorted((set(b) & set(r)) - set(cfg.exclude_shards))
    if not names:
        raise ConfigError(
            f"no shard name is in both data.base ({len(b)} shards) and data.reinforced "
            f"({len(r)} shards) after exclude_shards"
        )
    return ([(n, b[n], r[n]) for n in names], kind, tuple(sorted(set(b) - set(r))), tuple(sorted(set(r) - set(b))))


def _source_layout(
    cfg: DataConfig, kind: str, first_reinf_url: str, so: dict
) -> tuple[tuple[TeacherInfo, ...], AugSpec, tuple[str, ...] | None]:
    """A source's teachers (all, in data order), augmentation spec and captioners."""
    if kind == BASE:  # fresh views drawn with foreign_aug's spec; no teachers, no captioners
        return (), cfg.foreign_aug, None
    if kind == PARQUET:
        meta = _read_parquet_meta(first_reinf_url, so)
        all_t = tuple(TeacherInfo(t["id"], int(t["dim"]), float(t.get("logit_scale", 100.0))) for t in meta["teachers"])
        caps = [c["id"] for c in meta["captioners"]]
        aug = from_dict(AugSpec, {k: v for k, v in meta["aug"].items()}, "shard metadata aug")
        captioners: tuple[str, ...] | None = _select("captioners", caps, cfg.captioners)
        if cfg.syn_key_regex is not None:
            captioners = tuple(c for c in captioners if re.match(cfg.syn_key_regex, c))
            if not captioners:
                raise ConfigError(f"data.syn_key_regex {cfg.syn_key_regex!r} matches none of the captioners {caps}")
    else:
        if not cfg.foreign_teachers:
            raise ConfigError(
                "data.foreign_teachers is required for DataCompDR tars: they concatenate the "
                "teachers along D, so list each teacher's id and dim in that order"
            )
        all_t = tuple(TeacherInfo(t.id, t.dim, t.logit_scale) for t in cfg.foreign_teachers)
        aug = cfg.foreign_aug
        captioners = cfg.captioners  # syn.json keys; checked per sample (with syn_key_regex)
    return all_t, aug, captioners


def plan_data(cfg: DataConfig) -> DataPlan:
    """Pair base and reinforcement shards of every source and read the teacher / captioner layout."""
    so = dict(cfg.storage_options)
    sources = [(cfg, so, cfg.join_key, cfg.upsampling_factor)]
    for extra in cfg.extra_sources:
        sources.append(
            (
                extra,
                dict(extra.storage_options if extra.storage_options is not None else so),
                extra.join_key or cfg.join_key,
                extra.upsampling_factor,
            )
        )
    pairs: list[ShardPair] = []
    plans: list[SourcePlan] = []
    for i, (src_cfg, src_so, join_key, factor) in enumerate(sources):
        named, kind, base_only, reinforced_only = _source_pairs(src_cfg, src_so)
        all_t, aug, captioners = _source_layout(cfg, kind, named[0][2], src_so)
        if i == 0:
            first = (kind, aug, captioners, all_t, base_only, reinforced_only)
            chosen = _select("teachers", [t.id for t in all_t], cfg.teachers)
            teachers = tuple(t for t in all_t if t.id in chosen)
        else:
            have = {t.id: t.dim for t in all_t}
            bad = [t.id for t in teachers if have.get(t.id) != t.dim]
            if bad:
                raise ConfigError(
                    f"data.extra_sources[{i - 1}]: teachers {bad} missing or of another dim "
                    f"(has {have}); every source needs the trained teachers"
                )
        pairs += [ShardPair(n, b, r, kind, source=i) for n, b, r in named]
        plans.append(SourcePlan(kind, aug, join_key, src_so, captioners, factor))
    kind, aug, captioners, all_t, base_only, reinforced_only = first
    return DataPlan(
        pairs=tuple(pairs),
        kind=kind,
        teachers=teachers,
        all_teachers=all_t,
        captioners=captioners,
        aug=aug,
        base_only=base_only,
        reinforced_only=reinforced_only,
        sources=tuple(plans),
        syn_key_regex=cfg.syn_key_regex,
        sample_sequential=cfg.sample_sequential,
        mix_synthetic_ratio=cfg.mix_synthetic_ratio,
    )


# --------------------------------------------------------------------------- per-sample choice


def choose(seed: int, epoch: int, key: str, n: int, what: str, visit: int = 0) -> int:
    """Uniform index in [0, n) from (seed, epoch, key, what) -- and the shard's copy ``visit``
    within the epoch when it is > 0; independent of order and worker."""
    if n <= 0:
        return -1
    ep = f"{int(epoch)}.{int(visit)}" if visit else str(int(epoch))
    h = hashlib.blake2b(f"{int(seed)}|{ep}|{what}|{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "little") * n) >> 64


@dataclass(frozen=True)
class Chooser:
    """The per-sample draws of one visit of one shard: augmentation, synthetic caption and,
    with ``mix_ratio``, whether the sample trains on its synthetic caption instead of the GT.
    Uniform hashed draws by default; ``sequential`` (Apple's ``sample_sequential``): the v-th
    visit takes index ``v % n`` (the synthetic-caption key is still drawn uniformly)."""

    seed: int
    epoch: int
    visit: int = 0
    copies: int = 1
    sequential: bool = False
    mix_ratio: float | None = None

    @property
    def v(self) -> int:
        return self.epoch * self.copies + self.visit

    def aug(self, key: str, n: int) -> int:
        if self.sequential:
            return self.v % n if n > 0 else -1
        return choose(self.seed, self.epoch, key, n, "aug", self.visit)

    def syn(self, key: str, sizes: list[int]) -> int:
        """Index into the pooled captions of keys with ``sizes`` captions each (-1: none)."""
        total = sum(sizes)
        if not self.sequential or total == 0:
            return choose(self.seed, self.epoch, key, total, "syn", self.visit)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        keys = [i for i, n in enumerate(sizes) if n > 0]
        p = keys[choose(self.seed, self.epoch, key, len(keys), "synkey", self.visit)]
        return offsets[p] + self.v % sizes[p]

    def mixed(self, key: str) -> bool:
        """Train on the synthetic caption in place of the GT one (``mix_synthetic_ratio``)."""
        if self.mix_ratio is None:
            return False
        return choose(self.seed, self.epoch, key, 1 << 30, "mix", self.visit) < self.mix_ratio * (1 << 30)


@dataclass
class Entry:
    """What one sample trains on this epoch (or why it cannot be used)."""

    key: str
    aug_index: int = -1
    aug: object = None  # Parquet: uint16 [8] packed params; DataCompDR: the raw entry
    syn_index: int = -1  # index into the pooled synthetic captions; -1: none (GT reused)
    syn_caption: str | None = None
    emb: dict[str, np.ndarray] = field(default_factory=dict)  # teacher -> float32 [3, D]: image, gt, syn
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    caption: str | None = None  # GT caption the teachers embedded (Parquet)
    mixed: bool = False  # mix_synthetic_ratio: the synthetic caption replaces the GT one
    error: str | None = None


@dataclass
class ShardIndex:
    entries: dict[str, Entry | Pending]  # join key -> entry, in shard order (Pending: lazy=True)
    error: str | None = None  # the shard (or its tail) could not be read
    base_only: bool = False  # no reinforcement shard: every base record trains on its own caption

    def get(self, key: str) -> Entry | None:
        """The entry of ``key``, built now if it is still pending."""
        if self.base_only:
            return Entry(key=key)
        e = self.entries.get(key)
        if isinstance(e, Pending):
            e = self.entries[key] = e.make()
        return e


@dataclass
class Pending:
    """A Parquet row whose Entry is built on first use (``load_index(lazy=True)``): a loader
    worker reads every row of its shards but trains on its own chunks only."""

    key: str
    make: Callable[[], Entry]


def load_index(
    pair: ShardPair,
    plan: DataPlan,
    seed: int,
    epoch: int,
    join_key: str,
    storage_options: dict | None = None,
    lazy: bool = False,
) -> ShardIndex:
    """``lazy``: Parquet rows stay ``Pending`` until ``ShardIndex.get`` (the same entries)."""
    if pair.kind == BASE:
        return ShardIndex({}, base_only=True)
    so = storage_options or {}
    entries: dict[str, Entry | Pending] = {}
    src = plan.source(pair)
    ch = Chooser(seed, epoch, pair.visit, src.copies, plan.sample_sequential, plan.mix_synthetic_ratio)
    try:
        if pair.kind == PARQUET:
            rows = _parquet_entries(pair.reinf_url, so, plan, src, ch, join_key, lazy)
        else:
            rows = _datacompdr_entries(pair.reinf_url, so, plan, src, ch, join_key)
        for e in rows:
            if e.key in entries:  # ambiguous: never guess which row is right
                entries[e.key] = Entry(key=e.key, error="duplicate_reinforcement_key")
                continue
            entries[e.key] = e
    except _ShardError as e:
        return ShardIndex(entries, str(e))
    except Exception as e:  # noqa: BLE001 - a bad foreign file must not kill the loader
        log.warning(
            "%s: reinforcement shard unreadable after %d rows: %s: %s",
            pair.reinf_url,
            len(entries),
            type(e).__name__,
            e,
        )
        return ShardIndex(entries, "reinforcement_unreadable")
    return ShardIndex(entries)


class _ShardError(Exception):
    """Every row of the shard is unusable; the message is the counted reason."""


def _parquet_entries(
    url: str, so: dict, plan: DataPlan, src: SourcePlan, ch: Chooser, join_key: str, lazy: bool = False
) -> Iterator[Entry | Pending]:
    with fsspec.open(url, "rb", **so) as f:
        pf = pq.ParquetFile(f)
        meta = read_metadata(pf.schema_arrow)
        layout = layout_from_metadata(meta)
        dims = {t.id: t.dim for t in layout.teachers}
        for t in plan.teachers:
            if t.id not in dims:
                raise _ShardError("missing_teacher")
            if dims[t.id] != t.dim:
                raise _ShardError("mismatched_teacher_dim")
        caps = [c for c in (src.captioners or ()) if c in layout.captioners]
        if len(caps) != len(src.captioners or ()):
            raise _ShardError("missing_captioner")
        n_aug = layout.n_aug
        cols = ["key", "uid", "width", "height", "image_sha256", "caption", "aug_params"]
        cols += [syn_col(c) for c in caps]
        for t in plan.teachers:
            cols += [image_col(t.id, n_aug, t.dim), text_col(t.id, t.dim)]
            cols += [syn_emb_col(t.id, c, t.dim) for c in caps]
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            yield from _parquet_batch(batch, caps, plan, n_aug, ch, join_key, lazy)


def _parquet_batch(batch, caps, plan, n_aug, ch: Chooser, join_key, lazy: bool = False) -> Iterator[Entry | Pending]:
    n = batch.num_rows
    col = batch.column
    keys, uids = col("key").to_pylist(), col("uid").to_pylist()
    widths, heights = col("width").to_pylist(), col("height").to_pylist()
    shas, captions = col("image_sha256").to_pylist(), col("caption").to_pylist()
    aug = bf16.fsl_to_numpy(col("aug_params")).reshape(n, n_aug, 8)
    syn = {c: col(syn_col(c)).to_pylist() for c in caps}
    img, txt, syn_emb = {}, {}, {}
    for t in plan.teachers:
        img[t.id] = bf16.fsl_to_numpy(col(image_col(t.id, n_aug, t.dim))).reshape(n, n_aug, t.dim)
        txt[t.id] = bf16.fsl_to_numpy(col(text_col(t.id, t.dim)))
        syn_emb[t.id] = {c: bf16.list_of_fsl_to_numpy(col(syn_emb_col(t.id, c, t.dim))) for c in caps}

    def row(i: int) -> Entry:
        e = Entry(
            key=str(keys[i] if join_key == "key" else uids[i]),
            width=widths[i],
            height=heights[i],
            sha256=shas[i],
            caption=captions[i],
        )
        pool = [(c, j) for c in caps for j in range(len(syn[c][i]))]
        if any(len(syn_emb[t.id][c][i]) != len(syn[c][i]) for t in plan.teachers for c in caps):
            e.error = "mismatched_syn_count"
            return e
        e.aug_index = ch.aug(e.key, n_aug)
        e.aug = aug[i, e.aug_index].copy()
        e.syn_index = ch.syn(e.key, [len(syn[c][i]) for c in caps])
        if e.syn_index >= 0:
            c, j = pool[e.syn_index]
            e.syn_caption = syn[c][i][j]
        e.mixed = e.syn_index >= 0 and ch.mixed(e.key)
        for t in plan.teachers:
            s = syn_emb[t.id][c][i][j] if e.syn_index >= 0 else txt[t.id][i]
            e.emb[t.id] = bf16.bits_to_f32(np.stack([img[t.id][i, e.aug_index], s if e.mixed else txt[t.id][i], s]))
        return e

    for i in range(n):
        key = keys[i] if join_key == "key" else uids[i]
        if key is None:
            yield Entry(
                key=f"<row without {join_key}>",
                width=widths[i],
                height=heights[i],
                sha256=shas[i],
                caption=captions[i],
                error="no_join_key",
            )
        else:
            yield Pending(str(key), functools.partial(row, i)) if lazy else row(i)


def _datacompdr_entries(
    url: str, so: dict, plan: DataPlan, src: SourcePlan, ch: Chooser, join_key: str
) -> Iterator[Entry]:
    from dr_pipeline.shards.datacompdr import iter_datacompdr_tar, member_limit

    offsets, o = {}, 0
    for t in plan.all_teachers:
        offsets[t.id] = (o, o + t.dim)
        o += t.dim
    total = o
    for rec in iter_datacompdr_tar(url, so, member_limit(total)):  # bounded inflation (issue 18)
        yield _datacompdr_entry(rec, plan, src, offsets, total, ch, join_key)


def _syn_pools(
    rec: dict, plan: DataPlan, src: SourcePlan, text_emb: np.ndarray, total: int
) -> tuple[list[tuple[list[str], np.ndarray]], str | None]:
    """(texts, embeddings [k, ΣD]) per selected synthetic-caption key of a DataCompDR sample,
    in syn.json order, or an error reason. Embeddings: ``<key>_emb`` (per-key layout), else
    ``text_emb`` rows 1.. for the first ``syn_text*`` key (v1), else ``syn_text_emb_<suffix>``."""
    syn = rec.get("syn", {})
    primary = next((k for k in syn if k.startswith("syn_text")), None)
    if text_emb.shape[0] != 1 and (primary is None or text_emb.shape[0] != 1 + len(syn[primary] or [])):
        return [], "mismatched_syn_count"
    pools: list[tuple[list[str], np.ndarray]] = []
    for name, texts in syn.items():
        if not name.startswith("syn_text"):
            continue
        if not plan.selects_syn_key(name, src.captioners):
            continue
        texts = list(texts or [])
        if name == primary and text_emb.shape[0] > 1:  # v1: as Apple's v2 trainer, rows first
            arr = text_emb[1:]
        else:
            arr = rec.get(f"{name}_emb")
            if arr is None and name != primary:
                arr = rec.get(f"syn_text_emb_{name[len('syn_text_') :]}")
        if arr is None:
            if texts:
                return [], "missing_syn_emb"
            continue
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.shape != (len(texts), total):
            return [], "mismatched_syn_count"
        pools.append((texts, arr))
    return pools, None


def _datacompdr_entry(
    rec: dict, plan: DataPlan, src: SourcePlan, offsets: dict, total: int, ch: Chooser, join_key: str
) -> Entry:
    key = rec["key"] if join_key == "key" else rec.get("json", {}).get("uid")
    e = Entry(key=str(key if key is not None else f"<{rec['key']} without uid>"))
    sha = rec.get("json", {}).get("sha256")
    e.sha256 = sha if isinstance(sha, str) and sha else None
    if key is None:
        e.error = "no_join_key"
        return e
    image_emb, text_emb, paug = rec.get("image_emb"), rec.get("text_emb"), rec.get("param_aug")
    if image_emb is None or text_emb is None or paug is None:
        e.error = rec.get("rejected") or "incomplete_reinforcement"  # too_large: a bounded-inflation refusal
        return e
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != total or text_emb.shape[1] != total:
        e.error = "mismatched_teacher_dim"
        return e
    if len(paug) != image_emb.shape[0] or not len(paug):
        e.error = "mismatched_aug_count"
        return e
    pools, error = _syn_pools(rec, plan, src, text_emb, total)
    if error:
        e.error = error
        return e
    e.aug_index = ch.aug(e.key, len(paug))
    e.aug = paug[e.aug_index]
    e.syn_index = ch.syn(e.key, [len(texts) for texts, _ in pools])
    pool = [(p, j) for p in range(len(pools)) for j in range(len(pools[p][0]))]
    if e.syn_index >= 0:
        p, j = pool[e.syn_index]
        e.syn_caption = str(pools[p][0][j])
        syn_row = pools[p][1][j]
    else:
        syn_row = text_emb[0]
    e.mixed = e.syn_index >= 0 and ch.mixed(e.key)
    gt_row = syn_row if e.mixed else text_emb[0]
    for t in plan.teachers:
        a, b = offsets[t.id]
        e.emb[t.id] = np.stack([image_emb[e.aug_index, a:b], gt_row[a:b], syn_row[a:b]]).astype(np.float32)
    return e
