"""``make gpu-check``: the demo job on CUDA (bf16 autocast) against the same job on CPU (fp32).

    python -m dr_pipeline.gpu_check [--config jobs/configs/demo.yaml] [--shards 2] [--per-shard 16]

Both runs go through the product's own path (``run_job`` with the in-process executor, i.e.
``ShardProcessor`` reading, augmenting, captioning, embedding and writing Parquet shards), on a
fresh synthetic web-split corpus, with the demo job's settings (teachers, augmentations, k
captions, batch size) and its captioners switched to greedy decoding (temperature 0), so the
two runs must agree exactly where they can. Then, shard by shard and row by row:

- keys, GT captions, image hashes and the augmentation parameters are identical;
- the synthetic captions are identical (greedy: any divergence is a precision problem);
- every stored embedding vector (each augmented view's image embedding, the GT caption's and
  each synthetic caption's text embedding, per teacher) has cosine >= ``--min-cosine`` (0.99)
  with its CPU fp32 counterpart.

Exit status 0 when every check holds, 1 otherwise. Without a CUDA device it says so and exits
0 (nothing to check). ``--device cpu`` (hidden, for the tests) runs the "GPU" side on the CPU
too, which proves the comparison machinery on any machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
NO_CUDA = "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing to check, skipped"


def greedy(ensemble):
    """The ensemble with every captioner decoding greedily (temperature 0: argmax, one attempt)."""
    caps = tuple(
        dataclasses.replace(c, sampling=dataclasses.replace(c.sampling, temperature=0.0)) for c in ensemble.captioners
    )
    return dataclasses.replace(ensemble, captioners=caps)


def job_for(base, urls: str, out: str, device: str):
    """``base`` (the demo job) reading ``urls``, writing ``out``, on ``device``, in process."""
    return dataclasses.replace(
        base,
        input=dataclasses.replace(base.input, urls=urls, storage_options={}),
        output=dataclasses.replace(base.output, path=out, storage_options={}),
        execution=dataclasses.replace(base.execution, device=device),
    )


def run_one(job, ensemble) -> float:
    from dr_pipeline.execute.runner import run_job

    t0 = time.perf_counter()
    report = run_job(job, ensemble, force=True, executor="local")
    if not report.ok:
        raise RuntimeError(f"gpu-check: the {job.execution.device} run failed: {report.failed or report.error}")
    return time.perf_counter() - t0


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per vector (last axis) of two stored bf16 tensors of the same shape."""
    d = a.shape[-1]
    return F.cosine_similarity(a.float().reshape(-1, d), b.float().reshape(-1, d), dim=1, eps=1e-12)


def compare_rows(ref, got, min_cosine: float = 0.99, shard: str = "") -> dict:
    """Compare two ``ReinforcedRows`` of one shard (``ref``: CPU fp32, ``got``: the run checked)."""
    out: dict = {
        "rows": len(ref),
        "problems": [],
        "min_cosine": {},
        "vectors": 0,
        "below": 0,
        "caption_mismatches": 0,
        "captions": 0,
        "rows_identical": True,
        "aug_identical": True,
    }
    p = out["problems"]
    if ref.keys != got.keys:
        p.append(f"{shard}: different rows (keys) - {len(ref.keys)} vs {len(got.keys)}")
        out["rows_identical"] = out["aug_identical"] = False
        return out
    for field in ("captions", "image_sha256", "widths", "heights"):
        if getattr(ref, field) != getattr(got, field):
            p.append(f"{shard}: {field} differ")
            out["rows_identical"] = False
    if ref.aug_params.shape != got.aug_params.shape or not np.array_equal(ref.aug_params, got.aug_params):
        p.append(f"{shard}: augmentation parameters differ")
        out["aug_identical"] = False
    same_caption: dict[str, list[list[bool]]] = {}
    for cap, rows in ref.syn.items():
        other = got.syn.get(cap)
        if other is None:
            p.append(f"{shard}: captioner {cap} missing")
            continue
        flags = []
        for key, a, b in zip(ref.keys, rows, other):
            f = [i < len(b) and x == b[i] for i, x in enumerate(a)]
            out["captions"] += max(len(a), len(b))
            bad = sum(not x for x in f) + max(0, len(b) - len(a))
            if bad:
                out["caption_mismatches"] += bad
                if out["caption_mismatches"] <= 5:
                    p.append(f"{shard}/{key}: {cap} greedy captions differ: {a!r} vs {b!r}")
            flags.append(f)
        same_caption[cap] = flags

    def check(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.numel() == 0 and b.numel() == 0:
            return
        if a.shape != b.shape:
            p.append(f"{shard}: {name} shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
            return
        c = _cos(a, b)
        out["vectors"] += c.numel()
        out["below"] += int((c < min_cosine).sum())
        lo = float(c.min())
        out["min_cosine"][name] = min(lo, out["min_cosine"].get(name, 1.0))
        if lo < min_cosine:
            p.append(
                f"{shard}: {name}: {int((c < min_cosine).sum())} of {c.numel()} vectors below cosine "
                f"{min_cosine} (min {lo:.4f})"
            )

    for t, emb in ref.image_emb.items():
        if t not in got.image_emb:
            p.append(f"{shard}: teacher {t} missing")
            continue
        check(f"{t}:image", emb, got.image_emb[t])
        check(f"{t}:text", ref.text_emb[t], got.text_emb[t])
        for cap, per_row in ref.syn_emb[t].items():  # only captions both runs wrote alike embed the same text
            pairs = [
                (x[i], y[i])
                for x, y, f in zip(per_row, got.syn_emb[t][cap], same_caption.get(cap, []))
                for i, ok in enumerate(f)
                if ok
            ]
            if pairs:
                check(f"{t}:syn:{cap}", torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
    return out


def compare_datasets(ref: str, got: str, min_cosine: float = 0.99) -> dict:
    """Every committed shard of dataset ``ref`` against the same shard of ``got``."""
    from dr_pipeline.shards.parquet_io import read_shard

    ref_names = sorted(p.stem for p in (Path(ref) / "shards").glob("*.parquet"))
    got_names = sorted(p.stem for p in (Path(got) / "shards").glob("*.parquet"))
    res: dict = {
        "shards": len(ref_names),
        "rows": 0,
        "vectors": 0,
        "below": 0,
        "captions": 0,
        "caption_mismatches": 0,
        "min_cosine": {},
        "problems": [],
        "rows_identical": True,
        "aug_identical": True,
    }
    if not ref_names:
        res["problems"].append(f"{ref}: no shards")
    if ref_names != got_names:
        res["problems"].append(f"different shards: {ref_names} vs {got_names}")
    for n in ref_names:
        if n not in got_names:
            continue
        a, _ = read_shard(str(Path(ref) / "shards" / f"{n}.parquet"))
        b, _ = read_shard(str(Path(got) / "shards" / f"{n}.parquet"))
        one = compare_rows(a, b, min_cosine, n)
        for k in ("rows", "vectors", "below", "captions", "caption_mismatches"):
            res[k] += one[k]
        for k in ("rows_identical", "aug_identical"):
            res[k] = res[k] and one[k]
        for k, v in one["min_cosine"].items():
            res["min_cosine"][k] = min(v, res["min_cosine"].get(k, 1.0))
        res["problems"] += one["problems"]
    res["ok"] = not res["problems"]
    return res


def report_lines(res: dict, min_cosine: float) -> list[str]:
    L = [
        f"gpu-check: {res['shards']} shard(s), {res['rows']} rows, {res['vectors']} embedding vectors, "
        f"{res['captions']} greedy captions compared (CPU fp32 vs {res.get('device', '?')})"
    ]
    for k, v in sorted(res["min_cosine"].items()):
        L.append(f"  min cosine {k:<40} {v:.5f}  {'ok' if v >= min_cosine else 'BELOW ' + str(min_cosine)}")
    L.append(f"  rows (keys, GT captions, image hashes) identical: {'yes' if res['rows_identical'] else 'NO'}")
    L.append(f"  augmentation params identical: {'yes' if res['aug_identical'] else 'NO'}")
    L.append(f"  greedy captions identical: {res['captions'] - res['caption_mismatches']}/{res['captions']}")
    L += [f"  PROBLEM {p}" for p in res["problems"][:20]]
    L.append("gpu-check: " + ("PASSED" if res["ok"] else "FAILED"))
    return L


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dr_pipeline.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="job whose settings are used (default: the demo)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--min-cosine", type=float, default=0.99)
    ap.add_argument("--workdir", help="keep corpus and both datasets here (default: a temporary folder, removed)")
    ap.add_argument("--json", help="also write the comparison as JSON here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    ap.add_argument("--teachers", help=argparse.SUPPRESS)  # another ensemble file (tests: the tiny one)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        return 0

    from dr_pipeline.config import load_ensemble, load_job
    from dr_pipeline.corpus.synthetic import make_split
    from dr_pipeline.execute.runner import resolve_ensemble

    base = load_job(a.config)
    ensemble = greedy(load_ensemble(a.teachers) if a.teachers else resolve_ensemble(base))
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="dr-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "corpus"
        if not (corpus / "tar").is_dir():
            make_split("web", str(corpus), n_shards=a.shards, per_shard=a.per_shard, seed=0, formats=("tar",))
        urls = f"{corpus}/tar/shard-{{00000..{a.shards - 1:05d}}}.tar"
        gpu = a.device
        name = torch.cuda.get_device_name(0) if gpu == "cuda" else "cpu"
        print(
            f"gpu-check: {a.shards} x {a.per_shard} samples, ensemble {ensemble.name} (captioners greedy), "
            f"settings of {a.config}; reference CPU fp32, checked: {gpu} ({name})",
            flush=True,
        )
        t_cpu = run_one(job_for(base, urls, str(work / "ref-cpu"), "cpu"), ensemble)
        t_gpu = run_one(job_for(base, urls, str(work / f"checked-{gpu}"), gpu), ensemble)
        res = compare_datasets(str(work / "ref-cpu"), str(work / f"checked-{gpu}"), a.min_cosine)
        precision = "bf16 autocast" if gpu == "cuda" else "fp32"
        res.update(
            device=f"{gpu} ({name}, {precision})",
            seconds={"cpu": round(t_cpu, 1), gpu: round(t_gpu, 1)},
            min_cosine_required=a.min_cosine,
            config=a.config,
            ensemble=ensemble.name,
        )
        print("\n".join(report_lines(res, a.min_cosine)), flush=True)
        print(f"gpu-check: CPU run {t_cpu:.1f} s, {gpu} run {t_gpu:.1f} s", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0 if res["ok"] else 1
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
