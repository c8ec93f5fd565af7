"""DataCompDR-layout tars: export from this project's Parquet shards, and a safe reader.

Layout (docs/reference.md#datacompdr-tar-layout, what Apple's MobileCLIP trainer reads), one sample per key:
``url.txt``, ``syn.json`` {"syn_text": [...]}, ``paug.json`` {"param_aug": [[[i,j,h,w],[[op,mag],..]],..]},
``npz`` {image_emb float32 [N, ΣD], text_emb float32 [1+k, ΣD] (GT caption first)}, ``json``
{"uid", "sha256"}. Teachers are concatenated along D in ensemble order.

The reader never unpickles: ``np.load(allow_pickle=False)`` for npz and
``torch.load(weights_only=True)`` for the bf16 ``pth.gz`` members of released shards; and it
never inflates a member past ``max_decompressed`` bytes (``dr_pipeline.bounded``: a 1.5 MB
gzip bomb cannot take 1.5 GiB); such a record comes back with ``rejected="too_large"``.

Export never fails half-way: every key is checked before the first tar is written (keys are
escaped by the readers, ``readers.escape_key``, so only datasets made before that rule can
hold one the layout cannot carry), and each tar is written under a temporary name and renamed
(``Folder.write_bytes``), so no partial tar is ever left behind.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator

import fsspec
import numpy as np
import torch

from dr_pipeline import augment, bounded
from dr_pipeline.config import AugSpec, ConfigError
from dr_pipeline.shards.parquet_io import ReinforcedRows


class UnsafeMemberError(ValueError):
    """A foreign shard member that would need unpickling or is otherwise unsafe to load."""


DEFAULT_MAX_DECOMPRESSED = 64 << 20  # when the caller does not know the teachers' dims


def member_limit(total_dim: int, max_rows: int = 1024) -> int:
    """Decompressed-size limit of one embedding member for teachers of summed dim ``total_dim``:
    ``max_rows`` fp32 rows (DataCompDR holds ~36: 30 augmentations + GT + 5 synthetic captions)
    plus 64 KiB of container overhead."""
    return max_rows * total_dim * 4 + (64 << 10)


def carriable(key: str) -> bool:
    """Whether ``key`` can be a DataCompDR sample key (members ``{key}.{ext}``; the trainer splits
    the name at its first '.', and '/' makes folders)."""
    return bool(key) and key.isprintable() and not any(c in key for c in "./\\")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # float arrays only: np.savez pickles nothing for them
    return buf.getvalue()


def sample_members(
    rows: ReinforcedRows, i: int, teachers: list[str], captioners: list[str], spec: AugSpec
) -> dict[str, bytes]:
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
    texts = [
        torch.cat(
            [rows.text_emb[t][i : i + 1].float()] + ([rows.syn_emb[t][primary][i].float()] if primary else []), dim=0
        )
        for t in teachers
    ]
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
    # pax: plain ustar headers (identical bytes) for names up to 100 characters, a pax record beyond
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(len(rows)):
            for ext, data in sample_members(rows, i, teachers, captioners, spec).items():
                _add(tar, f"{rows.keys[i]}.{ext}", data)
    return len(rows)


def export_datacompdr(root: str, out_dir: str, storage_options: dict | None = None) -> list[str]:
    """Export every committed shard of dataset ``root`` as ``out_dir/{shard}.tar``."""
    from dr_pipeline.shards.dataset import ReinforcedDataset
    from dr_pipeline.shards.parquet_io import read_shard, read_table
    from dr_pipeline.storage.folder import Folder

    src = ReinforcedDataset(root, storage_options)
    dst = Folder(out_dir, storage_options)
    names = list(src.markers())
    for name in names:  # every key first: never fail half-way
        keys = read_table(src.shard_url(name), storage_options, columns=["key"]).column("key").to_pylist()
        bad = next((k for k in keys if not carriable(str(k or ""))), None)
        if bad is not None:
            raise ConfigError(
                f"shard {name}: key {bad!r} cannot be a DataCompDR key (it holds '.', '/', '\\' or a "
                "control character); nothing was exported. Re-run `dr reinforce` into a new "
                "output: the readers now escape such keys (docs/bad-data.md)"
            )
    paths = []
    for name in names:
        rows, meta = read_shard(src.shard_url(name), storage_options)
        buf = io.BytesIO()
        write_datacompdr_tar(buf, rows, meta)
        dst.write_bytes(f"{name}.tar", buf.getvalue())
        paths.append(dst.url(f"{name}.tar"))
    return paths


# --------------------------------------------------------------------------- reader


def _load_npz(data: bytes, limit: int = DEFAULT_MAX_DECOMPRESSED) -> dict[str, np.ndarray]:
    bounded.check_zip(data, limit, "npz member")  # before np.load inflates anything
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle: refused
        raise UnsafeMemberError(f"npz member needs pickle, refused ({e})") from None


def _load_pth_gz(data: bytes, limit: int = DEFAULT_MAX_DECOMPRESSED) -> dict[str, np.ndarray]:
    raw = bounded.gunzip(data, limit, "pth.gz member")  # TooLarge past the limit
    try:
        obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses arbitrary globals (pickle payloads)
        raise UnsafeMemberError(f"pth.gz member refused by the safe loader ({type(e).__name__}: {e})") from None
    if isinstance(obj, torch.Tensor):
        obj = {"image_emb": obj}
    if not isinstance(obj, dict):
        raise UnsafeMemberError(f"pth.gz member holds {type(obj).__name__}, expected tensors")
    return {k: v.float().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _parse(members: dict[str, bytes], limit: int = DEFAULT_MAX_DECOMPRESSED) -> dict:
    out: dict = {"url": members.get("url.txt", b"").decode("utf-8", "replace") or None}
    if "syn.json" in members:
        syn = json.loads(members["syn.json"])
        out["syn_text"] = next((v for k, v in syn.items() if k.startswith("syn_text")), [])
        out["syn"] = syn
    if "paug.json" in members:
        p = json.loads(members["paug.json"])["param_aug"]
        out["param_aug"] = json.loads(p) if isinstance(p, str) else p  # the HF card's string form
    arrays: dict[str, np.ndarray] = {}
    try:
        if "npz" in members:
            arrays.update(_load_npz(members["npz"], limit))
        if "pth.gz" in members:
            arrays.update(_load_pth_gz(members["pth.gz"], limit))
    except bounded.TooLarge as e:
        out.update(rejected="too_large", rejected_detail=str(e))  # a counted rejection, arrays dropped
        arrays = {}
    out.update(arrays)
    out["json"] = json.loads(members["json"]) if "json" in members else {}
    return out


def iter_datacompdr_tar(
    url: str, storage_options: dict | None = None, max_decompressed: int = DEFAULT_MAX_DECOMPRESSED
) -> Iterator[dict]:
    """Yield one dict per key: key, url, syn_text, param_aug, image_emb, text_emb, json (+ extras).

    Unsafe members (pickled payloads) raise ``UnsafeMemberError``; nothing is executed. An npz /
    pth.gz member inflating past ``max_decompressed`` bytes (``member_limit(total_dim)`` when the
    teachers are known) gives a record without arrays and with ``rejected="too_large"``.
    """
    with fsspec.open(url, "rb", **(storage_options or {})) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield {"key": key, **_parse(members, max_decompressed)}
                members = {}
            key = k
            members[ext] = tar.extractfile(m).read()
        if key is not None:
            yield {"key": key, **_parse(members, max_decompressed)}
