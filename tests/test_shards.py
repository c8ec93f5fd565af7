"""bf16 codec and Parquet shard contract: bit-exact round trips, schema file, interop."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dr_pipeline.shards import bf16
from dr_pipeline.shards.parquet_io import ReinforcedRows, ShardWriter, read_shard
from dr_pipeline.shards.schema import ShardLayout, TeacherLayout, contract, parse_type, schema_path


def reference_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Independent float32 -> bf16 rounding (round to nearest, ties to even) on the raw bits."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def test_bf16_bits_match_independent_rounding():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 10_000),
            np.array([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-40, 65504.0], np.float32),
        ]
    )
    got = bf16.bf16_bits(torch.from_numpy(x))
    np.testing.assert_array_equal(got, reference_bf16_bits(x))
    back = bf16.bits_to_bf16(got)
    assert back.dtype == torch.bfloat16
    np.testing.assert_array_equal(back.view(torch.uint16).numpy(), got)
    # the numpy decoder the trainer uses gives exactly torch's bf16 -> float32
    np.testing.assert_array_equal(bf16.bits_to_f32(got), back.float().numpy())


def _rows(n: int, n_aug: int, dims: dict[str, int], seed: int = 0) -> ReinforcedRows:
    g = torch.Generator().manual_seed(seed)
    syn = [[f"caption {i} {j}" for j in range(i % 3)] for i in range(n)]
    rows = ReinforcedRows(
        keys=[f"{i:09d}" for i in range(n)],
        uids=[None if i % 2 else f"u{i}" for i in range(n)],
        urls=[f"https://x/{i}" for i in range(n)],
        image_sha256=["ab" * 32] * n,
        widths=[100 + i for i in range(n)],
        heights=[50] * n,
        captions=[f"gt {i}" for i in range(n)],
        aug_params=np.random.default_rng(seed).integers(0, 65535, (n, n_aug, 8)).astype(np.uint16),
        syn={"cap": syn},
    )
    for t, d in dims.items():
        rows.image_emb[t] = torch.randn(n, n_aug, d, generator=g).bfloat16()
        rows.text_emb[t] = torch.randn(n, d, generator=g).bfloat16()
        rows.syn_emb[t] = {"cap": [torch.randn(len(s), d, generator=g).bfloat16() for s in syn]}
    return rows


def _write(path, rows: ReinforcedRows, n_aug: int, dims: dict[str, int], batches: int = 2) -> ShardLayout:
    layout = ShardLayout(n_aug, tuple(TeacherLayout(t, d) for t, d in dims.items()), ("cap",))
    meta = {
        "schema_version": 1,
        "aug": {"n_aug": n_aug},
        "teachers": [{"id": t, "dim": d} for t, d in dims.items()],
        "captioners": [{"id": "cap"}],
    }
    w = ShardWriter(str(path), layout, meta)
    step = -(-len(rows) // batches)
    for s in range(0, len(rows), step):
        w.write(_slice(rows, s, s + step))
    w.close()
    return layout


def _slice(r: ReinforcedRows, a: int, b: int) -> ReinforcedRows:
    return ReinforcedRows(
        r.keys[a:b],
        r.uids[a:b],
        r.urls[a:b],
        r.image_sha256[a:b],
        r.widths[a:b],
        r.heights[a:b],
        r.captions[a:b],
        r.aug_params[a:b],
        {c: v[a:b] for c, v in r.syn.items()},
        {t: v[a:b] for t, v in r.image_emb.items()},
        {t: v[a:b] for t, v in r.text_emb.items()},
        {t: {c: v[a:b] for c, v in d.items()} for t, d in r.syn_emb.items()},
    )


def test_parquet_round_trip_is_bit_exact(tmp_path):
    dims = {"t-a": 16, "t_b": 24}
    rows = _rows(23, 3, dims)
    _write(tmp_path / "s.parquet", rows, 3, dims, batches=3)
    back, meta = read_shard(str(tmp_path / "s.parquet"))
    assert meta["teachers"][1]["id"] == "t_b"
    assert back.keys == rows.keys and back.uids == rows.uids and back.captions == rows.captions
    assert back.syn == rows.syn and back.widths == rows.widths
    np.testing.assert_array_equal(back.aug_params, rows.aug_params)
    for t in dims:
        assert torch.equal(back.image_emb[t].view(torch.uint16), rows.image_emb[t].view(torch.uint16))
        assert torch.equal(back.text_emb[t].view(torch.uint16), rows.text_emb[t].view(torch.uint16))
        for a, b in zip(back.syn_emb[t]["cap"], rows.syn_emb[t]["cap"]):
            assert a.shape == b.shape and torch.equal(a.view(torch.uint16), b.view(torch.uint16))


def test_schema_file_is_the_contract(tmp_path):
    dims = {"t": 8}
    layout = _write(tmp_path / "s.parquet", _rows(4, 2, dims), 2, dims)
    schema = pq.read_schema(tmp_path / "s.parquet")
    c = json.loads(schema_path("reinforced-v1.json").read_text())
    assert c == contract() and c["version"] == 1
    assert schema.names[: len(c["columns"])] == [col["name"] for col in c["columns"]]
    assert str(schema.field("emb__t__image__bf16_2x8").type) == "fixed_size_list<element: uint16>[16]"
    assert schema.field("emb__t__syn__cap__bf16_8").type == parse_type("list<fixed_size_list<uint16, 8>>")
    assert schema.remove_metadata().equals(layout.arrow_schema())
    assert json.loads(schema.metadata[b"dr_pipeline"])["schema_version"] == 1


def test_embeddings_cost_about_two_bytes_per_value(tmp_path):
    dims = {"t": 256}
    rows = _rows(256, 4, dims)
    _write(tmp_path / "s.parquet", rows, 4, dims, batches=1)
    col = pq.ParquetFile(tmp_path / "s.parquet").metadata.row_group(0)
    idx = [col.column(i).path_in_schema for i in range(col.num_columns)].index("emb__t__image__bf16_4x256.list.element")
    per_value = col.column(idx).total_compressed_size / (256 * 4 * 256)
    assert per_value <= 2.1, per_value  # random bf16 bits barely compress; the floor is 2 bytes


@pytest.mark.parametrize("reader", ["polars", "duckdb", "pandas", "pyarrow_dir"])
def test_shard_folder_opens_in_other_readers(tmp_path, reader):
    dims = {"t": 8}
    (tmp_path / "shards").mkdir()
    rows = _rows(7, 2, dims)
    _write(tmp_path / "shards" / "a.parquet", rows, 2, dims)
    _write(tmp_path / "shards" / "b.parquet", rows, 2, dims)
    folder = tmp_path / "shards"
    if reader == "polars":
        import polars as pl

        df = pl.read_parquet(str(folder / "*.parquet"))
        assert df.height == 14 and df["emb__t__text__bf16_8"].dtype.shape == (8,)
        first = np.array(df["emb__t__text__bf16_8"][0].to_list(), dtype=np.uint16)
    elif reader == "duckdb":
        import duckdb

        res = duckdb.sql(f"select key, emb__t__text__bf16_8 from '{folder}/*.parquet' order by key").fetchall()
        assert len(res) == 14
        first = np.array(res[0][1], dtype=np.uint16)
    elif reader == "pandas":
        import pandas as pd

        df = pd.read_parquet(folder)
        assert len(df) == 14
        first = np.asarray(df["emb__t__text__bf16_8"].iloc[0], dtype=np.uint16)
    else:
        t = pq.read_table(folder)
        assert t.num_rows == 14
        first = np.asarray(t.column("emb__t__text__bf16_8")[0].as_py(), dtype=np.uint16)
    np.testing.assert_array_equal(first, rows.text_emb["t"][0].view(torch.uint16).numpy())
