"""What a caption costs in matmul FLOPs, and what this machine's matmuls can do at those shapes.

Analytic counts (2 FLOPs per multiply-add, matmuls and attention only, as
``torch.utils.flop_counter.FlopCounterMode`` counts them; tests check the formulas against it on
tiny CoCas) for the two ways of captioning with an open_clip CoCa:

* ``public_flops``: ``model.generate(imgs, ..., fixed_output_length=True)``: every step re-runs
  the whole prefix through both towers, re-projects the image tokens to cross-attention K/V in
  every decoder layer and projects every position to the vocabulary.
* ``cached_flops``: this project's KV-cached step: per row and step one token through both
  towers, cross K/V once per image, the vocabulary projection for the newest position only.

``matmul_roof`` times plain torch matmuls of one cached step's shapes (the model's own weights,
random activations), which is as fast as that step can go on this machine without better kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CocaDims:
    text_width: int
    text_layers: int
    text_mlp: int
    text_cls: bool  # CoCa's text tower appends a cls token in the public forward
    embed_dim: int  # contrastive text projection width (public forward only)
    width: int  # multimodal decoder
    layers: int
    mlp: int
    heads: int
    vocab: int
    image_tokens: int


def coca_dims(model: torch.nn.Module, image_tokens: int) -> CocaDims:
    text, dec = model.text, model.text_decoder
    tb, db = text.transformer.resblocks[0], dec.resblocks[0]
    proj = text.text_projection
    embed = proj.shape[-1] if isinstance(proj, torch.Tensor) else proj.out_features
    return CocaDims(
        text_width=tb.attn.embed_dim,
        text_layers=len(text.transformer.resblocks),
        text_mlp=tb.mlp.c_fc.out_features,
        text_cls=text.cls_emb is not None,
        embed_dim=embed,
        width=db.attn.embed_dim,
        layers=len(dec.resblocks),
        mlp=db.mlp.c_fc.out_features,
        heads=db.attn.num_heads,
        vocab=dec.text_projection.shape[-1],
        image_tokens=image_tokens,
    )


def _block(w: int, mlp: int) -> int:
    """Linear FLOPs of one pre-norm block per token: fused q/k/v, output projection, MLP."""
    return 2 * (3 * w * w + w * w + 2 * w * mlp)


def cross_kv_flops(d: CocaDims) -> int:
    """Cross-attention K/V of every decoder layer over one image's tokens."""
    return d.layers * 2 * d.image_tokens * d.width * 2 * d.width


def cached_step_flops(d: CocaDims, ctx: int, k: int = 1) -> int:
    """One row, one step of the cached decoder, attending to ``ctx`` cached positions; cross
    attention runs the k rows of an image as k queries (FLOPs per row are the same)."""
    text = d.text_layers * (_block(d.text_width, d.text_mlp) + 4 * ctx * d.text_width)
    self_ = d.layers * (_block(d.width, d.mlp) + 4 * ctx * d.width)
    cross = d.layers * (2 * 2 * d.width * d.width + 4 * d.width * d.mlp + 4 * d.image_tokens * d.width)
    return text + self_ + cross + 2 * d.width * d.vocab


def cached_flops(d: CocaDims, seq_len: int, k: int, image_flops: int, steps: int | None = None) -> float:
    """Per caption: ``steps`` forwards (default: running to the length cap, ``seq_len - 2``: the
    forced end-of-text needs none) plus the image encode and cross K/V shared by its k captions."""
    steps = seq_len - 2 if steps is None else steps
    per_row = sum(cached_step_flops(d, ctx) for ctx in range(1, steps + 1))
    return per_row + (image_flops + cross_kv_flops(d)) / k


def public_forward_flops(d: CocaDims, t: int) -> int:
    """``CoCa.forward`` on a prefix of t tokens with precomputed image tokens (one row)."""
    tt = t + 1 if d.text_cls else t
    text = d.text_layers * (tt * _block(d.text_width, d.text_mlp) + 4 * tt * tt * d.text_width)
    text += 2 * d.text_width * d.embed_dim  # pooled text embedding
    self_ = d.layers * (t * _block(d.width, d.mlp) + 4 * t * t * d.width)
    cross = d.layers * (t * (2 * 2 * d.width * d.width + 4 * d.width * d.mlp) + 4 * t * d.image_tokens * d.width)
    return text + self_ + cross + cross_kv_flops(d) + 2 * t * d.width * d.vocab


def public_flops(d: CocaDims, seq_len: int, image_flops: int) -> float:
    """Per caption of ``generate(..., fixed_output_length=True)``: one image encode per call (a
    call makes one caption per image) and a full forward at every prefix length 1..seq_len-1."""
    return image_flops + sum(public_forward_flops(d, t) for t in range(1, seq_len))


def count_cpu_attention() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU one: teach it (same formula)."""
    from torch.utils import flop_counter as fcm

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fcm.flop_registry or op.default in fcm.flop_registry:
        return

    @fcm.register_flop_formula(op)
    def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fcm.sdpa_flop_count(query, key, value)


def image_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of CoCa's image encoder for one image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model._encode_image(x[:1])
    return fc.get_total_flops()


# --------------------------------------------------------------------------- roof


def step_matmuls(model: torch.nn.Module, n: int, k: int, ctx: int, image_tokens: int):
    """Closures running one cached step's matmuls as plain torch calls, and their FLOPs: every
    linear with the model's own weight (same memory traffic) on random rows, the attention
    products on random tensors of the step's shapes."""
    text, dec = model.text, model.text_decoder
    gen = torch.Generator().manual_seed(0)

    def lin(w: torch.Tensor, b: torch.Tensor | None):
        x = torch.randn(n, w.shape[1], generator=gen, dtype=w.dtype)
        return (lambda: F.linear(x, w, b)), 2 * n * w.shape[0] * w.shape[1]

    def bmm(batch: int, m: int, kk: int, nn_: int):
        a = torch.randn(batch, m, kk, generator=gen)
        b = torch.randn(batch, kk, nn_, generator=gen)
        return (lambda: torch.matmul(a, b)), 2 * batch * m * kk * nn_

    ops = []
    for blk in [*text.transformer.resblocks, *dec.resblocks]:
        a, h = blk.attn, blk.attn.num_heads
        dh = a.embed_dim // h
        ops += [
            lin(a.in_proj_weight, a.in_proj_bias),
            lin(a.out_proj.weight, a.out_proj.bias),
            lin(blk.mlp.c_fc.weight, blk.mlp.c_fc.bias),
            lin(blk.mlp.c_proj.weight, blk.mlp.c_proj.bias),
            bmm(n * h, 1, dh, ctx),
            bmm(n * h, 1, ctx, dh),
        ]
    n_img = max(1, n // k)
    for blk in dec.cross_attn:
        a, h = blk.attn, blk.attn.num_heads
        w, dh = a.embed_dim, a.embed_dim // a.num_heads
        bias = a.in_proj_bias[:w] if a.in_proj_bias is not None else None
        ops += [
            lin(a.in_proj_weight[:w], bias),
            lin(a.out_proj.weight, a.out_proj.bias),
            lin(blk.mlp.c_fc.weight, blk.mlp.c_fc.bias),
            lin(blk.mlp.c_proj.weight, blk.mlp.c_proj.bias),
            bmm(n_img * h, k, dh, image_tokens),
            bmm(n_img * h, k, image_tokens, dh),
        ]
    ops.append(lin(dec.text_projection.t(), None))
    return ops


def matmul_roof(model: torch.nn.Module, n: int, k: int, ctx: int, image_tokens: int, reps: int = 3) -> dict:
    """Best-of-``reps`` seconds and GFLOP/s of one cached step's matmuls run back to back."""
    ops = step_matmuls(model, n, k, ctx, image_tokens)
    flops = sum(f for _, f in ops)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first pass warms caches and allocator
            t = time.perf_counter()
            for fn, _ in ops:
                fn()
            best = min(best, time.perf_counter() - t)
    return {"step_s": best, "step_flops": flops, "gflops": flops / best / 1e9}
