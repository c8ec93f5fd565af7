"""CLIP teachers: open_clip models that turn uint8 views and captions into unit-norm embeddings.

Every teacher loads through one path, ``open_clip.create_model(model, pretrained=...)``: an
open_clip pretrained tag, a local checkpoint file (``.safetensors``/``.pt``; open_clip loads it
with ``load_state_dict(strict=True)``), or an ``hf-hub:org/repo`` id given as the *model* (open_clip
reads the config and weights from the repo and ignores ``pretrained``). ``check_ensemble`` checks
all of that without loading anything, so a typo fails before a cluster spins up.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import re
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from dr_pipeline.config import CaptionerSpec, ConfigError, EnsembleSpec, TeacherSpec

_REGISTERED: set[str] = set()
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAKE_HINT = "dr make-teachers"


# --------------------------------------------------------------------------- helpers


def model_configs_dir(ensemble: EnsembleSpec) -> Path | None:
    """The ensemble's folder of extra model JSONs (always a path, relative to the ensemble file)."""
    if not ensemble.model_configs:
        return None
    p = Path(ensemble.model_configs)
    # Not ensemble.resolve(): it leaves a bare word such as "models" alone, taking it for a tag.
    return p if p.is_absolute() else Path(ensemble.source) / p


def register_model_configs(ensemble: EnsembleSpec) -> None:
    """Register the ensemble's model JSON folder with open_clip (once per folder per process)."""
    folder = model_configs_dir(ensemble)
    if folder is None:
        return
    folder = folder.resolve()
    if not folder.is_dir():
        raise ConfigError(
            f"ensemble '{ensemble.name}': model_configs folder not found: {folder} "
            "(fix model_configs; it is relative to the ensemble file)"
        )
    if str(folder) not in _REGISTERED:
        open_clip.add_model_config(folder)
        _REGISTERED.add(str(folder))


def is_local_path(p: str | None) -> bool:
    """Same rule as ``EnsembleSpec.resolve``: a string with '/' or '.' that is no URL or hf-hub id."""
    return not (p is None or p.startswith(("hf-hub:", "local-dir:")) or "://" in p or ("/" not in p and "." not in p))


def is_tiny(model: str, ensemble: EnsembleSpec) -> bool:
    """A model defined by the ensemble's own model_configs folder (test/dev models we may fake)."""
    folder = model_configs_dir(ensemble)
    return folder is not None and (folder / f"{model}.json").is_file()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU (tiny models, exact comparisons in tests)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def views_to_input(
    views: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float32 normalized [B,3,S,S] on ``device``; refuses a wrong size."""
    if views.dtype != torch.uint8 or views.ndim != 4 or views.shape[1] != 3:
        raise ValueError(f"expected uint8 views [B,3,S,S], got {views.dtype} {tuple(views.shape)}")
    if views.shape[-2:] != (size, size):
        raise ValueError(f"views are {tuple(views.shape[-2:])}, this model needs {size}x{size}")
    x = to_device(views, device).float().div_(255.0)
    return (x - mean) / std


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy; on CUDA through pinned (page-locked) memory so the copy is a true
    asynchronous DMA on the current stream (a pageable source makes ``non_blocking`` a sync copy)."""
    if device.type == "cuda" and x.device.type == "cpu":
        if not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


# --------------------------------------------------------------------------- text towers, unpadded


def _text_tower(model: torch.nn.Module):
    """The parts of a CLIP text tower that can run on a sequence cut after its pooled token, or None.

    Exact only when every position attends causally (a position never sees a later one) and the
    pooled position is found from the tokens themselves (argmax = end-of-text, or first eos):
    then positions past the last row's pooled token change nothing that is read.
    """
    from open_clip.transformer import TextTransformer

    t = getattr(model, "text", None)
    if isinstance(t, TextTransformer):
        if t.cls_emb is not None or t.attn_mask is None or t.use_pad_mask:
            return None
        parts = (
            t.token_embedding,
            t.positional_embedding,
            t.transformer,
            t.attn_mask,
            t.ln_final,
            t.pool_type,
            getattr(t, "eos_id", None),
            t.text_projection,
        )
    elif t is None and all(
        hasattr(model, a)
        for a in ("token_embedding", "positional_embedding", "transformer", "attn_mask", "ln_final", "text_projection")
    ):
        if model.attn_mask is None:
            return None
        parts = (
            model.token_embedding,
            model.positional_embedding,
            model.transformer,
            model.attn_mask,
            model.ln_final,
            getattr(model, "text_pool_type", "argmax"),
            getattr(model, "text_eos_id", None),
            model.text_projection,
        )
    else:
        return None
    if parts[5] not in ("argmax", "eos") or not getattr(parts[2], "batch_first", False):
        return None
    return parts


def pooled_positions(tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """The position each row's text embedding is read at (open_clip's ``text_global_pool``)."""
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == eos_id).int().argmax(dim=-1)


def encode_text_unpadded(parts, tokens: torch.Tensor) -> torch.Tensor:
    """``encode_text`` (unnormalized) on ``tokens`` [B, ctx] run only up to the batch's last pooled
    position: same result as the full context, up to float rounding (tests check it)."""
    from open_clip.transformer import text_global_pool

    tok_emb, pos_emb, transformer, mask, ln_final, pool_type, eos_id, proj = parts
    length = int(pooled_positions(tokens, pool_type, eos_id).max()) + 1
    tokens = tokens[:, :length]
    cast = transformer.get_cast_dtype()
    x = tok_emb(tokens).to(cast) + pos_emb[:length].to(cast)
    x = ln_final(transformer(x, attn_mask=mask[:length, :length]))
    x = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


# --------------------------------------------------------------------------- checks


def _check_entry(kind: str, spec: TeacherSpec | CaptionerSpec, ensemble: EnsembleSpec, ens_file: str) -> None:
    who = f"{kind} '{spec.id}'"
    model, pretrained = spec.model, spec.pretrained
    cfg: dict | None = None
    if model.startswith("hf-hub:"):
        if not _HF_ID.match(model[len("hf-hub:") :]):
            raise ConfigError(f"{who}: malformed hf-hub id '{model}' (use hf-hub:org/repo)")
        if pretrained is not None:
            raise ConfigError(
                f"{who}: open_clip ignores pretrained='{pretrained}' for an hf-hub: model "
                "(weights come from the repo); remove pretrained"
            )
        return
    if model.startswith("local-dir:"):
        d = Path(model[len("local-dir:") :])
        if not (d / "open_clip_config.json").is_file():
            raise ConfigError(f"{who}: no open_clip_config.json in {d} (fix the local-dir: path)")
        return
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        close = difflib.get_close_matches(model, open_clip.list_models(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{who}: unknown open_clip model '{model}' ({hint}see open_clip.list_models())")

    if pretrained is None:
        fix = (
            f"run `{MAKE_HINT} {ens_file}` after setting a checkpoint path"
            if is_tiny(model, ensemble)
            else "set an open_clip tag, e.g. one of open_clip.list_pretrained_tags_by_model()"
        )
        raise ConfigError(f"{who}: no pretrained weights given ({fix}); random teachers are never used")
    if pretrained.startswith("hf-hub:"):
        raise ConfigError(
            f"{who}: open_clip 3 does not load pretrained='{pretrained}' for a named model; "
            f"set model: {pretrained} and remove pretrained"
        )
    if is_local_path(pretrained):
        path = Path(ensemble.resolve(pretrained) or "")
        if not path.is_file():
            fix = f"run `{MAKE_HINT} {ens_file}`" if is_tiny(model, ensemble) else "download it or fix the path"
            raise ConfigError(f"{who}: checkpoint not found: {path} ({fix})")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise ConfigError(
                f"{who}: unknown pretrained tag '{pretrained}' for '{model}' (known: {', '.join(tags) or 'none'})"
            )

    # Geometry must match the architecture: a ViT's position embedding fixes both sizes.
    size = cfg.get("vision_cfg", {}).get("image_size")
    if isinstance(size, int) and size != spec.image_size:
        raise ConfigError(f"{who}: image_size {spec.image_size} but '{model}' takes {size} (set image_size: {size})")
    if isinstance(spec, TeacherSpec):
        ctx = cfg.get("text_cfg", {}).get("context_length", 77)
        if spec.context_length is not None and spec.context_length != ctx:
            raise ConfigError(
                f"{who}: context_length {spec.context_length} but '{model}' has {ctx} "
                f"(set context_length: {ctx} or omit it)"
            )
    else:
        _check_captioner(who, spec, cfg)


def _check_captioner(who: str, spec: CaptionerSpec, cfg: dict) -> None:
    if "multimodal_cfg" not in cfg:
        raise ConfigError(f"{who}: '{spec.model}' is not a CoCa model (pick a coca_* model)")
    s = spec.sampling
    ctx = cfg["multimodal_cfg"].get("context_length", 77)
    if not (1 <= s.min_len < s.max_len <= ctx):
        raise ConfigError(
            f"{who}: need 1 <= sampling.min_len < sampling.max_len <= {ctx} (got {s.min_len}, {s.max_len})"
        )
    if not (0 < s.top_p <= 1) or s.top_k < 0 or s.temperature < 0 or s.max_attempts < 1:
        raise ConfigError(
            f"{who}: sampling needs 0 < top_p <= 1, top_k >= 0, temperature >= 0, max_attempts >= 1 (got {s})"
        )


def _ensemble_file(ensemble: EnsembleSpec) -> str:
    """Best guess at the ensemble's file for error hints (EnsembleSpec keeps only its folder)."""
    guess = Path(ensemble.source) / f"{ensemble.name}.yaml"
    if not guess.is_file():
        return "<ensemble file>"
    try:
        return str(guess.relative_to(Path.cwd()))
    except ValueError:
        return str(guess)


INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
MAX_HEADER_BYTES = 100 << 20


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (JSON; no tensor data read, nothing unpickled)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= MAX_HEADER_BYTES:
            raise ValueError("no safetensors header")
        header = json.loads(fh.read(n))
    return {k: v["shape"] for k, v in header.items() if isinstance(v, dict) and "shape" in v}


def _check_fields(who: str, spec: TeacherSpec | CaptionerSpec) -> None:
    if spec.interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"{who}: unknown interpolation '{spec.interpolation}' "
            f"(set interpolation: to one of {', '.join(INTERPOLATIONS)})"
        )
    if any(not s > 0 for s in spec.std):
        raise ConfigError(f"{who}: std {list(spec.std)} must be > 0 per channel (use [1, 1, 1] for no scaling)")
    if isinstance(spec, TeacherSpec) and not spec.logit_scale > 0:
        raise ConfigError(f"{who}: logit_scale must be > 0 (got {spec.logit_scale}); CLIP models use ~100")


def _check_checkpoint_shapes(who: str, spec: TeacherSpec | CaptionerSpec, ensemble: EnsembleSpec) -> None:
    """A local .safetensors checkpoint must fit its model's config (catches swapped checkpoints)."""
    if spec.model.startswith(("hf-hub:", "local-dir:")) or not is_local_path(spec.pretrained):
        return
    path = Path(ensemble.resolve(spec.pretrained) or "")
    if path.suffix != ".safetensors":
        return
    try:
        shapes = _safetensors_shapes(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{who}: {path} is not a readable safetensors file ({type(e).__name__}: {e}); re-download or re-create it"
        ) from None
    cfg = open_clip.get_model_config(spec.model) or {}
    embed = cfg.get("embed_dim")
    for k in ("visual.proj", "text_projection", "text.text_projection"):
        if isinstance(embed, int) and len(shapes.get(k, [])) == 2 and shapes[k][1] != embed:
            raise ConfigError(
                f"{who}: checkpoint {path.name} has embedding width {shapes[k][1]} but '{spec.model}' "
                f"has {embed}: the checkpoint belongs to another model (fix model: or pretrained:)"
            )
    ctx = cfg.get("text_cfg", {}).get("context_length")
    pos = shapes.get("positional_embedding", [])
    if isinstance(ctx, int) and len(pos) == 2 and pos[0] != ctx:
        raise ConfigError(
            f"{who}: checkpoint {path.name} has text context {pos[0]} but '{spec.model}' has {ctx}: "
            "the checkpoint belongs to another model (fix model: or pretrained:)"
        )


def check_ensemble(ensemble: EnsembleSpec) -> None:
    """Fast sanity check; loads no weights. Raises ConfigError naming the entry, problem and fix.

    Per entry: the model exists, weights are given and exist, image size / context length match
    the architecture, interpolation/std/logit_scale are sane, and a local .safetensors
    checkpoint's header (shapes only) fits the model.
    """
    register_model_configs(ensemble)
    f = _ensemble_file(ensemble)
    for kind, specs in (("teacher", ensemble.teachers), ("captioner", ensemble.captioners)):
        for spec in specs:
            who = f"{kind} '{spec.id}'"
            _check_fields(who, spec)
            _check_entry(kind, spec, ensemble, f)
            _check_checkpoint_shapes(who, spec, ensemble)


_RANDOM_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
    "constant_",
    "zeros_",
    "ones_",
)


@contextlib.contextmanager
def skip_init():
    """Build modules without initializing their weights: ``torch.nn.init`` and the random in-place
    tensor fills do nothing, so parameters stay ``torch.empty`` (pages never touched, no RSS, no
    time). Only for models whose every parameter is then loaded from a checkpoint (strict)."""
    saved = [(torch.nn.init, n, getattr(torch.nn.init, n)) for n in _RANDOM_INITS]
    saved += [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in ("uniform_", "normal_")]

    def keep(tensor, *args, **kwargs):
        return tensor

    try:
        for owner, name, _ in saved:
            setattr(owner, name, keep)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def create_from_checkpoint(
    model_name: str, checkpoint: str, device: str | torch.device = "cpu", force_quick_gelu: bool = False
) -> torch.nn.Module:
    """``open_clip.create_model(model_name, pretrained=checkpoint)`` without its random init and
    without a second copy of the weights: the model is built uninitialized on ``device``, and
    open_clip's own ``load_checkpoint`` (key conversions, position-embedding resize, strict
    check) reads the file straight onto ``device`` and *assigns* its tensors as the parameters.
    Parameters keep the dtype the model was built with (a checkpoint in another dtype is cast)."""
    with skip_init():
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=force_quick_gelu, device=device)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict = functools.partial(type(model).load_state_dict, model, assign=True)
    try:
        open_clip.load_checkpoint(model, checkpoint, strict=True, device=str(device))
    finally:
        del model.load_state_dict
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in dtypes and t.dtype != dtypes[name] and t.is_floating_point():
            t.data = t.data.to(dtypes[name])
    return model


def load_model(
    kind: str, spec: TeacherSpec | CaptionerSpec, ensemble: EnsembleSpec, device: str, force_quick_gelu: bool = False
) -> torch.nn.Module:
    """The single load path for teachers and captioners: check, then build. A local checkpoint
    file loads through ``create_from_checkpoint`` (no random init, no second copy); tags and
    hf-hub / local-dir models through ``open_clip.create_model``."""
    register_model_configs(ensemble)
    _check_entry(kind, spec, ensemble, _ensemble_file(ensemble))
    pretrained = ensemble.resolve(spec.pretrained)
    if pretrained and is_local_path(spec.pretrained) and not spec.model.startswith(("hf-hub:", "local-dir:")):
        model = create_from_checkpoint(spec.model, pretrained, device, force_quick_gelu=force_quick_gelu)
    else:
        model = open_clip.create_model(
            spec.model, pretrained=pretrained, force_quick_gelu=force_quick_gelu, device=device
        )
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- teacher


class Teacher:
    """One frozen CLIP teacher. Inputs at ``image_size``; outputs float32 unit vectors [B, dim]."""

    def __init__(
        self, spec: TeacherSpec, model: torch.nn.Module, tokenizer, device: str = "cpu", text_batch_size: int = 256
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.image_size = spec.image_size
        self.logit_scale = spec.logit_scale
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.text_batch_size = text_batch_size
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        self._unpadded = _text_tower(model)  # None: this tower needs the full context
        self.dim = int(self._encode_tokens(tokenizer([""])).shape[1])

    def encode_images(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,S,S] -> float32 [B, dim], unit norm, on the teacher's device."""
        x = views_to_input(views, self.image_size, self.mean, self.std, self.device)
        with torch.inference_mode(), autocast(self.device):
            z = self.model.encode_image(x)
        return F.normalize(z.float(), dim=-1)  # normalize in fp32: bf16 norms are off by ~1e-2

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> float32 [B, dim], unit norm, on the teacher's device.

        The tokenizer truncates long captions (last token forced to end-of-text). Captions are
        length-bucketed: sorted by token count, cut into sub-batches of ``text_batch_size``, and
        each sub-batch runs only up to its longest caption's end-of-text instead of the full
        context (exact for causal towers pooled at end-of-text, see ``encode_text_unpadded``;
        other towers get the full context). Rows come back in input order.
        """
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        tokens = self.tokenizer(texts)
        if self._unpadded is None:
            return torch.cat(
                [
                    self._encode_tokens(tokens[i : i + self.text_batch_size])
                    for i in range(0, len(texts), self.text_batch_size)
                ]
            )
        _, _, _, _, _, pool_type, eos_id, _ = self._unpadded
        order = torch.argsort(pooled_positions(tokens, pool_type, eos_id), stable=True)
        out = torch.empty(len(texts), self.dim, device=self.device)
        for i in range(0, len(texts), self.text_batch_size):
            rows = order[i : i + self.text_batch_size]
            out[rows.to(self.device)] = self._encode_tokens(tokens[rows])
        return out

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = to_device(tokens, self.device)
        with torch.inference_mode(), autocast(self.device):
            if getattr(self, "_unpadded", None) is not None:
                z = encode_text_unpadded(self._unpadded, tokens)
            else:
                z = self.model.encode_text(tokens)
        return F.normalize(z.float(), dim=-1)

    def __repr__(self) -> str:
        return f"Teacher({self.id!r}, {self.spec.model}, dim={self.dim}, size={self.image_size})"


def load_teacher(spec: TeacherSpec, ensemble: EnsembleSpec, device: str = "cpu") -> Teacher:
    model = load_model("teacher", spec, ensemble, device, force_quick_gelu=spec.force_quick_gelu)
    ctx = int(getattr(model, "context_length", 0) or 0)
    if spec.context_length is not None and ctx and spec.context_length != ctx:
        raise ConfigError(
            f"teacher '{spec.id}': context_length {spec.context_length} but the model has {ctx} "
            f"(set context_length: {ctx} or omit it)"
        )
    tokenizer = open_clip.get_tokenizer(spec.model, context_length=spec.context_length or ctx or None)
    return Teacher(spec, model, tokenizer, device)
