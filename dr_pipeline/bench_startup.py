"""Start-up and memory of a real ensemble actor (``make bench`` section ``startup``).

For each ensemble: the time from launching ``dr reinforce`` (a fresh process, as a user types
it) to the first actor ready, split into the driver's part (imports, config, planning, Ray
start) and the actor's (its imports and model load), and the actor's peak RSS against its
models' weight bytes. The actor reports its own figures when it becomes ready (``ActorInfo``:
the line ``actor ready (pid ..., models loaded in ..s, peak RSS .. GiB for .. GiB of weights)``).

Ensembles: the committed synthetic teachers, and the public-pipeline-sized ViT-B-32 +
convnext_tiny + coca_ViT-B-32 (random weights written once as fp32 safetensors, as a real
checkpoint would be). ``--big`` adds the DFNDR ensemble (2 x ViT-L-14 + coca_ViT-L-14, ~6 GB).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

READY = re.compile(
    r"actor ready \(pid (\d+), models loaded in ([\d.]+)s, peak RSS ([\d.]+) GiB"
    r"(?: for ([\d.]+) GiB of weights)?"
)
RAY = re.compile(r"Ray started in ([\d.]+)s")

PUBLIC_B32 = {
    "name": "public-b32",
    "teachers": [("vit-b-32", "ViT-B-32", 224), ("convnext-tiny", "convnext_tiny", 224)],
    "captioners": [("coca-b-32", "coca_ViT-B-32", 224)],
}
DFNDR = {
    "name": "dfndr-l14",
    "teachers": [("dfn-l14-a", "ViT-L-14", 224), ("dfn-l14-b", "ViT-L-14", 224)],
    "captioners": [("coca-l14", "coca_ViT-L-14", 224)],
}


def write_random_ensemble(spec: dict, folder: Path) -> Path:
    """An ensemble file whose checkpoints are random-init fp32 safetensors (written once, cached)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list] = {"teachers": [], "captioners": []}
    for kind in ("teachers", "captioners"):
        for eid, model, size in spec[kind]:
            ckpt = folder / f"{eid}.safetensors"
            if not ckpt.exists():
                m = open_clip.create_model(model, pretrained=None)
                save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(ckpt))
                del m
            entry = {"id": eid, "model": model, "pretrained": ckpt.name, "image_size": size}
            if kind == "captioners":
                entry["sampling"] = {"max_len": 20}
            entries[kind].append(entry)
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump({"name": spec["name"], **entries}, sort_keys=False))
    return path


def measure(ensemble: str, work: Path, timeout_s: float = 900) -> dict:
    """Launch ``dr reinforce`` on a 1-shard corpus; time its stderr lines as they arrive."""
    from dr_pipeline.corpus.synthetic import make_corpus

    corpus = work / "corpus"
    if not corpus.exists():
        make_corpus(str(corpus), n_shards=1, per_shard=4, seed=0, formats=("tar",))
    out = work / f"ds-{Path(ensemble).stem}"
    cfg = work / f"job-{Path(ensemble).stem}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"urls": str(corpus / "tar")},
                "output": {"path": str(out)},
                "teachers": str(ensemble),
                "aug": {"n_aug": 2, "size": 224},
                "captions": {"k": 1},
                "execution": {"max_actors": 1, "cpus_per_actor": 1, "batch_size": 4, "device": "cpu", "num_cpus": 2},
            }
        )
    )
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "dr_pipeline.cli", "reinforce", "--config", str(cfg), "--force"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    res: dict = {"ensemble": Path(ensemble).stem}
    try:
        for line in p.stderr:
            now = time.perf_counter() - t0
            if (m := RAY.search(line)) and "ray_ready_s" not in res:
                res["ray_ready_s"], res["ray_init_s"] = round(now, 1), float(m.group(1))
            if (m := READY.search(line)) and "actor_ready_s" not in res:
                res.update(
                    actor_ready_s=round(now, 1),
                    actor_load_s=float(m.group(2)),
                    peak_rss_gib=float(m.group(3)),
                    weights_gib=float(m.group(4) or 0),
                )
            if now > timeout_s:
                p.kill()
        p.wait()
        res["job_s"] = round(time.perf_counter() - t0, 1)
        res["rc"] = p.returncode
    finally:
        if p.poll() is None:
            p.kill()
    from dr_pipeline.shards.dataset import ReinforcedDataset

    markers = ReinforcedDataset(str(out)).markers() if out.exists() else {}
    if markers:  # after a shard: every weight page touched (mmap'd checkpoints load lazily)
        res["peak_rss_after_shard_gib"] = round(max(m.peak_rss for m in markers.values()) / 2**30, 2)
    if res.get("weights_gib") and "peak_rss_after_shard_gib" in res:
        res["rss_per_weight"] = round(res["peak_rss_after_shard_gib"] / res["weights_gib"], 2)
    return res


def run_section(work: str, big: bool = False) -> list[dict]:
    from dr_pipeline.config import resolve_path

    w = Path(work) / "startup"
    cache = Path(os.environ.get("DR_BENCH_CACHE", Path.home() / ".cache" / "dr_pipeline" / "bench"))
    ensembles = [resolve_path("pkg:teachers/synthetic.yaml", "."), str(write_random_ensemble(PUBLIC_B32, cache))]
    if big:
        ensembles.append(str(write_random_ensemble(DFNDR, cache)))
    return [measure(e, w) for e in ensembles]


def render_section(rows: list[dict]) -> list[str]:
    out = [
        "## Start-up and actor memory",
        "",
        "`dr_pipeline/bench_startup.py`: `dr reinforce` launched as a fresh process on a 1-shard corpus, one "
        "actor (1 CPU); times are when its stderr lines arrived. *Driver* = imports, config, planning and "
        "`ray.init`; *actor load* = the actor's own imports and model load (it reports it, with its peak RSS, "
        "when ready). Weights = the loaded models' parameters and buffers.",
        "",
        "| ensemble | Ray up (s) | first actor ready (s) | actor load (s) | RSS when ready (GiB) | "
        "peak RSS after a shard (GiB) | weights (GiB) | peak RSS / weights | whole 1-shard job (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['ensemble']} | {r.get('ray_ready_s', '?')} | {r.get('actor_ready_s', '?')} | "
            f"{r.get('actor_load_s', '?')} | {r.get('peak_rss_gib', '?')} | {r.get('peak_rss_after_shard_gib', '?')} | "
            f"{r.get('weights_gib', '?')} | {r.get('rss_per_weight', '-')} | {r.get('job_s', '?')} |"
        )
    done = [r for r in rows if r.get("peak_rss_after_shard_gib") and r.get("weights_gib")]
    if len(done) >= 2:
        small, big = min(done, key=lambda r: r["weights_gib"]), max(done, key=lambda r: r["weights_gib"])
        fixed = small["peak_rss_after_shard_gib"] - small["weights_gib"]
        per = (big["peak_rss_after_shard_gib"] - fixed) / big["weights_gib"]
        out += [
            "",
            "Budget: peak RSS <= 1.3 x weights + the bounded batch buffers. The fixed part of an actor (Python, "
            f"torch, open_clip, Ray's core worker: the {small['ensemble']} row less its weights) is {fixed:.2f} GiB; "
            f"above it the {big['ensemble']} actor holds **{per:.2f} x its weights** (one copy plus batch buffers). "
            "Memory per ensemble: docs/cluster.md.",
            "",
        ]
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run_section(d, big="--big" in sys.argv), indent=1))
