"""Checkpoints: plain dicts of tensors and JSON-able values, loaded with ``weights_only=True``.

``OUT/checkpoints/step-XXXXXXXX.pt`` holds ``format``, ``step``, ``model`` (the student's
state dict, open_clip key names), ``ema`` (optional), ``optimizer``, ``data`` (each rank's
stream position), ``student`` (the spec to rebuild the model), ``teachers`` (ids, dims,
logit scales used), ``config`` (the training config as a dict). ``latest.json`` names the
newest one and is written after it, so it never points at a half-written file.
"""

from __future__ import annotations

import io

import fsspec
import torch

from dr_pipeline.storage.folder import Folder

FORMAT = "dr_pipeline.train.checkpoint/1"
CKPT_DIR = "checkpoints"
LATEST = f"{CKPT_DIR}/latest.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def save_checkpoint(out: Folder, step: int, payload: dict, keep: int = 0) -> str:
    """Write ``payload`` as the checkpoint of ``step``; update latest.json; prune old ones."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, **payload}, buf)
    rel = f"{CKPT_DIR}/{checkpoint_name(step)}"
    out.write_bytes(rel, buf.getvalue())
    out.write_json(LATEST, {"step": step, "file": checkpoint_name(step)})
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            out.remove(f"{CKPT_DIR}/{old}")
    return out.url(rel)


def list_checkpoints(out: Folder) -> list[str]:
    """Checkpoint file names, oldest first (a fresh listing: other ranks / runs write here)."""
    return sorted(e.name for e in out.list(CKPT_DIR) if e.name.startswith("step-") and e.name.endswith(".pt"))


def resolve(target: str, storage_options: dict | None = None) -> str | None:
    """A checkpoint file, a run directory (its latest checkpoint) or None if it has none yet."""
    fs, path = fsspec.core.url_to_fs(target, **(storage_options or {}))
    if fs.isfile(path):
        return target
    out = Folder(target, storage_options)
    latest = out.read_json(LATEST)
    if latest is None:
        return None
    return out.url(CKPT_DIR, latest["file"])


def load_checkpoint(url: str, storage_options: dict | None = None) -> dict:
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        data = f.read()
    ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(
            f"{url}: not a dr_pipeline training checkpoint (format {ck.get('format') if isinstance(ck, dict) else type(ck).__name__})"
        )
    return ck
