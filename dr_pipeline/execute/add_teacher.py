"""Add a teacher to an existing reinforced dataset (``dr add-teacher``).

Only the new teacher's embeddings are computed: the stored augmentation params are
replayed on the base images (whose sha256 must match the stored one) and the stored GT
and synthetic captions are embedded. Every existing column is copied bit for bit, and the
result equals a dataset that had the teacher in its ensemble from the start.

It runs on the same executors as ``dr reinforce`` (Ray actor pool or in-process): one shard
per task, retries, per-shard commit (the marker gets the new config hash), resume (shards
whose marker already has the new hash are skipped). ``dataset.json`` and ``ensemble.yaml``
switch to the new ensemble once every shard has it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time

import torch
from PIL import Image

from dr_pipeline import augment
from dr_pipeline.config import ConfigError, EnsembleSpec, JobConfig, load_ensemble
from dr_pipeline.corpus.readers import Sample, expand_urls, iter_shard, shard_name
from dr_pipeline.execute.runner import JobPlan, JobReport, run_local, run_ray
from dr_pipeline.execute.shard_worker import ShardProcessor, StageClock
from dr_pipeline.images import decode_image
from dr_pipeline.models.teachers import check_ensemble
from dr_pipeline.shards.dataset import Manifest, ReinforcedDataset, ShardStats, load_dataset_config
from dr_pipeline.shards.parquet_io import ReinforcedRows, ShardWriter, read_shard
from dr_pipeline.shards.schema import TeacherLayout, layout_from_metadata


def _embed_shard(proc: ShardProcessor, rows: ReinforcedRows, base_url: str, storage_options: dict) -> None:
    """Compute the new teachers' embeddings for ``rows`` (in place), batch by batch in base order."""
    job = proc.job
    index = {k: i for i, k in enumerate(rows.keys)}
    n, bs = len(rows), job.execution.batch_size
    for t in proc.teachers:
        rows.image_emb[t.id] = torch.zeros(n, job.aug.n_aug, t.dim)
    pending: list[tuple[int, Image.Image]] = []

    def flush() -> None:
        for t in proc.teachers:
            views = torch.cat(
                [
                    torch.stack(
                        [augment.replay(img, p, t.image_size, job.aug) for p in augment.unpack(rows.aug_params[i])]
                    )
                    for i, img in pending
                ]
            )
            rows.image_emb[t.id][[i for i, _ in pending]] = t.encode_images(views).reshape(
                len(pending), job.aug.n_aug, t.dim
            )
        pending.clear()

    seen = set()
    for item in iter_shard(base_url, storage_options):
        if not isinstance(item, Sample) or item.key not in index or item.key in seen:
            continue
        i = index[item.key]
        seen.add(item.key)
        if hashlib.sha256(item.image).hexdigest() != rows.image_sha256[i]:
            raise ValueError(f"{base_url}: image of {item.key!r} changed since reinforcement (sha256 differs)")
        pending.append((i, decode_image(item.image)))  # the decode reinforcement used (same pixels)
        if len(pending) >= bs:
            flush()
    if pending:
        flush()
    if len(seen) != n:
        raise ValueError(f"{base_url}: {n - len(seen)} reinforced sample(s) missing from the base shard")
    with torch.inference_mode():
        for t in proc.teachers:
            rows.text_emb[t.id], rows.syn_emb[t.id] = proc.embed_texts(t, rows)


class TeacherAdder:
    """The shard processor of ``dr add-teacher``: ``process(base_url, dataset, new_hash)`` reads the
    committed shard of the same name, adds the new teachers' columns and commits it again."""

    def __init__(self, job: JobConfig, ensemble: EnsembleSpec, teacher_ids: tuple[str, ...] = ()):
        self.job = job
        self.proc = ShardProcessor(job, ensemble, teacher_ids=list(teacher_ids), with_captioners=False)

    def process(self, url: str, dataset: ReinforcedDataset, config_hash: str) -> ShardStats:
        name = shard_name(url)
        t0 = time.perf_counter()
        clock = StageClock()
        so = dataset.folder.storage_options
        with clock.time("read"):
            rows, meta = read_shard(dataset.shard_url(name), so)
            marker = dataset.read_markers([name])[name]
        with clock.time("teachers"):
            _embed_shard(self.proc, rows, url, self.job.input.storage_options)
        layout = layout_from_metadata(meta)
        for t in self.proc.teachers:
            layout = layout.with_teacher(TeacherLayout(t.id, t.dim))
        new_meta = {
            **meta,
            "config_hash": config_hash,
            "teachers": meta["teachers"] + self.proc.file_metadata(name, config_hash)["teachers"],
        }
        tmp = dataset.new_tmp_file(name)
        try:
            with clock.time("write"):
                writer = ShardWriter(tmp, layout, new_meta, self.job.output.compression_level)
                writer.write(rows)
                writer.close()
            stats = dataclasses.replace(
                marker,
                config_hash=config_hash,
                teachers=[t.id for t in layout.teachers],
                seconds=round(time.perf_counter() - t0, 3),
                stage_s=clock.rounded(),
                started_at=round(time.time(), 3),
            )
            return dataset.commit(tmp, stats)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def add_teachers(
    root: str,
    ensemble_file: str,
    teacher_ids: list[str],
    storage_options: dict | None = None,
    device: str | None = None,
    executor: str = "ray",
) -> JobReport:
    """Add ``teacher_ids`` from ``ensemble_file`` to the dataset at ``root``; resumable."""
    t0 = time.time()
    ds = ReinforcedDataset(root, storage_options)
    job, old = load_dataset_config(ds)
    new = load_ensemble(ensemble_file)
    specs = [new.teacher(t) for t in teacher_ids]
    clash = [s.id for s in specs if s.id in {t.id for t in old.teachers}]
    if clash:
        raise ConfigError(f"teacher(s) {clash} already in {root}; pick another id")
    # The merged ensemble keeps the new file's model_configs/source so its paths resolve.
    merged = dataclasses.replace(new, name=old.name, teachers=old.teachers + tuple(specs), captioners=old.captioners)
    check_ensemble(dataclasses.replace(merged, teachers=tuple(specs), captioners=()))
    execution = job.execution if not device else dataclasses.replace(job.execution, device=device)
    output = dataclasses.replace(job.output, path=root, storage_options=dict(storage_options or {}))
    job = dataclasses.replace(job, execution=execution, output=output)
    old_hash, new_hash = job.output_hash(old), job.output_hash(merged)
    bases = {shard_name(u): u for u in expand_urls(job.input.urls, job.input.storage_options)}
    markers = ds.markers()
    foreign = sorted(n for n, m in markers.items() if m.config_hash not in (old_hash, new_hash))
    if foreign:
        raise ConfigError(
            f"{root}: shard {foreign[0]!r} was made by another config; run `dr reinforce` "
            "on it first (or `dr validate` to see what is wrong)"
        )
    manifest = Manifest(
        new_hash,
        [t.id for t in merged.teachers],
        [c.id for c in merged.captioners],
        len(bases),
        started_at=round(time.time(), 3),
    )
    done = sorted(n for n, m in markers.items() if m.config_hash == new_hash)
    for n in done:
        manifest.add(markers[n])
    todo = [bases[n] for n, m in sorted(markers.items()) if m.config_hash == old_hash]
    plan = JobPlan(ds, new_hash, [bases[n] for n in sorted(markers)], todo, [bases[n] for n in done], manifest)
    report = JobReport(skipped=done, manifest=manifest)
    if todo:
        processor = functools.partial(TeacherAdder, teacher_ids=tuple(teacher_ids))
        (run_ray if executor == "ray" else run_local)(plan, job, merged, report, processor)
    report.seconds = time.time() - t0
    if report.ok and len(manifest.shards) == len(markers):
        ds.write_job_record(job, merged, new_hash)
        ds.write_manifest(manifest)
    return report
