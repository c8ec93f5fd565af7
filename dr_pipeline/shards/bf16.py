"""bfloat16 <-> Arrow codec.

Arrow and Parquet have no bf16 type. A bf16 value is stored as its raw 16 bits in a
``uint16`` inside ``fixed_size_list<uint16, W>`` (docs/stack.md#bf16-in-parquet explains why not
``fixed_size_binary``). Encoding and decoding are bit-exact and zero-copy where possible.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def bf16_bits(x: torch.Tensor) -> np.ndarray:
    """float tensor -> uint16 numpy array of its bf16 bits (round to nearest even)."""
    return x.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint16).numpy()


def bits_to_bf16(a: np.ndarray) -> torch.Tensor:
    """uint16 numpy array -> bf16 tensor with the same bits."""
    a = np.ascontiguousarray(a, dtype=np.uint16)
    if not a.flags.writeable:  # Arrow buffers are read-only; torch wants writable memory
        a = a.copy()
    return torch.from_numpy(a).view(torch.bfloat16)


def bits_to_f32(a: np.ndarray) -> np.ndarray:
    """uint16 numpy array of bf16 bits -> float32 numpy array, exactly (bf16 is the top half of fp32)."""
    return (np.ascontiguousarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def fsl_uint16(rows: np.ndarray) -> pa.FixedSizeListArray:
    """[n, W] uint16 array -> fixed_size_list<uint16, W> Arrow array (zero-copy)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint16)
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {rows.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.uint16()), rows.shape[1])


def fsl_to_numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<uint16, W> column -> [n, W] uint16 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = col.type.list_size
    if col.null_count:
        raise ValueError("fixed_size_list column holds nulls")
    flat = col.flatten() if col.offset else col.values
    return flat.to_numpy(zero_copy_only=False).astype(np.uint16, copy=False).reshape(-1, width)


def list_of_fsl_uint16(rows: list[np.ndarray], width: int) -> pa.ListArray:
    """Per row a [k_i, W] uint16 array (k_i may differ, may be 0) -> list<fixed_size_list<uint16, W>>."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([r.shape[0] for r in rows])
    flat = np.concatenate([r.reshape(-1, width) for r in rows]) if offsets[-1] else np.zeros((0, width), np.uint16)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), fsl_uint16(flat))


def list_of_fsl_to_numpy(col: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """list<fixed_size_list<uint16, W>> column -> per row a [k_i, W] uint16 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    inner = col.flatten()
    flat = fsl_to_numpy(inner)
    offsets = col.offsets.to_numpy()
    base = offsets[0]
    return [flat[offsets[i] - base : offsets[i + 1] - base] for i in range(len(col))]
