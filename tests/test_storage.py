"""Compact shards: bytes on disk per bf16 value and per augmentation, writer encodings, and the
comparison with the DataCompDR fp32 npz + JSON layout of the same rows."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from dr_pipeline import augment
from dr_pipeline.config import AugSpec, to_dict
from dr_pipeline.shards.datacompdr import write_datacompdr_tar
from dr_pipeline.shards.parquet_io import (
    ReinforcedRows,
    ShardWriter,
    column_bytes,
    leaf_paths,
    read_shard,
)
from dr_pipeline.shards.schema import ShardLayout, TeacherLayout

N, N_AUG, K, DIMS = 384, 2, 5, (256, 192)
WORDS = "a the man woman dog cat on in with red blue green street table grass two people photo of".split()


def _rows(n: int = N, seed: int = 0) -> tuple[ReinforcedRows, AugSpec]:
    spec = AugSpec(n_aug=N_AUG)
    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    sizes = rng.integers(200, 1600, size=(n, 2))

    def cap() -> str:
        return " ".join(r.choice(WORDS) for _ in range(r.randint(5, 14)))

    def unit(*shape):  # random-init teacher embeddings: unit vectors in random directions
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(torch.bfloat16)

    rows = ReinforcedRows(
        keys=[f"{i:09d}" for i in range(n)],
        uids=[None] * n,
        urls=[f"https://x.org/{i}.jpg" for i in range(n)],
        image_sha256=[f"{rng.integers(2**62):016x}" * 4 for _ in range(n)],
        widths=[int(w) for w, _ in sizes],
        heights=[int(h) for _, h in sizes],
        captions=[cap() for _ in range(n)],
        aug_params=np.stack(
            [augment.pack(augment.sample_all(spec, seed, f"{i:09d}", int(w), int(h))) for i, (w, h) in enumerate(sizes)]
        ),
    )
    rows.syn["coca"] = [[cap() for _ in range(K)] for _ in range(n)]
    for i, d in enumerate(DIMS):
        rows.image_emb[f"t{i}"] = unit(n, N_AUG, d)
        rows.text_emb[f"t{i}"] = unit(n, d)
        rows.syn_emb[f"t{i}"] = {"coca": [unit(K, d) for _ in range(n)]}
    return rows, spec


LAYOUT = ShardLayout(N_AUG, tuple(TeacherLayout(f"t{i}", d) for i, d in enumerate(DIMS)), ("coca",))
META = {
    "teachers": [{"id": f"t{i}", "dim": d} for i, d in enumerate(DIMS)],
    "captioners": [{"id": "coca"}],
    "aug": to_dict(AugSpec(n_aug=N_AUG)),
}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rows, spec = _rows()
    path = tmp_path_factory.mktemp("storage") / "shard-00000.parquet"
    w = ShardWriter(str(path), LAYOUT, {**META, "n": N})
    for i in range(0, N, 128):  # streamed in batches, as the worker writes
        w.write(rows.slice(slice(i, i + 128)))
    w.close()
    return path, rows


def test_bf16_embeddings_within_1_02x_of_raw(shard):
    path, _ = shard
    sizes = column_bytes(path)
    values_per_row = {"image": N_AUG, "text": 1, "syn": K}
    checked = 0
    for name, nbytes in sizes.items():
        if not name.startswith("emb__"):
            continue
        kind, dim = name.split("__")[2], int(name.rsplit("x", 1)[-1].rsplit("_", 1)[-1])
        per_value = nbytes / (N * values_per_row[kind] * dim)
        assert per_value <= 1.02 * 2, f"{name}: {per_value:.3f} B per bf16 value"
        assert per_value <= 1.6, f"{name}: {per_value:.3f} B/value: byte-stream split lost?"  # ~1.43 with it
        checked += 1
    assert checked == 3 * len(DIMS)


def test_augmentation_params_at_most_16_bytes_each(shard):
    path, _ = shard
    assert column_bytes(path)["aug_params"] / (N * N_AUG) <= 16


def test_numeric_leaves_are_byte_stream_split_without_statistics(shard):
    path, _ = shard
    md = pq.ParquetFile(path).metadata
    for c in range(md.num_columns):
        col = md.row_group(0).column(c)
        name = col.path_in_schema
        if name.startswith(("emb__", "aug_params")):
            assert "BYTE_STREAM_SPLIT" in col.encodings, name
            assert col.statistics is None or not col.statistics.has_min_max, name
        elif name == "key":
            assert col.statistics is not None and col.statistics.has_min_max
        assert col.compression == "ZSTD", name


def test_round_trip_is_bit_exact(shard):
    path, rows = shard
    back, meta = read_shard(str(path))
    assert back.keys == rows.keys and back.syn == rows.syn and back.captions == rows.captions
    assert np.array_equal(back.aug_params, rows.aug_params)
    for t in rows.image_emb:
        for a, b in ((back.image_emb[t], rows.image_emb[t]), (back.text_emb[t], rows.text_emb[t])):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        for a, b in zip(back.syn_emb[t]["coca"], rows.syn_emb[t]["coca"]):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_much_smaller_than_the_datacompdr_layout(shard):
    path, rows = shard
    buf = io.BytesIO()
    write_datacompdr_tar(buf, rows, META)
    ours = path.stat().st_size
    assert buf.tell() > 2.5 * ours, (buf.tell(), ours)


def test_leaf_paths_name_parquet_columns(shard):
    """The writer's per-column options are keyed by these paths; they must be the file's columns."""
    path, _ = shard
    md = pq.ParquetFile(path).metadata
    written = {md.row_group(0).column(c).path_in_schema for c in range(md.num_columns)}
    assert {p for f in LAYOUT.arrow_schema({}) for p in leaf_paths(f)} == written
    assert leaf_paths(pa.field("x", pa.list_(pa.list_(pa.uint16(), 4)))) == ["x.list.element.list.element"]
    assert leaf_paths(pa.field("k", pa.string())) == ["k"]
