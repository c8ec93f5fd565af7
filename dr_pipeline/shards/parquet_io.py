"""Write and read reinforced Parquet shards (contract: schemas/reinforced-v1.json).

``ReinforcedRows`` is the in-memory, columnar form of a batch of rows; the writer streams
batches into one Parquet file (bounded memory per shard), the reader turns a file back
into ``ReinforcedRows`` with bit-exact bf16 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dr_pipeline.shards import bf16
from dr_pipeline.shards.schema import (
    ShardLayout,
    TeacherLayout,
    image_col,
    layout_from_metadata,
    read_metadata,
    syn_col,
    syn_emb_col,
    text_col,
)


@dataclass
class ReinforcedRows:
    keys: list[str]
    uids: list[str | None]
    urls: list[str | None]
    image_sha256: list[str]
    widths: list[int]
    heights: list[int]
    captions: list[str]
    aug_params: np.ndarray  # uint16 [B, n_aug, 8]
    syn: dict[str, list[list[str]]] = field(default_factory=dict)  # captioner -> per row captions
    image_emb: dict[str, torch.Tensor] = field(default_factory=dict)  # teacher -> bf16 [B, n_aug, D]
    text_emb: dict[str, torch.Tensor] = field(default_factory=dict)  # teacher -> bf16 [B, D]
    syn_emb: dict[str, dict[str, list[torch.Tensor]]] = field(
        default_factory=dict
    )  # teacher -> captioner -> [k_i, D] bf16

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, sl: slice) -> ReinforcedRows:
        """Rows ``sl`` (views of the same arrays), e.g. to write a large batch in pieces."""
        return ReinforcedRows(
            self.keys[sl],
            self.uids[sl],
            self.urls[sl],
            self.image_sha256[sl],
            self.widths[sl],
            self.heights[sl],
            self.captions[sl],
            self.aug_params[sl],
            {c: v[sl] for c, v in self.syn.items()},
            {t: v[sl] for t, v in self.image_emb.items()},
            {t: v[sl] for t, v in self.text_emb.items()},
            {t: {c: v[sl] for c, v in d.items()} for t, d in self.syn_emb.items()},
        )

    def to_table(self, layout: ShardLayout, schema: pa.Schema) -> pa.Table:
        cols: dict[str, pa.Array] = {
            "key": pa.array(self.keys, pa.string()),
            "uid": pa.array(self.uids, pa.string()),
            "url": pa.array(self.urls, pa.string()),
            "image_sha256": pa.array(self.image_sha256, pa.string()),
            "width": pa.array(self.widths, pa.int32()),
            "height": pa.array(self.heights, pa.int32()),
            "caption": pa.array(self.captions, pa.string()),
            "aug_params": bf16.fsl_uint16(self.aug_params.reshape(len(self), -1)),
        }
        for cap in layout.captioners:
            cols[syn_col(cap)] = pa.array(self.syn[cap], pa.list_(pa.string()))
        for t in layout.teachers:
            img = self.image_emb[t.id]
            cols[image_col(t.id, layout.n_aug, t.dim)] = bf16.fsl_uint16(bf16.bf16_bits(img).reshape(len(self), -1))
            cols[text_col(t.id, t.dim)] = bf16.fsl_uint16(bf16.bf16_bits(self.text_emb[t.id]))
            for cap in layout.captioners:
                rows = [bf16.bf16_bits(e).reshape(-1, t.dim) for e in self.syn_emb[t.id][cap]]
                cols[syn_emb_col(t.id, cap, t.dim)] = bf16.list_of_fsl_uint16(rows, t.dim)
        return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def _numeric_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if f.name == "aug_params" or f.name.startswith("emb__")]


def leaf_paths(field: pa.Field) -> list[str]:
    """Parquet column paths of an Arrow field's leaves ("emb__x.list.element" for a list column).

    pyarrow matches per-column writer options (``use_byte_stream_split``, ``use_dictionary``)
    against these leaf paths: a top-level name of a nested column silently matches nothing.
    """

    def walk(path: str, t: pa.DataType) -> list[str]:
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            return walk(f"{path}.list.element", t.value_type)
        if pa.types.is_struct(t):
            return [p for f in t for p in walk(f"{path}.{f.name}", f.type)]
        return [path]

    return walk(field.name, field.type)


class ShardWriter:
    """Streams ``ReinforcedRows`` batches into one Parquet file (a local path or an open file).

    Storage (tests/test_storage.py holds the thresholds): bf16 bits as uint16 (Parquet INT32)
    leaves with BYTE_STREAM_SPLIT, so zstd sees the all-zero high bytes, the exponent bytes and
    the mantissa bytes as separate streams (~1.43 B per random bf16 value, under the 2-byte raw
    size; ~11 B per 16-byte augmentation record) and no statistics on them. Strings (keys, URLs,
    GT and synthetic captions) are mostly unique: plain encoding + zstd, no dictionaries (smaller
    than dictionary pages on caption-like text; zstd still catches repeats within a page).
    """

    def __init__(self, sink, layout: ShardLayout, metadata: dict, compression_level: int = 3):
        self.layout = layout
        self.schema = layout.arrow_schema(metadata)
        numeric = _numeric_columns(self.schema)
        leaves = {f.name: leaf_paths(f) for f in self.schema}
        self._writer = pq.ParquetWriter(
            sink,
            self.schema,
            compression="zstd",
            compression_level=compression_level,
            use_dictionary=False,  # mostly-unique strings: plain + zstd is smaller (keys, URLs, captions)
            use_byte_stream_split=[p for n in numeric for p in leaves[n]],
            write_statistics=["key"],
        )
        self.rows = 0

    def write(self, rows: ReinforcedRows) -> None:
        if len(rows):
            self._writer.write_table(rows.to_table(self.layout, self.schema))
            self.rows += len(rows)

    def close(self) -> None:
        self._writer.close()


def read_table(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return pq.read_table(f, columns=columns)


def decode_table(table: pa.Table) -> tuple[ReinforcedRows, dict]:
    """Arrow table of a reinforced shard -> (rows with bf16 tensors, file metadata)."""
    meta = read_metadata(table.schema)
    layout = layout_from_metadata(meta)
    n = table.num_rows
    col = table.column
    rows = ReinforcedRows(
        keys=col("key").to_pylist(),
        uids=col("uid").to_pylist(),
        urls=col("url").to_pylist(),
        image_sha256=col("image_sha256").to_pylist(),
        widths=col("width").to_pylist(),
        heights=col("height").to_pylist(),
        captions=col("caption").to_pylist(),
        aug_params=bf16.fsl_to_numpy(col("aug_params")).reshape(n, layout.n_aug, 8),
    )
    for cap in layout.captioners:
        rows.syn[cap] = col(syn_col(cap)).to_pylist()
    for t in layout.teachers:
        rows.image_emb[t.id] = bf16.bits_to_bf16(bf16.fsl_to_numpy(col(image_col(t.id, layout.n_aug, t.dim)))).reshape(
            n, layout.n_aug, t.dim
        )
        rows.text_emb[t.id] = bf16.bits_to_bf16(bf16.fsl_to_numpy(col(text_col(t.id, t.dim))))
        rows.syn_emb[t.id] = {
            cap: [bf16.bits_to_bf16(a) for a in bf16.list_of_fsl_to_numpy(col(syn_emb_col(t.id, cap, t.dim)))]
            for cap in layout.captioners
        }
    return rows, meta


def read_shard(url: str, storage_options: dict | None = None) -> tuple[ReinforcedRows, dict]:
    return decode_table(read_table(url, storage_options))


def column_bytes(source) -> dict[str, int]:
    """Compressed bytes per top-level column of a Parquet file (path or file object), summed
    over row groups: what each part of the schema costs on disk."""
    md = pq.ParquetFile(source).metadata
    out: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            top = col.path_in_schema.split(".")[0]
            out[top] = out.get(top, 0) + col.total_compressed_size
    return out


__all__ = [
    "ReinforcedRows",
    "ShardWriter",
    "ShardLayout",
    "TeacherLayout",
    "read_table",
    "decode_table",
    "read_shard",
    "column_bytes",
]
