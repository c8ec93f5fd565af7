"""``dr plan``: output bytes, shard count, GPU-days and memory of a reinforcement run, on paper.

Bytes come from the shard contract (``schemas/reinforced-v1.json``): every fixed-size column's
per-row size is exact for the given teacher dims, n_aug and k; string columns (keys, URLs,
captions) are estimates from mean lengths. On-disk bytes apply the compression measured by
``make bench`` (``bench/costs-*.json``), else they equal the raw bytes.

Time = FLOPs / efficiency, per stage of this project's own code path (docs/cluster.md "dr plan"):

- **FLOPs per sample from the model configs** (open_clip JSON, read without importing open_clip):
  each teacher's image tower on n_aug views; its text tower on the GT caption and the k synthetic
  captions per captioner, unpadded (length-bucketed, ``text_tokens`` tokens each); per captioner
  its image tower + pooler + the decoder's cross-attention K/V once per image, then k captions x
  ``draws_per_caption`` (degenerate draws are resampled) x ``caption_tokens`` KV-cached decoding
  steps of one token (text tower + multimodal decoder + vocabulary projection).
- **Efficiency (achieved FLOP/s) per stage**: measured by ``make bench`` on a machine
  (``bench/costs-<machine>.json``: seconds per image / text / caption of real open_clip models,
  random weights) divided into the same FLOP formulas. That machine's row is labelled MEASURED.
- **A100 / H100 rows**: MEASURED from a costs file whose GPU is one, else ESTIMATED as stated peak
  bf16 FLOP/s x an assumed MFU for the image towers (``--mfu``), with the text-tower and decoder
  efficiencies relative to the image tower as measured by make bench (a GPU measurement if there
  is one, else this machine's). The public ViT-L/14 anchor (~312 img/s per A100) implies an MFU,
  printed alongside as a second, more conservative figure.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dr_pipeline.shards.schema import ShardLayout, TeacherLayout, parse_type

COSTS_DIR = Path(__file__).resolve().parents[1] / "bench"

# Stated hardware figures (dense bf16 tensor-core peak, no sparsity).
GPUS: dict[str, dict] = {
    "A100": {"peak_flops": 312e12, "memory_gb": 80, "match": ("A100",)},
    "H100": {"peak_flops": 989e12, "memory_gb": 80, "match": ("H100", "H200")},
}
DEFAULT_MFU = 0.25  # assumed for batched bf16 image towers (stated in every estimate)
ANCHOR = {
    "model": "ViT-L-14",
    "images_per_s": 312.0,
    "gpu": "A100",
    "source": "ViT-L/14 inference figure (~312 img/s per A100, clip-retrieval)",
}
DEFAULT_RATIOS = {"text": 0.7, "decode": 0.25}  # efficiency vs the image tower, if nothing is measured
BENCH_TEXT_TOKENS = 14.5  # make bench's text costs: 5-16 word captions + start/end tokens

# Mean string lengths (bytes) for the estimate of the variable-size columns.
STRING_DEFAULTS = {"key": 12, "uid": 32, "url": 100, "image_sha256": 64, "caption": 60, "syn_caption": 60}


@dataclass(frozen=True)
class PlanSpec:
    samples: int
    teachers: tuple[tuple[str, int], ...]  # (open_clip model, embedding dim)
    captioners: tuple[str, ...]  # open_clip CoCa models
    n_aug: int
    k: int  # synthetic captions per captioner per sample
    per_shard: int = 10_000  # samples per input (= output) shard
    strings: dict = field(default_factory=lambda: dict(STRING_DEFAULTS))
    configs: dict = field(default_factory=dict)  # model -> open_clip config (for FLOPs); missing: measured only
    text_tokens: float = 20.0  # mean tokens of a GT / synthetic caption (with start/end)
    caption_tokens: float = 16.0  # mean decoding steps per synthetic caption (<= max_len)
    draws_per_caption: float = 1.1  # sampled draws per kept caption (resampling of degenerate ones)
    batch_size: int = 128  # images per model step (memory per actor)
    max_len: int = 30  # decoder's length cap (KV cache size)
    gpus: int = 64  # "with G GPUs: D days"
    mfu: float = DEFAULT_MFU

    def __post_init__(self) -> None:
        if self.samples < 0 or self.n_aug < 1 or self.k < 0 or self.per_shard < 1:
            raise ValueError("plan: need samples >= 0, n_aug >= 1, k >= 0, per_shard >= 1")
        if self.gpus < 1 or not 0 < self.mfu <= 1 or self.draws_per_caption < 1:
            raise ValueError("plan: need --gpus >= 1, 0 < --mfu <= 1 and draws per caption >= 1")


def layout(spec: PlanSpec) -> ShardLayout:
    """The shard layout of the run (teacher/captioner ids are positional placeholders)."""
    return ShardLayout(
        spec.n_aug,
        tuple(TeacherLayout(f"t{i}", d) for i, (_, d) in enumerate(spec.teachers)),
        tuple(f"c{i}" for i in range(len(spec.captioners))),
    )


# --------------------------------------------------------------------------- bytes


def _fixed_bytes(t, k: int) -> int | None:
    """Value bytes per row of an Arrow type from the contract; None for strings."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(t):
        inner = _fixed_bytes(t.value_type, k)
        return None if inner is None else t.list_size * inner
    if pa.types.is_list(t):  # list<fixed_size_list<...>>: k synthetic rows
        inner = _fixed_bytes(t.value_type, k)
        return None if inner is None else k * inner
    if pa.types.is_string(t):
        return None
    return t.bit_width // 8


def row_bytes(spec: PlanSpec) -> dict[str, float]:
    """Raw value bytes per sample by part: 'embeddings' and 'aug_params' and 'ints' exact from the
    schema (all k captions kept), 'strings' estimated; plus 'values' = bf16 values per sample."""
    out = {"embeddings": 0, "aug_params": 0, "ints": 0, "strings": 0.0, "values": 0}
    s = spec.strings
    for name, typ in layout(spec).fields().items():
        t = parse_type(typ)
        b = _fixed_bytes(t, spec.k)
        if name.startswith("emb__"):
            out["embeddings"] += b
            out["values"] += b // 2
        elif name == "aug_params":
            out["aug_params"] += b
        elif b is not None:
            out["ints"] += b
        elif name.startswith("syn__"):
            out["strings"] += spec.k * s["syn_caption"]
        else:
            out["strings"] += s.get(name, 0)
    out["total"] = out["embeddings"] + out["aug_params"] + out["ints"] + out["strings"]
    return out


def datacompdr_bytes(spec: PlanSpec) -> float:
    """Per-sample bytes of the same content in the DataCompDR layout (fp32 npz + JSON members in a
    tar), by formula: 4 B per value, ~59 JSON B per augmentation (docs/reference.md#storage-sizes), the strings, and
    per member a 512 B tar header + ~256 B mean padding, ~300 B npz/zip framing per array."""
    rb = row_bytes(spec)
    s = spec.strings
    members = 5 + max(0, len(spec.captioners) - 1)
    arrays = 2 + max(0, len(spec.captioners) - 1)
    json_bytes = 59 * spec.n_aug + 40 + len(spec.captioners) * spec.k * (s["syn_caption"] + 4) + 110
    return 4 * rb["values"] + json_bytes + s["url"] + 300 * arrays + 768 * members


# --------------------------------------------------------------------------- FLOPs from model configs
# Multiply-accumulates (MACs) of the matmuls; FLOPs = 2 x MACs. Norms, softmax, GELU are ignored
# (< 2 % of a ViT's FLOPs).


def _blocks(tokens: float, width: int, layers: int, mlp_ratio: float = 4.0, dense_w2: float = 4.0) -> float:
    """MACs of ``layers`` transformer blocks over ``tokens`` tokens: QKV + out projection
    (``dense_w2`` x W^2 per token), MLP (2 x mlp_ratio x W^2) and attention (2 x tokens^2 x W)."""
    return layers * (tokens * (dense_w2 + 2 * mlp_ratio) * width**2 + 2 * tokens**2 * width)


def vision_tokens(cfg: dict) -> int:
    v = cfg["vision_cfg"]
    size, patch = v.get("image_size", 224), v.get("patch_size", 16)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return (size // patch) ** 2 + 1


def image_macs(cfg: dict) -> float:
    """One image through the vision tower (patch embedding, blocks, pooler, projection)."""
    v = cfg["vision_cfg"]
    if "layers" not in v or "width" not in v or "patch_size" not in v or not isinstance(v["layers"], int):
        raise KeyError("not a ViT vision tower")
    t, w, p = vision_tokens(cfg), v["width"], v["patch_size"]
    macs = t * 3 * p * p * w + _blocks(t, w, v["layers"], v.get("mlp_ratio", 4.0))
    d = cfg.get("embed_dim", w)
    if v.get("attentional_pool"):  # CoCa: n_queries attend to the tokens
        q = v.get("attn_pooler_queries", 256)
        macs += 2 * q * d * d + 2 * t * w * d + 2 * q * t * d
    return macs + w * d


def text_macs(cfg: dict, tokens: float) -> float:
    """One caption of ``tokens`` tokens through the text tower, unpadded (as ``encode_texts`` runs it)."""
    t = cfg["text_cfg"]
    w = t.get("width", 512)
    return _blocks(tokens, w, t.get("layers", 12), t.get("mlp_ratio", 4.0)) + w * cfg.get("embed_dim", w)


def caption_image_macs(cfg: dict) -> float:
    """Per image, once: the captioner's vision tower and the decoder's cross-attention K/V."""
    m = cfg.get("multimodal_cfg", {})
    w, layers = m.get("width", 512), m.get("layers", 12)
    q = cfg["vision_cfg"].get("attn_pooler_queries", 256)
    return image_macs(cfg) + layers * 2 * q * w * w


def decode_step_macs(cfg: dict, position: float) -> float:
    """One KV-cached decoding step of one caption row at prefix length ``position``: the newest
    token through the text tower and the multimodal decoder (self-attention over the cache,
    cross-attention over the image tokens), then the vocabulary projection."""
    t, m = cfg["text_cfg"], cfg.get("multimodal_cfg", {})
    tw, mw = t.get("width", 512), m.get("width", 512)
    q = cfg["vision_cfg"].get("attn_pooler_queries", 256)
    text = t.get("layers", 12) * ((4 + 2 * t.get("mlp_ratio", 4.0)) * tw**2 + 2 * position * tw)
    dec = m.get("layers", 12) * ((6 + 2 * m.get("mlp_ratio", 4.0)) * mw**2 + 2 * position * mw + 2 * q * mw)
    return text + dec + mw * m.get("vocab_size", t.get("vocab_size", 49408))


def decode_macs(cfg: dict, steps: float) -> float:
    """One caption decoded for ``steps`` steps (the cache grows by one token per step)."""
    return steps * decode_step_macs(cfg, (steps + 1) / 2)


def param_count(cfg: dict) -> float:
    """Parameters from the config (towers' blocks + embeddings), for memory per actor."""
    n = 0.0
    v = cfg.get("vision_cfg", {})
    if isinstance(v.get("layers"), int) and "width" in v:
        n += v["layers"] * 12 * v["width"] ** 2 + 3 * v.get("patch_size", 16) ** 2 * v["width"]
    t = cfg.get("text_cfg", {})
    if "width" in t:
        n += t.get("layers", 12) * 12 * t["width"] ** 2 + t.get("vocab_size", 49408) * t["width"]
    m = cfg.get("multimodal_cfg")
    if m:
        n += m.get("layers", 12) * 16 * m.get("width", 512) ** 2 + m.get("vocab_size", 49408) * m.get("width", 512)
    return n


# --------------------------------------------------------------------------- per-sample work


def stage_flops(spec: PlanSpec) -> tuple[dict[str, float], list[str]]:
    """FLOPs per sample by stage, and the models whose config is unknown (no FLOPs for them)."""
    out = {"teacher_images": 0.0, "teacher_texts": 0.0, "caption_images": 0.0, "caption_decode": 0.0}
    unknown: list[str] = []
    texts = 1 + spec.k * len(spec.captioners)  # GT + synthetic captions, per teacher
    for model, _ in spec.teachers:
        cfg = spec.configs.get(model)
        try:
            out["teacher_images"] += 2 * spec.n_aug * image_macs(cfg)
            out["teacher_texts"] += 2 * texts * text_macs(cfg, spec.text_tokens)
        except (KeyError, TypeError, AttributeError):
            unknown.append(model)
    for model in spec.captioners:
        cfg = spec.configs.get(model)
        try:
            out["caption_images"] += 2 * caption_image_macs(cfg)
            out["caption_decode"] += 2 * spec.k * spec.draws_per_caption * decode_macs(cfg, decode_steps(spec))
        except (KeyError, TypeError, AttributeError):
            unknown.append(model)
    return out, unknown


def decode_steps(spec: PlanSpec) -> float:
    return min(spec.caption_tokens, spec.max_len - 2)


# --------------------------------------------------------------------------- efficiency from make bench


def load_costs(paths: list[str] | None = None) -> dict[str, dict]:
    """Measured sources: ``bench/costs-*.json`` (written by ``make bench``) unless paths are given."""
    found = paths if paths is not None else sorted(glob.glob(str(COSTS_DIR / "costs-*.json")))
    sources: dict[str, dict] = {}
    for p in found:
        data = json.loads(Path(p).read_text())
        data.setdefault("kind", "measured")
        sources[data.get("name") or Path(p).stem] = data
    return sources


def efficiencies(source: dict, configs: dict) -> dict[str, float]:
    """Achieved FLOP/s per stage on the source's machine: measured seconds of each model it timed
    divided into the same FLOP formulas (mean over models). Stages it did not time are absent."""
    acc: dict[str, list[float]] = {"image": [], "text": [], "decode": []}
    for model, c in source.get("models", {}).items():
        cfg = configs.get(model) or open_clip_config(model)
        if not cfg:
            continue
        try:
            if c.get("image_s"):
                acc["image"].append(2 * image_macs(cfg) / c["image_s"])
            if c.get("text_s"):
                tokens = c.get("text_tokens", c.get("mean_text_tokens", BENCH_TEXT_TOKENS))
                acc["text"].append(2 * text_macs(cfg, tokens) / c["text_s"])
        except (KeyError, TypeError):
            pass
    out = {k: sum(v) / len(v) for k, v in acc.items() if v}
    dec = _decode_efficiency(source, configs, out.get("image"))
    if dec:
        out["decode"] = dec
    return out


def _decode_efficiency(source: dict, configs: dict, image_eff: float | None) -> float | None:
    """The decoder's FLOP/s: a caption's measured seconds less its share of the image encode
    (at the image-tower efficiency), against the decoding FLOPs of its mean length."""
    vals = []
    for model, c in source.get("models", {}).items():
        cfg = configs.get(model) or open_clip_config(model)
        per = c.get("decode_s") or c.get("caption_s")  # one sampled draw (newer bench), else caption()
        if not cfg or not per or "multimodal_cfg" not in cfg:
            continue
        k = c.get("k", 5)
        steps = c.get("mean_steps") or max(1.0, c.get("mean_tokens", 30.0) - 1)
        draws = 1.0 if c.get("decode_s") else c.get("draws_per_caption", 1.0)
        encode_s = 2 * caption_image_macs(cfg) / image_eff / k if image_eff else 0.0
        decode_s = per - encode_s
        if decode_s > 0.05 * per:
            vals.append(2 * draws * decode_macs(cfg, steps) / decode_s)
    return sum(vals) / len(vals) if vals else None


def _gpu_kind(source: dict) -> str | None:
    gpu = (source.get("machine") or {}).get("gpu") or ""
    for name, g in GPUS.items():
        if any(m in gpu for m in g["match"]):
            return name
    return None


def ratios(sources: dict[str, dict], configs: dict) -> tuple[dict[str, float], str]:
    """Text-tower and decoder efficiency relative to the image tower: from a GPU measurement if
    one exists, else from this machine's, else DEFAULT_RATIOS (each labelled)."""
    ordered = sorted(sources.items(), key=lambda kv: kv[1].get("device") != "cuda")
    for name, src in ordered:
        e = efficiencies(src, configs)
        if "image" in e and ("text" in e or "decode" in e):
            r = {k: min(1.0, e[k] / e["image"]) if k in e else DEFAULT_RATIOS[k] for k in DEFAULT_RATIOS}
            return r, f"measured by make bench on {name}"
    return dict(DEFAULT_RATIOS), "assumed (no make bench measurement found)"


def anchor_mfu() -> float:
    """The MFU the public ViT-L/14 A100 figure implies (its FLOPs from open_clip's config)."""
    cfg = open_clip_config(ANCHOR["model"])
    return ANCHOR["images_per_s"] * 2 * image_macs(cfg) / GPUS[ANCHOR["gpu"]]["peak_flops"] if cfg else 0.16


# --------------------------------------------------------------------------- the plan


@dataclass
class CostEstimate:
    spec: PlanSpec
    bytes_per_sample: dict[str, float]
    raw_bytes: float
    disk_bytes: float
    disk_basis: str
    datacompdr_bytes: float
    shards: int
    flops: dict[str, float]  # FLOPs per sample by stage
    unknown: list[str]  # models without a config: not in the FLOPs
    compute: dict[str, dict]  # row -> {kind, device, seconds_per_sample, parts, hours, days, ...}
    memory: dict[str, float]  # per actor, GB
    assumptions: list[str]

    def to_dict(self) -> dict:
        spec = {k: v for k, v in self.spec.__dict__.items() if k != "configs"}
        return {
            "spec": {**spec, "teachers": [list(t) for t in self.spec.teachers]},
            "bytes_per_sample": self.bytes_per_sample,
            "raw_bytes": self.raw_bytes,
            "disk_bytes": self.disk_bytes,
            "disk_basis": self.disk_basis,
            "datacompdr_bytes": self.datacompdr_bytes,
            "shards": self.shards,
            "flops_per_sample": self.flops,
            "unknown_models": self.unknown,
            "compute": self.compute,
            "memory_gb_per_actor": self.memory,
            "assumptions": self.assumptions,
        }


STAGE_EFF = {"teacher_images": "image", "teacher_texts": "text", "caption_images": "image", "caption_decode": "decode"}


def _row(spec: PlanSpec, flops: dict[str, float], eff: dict[str, float], kind: str, device: str, note: str) -> dict:
    """Seconds per sample = FLOPs / efficiency per stage; then the row (``_timing_row``)."""
    parts = {s: (f / eff[STAGE_EFF[s]] if f and STAGE_EFF[s] in eff else 0.0) for s, f in flops.items()}
    missing = [s for s, f in flops.items() if f and STAGE_EFF[s] not in eff]
    return _timing_row(spec, parts, eff, missing, kind=kind, device=device, note=note)


def _timing_row(spec: PlanSpec, parts: dict[str, float], eff: dict[str, float], missing: list[str], **info) -> dict:
    """A device's row from its seconds per sample by stage: hours, days on G GPUs, shards/hour."""
    sec = sum(parts.values())
    hours = sec * spec.samples / 3600
    return {
        "kind": info.pop("kind"),
        "device": info.pop("device"),
        "seconds_per_sample": sec,
        "parts": parts,
        "hours": hours,
        "device_days": hours / 24,
        "gpus": spec.gpus,
        "days_on_gpus": hours / 24 / spec.gpus,
        "shards_per_hour": spec.gpus * 3600 / (sec * spec.per_shard) if sec else math.inf,
        "efficiency": eff,
        "missing": missing,
        **info,
    }


def _measured_seconds(spec: PlanSpec, source: dict) -> tuple[dict[str, float], list[str]]:
    """Stage seconds straight from measured per-unit costs, for models without a config."""
    models = source.get("models", {})
    parts = dict.fromkeys(STAGE_EFF, 0.0)
    missing: list[str] = []
    texts = 1 + spec.k * len(spec.captioners)
    for model, _ in spec.teachers:
        if model in spec.configs:
            continue
        c = models.get(model, {})
        for part, key, n in (("teacher_images", "image_s", spec.n_aug), ("teacher_texts", "text_s", texts)):
            if key in c:
                parts[part] += n * c[key]
            else:
                missing.append(f"{model}.{key}")
    for model in spec.captioners:
        if model in spec.configs:
            continue
        c = models.get(model, {})
        if "decode_s" in c:  # one draw; retries priced by the spec
            parts["caption_decode"] += spec.k * spec.draws_per_caption * c["decode_s"]
        elif "caption_s" in c:  # an older costs file: caption() as measured, its own redraws included
            parts["caption_decode"] += spec.k * c["caption_s"]
        else:
            missing.append(f"{model}.caption_s")
    return parts, missing


def per_sample_seconds(spec: PlanSpec, source: dict) -> tuple[dict[str, float], list[str]]:
    """Seconds per sample by stage on one device of a measured ``source``, and what it cannot price:
    FLOPs x the source's measured efficiency for models with a config, measured seconds otherwise."""
    flops, _ = stage_flops(spec)
    eff = efficiencies(source, spec.configs)
    row = _row(spec, flops, eff, "measured", source.get("device", "?"), "")
    extra, missing = _measured_seconds(spec, source)
    parts = {s: row["parts"][s] + extra[s] for s in STAGE_EFF}
    return parts, [f"{s} (no efficiency measured)" for s in row["missing"]] + missing


def _measured_rows(spec: PlanSpec, sources: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for name, src in sources.items():
        parts, missing = per_sample_seconds(spec, src)
        gpu = (src.get("machine") or {}).get("gpu")
        rows[name] = _timing_row(
            spec,
            parts,
            efficiencies(src, spec.configs),
            missing,
            kind="measured",
            device=gpu or src.get("device", "?"),
            note=src.get("note", ""),
            gpu_kind=_gpu_kind(src),
        )
    return rows


def _estimated_rows(
    spec: PlanSpec, flops: dict[str, float], sources: dict[str, dict], measured: dict[str, dict]
) -> dict[str, dict]:
    r, basis = ratios(sources, spec.configs)
    a_mfu = anchor_mfu()
    rows = {}
    for gpu, g in GPUS.items():
        if any(m.get("gpu_kind") == gpu for m in measured.values()):
            continue  # a measurement of this GPU is shown instead
        image = g["peak_flops"] * spec.mfu
        eff = {"image": image, "text": image * r["text"], "decode": image * r["decode"]}
        note = (
            f"peak {g['peak_flops'] / 1e12:,.0f} TFLOP/s bf16 x assumed MFU {spec.mfu:.2f} (image towers); "
            f"text towers x{r['text']:.2f}, KV-cached decoder x{r['decode']:.2f} of that ({basis})"
        )
        row = _row(spec, flops, eff, "estimated", gpu, note)
        row["missing"] += [f"{m} (no model config)" for m in stage_flops(spec)[1]]
        cons = _row(spec, flops, {k: v * a_mfu / spec.mfu for k, v in eff.items()}, "estimated", gpu, "")
        row["anchor"] = {"mfu": a_mfu, "device_days": cons["device_days"], "days_on_gpus": cons["days_on_gpus"]}
        rows[f"{gpu} (estimated)"] = row
    return rows


def memory_per_actor(spec: PlanSpec) -> dict[str, float]:
    """GB per actor: fp32 weights, their bf16 autocast copies, and the activations at batch_size
    (teacher views: tokens x width x 2 B x ~10 live tensors; decoder: self-attention caches of every
    row, cross K/V per image, fp32 logits x 3 for top-p)."""
    params = sum(param_count(spec.configs[m]) for m, _ in spec.teachers if m in spec.configs)
    params += sum(param_count(spec.configs[m]) for m in spec.captioners if m in spec.configs)
    views, act = spec.batch_size * spec.n_aug, 0.0
    for m, _ in spec.teachers:
        cfg = spec.configs.get(m)
        if cfg and "width" in cfg.get("vision_cfg", {}):
            act = max(act, views * vision_tokens(cfg) * cfg["vision_cfg"]["width"] * 2 * 10)
    dec = 0.0
    for m in spec.captioners:
        cfg = spec.configs.get(m)
        if cfg and "multimodal_cfg" in cfg:
            mm, t = cfg["multimodal_cfg"], cfg["text_cfg"]
            rows = spec.batch_size * spec.k
            q = cfg["vision_cfg"].get("attn_pooler_queries", 256)
            cache = rows * (t.get("layers", 12) + mm.get("layers", 12)) * 2 * spec.max_len * mm.get("width", 512) * 2
            cross = spec.batch_size * mm.get("layers", 12) * 2 * q * mm.get("width", 512) * 2
            logits = rows * mm.get("vocab_size", 49408) * 4 * 3
            vis = spec.batch_size * vision_tokens(cfg) * cfg["vision_cfg"]["width"] * 2 * 10
            dec = max(dec, cache + cross + logits + vis)
    gb = 1e-9
    out = {"weights_fp32": params * 4 * gb, "bf16_copies": params * 2 * gb, "activations": max(act, dec) * gb}
    out["gpu_total"] = sum(out.values())
    # measured (make bench, start-up section): ~1 GiB fixed runtime + the weights held once on the
    # loading device; a GPU actor's host copy is transient, so this is the CPU-actor worst case
    out["host_ram"] = params * 4 * gb + 1.0
    return out


def estimate(spec: PlanSpec, sources: dict[str, dict] | None = None) -> CostEstimate:
    sources = load_costs() if sources is None else sources
    rb = row_bytes(spec)
    raw = rb["total"] * spec.samples
    storage = next((s["storage"] for s in sources.values() if s.get("kind") == "measured" and "storage" in s), None)
    if storage:
        disk = spec.samples * (
            rb["values"] * storage["bf16_bytes_per_value"]
            + spec.n_aug * storage["aug_bytes_per_aug"]
            + (rb["strings"] + rb["ints"]) * storage.get("string_ratio", 1.0)
        )
        basis = f"compression measured by make bench ({storage.get('machine', '?')})"
    else:
        disk, basis = raw, "no bench measurement found: raw bytes"
    flops, unknown = stage_flops(spec)
    measured = _measured_rows(spec, sources)
    compute = {**_estimated_rows(spec, flops, sources, measured), **measured}
    steps = decode_steps(spec)
    assumptions = [
        f"captions: {spec.text_tokens:g} tokens per GT / synthetic caption through the text towers (unpadded); "
        f"{steps:g} KV-cached decoding steps per synthetic caption (cap {spec.max_len}), "
        f"{spec.draws_per_caption:g} draws per kept caption (degenerate draws resampled)",
        f"estimates: MFU {spec.mfu:.2f} assumed for image towers; the public {ANCHOR['source']} implies "
        f"MFU {anchor_mfu():.2f}, shown as the conservative figure",
    ]
    return CostEstimate(
        spec,
        rb,
        raw,
        disk,
        basis,
        datacompdr_bytes(spec) * spec.samples,
        math.ceil(spec.samples / spec.per_shard),
        flops,
        unknown,
        compute,
        memory_per_actor(spec),
        assumptions,
    )


# --------------------------------------------------------------------------- rendering


def parse_count(text: str) -> int:
    """'2e9', '1.9B', '12.8M', '500k', '10000' -> int."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a count: {text!r} (e.g. 2e9, 1.9B, 12.8M)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))


def _human(n: float, unit: str = "B") -> str:
    for p in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or p == "P":
            return f"{n:,.1f} {p}{unit}" if p else f"{n:,.0f} {unit}"
        n /= 1000
    return f"{n:.1f}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.3g}"


def _row_lines(name: str, c: dict) -> list[str]:
    p = c["parts"]
    label = "MEASURED" if c["kind"] == "measured" else "ESTIMATED"
    ms = {k: v * 1e3 for k, v in p.items()}
    lines = [
        f"  {name} [{label}, {c['device']}]: {c['seconds_per_sample'] * 1e3:,.2f} ms/sample "
        f"(teacher images {ms['teacher_images']:,.2f}, texts {ms['teacher_texts']:,.2f}, captioner images "
        f"{ms['caption_images']:,.2f}, decoding {ms['caption_decode']:,.2f})",
        f"      {c['device_days']:,.1f} device-days; with {c['gpus']:,} of them: {c['days_on_gpus']:,.2f} days, "
        f"{_rate(c['shards_per_hour'])} shards/hour",
    ]
    if "anchor" in c:
        a = c["anchor"]
        lines.append(
            f"      at the public anchor's MFU {a['mfu']:.2f}: {a['device_days']:,.1f} device-days, "
            f"{a['days_on_gpus']:,.2f} days on {c['gpus']:,} of them"
        )
    if c["missing"]:
        lines.append(f"      not priced (total is a lower bound): {', '.join(c['missing'])}")
    if c["note"]:
        lines.append(f"      {c['note']}")
    return lines


def render(plan: CostEstimate) -> str:
    s, rb, f, mem = plan.spec, plan.bytes_per_sample, plan.flops, plan.memory
    teachers = ", ".join(f"{m} (dim {d})" for m, d in s.teachers) or "none"
    g = {k: v / 1e9 for k, v in f.items()}
    lines = [
        f"plan: {s.samples:,} samples | teachers: {teachers} | captioners: {', '.join(s.captioners) or 'none'} "
        f"| n_aug {s.n_aug} | k {s.k}",
        "",
        "storage (reinforced-v1 Parquet, bf16)",
        f"  per sample: {rb['embeddings']:,} B embeddings ({rb['values']:,} bf16 values, exact) + "
        f"{rb['aug_params']:,} B aug params (exact) + {rb['ints']} B ints + ~{rb['strings']:,.0f} B strings (estimate)",
        f"  raw total : {_human(plan.raw_bytes)}",
        f"  on disk   : {_human(plan.disk_bytes)}  ({plan.disk_basis})",
        f"  DataCompDR fp32 npz + JSON layout, same content: {_human(plan.datacompdr_bytes)} "
        f"({plan.datacompdr_bytes / max(plan.disk_bytes, 1):.1f}x)",
        f"  shards    : {plan.shards:,} of <= {s.per_shard:,} samples",
        "",
        f"work per sample (FLOPs from the model configs): {sum(g.values()):,.0f} GFLOP = teacher images "
        f"{g['teacher_images']:,.0f} + teacher texts {g['teacher_texts']:,.1f} + captioner images "
        f"{g['caption_images']:,.0f} + decoding {g['caption_decode']:,.1f}",
    ]
    if plan.unknown:
        lines.append(f"  no config (priced from measured seconds only): {', '.join(plan.unknown)}")
    lines += [f"  assumed: {a}" for a in plan.assumptions]
    lines += [
        "",
        f"compute (per row one device type; with G = {s.gpus:,} of them, one actor each: D days, S shards/hour)",
    ]
    for name, c in plan.compute.items():
        lines += _row_lines(name, c)
    lines += [
        "",
        f"memory per actor (batch {s.batch_size} images = {s.batch_size * s.n_aug} teacher views, "
        f"{s.batch_size * s.k} caption rows; estimates from parameter counts)",
        f"  GPU: {mem['gpu_total']:,.1f} GB = weights fp32 {mem['weights_fp32']:,.1f} + bf16 autocast copies "
        f"{mem['bf16_copies']:,.1f} + activations {mem['activations']:,.1f}; host RAM ~{mem['host_ram']:,.0f} GB",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- configs without open_clip


def open_clip_config_dir() -> Path | None:
    """open_clip's bundled model_configs folder, found without importing open_clip (slow)."""
    spec = importlib.util.find_spec("open_clip")
    locs = list(spec.submodule_search_locations or []) if spec else []
    return next((Path(p) / "model_configs" for p in locs if (Path(p) / "model_configs").is_dir()), None)


def open_clip_config(model: str, extra: list[Path] | tuple = ()) -> dict | None:
    for folder in (*extra, open_clip_config_dir()):
        if folder is not None and (Path(folder) / f"{model}.json").is_file():
            return json.loads((Path(folder) / f"{model}.json").read_text())
    return None


def spec_from_args(
    samples: str,
    teachers: list[str],
    captioners: list[str],
    ensemble: str | None,
    n_aug: int,
    k: int,
    per_shard: int,
    **options,
) -> PlanSpec:
    """Teachers as 'MODEL' or 'MODEL:DIM' (dims of open_clip models come from their configs), or
    the teachers and captioners of an ensemble file; ``options``: PlanSpec fields (gpus, mfu, ...)."""
    from dr_pipeline.config import ConfigError, load_ensemble

    pairs: list[tuple[str, int | None]] = []
    caps = list(captioners)
    extra: list[Path] = []
    if ensemble:
        ens = load_ensemble(ensemble)
        if ens.model_configs:
            mc = Path(ens.model_configs)
            extra.append(mc if mc.is_absolute() else Path(ens.source) / mc)
        pairs += [(t.model, None) for t in ens.teachers]
        caps += [c.model for c in ens.captioners]
        if ens.captioners and "max_len" not in options:
            options["max_len"] = max(c.sampling.max_len for c in ens.captioners)
    configs = {m: c for m in {*(p for p, _ in pairs), *caps} if (c := open_clip_config(m, extra))}
    for t in teachers:
        model, _, dim = t.partition(":")
        pairs.append((model, int(dim) if dim else None))
        if c := open_clip_config(model, extra):
            configs[model] = c
    out = []
    for model, dim in pairs:
        if dim is None:
            cfg = configs.get(model)
            if not cfg or "embed_dim" not in cfg:
                raise ConfigError(f"plan: no open_clip config for '{model}': give its dim as {model}:DIM")
            dim = int(cfg["embed_dim"])
        out.append((model, dim))
    options = {key: v for key, v in options.items() if v is not None}
    return PlanSpec(parse_count(samples), tuple(out), tuple(caps), n_aug, k, per_shard, configs=configs, **options)
