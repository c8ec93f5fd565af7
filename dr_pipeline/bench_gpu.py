"""The GPU section of ``make bench`` (``--only gpu``): the DFNDR-2B ensemble's throughput on one GPU.

    python -m dr_pipeline.bench --only gpu --out BENCHMARKS-gpu.md      # = make gpu-bench

The ensemble is ``teachers/dfndr2b.yaml`` itself (2 x ViT-L-14 at 224 with QuickGELU, one CoCa
ViT-L-14 with top_p 0.9, seq 30) with random-init weights written as local safetensors files
(the hub is not needed; speed does not depend on the weights), run through the product's code:
``ShardProcessor`` from ``execute/shard_worker.py`` with the DFNDR-2B job's settings (2
augmentations, 5 captions, batch 128, bf16 autocast on CUDA). Measured:

- teacher images/s: ``Teacher.encode_images`` on uint8 views, each teacher alone and the pair
  (one image through both teachers);
- captions/s: ``Captioner.caption`` (image encode once + KV-cached sampled decode of k rows per
  image, resampling of degenerate captions included);
- accelerator busy fraction: the models-only loop (``ShardProcessor.reinforce`` over the
  shard's batches, decoded beforehand; CUDA-synchronised) / the wall time of the real
  ``ShardProcessor.process`` of the same shard (read + decode + augment in threads, models,
  Parquet write, commit). 1.0 means the GPU never waits for the CPU side.

Without CUDA it prints "skipped: no CUDA" and records nothing. ``measure`` itself is device
agnostic (the tests run it on the CPU with the tiny ensemble). ~3-5 minutes on one GPU.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
clock = time.perf_counter

JOB = """\
input:
  urls: {urls}
output:
  path: {out}
teachers: {teachers}
seed: 0
aug: {{n_aug: 2, size: 224, flip: false}}      # as jobs/configs/dfndr-2b.yaml
captions: {{k: 5}}
execution: {{batch_size: {batch}, device: {device}, decode_threads: {threads}, max_attempts: 1}}
"""


def log(msg: str) -> None:
    print(f"[bench gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    _sync(device)
    t = clock()
    out = fn()
    _sync(device)
    return clock() - t, out


def _views(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def random_checkpoints(ensemble, folder: Path):
    """``ensemble`` with every entry's ``pretrained`` replaced by a random-init safetensors file of
    the same architecture (written once per model name; open_clip's CoCa decoder projection is
    initialised as ``dr_pipeline.models.tiny`` does)."""
    import open_clip
    from safetensors.torch import save_file

    from dr_pipeline.models.tiny import init_uninitialized

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}

    def ckpt(entry) -> str:
        if entry.model not in paths:
            path = folder / f"random-{entry.model}.safetensors"
            if not path.is_file():
                log(f"writing random-init {entry.model} to {path}")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    model = open_clip.create_model(
                        entry.model, pretrained=None, force_quick_gelu=getattr(entry, "force_quick_gelu", False)
                    )
                    init_uninitialized(model)
                save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path) + ".tmp")
                os.replace(str(path) + ".tmp", path)
                del model
            paths[entry.model] = str(path)
        return paths[entry.model]

    return dataclasses.replace(
        ensemble,
        teachers=tuple(dataclasses.replace(t, pretrained=ckpt(t)) for t in ensemble.teachers),
        captioners=tuple(dataclasses.replace(c, pretrained=ckpt(c)) for c in ensemble.captioners),
    )


def measure(
    job, ensemble, urls: list[str], dataset: str, n_images: int = 256, n_caption_images: int = 64, rounds: int = 3
) -> dict:
    """Teacher images/s, captions/s and the busy fraction of a real ``ShardProcessor`` run.
    ``urls``: at least 2 shards (the first warms up: cuDNN/cuBLAS autotuning, allocator, threads)."""
    from dr_pipeline.execute.shard_worker import ShardProcessor
    from dr_pipeline.shards.dataset import ReinforcedDataset

    device = job.execution.device
    dt_load, proc = timed(lambda: ShardProcessor(job, ensemble), device)
    log(f"models loaded in {dt_load:.1f}s on {proc.device}")
    dev = proc.device
    out: dict = {
        "device": dev,
        "load_s": dt_load,
        "batch_size": job.execution.batch_size,
        "n_aug": job.aug.n_aug,
        "k": job.captions.k,
    }

    # teachers: each alone, then the pair as the pipeline runs them (each image through both)
    per: dict[str, dict] = {}
    for t in proc.teachers:
        views = _views(n_images, t.image_size, seed=1)
        t.encode_images(views[: min(8, n_images)])
        t.encode_images(views)  # warm-up at full batch
        times = [timed(lambda t=t, v=views: t.encode_images(v), dev)[0] for _ in range(rounds)]
        per[t.id] = {
            "model": t.spec.model,
            "image_size": t.image_size,
            "images_per_s": n_images / statistics.median(times),
            "times": times,
        }
        log(f"teacher {t.id}: {per[t.id]['images_per_s']:.0f} images/s")
    out["teachers"] = per
    out["teacher_pair_images_per_s"] = 1.0 / sum(1.0 / v["images_per_s"] for v in per.values())
    out["teacher_batch"] = n_images

    # captioners: the project's Captioner.caption (sampled, seeded, with resampling)
    caps: dict[str, dict] = {}
    k = job.captions.k
    for c in proc.captioners:
        views = _views(n_caption_images, c.image_size, seed=2)
        keys = [f"bench-{i}" for i in range(n_caption_images)]
        c.caption(views[: min(4, n_caption_images)], keys[:4], 0, k)  # warm-up
        runs = []
        for r in range(max(1, rounds - 1)):
            dt, got = timed(lambda v=views, ks=keys, r=r, c=c: c.caption(v, ks, r + 1, k), dev)
            runs.append((dt, sum(len(x) for x in got.captions), int(getattr(got, "resampled", 0) or 0)))
        dt = statistics.median(x[0] for x in runs)
        caps[c.id] = {
            "model": c.spec.model,
            "images": n_caption_images,
            "k": k,
            "captions_per_s": n_caption_images * k / dt,
            "kept_captions": runs[-1][1],
            "resampled_rows": runs[-1][2],
            "times": [x[0] for x in runs],
            "max_len": c.spec.sampling.max_len,
            "top_p": c.spec.sampling.top_p,
        }
        log(f"captioner {c.id}: {caps[c.id]['captions_per_s']:.1f} captions/s")
    out["captioners"] = caps

    # busy fraction: models-only loop vs the real shard pipeline, on the same shard
    ds = ReinforcedDataset(dataset)
    ds.ensure()
    log(f"pipeline: warm-up shard {urls[0]}")
    proc.process(urls[0], ds, "bench-gpu")
    url = urls[1]
    wall, stats = timed(lambda: proc.process(url, ds, "bench-gpu"), dev)
    batches = [b for b in proc.batches(url) if b.prepared]
    counters = {c.id: Counter() for c in proc.captioners}
    model_s, _ = timed(lambda: [proc.reinforce(b.prepared, counters) for b in batches], dev)
    n = sum(len(b.prepared) for b in batches)
    out["pipeline"] = {
        "samples": n,
        "wall_s": wall,
        "models_only_s": model_s,
        "busy_fraction": model_s / wall,
        "samples_per_s": n / wall,
        "models_only_samples_per_s": n / model_s,
        "stage_s": dict(getattr(stats, "stage_s", {}) or {}),
    }
    log(f"pipeline: {n} samples, {wall:.1f}s wall vs {model_s:.1f}s models-only: busy {model_s / wall:.2f}")
    if dev == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run_section(work: str, quick: bool = False) -> dict | None:
    """The section on CUDA; None (and a line saying so) without it."""
    if not torch.cuda.is_available():
        print("gpu: skipped: no CUDA", file=sys.stderr, flush=True)
        return None
    from dr_pipeline.config import load_ensemble, load_job
    from dr_pipeline.corpus.synthetic import make_split

    t0 = clock()
    w = Path(work) / "gpu"
    w.mkdir(parents=True, exist_ok=True)
    ensemble = random_checkpoints(load_ensemble(ROOT / "teachers" / "dfndr2b.yaml"), w / "checkpoints")
    per_shard = 64 if quick else 256
    corpus = w / "corpus"
    if not (corpus / "tar").is_dir():
        make_split("web", str(corpus), n_shards=2, per_shard=per_shard, seed=0, formats=("tar",))
    urls = [str(corpus / "tar" / f"shard-{i:05d}.tar") for i in range(2)]
    job_path = w / "job.yaml"
    job_path.write_text(
        JOB.format(
            urls=urls[0],
            out=w / "ds",
            teachers=ROOT / "teachers" / "dfndr2b.yaml",
            batch=128,
            device="cuda",
            threads=max(2, min(6, (os.cpu_count() or 4) - 2)),
        )
    )
    job = load_job(job_path)
    res = measure(
        job,
        ensemble,
        urls,
        str(w / "ds"),
        n_images=128 if quick else 256,
        n_caption_images=16 if quick else 64,
        rounds=2 if quick else 3,
    )
    res["per_shard"] = per_shard
    res["wall_s"] = clock() - t0
    return res


def render_section(d: dict) -> list[str]:
    """Markdown for BENCHMARKS: summary lines and a table."""
    p = d["pipeline"]
    L = [
        "## GPU: the DFNDR-2B ensemble on one device",
        "",
        f"Device: {d.get('gpu') or d['device']}; random-init weights of `teachers/dfndr2b.yaml`'s models, "
        f"the product's `ShardProcessor` (bf16 autocast on CUDA), DFNDR-2B job settings (n_aug {d['n_aug']}, "
        f"k {d['k']}, batch {d['batch_size']}). Section wall time {d.get('wall_s', 0) / 60:.1f} min, "
        f"model load {d['load_s']:.1f} s"
        + (f", peak GPU memory {d['max_memory_gib']:.1f} GiB" if "max_memory_gib" in d else "")
        + ".",
        "",
        "| measurement | value | how |",
        "|---|---|---|",
    ]
    for tid, v in d["teachers"].items():
        L.append(
            f"| teacher {tid} ({v['model']} @ {v['image_size']}) | {v['images_per_s']:.0f} images/s | "
            f"`Teacher.encode_images`, batch {d['teacher_batch']}, median of {len(v['times'])} |"
        )
    L.append(
        f"| teacher pair ({len(d['teachers'])} teachers, each image through all) | "
        f"**{d['teacher_pair_images_per_s']:.0f} images/s** | 1 / sum(1 / per-teacher rate) |"
    )
    for cid, v in d["captioners"].items():
        L.append(
            f"| captioner {cid} ({v['model']}, top_p {v['top_p']}, seq {v['max_len']}) | "
            f"**{v['captions_per_s']:.1f} captions/s** | `Captioner.caption`, {v['images']} images x k {v['k']}, "
            f"resampling included |"
        )
    L.append(
        f"| pipeline: one shard of {p['samples']} samples | {p['samples_per_s']:.1f} samples/s "
        f"({p['wall_s']:.1f} s) | `ShardProcessor.process` (read, decode, augment, models, write, commit) |"
    )
    L.append(
        f"| models only, same shard | {p['models_only_samples_per_s']:.1f} samples/s ({p['models_only_s']:.1f} s) | "
        "`ShardProcessor.reinforce` over pre-decoded batches, CUDA-synchronised |"
    )
    L.append(
        f"| **accelerator busy fraction** | **{p['busy_fraction']:.2f}** | models-only / pipeline wall "
        f"(target >= 0.85) |"
    )
    if p.get("stage_s"):
        shares = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(p["stage_s"].items(), key=lambda kv: -kv[1]))
        L += ["", f"Stage times of the measured shard (marker `stage_s`): {shares}."]
    return L + [""]
