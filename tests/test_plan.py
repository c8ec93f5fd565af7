"""``dr plan``: bytes from the shard contract, shard count, hours from cost sources."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from dr_pipeline import augment, cli
from dr_pipeline.config import AugSpec, to_dict
from dr_pipeline.plan import (
    PlanSpec,
    anchor_mfu,
    datacompdr_bytes,
    decode_step_macs,
    estimate,
    image_macs,
    layout,
    load_costs,
    open_clip_config,
    parse_count,
    render,
    row_bytes,
    spec_from_args,
    stage_flops,
    text_macs,
)
from dr_pipeline.shards.datacompdr import write_datacompdr_tar
from dr_pipeline.shards.parquet_io import ReinforcedRows

REPO = Path(__file__).resolve().parents[1]
SPEC = PlanSpec(
    samples=2_000_000_000,
    teachers=(("ViT-L-14", 768), ("other", 512)),
    captioners=("coca_ViT-L-14", "coca_ViT-B-32"),
    n_aug=3,
    k=4,
    per_shard=12_345,
)


def _rows(spec: PlanSpec, n: int = 3) -> ReinforcedRows:
    """Rows with every synthetic caption kept, built the way the worker builds them."""
    lay = layout(spec)
    g = torch.Generator().manual_seed(0)
    rows = ReinforcedRows(
        keys=[f"{i:09d}" for i in range(n)],
        uids=[None] * n,
        urls=["u"] * n,
        image_sha256=["0" * 64] * n,
        widths=[640] * n,
        heights=[480] * n,
        captions=["c"] * n,
        aug_params=np.zeros((n, spec.n_aug, 8), np.uint16),
    )
    for cap in lay.captioners:
        rows.syn[cap] = [["s"] * spec.k for _ in range(n)]
    for t in lay.teachers:
        rows.image_emb[t.id] = torch.randn(n, spec.n_aug, t.dim, generator=g).bfloat16()
        rows.text_emb[t.id] = torch.randn(n, t.dim, generator=g).bfloat16()
        rows.syn_emb[t.id] = {
            c: [torch.randn(spec.k, t.dim, generator=g).bfloat16() for _ in range(n)] for c in lay.captioners
        }
    return rows


def _leaf_value_bytes(arr: pa.Array) -> int:
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.nbytes


@pytest.mark.parametrize(
    "spec",
    [SPEC, PlanSpec(10, (("a", 32),), (), n_aug=1, k=0), PlanSpec(10, (("a", 768), ("b", 768)), ("c",), n_aug=2, k=5)],
)
def test_row_bytes_match_a_table_built_from_the_schema(spec):
    lay = layout(spec)
    table = _rows(spec).to_table(lay, lay.arrow_schema({}))
    n = table.num_rows
    emb = sum(_leaf_value_bytes(table.column(f).combine_chunks()) for f in table.column_names if f.startswith("emb__"))
    aug = _leaf_value_bytes(table.column("aug_params").combine_chunks())
    ints = sum(table.column(f).nbytes for f in ("width", "height"))
    rb = row_bytes(spec)
    assert rb["embeddings"] * n == emb
    assert rb["aug_params"] * n == aug == n * spec.n_aug * 16
    assert rb["ints"] * n == ints
    # and by hand: per teacher (n_aug image views + GT + k per captioner) x dim x 2 bytes
    by_hand = sum(2 * d * (spec.n_aug + 1 + spec.k * len(spec.captioners)) for _, d in spec.teachers)
    assert rb["embeddings"] == by_hand == 2 * rb["values"]


def test_plan_totals_shards_and_hours():
    """Models without a config are priced from measured seconds (one draw x draws per caption)."""
    src = {
        "kind": "measured",
        "device": "cpu",
        "models": {
            "ViT-L-14": {"image_s": 0.5, "text_s": 0.01},
            "other": {"image_s": 0.25, "text_s": 0.02},
            "coca_ViT-L-14": {"caption_s": 2.0},
        },
    }
    plan = estimate(SPEC, {"m": src})
    assert plan.shards == math.ceil(2_000_000_000 / 12_345)
    rb = row_bytes(SPEC)
    assert plan.raw_bytes == SPEC.samples * rb["total"]
    assert plan.disk_bytes == plan.raw_bytes and "raw" in plan.disk_basis
    c = plan.compute["m"]
    texts = 1 + SPEC.k * 2
    # caption_s is caption() as measured, its redraws included: not multiplied again
    want = 3 * 0.5 + 3 * 0.25 + texts * (0.01 + 0.02) + SPEC.k * 2.0
    assert c["seconds_per_sample"] == pytest.approx(want)
    # decode_s is one sampled draw: priced at the plan's draws per kept caption
    src["models"]["coca_ViT-L-14"] = {"caption_s": 2.0, "decode_s": 1.5}
    c = estimate(SPEC, {"m": src}).compute["m"]
    want += SPEC.k * (SPEC.draws_per_caption * 1.5 - 2.0)
    assert c["seconds_per_sample"] == pytest.approx(want)
    assert c["hours"] == pytest.approx(want * SPEC.samples / 3600)
    assert c["days_on_gpus"] == pytest.approx(c["hours"] / 24 / SPEC.gpus)
    assert c["shards_per_hour"] == pytest.approx(SPEC.gpus * 3600 / (want * SPEC.per_shard))
    assert c["missing"] == ["coca_ViT-B-32.caption_s"]
    est = plan.compute["A100 (estimated)"]  # no configs: nothing to estimate from, and it says so
    assert est["kind"] == "estimated" and any("no model config" in m for m in est["missing"])


def _configs(*models):
    return {m: open_clip_config(m) for m in models}


def test_flops_match_open_clip_published_profile():
    """open_clip's model profile table (MACs, as it counts): ViT-L-14 image 81.08 G, text (77 tokens) 6.54 G."""
    cfg = open_clip_config("ViT-L-14")
    assert image_macs(cfg) == pytest.approx(81.08e9, rel=0.02)
    assert text_macs(cfg, 77) == pytest.approx(6.54e9, rel=0.03)
    coca = open_clip_config("coca_ViT-L-14")
    step = decode_step_macs(coca, 8)  # text tower + decoder (self + cross) + vocabulary, one token
    w = 768
    assert step == pytest.approx(12 * 12 * w * w + 12 * 14 * w * w + w * 49408, rel=0.05)


DFNDR = dict(
    samples=1_900_000_000,
    teachers=(("ViT-L-14", 768), ("ViT-L-14", 768)),
    captioners=("coca_ViT-L-14",),
    n_aug=2,
    k=5,
    per_shard=10_000,
)


def test_dfndr2b_per_sample_flops_by_hand():
    spec = PlanSpec(**DFNDR, configs=_configs("ViT-L-14", "coca_ViT-L-14"), draws_per_caption=1.0)
    f, unknown = stage_flops(spec)
    assert not unknown
    vit = 2 * image_macs(spec.configs["ViT-L-14"])  # ~162 GFLOP per view
    assert f["teacher_images"] == pytest.approx(2 * 2 * vit)  # 2 teachers x 2 augmentations
    assert f["teacher_texts"] == pytest.approx(2 * 6 * 2 * text_macs(spec.configs["ViT-L-14"], 20))  # GT + 5 syn
    assert f["caption_images"] == pytest.approx(vit, rel=0.08)  # the CoCa's own ViT-L/14 once per image
    retried = stage_flops(dataclasses.replace(spec, draws_per_caption=2.0))[0]
    assert retried["caption_decode"] == pytest.approx(2 * f["caption_decode"])  # retries are paid for
    assert 850e9 < sum(f.values()) < 950e9


def test_dfndr2b_gpu_days_are_believable():
    """`dr plan --samples 1.9B --ensemble teachers/dfndr2b.yaml`: a few hundred A100-days, H100 ~3x fewer,
    the public-anchor figure within 2x of the default, memory of one actor fits a 24 GB GPU."""
    spec = spec_from_args("1.9B", [], [], str(REPO / "teachers" / "dfndr2b.yaml"), 2, 5, 10_000, gpus=256)
    plan = estimate(spec, load_costs())
    a100, h100 = plan.compute["A100 (estimated)"], plan.compute["H100 (estimated)"]
    assert 100 < a100["device_days"] < 1000 and a100["anchor"]["device_days"] < 2 * a100["device_days"]
    assert a100["device_days"] / h100["device_days"] == pytest.approx(989 / 312)
    assert a100["days_on_gpus"] == pytest.approx(a100["device_days"] / 256)
    assert a100["parts"]["caption_decode"] < a100["parts"]["teacher_images"]  # KV-cached, batched decoding
    assert anchor_mfu() == pytest.approx(312 * 2 * 81.08e9 / 312e12, rel=0.02)
    assert 8 < plan.memory["gpu_total"] < 20
    text = render(plan)
    assert "ESTIMATED, A100" in text and "ESTIMATED, H100" in text and "with 256 of them" in text
    assert "MFU 0.25" in text and "shards/hour" in text and "memory per actor" in text


def test_gpu_measurement_replaces_the_estimate(tmp_path):
    """A costs file from an A100 (make bench on one): its row is MEASURED and its efficiency ratios
    feed the H100 estimate."""
    cfg = open_clip_config("ViT-L-14")
    gpu = {
        "name": "nvidia-a100 (measured)",
        "device": "cuda",
        "machine": {"gpu": "NVIDIA A100-SXM4-80GB"},
        "models": {
            "ViT-L-14": {"image_s": 1 / 800, "text_s": 2 * text_macs(cfg, 14.5) / (0.5 * 2 * image_macs(cfg) * 800)}
        },
    }
    p = tmp_path / "costs-a100.json"
    p.write_text(json.dumps(gpu))
    spec = spec_from_args("1M", ["ViT-L-14"], [], None, 2, 0, 10_000)
    plan = estimate(spec, load_costs([str(p)]))
    assert "A100 (estimated)" not in plan.compute
    row = plan.compute["nvidia-a100 (measured)"]
    assert row["kind"] == "measured" and row["device"].startswith("NVIDIA A100")
    assert row["parts"]["teacher_images"] == pytest.approx(2 / 800)
    assert "x0.50" in plan.compute["H100 (estimated)"]["note"]  # text at half the image efficiency


def test_parse_count():
    assert parse_count("2e9") == 2_000_000_000
    assert parse_count("1.9B") == 1_900_000_000
    assert parse_count("12.8M") == 12_800_000
    assert parse_count("500k") == 500_000
    with pytest.raises(ValueError):
        parse_count("lots")


def test_cli_plan(tmp_path, capsys):
    costs = tmp_path / "costs-m.json"
    costs.write_text(
        json.dumps(
            {
                "name": "m",
                "device": "cpu",
                "models": {"ViT-L-14": {"image_s": 0.1, "text_s": 0.01}, "coca_ViT-L-14": {"caption_s": 1.0}},
            }
        )
    )
    argv = [
        "plan",
        "--samples",
        "12.8M",
        "--teacher",
        "ViT-L-14",
        "--teacher",
        "ViT-L-14:512",
        "--captioner",
        "coca_ViT-L-14",
        "--n-aug",
        "30",
        "--costs",
        str(costs),
        "--gpus",
        "8",
    ]
    assert cli.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spec"]["teachers"] == [["ViT-L-14", 768], ["ViT-L-14", 512]]
    assert out["bytes_per_sample"]["embeddings"] == 2 * (768 + 512) * (30 + 1 + 5)
    assert out["shards"] == 1280
    m = out["compute"]["m"]
    assert m["parts"]["teacher_images"] == pytest.approx(2 * 30 * 0.1)  # measured model: its own seconds
    assert m["parts"]["teacher_texts"] > 2 * 6 * 0.01  # 20-token captions vs the bench's 14.5
    assert m["days_on_gpus"] == pytest.approx(m["device_days"] / 8)
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "MEASURED" in text and "ESTIMATED, A100" in text and "1,280 of" in text
    assert cli.main(["plan", "--samples", "10"]) == 2
    assert cli.main(["plan", "--samples", "10", "--teacher", "no-such-model"]) == 2
    assert cli.main(["plan", "--samples", "1M", "--ensemble", "pkg:teachers/dfndr2b.yaml"]) == 0


def test_measured_compression_gives_disk_bytes():
    src = {
        "kind": "measured",
        "models": {},
        "storage": {"bf16_bytes_per_value": 1.5, "aug_bytes_per_aug": 11.0, "string_ratio": 0.5, "machine": "m"},
    }
    plan = estimate(SPEC, {"m": src})
    rb = row_bytes(SPEC)
    per = rb["values"] * 1.5 + SPEC.n_aug * 11.0 + (rb["strings"] + rb["ints"]) * 0.5
    assert plan.disk_bytes == pytest.approx(SPEC.samples * per)


def test_datacompdr_formula_is_close_to_a_real_export():
    spec = PlanSpec(64, (("a", 768), ("b", 768)), ("c",), n_aug=2, k=5)
    rows = _rows(spec, n=64)
    lay = layout(spec)
    rows.syn["c0"] = [["a photo of a dog on the grass"] * spec.k for _ in range(64)]
    rows.aug_params = np.stack(
        [augment.pack(augment.sample_all(AugSpec(n_aug=2), 0, f"{i}", 640, 480)) for i in range(64)]
    )
    rows.urls = ["https://images.example.com/abcdef/" + "x" * 60 + ".jpg"] * 64
    meta = {
        "teachers": [{"id": t.id} for t in lay.teachers],
        "captioners": [{"id": "c0"}],
        "aug": to_dict(AugSpec(n_aug=2)),
    }
    buf = io.BytesIO()
    write_datacompdr_tar(buf, rows, meta)
    assert datacompdr_bytes(spec) == pytest.approx(buf.tell() / 64, rel=0.1)


def test_captioner_costs_from_either_bench_format():
    """Older costs files: caption_s (one draw, mean_tokens); newer: decode_s (one draw) and caption_s
    (redraws of random weights included): the decoder's efficiency comes from the single draw."""
    from dr_pipeline.plan import efficiencies

    cfgs = _configs("ViT-L-14", "coca_ViT-L-14")
    base = {"ViT-L-14": {"image_s": 3.0}}
    old = {"models": {**base, "coca_ViT-L-14": {"caption_s": 1.5, "mean_tokens": 30.0}}}
    new = {
        "models": {
            **base,
            "coca_ViT-L-14": {"caption_s": 4.0, "decode_s": 1.5, "mean_steps": 29.0, "draws_per_caption": 2.7},
        }
    }
    assert efficiencies(old, cfgs)["decode"] == pytest.approx(efficiencies(new, cfgs)["decode"])
    assert 0 < efficiencies(new, cfgs)["decode"] < efficiencies(new, cfgs)["image"]
