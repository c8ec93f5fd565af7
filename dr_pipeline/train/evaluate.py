"""``dr eval``: zero-shot classification and image↔text retrieval of a trained student.

``data`` is either
- a labelled image folder (``DATA/<class name>/*.jpg|png|webp``): zero-shot classification,
  class names from the folder names (``_`` → space), CLIP-style prompt templates; or
- base-corpus shards (tar / img2dataset Parquet; a path, directory, brace pattern or glob),
  typically a held-out shard: retrieval R@1/R@5 over its (image, caption) pairs, plus
  zero-shot classification of the samples whose json carries a synthetic-corpus ``label``
  with one object (tasks ``shape`` and ``colour``).
Several ``data`` paths are evaluated together (their pairs pooled, their tasks side by side).
Images are resized (shortest side) and center-cropped to the student resolution. The
student is re-parameterized first (identical outputs, faster); the EMA weights are used when
the checkpoint has them.

``zero_shot_metrics`` is the package's one zero-shot classifier: ``dr eval``, the trainer's
periodic evaluation (``dr reproduce``'s curves) and ``dr bootstrap``'s teacher report all
call it. When the classes are the synthetic domain's "<colour> <shape>" names it also scores
each word of the predicted class (``colour``, ``shape``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch

from dr_pipeline.augment import center_view
from dr_pipeline.config import ConfigError
from dr_pipeline.corpus.readers import Sample, ShardReadError, expand_urls, iter_shard
from dr_pipeline.images import decode_image
from dr_pipeline.train import checkpoint as ckpt
from dr_pipeline.train.students import Student, StudentSpec, build_student, tokenize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "folder": ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}."),
    "shape": ("a photo of a {}.", "a {} shape.", "a drawing of a {}.", "a {} on a background."),
    "colour": ("a {} shape.", "a {} object.", "something {} on a background.", "a photo of a {} thing."),
}


# Decoded views are kept between evaluations (the trainer's periodic eval) up to this size.
VIEW_CACHE_BYTES = 512 << 20


@dataclass
class EvalData:
    pairs: list[tuple[bytes, str]] = field(default_factory=list)  # retrieval
    tasks: dict[str, tuple[list[bytes], list[int], list[str]]] = field(default_factory=dict)  # images, labels, classes
    _views: dict[tuple[str | None, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def views(self, name: str | None, images: Sequence[bytes], size: int) -> torch.Tensor:
        """uint8 [N, 3, size, size] centre views of ``images`` (``name``: a task, None: the pairs),
        decoded once while they fit in ``VIEW_CACHE_BYTES``."""
        got = self._views.get((name, size))
        if got is None:
            got = decode_views(images, size)
            held = sum(v.numel() for v in self._views.values())
            if held + got.numel() <= VIEW_CACHE_BYTES:
                self._views[(name, size)] = got
        return got


def load_student(checkpoint: str, device: torch.device | str = "cpu", use_ema: bool = True) -> tuple[Student, dict]:
    """(re-parameterized student in eval mode, checkpoint dict) from a file or a run directory."""
    path = ckpt.resolve(checkpoint)
    if path is None:
        raise ConfigError(f"{checkpoint}: no checkpoint there (expected a .pt file or a run directory)")
    ck = ckpt.load_checkpoint(path)
    model = build_student(StudentSpec.from_dict(ck["student"]))
    model.load_state_dict(ck["ema"] if use_ema and "ema" in ck else ck["model"])
    ck["path"] = path
    return model.reparameterize().to(device), ck


# --------------------------------------------------------------------------- data


def _is_image_folder(data: str) -> bool:
    p = Path(data)
    return p.is_dir() and any(
        c.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in c.iterdir()) for c in p.iterdir()
    )


def load_eval_data(
    data: str | Sequence[str], storage_options: dict | None = None, limit: int | None = None
) -> EvalData:
    """Retrieval pairs and zero-shot tasks of one path, or of several pooled (``limit``: per path)."""
    if not isinstance(data, str):
        out = EvalData()
        for d in data:
            one = load_eval_data(d, storage_options, limit)
            clash = set(one.tasks) & set(out.tasks)
            if clash:
                raise ConfigError(f"eval data: task(s) {sorted(clash)} come from more than one path ({list(data)})")
            out.pairs += one.pairs
            out.tasks.update(one.tasks)
        return out
    out = EvalData()
    if _is_image_folder(data):
        classes = sorted(c.name for c in Path(data).iterdir() if c.is_dir())
        images, labels = [], []
        for i, c in enumerate(classes):
            for f in sorted((Path(data) / c).iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(f.read_bytes())
                    labels.append(i)
        out.tasks["folder"] = (images, labels, [c.replace("_", " ") for c in classes])
        return out
    try:
        urls = expand_urls(data, storage_options)
    except ShardReadError as e:
        raise ConfigError(f"eval data: {e}") from None
    labelled: dict[str, tuple[list[bytes], list[str]]] = {"shape": ([], []), "colour": ([], [])}
    for url in urls:
        for s in iter_shard(url, storage_options):
            if not isinstance(s, Sample) or not s.caption:
                continue
            out.pairs.append((s.image, s.caption))
            objs = (s.meta.get("label") or {}).get("objects") if isinstance(s.meta.get("label"), dict) else None
            if objs and len(objs) == 1:
                for task in labelled:
                    if isinstance(objs[0].get(task), str):
                        labelled[task][0].append(s.image)
                        labelled[task][1].append(objs[0][task])
            if limit and len(out.pairs) >= limit:
                break
    for task, (images, names) in labelled.items():
        classes = sorted(set(names) | _known_classes(task, names))
        if images and len(classes) >= 2:  # unlabelled (real) shards: no zero-shot task
            out.tasks[task] = (images, [classes.index(n) for n in names], classes)
    return out


def _known_classes(task: str, names: list[str]) -> set[str]:
    """The synthetic corpus' full class list when the labels come from it (fixed chance level)."""
    from dr_pipeline.corpus import synthetic

    for known in {"shape": (synthetic.SPLIT_SHAPES, synthetic.SHAPES), "colour": (synthetic.COLOURS,)}.get(task, ()):
        if set(names) <= set(known):  # the splits draw 5 of the 8 shapes: chance is 1/5 there
            return set(known)
    return set()


def class_factors(classes: Sequence[str]) -> tuple[str, ...]:
    """("colour", "shape") when every class is a synthetic-domain "<colour> <shape>" name."""
    from dr_pipeline.corpus import synthetic

    parts = [c.split() for c in classes]
    if parts and all(len(p) == 2 and p[0] in synthetic.COLOURS and p[1] in synthetic.SHAPES for p in parts):
        return ("colour", "shape")
    return ()


# --------------------------------------------------------------------------- metrics


def _decode(b: bytes, size: int) -> torch.Tensor:
    return center_view(decode_image(b), size)


def decode_views(images: Sequence[bytes], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size]: each image resized (shortest side, bicubic) and centre-cropped."""
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.stack([_decode(b, size) for b in images])


@torch.no_grad()
def embed_views(model: Student, views: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    dev = next(model.parameters()).device
    feats = [model.encode_image(views[i : i + batch_size].to(dev)) for i in range(0, len(views), batch_size)]
    return torch.cat(feats).float().cpu()


@torch.no_grad()
def embed_images(model: Student, images: Sequence[bytes], batch_size: int = 64) -> torch.Tensor:
    return embed_views(model, decode_views(images, model.spec.image_size), batch_size)


@torch.no_grad()
def embed_texts(model: Student, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    dev = next(model.parameters()).device
    feats = [
        model.encode_text(tokenize(list(texts[i : i + batch_size]), model.spec.context_length).to(dev))
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(feats).float().cpu()


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Pair i is (image i, text i). R@k: fraction whose match ranks in the top k."""
    sim = img @ txt.T
    n = sim.shape[0]
    target = torch.arange(n)
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        rank = (s > s[target, target].unsqueeze(1)).sum(1)  # how many beat the true match
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out


@torch.no_grad()
def zero_shot_metrics(
    encode_texts: Callable[[list[str]], torch.Tensor],
    img: torch.Tensor,
    labels: Sequence[int],
    classes: Sequence[str],
    templates: Sequence[str],
    factors: Sequence[str] | None = None,
) -> dict[str, float]:
    """Zero-shot classification of unit-norm image features ``img`` [N, D].

    Each class is the normalized mean of ``encode_texts`` (texts -> unit-norm [T, D]; a
    student's ``embed_texts`` or a teacher's ``encode_texts``) over ``templates``; the
    prediction is the most similar class. ``top1`` (``top5`` from 5 classes); ``factors``
    (default: ``class_factors(classes)``) name the space-separated words of a class name, each
    scored alone: ``colour`` = the predicted class's first word is the true one's."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = encode_texts(texts).float().cpu().view(len(classes), len(templates), -1).mean(1)
    logits = img.float().cpu() @ torch.nn.functional.normalize(emb, dim=-1).T
    y = torch.tensor(list(labels))
    pred = logits.argmax(1)
    out = {
        "top1": float((pred == y).float().mean()),
        "n": len(y),
        "n_classes": len(classes),
        "chance": 1.0 / len(classes),
    }
    if len(classes) >= 5:
        out["top5"] = float((logits.topk(5, dim=1).indices == y.unsqueeze(1)).any(1).float().mean())
    words = [c.split() for c in classes]
    for i, name in enumerate(class_factors(classes) if factors is None else factors):
        out[name] = float(sum(words[p][i] == words[t][i] for p, t in zip(pred.tolist(), y.tolist())) / max(1, len(y)))
    return out


def evaluate(checkpoint: str, data: str, device: str | None = None, limit: int | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ck = load_student(checkpoint, dev)
    ed = load_eval_data(data, limit=limit)
    if not ed.pairs and not ed.tasks:
        raise ConfigError(f"eval data {data}: no image-caption pairs and no labelled images found")
    res: dict = {"checkpoint": ck["path"], "step": int(ck["step"]), "arch": ck["student"]["arch"], "data": data}
    res.update(evaluate_model(model, ed))
    if not res["zeroshot"]:
        res["note"] = RETRIEVAL_ONLY
    return res


RETRIEVAL_ONLY = (
    "retrieval only: the data has no labelled images (zero-shot needs an image folder "
    "DATA/<class>/* or synthetic-corpus labels)"
)


def evaluate_model(model: Student, ed: EvalData) -> dict:
    """Retrieval (``retrieval``, when there are >= 2 pairs) and zero-shot (``zeroshot``: task ->
    metrics) of a student in eval mode: ``dr eval``'s and the trainer's periodic evaluation."""
    res: dict = {}
    size = model.spec.image_size
    if len(ed.pairs) >= 2:
        img = embed_views(model, ed.views(None, [p[0] for p in ed.pairs], size))
        res["retrieval"] = {"n": len(ed.pairs), **retrieval_metrics(img, embed_texts(model, [p[1] for p in ed.pairs]))}
    res["zeroshot"] = {}
    for task, (images, labels, classes) in ed.tasks.items():
        res["zeroshot"][task] = zero_shot_metrics(
            lambda texts: embed_texts(model, texts),
            embed_views(model, ed.views(task, images, size)),
            labels,
            classes,
            TEMPLATES.get(task, TEMPLATES["folder"]),
        )
    return res


def format_table(res: dict) -> str:
    lines = [f"checkpoint {res['checkpoint']} (step {res['step']}, {res['arch']})", f"data       {res['data']}"]
    if "retrieval" in res:
        r = res["retrieval"]
        lines.append(f"{'retrieval (n=' + str(r['n']) + ')':<26}{'R@1':>8}{'R@5':>8}")
        for d in ("image_to_text", "text_to_image"):
            lines.append(f"  {d:<24}{r[f'{d}_R@1']:>8.3f}{r[f'{d}_R@5']:>8.3f}")
    if res.get("zeroshot"):
        lines.append(f"{'zero-shot':<26}{'top1':>8}{'top5':>8}{'chance':>8}{'n':>6}")
        for task, z in res["zeroshot"].items():
            top5 = f"{z['top5']:>8.3f}" if "top5" in z else f"{'-':>8}"
            words = "".join(f"  {k} {z[k]:.3f}" for k in ("colour", "shape") if k in z)
            lines.append(
                f"  {task + ' (' + str(z['n_classes']) + ' classes)':<24}{z['top1']:>8.3f}{top5}"
                f"{z['chance']:>8.3f}{z['n']:>6}{words}"
            )
    if res.get("note"):
        lines.append(res["note"])
    return "\n".join(lines)


def eval_main(checkpoint: str, data: str, out_json: str | None = None) -> int:
    """Entry point of ``dr eval --checkpoint C --data D [--out J]``; returns the exit code."""
    res = evaluate(checkpoint, data)
    print(format_table(res))
    if out_json:
        with fsspec.open(out_json, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)
        print(f"wrote {out_json}")
    return 0
