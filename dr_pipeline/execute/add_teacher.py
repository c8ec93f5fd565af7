"""Add a teacher to an existing reinforced dataset.

Only the new teacher's embeddings are computed: the stored augmentation params are
replayed on the base images (whose sha256 must match the stored one) and the stored GT
and synthetic captions are embedded. Every existing column is copied bit for bit, and the
result equals a dataset that had the teacher in its ensemble from the start.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys

import torch
import yaml
from PIL import Image

from dr_pipeline import augment
from dr_pipeline.config import ConfigError, strip_redacted, EnsembleSpec, JobConfig, from_dict, load_ensemble, redact, to_dict
from dr_pipeline.corpus.readers import Sample, expand_urls, iter_shard, shard_name
from dr_pipeline.execute.dataset_dir import DatasetDir
from dr_pipeline.execute.runner import JobReport, Plan, write_manifest
from dr_pipeline.execute.shard_worker import ShardProcessor
from dr_pipeline.images import decode_image
from dr_pipeline.models.teachers import check_ensemble
from dr_pipeline.shards.parquet_io import ReinforcedRows, ShardWriter, read_shard
from dr_pipeline.shards.schema import SCHEMA_VERSION, TeacherLayout, layout_from_metadata


def load_dataset_config(ds: DatasetDir) -> tuple[JobConfig, EnsembleSpec]:
    job_text, ens_text = ds.read_text("job.yaml"), ds.read_text("ensemble.yaml")
    if job_text is None or ens_text is None:
        raise ConfigError(f"{ds.root}: not a dr_pipeline dataset (no job.yaml / ensemble.yaml)")
    # Secrets were redacted when the config was dumped: drop them so the environment's credentials apply.
    job = from_dict(JobConfig, strip_redacted(yaml.safe_load(job_text)))
    return job, from_dict(EnsembleSpec, yaml.safe_load(ens_text))


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
            views = torch.cat([torch.stack([augment.replay(img, p, t.image_size, job.aug)
                                            for p in augment.unpack(rows.aug_params[i])]) for i, img in pending])
            rows.image_emb[t.id][[i for i, _ in pending]] = t.encode_images(views).reshape(len(pending), job.aug.n_aug, t.dim)
        pending.clear()

    seen = set()
    for item in iter_shard(base_url, storage_options):
        if not isinstance(item, Sample) or item.key not in index or item.key in seen:
            continue
        i = index[item.key]
        seen.add(item.key)
        if hashlib.sha256(item.image).hexdigest() != rows.image_sha256[i]:
            raise ValueError(f"{base_url}: image of {item.key!r} changed since reinforcement (sha256 differs)")
        pending.append((i, decode_image(item.image)))   # the decode reinforcement used (same pixels)
        if len(pending) >= bs:
            flush()
    if pending:
        flush()
    if len(seen) != n:
        raise ValueError(f"{base_url}: {n - len(seen)} reinforced sample(s) missing from the base shard")
    with torch.inference_mode():
        for t in proc.teachers:
            rows.text_emb[t.id], rows.syn_emb[t.id] = proc.embed_texts(t, rows)


def add_teachers(root: str, ensemble_file: str, teacher_ids: list[str], storage_options: dict | None = None,
                 device: str | None = None) -> JobReport:
    ds = DatasetDir(root, storage_options)
    job, old = load_dataset_config(ds)
    new = load_ensemble(ensemble_file)
    specs = [new.teacher(t) for t in teacher_ids]
    clash = [s.id for s in specs if s.id in {t.id for t in old.teachers}]
    if clash:
        raise ConfigError(f"teacher(s) {clash} already in {root}; pick another id")
    # The merged ensemble keeps the new file's model_configs/source so its paths resolve.
    merged = dataclasses.replace(new, name=old.name, teachers=old.teachers + tuple(specs), captioners=old.captioners)
    check_ensemble(dataclasses.replace(merged, teachers=tuple(specs), captioners=()))
    if device:
        job = dataclasses.replace(job, execution=dataclasses.replace(job.execution, device=device))
    proc = ShardProcessor(job, merged, teacher_ids=[s.id for s in specs], with_captioners=False)
    old_hash, new_hash = job.output_hash(old), job.output_hash(merged)
    bases = {shard_name(u): u for u in expand_urls(job.input.urls, job.input.storage_options)}
    report = JobReport()
    markers = ds.markers()
    for name, marker in markers.items():
        if marker["config_hash"] == new_hash:
            report.skipped.append(name)      # resumed: already has the teacher
            continue
        rows, meta = read_shard(ds.shard_url(name), storage_options)
        _embed_shard(proc, rows, bases[name], job.input.storage_options)
        layout = layout_from_metadata(meta)
        for t in proc.teachers:
            layout = layout.with_teacher(TeacherLayout(t.id, t.dim))
        new_meta = {**meta, "config_hash": new_hash,
                    "teachers": meta["teachers"] + proc.file_metadata(name, new_hash)["teachers"]}
        tmp = ds.new_tmp_file(name)
        writer = ShardWriter(tmp, layout, new_meta, job.output.compression_level)
        writer.write(rows)
        writer.close()
        ds.uncommit(name)
        stats = ds.commit(name, tmp, {**marker, "config_hash": new_hash, "teachers": [t.id for t in layout.teachers]})
        report.committed.append(stats)
        print(f"[{len(report.committed)}/{len(markers)}] {name}: +{','.join(teacher_ids)}", file=sys.stderr, flush=True)
    assert old_hash != new_hash
    ds.write_json("dataset.json", {"config_hash": new_hash, "schema_version": SCHEMA_VERSION})
    ds.write_bytes("ensemble.yaml", yaml.safe_dump(redact(to_dict(merged)), sort_keys=False).encode())
    plan = Plan(ds, new_hash, list(bases.values()), [], [])
    write_manifest(plan, merged, report)
    return report
