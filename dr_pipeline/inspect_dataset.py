"""``dr inspect``: a summary of a reinforced dataset and a contact sheet PNG.

The contact sheet shows a few source images, their N augmentations *replayed from the
stored params* (not re-sampled), and their synthetic captions: what the teachers saw.
"""

from __future__ import annotations

import textwrap
from collections import Counter

from PIL import Image, ImageDraw

from dr_pipeline import augment
from dr_pipeline.config import AugSpec, from_dict
from dr_pipeline.corpus.readers import Sample, expand_urls, iter_shard, shard_name
from dr_pipeline.images import decode_image
from dr_pipeline.shards.dataset import ReinforcedDataset, load_dataset_config
from dr_pipeline.shards.parquet_io import read_shard


def summarize(root: str, storage_options: dict | None = None) -> dict:
    ds = ReinforcedDataset(root, storage_options)
    markers = ds.markers()
    reasons: Counter = Counter()
    cap_rej: Counter = Counter()
    resampled: Counter = Counter()
    for m in markers.values():
        reasons.update(m.rejected_by_reason)
        resampled.update(m.captions_resampled)
        for c in m.captions_rejected.values():
            cap_rej.update(c)
    written = sum(m.n_written for m in markers.values())
    nbytes = sum(m.bytes for m in markers.values())
    manifest = ds.read_manifest()
    failed = {f.shard: f.error for f in manifest.failed} if manifest else {}
    first = next((n for n, m in markers.items() if m.n_written), next(iter(markers), None))
    meta: dict = {}
    syn_counts: list[int] = []
    if first:
        rows, meta = read_shard(ds.shard_url(first), storage_options)
        for caps in rows.syn.values():
            syn_counts += [len(c) for c in caps]
    return {
        "dataset": root,
        "shards": len(markers),
        "samples": written,
        "read": sum(m.n_read for m in markers.values()),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(reasons.most_common()),
        "rejected_by_shard": {n: m.rejected_by_reason for n, m in markers.items() if m.n_rejected},
        "failed_shards": failed,
        "captions_rejected": dict(cap_rej),
        "captions_resampled": dict(resampled),
        "teachers": [
            f"{t['id']} ({t['model']}, dim {t['dim']}, {t['image_size']}px)" for t in meta.get("teachers", [])
        ],
        "captioners": [c["id"] for c in meta.get("captioners", [])],
        "n_aug": meta.get("aug", {}).get("n_aug"),
        "seed": meta.get("seed"),
        "captions_per_image": round(sum(syn_counts) / max(len(syn_counts), 1), 2),
        "bytes": nbytes,
        "bytes_per_sample": round(nbytes / max(written, 1), 1),
    }


def render_summary(s: dict) -> str:
    lines = []
    for k, v in s.items():
        if k == "rejected_by_reason":
            lines.append(f"{k:>20}: " + (", ".join(f"{r} {n}" for r, n in v.items()) or "none"))
        elif k == "rejected_by_shard":
            lines += [
                f"{'rejected in ' + n:>20}: " + ", ".join(f"{r} {c}" for r, c in sorted(rs.items()))
                for n, rs in v.items()
            ]
        elif k == "failed_shards":
            lines += [f"{'FAILED ' + n:>20}: {err}" for n, err in v.items()]
        else:
            lines.append(f"{k:>20}: {v}")
    return "\n".join(lines)


def contact_sheet(
    root: str, out_png: str, n_images: int = 4, tile: int = 128, storage_options: dict | None = None
) -> str:
    ds = ReinforcedDataset(root, storage_options)
    job, _ = load_dataset_config(ds)
    markers = {n: m for n, m in ds.markers().items() if m.n_written}
    if not markers:
        raise FileNotFoundError(f"{root}: no committed shard with samples to inspect")
    name = next(iter(markers))
    rows, meta = read_shard(ds.shard_url(name), storage_options)
    spec = from_dict(AugSpec, meta["aug"])
    # Secrets were redacted from job.yaml (load_dataset_config dropped them): the caller's options apply.
    input_so = {**job.input.storage_options, **(storage_options or {})}
    base_url = next(u for u in expand_urls(job.input.urls, input_so) if shard_name(u) == name)
    wanted = {k: i for i, k in enumerate(rows.keys[:n_images])}
    images: dict[str, Image.Image] = {}
    for item in iter_shard(base_url, input_so):
        if isinstance(item, Sample) and item.key in wanted and item.key not in images:
            images[item.key] = decode_image(item.image)  # the decode the teachers saw
            if len(images) == len(wanted):
                break
    n_aug = spec.n_aug
    text_w = 560
    sheet = Image.new("RGB", (tile * (n_aug + 1) + text_w, tile * len(wanted)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (key, i) in enumerate(wanted.items()):
        img = images[key]
        thumb = img.copy()
        thumb.thumbnail((tile, tile))
        sheet.paste(thumb, (0, r * tile))
        for a, p in enumerate(augment.unpack(rows.aug_params[i])):
            view = augment.replay(img, p, tile, spec)
            sheet.paste(Image.fromarray(view.permute(1, 2, 0).numpy()), ((a + 1) * tile, r * tile))
        lines = [f"{key}  GT: {rows.captions[i]}"]
        for cap, per_row in rows.syn.items():
            lines += [f"[{cap}] {c}" for c in per_row[i]]
        max_lines = tile // 12  # one caption per line, shortened to fit the tile
        text = "\n".join(textwrap.shorten(t, 92, placeholder=" ...") for t in lines[:max_lines])
        draw.multiline_text((tile * (n_aug + 1) + 6, r * tile + 4), text, fill="black", spacing=2)
    sheet.save(out_png)
    return out_png
