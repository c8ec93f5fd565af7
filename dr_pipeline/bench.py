"""``make bench``: side-by-side performance ratios, written to BENCHMARKS.md.

    python -m dr_pipeline.bench --out BENCHMARKS.md [--quick | --full] [--threads N]

Every ratio compares two code paths measured in this one process, alternating between them in
rounds, on the same data, with the same ``torch.set_num_threads`` (default 1: on a shared 2-core
machine a 2-thread OpenMP barrier makes timings swing several-fold with other people's load).
Models are random-init open_clip models (no weights are downloaded): speed and token equality
do not depend on the weights.

Sections: (1) CoCa captioning, this project's KV-cached decoder vs open_clip ``generate`` called
the public way (one call per caption) and as one batched call; (2) teacher text towers with
length bucketing vs full-context padding; (3) pipeline efficiency, ``dr reinforce`` on a local
Ray vs the sum of its stages run alone; (4) storage vs the DataCompDR fp32 npz + JSON layout;
(5) trainer loader, reinforced replay vs a plain fresh-augmentation loader; (6) per-sample costs
for ``dr plan``, saved as ``bench/costs-<machine>.json``; (7) ``dr train``: its loader at the default
worker count vs a plain torchvision RRC + RandAugment loader, and the tiny student's steps/s vs
the same steps fed from memory (``--only train`` runs just this one).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
clock = time.perf_counter


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    import open_clip

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "?"),
        "os": platform.platform(),
        "device": device,
        "gpu": None,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    name = info["gpu"] or f"{cpu} {info['cores']}c"
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return info


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu"):
    sync(device)
    t = clock()
    out = fn()
    sync(device)
    return clock() - t, out


# --------------------------------------------------------------------------- 1. captioning


def _coca(name: str, device: str, max_len: int = 30, min_len: int = 5, top_p: float = 0.9):
    import open_clip

    from dr_pipeline.config import CaptionerSpec, SamplingSpec
    from dr_pipeline.models.captioner import Captioner
    from dr_pipeline.models.tiny import init_uninitialized

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, device=device).eval().requires_grad_(False)
        init_uninitialized(model)  # open_clip leaves the decoder's vocabulary projection uninitialized
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    spec = CaptionerSpec(
        id=name,
        model=name,
        image_size=size,
        sampling=SamplingSpec(max_len=max_len, min_len=min_len, top_p=top_p, top_k=0),
    )
    return Captioner(spec, model, open_clip.get_tokenizer(name), device)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pad_to(tokens: torch.Tensor, length: int, pad: int) -> torch.Tensor:
    out = torch.full((tokens.shape[0], length), pad, dtype=tokens.dtype)
    out[:, : tokens.shape[1]] = tokens.cpu()
    return out


def bench_captioning(
    device: str,
    n_images: int,
    k: int,
    rounds: int,
    public_calls: int = 1,
    public_rounds: int = 1,
    model_name: str = "coca_ViT-B-32",
    seq_len: int = 30,
) -> dict:
    """Side by side, interleaved per round, on one image batch:

    * public: ``model.generate(imgs, generation_type="top_p", top_p=0.9, fixed_output_length=True)``
      on the whole batch, one call per caption index (``public_calls`` of the k per round; every
      call costs the same: it always runs to ``seq_len``), and its greedy ``top_k=1`` twin once;
    * ours: ``Captioner.caption()`` as the pipeline calls it (seeded top_p, redraws inside the
      decode), one sampled decode without redraws, greedy, and the greedy decode alone (images
      encoded beforehand) against the matmul roof of its step shapes.
    """
    from dr_pipeline.models import decode_cost as dc
    from dr_pipeline.models.captioner import row_uniforms
    from dr_pipeline.models.teachers import views_to_input

    log(f"captioning: building {model_name}")
    c = _coca(model_name, device, max_len=seq_len)
    s = c.spec.sampling
    views = _images(n_images, c.image_size)
    keys = [f"img{i:03d}" for i in range(n_images)]
    rows = torch.arange(n_images).repeat_interleave(k)
    x = views_to_input(views, c.image_size, c.mean, c.std, c.device)
    u0 = torch.from_numpy(
        np.stack([row_uniforms(0, keys[i], j, 0, s.max_len, c.id) for i in range(n_images) for j in range(k)])
    )
    emb = c.encode_images(views)
    dims = dc.coca_dims(c.model, emb.shape[1])
    img_flops = dc.image_flops(c.model, x)

    def public(kind: str):
        kw = dict(generation_type="top_p", top_p=0.9) if kind == "sampled" else dict(generation_type="top_k", top_k=1)
        with torch.inference_mode():
            return c.model.generate(x, seq_len=seq_len, min_seq_len=s.min_len, fixed_output_length=True, **kw)

    t: dict[str, list[float]] = {
        k_: []
        for k_ in ("public", "public_greedy", "caption", "sampled", "greedy", "encode", "decode_greedy", "roof_step")
    }
    stats = {}
    greedy_equal = True
    roof = None
    for r in range(rounds):
        log(f"captioning {model_name} round {r + 1}/{rounds}: ours caption() ({n_images} images x {k})")
        dt, out = timed(lambda: c.caption(views, keys, seed=0, k=k), device)
        t["caption"].append(dt)
        stats = {
            "attempts": out.attempts,
            "resampled": out.resampled,
            "row_steps": out.row_steps,
            "rejected": dict(out.rejected),
            "kept": sum(len(x_) for x_ in out.captions),
            "speculated": out.speculated,
            "wasted_row_steps": out.wasted_row_steps,
            "speculate_rows": c.speculate_rows,
        }
        log(f"captioning {model_name} round {r + 1}/{rounds}: ours, one sampled decode, no redraws")
        t["sampled"].append(timed(lambda: c.decode(c.encode_images(views), u0, rows=rows), device)[0])
        for j in range(public_calls if r < public_rounds else 0):  # the slow call: first rounds only
            log(f"captioning {model_name} round {r + 1}/{rounds}: public generate top_p, caption index {j}")
            t["public"].append(timed(lambda: public("sampled"), device)[0])
        log(f"captioning {model_name} round {r + 1}/{rounds}: ours greedy")
        dt, ours_greedy = timed(lambda: c.decode(c.encode_images(views), None, rows=rows), device)
        t["greedy"].append(dt)
        t["encode"].append(timed(lambda: c.encode_images(views), device)[0])
        t["decode_greedy"].append(timed(lambda: c.decode(emb, None, rows=rows), device)[0])
        roof = dc.matmul_roof(c.model, n=n_images * k, k=k, ctx=seq_len // 2, image_tokens=dims.image_tokens)
        t["roof_step"].append(roof["step_s"])
        if r == 0:
            log(f"captioning {model_name}: public generate greedy (token check)")
            dt, g = timed(lambda: public("greedy"), device)
            t["public_greedy"].append(dt)
            greedy_equal = torch.equal(_pad_to(g, seq_len, c.pad), _pad_to(ours_greedy[::k], seq_len, c.pad))
    n_caps = n_images * k
    mean = {k_: statistics.mean(v) for k_, v in t.items() if v}
    per = {
        "public": mean["public"] / n_images,
        "public_greedy": mean["public_greedy"] / n_images,
        "caption": mean["caption"] / n_caps,
        "sampled": mean["sampled"] / n_caps,
        "greedy": mean["greedy"] / n_caps,
    }
    steps = (ours_greedy[:, 1:] != c.pad).sum(dim=1).clamp(max=seq_len - 2).float().mean().item()
    flops = {
        "public": dc.public_flops(dims, seq_len, img_flops),
        "ours": dc.cached_flops(dims, seq_len, k, img_flops, steps=round(steps)),
        "image": img_flops,
    }
    decode_flops = n_caps * sum(
        dc.cached_step_flops(dims, ctx) for ctx in range(1, round(steps) + 1)
    ) + n_images * dc.cross_kv_flops(dims)
    roof_gflops = roof["step_flops"] / statistics.median(t["roof_step"]) / 1e9
    decoder_gflops = decode_flops / mean["decode_greedy"] / 1e9
    out = {
        "model": model_name,
        "params_m": round(sum(p.numel() for p in c.model.parameters()) / 1e6, 1),
        "seq_len": seq_len,
        "min_len": s.min_len,
        "n_images": n_images,
        "k": k,
        "rounds": rounds,
        "public_calls": len(t["public"]),
        "times": t,
        "per_caption_s": per,
        "mean_steps": round(steps, 1),
        "redraws": stats,
        "draws_per_caption": stats["attempts"] / n_caps,
        "row_steps_per_caption": stats["row_steps"] / n_caps,
        "flops_per_caption": flops,
        "flop_ratio": flops["public"] / flops["ours"],
        "ratio_public": per["public"] / per["caption"],
        "ratio_public_sampled": per["public"] / per["sampled"],
        "ratio_public_greedy": per["public_greedy"] / per["greedy"],
        "caption_vs_sampled": per["caption"] / per["sampled"],
        "greedy_equal": bool(greedy_equal),
        "roof": {"gflops": roof_gflops, "step_flops": roof["step_flops"], "rows": n_caps, "ctx": seq_len // 2},
        "decoder_gflops": decoder_gflops,
        "decoder_vs_roof": decoder_gflops / roof_gflops,
        "public_gflops": flops["public"] * n_images / mean["public"] / 1e9,
    }
    gc.collect()
    return out


def run_captioning(device: str, quick: bool, full: bool) -> dict:
    """coca_ViT-B-32 at 16 images x 5 (ours 2 rounds, the public call in the first) and
    coca_ViT-L-14 at 4 x 5, one round (``--full``: every caption index of the public pattern in
    every round; ``--quick``: B-32 only, 4 images, one round)."""
    if quick:
        return {"models": {"coca_ViT-B-32": bench_captioning(device, 4, 5, rounds=1)}}
    calls = 5 if full else 1
    return {
        "models": {
            "coca_ViT-B-32": bench_captioning(
                device, 16, 5, rounds=2, public_calls=calls, public_rounds=2 if full else 1
            ),
            "coca_ViT-L-14": bench_captioning(
                device, 4, 5, rounds=2 if full else 1, public_calls=calls, model_name="coca_ViT-L-14"
            ),
        }
    }


CAPTION_TARGETS = {"coca_ViT-B-32": 25.0, "coca_ViT-L-14": 12.0}


def captioner_costs_entry(c: dict) -> dict:
    """``bench/costs-*.json`` entry: ``caption_s`` (what ``dr plan`` reads) is caption() as the
    pipeline runs it, redraws included; ``decode_s`` one sampled decode without redraws."""
    per = c["per_caption_s"]
    return {
        "caption_s": per["caption"],
        "decode_s": per["sampled"],
        "retry_factor": c["caption_vs_sampled"],
        "draws_per_caption": c["draws_per_caption"],
        "params_m": c["params_m"],
        "measured_captions": c["n_images"] * c["k"] * c["rounds"],
    }


def captioning_summary_rows(cap: dict) -> list[tuple]:
    rows = []
    for name, c in cap["models"].items():
        per, target = c["per_caption_s"], CAPTION_TARGETS.get(name, 0)
        rows.append(
            (
                f"Captioning {name}: `caption()` (sampled, redraws) vs public `generate` top_p batch pattern",
                f"{_f(per['caption'], 3)} s/caption",
                f"{_f(per['public'], 2)} s/caption",
                f"**{_f(c['ratio_public'], 1)}x**",
                f">= {target:g}x",
                _ok(c["ratio_public"], target),
            )
        )
        rows.append(
            (
                f"Captioning {name}: greedy tokens identical to `generate(top_k=1)`, same batched call",
                "yes" if c["greedy_equal"] else "**NO**",
                "",
                f"{_f(c['ratio_public_greedy'], 1)}x greedy",
                "identical",
                "met" if c["greedy_equal"] else "**missed**",
            )
        )
        rows.append(
            (
                f"Captioning {name}: `caption()` incl. redraws vs one sampled decode",
                f"{_f(per['caption'], 3)} s/caption",
                f"{_f(per['sampled'], 3)} s/caption",
                f"{_f(c['caption_vs_sampled'], 2)}x",
                "<= 1.3x",
                _ok(c["caption_vs_sampled"], 1.3, False),
            )
        )
        rows.append(
            (
                f"Captioning {name}: decoder GFLOP/s vs matmul roof of its step shapes",
                f"{_f(c['decoder_gflops'], 1)} GFLOP/s",
                f"{_f(c['roof']['gflops'], 1)} GFLOP/s",
                f"{_f(c['decoder_vs_roof'], 2)}x",
                ">= 0.8x",
                _ok(c["decoder_vs_roof"], 0.8),
            )
        )
    return rows


def render_captioning(cap: dict) -> list[str]:
    L = [
        "## 1. CoCa captioning",
        "",
        "Random-init open_clip CoCas (`init_uninitialized` fills the vocabulary projection open_clip leaves "
        "empty), seq_len 30, min_len 5, one torch thread, all paths on the same image batch, interleaved per "
        "round. **Public pattern** = `model.generate(imgs, generation_type='top_p', top_p=0.9, "
        "fixed_output_length=True)` on the whole batch, one call per caption index (every call costs the same: "
        "it always runs to seq_len, so one call, in the first round, is timed unless `--full`); its greedy twin "
        "(`top_k=1`, same call) gives the token check. **Ours** = `Captioner.caption()` exactly as the pipeline "
        "calls it (seeded top_p 0.9, degenerate draws redrawn inside the batched decode, up to 3 draws).",
        "",
    ]
    for name, c in cap["models"].items():
        t, per, fl, rd = c["times"], c["per_caption_s"], c["flops_per_caption"], c["redraws"]

        def ts(key, t=t):
            return ", ".join(_f(x, 1) for x in t[key])

        L += [
            f"### {name} ({c['params_m']} M params), {c['n_images']} images x {c['k']} captions",
            "",
            "| path | measured (s) | s per caption | captions/s | vs public |",
            "|---|---|---|---|---|",
            f"| public `generate` top_p, batch {c['n_images']}, per caption index | {ts('public')} | "
            f"{_f(per['public'], 3)} | {_f(1 / per['public'], 2)} | 1x |",
            f"| public `generate` greedy, same call | {ts('public_greedy')} | {_f(per['public_greedy'], 3)} | "
            f"{_f(1 / per['public_greedy'], 2)} | - |",
            f"| ours `caption()`: encode once + one batched decode with redraws | {ts('caption')} | "
            f"{_f(per['caption'], 4)} | {_f(1 / per['caption'], 1)} | **{_f(c['ratio_public'], 1)}x** |",
            f"| ours, one sampled decode (attempt 0, no redraws) | {ts('sampled')} | {_f(per['sampled'], 4)} | "
            f"{_f(1 / per['sampled'], 1)} | {_f(c['ratio_public_sampled'], 1)}x |",
            f"| ours greedy (vs public greedy) | {ts('greedy')} | {_f(per['greedy'], 4)} | {_f(1 / per['greedy'], 1)} | "
            f"{_f(c['ratio_public_greedy'], 1)}x |",
            "",
            f"- Greedy tokens identical to the public greedy call: **{c['greedy_equal']}** (`torch.equal`, "
            f"{c['n_images']} rows x {c['seq_len']} tokens; rows ran {c['mean_steps']} decoder steps on average).",
            f"- Redraws: {rd['attempts']} draws for {c['n_images'] * c['k']} captions ({rd['resampled']} redraws, "
            f"rejected {rd['rejected']}, {rd['kept']} kept), {_f(c['row_steps_per_caption'], 1)} decoder row-steps "
            f"per caption vs {c['mean_steps']} for one full draw: `caption()` = **{_f(c['caption_vs_sampled'], 2)}x** "
            "one sampled decode (target <= 1.3x). Random weights make nearly every draw degenerate ('migos migos "
            "migos'); the in-decode rule gives a draw up at its first final repeated word, so a redraw costs a "
            "few steps of one row, and a row whose three draws all fail stops early. While fewer than "
            f"{rd.get('speculate_rows', '-')} slots are busy, free slots start rows' next draws before the "
            f"current draw's verdict: {rd.get('speculated', 0)} draws started early, "
            f"{rd.get('wasted_row_steps', 0)} row-steps spent on draws a caption did not need (captions, "
            "rejections and attempts are those of drawing one after the other: tests). What is left of the "
            "gap is the tail: rows whose draws all run long decode one after the other at a few rows per step, "
            "and a step streams every weight whatever its row count (1 row costs 40% of 20 here).",
            f"- FLOPs per caption (matmuls + attention, `dr_pipeline.models.decode_cost`, checked against torch's "
            f"FlopCounterMode in tests): public {_f(fl['public'] / 1e9, 1)} GFLOP, ours {_f(fl['ours'] / 1e9, 2)} "
            f"GFLOP (image encoder {_f(fl['image'] / 1e9, 1)} GFLOP per image, shared by {c['k']} captions): "
            f"**{_f(c['flop_ratio'], 1)}x fewer**. Achieved: public {_f(c['public_gflops'], 1)} GFLOP/s.",
            f"- Machine limit: plain torch matmuls of one decoder step's shapes ({c['roof']['rows']} rows, "
            f"context {c['roof']['ctx']}, the model's own weights) run at {_f(c['roof']['gflops'], 1)} GFLOP/s "
            f"(median of the rounds: {', '.join(_f(x * 1e3, 0) for x in t['roof_step'])} ms per step). Our "
            f"greedy decode alone (images encoded beforehand: {ts('decode_greedy')} s) runs "
            f"{_f(c['decoder_gflops'], 1)} GFLOP/s = **{_f(c['decoder_vs_roof'], 2)}x of the roof** (target >= 0.8).",
            "",
        ]
    return L


def captioning_notes(cap: dict) -> list[str]:
    out = []
    for name, c in cap["models"].items():
        target = CAPTION_TARGETS.get(name, 0)
        if not c["greedy_equal"]:
            out.append(f"{name}: greedy tokens differ from `generate`: investigate before trusting the decoder.")
        if c["ratio_public"] < target:
            out.append(
                f"{name}: `caption()` is {c['ratio_public']:.1f}x the public pattern, under the {target:g}x "
                f"target by {100 * (1 - c['ratio_public'] / target):.0f}%. The FLOP ratio is "
                f"{c['flop_ratio']:.1f}x, and the public call runs its large prefix matmuls at "
                f"{c['public_gflops']:.0f} GFLOP/s where our {c['n_images'] * c['k']}-row steps reach "
                f"{c['decoder_gflops']:.0f} ({c['decoder_vs_roof']:.2f}x of the fp32 matmul roof of those "
                "shapes), so the ratio cannot pass FLOP ratio x efficiency ratio without fewer FLOPs "
                "per caption (the vocabulary projection, which exact top-p needs in full, is 23% of a B-32 "
                "step and 17% of an L-14 one) or lower precision (this CPU has no bf16 matmul units; on CUDA the decoder "
                f"runs bf16), plus the redraws' {c['caption_vs_sampled']:.2f}x."
            )
        if c["caption_vs_sampled"] > 1.3:
            out.append(
                f"{name}: `caption()` costs {c['caption_vs_sampled']:.2f}x one sampled decode (target 1.3x): the "
                "serial tail of rows whose draws all run long, at a few rows per step (section 1)."
            )
        if c["decoder_vs_roof"] < 0.8:
            out.append(
                f"{name}: decoder at {c['decoder_vs_roof']:.2f}x of the matmul roof, under 0.8x: the rest "
                "is layer norms, GELU, residual adds, cache writes and token picking at "
                f"{c['n_images'] * c['k']} rows per step."
            )
    return out


# --------------------------------------------------------------------------- model load

LOAD_SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
import open_clip
from dr_pipeline.memory import peak_rss_bytes
from dr_pipeline.models.teachers import create_from_checkpoint
name, path, how = sys.argv[1:4]
rss0 = peak_rss_bytes() / 1024
t = time.perf_counter()
if how == "open_clip":
    m = open_clip.create_model(name, pretrained=path)
else:
    m = create_from_checkpoint(name, path)
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "peak_rss_mb": peak_rss_bytes() / 2**20,
                  "import_rss_mb": rss0 / 1024, "params_m": sum(p.numel() for p in m.parameters()) / 1e6}))
"""


def _write_random_checkpoint(name: str, path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    from dr_pipeline.models.tiny import init_uninitialized

    if path.is_file():
        return
    log(f"load: writing a random-init checkpoint of {name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = open_clip.create_model(name)
        init_uninitialized(m)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    del m
    gc.collect()


def bench_load(work: Path, quick: bool, rounds: int = 2) -> dict:
    """Model load from a local safetensors file, each in a fresh subprocess (clean RSS):
    ``open_clip.create_model(name, pretrained=path)`` (random init of every weight, then a copy of
    the state dict into it) vs ``create_from_checkpoint`` (no init, the file's tensors assigned),
    alternating. The file is read once beforehand, so both read it from the page cache."""
    import subprocess

    names = ["ViT-B-32", "coca_ViT-B-32"] + ([] if quick else ["coca_ViT-L-14"])
    out = {}
    for name in names:
        path = work / f"load-{name}.safetensors"
        _write_random_checkpoint(name, path)
        path.read_bytes()
        runs: dict[str, list[dict]] = {"open_clip": [], "ours": []}
        for r in range(1 if quick else rounds):
            for how in ("open_clip", "ours"):
                log(f"load: {name} via {how} (round {r + 1})")
                p = subprocess.run(
                    [sys.executable, "-c", LOAD_SCRIPT, name, str(path), how],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    check=True,
                )
                runs[how].append(json.loads(p.stdout.strip().splitlines()[-1]))
        m = {
            how: {
                "s": statistics.mean(x["s"] for x in v),
                "peak_rss_mb": max(x["peak_rss_mb"] for x in v),
                "import_rss_mb": v[0]["import_rss_mb"],
            }
            for how, v in runs.items()
        }
        out[name] = {
            "runs": runs,
            **m,
            "params_m": round(runs["ours"][0]["params_m"], 1),
            "file_mb": round(path.stat().st_size / 2**20),
            "ratio": m["open_clip"]["s"] / m["ours"]["s"],
        }
        path.unlink()
    return out


def load_summary_rows(ld: dict) -> list[tuple]:
    return [
        (
            f"Model load {name} ({v['file_mb']} MB safetensors): no random init vs `open_clip.create_model`",
            f"{_f(v['ours']['s'], 2)} s, {_f(v['ours']['peak_rss_mb'], 0)} MB peak RSS",
            f"{_f(v['open_clip']['s'], 2)} s, {_f(v['open_clip']['peak_rss_mb'], 0)} MB",
            f"**{_f(v['ratio'], 1)}x**",
            ">= 2x",
            _ok(v["ratio"], 2),
        )
        for name, v in ld.items()
    ]


def render_load(ld: dict) -> list[str]:
    L = [
        "## Model load",
        "",
        "Each load in a fresh subprocess (peak RSS = `VmHWM` of that process, which includes the ~"
        f"{_f(next(iter(ld.values()))['ours']['import_rss_mb'], 0)} MB of torch + open_clip imports), alternating, "
        "the checkpoint in the page cache. Before: `open_clip.create_model(name, pretrained=path)` runs the "
        "random init of every weight, then loads the state dict and copies it in. After: "
        "`teachers.create_from_checkpoint` (the path `load_model` takes for every local checkpoint, teachers "
        "and captioners) builds the model with init skipped (untouched `torch.empty`), and open_clip's "
        "`load_checkpoint` assigns the file's tensors, read straight to the target device, as the parameters.",
        "",
        "| model | params (M) | file | before: s, peak RSS | after: s, peak RSS | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in ld.items():
        L.append(
            f"| {name} | {v['params_m']} | {v['file_mb']} MB | {', '.join(_f(x['s'], 2) for x in v['runs']['open_clip'])} s, "
            f"{_f(v['open_clip']['peak_rss_mb'], 0)} MB | {', '.join(_f(x['s'], 2) for x in v['runs']['ours'])} s, "
            f"{_f(v['ours']['peak_rss_mb'], 0)} MB | **{_f(v['ratio'], 1)}x** |"
        )
    return L + [""]


def load_notes(ld: dict) -> list[str]:
    return [f"Model load {name}: {v['ratio']:.1f}x, under the 2x target." for name, v in ld.items() if v["ratio"] < 2]


# --------------------------------------------------------------------------- 2. teacher text towers / costs

CAPTION_WORDS = (
    "a the man woman dog cat child riding sitting standing on in with next to bike street table red "
    "blue green white black large small of near grass field two three people group photo view "
    "building car train water beach snow mountain food plate"
).split()


def captions(n: int, seed: int = 0, lo: int = 5, hi: int = 16) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _teacher(name: str, device: str):
    import open_clip

    from dr_pipeline.config import TeacherSpec
    from dr_pipeline.models.teachers import Teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, device=device).eval().requires_grad_(False)
    cfg = open_clip.get_model_config(name)
    spec = TeacherSpec(id=name, model=name, pretrained="random-init", image_size=cfg["vision_cfg"]["image_size"])
    return Teacher(spec, model, open_clip.get_tokenizer(name), device)


def bench_text(device: str, name: str, n_texts: int, rounds: int) -> dict:
    """Length-bucketed unpadded text tower vs the full-context (padded) open_clip encode_text."""
    import torch.nn.functional as F

    log(f"text towers: building {name}")
    t = _teacher(name, device)
    texts = captions(n_texts, seed=1)
    tokens = t.tokenizer(texts)

    def padded():
        with torch.inference_mode():
            return F.normalize(t.model.encode_text(tokens.to(t.device)).float(), dim=-1)

    times = {"bucketed": [], "padded": []}
    for r in range(rounds):
        log(f"text towers round {r + 1}/{rounds}")
        dt, a = timed(lambda: t.encode_texts(texts), device)
        times["bucketed"].append(dt)
        dt, b = timed(padded, device)
        times["padded"].append(dt)
    n_tok = [int(p) + 1 for p in tokens.argmax(dim=-1)]
    out = {
        "model": name,
        "n_texts": n_texts,
        "context_length": tokens.shape[1],
        "mean_tokens": statistics.mean(n_tok),
        "times": times,
        "bucketed_s": statistics.mean(times["bucketed"]),
        "padded_s": statistics.mean(times["padded"]),
        "max_abs_diff": float((a - b).abs().max()),
    }
    out["ratio"] = out["padded_s"] / out["bucketed_s"]
    gc.collect()
    return out


def measure_teacher_costs(name: str, device: str, n_images: int, n_texts: int) -> dict:
    log(f"costs: teacher {name}")
    t = _teacher(name, device)
    views = _images(n_images, t.image_size, seed=2)
    texts = captions(n_texts, seed=3)
    t.encode_images(views[:1])
    di, _ = timed(lambda: t.encode_images(views), device)
    dt, _ = timed(lambda: t.encode_texts(texts), device)
    out = {
        "image_s": di / n_images,
        "text_s": dt / n_texts,
        "measured_images": n_images,
        "measured_texts": n_texts,
        "params_m": round(sum(p.numel() for p in t.model.parameters()) / 1e6, 1),
    }
    gc.collect()
    return out


def measure_captioner_costs(name: str, device: str, n_images: int, k: int) -> dict:
    """Seconds per synthetic caption as ``caption()`` runs it (image encode once per image, seeded
    top_p 0.9, seq 30, redraws of degenerate draws included): ``caption_s``; ``decode_s`` is one
    sampled decode without redraws, ``retry_factor`` their ratio."""
    from dr_pipeline.models.captioner import row_uniforms

    log(f"costs: captioner {name}")
    c = _coca(name, device)
    s = c.spec.sampling
    views = _images(n_images, c.image_size, seed=4)
    rows = torch.arange(n_images).repeat_interleave(k)
    u = torch.from_numpy(
        np.stack([row_uniforms(0, f"i{i}", j, 0, s.max_len, c.id) for i in range(n_images) for j in range(k)])
    )
    dt, tok = timed(lambda: c.decode(c.encode_images(views), u, rows=rows), device)
    dc, cap = timed(lambda: c.caption(views, [f"i{i}" for i in range(n_images)], 0, k), device)
    out = {
        "caption_s": dc / (n_images * k),
        "decode_s": dt / (n_images * k),
        "retry_factor": dc / dt,
        "draws_per_caption": cap.attempts / (n_images * k),
        "measured_captions": n_images * k,
        "mean_tokens": round(float((tok != c.pad).sum(dim=1).float().mean()), 1),
        "params_m": round(sum(p.numel() for p in c.model.parameters()) / 1e6, 1),
    }
    gc.collect()
    return out


# --------------------------------------------------------------------------- 3. pipeline efficiency

JOB_YAML = """\
input:
  urls: {corpus}/tar/shard-{{00000..{last:05d}}}.tar
output:
  path: {out}
teachers: {teachers}
seed: 0
aug:
  n_aug: 4
  size: 224
  flip: false
captions:
  k: 5
execution:
  num_cpus: 2
  min_actors: 1
  max_actors: 1
  cpus_per_actor: {threads}
  batch_size: 16
  max_attempts: 1
  device: {device}
"""


def _setup_pipeline(work: Path, n_shards: int, per_shard: int, threads: int, device: str):
    from dr_pipeline.config import load_job
    from dr_pipeline.corpus.synthetic import make_corpus
    from dr_pipeline.execute.runner import resolve_ensemble
    from dr_pipeline.models.tiny import make_tiny_checkpoints

    teachers = work / "teachers"
    if not teachers.exists():
        shutil.copytree(ROOT / "teachers" / "models", teachers / "models")
        shutil.copy(ROOT / "teachers" / "tiny.yaml", teachers / "tiny.yaml")
    make_tiny_checkpoints(str(teachers / "tiny.yaml"))
    corpus = work / "corpus"
    if not corpus.exists():
        make_corpus(str(corpus), n_shards=n_shards, per_shard=per_shard, seed=0, formats=("tar",))
    jobs = {}
    for name in ("ray", "stages"):
        path = work / f"job-{name}.yaml"
        path.write_text(
            JOB_YAML.format(
                corpus=corpus,
                last=n_shards - 1,
                out=work / f"ds-{name}",
                teachers=teachers / "tiny.yaml",
                threads=threads,
                device=device,
            )
        )
        jobs[name] = load_job(path)
    return jobs, resolve_ensemble(jobs["ray"])


def run_stages_alone(job, ensemble, device: str) -> dict:
    """The pipeline's stages one after another, nothing overlapped: model load, then per shard
    read+decode+augment, model compute, Parquet write (the same functions the actor runs)."""
    from dr_pipeline.corpus.readers import expand_urls, shard_name
    from dr_pipeline.execute.shard_worker import ShardProcessor
    from dr_pipeline.shards.parquet_io import ShardWriter

    t = {"load": 0.0, "cpu": 0.0, "model": 0.0, "write": 0.0}
    dt, proc = timed(lambda: ShardProcessor(job, ensemble), device)
    t["load"] = dt
    urls = expand_urls(job.input.urls, job.input.storage_options)
    out = Path(job.output.path)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for url in urls:
        dt, batches = timed(lambda url=url: list(proc.batches(url)), device)
        t["cpu"] += dt
        counters = {c.id: Counter() for c in proc.captioners}
        dt, rows = timed(
            lambda bs=batches, cr=counters: [proc.reinforce(b.prepared, cr) for b in bs if b.prepared], device
        )
        t["model"] += dt
        n += sum(len(r) for r in rows)

        def write(url=url, rows=rows):
            name = shard_name(url)
            w = ShardWriter(
                str(out / f"{name}.parquet"),
                proc.layout,
                proc.file_metadata(name, "bench"),
                job.output.compression_level,
            )
            for r in rows:
                w.write(r)
            w.close()

        dt, _ = timed(write, device)
        t["write"] += dt
    t["sum"] = sum(t.values())
    t["samples"] = n
    gc.collect()
    return t


def bench_pipeline(work: Path, n_shards: int, per_shard: int, threads: int, device: str, ray_rounds: int) -> dict:
    """Stages alone, then (Ray job, stages alone) x ray_rounds: each Ray run is compared with the
    mean of the stage runs just before and just after it (bracketing absorbs load drift)."""
    import ray

    from dr_pipeline.execute.runner import run_job

    log(f"pipeline: corpus of {n_shards} shards x {per_shard} samples, tiny ensemble")
    jobs, ens = _setup_pipeline(work, n_shards, per_shard, threads, device)

    def stages_alone(i: int) -> dict:
        log(f"pipeline: stages alone ({i})")
        shutil.rmtree(jobs["stages"].output.path, ignore_errors=True)
        return run_stages_alone(jobs["stages"], ens, device)

    stages = [stages_alone(1)]
    runs = []
    for r in range(max(ray_rounds, 1)):
        log(f"pipeline: dr reinforce on a local Ray, 1 actor ({r + 1}/{ray_rounds})")
        shutil.rmtree(jobs["ray"].output.path, ignore_errors=True)
        # Ray started here, as run_job would start it, so its start-up time can be reported apart
        t_init, _ = timed(
            lambda: ray.init(
                num_cpus=jobs["ray"].execution.num_cpus,
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=True,
            )
        )
        dt, report = timed(lambda: run_job(jobs["ray"], ens, force=True, executor="ray"), device)
        dt += t_init
        if ray.is_initialized():
            ray.shutdown()
        if report.failed:
            raise RuntimeError(f"bench pipeline: shards failed: {report.failed}")
        stages.append(stages_alone(r + 2))
        ref = {k: (stages[-2][k] + stages[-1][k]) / 2 for k in ("load", "cpu", "model", "write", "sum")}
        committed = [report.manifest.shards[n] for n in report.committed]
        actor = sum(e.seconds for e in committed)
        runs.append(
            {
                "wall": dt,
                "ray_init": t_init,
                "actor_shard_seconds": actor,
                "samples": sum(e.n_written for e in committed),
                "stage_sum": ref["sum"],
                "overhead_job": dt / ref["sum"] - 1,
                "overhead_steady": actor / (ref["sum"] - ref["load"]) - 1,
                "model_share": ref["model"] / actor,
            }
        )
    mean = {k: statistics.mean(x[k] for x in stages) for k in ("load", "cpu", "model", "write", "sum")}
    return {
        "n_shards": n_shards,
        "per_shard": per_shard,
        "samples": runs[0]["samples"],
        "threads": threads,
        "stages": mean,
        "stage_runs": stages,
        "ray_runs": runs,
        "ray": {
            k: statistics.mean(x[k] for x in runs) for k in ("wall", "ray_init", "actor_shard_seconds", "stage_sum")
        },
        "overhead_job": statistics.mean(x["overhead_job"] for x in runs),
        "overhead_steady": statistics.mean(x["overhead_steady"] for x in runs),
        "model_share": statistics.mean(x["model_share"] for x in runs),
        "dataset": str(Path(jobs["ray"].output.path)),
        "corpus": str(work / "corpus"),
    }


# --------------------------------------------------------------------------- 4. storage


def _synthetic_rows(n: int, n_aug: int, dims: list[int], k: int, seed: int = 0):
    import torch.nn.functional as F

    from dr_pipeline import augment
    from dr_pipeline.config import AugSpec
    from dr_pipeline.shards.parquet_io import ReinforcedRows

    spec = AugSpec(n_aug=n_aug)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    sizes = rng.integers(200, 1600, size=(n, 2))
    caps = captions(n * (1 + k), seed=seed)
    rows = ReinforcedRows(
        keys=[f"{i:09d}" for i in range(n)],
        uids=[f"{rng.integers(2**63):032x}" for _ in range(n)],
        urls=[f"https://images.example.com/{rng.integers(2**40):x}/photo_{i}.jpg" for i in range(n)],
        image_sha256=[f"{rng.integers(2**63):016x}" * 4 for _ in range(n)],
        widths=[int(w) for w, _ in sizes],
        heights=[int(h) for _, h in sizes],
        captions=caps[:n],
        aug_params=np.stack(
            [augment.pack(augment.sample_all(spec, seed, f"{i:09d}", int(w), int(h))) for i, (w, h) in enumerate(sizes)]
        ),
    )
    rows.syn["coca"] = [caps[n + i * k : n + (i + 1) * k] for i in range(n)]

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(torch.bfloat16)

    for ti, d in enumerate(dims):
        t = f"teacher{ti}"
        rows.image_emb[t] = unit(n, n_aug, d)
        rows.text_emb[t] = unit(n, d)
        rows.syn_emb[t] = {"coca": [unit(k, d) for _ in range(n)]}
    return rows, spec


def measure_storage(rows, spec, dims: list[int], k: int) -> dict:

    from dr_pipeline.config import to_dict
    from dr_pipeline.shards.datacompdr import write_datacompdr_tar
    from dr_pipeline.shards.parquet_io import ShardWriter, column_bytes
    from dr_pipeline.shards.schema import ShardLayout, TeacherLayout

    n = len(rows)
    teachers = [f"teacher{i}" for i in range(len(dims))]
    layout = ShardLayout(spec.n_aug, tuple(TeacherLayout(t, d) for t, d in zip(teachers, dims)), ("coca",))
    meta = {"teachers": [{"id": t} for t in teachers], "captioners": [{"id": "coca"}], "aug": to_dict(spec)}
    buf = io.BytesIO()
    w = ShardWriter(buf, layout, meta)
    for i in range(0, n, 256):
        w.write(rows.slice(slice(i, i + 256)))
    w.close()
    data = buf.getvalue()
    cols = column_bytes(io.BytesIO(data))
    emb_values = n * sum(d * (spec.n_aug + 1 + k) for d in dims)
    emb_bytes = sum(v for c, v in cols.items() if c.startswith("emb__"))
    str_cols = ("key", "uid", "url", "image_sha256", "caption", "syn__coca", "width", "height")
    str_raw = (
        sum(len(s.encode()) for col in (rows.keys, rows.uids, rows.urls, rows.image_sha256, rows.captions) for s in col)
        + sum(len(s.encode()) for r in rows.syn["coca"] for s in r)
        + 8 * n
    )
    tar = io.BytesIO()
    write_datacompdr_tar(tar, rows, meta)
    dcdr = tar.getvalue()
    # DataCompDR members, without the tar framing, for the per-value comparison
    import tarfile

    members: dict[str, int] = Counter()
    with tarfile.open(fileobj=io.BytesIO(dcdr)) as tf:
        for m in tf:
            members[m.name.split(".", 1)[1]] += m.size
    return {
        "n": n,
        "n_aug": spec.n_aug,
        "dims": dims,
        "k": k,
        "file_bytes": len(data),
        "bytes_per_sample": len(data) / n,
        "bf16_values": emb_values,
        "emb_bytes": emb_bytes,
        "bf16_bytes_per_value": emb_bytes / emb_values,
        "bf16_vs_raw": emb_bytes / (2 * emb_values),
        "aug_bytes_per_aug": cols["aug_params"] / (n * spec.n_aug),
        "string_bytes": sum(cols[c] for c in str_cols),
        "string_raw": str_raw,
        "string_ratio": sum(cols[c] for c in str_cols) / str_raw,
        "columns": cols,
        "dcdr_bytes_per_sample": len(dcdr) / n,
        "dcdr_members": dict(members),
        "dcdr_npz_bytes_per_value": members["npz"] / emb_values,
        "dcdr_paug_bytes_per_aug": members["paug.json"] / (n * spec.n_aug),
        "ratio_per_sample": len(dcdr) / len(data),
    }


def bench_storage(n: int, dataset: str | None) -> dict:
    log(f"storage: {n} synthetic rows at DFNDR-2B dims and at DataCompDR-12M dims")
    out = {}
    for label, n_aug, dims in (
        ("DFNDR-2B shape (2 x 768, n_aug 2, k 5)", 2, [768, 768]),
        ("DataCompDR-12M shape (2 x 768, n_aug 30, k 5)", 30, [768, 768]),
    ):
        rows, spec = _synthetic_rows(n if n_aug < 10 else max(n // 4, 64), n_aug, dims, 5)
        out[label] = measure_storage(rows, spec, dims, 5)
    if dataset:
        from dr_pipeline.shards.dataset import ReinforcedDataset
        from dr_pipeline.shards.parquet_io import read_shard
        from dr_pipeline.shards.schema import layout_from_metadata

        ds = ReinforcedDataset(dataset)
        rows_all, meta = None, None
        total = 0
        for name in sorted(ds.markers()):
            url = ds.shard_url(name)
            rows, meta = read_shard(url)
            total += len(rows)
            rows_all = rows if rows_all is None else _concat(rows_all, rows)
        lay = layout_from_metadata(meta)
        from dr_pipeline.config import AugSpec

        spec = AugSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["aug"].items()})
        dims = [t.dim for t in lay.teachers]
        # rename to the measure_storage layout (teacherN / coca): only the byte counts matter
        rows_all.image_emb = {f"teacher{i}": rows_all.image_emb[t.id] for i, t in enumerate(lay.teachers)}
        rows_all.text_emb = {f"teacher{i}": rows_all.text_emb[t.id] for i, t in enumerate(lay.teachers)}
        cap = lay.captioners[0]
        rows_all.syn = {"coca": rows_all.syn[cap]}
        rows_all.syn_emb = {f"teacher{i}": {"coca": rows_all.syn_emb[t.id][cap]} for i, t in enumerate(lay.teachers)}
        k = max((len(r) for r in rows_all.syn["coca"]), default=0)
        m = measure_storage(rows_all, spec, dims, k)
        # variable k: count the values actually stored
        m["bf16_values"] = sum(
            len(rows_all) * d * (spec.n_aug + 1) + d * sum(len(r) for r in rows_all.syn["coca"]) for d in dims
        )
        m["bf16_bytes_per_value"] = m["emb_bytes"] / m["bf16_values"]
        m["bf16_vs_raw"] = m["emb_bytes"] / (2 * m["bf16_values"])
        out[f"pipeline output ({total} rows, tiny teachers {dims}, n_aug {spec.n_aug})"] = m
    return out


def _concat(a, b):
    from dr_pipeline.shards.parquet_io import ReinforcedRows

    return ReinforcedRows(
        a.keys + b.keys,
        a.uids + b.uids,
        a.urls + b.urls,
        a.image_sha256 + b.image_sha256,
        a.widths + b.widths,
        a.heights + b.heights,
        a.captions + b.captions,
        np.concatenate([a.aug_params, b.aug_params]),
        {c: a.syn[c] + b.syn[c] for c in a.syn},
        {t: torch.cat([a.image_emb[t], b.image_emb[t]]) for t in a.image_emb},
        {t: torch.cat([a.text_emb[t], b.text_emb[t]]) for t in a.text_emb},
        {t: {c: a.syn_emb[t][c] + b.syn_emb[t][c] for c in a.syn_emb[t]} for t in a.syn_emb},
    )


# --------------------------------------------------------------------------- 5. trainer loader


def _loader_samples(item: dict) -> int:
    """Samples in one item of the trainer's dataset: a sample, a skip/marker, or a worker chunk."""
    if "slots" in item:
        return sum(1 for slot in item["slots"] if slot[1] is None)
    return int("image" in item and "skip" not in item)


def upscale_corpus(src: Path, dst: Path, factor: float = 2.5, n_shards: int | None = None) -> None:
    """The corpus' tars with every JPEG re-encoded ``factor`` times larger (web-like sizes)."""
    import tarfile

    from PIL import Image

    (dst / "tar").mkdir(parents=True, exist_ok=True)
    for path in sorted((src / "tar").glob("*.tar"))[:n_shards]:
        with tarfile.open(path) as tin, tarfile.open(dst / "tar" / path.name, "w", format=tarfile.USTAR_FORMAT) as tout:
            for m in tin:
                if not m.isfile():
                    continue
                data = tin.extractfile(m).read()
                if m.name.lower().endswith((".jpg", ".jpeg")):
                    im = Image.open(io.BytesIO(data)).convert("RGB")
                    im = im.resize((round(im.width * factor), round(im.height * factor)), Image.BICUBIC)
                    b = io.BytesIO()
                    im.save(b, "JPEG", quality=90)
                    data = b.getvalue()
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tout.addfile(info, io.BytesIO(data))


def web_size_dataset(work: Path, threads: int, device: str, n_shards: int) -> tuple[str, str]:
    """Reinforce the upscaled corpus with the local executor; returns (dataset, job file)."""
    from dr_pipeline.config import load_job
    from dr_pipeline.execute.runner import resolve_ensemble, run_job

    upscale_corpus(work / "corpus", work / "corpus-web", n_shards=n_shards)
    path = work / "job-web.yaml"
    path.write_text(
        JOB_YAML.format(
            corpus=work / "corpus-web",
            last=n_shards - 1,
            out=work / "ds-web",
            teachers=work / "teachers" / "tiny.yaml",
            threads=threads,
            device=device,
        )
    )
    job = load_job(path)
    report = run_job(job, resolve_ensemble(job), force=True, executor="local")
    if report.failed:
        raise RuntimeError(f"bench loader: shards failed: {report.failed}")
    return str(work / "ds-web"), str(path)


def bench_loader(dataset: str, job_file: str, rounds: int, image_size: int = 224, context_length: int = 77) -> dict:
    """Samples/s: the trainer's reinforced loader (join + stored-augmentation replay + embedding
    lookup) vs a plain loader (same base images, same decoder, fresh RRC + RandAugment, GT caption
    tokenized)."""
    from dr_pipeline import augment
    from dr_pipeline.config import load_job
    from dr_pipeline.corpus.readers import Rejected, expand_urls, iter_shard
    from dr_pipeline.images import decode_image

    job = load_job(job_file)
    spec, seed = job.aug, job.seed
    base_urls = expand_urls(job.input.urls, {})
    try:
        from dr_pipeline.train.config import DataConfig
        from dr_pipeline.train.data import JoinedDataset
        from dr_pipeline.train.sources import plan_data
        from dr_pipeline.train.students import tokenize

        cfg = DataConfig(reinforced=dataset, num_workers=0)
        plan = plan_data(cfg)

        def reinforced() -> int:
            ds = JoinedDataset(plan, cfg, seed, image_size, context_length, epochs=1)
            n = sum(_loader_samples(item) for item in ds)
            if n == 0:
                raise RuntimeError("the trainer's JoinedDataset yielded no sample this bench can count")
            return n

        reinforced()
        which = "dr_pipeline.train.data.JoinedDataset (the trainer's loader, num_workers=0)"
    except Exception as e:  # noqa: BLE001 - the trainer is being written: fall back, say so
        from dr_pipeline.shards.parquet_io import read_shard
        from dr_pipeline.train.students import tokenize

        which = f"fallback replay + embedding lookup (trainer loader unavailable: {type(e).__name__}: {e})"

        def reinforced() -> int:
            n = 0
            from dr_pipeline.shards.dataset import ReinforcedDataset

            ds = ReinforcedDataset(dataset)
            for url in base_urls:
                rows, _ = read_shard(ds.shard_url(Path(url).stem))
                index = {k: i for i, k in enumerate(rows.keys)}
                for rec in iter_shard(url, {}):
                    if isinstance(rec, Rejected) or rec.key not in index:
                        continue
                    i = index[rec.key]
                    img = decode_image(rec.image)
                    a = choose(seed, 0, rec.key, spec.n_aug, "aug")
                    p = augment.unpack(rows.aug_params[i])[a]
                    augment.replay(img, p, image_size, spec)
                    {t: e[i, a].float() for t, e in rows.image_emb.items()}
                    tokenize([rows.captions[i]], context_length)
                    n += 1
            return n

    try:  # the augmentation index the trainer picks, so both loaders run the same image ops
        from dr_pipeline.train.sources import choose
    except ImportError:

        def choose(seed, epoch, key, n, what):
            return random.Random(f"{seed}|{epoch}|{what}|{key}").randrange(n)

    def plain() -> int:
        n = 0
        for url in base_urls:
            for rec in iter_shard(url, {}):
                if isinstance(rec, Rejected):
                    continue
                img = decode_image(rec.image)
                p = augment.sample_params(
                    spec, seed, rec.key, choose(seed, 0, rec.key, spec.n_aug, "aug"), img.width, img.height
                )
                augment.replay(img, p, image_size, spec)
                tokenize([rec.caption or ""], context_length)
                n += 1
        return n

    tokenize(["warm up"], context_length)
    plain()  # warm-up (reinforced() ran once above)
    times = {"reinforced": [], "plain": []}
    counts = {}
    for r in range(rounds):
        log(f"loader round {r + 1}/{rounds}")
        dt, counts["reinforced"] = timed(reinforced)
        times["reinforced"].append(dt)
        dt, counts["plain"] = timed(plain)
        times["plain"].append(dt)
    rs = counts["reinforced"] / statistics.mean(times["reinforced"])
    ps = counts["plain"] / statistics.mean(times["plain"])
    return {
        "which": which,
        "image_size": image_size,
        "samples": counts,
        "times": times,
        "reinforced_sps": rs,
        "plain_sps": ps,
        "ratio": rs / ps,
    }


# --------------------------------------------------------------------------- 7. dr train


def _train_dataset(work: Path, n_shards: int, per_shard: int) -> Path:
    """A synthetic corpus (96-320 px JPEGs) reinforced model-free in the product's layout:
    two 64-d teachers, 5 synthetic captions and 10 stored augmentations per image."""
    from dr_pipeline.config import AugSpec
    from dr_pipeline.corpus.synthetic import make_corpus
    from dr_pipeline.train.fake_reinforce import make_fake_reinforced

    make_corpus(str(work / "train-corpus"), n_shards=n_shards, per_shard=per_shard, seed=0, formats=("tar",))
    make_fake_reinforced(
        str(work / "train-corpus" / "tar"),
        str(work / "train-ds"),
        [("ta", 64, 70.0), ("tb", 64, 60.0)],
        captioners=("coca",),
        k=5,
        aug=AugSpec(n_aug=10, size=224),
        seed=0,
    )
    return work / "train-ds"


class _PlainTorchvision(torch.utils.data.Dataset):
    """The baseline a torchvision user writes: PIL decode, RandomResizedCrop + RandAugment (2
    ops, magnitude 9), GT caption tokenized; encoded images held in memory (no I/O at all)."""

    def __init__(self, urls: list[str], size: int, context_length: int):
        from torchvision import transforms as T

        from dr_pipeline.corpus.readers import Sample, iter_shard

        self.items = [(s.image, s.caption or "") for u in urls for s in iter_shard(u, {}) if isinstance(s, Sample)]
        self.tf = T.Compose(
            [
                T.RandomResizedCrop(
                    size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.RandAugment(num_ops=2, magnitude=9),
                T.PILToTensor(),
            ]
        )
        self.context_length = context_length

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        from dr_pipeline.train.students import tokenize

        data, caption = self.items[i]
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return {"image": self.tf(img), "tokens": tokenize([caption], self.context_length)[0]}


def _endless(loader):
    while True:
        yield from loader


def _batches_per_s(it, n: int, warm: int = 8) -> float:
    """Steady state: the first ``warm`` batches (start-up, prefetch buffers filling) are not timed."""
    for _ in range(warm):
        next(it)
    t0 = clock()
    for _ in range(n):
        next(it)
    return n / (clock() - t0)


def bench_train(work: Path, quick: bool = False, image_size: int = 224, batch_size: int = 32) -> dict:
    """``dr train``'s loader (``TrainStream`` at the config default worker count) vs a plain
    torchvision RRC + RandAugment DataLoader with as many workers on the same images; and the
    tiny student's steps/s in ``Trainer.run`` vs the same ``train_step`` fed from memory."""
    from torch.utils.data import DataLoader

    from dr_pipeline.corpus.readers import expand_urls
    from dr_pipeline.train.config import DataConfig, OptimConfig, StudentConfig, TrainConfig
    from dr_pipeline.train.data import TrainStream
    from dr_pipeline.train.distributed import setup
    from dr_pipeline.train.loop import Trainer, lr_at
    from dr_pipeline.train.sources import plan_data
    from dr_pipeline.train.students import tokenize

    n_shards, per_shard = (2, 64) if quick else (4, 64)
    rounds, n_batches = (1, 16) if quick else (5, 48)
    t0 = clock()
    ds = _train_dataset(work, n_shards, per_shard)
    res: dict = {
        "setup_s": clock() - t0,
        "samples": n_shards * per_shard,
        "image_size": image_size,
        "batch_size": batch_size,
        "rounds": rounds,
        "batches_per_round": n_batches,
    }
    default = DataConfig(reinforced=str(ds))
    cached = DataConfig(reinforced=str(ds), cache_images=True)
    workers = default.num_workers
    res["num_workers"] = workers
    res["worker_chunk"] = default.worker_chunk
    plan = plan_data(default)
    base_urls = expand_urls(str(work / "train-corpus" / "tar"), {})
    plain_ds = _PlainTorchvision(base_urls, image_size, 77)
    tokenize(["warm up"], 77)

    def product(cfg: DataConfig) -> float:
        stream = TrainStream(plan, cfg, 0, batch_size, image_size, 77)
        return _batches_per_s(iter(stream), n_batches) * batch_size

    def plain() -> float:
        loader = DataLoader(
            plain_ds,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            prefetch_factor=4 if workers else None,
            persistent_workers=bool(workers),
        )
        return _batches_per_s(_endless(loader), n_batches) * batch_size

    t0 = clock()
    TrainStream(plan, cached, 0, batch_size, image_size, 77)
    res["cache_fill_s"] = clock() - t0
    sps: dict[str, list[float]] = {"default": [], "cache_images": [], "plain": []}
    for r in range(rounds):
        log(f"train loader round {r + 1}/{rounds}")
        sps["default"].append(product(default))
        sps["cache_images"].append(product(cached))
        sps["plain"].append(plain())
    res["loader_sps"] = sps
    # per-round ratios (neighbours in time, so other people's load mostly cancels), then the median
    res["loader_ratio"] = {
        k: statistics.median(a / b for a, b in zip(sps[k], sps["plain"])) for k in ("default", "cache_images")
    }

    # training steps/s: the tiny student (train-tiny.yaml's arch and size) through Trainer.run
    env = setup("cpu")
    steps: dict[str, list[float]] = {"default": [], "cache_images": [], "memory": []}
    n_steps, log_every = (20, 5) if quick else (30, 5)
    step_rounds = 1 if quick else 3
    for r in range(step_rounds):
        log(f"train steps round {r + 1}/{step_rounds}")
        for name, data in (("default", default), ("cache_images", cached)):
            cfg = TrainConfig(
                out_dir=str(work / f"train-run-{name}-{r}"),
                data=data,
                steps=10**6,
                batch_size=batch_size,
                student=StudentConfig(arch="tiny"),
                checkpoint_every=10**6,
                log_every=log_every,
                optim=OptimConfig(warmup_steps=10),
            )
            tr = Trainer(cfg, env)
            with contextlib.redirect_stdout(io.StringIO()):
                tr.run(stop_after=n_steps)
            rates = [row["samples_per_s"] for row in tr.metrics.rows][1:]  # the first interval has startup
            steps[name].append(len(rates) / sum(1 / x for x in rates) / batch_size)
            if name == "default":
                batches = [b for b, _ in itertools.islice(iter(tr.stream), n_steps)]
        t0 = clock()
        for b in batches:
            lr = lr_at(tr.step, tr.cfg.optim, tr.cfg.steps)
            for g in tr.optimizer.param_groups:
                g["lr"] = lr
            parts = tr.train_step(b)
            tr.step += 1
            parts["loss"].detach()
        steps["memory"].append(len(batches) / (clock() - t0))
    res["steps_per_s"] = steps
    res["steps_ratio"] = {
        k: statistics.median(a / b for a, b in zip(steps[k], steps["memory"])) for k in ("default", "cache_images")
    }
    return res


def train_summary_rows(tb: dict | None) -> list[tuple[str, ...]]:
    if not tb:
        return []
    rows = []
    lm, sm = tb["loader_sps"], tb["steps_per_s"]
    for k, label in (("default", "defaults"), ("cache_images", "`cache_images: true`")):
        rows.append(
            (
                f"`dr train` loader ({tb['num_workers']} workers, {label}) vs plain torchvision "
                f"RRC+RandAugment loader, {tb['image_size']} px",
                f"{_f(statistics.median(lm[k]), 1)} samples/s",
                f"{_f(statistics.median(lm['plain']), 1)} samples/s",
                f"{_f(tb['loader_ratio'][k], 2)}x (median of rounds)",
                ">= 0.9x",
                _ok(tb["loader_ratio"][k], 0.9),
            )
        )
    for k, label in (("default", "defaults"), ("cache_images", "`cache_images: true`")):
        rows.append(
            (
                f"`dr train` tiny student steps/s ({label}) vs the same steps fed from memory",
                f"{_f(statistics.median(sm[k]), 2)} steps/s",
                f"{_f(statistics.median(sm['memory']), 2)} steps/s",
                f"{_f(tb['steps_ratio'][k], 2)}x (median of rounds)",
                ">= 0.8x",
                _ok(tb["steps_ratio"][k], 0.8),
            )
        )
    return rows


def train_section(tb: dict | None) -> list[str]:
    if not tb:
        return []
    L = [
        "## 7. `dr train`: loader and training throughput",
        "",
        f"Data: {tb['samples']} synthetic-corpus images (96-320 px JPEGs) reinforced in the product's layout "
        "(`train.fake_reinforce`: 2 teachers x 64-d, 10 stored augmentations, 5 synthetic captions). "
        f"`dr train`'s loader is `TrainStream` with the config defaults ({tb['num_workers']} workers, chunks of "
        f"{tb.get('worker_chunk', 16)}; a batch within one chunk is a view of it, one that spans chunks is "
        "joined with one copy): "
        "join with the reinforcement shard, sha256 check, stored augmentation replayed, embeddings looked up, GT "
        "+ synthetic captions tokenized, batches in order. The baseline is a torchvision `DataLoader` with as many "
        "workers (`RandomResizedCrop(scale=(0.08, 1))` + `RandAugment(2, 9)`, GT caption tokenized, encoded "
        f"images held in memory). Both make {tb['batch_size']}-sample batches at {tb['image_size']} px; samples/s "
        f"after 8 warm-up batches (start-up, prefetch buffers), {tb['batches_per_round']} batches per round, "
        f"median of {tb['rounds']} alternating "
        "rounds. Both tokenize with the project's `tokenize` (open_clip's `SimpleTokenizer` tokens; words "
        "memoized, printable ASCII without ftfy), so the baseline is not slowed by open_clip's own tokenizer. "
        "`cache_images: true` decodes every base image once before the workers fork "
        f"({_f(tb['cache_fill_s'], 1)} s here) and keeps it in memory.",
        "",
        "| loader | samples/s per round |",
        "|---|---|",
    ]
    for k, v in tb["loader_sps"].items():
        L.append(f"| {k} | {', '.join(_f(x, 1) for x in v)} |")
    L += [
        "",
        "Training: the `tiny` student (train-tiny.yaml's arch, 64 px) at batch "
        f"{tb['batch_size']} through `Trainer.run` (steady-state steps/s from its own log intervals, the first "
        "one dropped), vs the same `Trainer.train_step` on batches collected beforehand (fed from memory). On a "
        "CPU-only machine the loader's workers and the training step share the same cores, which the "
        "from-memory loop has to itself.",
        "",
        "| run | steps/s per round |",
        "|---|---|",
    ]
    for k, v in tb["steps_per_s"].items():
        L.append(f"| {k} | {', '.join(_f(x, 2) for x in v)} |")
    L.append("")
    return L


# --------------------------------------------------------------------------- report


def _f(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def _ok(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "met" if ok else "**missed**"


def render(res: dict) -> str:
    m = res["machine"]
    L: list[str] = []
    L += [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {res['date']} ({res['wall_s'] / 60:.1f} min). Do not edit by hand: "
        "re-run `make bench` (it overwrites this file and `bench/costs-<machine>.json`).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores visible, {m['ram_gib']} GiB RAM; GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, open_clip {m['open_clip']}, {m['os']}",
        f"- `torch.set_num_threads({res['threads']})` throughout; device `{m['device']}`",
        f"- load average (1/5/15 min) at start: {res['load_start']}, at end: {res['load_end']} - the machine "
        "is shared with other engineers' test runs, which is why every ratio below is measured side by side, "
        "alternating, in one process",
        "",
        "## Commands",
        "",
        "```",
        res["command"],
        "```",
        "",
        "Same thing: `make bench` (= `.venv/bin/python -m dr_pipeline.bench --out BENCHMARKS.md`). "
        "`--quick` shrinks every section for a smoke run; `--full` measures all 80 public-pattern "
        "`generate` calls and the 80-row batched call instead of a subset (~25 min here).",
        "",
    ]
    rows = []
    c = res.get("captioning") if "models" in (res.get("captioning") or {}) else None
    if c:
        rows += captioning_summary_rows(c)
    if res.get("load"):
        rows += load_summary_rows(res["load"])
    tx = res.get("text")
    if tx:
        rows.append(
            (
                f"Teacher text tower ({tx['model']}): length-bucketed vs full context",
                f"{_f(tx['bucketed_s'] / tx['n_texts'] * 1e3)} ms/caption",
                f"{_f(tx['padded_s'] / tx['n_texts'] * 1e3)} ms/caption",
                f"{_f(tx['ratio'], 1)}x",
                "-",
                "-",
            )
        )
    p = res.get("pipeline")
    if p:
        rows.append(
            (
                "Pipeline: `dr reinforce` on local Ray vs sum of stages alone (whole job)",
                f"{_f(p['ray']['wall'], 1)} s",
                f"{_f(p['ray']['stage_sum'], 1)} s",
                f"{_f(100 * p['overhead_job'], 1)}% overhead",
                "<= 10%",
                _ok(p["overhead_job"], 0.10, False),
            )
        )
        rows.append(
            (
                "Pipeline: per-shard time in the actor vs stages alone (no Ray start / model load)",
                f"{_f(p['ray']['actor_shard_seconds'], 1)} s",
                f"{_f(p['stages']['sum'] - p['stages']['load'], 1)} s",
                f"{_f(100 * p['overhead_steady'], 1)}% overhead",
                "<= 10%",
                _ok(p["overhead_steady"], 0.10, False),
            )
        )
        rows.append(
            (
                "Pipeline: model time / pipeline time (utilisation proxy, CPU)",
                f"{_f(p['stages']['model'], 1)} s models-only",
                f"{_f(p['ray']['actor_shard_seconds'], 1)} s in actor",
                f"{_f(p['model_share'], 2)}",
                ">= 0.85 (GPU)",
                "n/a: no GPU lent" if m["device"] != "cuda" else _ok(p["model_share"], 0.85),
            )
        )
    st = res.get("storage")
    if st:
        key = next(iter(st))
        s0 = st[key]
        rows.append(
            (
                f"Storage, {key}: bytes/sample vs DataCompDR fp32 npz + JSON tar",
                f"{_f(s0['bytes_per_sample'], 0)} B",
                f"{_f(s0['dcdr_bytes_per_sample'], 0)} B",
                f"{_f(s0['ratio_per_sample'], 2)}x smaller",
                "-",
                "-",
            )
        )
        worst = max(v["bf16_vs_raw"] for v in st.values())
        rows.append(
            (
                "Storage: bf16 embedding bytes on disk / raw 2 B per value (worst case below)",
                f"{_f(2 * worst, 3)} B/value",
                "2 B/value",
                f"{_f(worst, 3)}x",
                "<= 1.02x",
                _ok(worst, 1.02, False),
            )
        )
        worst_aug = max(v["aug_bytes_per_aug"] for v in st.values())
        rows.append(
            (
                "Storage: augmentation params per augmentation (worst case below)",
                f"{_f(worst_aug, 1)} B",
                f"{_f(s0['dcdr_paug_bytes_per_aug'], 1)} B (paug.json)",
                f"{_f(s0['dcdr_paug_bytes_per_aug'] / worst_aug, 1)}x smaller",
                "<= 16 B",
                _ok(worst_aug, 16, False),
            )
        )
    for label, ld in (res.get("loader") or {}).items():
        rows.append(
            (
                f"Trainer loader, {label}: reinforced replay vs plain fresh RRC+RandAugment",
                f"{_f(ld['reinforced_sps'], 1)} samples/s",
                f"{_f(ld['plain_sps'], 1)} samples/s",
                f"{_f(ld['ratio'], 2)}x",
                ">= 0.9x",
                _ok(ld["ratio"], 0.9),
            )
        )
    rows += train_summary_rows(res.get("train"))
    L += ["## Summary", "", "| benchmark | ours | baseline | ratio | target | |", "|---|---|---|---|---|---|"]
    L += [f"| {' | '.join(r)} |" for r in rows]
    L += [""]

    if c:
        L += render_captioning(c)
    if res.get("load"):
        L += render_load(res["load"])
    if tx:
        L += [
            "## 2. Teacher text towers: length bucketing",
            "",
            f"`{tx['model']}` text tower, {tx['n_texts']} captions of {tx['mean_tokens']:.1f} tokens on average "
            f"(context {tx['context_length']}). Ours: captions sorted by length, sub-batches of "
            "`text_batch_size`, each run only up to its longest caption's end-of-text (causal mask + argmax "
            "pooling make the cut exact; tests assert equality). Baseline: open_clip `encode_text` on the "
            f"padded context. Bucketed {', '.join(_f(x, 2) for x in tx['times']['bucketed'])} s vs padded "
            f"{', '.join(_f(x, 2) for x in tx['times']['padded'])} s: **{_f(tx['ratio'], 1)}x**; max |difference| "
            f"of the unit embeddings {tx['max_abs_diff']:.1e}.",
            "",
        ]
    if p:
        s = p["stages"]
        L += [
            "## 3. Pipeline efficiency",
            "",
            f"Synthetic corpus, {p['n_shards']} shards x {p['per_shard']} samples (JPEG), tiny ensemble "
            "(`teachers/tiny.yaml`: 2 teachers + tiny CoCa, k 5, n_aug 4 at 224 px), one Ray actor with "
            f"`cpus_per_actor: {p['threads']}` (= its torch threads), `decode_threads: 2`, batch 16. "
            "`dr reinforce` = `run_job(..., executor='ray')`, timed from planning to manifest (Ray start, actor "
            "start, model load, all shards, commit). Stages alone = the same functions the actor calls, one "
            "after another in this process, nothing overlapped: `ShardProcessor(...)` (model load), "
            "`batches()` (read + decode + augment), `reinforce()` (models), `ShardWriter` (Parquet).",
            "",
            f"| stage alone | seconds (mean of {len(p['stage_runs'])} runs) |",
            "|---|---|",
            f"| model load | {_f(s['load'])} |",
            f"| read + decode + augment | {_f(s['cpu'])} |",
            f"| models (captioner + teachers) | {_f(s['model'])} |",
            f"| Parquet write | {_f(s['write'])} |",
            f"| **sum** | **{_f(s['sum'])}** |",
            "",
            "| run | `dr reinforce` wall | in the actor (shards only) | stage sum, mean of the runs before and after "
            "| whole-job overhead | per-shard overhead |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(p["ray_runs"]):
            L.append(
                f"| Ray run {i + 1} | {_f(r['wall'])} s | {_f(r['actor_shard_seconds'])} s | {_f(r['stage_sum'])} s | "
                f"{_f(100 * r['overhead_job'], 1)}% | {_f(100 * r['overhead_steady'], 1)}% |"
            )
        L += [
            "",
            f"Mean whole-job overhead **{_f(100 * p['overhead_job'], 1)}%** (target <= 10%); inside the actor "
            f"(shards only, no Ray start / actor start / model load) {_f(100 * p['overhead_steady'], 1)}% "
            "(negative = the prefetch thread overlapped decoding with model compute). Stage sums of the "
            f"{len(p['stage_runs'])} stage-alone runs: {', '.join(_f(x['sum'], 1) for x in p['stage_runs'])} s "
            "(their spread is the shared machine's load).",
            "",
            f"Utilisation proxy: models-only time / time inside the actor = {_f(p['model_share'], 2)}. "
            + (
                "No GPU was lent to this session, so the accelerator-utilisation target (>= 0.85 vs a models-only "
                "loop on GPU) was not measured; on CPU the decode threads compete with the model for the same 2 "
                "cores, so this number is not that metric."
                if m["device"] != "cuda"
                else ""
            ),
            "",
        ]
    if st:
        L += [
            "## 4. Storage",
            "",
            "Random unit vectors in bf16 (random-init teachers: the realistic worst case, trained embeddings "
            "compress a little better), real augmentation params (`augment.sample_all`), caption-like strings. "
            "Ours: `ShardWriter` (zstd 3, BYTE_STREAM_SPLIT on the uint16 leaves, no dictionaries, statistics "
            "only on `key`). DataCompDR: `dr export`'s tar of the same rows (fp32 npz + JSON members).",
            "",
            "| content | ours B/sample | DataCompDR B/sample | ratio | ours B per bf16 value | npz B/value | "
            "ours B/aug | paug.json B/aug | strings (compressed/raw) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, v in st.items():
            L.append(
                f"| {label} | {_f(v['bytes_per_sample'], 0)} | {_f(v['dcdr_bytes_per_sample'], 0)} | "
                f"{_f(v['ratio_per_sample'], 2)}x | {_f(v['bf16_bytes_per_value'], 3)} ({_f(v['bf16_vs_raw'], 3)}x raw) | "
                f"{_f(v['dcdr_npz_bytes_per_value'], 2)} | {_f(v['aug_bytes_per_aug'], 1)} | "
                f"{_f(v['dcdr_paug_bytes_per_aug'], 1)} | {_f(v['string_ratio'], 2)} |"
            )
        L += [
            "",
            "Before this change the writer passed top-level column names to `use_byte_stream_split`, which "
            "pyarrow matches against leaf paths (`emb__x.list.element`): it silently applied to nothing, and "
            "embeddings cost ~1.82 B/value; with leaf paths they cost ~1.43.",
            "",
        ]
    ld = res.get("loader") or {}
    if ld:
        first = next(iter(ld.values()))
        L += [
            "## 5. Trainer loader",
            "",
            f"Loader: {first['which']}. Reinforced: join base + reinforced shard, sha256 check, stored "
            "augmentation replayed, teacher embeddings looked up, GT + synthetic captions tokenized. Plain: the "
            "same base shards and image decoder (`dr_pipeline.images.decode_image`), fresh `sample_params` "
            "(RRC + RandAugment, drawn at load time for the augmentation index the trainer picks, so both loaders "
            "apply the same image ops and only the loader machinery differs), replay, GT caption tokenized. "
            f"Output {first['image_size']} px, in-process "
            "(`num_workers=0`), alternating rounds.",
            "",
            "| images | reinforced | plain | ratio |",
            "|---|---|---|---|",
        ]
        for label, v in ld.items():
            L.append(
                f"| {label}, {v['samples']['plain']} samples | {', '.join(_f(x, 2) for x in v['times']['reinforced'])} s "
                f"= {_f(v['reinforced_sps'], 1)}/s | {', '.join(_f(x, 2) for x in v['times']['plain'])} s = "
                f"{_f(v['plain_sps'], 1)}/s | **{_f(v['ratio'], 2)}x** |"
            )
        L += [
            "",
            "The synthetic corpus' JPEGs are small (96-320 px, ~4 KB), so the reinforced loader's fixed "
            "per-sample extras (reading the reinforcement shard's index, a second caption to tokenize, the "
            "sha256 check, chunk collation) weigh more than they would on web images; the second row re-encodes "
            "the same scenes 2.5x larger, where decoding and replay dominate both loaders.",
            "",
        ]
    L += train_section(res.get("train"))
    co = res.get("costs")
    if co:
        L += [
            "## 6. Per-sample costs for `dr plan`",
            "",
            f"Written to `{res['costs_path']}` (device `{m['device']}`, {res['threads']} thread(s)); `dr plan` reads "
            "every `bench/costs-*.json` and lists literature GPU figures separately, labelled as such.",
            "",
            "| model | params (M) | per augmented view | per caption embedded | per synthetic caption |",
            "|---|---|---|---|---|",
        ]
        for name, v in co["models"].items():
            L.append(
                f"| {name} | {v.get('params_m', '')} | "
                f"{_f(v['image_s'] * 1e3, 1) + ' ms' if 'image_s' in v else ''} | "
                f"{_f(v['text_s'] * 1e3, 1) + ' ms' if 'text_s' in v else ''} | "
                f"{_f(v['caption_s'] * 1e3, 1) + ' ms' if 'caption_s' in v else ''} |"
            )
        L += [
            "",
            "Synthetic caption cost (`caption_s`) = `Captioner.caption()` as the pipeline runs it: image "
            "encode shared by k=5 rows + seeded top_p 0.9 KV-cached decode (seq 30), redraws of degenerate "
            "draws included (`retry_factor` = `caption_s` / one sampled decode `decode_s`; `draws_per_caption`).",
            "",
        ]
        if res.get("plan_example"):
            L += [
                "Example (`dr plan --samples 1.9B --ensemble teachers/dfndr2b.yaml`):",
                "",
                "```",
                res["plan_example"],
                "```",
                "",
            ]
    if res.get("scale"):
        from dr_pipeline.bench_scale import render_section

        L += render_section(res["scale"])
    if res.get("startup"):
        from dr_pipeline.bench_startup import render_section as render_startup

        L += render_startup(res["startup"])
    if res.get("gpu"):
        from dr_pipeline.bench_gpu import render_section as render_gpu

        L += render_gpu(res["gpu"])
    if res.get("notes"):
        L += ["## Notes and misses", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(L)


def notes(res: dict) -> list[str]:
    out = []
    c, p, st, ld = res.get("captioning"), res.get("pipeline"), res.get("storage"), res.get("loader") or {}
    if c and "models" in c:
        out += captioning_notes(c)
    if res.get("load"):
        out += load_notes(res["load"])
    if p and p["overhead_job"] > 0.10:
        fixed = p["ray"]["wall"] - p["ray"]["actor_shard_seconds"]
        runs_txt = ", ".join(f"{100 * r['overhead_steady']:.0f}%" for r in p["ray_runs"])
        out.append(
            f"Whole-job Ray overhead {100 * p['overhead_job']:.0f}% misses the 10% target: "
            f"{fixed:.1f} s of the wall time is outside the shards (Ray start {p['ray']['ray_init']:.1f} s; the "
            "rest: planning, actor process start and imports, model load, manifest), a fixed cost that only "
            "a larger job amortizes "
            f"(this one is {p['samples']} samples so the bench fits in 10 minutes). Per shard, inside the "
            f"actor, the overhead is {100 * p['overhead_steady']:.0f}% (runs: "
            f"{runs_txt}"
            "; it swings by several points with the other jobs on these 2 cores, where the decode threads and "
            "Ray's own processes compete with the single-threaded model)"
            + (
                f"; at that rate the whole job gets under 10% once the stages take more than "
                f"{fixed / (0.10 - max(p['overhead_steady'], 0)):.0f} s "
                f"(~{fixed / (0.10 - max(p['overhead_steady'], 0)) / (p['stages']['sum'] / p['samples']):,.0f} "
                "samples of this tiny ensemble; one 10k-sample shard of the ViT-L/14 recipe takes hours)."
                if p["overhead_steady"] < 0.05
                else f"; whole-job overhead = per-shard overhead + {fixed:.0f} s / job length, so a job of hours "
                "(one 10k-sample ViT-L/14 shard) sits at the per-shard figure."
            )
        )
    if p and p["overhead_steady"] > 0.10:
        out.append(f"Per-shard overhead inside the actor {100 * p['overhead_steady']:.0f}% is over 10% in this run.")
    if p and m_device(res) != "cuda":
        out.append(
            "No GPU was lent to this session: the accelerator-utilisation target (>= 0.85 of a "
            "models-only loop) is unmeasured. On CUDA the bench runs the same sections with bf16 autocast "
            "(teachers, captioner), pinned host->device copies and SDPA attention."
        )
    if st and max(v["bf16_vs_raw"] for v in st.values()) > 1.02:
        out.append("bf16 embeddings exceed 1.02x their raw size.")
    for label, v in ld.items():
        if v["ratio"] < 0.9:
            out.append(
                f"Trainer loader on {label}: {v['ratio']:.2f}x of the plain loader misses 0.9x. The gap is "
                "the reinforced loader's fixed per-sample work (reinforcement index, second caption, sha256, "
                "collation: ~1 ms/sample in a profile), large next to decoding a 4 KB JPEG; it lives in "
                "dr_pipeline/train/data.py (another engineer's module)."
            )
    return out


def m_device(res: dict) -> str:
    return res["machine"]["device"]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dr_pipeline.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--quick", action="store_true", help="smoke run: every section shrunk (~3 min)")
    ap.add_argument("--full", action="store_true", help="all 80 public-pattern calls + the 80-row batched call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--costs-dir", default=str(ROOT / "bench"))
    ap.add_argument(
        "--only",
        help="comma list of sections: captioning,load,text,pipeline,storage,loader,costs,scale,startup,gpu,"
        "train "
        "(the other sections keep their last results)",
    )
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only re-render --out from a saved results file")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        res["notes"] = notes(res)
        Path(a.out).write_text(render(res) + "\n")
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    torch.set_num_threads(a.threads)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    only = (
        set(a.only.split(","))
        if a.only
        else {
            "captioning",
            "load",
            "text",
            "pipeline",
            "storage",
            "loader",
            "costs",
            "scale",
            "startup",
            "gpu",
            "train",
        }
    )
    if only == {"gpu"} and not torch.cuda.is_available():
        print("gpu: skipped: no CUDA (nothing measured, nothing written)", file=sys.stderr, flush=True)
        return 0
    t_start = clock()
    res: dict = {
        "machine": machine_info(device),
        "threads": a.threads,
        "load_start": loadavg(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "cd " + str(ROOT) + " && .venv/bin/python -m dr_pipeline.bench " + " ".join(argv or sys.argv[1:]),
    }
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="dr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    q = a.quick
    try:
        if "captioning" in only:
            res["captioning"] = run_captioning(device, quick=q, full=a.full)
        if "load" in only:
            res["load"] = bench_load(work, quick=q)
        if "text" in only:
            res["text"] = bench_text(device, "ViT-B-32", n_texts=32 if q else 64, rounds=1 if q else 2)
        if "pipeline" in only or "loader" in only or "storage" in only:
            if "pipeline" in only:
                res["pipeline"] = bench_pipeline(
                    work,
                    n_shards=2 if q else 6,
                    per_shard=16 if q else 32,
                    threads=a.threads,
                    device=device,
                    ray_rounds=1 if q else 2,
                )
        if "storage" in only:
            res["storage"] = bench_storage(256 if q else 1024, res.get("pipeline", {}).get("dataset"))
        if "loader" in only and "pipeline" in res:
            log("loader: the pipeline section's corpus and output")
            loader = {
                "corpus images (96-320 px)": bench_loader(
                    res["pipeline"]["dataset"], str(work / "job-ray.yaml"), rounds=1 if q else 3
                )
            }
            log("loader: the same scenes re-encoded 2.5x larger (240-800 px), reinforced with --local")
            ds, job_file = web_size_dataset(work, a.threads, device, n_shards=2 if q else 4)
            loader["web-size images (240-800 px)"] = bench_loader(ds, job_file, rounds=1 if q else 3)
            res["loader"] = loader
        if "gpu" in only:  # CUDA only: without it, says "skipped: no CUDA" and records nothing
            from dr_pipeline.bench_gpu import run_section as run_gpu

            if (gpu := run_gpu(str(work), quick=q)) is not None:
                res["gpu"] = gpu
        if "startup" in only:
            from dr_pipeline.bench_startup import run_section as run_startup

            log("start-up and actor memory: dr reinforce to the first actor ready, per ensemble")
            res["startup"] = run_startup(str(work), big=a.full)
        if "scale" in only:
            from dr_pipeline.bench_scale import run_section

            log("driver at scale: planning 200,000 shards (local) and 20,000 (moto S3), scheduling 20,000")
            res["scale"] = run_section(str(work), quick=q)
        if "costs" in only:
            models: dict[str, dict] = {}
            models["ViT-B-32"] = measure_teacher_costs("ViT-B-32", device, 4 if q else 8, 64)
            for name, c in (res.get("captioning") or {}).get("models", {}).items():
                models[name] = captioner_costs_entry(c)
            if not q:
                models["ViT-L-14"] = measure_teacher_costs("ViT-L-14", device, 2, 32)
                if "coca_ViT-L-14" not in models:
                    models["coca_ViT-L-14"] = measure_captioner_costs("coca_ViT-L-14", device, 2, 5)
            storage = None
            if "storage" in res:
                s0 = next(iter(res["storage"].values()))
                storage = {
                    "bf16_bytes_per_value": s0["bf16_bytes_per_value"],
                    "aug_bytes_per_aug": s0["aug_bytes_per_aug"],
                    "string_ratio": s0["string_ratio"],
                    "machine": res["machine"]["slug"],
                }
            costs = {
                "name": f"{res['machine']['slug']} (measured)",
                "kind": "measured",
                "device": device,
                "machine": res["machine"],
                "threads": a.threads,
                "date": res["date"],
                "note": f"measured by make bench with {a.threads} torch thread(s), random-init weights, this "
                "project's code paths (KV-cached decoder, unpadded text towers)",
                "models": models,
            }
            if storage:
                costs["storage"] = storage
            out_dir = Path(a.costs_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"costs-{res['machine']['slug']}.json"
            path.write_text(json.dumps(costs, indent=2) + "\n")
            res["costs"] = costs
            res["costs_path"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            from dr_pipeline.plan import estimate, load_costs, spec_from_args
            from dr_pipeline.plan import render as render_plan

            spec = spec_from_args("1.9B", [], [], str(ROOT / "teachers" / "dfndr2b.yaml"), 2, 5, 10_000)
            res["plan_example"] = render_plan(estimate(spec, load_costs([str(path)])))
        if "train" in only:
            res["train"] = bench_train(work, quick=q)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["load_end"] = loadavg()
    res["wall_s"] = clock() - t_start
    results = Path(a.costs_dir) / f"results-{res['machine']['slug']}.json"
    if a.only and results.is_file():  # a partial run updates its sections of the last full results
        res = {**json.loads(results.read_text()), **res}
    res["notes"] = notes(res)
    Path(a.out).write_text(render(res) + "\n")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(res, indent=1, default=str) + "\n")
    log(f"wrote {a.out} and {results} in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
