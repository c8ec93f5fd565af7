"""``dr plan``: output bytes, shard count and accelerator-hours of a reinforcement run, on paper.

Bytes come from the shard contract (``schemas/reinforced-v1.json``): every fixed-size column's
per-row size is exact for the given teacher dims, n_aug and k; string columns (keys, URLs,
captions) are estimates from mean lengths. On-disk bytes apply the compression measured by
``make bench`` (``bench/costs-*.json``), else they equal the raw bytes.

Hours come from per-unit costs (seconds per augmented view per teacher, per caption embedded,
per synthetic caption) in two kinds of source, never mixed:
- **measured**: ``bench/costs-<machine>.json``, written by ``make bench`` on that machine with
  this project's code paths (KV-cached decoder, unpadded text towers), random-init weights;
- **literature**: the figures in ``LITERATURE`` (REFERENCE.md "Performance anchors"), labelled
  as such: not measured here, and for the public code paths (open_clip ``generate``).
A model without a cost in a source is listed as missing and that source's total is a lower bound.
"""
from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dr_pipeline.shards.schema import ShardLayout, TeacherLayout, parse_type

COSTS_DIR = Path(__file__).resolve().parents[1] / "bench"

# Not measurements. REFERENCE.md "Performance anchors" (clip-retrieval; open_clip CoCa generate).
LITERATURE: dict[str, dict] = {
    "A100 (literature)": {
        "kind": "literature",
        "device": "A100",
        "note": "REFERENCE.md anchors, not measured here: ViT-L/14 ~312 img/s and ViT-B/16 ~1,100 img/s "
                "per A100 (clip-retrieval, GPU-bound); CoCa captions with open_clip generate ~2.5 img/s "
                "at batch 1 (the public one-call-per-caption pattern, no KV cache)",
        "models": {
            "ViT-L-14": {"image_s": 1 / 312},
            "ViT-L-14-quickgelu": {"image_s": 1 / 312},
            "ViT-B-16": {"image_s": 1 / 1100},
            "coca_ViT-L-14": {"caption_s": 1 / 2.5},
        },
    },
}

# Mean string lengths (bytes) for the estimate of the variable-size columns.
STRING_DEFAULTS = {"key": 12, "uid": 32, "url": 100, "image_sha256": 64, "caption": 60, "syn_caption": 60}


@dataclass(frozen=True)
class PlanSpec:
    samples: int
    teachers: tuple[tuple[str, int], ...]          # (open_clip model, embedding dim)
    captioners: tuple[str, ...]                    # open_clip CoCa models
    n_aug: int
    k: int                                         # synthetic captions per captioner per sample
    per_shard: int = 10_000                        # samples per input (= output) shard
    strings: dict = field(default_factory=lambda: dict(STRING_DEFAULTS))

    def __post_init__(self) -> None:
        if self.samples < 0 or self.n_aug < 1 or self.k < 0 or self.per_shard < 1:
            raise ValueError("plan: need samples >= 0, n_aug >= 1, k >= 0, per_shard >= 1")


def layout(spec: PlanSpec) -> ShardLayout:
    """The shard layout of the run (teacher/captioner ids are positional placeholders)."""
    return ShardLayout(spec.n_aug, tuple(TeacherLayout(f"t{i}", d) for i, (_, d) in enumerate(spec.teachers)),
                       tuple(f"c{i}" for i in range(len(spec.captioners))))


def _fixed_bytes(t, k: int) -> int | None:
    """Value bytes per row of an Arrow type from the contract; None for strings."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(t):
        inner = _fixed_bytes(t.value_type, k)
        return None if inner is None else t.list_size * inner
    if pa.types.is_list(t):                       # list<fixed_size_list<...>>: k synthetic rows
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
    tar), by formula: 4 B per value, ~59 JSON B per augmentation (REFERENCE.md), the strings, and
    per member a 512 B tar header + ~256 B mean padding, ~300 B npz/zip framing per array."""
    rb = row_bytes(spec)
    s = spec.strings
    members = 5 + max(0, len(spec.captioners) - 1)
    arrays = 2 + max(0, len(spec.captioners) - 1)
    json_bytes = 59 * spec.n_aug + 40 + len(spec.captioners) * spec.k * (s["syn_caption"] + 4) + 110
    return 4 * rb["values"] + json_bytes + s["url"] + 300 * arrays + 768 * members


# --------------------------------------------------------------------------- costs

def load_costs(paths: list[str] | None = None) -> dict[str, dict]:
    """Measured sources (``bench/costs-*.json`` unless paths are given) plus ``LITERATURE``."""
    found = paths if paths is not None else sorted(glob.glob(str(COSTS_DIR / "costs-*.json")))
    sources: dict[str, dict] = {}
    for p in found:
        data = json.loads(Path(p).read_text())
        data.setdefault("kind", "measured")
        sources[data.get("name") or Path(p).stem] = data
    sources.update(LITERATURE)
    return sources


def per_sample_seconds(spec: PlanSpec, source: dict) -> tuple[dict[str, float], list[str]]:
    """Seconds per sample by stage on one device of ``source``, and the costs it lacks."""
    models = source.get("models", {})
    parts = {"teacher_images": 0.0, "teacher_texts": 0.0, "captions": 0.0}
    missing: list[str] = []
    texts = 1 + spec.k * len(spec.captioners)       # GT + synthetic (before de-duplication)
    for model, _ in spec.teachers:
        c = models.get(model, {})
        for part, key, n in (("teacher_images", "image_s", spec.n_aug), ("teacher_texts", "text_s", texts)):
            if key in c:
                parts[part] += n * c[key]
            else:
                missing.append(f"{model}.{key}")
    for model in spec.captioners:
        c = models.get(model, {})
        if "caption_s" in c:
            parts["captions"] += spec.k * c["caption_s"]
        else:
            missing.append(f"{model}.caption_s")
    return parts, missing


@dataclass
class Plan:
    spec: PlanSpec
    bytes_per_sample: dict[str, float]
    raw_bytes: float
    disk_bytes: float
    disk_basis: str
    datacompdr_bytes: float
    shards: int
    compute: dict[str, dict]          # source -> {kind, seconds_per_sample, parts, hours, missing, note}

    def to_dict(self) -> dict:
        return {"spec": {**self.spec.__dict__, "teachers": [list(t) for t in self.spec.teachers]},
                "bytes_per_sample": self.bytes_per_sample, "raw_bytes": self.raw_bytes,
                "disk_bytes": self.disk_bytes, "disk_basis": self.disk_basis,
                "datacompdr_bytes": self.datacompdr_bytes, "shards": self.shards, "compute": self.compute}


def make_plan(spec: PlanSpec, sources: dict[str, dict] | None = None) -> Plan:
    sources = load_costs() if sources is None else sources
    rb = row_bytes(spec)
    raw = rb["total"] * spec.samples
    storage = next((s["storage"] for s in sources.values() if s.get("kind") == "measured" and "storage" in s), None)
    if storage:
        disk = spec.samples * (rb["values"] * storage["bf16_bytes_per_value"]
                               + spec.n_aug * storage["aug_bytes_per_aug"]
                               + (rb["strings"] + rb["ints"]) * storage.get("string_ratio", 1.0))
        basis = f"compression measured by make bench ({storage.get('machine', '?')})"
    else:
        disk, basis = raw, "no bench measurement found: raw bytes"
    compute = {}
    for name, src in sources.items():
        parts, missing = per_sample_seconds(spec, src)
        sec = sum(parts.values())
        compute[name] = {"kind": src.get("kind", "measured"), "device": src.get("device", "?"),
                         "seconds_per_sample": sec, "parts": parts, "hours": sec * spec.samples / 3600,
                         "missing": missing, "note": src.get("note", "")}
    return Plan(spec, rb, raw, disk, basis, datacompdr_bytes(spec) * spec.samples,
                math.ceil(spec.samples / spec.per_shard), compute)


# --------------------------------------------------------------------------- rendering / CLI helpers

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


def render(plan: Plan) -> str:
    s, rb = plan.spec, plan.bytes_per_sample
    teachers = ", ".join(f"{m} (dim {d})" for m, d in s.teachers) or "none"
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
        "compute (one device of each source; hours = samples x seconds/sample)",
    ]
    for name, c in plan.compute.items():
        p = c["parts"]
        label = "MEASURED" if c["kind"] == "measured" else "LITERATURE, not measured"
        lines.append(f"  {name} [{label}, {c['device']}]: {c['seconds_per_sample'] * 1e3:,.2f} ms/sample "
                     f"(teacher images {p['teacher_images'] * 1e3:,.2f}, texts {p['teacher_texts'] * 1e3:,.2f}, "
                     f"captions {p['captions'] * 1e3:,.2f}) -> {c['hours']:,.0f} device-hours")
        if c["missing"]:
            lines.append(f"      missing costs (total is a lower bound): {', '.join(c['missing'])}")
        if c["note"]:
            lines.append(f"      {c['note']}")
    return "\n".join(lines)


def spec_from_args(samples: str, teachers: list[str], captioners: list[str], ensemble: str | None,
                   n_aug: int, k: int, per_shard: int) -> PlanSpec:
    """Teachers as 'MODEL' or 'MODEL:DIM' (dims of open_clip models come from their configs), or
    the teachers and captioners of an ensemble file."""
    import open_clip

    from dr_pipeline.config import ConfigError, load_ensemble
    from dr_pipeline.models.teachers import register_model_configs

    pairs: list[tuple[str, int | None]] = []
    caps = list(captioners)
    if ensemble:
        ens = load_ensemble(ensemble)
        register_model_configs(ens)
        pairs += [(t.model, None) for t in ens.teachers]
        caps += [c.model for c in ens.captioners]
    for t in teachers:
        model, _, dim = t.partition(":")
        pairs.append((model, int(dim) if dim else None))
    out = []
    for model, dim in pairs:
        if dim is None:
            cfg = open_clip.get_model_config(model)
            if not cfg or "embed_dim" not in cfg:
                raise ConfigError(f"plan: no open_clip config for '{model}': give its dim as {model}:DIM")
            dim = int(cfg["embed_dim"])
        out.append((model, dim))
    return PlanSpec(parse_count(samples), tuple(out), tuple(caps), n_aug, k, per_shard)
