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
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq
import yaml

from dr_pipeline.config import AugSpec, ConfigError, from_dict
from dr_pipeline.corpus.readers import ShardReadError, expand_urls, shard_name
from dr_pipeline.shards import bf16
from dr_pipeline.shards.schema import (image_col, layout_from_metadata, read_metadata, syn_col, syn_emb_col,
                                       text_col)
from dr_pipeline.train.config import DataConfig

log = logging.getLogger(__name__)
PARQUET, DATACOMPDR = "parquet", "datacompdr"


@dataclass(frozen=True)
class ShardPair:
    name: str
    base_url: str
    reinf_url: str
    kind: str                      # PARQUET | DATACOMPDR


@dataclass(frozen=True)
class TeacherInfo:
    id: str
    dim: int
    logit_scale: float


@dataclass(frozen=True)
class DataPlan:
    pairs: tuple[ShardPair, ...]
    kind: str
    teachers: tuple[TeacherInfo, ...]         # selected, in data order
    all_teachers: tuple[TeacherInfo, ...]     # everything in the data (DataCompDR: concat order)
    captioners: tuple[str, ...] | None        # selected synthetic-caption sources (None: all)
    aug: AugSpec                              # the spec the stored params were drawn with
    base_only: tuple[str, ...] = ()           # shard names without a reinforcement shard
    reinforced_only: tuple[str, ...] = ()     # reinforcement shards without a base shard


# --------------------------------------------------------------------------- planning

def _is_dataset_dir(url: str, so: dict) -> bool:
    if any(c in url for c in "*?[{"):
        return False
    try:
        fs, path = fsspec.core.url_to_fs(url, **so)
        return fs.isdir(path) and fs.exists(posixpath.join(path, "_markers"))
    except (ValueError, ImportError, OSError):
        return False


def _dataset_dir(url: str, so: dict) -> tuple[list[str], dict | None]:
    from dr_pipeline.execute.dataset_dir import DatasetDir

    ds = DatasetDir(url, so)
    committed = sorted(set(ds.markers()) & set(ds.data_files()))
    uncommitted = sorted(set(ds.data_files()) - set(committed))
    if uncommitted:
        log.warning("%s: %d shard file(s) without a commit marker are ignored", url, len(uncommitted))
    text = ds.read_text("job.yaml")
    return [ds.shard_url(n) for n in committed], (yaml.safe_load(text) if text else None)


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


def make_plan(cfg: DataConfig) -> DataPlan:
    """Pair base and reinforcement shards and read the teacher / captioner layout."""
    so = dict(cfg.storage_options)
    job = None
    src = cfg.reinforced
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
        base = job["input"]["urls"]
        base_so = job["input"].get("storage_options") or so
    try:
        base_urls = expand_urls(base, base_so)
    except ShardReadError as e:
        raise ConfigError(f"data.base: {e}") from None

    def by_name(urls: list[str], what: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for u in urls:
            n = shard_name(u)
            if n in out:
                raise ConfigError(f"{what}: two shards named {n!r} ({out[n]}, {u})")
            out[n] = u
        return out

    b, r = by_name(base_urls, "data.base"), by_name(reinf_urls, "data.reinforced")
    names = sorted((set(b) & set(r)) - set(cfg.exclude_shards))
    if not names:
        raise ConfigError(f"no shard name is in both data.base ({len(b)} shards) and data.reinforced "
                          f"({len(r)} shards) after exclude_shards")
    pairs = tuple(ShardPair(n, b[n], r[n], kind) for n in names)

    if kind == PARQUET:
        meta = _read_parquet_meta(pairs[0].reinf_url, so)
        all_t = tuple(TeacherInfo(t["id"], int(t["dim"]), float(t.get("logit_scale", 100.0)))
                      for t in meta["teachers"])
        caps = [c["id"] for c in meta["captioners"]]
        aug = from_dict(AugSpec, {k: v for k, v in meta["aug"].items()}, "shard metadata aug")
        captioners: tuple[str, ...] | None = _select("captioners", caps, cfg.captioners)
    else:
        if not cfg.foreign_teachers:
            raise ConfigError("data.foreign_teachers is required for DataCompDR tars: they concatenate the "
                              "teachers along D, so list each teacher's id and dim in that order")
        all_t = tuple(TeacherInfo(t.id, t.dim, t.logit_scale) for t in cfg.foreign_teachers)
        aug = cfg.foreign_aug
        captioners = cfg.captioners        # syn.json keys; checked per sample
    chosen = _select("teachers", [t.id for t in all_t], cfg.teachers)
    teachers = tuple(t for t in all_t if t.id in chosen)
    return DataPlan(pairs=pairs, kind=kind, teachers=teachers, all_teachers=all_t, captioners=captioners,
                    aug=aug, base_only=tuple(sorted(set(b) - set(r))),
                    reinforced_only=tuple(sorted(set(r) - set(b))))


# --------------------------------------------------------------------------- per-sample choice

def choose(seed: int, epoch: int, key: str, n: int, what: str) -> int:
    """Uniform index in [0, n) from (seed, epoch, key, what); independent of order and worker."""
    if n <= 0:
        return -1
    h = hashlib.blake2b(f"{int(seed)}|{int(epoch)}|{what}|{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "little") * n) >> 64


@dataclass
class Entry:
    """What one sample trains on this epoch (or why it cannot be used)."""
    key: str
    aug_index: int = -1
    aug: object = None                  # Parquet: uint16 [8] packed params; DataCompDR: the raw entry
    syn_index: int = -1                 # index into the pooled synthetic captions; -1: none (GT reused)
    syn_caption: str | None = None
    emb: dict[str, np.ndarray] = field(default_factory=dict)   # teacher -> float32 [3, D]: image, gt, syn
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    caption: str | None = None          # GT caption the teachers embedded (Parquet)
    error: str | None = None


@dataclass
class ShardIndex:
    entries: dict[str, Entry]           # join key -> entry, in shard order
    error: str | None = None            # the shard (or its tail) could not be read


def _to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exactly."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def load_index(pair: ShardPair, plan: DataPlan, seed: int, epoch: int, join_key: str,
               storage_options: dict | None = None) -> ShardIndex:
    so = storage_options or {}
    entries: dict[str, Entry] = {}
    try:
        reader = _parquet_entries if pair.kind == PARQUET else _datacompdr_entries
        for e in reader(pair.reinf_url, so, plan, seed, epoch, join_key):
            if e.key in entries:        # ambiguous: never guess which row is right
                entries[e.key].error = "duplicate_reinforcement_key"
                continue
            entries[e.key] = e
    except _ShardError as e:
        return ShardIndex(entries, str(e))
    except Exception as e:  # noqa: BLE001 - a bad foreign file must not kill the loader
        log.warning("%s: reinforcement shard unreadable after %d rows: %s: %s",
                    pair.reinf_url, len(entries), type(e).__name__, e)
        return ShardIndex(entries, "reinforcement_unreadable")
    return ShardIndex(entries)


class _ShardError(Exception):
    """Every row of the shard is unusable; the message is the counted reason."""


def _parquet_entries(url: str, so: dict, plan: DataPlan, seed: int, epoch: int,
                     join_key: str) -> Iterator[Entry]:
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
        caps = [c for c in (plan.captioners or ()) if c in layout.captioners]
        if len(caps) != len(plan.captioners or ()):
            raise _ShardError("missing_captioner")
        n_aug = layout.n_aug
        cols = ["key", "uid", "width", "height", "image_sha256", "caption", "aug_params"]
        cols += [syn_col(c) for c in caps]
        for t in plan.teachers:
            cols += [image_col(t.id, n_aug, t.dim), text_col(t.id, t.dim)]
            cols += [syn_emb_col(t.id, c, t.dim) for c in caps]
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            yield from _parquet_batch(batch, caps, plan, n_aug, seed, epoch, join_key)


def _parquet_batch(batch, caps, plan, n_aug, seed, epoch, join_key) -> Iterator[Entry]:
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
    for i in range(n):
        key = keys[i] if join_key == "key" else uids[i]
        e = Entry(key=str(key), width=widths[i], height=heights[i], sha256=shas[i], caption=captions[i])
        if key is None:
            e.key, e.error = f"<row without {join_key}>", "no_join_key"
            yield e
            continue
        pool = [(c, j) for c in caps for j in range(len(syn[c][i]))]
        if any(len(syn_emb[t.id][c][i]) != len(syn[c][i]) for t in plan.teachers for c in caps):
            e.error = "mismatched_syn_count"
            yield e
            continue
        e.aug_index = choose(seed, epoch, e.key, n_aug, "aug")
        e.aug = aug[i, e.aug_index].copy()
        e.syn_index = choose(seed, epoch, e.key, len(pool), "syn")
        if e.syn_index >= 0:
            c, j = pool[e.syn_index]
            e.syn_caption = syn[c][i][j]
        for t in plan.teachers:
            s = syn_emb[t.id][c][i][j] if e.syn_index >= 0 else txt[t.id][i]
            e.emb[t.id] = _to_f32(np.stack([img[t.id][i, e.aug_index], txt[t.id][i], s]))
        yield e


def _datacompdr_entries(url: str, so: dict, plan: DataPlan, seed: int, epoch: int,
                        join_key: str) -> Iterator[Entry]:
    from dr_pipeline.shards.datacompdr import iter_datacompdr_tar

    offsets, o = {}, 0
    for t in plan.all_teachers:
        offsets[t.id] = (o, o + t.dim)
        o += t.dim
    total = o
    for rec in iter_datacompdr_tar(url, so):
        yield _datacompdr_entry(rec, plan, offsets, total, seed, epoch, join_key)


def _datacompdr_entry(rec: dict, plan: DataPlan, offsets: dict, total: int, seed: int, epoch: int,
                      join_key: str) -> Entry:
    key = rec["key"] if join_key == "key" else rec.get("json", {}).get("uid")
    e = Entry(key=str(key if key is not None else f"<{rec['key']} without uid>"))
    if key is None:
        e.error = "no_join_key"
        return e
    image_emb, text_emb, paug = rec.get("image_emb"), rec.get("text_emb"), rec.get("param_aug")
    if image_emb is None or text_emb is None or paug is None:
        e.error = "incomplete_reinforcement"
        return e
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != total or text_emb.shape[1] != total:
        e.error = "mismatched_teacher_dim"
        return e
    if len(paug) != image_emb.shape[0] or not len(paug):
        e.error = "mismatched_aug_count"
        return e
    syn = rec.get("syn", {})
    primary = next((k for k in syn if k.startswith("syn_text")), None)
    pools: list[tuple[list[str], np.ndarray]] = []
    if primary is not None:
        texts = rec.get("syn_text") or []
        if text_emb.shape[0] != 1 + len(texts):
            e.error = "mismatched_syn_count"
            return e
        if plan.captioners is None or primary in plan.captioners:
            pools.append((texts, text_emb[1:]))
    for name, texts in syn.items():
        arr = rec.get(f"syn_text_emb_{name[len('syn_text_'):]}") if name != primary else None
        if arr is None or not (plan.captioners is None or name in plan.captioners):
            continue
        if arr.ndim != 2 or arr.shape != (len(texts), total):
            e.error = "mismatched_syn_count"
            return e
        pools.append((texts, arr))
    pool = [(p, j) for p in range(len(pools)) for j in range(len(pools[p][0]))]
    e.aug_index = choose(seed, epoch, e.key, len(paug), "aug")
    e.aug = paug[e.aug_index]
    e.syn_index = choose(seed, epoch, e.key, len(pool), "syn")
    if e.syn_index >= 0:
        p, j = pool[e.syn_index]
        e.syn_caption = str(pools[p][0][j])
        syn_row = pools[p][1][j]
    else:
        syn_row = text_emb[0]
    for t in plan.teachers:
        a, b = offsets[t.id]
        e.emb[t.id] = np.stack([image_emb[e.aug_index, a:b], text_emb[0, a:b], syn_row[a:b]]).astype(np.float32)
    return e
