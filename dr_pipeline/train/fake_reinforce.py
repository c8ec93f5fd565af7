"""Write a reinforced dataset directory without any model, for tests and loader debugging.

Same layout, Parquet contract and commit path as ``dr reinforce`` (``ReinforcedDataset``:
typed markers, ``job.yaml``, ``ensemble.yaml``, manifest; ``dr validate`` passes on it), same
seeded augmentation params; the "teachers" are cheap deterministic
functions instead of CLIP models: an image teacher embeds the replayed view (16 px) with a
fixed random projection, a text teacher sums fixed random word vectors. So embeddings
depend on exactly the view and caption they belong to -- what the loader tests need -- and
a student can learn to match them.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from dr_pipeline import augment
from dr_pipeline.config import (
    AugSpec,
    CaptionerSpec,
    CaptionSpec,
    EnsembleSpec,
    InputSpec,
    JobConfig,
    OutputSpec,
    TeacherSpec,
)
from dr_pipeline.corpus.readers import Rejected, Sample, clean_caption, expand_urls, iter_shard, shard_name
from dr_pipeline.shards.dataset import Manifest, ReinforcedDataset, ShardStats
from dr_pipeline.shards.parquet_io import ReinforcedRows, ShardLayout, ShardWriter, TeacherLayout

VIEW = 16


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def image_embedding(teacher: str, dim: int, view: torch.Tensor) -> torch.Tensor:
    """The fake image teacher: fixed random projection of a uint8 [3, 16, 16] view, L2-normalized."""
    w = torch.from_numpy(np.random.default_rng(_seed("img", teacher)).standard_normal((3 * VIEW * VIEW, dim)))
    x = (view.double().flatten() / 255.0 - 0.5) @ w
    return (x / x.norm()).float()


def text_embedding(teacher: str, dim: int, text: str) -> torch.Tensor:
    """The fake text teacher: sum of fixed random word vectors, L2-normalized."""
    x = (
        sum(
            torch.from_numpy(np.random.default_rng(_seed("txt", teacher, w)).standard_normal(dim))
            for w in text.lower().replace(",", " ").split()
        )
        + 1e-3
    )
    return (x / x.norm()).float()


def synthetic_captions(caption: str, key: str, k: int) -> list[str]:
    """k deterministic rewrites of the caption (stand-ins for CoCa captions)."""
    rng = np.random.default_rng(_seed("syn", key))
    prefixes = ["a picture of", "an image showing", "a drawing of", "a photo with", "there is"]
    return [f"{prefixes[int(rng.integers(len(prefixes)))]} {caption}" for _ in range(k)]


def make_fake_reinforced(
    base_urls: str | Sequence[str],
    out_dir: str,
    teachers: Sequence[tuple[str, int, float]],
    captioners: Sequence[str] = ("fake-coca",),
    k: int = 3,
    aug: AugSpec | None = None,
    seed: int = 0,
    drop_syn: int = 0,
) -> list[str]:
    """Reinforce every base shard; ``teachers`` = (id, dim, logit_scale). Returns the shard paths.

    ``drop_syn``: every row whose index is divisible by ``drop_syn`` (when > 0) loses its last
    synthetic caption, as a degenerate-caption filter would leave it (k_i < k).
    """
    aug = aug or AugSpec(n_aug=3, size=64)
    ds = ReinforcedDataset(out_dir)
    ds.ensure()
    layout = ShardLayout(aug.n_aug, tuple(TeacherLayout(t, d) for t, d, _ in teachers), tuple(captioners))
    urls = expand_urls(base_urls)
    job = JobConfig(
        input=InputSpec(urls=tuple(urls)),
        output=OutputSpec(path=out_dir),
        teachers="fake",
        seed=seed,
        aug=aug,
        captions=CaptionSpec(k=k),
    )
    ensemble = EnsembleSpec(
        "fake",
        tuple(TeacherSpec(t, "fake", logit_scale=s) for t, _, s in teachers),
        tuple(CaptionerSpec(c, "fake") for c in captioners),
    )
    config_hash = job.output_hash(ensemble)
    manifest = Manifest(config_hash, [t for t, _, _ in teachers], list(captioners), len(urls))
    written = []
    for url in urls:
        name = shard_name(url)
        items = list(iter_shard(url))
        samples = [s for s in items if isinstance(s, Sample)]
        rejected = [r for r in items if isinstance(r, Rejected)]
        rows = _rows(samples, teachers, captioners, k, aug, seed, drop_syn)
        meta = {
            "schema_version": 1,
            "shard": name,
            "seed": seed,
            "aug": asdict(aug),
            "teachers": [{"id": t, "model": "fake", "dim": d, "logit_scale": s} for t, d, s in teachers],
            "captioners": [{"id": c, "model": "fake", "k": k} for c in captioners],
            "config_hash": config_hash,
        }
        tmp = ds.new_tmp_file(name)
        w = ShardWriter(tmp, layout, meta)
        w.write(rows)
        w.close()
        stats = ShardStats(
            shard=name,
            input_url=url,
            config_hash=config_hash,
            n_read=len(items),
            n_written=len(rows),
            n_rejected=len(rejected),
            rejected_by_reason=dict(Counter(r.reason for r in rejected)),
            rejected_keys=[[r.key, r.reason, r.detail[:200]] for r in rejected],
            captions_rejected={c: {} for c in captioners},
            teachers=[t for t, _, _ in teachers],
            captioners=list(captioners),
        )
        manifest.add(ds.commit(tmp, stats))
        if os.path.exists(tmp):
            os.unlink(tmp)
        written.append(ds.folder.path_of(ds.data_rel(name)))
    ds.write_job_record(job, ensemble, config_hash)
    ds.write_manifest(manifest)
    return written


def _rows(samples: list[Sample], teachers, captioners, k, aug, seed, drop_syn) -> ReinforcedRows:
    n = len(samples)
    rows = ReinforcedRows(
        keys=[s.key for s in samples],
        uids=[s.uid for s in samples],
        urls=[s.url for s in samples],
        image_sha256=[hashlib.sha256(s.image).hexdigest() for s in samples],
        widths=[],
        heights=[],
        captions=[clean_caption(s.caption) or "" for s in samples],
        aug_params=np.zeros((n, aug.n_aug, augment.PARAM_WIDTH), np.uint16),
    )
    views = []
    for i, s in enumerate(samples):
        img = Image.open(io.BytesIO(s.image))
        rows.widths.append(img.width)
        rows.heights.append(img.height)
        params = augment.sample_all(aug, seed, s.key, img.width, img.height)
        rows.aug_params[i] = augment.pack(params)
        views.append([augment.replay(img, p, VIEW, aug) for p in params])
    syn = {
        c: [
            synthetic_captions(f"{c} {s.caption}", s.key, k)[: k - (drop_syn > 0 and i % drop_syn == 0)]
            for i, s in enumerate(samples)
        ]
        for c in captioners
    }
    rows.syn = syn
    for t, d, _ in teachers:
        rows.image_emb[t] = (
            torch.stack([torch.stack([image_embedding(t, d, v) for v in vs]) for vs in views]).to(torch.bfloat16)
            if n
            else torch.zeros(0, aug.n_aug, d, dtype=torch.bfloat16)
        )
        rows.text_emb[t] = (
            torch.stack([text_embedding(t, d, c) for c in rows.captions]).to(torch.bfloat16)
            if n
            else torch.zeros(0, d, dtype=torch.bfloat16)
        )
        rows.syn_emb[t] = {
            c: [
                torch.stack([text_embedding(t, d, x) for x in caps]).to(torch.bfloat16)
                if caps
                else torch.zeros(0, d, dtype=torch.bfloat16)
                for caps in syn[c]
            ]
            for c in captioners
        }
    return rows
