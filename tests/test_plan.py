"""``dr plan``: bytes from the shard contract, shard count, hours from cost sources."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from dr_pipeline import augment, cli
from dr_pipeline.config import AugSpec, to_dict
from dr_pipeline.plan import (
    LITERATURE,
    PlanSpec,
    datacompdr_bytes,
    layout,
    load_costs,
    make_plan,
    parse_count,
    per_sample_seconds,
    row_bytes,
)
from dr_pipeline.shards.datacompdr import write_datacompdr_tar
from dr_pipeline.shards.parquet_io import ReinforcedRows

SPEC = PlanSpec(samples=2_000_000_000, teachers=(("ViT-L-14", 768), ("other", 512)),
                captioners=("coca_ViT-L-14", "coca_ViT-B-32"), n_aug=3, k=4, per_shard=12_345)


def _rows(spec: PlanSpec, n: int = 3) -> ReinforcedRows:
    """Rows with every synthetic caption kept, built the way the worker builds them."""
    lay = layout(spec)
    g = torch.Generator().manual_seed(0)
    rows = ReinforcedRows(keys=[f"{i:09d}" for i in range(n)], uids=[None] * n, urls=["u"] * n,
                          image_sha256=["0" * 64] * n, widths=[640] * n, heights=[480] * n, captions=["c"] * n,
                          aug_params=np.zeros((n, spec.n_aug, 8), np.uint16))
    for cap in lay.captioners:
        rows.syn[cap] = [["s"] * spec.k for _ in range(n)]
    for t in lay.teachers:
        rows.image_emb[t.id] = torch.randn(n, spec.n_aug, t.dim, generator=g).bfloat16()
        rows.text_emb[t.id] = torch.randn(n, t.dim, generator=g).bfloat16()
        rows.syn_emb[t.id] = {c: [torch.randn(spec.k, t.dim, generator=g).bfloat16() for _ in range(n)]
                              for c in lay.captioners}
    return rows


def _leaf_value_bytes(arr: pa.Array) -> int:
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.nbytes


@pytest.mark.parametrize("spec", [SPEC, PlanSpec(10, (("a", 32),), (), n_aug=1, k=0),
                                  PlanSpec(10, (("a", 768), ("b", 768)), ("c",), n_aug=2, k=5)])
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
    src = {"kind": "measured", "device": "cpu", "models": {
        "ViT-L-14": {"image_s": 0.5, "text_s": 0.01}, "other": {"image_s": 0.25, "text_s": 0.02},
        "coca_ViT-L-14": {"caption_s": 2.0}}}
    plan = make_plan(SPEC, {"m": src})
    assert plan.shards == math.ceil(2_000_000_000 / 12_345)
    rb = row_bytes(SPEC)
    assert plan.raw_bytes == SPEC.samples * rb["total"]
    assert plan.disk_bytes == plan.raw_bytes and "raw" in plan.disk_basis
    c = plan.compute["m"]
    texts = 1 + SPEC.k * 2
    want = 3 * 0.5 + 3 * 0.25 + texts * (0.01 + 0.02) + SPEC.k * 2.0
    assert c["seconds_per_sample"] == pytest.approx(want)
    assert c["hours"] == pytest.approx(want * SPEC.samples / 3600)
    assert c["missing"] == ["coca_ViT-B-32.caption_s"]


def test_measured_compression_gives_disk_bytes():
    src = {"kind": "measured", "models": {}, "storage": {"bf16_bytes_per_value": 1.5, "aug_bytes_per_aug": 11.0,
                                                         "string_ratio": 0.5, "machine": "m"}}
    plan = make_plan(SPEC, {"m": src})
    rb = row_bytes(SPEC)
    per = rb["values"] * 1.5 + SPEC.n_aug * 11.0 + (rb["strings"] + rb["ints"]) * 0.5
    assert plan.disk_bytes == pytest.approx(SPEC.samples * per)


def test_datacompdr_formula_is_close_to_a_real_export():
    spec = PlanSpec(64, (("a", 768), ("b", 768)), ("c",), n_aug=2, k=5)
    rows = _rows(spec, n=64)
    lay = layout(spec)
    rows.syn["c0"] = [["a photo of a dog on the grass"] * spec.k for _ in range(64)]
    rows.aug_params = np.stack([augment.pack(augment.sample_all(AugSpec(n_aug=2), 0, f"{i}", 640, 480))
                                for i in range(64)])
    rows.urls = ["https://images.example.com/abcdef/" + "x" * 60 + ".jpg"] * 64
    meta = {"teachers": [{"id": t.id} for t in lay.teachers], "captioners": [{"id": "c0"}],
            "aug": to_dict(AugSpec(n_aug=2))}
    buf = io.BytesIO()
    write_datacompdr_tar(buf, rows, meta)
    assert datacompdr_bytes(spec) == pytest.approx(buf.tell() / 64, rel=0.1)


def test_literature_is_labelled_and_kept_apart(tmp_path):
    p = tmp_path / "costs-x.json"
    p.write_text(json.dumps({"name": "x (measured)", "device": "cpu", "models": {"ViT-L-14": {"image_s": 1.0}}}))
    sources = load_costs([str(p)])
    assert sources["x (measured)"]["kind"] == "measured"
    lit = [s for s in sources.values() if s["kind"] == "literature"]
    assert lit and all("not measured" in s["note"] for s in lit)
    parts, missing = per_sample_seconds(SPEC, LITERATURE["A100 (literature)"])
    assert parts["teacher_images"] == pytest.approx(3 / 312) and "ViT-L-14.text_s" in missing


def test_parse_count():
    assert parse_count("2e9") == 2_000_000_000
    assert parse_count("1.9B") == 1_900_000_000
    assert parse_count("12.8M") == 12_800_000
    assert parse_count("500k") == 500_000
    with pytest.raises(ValueError):
        parse_count("lots")


def test_cli_plan(tmp_path, capsys):
    costs = tmp_path / "costs-m.json"
    costs.write_text(json.dumps({"name": "m", "device": "cpu", "models": {"ViT-L-14": {"image_s": 0.1, "text_s": 0.01},
                                                                          "coca_ViT-L-14": {"caption_s": 1.0}}}))
    argv = ["plan", "--samples", "12.8M", "--teacher", "ViT-L-14", "--teacher", "ViT-L-14:512",
            "--captioner", "coca_ViT-L-14", "--n-aug", "30", "--costs", str(costs)]
    assert cli.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spec"]["teachers"] == [["ViT-L-14", 768], ["ViT-L-14", 512]]
    assert out["bytes_per_sample"]["embeddings"] == 2 * (768 + 512) * (30 + 1 + 5)
    assert out["shards"] == 1280
    assert out["compute"]["m"]["hours"] == pytest.approx(12.8e6 * (2 * 30 * 0.1 + 2 * 6 * 0.01 + 5 * 1.0) / 3600)
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "MEASURED" in text and "LITERATURE, not measured" in text and "1,280 of" in text
    assert cli.main(["plan", "--samples", "10"]) == 2
    assert cli.main(["plan", "--samples", "10", "--teacher", "no-such-model"]) == 2
