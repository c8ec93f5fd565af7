"""Reinforce one input shard: read -> decode + seeded augment -> captioners + teachers -> write.

``ShardProcessor`` holds the loaded models (one per process / Ray actor, loaded once) and
turns one input shard into one committed output shard of the same name. CPU work
(reading, decoding, rendering the augmented views) runs in a background thread pool and
overlaps with model compute through a small bounded queue, so memory stays bounded by
``queue depth x batch size`` whatever the shard size.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from dr_pipeline import augment
from dr_pipeline.config import EnsembleSpec, JobConfig, to_dict
from dr_pipeline.corpus.readers import Rejected, Sample, clean_caption, iter_shard, shard_name
from dr_pipeline.images import MAX_IMAGE_PIXELS, ImageRejected, decode_image  # noqa: F401 (re-export)
from dr_pipeline.memory import peak_rss_bytes
from dr_pipeline.models.captioner import Captioner, load_captioner
from dr_pipeline.models.teachers import Teacher, load_teacher
from dr_pipeline.shards.dataset import ReinforcedDataset, ShardStats
from dr_pipeline.shards.parquet_io import ReinforcedRows, ShardWriter
from dr_pipeline.shards.schema import SCHEMA_VERSION, ShardLayout, TeacherLayout
from dr_pipeline.storage.retry import PermanentError, RetryPolicy, describe, is_permanent, redact_url, retry_call

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A decoded sample with its augmentation params and the rendered views, ready for the models."""

    key: str
    uid: str | None
    url: str | None
    sha256: str
    width: int
    height: int
    caption: str
    params: np.ndarray  # uint16 [n_aug, 8]
    views: dict[int, torch.Tensor]  # image size -> uint8 [n_aug, 3, S, S]
    center: dict[int, torch.Tensor]  # captioner image size -> uint8 [3, S, S]


@dataclass
class Batch:
    prepared: list[Prepared] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class StageClock:
    """Seconds per stage of one shard, added from the reader thread and the model loop."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, stage: str, dt: float) -> None:
        with self._lock:
            self.seconds[stage] += dt

    @contextmanager
    def time(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


def _timed_iter(it: Iterator, clock: StageClock, stage: str) -> Iterator:
    """``it`` with the time spent producing each item added to ``stage``."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            clock.add(stage, time.perf_counter() - t0)
        yield item


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def prepare(sample: Sample, job: JobConfig, view_sizes: set[int], center_sizes: set[int]) -> Prepared | Rejected:
    """Decode one sample and render its seeded views; bad input becomes a reasoned rejection.

    Checks in order: image present (no_image), caption present (no_caption), decode
    (empty_image, undecodable, too_large: see ``dr_pipeline.images``), size (too_small).
    Captions are already stripped and capped by the reader; the cap is re-applied here for
    samples built elsewhere. Width/height are those of the decoded image the params refer to.
    A failure while rendering the views is a ``render_error`` rejection (a bug to look at,
    never a lost shard).
    """
    if sample.image is None:
        return Rejected(sample.key, "no_image")
    caption = clean_caption(sample.caption) or ""
    if not caption:
        return Rejected(sample.key, "no_caption")
    try:
        img = decode_image(sample.image)
    except ImageRejected as e:
        return Rejected(sample.key, e.reason, e.detail)
    w, h = img.size
    if min(w, h) < job.min_image_side:
        return Rejected(sample.key, "too_small", f"{w}x{h}")
    try:
        params = augment.sample_all(job.aug, job.seed, sample.key, w, h)
        views = {s: torch.stack([augment.replay(img, p, s, job.aug) for p in params]) for s in view_sizes}
        center = {s: augment.center_view(img, s) for s in center_sizes}
    except Exception as e:  # noqa: BLE001 - one odd image must not fail its whole shard
        log.warning("%s: rendering views failed: %s: %s", sample.key, type(e).__name__, e)
        return Rejected(sample.key, "render_error", f"{type(e).__name__}: {e}"[:200])
    return Prepared(
        sample.key,
        sample.uid,
        sample.url,
        hashlib.sha256(sample.image).hexdigest(),
        w,
        h,
        caption,
        augment.pack(params),
        views,
        center,
    )


class ShardProcessor:
    """Loads the ensemble once; ``process(url, dataset)`` reinforces and commits one shard."""

    def __init__(
        self, job: JobConfig, ensemble: EnsembleSpec, teacher_ids: list[str] | None = None, with_captioners: bool = True
    ):
        self.job, self.ensemble = job, ensemble
        self.device = resolve_device(job.execution.device)
        specs = [t for t in ensemble.teachers if teacher_ids is None or t.id in teacher_ids]
        self.teachers: list[Teacher] = [load_teacher(t, ensemble, self.device) for t in specs]
        ex = job.execution
        self.captioners: list[Captioner] = [
            load_captioner(
                c,
                ensemble,
                self.device,
                decode_batch=ex.caption_decode_batch,
                speculate_rows=ex.caption_speculate_rows,
                compile=ex.caption_compile,
            )
            for c in (ensemble.captioners if with_captioners else [])
        ]
        self.layout = ShardLayout(
            job.aug.n_aug,
            tuple(TeacherLayout(t.id, t.dim) for t in self.teachers),
            tuple(c.id for c in ensemble.captioners),
        )

    def weight_bytes(self) -> int:
        """Bytes of the loaded models' parameters and buffers (what an actor must hold at least)."""
        models = [m.model for m in (*self.teachers, *self.captioners)]
        return sum(t.numel() * t.element_size() for m in models for t in (*m.parameters(), *m.buffers()))

    # ---------------------------------------------------------------- metadata
    def file_metadata(self, shard: str, config_hash: str) -> dict:
        by_id = {t.id: t for t in self.ensemble.teachers}
        return {
            "schema_version": SCHEMA_VERSION,
            "shard": shard,
            "seed": self.job.seed,
            "aug": to_dict(self.job.aug),
            "config_hash": config_hash,
            "teachers": [{**to_dict(by_id[t.id]), "dim": t.dim} for t in self.teachers],
            "captioners": [{**to_dict(c), "k": self.job.captions.k} for c in self.ensemble.captioners],
        }

    # ---------------------------------------------------------------- CPU stage
    def batches(self, url: str, clock: StageClock | None = None, damaged: list[dict] | None = None) -> Iterator[Batch]:
        """Read + decode + augment in a thread pool, ``batch_size`` samples per batch; damaged tar
        framing the reader skipped is appended to ``damaged`` (the marker keeps it)."""
        clock = clock or StageClock()
        damaged = [] if damaged is None else damaged
        view_sizes = {t.image_size for t in self.teachers}
        center_sizes = {c.image_size for c in self.captioners}
        bs = self.job.execution.batch_size
        batch, pending = Batch(), []
        with ThreadPoolExecutor(self.job.execution.decode_threads) as pool:

            def flush() -> Batch:
                out = Batch(rejected=batch.rejected)
                with clock.time("decode_augment"):
                    for r in pool.map(lambda s: prepare(s, self.job, view_sizes, center_sizes), pending):
                        (out.rejected if isinstance(r, Rejected) else out.prepared).append(r)
                return out

            items = iter_shard(url, self.job.input.storage_options, on_damage=lambda d: damaged.append(d.to_dict()))
            for item in _timed_iter(items, clock, "read"):
                if isinstance(item, Rejected):
                    batch.rejected.append(item)
                else:
                    pending.append(item)
                if len(pending) >= bs:
                    yield flush()
                    batch, pending = Batch(), []
            if pending or batch.rejected:
                yield flush()

    def _opened(self, url: str, clock: StageClock, damaged: list[dict]) -> Iterator[Batch]:
        """``batches(url)`` whose start (open + first batch) is retried on transient storage
        errors with backoff: until a batch is handed out nothing is consumed, so starting
        over is safe. A failure later in the shard fails the attempt (the runner retries it)."""

        def start() -> Iterator[Batch]:
            del damaged[:]  # a retried start re-reads from the beginning
            it = self.batches(url, clock, damaged)
            try:
                first = next(it)
            except StopIteration:
                return iter(())
            return itertools.chain([first], it)

        ex = self.job.execution
        return retry_call(start, f"read {redact_url(url)}", RetryPolicy(ex.io_attempts, ex.io_backoff_s))

    def prefetched(self, url: str, clock: StageClock, damaged: list[dict], depth: int = 2) -> Iterator[Batch]:
        """``batches(url)`` run ahead in a background thread so decoding overlaps model compute;
        the time the model loop waits for the next batch is ``wait_input``."""
        q: queue.Queue = queue.Queue(maxsize=depth)
        done = object()
        stop = threading.Event()

        def run() -> None:
            try:
                for b in self._opened(url, clock, damaged):
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)

        t = threading.Thread(target=run, name=f"decode-{shard_name(url)}", daemon=True)
        t.start()
        try:
            while True:
                with clock.time("wait_input"):
                    item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=10)

    # ---------------------------------------------------------------- model stage
    @torch.inference_mode()
    def reinforce(
        self,
        prepared: list[Prepared],
        captions_rejected: dict[str, Counter],
        clock: StageClock | None = None,
        resampled: Counter | None = None,
    ) -> ReinforcedRows:
        clock = clock or StageClock()
        resampled = Counter() if resampled is None else resampled
        keys = [p.key for p in prepared]
        rows = ReinforcedRows(
            keys=keys,
            uids=[p.uid for p in prepared],
            urls=[p.url for p in prepared],
            image_sha256=[p.sha256 for p in prepared],
            widths=[p.width for p in prepared],
            heights=[p.height for p in prepared],
            captions=[p.caption for p in prepared],
            aug_params=np.stack([p.params for p in prepared]),
        )
        for c in self.captioners:
            with clock.time(f"caption:{c.id}"):
                out = c.caption(
                    torch.stack([p.center[c.image_size] for p in prepared]), keys, self.job.seed, self.job.captions.k
                )
            rows.syn[c.id] = out.captions
            captions_rejected[c.id].update(out.rejected)
            resampled[c.id] += out.resampled
        for c in self.ensemble.captioners:
            rows.syn.setdefault(c.id, [[] for _ in prepared])
        n_aug = self.job.aug.n_aug
        for t in self.teachers:
            views = torch.cat([p.views[t.image_size] for p in prepared])
            with clock.time(f"teacher:{t.id}:image"):
                rows.image_emb[t.id] = t.encode_images(views).cpu().reshape(len(prepared), n_aug, t.dim)
            with clock.time(f"teacher:{t.id}:text"):
                rows.text_emb[t.id], rows.syn_emb[t.id] = self.embed_texts(t, rows)
        return rows

    def embed_texts(self, t: Teacher, rows: ReinforcedRows) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """GT and synthetic captions, each distinct string embedded once."""
        unique = list(dict.fromkeys(rows.captions + [s for caps in rows.syn.values() for row in caps for s in row]))
        emb = t.encode_texts(unique).cpu() if unique else torch.zeros(0, t.dim)
        index = {s: i for i, s in enumerate(unique)}
        gt = emb[[index[s] for s in rows.captions]]
        syn = {
            cap: [emb[[index[s] for s in row]] if row else torch.zeros(0, t.dim) for row in per_row]
            for cap, per_row in rows.syn.items()
        }
        return gt, syn

    # ---------------------------------------------------------------- one shard
    def process(self, url: str, dataset: ReinforcedDataset, config_hash: str) -> ShardStats:
        """Reinforce shard ``url`` and commit it into ``dataset``. Returns the committed stats."""
        name = shard_name(url)
        started, t0 = time.time(), time.perf_counter()
        clock = StageClock()
        tmp = dataset.new_tmp_file(name)
        writer = ShardWriter(tmp, self.layout, self.file_metadata(name, config_hash), self.job.output.compression_level)
        rejected: list[list[str]] = []
        reasons: Counter = Counter()
        captions_rejected: dict[str, Counter] = {c.id: Counter() for c in self.captioners}
        resampled: Counter = Counter({c.id: 0 for c in self.captioners})
        damaged: list[dict] = []
        n_read = 0
        try:
            for batch in self.prefetched(url, clock, damaged):
                n_read += len(batch.prepared) + len(batch.rejected)
                for r in batch.rejected:
                    reasons[r.reason] += 1
                    rejected.append([r.key, r.reason, r.detail[:200]])
                if batch.prepared:
                    rows = self.reinforce(batch.prepared, captions_rejected, clock, resampled)
                    with clock.time("write"):
                        writer.write(rows)
            with clock.time("write"):
                writer.close()
        except BaseException as e:
            writer.close()
            _unlink(tmp)
            if isinstance(e, Exception) and not isinstance(e, PermanentError) and is_permanent(e):
                # say "do not retry" in a form that survives the trip to the driver
                raise PermanentError(f"{name}: {describe(e)}") from e
            raise
        stats = ShardStats(
            shard=name,
            input_url=redact_url(url),
            config_hash=config_hash,
            n_read=n_read,
            n_written=writer.rows,
            n_rejected=sum(reasons.values()),
            rejected_by_reason=dict(sorted(reasons.items())),
            rejected_keys=rejected,
            captions_rejected={k: dict(v) for k, v in captions_rejected.items()},
            captions_resampled=dict(resampled),
            damaged=damaged,
            teachers=[t.id for t in self.teachers],
            captioners=[c.id for c in self.ensemble.captioners],
            seconds=round(time.perf_counter() - t0, 3),
            stage_s=clock.rounded(),
            started_at=round(started, 3),
            host=socket.gethostname(),
            pid=os.getpid(),
            peak_rss=peak_rss_bytes(),
        )
        try:
            return dataset.commit(tmp, stats)
        finally:
            _unlink(tmp)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
