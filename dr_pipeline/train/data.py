"""The training loader: base shards joined with reinforcement shards, augmentation replayed.

Per sample (docs/reference.md#training-sample): the augmentation index drawn uniformly
from (seed, epoch, key), that stored augmentation replayed at the student resolution, the
GT caption, one synthetic caption drawn uniformly, and every selected teacher's embeddings
of exactly that view and those captions (``sources.load_index``).

**Order and sharding.** Each rank reads a list of shards per epoch: a seeded permutation,
``shards[rank::world]`` when there are at least as many shards as ranks, otherwise every
shard with its records striped across ranks (record j of a shard belongs to rank j % world);
in resampled mode each rank draws its shards with replacement from (seed, epoch, rank).
Upsampled sources (``upsampling_factor`` f) put each of their shards floor(f) times in an
epoch's list, plus once more with probability f - floor(f); in resampled mode f weighs the
draw. Each copy of a shard in an epoch is a *visit* with its own augmentation / caption draws.
Every record of the rank's shards is a *slot*, addressed by (epoch, shard index, record
index). Slots are cut into chunks of ``data.worker_chunk``, dealt round-robin to the loader
workers; a worker decodes its chunks and ships each collated, and yields exactly one item
per chunk -- samples and counted skips alike -- so the in-order DataLoader returns the
rank's slots in sequence whatever the worker count. Consequences: no worker or rank can run
dry while another has data (no DDP hang when shards < ranks × workers); the batches do not
depend on the worker count; and a resumed run restarts exactly at the slot after the last
sample of its last step, reading nothing before that shard. The price: every worker reads
the bytes of all its rank's shards (it decodes only its own chunks).

**Image cache** (``data.cache_images``, for datasets that fit in memory). Every base shard
of the plan is read once, its images hashed and decoded, and kept in memory (``ImageCache``)
before the loader workers start; the forked workers share it copy-on-write. Epochs then
replay the stored augmentations from the decoded images without reading or decoding a byte
of the base corpus again; the samples are identical to the uncached ones.

**Fresh augmentation** (``data.augmentation: fresh``, for baselines). Instead of replaying a
stored augmentation, each visit of a sample draws new RandomResizedCrop + RandAugment params
with the source's augmentation spec (the one the reinforcement drew the stored params with)
and the same sampler, ``augment.sample_params``, keyed by (seed, epoch, visit, join key)
(``fresh_seed``) and replayed with the same ``augment.replay``: a pure function of the slot,
so the batches still do not depend on the worker count and a resumed run is still exact.
No stored view is used, so the samples carry no teacher embeddings (``teachers`` is empty,
``aug_index`` -1); the GT and synthetic captions are drawn as in stored mode.
``data.augmentation: center`` shows every visit the centre view instead (no augmentation);
with ``cache_images`` each image's view is computed once and kept with the decoded image.

**Base corpus alone** (``data.reinforced: null``). The shards are the base shards, every
record trains on its own caption (GT and "synthetic" slots both hold it), with fresh or
centre views: plain CLIP training on a corpus, as ``dr bootstrap`` trains the synthetic
domain's teachers.

**Skips.** A base record without a reinforcement row, a row whose image bytes, size or
caption do not match, a row with inconsistent counts, an undecodable image or a
reinforcement row without a base record is never trained on and never shifts the pairing;
each is counted by reason in ``TrainStream.skipped``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from dr_pipeline import augment
from dr_pipeline.corpus.readers import Rejected, Sample, ShardReadError, clean_caption, iter_shard
from dr_pipeline.images import ImageRejected, decode_image
from dr_pipeline.train.config import DataConfig
from dr_pipeline.train.sources import DATACOMPDR, DataPlan, Entry, ShardIndex, ShardPair, load_index
from dr_pipeline.train.students import tokenize

log = logging.getLogger(__name__)
Item = dict[str, Any]


@dataclass(frozen=True)
class StreamState:
    """Where a rank's stream stands: the next slot to read is (epoch, shard, record)."""

    epoch: int = 0
    shard: int = 0
    record: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.shard, self.record]


def _numbered(pairs: list[ShardPair]) -> list[ShardPair]:
    """Each repeat of a shard in the list becomes its next visit (fresh per-sample draws)."""
    seen: Counter[tuple[int, str]] = Counter()
    out = []
    for p in pairs:
        v = seen[(p.source, p.name)]
        seen[(p.source, p.name)] += 1
        out.append(dataclasses.replace(p, visit=v) if v else p)
    return out


def epoch_visits(plan: DataPlan, seed: int, epoch: int) -> list[ShardPair]:
    """The epoch's shard visits before the rank split: with upsampling factor f a shard comes
    floor(f) times plus once more with probability f - floor(f), drawn from (seed, epoch)."""
    factors = [plan.source(p).upsampling_factor for p in plan.pairs]
    if all(f == 1.0 for f in factors):
        return list(plan.pairs)
    rng = np.random.default_rng([seed, epoch, 0xF00D])
    out: list[ShardPair] = []
    for p, f in zip(plan.pairs, factors):
        out += [p] * (math.floor(f) + int(rng.random() < f - math.floor(f)))
    return _numbered(out)


def rank_shards(
    plan: DataPlan, cfg: DataConfig, seed: int, epoch: int, rank: int, world: int
) -> tuple[list[ShardPair], bool]:
    """The rank's shards for ``epoch`` and whether their records are striped across ranks."""
    if cfg.resampled:
        pairs = list(plan.pairs)
        rng = np.random.default_rng([seed, epoch, rank, 0x5EED])
        w = np.array([plan.source(p).upsampling_factor for p in pairs])
        if np.all(w == w[0]):
            n = max(1, math.ceil(len(pairs) / world))
            drawn = rng.integers(0, len(pairs), size=n)
        else:
            n = max(1, math.ceil(w.sum() / world))
            drawn = rng.choice(len(pairs), size=n, p=w / w.sum())
        return _numbered([pairs[i] for i in drawn]), False
    pairs = epoch_visits(plan, seed, epoch)
    if cfg.shuffle_shards:
        order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
    if len(pairs) >= world:
        return pairs[rank::world], False
    return pairs, True


@dataclass
class Decoded:
    """A base image decoded once (``ImageCache``): the image (None: undecodable) and the sha256
    of its stored bytes."""

    image: Image.Image | None
    sha256: str
    views: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # size -> centre view (memo)


class ImageCache:
    """The base records of every shard, images decoded (``data.cache_images``): url -> (records
    with their ``Decoded`` and without their bytes, the read error that ended the shard); and
    the tokens of every caption seen (one context length per loader)."""

    def __init__(self) -> None:
        self.shards: dict[str, tuple[list[tuple[Sample | Rejected, Decoded | None]], ShardReadError | None]] = {}
        self.tokens: dict[str, torch.Tensor] = {}  # caption -> [ctx] tokens, filled by each worker

    def fill(self, plan: DataPlan) -> ImageCache:
        for pair in plan.pairs:
            self.shard(pair.base_url, plan.source(pair).storage_options)
        return self

    def shard(self, url: str, so: dict) -> tuple[list[tuple[Sample | Rejected, Decoded | None]], ShardReadError | None]:
        if url not in self.shards:
            recs: list[tuple[Sample | Rejected, Decoded | None]] = []
            error = None
            try:
                for rec in iter_shard(url, so):
                    if isinstance(rec, Rejected):
                        recs.append((rec, None))
                        continue
                    try:
                        img: Image.Image | None = decode_image(rec.image)
                    except ImageRejected:
                        img = None
                    recs.append(
                        (dataclasses.replace(rec, image=None), Decoded(img, hashlib.sha256(rec.image).hexdigest()))
                    )
            except ShardReadError as e:
                error = e
            self.shards[url] = (recs, error)
        return self.shards[url]

    def records(self, url: str, so: dict) -> Iterator[tuple[Sample | Rejected, Decoded | None]]:
        """The shard's records as ``iter_shard`` gave them, the same error at the same place."""
        recs, error = self.shard(url, so)
        yield from recs
        if error is not None:
            raise error


class JoinedDataset(IterableDataset):
    """A rank's slot stream from ``start`` on, epoch after epoch (``epochs``: how many; None:
    endless), in *chunks*: runs of ``data.worker_chunk`` consecutive slots, dealt round-robin
    to the loader workers. A worker decodes its chunks and ships each one collated (a few
    tensors per chunk, not per sample); an epoch's last chunk may be shorter. Each worker
    ends every epoch with one ``{"epoch_end": e}`` marker. As every chunk and marker is one
    item of exactly one worker, in the order the in-order DataLoader fetches them, the
    flattened stream (``unchunk``) is the rank's slots in sequence for any worker count."""

    def __init__(
        self,
        plan: DataPlan,
        cfg: DataConfig,
        seed: int,
        image_size: int,
        context_length: int,
        rank: int = 0,
        world: int = 1,
        start: StreamState = StreamState(),
        epochs: int | None = None,
        cache: ImageCache | None = None,
    ):
        super().__init__()
        self.plan, self.cfg, self.seed = plan, cfg, seed
        self.image_size, self.context_length = image_size, context_length
        self.rank, self.world, self.start, self.epochs = rank, world, start, epochs
        # cache_images: a prefilled cache (TrainStream) or one filled shard by shard in this process
        self.cache = cache if cache is not None else (ImageCache() if cfg.cache_images else None)

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        size = self.cfg.worker_chunk
        chunk, filled, mine = 0, 0, []  # chunks since `start`; slots in the open one
        epoch = self.start.epoch
        while self.epochs is None or epoch < self.start.epoch + self.epochs:
            shards, striped = rank_shards(self.plan, self.cfg, self.seed, epoch, self.rank, self.world)
            first_shard = self.start.shard if epoch == self.start.epoch else 0
            for s in range(first_shard, len(shards)):
                first = self.start.record if (epoch, s) == (self.start.epoch, self.start.shard) else 0
                for j, make in self._slots(shards[s], epoch, first):
                    if striped and j % self.world != self.rank:
                        continue
                    if chunk % nw == wid:
                        item = make()
                        item["pos"] = (epoch, s, j)
                        mine.append(item)
                    filled += 1
                    if filled == size:
                        if chunk % nw == wid:
                            yield _pack(mine)
                        chunk, filled, mine = chunk + 1, 0, []
            if filled:  # close the epoch's last, shorter chunk
                if chunk % nw == wid:
                    yield _pack(mine)
                chunk, filled, mine = chunk + 1, 0, []
            yield {"epoch_end": epoch}
            epoch += 1

    # ------------------------------------------------------------------ slots of one shard
    def _slots(self, pair: ShardPair, epoch: int, first: int) -> Iterator[tuple[int, Any]]:
        """(record index, thunk -> item) for every record of the shard from ``first`` on."""
        src = self.plan.source(pair)
        so = dict(src.storage_options)
        index = load_index(pair, self.plan, self.seed, epoch, src.join_key, so, lazy=True)
        matched: set[str] = set()
        j = 0
        base = (
            self.cache.records(pair.base_url, so)
            if self.cache is not None
            else ((rec, None) for rec in iter_shard(pair.base_url, so))
        )
        try:
            for rec, dec in base:
                jk = rec.key if isinstance(rec, Rejected) or src.join_key == "key" else rec.uid
                dup = jk in matched
                if jk is not None:
                    matched.add(jk)
                if j >= first:
                    yield j, functools.partial(self._item, pair, rec, jk, dup, index, dec, epoch)
                j += 1
        except ShardReadError as e:
            log.warning("base shard %s unreadable after %d records: %s", pair.base_url, j, e)
            if j >= first:
                yield j, (lambda: _skip(pair.name, "?", "base_unreadable"))
            j += 1
        for key in index.entries:  # reinforcement rows without a base record
            if key not in matched:
                if j >= first:
                    yield j, (lambda key=key: _skip(pair.name, key, "missing_base"))
                j += 1

    # ------------------------------------------------------------------ one sample
    def _item(
        self,
        pair: ShardPair,
        rec: Sample | Rejected,
        jk: str | None,
        dup: bool,
        index: ShardIndex,
        dec: Decoded | None = None,
        epoch: int = 0,
    ) -> Item:
        if isinstance(rec, Rejected):
            return _skip(pair.name, rec.key, f"base_{rec.reason}")
        if jk is None:
            return _skip(pair.name, rec.key, "no_join_key")
        if dup:
            return _skip(pair.name, rec.key, "duplicate_base_key")
        entry = index.get(jk)
        if entry is None:
            return _skip(pair.name, rec.key, index.error or "missing_reinforcement")
        if entry.error:
            return _skip(pair.name, rec.key, entry.error)
        caption = rec.caption
        if entry.caption is not None:  # Parquet: the (cleaned) caption the teachers embedded
            if clean_caption(rec.caption) != entry.caption:
                return _skip(pair.name, rec.key, "mismatched_caption")
            caption = entry.caption
        if not caption:
            return _skip(pair.name, rec.key, "no_caption")
        if (
            self.cfg.verify_sha256
            and entry.sha256
            and (dec.sha256 if dec is not None else hashlib.sha256(rec.image).hexdigest()) != entry.sha256
        ):
            return _skip(pair.name, rec.key, "mismatched_image")
        if dec is not None:  # cache_images: decoded once, by the same decoder
            if dec.image is None:
                return _skip(pair.name, rec.key, "bad_image")
            img = dec.image
        else:
            try:
                img = decode_image(rec.image)  # the exact decode the teachers' views were made from
            except ImageRejected:
                return _skip(pair.name, rec.key, "bad_image")
        if entry.width is not None and (img.width, img.height) != (entry.width, entry.height):
            return _skip(pair.name, rec.key, "mismatched_size")
        mode = self.cfg.augmentation
        spec = self.plan.source(pair).aug
        try:
            if mode == "fresh":  # new params for this visit, the reinforcement's sampler and spec
                params = augment.sample_params(
                    spec, fresh_seed(self.seed, epoch, pair.visit), jk, 0, img.width, img.height
                )
            elif mode == "stored":
                params = self._params(pair, entry, img)
        except ValueError:
            return _skip(pair.name, rec.key, "bad_aug_params")
        try:
            if mode == "center" and dec is not None:  # the same view every visit: computed once
                image = dec.views.get(self.image_size)
                if image is None:
                    image = dec.views[self.image_size] = augment.center_view(img, self.image_size)
            elif mode == "center":
                image = augment.center_view(img, self.image_size)
            else:
                image = augment.replay(img, params, self.image_size, spec)
        except Exception:  # noqa: BLE001 - an odd image mode / palette must not stop training
            return _skip(pair.name, rec.key, "bad_image")
        stored = mode == "stored"
        syn = entry.syn_caption if entry.syn_caption is not None else caption
        if entry.mixed:  # mix_synthetic_ratio: this visit trains on the synthetic caption
            caption = syn
        return {
            "key": rec.key,
            "shard": pair.name,
            "image": image,
            "tokens": self._tokens(caption, syn),
            # fresh and centre views: no teacher embedded them, so none is carried
            "teachers": dict(entry.emb) if stored else {},  # float32 [3, D] numpy
            "aug_index": entry.aug_index if stored else -1,
            "syn_index": entry.syn_index,
            "caption": caption,
            "syn_caption": syn,
        }

    def _tokens(self, caption: str, syn: str) -> torch.Tensor:
        """[2, ctx] tokens of (GT, synthetic) caption; with ``cache_images`` each text is tokenized
        once per worker (the same BPE, so the same tokens)."""
        if self.cache is None:
            return tokenize([caption, syn], self.context_length)
        memo = self.cache.tokens
        missing = [t for t in (caption, syn) if t not in memo]
        if missing:
            for t, row in zip(missing, tokenize(missing, self.context_length)):
                memo[t] = row
        return torch.stack([memo[caption], memo[syn]])

    def _params(self, pair: ShardPair, entry: Entry, img: Image.Image) -> augment.AugParams:
        if pair.kind == DATACOMPDR:
            return augment.from_datacompdr(entry.aug, img.width, img.height, self.plan.source(pair).aug)
        return augment.unpack(np.asarray(entry.aug))[0]


def fresh_seed(seed: int, epoch: int, visit: int = 0) -> int:
    """The ``augment.sample_params`` seed of a fresh-augmentation visit (``data.augmentation:
    fresh``; index 0, the sample's join key as key): a 63-bit hash of (seed, epoch, visit), so
    the draws are new per visit and not the reinforcement's (job seed, key, 0..N-1) draws of
    the stored views."""
    h = hashlib.sha256(f"fresh|{int(seed)}|{int(epoch)}|{int(visit)}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _skip(shard: str, key: str, reason: str) -> Item:
    return {"skip": reason, "key": key, "shard": shard}


def _identity(x: Item) -> Item:
    return x


def _pack(items: list[Item]) -> Item:
    """A worker's chunk: every slot's (position, skip reason, key) and the samples' fields
    stacked (``_join`` cuts batches from them). The images are stacked by ``default_collate``,
    which in a worker writes straight into shared memory (one copy; the tensor then travels as
    a file descriptor); the small arrays (tokens, embeddings, indices) travel as numpy, pickled
    inline: each shared tensor costs the receiver a socket round trip, more than a few kB."""
    samples = [it for it in items if "skip" not in it]
    data = None
    if samples:
        data = {
            "image": default_collate([it["image"] for it in samples]),
            "tokens": np.stack([it["tokens"].numpy() for it in samples]),
            "teachers": {t: np.stack([it["teachers"][t] for it in samples]) for t in samples[0]["teachers"]},
            "keys": [it["key"] for it in samples],
            "aug_index": np.array([it["aug_index"] for it in samples], dtype=np.int64),
            "syn_index": np.array([it["syn_index"] for it in samples], dtype=np.int64),
            "captions": [it["caption"] for it in samples],
            "syn_captions": [it["syn_caption"] for it in samples],
            "shards": [it["shard"] for it in samples],
        }
    return {"slots": [(it["pos"], it.get("skip"), it["key"]) for it in items], "data": data}


def unchunk(items: Iterator[Item]) -> Iterator[Item]:
    """Chunks -> one item per slot (a sample or a ``{"skip": reason}``), markers passed through."""
    for chunk in items:
        if "slots" not in chunk:
            yield chunk
            continue
        data, i = chunk["data"], 0
        if data is not None:
            tokens, teachers = (
                torch.from_numpy(data["tokens"]),
                {t: torch.from_numpy(v) for t, v in data["teachers"].items()},
            )
        for pos, skip, key in chunk["slots"]:
            if skip is not None:
                yield {"skip": skip, "key": key, "pos": pos}
                continue
            yield {
                "pos": pos,
                "key": key,
                "image": data["image"][i],
                "tokens": tokens[i],
                "teachers": {t: v[i] for t, v in teachers.items()},
                "aug_index": int(data["aug_index"][i]),
                "syn_index": int(data["syn_index"][i]),
                "caption": data["captions"][i],
                "syn_caption": data["syn_captions"][i],
                "shard": data["shards"][i],
            }
            i += 1


class TrainStream:
    """A rank's endless stream of fixed-size batches over epochs, with an exact resume state.

    Iterating yields ``(batch, state)``; ``state`` is where to restart to get the batches
    that follow. ``skipped`` counts skips by reason; ``samples`` counts samples batched.
    ``max_empty_epochs`` epochs in a row without a usable sample raise (never a silent hang).
    """

    def __init__(
        self,
        plan: DataPlan,
        cfg: DataConfig,
        seed: int,
        batch_size: int,
        image_size: int,
        context_length: int,
        rank: int = 0,
        world: int = 1,
        state: StreamState = StreamState(),
        pin_memory: bool = False,
        max_empty_epochs: int = 3,
    ):
        self.plan, self.cfg, self.seed, self.batch_size = plan, cfg, seed, batch_size
        self.image_size, self.context_length = image_size, context_length
        self.rank, self.world, self.state = rank, world, state
        self.pin_memory, self.max_empty_epochs = pin_memory, max_empty_epochs
        self.skipped: Counter[str] = Counter()
        self.samples = 0
        tokenize(["warm up"], context_length)  # load the BPE once here; forked workers inherit it
        self.cache = ImageCache().fill(plan) if cfg.cache_images else None  # before the workers fork

    def chunks(self) -> Iterator[Item]:
        """The rank's chunks and epoch markers from ``state`` on, as the loader workers ship them."""
        ds = JoinedDataset(
            self.plan,
            self.cfg,
            self.seed,
            self.image_size,
            self.context_length,
            self.rank,
            self.world,
            self.state,
            cache=self.cache,
        )
        nw = self.cfg.num_workers
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=nw,
            collate_fn=_identity,
            prefetch_factor=4 if nw else None,
            pin_memory=self.pin_memory,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], StreamState]]:
        # Batches are cut straight from the workers' chunks: a batch is the runs of consecutive
        # samples it takes from one or more chunks (``_join``), with no per-sample objects here.
        runs: list[tuple[dict[str, Any], int, int]] = []  # (chunk data, first, end) in order
        have, markers, got, empty = 0, 0, 0, 0
        for chunk in self.chunks():
            if "epoch_end" in chunk:
                markers += 1
                if markers < max(1, self.cfg.num_workers):
                    continue
                markers = 0
                empty = empty + 1 if got == 0 else 0
                got = 0
                if empty >= self.max_empty_epochs:
                    raise RuntimeError(
                        f"rank {self.rank}: {empty} epoch(s) in a row gave no usable sample "
                        f"(skips so far: {dict(self.skipped)}); check data.base / data.reinforced pairing"
                    )
                continue
            data, i, first = chunk["data"], 0, 0
            for pos, skip, _ in chunk["slots"]:
                if skip is not None:
                    self.skipped[skip] += 1
                    continue
                i, have, got = i + 1, have + 1, got + 1
                if have == self.batch_size:
                    runs.append((data, first, i))
                    self.samples += have
                    e, s, j = pos
                    yield _join(runs), StreamState(e, s, j + 1)
                    runs, have, first = [], 0, i
            if i > first:
                runs.append((data, first, i))


def _join(runs: list[tuple[dict[str, Any], int, int]]) -> dict[str, Any]:
    """A batch from runs ``data[first:end]`` of shipped chunks (``_pack``): uint8 images
    [B,3,S,S], tokens [B,2,ctx] (GT, synthetic), teacher embeddings {id: float32 [B,3,D]}
    (image view, GT caption, synthetic caption; none with fresh augmentation), and per sample
    its key, shard, augmentation (-1: fresh) / synthetic-caption indices and both captions."""

    def cat(get) -> torch.Tensor:
        parts = [get(d)[a:b] for d, a, b in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def arr(name: str) -> torch.Tensor:
        return cat(lambda d: torch.from_numpy(d[name]))

    first = runs[0][0]
    return {
        "image": cat(lambda d: d["image"]),
        "tokens": arr("tokens"),
        "teachers": {t: cat(lambda d, t=t: torch.from_numpy(d["teachers"][t])) for t in first["teachers"]},
        "keys": [k for d, a, b in runs for k in d["keys"][a:b]],
        "aug_index": arr("aug_index"),
        "syn_index": arr("syn_index"),
        "captions": [c for d, a, b in runs for c in d["captions"][a:b]],
        "syn_captions": [c for d, a, b in runs for c in d["syn_captions"][a:b]],
        "shards": [c for d, a, b in runs for c in d["shards"][a:b]],
    }
