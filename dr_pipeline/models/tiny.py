"""Deterministic random-weight checkpoints for the tiny test/dev models of an ensemble.

Only models defined in the ensemble's own ``model_configs`` folder are ever faked: a real
teacher (ViT-L-14, coca_ViT-L-14, ...) without its checkpoint is an error, never random weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from dr_pipeline.config import ConfigError, load_ensemble
from dr_pipeline.models.teachers import is_local_path, is_tiny, register_model_configs


def seed_for(entry_id: str) -> int:
    """A stable 63-bit seed from a teacher/captioner id."""
    return int.from_bytes(hashlib.sha256(f"dr-tiny:{entry_id}".encode()).digest()[:8], "big") >> 1


def init_uninitialized(model: torch.nn.Module) -> None:
    """Initialize what open_clip 3.3 leaves as raw ``torch.empty`` memory.

    ``MultimodalTransformer.init_parameters`` is never called (and could not run), so a fresh
    CoCa's ``text_decoder.text_projection`` holds whatever bytes were in memory: often zeros
    (all logits equal), sometimes garbage, and never the same twice. std 0.7 gives peaked
    next-token distributions (logit std ~ 0.7·sqrt(width)), like a trained captioner's: small
    top-p nuclei, and a few degenerate ("fol fol fol") samples for the filter to catch.
    """
    decoder = getattr(model, "text_decoder", None)
    proj = getattr(decoder, "text_projection", None)
    if isinstance(proj, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(proj, std=0.7)


def make_tiny_checkpoints(ensemble_path: str, force: bool = False) -> list[str]:
    """Write missing (or, with ``force``, all) local checkpoints of tiny models; return their paths."""
    ensemble = load_ensemble(ensemble_path)
    register_model_configs(ensemble)
    written: list[str] = []
    for entry in (*ensemble.teachers, *ensemble.captioners):
        if not is_local_path(entry.pretrained):
            continue  # a tag or hf-hub id: nothing to write
        path = Path(ensemble.resolve(entry.pretrained) or "")
        if path.exists() and not force:
            continue
        if not is_tiny(entry.model, ensemble):
            raise ConfigError(
                f"'{entry.id}': refusing to write random weights for '{entry.model}', which is not "
                f"defined in the ensemble's model_configs folder (download the real checkpoint to {path})"
            )
        # fork_rng: seeding must not disturb the caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(entry.id))
            model = open_clip.create_model(entry.model, pretrained=None)
            init_uninitialized(model)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        # One metadata key only: safetensors writes the metadata map in arbitrary order.
        save_file(state, str(tmp), metadata={"dr_tiny": f"id={entry.id} model={entry.model} seed={seed_for(entry.id)}"})
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint behind
        written.append(str(path))
    return written
