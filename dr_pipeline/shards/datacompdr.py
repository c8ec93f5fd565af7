"""DataCompDR-layout tars: export from this project's Parquet shards, and a safe reader.

Layout (REFERENCE.md, what Apple's MobileCLIP trainer reads), one sample per key:
``url.txt``, ``syn.json`` {"syn_text": [...]}, ``paug.json`` {"param_aug": [[[i,j,h,w],[[op,mag],..]],..]},
``npz`` {image_emb float32 [N, ΣD], text_emb float32 [1+k, ΣD] (GT caption first)}, ``json``
{"uid", "sha256"}. Teachers are concatenated along D in ensemble order.

The reader never unpickles: ``np.load(allow_pickle=False)`` for npz and
``torch.load(weights_only=True)`` for the bf16 ``pth.gz`` members of released shards.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterator

import fsspec
import numpy as np
import torch

from dr_pipeline import augment
from dr_pipeline.config import AugSpec
from dr_pipeline.shards.parquet_io import ReinforcedRows


class UnsafeMemberError(ValueError):
    """A foreign shard member that would need unpickling or is otherwise unsafe to load."""


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)     # float arrays only: np.savez pickles nothing for them
    return buf.getvalue()


def sample_members(rows: ReinforcedRows, i: int, teachers: list[str], captioners: list[str],
                   spec: AugSpec) -> dict[str, bytes]:
    """The DataCompDR members (extension -> bytes) of row ``i``."""
    key = rows.keys[i]
    if "." in key or "/" in key:
        raise ValueError(f"key {key!r} holds '.' or '/': DataCompDR keys must not (the trainer splits on dots)")
    primary = captioners[0] if captioners else None
    syn = {"syn_text": rows.syn[primary][i] if primary else []}
    for cap in captioners[1:]:
        syn[f"syn_text_{cap}"] = rows.syn[cap][i]
    params = augment.unpack(rows.aug_params[i])
    paug = {"param_aug": [augment.to_datacompdr(p, rows.widths[i], rows.heights[i], spec) for p in params]}
    image_emb = torch.cat([rows.image_emb[t][i].float() for t in teachers], dim=-1)
    texts = [torch.cat([rows.text_emb[t][i:i + 1].float()] +
                       ([rows.syn_emb[t][primary][i].float()] if primary else []), dim=0) for t in teachers]
    arrays = {"image_emb": image_emb.numpy(), "text_emb": torch.cat(texts, dim=-1).numpy()}
    for cap in captioners[1:]:
        arrays[f"syn_text_emb_{cap}"] = torch.cat([rows.syn_emb[t][cap][i].float() for t in teachers], -1).numpy()
    return {
        "url.txt": (rows.urls[i] or "").encode(),
        "syn.json": json.dumps(syn).encode(),
        "paug.json": json.dumps(paug).encode(),
        "npz": _npz_bytes(**arrays),
        "json": json.dumps({"uid": rows.uids[i] or key, "sha256": rows.image_sha256[i]}).encode(),
    }


def write_datacompdr_tar(f, rows: ReinforcedRows, meta: dict) -> int:
    """Write all rows of one shard as a DataCompDR tar into the open binary file ``f``."""
    teachers = [t["id"] for t in meta["teachers"]]
    captioners = [c["id"] for c in meta["captioners"]]
    spec = AugSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["aug"].items()})
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(len(rows)):
            for ext, data in sample_members(rows, i, teachers, captioners, spec).items():
                _add(tar, f"{rows.keys[i]}.{ext}", data)
    return len(rows)


def export_datacompdr(root: str, out_dir: str, storage_options: dict | None = None) -> list[str]:
    """Export every committed shard of dataset ``root`` as ``out_dir/{shard}.tar``."""
    from dr_pipeline.shards.dataset import ReinforcedDataset
    from dr_pipeline.shards.parquet_io import read_shard
    from dr_pipeline.storage.folder import Folder

    src = ReinforcedDataset(root, storage_options)
    dst = Folder(out_dir, storage_options)
    paths = []
    for name in src.markers():
        rows, meta = read_shard(src.shard_url(name), storage_options)
        buf = io.BytesIO()
        write_datacompdr_tar(buf, rows, meta)
        dst.write_bytes(f"{name}.tar", buf.getvalue())
        paths.append(dst.url(f"{name}.tar"))
    return paths


# --------------------------------------------------------------------------- reader

def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle: refused
        raise UnsafeMemberError(f"npz member needs pickle, refused ({e})") from None


def _load_pth_gz(data: bytes) -> dict[str, np.ndarray]:
    try:
        obj = torch.load(io.BytesIO(gzip.decompress(data)), weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses arbitrary globals (pickle payloads)
        raise UnsafeMemberError(f"pth.gz member refused by the safe loader ({type(e).__name__}: {e})") from None
    if isinstance(obj, torch.Tensor):
        obj = {"image_emb": obj}
    if not isinstance(obj, dict):
        raise UnsafeMemberError(f"pth.gz member holds {type(obj).__name__}, expected tensors")
    return {k: v.float().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _parse(members: dict[str, bytes]) -> dict:
    out: dict = {"url": members.get("url.txt", b"").decode("utf-8", "replace") or None}
    if "syn.json" in members:
        syn = json.loads(members["syn.json"])
        out["syn_text"] = next((v for k, v in syn.items() if k.startswith("syn_text")), [])
        out["syn"] = syn
    if "paug.json" in members:
        p = json.loads(members["paug.json"])["param_aug"]
        out["param_aug"] = json.loads(p) if isinstance(p, str) else p   # the HF card's string form
    arrays: dict[str, np.ndarray] = {}
    if "npz" in members:
        arrays.update(_load_npz(members["npz"]))
    if "pth.gz" in members:
        arrays.update(_load_pth_gz(members["pth.gz"]))
    out.update(arrays)
    out["json"] = json.loads(members["json"]) if "json" in members else {}
    return out


def iter_datacompdr_tar(url: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Yield one dict per key: key, url, syn_text, param_aug, image_emb, text_emb, json (+ extras).

    Unsafe members (pickled payloads) raise ``UnsafeMemberError``; nothing is executed.
    """
    with fsspec.open(url, "rb", **(storage_options or {})) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield {"key": key, **_parse(members)}
                members = {}
            key = k
            members[ext] = tar.extractfile(m).read()
        if key is not None:
            yield {"key": key, **_parse(members)}
